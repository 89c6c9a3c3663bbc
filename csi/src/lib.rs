//! `coreblk-csi`: the CSI driver (issue 13, DESIGN §7).
//!
//! Will own: the CSI Identity, Controller and Node services, each a thin mapping onto the
//! local daemon's gRPC API (no state of its own), and the deploy manifests in
//! `csi/deploy/`. No code lives here yet.
