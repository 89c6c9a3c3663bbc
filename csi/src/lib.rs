//! `coreblk-csi`: the CSI driver (issue 13, DESIGN §7), a client of the local daemon's
//! gRPC API that holds no state of its own.
//!
//! Owns: the CSI Identity, Controller and Node services over `coreblkd`, served on one
//! unix socket (`server.rs`), the ID scheme (`ids.rs`), the request checks (`params.rs`)
//! and the one error → status mapping (`error.rs`); the filesystem freeze around
//! snapshots of mounted volumes (`freeze.rs`). Must never: open a network port, or
//! remember anything between calls — what routing needs is in the IDs, the rest is asked
//! of the daemon.
//!
//! Start reading at `server.rs`: `serve`, then `controller.rs`.

pub mod busy;
pub mod central;
pub mod controller;
pub mod crypt;
pub mod daemon;
pub mod ephemeral;
pub mod error;
pub mod freeze;
pub mod fsopts;
pub mod identity;
pub mod ids;
pub mod mounts;
pub mod node;
pub mod params;
pub mod paths;
pub mod qos;
pub mod server;
