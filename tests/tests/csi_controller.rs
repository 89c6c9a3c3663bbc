//! The CSI driver's Identity and Controller services end to end, as the sidecars drive
//! them: a real `coreblkd` (the shared harness) and a real `coreblk-csi` on temp sockets,
//! CSI gRPC over the driver's unix socket, data checked through the daemon's image API
//! (the host has no ublk). Covers each RPC's success path and its documented error codes,
//! idempotency (the same call twice), clones from snapshots and volumes with their bytes,
//! a deleted volume's snapshot that still restores, capacity that shrinks as volumes are
//! made and RESOURCE_EXHAUSTED past it, pagination, and IDs of another node's volumes.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::{rt, seeded, wait_for, workdir, Csi, Daemon, START_DEADLINE, STOP_DEADLINE};
use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const TOPOLOGY_KEY: &str = "topology.coreblk.io/node";
const MIB: i64 = 1 << 20;

type Ctl = csi::controller_client::ControllerClient<Channel>;

fn cap(mode: Mode, fs: Option<&str>) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_type: Some(match fs {
            None => AccessType::Block(BlockVolume {}),
            Some(f) => AccessType::Mount(MountVolume {
                fs_type: f.to_owned(),
                ..Default::default()
            }),
        }),
        access_mode: Some(AccessMode { mode: mode.into() }),
    }
}

fn create_req(name: &str, required: i64, limit: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter, Some("ext4"))],
        ..Default::default()
    }
}

fn from_snapshot(name: &str, snapshot_id: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snapshot_id.to_owned(),
                },
            )),
        }),
        ..create_req(name, 0, 0)
    }
}

fn from_volume(name: &str, volume_id: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: volume_id.to_owned(),
                },
            )),
        }),
        ..create_req(name, 0, 0)
    }
}

async fn create(ctl: &mut Ctl, req: csi::CreateVolumeRequest) -> csi::Volume {
    let name = req.name.clone();
    ctl.create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("a volume")
}

/// The code of a call that must fail, and its message.
fn failed<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(ok) => panic!("expected an error, got {:?}", ok.into_inner()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn capacity(ctl: &mut Ctl, params: &[(&str, &str)]) -> i64 {
    let r = ctl
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![cap(Mode::SingleNodeWriter, None)],
            parameters: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), NODE.to_owned())]),
            }),
        })
        .await
        .expect("GetCapacity")
        .into_inner();
    assert_eq!(
        r.maximum_volume_size,
        Some(r.available_capacity),
        "maximum_volume_size must equal available_capacity"
    );
    r.available_capacity
}

/// Writes `data` at offset 0 of the daemon volume `name` (image import with overwrite).
async fn write_volume(daemon: Channel, name: &str, data: &[u8]) {
    let mut msgs = vec![pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            volume_name: name.to_owned(),
            overwrite: true,
            ..Default::default()
        })),
    }];
    // Chunks of 1 MiB (a chunk holds at most 4 MiB).
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        msgs.push(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                offset_bytes: u64::try_from(i).expect("fits") << 20,
                data: piece.to_vec(),
                zero: false,
                length_bytes: 0,
            })),
        });
    }
    msgs.push(pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
            expected_size_bytes: 0,
        })),
    });
    let mut responses = pb::images_client::ImagesClient::new(daemon)
        .max_encoding_message_size(coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES)
        .import_image(tokio_stream::iter(msgs))
        .await
        .expect("import starts")
        .into_inner();
    let mut finished = false;
    while let Some(m) = responses.message().await.expect("import runs") {
        finished |= matches!(m.msg, Some(pb::import_image_response::Msg::Finished(_)));
    }
    assert!(finished, "the write to {name} did not finish");
}

/// The first `len` bytes of the daemon volume `name` (holes read as zeroes).
async fn read_volume(daemon: Channel, name: &str, len: usize) -> Vec<u8> {
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
    let mut out = vec![0u8; len];
    while let Some(m) = stream.message().await.expect("export runs") {
        if let Some(pb::export_image_response::Msg::Chunk(c)) = m.msg {
            let at = usize::try_from(c.offset_bytes).expect("fits");
            if at >= len || c.zero {
                continue;
            }
            let n = c.data.len().min(len - at);
            out[at..at + n].copy_from_slice(&c.data[..n]);
        }
    }
    out
}

async fn daemon_volume(daemon: Channel, name: &str) -> pb::Volume {
    pb::volumes_client::VolumesClient::new(daemon)
        .get_volume(pb::GetVolumeRequest {
            volume: name.to_owned(),
        })
        .await
        .expect("GetVolume")
        .into_inner()
}

#[test]
fn identity_probe_node_info_and_the_central_controller() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    let central = Csi::start(dir.path(), "central", &["--mode", "controller"]);
    rt().block_on(async {
        let ch = plugin.channel().await;
        let mut id = csi::identity_client::IdentityClient::new(ch.clone());
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner();
        assert_eq!(info.name, "csi.coreblk.io");
        assert!(!info.vendor_version.is_empty());
        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner();
        let services: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        use csi::plugin_capability::service::Type as S;
        assert!(
            services.contains(&(S::ControllerService as i32)),
            "{caps:?}"
        );
        assert!(
            services.contains(&(S::VolumeAccessibilityConstraints as i32)),
            "{caps:?}"
        );
        let probe = id.probe(csi::ProbeRequest {}).await.expect("Probe");
        assert_eq!(probe.into_inner().ready, Some(true));

        let mut node = csi::node_client::NodeClient::new(ch.clone());
        let ni = node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        assert_eq!(ni.node_id, NODE);
        let topo = ni.accessible_topology.expect("topology");
        assert_eq!(
            topo.segments.get(TOPOLOGY_KEY).map(String::as_str),
            Some(NODE)
        );
        // The Node service's own calls: tests/tests/csi_node.rs and the VM test.
        let (code, _) = failed(
            node.node_stage_volume(csi::NodeStageVolumeRequest::default())
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // The node plugin's controller offers no EXPAND_VOLUME and no publish.
        use csi::controller_service_capability::rpc::Type as C;
        let ctl_caps = |caps: csi::ControllerGetCapabilitiesResponse| -> Vec<i32> {
            caps.capabilities
                .iter()
                .filter_map(|c| {
                    let csi::controller_service_capability::Type::Rpc(r) = c.r#type.as_ref()?;
                    Some(r.r#type)
                })
                .collect()
        };
        let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
        let have = ctl_caps(
            ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await
                .expect("caps")
                .into_inner(),
        );
        for want in [
            C::CreateDeleteVolume,
            C::ListVolumes,
            C::GetCapacity,
            C::CreateDeleteSnapshot,
            C::ListSnapshots,
            C::CloneVolume,
            C::GetVolume,
            C::VolumeCondition,
            C::SingleNodeMultiWriter,
        ] {
            assert!(
                have.contains(&(want as i32)),
                "missing {want:?} in {have:?}"
            );
        }
        assert!(!have.contains(&(C::ExpandVolume as i32)));
        assert!(!have.contains(&(C::PublishUnpublishVolume as i32)));

        // The central controller: ready without a daemon, capabilities without
        // EXPAND_VOLUME, and nothing else.
        let cch = central.channel().await;
        let probe = csi::identity_client::IdentityClient::new(cch.clone())
            .probe(csi::ProbeRequest {})
            .await
            .expect("central Probe");
        assert_eq!(probe.into_inner().ready, Some(true));
        let mut cctl = csi::controller_client::ControllerClient::new(cch.clone());
        let ccaps = ctl_caps(
            cctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
                .await
                .expect("central caps")
                .into_inner(),
        );
        assert!(ccaps.is_empty(), "{ccaps:?}");
        let (code, _) = failed(cctl.create_volume(create_req("x", MIB, 0)).await);
        assert_eq!(code, Code::Unimplemented);
        // ... and EXPAND_VOLUME in its Node capabilities: csi-resizer then records the
        // new size and leaves the growing to NodeExpandVolume on the owning node (without
        // this answer it exits at start). Every other node call says where to go.
        let mut cnode = csi::node_client::NodeClient::new(cch);
        let ncaps = cnode
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .expect("central node caps")
            .into_inner();
        use csi::node_service_capability::rpc::Type as N;
        let ntypes: Vec<i32> = ncaps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        assert_eq!(ntypes, vec![N::ExpandVolume as i32], "{ncaps:?}");
        let (code, msg) = failed(
            cnode
                .node_expand_volume(csi::NodeExpandVolumeRequest::default())
                .await,
        );
        assert_eq!(code, Code::Unimplemented);
        assert!(msg.contains("node plugin"), "{msg}");
    });

    // A second instance on the same socket is refused; the first keeps serving.
    let out = Command::new(coreblk_tests::bin("coreblk-csi"))
        .args(["--mode", "controller", "--endpoint"])
        .arg(&central.socket)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::os::unix::net::UnixStream::connect(&central.socket).is_ok());

    // The daemon goes away: Probe says not ready (and does not fail), calls say UNAVAILABLE.
    let status = daemon.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    rt().block_on(async {
        let ch = plugin.channel().await;
        let probe = csi::identity_client::IdentityClient::new(ch.clone())
            .probe(csi::ProbeRequest {})
            .await
            .expect("Probe with the daemon gone");
        assert_eq!(probe.into_inner().ready, Some(false));
        let (code, msg) = failed(
            csi::controller_client::ControllerClient::new(ch)
                .create_volume(create_req("x", MIB, 0))
                .await,
        );
        assert_eq!(code, Code::Unavailable, "{msg}");
        assert!(msg.contains("coreblkd"), "{msg}");
    });

    // A new daemon on the same socket (an upgrade): the plugin reconnects by itself.
    let daemon = Daemon::start(dir.path());
    rt().block_on(async {
        let ch = plugin.channel().await;
        let end = std::time::Instant::now() + START_DEADLINE;
        loop {
            let probe = csi::identity_client::IdentityClient::new(ch.clone())
                .probe(csi::ProbeRequest {})
                .await
                .expect("Probe");
            if probe.into_inner().ready == Some(true) {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "not ready after a daemon restart"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        create(&mut Ctl::new(ch), create_req("after-restart", MIB, 0)).await;
    });
    drop(daemon);

    drop(central);
    let mut plugin = plugin;
    // SIGTERM stops it and removes its socket.
    let pid = libc::pid_t::try_from(plugin.child.id()).expect("pid");
    // SAFETY: kill takes plain integers; the pid is our own child, not yet reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let stopped = wait_for(STOP_DEADLINE, || {
        matches!(plugin.child.try_wait(), Ok(Some(_)))
    });
    assert!(stopped, "coreblk-csi did not stop:\n{}", plugin.log_text());
    assert!(!plugin.socket.exists(), "the socket stayed");
}

#[test]
fn volumes_create_delete_validate_get_list_with_their_error_codes() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    let other = Csi::node(dir.path(), "csi-b", &daemon, "node-b");
    rt().block_on(async {
        let dch = daemon.channel().await;
        let mut ctl = Ctl::new(plugin.channel().await);

        // Created, with the size rounded up to the pool's 64 KiB clusters, on this node,
        // PVC name and namespace kept as labels.
        let mut req = create_req("pvc-1", MIB + 1, 0);
        req.parameters = HashMap::from([
            ("csi.storage.k8s.io/pvc/name".to_owned(), "data".to_owned()),
            (
                "csi.storage.k8s.io/pvc/namespace".to_owned(),
                "db".to_owned(),
            ),
            ("labels".to_owned(), "team=storage".to_owned()),
        ]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), NODE.to_owned())]),
            }],
            preferred: vec![],
        });
        let v = create(&mut ctl, req.clone()).await;
        assert_eq!(v.capacity_bytes, MIB + (64 << 10));
        assert!(v.volume_id.starts_with("vol:node-a:"), "{}", v.volume_id);
        assert_eq!(v.accessible_topology.len(), 1);
        assert_eq!(v.accessible_topology[0].segments[TOPOLOGY_KEY], NODE);
        let dv = daemon_volume(dch.clone(), "pvc-1").await;
        assert_eq!(dv.labels["csi.storage.k8s.io/pvc/name"], "data");
        assert_eq!(dv.labels["csi.storage.k8s.io/pvc/namespace"], "db");
        assert_eq!(dv.labels["team"], "storage");
        assert!(!dv.thick);
        assert!(v.volume_id.ends_with(&dv.uuid));

        // The same call twice: the same volume.
        let again = create(&mut ctl, req.clone()).await;
        assert_eq!(again.volume_id, v.volume_id);
        assert_eq!(again.capacity_bytes, v.capacity_bytes);
        // A retry whose range the volume meets gets it too (the spec's compatibility).
        let mut smaller = req.clone();
        smaller.capacity_range = Some(csi::CapacityRange {
            required_bytes: MIB,
            limit_bytes: 2 * MIB,
        });
        assert_eq!(create(&mut ctl, smaller).await.volume_id, v.volume_id);
        // The same name with a size it does not meet, or another kind: ALREADY_EXISTS.
        let (code, msg) = failed(ctl.create_volume(create_req("pvc-1", 4 * MIB, 0)).await);
        assert_eq!(code, Code::AlreadyExists, "{msg}");
        let mut thick_retry = req.clone();
        thick_retry
            .parameters
            .insert("thick".to_owned(), "true".to_owned());
        let (code, msg) = failed(ctl.create_volume(thick_retry).await);
        assert_eq!(code, Code::AlreadyExists, "{msg}");

        // Thick: reserved.
        let mut thick = create_req("pvc-thick", 2 * MIB, 2 * MIB);
        thick.parameters = HashMap::from([("thick".to_owned(), "true".to_owned())]);
        let t = create(&mut ctl, thick).await;
        assert_eq!(t.capacity_bytes, 2 * MIB);
        assert!(daemon_volume(dch.clone(), "pvc-thick").await.thick);

        // Refusals, each with its code.
        let mut no_caps = create_req("x1", MIB, 0);
        no_caps.volume_capabilities.clear();
        let mut multi = create_req("x2", MIB, 0);
        multi.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, None)];
        let mut bad_param = create_req("x3", MIB, 0);
        bad_param.parameters = HashMap::from([("pol".to_owned(), "default".to_owned())]);
        let mut bad_pool = create_req("x4", MIB, 0);
        bad_pool.parameters = HashMap::from([("pool".to_owned(), "nosuch".to_owned())]);
        let mut bad_fs = create_req("x5", MIB, 0);
        bad_fs.volume_capabilities = vec![cap(Mode::SingleNodeWriter, Some("btrfs"))];
        let mut mutable = create_req("x10", MIB, 0);
        mutable.mutable_parameters = HashMap::from([("iops".to_owned(), "100".to_owned())]);
        let mut elsewhere = create_req("x6", MIB, 0);
        elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), "node-z".to_owned())]),
            }],
            preferred: vec![],
        });
        for (req, want, says) in [
            (create_req("", MIB, 0), Code::InvalidArgument, "name"),
            (no_caps, Code::InvalidArgument, "volume_capabilities"),
            (multi, Code::InvalidArgument, "MULTI_NODE_MULTI_WRITER"),
            (bad_param, Code::InvalidArgument, "unknown parameter"),
            (bad_pool, Code::InvalidArgument, "nosuch"),
            (bad_fs, Code::InvalidArgument, "btrfs"),
            (
                create_req("x7", 2 * MIB, MIB),
                Code::OutOfRange,
                "limit_bytes",
            ),
            (
                create_req("x8", MIB + 1, MIB + 100),
                Code::OutOfRange,
                "limit_bytes",
            ),
            (create_req("x9", -1, 0), Code::InvalidArgument, "negative"),
            (elsewhere, Code::ResourceExhausted, "node-a"),
            (mutable, Code::InvalidArgument, "mutable_parameters"),
        ] {
            let name = req.name.clone();
            let (code, msg) = failed(ctl.create_volume(req).await);
            assert_eq!(code, want, "{name}: {msg}");
            assert!(
                msg.contains(says),
                "{name}: {msg:?} should mention {says:?}"
            );
        }

        // ValidateVolumeCapabilities: single-node modes confirmed, multi-node not.
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let r = ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: v.volume_id.clone(),
                    volume_capabilities: vec![cap(mode, None), cap(mode, Some("xfs"))],
                    ..Default::default()
                })
                .await
                .expect("validate")
                .into_inner();
            let confirmed = r
                .confirmed
                .unwrap_or_else(|| panic!("{mode:?}: {}", r.message));
            assert_eq!(confirmed.volume_capabilities.len(), 2);
        }
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let r = ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: v.volume_id.clone(),
                    volume_capabilities: vec![cap(mode, None)],
                    ..Default::default()
                })
                .await
                .expect("validate")
                .into_inner();
            assert!(r.confirmed.is_none(), "{mode:?} confirmed");
            assert!(!r.message.is_empty());
        }
        // Parameters are checked against the volume: its pool and kind confirm, others not.
        for (params, confirmed) in [
            (vec![("pool", "default"), ("thick", "false")], true),
            (vec![("pool", "nosuch")], false),
            (vec![("thick", "true")], false),
            (vec![("pol", "default")], false),
        ] {
            let r = ctl
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: v.volume_id.clone(),
                    volume_capabilities: vec![cap(Mode::SingleNodeWriter, None)],
                    parameters: params
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    ..Default::default()
                })
                .await
                .expect("validate")
                .into_inner();
            assert_eq!(
                r.confirmed.is_some(),
                confirmed,
                "{params:?}: {}",
                r.message
            );
        }
        let (code, _) = failed(
            ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);
        let (code, _) = failed(
            ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: "vol:node-a:00000000-0000-4000-8000-000000000000".to_owned(),
                volume_capabilities: vec![cap(Mode::SingleNodeWriter, None)],
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::NotFound);

        // ControllerGetVolume with its condition.
        let got = ctl
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        assert_eq!(
            got.volume.as_ref().map(|x| x.capacity_bytes),
            Some(v.capacity_bytes)
        );
        let cond = got
            .status
            .and_then(|s| s.volume_condition)
            .expect("condition");
        assert!(!cond.abnormal, "{cond:?}");

        // Another node's plugin refuses this node's volumes, naming the node.
        let mut ctl_b = Ctl::new(other.channel().await);
        let (code, msg) = failed(
            ctl_b
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        assert!(msg.contains("node-a"), "{msg}");
        daemon_volume(dch.clone(), "pvc-1").await;

        // Pagination: 2 + 2 + 1 of five volumes, every one once; a bad token is ABORTED.
        for i in 0..3 {
            create(&mut ctl, create_req(&format!("pvc-page-{i}"), MIB, 0)).await;
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = ctl
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                })
                .await
                .expect("ListVolumes")
                .into_inner();
            pages += 1;
            assert!(page.entries.len() <= 2);
            for e in &page.entries {
                let vol = e.volume.as_ref().expect("volume");
                assert!(vol.volume_id.starts_with("vol:node-a:"));
                let cond = e.status.as_ref().and_then(|s| s.volume_condition.as_ref());
                assert!(cond.is_some_and(|c| !c.abnormal));
                seen.push(vol.volume_id.clone());
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        assert_eq!(pages, 3);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert!(seen.contains(&v.volume_id));
        let all = ctl
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner();
        assert_eq!(all.entries.len(), 5);
        assert!(all.next_token.is_empty());
        let (code, _) = failed(
            ctl.list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: "not a token".to_owned(),
            })
            .await,
        );
        assert_eq!(code, Code::Aborted);
        let (code, _) = failed(
            ctl.list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // Delete: twice is fine, an unknown ID is fine, an empty one is not.
        for _ in 0..2 {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume");
        }
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "no-such-volume".to_owned(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume of an unknown ID");
        let (code, _) = failed(ctl.delete_volume(csi::DeleteVolumeRequest::default()).await);
        assert_eq!(code, Code::InvalidArgument);
        let (code, _) = failed(
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await,
        );
        assert_eq!(code, Code::NotFound);
        let left = pb::volumes_client::VolumesClient::new(dch)
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("list")
            .into_inner();
        assert!(left.volumes.iter().all(|x| x.name != "pvc-1"));
        assert_eq!(left.volumes.len(), 4);
    });
}

#[test]
fn capacity_shrinks_as_volumes_are_made_and_past_it_create_is_resource_exhausted() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    rt().block_on(async {
        let mut ctl = Ctl::new(plugin.channel().await);
        let start = capacity(&mut ctl, &[]).await;
        assert!(start > 100 * MIB, "{start}");
        assert_eq!(start % (64 << 10), 0);
        assert_eq!(capacity(&mut ctl, &[("pool", "default")]).await, start);

        let a = create(&mut ctl, create_req("a", 32 * MIB, 0)).await;
        assert_eq!(capacity(&mut ctl, &[]).await, start - 32 * MIB);
        let mut thick = create_req("b", 16 * MIB, 0);
        thick.parameters = HashMap::from([("thick".to_owned(), "true".to_owned())]);
        create(&mut ctl, thick).await;
        let now = capacity(&mut ctl, &[]).await;
        assert_eq!(now, start - 48 * MIB);
        let thick_now = capacity(&mut ctl, &[("thick", "true")]).await;
        assert!(thick_now <= now, "{thick_now} > {now}");

        // One cluster more than the figure: refused; the figure itself: accepted.
        let (code, msg) = failed(
            ctl.create_volume(create_req("too-big", now + (64 << 10), 0))
                .await,
        );
        assert_eq!(code, Code::ResourceExhausted, "{msg}");
        let last = create(&mut ctl, create_req("exact", now, 0)).await;
        assert_eq!(last.capacity_bytes, now);
        assert_eq!(capacity(&mut ctl, &[]).await, 0);
        let (code, _) = failed(ctl.create_volume(create_req("more", MIB, 0)).await);
        assert_eq!(code, Code::ResourceExhausted);

        // Another node's segment, a capability this driver cannot serve: nothing.
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: last.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete");
        assert_eq!(capacity(&mut ctl, &[]).await, now);
        let other = ctl
            .get_capacity(csi::GetCapacityRequest {
                accessible_topology: Some(csi::Topology {
                    segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), "node-z".to_owned())]),
                }),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner();
        assert_eq!(other.available_capacity, 0);
        let multi = ctl
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter, None)],
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner();
        assert_eq!(multi.available_capacity, 0);

        // Thick classes are also bounded by unreserved free space: a deleted volume's
        // snapshot holds its written clusters, which count against free space but no
        // longer against the overcommit limit.
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: a.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete");
        let dch = daemon.channel().await;
        let held = create(&mut ctl, create_req("held", 64 * MIB, 0)).await;
        write_volume(
            dch,
            "held",
            &seeded(usize::try_from(48 * MIB).expect("fits"), 7),
        )
        .await;
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: held.volume_id.clone(),
            name: "keeps-48m".to_owned(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot");
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: held.volume_id,
            ..Default::default()
        })
        .await
        .expect("delete");
        let thin = capacity(&mut ctl, &[]).await;
        let thick = capacity(&mut ctl, &[("thick", "true")]).await;
        assert_eq!(thin, now + 32 * MIB, "the snapshot provisions nothing");
        assert!(thick + 32 * MIB <= thin, "thick {thick} thin {thin}");
        let mut too_thick = create_req("too-thick", thick + (64 << 10), 0);
        too_thick.parameters = HashMap::from([("thick".to_owned(), "true".to_owned())]);
        let (code, msg) = failed(ctl.create_volume(too_thick).await);
        assert_eq!(code, Code::ResourceExhausted, "{msg}");
        let mut fits = create_req("thick-fits", thick, 0);
        fits.parameters = HashMap::from([("thick".to_owned(), "true".to_owned())]);
        assert_eq!(create(&mut ctl, fits).await.capacity_bytes, thick);

        let (code, _) = failed(
            ctl.get_capacity(csi::GetCapacityRequest {
                parameters: HashMap::from([("pool".to_owned(), "nosuch".to_owned())]),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);
    });
}

#[test]
fn snapshots_clones_and_restores_keep_their_bytes() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    let other = Csi::node(dir.path(), "csi-b", &daemon, "node-b");
    rt().block_on(async {
        let dch = daemon.channel().await;
        let mut ctl = Ctl::new(plugin.channel().await);
        let len = 256 << 10;
        let first = seeded(len, 1);
        let second = seeded(len, 2);

        let src = create(&mut ctl, create_req("src", 4 * MIB, 0)).await;
        write_volume(dch.clone(), "src", &first).await;
        let snap_req = csi::CreateSnapshotRequest {
            source_volume_id: src.volume_id.clone(),
            name: "snapshot-1".to_owned(),
            parameters: HashMap::from([(
                "csi.storage.k8s.io/volumesnapshot/name".to_owned(),
                "daily".to_owned(),
            )]),
            ..Default::default()
        };
        let snap = ctl
            .create_snapshot(snap_req.clone())
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert!(
            snap.snapshot_id.starts_with("snap:node-a:"),
            "{}",
            snap.snapshot_id
        );
        assert_eq!(snap.source_volume_id, src.volume_id);
        assert_eq!(snap.size_bytes, 4 * MIB);
        assert!(snap.ready_to_use);
        assert!(snap.creation_time.is_some());
        let again = ctl
            .create_snapshot(snap_req)
            .await
            .expect("CreateSnapshot again")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert_eq!(again.snapshot_id, snap.snapshot_id);

        // The volume moves on after the snapshot.
        write_volume(dch.clone(), "src", &second).await;

        // Restore from the snapshot: the bytes at the snapshot; clone of the volume: now.
        let restored = create(&mut ctl, from_snapshot("restored", &snap.snapshot_id)).await;
        assert_eq!(restored.capacity_bytes, 4 * MIB);
        assert!(matches!(
            restored.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
            Some(csi::volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
        ));
        assert_eq!(read_volume(dch.clone(), "restored", len).await, first);
        let clone = create(&mut ctl, from_volume("cloned", &src.volume_id)).await;
        assert_eq!(read_volume(dch.clone(), "cloned", len).await, second);
        assert_ne!(clone.volume_id, src.volume_id);
        // A restore asked bigger is bigger; a limit below the source is OUT_OF_RANGE.
        let mut bigger = from_snapshot("restored-big", &snap.snapshot_id);
        bigger.capacity_range = Some(csi::CapacityRange {
            required_bytes: 8 * MIB,
            limit_bytes: 0,
        });
        assert_eq!(create(&mut ctl, bigger).await.capacity_bytes, 8 * MIB);
        let mut small = from_snapshot("restored-small", &snap.snapshot_id);
        small.capacity_range = Some(csi::CapacityRange {
            required_bytes: MIB,
            limit_bytes: 2 * MIB,
        });
        let (code, _) = failed(ctl.create_volume(small).await);
        assert_eq!(code, Code::OutOfRange);

        // A thick class cannot restore (clones are thin).
        let mut thick = from_snapshot("restored-thick", &snap.snapshot_id);
        thick.parameters = HashMap::from([("thick".to_owned(), "true".to_owned())]);
        let (code, msg) = failed(ctl.create_volume(thick).await);
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("thin"), "{msg}");

        // Errors: an unknown source, another node's source (names the node), the same
        // snapshot name for another volume.
        let (code, _) = failed(
            ctl.create_volume(from_snapshot(
                "r2",
                "snap:node-a:00000000-0000-4000-8000-000000000000",
            ))
            .await,
        );
        assert_eq!(code, Code::NotFound);
        let (code, _) = failed(ctl.create_volume(from_volume("r3", "garbage")).await);
        assert_eq!(code, Code::NotFound);
        let mut ctl_b = Ctl::new(other.channel().await);
        let (code, msg) = failed(
            ctl_b
                .create_volume(from_snapshot("r4", &snap.snapshot_id))
                .await,
        );
        assert_eq!(code, Code::ResourceExhausted, "{msg}");
        assert!(msg.contains("node-a"), "{msg}");
        let (code, msg) = failed(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: clone.volume_id.clone(),
                name: "snapshot-1".to_owned(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::AlreadyExists, "{msg}");
        let (code, _) = failed(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: "vol:node-a:00000000-0000-4000-8000-000000000000".to_owned(),
                name: "snapshot-x".to_owned(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::NotFound);
        let (code, _) = failed(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: src.volume_id.clone(),
                name: String::new(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument);

        // Two more snapshots, to page through.
        for name in ["snapshot-2", "snapshot-3"] {
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: src.volume_id.clone(),
                name: name.to_owned(),
                ..Default::default()
            })
            .await
            .expect("CreateSnapshot");
        }
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = ctl
                .list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("ListSnapshots")
                .into_inner();
            assert!(page.entries.len() <= 2);
            seen.extend(
                page.entries
                    .iter()
                    .filter_map(|e| e.snapshot.as_ref().map(|s| s.snapshot_id.clone())),
            );
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let (code, _) = failed(
            ctl.list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: "zz".to_owned(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::Aborted);

        // The source volume goes; its snapshots stay, are listed under it, and restore.
        for _ in 0..2 {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: src.volume_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteVolume of a volume with snapshots");
        }
        let by_source = ctl
            .list_snapshots(csi::ListSnapshotsRequest {
                source_volume_id: src.volume_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots by source")
            .into_inner();
        assert_eq!(by_source.entries.len(), 3, "{by_source:?}");
        let by_id = ctl
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots by id")
            .into_inner();
        assert_eq!(by_id.entries.len(), 1);
        assert_eq!(
            by_id.entries[0]
                .snapshot
                .as_ref()
                .map(|s| s.snapshot_id.as_str()),
            Some(snap.snapshot_id.as_str())
        );
        for unknown in [
            "garbage",
            "snap:node-a:00000000-0000-4000-8000-000000000000",
        ] {
            let none = ctl
                .list_snapshots(csi::ListSnapshotsRequest {
                    snapshot_id: unknown.to_owned(),
                    ..Default::default()
                })
                .await
                .expect("ListSnapshots of an unknown id")
                .into_inner();
            assert!(none.entries.is_empty());
        }
        create(&mut ctl, from_snapshot("after-delete", &snap.snapshot_id)).await;
        assert_eq!(read_volume(dch.clone(), "after-delete", len).await, first);

        // Deleting the snapshot keeps the volumes restored from it; twice is fine.
        for _ in 0..2 {
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        }
        ctl.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: "garbage".to_owned(),
            ..Default::default()
        })
        .await
        .expect("DeleteSnapshot of an unknown ID");
        let (code, msg) = failed(
            ctl_b
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: by_source.entries[1]
                        .snapshot
                        .as_ref()
                        .map(|s| s.snapshot_id.clone())
                        .expect("id"),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        assert_eq!(read_volume(dch.clone(), "restored", len).await, first);
        assert_eq!(read_volume(dch.clone(), "after-delete", len).await, first);
        let gone = ctl
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots")
            .into_inner();
        assert!(gone.entries.is_empty());
    });
}

#[test]
fn probe_is_not_ready_until_the_daemon_is_up_and_has_imported_its_pools() {
    // Long enough to probe while the daemon imports on a loaded machine.
    const DELAY_MS: &str = "3000";
    let dir = workdir();
    let daemon_socket = dir.path().join("api.sock");
    let plugin = Csi::start(
        dir.path(),
        "csi",
        &[
            "--mode",
            "node",
            "--node-id",
            NODE,
            "--daemon-socket",
            daemon_socket.to_str().expect("utf-8 path"),
        ],
    );
    let rt = rt();
    let ready = |ch: Channel| async move {
        csi::identity_client::IdentityClient::new(ch)
            .probe(csi::ProbeRequest {})
            .await
            .expect("Probe answers")
            .into_inner()
            .ready
    };
    // No daemon yet: not ready, and calls are UNAVAILABLE (the sidecars retry).
    rt.block_on(async {
        let ch = plugin.channel().await;
        assert_eq!(ready(ch.clone()).await, Some(false));
        let (code, msg) = failed(
            Ctl::new(ch)
                .create_volume(create_req("early", MIB, 0))
                .await,
        );
        assert_eq!(code, Code::Unavailable, "{msg}");
        assert!(msg.contains("coreblkd"), "{msg}");
    });
    // The daemon serves but imports its pools: still not ready.
    let daemon = Daemon::spawn(dir.path(), &[("COREBLK_TEST_IMPORT_DELAY_MS", DELAY_MS)]);
    assert!(
        wait_for(START_DEADLINE, || daemon
            .log_text()
            .contains("the pool import waits first")),
        "coreblkd did not start importing (built without the `testing` feature?):\n{}",
        daemon.log_text()
    );
    rt.block_on(async {
        let ch = plugin.channel().await;
        let mut saw_starting = false;
        let end = std::time::Instant::now() + START_DEADLINE;
        loop {
            let importing = !daemon.log_text().contains("pool import finished");
            let r = ready(ch.clone()).await;
            if importing && daemon.log_text().contains("serving; stop with SIGTERM") {
                // Still importing after the answer too: the answer was about the import.
                if !daemon.log_text().contains("pool import finished") {
                    assert_eq!(r, Some(false), "ready while the pools are imported");
                    saw_starting = true;
                }
            }
            if r == Some(true) {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "never ready:\n{}",
                daemon.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(saw_starting, "never probed during the import");
        assert!(daemon.log_text().contains("pool import finished"));
        create(&mut Ctl::new(ch), create_req("late", MIB, 0)).await;
    });
}

#[test]
fn volume_condition_is_abnormal_while_an_import_fills_it() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    rt().block_on(async {
        let dch = daemon.channel().await;
        let mut ctl = Ctl::new(plugin.channel().await);
        // An import that starts and never finishes leaves the volume IMPORTING.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                pool: "default".to_owned(),
                volume_name: "filling".to_owned(),
                size_bytes: 4 << 20,
                ..Default::default()
            })),
        })
        .await
        .expect("send start");
        let mut responses = pb::images_client::ImagesClient::new(dch.clone())
            .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("import starts")
            .into_inner();
        let uuid = match responses
            .message()
            .await
            .expect("answer")
            .and_then(|m| m.msg)
        {
            Some(pb::import_image_response::Msg::Started(s)) => s.volume_uuid,
            other => panic!("expected started, got {other:?}"),
        };
        let id = format!("vol:{NODE}:{uuid}");
        let got = ctl
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        let cond = got
            .status
            .and_then(|s| s.volume_condition)
            .expect("condition");
        assert!(cond.abnormal, "{cond:?}");
        assert!(cond.message.contains("import"), "{cond:?}");
        let listed = ctl
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner();
        assert_eq!(listed.entries.len(), 1);
        let cond = listed.entries[0]
            .status
            .as_ref()
            .and_then(|s| s.volume_condition.as_ref())
            .expect("condition");
        assert!(cond.abnormal, "{cond:?}");
        // A volume that is not yet whole is not snapshotted (the daemon refuses).
        let (code, msg) = failed(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "early".to_owned(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        drop(tx);
        drop(responses);
    });
}
