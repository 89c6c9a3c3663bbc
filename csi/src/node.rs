//! The CSI Node service. Built so far: NodeGetInfo (node id, topology, and
//! `max_volumes_per_node` from the daemon's export limit) and NodeGetCapabilities.
//! Staging, publishing, expansion and stats need ublk exports and mounts and come next
//! (issue 13, tested in the VM); until then they answer UNIMPLEMENTED.
//!
//! Owns: [`Node`]. Must never: mount or unmount anything outside the kubelet directory.

use std::path::PathBuf;

use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::daemon::Daemon;
use crate::error::Error;
use crate::params::node_topology;

/// The node plugin's Node service.
#[derive(Debug, Clone)]
pub struct Node {
    daemon: Daemon,
    node_id: String,
    /// The kubelet's directory: every staging and target path must lie under it.
    kubelet_dir: PathBuf,
}

impl Node {
    /// The Node service of node `node_id`.
    pub fn new(daemon: Daemon, node_id: &str, kubelet_dir: PathBuf) -> Self {
        Self {
            daemon,
            node_id: node_id.to_owned(),
            kubelet_dir,
        }
    }
}

fn not_yet(rpc: &'static str) -> Status {
    Error::Unimplemented {
        rpc,
        reason: "the coreblk node service (stage, publish, expand, stats) is not built yet"
            .to_owned(),
    }
    .into()
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        _r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(not_yet("NodeStageVolume"))
    }
    async fn node_unstage_volume(
        &self,
        _r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(not_yet("NodeUnstageVolume"))
    }
    async fn node_publish_volume(
        &self,
        _r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(not_yet("NodePublishVolume"))
    }
    async fn node_unpublish_volume(
        &self,
        _r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(not_yet("NodeUnpublishVolume"))
    }
    async fn node_get_volume_stats(
        &self,
        _r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(not_yet("NodeGetVolumeStats"))
    }
    async fn node_expand_volume(
        &self,
        _r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(not_yet("NodeExpandVolume"))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        // None yet: STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS, EXPAND_VOLUME and
        // VOLUME_CONDITION come with the node service.
        tracing::debug!(kubelet_dir = %self.kubelet_dir.display(), "node capabilities");
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let info = self
            .daemon
            .node()
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .map_err(|status| Error::Daemon {
                rpc: "NodeGetInfo",
                socket: self.daemon.socket().to_path_buf(),
                status,
            })?
            .into_inner();
        let max_exports = info.ublk.as_ref().map_or(0, |u| u.max_exports);
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: i64::from(max_exports),
            accessible_topology: Some(node_topology(&self.node_id)),
        }))
    }
}
