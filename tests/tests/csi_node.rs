//! The CSI Node service on the host, as kubelet drives it: a real `coreblkd` and a real
//! `coreblk-csi --mode node --kubelet-dir <temp>`, CSI gRPC over the driver's socket. The
//! host has no ublk, so this covers what needs no export: capabilities, request and path
//! checks (relative, `..`, outside the kubelet directory, a symlink out of it — refused
//! before anything is made or mounted), another node's IDs, the codes for a volume that is
//! not staged, idempotent unpublish/unstage of paths already gone, stats of a path that
//! is not mounted, and the daemon-side growth of NodeExpandVolume. Staging, mounts,
//! filesystems and online expansion run in the VM: `scripts/vm/guest/csi-node-test`.

mod common;

use std::path::Path;

use common::{rt, workdir, Csi, Daemon};
use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const MIB: i64 = 1 << 20;

fn mount_cap(fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

fn failed<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(ok) => panic!("expected an error, got {:?}", ok.into_inner()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

fn mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = path.to_str().expect("utf-8");
    table
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}

async fn create(ch: Channel, name: &str, bytes: i64) -> String {
    csi::controller_client::ControllerClient::new(ch)
        .create_volume(csi::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap("ext4")],
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

#[test]
fn node_requests_are_checked_before_anything_is_mounted() {
    let dir = workdir();
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(kubelet.join("pods")).expect("mkdir");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::os::unix::fs::symlink(&outside, kubelet.join("pods/escape")).expect("symlink");
    let daemon = Daemon::start(dir.path());
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    rt().block_on(async {
        let ch = plugin.channel().await;
        let mut node = csi::node_client::NodeClient::new(ch.clone());

        use csi::node_service_capability::rpc::Type as N;
        let caps: Vec<i32> = node
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner()
            .capabilities
            .iter()
            .filter_map(|c| {
                let csi::node_service_capability::Type::Rpc(r) = c.r#type.as_ref()?;
                Some(r.r#type)
            })
            .collect();
        for want in [
            N::StageUnstageVolume,
            N::GetVolumeStats,
            N::ExpandVolume,
            N::VolumeCondition,
            N::SingleNodeMultiWriter,
        ] {
            assert!(caps.contains(&(want as i32)), "{want:?} missing: {caps:?}");
        }

        let id = create(ch.clone(), "pvc-node-1", 64 * MIB).await;
        let staging = format!("{k}/plugins/csi.coreblk.io/pv1/globalmount");
        let stage = |volume_id: &str, path: &str, cap: Option<csi::VolumeCapability>| {
            csi::NodeStageVolumeRequest {
                volume_id: volume_id.to_owned(),
                staging_target_path: path.to_owned(),
                volume_capability: cap,
                ..Default::default()
            }
        };

        // Paths: refused with INVALID_ARGUMENT, and nothing made there.
        let escape = format!("{k}/pods/escape/globalmount");
        let out = outside.join("x");
        for (path, why) in [
            ("plugins/pv1/globalmount", "absolute"),
            (&*format!("{k}/plugins/../../etc"), "'..'"),
            ("/etc/coreblk-test", "not under the kubelet directory"),
            (
                out.to_str().expect("utf-8"),
                "not under the kubelet directory",
            ),
            (&*escape, "resolved to"),
            (&*k, "not under the kubelet directory"),
        ] {
            let (code, msg) = failed(
                node.node_stage_volume(stage(&id, path, Some(mount_cap("ext4"))))
                    .await,
            );
            assert_eq!(code, Code::InvalidArgument, "{path}: {msg}");
            assert!(msg.contains(why), "{path}: {msg}");
            assert!(!mounted(Path::new(path)), "{path} was mounted");
        }
        assert!(
            !outside.join("globalmount").exists(),
            "made through the link"
        );
        assert!(!outside.join("x").exists());

        // Missing fields and unsupported capabilities.
        let (code, _) = failed(
            node.node_stage_volume(stage("", &staging, Some(mount_cap("ext4"))))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);
        let (code, msg) = failed(node.node_stage_volume(stage(&id, &staging, None)).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.contains("volume_capability"), "{msg}");
        let (code, _) = failed(
            node.node_stage_volume(stage(&id, &staging, Some(mount_cap("btrfs"))))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);
        let mut multi = mount_cap("ext4");
        multi.access_mode = Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter.into(),
        });
        let (code, _) = failed(
            node.node_stage_volume(stage(&id, &staging, Some(multi)))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // IDs: another node's names that node; a well-formed unknown one is NOT_FOUND.
        let uuid = id.rsplit(':').next().expect("uuid");
        let theirs = format!("vol:node-b:{uuid}");
        let (code, msg) = failed(
            node.node_stage_volume(stage(&theirs, &staging, Some(mount_cap("ext4"))))
                .await,
        );
        assert_eq!(code, Code::NotFound, "{msg}");
        assert!(msg.contains("node-b"), "{msg}");
        let unknown = format!("vol:{NODE}:00000000-0000-4000-8000-000000000000");
        let (code, msg) = failed(
            node.node_stage_volume(stage(&unknown, &staging, Some(mount_cap("ext4"))))
                .await,
        );
        assert_eq!(code, Code::NotFound, "{msg}");
        assert!(
            !Path::new(&staging).exists(),
            "staging made for an unknown volume"
        );

        // Publish of a volume that is not staged (not exported): FAILED_PRECONDITION.
        let target = format!("{k}/pods/p1/volumes/kubernetes.io~csi/pv1/mount");
        for cap in [mount_cap("ext4"), block_cap()] {
            let (code, msg) = failed(
                node.node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.clone(),
                    target_path: target.clone(),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await,
            );
            assert_eq!(code, Code::FailedPrecondition, "{msg}");
            assert!(msg.contains("NodeStageVolume"), "{msg}");
        }
        let (code, _) = failed(
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                target_path: "/tmp/coreblk-test-target".to_owned(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // Unpublish and unstage of paths already gone: OK, twice.
        for _ in 0..2 {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            })
            .await
            .expect("NodeUnpublishVolume of a gone path");
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
            .expect("NodeUnstageVolume of a volume not staged");
        }
        let (code, _) = failed(
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: "/etc".to_owned(),
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // Stats: an unknown path is NOT_FOUND; a directory with nothing mounted is
        // reported abnormal.
        let (code, _) = failed(
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: format!("{k}/pods/none/mount"),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::NotFound);
        let plain = format!("{k}/pods/p2/mount");
        std::fs::create_dir_all(&plain).expect("mkdir");
        let stats = node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: plain.clone(),
                ..Default::default()
            })
            .await
            .expect("NodeGetVolumeStats")
            .into_inner();
        let cond = stats.volume_condition.expect("a condition");
        assert!(cond.abnormal, "{cond:?}");
        assert!(cond.message.contains("not mounted"), "{}", cond.message);

        // Expansion grows the volume in the daemon first (the central resizer cannot),
        // then needs the volume staged for its filesystem.
        let (code, msg) = failed(
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: plain.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 96 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        let v = pb::volumes_client::VolumesClient::new(daemon.channel().await)
            .get_volume(pb::GetVolumeRequest {
                volume: uuid.to_owned(),
            })
            .await
            .expect("GetVolume")
            .into_inner();
        assert_eq!(v.size_bytes, 96 << 20);

        // Stage of a real volume reaches the daemon's export, which the host cannot make
        // (no ublk): the daemon's code, and nothing mounted.
        if Path::new("/dev/ublk-control").exists() {
            eprintln!("SKIPPED: the refused export needs a host without ublk (the VM test stages)");
        } else {
            let (code, msg) = failed(
                node.node_stage_volume(stage(&id, &staging, Some(mount_cap("ext4"))))
                    .await,
            );
            assert_ne!(code, Code::Ok);
            assert!(msg.starts_with("NodeStageVolume: coreblkd"), "{msg}");
        }
        assert!(!mounted(Path::new(&staging)));
    });
}
