//! `coreblk-csi`'s command line: `--version`, and flags it refuses with a message that says
//! what to fix, before it serves anything. (Also makes a workspace-wide `cargo test` build
//! the binary that `tests/tests/csi_controller.rs` runs.)

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coreblk-csi"))
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("CSI_ENDPOINT")
        .output()
        .expect("run coreblk-csi")
}

#[test]
fn version_is_printed() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        format!("coreblk-csi {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_flags_are_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("csi.sock");
    let sock = sock.to_str().expect("utf-8");
    for (args, says) in [
        (
            vec!["--mode", "node", "--endpoint", sock],
            "--node-id is required",
        ),
        (
            vec![
                "--mode",
                "node",
                "--node-id",
                "bad/node",
                "--endpoint",
                sock,
            ],
            "invalid node id",
        ),
        (
            vec!["--node-id", "n1", "--endpoint", "tcp://0.0.0.0:1234"],
            "only unix sockets",
        ),
        (
            vec![
                "--node-id",
                "n1",
                "--endpoint",
                sock,
                "--kubelet-dir",
                "rel",
            ],
            "not an absolute path",
        ),
        (vec!["--mode", "everything"], "invalid value"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err:?} should say {says:?}");
    }
    assert!(
        !dir.path().join("csi.sock").exists(),
        "a refused start made a socket"
    );
}
