//! The metadata journal (FORMAT.md §3): group commit, ordered device flushes, and replay.
//!
//! Lives on the pool's owner reactor (one owner at a time: every mutation of metadata is a
//! message to it). Callers append records with a completion; records appended while a
//! journal write is in flight ride in the next write together (group commit), so N
//! concurrent allocations cost one journal write, not N. One journal write is in flight at
//! a time and each starts after the previous one completed: the journal on the device is
//! always a prefix plus (after a power cut) possibly holes after the last flushed block —
//! replay stops at the first hole.
//!
//! FLUSH ([`Journal::flush`]) waits for the journal write in flight, then issues one
//! device flush; flushes that arrive meanwhile share it; with nothing pending a FLUSH costs
//! exactly one device flush (DESIGN §4 invariant 4).
//!
//! Must never: acknowledge a record before the write holding it completed, reorder records,
//! or lap the ring past the last checkpoint.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::format::{self, Record, Superblock, BLOCK_BYTES};
use crate::bdev::{Channel, Io};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor};

/// Called once on the owner reactor when a commit or flush finishes. `Ok(seq)` carries the
/// last journal block sequence that holds the caller's records (0 for a flush).
pub type Done = Box<dyn FnOnce(&Reactor, Result<u64, Errno>)>;

/// Most blocks one journal write carries (bounded IO size).
pub const MAX_BLOCKS_PER_WRITE: u64 = 64;

/// A callback the journal holds (the pressure hook).
pub type Hook = Rc<dyn Fn(&Reactor)>;

const TAG_WRITE: u64 = 0;
const TAG_FLUSH: u64 = 1;
const TAG_FENCE: u64 = 2;
const TAG_FENCE_FLUSH: u64 = 3;

/// Counters for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JournalStats {
    /// Journal writes issued.
    pub writes: u64,
    /// Journal blocks written.
    pub blocks: u64,
    /// Records written.
    pub records: u64,
    /// Device flushes issued.
    pub flushes: u64,
    /// Commits (append calls) acknowledged.
    pub commits: u64,
    /// How long the journal writes that completed took, submit to completion.
    pub write_latency: LatencyCounts,
}

/// Upper bounds of the journal write latency buckets, in nanoseconds (100 µs … 2.5 s; a
/// last bucket counts the slower ones).
pub const WRITE_LATENCY_BOUNDS_NS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// A latency histogram read out: per bucket (not cumulative; the last one past every
/// bound), and the sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatencyCounts {
    /// Writes per bucket of [`WRITE_LATENCY_BOUNDS_NS`], then those slower than all.
    pub buckets: [u64; WRITE_LATENCY_BOUNDS_NS.len() + 1],
    /// Sum of the latencies.
    pub sum_ns: u64,
}

impl LatencyCounts {
    /// Writes counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Journal write latencies, recorded on the owner reactor: a fixed set of atomic counters
/// (no lock, no allocation per write), readable from any thread.
#[derive(Debug, Default)]
struct WriteLatency {
    buckets: [AtomicU64; WRITE_LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl WriteLatency {
    fn record(&self, ns: u64) {
        let i = WRITE_LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn counts(&self) -> LatencyCounts {
        LatencyCounts {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The journal writer of one pool.
pub struct Journal {
    me: Weak<Journal>,
    ch: Rc<dyn Channel>,
    sb: Superblock,
    /// Sequence of the next block to write.
    next_seq: Cell<u64>,
    /// Blocks at or below this sequence may be overwritten (covered by a checkpoint).
    reusable_below: Cell<u64>,
    /// Records waiting for the next write, with the completions of their commits (each
    /// completion follows its commit's last record).
    pending: RefCell<Vec<Record>>,
    pending_done: RefCell<Vec<(usize, Done)>>,
    /// The write in flight: completions, the last sequence it covers, and whether it ends
    /// at the end of a commit.
    inflight: RefCell<Option<(Vec<Done>, u64, bool)>>,
    /// Flushes waiting to start (after the write in flight) and the one in flight.
    flush_waiting: RefCell<Vec<Done>>,
    flush_inflight: RefCell<Option<Vec<Done>>>,
    /// What the flush in flight covers: every block up to this sequence.
    flush_covers: Cell<u64>,
    /// Every block up to this sequence is durable (a flush covering it completed).
    flushed: Cell<u64>,
    /// A journal write failed: the pool must be re-imported; everything fails with EIO.
    failed: Cell<bool>,
    /// Requests of the start-up fence still in flight (see [`Journal::fence`]).
    fencing: Cell<u32>,
    /// Last sequence whose write completed (set before its completions run).
    completed: Cell<u64>,
    /// Whether the last completed write ended at the end of a commit: then, outside its
    /// completions, the pool's memory is exactly every record up to `completed`.
    clean: Cell<bool>,
    /// Called when more than half the ring is uncovered by a checkpoint, or when it is
    /// full and records wait (the pool then writes a checkpoint and calls `resume`).
    pressure: RefCell<Option<Hook>>,
    stats: Cell<JournalStats>,
    /// When the write in flight was submitted.
    write_submitted: Cell<Option<Instant>>,
    write_latency: WriteLatency,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("next_seq", &self.next_seq.get())
            .field("pending", &self.pending.borrow().len())
            .field("stats", &self.stats.get())
            .finish()
    }
}

impl Journal {
    /// A journal that writes blocks from `next_seq` on, through `ch` (the owner reactor's
    /// channel to the pool device). `reusable_below` is the superblock's first sequence.
    pub fn new(ch: Rc<dyn Channel>, sb: Superblock, next_seq: u64) -> Rc<Self> {
        Rc::new_cyclic(|me| Self {
            me: me.clone(),
            ch,
            reusable_below: Cell::new(sb.first_seq),
            sb,
            next_seq: Cell::new(next_seq),
            pending: RefCell::new(Vec::new()),
            pending_done: RefCell::new(Vec::new()),
            inflight: RefCell::new(None),
            flush_waiting: RefCell::new(Vec::new()),
            flush_inflight: RefCell::new(None),
            flush_covers: Cell::new(0),
            // Replayed blocks were read back from the device; treat them as durable only
            // after the first flush (the fence's flush covers them).
            flushed: Cell::new(0),
            failed: Cell::new(false),
            fencing: Cell::new(0),
            completed: Cell::new(next_seq.saturating_sub(1)),
            clean: Cell::new(true),
            pressure: RefCell::new(None),
            stats: Cell::new(JournalStats::default()),
            write_submitted: Cell::new(None),
            write_latency: WriteLatency::default(),
        })
    }

    /// Counters, and the write latencies so far.
    pub fn stats(&self) -> JournalStats {
        JournalStats {
            write_latency: self.write_latency.counts(),
            ..self.stats.get()
        }
    }

    /// Sequence of the next block to be written.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.get()
    }

    /// Records that a checkpoint now covers every block below `seq`.
    pub fn set_checkpointed(&self, seq: u64) {
        self.reusable_below.set(self.reusable_below.get().max(seq));
    }

    /// The last sequence whose write completed.
    pub fn completed_seq(&self) -> u64 {
        self.completed.get()
    }

    /// The sequence a checkpoint may be taken at now (outside journal completions): the
    /// pool's memory holds every record up to it and none after. `None` while a commit is
    /// split across writes (try again after the next write).
    pub fn checkpoint_seq(&self) -> Option<u64> {
        self.clean.get().then(|| self.completed.get())
    }

    /// A journal write failed: the pool takes no metadata change until it is imported again.
    pub fn has_failed(&self) -> bool {
        self.failed.get()
    }

    /// Every journal block up to this sequence is durable.
    pub fn flushed_seq(&self) -> u64 {
        self.flushed.get()
    }

    /// Blocks written since the checkpoint's first sequence (what replay would read).
    pub fn uncovered_blocks(&self) -> u64 {
        self.next_seq
            .get()
            .saturating_sub(self.reusable_below.get())
    }

    /// Sets the hook called under ring pressure (see the field).
    pub fn set_pressure_hook(&self, hook: Hook) {
        *self.pressure.borrow_mut() = Some(hook);
    }

    /// Start-up fence, before the first write of a freshly imported pool: a power loss
    /// may have left valid blocks past the point where replay stopped (any of the blocks
    /// written after the last flush, up to the journal reach past it, may be missing or
    /// present); new writes would overwrite only some of them, and after another crash
    /// replay would run on into those stale, never-flushed records. Import found every
    /// such block (`stale`: their sequences, from [`super::pool::Imported::torn_tail`]),
    /// so exactly those are zeroed (in writes of at most one journal write's size), then
    /// the device is flushed (which also makes every replayed block durable); appends and
    /// flushes wait for that. A position holding no valid block past the stop cannot
    /// become one: only this writer writes the ring, and it has not started.
    pub fn fence(&self, rx: &Reactor, stale: &[u64]) {
        let ring = self.sb.journal_blocks();
        let first = self.next_seq.get();
        // Runs of consecutive sequences that do not wrap the ring, each at most one
        // journal write long.
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        for &seq in stale.iter().filter(|&&s| s >= first) {
            match pieces.last_mut() {
                Some((start, n))
                    if *start + *n == seq && *n < MAX_BLOCKS_PER_WRITE && (seq % ring) != 0 =>
                {
                    *n += 1;
                }
                _ => pieces.push((seq, 1)),
            }
        }
        if pieces.is_empty() {
            self.fencing.set(1);
            self.ch
                .submit(rx, Io::Flush, self.completion(), TAG_FENCE_FLUSH);
            return;
        }
        self.fencing
            .set(u32::try_from(pieces.len()).expect("a bounded fence"));
        for (seq, blocks) in pieces {
            let io = Io::WriteZeroes {
                offset: self.sb.journal_block_offset(seq),
                len: blocks * BLOCK_BYTES as u64,
            };
            self.ch.submit(rx, io, self.completion(), TAG_FENCE);
        }
    }

    /// A checkpoint made room: start waiting writes.
    pub fn resume(&self, rx: &Reactor) {
        self.kick(rx);
    }

    /// No checkpoint could make room: fail the records waiting for it with `err`.
    pub fn fail_waiting(&self, rx: &Reactor, err: Errno) {
        if self.inflight.borrow().is_none() {
            self.fail_pending(rx, err);
        }
    }

    fn pressure(&self, rx: &Reactor) {
        let hook = self.pressure.borrow().clone();
        if let Some(h) = hook {
            h(rx);
        }
    }

    fn bump(&self, f: impl FnOnce(&mut JournalStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Appends `records` as one commit; `done` runs once the journal write holding the last
    /// of them has completed (or failed).
    pub fn append(&self, rx: &Reactor, records: Vec<Record>, done: Done) {
        if self.failed.get() {
            return done(rx, Err(Errno::EIO));
        }
        if let Some(r) = records
            .iter()
            .find(|r| r.encoded_len() > format::JOURNAL_PAYLOAD_BYTES)
        {
            tracing::error!(record = ?r, "journal record larger than a block");
            return done(rx, Err(Errno::EINVAL));
        }
        let mut pending = self.pending.borrow_mut();
        pending.extend(records);
        self.pending_done.borrow_mut().push((pending.len(), done));
        drop(pending);
        self.kick(rx);
    }

    /// FLUSH: completes once every journal write that completed before this call — and the
    /// one in flight — is durable, with one device flush shared by concurrent callers.
    pub fn flush(&self, rx: &Reactor, done: Done) {
        if self.failed.get() {
            return done(rx, Err(Errno::EIO));
        }
        self.flush_waiting.borrow_mut().push(done);
        self.try_start_flush(rx);
    }

    fn try_start_flush(&self, rx: &Reactor) {
        if self.fencing.get() > 0
            || self.flush_inflight.borrow().is_some()
            || self.inflight.borrow().is_some()
            || self.flush_waiting.borrow().is_empty()
        {
            return;
        }
        let waiters = std::mem::take(&mut *self.flush_waiting.borrow_mut());
        *self.flush_inflight.borrow_mut() = Some(waiters);
        // No journal write is in flight: every block written so far has completed.
        self.flush_covers.set(self.next_seq.get().saturating_sub(1));
        self.bump(|s| s.flushes += 1);
        self.ch.submit(rx, Io::Flush, self.completion(), TAG_FLUSH);
    }

    fn completion(&self) -> Rc<dyn Completion> {
        self.me
            .upgrade()
            .expect("the journal lives while it has IO in flight")
    }

    /// Starts the next journal write if none is in flight and records are waiting.
    fn kick(&self, rx: &Reactor) {
        if self.fencing.get() > 0
            || self.inflight.borrow().is_some()
            || self.pending.borrow().is_empty()
        {
            return;
        }
        let first = self.next_seq.get();
        let ring = self.sb.journal_blocks();
        // Blocks up to the ring's end (a write never wraps) and never over a block that a
        // checkpoint does not cover yet.
        let to_end = ring - first % ring;
        let room = (self.reusable_below.get() + ring).saturating_sub(first);
        // Within the device's largest transfer too.
        let transfer = u64::from(self.ch.geometry().max_transfer_bytes) / BLOCK_BYTES as u64;
        let max_blocks = MAX_BLOCKS_PER_WRITE
            .min(transfer.max(1))
            .min(to_end)
            .min(room);
        if max_blocks == 0 {
            if room == 0 && self.pressure.borrow().is_some() {
                // Records wait for the checkpoint the hook starts (or fails).
                return self.pressure(rx);
            }
            tracing::error!(
                next_seq = first,
                "journal ring full: no checkpoint covers the oldest blocks"
            );
            return self.fail_pending(rx, Errno::ENOSPC);
        }
        // Never more than the pool's journal reach past the last flush: after a power loss
        // any of those blocks may be missing, and import tells a torn tail from a damaged
        // journal by that distance. Flush first when the journal is that far ahead.
        let reach = self.sb.journal_reach_blocks();
        let ahead = (first - 1).saturating_sub(self.flushed.get());
        if ahead >= reach {
            if self.flush_inflight.borrow().is_none() && self.flush_waiting.borrow().is_empty() {
                self.flush_waiting
                    .borrow_mut()
                    .push(Box::new(|_rx: &Reactor, _r: Result<u64, Errno>| {}));
            }
            return self.try_start_flush(rx);
        }
        let max_blocks = max_blocks.min(reach - ahead);
        // Take whole records that fit in `max_blocks`.
        let mut pending = self.pending.borrow_mut();
        let mut blocks = 1u64;
        let mut used = 0usize;
        let mut take = 0usize;
        for r in pending.iter() {
            let len = r.encoded_len();
            if used + len > format::JOURNAL_PAYLOAD_BYTES {
                if blocks == max_blocks {
                    break;
                }
                blocks += 1;
                used = 0;
            }
            used += len;
            take += 1;
        }
        // End at a commit's end when one fits (a checkpoint needs such a point); a commit
        // larger than one write is split.
        let ends: Vec<usize> = self.pending_done.borrow().iter().map(|(e, _)| *e).collect();
        if !ends.contains(&take) {
            if let Some(&e) = ends.iter().rev().find(|&&e| e < take && e > 0) {
                take = e;
            }
        }
        let ends_commit = ends.contains(&take);
        let batch: Vec<Record> = pending.drain(..take).collect();
        drop(pending);
        // Commits whose last record is in this batch complete with it.
        let mut done = Vec::new();
        {
            let mut pd = self.pending_done.borrow_mut();
            let split = pd
                .iter()
                .position(|(end, _)| *end > take)
                .unwrap_or(pd.len());
            for (_, d) in pd.drain(..split) {
                done.push(d);
            }
            for (end, _) in pd.iter_mut() {
                *end -= take;
            }
        }
        let bytes = format::encode_journal_blocks(self.sb.journal_tag, first, &batch);
        let nblocks = (bytes.len() / BLOCK_BYTES) as u64;
        debug_assert!(nblocks <= blocks);
        self.next_seq.set(first + nblocks);
        *self.inflight.borrow_mut() = Some((done, first + nblocks - 1, ends_commit));
        self.bump(|s| {
            s.writes += 1;
            s.blocks += nblocks;
            s.records += batch.len() as u64;
        });
        let io = Io::Write {
            offset: self.sb.journal_block_offset(first),
            buf: IoBuf::from_slice(&bytes),
            fua: false,
        };
        self.write_submitted.set(Some(Instant::now()));
        self.ch.submit(rx, io, self.completion(), TAG_WRITE);
        if self.uncovered_blocks() > ring / 2 {
            self.pressure(rx);
        }
    }

    fn fail_pending(&self, rx: &Reactor, err: Errno) {
        self.pending.borrow_mut().clear();
        let done = std::mem::take(&mut *self.pending_done.borrow_mut());
        for (_, d) in done {
            d(rx, Err(err));
        }
    }
}

impl Completion for Journal {
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, _buf: Option<IoBuf>) {
        match tag {
            TAG_WRITE => {
                let (done, last_seq, ends_commit) = self
                    .inflight
                    .borrow_mut()
                    .take()
                    .expect("a journal write was in flight");
                let res = match res {
                    Ok(_) => Ok(last_seq),
                    Err(e) => {
                        // The journal is now of unknown state past this point: stop the pool
                        // rather than write records after a hole that replay would ignore.
                        tracing::error!(errno = %e, "journal write failed; the pool stops taking metadata changes");
                        self.failed.set(true);
                        Err(e)
                    }
                };
                self.bump(|s| s.commits += done.len() as u64);
                if let (Ok(_), Some(t0)) = (&res, self.write_submitted.take()) {
                    let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.write_latency.record(ns);
                }
                if res.is_ok() {
                    // Before the completions: a FUA write they release compares with it.
                    self.completed.set(last_seq);
                    self.clean.set(ends_commit);
                }
                for d in done {
                    d(rx, res);
                }
                if self.failed.get() {
                    self.fail_pending(rx, Errno::EIO);
                    let flushes = std::mem::take(&mut *self.flush_waiting.borrow_mut());
                    for d in flushes {
                        d(rx, Err(Errno::EIO));
                    }
                    return;
                }
                self.try_start_flush(rx);
                self.kick(rx);
            }
            TAG_FENCE | TAG_FENCE_FLUSH => {
                if let Err(e) = res {
                    tracing::error!(errno = %e, "journal start-up fence failed; the pool stops taking metadata changes");
                    self.failed.set(true);
                }
                self.fencing.set(self.fencing.get() - 1);
                if self.fencing.get() > 0 {
                    return;
                }
                if tag == TAG_FENCE && !self.failed.get() {
                    // The zeroes must be durable before any new block lands before them.
                    self.fencing.set(1);
                    self.ch
                        .submit(rx, Io::Flush, self.completion(), TAG_FENCE_FLUSH);
                    return;
                }
                if self.failed.get() {
                    self.fail_pending(rx, Errno::EIO);
                    let flushes = std::mem::take(&mut *self.flush_waiting.borrow_mut());
                    for d in flushes {
                        d(rx, Err(Errno::EIO));
                    }
                    return;
                }
                // The fence's flush made every replayed block durable too.
                self.flushed.set(self.next_seq.get().saturating_sub(1));
                self.try_start_flush(rx);
                self.kick(rx);
            }
            _ => {
                let waiters = self
                    .flush_inflight
                    .borrow_mut()
                    .take()
                    .expect("a flush was in flight");
                let res = res.map(|_| 0);
                if res.is_ok() {
                    self.flushed
                        .set(self.flushed.get().max(self.flush_covers.get()));
                }
                for d in waiters {
                    d(rx, res);
                }
                self.try_start_flush(rx);
                self.kick(rx);
            }
        }
    }
}

/// What replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Records in order, with the sequence of the block that held each.
    pub records: Vec<(u64, Record)>,
    /// The first sequence that did not decode: the next block to write.
    pub next_seq: u64,
    /// Why replay stopped there.
    pub stop: format::DecodeError,
}

/// The sequences of valid journal blocks past `stop` (the end of replay) found in `ring`,
/// the whole journal area's bytes, sorted.
pub fn valid_blocks_past(sb: &Superblock, stop: u64, ring: &[u8]) -> Vec<u64> {
    let blocks = sb.journal_blocks();
    let mut past: Vec<u64> = ring
        .chunks(BLOCK_BYTES)
        .enumerate()
        .filter_map(|(pos, b)| {
            let found = u64::from_le_bytes(b.get(16..24)?.try_into().ok()?);
            (found > stop
                && found % blocks == pos as u64
                && format::decode_journal_block(b, sb.journal_tag, found).is_ok())
            .then_some(found)
        })
        .collect();
    past.sort_unstable();
    past
}

/// Replays the journal from `sb.first_seq`, reading blocks through `read_block(offset)`.
/// Stops at the first block that fails to decode or after one full ring.
pub fn replay(sb: &Superblock, mut read_block: impl FnMut(u64) -> Option<Vec<u8>>) -> Replay {
    let mut records = Vec::new();
    let mut seq = sb.first_seq;
    let end = sb.first_seq + sb.journal_blocks();
    let stop = loop {
        if seq == end {
            break format::DecodeError::Field {
                field: "journal",
                why: "a full ring replayed without a checkpoint".into(),
            };
        }
        let Some(b) = read_block(sb.journal_block_offset(seq)) else {
            break format::DecodeError::Field {
                field: "journal",
                why: format!("block {seq} unreadable"),
            };
        };
        match format::decode_journal_block(&b, sb.journal_tag, seq) {
            Ok(rs) => records.extend(rs.into_iter().map(|r| (seq, r))),
            Err(e) => break e,
        }
        seq += 1;
    };
    Replay {
        records,
        next_seq: seq,
        stop,
    }
}

/// Replay and the damaged-block check of [`valid_blocks_past`] in one pass over the ring,
/// fed block by block in ring order from the position of `sb.first_seq` (wrapping), so an
/// import reads each journal block once, a chunk at a time, and never holds the whole
/// ring: on a slow machine the ring's copies cost more than its reads.
#[derive(Debug)]
pub struct RingScan<'a> {
    sb: &'a Superblock,
    blocks: u64,
    next: u64,
    fed: u64,
    records: Vec<(u64, Record)>,
    stop: Option<format::DecodeError>,
    past: Vec<u64>,
}

impl<'a> RingScan<'a> {
    /// A scan of `sb`'s journal; the first block fed is the one holding `sb.first_seq`.
    pub fn new(sb: &'a Superblock) -> Self {
        Self {
            sb,
            blocks: sb.journal_blocks(),
            next: sb.first_seq,
            fed: 0,
            records: Vec::new(),
            stop: None,
            past: Vec::new(),
        }
    }

    /// The ring position of the next block to feed.
    pub fn next_pos(&self) -> u64 {
        (self.sb.first_seq + self.fed) % self.blocks
    }

    /// Blocks still to feed for one whole ring.
    pub fn remaining(&self) -> u64 {
        self.blocks - self.fed
    }

    /// Feeds the block at [`Self::next_pos`].
    pub fn feed(&mut self, b: &[u8]) {
        let pos = self.next_pos();
        self.fed += 1;
        match &self.stop {
            None => match format::decode_journal_block(b, self.sb.journal_tag, self.next) {
                Ok(rs) => {
                    let seq = self.next;
                    self.records.extend(rs.into_iter().map(|r| (seq, r)));
                    self.next += 1;
                    if self.next == self.sb.first_seq + self.blocks {
                        self.stop = Some(format::DecodeError::Field {
                            field: "journal",
                            why: "a full ring replayed without a checkpoint".into(),
                        });
                    }
                }
                Err(e) => self.stop = Some(e),
            },
            Some(_) => {
                let Some(found) = b
                    .get(16..24)
                    .and_then(|h| h.try_into().ok())
                    .map(u64::from_le_bytes)
                else {
                    return;
                };
                if found > self.next
                    && found % self.blocks == pos
                    && format::decode_journal_block(b, self.sb.journal_tag, found).is_ok()
                {
                    self.past.push(found);
                }
            }
        }
    }

    /// The replay, and the sequences of valid blocks past its end (sorted), as
    /// [`replay`] and [`valid_blocks_past`] give them for the whole ring.
    pub fn finish(mut self) -> (Replay, Vec<u64>) {
        let stop = self.stop.unwrap_or_else(|| format::DecodeError::Field {
            field: "journal",
            why: format!("block {} unread", self.next),
        });
        self.past.sort_unstable();
        (
            Replay {
                records: self.records,
                next_seq: self.next,
                stop,
            },
            self.past,
        )
    }
}

#[cfg(test)]
mod tests;
