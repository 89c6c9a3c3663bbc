//! Compiles `coreblk/v1/*.proto` (the daemon API) and `csi/v1/*.proto` (the CSI spec) into
//! Rust without a system `protoc`: protox (a protobuf compiler in Rust) parses the files
//! into a `FileDescriptorSet`, which tonic-prost-build turns into prost messages and tonic
//! clients and servers in `OUT_DIR`.

use std::path::{Path, PathBuf};

/// The `.proto` files of one package directory, sorted.
fn protos(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(files)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = protos(&root.join("coreblk/v1"))?;
    files.extend(protos(&root.join("csi/v1"))?);
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
