//! The `Node` service: what this daemon is (node id, version, kernel, reactors, devices)
//! and its counters, and each pool's capacity (what CSI GetCapacity reports).
//!
//! Owns: [`NodeFacts`] (gathered once at start-up) and [`resolve_node_id`]. Must never:
//! read reactor state except through the reactors' atomic counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::devices::claimed_message;
use super::server::Shared;
use crate::metrics::DaemonStateSample;

/// What the daemon knows about itself from start-up on.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// The node id reported to clients.
    pub node_id: String,
    /// The host name.
    pub hostname: String,
    /// coreblkd's version.
    pub version: &'static str,
    /// `uname -r`.
    pub kernel_release: String,
    /// (reactor id, core) pairs.
    pub reactors: Vec<(usize, usize)>,
    /// Whether reactors are pinned to their cores.
    pub reactors_pinned: bool,
    /// The device the reactors serve.
    pub served_device: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// Where /metrics is served.
    pub metrics_address: Option<SocketAddr>,
    /// When the daemon started.
    pub start_time: SystemTime,
    /// IO buffer pool of each reactor, bytes.
    pub io_buffer_bytes_per_reactor: u64,
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The host name (`/proc/sys/kernel/hostname`), or `localhost`.
#[must_use]
pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "localhost".to_owned())
}

/// The kernel release (`/proc/sys/kernel/osrelease`), or `unknown`.
#[must_use]
pub fn kernel_release() -> String {
    read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".to_owned())
}

/// The node id: the configured one, else `/etc/machine-id` (32 hex digits, stable across
/// reboots and renames), else the host name.
#[must_use]
pub fn resolve_node_id(configured: Option<&str>) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    read_trimmed("/etc/machine-id")
        .filter(|id| id.len() <= 63 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(hostname)
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn small(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The `Node` service.
#[derive(Debug)]
pub struct NodeService {
    shared: Arc<Shared>,
}

impl NodeService {
    /// A service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn get_node_info(
        &self,
        _request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let f = &self.shared.facts;
        let state = match self.shared.daemon_state() {
            DaemonStateSample::Starting => pb::DaemonState::Starting,
            DaemonStateSample::Serving => pb::DaemonState::Serving,
            DaemonStateSample::Stopping => pb::DaemonState::Stopping,
        };
        Ok(Response::new(pb::NodeInfo {
            node_id: f.node_id.clone(),
            hostname: f.hostname.clone(),
            version: f.version.to_owned(),
            kernel_release: f.kernel_release.clone(),
            reactors: f
                .reactors
                .iter()
                .map(|&(id, core)| pb::Reactor {
                    id: small(id),
                    core: small(core),
                })
                .collect(),
            reactors_pinned: f.reactors_pinned,
            state: state.into(),
            start_time: Some(timestamp(f.start_time)),
            devices: self
                .shared
                .claims
                .snapshot()
                .iter()
                .map(claimed_message)
                .collect(),
            served_device_path: f.served_device.display().to_string(),
            metrics_address: f.metrics_address.map(|a| a.to_string()).unwrap_or_default(),
            socket_path: f.socket.display().to_string(),
            ublk: Some(match self.shared.exports.kernel() {
                Ok(k) => pb::UblkInfo {
                    max_exports: self.shared.exports.settings().max_exports,
                    exports: u32::try_from(self.shared.exports.count().await).unwrap_or(u32::MAX),
                    io_buffer_bytes_per_reactor: f.io_buffer_bytes_per_reactor,
                    queue_depth: u32::from(self.shared.exports.settings().queue_depth),
                    max_io_bytes: self.shared.exports.settings().max_io_bytes,
                    available: true,
                    unavailable_reason: String::new(),
                    features: k.features.0,
                    feature_names: k.features.names().iter().map(|n| (*n).to_owned()).collect(),
                    // What new exports get; each export's own is in its Export message.
                    data_path: super::exports::export_path(k).name().to_owned(),
                    reason: k.choice.reason.clone(),
                },
                Err(why) => pb::UblkInfo {
                    available: false,
                    unavailable_reason: why.to_owned(),
                    io_buffer_bytes_per_reactor: f.io_buffer_bytes_per_reactor,
                    ..Default::default()
                },
            }),
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        self.shared.check_serving()?;
        self.shared.store.check_ready()?;
        let pool = request.into_inner().pool;
        let pools = if pool.is_empty() {
            self.shared.store.pools()
        } else {
            vec![self.shared.store.pool(&pool)?]
        };
        let mut out = Vec::with_capacity(pools.len());
        for p in &pools {
            out.push(super::pools::capacity(&self.shared, p).await?);
        }
        Ok(Response::new(pb::GetCapacityResponse { pools: out }))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        let reactors = self
            .shared
            .reactors
            .iter()
            .map(|r| pb::ReactorStats {
                id: small(r.id),
                core: small(r.core),
                busy_ns: r.stats.busy_ns.load(Ordering::Relaxed),
                sleep_ns: r.stats.sleep_ns.load(Ordering::Relaxed),
                sleeps: r.stats.sleeps.load(Ordering::Relaxed),
                enters: r.stats.enters.load(Ordering::Relaxed),
                completions: r.stats.completions.load(Ordering::Relaxed),
            })
            .collect();
        let uptime_seconds = SystemTime::now()
            .duration_since(self.shared.facts.start_time)
            .unwrap_or_default()
            .as_secs();
        Ok(Response::new(pb::NodeStats {
            reactors,
            uptime_seconds,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_prefers_the_configured_one() {
        assert_eq!(resolve_node_id(Some("node-7")), "node-7");
        let derived = resolve_node_id(None);
        assert!(!derived.is_empty());
        assert!(!kernel_release().is_empty());
    }
}
