//! Exports: volumes served to the kernel as ublk block devices (`/dev/ublkbN`), one ublk
//! hardware queue per reactor, each queue's commands in that reactor's own io_uring
//! (DESIGN §5, issue 12). A request goes kernel → reactor → volume → device → reactor →
//! kernel with no thread hop and no lock.
//!
//! Owns: [`queue`] (a queue's state machine on its reactor: FETCH, serve, COMMIT_AND_FETCH;
//! zero copy with AUTO_BUF_REG, and the copy data path through `/dev/ublkcN` with
//! USER_COPY that requests fall back to), the pure pieces it is made
//! of (how a descriptor becomes volume requests, splitting, errno mapping: this module),
//! device parameters from a volume ([`device_params`]) and the persisted export record
//! ([`Record`]). The control plane (`control/exports.rs`) adds, starts, stops and deletes
//! devices (blocking ublk control commands, on its blocking pool) and opens the queues
//! here by message. Per-export IO counters for `/metrics`: [`stats`].
//!
//! Must never: block a reactor (control commands never run here), allocate per IO in
//! steady state (per-tag state is preallocated, buffers come from the reactor's pool),
//! leave a kernel request without an answer while the queue runs, or parse a tenant's
//! bytes.
//!
//! Start reading at [`queue::Queue::start`], then [`plan`].

pub mod queue;
pub mod stats;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::bdev::{Channel, Geometry};
use crate::reactor::{Errno, Reactor};

thread_local! {
    /// The queues this reactor serves, by ublk device id.
    static QUEUES: RefCell<HashMap<u32, Rc<queue::Queue>>> = RefCell::new(HashMap::new());
}

/// Starts serving queue `spec` of a device on this reactor over `vol` (a channel opened
/// on this reactor); returns the volume's geometry.
///
/// # Errors
/// The queue cannot be set up (the message says why); nothing is left behind.
pub fn install(
    rx: &Reactor,
    spec: queue::QueueSpec,
    vol: Rc<dyn Channel>,
) -> Result<Geometry, String> {
    let dev_id = spec.dev_id;
    if QUEUES.with(|q| q.borrow().contains_key(&dev_id)) {
        return Err(format!(
            "reactor {} already serves a queue of ublk device {dev_id}",
            rx.id()
        ));
    }
    let geo = vol.geometry().clone();
    let q = queue::Queue::start(rx, spec, vol)?;
    QUEUES.with(|qs| qs.borrow_mut().insert(dev_id, q));
    Ok(geo)
}

/// Runs `f` on this reactor's queue of device `dev_id`, if it serves one.
pub fn with_queue<T>(dev_id: u32, f: impl FnOnce(&Rc<queue::Queue>) -> T) -> Option<T> {
    let q = QUEUES.with(|qs| qs.borrow().get(&dev_id).cloned())?;
    Some(f(&q))
}

/// Forgets this reactor's queue of device `dev_id` (its tags dead, or the device gone):
/// its fixed file and handler are released.
pub fn remove(rx: &Reactor, dev_id: u32) {
    if let Some(q) = QUEUES.with(|qs| qs.borrow_mut().remove(&dev_id)) {
        q.close(rx);
    }
}

/// Device ids this reactor serves queues of.
#[must_use]
pub fn served() -> Vec<u32> {
    QUEUES.with(|qs| qs.borrow().keys().copied().collect())
}

/// Sector size of the ublk protocol (descriptor `start_sector`, `nr_sectors`).
pub const SECTOR_BYTES: u64 = 512;
/// Default tags per queue.
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Default largest request the kernel sends.
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;
/// Largest discard / write-zeroes request the device advertises.
pub const MAX_DISCARD_BYTES: u64 = 1 << 30;

/// What one kernel request asks of the volume (from its IO descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Read `len` bytes at `offset` (in pieces of at most the piece size).
    Read {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write `len` bytes at `offset`; `fua`: each piece durable before it completes.
    Write {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Answer at once with this (negative errno) result.
    Refuse(i32),
}

/// The kinds of request a ublk descriptor carries, as [`plan`] sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescOp {
    /// READ.
    Read,
    /// WRITE.
    Write,
    /// FLUSH.
    Flush,
    /// DISCARD.
    Discard,
    /// WRITE_ZEROES.
    WriteZeroes,
    /// Anything else (zone operations...).
    Other,
}

/// Turns one descriptor into what the volume is asked. A write to a read-only export, an
/// empty data request or an unknown op is refused (EROFS→EIO for writes: the kernel does
/// not send them to a read-only disk, so one that arrives is an error).
#[must_use]
pub fn plan(op: DescOp, start_sector: u64, nr_sectors: u32, fua: bool, read_only: bool) -> Plan {
    let offset = start_sector.saturating_mul(SECTOR_BYTES);
    let len = u64::from(nr_sectors) * SECTOR_BYTES;
    let write = matches!(op, DescOp::Write | DescOp::Discard | DescOp::WriteZeroes);
    if write && read_only {
        return Plan::Refuse(-libc::EIO);
    }
    match op {
        DescOp::Read | DescOp::Write if len == 0 => Plan::Refuse(-libc::EIO),
        DescOp::Read => Plan::Read { offset, len },
        DescOp::Write => Plan::Write { offset, len, fua },
        DescOp::Flush => Plan::Flush,
        DescOp::Discard => Plan::Discard { offset, len },
        DescOp::WriteZeroes => Plan::WriteZeroes { offset, len },
        DescOp::Other => Plan::Refuse(-libc::EOPNOTSUPP),
    }
}

/// Length of the piece of a `total`-byte request starting at `done`: requests larger than
/// a pooled buffer go in buffer-sized pieces, one after another, so a request holds at
/// most one buffer at a time (requests waiting for buffers can never deadlock each other,
/// and pool memory does not grow with the max IO size).
#[must_use]
pub fn piece_len(total: u64, done: u64, piece_bytes: u64) -> u64 {
    debug_assert!(done < total && piece_bytes > 0);
    (total - done).min(piece_bytes)
}

/// The piece size for a queue: the pool's chunk, no larger than one volume transfer,
/// rounded down to whole logical blocks.
#[must_use]
pub fn piece_bytes(chunk_bytes: u64, max_transfer_bytes: u64, lbs: u64) -> u64 {
    let n = chunk_bytes.min(max_transfer_bytes.max(lbs));
    (n / lbs).max(1) * lbs
}

/// Whether a request is served zero copy (its pages, registered by the kernel at the tag's
/// fixed-buffer slot, go to the volume as a kernel buffer) or through the copy path: only
/// reads and writes, only on a queue holding slots, only when the kernel did register the
/// pages (`need_reg_buf`: FALLBACK told us it could not), and only when the volume channel
/// takes kernel buffers for that direction (`takes(write)`).
#[must_use]
pub fn serve_zero_copy(
    p: &Plan,
    has_slots: bool,
    need_reg_buf: bool,
    takes: impl FnOnce(bool) -> bool,
) -> bool {
    let write = match p {
        Plan::Read { .. } => false,
        Plan::Write { .. } => true,
        _ => return false,
    };
    has_slots && !need_reg_buf && takes(write)
}

/// The result a kernel request is committed with when the volume failed it: no space
/// stays no space (the kernel's BLK_STS_NOSPC, so the writer sees ENOSPC), unsupported
/// stays unsupported, everything else is an IO error.
#[must_use]
pub fn commit_errno(e: Errno) -> i32 {
    match e.0 {
        libc::ENOSPC => -libc::ENOSPC,
        libc::EOPNOTSUPP => -libc::EOPNOTSUPP,
        _ => -libc::EIO,
    }
}

/// Which data path an export uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// USER_COPY: bytes copied through `/dev/ublkcN` into pooled buffers.
    Copy,
    /// AUTO_BUF_REG: the request's pages registered in the reactor's ring.
    ZeroCopy,
}

impl PathKind {
    /// Its name in records, logs and the API.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Copy => "copy",
            PathKind::ZeroCopy => "zero-copy",
        }
    }
}

/// What is persisted for one export, so the next daemon can re-attach to (or re-create)
/// its device: JSON bytes in the volume store's export record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Record format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The ublk device id (`/dev/ublkbN`).
    pub dev_id: u32,
    /// Re-created after a node reboot.
    pub persistent: bool,
    /// Exported read-only.
    pub read_only: bool,
    /// Tags per queue.
    pub queue_depth: u16,
    /// Largest request.
    pub max_io_bytes: u32,
    /// Hardware queues (one per serving reactor).
    pub nr_queues: u16,
    /// The data path.
    pub path: PathKind,
}

/// The version of [`Record`] this daemon writes and reads.
pub const RECORD_VERSION: u32 = 1;

impl Record {
    /// The bytes stored.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an export record always serialises")
    }

    /// Reads stored bytes back.
    ///
    /// # Errors
    /// Not a record of this version (the message says what is wrong).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let r: Record =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable export record: {e}"))?;
        if r.version != RECORD_VERSION {
            return Err(format!(
                "export record version {} (this coreblkd reads {RECORD_VERSION})",
                r.version
            ));
        }
        Ok(r)
    }
}

/// ublk device parameters for a volume: logical block size from the volume, physical
/// 4 KiB, discard granularity the cluster (a partial cluster is not freed), discard and
/// write-zeroes up to [`MAX_DISCARD_BYTES`], a volatile cache with FUA (so the kernel
/// sends FLUSH, which commits the journal, and FUA writes), io_min the physical block and
/// io_opt the cluster (a write of a whole cluster into an unmapped one needs no
/// copy-on-write).
#[must_use]
pub fn device_params(
    size_bytes: u64,
    lbs: u32,
    cluster_bytes: u64,
    max_io_bytes: u32,
    read_only: bool,
) -> coreblk_ublk::Params {
    let shift = |v: u64| u8::try_from(v.max(1).ilog2()).unwrap_or(u8::MAX);
    let lbs64 = u64::from(lbs);
    let max_discard_sectors =
        u32::try_from(MAX_DISCARD_BYTES / SECTOR_BYTES).expect("a small constant");
    coreblk_ublk::Params {
        dev_sectors: size_bytes / SECTOR_BYTES,
        logical_bs_shift: shift(lbs64),
        physical_bs_shift: shift(lbs64.max(4096)),
        io_min_shift: shift(lbs64.max(4096)),
        io_opt_shift: shift(cluster_bytes.max(lbs64)),
        max_sectors: max_io_bytes / 512,
        volatile_cache: true,
        fua: true,
        read_only,
        rotational: false,
        discard: Some(coreblk_ublk::Discard {
            alignment: 0,
            granularity: u32::try_from(cluster_bytes.max(lbs64)).unwrap_or(u32::MAX),
            max_discard_sectors,
            max_write_zeroes_sectors: max_discard_sectors,
            max_discard_segments: 1,
        }),
        dma_align_mask: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_become_volume_requests() {
        assert_eq!(
            plan(DescOp::Read, 8, 8, false, false),
            Plan::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            plan(DescOp::Write, 0, 256, true, false),
            Plan::Write {
                offset: 0,
                len: 128 << 10,
                fua: true
            }
        );
        assert_eq!(plan(DescOp::Flush, 0, 0, false, false), Plan::Flush);
        assert_eq!(
            plan(DescOp::Discard, 2048, 2048, false, false),
            Plan::Discard {
                offset: 1 << 20,
                len: 1 << 20
            }
        );
        assert_eq!(
            plan(DescOp::WriteZeroes, 1, 1, false, false),
            Plan::WriteZeroes {
                offset: 512,
                len: 512
            }
        );
        assert_eq!(
            plan(DescOp::Other, 0, 8, false, false),
            Plan::Refuse(-libc::EOPNOTSUPP)
        );
        assert_eq!(
            plan(DescOp::Read, 0, 0, false, false),
            Plan::Refuse(-libc::EIO)
        );
    }

    #[test]
    fn read_only_exports_refuse_every_write_kind() {
        for op in [DescOp::Write, DescOp::Discard, DescOp::WriteZeroes] {
            assert_eq!(
                plan(op, 0, 8, false, true),
                Plan::Refuse(-libc::EIO),
                "{op:?}"
            );
        }
        assert!(matches!(
            plan(DescOp::Read, 0, 8, false, true),
            Plan::Read { .. }
        ));
        assert_eq!(plan(DescOp::Flush, 0, 0, false, true), Plan::Flush);
    }

    #[test]
    fn large_requests_go_in_buffer_sized_pieces() {
        let piece = piece_bytes(128 << 10, 1 << 20, 4096);
        assert_eq!(piece, 128 << 10);
        let total = 512 << 10;
        let mut done = 0;
        let mut pieces = Vec::new();
        while done < total {
            let n = piece_len(total, done, piece);
            pieces.push(n);
            done += n;
        }
        assert_eq!(pieces, vec![128 << 10; 4]);
        assert_eq!(piece_len(200 << 10, 128 << 10, piece), 72 << 10);
        // A device that takes smaller transfers than a chunk bounds the piece.
        assert_eq!(piece_bytes(128 << 10, 64 << 10, 4096), 64 << 10);
        // Never below one logical block, always whole blocks.
        assert_eq!(piece_bytes(128 << 10, 1000, 4096), 4096);
        assert_eq!(piece_bytes(6000, 1 << 20, 4096), 4096);
    }

    #[test]
    fn volume_errors_map_to_kernel_results() {
        assert_eq!(commit_errno(Errno::ENOSPC), -libc::ENOSPC);
        assert_eq!(commit_errno(Errno::EOPNOTSUPP), -libc::EOPNOTSUPP);
        for e in [
            Errno::EIO,
            Errno::EINVAL,
            Errno(libc::ENODEV),
            Errno(libc::EROFS),
        ] {
            assert_eq!(commit_errno(e), -libc::EIO, "{e}");
        }
    }

    #[test]
    fn records_round_trip_and_refuse_other_versions() {
        let r = Record {
            version: RECORD_VERSION,
            dev_id: 3,
            persistent: true,
            read_only: false,
            queue_depth: 128,
            max_io_bytes: 512 << 10,
            nr_queues: 2,
            path: PathKind::Copy,
        };
        let bytes = r.encode();
        assert_eq!(Record::decode(&bytes).expect("decode"), r);
        assert!(String::from_utf8_lossy(&bytes).contains("\"path\":\"copy\""));
        let mut old = r.clone();
        old.version = 99;
        assert!(Record::decode(&old.encode())
            .expect_err("version")
            .contains("version 99"));
        assert!(Record::decode(b"{").is_err());
    }

    #[test]
    fn zero_copy_only_for_data_the_kernel_registered_and_the_channel_takes() {
        let read = Plan::Read {
            offset: 0,
            len: 4096,
        };
        let write = Plan::Write {
            offset: 0,
            len: 4096,
            fua: false,
        };
        // A remote volume channel: reads yes, writes travel as bytes.
        let reads_only = |w: bool| !w;
        assert!(serve_zero_copy(&read, true, false, reads_only));
        assert!(
            !serve_zero_copy(&write, true, false, reads_only),
            "write copied"
        );
        assert!(serve_zero_copy(&write, true, false, |_| true));
        assert!(!serve_zero_copy(&read, false, false, |_| true), "no slots");
        assert!(
            !serve_zero_copy(&read, true, true, |_| true),
            "FALLBACK: the kernel did not register the pages"
        );
        for p in [
            Plan::Flush,
            Plan::Discard {
                offset: 0,
                len: 4096,
            },
            Plan::WriteZeroes {
                offset: 0,
                len: 4096,
            },
            Plan::Refuse(-libc::EIO),
        ] {
            assert!(
                !serve_zero_copy(&p, true, false, |_| true),
                "{p:?}: no data"
            );
        }
    }

    #[test]
    fn parameters_follow_the_volume() {
        let p = device_params(10 << 30, 4096, 1 << 20, 512 << 10, false);
        assert_eq!(p.dev_sectors, (10 << 30) / 512);
        assert_eq!(p.logical_bs_shift, 12);
        assert_eq!(p.physical_bs_shift, 12);
        assert_eq!(p.io_min_shift, 12);
        assert_eq!(p.io_opt_shift, 20);
        assert_eq!(p.max_sectors, 1024);
        assert!(p.volatile_cache && p.fua && !p.read_only && !p.rotational);
        let d = p.discard.expect("discard");
        assert_eq!(d.granularity, 1 << 20);
        assert_eq!(d.max_discard_sectors, (1 << 30) / 512);
        let p = device_params(1 << 30, 512, 64 << 10, 128 << 10, true);
        assert_eq!(p.logical_bs_shift, 9);
        assert_eq!(p.physical_bs_shift, 12);
        assert!(p.read_only);
    }
}
