//! The Node service of the central controller instance (`--mode controller`), for
//! csi-resizer alone. The resizer runs centrally (it has no node-deployment mode) against
//! a controller without EXPAND_VOLUME; it then asks `NodeGetCapabilities` on the same
//! socket, and with EXPAND_VOLUME there it uses its "trivial" resizer: it records the new
//! size on the PV and leaves the growing to kubelet's NodeExpandVolume on the node that
//! holds the volume (DESIGN §7). Without this answer csi-resizer exits at start.
//!
//! Owns: [`CentralNode`]. Must never: touch a volume, a mount or a daemon — it answers
//! capabilities only, and every other call says where the work happens.

use coreblk_proto::csi::v1 as csi;
use tonic::{Request, Response, Status};

use crate::error::Error;

/// The central instance's Node service: capabilities only.
#[derive(Debug, Clone, Default)]
pub struct CentralNode;

/// What the central instance advertises: node expansion, which the node plugins serve.
pub fn central_node_caps() -> csi::NodeGetCapabilitiesResponse {
    use csi::node_service_capability::rpc::Type;
    csi::NodeGetCapabilitiesResponse {
        capabilities: vec![csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc {
                    r#type: Type::ExpandVolume.into(),
                },
            )),
        }],
    }
}

fn node_elsewhere(rpc: &'static str) -> Status {
    Error::Unimplemented {
        rpc,
        reason: "this is the central coreblk-csi instance (--mode controller), which only \
                 answers capabilities for csi-resizer; node calls go to the coreblk-csi node \
                 plugin (--mode node) on the node that holds the volume"
            .to_owned(),
    }
    .into()
}

#[tonic::async_trait]
impl csi::node_server::Node for CentralNode {
    async fn node_stage_volume(
        &self,
        _r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(node_elsewhere("NodeStageVolume"))
    }
    async fn node_unstage_volume(
        &self,
        _r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(node_elsewhere("NodeUnstageVolume"))
    }
    async fn node_publish_volume(
        &self,
        _r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(node_elsewhere("NodePublishVolume"))
    }
    async fn node_unpublish_volume(
        &self,
        _r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(node_elsewhere("NodeUnpublishVolume"))
    }
    async fn node_get_volume_stats(
        &self,
        _r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(node_elsewhere("NodeGetVolumeStats"))
    }
    async fn node_expand_volume(
        &self,
        _r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(node_elsewhere("NodeExpandVolume"))
    }
    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(central_node_caps()))
    }
    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Err(node_elsewhere("NodeGetInfo"))
    }
}
