//! `coreblk-proto`: the `coreblk.v1` daemon API (DESIGN §6) and the CSI spec v1.12
//! services (`csi.v1`, DESIGN §7) as Rust types, tonic clients and tonic servers.
//!
//! Owns: `proto/coreblk/v1/*.proto` (the source of truth: read `common.proto` first for
//! the conventions every service follows), `proto/csi/v1/csi.proto` (Identity, Controller
//! and Node of the CSI spec, field numbers as the spec has them) and the code generated
//! from them by `build.rs` (protox + tonic-prost-build; no system `protoc`). Nothing
//! hand-written lives here but these re-exports. Must never: depend on the daemon.

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

/// The CSI spec.
pub mod csi {
    /// `csi.v1` (spec v1.12.0): messages, `identity_*`, `controller_*` and `node_*`
    /// client and server modules.
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
        tonic::include_proto!("csi.v1");
    }
}
