//! Thin volume store (issue 10, DESIGN §4): pools, thin volumes, snapshots and clones on one
//! block device, with a checksummed metadata journal. Being written.
