//! `coreblk-proto`: protobuf definitions and generated code (issue 11, DESIGN §6).
//!
//! Will own: `proto/coreblk/v1/*.proto` (the daemon API) and the CSI spec messages, compiled
//! without a system `protoc` (protox feeding tonic-prost-build). No code lives here yet.
