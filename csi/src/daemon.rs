//! The driver's one link to state: a gRPC channel to the local `coreblkd` over its unix
//! socket.
//!
//! Owns: [`Daemon`] (a lazily connected channel: the driver starts, and Probe answers
//! not-ready, while the daemon is down; calls reconnect by themselves once it is back).
//! How its errors reach CSI callers: `error.rs`. Must never: cache anything the daemon
//! says; every answer is asked for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coreblk_proto::v1 as pb;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Longest wait for a connection to the daemon.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Longest wait for one daemon call (a sidecar's own deadline is usually shorter).
const CALL_TIMEOUT_MS: u64 = 60_000;

/// A client of the local daemon's API.
#[derive(Debug, Clone)]
pub struct Daemon {
    channel: Channel,
    socket: PathBuf,
}

impl Daemon {
    /// A channel to the daemon at `socket`; nothing is connected until the first call.
    pub fn lazy(socket: &Path) -> Self {
        let target = socket.to_path_buf();
        // The URI is required by tonic and ignored by the connector.
        let channel = Endpoint::from_static("http://coreblkd.sock")
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(CALL_TIMEOUT_MS))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let target = target.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(target).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }));
        Self {
            channel,
            socket: socket.to_path_buf(),
        }
    }

    /// The daemon's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The Volumes service.
    pub fn volumes(&self) -> pb::volumes_client::VolumesClient<Channel> {
        pb::volumes_client::VolumesClient::new(self.channel.clone())
    }

    /// The Snapshots service.
    pub fn snapshots(&self) -> pb::snapshots_client::SnapshotsClient<Channel> {
        pb::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    /// The Pools service.
    pub fn pools(&self) -> pb::pools_client::PoolsClient<Channel> {
        pb::pools_client::PoolsClient::new(self.channel.clone())
    }

    /// The Exports service.
    pub fn exports(&self) -> pb::exports_client::ExportsClient<Channel> {
        pb::exports_client::ExportsClient::new(self.channel.clone())
    }

    /// The Node service.
    pub fn node(&self) -> pb::node_client::NodeClient<Channel> {
        pb::node_client::NodeClient::new(self.channel.clone())
    }

    /// The device path (`/dev/ublkbN`) of volume `uuid`'s export on this node (the
    /// daemon's ListExports; its Volume message does not carry it), `None` when it is not
    /// exported.
    ///
    /// # Errors
    /// The daemon's answer to ListExports.
    pub async fn export_device(&self, uuid: &str) -> Result<Option<String>, tonic::Status> {
        let mut page_token = String::new();
        loop {
            let page = self
                .exports()
                .list_exports(pb::ListExportsRequest {
                    page_size: 0,
                    page_token,
                })
                .await?
                .into_inner();
            if let Some(e) = page.exports.into_iter().find(|e| e.volume_uuid == uuid) {
                return Ok(Some(e.device_path));
            }
            if page.next_page_token.is_empty() {
                return Ok(None);
            }
            page_token = page.next_page_token;
        }
    }
}
