//! The API end to end: a real `coreblkd` on a temp socket, driven only through the
//! `coreblk` CLI and a tonic client — devices (claim, idempotency, release, restart),
//! node info, pools and volumes (idempotency, error codes, pagination), image import and
//! export (holes, byte-identical round trip, interrupted and resumed imports), snapshots,
//! group snapshots, clones, rollback, inflate, diff and incremental export, data that
//! survives a restart and a `kill -9`, the unbuilt services' status codes, socket
//! ownership (a second daemon is refused, a stale socket replaced), SIGTERM, and
//! `/metrics`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use coreblk_daemon::control::client::connect;
use coreblk_daemon::metrics::text;
use coreblk_proto::v1 as pb;
use serde_json::Value;

const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(20);

fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn workdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .expect("create")
        .set_len(80 << 20)
        .expect("size");
    p
}

/// A running `coreblkd`, killed on drop if a test did not stop it.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `coreblkd` in `dir` (state under `dir/var`) on `socket` and waits until it
    /// answers there.
    fn start(dir: &Path, socket: &Path) -> Self {
        let d = Self::spawn(dir, socket, &[]);
        let ready = wait_for(START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
                && d.log_text().contains("serving; stop with SIGTERM")
                && d.log_text().contains("pool import finished")
        });
        assert!(ready, "coreblkd did not start:\n{}", d.log_text());
        d
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        let log = dir.join(format!("coreblkd-{}.log", unique()));
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(coreblk_tests::bin("coreblkd"))
            .args(["--no-pin", "--cores", "0", "--default-size", "256M"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .arg("--var-dir")
            .arg(dir.join("var"))
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("NO_COLOR", "1")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn coreblkd");
        Self {
            child,
            socket: socket.to_path_buf(),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // The pid is our own child, not yet reaped (we hold its `Child` and have not
        // waited for it), so it cannot name another process.
        // SAFETY: kill takes plain integers, and the pid names only our child (above).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Sends `sig` and waits for the exit.
    fn stop_with(mut self, sig: libc::c_int) -> std::process::ExitStatus {
        self.signal(sig);
        let mut status = None;
        let exited = wait_for(STOP_DEADLINE, || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        assert!(exited, "coreblkd did not stop:\n{}", self.log_text());
        status.expect("exited")
    }

    fn coreblk(&self, args: &[&str]) -> Output {
        coreblk_on(&self.socket, args)
    }

    /// Runs `coreblk -o json ARGS`, expects success, returns the JSON.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.coreblk(&all);
        assert!(
            out.status.success(),
            "coreblk {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "coreblk {args:?} printed no JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unique() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn coreblk_on(socket: &Path, args: &[&str]) -> Output {
    Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run coreblk")
}

/// Expects `out` to be a clean failure (exit 1, no panic) whose stderr contains `needle`.
fn failed_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn devices_are_listed_claimed_held_and_released_through_the_cli() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &dir.path().join("api.sock"));
    let img = image(dir.path(), "pool-a.img");
    let img_s = path_str(&img);

    let list = daemon.json(&["device", "list", img_s]);
    let me = list
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["path"] == img_s)
        .expect("the named file is listed");
    assert_eq!(me["kind"], "file");
    assert_eq!(me["claimable"], true, "{me}");
    assert_eq!(me["claimed"], false);

    let claimed = daemon.json(&["device", "claim", img_s]);
    assert_eq!(claimed["path"], img_s);
    assert_eq!(claimed["newly_labelled"], true);
    assert_eq!(claimed["present"], true);
    let device_uuid = claimed["device_uuid"].as_str().expect("uuid").to_owned();

    // Idempotent: the same claim returns the same device.
    let again = daemon.json(&["device", "claim", img_s]);
    assert_eq!(again["device_uuid"], device_uuid.as_str());

    // Held: the file's lock refuses an offline claim by the other tool.
    let offline = Command::new(coreblk_tests::bin("coreblkd"))
        .args(["devices", "claim", img_s, "--force"])
        .output()
        .expect("run coreblkd devices claim");
    assert!(!offline.status.success());
    assert!(String::from_utf8_lossy(&offline.stderr).contains("in use"));

    // Listed as claimed (files we hold are listed without naming them).
    let list = daemon.json(&["device", "list"]);
    let me = list
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["path"] == img_s)
        .expect("held file listed");
    assert_eq!(me["claimed"], true);
    assert_eq!(me["label_device_uuid"], device_uuid.as_str());

    // The human table says so too.
    let table = daemon.coreblk(&["device", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("PATH"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(img_s) && l.contains("claimed")),
        "{table}"
    );

    let info = daemon.json(&["node", "info"]);
    assert!(
        info["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .any(|d| d["device_uuid"] == device_uuid.as_str()),
        "{info}"
    );
    assert_eq!(info["state"], "serving");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["reactors"][0]["core"], 0);
    assert!(!info["node_id"].as_str().expect("id").is_empty());
    assert!(!info["kernel_release"].as_str().expect("kernel").is_empty());
    assert!(info["served_device_path"]
        .as_str()
        .expect("served")
        .ends_with("default-pool.img"));

    // A relative path is made absolute by the CLI.
    let rel = Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["-o", "json", "device", "claim", "pool-a.img"])
        .current_dir(dir.path())
        .output()
        .expect("run");
    assert!(
        rel.status.success(),
        "{}",
        String::from_utf8_lossy(&rel.stderr)
    );

    let released = daemon.json(&["device", "release", img_s, "--wipe-label"]);
    assert_eq!(released["device_uuid"], device_uuid.as_str());
    failed_with(
        &daemon.coreblk(&["device", "release", img_s]),
        "is not claimed by this daemon",
    );
    failed_with(
        &daemon.coreblk(&["device", "claim", "/nonexistent/disk.img"]),
        "does not exist",
    );
    let small = dir.path().join("small.img");
    std::fs::write(&small, [0u8; 4096]).expect("small");
    failed_with(
        &daemon.coreblk(&["device", "claim", path_str(&small)]),
        "too small",
    );
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn claims_survive_a_restart_and_are_found_by_label() {
    let dir = workdir();
    let socket = dir.path().join("api.sock");
    let img = image(dir.path(), "pool-b.img");
    let daemon = Daemon::start(dir.path(), &socket);
    let claimed = daemon.json(&["device", "claim", path_str(&img)]);
    let status = daemon.stop_with(libc::SIGTERM);
    assert!(status.success());

    let daemon = Daemon::start(dir.path(), &socket);
    let info = daemon.json(&["node", "info"]);
    let dev = info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["device_uuid"] == claimed["device_uuid"])
        .expect("the claimed file is held again");
    assert_eq!(dev["pool_uuid"], claimed["pool_uuid"]);
    assert_eq!(dev["present"], true);
    assert_eq!(dev["newly_labelled"], false, "taken back, not relabelled");
    assert!(
        daemon.log_text().contains("took back a claimed device"),
        "{}",
        daemon.log_text()
    );
    // Still held by the restarted daemon.
    let offline = Command::new(coreblk_tests::bin("coreblkd"))
        .args(["devices", "claim", path_str(&img), "--force"])
        .output()
        .expect("run");
    assert!(!offline.status.success());
    assert!(
        daemon.stop_with(libc::SIGINT).success(),
        "SIGINT is a clean stop too"
    );
}

#[test]
fn services_without_ublk_answer_with_proper_statuses() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &dir.path().join("api.sock"));
    rt().block_on(async {
        let channel = connect(&daemon.socket).await.expect("connect");
        let e = pb::exports_client::ExportsClient::new(channel.clone())
            .export_volume(pb::ExportVolumeRequest {
                volume: "v".into(),
                ..Default::default()
            })
            .await
            .expect_err("no exports yet");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("exports are not available"),
            "{}",
            e.message()
        );
        // VerifyPool is served (verify_daemon.rs tests it); data checksums are not kept.
        let e = pb::pools_client::PoolsClient::new(channel.clone())
            .verify_pool(pb::VerifyPoolRequest {
                pool: "nosuch".into(),
                check_data: false,
            })
            .await
            .expect_err("no such pool");
        assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
        let e = pb::devices_client::DevicesClient::new(channel.clone())
            .claim_device(pb::ClaimDeviceRequest {
                path: "relative.img".into(),
                force: false,
            })
            .await
            .expect_err("relative path");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let stats = pb::node_client::NodeClient::new(channel)
            .get_stats(pb::GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner();
        assert_eq!(stats.reactors.len(), 1);
    });
    // `coreblk status`: the node and its reactors at a glance.
    let status = daemon.json(&["status"]);
    assert_eq!(status["node"]["state"], "serving", "{status}");
    assert_eq!(
        status["stats"]["reactors"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    let table = daemon.coreblk(&["status"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with(&format!("coreblkd {}", env!("CARGO_PKG_VERSION")))
            && table.contains("serving"),
        "{table}"
    );
    // The CLI prints the server's message and the code, and exits 1.
    daemon.json(&["volume", "create", "v1", "--size", "1M"]);
    // Thick volumes reserve their size; one that cannot be reserved is refused.
    let v3 = daemon.json(&["volume", "create", "v3", "--size", "1M", "--thick"]);
    assert!(v3.to_string().contains("\"thick\":true"), "{v3}");
    let out = daemon.coreblk(&["volume", "create", "v4", "--size", "100G", "--thick"]);
    failed_with(&out, "(RESOURCE_EXHAUSTED)");
    failed_with(
        &daemon.coreblk(&["export", "v1", "--persistent"]),
        "(FAILED_PRECONDITION)",
    );
    // Listing works without ublk (there is nothing to list).
    let list = daemon.json(&["export", "list"]);
    assert_eq!(list["exports"], serde_json::json!([]), "{list}");
    failed_with(&daemon.coreblk(&["unexport", "v1"]), "FAILED_PRECONDITION");
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn one_daemon_per_socket_and_a_stale_socket_is_replaced() {
    let dir = workdir();
    let socket = dir.path().join("run/api.sock");
    let first = Daemon::start(dir.path(), &socket);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A second daemon on the same socket is refused, with a clear error.
    let other = workdir();
    let mut second = Daemon::spawn(other.path(), &socket, &[]);
    let mut status = None;
    assert!(wait_for(START_DEADLINE, || {
        status = second.child.try_wait().expect("wait");
        status.is_some()
    }));
    assert_eq!(status.expect("exited").code(), Some(1));
    let log = second.log_text();
    assert!(log.contains("another coreblkd is serving on"), "{log}");
    assert!(log.contains("--socket"), "{log}");
    // So is one on another socket that is given the first one's device.
    let device = dir.path().join("var/default-pool.img");
    let other = workdir();
    let mut on_device = Daemon::spawn(
        other.path(),
        &other.path().join("other.sock"),
        &["--device", path_str(&device)],
    );
    let mut status = None;
    assert!(wait_for(START_DEADLINE, || {
        status = on_device.child.try_wait().expect("wait");
        status.is_some()
    }));
    assert_eq!(status.expect("exited").code(), Some(1));
    let log = on_device.log_text();
    assert!(
        log.contains("is in use: another coreblkd holds its lock"),
        "{log}"
    );
    assert!(!other.path().join("other.sock").exists(), "{log}");
    // ...and the first still answers.
    assert!(first.coreblk(&["node", "info"]).status.success());

    // A daemon that dies without cleaning up leaves a stale socket; the next one
    // replaces it.
    let killed = first.stop_with(libc::SIGKILL);
    assert!(!killed.success());
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let third = Daemon::start(dir.path(), &socket);
    assert!(
        third.log_text().contains("replaced a stale API socket"),
        "{}",
        third.log_text()
    );
    assert!(third.coreblk(&["node", "info"]).status.success());
    let log_path = third.log.clone();
    assert!(third.stop_with(libc::SIGTERM).success(), "SIGTERM exits 0");
    let log = std::fs::read_to_string(log_path).expect("log");
    assert!(log.contains("control plane stopped"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!socket.exists(), "a clean stop removes the socket");
    failed_with(
        &coreblk_on(&socket, &["node", "info"]),
        "no coreblkd socket",
    );
}

#[test]
fn metrics_endpoint_serves_valid_exposition_text() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &dir.path().join("api.sock"));
    let img = image(dir.path(), "pool-m.img");
    daemon.json(&["device", "claim", path_str(&img)]);
    let info = daemon.json(&["node", "info"]);
    let addr = info["metrics_address"].as_str().expect("metrics address");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let mut conn = TcpStream::connect(addr).expect("connect metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let samples = text::parse(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v))
            })
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
            .value
    };
    assert_eq!(
        value(
            "coreblk_build_info",
            Some(("version", env!("CARGO_PKG_VERSION")))
        ),
        1.0
    );
    assert!(value("coreblk_start_time_seconds", None) > 1.6e9);
    assert!(value("coreblk_reactor_busy_seconds_total", Some(("reactor", "0"))) >= 0.0);
    assert!(
        value(
            "coreblk_reactor_sleep_seconds_total",
            Some(("reactor", "0"))
        ) >= 0.0
    );
    value("coreblk_reactor_completions_total", Some(("reactor", "0")));
    value("coreblk_reactor_sleeps_total", Some(("reactor", "0")));
    // The default pool's file and this one.
    assert_eq!(
        value("coreblk_claimed_devices", Some(("state", "present"))),
        2.0
    );
    assert_eq!(
        value(
            "coreblk_claimed_device_size_bytes",
            Some(("path", path_str(&img)))
        ),
        f64::from(80u32 << 20)
    );
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn cli_without_a_daemon_and_completions() {
    let dir = workdir();
    let socket = dir.path().join("none.sock");
    failed_with(
        &coreblk_on(&socket, &["node", "info"]),
        "no coreblkd socket",
    );
    // A stale socket file: said so.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    failed_with(
        &coreblk_on(&socket, &["device", "list"]),
        "coreblkd is not running",
    );
    // COREBLK_SOCKET names the socket too.
    let out = Command::new(coreblk_tests::bin("coreblk"))
        .env("COREBLK_SOCKET", dir.path().join("env.sock"))
        .args(["node", "info"])
        .output()
        .expect("run");
    failed_with(&out, "env.sock");
    for shell in ["bash", "zsh", "fish"] {
        let out = coreblk_on(&socket, &["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains("coreblk"), "{shell}: {script}");
        assert!(script.contains("claim"), "{shell} completes subcommands");
    }
    let bad = coreblk_on(
        &socket,
        &["volume", "create", "v", "--pool", "p", "--size", "lots"],
    );
    assert_eq!(bad.status.code(), Some(2), "usage errors exit 2");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid size"));
}

/// Writes `len` bytes to `path`: seeded data in `data_ranges`, holes elsewhere.
fn sparse_image(path: &Path, len: u64, data_ranges: &[(u64, u64)], seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut rng = coreblk_daemon::testing::Rng::new(seed);
    let mut bytes = vec![0u8; usize::try_from(len).expect("fits")];
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(len).expect("size image");
    for &(start, end) in data_ranges {
        let (s, e) = (
            usize::try_from(start).expect("fits"),
            usize::try_from(end).expect("fits"),
        );
        for b in &mut bytes[s..e] {
            // Never zero, so every data block is sent.
            *b = rng.next_u64().to_le_bytes()[0] | 1;
        }
        f.write_all_at(&bytes[s..e], start).expect("write image");
    }
    bytes
}

fn volume_of(v: &Value) -> &Value {
    &v["volumes"][0]
}

/// Exports `volume` to a new file in `dir` and returns its bytes.
fn export_bytes(daemon: &Daemon, dir: &Path, volume: &str) -> Vec<u8> {
    let out = dir.join(format!("export-{volume}-{}.raw", unique()));
    let done = daemon.json(&["image", "export", path_str(&out), "--volume", volume]);
    assert_eq!(done["ok"], true, "{done}");
    std::fs::read(&out).expect("read export")
}

#[test]
fn volumes_and_images_round_trip_and_survive_restart_and_kill() {
    let dir = workdir();
    let socket = dir.path().join("api.sock");
    let daemon = Daemon::start(dir.path(), &socket);
    assert!(
        daemon.log_text().contains("created the default pool"),
        "{}",
        daemon.log_text()
    );

    // The default pool, online, with room.
    let pools = daemon.json(&["pool", "list"]);
    let pool = &pools["pools"][0];
    assert_eq!(pool["name"], "default", "{pools}");
    assert_eq!(pool["state"], "online", "{pools}");
    let capacity = pool["capacity_bytes"].as_u64().expect("capacity");
    assert!(capacity > 64 << 20, "{pools}");
    assert_eq!(pool["free_bytes"].as_u64(), Some(capacity), "{pools}");
    assert_eq!(pool["provisioned_bytes"], 0);

    // Create is idempotent by name; other parameters are ALREADY_EXISTS naming them.
    let v1 = daemon.json(&[
        "volume", "create", "v1", "--size", "16M", "--label", "app=db",
    ]);
    let v1 = volume_of(&v1).clone();
    assert_eq!(v1["size_bytes"], 16 << 20);
    assert_eq!(v1["state"], "ready");
    assert_eq!(v1["never_written"], true);
    let again = daemon.json(&[
        "volume", "create", "v1", "--size", "16M", "--label", "app=db",
    ]);
    assert_eq!(volume_of(&again)["uuid"], v1["uuid"]);
    let other = daemon.coreblk(&[
        "volume", "create", "v1", "--size", "32M", "--label", "app=db",
    ]);
    failed_with(&other, "(ALREADY_EXISTS)");
    failed_with(&other, "size 16777216 bytes");
    // A bad name is refused with the rule it broke.
    let bad = daemon.coreblk(&["volume", "create", "bad!name", "--size", "1M"]);
    failed_with(&bad, "(INVALID_ARGUMENT)");
    failed_with(&bad, "1 to 128 characters from A-Z a-z 0-9 . _ -");
    let long = "n".repeat(129);
    failed_with(
        &daemon.coreblk(&["volume", "create", &long, "--size", "1M"]),
        "this one is 129 bytes long",
    );
    failed_with(
        &daemon.coreblk(&["volume", "create", "--size", "1M", "--", "-dash"]),
        "starts with a letter or a digit",
    );
    failed_with(
        &daemon.coreblk(&["volume", "create", "v9", "--size", "1000"]),
        "(INVALID_ARGUMENT)",
    );
    failed_with(
        &daemon.coreblk(&["volume", "create", "v9", "--size", "1M", "--pool", "nope"]),
        "(NOT_FOUND)",
    );
    // No overcommit on the default pool: more than its capacity is refused.
    let huge = daemon.coreblk(&["volume", "create", "v9", "--size", "1G"]);
    failed_with(&huge, "(RESOURCE_EXHAUSTED)");
    failed_with(&huge, "overcommit limit");

    // Lists: by label, and in pages.
    daemon.json(&["volume", "create", "v2", "--size", "4M"]);
    daemon.json(&[
        "volume", "create", "v3", "--size", "4M", "--label", "app=db",
    ]);
    let by_label = daemon.json(&["volume", "list", "-l", "app=db"]);
    let names: Vec<&str> = by_label["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["v1", "v3"]);
    let page1 = daemon.json(&["volume", "list", "--page-size", "2"]);
    assert_eq!(page1["volumes"].as_array().expect("page").len(), 2);
    let token = page1["next_page_token"].as_str().expect("token");
    assert!(!token.is_empty());
    let page2 = daemon.json(&["volume", "list", "--page-size", "2", "--page-token", token]);
    assert_eq!(page2["volumes"][0]["name"], "v3", "{page2}");
    assert_eq!(page2["next_page_token"], "");
    let pool = daemon.json(&["pool", "get", "default"]);
    assert_eq!(pool["pools"][0]["provisioned_bytes"], 24 << 20, "{pool}");
    assert_eq!(pool["pools"][0]["volume_count"], 3);

    // Grow (never shrink), and labels.
    let grown = daemon.json(&["volume", "resize", "v1", "20M"]);
    assert_eq!(volume_of(&grown)["size_bytes"], 20 << 20);
    failed_with(
        &daemon.coreblk(&["volume", "resize", "v1", "8M"]),
        "(INVALID_ARGUMENT)",
    );
    failed_with(
        &daemon.coreblk(&["volume", "resize", "v1", "1G"]),
        "(RESOURCE_EXHAUSTED)",
    );
    let labelled = daemon.json(&["volume", "label", "v1", "tier=gold", "--remove", "app"]);
    assert_eq!(
        volume_of(&labelled)["labels"],
        serde_json::json!({"tier": "gold"})
    );
    daemon.json(&["volume", "label", "v1", "app=db", "--remove", "tier"]);

    // Delete: gone, and a second delete is NOT_FOUND.
    daemon.json(&["volume", "delete", "v2"]);
    failed_with(&daemon.coreblk(&["volume", "get", "v2"]), "(NOT_FOUND)");
    failed_with(&daemon.coreblk(&["volume", "delete", "v2"]), "(NOT_FOUND)");

    // An image with holes, data across cluster boundaries and a last data block.
    let len: u64 = (8 << 20) + 3 * 4096;
    let img = dir.path().join("disk.raw");
    let original = sparse_image(
        &img,
        len,
        &[
            (0, 300 << 10),
            ((3 << 20) - 5000, (3 << 20) + 70_000),
            (len - 4096, len),
        ],
        7,
    );
    let imported = daemon.json(&["image", "import", path_str(&img), "--volume", "img1"]);
    let imported = volume_of(&imported).clone();
    assert_eq!(imported["size_bytes"], len);
    assert_eq!(imported["state"], "ready", "{imported}");
    let exported_path = dir.path().join("disk.out");
    let done = daemon.json(&[
        "image",
        "export",
        path_str(&exported_path),
        "--volume",
        "img1",
    ]);
    let exported = std::fs::read(&exported_path).expect("read export");
    assert!(
        exported == original,
        "the exported image differs from the imported one"
    );
    assert_eq!(done["ok"], true, "{done}");
    // Sparse: only the data blocks were sent (and written).
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&exported_path).expect("stat");
        assert!(
            meta.blocks() * 512 < len / 2,
            "holes were written: {} bytes allocated of {len}",
            meta.blocks() * 512
        );
    }
    // The pool accounts for what the image allocated.
    let pool = daemon.json(&["pool", "get", "default"]);
    assert!(pool["pools"][0]["allocated_bytes"].as_u64().expect("alloc") > 0);
    // An import may not reuse a name.
    failed_with(
        &daemon.coreblk(&["image", "import", path_str(&img), "--volume", "v1"]),
        "(ALREADY_EXISTS)",
    );
    // A pool with volumes is not destroyed without force.
    failed_with(
        &daemon.coreblk(&["pool", "destroy", "default"]),
        "(FAILED_PRECONDITION)",
    );

    // A clean restart: everything is there, byte for byte.
    assert!(daemon.stop_with(libc::SIGTERM).success());
    let daemon = Daemon::start(dir.path(), &socket);
    assert!(!daemon.log_text().contains("created the default pool"));
    let got = daemon.json(&["volume", "get", "img1"]);
    assert_eq!(volume_of(&got)["uuid"], imported["uuid"]);
    assert_eq!(volume_of(&got)["never_written"], false);
    let v1_after = daemon.json(&["volume", "get", "v1"]);
    assert_eq!(volume_of(&v1_after)["uuid"], v1["uuid"]);
    // Its size and labels as last set survive too.
    assert_eq!(volume_of(&v1_after)["size_bytes"], 20 << 20, "{v1_after}");
    assert_eq!(
        volume_of(&v1_after)["labels"],
        serde_json::json!({"app": "db"}),
        "{v1_after}"
    );
    assert!(export_bytes(&daemon, dir.path(), "img1") == original);

    // A second image, then kill -9: acknowledged data survives the daemon's death.
    let img2 = dir.path().join("disk2.raw");
    let original2 = sparse_image(&img2, 2 << 20, &[(4096, 1 << 20)], 8);
    daemon.json(&["image", "import", path_str(&img2), "--volume", "img2"]);
    let mut daemon = daemon;
    daemon.child.kill().expect("kill -9");
    daemon.child.wait().expect("reap");
    drop(daemon);
    let daemon = Daemon::start(dir.path(), &socket);
    assert!(export_bytes(&daemon, dir.path(), "img2") == original2);
    assert!(export_bytes(&daemon, dir.path(), "img1") == original);

    // Import, snapshot, write: the snapshot still exports the imported bytes, the volume
    // the written ones.
    daemon.json(&["image", "import", path_str(&img), "--volume", "img3"]);
    daemon.json(&["snapshot", "create", "img3", "img3-s1"]);
    let patch = dir.path().join("patch.raw");
    std::fs::write(&patch, vec![0x5a_u8; 1 << 20]).expect("patch");
    daemon.json(&[
        "image",
        "import",
        path_str(&patch),
        "--volume",
        "img3",
        "--overwrite",
    ]);
    let snap_out = dir.path().join("img3-s1.out");
    daemon.json(&[
        "image",
        "export",
        path_str(&snap_out),
        "--snapshot",
        "img3-s1",
    ]);
    assert!(
        std::fs::read(&snap_out).expect("read") == original,
        "the snapshot's export differs from the imported image"
    );
    let mut patched = original.clone();
    patched[..1 << 20].fill(0x5a);
    assert!(export_bytes(&daemon, dir.path(), "img3") == patched);
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn pools_on_claimed_devices_and_their_errors() {
    let dir = workdir();
    let socket = dir.path().join("api.sock");
    let daemon = Daemon::start(dir.path(), &socket);
    let img = image(dir.path(), "pool-p.img");
    let img_s = path_str(&img);
    failed_with(
        &daemon.coreblk(&["pool", "create", "p2", "--device", img_s]),
        "is not claimed by this daemon",
    );
    daemon.json(&["device", "claim", img_s]);
    let p2 = daemon.json(&[
        "pool",
        "create",
        "p2",
        "--device",
        img_s,
        "--overcommit",
        "4",
        "--cluster-size",
        "128K",
    ]);
    let p2 = p2["pools"][0].clone();
    assert_eq!(p2["state"], "online", "{p2}");
    assert_eq!(p2["cluster_size_bytes"], 128 << 10);
    // Idempotent; other parameters name the difference.
    let again = daemon.json(&[
        "pool",
        "create",
        "p2",
        "--device",
        img_s,
        "--overcommit",
        "4",
        "--cluster-size",
        "128K",
    ]);
    assert_eq!(again["pools"][0]["uuid"], p2["uuid"]);
    let other = daemon.coreblk(&["pool", "create", "p2", "--device", img_s]);
    failed_with(&other, "(ALREADY_EXISTS)");
    failed_with(&other, "overcommit limit 4");
    failed_with(
        &daemon.coreblk(&["pool", "create", "p3", "--device", img_s]),
        "already holds pool p2",
    );
    failed_with(
        &daemon.coreblk(&[
            "pool",
            "create",
            "p3",
            "--device",
            img_s,
            "--cluster-size",
            "3M",
        ]),
        "(INVALID_ARGUMENT)",
    );
    // Overcommit 4: a volume larger than the pool fits.
    let capacity = p2["capacity_bytes"].as_u64().expect("capacity");
    let big = format!("{}", (capacity * 2) / 4096 * 4096);
    daemon.json(&["volume", "create", "big", "--pool", "p2", "--size", &big]);
    // ...and running out of space is RESOURCE_EXHAUSTED: an import of more data than the
    // pool holds fails when the pool is full, saying so; the half-written volume stays
    // marked importing and is removable; the pool still serves.
    let fill = dir.path().join("fill.raw");
    let fill_len = usize::try_from(capacity + (4 << 20)).expect("fits");
    std::fs::write(&fill, seeded(fill_len, 11)).expect("fill image");
    let full = daemon.coreblk(&[
        "image",
        "import",
        path_str(&fill),
        "--pool",
        "p2",
        "--name",
        "fill",
    ]);
    failed_with(&full, "(RESOURCE_EXHAUSTED)");
    failed_with(&full, "No space left on device");
    failed_with(&full, "pool is full");
    failed_with(&full, "volume \"fill\" stays importing");
    let half = daemon.json(&["volume", "get", "fill"]);
    assert_eq!(volume_of(&half)["state"], "importing", "{half}");
    let pool_full = daemon.json(&["pool", "get", "p2"]);
    assert_eq!(pool_full["pools"][0]["state"], "online", "{pool_full}");
    assert_eq!(pool_full["pools"][0]["free_bytes"], 0, "{pool_full}");
    daemon.json(&["volume", "delete", "fill"]);
    failed_with(&daemon.coreblk(&["volume", "get", "fill"]), "(NOT_FOUND)");
    // The pool on the claimed device, its settings, labels and volume come back after a
    // clean stop and after kill -9: found by the device's label, imported.
    daemon.json(&["volume", "label", "big", "tier=cold"]);
    let before = daemon.json(&["volume", "get", "big"]);
    let mut daemon = daemon;
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let status = daemon.stop_with(sig);
        assert_eq!(status.success(), sig == libc::SIGTERM, "{status:?}");
        daemon = Daemon::start(dir.path(), &socket);
        let p = daemon.json(&["pool", "get", "p2"]);
        let p = &p["pools"][0];
        assert_eq!(p["uuid"], p2["uuid"], "{p}");
        assert_eq!(p["state"], "online", "{p}");
        assert_eq!(p["cluster_size_bytes"], 128 << 10, "{p}");
        assert_eq!(p["overcommit_limit"], 4.0, "{p}");
        assert_eq!(p["capacity_bytes"], p2["capacity_bytes"], "{p}");
        let after = daemon.json(&["volume", "get", "big"]);
        assert_eq!(volume_of(&after)["uuid"], volume_of(&before)["uuid"]);
        assert_eq!(
            volume_of(&after)["size_bytes"],
            volume_of(&before)["size_bytes"]
        );
        assert_eq!(
            volume_of(&after)["labels"],
            serde_json::json!({"tier": "cold"}),
            "{after}"
        );
    }
    // The device under a pool is not released, the pool with a volume not destroyed.
    failed_with(
        &daemon.coreblk(&["device", "release", img_s]),
        "destroy the pool first",
    );
    failed_with(
        &daemon.coreblk(&["pool", "destroy", "p2"]),
        "holds 1 volume",
    );
    daemon.json(&["pool", "destroy", "p2", "--force", "--release-devices"]);
    failed_with(&daemon.coreblk(&["pool", "get", "p2"]), "(NOT_FOUND)");
    failed_with(&daemon.coreblk(&["volume", "get", "big"]), "(NOT_FOUND)");
    let list = daemon.json(&["device", "list", img_s]);
    let me = list
        .as_array()
        .expect("array")
        .iter()
        .find(|d| d["path"] == img_s)
        .expect("listed");
    assert_eq!(me["claimed"], false, "{me}");
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

#[test]
fn an_interrupted_import_is_marked_and_resumes_from_the_last_ack() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &dir.path().join("api.sock"));
    let chunk = |offset: u64, byte: u8| pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
            offset_bytes: offset,
            data: vec![byte; 64 << 10],
            zero: false,
            length_bytes: 0,
        })),
    };
    let start = |resume: bool| pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            pool: "default".into(),
            volume_name: "imp".into(),
            size_bytes: 1 << 20,
            labels: Default::default(),
            resume,
            overwrite: false,
        })),
    };
    rt().block_on(async {
        let channel = connect(&daemon.socket).await.expect("connect");
        let mut images = pb::images_client::ImagesClient::new(channel.clone());
        // Two chunks, then the client goes away without `finish`.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(start(false)).await.expect("send");
        let mut resp = images
            .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("import")
            .into_inner();
        let started = resp.message().await.expect("msg").expect("started");
        assert!(matches!(
            started.msg,
            Some(pb::import_image_response::Msg::Started(pb::ImportStarted {
                resume_offset_bytes: 0,
                ..
            }))
        ));
        for (i, b) in [(0u64, 1u8), (1, 2)] {
            tx.send(chunk(i * (64 << 10), b)).await.expect("send");
            let ack = resp.message().await.expect("msg").expect("ack");
            let Some(pb::import_image_response::Msg::Ack(a)) = ack.msg else {
                panic!("expected an ack: {ack:?}")
            };
            assert_eq!(a.durable_offset_bytes, (i + 1) * (64 << 10));
        }
        drop(tx);
        drop(resp);
        // Marked, not ready; a plain import of the name is refused.
        let mut volumes = pb::volumes_client::VolumesClient::new(channel.clone());
        let v = wait_importing(&mut volumes).await;
        assert_eq!(v.state(), pb::VolumeState::Importing);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(start(false)).await.expect("send");
        let e = images
            .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("not resumed");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{}", e.message());
        // Resumed from the last ack (once the server has seen the first stream end).
        let end = Instant::now() + Duration::from_secs(10);
        let (tx, mut resp) = loop {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(start(true)).await.expect("send");
            match images
                .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(r) => break (tx, r.into_inner()),
                Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("resume: {e}"),
            }
        };
        let Some(pb::import_image_response::Msg::Started(s)) =
            resp.message().await.expect("msg").expect("started").msg
        else {
            panic!("expected started")
        };
        assert_eq!(s.resume_offset_bytes, 128 << 10);
        tx.send(chunk(128 << 10, 3)).await.expect("send");
        resp.message().await.expect("msg").expect("ack");
        tx.send(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
                expected_size_bytes: 1 << 20,
            })),
        })
        .await
        .expect("send");
        let Some(pb::import_image_response::Msg::Finished(v)) =
            resp.message().await.expect("msg").expect("finished").msg
        else {
            panic!("expected finished")
        };
        assert_eq!(v.state(), pb::VolumeState::Ready);
        // A bad chunk is INVALID_ARGUMENT on the stream.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                pool: "default".into(),
                volume_name: "imp-bad".into(),
                size_bytes: 1 << 20,
                ..Default::default()
            })),
        })
        .await
        .expect("send");
        let mut resp = images
            .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("import")
            .into_inner();
        resp.message().await.expect("msg").expect("started");
        tx.send(chunk(100, 1)).await.expect("send");
        let e = resp.message().await.expect_err("unaligned");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    });
    let got = export_bytes(&daemon, dir.path(), "imp");
    let mut want = vec![1u8; 64 << 10];
    want.extend(vec![2u8; 64 << 10]);
    want.extend(vec![3u8; 64 << 10]);
    want.resize(1 << 20, 0);
    assert!(got == want, "the resumed import's content differs");
    assert!(daemon.stop_with(libc::SIGTERM).success());
}

async fn wait_importing(
    volumes: &mut pb::volumes_client::VolumesClient<tonic::transport::Channel>,
) -> pb::Volume {
    // The volume is marked importing from its start until `finish`.
    volumes
        .get_volume(pb::GetVolumeRequest {
            volume: "imp".into(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// A piece of data written over a volume: bytes at an offset, or a zeroed range.
enum Piece {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Writes `pieces` (in increasing offset order) over the existing `volume` through
/// `ImportImage` with `overwrite`, and applies them to `model`.
async fn write_over(
    channel: tonic::transport::Channel,
    volume: &str,
    pieces: Vec<Piece>,
    model: &mut [u8],
) {
    let mut msgs = vec![pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            volume_name: volume.to_owned(),
            overwrite: true,
            ..Default::default()
        })),
    }];
    for p in pieces {
        let chunk = match p {
            Piece::Data(offset, data) => {
                let at = usize::try_from(offset).expect("fits");
                model[at..at + data.len()].copy_from_slice(&data);
                pb::ImageChunk {
                    offset_bytes: offset,
                    data,
                    zero: false,
                    length_bytes: 0,
                }
            }
            Piece::Zero(offset, len) => {
                let (at, n) = (
                    usize::try_from(offset).expect("fits"),
                    usize::try_from(len).expect("fits"),
                );
                model[at..at + n].fill(0);
                pb::ImageChunk {
                    offset_bytes: offset,
                    data: Vec::new(),
                    zero: true,
                    length_bytes: len,
                }
            }
        };
        msgs.push(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(chunk)),
        });
    }
    msgs.push(pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
            expected_size_bytes: 0,
        })),
    });
    let mut responses = pb::images_client::ImagesClient::new(channel)
        .max_encoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .import_image(tokio_stream::iter(msgs))
        .await
        .expect("overwrite starts")
        .into_inner();
    let mut finished = false;
    while let Some(m) = responses.message().await.expect("overwrite runs") {
        finished |= matches!(m.msg, Some(pb::import_image_response::Msg::Finished(_)));
    }
    assert!(finished, "the overwrite of {volume} did not finish");
}

/// Exports a volume or snapshot through the API: (data chunks as (offset, len), zero
/// chunks as (offset, len), the bytes applied over `base`).
async fn export_api(
    channel: tonic::transport::Channel,
    source: pb::export_image_request::Source,
    since: &str,
    base: &[u8],
) -> (Vec<(u64, u64)>, Vec<(u64, u64)>, Vec<u8>) {
    let mut stream = pb::images_client::ImagesClient::new(channel)
        .max_decoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .export_image(pb::ExportImageRequest {
            source: Some(source),
            since_snapshot: since.to_owned(),
            max_chunk_bytes: 0,
        })
        .await
        .expect("export starts")
        .into_inner();
    let (mut data, mut zeros, mut out) = (Vec::new(), Vec::new(), base.to_vec());
    while let Some(m) = stream.message().await.expect("export runs") {
        if let Some(pb::export_image_response::Msg::Chunk(c)) = m.msg {
            let at = usize::try_from(c.offset_bytes).expect("fits");
            if c.zero {
                let n = usize::try_from(c.length_bytes).expect("fits");
                out[at..at + n].fill(0);
                zeros.push((c.offset_bytes, c.length_bytes));
            } else {
                out[at..at + c.data.len()].copy_from_slice(&c.data);
                data.push((c.offset_bytes, c.data.len() as u64));
            }
        }
    }
    (data, zeros, out)
}

/// Whether every range of `inner` lies inside one of `outer`.
fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> bool {
    inner
        .iter()
        .all(|&(o, l)| outer.iter().any(|&(so, sl)| o >= so && o + l <= so + sl))
}

fn seeded(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = coreblk_daemon::testing::Rng::new(seed);
    (0..len)
        .map(|_| rng.next_u64().to_le_bytes()[0] | 1)
        .collect()
}

fn snap_of(v: &Value) -> &Value {
    &v["snapshots"][0]
}

/// Exports a snapshot through the CLI to a new file and returns its bytes.
fn export_snapshot(daemon: &Daemon, dir: &Path, snapshot: &str) -> Vec<u8> {
    let out = dir.join(format!("export-{snapshot}-{}.raw", unique()));
    daemon.json(&["image", "export", path_str(&out), "--snapshot", snapshot]);
    std::fs::read(&out).expect("read export")
}

#[test]
fn snapshots_clones_rollback_inflate_diff_and_incremental_export() {
    const MIB: u64 = 1 << 20;
    const CLUSTER: u64 = 64 << 10;
    let dir = workdir();
    let socket = dir.path().join("api.sock");
    let daemon = Daemon::start(dir.path(), &socket);
    let rt = rt();
    let channel = rt.block_on(connect(&daemon.socket)).expect("connect");
    let vol_a = volume_of(&daemon.json(&["volume", "create", "a", "--size", "4M"])).clone();

    // Content A: data in [0, 1 MiB) and [2, 3 MiB), holes elsewhere.
    let mut a = vec![0u8; 4 << 20];
    rt.block_on(write_over(
        channel.clone(),
        "a",
        vec![
            Piece::Data(0, seeded(1 << 20, 1)),
            Piece::Data(2 * MIB, seeded(1 << 20, 2)),
        ],
        &mut a,
    ));
    let content_a = a.clone();

    // A snapshot: shares every cluster with its volume.
    let s1 = snap_of(&daemon.json(&["snapshot", "create", "a", "s1", "--label", "k=v"])).clone();
    assert_eq!(s1["volume_name"], "a", "{s1}");
    assert_eq!(s1["volume_uuid"], vol_a["uuid"], "{s1}");
    assert_eq!(s1["size_bytes"], 4 * MIB);
    assert_eq!(s1["allocated_bytes"], 2 * MIB, "{s1}");
    assert_eq!(s1["unique_bytes"], 0, "{s1}");
    assert_eq!(s1["group_uuid"], "");
    assert_ne!(s1["create_time"], "-", "{s1}");
    // Idempotent by name; other parameters are ALREADY_EXISTS naming them.
    let again = daemon.json(&["snapshot", "create", "a", "s1", "--label", "k=v"]);
    assert_eq!(snap_of(&again)["uuid"], s1["uuid"]);
    failed_with(
        &daemon.coreblk(&["snapshot", "create", "a", "s1"]),
        "(ALREADY_EXISTS)",
    );
    failed_with(
        &daemon.coreblk(&["snapshot", "create", "a", "s1"]),
        "other labels",
    );

    // Overwrite part of the volume: 8 KiB of new data in cluster 8, zero cluster 32, new
    // data in the hole at 3.5 MiB.
    rt.block_on(write_over(
        channel.clone(),
        "a",
        vec![
            Piece::Data(512 << 10, seeded(8 << 10, 3)),
            Piece::Zero(2 * MIB, CLUSTER),
            Piece::Data(3 * MIB + (512 << 10), seeded(4 << 10, 4)),
        ],
        &mut a,
    ));
    let content_b = a.clone();
    let s2 = snap_of(&daemon.json(&["snapshot", "create", "a", "s2"])).clone();

    // The snapshot keeps the old bytes; the volume and the new snapshot have the new.
    assert!(export_snapshot(&daemon, dir.path(), "s1") == content_a);
    assert!(export_snapshot(&daemon, dir.path(), "s2") == content_b);
    assert!(export_bytes(&daemon, dir.path(), "a") == content_b);

    // The diff names exactly the changed clusters.
    let diff = daemon.json(&["snapshot", "diff", "s1", "s2"]);
    let ranges: Vec<(u64, u64)> = diff["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["offset_bytes"].as_u64().expect("offset"),
                r["length_bytes"].as_u64().expect("length"),
            )
        })
        .collect();
    assert_eq!(
        ranges,
        vec![
            (512 << 10, CLUSTER),
            (2 * MIB, CLUSTER),
            (3 * MIB + (512 << 10), CLUSTER)
        ],
        "{diff}"
    );
    let no_change = daemon.json(&["snapshot", "diff", "s2", "s2"]);
    assert_eq!(no_change["changed_bytes"], 0, "{no_change}");

    rt.block_on(async {
        // A sparse export sends only mapped data: exactly A's 2 MiB, never a hole.
        let (data, zeros, bytes) = export_api(
            channel.clone(),
            pb::export_image_request::Source::Snapshot("s1".into()),
            "",
            &vec![0; 4 << 20],
        )
        .await;
        assert!(bytes == content_a);
        assert!(zeros.is_empty());
        assert_eq!(data.iter().map(|d| d.1).sum::<u64>(), 2 * MIB);
        assert!(covered(&data, &[(0, MIB), (2 * MIB, MIB)]), "{data:?}");
        // An incremental export sends only the changed ranges; applied over the older
        // image it gives the newer one.
        let (data, zeros, bytes) = export_api(
            channel.clone(),
            pb::export_image_request::Source::Snapshot("s2".into()),
            "s1",
            &content_a,
        )
        .await;
        assert!(
            bytes == content_b,
            "incremental export over s1 differs from s2"
        );
        assert!(covered(&data, &ranges), "{data:?} outside {ranges:?}");
        assert!(covered(&zeros, &ranges), "{zeros:?} outside {ranges:?}");
        assert!(
            data.iter().map(|d| d.1).sum::<u64>() <= 3 * CLUSTER,
            "{data:?}"
        );
    });
    // The same through the CLI: --since applies onto the older export.
    let inc = dir.path().join("inc.raw");
    daemon.json(&["image", "export", path_str(&inc), "--snapshot", "s1"]);
    daemon.json(&[
        "image",
        "export",
        path_str(&inc),
        "--snapshot",
        "s2",
        "--since",
        "s1",
    ]);
    assert!(std::fs::read(&inc).expect("read") == content_b);

    // A clone reads its snapshot's bytes and diverges on its own.
    let c1 = volume_of(&daemon.json(&["volume", "create", "c1", "--from", "s1"])).clone();
    assert_eq!(c1["source_snapshot_uuid"], s1["uuid"], "{c1}");
    assert_eq!(c1["size_bytes"], 4 * MIB);
    assert_eq!(c1["pool_name"], "default");
    assert_ne!(c1["create_time"], "-", "{c1}");
    assert!(export_bytes(&daemon, dir.path(), "c1") == content_a);
    let mut c1_content = content_a.clone();
    rt.block_on(write_over(
        channel.clone(),
        "c1",
        vec![Piece::Data(0, vec![0xee; 4096])],
        &mut c1_content,
    ));
    assert!(export_bytes(&daemon, dir.path(), "c1") == c1_content);
    assert!(export_snapshot(&daemon, dir.path(), "s1") == content_a);
    assert!(export_bytes(&daemon, dir.path(), "a") == content_b);
    let c1_now = volume_of(&daemon.json(&["volume", "get", "c1"])).clone();
    assert_eq!(c1_now["unique_bytes"], CLUSTER, "{c1_now}");
    assert_eq!(c1_now["allocated_bytes"], 2 * MIB, "{c1_now}");
    assert_eq!(c1_now["never_written"], false);
    // Idempotent clone; another source is ALREADY_EXISTS; too small a clone is refused.
    let again = daemon.json(&["volume", "create", "c1", "--from", "s1"]);
    assert_eq!(volume_of(&again)["uuid"], c1["uuid"]);
    let other = daemon.coreblk(&["volume", "create", "c1", "--from", "s2"]);
    failed_with(&other, "(ALREADY_EXISTS)");
    failed_with(&other, "source");
    failed_with(
        &daemon.coreblk(&["volume", "create", "c3", "--from", "s2", "--size", "1M"]),
        "(INVALID_ARGUMENT)",
    );
    // A clone of a live volume.
    let c2 = volume_of(&daemon.json(&["volume", "create", "c2", "--from", "a"])).clone();
    assert_eq!(c2["source_volume_uuid"], vol_a["uuid"], "{c2}");
    assert!(export_bytes(&daemon, dir.path(), "c2") == content_b);
    // The `coreblk clone` shorthand: of a snapshot, and (--from-volume) of a volume.
    let c5 = volume_of(&daemon.json(&["clone", "s1", "c5"])).clone();
    assert_eq!(c5["source_snapshot_uuid"], s1["uuid"], "{c5}");
    assert!(export_bytes(&daemon, dir.path(), "c5") == content_a);
    let c6 =
        volume_of(&daemon.json(&["clone", "a", "c6", "--from-volume", "--size", "8M"])).clone();
    assert_eq!(c6["source_volume_uuid"], vol_a["uuid"], "{c6}");
    assert_eq!(c6["size_bytes"], 8 * MIB, "{c6}");
    failed_with(&daemon.coreblk(&["clone", "nope", "c7"]), "(NOT_FOUND)");

    // A group snapshot of two volumes at one instant.
    daemon.json(&["volume", "create", "b", "--size", "1M"]);
    let mut b = vec![0u8; 1 << 20];
    rt.block_on(write_over(
        channel.clone(),
        "b",
        vec![Piece::Data(4096, seeded(64 << 10, 5))],
        &mut b,
    ));
    let group = daemon.json(&["snapshot", "create", "a", "g1", "--also", "b=g2"]);
    let members = group["snapshots"].as_array().expect("members");
    assert_eq!(members.len(), 2, "{group}");
    assert_ne!(members[0]["group_uuid"], "", "{group}");
    assert_eq!(members[0]["group_uuid"], members[1]["group_uuid"]);
    assert_eq!(members[1]["volume_name"], "b");
    let again = daemon.json(&["snapshot", "create", "a", "g1", "--also", "b=g2"]);
    assert_eq!(again["snapshots"][1]["uuid"], members[1]["uuid"]);
    failed_with(
        &daemon.coreblk(&["snapshot", "create", "a", "g1"]),
        "(ALREADY_EXISTS)",
    );
    assert!(export_snapshot(&daemon, dir.path(), "g1") == content_b);
    assert!(export_snapshot(&daemon, dir.path(), "g2") == b);
    rt.block_on(async {
        let e = pb::snapshots_client::SnapshotsClient::new(channel.clone())
            .create_snapshot_group(pb::CreateSnapshotGroupRequest {
                members: vec![
                    pb::create_snapshot_group_request::Member {
                        volume: "a".into(),
                        name: "x1".into(),
                    },
                    pb::create_snapshot_group_request::Member {
                        volume: "a".into(),
                        name: "x2".into(),
                    },
                ],
                labels: Default::default(),
            })
            .await
            .expect_err("a volume twice");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    });

    // Lists: by volume, in pages.
    let of_a = daemon.json(&["snapshot", "list", "--volume", "a"]);
    let names: Vec<&str> = of_a["snapshots"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["g1", "s1", "s2"], "{of_a}");
    let page1 = daemon.json(&["snapshot", "list", "--page-size", "3"]);
    let token = page1["next_page_token"].as_str().expect("token").to_owned();
    assert!(!token.is_empty(), "{page1}");
    let page2 = daemon.json(&[
        "snapshot",
        "list",
        "--page-size",
        "3",
        "--page-token",
        &token,
    ]);
    assert_eq!(page2["snapshots"][0]["name"], "s2", "{page2}");
    assert_eq!(page2["next_page_token"], "");
    let pool = daemon.json(&["pool", "get", "default"]);
    assert_eq!(pool["pools"][0]["snapshot_count"], 4, "{pool}");

    // Rollback: the volume's content becomes its snapshot's; another volume's snapshot
    // is refused.
    let rolled = daemon.json(&["volume", "rollback", "a", "s1"]);
    assert_eq!(volume_of(&rolled)["uuid"], vol_a["uuid"]);
    assert!(export_bytes(&daemon, dir.path(), "a") == content_a);
    assert!(export_snapshot(&daemon, dir.path(), "s2") == content_b);
    failed_with(
        &daemon.coreblk(&["volume", "rollback", "a", "g2"]),
        "(FAILED_PRECONDITION)",
    );

    // Deleting a volume keeps its snapshots whole (and they remember it).
    daemon.json(&["volume", "delete", "a"]);
    let s1_after = snap_of(&daemon.json(&["snapshot", "get", "s1"])).clone();
    assert_eq!(s1_after["volume_name"], "a", "{s1_after}");
    assert_eq!(s1_after["volume_uuid"], vol_a["uuid"]);
    assert!(export_snapshot(&daemon, dir.path(), "s1") == content_a);
    assert!(export_snapshot(&daemon, dir.path(), "s2") == content_b);
    assert_eq!(
        daemon.json(&["snapshot", "list", "--volume", "a"])["snapshots"]
            .as_array()
            .expect("list")
            .len(),
        3
    );

    // Inflate a clone, then delete its snapshot: the clone stands alone.
    let inflated = volume_of(&daemon.json(&["volume", "inflate", "c1"])).clone();
    assert_eq!(inflated["source_snapshot_uuid"], "", "{inflated}");
    assert_eq!(
        inflated["unique_bytes"], inflated["allocated_bytes"],
        "{inflated}"
    );
    daemon.json(&["snapshot", "delete", "s1"]);
    failed_with(&daemon.coreblk(&["snapshot", "get", "s1"]), "(NOT_FOUND)");
    assert!(export_bytes(&daemon, dir.path(), "c1") == c1_content);
    // Deleting a snapshot that has a clone keeps the clone whole.
    let c4 = daemon.json(&["volume", "create", "c4", "--from", "s2"]);
    assert_eq!(volume_of(&c4)["source_snapshot_uuid"], s2["uuid"]);
    daemon.json(&["snapshot", "delete", "s2"]);
    assert!(export_bytes(&daemon, dir.path(), "c4") == content_b);

    // Error codes.
    failed_with(&daemon.coreblk(&["snapshot", "get", "nope"]), "(NOT_FOUND)");
    failed_with(
        &daemon.coreblk(&["snapshot", "delete", "s1"]),
        "(NOT_FOUND)",
    );
    failed_with(
        &daemon.coreblk(&["snapshot", "create", "nope", "x"]),
        "(NOT_FOUND)",
    );
    failed_with(
        &daemon.coreblk(&["snapshot", "create", "b", "bad!name"]),
        "(INVALID_ARGUMENT)",
    );
    failed_with(
        &daemon.coreblk(&["snapshot", "diff", "g1", "nope"]),
        "(NOT_FOUND)",
    );
    failed_with(
        &daemon.coreblk(&["volume", "rollback", "b", "nope"]),
        "(NOT_FOUND)",
    );
    failed_with(
        &daemon.coreblk(&[
            "image",
            "export",
            "/dev/null",
            "--snapshot",
            "g2",
            "--since",
            "nope",
        ]),
        "(NOT_FOUND)",
    );

    // A clean stop checkpoints; everything is back after a restart, origins included.
    // (An idle client connection would hold the stop for its grace period.)
    drop(channel);
    drop(rt);
    let log = daemon.log.clone();
    assert!(daemon.stop_with(libc::SIGTERM).success());
    let log = std::fs::read_to_string(log).expect("log");
    assert!(
        log.contains("pool flushed, checkpointed and stopped"),
        "{log}"
    );
    let daemon = Daemon::start(dir.path(), &socket);
    let g1 = snap_of(&daemon.json(&["snapshot", "get", "g1"])).clone();
    assert_eq!(g1["volume_name"], "a", "{g1}");
    assert_eq!(g1["group_uuid"], members[0]["group_uuid"]);
    assert!(export_snapshot(&daemon, dir.path(), "g1") == content_b);
    assert!(export_snapshot(&daemon, dir.path(), "g2") == b);
    assert!(export_bytes(&daemon, dir.path(), "c4") == content_b);
    assert_eq!(
        volume_of(&daemon.json(&["volume", "get", "c2"]))["source_volume_uuid"],
        vol_a["uuid"]
    );
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
