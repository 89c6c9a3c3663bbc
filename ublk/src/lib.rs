//! `coreblk-ublk`: the Linux ublk protocol (issue 12, DESIGN §5).
//!
//! Will own: control commands on `/dev/ublk-control` (feature negotiation, add, set/get
//! params, start, stop, delete, user recovery, quiesce, update size), per-queue IO commands
//! on `/dev/ublkcN` and the mmap of the IO descriptor array. It knows nothing of volumes;
//! the daemon's `export` layer binds its queues to reactors. No code lives here yet.
