//! Per-volume QoS (issue 15): IOPS and bandwidth limits — total, read or write — with a
//! burst allowance, enforced on every reactor that serves the volume without a lock on the
//! IO path.
//!
//! Where it sits: at the entry of a volume's channels ([`super::volume::VolumeChannel`] on
//! the owner, [`super::volume::RemoteChannel`] elsewhere), after validation and before
//! anything else, so ublk exports, image sessions and the benchmark's `lvol:` target are
//! all limited the same way. Requests a remote channel forwards to the owner were counted
//! where they entered and pass the owner's forwarding channel unlimited.
//!
//! How the rate is shared: each channel (one per reactor and volume) keeps its own token
//! buckets ([`Limiter`]) refilled at `limit × share`. The shares of a volume's channels
//! sum to one; they are rebalanced at most every [`REBALANCE_PERIOD`] in proportion to each
//! channel's demand (requests that arrived since the last rebalance plus those held now),
//! by whichever of the volume's reactors finds the period over first. The rebalancer takes
//! the volume's slot registry with `try_lock` — it never waits, and a reactor that finds it
//! taken just carries on with its current share — so an IO never blocks on another
//! reactor; what crosses reactors is one relaxed atomic per channel (its share), written by
//! the rebalancer and read at refill. A channel alone on its volume has the whole rate and
//! never rebalances. A channel whose share is zero (it had no demand) asks for a rebalance
//! as soon as a request arrives (at most once per [`MIN_REBALANCE_GAP`]).
//!
//! The limits themselves live in the volume's [`QosShared`] (a sequence lock over atomics,
//! written only by the pool's owner reactor); a channel compares the sequence with the one
//! it applied on every request — one load and one branch, which is all an unlimited
//! volume pays.
//!
//! How a throttled request waits: it is held in its channel's FIFO (bounded by the
//! caller's queue depth: the channel holds nothing the caller did not submit) and one
//! timer per channel on the reactor's timer heap fires when the head's tokens will be
//! there, at most [`MAX_WAIT`] ahead so a change of limits or shares is seen promptly. The
//! reactor sleeps until that deadline like any timer: nothing spins, and other volumes'
//! channels are not involved. Once a channel holds a request, later requests of a limited
//! class queue behind it (no overtaking: big requests are not starved by small ones).
//!
//! Accounting: a read or write takes one IOPS token and its length in bytes; discard and
//! write-zeroes take an IOPS token (write class) and no bytes; flush is never limited.
//! A request may overdraw a bucket (a 1 MiB write against a 64 KiB bucket goes once the
//! bucket is positive and leaves it in debt), so the long-run rate is exactly the limit.
//! The burst allowance is the bucket depth: `burst_ms` of the limit's rate saved while the
//! volume is idle, spent at once afterwards.
//!
//! Must never: hold a request without a timer armed to release it, take a lock that can
//! wait on the IO path, or drop a held request (the channel stays alive while its timer is
//! armed).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::bdev::Io;
use crate::reactor::{Completion, Reactor, TimerId};

/// How often a volume's shares are rebalanced across its reactors (at most).
pub const REBALANCE_PERIOD: Duration = Duration::from_millis(10);
/// The soonest a channel without a share may ask for another rebalance.
pub const MIN_REBALANCE_GAP: Duration = Duration::from_millis(1);
/// The longest a channel's timer waits before looking again (limits or shares may change).
pub const MAX_WAIT: Duration = Duration::from_millis(20);
/// Burst allowance when none is given.
pub const DEFAULT_BURST_MS: u32 = 100;
/// Largest burst allowance.
pub const MAX_BURST_MS: u32 = 60_000;
/// Largest IOPS limit accepted (a higher one is a typo).
pub const MAX_IOPS: u64 = 100_000_000;
/// Largest bandwidth limit accepted, bytes per second (1 PiB/s: a typo above that).
pub const MAX_BYTES_PER_SEC: u64 = 1 << 50;
/// Share scale: a share of `SHARE_ONE` is the whole rate.
const SHARE_ONE: u32 = 1_000_000;

/// A volume's limits. 0 means unlimited for every rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QosLimits {
    /// Reads + writes per second.
    pub iops: u64,
    /// Reads per second.
    pub read_iops: u64,
    /// Writes (and discards, write-zeroes) per second.
    pub write_iops: u64,
    /// Bytes read + written per second.
    pub bytes_per_sec: u64,
    /// Bytes read per second.
    pub read_bytes_per_sec: u64,
    /// Bytes written per second.
    pub write_bytes_per_sec: u64,
    /// Burst allowance: milliseconds of each limit's rate a volume may save while idle and
    /// spend at once (0: [`DEFAULT_BURST_MS`]).
    pub burst_ms: u32,
}

impl QosLimits {
    /// No limit at all (the default).
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        self.rates().iter().all(|&r| r == 0)
    }

    /// The burst allowance in effect.
    #[must_use]
    pub fn burst_ms_effective(&self) -> u32 {
        if self.burst_ms == 0 {
            DEFAULT_BURST_MS
        } else {
            self.burst_ms
        }
    }

    /// The rates in bucket order: IOPS total, read, write; bytes/s total, read, write.
    #[must_use]
    pub fn rates(&self) -> [u64; 6] {
        [
            self.iops,
            self.read_iops,
            self.write_iops,
            self.bytes_per_sec,
            self.read_bytes_per_sec,
            self.write_bytes_per_sec,
        ]
    }

    fn from_rates(r: [u64; 6], burst_ms: u32) -> Self {
        Self {
            iops: r[0],
            read_iops: r[1],
            write_iops: r[2],
            bytes_per_sec: r[3],
            read_bytes_per_sec: r[4],
            write_bytes_per_sec: r[5],
            burst_ms,
        }
    }

    /// Checks the limits are sane.
    ///
    /// # Errors
    /// A message naming the field, what is wrong and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        let names = [
            "max IOPS",
            "max read IOPS",
            "max write IOPS",
            "max bandwidth",
            "max read bandwidth",
            "max write bandwidth",
        ];
        for (i, (&v, name)) in self.rates().iter().zip(names).enumerate() {
            let max = if i < 3 { MAX_IOPS } else { MAX_BYTES_PER_SEC };
            if v > max {
                let unit = if i < 3 { "IOPS" } else { "bytes/s" };
                return Err(format!(
                    "{name} of {v} {unit} is more than the largest accepted ({max} {unit}); use 0 for unlimited"
                ));
            }
        }
        if self.burst_ms > MAX_BURST_MS {
            return Err(format!(
                "burst of {} ms is more than the largest accepted ({MAX_BURST_MS} ms); use 0 for the default ({DEFAULT_BURST_MS} ms)",
                self.burst_ms
            ));
        }
        Ok(())
    }
}

impl fmt::Display for QosLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        let names = [
            "iops",
            "read-iops",
            "write-iops",
            "bw",
            "read-bw",
            "write-bw",
        ];
        let mut first = true;
        for (v, name) in self.rates().iter().zip(names) {
            if *v > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                write!(f, "{name}={v}")?;
            }
        }
        write!(f, " burst={}ms", self.burst_ms_effective())
    }
}

/// A volume's limits and statistics as every reactor sees them (inside the volume's shared
/// state). Written by the owner reactor (limits) and by the serving reactors (statistics).
#[derive(Debug, Default)]
pub struct QosShared {
    /// Sequence lock over `vals`: odd while the owner writes them.
    seq: AtomicU64,
    /// The limits: the six rates, then the burst.
    vals: [AtomicU64; 7],
    /// Requests that had to wait.
    throttled_ios: AtomicU64,
    /// Time requests spent waiting, summed over requests (nanoseconds).
    throttled_ns: AtomicU64,
    /// Channels open on this volume's limits (registry length; read without the lock).
    nslots: AtomicUsize,
    /// The channels, for the rebalancer only (never taken by an IO: `try_lock` at most
    /// once per period by one reactor).
    reg: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Each channel's slot and its arrivals counted at the last rebalance.
    slots: Vec<(Weak<QosSlot>, u64)>,
    last: Option<Instant>,
}

/// What the statistics say (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosStats {
    /// Requests that waited.
    pub throttled_ios: u64,
    /// Nanoseconds they waited, summed.
    pub throttled_ns: u64,
}

impl QosShared {
    /// Sets the limits (owner reactor, or before any channel exists). Channels see them at
    /// their next request or timer.
    pub fn set(&self, l: &QosLimits) {
        let s = self.seq.fetch_add(1, Ordering::AcqRel);
        debug_assert!(s.is_multiple_of(2), "one writer at a time");
        for (a, v) in self.vals.iter().zip(l.rates()) {
            a.store(v, Ordering::Release);
        }
        self.vals[6].store(u64::from(l.burst_ms), Ordering::Release);
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    /// The limits now.
    #[must_use]
    pub fn get(&self) -> QosLimits {
        self.read().1
    }

    fn read(&self) -> (u64, QosLimits) {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if !s1.is_multiple_of(2) {
                std::hint::spin_loop();
                continue;
            }
            let mut r = [0u64; 6];
            for (v, a) in r.iter_mut().zip(&self.vals) {
                *v = a.load(Ordering::Acquire);
            }
            let burst = u32::try_from(self.vals[6].load(Ordering::Acquire)).unwrap_or(u32::MAX);
            if self.seq.load(Ordering::Acquire) == s1 {
                return (s1, QosLimits::from_rates(r, burst));
            }
        }
    }

    /// The throttling statistics.
    #[must_use]
    pub fn stats(&self) -> QosStats {
        QosStats {
            throttled_ios: self.throttled_ios.load(Ordering::Relaxed),
            throttled_ns: self.throttled_ns.load(Ordering::Relaxed),
        }
    }

    fn register(&self) -> Arc<QosSlot> {
        let mut reg = self
            .reg
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.slots.retain(|(w, _)| w.strong_count() > 0);
        // The first channel has the whole rate; a later one starts with none and asks for
        // a rebalance when its first request comes.
        let share = if reg.slots.is_empty() { SHARE_ONE } else { 0 };
        let slot = Arc::new(QosSlot {
            share_ppm: AtomicU32::new(share),
            ..QosSlot::default()
        });
        reg.slots.push((Arc::downgrade(&slot), 0));
        self.nslots.store(reg.slots.len(), Ordering::Release);
        slot
    }

    fn unregister(&self, slot: &Arc<QosSlot>) {
        let mut reg = self
            .reg
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reg.slots
            .retain(|(w, _)| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(slot)));
        // Whoever remains alone has the whole rate again.
        if let [(w, _)] = reg.slots.as_slice() {
            if let Some(s) = w.upgrade() {
                s.share_ppm.store(SHARE_ONE, Ordering::Relaxed);
            }
        }
        self.nslots.store(reg.slots.len(), Ordering::Release);
    }

    /// Rebalances the shares by demand if `gap` has passed since the last time and nobody
    /// else is doing it (never waits).
    fn rebalance(&self, now: Instant, gap: Duration) {
        let Ok(mut reg) = self.reg.try_lock() else {
            return;
        };
        if reg
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < gap)
        {
            return;
        }
        reg.last = Some(now);
        reg.slots.retain(|(w, _)| w.strong_count() > 0);
        let mut wants = Vec::with_capacity(reg.slots.len());
        let mut total: u64 = 0;
        for (w, seen) in &mut reg.slots {
            let Some(s) = w.upgrade() else {
                wants.push(0);
                continue;
            };
            let arrived = s.arrivals.load(Ordering::Relaxed);
            let want = arrived.wrapping_sub(*seen) + s.held.load(Ordering::Relaxed);
            *seen = arrived;
            wants.push(want);
            total += want;
        }
        let n = u64::try_from(reg.slots.len()).unwrap_or(1).max(1);
        for ((w, _), want) in reg.slots.iter().zip(wants) {
            if let Some(s) = w.upgrade() {
                let ppm = (u64::from(SHARE_ONE) * want)
                    .checked_div(total)
                    .unwrap_or(u64::from(SHARE_ONE) / n);
                s.share_ppm
                    .store(u32::try_from(ppm).unwrap_or(SHARE_ONE), Ordering::Relaxed);
            }
        }
    }
}

/// One channel's place in its volume's rebalancing.
#[derive(Debug, Default)]
struct QosSlot {
    /// Limited requests that arrived (cumulative; written by the channel's reactor).
    arrivals: AtomicU64,
    /// Requests held now (written by the channel's reactor).
    held: AtomicU64,
    /// This channel's part of every rate, in millionths (written by the rebalancer).
    share_ppm: AtomicU32,
}

/// One token bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// A limit of this kind is in force (the rate may still be 0: a channel without share).
    on: bool,
    /// Tokens per second (after the share).
    rate: f64,
    /// Most tokens saved.
    depth: f64,
    tokens: f64,
}

/// A request held by the limiter.
struct Held {
    io: Io,
    cb: Rc<dyn Completion>,
    tag: u64,
    since: Instant,
}

/// What [`Limiter::admit`] decided.
pub(crate) enum Admit {
    /// Go on with the request now.
    Go(Io, Rc<dyn Completion>, u64),
    /// Held; arm the channel's timer at this deadline if asked.
    Held(Option<Instant>),
}

/// Which buckets a request of each class draws from.
const READ_BUCKETS: [usize; 4] = [0, 1, 3, 4];
const WRITE_BUCKETS: [usize; 4] = [0, 2, 3, 5];

struct State {
    /// The sequence of the limits applied.
    seq: u64,
    limits: QosLimits,
    /// Whether any limit applies to reads, to writes.
    limited: [bool; 2],
    share_ppm: u32,
    buckets: [Bucket; 6],
    last_refill: Option<Instant>,
    held: VecDeque<Held>,
    timer: Option<TimerId>,
    last_ask: Option<Instant>,
    /// When this channel next tries to rebalance its volume's shares.
    next_rebalance: Option<Instant>,
}

/// One channel's limiter: its token buckets and held requests. Lives on one reactor.
pub(crate) struct Limiter {
    shared: Arc<QosShared>,
    slot: Arc<QosSlot>,
    /// Limits of any kind in force (the fast path reads only this and the sequence).
    active: Cell<bool>,
    seq: Cell<u64>,
    st: RefCell<State>,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("active", &self.active.get())
            .finish()
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.shared.unregister(&self.slot);
    }
}

impl Limiter {
    /// A limiter for a new channel of the volume whose limits are `shared`.
    pub(crate) fn new(shared: &Arc<QosShared>) -> Self {
        let slot = shared.register();
        let me = Self {
            shared: Arc::clone(shared),
            slot,
            active: Cell::new(false),
            // Never a real sequence (those are even): the first request loads the limits.
            seq: Cell::new(1),
            st: RefCell::new(State {
                seq: 1,
                limits: QosLimits::default(),
                limited: [false; 2],
                share_ppm: SHARE_ONE,
                buckets: [Bucket::default(); 6],
                last_refill: None,
                held: VecDeque::with_capacity(64),
                timer: None,
                last_ask: None,
                next_rebalance: None,
            }),
        };
        me.reload();
        me
    }

    /// Whether this channel must pass its requests through [`Self::admit`]: false for an
    /// unlimited volume with nothing held. The whole cost of QoS for unlimited volumes.
    #[inline]
    pub(crate) fn active(&self) -> bool {
        if self.shared.seq.load(Ordering::Acquire) != self.seq.get() {
            self.reload();
        }
        self.active.get()
    }

    /// Applies the current limits (called when their sequence moved).
    fn reload(&self) {
        let (seq, limits) = self.shared.read();
        self.seq.set(seq);
        let mut st = self.st.borrow_mut();
        st.seq = seq;
        let was_unlimited = st.limits.is_unlimited();
        st.limits = limits;
        let r = limits.rates();
        st.limited = [
            READ_BUCKETS.iter().any(|&i| r[i] > 0),
            WRITE_BUCKETS.iter().any(|&i| r[i] > 0),
        ];
        let share = self.share();
        st.share_ppm = share;
        set_rates(&mut st, was_unlimited);
        // Still active while requests are held, so they drain in order.
        self.active
            .set(!limits.is_unlimited() || !st.held.is_empty());
    }

    fn share(&self) -> u32 {
        if self.shared.nslots.load(Ordering::Acquire) <= 1 {
            SHARE_ONE
        } else {
            self.slot.share_ppm.load(Ordering::Relaxed)
        }
    }

    /// Refills the buckets to `now`, after picking up a new share.
    fn refill(&self, st: &mut State, now: Instant) {
        // Once per loop iteration (requests of one iteration share its cached time), and
        // `now` may be older than a timer's: never go back.
        if st.last_refill.is_some_and(|t| t >= now) {
            return;
        }
        // The time since the last refill is credited at the rates this channel had then;
        // a share that moved applies from now on (crediting the past at a raised share
        // gave a channel tokens for time another channel held that rate).
        let dt = match st.last_refill {
            Some(t) => now.duration_since(t).as_secs_f64(),
            None => 0.0,
        };
        st.last_refill = Some(now);
        if dt > 0.0 {
            for b in &mut st.buckets {
                if b.on {
                    b.tokens = (b.tokens + b.rate * dt).min(b.depth);
                }
            }
        }
        // The rebalancer's lock is tried at most once per period per channel.
        if self.shared.nslots.load(Ordering::Relaxed) > 1
            && st.next_rebalance.is_none_or(|t| now >= t)
        {
            st.next_rebalance = Some(now + REBALANCE_PERIOD);
            self.shared.rebalance(now, REBALANCE_PERIOD);
        }
        let share = self.share();
        if share != st.share_ppm {
            st.share_ppm = share;
            set_rates(st, false);
        }
    }

    /// Decides whether `io` goes now; holds it otherwise. Call only when [`Self::active`].
    pub(crate) fn admit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) -> Admit {
        let now = rx.now();
        let mut st = self.st.borrow_mut();
        let Some(class) = class_of(&io, st.limited) else {
            return Admit::Go(io, cb, tag);
        };
        // One writer (this reactor): no locked add.
        let a = self.slot.arrivals.load(Ordering::Relaxed);
        self.slot.arrivals.store(a + 1, Ordering::Relaxed);
        self.refill(&mut st, now);
        if st.held.is_empty() && take(&mut st.buckets, class, io_bytes(&io)) {
            return Admit::Go(io, cb, tag);
        }
        st.held.push_back(Held {
            io,
            cb,
            tag,
            since: now,
        });
        self.slot
            .held
            .store(st.held.len() as u64, Ordering::Relaxed);
        self.active.set(true);
        if st.timer.is_some() {
            return Admit::Held(None);
        }
        Admit::Held(Some(self.deadline(&mut st, now)))
    }

    /// When the head of the line can go (at most [`MAX_WAIT`] away).
    fn deadline(&self, st: &mut State, now: Instant) -> Instant {
        let Some(h) = st.held.front() else {
            return now + MAX_WAIT;
        };
        let Some(class) = class_of(&h.io, st.limited) else {
            return now;
        };
        let starved = class
            .iter()
            .any(|&i| st.buckets[i].on && st.buckets[i].tokens <= 0.0 && st.buckets[i].rate <= 0.0);
        if starved {
            // No share: ask for one (once per gap) and look again after it.
            if st
                .last_ask
                .is_none_or(|t| now.saturating_duration_since(t) >= MIN_REBALANCE_GAP)
            {
                st.last_ask = Some(now);
                self.shared.rebalance(now, MIN_REBALANCE_GAP);
            }
            return now + MIN_REBALANCE_GAP;
        }
        let mut wait = 0.0f64;
        for &i in class {
            let b = &st.buckets[i];
            if b.on && b.rate > 0.0 && b.tokens <= 0.0 {
                wait = wait.max((-b.tokens) / b.rate + 1e-9);
            }
        }
        now + Duration::from_secs_f64(wait).min(MAX_WAIT)
    }

    /// The timer fired: releases what may go (through `go`) and says when to look again,
    /// if anything is still held.
    pub(crate) fn fire(
        &self,
        rx: &Reactor,
        mut go: impl FnMut(&Reactor, Io, Rc<dyn Completion>, u64),
    ) -> Option<Instant> {
        if self.shared.seq.load(Ordering::Acquire) != self.seq.get() {
            self.reload();
        }
        let now = Instant::now();
        let mut waited_ns: u64 = 0;
        let mut released: u64 = 0;
        self.st.borrow_mut().timer = None;
        loop {
            let next = {
                let mut st = self.st.borrow_mut();
                self.refill(&mut st, now);
                let Some(h) = st.held.front() else {
                    break;
                };
                let ok = match class_of(&h.io, st.limited) {
                    None => true,
                    Some(class) => {
                        let bytes = io_bytes(&h.io);
                        take(&mut st.buckets, class, bytes)
                    }
                };
                if !ok {
                    break;
                }
                st.held.pop_front()
            };
            let Some(h) = next else { break };
            waited_ns += u64::try_from(now.saturating_duration_since(h.since).as_nanos())
                .unwrap_or(u64::MAX);
            released += 1;
            go(rx, h.io, h.cb, h.tag);
        }
        if released > 0 {
            self.shared
                .throttled_ios
                .fetch_add(released, Ordering::Relaxed);
            self.shared
                .throttled_ns
                .fetch_add(waited_ns, Ordering::Relaxed);
        }
        let mut st = self.st.borrow_mut();
        self.slot
            .held
            .store(st.held.len() as u64, Ordering::Relaxed);
        if st.held.is_empty() {
            self.active.set(!st.limits.is_unlimited());
            return None;
        }
        Some(self.deadline(&mut st, now))
    }

    /// Records the timer armed for the held requests.
    pub(crate) fn armed(&self, id: TimerId) {
        self.st.borrow_mut().timer = Some(id);
    }
}

/// Recomputes each bucket's rate and depth from the limits and the share. A bucket that
/// just became limited starts full (the burst allowance); others keep their tokens, capped
/// at the new depth.
fn set_rates(st: &mut State, fresh: bool) {
    let share = f64::from(st.share_ppm) / f64::from(SHARE_ONE);
    let burst_s = f64::from(st.limits.burst_ms_effective()) / 1000.0;
    for (b, limit) in st.buckets.iter_mut().zip(st.limits.rates()) {
        let was_limited = b.on;
        if limit == 0 {
            *b = Bucket::default();
            continue;
        }
        // Rates stay well inside f64's exact integers (validated ≤ 2^50).
        #[allow(clippy::cast_precision_loss)]
        let rate = limit as f64 * share;
        b.on = true;
        b.rate = rate;
        b.depth = rate * burst_s;
        b.tokens = if fresh || !was_limited {
            b.depth
        } else {
            b.tokens.min(b.depth)
        };
    }
}

/// The buckets `io` draws from, or `None` when no limit applies to it.
fn class_of(io: &Io, limited: [bool; 2]) -> Option<&'static [usize; 4]> {
    match io {
        Io::Read { .. } => limited[0].then_some(&READ_BUCKETS),
        Io::Write { .. } | Io::Discard { .. } | Io::WriteZeroes { .. } => {
            limited[1].then_some(&WRITE_BUCKETS)
        }
        Io::Flush => None,
    }
}

fn io_bytes(io: &Io) -> f64 {
    match io {
        // An IO buffer fits u32, so the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        Io::Read { buf, .. } | Io::Write { buf, .. } => buf.len() as f64,
        _ => 0.0,
    }
}

/// Takes one request's tokens if every limited bucket of its class is positive.
fn take(buckets: &mut [Bucket; 6], class: &[usize; 4], bytes: f64) -> bool {
    if class
        .iter()
        .any(|&i| buckets[i].on && buckets[i].tokens <= 0.0)
    {
        return false;
    }
    for (k, &i) in class.iter().enumerate() {
        let b = &mut buckets[i];
        if b.on {
            // The first two buckets of a class count requests, the last two bytes.
            b.tokens -= if k < 2 { 1.0 } else { bytes };
        }
    }
    true
}

/// A channel that throttles through a [`Limiter`].
pub(crate) trait Throttled: 'static {
    /// Its limiter.
    fn limiter(&self) -> &Limiter;
    /// Continues a request the limiter let go (after the limiter, before the device).
    fn release(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64);
}

/// Passes `io` through `ch`'s limiter: returns it when it may go now; otherwise it is held
/// and the channel's timer is armed.
pub(crate) fn gate<T: Throttled>(
    ch: &Rc<T>,
    rx: &Reactor,
    io: Io,
    cb: Rc<dyn Completion>,
    tag: u64,
) -> Option<(Io, Rc<dyn Completion>, u64)> {
    match ch.limiter().admit(rx, io, cb, tag) {
        Admit::Go(io, cb, tag) => Some((io, cb, tag)),
        Admit::Held(deadline) => {
            if let Some(at) = deadline {
                arm(ch, rx, at);
            }
            None
        }
    }
}

fn arm<T: Throttled>(ch: &Rc<T>, rx: &Reactor, at: Instant) {
    // The timer holds the channel, so held requests always come out.
    let me = Rc::clone(ch);
    let id = rx.add_timer(
        at.saturating_duration_since(rx.now()),
        Box::new(move |rx: &Reactor| {
            let next = me
                .limiter()
                .fire(rx, |rx, io, cb, tag| me.release(rx, io, cb, tag));
            if let Some(at) = next {
                arm(&me, rx, at);
            }
        }),
    );
    ch.limiter().armed(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_validate_and_display() {
        assert!(QosLimits::default().is_unlimited());
        assert_eq!(QosLimits::default().to_string(), "unlimited");
        let l = QosLimits {
            iops: 5000,
            write_bytes_per_sec: 1 << 20,
            ..QosLimits::default()
        };
        assert!(!l.is_unlimited());
        assert_eq!(l.to_string(), "iops=5000 write-bw=1048576 burst=100ms");
        l.validate().expect("sane limits");
        let e = QosLimits {
            read_iops: MAX_IOPS + 1,
            ..QosLimits::default()
        }
        .validate()
        .expect_err("absurd IOPS");
        assert!(
            e.contains("max read IOPS") && e.contains("use 0 for unlimited"),
            "{e}"
        );
        let e = QosLimits {
            burst_ms: MAX_BURST_MS + 1,
            ..QosLimits::default()
        }
        .validate()
        .expect_err("absurd burst");
        assert!(e.contains("burst"), "{e}");
    }

    #[test]
    fn shared_limits_round_trip_through_the_sequence_lock() {
        let s = QosShared::default();
        let l = QosLimits {
            iops: 1,
            read_iops: 2,
            write_iops: 3,
            bytes_per_sec: 4,
            read_bytes_per_sec: 5,
            write_bytes_per_sec: 6,
            burst_ms: 7,
        };
        let (seq0, _) = s.read();
        s.set(&l);
        let (seq1, got) = s.read();
        assert_eq!(got, l);
        assert_ne!(seq0, seq1);
        assert!(seq1.is_multiple_of(2));
    }

    #[test]
    fn buckets_draw_by_class_and_overdraw_once() {
        let mut b = [Bucket::default(); 6];
        b[1] = Bucket {
            on: true,
            rate: 10.0,
            depth: 1.0,
            tokens: 1.0,
        };
        b[4] = Bucket {
            on: true,
            rate: 100.0,
            depth: 10.0,
            tokens: 10.0,
        };
        // A 64-byte read overdraws the byte bucket once; the next read waits.
        assert!(take(&mut b, &READ_BUCKETS, 64.0));
        assert!((b[4].tokens - -54.0).abs() < 1e-9);
        assert!(!take(&mut b, &READ_BUCKETS, 64.0));
        // Writes draw nothing limited here.
        assert!(take(&mut b, &WRITE_BUCKETS, 64.0));
    }

    #[test]
    fn rebalance_shares_by_demand_and_sums_to_one() {
        let s = Arc::new(QosShared::default());
        let a = Limiter::new(&s);
        let b = Limiter::new(&s);
        assert_eq!(a.slot.share_ppm.load(Ordering::Relaxed), SHARE_ONE);
        assert_eq!(b.slot.share_ppm.load(Ordering::Relaxed), 0);
        a.slot.arrivals.store(300, Ordering::Relaxed);
        b.slot.arrivals.store(100, Ordering::Relaxed);
        s.rebalance(Instant::now(), Duration::ZERO);
        let (sa, sb) = (
            a.slot.share_ppm.load(Ordering::Relaxed),
            b.slot.share_ppm.load(Ordering::Relaxed),
        );
        assert_eq!((sa, sb), (750_000, 250_000));
        // No demand since: equal shares.
        s.rebalance(Instant::now(), Duration::ZERO);
        assert_eq!(a.slot.share_ppm.load(Ordering::Relaxed), 500_000);
        // Within the period nothing changes.
        b.slot.arrivals.store(1000, Ordering::Relaxed);
        s.rebalance(Instant::now(), Duration::from_secs(3600));
        assert_eq!(b.slot.share_ppm.load(Ordering::Relaxed), 500_000);
        drop(b);
        assert_eq!(s.nslots.load(Ordering::Relaxed), 1);
        assert_eq!(a.slot.share_ppm.load(Ordering::Relaxed), SHARE_ONE);
    }
}
