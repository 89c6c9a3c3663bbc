//! The CSI Node service end to end on a real ublk driver, as kubelet drives it: a real
//! `coreblkd` on a block device, a real `coreblk-csi --mode node --kubelet-dir <temp>`,
//! CSI gRPC over the driver's socket, real mkfs/mount/resize2fs/xfs_growfs.
//!
//! It needs `/dev/ublk-control` and a device for the pool (`COREBLK_CSI_VM_DEVICE`, e.g.
//! an NVMe namespace of the VM harness): `scripts/vm/guest/csi-node-test`. Where either is
//! missing (the host) it prints that it was skipped and checks nothing.
//!
//! Covers, on the kernel it runs on: ext4, xfs and block mode; stage → publish → write →
//! unpublish → unstage → stage again with the data there; each of stage, publish,
//! unpublish and unstage twice; a different volume at a staged path (ALREADY_EXISTS);
//! read-only publish refusing writes; an xfs clone staged beside its mounted origin
//! (`nouuid`); a second plugin process (as after a restart) that re-stages and
//! re-publishes nothing twice; stats against `df`; expansion of a mounted ext4 (online on a kernel with
//! ublk UPDATE_SIZE, else the offline error and the size after unstage + restage); paths
//! outside the kubelet directory refused; snapshots of a mounted ext4 under a writer
//! frozen around the daemon's snapshot (a write issued inside the frozen window waits for
//! the thaw; the clone needs no journal recovery, where a snapshot taken without a freeze
//! does; a retry freezes nothing), a plugin killed inside the frozen window leaving the
//! filesystem frozen and the next plugin start thawing it; a block-mode snapshot taken
//! without a freeze; last, a daemon restart (SIGTERM, then a new daemon) under a staged,
//! published and written ext4: the mounts stay, the data reads back, writes and stats
//! work, and the plugin unpublishes and unstages afterwards.
//!
//! A second test (`encryption_and_ephemeral_volumes_on_ublk`, issue 15; its own daemon on
//! a second device): LUKS2 encryption at rest (format only when never written, the raw
//! bytes through image export hold no plaintext marker, a wrong passphrase refused with
//! the bytes unchanged and no passphrase in errors or logs, restage reads back, a
//! snapshot frozen through the mapping restores encrypted and opens with the same
//! secret, block mode on the mapping, cryptsetup's default cost measured); mkfs options
//! reaching mkfs; a generic ephemeral volume; inline ephemeral volumes (publish makes,
//! unpublish deletes and the space returns, a coreblkd kill -9 between them, an orphan
//! removed by the next plugin's start-up sweep).

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{rt, seeded, wait_for, Csi, Daemon, START_DEADLINE};
use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "vm-node";
const MIB: i64 = 1 << 20;
/// The pool's device.
const DEVICE_ENV: &str = "COREBLK_CSI_VM_DEVICE";
/// The plugin's test-only hold inside each frozen window (csi/src/freeze.rs).
const HOLD_ENV: &str = "COREBLK_CSI_TEST_FREEZE_HOLD_MS";
/// The hold the freeze checks use: long enough to issue a write, or to kill the plugin,
/// inside the window; shorter than the plugin's 10 s frozen-window deadline.
const HOLD_MS: u64 = 3000;

type NodeClient = csi::node_client::NodeClient<Channel>;
type Ctl = csi::controller_client::ControllerClient<Channel>;

fn cap(access: AccessType) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

fn fs_cap(fs: &str) -> csi::VolumeCapability {
    cap(AccessType::Mount(MountVolume {
        fs_type: fs.to_owned(),
        ..Default::default()
    }))
}

fn block_cap() -> csi::VolumeCapability {
    cap(AccessType::Block(BlockVolume {}))
}

/// Counts the checks that held, so the guest script can report them.
struct Checks(u32);

impl Checks {
    fn ok(&mut self, what: &str) {
        self.0 += 1;
        eprintln!("PASS: {what}");
    }
}

/// The mount at `path`: (fs type, options), from this process's mount table.
fn mount_at(path: &Path) -> Option<(String, String)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = path.to_str().expect("utf-8");
    table.lines().rev().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        (f.get(4) == Some(&p)).then(|| {
            (
                right.split(' ').next().unwrap_or("").to_owned(),
                f[5].to_owned(),
            )
        })
    })
}

/// How many mounts sit at `path`.
fn mounts_at(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = path.to_str().expect("utf-8");
    table
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(p))
        .count()
}

/// `df -B1` figures of `path`: (size, used, avail) and `df -i`: (inodes, iused, ifree).
fn df(path: &Path) -> ([i64; 3], [i64; 3]) {
    let run = |args: &[&str]| -> [i64; 3] {
        let out = Command::new("df")
            .args(args)
            .arg(path)
            .output()
            .expect("df runs");
        assert!(out.status.success(), "df {args:?} {}", path.display());
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().nth(1).expect("a df line");
        let n: Vec<i64> = line
            .split_whitespace()
            .map(|w| w.parse().expect("a number"))
            .collect();
        [n[0], n[1], n[2]]
    };
    (
        run(&["-B1", "--output=size,used,avail"]),
        run(&["--output=itotal,iused,iavail"]),
    )
}

fn kernel_has_update_size() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut it = release.trim().split(['.', '-']);
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 16)
}

struct Env {
    node: NodeClient,
    /// A second plugin instance on the same daemon and kubelet directory: what a
    /// restarted plugin sees (it shares no memory with the first).
    restarted: NodeClient,
    ctl: Ctl,
    daemon: Channel,
    kubelet: PathBuf,
    /// The first plugin's log (freezes are counted in it).
    plugin_log: PathBuf,
}

impl Env {
    fn staging(&self, pv: &str) -> String {
        format!(
            "{}/plugins/kubernetes.io/csi/csi.coreblk.io/{pv}/globalmount",
            self.kubelet.display()
        )
    }

    fn target(&self, pod: &str, pv: &str) -> String {
        format!(
            "{}/pods/{pod}/volumes/kubernetes.io~csi/{pv}/mount",
            self.kubelet.display()
        )
    }

    async fn create(&mut self, name: &str, bytes: i64, source: Option<&str>) -> String {
        let source = source.map(|id| {
            csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                volume_id: id.to_owned(),
            })
        });
        self.create_from(name, bytes, source).await
    }

    /// CSI CreateVolume `name` (ext4, `bytes`), from `source` where given.
    async fn create_from(
        &mut self,
        name: &str,
        bytes: i64,
        source: Option<csi::volume_content_source::Type>,
    ) -> String {
        self.ctl
            .create_volume(csi::CreateVolumeRequest {
                name: name.to_owned(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![fs_cap("ext4")],
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .expect("volume")
            .volume_id
    }

    async fn daemon_volume(&self, id: &str) -> pb::Volume {
        pb::volumes_client::VolumesClient::new(self.daemon.clone())
            .get_volume(pb::GetVolumeRequest {
                volume: id.rsplit(':').next().expect("uuid").to_owned(),
            })
            .await
            .expect("GetVolume")
            .into_inner()
    }

    /// A volume restored from snapshot `snapshot_id` through CSI.
    async fn restore(&mut self, name: &str, bytes: i64, snapshot_id: &str) -> String {
        eprintln!("... create_volume {name} from {snapshot_id}");
        let source = csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.to_owned(),
            },
        );
        self.create_from(name, bytes, Some(source)).await
    }

    /// CSI CreateSnapshot `name` of volume `id` through the first plugin.
    async fn snapshot(&mut self, name: &str, id: &str) -> Result<csi::Snapshot, tonic::Status> {
        eprintln!("... create_snapshot {name} of {id}");
        self.ctl
            .create_snapshot(snapshot_request(name, id))
            .await
            .map(|r| r.into_inner().snapshot.expect("snapshot"))
    }

    /// Exports volume `id` straight through the daemon (not staged) and waits for its
    /// device node: a device to inspect before anything mounts it.
    async fn daemon_export(&self, id: &str) -> String {
        let e = pb::exports_client::ExportsClient::new(self.daemon.clone())
            .export_volume(pb::ExportVolumeRequest {
                volume: id.rsplit(':').next().expect("uuid").to_owned(),
                persistent: false,
                read_only: false,
            })
            .await
            .expect("ExportVolume")
            .into_inner();
        assert!(
            wait_for(START_DEADLINE, || Path::new(&e.device_path).exists()),
            "{} did not appear",
            e.device_path
        );
        e.device_path
    }

    async fn daemon_unexport(&self, id: &str) {
        pb::exports_client::ExportsClient::new(self.daemon.clone())
            .unexport_volume(pb::UnexportVolumeRequest {
                volume: id.rsplit(':').next().expect("uuid").to_owned(),
                force: false,
            })
            .await
            .expect("UnexportVolume");
    }

    /// The device of the volume's export, empty when it is not exported.
    async fn exported(&self, id: &str) -> String {
        let uuid = id.rsplit(':').next().expect("uuid");
        pb::exports_client::ExportsClient::new(self.daemon.clone())
            .list_exports(pb::ListExportsRequest::default())
            .await
            .expect("ListExports")
            .into_inner()
            .exports
            .into_iter()
            .find(|e| e.volume_uuid == uuid)
            .map(|e| e.device_path)
            .unwrap_or_default()
    }

    async fn stage(
        &mut self,
        id: &str,
        staging: &str,
        c: csi::VolumeCapability,
    ) -> Result<(), tonic::Status> {
        eprintln!("... node_stage_volume {id} {staging}");
        self.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: staging.to_owned(),
                volume_capability: Some(c),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn publish(
        &mut self,
        id: &str,
        staging: &str,
        target: &str,
        c: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        eprintln!("... node_publish_volume {id} {target}");
        self.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: staging.to_owned(),
                target_path: target.to_owned(),
                volume_capability: Some(c),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn unpublish(&mut self, id: &str, target: &str) {
        eprintln!("... node_unpublish_volume {id} {target}");
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.to_owned(),
                target_path: target.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume {target}: {e}"));
    }

    async fn unstage(&mut self, id: &str, staging: &str) {
        eprintln!("... node_unstage_volume {id} {staging}");
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: staging.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnstageVolume {staging}: {e}"));
    }

    async fn stats(&mut self, id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
        eprintln!("... node_get_volume_stats {id} {path}");
        self.node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.to_owned(),
                volume_path: path.to_owned(),
                ..Default::default()
            })
            .await
            .expect("NodeGetVolumeStats")
            .into_inner()
    }

    async fn expand(&mut self, id: &str, path: &str, bytes: i64) -> Result<i64, tonic::Status> {
        self.expand_as(id, path, bytes, fs_cap("ext4")).await
    }

    async fn expand_as(
        &mut self,
        id: &str,
        path: &str,
        bytes: i64,
        c: csi::VolumeCapability,
    ) -> Result<i64, tonic::Status> {
        eprintln!("... node_expand_volume {id} {path}");
        self.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.to_owned(),
                volume_path: path.to_owned(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: Some(c),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().capacity_bytes)
    }
}

fn snapshot_request(name: &str, id: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: id.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

/// CreateSnapshot through the plugin at `socket`, on a thread of its own (the test keeps
/// acting while the plugin holds the freeze).
fn snapshot_in_thread(
    socket: PathBuf,
    name: &str,
    id: &str,
) -> std::thread::JoinHandle<Result<csi::Snapshot, tonic::Status>> {
    let request = snapshot_request(name, id);
    std::thread::spawn(move || {
        rt().block_on(async move {
            let ch = coreblk_daemon::control::client::connect(&socket)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            csi::controller_client::ControllerClient::new(ch)
                .create_snapshot(request)
                .await
                .map(|r| r.into_inner().snapshot.expect("snapshot"))
        })
    })
}

/// Lines of the log at `path` that contain every one of `words`.
fn log_lines(path: &Path, words: &[&str]) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

/// Whether the ext4 superblock on `device` says the journal needs recovery (dumpe2fs -h).
fn needs_recovery(device: &str) -> bool {
    let out = Command::new("dumpe2fs")
        .args(["-h", device])
        .stderr(Stdio::null())
        .output()
        .expect("dumpe2fs runs");
    assert!(out.status.success(), "dumpe2fs -h {device}");
    let text = String::from_utf8_lossy(&out.stdout);
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no features line from dumpe2fs -h {device}:\n{text}"));
    features.split_whitespace().any(|f| f == "needs_recovery")
}

/// `e2fsck -fn device`: (clean, its output).
fn fsck(device: &str) -> (bool, String) {
    let out = Command::new("e2fsck")
        .args(["-fn", device])
        .output()
        .expect("e2fsck runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Writes `data` to `path` and fsyncs it.
fn write_synced(path: &str, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// A shell command in the background, its process group killed and the shell reaped on
/// drop; the filesystem at
/// `thaw` is thawed first (a process writing to a frozen filesystem cannot be reaped, and
/// a failed check may leave it frozen).
struct Bg {
    child: Child,
    thaw: PathBuf,
    started: Instant,
}

impl Bg {
    fn spawn(script: &str, dir: &str, thaw: &str) -> Self {
        use std::os::unix::process::CommandExt;
        // A process group of its own: the drop kills the shell and the dd it runs.
        let child = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        Self {
            child,
            thaw: PathBuf::from(thaw),
            started: Instant::now(),
        }
    }

    /// Its exit status once it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.thaw)
                .stderr(Stdio::null())
                .status();
            let pgid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
            // The group is the one our own unreaped child leads (spawned with
            // process_group(0)), so it names no other process.
            // SAFETY: kill takes plain integers, and the group is our child's (above).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Thaws every filesystem mounted under `dir` (after a failure: nothing stays frozen).
fn thaw_under(dir: &Path) {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for p in table
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
    {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&p)
            .stderr(Stdio::null())
            .status();
    }
}

fn code_of(r: Result<(), tonic::Status>) -> (Code, String) {
    match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

/// Unmounts every mount under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = Command::new("umount").arg(&p).status();
    }
}

/// Starts `coreblkd` on `device` with its state in `dir`.
fn start_daemon(dir: &Path, device: &str) -> Daemon {
    let socket = dir.join("api.sock");
    let log = dir.join("coreblkd.log");
    let child = Command::new(coreblk_tests::bin("coreblkd"))
        .args([
            "--device",
            device,
            "--cores",
            "0",
            "--metrics-address",
            "off",
        ])
        .arg("--var-dir")
        .arg(dir.join("var"))
        .arg("--socket")
        .arg(&socket)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn coreblkd");
    let d = Daemon { child, socket, log };
    let ready = wait_for(START_DEADLINE * 4, || {
        let log = d.log_text();
        std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
            && log.contains("pool import finished")
    });
    assert!(ready, "coreblkd did not start:\n{}", d.log_text());
    d
}

#[test]
fn stage_publish_expand_and_stats_on_ublk() {
    let device = std::env::var(DEVICE_ENV).unwrap_or_default();
    if !Path::new("/dev/ublk-control").exists() || device.is_empty() {
        eprintln!(
            "SKIPPED: needs /dev/ublk-control and {DEVICE_ENV} (a device for the pool): run \
             scripts/vm/guest/csi-node-test in the VM harness; nothing was checked"
        );
        return;
    }
    // The guest's /tmp (tmpfs), not the 9p share: the kubelet directory holds mounts.
    // COREBLK_CSI_VM_WORK names it, so the guest script can show the logs after a hang.
    let dir = match std::env::var_os("COREBLK_CSI_VM_WORK") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    // In a slot: the restart check replaces it with the next daemon.
    let mut slot = Some(start_daemon(dir.path(), &device));
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let daemon = slot.as_ref().expect("daemon");
    let plugin = Csi::node_with(dir.path(), "csi", daemon, NODE, &["--kubelet-dir", &k]);
    let plugin2 = Csi::node_with(dir.path(), "csi2", daemon, NODE, &["--kubelet-dir", &k]);
    let mut checks = Checks(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt().block_on(async {
            let ch = plugin.channel().await;
            let mut env = Env {
                node: csi::node_client::NodeClient::new(ch.clone()),
                restarted: csi::node_client::NodeClient::new(plugin2.channel().await),
                ctl: csi::controller_client::ControllerClient::new(ch),
                daemon: daemon.channel().await,
                kubelet: kubelet.clone(),
                plugin_log: plugin.log.clone(),
            };
            ext4(&mut env, &mut checks).await;
            snapshots(&mut env, &mut checks, dir.path(), daemon).await;
            block(&mut env, &mut checks).await;
            xfs(&mut env, &mut checks).await;
        });
    }));
    // Last (it replaces the daemon the plugins were started with): a daemon restart
    // under a mounted, published volume.
    let result = result.and_then(|()| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt().block_on(restart(
                &plugin,
                &mut checks,
                &kubelet,
                dir.path(),
                &device,
                &mut slot,
            ));
        }))
    });
    let daemon = slot.as_ref().expect("a daemon after the checks");
    eprintln!("{} checks passed", checks.0);
    if let Err(e) = result {
        // Unmount what the test left while the daemon still serves it: killed with its
        // devices mounted, their IO (and the guest's shutdown) would wait forever. Thawed
        // first: a filesystem a failed check left frozen cannot be unmounted.
        thaw_under(&kubelet);
        unmount_under(&kubelet);
        eprintln!(
            "--- coreblk-csi logs:\n{}\n{}\n--- coreblkd log (end):\n{}",
            plugin.log_text(),
            plugin2.log_text(),
            daemon
                .log_text()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        // Leave the directory: removing it would walk into mounts whose daemon is gone
        // (killed on drop) and hang in IO wait.
        let _ = dir.keep();
        std::panic::resume_unwind(e);
    }
}

/// A daemon restart with a volume staged, published and written: SIGTERM (the daemon
/// quiesces the export and leaves it for the next one), a new daemon on the same device
/// and state; the mounts stay, what was written reads back, new writes work, and the
/// plugin (which reconnects to the daemon by itself) answers stats and unstages.
async fn restart(
    plugin: &Csi,
    c: &mut Checks,
    kubelet: &Path,
    dir: &Path,
    device: &str,
    slot: &mut Option<Daemon>,
) {
    let ch = plugin.channel().await;
    let mut env = Env {
        node: csi::node_client::NodeClient::new(ch.clone()),
        restarted: csi::node_client::NodeClient::new(ch.clone()),
        ctl: csi::controller_client::ControllerClient::new(ch),
        daemon: slot.as_ref().expect("daemon").channel().await,
        kubelet: kubelet.to_path_buf(),
        plugin_log: plugin.log.clone(),
    };
    let id = env.create("pvc-restart", 64 * MIB, None).await;
    let staging = env.staging("pv-restart");
    let target = env.target("pod-r", "pv-restart");
    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage");
    env.publish(&id, &staging, &target, fs_cap("ext4"), false)
        .await
        .expect("publish");
    write_synced(&format!("{target}/before"), b"written before the restart");
    // Every volume the suite made so far (and their sizes) must be there afterwards.
    let volumes = |ch: tonic::transport::Channel| async move {
        let mut v: Vec<(String, u64)> = pb::volumes_client::VolumesClient::new(ch)
            .list_volumes(pb::ListVolumesRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("ListVolumes")
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| (v.name, v.size_bytes))
            .collect();
        v.sort();
        v
    };
    let before = volumes(env.daemon.clone()).await;
    assert!(before.len() > 1, "the suite's volumes: {before:?}");
    let old = slot.take().expect("daemon");
    assert!(
        old.stop_with(libc::SIGTERM).success(),
        "coreblkd stops on SIGTERM"
    );
    *slot = Some(start_daemon(dir, device));
    env.daemon = slot.as_ref().expect("daemon").channel().await;
    assert_eq!(
        volumes(env.daemon.clone()).await,
        before,
        "the same volumes after the restart"
    );
    assert!(
        mount_at(Path::new(&target)).is_some() && mount_at(Path::new(&staging)).is_some(),
        "the mounts stay over a daemon restart"
    );
    assert_eq!(
        std::fs::read(format!("{target}/before")).expect("read after the restart"),
        b"written before the restart"
    );
    write_synced(&format!("{target}/after"), b"written after the restart");
    let stats = env.stats(&id, &target).await;
    assert!(
        stats.volume_condition.as_ref().is_some_and(|v| !v.abnormal),
        "the volume is healthy after the restart: {stats:?}"
    );
    let device = env.exported(&id).await;
    assert!(!device.is_empty(), "the new daemon re-attached the export");
    assert_eq!(
        env.daemon_volume(&id).await.device_path,
        device,
        "GetVolume names the export's device"
    );
    c.ok(
        "daemon restart (SIGTERM, new daemon): every volume still there, mounts stay, data reads back, writes and stats work",
    );
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    assert_eq!(mounts_at(Path::new(&staging)), 0);
    c.ok("after the restart the plugin unpublishes and unstages");
}

async fn ext4(env: &mut Env, c: &mut Checks) {
    let id = env.create("pvc-ext4", 128 * MIB, None).await;
    let other = env.create("pvc-other", 64 * MIB, None).await;
    assert!(env.daemon_volume(&id).await.never_written);
    let staging = env.staging("pv-ext4");
    let t1 = env.target("pod1", "pv-ext4");
    let t2 = env.target("pod2", "pv-ext4");

    // Paths outside the kubelet directory: refused, nothing mounted.
    for bad in [
        "/mnt/staging",
        "/tmp",
        &*format!("{}/../x", env.kubelet.display()),
    ] {
        let (code, msg) = code_of(env.stage(&id, bad, fs_cap("ext4")).await);
        assert_eq!(code, Code::InvalidArgument, "{bad}: {msg}");
        assert!(mount_at(Path::new(bad)).is_none_or(|(fs, _)| fs != "ext4"));
    }
    c.ok("stage at paths outside the kubelet directory: INVALID_ARGUMENT, nothing mounted");

    for round in 0..2 {
        env.stage(&id, &staging, fs_cap("ext4"))
            .await
            .unwrap_or_else(|e| panic!("stage #{round}: {e}"));
    }
    let (fs, _) = mount_at(Path::new(&staging)).expect("staged mount");
    assert_eq!(fs, "ext4");
    assert!(!env.daemon_volume(&id).await.never_written);
    c.ok("ext4 stage (twice): mkfs on the never-written volume, mounted at the staging path");

    let (code, msg) = code_of(env.stage(&other, &staging, fs_cap("ext4")).await);
    assert_eq!(code, Code::AlreadyExists, "{msg}");
    let (code, msg) = code_of(env.stage(&id, &staging, fs_cap("xfs")).await);
    assert_eq!(code, Code::AlreadyExists, "{msg}");
    c.ok("another volume or filesystem at a staged path: ALREADY_EXISTS");

    for _ in 0..2 {
        env.publish(&id, &staging, &t1, fs_cap("ext4"), false)
            .await
            .expect("publish rw");
    }
    let data = seeded(1 << 20, 7);
    std::fs::write(format!("{t1}/data"), &data).expect("write through the publish");
    let (_, opts) = mount_at(Path::new(&t1)).expect("published");
    assert!(opts.split(',').any(|o| o == "rw"), "{opts}");
    c.ok("publish rw (twice) and write a file");

    env.publish(&id, &staging, &t2, fs_cap("ext4"), true)
        .await
        .expect("publish ro");
    let (code, msg) = code_of(env.publish(&id, &staging, &t2, fs_cap("ext4"), false).await);
    assert_eq!(code, Code::AlreadyExists, "rw over a ro publish: {msg}");
    assert_eq!(
        std::fs::read(format!("{t2}/data")).expect("read ro"),
        data,
        "the ro publish reads the data"
    );
    let e = std::fs::write(format!("{t2}/other"), b"x").expect_err("ro refuses writes");
    assert_eq!(e.raw_os_error(), Some(30), "EROFS: {e}");
    c.ok("read-only publish reads the data and refuses writes (EROFS)");

    // Stats against df.
    assert!(Command::new("sync").status().expect("sync").success());
    let st = env.stats(&id, &t1).await;
    let (bytes, inodes) = df(Path::new(&t1));
    let by = |u: i32| {
        st.usage
            .iter()
            .find(|x| x.unit == u)
            .map(|x| [x.total, x.used, x.available])
            .expect("usage")
    };
    assert_eq!(
        by(csi::volume_usage::Unit::Bytes as i32),
        bytes,
        "bytes vs df"
    );
    assert_eq!(
        by(csi::volume_usage::Unit::Inodes as i32),
        inodes,
        "inodes vs df -i"
    );
    let cond = st.volume_condition.expect("condition");
    assert!(!cond.abnormal, "{cond:?}");
    c.ok("stats: bytes and inodes equal df's, condition normal");

    // Expansion of the mounted filesystem.
    let before = df(Path::new(&t1)).0[0];
    let r = env.expand(&id, &t1, 256 * MIB).await;
    assert_eq!(env.daemon_volume(&id).await.size_bytes, 256 << 20);
    if kernel_has_update_size() {
        let cap = r.unwrap_or_else(|e| panic!("online expansion: {e}"));
        assert_eq!(cap, 256 * MIB);
        let after = df(Path::new(&t1)).0[0];
        assert!(after > before + 100 * MIB, "df {before} -> {after}");
        c.ok(&format!("online expansion: df size {before} -> {after}"));
    } else {
        let e = r.expect_err("no online resize on this kernel");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("unstaged and staged again"), "{e}");
        c.ok("expansion without UPDATE_SIZE: FAILED_PRECONDITION saying unstage + stage");
    }

    // Unpublish and unstage, twice each, then stage again: the data is there.
    for _ in 0..2 {
        env.unpublish(&id, &t1).await;
        env.unpublish(&id, &t2).await;
    }
    assert!(!Path::new(&t1).exists() && !Path::new(&t2).exists());
    for _ in 0..2 {
        env.unstage(&id, &staging).await;
    }
    assert!(mount_at(Path::new(&staging)).is_none());
    assert!(env.exported(&id).await.is_empty());
    c.ok("unpublish and unstage (twice each): unmounted, targets removed, unexported");

    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage again");
    env.publish(&id, &staging, &t1, fs_cap("ext4"), false)
        .await
        .expect("publish again");
    assert_eq!(std::fs::read(format!("{t1}/data")).expect("read"), data);
    c.ok("stage again: no mkfs, the data is there");

    // Another plugin process (as after a restart) finds the volume staged and published
    // from the mount table and the daemon: the same calls answer OK and mount nothing twice.
    std::mem::swap(&mut env.node, &mut env.restarted);
    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage through a restarted plugin");
    env.publish(&id, &staging, &t1, fs_cap("ext4"), false)
        .await
        .expect("publish through a restarted plugin");
    std::mem::swap(&mut env.node, &mut env.restarted);
    assert_eq!(mounts_at(Path::new(&staging)), 1, "staging mounted twice");
    assert_eq!(mounts_at(Path::new(&t1)), 1, "target mounted twice");
    c.ok(
        "a restarted plugin re-stages and re-publishes nothing twice (state from the mount table)",
    );

    if !kernel_has_update_size() {
        let cap = env
            .expand(&id, &t1, 256 * MIB)
            .await
            .unwrap_or_else(|e| panic!("expansion after restage: {e}"));
        assert_eq!(cap, 256 * MIB);
        let after = df(Path::new(&t1)).0[0];
        assert!(after > before + 100 * MIB, "df {before} -> {after}");
        c.ok(&format!(
            "after unstage + restage the device has the new size; expansion grows df {before} -> {after}"
        ));
    }
    let (code, msg) = code_of({
        let staged = env.exported(&id).await;
        // Unstage while a publish remains: refused, nothing unexported.
        let r = env
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
            .map(|_| ());
        assert_eq!(env.exported(&id).await, staged);
        r
    });
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        mount_at(Path::new(&staging)).is_some(),
        "staging unmounted by a refused unstage"
    );
    c.ok("unstage while still published: FAILED_PRECONDITION, still staged and exported");
    env.unpublish(&id, &t1).await;
    env.unstage(&id, &staging).await;
}

async fn block(env: &mut Env, c: &mut Checks) {
    let id = env.create("pvc-block", 64 * MIB, None).await;
    let staging = env.staging("pv-block");
    let target = format!(
        "{}/plugins/kubernetes.io/csi/volumeDevices/publish/pv-block/pod3",
        env.kubelet.display()
    );
    for _ in 0..2 {
        env.stage(&id, &staging, block_cap())
            .await
            .expect("stage block");
        env.publish(&id, &staging, &target, block_cap(), false)
            .await
            .expect("publish block");
    }
    let data = seeded(256 << 10, 11);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open the published device");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
    let st = env.stats(&id, &target).await;
    assert_eq!(st.usage.first().map(|u| u.total), Some(64 * MIB), "{st:?}");
    c.ok("block: stage + publish (twice), write through the target, stats total = size");
    let frozen = log_lines(&env.plugin_log, &["filesystem frozen"]);
    env.snapshot("snap-block", &id)
        .await
        .expect("snapshot of a block-mode volume");
    assert_eq!(
        log_lines(&env.plugin_log, &["filesystem frozen"]),
        frozen,
        "a block-mode volume has no filesystem to freeze"
    );
    c.ok("block: CreateSnapshot of a published block volume, taken without a freeze");
    // Block expansion: the device follows online (UPDATE_SIZE) or at the next stage.
    let r = env.expand_as(&id, &target, 96 * MIB, block_cap()).await;
    if kernel_has_update_size() {
        assert_eq!(r.ok(), Some(96 * MIB));
        let st = env.stats(&id, &target).await;
        assert_eq!(st.usage.first().map(|u| u.total), Some(96 * MIB), "{st:?}");
        c.ok("block: online expansion, the device and stats show the new size");
    } else {
        let e = r.expect_err("no online resize on this kernel");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        c.ok("block: expansion without UPDATE_SIZE: FAILED_PRECONDITION");
    }
    for _ in 0..2 {
        env.unpublish(&id, &target).await;
        env.unstage(&id, &staging).await;
    }
    assert!(env.exported(&id).await.is_empty());
    env.stage(&id, &staging, block_cap()).await.expect("stage");
    env.publish(&id, &staging, &target, block_cap(), false)
        .await
        .expect("publish");
    let mut back = vec![0u8; data.len()];
    {
        let mut f = std::fs::File::open(&target).expect("open");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.read_exact(&mut back).expect("read");
    }
    assert!(back == data, "block data after unstage + stage");
    let st = env.stats(&id, &target).await;
    assert_eq!(st.usage.first().map(|u| u.total), Some(96 * MIB), "{st:?}");
    c.ok("block: unpublish + unstage (twice), stage again: the bytes are there, the new size too");
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
}

async fn xfs(env: &mut Env, c: &mut Checks) {
    // mkfs.xfs wants at least 300 MiB.
    let id = env.create("pvc-xfs", 320 * MIB, None).await;
    let staging = env.staging("pv-xfs");
    let target = env.target("pod4", "pv-xfs");
    env.stage(&id, &staging, fs_cap("xfs"))
        .await
        .expect("stage xfs");
    env.publish(&id, &staging, &target, fs_cap("xfs"), false)
        .await
        .expect("publish xfs");
    assert_eq!(
        mount_at(Path::new(&staging)).map(|m| m.0),
        Some("xfs".to_owned())
    );
    let data = seeded(1 << 20, 13);
    std::fs::write(format!("{target}/data"), &data).expect("write");
    let sync = Command::new("sync").status().expect("sync");
    assert!(sync.success());
    c.ok("xfs: stage (mkfs) + publish + write");

    // A clone of the mounted origin carries its UUID: staged beside it with nouuid.
    let clone = env.create("pvc-xfs-clone", 320 * MIB, Some(&id)).await;
    let cstaging = env.staging("pv-xfs-clone");
    let ctarget = env.target("pod5", "pv-xfs-clone");
    env.stage(&clone, &cstaging, fs_cap("xfs"))
        .await
        .expect("stage the xfs clone beside its mounted origin");
    env.publish(&clone, &cstaging, &ctarget, fs_cap("xfs"), false)
        .await
        .expect("publish the clone");
    let (_, _) = mount_at(Path::new(&cstaging)).expect("clone staged");
    assert_eq!(
        std::fs::read(format!("{ctarget}/data")).expect("read clone"),
        data
    );
    c.ok("xfs clone staged while its origin is mounted (nouuid): no mkfs, origin's data");
    env.unpublish(&clone, &ctarget).await;
    env.unstage(&clone, &cstaging).await;

    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.stage(&id, &staging, fs_cap("xfs"))
        .await
        .expect("stage xfs again");
    env.publish(&id, &staging, &target, fs_cap("xfs"), false)
        .await
        .expect("publish xfs again");
    assert_eq!(std::fs::read(format!("{target}/data")).expect("read"), data);
    c.ok("xfs: unpublish + unstage, stage again: the data is there");
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
}

/// Snapshots of a mounted ext4 under a writer: frozen around the daemon's snapshot,
/// consistent clones, a write inside the window waiting for the thaw, and a plugin killed
/// inside the window whose freeze the next plugin start thaws.
async fn snapshots(env: &mut Env, c: &mut Checks, dir: &Path, daemon: &Daemon) {
    let id = env.create("pvc-snap", 128 * MIB, None).await;
    let staging = env.staging("pv-snap");
    let target = env.target("pod6", "pv-snap");
    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage");
    env.publish(&id, &staging, &target, fs_cap("ext4"), false)
        .await
        .expect("publish");
    let pre = seeded(1 << 20, 17);
    write_synced(&format!("{target}/pre"), &pre);
    // The write load: files rewritten with fsync, all through the snapshots below.
    // It stops at the end when `stop` appears (outside the volume), so no dd of it is
    // left holding the mount when it is unpublished.
    let stop = dir.join("stop-load");
    let mut load = Bg::spawn(
        &format!(
            "i=0; while [ ! -e {} ]; do dd if=/dev/urandom of=load.$((i % 8)) bs=64k count=4 \
             conv=fsync status=none || exit 1; i=$((i + 1)); done",
            stop.display()
        ),
        &target,
        &staging,
    );
    assert!(
        wait_for(START_DEADLINE, || Path::new(&format!("{target}/load.1"))
            .exists()),
        "the writer did not start"
    );

    // Control: a snapshot taken straight through the daemon, without a freeze, of the
    // mounted ext4 needs journal recovery — the check below can tell the difference.
    let unfrozen = pb::snapshots_client::SnapshotsClient::new(env.daemon.clone())
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: id.rsplit(':').next().expect("uuid").to_owned(),
            name: "snap-unfrozen".to_owned(),
            labels: Default::default(),
        })
        .await
        .expect("daemon CreateSnapshot")
        .into_inner();
    let clone = env
        .restore(
            "pvc-unfrozen",
            128 * MIB,
            &format!("snap:{NODE}:{}", unfrozen.uuid),
        )
        .await;
    let dev = env.daemon_export(&clone).await;
    assert!(
        needs_recovery(&dev),
        "control: an unfrozen snapshot of a mounted ext4 should carry needs_recovery"
    );
    env.daemon_unexport(&clone).await;
    c.ok("control: a snapshot of the mounted ext4 taken without a freeze needs journal recovery (dumpe2fs)");

    // Through CSI, under the writer: frozen once around the daemon's snapshot; a retry
    // by name returns the same snapshot without freezing again.
    let frozen = log_lines(&env.plugin_log, &["filesystem frozen", &staging]);
    let thawed = log_lines(
        &env.plugin_log,
        &["filesystem thawed", &staging, "frozen_ms"],
    );
    let snap = env
        .snapshot("snap-frozen", &id)
        .await
        .expect("CreateSnapshot");
    assert_eq!(
        log_lines(&env.plugin_log, &["filesystem frozen", &staging]),
        frozen + 1
    );
    assert_eq!(
        log_lines(
            &env.plugin_log,
            &["filesystem thawed", &staging, "frozen_ms"]
        ),
        thawed + 1
    );
    let again = env
        .snapshot("snap-frozen", &id)
        .await
        .expect("CreateSnapshot again");
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert_eq!(
        log_lines(&env.plugin_log, &["filesystem frozen", &staging]),
        frozen + 1,
        "the retry froze again"
    );
    c.ok("CreateSnapshot of a mounted ext4 under a writer: frozen and thawed once, logged with the mount point and time frozen; the retry by name returns it without a freeze");

    let clone = env
        .restore("pvc-frozen-clone", 128 * MIB, &snap.snapshot_id)
        .await;
    let dev = env.daemon_export(&clone).await;
    assert!(
        !needs_recovery(&dev),
        "the frozen snapshot's filesystem needs journal recovery"
    );
    let (clean, out) = fsck(&dev);
    assert!(clean, "e2fsck -fn {dev}:\n{out}");
    env.daemon_unexport(&clone).await;
    let (cstaging, ctarget) = (
        env.staging("pv-frozen-clone"),
        env.target("pod7", "pv-frozen-clone"),
    );
    env.stage(&clone, &cstaging, fs_cap("ext4"))
        .await
        .expect("stage the clone");
    env.publish(&clone, &cstaging, &ctarget, fs_cap("ext4"), false)
        .await
        .expect("publish the clone");
    assert!(std::fs::read(format!("{ctarget}/pre")).expect("read pre") == pre);
    env.unpublish(&clone, &ctarget).await;
    env.unstage(&clone, &cstaging).await;
    c.ok("its clone: no needs_recovery before the mount, e2fsck -fn clean, mounts with the data");

    // (a) A plugin that holds each freeze for HOLD_MS (test hook): a write issued inside
    // the window waits until the thaw, and is not in the snapshot.
    let k = env.kubelet.to_str().expect("utf-8").to_owned();
    let hold = HOLD_MS.to_string();
    let mut held = Csi::node_env(
        dir,
        "csi-hold",
        daemon,
        NODE,
        &["--kubelet-dir", &k],
        &[(HOLD_ENV, &hold)],
    );
    let call = snapshot_in_thread(held.socket.clone(), "snap-held", &id);
    assert!(
        wait_for(START_DEADLINE, || log_lines(
            &held.log,
            &["filesystem frozen"]
        ) == 1),
        "no freeze:\n{}",
        held.log_text()
    );
    let mut write = Bg::spawn(
        "dd if=/dev/zero of=during bs=4k count=1 conv=fsync status=none",
        &target,
        &staging,
    );
    assert!(
        !wait_for(Duration::from_millis(700), || write.exited().is_some()),
        "a write issued inside the frozen window completed at once: nothing was frozen"
    );
    let snap_held = call
        .join()
        .expect("thread")
        .expect("CreateSnapshot with a held freeze");
    assert!(
        wait_for(START_DEADLINE, || write.exited().is_some()),
        "the write did not complete after the thaw"
    );
    let waited_ms = write.started.elapsed().as_millis();
    assert!(write.exited().is_some_and(|s| s.success()));
    assert!(log_lines(&held.log, &["filesystem thawed", &staging]) == 1);
    c.ok(&format!(
        "a write issued inside the frozen window waited for the thaw ({waited_ms} ms), then completed"
    ));
    let clone = env
        .restore("pvc-held-clone", 128 * MIB, &snap_held.snapshot_id)
        .await;
    let dev = env.daemon_export(&clone).await;
    assert!(!needs_recovery(&dev), "the held snapshot needs recovery");
    env.daemon_unexport(&clone).await;
    let (cstaging, ctarget) = (
        env.staging("pv-held-clone"),
        env.target("pod8", "pv-held-clone"),
    );
    env.stage(&clone, &cstaging, fs_cap("ext4"))
        .await
        .expect("stage the clone");
    env.publish(&clone, &cstaging, &ctarget, fs_cap("ext4"), false)
        .await
        .expect("publish the clone");
    assert!(std::fs::read(format!("{ctarget}/pre")).expect("read pre") == pre);
    assert!(
        !Path::new(&format!("{ctarget}/during")).exists(),
        "the write that waited for the thaw is in the snapshot"
    );
    env.unpublish(&clone, &ctarget).await;
    env.unstage(&clone, &cstaging).await;
    c.ok("that snapshot's clone: no recovery needed, the data synced before the freeze, not the write that waited");

    // (c) The plugin killed (SIGKILL) inside the frozen window: the filesystem stays
    // frozen; the next plugin start thaws it and the waiting write completes.
    let call = snapshot_in_thread(held.socket.clone(), "snap-killed", &id);
    assert!(
        wait_for(START_DEADLINE, || log_lines(
            &held.log,
            &["filesystem frozen"]
        ) == 2),
        "no second freeze:\n{}",
        held.log_text()
    );
    held.child.kill().expect("SIGKILL the plugin");
    held.child.wait().expect("reap");
    assert!(call.join().expect("thread").is_err());
    let mut write = Bg::spawn(
        "dd if=/dev/zero of=after-kill bs=4k count=1 conv=fsync status=none",
        &target,
        &staging,
    );
    assert!(
        !wait_for(Duration::from_millis(700), || write.exited().is_some()),
        "a write completed after the plugin was killed inside the window: not frozen"
    );
    c.ok("a plugin killed (SIGKILL) inside the frozen window leaves the filesystem frozen: a write waits");
    let restarted = Csi::node_with(dir, "csi-restarted", daemon, NODE, &["--kubelet-dir", &k]);
    assert_eq!(
        log_lines(
            &restarted.log,
            &["thawed a filesystem left frozen", &staging]
        ),
        1,
        "{}",
        restarted.log_text()
    );
    assert!(
        wait_for(START_DEADLINE, || write.exited().is_some()),
        "the write did not complete after the restart's thaw"
    );
    assert!(write.exited().is_some_and(|s| s.success()));
    let mut ctl = csi::controller_client::ControllerClient::new(restarted.channel().await);
    ctl.create_snapshot(snapshot_request("snap-killed", &id))
        .await
        .expect("the snapshot retried through the restarted plugin");
    assert_eq!(
        log_lines(&restarted.log, &["filesystem thawed", &staging]),
        1
    );
    c.ok("the next plugin start thaws it (logged), the waiting write completes, the retried snapshot succeeds");

    assert!(load.exited().is_none(), "the writer stopped");
    std::fs::write(&stop, b"").expect("create the stop file");
    assert!(
        wait_for(START_DEADLINE, || load.exited().is_some()),
        "the writer did not stop"
    );
    assert!(
        load.exited().is_some_and(|s| s.success()),
        "the writer failed"
    );
    drop(load);
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
}

// ---- Issue 15: LUKS2 encryption at rest and ephemeral volumes (a second test, run by
// scripts/vm/guest/csi-node-test on a second NVMe namespace) ----

/// The passphrase of the encrypted checks (a test value, not a secret).
const PASSPHRASE: &str = "correct horse battery staple";
/// The bytes written in the clear inside encrypted volumes, looked for in their raw
/// bytes afterwards.
const MARKER: &[u8] = b"COREBLK-PLAINTEXT-MARKER-7f3a9c";

fn secrets(pass: &str) -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([("passphrase".to_owned(), pass.to_owned())])
}

/// `major:minor` of the file system mounted at `path` (the last mount there).
fn mount_dev(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = path.to_str().expect("utf-8");
    table.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&p)).then(|| f[2].to_owned())
    })
}

/// The kernel name (`dm-3`) of the open dm mapping `name`.
fn dm_of(name: &str) -> Option<String> {
    std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            std::fs::read_to_string(format!("/sys/block/{n}/dm/name"))
                .is_ok_and(|m| m.trim() == name)
        })
}

/// Every byte of the daemon's volume `name` (image export; unwritten ranges are zero).
async fn raw_bytes(daemon: Channel, name: &str) -> Vec<u8> {
    let mut stream = pb::images_client::ImagesClient::new(daemon)
        .max_decoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .export_image(pb::ExportImageRequest {
            source: Some(pb::export_image_request::Source::Volume(name.to_owned())),
            since_snapshot: String::new(),
            max_chunk_bytes: 0,
        })
        .await
        .expect("export starts")
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.expect("export runs") {
        if let Some(pb::export_image_response::Msg::Chunk(c)) = m.msg {
            let at = usize::try_from(c.offset_bytes).expect("fits");
            let n = if c.zero {
                usize::try_from(c.length_bytes).expect("fits")
            } else {
                c.data.len()
            };
            if out.len() < at + n {
                out.resize(at + n, 0);
            }
            if !c.zero {
                out[at..at + n].copy_from_slice(&c.data);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A file of `MARKER`s (1 MiB), fsynced.
fn marker_file(path: &str) {
    write_synced(path, &MARKER.repeat((1 << 20) / MARKER.len()));
}

async fn pool_allocated(daemon: Channel) -> u64 {
    pb::pools_client::PoolsClient::new(daemon)
        .get_pool(pb::GetPoolRequest {
            pool: "default".to_owned(),
        })
        .await
        .expect("GetPool")
        .into_inner()
        .allocated_bytes
}

async fn volume_exists(daemon: Channel, name: &str) -> bool {
    match pb::volumes_client::VolumesClient::new(daemon)
        .get_volume(pb::GetVolumeRequest {
            volume: name.to_owned(),
        })
        .await
    {
        Ok(v) => v.into_inner().name == name,
        Err(s) if s.code() == Code::NotFound => false,
        Err(s) => panic!("GetVolume {name}: {s}"),
    }
}

/// Waits (up to 30 s) for `f` to hold, asking the daemon.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < end, "{what} did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn encryption_and_ephemeral_volumes_on_ublk() {
    let device = std::env::var(DEVICE_ENV).unwrap_or_default();
    if !Path::new("/dev/ublk-control").exists() || device.is_empty() {
        eprintln!(
            "SKIPPED: needs /dev/ublk-control and {DEVICE_ENV} (a device for the pool): run \
             scripts/vm/guest/csi-node-test in the VM harness; nothing was checked"
        );
        return;
    }
    let dir = match std::env::var_os("COREBLK_CSI_VM_WORK") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("tempdir");
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    let mut slot = Some(start_daemon(dir.path(), &device));
    let k = kubelet.to_str().expect("utf-8").to_owned();
    // A small, quick key derivation: TCG is slow (the driver's flags; defaults otherwise).
    let args = [
        "--kubelet-dir",
        k.as_str(),
        "--luks-pbkdf-memory-kib",
        "32768",
        "--luks-iter-time-ms",
        "100",
    ];
    let plugin = Csi::node_with(
        dir.path(),
        "csi",
        slot.as_ref().expect("daemon"),
        NODE,
        &args,
    );
    let mut checks = Checks(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt().block_on(async {
            let ch = plugin.channel().await;
            let mut env = Env {
                node: csi::node_client::NodeClient::new(ch.clone()),
                restarted: csi::node_client::NodeClient::new(ch.clone()),
                ctl: csi::controller_client::ControllerClient::new(ch),
                daemon: slot.as_ref().expect("daemon").channel().await,
                kubelet: kubelet.clone(),
                plugin_log: plugin.log.clone(),
            };
            encryption(&mut env, &mut checks).await;
            encrypted_block(&mut env, &mut checks).await;
            mkfs_options(&mut env, &mut checks).await;
            generic_ephemeral(&mut env, &mut checks).await;
            ephemeral(&mut env, &mut checks, dir.path(), &device, &mut slot, &args).await;
        });
    }));
    eprintln!("{} checks passed", checks.0);
    if let Err(e) = result {
        unmount_under(&kubelet);
        for l in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = l.file_name().to_string_lossy().into_owned();
            if let Ok(m) = std::fs::read_to_string(format!("/sys/block/{n}/dm/name")) {
                let _ = Command::new("cryptsetup")
                    .args(["close", m.trim()])
                    .status();
            }
        }
        eprintln!("--- coreblk-csi log:\n{}", plugin.log_text());
        if let Some(d) = slot.as_ref() {
            eprintln!("--- coreblkd log (end):\n{}", {
                let t = d.log_text();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            });
        }
        let _ = dir.keep();
        std::panic::resume_unwind(e);
    }
}

/// CreateVolume through a class with `csi.coreblk.io/encryption`.
async fn create_encrypted(env: &mut Env, name: &str, c: csi::VolumeCapability) -> String {
    eprintln!("... create_volume {name} (luks2)");
    env.ctl
        .create_volume(csi::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![c],
            parameters: std::collections::HashMap::from([(
                "csi.coreblk.io/encryption".to_owned(),
                "luks2".to_owned(),
            )]),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

async fn stage_secret(
    env: &mut Env,
    id: &str,
    staging: &str,
    c: csi::VolumeCapability,
    pass: Option<&str>,
) -> Result<(), tonic::Status> {
    eprintln!("... node_stage_volume {id} {staging} (secret)");
    env.node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.to_owned(),
            volume_capability: Some(c),
            secrets: pass.map(secrets).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn encryption(env: &mut Env, c: &mut Checks) {
    let id = create_encrypted(env, "pvc-enc", fs_cap("ext4")).await;
    let v = env.daemon_volume(&id).await;
    let mapping = format!("coreblk-{}", v.uuid);
    assert!(v.never_written);
    let staging = env.staging("pv-enc");
    let target = env.target("pod-enc", "pv-enc");

    // No passphrase: refused before anything is written.
    let (code, msg) = code_of(stage_secret(env, &id, &staging, fs_cap("ext4"), None).await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(
        env.daemon_volume(&id).await.never_written,
        "written without a passphrase"
    );
    assert!(env.exported(&id).await.is_empty());
    c.ok("an encrypted volume without the node-stage secret is refused (INVALID_ARGUMENT), nothing written");

    let t0 = Instant::now();
    stage_secret(env, &id, &staging, fs_cap("ext4"), Some(PASSPHRASE))
        .await
        .expect("stage encrypted");
    let took = t0.elapsed();
    let dm = dm_of(&mapping).expect("the LUKS2 mapping is open");
    let ublk = env.exported(&id).await;
    let ublk_name = ublk.rsplit('/').next().expect("name").to_owned();
    assert!(
        Path::new(&format!("/sys/block/{dm}/slaves/{ublk_name}")).exists(),
        "{dm} sits on {ublk}"
    );
    let dm_dev = std::fs::read_to_string(format!("/sys/block/{dm}/dev")).expect("dev");
    assert_eq!(
        mount_dev(Path::new(&staging)).as_deref(),
        Some(dm_dev.trim())
    );
    assert_eq!(mount_at(Path::new(&staging)).expect("mounted").0, "ext4");
    let out = Command::new("cryptsetup")
        .args(["luksDump", &ublk])
        .output()
        .expect("luksDump");
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Version:") && l["Version:".len()..].trim() == "2"),
        "a LUKS2 header: {dump}"
    );
    c.ok(&format!(
        "stage formats LUKS2 on the never-written volume, opens {mapping} ({dm} on {ublk_name}) and mounts ext4 from it (stage took {} ms)",
        took.as_millis()
    ));
    // Stage again: nothing changes.
    stage_secret(env, &id, &staging, fs_cap("ext4"), Some(PASSPHRASE))
        .await
        .expect("stage again");
    assert_eq!(mounts_at(Path::new(&staging)), 1);

    env.publish(&id, &staging, &target, fs_cap("ext4"), false)
        .await
        .expect("publish");
    marker_file(&format!("{target}/secret.txt"));
    let stats = env.stats(&id, &target).await;
    assert!(
        stats.volume_condition.as_ref().is_some_and(|v| !v.abnormal),
        "{stats:?}"
    );
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    assert!(dm_of(&mapping).is_none(), "unstage closes the mapping");
    assert!(env.exported(&id).await.is_empty());
    env.unstage(&id, &staging).await;
    c.ok("publish, write, stats, unpublish, unstage (the mapping is closed; unstage twice)");

    let raw = raw_bytes(env.daemon.clone(), "pvc-enc").await;
    assert!(raw.starts_with(b"LUKS\xba\xbe"), "a LUKS header at 0");
    assert!(
        !contains(&raw, MARKER),
        "plaintext marker in the raw volume bytes"
    );
    c.ok(&format!(
        "the raw volume ({} bytes through image export) holds no plaintext marker",
        raw.len()
    ));

    // Wrong passphrase: PERMISSION_DENIED and nothing reformatted (the data is still
    // there with the right one).
    let (code, msg) =
        code_of(stage_secret(env, &id, &staging, fs_cap("ext4"), Some("wrong passphrase")).await);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        !msg.contains("wrong passphrase"),
        "the secret in the error: {msg}"
    );
    assert!(dm_of(&mapping).is_none());
    assert_eq!(mounts_at(Path::new(&staging)), 0);
    assert_eq!(
        raw_bytes(env.daemon.clone(), "pvc-enc").await,
        raw,
        "the refused stage changed the volume's bytes"
    );
    let log = std::fs::read_to_string(&env.plugin_log).unwrap_or_default();
    assert!(
        !log.contains(PASSPHRASE) && !log.contains("wrong passphrase"),
        "a passphrase in the plugin's log"
    );
    c.ok("the wrong passphrase is refused (PERMISSION_DENIED), the volume's bytes are unchanged, no passphrase in the error or the log");
    env.daemon_unexport(&id).await;

    stage_secret(env, &id, &staging, fs_cap("ext4"), Some(PASSPHRASE))
        .await
        .expect("restage");
    env.publish(&id, &staging, &target, fs_cap("ext4"), false)
        .await
        .expect("publish");
    assert_eq!(
        std::fs::read(format!("{target}/secret.txt")).expect("read back"),
        MARKER.repeat((1 << 20) / MARKER.len())
    );
    c.ok("restage with the secret: the data reads back");

    // A snapshot (frozen through the mapping's filesystem) restored through a class
    // without encryption: encrypted, opens with the same secret.
    let frozen = log_lines(&env.plugin_log, &["filesystem frozen", &id]);
    env.snapshot("snap-enc", &id).await.expect("snapshot");
    assert_eq!(
        log_lines(&env.plugin_log, &["filesystem frozen", &id]),
        frozen + 1,
        "the snapshot froze the filesystem on the mapping"
    );
    let snap_id = env
        .ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("ListSnapshots")
        .into_inner()
        .entries[0]
        .snapshot
        .clone()
        .expect("snapshot")
        .snapshot_id;
    let clone = env.restore("pvc-enc-restore", 64 * MIB, &snap_id).await;
    let cv = env.daemon_volume(&clone).await;
    assert_eq!(
        cv.labels
            .get("csi.coreblk.io/encryption")
            .map(String::as_str),
        Some("luks2")
    );
    let cstaging = env.staging("pv-enc-restore");
    let ctarget = env.target("pod-enc-r", "pv-enc-restore");
    let (code, msg) = code_of(
        stage_secret(
            env,
            &clone,
            &cstaging,
            fs_cap("ext4"),
            Some("wrong passphrase"),
        )
        .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    env.daemon_unexport(&clone).await;
    stage_secret(env, &clone, &cstaging, fs_cap("ext4"), Some(PASSPHRASE))
        .await
        .expect("stage the restore");
    env.publish(&clone, &cstaging, &ctarget, fs_cap("ext4"), false)
        .await
        .expect("publish the restore");
    assert_eq!(
        std::fs::read(format!("{ctarget}/secret.txt")).expect("read the restore"),
        MARKER.repeat((1 << 20) / MARKER.len())
    );
    c.ok("a snapshot of the mounted encrypted volume freezes the filesystem on its mapping; its restore (class without encryption) is encrypted, refuses the wrong secret and opens with the same one: the data is there");
    env.unpublish(&clone, &ctarget).await;
    env.unstage(&clone, &cstaging).await;
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    assert!(dm_of(&mapping).is_none() && dm_of(&format!("coreblk-{}", cv.uuid)).is_none());

    // What cryptsetup's defaults (no --luks-* flags) cost here: luksFormat and open of a
    // scratch volume, timed (a figure for the docs, not a limit).
    let scratch = env.create("pvc-luks-defaults", 64 * MIB, None).await;
    let dev = env.daemon_export(&scratch).await;
    let crypt = |args: &[&str]| {
        let t = Instant::now();
        let mut child = Command::new("cryptsetup")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cryptsetup");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(PASSPHRASE.as_bytes())
            .expect("passphrase");
        let out = child.wait_with_output().expect("cryptsetup runs");
        assert!(
            out.status.success(),
            "cryptsetup {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_millis()
    };
    let format_ms = crypt(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--key-file=-",
        &dev,
    ]);
    let open_ms = crypt(&["open", "--key-file=-", &dev, "coreblk-defaults"]);
    assert!(Command::new("cryptsetup")
        .args(["close", "coreblk-defaults"])
        .status()
        .expect("close")
        .success());
    env.daemon_unexport(&scratch).await;
    c.ok(&format!(
        "cryptsetup's default key derivation here: luksFormat {format_ms} ms, open {open_ms} ms"
    ));
}

async fn encrypted_block(env: &mut Env, c: &mut Checks) {
    let id = create_encrypted(env, "pvc-enc-block", block_cap()).await;
    let v = env.daemon_volume(&id).await;
    let mapping = format!("coreblk-{}", v.uuid);
    let staging = env.staging("pv-enc-block");
    let target = format!(
        "{}/plugins/kubernetes.io/csi/volumeDevices/publish/pv-enc-block/pod-eb",
        env.kubelet.display()
    );
    stage_secret(env, &id, &staging, block_cap(), Some(PASSPHRASE))
        .await
        .expect("stage encrypted block");
    let dm = dm_of(&mapping).expect("mapping open");
    env.publish(&id, &staging, &target, block_cap(), false)
        .await
        .expect("publish block");
    let dm_dev = std::fs::read_to_string(format!("/sys/block/{dm}/dev")).expect("dev");
    let meta = std::fs::metadata(&target).expect("target");
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(meta.file_type().is_block_device());
        let rdev = meta.rdev();
        let (major, minor) = (
            ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff),
            (rdev & 0xff) | ((rdev >> 12) & !0xff),
        );
        assert_eq!(
            format!("{major}:{minor}"),
            dm_dev.trim(),
            "the target is the mapping"
        );
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open the block target");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&MARKER.repeat(4096 / MARKER.len() + 1)[..4096])
            .expect("write");
        f.sync_all().expect("fsync");
    }
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    assert!(dm_of(&mapping).is_none());
    let raw = raw_bytes(env.daemon.clone(), "pvc-enc-block").await;
    assert!(raw.starts_with(b"LUKS\xba\xbe") && !contains(&raw, MARKER));
    c.ok("block mode: an encrypted volume is published as its mapping, what is written through it is not in the raw bytes");
}

/// `csi.coreblk.io/mkfs-options` of a class reaches mkfs: the filesystem has them.
async fn mkfs_options(env: &mut Env, c: &mut Checks) {
    eprintln!("... create_volume pvc-mkfs (mkfs options)");
    let id = env
        .ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "pvc-mkfs".to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![fs_cap("ext4")],
            parameters: std::collections::HashMap::from([(
                "csi.coreblk.io/mkfs-options".to_owned(),
                "-m 0 -I 512 -E lazy_itable_init=0".to_owned(),
            )]),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let staging = env.staging("pv-mkfs");
    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage");
    let dev = env.exported(&id).await;
    let out = Command::new("dumpe2fs")
        .args(["-h", &dev])
        .output()
        .expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in dumpe2fs -h:\n{text}"))
    };
    assert_eq!(field("Reserved block count:"), "0");
    assert_eq!(field("Inode size:"), "512");
    env.unstage(&id, &staging).await;
    // Staged as xfs, the ext4 options are refused before anything happens.
    let (code, msg) = code_of(env.stage(&id, &staging, fs_cap("xfs")).await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(
        env.exported(&id).await.is_empty(),
        "exported after the refusal"
    );
    c.ok("mkfs-options of the class reach mkfs.ext4 (reserved blocks 0, inode size 512); staged as xfs they are refused before the export");
}

/// A generic ephemeral volume is a claim the pod owns: normal provisioning with the
/// claim's labels, stage, publish, unpublish, unstage, delete.
async fn generic_ephemeral(env: &mut Env, c: &mut Checks) {
    eprintln!("... create_volume pvc-generic (generic ephemeral)");
    let id = env
        .ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "pvc-generic".to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![fs_cap("ext4")],
            parameters: std::collections::HashMap::from([
                (
                    "csi.storage.k8s.io/pvc/name".to_owned(),
                    "web-0-scratch".to_owned(),
                ),
                (
                    "csi.storage.k8s.io/pvc/namespace".to_owned(),
                    "default".to_owned(),
                ),
            ]),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    let before = pool_allocated(env.daemon.clone()).await;
    let staging = env.staging("pv-generic");
    let target = env.target("web-0", "pv-generic");
    env.stage(&id, &staging, fs_cap("ext4"))
        .await
        .expect("stage");
    env.publish(&id, &staging, &target, fs_cap("ext4"), false)
        .await
        .expect("publish");
    write_synced(&format!("{target}/scratch"), &seeded(4 << 20, 5));
    assert_eq!(
        env.daemon_volume(&id).await.labels["csi.storage.k8s.io/pvc/name"],
        "web-0-scratch"
    );
    env.unpublish(&id, &target).await;
    env.unstage(&id, &staging).await;
    env.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    let d = env.daemon.clone();
    eventually("the generic ephemeral volume's space returns", || {
        let d = d.clone();
        async move { pool_allocated(d).await <= before }
    })
    .await;
    c.ok("a generic ephemeral volume (a claim with its PVC labels): create, stage, publish, write, unpublish, unstage, delete; its space returns");
}

fn inline(volume_id: &str, target: &str, size: &str) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_owned(),
        volume_capability: Some(fs_cap("ext4")),
        volume_context: std::collections::HashMap::from([
            ("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned()),
            (
                "csi.storage.k8s.io/pod.name".to_owned(),
                "pod-eph".to_owned(),
            ),
            (
                "csi.storage.k8s.io/pod.namespace".to_owned(),
                "default".to_owned(),
            ),
            ("size".to_owned(), size.to_owned()),
        ]),
        ..Default::default()
    }
}

async fn ephemeral(
    env: &mut Env,
    c: &mut Checks,
    dir: &Path,
    device: &str,
    slot: &mut Option<Daemon>,
    args: &[&str],
) {
    let before = pool_allocated(env.daemon.clone()).await;
    let eph = format!("csi-{}", "1e".repeat(32));
    let target = env.target("pod-eph", "scratch");
    eprintln!("... node_publish_volume {eph} (ephemeral)");
    env.node
        .node_publish_volume(inline(&eph, &target, "64Mi"))
        .await
        .expect("publish ephemeral");
    assert_eq!(mount_at(Path::new(&target)).expect("mounted").0, "ext4");
    write_synced(&format!("{target}/data"), &seeded(8 << 20, 9));
    let v = pb::volumes_client::VolumesClient::new(env.daemon.clone())
        .get_volume(pb::GetVolumeRequest {
            volume: format!("eph-{eph}"),
        })
        .await
        .expect("the ephemeral volume")
        .into_inner();
    assert_eq!(v.size_bytes, 64 << 20);
    assert_eq!(v.labels["csi.coreblk.io/ephemeral"], eph);
    assert!(pool_allocated(env.daemon.clone()).await >= before + (8 << 20));
    env.node
        .node_publish_volume(inline(&eph, &target, "64Mi"))
        .await
        .expect("publish ephemeral again");
    assert_eq!(mounts_at(Path::new(&target)), 1);
    let stats = env.stats(&eph, &target).await;
    assert!(
        stats.volume_condition.as_ref().is_some_and(|v| !v.abnormal),
        "{stats:?}"
    );
    assert_eq!(stats.usage[0].total, df(Path::new(&target)).0[0]);
    c.ok("an ephemeral inline volume: publish makes, formats and mounts it in one step (64Mi, labelled); publish again changes nothing; stats by kubelet's ID match df");
    env.unpublish(&eph, &target).await;
    assert_eq!(mounts_at(Path::new(&target)), 0);
    assert!(!volume_exists(env.daemon.clone(), &format!("eph-{eph}")).await);
    let d = env.daemon.clone();
    eventually("the ephemeral volume's space returns", || {
        let d = d.clone();
        async move { pool_allocated(d).await <= before }
    })
    .await;
    env.unpublish(&eph, &target).await;
    c.ok("unpublish unmounts and deletes the ephemeral volume; its space returns to the pool; unpublish twice");

    // The daemon killed (-9) between publish and unpublish: the new daemon takes the
    // export back, the unpublish deletes the volume, nothing is left.
    let eph2 = format!("csi-{}", "2e".repeat(32));
    let target2 = env.target("pod-eph2", "scratch");
    env.node
        .node_publish_volume(inline(&eph2, &target2, "32Mi"))
        .await
        .expect("publish ephemeral 2");
    write_synced(&format!("{target2}/data"), &seeded(4 << 20, 10));
    let old = slot.take().expect("daemon");
    let _ = old.stop_with(libc::SIGKILL);
    *slot = Some(start_daemon(dir, device));
    env.daemon = slot.as_ref().expect("daemon").channel().await;
    assert_eq!(
        std::fs::read(format!("{target2}/data")).expect("read after the daemon restart"),
        seeded(4 << 20, 10)
    );
    env.unpublish(&eph2, &target2).await;
    assert!(!volume_exists(env.daemon.clone(), &format!("eph-{eph2}")).await);
    let d = env.daemon.clone();
    eventually("the space returns after the daemon restart", || {
        let d = d.clone();
        async move { pool_allocated(d).await <= before }
    })
    .await;
    c.ok("coreblkd killed (-9) between publish and unpublish: the data reads back from the new daemon, unpublish deletes the volume, no orphan, the space returns");

    // A node reboot's view: the target is no longer mounted and the plugin restarts;
    // its start-up sweep removes the orphan.
    let eph3 = format!("csi-{}", "3e".repeat(32));
    let target3 = env.target("pod-eph3", "scratch");
    env.node
        .node_publish_volume(inline(&eph3, &target3, "32Mi"))
        .await
        .expect("publish ephemeral 3");
    let uuid3 = pb::volumes_client::VolumesClient::new(env.daemon.clone())
        .get_volume(pb::GetVolumeRequest {
            volume: format!("eph-{eph3}"),
        })
        .await
        .expect("the third ephemeral volume")
        .into_inner()
        .uuid;
    assert!(!env.exported(&format!("x:{uuid3}")).await.is_empty());
    assert!(Command::new("umount")
        .arg(&target3)
        .status()
        .expect("umount")
        .success());
    let daemon = slot.as_ref().expect("daemon");
    let next = Csi::node_with(dir, "csi-next", daemon, NODE, args);
    let _ = next.channel().await;
    let d = env.daemon.clone();
    let name3 = format!("eph-{eph3}");
    eventually("the start-up sweep removes the orphan", || {
        let (d, n) = (d.clone(), name3.clone());
        async move { !volume_exists(d, &n).await }
    })
    .await;
    assert!(next
        .log_text()
        .contains("orphaned ephemeral volume removed"));
    assert!(env.exported(&format!("x:{uuid3}")).await.is_empty());
    let d = env.daemon.clone();
    eventually("the orphan's space returns", || {
        let d = d.clone();
        async move { pool_allocated(d).await <= before }
    })
    .await;
    c.ok("an ephemeral volume whose target is no longer mounted (a node reboot) is found and removed by the next plugin's start-up sweep (unexported, deleted, space returned)");
}
