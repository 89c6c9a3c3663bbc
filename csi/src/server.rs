//! The gRPC server: the CSI services on a unix socket, until SIGTERM or SIGINT.
//!
//! Owns: [`Config`], [`Mode`], [`serve`], [`socket_path`]. Must never: listen on a network
//! address (CSI endpoints here are unix sockets only).

use std::path::{Path, PathBuf};

use coreblk_proto::csi::v1 as csi;
use tokio_stream::wrappers::UnixListenerStream;

use crate::busy::Busy;
use crate::central::CentralNode;
use crate::controller::{CentralController, Controller};
use crate::daemon::Daemon;
use crate::freeze::{self, Fsfreeze};
use crate::identity::Identity;
use crate::mounts;
use crate::node::Node;

/// Which services this instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The node plugin (one per node, beside `coreblkd`): Identity, Controller and Node,
    /// all backed by the local daemon.
    Node,
    /// The stateless central controller for csi-resizer: Identity and the Controller's
    /// capabilities (no EXPAND_VOLUME), no daemon.
    Controller,
}

/// What [`serve`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket to serve on.
    pub endpoint: PathBuf,
    /// The daemon's API socket (node mode).
    pub daemon_socket: PathBuf,
    /// This node's id (node mode).
    pub node_id: String,
    /// Which services.
    pub mode: Mode,
    /// The kubelet's directory.
    pub kubelet_dir: PathBuf,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not a unix socket address.
    #[error("--endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// As given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process serves on the socket.
    #[error("{} is in use: another process (a second coreblk-csi?) serves on it; stop it or choose another --endpoint", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket could not be made.
    #[error("cannot listen on {}: {source} (does the directory exist, and is it writable?)", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving CSI on {}: {source}", path.display())]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The socket path of an endpoint: `unix:///abs/path`, `unix:/abs/path` or a plain path.
///
/// # Errors
/// [`ServeError::BadEndpoint`] for another scheme or an empty path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let bad = |reason: &str| ServeError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        return Err(bad(
            "only unix sockets are served: write unix:///path/to/csi.sock or a path",
        ));
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(bad("no socket path: write unix:///path/to/csi.sock"));
    }
    Ok(PathBuf::from(path))
}

/// Whether a process accepts connections on the socket at `path`.
fn socket_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Removes a socket left by an earlier instance (only a socket: never another file).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still stops by the default action.
        _ => std::future::pending::<()>().await,
    }
}

/// Thaws every ublk filesystem that a plugin which died inside a snapshot's frozen window
/// left frozen (`freeze.rs`); failures are logged, start-up goes on.
async fn thaw_left_frozen() {
    match mounts::mount_table() {
        Ok(table) => {
            let thawed = freeze::thaw_left_frozen(&Fsfreeze, &table, freeze::reachable_point).await;
            tracing::info!(
                thawed = thawed.len(),
                "start-up thaw of ublk filesystems done"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "reading /proc/self/mountinfo for the start-up thaw failed: filesystems a crashed plugin left frozen stay frozen")
        }
    }
}

/// Serves the CSI services of `config.mode` on `config.endpoint` until SIGTERM/SIGINT,
/// then removes the socket. In node mode it first thaws what a crashed plugin left frozen.
///
/// # Errors
/// [`ServeError`].
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let path = config.endpoint.clone();
    if socket_in_use(&path) {
        return Err(ServeError::InUse { path });
    }
    if config.mode == Mode::Node {
        // Before serving (no freeze of this process can be under way) and after the
        // in-use check (a second instance must not thaw the live one's window).
        thaw_left_frozen().await;
    }
    remove_stale_socket(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    let mut router = tonic::transport::Server::builder();
    let router = match config.mode {
        Mode::Node => {
            let daemon = Daemon::lazy(&config.daemon_socket);
            let busy = Busy::default();
            router
                .add_service(csi::identity_server::IdentityServer::new(Identity::new(
                    Some(daemon.clone()),
                )))
                .add_service(csi::controller_server::ControllerServer::new(
                    Controller::new(daemon.clone(), &config.node_id, busy.clone()),
                ))
                .add_service(csi::node_server::NodeServer::new({
                    let node = Node::new(daemon, &config.node_id, config.kubelet_dir.clone(), busy);
                    // Orphaned ephemeral volumes: at start-up and then periodically.
                    tokio::spawn(node.clone().sweep_loop());
                    node
                }))
        }
        Mode::Controller => router
            .add_service(csi::identity_server::IdentityServer::new(Identity::new(
                None,
            )))
            .add_service(csi::controller_server::ControllerServer::new(
                CentralController,
            ))
            .add_service(csi::node_server::NodeServer::new(CentralNode)),
    };
    tracing::info!(
        endpoint = %path.display(),
        mode = ?config.mode,
        node = %config.node_id,
        daemon = %config.daemon_socket.display(),
        "CSI serving; stop with SIGTERM"
    );
    let result = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop_signal())
        .await;
    remove_stale_socket(&path);
    tracing::info!("CSI stopped");
    result.map_err(|source| ServeError::Serve { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(socket_path("/x.sock").ok(), Some(PathBuf::from("/x.sock")));
        assert!(socket_path("tcp://0.0.0.0:10000").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
