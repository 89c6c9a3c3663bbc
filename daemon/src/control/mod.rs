//! Control plane (issue 11, DESIGN §6): the `coreblk.v1` gRPC services on a unix socket,
//! served by a small tokio runtime on its own thread, plus the registry of claimed devices.
//!
//! Owns: the server thread and its runtime ([`server::ControlPlane`]), the API socket
//! ([`socket`]), the services ([`devices`], [`node`], [`pools`], [`volumes`],
//! [`snapshots`], [`images`], [`exports`]: volumes as ublk devices), the pools as the control plane sees them
//! ([`store`]: registry, start-up import, sessions on the owner reactors), the
//! claimed-device registry ([`claims`]), name and label rules ([`names`]), pagination
//! ([`page`]), what `/metrics` reads of the pools ([`scrape`]), the one error → gRPC code mapping ([`error`]) and the client side used by
//! the `coreblk` CLI and the tests ([`client`]).
//!
//! Must never: run tokio on a reactor thread or block a reactor; call a reactor except by
//! message; block the runtime (discovery and claims run `blkid` and touch disks: they go
//! to `spawn_blocking`); build a `tonic::Status` outside [`error`].
//!
//! Start reading at [`server::ControlPlane::start`], then [`store`].

pub mod claims;
pub mod client;
pub mod devices;
pub mod error;
pub mod exports;
pub mod images;
pub mod names;
pub mod node;
pub mod objrec;
pub mod page;
pub mod pools;
pub mod scrape;
pub mod server;
pub mod snapshots;
pub mod socket;
pub mod store;
pub mod volumes;

pub use error::{Error, Result};

/// Largest data chunk of an image stream (`ImageChunk.data`, in both directions).
pub const MAX_IMAGE_CHUNK_BYTES: usize = 4 << 20;
/// Largest image-stream message, a full chunk plus room for its framing. Both ends of
/// the Images service raise tonic's 4 MiB default to this.
pub const MAX_IMAGE_MESSAGE_BYTES: usize = MAX_IMAGE_CHUNK_BYTES + (64 << 10);
