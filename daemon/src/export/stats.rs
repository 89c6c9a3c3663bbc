//! Per-export IO counters: requests, bytes and errors by kind, and a latency histogram
//! (read, write, other), recorded by each ublk queue on its own reactor and summed per
//! device at scrape time (`coreblk_volume_io_*` in `/metrics`).
//!
//! Owns: [`Recorder`] (one per queue, on the queue's reactor: the per-tag start times and
//! the writing side of the counters), [`IoStats`] (one queue's counters: atomics that only
//! that queue's reactor writes, readable from any thread), the process-wide [`Registry`]
//! the queues announce their counters to, and [`IoCounts`] (what a scrape reads: one
//! device's counters summed over its queues).
//!
//! Cost rule (the data path): recording a request is a handful of loads and stores into
//! memory only its reactor writes — no lock, no allocation, no atomic read-modify-write
//! (a single writer may `load` + `store`), and the clock is the reactor's loop-iteration
//! time ([`crate::reactor::Reactor::now`]), not a fresh clock read. Latency is from the
//! iteration that reaped the FETCH completion (the request seen) to the iteration that
//! submits the COMMIT; its resolution is one loop iteration.
//!
//! Must never: be written by two threads (a [`Recorder`] owns its [`IoStats`] alone; the
//! `Cell`s make it `!Sync`); take a lock on a reactor (queues announce themselves through
//! a lock-free queue; only the scraping thread locks).
//!
//! Start reading at [`Recorder::finish`], then [`Registry::collect`].

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam::queue::SegQueue;

use super::Plan;

/// Request kinds as the counters split them: the descriptor's own kinds ([`DescOp`];
/// `Other` also counts refused requests). Counter order is declaration order.
pub use super::DescOp as IoOp;

impl IoOp {
    /// Every kind, in counter order.
    pub const ALL: [IoOp; 6] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Discard,
        IoOp::WriteZeroes,
        IoOp::Other,
    ];

    /// Its `op` label.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Its latency class: read, write, or other (flush, discard, write-zeroes, refused).
    fn latency_class(self) -> usize {
        match self {
            IoOp::Read => 0,
            IoOp::Write => 1,
            _ => 2,
        }
    }
}

/// Kinds counted.
pub const OPS: usize = IoOp::ALL.len();

/// The latency histograms' `op` labels.
pub const LATENCY_CLASSES: [&str; 3] = ["read", "write", "other"];

/// Upper bounds of the latency buckets, in nanoseconds (10 µs … 1 s; a last bucket counts
/// the slower ones).
pub const LATENCY_BOUNDS_NS: [u64; 14] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// Buckets per histogram (the bounds, then past every bound).
pub const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// One latency histogram read out: per bucket (not cumulative), and the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Requests per bucket of [`LATENCY_BOUNDS_NS`], then those slower than all.
    pub buckets: [u64; BUCKETS],
    /// Sum of the latencies.
    pub sum_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Requests observed.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// One device's counters (summed over its queues), as a scrape reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    /// Requests answered, by [`IoOp`] index.
    pub ops: [u64; OPS],
    /// Bytes of the requests answered without error (a discard or write-zeroes counts
    /// its range), by [`IoOp`] index.
    pub bytes: [u64; OPS],
    /// Requests answered with an error, by [`IoOp`] index.
    pub errors: [u64; OPS],
    /// Latency by class ([`LATENCY_CLASSES`]).
    pub latency: [LatencyHistogram; 3],
}

impl IoCounts {
    /// Requests of kind `op`.
    #[must_use]
    pub fn ops(&self, op: IoOp) -> u64 {
        self.ops[op.index()]
    }

    /// Bytes of kind `op`.
    #[must_use]
    pub fn bytes(&self, op: IoOp) -> u64 {
        self.bytes[op.index()]
    }

    /// Errors of kind `op`.
    #[must_use]
    pub fn errors(&self, op: IoOp) -> u64 {
        self.errors[op.index()]
    }

    fn add(&mut self, s: &IoStats) {
        let read = |a: &AtomicU64| a.load(Relaxed);
        for i in 0..OPS {
            self.ops[i] = self.ops[i].wrapping_add(read(&s.ops[i]));
            self.bytes[i] = self.bytes[i].wrapping_add(read(&s.bytes[i]));
            self.errors[i] = self.errors[i].wrapping_add(read(&s.errors[i]));
        }
        for (h, l) in self.latency.iter_mut().zip(&s.latency) {
            for (b, a) in h.buckets.iter_mut().zip(&l.buckets) {
                *b = b.wrapping_add(read(a));
            }
            h.sum_ns = h.sum_ns.wrapping_add(read(&l.sum_ns));
        }
    }
}

#[derive(Debug, Default)]
struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// One queue's counters: written only by its [`Recorder`] (on the queue's reactor), read
/// by any thread.
#[derive(Debug, Default)]
pub struct IoStats {
    dev_id: u32,
    /// Its queue is gone: the registry forgets it at the next collection.
    retired: AtomicBool,
    ops: [AtomicU64; OPS],
    bytes: [AtomicU64; OPS],
    errors: [AtomicU64; OPS],
    latency: [AtomicHistogram; 3],
}

/// Adds `n` to a counter only the calling thread writes: a plain load and store (no
/// locked instruction); readers see either value.
#[inline]
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
}

/// A request being served: when it was seen, its kind and its range.
#[derive(Clone, Copy, Debug)]
struct Started {
    at: Option<Instant>,
    op: IoOp,
    bytes: u64,
}

const IDLE: Started = Started {
    at: None,
    op: IoOp::Other,
    bytes: 0,
};

/// The recording side of one queue's counters, owned by the queue on its reactor.
#[derive(Debug)]
pub struct Recorder {
    stats: Arc<IoStats>,
    tags: Box<[Cell<Started>]>,
}

impl Recorder {
    /// The recorder of queue with `depth` tags of device `dev_id`, announced to the
    /// process-wide [`REGISTRY`].
    #[must_use]
    pub fn new(dev_id: u32, depth: u16) -> Self {
        Self::with_registry(&REGISTRY, dev_id, depth)
    }

    /// The same, announced to `registry`.
    #[must_use]
    pub fn with_registry(registry: &Registry, dev_id: u32, depth: u16) -> Self {
        let stats = Arc::new(IoStats {
            dev_id,
            ..IoStats::default()
        });
        registry.incoming.push(Arc::clone(&stats));
        Self {
            stats,
            tags: (0..depth).map(|_| Cell::new(IDLE)).collect(),
        }
    }

    /// Request `tag` was seen at `now`: a descriptor of kind `op` that became `plan`.
    #[inline]
    pub fn start(&self, tag: u16, op: IoOp, plan: &Plan, now: Instant) {
        let bytes = match *plan {
            Plan::Read { len, .. }
            | Plan::Write { len, .. }
            | Plan::Discard { len, .. }
            | Plan::WriteZeroes { len, .. } => len,
            Plan::Flush | Plan::Refuse(_) => 0,
        };
        if let Some(t) = self.tags.get(usize::from(tag)) {
            t.set(Started {
                at: Some(now),
                op,
                bytes,
            });
        }
    }

    /// Request `tag` is committed at `now` with `result` (negative: an errno). A tag
    /// committed without [`Self::start`] counts as [`IoOp::Other`] with no latency.
    #[inline]
    pub fn finish(&self, tag: u16, result: i32, now: Instant) {
        let s = self
            .tags
            .get(usize::from(tag))
            .map_or(IDLE, |t| t.replace(IDLE));
        let st = &*self.stats;
        let i = s.op.index();
        bump(&st.ops[i], 1);
        if result < 0 {
            bump(&st.errors[i], 1);
        } else {
            bump(&st.bytes[i], s.bytes);
        }
        if let Some(at) = s.at {
            let ns =
                u64::try_from(now.saturating_duration_since(at).as_nanos()).unwrap_or(u64::MAX);
            let h = &st.latency[s.op.latency_class()];
            bump(
                &h.buckets[LATENCY_BOUNDS_NS.partition_point(|&b| b < ns)],
                1,
            );
            bump(&h.sum_ns, ns);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stats.retired.store(true, Relaxed);
    }
}

/// Where queues announce their counters (lock-free, from their reactors) and scrapes read
/// them (from one thread at a time; the lock is never taken on a reactor).
#[derive(Debug)]
pub struct Registry {
    incoming: SegQueue<Arc<IoStats>>,
    known: Mutex<Vec<Arc<IoStats>>>,
}

/// The daemon's registry.
pub static REGISTRY: Registry = Registry::new();

impl Registry {
    /// An empty registry.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            incoming: SegQueue::new(),
            known: Mutex::new(Vec::new()),
        }
    }

    /// Every served device's counters, by ublk device id, summed over its queues. The
    /// counters of queues that are gone are forgotten (a device exported again starts
    /// from zero: a counter reset).
    pub fn collect(&self) -> HashMap<u32, IoCounts> {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(s) = self.incoming.pop() {
            known.push(s);
        }
        known.retain(|s| !s.retired.load(Relaxed));
        let mut out: HashMap<u32, IoCounts> = HashMap::new();
        for s in known.iter() {
            out.entry(s.dev_id).or_default().add(s);
        }
        out
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::DescOp;
    use std::time::Duration;

    fn read(offset: u64, len: u64) -> Plan {
        Plan::Read { offset, len }
    }

    #[test]
    fn requests_are_counted_by_kind_with_bytes_errors_and_latency() {
        let reg = Registry::new();
        let q0 = Recorder::with_registry(&reg, 7, 4);
        let q1 = Recorder::with_registry(&reg, 7, 4);
        let other_dev = Recorder::with_registry(&reg, 9, 4);
        let t0 = Instant::now();
        // Queue 0: a 4 KiB read in 30 µs, a 64 KiB write in 2 ms.
        q0.start(0, DescOp::Read, &read(0, 4096), t0);
        q0.start(
            1,
            DescOp::Write,
            &Plan::Write {
                offset: 0,
                len: 65536,
                fua: false,
            },
            t0,
        );
        q0.finish(0, 4096, t0 + Duration::from_micros(30));
        q0.finish(1, 65536, t0 + Duration::from_millis(2));
        // Queue 1: a read that fails, a flush, a 1 MiB discard, a refused zone op.
        q1.start(3, DescOp::Read, &read(0, 8192), t0);
        q1.finish(3, -libc::EIO, t0 + Duration::from_micros(5));
        q1.start(0, DescOp::Flush, &Plan::Flush, t0);
        q1.finish(0, 0, t0 + Duration::from_secs(2));
        q1.start(
            1,
            DescOp::Discard,
            &Plan::Discard {
                offset: 0,
                len: 1 << 20,
            },
            t0,
        );
        q1.finish(1, 0, t0);
        q1.start(2, DescOp::Other, &Plan::Refuse(-libc::EOPNOTSUPP), t0);
        q1.finish(2, -libc::EOPNOTSUPP, t0);
        other_dev.start(0, DescOp::Read, &read(0, 512), t0);
        other_dev.finish(0, 512, t0);

        let all = reg.collect();
        assert_eq!(all.len(), 2);
        let c = all[&7];
        assert_eq!(c.ops(IoOp::Read), 2);
        assert_eq!(c.bytes(IoOp::Read), 4096, "a failed read moves no bytes");
        assert_eq!(c.errors(IoOp::Read), 1);
        assert_eq!((c.ops(IoOp::Write), c.bytes(IoOp::Write)), (1, 65536));
        assert_eq!((c.ops(IoOp::Flush), c.errors(IoOp::Flush)), (1, 0));
        assert_eq!(c.bytes(IoOp::Discard), 1 << 20);
        assert_eq!((c.ops(IoOp::Other), c.errors(IoOp::Other)), (1, 1));
        assert_eq!(c.ops(IoOp::WriteZeroes), 0);
        let [r, w, o] = c.latency;
        // Reads: 5 µs (≤ 10 µs) and 30 µs (≤ 50 µs).
        assert_eq!(r.count(), 2);
        assert_eq!((r.buckets[0], r.buckets[2]), (1, 1));
        assert_eq!(r.sum_ns, 35_000);
        // The write: 2 ms (≤ 2.5 ms).
        assert_eq!(w.buckets[7], 1);
        assert_eq!(w.sum_ns, 2_000_000);
        // Flush 2 s (past every bound), discard and refusal at 0.
        assert_eq!(o.count(), 3);
        assert_eq!((o.buckets[0], o.buckets[BUCKETS - 1]), (2, 1));
        assert_eq!(all[&9].bytes(IoOp::Read), 512);

        // More IO shows in the next collection; a gone queue is forgotten.
        q0.start(0, DescOp::Read, &read(0, 4096), t0);
        q0.finish(0, 4096, t0);
        drop(q1);
        let c = reg.collect()[&7];
        assert_eq!((c.ops(IoOp::Read), c.bytes(IoOp::Read)), (2, 8192));
        assert_eq!(c.ops(IoOp::Flush), 0);
    }

    #[test]
    fn a_commit_without_a_start_counts_once_as_other_without_latency() {
        let reg = Registry::new();
        let q = Recorder::with_registry(&reg, 1, 2);
        let t0 = Instant::now();
        q.start(
            0,
            DescOp::Write,
            &Plan::Write {
                offset: 0,
                len: 4096,
                fua: true,
            },
            t0,
        );
        q.finish(0, 4096, t0);
        // The same tag again without a start (a fetch the queue could not read), and a
        // tag past the depth: neither reuses the previous request's kind or time.
        q.finish(0, -libc::EIO, t0 + Duration::from_secs(1));
        q.finish(9, -libc::EIO, t0);
        let c = reg.collect()[&1];
        assert_eq!((c.ops(IoOp::Write), c.errors(IoOp::Write)), (1, 0));
        assert_eq!((c.ops(IoOp::Other), c.errors(IoOp::Other)), (2, 2));
        assert_eq!(
            c.latency.iter().map(LatencyHistogram::count).sum::<u64>(),
            1
        );
    }
}
