//! QoS through CSI, as Kubernetes drives it: a StorageClass with QoS parameters (fixed and
//! per-GiB) makes a volume whose limits the daemon reports; a VolumeAttributesClass at
//! creation (`mutable_parameters`) overrides them; ControllerModifyVolume on the node
//! plugin raises the limits online and clears them; unknown or bad mutable parameters are
//! INVALID_ARGUMENT, another node's volume FAILED_PRECONDITION naming its node, an
//! unknown ID NOT_FOUND; the node plugin advertises MODIFY_VOLUME.

mod common;

use std::collections::HashMap;

use common::{rt, workdir, Csi, Daemon};
use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

const NODE: &str = "node-a";
const MIB: u64 = 1 << 20;

type Ctl = csi::controller_client::ControllerClient<Channel>;

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn create_req(name: &str, bytes: i64, class: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume};
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
        }],
        parameters: params(class),
        ..Default::default()
    }
}

async fn qos_of(daemon: Channel, name: &str) -> Option<pb::VolumeQos> {
    pb::volumes_client::VolumesClient::new(daemon)
        .get_volume(pb::GetVolumeRequest {
            volume: name.to_owned(),
        })
        .await
        .expect("GetVolume")
        .into_inner()
        .qos
}

async fn modify(
    ctl: &mut Ctl,
    id: &str,
    kv: &[(&str, &str)],
) -> Result<tonic::Response<csi::ControllerModifyVolumeResponse>, tonic::Status> {
    ctl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: id.to_owned(),
        secrets: HashMap::new(),
        mutable_parameters: params(kv),
    })
    .await
}

#[test]
fn csi_qos_from_the_class_and_modified_online_on_the_node_plugin() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let plugin = Csi::node(dir.path(), "csi", &daemon, NODE);
    rt().block_on(async {
        let dch = daemon.channel().await;
        let mut ctl = Ctl::new(plugin.channel().await);
        use csi::controller_service_capability::rpc::Type as C;
        let caps = ctl
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .expect("caps")
            .into_inner();
        assert!(
            caps.capabilities.iter().any(|c| matches!(
                &c.r#type,
                Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == C::ModifyVolume as i32
            )),
            "MODIFY_VOLUME advertised: {caps:?}"
        );

        // A class with a fixed cap and a per-GiB one: 64 MiB counts as 1 GiB (sizes round
        // up) → 100 IOPS, under maxIops.
        let class = [
            ("maxIops", "5000"),
            ("iopsPerGiB", "100"),
            ("maxWriteMBps", "40"),
            ("burstMs", "50"),
        ];
        let v = ctl
            .create_volume(create_req("pvc-q1", 64 << 20, &class))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("volume");
        let q = qos_of(dch.clone(), "pvc-q1").await.expect("limits set");
        assert_eq!(q.max_iops, 100);
        assert_eq!(q.max_write_bytes_per_sec, 40 * MIB);
        assert_eq!(q.burst_ms, 50);

        // A VolumeAttributesClass at creation overrides the class's keys.
        let mut req = create_req("pvc-q2", 64 << 20, &class);
        req.mutable_parameters = params(&[("maxIops", "700"), ("iopsPerGiB", "0")]);
        ctl.create_volume(req.clone()).await.expect("CreateVolume with VAC");
        assert_eq!(qos_of(dch.clone(), "pvc-q2").await.expect("set").max_iops, 700);
        // Idempotent: the same call again is the same volume with the same limits.
        ctl.create_volume(req).await.expect("CreateVolume again");
        assert_eq!(qos_of(dch.clone(), "pvc-q2").await.expect("set").max_iops, 700);

        // Modify online: raise the cap; every limit is replaced by the class's.
        modify(&mut ctl, &v.volume_id, &[("maxIops", "10000"), ("maxReadMBps", "100")])
            .await
            .expect("ControllerModifyVolume");
        let q = qos_of(dch.clone(), "pvc-q1").await.expect("limits set");
        assert_eq!(q.max_iops, 10_000);
        assert_eq!(q.max_read_bytes_per_sec, 100 * MIB);
        assert_eq!(q.max_write_bytes_per_sec, 0, "not in the new class: unlimited");
        // An empty class lifts every limit.
        modify(&mut ctl, &v.volume_id, &[]).await.expect("clear");
        assert_eq!(qos_of(dch.clone(), "pvc-q1").await, None);

        // Refusals, with the codes Kubernetes acts on.
        let other = v.volume_id.replace("vol:node-a:", "vol:node-b:");
        for (id, kv, want, says) in [
            (v.volume_id.as_str(), vec![("pool", "fast")], Code::InvalidArgument, "mutable_parameters"),
            (v.volume_id.as_str(), vec![("maxIops", "lots")], Code::InvalidArgument, "maxIops"),
            (v.volume_id.as_str(), vec![("maxIops", "999999999999")], Code::InvalidArgument, "at most"),
            ("", vec![("maxIops", "5")], Code::InvalidArgument, "volume_id"),
            (other.as_str(), vec![("maxIops", "5")], Code::FailedPrecondition, "node-b"),
            ("vol:node-a:00000000-0000-4000-8000-000000000000", vec![("maxIops", "5")], Code::NotFound, "does not exist"),
        ] {
            let err = modify(&mut ctl, id, &kv).await.expect_err("refused");
            assert_eq!(err.code(), want, "{id} {kv:?}: {}", err.message());
            assert!(err.message().contains(says), "{id} {kv:?}: {}", err.message());
        }
        // A bad class key at creation is INVALID_ARGUMENT naming it.
        let err = ctl
            .create_volume(create_req("pvc-q3", 64 << 20, &[("maxIops", "x")]))
            .await
            .expect_err("bad class");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("maxIops"), "{}", err.message());
    });
}
