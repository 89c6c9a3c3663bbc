//! The StorageClass parameters that reach the node (issue 15), on the host: a real
//! `coreblkd` and a real `coreblk-csi --mode node`, CSI gRPC over the driver's socket.
//! The host has no ublk, so this covers what needs no export: `csi.coreblk.io/mkfs-options`
//! checked against the filesystem's allow-list at CreateVolume (INVALID_ARGUMENT naming
//! the option) and kept as a volume label, and refused again by NodeStageVolume before
//! anything is exported when the staged filesystem does not take it;
//! `csi.coreblk.io/encryption` kept as a label, inherited by snapshots, restores and
//! clones whatever their class says, refused for a clone of a plain source, and a
//! missing passphrase refused at stage; ephemeral inline volumes refused with a clear
//! error for bad attributes, and an unpublish of one that is gone succeeding. Mounts,
//! LUKS2 and ephemeral volumes end to end run in the VM (`csi_node_vm.rs`).

mod common;

use std::collections::HashMap;

use common::{rt, workdir, Csi, Daemon};
use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, MountVolume};
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const MIB: i64 = 1 << 20;
const MKFS: &str = "csi.coreblk.io/mkfs-options";
const ENC: &str = "csi.coreblk.io/encryption";

type Ctl = csi::controller_client::ControllerClient<Channel>;
type NodeClient = csi::node_client::NodeClient<Channel>;

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

fn req(name: &str, fs: &str, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 4 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(fs)],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn source(snapshot: Option<&str>, volume: Option<&str>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = match (snapshot, volume) {
        (Some(s), _) => Type::Snapshot(SnapshotSource {
            snapshot_id: s.to_owned(),
        }),
        (None, Some(v)) => Type::Volume(VolumeSource {
            volume_id: v.to_owned(),
        }),
        (None, None) => return None,
    };
    Some(csi::VolumeContentSource { r#type: Some(t) })
}

fn failed<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(ok) => panic!("expected an error, got {:?}", ok.into_inner()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn create(ctl: &mut Ctl, r: csi::CreateVolumeRequest) -> String {
    let name = r.name.clone();
    ctl.create_volume(r)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("volume")
        .volume_id
}

async fn labels(daemon: Channel, name: &str) -> HashMap<String, String> {
    pb::volumes_client::VolumesClient::new(daemon)
        .get_volume(pb::GetVolumeRequest {
            volume: name.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("GetVolume {name}: {e}"))
        .into_inner()
        .labels
}

async fn exports(daemon: Channel) -> usize {
    pb::exports_client::ExportsClient::new(daemon)
        .list_exports(pb::ListExportsRequest::default())
        .await
        .expect("ListExports")
        .into_inner()
        .exports
        .len()
}

#[test]
fn mkfs_options_are_checked_per_filesystem_and_kept_as_a_label() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    rt().block_on(async {
        let dch = daemon.channel().await;
        let ch = plugin.channel().await;
        let mut ctl = Ctl::new(ch.clone());
        let mut node = NodeClient::new(ch);

        // Allowed for the filesystem: kept verbatim as the volume's label.
        let opts = "-b 4096 -m 0 -E lazy_itable_init=0";
        let id = create(&mut ctl, req("ext4-opts", "ext4", &[(MKFS, opts)])).await;
        assert_eq!(labels(dch.clone(), "ext4-opts").await[MKFS], opts);
        create(
            &mut ctl,
            req(
                "xfs-opts",
                "xfs",
                &[(MKFS, "-m crc=1,reflink=1 -i size=512")],
            ),
        )
        .await;
        // No filesystem named anywhere: ext4 (what NodeStageVolume makes then).
        create(&mut ctl, req("default-fs", "", &[(MKFS, "-m 1")])).await;

        // Refused, naming the option and what is allowed; nothing is made.
        for (name, fs, opts, says) in [
            ("bad-1", "ext4", "-E discard", "\"discard\""),
            (
                "bad-2",
                "ext4",
                "-d /etc",
                "allowed: -b -i -I -m -N -J -E -O -T",
            ),
            ("bad-3", "xfs", "-b 4096", "-b takes size"),
            ("bad-4", "xfs", "-E nodiscard", "\"-E\""),
            ("bad-5", "ext4", "-m crc=1", "whole number"),
            ("bad-6", "", "-K", "ext4 option \"-K\""),
        ] {
            let (code, msg) = failed(ctl.create_volume(req(name, fs, &[(MKFS, opts)])).await);
            assert_eq!(code, Code::InvalidArgument, "{opts}: {msg}");
            assert!(msg.contains(says) && msg.contains(MKFS), "{opts}: {msg}");
            let gone = pb::volumes_client::VolumesClient::new(dch.clone())
                .get_volume(pb::GetVolumeRequest {
                    volume: name.to_owned(),
                })
                .await;
            assert_eq!(gone.map(|_| ()).map_err(|s| s.code()), Err(Code::NotFound));
        }
        // The labels parameter cannot set the driver's own keys.
        let (code, msg) = failed(
            ctl.create_volume(req(
                "sneaky",
                "ext4",
                &[("labels", "csi.coreblk.io/mkfs-options=-L x")],
            ))
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("reserved"), "{msg}");

        // Defence at stage: ext4 options on a volume staged as xfs are refused before
        // anything is exported (the host has no ublk: an export would fail otherwise).
        let staging = format!("{k}/plugins/kubernetes.io/csi/csi.coreblk.io/pv1/globalmount");
        let (code, msg) = failed(
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging,
                volume_capability: Some(mount_cap("xfs")),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(
            msg.contains("xfs option -b \"4096\"") && msg.contains(&id),
            "{msg}"
        );
        assert_eq!(exports(dch.clone()).await, 0, "nothing was exported");
    });
}

#[test]
fn encryption_is_a_label_inherited_by_snapshots_restores_and_clones() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    rt().block_on(async {
        let dch = daemon.channel().await;
        let ch = plugin.channel().await;
        let mut ctl = Ctl::new(ch.clone());
        let mut node = NodeClient::new(ch);

        let (code, msg) = failed(
            ctl.create_volume(req("enc-bad", "ext4", &[(ENC, "aes")]))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("luks2"), "{msg}");

        let enc = create(&mut ctl, req("enc", "ext4", &[(ENC, "luks2")])).await;
        let plain = create(&mut ctl, req("plain", "ext4", &[])).await;
        assert_eq!(labels(dch.clone(), "enc").await[ENC], "luks2");
        assert!(!labels(dch.clone(), "plain").await.contains_key(ENC));

        let snap = ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: enc.clone(),
                name: "enc-snap".to_owned(),
                ..Default::default()
            })
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        let s = pb::snapshots_client::SnapshotsClient::new(dch.clone())
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot: "enc-snap".to_owned(),
            })
            .await
            .expect("GetSnapshot")
            .into_inner();
        assert_eq!(s.labels.get(ENC).map(String::as_str), Some("luks2"));

        // A restore and a clone through a class without encryption are encrypted too.
        let mut r = req("restored", "ext4", &[]);
        r.volume_content_source = source(Some(&snap.snapshot_id), None);
        create(&mut ctl, r).await;
        assert_eq!(labels(dch.clone(), "restored").await[ENC], "luks2");
        let mut r = req("cloned", "ext4", &[]);
        r.volume_content_source = source(None, Some(&enc));
        create(&mut ctl, r).await;
        assert_eq!(labels(dch.clone(), "cloned").await[ENC], "luks2");
        // A snapshot's restore stays encrypted after its origin is deleted.
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: enc.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
        let mut r = req("restored-2", "ext4", &[]);
        r.volume_content_source = source(Some(&snap.snapshot_id), None);
        create(&mut ctl, r).await;
        assert_eq!(labels(dch.clone(), "restored-2").await[ENC], "luks2");

        // An encrypted class cannot clone a plain volume.
        let mut r = req("enc-of-plain", "ext4", &[(ENC, "luks2")]);
        r.volume_content_source = source(None, Some(&plain));
        let (code, msg) = failed(ctl.create_volume(r).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("not encrypted"), "{msg}");

        // Staging an encrypted volume without the passphrase: refused before the export.
        let restored = format!(
            "vol:{NODE}:{}",
            pb::volumes_client::VolumesClient::new(dch.clone())
                .get_volume(pb::GetVolumeRequest {
                    volume: "restored".to_owned(),
                })
                .await
                .expect("GetVolume")
                .into_inner()
                .uuid
        );
        let staging = format!("{k}/plugins/kubernetes.io/csi/csi.coreblk.io/pv2/globalmount");
        for secrets in [
            HashMap::new(),
            HashMap::from([("passphrase".to_owned(), String::new())]),
        ] {
            let (code, msg) = failed(
                node.node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: restored.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(mount_cap("ext4")),
                    secrets,
                    ..Default::default()
                })
                .await,
            );
            assert_eq!(code, Code::InvalidArgument, "{msg}");
            assert!(
                msg.contains("passphrase") && msg.contains("node-stage-secret"),
                "{msg}"
            );
        }
        assert_eq!(exports(dch.clone()).await, 0, "nothing was exported");
    });
}

fn inline_publish(
    volume_id: &str,
    target: &str,
    cap: csi::VolumeCapability,
    attrs: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    context.insert("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned());
    context.insert("csi.storage.k8s.io/pod.name".to_owned(), "web-0".to_owned());
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_owned(),
        volume_capability: Some(cap),
        volume_context: context,
        ..Default::default()
    }
}

async fn volume_names(daemon: Channel) -> Vec<String> {
    let mut names: Vec<String> = pb::volumes_client::VolumesClient::new(daemon)
        .list_volumes(pb::ListVolumesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListVolumes")
        .into_inner()
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    names.sort();
    names
}

#[test]
fn ephemeral_inline_volumes_are_checked_cleaned_up_and_swept() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let kubelet = dir.path().join("kubelet");
    std::fs::create_dir_all(&kubelet).expect("mkdir");
    let k = kubelet.to_str().expect("utf-8").to_owned();
    let plugin = Csi::node_with(dir.path(), "csi", &daemon, NODE, &["--kubelet-dir", &k]);
    let eph = format!("csi-{}", "0f".repeat(32));
    let target = format!("{k}/pods/p1/volumes/kubernetes.io~csi/scratch/mount");
    rt().block_on(async {
        let dch = daemon.channel().await;
        let mut node = NodeClient::new(plugin.channel().await);

        // Bad attributes and modes: INVALID_ARGUMENT, nothing made.
        let block = csi::VolumeCapability {
            access_type: Some(AccessType::Block(csi::volume_capability::BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
        };
        for (r, says) in [
            (
                inline_publish(&eph, &target, mount_cap("ext4"), &[("size", "big")]),
                "not a size",
            ),
            (
                inline_publish(&eph, &target, mount_cap("ext4"), &[("colour", "red")]),
                "unknown volume attribute \"colour\"",
            ),
            (
                inline_publish(&eph, &target, mount_cap("ext4"), &[(ENC, "luks2")]),
                "not encrypted",
            ),
            (
                inline_publish(&eph, &target, mount_cap("ext4"), &[("fsType", "xfs")]),
                "give one",
            ),
            (
                inline_publish(&eph, &target, mount_cap("xfs"), &[(MKFS, "-E nodiscard")]),
                "xfs option \"-E\"",
            ),
            (
                inline_publish(&eph, &target, block, &[]),
                "generic ephemeral volume",
            ),
            (
                inline_publish("csi/../x", &target, mount_cap("ext4"), &[]),
                "volume_id",
            ),
            (
                inline_publish(&eph, "/etc/x", mount_cap("ext4"), &[]),
                "kubelet directory",
            ),
            (
                inline_publish(&eph, &target, mount_cap("ext4"), &[("pool", "nope")]),
                "\"nope\"",
            ),
        ] {
            let (code, msg) = failed(node.node_publish_volume(r).await);
            assert_eq!(code, Code::InvalidArgument, "{msg}");
            assert!(msg.contains(says), "{says}: {msg}");
        }
        assert!(volume_names(dch.clone()).await.is_empty());

        // A publish that fails after the create (no ublk on the host: the export fails)
        // deletes what it made.
        let (code, msg) = failed(
            node.node_publish_volume(inline_publish(
                &eph,
                &target,
                mount_cap("ext4"),
                &[("size", "8Mi")],
            ))
            .await,
        );
        assert_ne!(code, Code::Ok, "{msg}");
        assert!(
            volume_names(dch.clone()).await.is_empty(),
            "left behind after: {msg}\n{}",
            plugin.log_text()
        );

        // Unpublish of an ephemeral volume that is gone: OK, twice.
        for _ in 0..2 {
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: eph.clone(),
                target_path: target.clone(),
            })
            .await
            .expect("NodeUnpublishVolume of a gone ephemeral volume");
        }

        // Orphans: ephemeral volumes as a plugin that crashed between create and mount
        // left them (target not mounted), and one named like an ephemeral volume that is
        // not labelled one (kept). A new plugin removes the orphans at start-up.
        let vols = pb::volumes_client::VolumesClient::new(dch.clone());
        for (name, id) in [
            ("eph-csi-a", Some("csi-a")),
            ("eph-csi-b", Some("csi-b")),
            ("eph-csi-c", None),
        ] {
            let mut labels = HashMap::new();
            if let Some(id) = id {
                labels.insert("csi.coreblk.io/ephemeral".to_owned(), id.to_owned());
                labels.insert(
                    "csi.coreblk.io/ephemeral-target".to_owned(),
                    format!("{k}/pods/gone/volumes/kubernetes.io~csi/{id}/mount"),
                );
            }
            vols.clone()
                .create_volume(pb::CreateVolumeRequest {
                    pool: "default".to_owned(),
                    name: name.to_owned(),
                    size_bytes: 4 << 20,
                    labels,
                    ..Default::default()
                })
                .await
                .expect("CreateVolume");
        }
        // Unpublish of the unlabelled one leaves it (not an ephemeral volume of that ID).
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: "csi-c".to_owned(),
            target_path: target.clone(),
        })
        .await
        .expect("NodeUnpublishVolume");
        assert_eq!(
            volume_names(dch.clone()).await,
            ["eph-csi-a", "eph-csi-b", "eph-csi-c"]
        );
    });
    let restarted = Csi::node_with(dir.path(), "csi-2", &daemon, NODE, &["--kubelet-dir", &k]);
    rt().block_on(async {
        let dch = daemon.channel().await;
        let _ = restarted.channel().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while volume_names(dch.clone()).await != ["eph-csi-c"] {
            assert!(
                std::time::Instant::now() < deadline,
                "orphans not swept: {:?}\n{}",
                volume_names(dch.clone()).await,
                restarted.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(restarted
            .log_text()
            .contains("orphaned ephemeral volume removed"));
    });
}
