//! `coreblk-proto`: the `coreblk.v1` daemon API (DESIGN §6) as Rust types, tonic clients
//! and tonic servers.
//!
//! Owns: `proto/coreblk/v1/*.proto` (the source of truth: read `common.proto` first for
//! the conventions every service follows) and the code generated from it by `build.rs`
//! (protox + tonic-prost-build; no system `protoc`). Nothing hand-written lives here but
//! this re-export. Must never: depend on the daemon.
//!
//! Later: the CSI spec messages (issue 13).

/// `coreblk.v1`: messages, `*_client` and `*_server` modules of every service.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
pub mod v1 {
    tonic::include_proto!("coreblk.v1");
}
