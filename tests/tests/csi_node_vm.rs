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
//! outside the kubelet directory refused.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
        self.ctl
            .create_volume(csi::CreateVolumeRequest {
                name: name.to_owned(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![fs_cap("ext4")],
                volume_content_source: source.map(|id| csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Volume(
                        csi::volume_content_source::VolumeSource {
                            volume_id: id.to_owned(),
                        },
                    )),
                }),
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
    let daemon = start_daemon(dir.path(), &device);
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    let plugin2 = Csi::node_with(dir.path(), "csi2", &daemon, NODE, &["--kubelet-dir", &k]);
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
            };
            ext4(&mut env, &mut checks).await;
            block(&mut env, &mut checks).await;
            xfs(&mut env, &mut checks).await;
        });
    }));
    eprintln!("{} checks passed", checks.0);
    if let Err(e) = result {
        // Unmount what the test left while the daemon still serves it: killed with its
        // devices mounted, their IO (and the guest's shutdown) would wait forever.
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
