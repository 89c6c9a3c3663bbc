//! The API end to end: a real `coreblkd` on a temp socket, driven only through the
//! `coreblk` CLI and a tonic client — devices (claim, idempotency, release, restart),
//! node info, the unbuilt services' status codes, socket ownership (a second daemon is
//! refused, a stale socket replaced), SIGTERM, and `/metrics`.

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
        });
        assert!(ready, "coreblkd did not start:\n{}", d.log_text());
        d
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[&str]) -> Self {
        let log = dir.join(format!("coreblkd-{}.log", unique()));
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_coreblkd"))
            .args(["--no-pin", "--cores", "0", "--default-size", "64M"])
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
        // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped (we
        // hold its `Child` and have not waited for it), so it cannot name another process.
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
    Command::new(env!("CARGO_BIN_EXE_coreblk"))
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
    let offline = Command::new(env!("CARGO_BIN_EXE_coreblkd"))
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
    assert_eq!(info["devices"][0]["device_uuid"], device_uuid.as_str());
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
    let rel = Command::new(env!("CARGO_BIN_EXE_coreblk"))
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
    let dev = &info["devices"][0];
    assert_eq!(dev["device_uuid"], claimed["device_uuid"]);
    assert_eq!(dev["pool_uuid"], claimed["pool_uuid"]);
    assert_eq!(dev["present"], true);
    assert_eq!(dev["newly_labelled"], false, "taken back, not relabelled");
    assert!(
        daemon.log_text().contains("took back a claimed device"),
        "{}",
        daemon.log_text()
    );
    // Still held by the restarted daemon.
    let offline = Command::new(env!("CARGO_BIN_EXE_coreblkd"))
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
fn unbuilt_services_answer_with_proper_statuses() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path(), &dir.path().join("api.sock"));
    rt().block_on(async {
        let channel = connect(&daemon.socket).await.expect("connect");
        let e = pb::pools_client::PoolsClient::new(channel.clone())
            .list_pools(pb::ListPoolsRequest::default())
            .await
            .expect_err("no store yet");
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        assert!(
            e.message().contains("volume store is not built yet"),
            "{}",
            e.message()
        );
        let e = pb::volumes_client::VolumesClient::new(channel.clone())
            .create_volume(pb::CreateVolumeRequest {
                pool: "p".into(),
                name: "v".into(),
                size_bytes: 1 << 30,
                ..Default::default()
            })
            .await
            .expect_err("no store yet");
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        assert!(e.message().starts_with("CreateVolume: "), "{}", e.message());
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
        let e = pb::images_client::ImagesClient::new(channel.clone())
            .export_image(pb::ExportImageRequest {
                source: Some(pb::export_image_request::Source::Volume("v".into())),
                ..Default::default()
            })
            .await
            .expect_err("no store yet");
        assert_eq!(e.code(), tonic::Code::Unimplemented);
        let e = pb::node_client::NodeClient::new(channel.clone())
            .get_capacity(pb::GetCapacityRequest::default())
            .await
            .expect_err("no pools yet");
        assert_eq!(e.code(), tonic::Code::Unimplemented);
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
    // The CLI prints the server's message and the code, and exits 1.
    for args in [
        &["pool", "list"][..],
        &["volume", "create", "v1", "--pool", "p", "--size", "1GiB"],
        &["snapshot", "list"],
        &["clone", "snap1", "v2"],
        &["image", "export", "--volume", "v1", "/dev/null"],
    ] {
        let out = daemon.coreblk(args);
        failed_with(&out, "the volume store is not built yet");
        failed_with(&out, "(UNIMPLEMENTED)");
    }
    let img = image(dir.path(), "import.img");
    failed_with(
        &daemon.coreblk(&[
            "image",
            "import",
            path_str(&img),
            "--pool",
            "p",
            "--name",
            "v",
        ]),
        "UNIMPLEMENTED",
    );
    failed_with(
        &daemon.coreblk(&["export", "v1", "--persistent"]),
        "(FAILED_PRECONDITION)",
    );
    failed_with(&daemon.coreblk(&["export", "list"]), "FAILED_PRECONDITION");
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
    assert_eq!(
        value("coreblk_claimed_devices", Some(("state", "present"))),
        1.0
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
    let out = Command::new(env!("CARGO_BIN_EXE_coreblk"))
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
