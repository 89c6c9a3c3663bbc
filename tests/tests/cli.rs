//! `coreblkd` as a user runs it: the default device and its pool, idle cost, SIGTERM, an
//! image piped through `coreblk image import -` and back, snapshots, clones, rollback,
//! inflate and incremental export through the tables, and bad input.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn coreblkd() -> Command {
    Command::new(coreblk_tests::bin("coreblkd"))
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may contain spaces) — utime is field 14.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn default_device_idles_near_zero_cpu_and_stops_on_sigterm() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let log_path = dir.path().join("log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = coreblkd()
        // Its own socket and an ephemeral metrics port: never the node-wide defaults.
        .args([
            "--cores",
            "0-1",
            "--no-pin",
            "--default-size",
            "64M",
            "--metrics-address",
            "127.0.0.1:0",
        ])
        .arg("--socket")
        .arg(dir.path().join("coreblkd.sock"))
        .current_dir(dir.path())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let serving = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| {
            l.contains("serving; stop with SIGTERM") && l.contains("pool import finished")
        })
    });
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(serving, "daemon did not start:\n{text}");
    assert!(
        text.contains("no device configured: using a sparse file"),
        "{text}"
    );
    assert!(text.contains("created the default pool"), "{text}");
    assert!(dir.path().join("var/default-pool.img").exists());
    // Idle: two reactors together under 1% of one core over 3 s (at 100 ticks/s: < 3 ticks).
    let t0 = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(child.id()) - t0;
    assert!(used < 3, "idle coreblkd used {used} ticks (1/100 s) in 3 s");
    // SAFETY-free: kill(2) through the shell-less libc-free route: the `kill` command.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let mut exited = None;
    assert!(wait_for(Duration::from_secs(10), || {
        exited = child.try_wait().expect("wait");
        exited.is_some()
    }));
    assert!(exited.expect("exited").success(), "SIGTERM is a clean stop");
}

/// Kills the daemon if a test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn an_image_piped_in_comes_back_out_through_the_cli() {
    use std::io::Write;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let socket = dir.path().join("coreblkd.sock");
    let log_path = dir.path().join("log");
    let mut child = KillOnDrop(
        coreblkd()
            .args(["--cores", "0", "--no-pin", "--default-size", "128M"])
            .args(["--metrics-address", "127.0.0.1:0", "--var-dir"])
            .arg(dir.path().join("var"))
            .arg("--socket")
            .arg(&socket)
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn"),
    );
    let ready = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("pool import finished"))
    });
    assert!(
        ready,
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let coreblk = || {
        let mut c = Command::new(coreblk_tests::bin("coreblk"));
        c.arg("--socket").arg(&socket);
        c
    };
    // 1 MiB: a pattern, a hole, a pattern.
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate().take(200_000) {
        *b = u8::try_from(i % 251).expect("small") + 1;
    }
    data[900_000..1 << 20].fill(0xa5);
    let mut import = coreblk()
        .args(["image", "import", "-", "--volume", "piped", "--size", "1M"])
        // Progress is drawn on a terminal; COREBLK_PROGRESS=1 draws it on a pipe too.
        .env("COREBLK_PROGRESS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("import");
    import
        .stdin
        .take()
        .expect("stdin")
        .write_all(&data)
        .expect("pipe");
    let out = import.wait_with_output().expect("import ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("piped") && table.contains("ready"),
        "{table}"
    );
    // Standard input has no size: bytes and rate, no total.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("\rimport 1.0 MiB") && progress.ends_with('\n'),
        "{progress:?}"
    );
    let back = dir.path().join("back.raw");
    let out = coreblk()
        .args(["image", "export", "--volume", "piped"])
        .arg(&back)
        .env("COREBLK_PROGRESS", "1")
        .output()
        .expect("export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("\rexport 1.0 MiB / 1.0 MiB (100%)"),
        "{progress:?}"
    );
    // Without a terminal (and without COREBLK_PROGRESS) scripts see no progress.
    let quiet = coreblk()
        .args(["image", "export", "--volume", "piped"])
        .arg(&back)
        .output()
        .expect("export");
    assert!(quiet.status.success());
    assert!(
        quiet.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    assert!(
        std::fs::read(&back).expect("read") == data,
        "round trip differs"
    );
    let st = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let mut exited = None;
    assert!(wait_for(Duration::from_secs(10), || {
        exited = child.0.try_wait().expect("wait");
        exited.is_some()
    }));
    assert!(exited.expect("exited").success(), "SIGTERM is a clean stop");
}

#[test]
fn coreblkd_help_names_each_setting_with_its_default() {
    let out = coreblkd().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--config <PATH>",
        "coreblkd.example.toml",
        "flags win",
        "--socket <PATH>",
        "(created mode 0600) [default: /run/coreblk/coreblkd.sock]",
        "--metrics-address <ADDR>",
        "[default: 127.0.0.1:9544]",
        "--var-dir <VAR_DIR>",
        "[default: ./var]",
        "--cores <CORES>",
        "--device <DEVICE>",
        "--node-id <NODE_ID>",
        "SIGTERM",
        "COREBLK_LOG",
    ] {
        assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
    }
}

fn fails_with(args: &[&str], needle: &str) {
    let out = coreblkd()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: a clean error exit, not a panic (101): {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let small = dir.path().join("small.img");
    std::fs::write(&small, [0u8; 4096]).expect("write");
    let d = |p: &std::path::Path| p.display().to_string();
    fails_with(
        &["--cores", "1-0", "--device", &d(&small)],
        "invalid core list",
    );
    fails_with(&["--cores", "zero"], "invalid core list");
    fails_with(&["--cores", "4000"], "not available to this process");
    fails_with(&["--device", "/nonexistent/disk"], "/nonexistent/disk");
    fails_with(&["--device", &d(&small)], "smaller than the minimum");
    fails_with(
        &["--device", &d(dir.path())],
        "neither a block device nor a regular file",
    );
    fails_with(&["--default-size", "lots"], "invalid size");
    fails_with(
        &["devices", "claim", "/nonexistent/disk"],
        "/nonexistent/disk",
    );
    let mut s = String::new();
    let mut c = coreblkd()
        .args(["devices", "claim", &d(&small)])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    c.stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut s)
        .expect("read");
    assert!(!c.wait().expect("wait").success());
    assert!(s.contains("small"), "{s}");
}

#[test]
fn snapshots_and_clones_through_the_cli_tables() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let socket = dir.path().join("coreblkd.sock");
    let log_path = dir.path().join("log");
    let child = KillOnDrop(
        coreblkd()
            .args(["--cores", "0", "--no-pin", "--default-size", "128M"])
            .args(["--metrics-address", "127.0.0.1:0", "--var-dir"])
            .arg(dir.path().join("var"))
            .arg("--socket")
            .arg(&socket)
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn"),
    );
    let ready = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("pool import finished"))
    });
    assert!(
        ready,
        "{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let run = |args: &[&str]| -> String {
        let out = Command::new(coreblk_tests::bin("coreblk"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("coreblk");
        assert!(
            out.status.success(),
            "coreblk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let path = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_owned();
    // v1: 1 MiB of a pattern, written with `image import --overwrite` over an empty volume.
    run(&["volume", "create", "v1", "--size", "1M"]);
    let old = vec![0x11u8; 1 << 20];
    std::fs::write(path("old.raw"), &old).expect("write");
    run(&[
        "image",
        "import",
        &path("old.raw"),
        "--volume",
        "v1",
        "--overwrite",
    ]);
    let table = run(&["snapshot", "create", "v1", "s1"]);
    assert!(table.contains("s1") && table.contains("v1"), "{table}");
    // Overwrite the first 64 KiB with zeroes and the next with another pattern.
    let mut new = old.clone();
    new[..64 << 10].fill(0);
    new[64 << 10..128 << 10].fill(0x22);
    std::fs::write(path("new.raw"), &new).expect("write");
    run(&[
        "image",
        "import",
        &path("new.raw"),
        "--volume",
        "v1",
        "--overwrite",
    ]);
    run(&["snapshot", "create", "v1", "s2"]);
    let list = run(&["snapshot", "list", "--volume", "v1"]);
    assert!(list.contains("s1") && list.contains("s2"), "{list}");
    // Rewriting unchanged bytes copies them too: the diff is by mapping, at cluster
    // granularity, so it covers every cluster the overwrite wrote.
    let diff = run(&["snapshot", "diff", "s1", "s2"]);
    assert!(diff.contains("changed in"), "{diff}");
    // Exports: the old snapshot, then the new one on top of it, incrementally.
    run(&["image", "export", &path("s.raw"), "--snapshot", "s1"]);
    assert!(std::fs::read(path("s.raw")).expect("read") == old);
    run(&[
        "image",
        "export",
        &path("s.raw"),
        "--snapshot",
        "s2",
        "--since",
        "s1",
    ]);
    assert!(std::fs::read(path("s.raw")).expect("read") == new);
    // A clone, rollback, inflate, deletes.
    let clone = run(&["volume", "create", "c1", "--from", "s1"]);
    assert!(clone.contains("c1"), "{clone}");
    run(&["image", "export", &path("c1.raw"), "--volume", "c1"]);
    assert!(std::fs::read(path("c1.raw")).expect("read") == old);
    run(&["volume", "rollback", "v1", "s1"]);
    run(&["image", "export", &path("v1.raw"), "--volume", "v1"]);
    assert!(std::fs::read(path("v1.raw")).expect("read") == old);
    run(&["volume", "inflate", "c1"]);
    run(&["snapshot", "delete", "s1"]);
    run(&["volume", "delete", "v1"]);
    run(&["image", "export", &path("c1b.raw"), "--volume", "c1"]);
    assert!(std::fs::read(path("c1b.raw")).expect("read") == old);
    run(&["image", "export", &path("s2.raw"), "--snapshot", "s2"]);
    assert!(std::fs::read(path("s2.raw")).expect("read") == new);
    let got = run(&["snapshot", "get", "s2"]);
    assert!(got.contains("v1"), "the deleted volume's name stays: {got}");
    // `get` shows every figure, one per line, in binary units.
    let field = |table: &str, name: &str| -> String {
        table
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with("  ")))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{table}"))
            .trim()
            .to_owned()
    };
    // s2: 1 MiB less the first 64 KiB zeroed (unmapped); v1 is deleted, so s2 alone holds
    // its clusters.
    assert_eq!(field(&got, "allocated"), "960.0 KiB", "{got}");
    assert_eq!(field(&got, "unique"), "960.0 KiB", "{got}");
    let pool = run(&["pool", "get", "default"]);
    for name in [
        "capacity",
        "free",
        "allocated",
        "reserved (thick)",
        "held by deleted",
        "provisioned",
    ] {
        assert!(field(&pool, name).ends_with('B'), "{name}: {pool}");
    }
    assert_eq!(field(&pool, "cluster size"), "64.0 KiB", "{pool}");
    assert_eq!(field(&pool, "overcommit limit"), "1.00", "{pool}");
    assert_eq!(field(&pool, "snapshots"), "1", "{pool}");
    let c1 = run(&["volume", "get", "c1"]);
    assert_eq!(field(&c1, "size"), "1.0 MiB", "{c1}");
    assert_eq!(field(&c1, "provisioning"), "thin", "{c1}");
    drop(child);
}

#[test]
fn a_config_file_configures_the_daemon_and_its_flags_win() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let file_socket = dir.path().join("from-file.sock");
    let var = dir.path().join("var");
    let config = dir.path().join("coreblkd.toml");
    std::fs::write(
        &config,
        format!(
            "socket = {:?}\nvar_dir = {:?}\ndefault_size = \"96M\"\ncores = \"0\"\npin = false\n\
             metrics_address = \"off\"\nnode_id = \"from-file\"\n",
            file_socket.to_str().expect("utf-8"),
            var.to_str().expect("utf-8"),
        ),
    )
    .expect("config");
    let log_path = dir.path().join("log");
    // The node id is in both: the flag wins; the rest comes from the file.
    let mut child = KillOnDrop(
        coreblkd()
            .arg("--config")
            .arg(&config)
            .args(["--node-id", "from-flag"])
            .current_dir(dir.path())
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn"),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(30), || log()
            .contains("pool import finished")),
        "{}",
        log()
    );
    // The socket is the file's, created 0600; COREBLK_SOCKET reaches it.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&file_socket)
            .expect("socket from the file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(coreblk_tests::bin("coreblk"))
            .env("COREBLK_SOCKET", &file_socket)
            .args(["-o", "json"])
            .args(args)
            .output()
            .expect("coreblk");
        assert!(
            out.status.success(),
            "coreblk {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let info = json(&["node", "info"]);
    assert_eq!(info["node_id"], "from-flag", "{info}");
    assert_eq!(
        info["metrics_address"], "",
        "metrics off by the file: {info}"
    );
    assert_eq!(info["reactors"].as_array().map(Vec::len), Some(1), "{info}");
    assert_eq!(info["reactors_pinned"], false, "{info}");
    // The default pool lives in the file's var_dir, sized by its default_size.
    let device = var.join("default-pool.img");
    assert_eq!(
        std::fs::metadata(&device).expect("default device").len(),
        96 << 20
    );
    let pool = json(&["pool", "get", "default"]);
    let capacity = pool["pools"][0]["capacity_bytes"]
        .as_u64()
        .expect("capacity");
    assert!(capacity > 32 << 20 && capacity < 96 << 20, "{pool}");
    // SIGINT (Ctrl-C) stops it as cleanly as SIGTERM (the other tests' signal).
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    // SAFETY: kill takes plain integers; the pid is this test's child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let mut status = None;
    assert!(wait_for(Duration::from_secs(20), || {
        status = child.0.try_wait().expect("wait");
        status.is_some()
    }));
    assert!(status.expect("exited").success(), "{}", log());
    assert!(log().contains("control plane stopped"), "{}", log());
    assert!(!file_socket.exists(), "a clean stop removes the socket");
}
