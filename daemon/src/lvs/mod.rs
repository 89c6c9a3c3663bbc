//! Thin volume store (issue 10, DESIGN §4): pools, thin volumes, snapshots and clones on one
//! block device, with a checksummed metadata journal. `FORMAT.md` beside this file is the
//! on-disk contract.
//!
//! Built so far: the on-disk encodings ([`format`]), the journal with group commit,
//! ordered flushes and replay ([`journal`]), and pools ([`pool`]: layout, create, import,
//! the volume table as journal records). Cluster maps, allocation, the volume IO path,
//! checkpoints and snapshots come next. Sits above `bdev` and `reactor`; never calls into `export` or
//! `control`.

pub mod format;
pub mod journal;
pub mod pool;
