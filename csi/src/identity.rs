//! The CSI Identity service: the plugin's name and version, what it offers, and whether it
//! is ready (Probe asks the daemon, so a node whose daemon is down or still importing its
//! pools reports not ready).
//!
//! Owns: [`Identity`], [`PLUGIN_NAME`]. Must never: answer ready on the node plugin without
//! a daemon that said it serves.

use std::time::Duration;

use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::plugin_capability::service::Type as ServiceType;
use tonic::{Request, Response, Status};

use crate::daemon::Daemon;

/// The CSI driver name (the CSIDriver object's name).
pub const PLUGIN_NAME: &str = "csi.coreblk.io";
/// The driver's version, as GetPluginInfo reports it and `--version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Longest a Probe waits for the daemon.
const PROBE_TIMEOUT_MS: u64 = 5_000;

/// The Identity service.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The daemon Probe asks; `None` for the central controller, which has none.
    daemon: Option<Daemon>,
}

impl Identity {
    /// Identity of the node plugin (`Some(daemon)`) or the central controller (`None`).
    pub fn new(daemon: Option<Daemon>) -> Self {
        Self { daemon }
    }
}

/// Whether the daemon serves, and if not, why.
async fn daemon_ready(daemon: &Daemon) -> Result<(), String> {
    let mut client = daemon.node();
    let call = client.get_node_info(pb::GetNodeInfoRequest {});
    match tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), call).await {
        Err(_) => Err(format!(
            "coreblkd at {} did not answer",
            daemon.socket().display()
        )),
        Ok(Err(e)) => Err(format!(
            "cannot reach coreblkd at {}: {}",
            daemon.socket().display(),
            e.message()
        )),
        Ok(Ok(info)) => match info.into_inner().state() {
            pb::DaemonState::Serving => Ok(()),
            pb::DaemonState::Starting => Err("coreblkd is importing its pools".to_owned()),
            pb::DaemonState::Stopping => Err("coreblkd is stopping".to_owned()),
            pb::DaemonState::Unspecified => Err("coreblkd reports no state".to_owned()),
        },
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: PLUGIN_NAME.to_owned(),
            vendor_version: VERSION.to_owned(),
            manifest: std::collections::HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let service = |t: ServiceType| csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::Service(
                csi::plugin_capability::Service { r#type: t.into() },
            )),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(ServiceType::ControllerService),
                service(ServiceType::VolumeAccessibilityConstraints),
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = match &self.daemon {
            None => true,
            Some(d) => match daemon_ready(d).await {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!(reason = %why, "probe: not ready");
                    false
                }
            },
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
