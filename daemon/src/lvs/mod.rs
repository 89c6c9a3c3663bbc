//! Thin volume store (issue 10, DESIGN §4): pools, thin volumes, snapshots and clones on one
//! block device, with a checksummed metadata journal. `FORMAT.md` beside this file is the
//! on-disk contract.
//!
//! Built: the on-disk encodings ([`format`]), the journal with group commit, ordered
//! flushes and replay ([`journal`]), pools ([`pool`]: layout, create, import), the volume
//! table ([`table`]: volumes, snapshots, clones, lineage), checkpoints ([`checkpoint`]),
//! the allocator ([`alloc`]: reference counts; a cluster is reused only once durably
//! unreferenced and durably zero), the lock-free cluster map with copy-on-write leaves
//! shared by snapshots and clones ([`map`]), and the pool runtime ([`volume`]: the IO
//! path, snapshots, clones, rollback, inflate, diff, accounting; reads served on every
//! reactor, other requests forwarded to the owner). Sits above `bdev` and `reactor`;
//! never calls into `export` or `control`.

pub mod alloc;
pub mod checkpoint;
pub mod format;
pub mod journal;
pub mod map;
pub mod pool;
pub mod qos;
pub mod table;
pub mod verify;
pub mod volume;
