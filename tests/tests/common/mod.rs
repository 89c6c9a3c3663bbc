//! Shared harness of the end-to-end tests in this directory that drive a real `coreblkd`
//! through its gRPC API: start it (the binary found by [`coreblk_tests::bin`]) on a temp
//! socket with a file-backed default pool, stop or `kill -9` it, talk to it with a tonic
//! client, and read `/metrics`; start a `coreblk-csi` beside it ([`Csi`]).

// Each test crate uses a different part of the harness.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coreblk_proto::v1 as pb;

/// Longest a start may take.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// Longest a stop may take.
pub const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` until it holds or `deadline` passes; the last answer.
pub fn wait_for(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A fresh directory under the target's temp dir.
pub fn workdir() -> tempfile::TempDir {
    // COREBLK_TEST_TMPDIR: elsewhere, e.g. the VM guest's own /tmp (unix sockets do not
    // work on the 9p share that holds the checkout there).
    match std::env::var_os("COREBLK_TEST_TMPDIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")),
    }
    .expect("tempdir")
}

/// A current-thread tokio runtime.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A running `coreblkd`, killed on drop if a test did not stop it.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

fn unique() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

impl Daemon {
    /// Starts `coreblkd` in `dir` (state under `dir/var`, a 256 MiB default pool) on
    /// `dir/api.sock` and waits until its pools are imported.
    pub fn start(dir: &Path) -> Self {
        let d = Self::spawn(dir, &[]);
        let ready = wait_for(START_DEADLINE, || {
            let log = d.log_text();
            std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
                && log.contains("serving; stop with SIGTERM")
                && log.contains("pool import finished")
        });
        assert!(ready, "coreblkd did not start:\n{}", d.log_text());
        d
    }

    /// Spawns `coreblkd` as [`Self::start`] does, with `env` set, and returns at once.
    pub fn spawn(dir: &Path, env: &[(&str, &str)]) -> Self {
        let socket = dir.join("api.sock");
        let log = dir.join(format!("coreblkd-{}.log", unique()));
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(coreblk_tests::bin("coreblkd"))
            .args(["--no-pin", "--cores", "0", "--default-size", "256M"])
            .args(["--metrics-address", "127.0.0.1:0"])
            .arg("--var-dir")
            .arg(dir.join("var"))
            .arg("--socket")
            .arg(&socket)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn coreblkd");
        Self { child, socket, log }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
    pub fn stop_with(mut self, sig: libc::c_int) -> std::process::ExitStatus {
        self.signal(sig);
        let mut status = None;
        let exited = wait_for(STOP_DEADLINE, || {
            status = self.child.try_wait().expect("wait");
            status.is_some()
        });
        assert!(exited, "coreblkd did not stop:\n{}", self.log_text());
        status.expect("exited")
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> tonic::transport::Channel {
        coreblk_daemon::control::client::connect(&self.socket)
            .await
            .expect("connect")
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

/// `GET /metrics` from `addr`: the body.
pub fn scrape(addr: &str) -> String {
    let mut conn = TcpStream::connect(addr).expect("connect metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_owned()
}

/// Deterministic bytes from `seed` (xorshift).
pub fn seeded(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A running `coreblk-csi`, killed on drop.
pub struct Csi {
    /// The process.
    pub child: Child,
    /// Its CSI socket.
    pub socket: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

impl Csi {
    /// Starts `coreblk-csi ARGS` serving on `dir/<name>.sock`; waits until it answers.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::start_env(dir, name, args, &[])
    }

    /// [`Self::start`] with `env` set for the plugin.
    pub fn start_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(coreblk_tests::bin("coreblk-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("NODE_NAME")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn coreblk-csi");
        let csi = Self { child, socket, log };
        let up = wait_for(START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&csi.socket).is_ok()
        });
        assert!(up, "coreblk-csi did not start:\n{}", csi.log_text());
        csi
    }

    /// The node plugin of `node` over `daemon`.
    pub fn node(dir: &Path, name: &str, daemon: &Daemon, node: &str) -> Self {
        Self::node_with(dir, name, daemon, node, &[])
    }

    /// The node plugin of `node` over `daemon`, with more flags.
    pub fn node_with(dir: &Path, name: &str, daemon: &Daemon, node: &str, more: &[&str]) -> Self {
        Self::node_env(dir, name, daemon, node, more, &[])
    }

    /// [`Self::node_with`] with `env` set for the plugin.
    pub fn node_env(
        dir: &Path,
        name: &str,
        daemon: &Daemon,
        node: &str,
        more: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let socket = daemon.socket.to_str().expect("utf-8 path").to_owned();
        let mut args = vec![
            "--mode",
            "node",
            "--node-id",
            node,
            "--daemon-socket",
            &socket,
        ];
        args.extend_from_slice(more);
        Self::start_env(dir, name, &args, env)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> tonic::transport::Channel {
        coreblk_daemon::control::client::connect(&self.socket)
            .await
            .expect("connect to coreblk-csi")
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the API says of the default pool and its volumes and snapshots (each by its Get
/// call), to compare with a page that shows them.
pub struct ApiView {
    /// `GetPool default`.
    pub pool: pb::Pool,
    /// `GetVolume` of each volume of the pool.
    pub volumes: Vec<pb::Volume>,
    /// `GetSnapshot` of each snapshot of the pool.
    pub snapshots: Vec<pb::Snapshot>,
}

/// The API's view now.
pub async fn api_view(channel: tonic::transport::Channel) -> ApiView {
    let pool = pb::pools_client::PoolsClient::new(channel.clone())
        .get_pool(pb::GetPoolRequest {
            pool: "default".into(),
        })
        .await
        .expect("get pool")
        .into_inner();
    let mut vc = pb::volumes_client::VolumesClient::new(channel.clone());
    let listed = vc
        .list_volumes(pb::ListVolumesRequest {
            pool: "default".into(),
            ..Default::default()
        })
        .await
        .expect("list volumes")
        .into_inner()
        .volumes;
    let mut volumes = Vec::new();
    for v in listed {
        volumes.push(
            vc.get_volume(pb::GetVolumeRequest { volume: v.uuid })
                .await
                .expect("get volume")
                .into_inner(),
        );
    }
    let mut sc = pb::snapshots_client::SnapshotsClient::new(channel);
    let listed = sc
        .list_snapshots(pb::ListSnapshotsRequest {
            pool: "default".into(),
            ..Default::default()
        })
        .await
        .expect("list snapshots")
        .into_inner()
        .snapshots;
    let mut snapshots = Vec::new();
    for s in listed {
        snapshots.push(
            sc.get_snapshot(pb::GetSnapshotRequest { snapshot: s.uuid })
                .await
                .expect("get snapshot")
                .into_inner(),
        );
    }
    ApiView {
        pool,
        volumes,
        snapshots,
    }
}
