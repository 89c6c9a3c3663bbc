//! End-to-end tests of coreblk through its public interfaces (binaries, CLI, API).
//!
//! The tests live in `tests/tests/` (the harness that starts a real `coreblkd` on a temp
//! socket in `tests/tests/common/`); this library only hosts shared helpers: [`bin`] finds
//! the binaries under test.

use std::path::{Path, PathBuf};

/// Names a directory to take the binaries under test from, instead of the target profile
/// directory of the running test.
pub const BIN_DIR_ENV: &str = "COREBLK_BIN_DIR";

/// The path of the workspace binary `name` (`coreblkd`, `coreblk`, `coreblk-csi`) that the
/// tests run.
///
/// `$COREBLK_BIN_DIR/<name>` if that variable is set; otherwise `<name>` in the target
/// profile directory of the running test executable: that is
/// `target/<profile>/deps/<test>-<hash>`, the binaries are `target/<profile>/<name>`.
/// (Cargo sets `CARGO_BIN_EXE_<name>` only for the tests of the package that owns the
/// binary, and these are in another package.) A workspace-wide `cargo test` or
/// `cargo nextest run` builds the binaries first — `coreblk-daemon` and `coreblk-csi` have
/// integration tests of their own, and Cargo builds a package's binaries for those — but
/// `-p coreblk-tests` alone does not.
///
/// # Panics
///
/// If there is no such file: the message says how to build it. A missing binary is a
/// failure, never a skipped test.
pub fn bin(name: &str) -> PathBuf {
    let (dir, from) = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => (PathBuf::from(dir), format!("${BIN_DIR_ENV}")),
        None => (
            profile_dir(),
            "the test's target profile directory".to_owned(),
        ),
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{name} not found at {} (taken from {from}): build the binaries first with \
         `cargo build -p coreblk-daemon -p coreblk-csi --bins` (`cargo test -p coreblk-tests` \
         does not build them; a workspace-wide `cargo nextest run --workspace --features coreblk-daemon/testing` \
         does), or set {BIN_DIR_ENV} to the directory that holds them",
        path.display()
    );
    path
}

/// `target/<profile>` of the running test executable (`target/<profile>/deps/<test>-<hash>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}
