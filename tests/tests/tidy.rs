//! Cheap "tidy" checks over the whole workspace (rust-analyzer's `tidy.rs` idea): habits
//! from STYLE.md that a reviewer should not have to police by hand.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

fn all_sources() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["daemon", "ublk", "csi", "proto", "bench", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(
        files.len() > 10,
        "found only {} Rust files under {}",
        files.len(),
        root.display()
    );
    files
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let mut missing = Vec::new();
    for f in all_sources() {
        let text = std::fs::read_to_string(&f).expect("read");
        if !text.trim_start().starts_with("//!") {
            missing.push(f.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "files without a leading //! comment saying what they own:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut bare = Vec::new();
    for f in all_sources() {
        let text = std::fs::read_to_string(&f).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            // Split so this file does not match itself.
            if code.starts_with("//") || !code.contains(concat!("unsafe", " {")) {
                continue;
            }
            // The comment may sit on the lines just above (a multi-line SAFETY comment, or
            // the statement the block belongs to).
            let above = lines[i.saturating_sub(8)..i]
                .iter()
                .any(|l| l.contains("SAFETY"));
            if !above && !line.contains("SAFETY") {
                bare.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "unsafe blocks without a // SAFETY: comment:\n{}",
        bare.join("\n")
    );
}
