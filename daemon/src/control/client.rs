//! The client side of the API socket, for the `coreblk` CLI and the tests: a tonic
//! channel over a unix socket, with a connection error that says what to check.
//!
//! Owns: [`connect`], [`DEFAULT_SOCKET_ENV`]. Must never: be used inside the daemon.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The environment variable that names the socket for the CLI.
pub const DEFAULT_SOCKET_ENV: &str = "COREBLK_SOCKET";

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing at the path.
    #[error("no coreblkd socket at {} (is coreblkd running? point --socket or COREBLK_SOCKET at its socket)", path.display())]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A socket file, but nobody listens.
    #[error("coreblkd is not running: {} is a stale socket (start coreblkd, or point --socket or COREBLK_SOCKET at the right socket)", path.display())]
    NotListening {
        /// The socket path.
        path: PathBuf,
    },
    /// Not allowed.
    #[error("permission denied on {} (the socket is mode 0600: run as the daemon's user, normally root)", path.display())]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Anything else.
    #[error("cannot connect to coreblkd at {}: {source}", path.display())]
    Other {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Connects to the daemon's API socket.
///
/// # Errors
/// [`ConnectError`], saying what to check.
pub async fn connect(socket: &Path) -> Result<Channel, ConnectError> {
    let path = socket.to_path_buf();
    // Probe first so the common failures get a precise message (tonic's transport
    // error only says "transport error").
    if let Err(e) = tokio::net::UnixStream::connect(&path).await {
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => ConnectError::NoSocket { path },
            std::io::ErrorKind::ConnectionRefused => ConnectError::NotListening { path },
            std::io::ErrorKind::PermissionDenied => ConnectError::PermissionDenied { path },
            _ => ConnectError::Other {
                path,
                source: Box::new(e),
            },
        });
    }
    // The URI is required by the API and ignored by the connector.
    let endpoint = Endpoint::from_static("http://coreblkd.sock");
    let target = path.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(target).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| ConnectError::Other {
            path,
            source: Box::new(e),
        })
}
