//! Thin volume store (issue 10, DESIGN §4): pools, thin volumes, snapshots and clones on one
//! block device, with a checksummed metadata journal. `FORMAT.md` beside this file is the
//! on-disk contract.
//!
//! Built so far: the on-disk encodings ([`format`]), the journal with group commit,
//! ordered flushes and replay ([`journal`]), pools ([`pool`]: layout, create, import,
//! the volume table as journal records), and the allocator's free-cluster pipeline
//! ([`alloc`]: a cluster is reused only once durably unreferenced and durably zero), and
//! the lock-free cluster map ([`map`]: read from any reactor, written by the owner), and
//! thin volumes ([`volume`]: the pool runtime on its owner reactor and the IO path —
//! allocate-on-write with group-committed map records, discard, write-zeroes, flush).
//! Next: serving volumes from every reactor, checkpoints (until then the journal ring
//! bounds a pool's metadata commits), snapshots and clones, verify, accounting. Sits above `bdev` and `reactor`; never calls into `export` or
//! `control`.

pub mod alloc;
pub mod checkpoint;
pub mod format;
pub mod journal;
pub mod map;
pub mod pool;
pub mod table;
pub mod verify;
pub mod volume;
