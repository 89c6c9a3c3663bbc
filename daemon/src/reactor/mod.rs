//! Reactors: one pinned thread per core, each owning one io_uring, its in-flight request
//! table, its buffer pool, its timers and pollers (DESIGN §3).
//!
//! The loop ([`Reactor::run`]) drains messages, delivers completions, fires timers and runs
//! pollers; it submits every queued SQE with one `io_uring_enter` per iteration and reaps
//! completions from shared memory. While there is work it never sleeps; after
//! `idle_threshold_us` without work (and with no fast IO in flight) it sleeps in the kernel
//! until a completion, the next timer or the doorbell (an eventfd read kept armed in the
//! ring) wakes it. Ops that io_uring hands to its worker threads (fsync, fallocate) are
//! "slow": they do not keep the reactor spinning. Polling is hybrid ([`PollPolicy`]): when
//! work has lately taken longer than `poll_max_gap_us` to come, the reactor naps for half
//! the usual wait before polling, or sleeps until woken when the wait is over a
//! millisecond.
//!
//! Must never: block on a lock shared with another reactor, call into layers above it, or
//! allocate per IO (requests live in a preallocated slot table).
//!
//! Start reading at [`ReactorSet::start`], then [`Reactor::run`], then [`Reactor::submit`].

pub mod buf;
pub mod caps;
pub mod kslots;
pub mod msg;
mod ring;
mod timer;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use ring::{PushError, Ring};

pub use buf::{BufPool, IoBuf};
pub use msg::{Answer, Message, Remote, SendError};
pub use timer::TimerId;

/// A Linux errno carried by a failed IO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// Invalid argument: unaligned or out-of-range IO.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Generic IO error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Operation not supported by this device.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// Resource temporarily unavailable (queue full).
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// No space left.
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (errno {})",
            std::io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

impl std::error::Error for Errno {}

/// Result of an IO: bytes transferred (0 for flush/discard/write-zeroes) or an errno.
pub type IoResult = Result<u32, Errno>;

/// Receives completions on the reactor that submitted the request.
///
/// The same object usually serves many requests; `tag` tells them apart (a slot index, a
/// ublk tag). Implementations use interior mutability: completions may submit new IO.
pub trait Completion {
    /// The request tagged `tag` finished with `res`; `buf` is the buffer it carried, if any.
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>);
}

/// Whether an op keeps the reactor polling while it is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Completes in microseconds (reads, writes): poll for it.
    Fast,
    /// Runs in io_uring's worker threads (fsync, fallocate): sleep while only these remain.
    Slow,
}

/// Why a submission was refused before reaching the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// Every request slot of this reactor is in use; retry after a completion.
    #[error("reactor request table is full ({0} requests in flight); retry after a completion")]
    Full(usize),
}

/// Reactor settings. Everything is bounded.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// Submission queue entries (power of two).
    pub ring_entries: u32,
    /// Requests a reactor may have in flight (slot table size; the CQ is sized to fit).
    pub max_inflight: u32,
    /// Poll this long without work before sleeping in the kernel.
    pub idle_threshold_us: u64,
    /// With fast IO in flight but no completion for this long, sleep anyway (a stuck device
    /// must not burn a core forever).
    pub busy_poll_limit_us: u64,
    /// Hybrid polling: poll at once only while work has lately come back within about this
    /// many microseconds of running out of it; when the reactor has usually waited longer
    /// (a slow device, a sparse stream of requests) it naps in the kernel for half the
    /// usual wait first, or sleeps until woken when that is over [`NAP_MAX`], since
    /// polling all the way would only burn the core ([`PollPolicy`]). 0: always poll up
    /// to the two limits above.
    pub poll_max_gap_us: u64,
    /// Bounded message queue capacity per reactor.
    pub inbox_capacity: usize,
    /// Pooled IO buffer chunk size (the largest pooled IO) and count per reactor.
    pub buf_chunk_bytes: usize,
    /// Number of pooled IO buffer chunks per reactor.
    pub buf_count: usize,
    /// Pin each reactor thread to its core.
    pub pin: bool,
    /// Use 128-byte SQEs / 32-byte CQEs (needed by NVMe passthrough; costs memory
    /// bandwidth on every other op, so off unless asked for).
    pub big_sqe: bool,
    /// Fixed-buffer table slots for ublk zero copy (AUTO_BUF_REG): one per tag of every
    /// export queue this reactor serves — coreblkd asks for `export.max_exports` ×
    /// `export.queue_depth` (the default here, 4096, is 32 queues of 128) — bounded by
    /// io_uring's table limit (16383 besides the pool's index 0, so 127 exports at depth
    /// 128). An empty slot costs the kernel one pointer. A queue that finds no run free
    /// serves through the copy path, with a warning ([`kslots`]).
    pub kernel_buf_slots: u32,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        Self {
            ring_entries: 256,
            max_inflight: 1024,
            idle_threshold_us: 200,
            busy_poll_limit_us: 2_000,
            poll_max_gap_us: DEFAULT_POLL_MAX_GAP_US,
            inbox_capacity: 1024,
            buf_chunk_bytes: 128 * 1024,
            buf_count: 64,
            pin: true,
            big_sqe: false,
            kernel_buf_slots: 32 * 128,
        }
    }
}

/// Counters readable from any thread (metrics, tests).
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Nanoseconds spent in loop iterations that found work.
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent asleep in the kernel.
    pub sleep_ns: AtomicU64,
    /// Times the reactor went to sleep (counted as it goes).
    pub sleeps: AtomicU64,
    /// `io_uring_enter` calls.
    pub enters: AtomicU64,
    /// Requests completed (ring and software).
    pub completions: AtomicU64,
    /// Naps and sleeps taken without polling first, because work lately took longer than
    /// `poll_max_gap_us` to come ([`PollPolicy`]); a part of `sleeps`.
    pub early_sleeps: AtomicU64,
}

/// Default of [`ReactorConfig::poll_max_gap_us`].
pub const DEFAULT_POLL_MAX_GAP_US: u64 = 30;

/// When an idle reactor polls, naps or sleeps (hybrid polling, as the kernel's block layer
/// does for its polled queues).
///
/// Polling pays when work comes back soon: a completion from a fast NVMe device, the next
/// request of a busy queue; the reactor then answers without a wake-up. When the reactor
/// has lately waited long for work (a device that answers in milliseconds, a request
/// every few hundred microseconds, a core shared with the workload), polling all the way
/// only takes CPU from everything else on the core. The policy learns the gap — the time
/// from running out of work to finding some — as a moving average (weight 1/8) per kind
/// of wait: nothing fast in flight (waiting for new requests or messages), or fast IO in
/// flight (waiting for the device). Then ([`Self::plan`]):
/// - gap ≤ `poll_max_gap_us`: poll (up to the configured limits);
/// - gap ≤ [`NAP_MAX`]: nap in the kernel for half the gap, then poll for at most the gap
///   again: the nap costs no latency when work comes after it (a wake-up is typically a
///   few µs on bare metal, ~20 µs in a VM) and saves about half the polling;
/// - longer: sleep until the work wakes the reactor.
///
/// A sample is capped at 2 × [`NAP_MAX`], so one long idle period makes the next burst
/// of IO nap, not sleep, and only for a few IOs.
///
/// A poll is also bounded by the gap itself ([`Self::poll_window`]): work that has not come
/// within 4 × the learned gap (at least 2 × `poll_max_gap_us`) is late, and the reactor
/// sleeps until it comes. Without that bound a late answer kept the reactor spinning up
/// to `busy_poll_limit_us` (2 ms), and when whatever it waits for needs this core (the
/// application submitting the next request on a shared core; under TCG every vCPU shares
/// one host thread) the spin itself made the answer late: 1 request in ~20 took 2 ms at
/// QD1 in the VM.
///
/// Must never: keep the reactor polling past the configured limits, or take a lock.
#[derive(Debug)]
pub struct PollPolicy {
    max_gap_ns: u64,
    /// Moving average of the gap, ns: `[nothing fast in flight, fast IO in flight]`.
    gap_ns: [u64; 2],
}

/// Gaps up to this long are napped through ([`PollPolicy`]); longer ones are slept.
pub const NAP_MAX: Duration = Duration::from_millis(1);

/// The longest a reactor sleeps in one go while fast IO is in flight (it then looks at
/// its ring again and sleeps anew).
pub const FAST_WAIT_MAX: Duration = Duration::from_millis(10);

/// What an idle reactor does next ([`PollPolicy::plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePlan {
    /// Poll, up to the configured limits.
    Poll,
    /// Sleep in the kernel for this long (a completion still wakes it earlier), then poll
    /// until the second duration has passed since work ran out.
    Nap(Duration, Duration),
    /// Sleep in the kernel until work wakes it.
    Sleep,
}

impl PollPolicy {
    /// A policy that polls for gaps up to `max_gap_us` (0: always poll).
    pub fn new(max_gap_us: u64) -> Self {
        Self {
            max_gap_ns: max_gap_us.saturating_mul(1000),
            gap_ns: [0; 2],
        }
    }

    /// Records that work came `gap` after the reactor ran out of it, in a wait of the
    /// kind `fast` (fast IO was in flight when it ran out).
    pub fn observe(&mut self, fast: bool, gap: Duration) {
        if self.max_gap_ns == 0 {
            return;
        }
        let sample = duration_ns(gap).min(duration_ns(NAP_MAX) * 2);
        let g = &mut self.gap_ns[usize::from(fast)];
        *g = *g - *g / 8 + sample / 8;
    }

    /// What to do in a wait of this kind.
    pub fn plan(&self, fast: bool) -> IdlePlan {
        let gap = self.gap_ns[usize::from(fast)];
        if self.max_gap_ns == 0 || gap <= self.max_gap_ns {
            IdlePlan::Poll
        } else if gap <= duration_ns(NAP_MAX) {
            IdlePlan::Nap(Duration::from_nanos(gap / 2), Duration::from_nanos(gap * 2))
        } else {
            IdlePlan::Sleep
        }
    }

    /// How long a [`IdlePlan::Poll`] of this kind of wait may poll before it sleeps: 4 × the
    /// learned gap, at least 2 × `poll_max_gap_us`; `None` with the policy off (poll up to
    /// the configured limits).
    pub fn poll_window(&self, fast: bool) -> Option<Duration> {
        if self.max_gap_ns == 0 {
            return None;
        }
        let gap = self.gap_ns[usize::from(fast)];
        Some(Duration::from_nanos(
            gap.saturating_mul(4).max(self.max_gap_ns.saturating_mul(2)),
        ))
    }

    /// The learned gap of a kind of wait (for tests and logs).
    pub fn gap(&self, fast: bool) -> Duration {
        Duration::from_nanos(self.gap_ns[usize::from(fast)])
    }
}

const DOORBELL_UD: u64 = u64::MAX;
/// `user_data` bit of a standing command ([`Reactor::submit_standing`]): the rest holds
/// the handler id (bits 32..62) and the caller's tag (bits 0..31).
const STANDING_BIT: u64 = 1 << 63;
/// Standing-command handlers a reactor holds (ublk queues it serves).
pub const MAX_STANDING_HANDLERS: u32 = 4096;

/// Waits for a pooled buffer ([`Reactor::wait_for_buf`]).
pub trait BufWaiter {
    /// A buffer has come back to this reactor's pool; take it with `rx.bufs().take(..)`
    /// (another waiter may have been faster: wait again if it is gone).
    fn buf_ready(&self, rx: &Reactor);
}

/// How a request's raw CQE result becomes an [`IoResult`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultMap {
    /// Negative errno or bytes transferred (read, write, fsync, fallocate...).
    Errno,
    /// NVMe passthrough: negative errno, 0 = success (report `ok_bytes`), positive = NVMe
    /// status (reported as EIO).
    NvmeStatus {
        /// Bytes the command transferred when it succeeded.
        ok_bytes: u32,
    },
}

impl ResultMap {
    fn apply(self, res: i32) -> IoResult {
        match (self, res) {
            (_, r) if r < 0 => Err(Errno(-r)),
            (ResultMap::Errno, r) => Ok(r.unsigned_abs()),
            (ResultMap::NvmeStatus { ok_bytes }, 0) => Ok(ok_bytes),
            (ResultMap::NvmeStatus { .. }, _) => Err(Errno::EIO),
        }
    }
}

struct Slot {
    cb: Option<Rc<dyn Completion>>,
    tag: u64,
    buf: Option<IoBuf>,
    kind: OpKind,
    map: ResultMap,
}

/// The in-flight request table: preallocated, indexed by `user_data`.
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    fast_inflight: usize,
}

impl Slots {
    fn new(n: u32) -> Self {
        Self {
            slots: (0..n)
                .map(|_| Slot {
                    cb: None,
                    tag: 0,
                    buf: None,
                    kind: OpKind::Fast,
                    map: ResultMap::Errno,
                })
                .collect(),
            free: (0..n).rev().collect(),
            fast_inflight: 0,
        }
    }

    fn alloc(
        &mut self,
        cb: Rc<dyn Completion>,
        tag: u64,
        buf: Option<IoBuf>,
        kind: OpKind,
        map: ResultMap,
    ) -> Result<u32, (SubmitError, Option<IoBuf>)> {
        let Some(idx) = self.free.pop() else {
            return Err((SubmitError::Full(self.slots.len()), buf));
        };
        let slot = &mut self.slots[idx as usize];
        debug_assert!(slot.cb.is_none(), "free slot {idx} still holds a request");
        slot.cb = Some(cb);
        slot.tag = tag;
        slot.buf = buf;
        slot.kind = kind;
        slot.map = map;
        if kind == OpKind::Fast {
            self.fast_inflight += 1;
        }
        Ok(idx)
    }

    fn release(&mut self, idx: u32) -> (Rc<dyn Completion>, u64, Option<IoBuf>, ResultMap) {
        let slot = &mut self.slots[idx as usize];
        let cb = slot
            .cb
            .take()
            .unwrap_or_else(|| panic!("completion for idle request slot {idx}"));
        if slot.kind == OpKind::Fast {
            self.fast_inflight -= 1;
        }
        let out = (cb, slot.tag, slot.buf.take(), slot.map);
        self.free.push(idx);
        out
    }

    fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// What a poller asks of the loop after it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStatus {
    /// Did something: keep the reactor awake.
    Busy,
    /// Found nothing to do.
    Idle,
}

type Poller = Box<dyn FnMut(&Reactor) -> PollStatus>;

/// One reactor: lives on its own thread; reached from elsewhere through its [`Remote`].
pub struct Reactor {
    id: usize,
    core: Option<usize>,
    cfg: ReactorConfig,
    ring: RefCell<Ring>,
    /// SQEs pushed since the last `io_uring_enter`.
    pending_sqes: Cell<u32>,
    slots: RefCell<Slots>,
    /// Requests completed in software (null, malloc, validation errors): same slot table,
    /// same dispatch as ring completions, delivered from the loop, never inline.
    soft_done: RefCell<VecDeque<(u32, IoResult)>>,
    inbox: Arc<msg::Inbox>,
    timers: RefCell<timer::Timers>,
    pollers: RefCell<Vec<Poller>>,
    bufs: BufPool,
    stats: Arc<ReactorStats>,
    stopping: Cell<bool>,
    /// Registered file table: slots used so far.
    files_used: RefCell<Vec<bool>>,
    /// Fixed-buffer slots lent to ublk queues (zero copy).
    kslots: RefCell<kslots::KernelSlots>,
    /// `/dev/zero`, the source that zero-fills kernel buffers ([`crate::bdev::zero_fill`]).
    dev_zero: std::fs::File,
    /// Landing spot of the armed doorbell read; boxed so its address never moves.
    doorbell_buf: Box<Cell<u64>>,
    cached_now: Cell<Instant>,
    /// Handlers of standing commands (ublk FETCH), by id; see [`Reactor::submit_standing`].
    standing: RefCell<Vec<Option<Rc<dyn Completion>>>>,
    /// Who waits for a pooled buffer, in arrival order (each at most once).
    buf_waiters: RefCell<VecDeque<Rc<dyn BufWaiter>>>,
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("id", &self.id)
            .field("core", &self.core)
            .field("inflight", &self.slots.borrow().inflight())
            .finish()
    }
}

/// Registered-file table size per reactor.
const MAX_FILES: u32 = 256;

impl Reactor {
    fn new(
        id: usize,
        core: Option<usize>,
        cfg: ReactorConfig,
        inbox: Arc<msg::Inbox>,
    ) -> std::io::Result<Self> {
        let cq_entries = cfg.max_inflight.max(cfg.ring_entries).next_power_of_two() * 2;
        let ring = Ring::new(cfg.ring_entries, cq_entries, cfg.big_sqe)?;
        let bufs = BufPool::new(cfg.buf_chunk_bytes, cfg.buf_count)?;
        let (ptr, len) = bufs.region();
        let iov = libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        };
        // A sparse table: the pool at index 0, empty slots for the kernel to register ublk
        // requests' pages in (zero copy).
        let kslots = kslots::KernelSlots::new(cfg.kernel_buf_slots);
        ring.submitter()
            .register_buffers_sparse(kslots.table_len())?;
        // The iovec describes the pool's mmap, which lives as long as `bufs`, which the
        // reactor owns and drops only after the ring (field order below is irrelevant: the
        // ring is explicitly dropped first in `drop_reactor`).
        // SAFETY: so the registered memory outlives the ring's use of it.
        unsafe { ring.submitter().register_buffers_update(0, &[iov], None) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOMEM) {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot register {len} bytes of IO buffers with io_uring: the locked-memory limit is too low \
                         (run coreblkd as root, or raise `ulimit -l` / LimitMEMLOCK)"
                    ),
                )
            } else {
                e
            }
        })?;
        ring.submitter().register_files_sparse(MAX_FILES)?;
        Ok(Self {
            id,
            core,
            slots: RefCell::new(Slots::new(cfg.max_inflight)),
            soft_done: RefCell::new(VecDeque::with_capacity(cfg.max_inflight as usize)),
            cfg,
            ring: RefCell::new(ring),
            pending_sqes: Cell::new(0),
            inbox,
            timers: RefCell::new(timer::Timers::default()),
            pollers: RefCell::new(Vec::new()),
            bufs,
            stats: Arc::new(ReactorStats::default()),
            stopping: Cell::new(false),
            files_used: RefCell::new(vec![false; MAX_FILES as usize]),
            kslots: RefCell::new(kslots),
            dev_zero: std::fs::File::open("/dev/zero")?,
            doorbell_buf: Box::new(Cell::new(0)),
            cached_now: Cell::new(Instant::now()),
            standing: RefCell::new(Vec::new()),
            buf_waiters: RefCell::new(VecDeque::with_capacity(64)),
        })
    }

    /// Index of this reactor in its set.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The core this reactor is pinned to, if pinned.
    pub fn core(&self) -> Option<usize> {
        self.core
    }

    /// This reactor's buffer pool.
    pub fn bufs(&self) -> &BufPool {
        &self.bufs
    }

    /// This reactor's counters.
    pub fn stats(&self) -> &Arc<ReactorStats> {
        &self.stats
    }

    /// Requests in flight on this reactor.
    pub fn inflight(&self) -> usize {
        self.slots.borrow().inflight()
    }

    /// The time at the start of this loop iteration (cheap; good enough for timers).
    pub fn now(&self) -> Instant {
        self.cached_now.get()
    }

    /// Asks the loop to return once in-flight requests have drained.
    pub fn stop(&self) {
        self.stopping.set(true);
    }

    /// A handle that other threads use to send this reactor work.
    pub fn remote(&self) -> Remote {
        Remote {
            id: self.id,
            inbox: Arc::clone(&self.inbox),
        }
    }

    /// Registers `fd` in this reactor's fixed-file table; the returned index stays valid
    /// until [`Self::unregister_file`]. The caller keeps `fd` open at least that long.
    pub fn register_file(&self, fd: RawFd) -> std::io::Result<u32> {
        let mut used = self.files_used.borrow_mut();
        let idx = used.iter().position(|u| !u).ok_or_else(|| {
            std::io::Error::other(format!(
                "reactor {} registered-file table is full ({MAX_FILES} files)",
                self.id
            ))
        })?;
        let idx_u32 = u32::try_from(idx).expect("file table index fits u32: MAX_FILES is small");
        self.ring
            .borrow()
            .submitter()
            .register_files_update(idx_u32, &[fd])?;
        used[idx] = true;
        Ok(idx_u32)
    }

    /// `/dev/zero`, open for as long as the reactor lives.
    pub fn dev_zero_fd(&self) -> RawFd {
        self.dev_zero.as_raw_fd()
    }

    /// Lends `n` contiguous fixed-buffer slots for the kernel to register ublk requests'
    /// pages in (AUTO_BUF_REG); returns the first index. `None` when the table has no run
    /// that long free (the caller then serves through the copy path).
    pub fn alloc_kernel_slots(&self, n: u16) -> Option<u16> {
        self.kslots.borrow_mut().alloc(n)
    }

    /// An index beyond this ring's fixed-buffer table: a kernel registration there fails,
    /// so with FALLBACK every request falls back to the copy path.
    pub fn no_kernel_slot(&self) -> u16 {
        u16::try_from(self.kslots.borrow().table_len()).unwrap_or(u16::MAX)
    }

    /// Takes back slots lent by [`Self::alloc_kernel_slots`], first clearing any buffer the
    /// kernel left registered there (requests held unanswered when a queue stopped), so the
    /// next queue's registrations find them empty.
    pub fn free_kernel_slots(&self, first: u16, n: u16) {
        let empty = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            usize::from(n)
        ];
        // SAFETY: empty iovecs register no memory; they only drop what the slots hold.
        let r = unsafe {
            self.ring
                .borrow()
                .submitter()
                .register_buffers_update(u32::from(first), &empty, None)
        };
        if let Err(e) = r {
            // The slots stay lent (leaked until the reactor exits) rather than handed to a
            // queue whose registrations would fail on them.
            tracing::warn!(reactor = self.id, first, n, error = %e, "cannot clear kernel-buffer slots; not reusing them");
            return;
        }
        self.kslots.borrow_mut().free(first, n);
    }

    /// Frees a fixed-file slot taken by [`Self::register_file`].
    pub fn unregister_file(&self, idx: u32) {
        let mut used = self.files_used.borrow_mut();
        if let Some(u) = used.get_mut(idx as usize) {
            // -1 clears the slot; a failure only leaks the slot until the reactor exits.
            let _ = self
                .ring
                .borrow()
                .submitter()
                .register_files_update(idx, &[-1]);
            *u = false;
        }
    }

    /// Queues an SQE. Its `user_data` is overwritten with the request's slot index; the
    /// request (and `buf`) stays in the slot table until its completion is delivered to
    /// `cb.complete(.., tag, ..)` on this reactor.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until the completion is reaped: it must point
    /// into `buf` (which the slot owns until then) or into memory the caller keeps alive at
    /// least as long (e.g. a `'static` or reactor-owned object). Fixed file indices must be
    /// registered on this reactor.
    pub unsafe fn submit(
        &self,
        sqe: squeue::Entry,
        kind: OpKind,
        cb: Rc<dyn Completion>,
        tag: u64,
        buf: Option<IoBuf>,
    ) -> Result<(), (SubmitError, Option<IoBuf>)> {
        let idx = self
            .slots
            .borrow_mut()
            .alloc(cb, tag, buf, kind, ResultMap::Errno)?;
        let sqe = sqe.user_data(u64::from(idx));
        // SAFETY: forwarded from this function's contract (pointers live until completion).
        unsafe { self.push_sqe(|ring| ring.push(&sqe)) };
        Ok(())
    }

    /// Whether this reactor's ring takes 128-byte SQEs ([`Self::submit128`]).
    pub fn has_big_sqe(&self) -> bool {
        self.ring.borrow().is_big()
    }

    /// As [`Self::submit`] for a 128-byte SQE (NVMe passthrough); the raw result is turned
    /// into an [`IoResult`] by `map`. The ring must have been built with `big_sqe`: check
    /// [`Self::has_big_sqe`] first (channels do so when they open).
    ///
    /// # Safety
    /// As [`Self::submit`].
    pub unsafe fn submit128(
        &self,
        sqe: squeue::Entry128,
        kind: OpKind,
        map: ResultMap,
        cb: Rc<dyn Completion>,
        tag: u64,
        buf: Option<IoBuf>,
    ) -> Result<(), (SubmitError, Option<IoBuf>)> {
        assert!(
            self.has_big_sqe(),
            "submit128 on reactor {} without big_sqe",
            self.id
        );
        let idx = self.slots.borrow_mut().alloc(cb, tag, buf, kind, map)?;
        let sqe = sqe.user_data(u64::from(idx));
        // SAFETY: forwarded from this function's contract (pointers live until completion).
        unsafe { self.push_sqe(|ring| ring.push128(&sqe)) };
        Ok(())
    }

    /// Registers the handler of a family of standing commands (a ublk queue's FETCHes) and
    /// returns its id for [`Self::submit_standing`]; [`Self::remove_standing`] frees it.
    ///
    /// # Errors
    /// The reactor already holds [`MAX_STANDING_HANDLERS`] handlers.
    pub fn add_standing(&self, handler: Rc<dyn Completion>) -> std::io::Result<u32> {
        let mut hs = self.standing.borrow_mut();
        if let Some(i) = hs.iter().position(Option::is_none) {
            hs[i] = Some(handler);
            return Ok(u32::try_from(i).expect("fewer than MAX_STANDING_HANDLERS handlers"));
        }
        let id = u32::try_from(hs.len()).expect("fewer than MAX_STANDING_HANDLERS handlers");
        if id >= MAX_STANDING_HANDLERS {
            return Err(std::io::Error::other(format!(
                "reactor {} serves {MAX_STANDING_HANDLERS} ublk queues already",
                self.id
            )));
        }
        hs.push(Some(handler));
        Ok(id)
    }

    /// Forgets handler `id`: completions still arriving for it are dropped (log).
    pub fn remove_standing(&self, id: u32) {
        if let Some(h) = self.standing.borrow_mut().get_mut(id as usize) {
            *h = None;
        }
    }

    /// Queues a standing command: one that stays in the kernel until the kernel has work
    /// for us (a ublk FETCH waits for a block request). It takes no request slot (a device
    /// holds one per tag, for as long as it is served), never keeps the reactor polling,
    /// and a stop does not wait for it (tearing the ring down cancels it). Its completion
    /// goes to handler `id`'s `complete(rx, tag, ..)`, with no buffer.
    ///
    /// # Safety
    /// As [`Self::submit`]: every pointer in `sqe` stays valid until the completion is
    /// reaped (or the ring is gone); fixed files are registered on this reactor.
    pub unsafe fn submit_standing(&self, sqe: squeue::Entry, id: u32, tag: u32) {
        assert!(
            id < MAX_STANDING_HANDLERS,
            "standing handler id {id} out of range"
        );
        let sqe = sqe.user_data(STANDING_BIT | (u64::from(id) << 32) | u64::from(tag));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push_sqe(|ring| ring.push(&sqe)) };
    }

    fn finish_standing(&self, ud: u64, res: i32) {
        let id = ((ud & !STANDING_BIT) >> 32) as usize;
        let tag = ud & 0xffff_ffff;
        let h = self.standing.borrow().get(id).cloned().flatten();
        match h {
            Some(h) => h.complete(self, tag, ResultMap::Errno.apply(res), None),
            None => tracing::debug!(
                reactor = self.id,
                id,
                tag,
                res,
                "completion of a removed standing command"
            ),
        }
    }

    /// Calls `w.buf_ready` from the loop once a pooled buffer is free (back-pressure
    /// without spinning). A waiter already waiting is not added twice.
    pub fn wait_for_buf(&self, w: &Rc<dyn BufWaiter>) {
        let mut ws = self.buf_waiters.borrow_mut();
        if !ws.iter().any(|x| Rc::ptr_eq(x, w)) {
            ws.push_back(Rc::clone(w));
        }
    }

    fn wake_buf_waiters(&self) -> usize {
        let mut n = 0;
        while self.bufs.available() > 0 {
            let Some(w) = self.buf_waiters.borrow_mut().pop_front() else {
                break;
            };
            w.buf_ready(self);
            n += 1;
        }
        n
    }

    /// Completes a request in software: it takes a slot like a ring request and its
    /// completion is delivered by the loop through the same path as a ring completion.
    pub fn complete_soft(
        &self,
        cb: Rc<dyn Completion>,
        tag: u64,
        res: IoResult,
        buf: Option<IoBuf>,
    ) -> Result<(), (SubmitError, Option<IoBuf>)> {
        let idx = self
            .slots
            .borrow_mut()
            .alloc(cb, tag, buf, OpKind::Fast, ResultMap::Errno)?;
        self.soft_done.borrow_mut().push_back((idx, res));
        Ok(())
    }

    /// # Safety
    /// As [`Self::submit`]: the SQE that `push` pushes has pointers valid until its
    /// completion is reaped.
    unsafe fn push_sqe(&self, push: impl Fn(&mut Ring) -> Result<(), PushError>) {
        let mut ring = self.ring.borrow_mut();
        loop {
            match push(&mut ring) {
                Ok(()) => break,
                // SQ full: hand the queued entries to the kernel, then retry.
                Err(PushError::Full) => self.enter(&ring, 0),
                Err(PushError::NeedsBigSqe) => unreachable!("checked by submit128"),
            }
        }
        self.pending_sqes.set(self.pending_sqes.get() + 1);
    }

    fn enter(&self, ring: &Ring, want: usize) {
        self.stats.enters.fetch_add(1, Ordering::Relaxed);
        match ring.submitter().submit_and_wait(want) {
            Ok(_) => self.pending_sqes.set(0),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => panic!("reactor {}: io_uring_enter failed: {e}", self.id),
        }
    }

    /// Schedules `f` to run once at or after `after` from now.
    pub fn add_timer(&self, after: Duration, f: Box<dyn FnOnce(&Reactor)>) -> TimerId {
        self.timers.borrow_mut().add(self.now() + after, f)
    }

    /// Cancels a timer that has not fired; returns whether it was pending.
    pub fn cancel_timer(&self, id: TimerId) -> bool {
        self.timers.borrow_mut().cancel(id)
    }

    /// Runs `f` every `period` (a periodic poller: journal commits, metrics).
    pub fn add_periodic(&self, period: Duration, f: impl FnMut(&Reactor) + 'static) {
        fn rearm(rx: &Reactor, period: Duration, mut f: Box<dyn FnMut(&Reactor)>) {
            rx.add_timer(
                period,
                Box::new(move |rx: &Reactor| {
                    f(rx);
                    if !rx.stopping.get() {
                        rearm(rx, period, f);
                    }
                }),
            );
        }
        rearm(self, period, Box::new(f));
    }

    /// Runs `f` on every loop iteration (a busy poller, e.g. a ublk queue in a later issue).
    pub fn add_poller(&self, f: impl FnMut(&Reactor) -> PollStatus + 'static) {
        self.pollers.borrow_mut().push(Box::new(f));
    }

    fn arm_doorbell(&self) {
        let sqe = opcode::Read::new(
            types::Fd(self.inbox.doorbell.as_raw_fd()),
            self.doorbell_buf.as_ptr().cast(),
            8,
        )
        .build()
        .user_data(DOORBELL_UD);
        // The read lands in `doorbell_buf`, a Box owned by the reactor that outlives the
        // ring (the ring is torn down first in `drop_reactor`); the eventfd is owned by the
        // inbox, which the reactor holds an Arc to.
        // SAFETY: the buffer and the eventfd outlive the read (above).
        unsafe { self.push_sqe(|ring| ring.push(&sqe)) };
    }

    fn drain_inbox(&self) -> usize {
        let mut n = 0;
        // Bounded batch so messages cannot starve IO.
        while n < 64 {
            let Some(m) = self.inbox.queue.pop() else {
                break;
            };
            m(self);
            n += 1;
        }
        n
    }

    fn deliver_soft(&self) -> usize {
        // Only what is queued now: completions that submit more soft IO run next iteration.
        let n = self.soft_done.borrow().len();
        for _ in 0..n {
            let Some((idx, res)) = self.soft_done.borrow_mut().pop_front() else {
                break;
            };
            self.finish(idx, |_| res);
        }
        n
    }

    /// Delivers request `idx`'s completion: the one path for ring and software completions.
    /// `res` turns the slot's result mapping into the request's result.
    fn finish(&self, idx: u32, res: impl FnOnce(ResultMap) -> IoResult) {
        let (cb, tag, buf, map) = self.slots.borrow_mut().release(idx);
        self.stats.completions.fetch_add(1, Ordering::Relaxed);
        cb.complete(self, tag, res(map), buf);
    }

    /// Submits queued SQEs (one syscall for all) and runs pending task work when the kernel
    /// says there is some; then reaps the CQ. Returns completions delivered.
    fn submit_and_reap(&self) -> usize {
        {
            let mut ring = self.ring.borrow_mut();
            if self.pending_sqes.get() > 0 || ring.needs_enter() {
                self.enter(&ring, 0);
            }
        }
        self.reap()
    }

    fn reap(&self) -> usize {
        let mut batch: [(u64, i32); 64] = [(0, 0); 64];
        let mut total = 0;
        loop {
            let n = self.ring.borrow_mut().reap(&mut batch);
            for &(ud, res) in &batch[..n] {
                if ud == DOORBELL_UD {
                    // Keep the doorbell armed; while stopping, a failed read (cancelled)
                    // is not re-armed so teardown cannot loop.
                    if res >= 0 || !self.stopping.get() {
                        self.arm_doorbell();
                    }
                    continue;
                }
                if ud & STANDING_BIT != 0 {
                    self.finish_standing(ud, res);
                    continue;
                }
                let idx = u32::try_from(ud).expect("user_data of a request is its u32 slot index");
                self.finish(idx, |map| map.apply(res));
            }
            total += n;
            if n < batch.len() {
                return total;
            }
        }
    }

    fn sleep(&self, next_timer: Option<Instant>) {
        self.inbox.sleeping.store(true, Ordering::SeqCst);
        if !self.inbox.queue.is_empty() {
            self.inbox.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        let start = Instant::now();
        self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        {
            let ring = self.ring.borrow();
            self.stats.enters.fetch_add(1, Ordering::Relaxed);
            let res = match next_timer {
                Some(t) => {
                    let d = t.saturating_duration_since(start);
                    let ts = types::Timespec::from(d.max(Duration::from_micros(1)));
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                }
                None => ring.submitter().submit_and_wait(1),
            };
            match res {
                Ok(_) => self.pending_sqes.set(0),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => panic!("reactor {}: io_uring_enter (wait) failed: {e}", self.id),
            }
        }
        self.inbox.sleeping.store(false, Ordering::SeqCst);
        self.stats
            .sleep_ns
            .fetch_add(duration_ns(start.elapsed()), Ordering::Relaxed);
    }

    /// The reactor loop; returns after [`Self::stop`] once nothing is in flight.
    pub fn run(&self) {
        self.arm_doorbell();
        let idle_threshold = Duration::from_micros(self.cfg.idle_threshold_us);
        let busy_poll_limit = Duration::from_micros(self.cfg.busy_poll_limit_us);
        let mut policy = PollPolicy::new(self.cfg.poll_max_gap_us);
        // When the reactor last ran out of work, and whether fast IO was in flight then.
        let mut idle_since: Option<(Instant, bool)> = None;
        // Whether this idle period has had its nap.
        let mut napped = false;
        loop {
            let now = Instant::now();
            self.cached_now.set(now);
            let mut work = self.drain_inbox();
            work += self.deliver_soft();
            work += self.fire_timers(now);
            work += self.run_pollers();
            if !self.buf_waiters.borrow().is_empty() {
                work += self.wake_buf_waiters();
            }
            work += self.submit_and_reap();
            if work > 0 {
                if let Some((since, fast)) = idle_since.take() {
                    policy.observe(fast, now.duration_since(since));
                }
                napped = false;
                self.stats
                    .busy_ns
                    .fetch_add(duration_ns(now.elapsed()), Ordering::Relaxed);
                continue;
            }
            if self.stopping.get() && self.inflight() == 0 && self.soft_done.borrow().is_empty() {
                break;
            }
            let (since, kind) =
                *idle_since.get_or_insert_with(|| (now, self.slots.borrow().fast_inflight > 0));
            let idle_for = now.duration_since(since);
            let limit = if kind {
                busy_poll_limit
            } else {
                idle_threshold.min(busy_poll_limit)
            };
            // With fast IO in flight a sleep is bounded too: a completion whose wake-up
            // went missing (the 6.12 VM saw NVMe passthrough jobs hang) then costs
            // FAST_WAIT_MAX, not the job.
            let cap = kind.then(|| now + FAST_WAIT_MAX);
            let next = || match (self.timers.borrow().next_deadline(), cap) {
                (Some(t), Some(c)) => Some(t.min(c)),
                (t, c) => t.or(c),
            };
            let poll_limit = policy.poll_window(kind).map_or(limit, |w| w.min(limit));
            match policy.plan(kind) {
                IdlePlan::Poll if idle_for < poll_limit => {}
                IdlePlan::Nap(nap, _) if !napped => {
                    napped = true;
                    self.stats.early_sleeps.fetch_add(1, Ordering::Relaxed);
                    let until = now + nap;
                    self.sleep(Some(next().map_or(until, |t| t.min(until))));
                }
                IdlePlan::Nap(_, poll_until) if idle_for < poll_until.min(limit) => {}
                IdlePlan::Sleep => {
                    self.stats.early_sleeps.fetch_add(1, Ordering::Relaxed);
                    self.sleep(next());
                }
                // Polled up to the limit: sleep. A wake-up without work (a spurious one, or
                // a timer that found nothing) sleeps again at once: the limit counts from
                // when work ran out.
                _ => self.sleep(next()),
            }
        }
        self.inbox.closed.store(true, Ordering::Release);
        // Messages that raced with the close still run: nothing is dropped silently.
        while self.drain_inbox() > 0 {}
    }

    fn fire_timers(&self, now: Instant) -> usize {
        let due = self.timers.borrow_mut().take_due(now);
        let n = due.len();
        for f in due {
            f(self);
        }
        n
    }

    fn run_pollers(&self) -> usize {
        if self.pollers.borrow().is_empty() {
            return 0;
        }
        let mut pollers = std::mem::take(&mut *self.pollers.borrow_mut());
        let mut busy = 0;
        for p in &mut pollers {
            if p(self) == PollStatus::Busy {
                busy += 1;
            }
        }
        // Pollers added while running go after the existing ones.
        let mut added = std::mem::take(&mut *self.pollers.borrow_mut());
        pollers.append(&mut added);
        *self.pollers.borrow_mut() = pollers;
        busy
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Errors starting reactors.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--cores` did not parse.
    #[error("invalid core list {list:?}: {why} (expected e.g. \"0\", \"0-3\" or \"0,2,4-5\")")]
    BadCoreList {
        /// What was given.
        list: String,
        /// What is wrong with it.
        why: String,
    },
    /// A core is not in this process's CPU set.
    #[error("core {core} is not available to this process (allowed cores: {allowed}); pick cores from that list with --cores")]
    CoreNotAllowed {
        /// The core asked for.
        core: usize,
        /// The allowed set, formatted.
        allowed: String,
    },
    /// io_uring or thread setup failed.
    #[error("starting reactor {id} on core {core:?}: {source}")]
    Setup {
        /// Reactor index.
        id: usize,
        /// Its core.
        core: Option<usize>,
        /// What failed.
        source: std::io::Error,
    },
}

/// Parses a core list like `0-3,6`. Duplicates and empty lists are errors.
pub fn parse_core_list(list: &str) -> Result<Vec<usize>, StartError> {
    let bad = |why: String| StartError::BadCoreList {
        list: list.to_string(),
        why,
    };
    let mut cores = Vec::new();
    for part in list.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad("empty element".into()));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo
            .parse()
            .map_err(|_| bad(format!("{lo:?} is not a core number")))?;
        let hi: usize = hi
            .parse()
            .map_err(|_| bad(format!("{hi:?} is not a core number")))?;
        if hi < lo {
            return Err(bad(format!("range {part} runs backwards")));
        }
        if hi - lo >= 4096 {
            return Err(bad(format!("range {part} is too large")));
        }
        for c in lo..=hi {
            if cores.contains(&c) {
                return Err(bad(format!("core {c} listed twice")));
            }
            cores.push(c);
        }
    }
    Ok(cores)
}

/// Cores this process may run on.
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: passes a live, correctly sized cpu_set_t for the kernel to fill.
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut set) };
    if rc != 0 {
        return (0..std::thread::available_parallelism().map_or(1, usize::from)).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads the set; `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

fn pin_to(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`; `core` was checked against the allowed set.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: passes a live, correctly sized cpu_set_t; 0 = the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running set of reactors, one per core.
#[derive(Debug)]
pub struct ReactorSet {
    remotes: Vec<Remote>,
    stats: Vec<Arc<ReactorStats>>,
    threads: Vec<JoinHandle<()>>,
    stopped: Arc<AtomicBool>,
}

impl ReactorSet {
    /// Starts one reactor per entry of `cores` (pinned when `cfg.pin`), each running `init`
    /// on its own thread before entering the loop. Fails — with every started reactor
    /// stopped — if a core is unavailable or a ring cannot be set up.
    pub fn start(cores: &[usize], cfg: &ReactorConfig) -> Result<Self, StartError> {
        let allowed = allowed_cores();
        if cfg.pin {
            for &c in cores {
                if !allowed.contains(&c) {
                    return Err(StartError::CoreNotAllowed {
                        core: c,
                        allowed: format_cores(&allowed),
                    });
                }
            }
        }
        let mut set = Self {
            remotes: Vec::new(),
            stats: Vec::new(),
            threads: Vec::new(),
            stopped: Arc::new(AtomicBool::new(false)),
        };
        for (id, &core) in cores.iter().enumerate() {
            let inbox = Arc::new(msg::Inbox::new(cfg.inbox_capacity).map_err(|source| {
                StartError::Setup {
                    id,
                    core: Some(core),
                    source,
                }
            })?);
            let (tx, rx) = crossbeam::channel::bounded(1);
            let cfg2 = cfg.clone();
            let inbox2 = Arc::clone(&inbox);
            let th = std::thread::Builder::new()
                .name(format!("reactor{id}"))
                .spawn(move || {
                    let started = (|| {
                        if cfg2.pin {
                            pin_to(core)?;
                        }
                        Reactor::new(id, Some(core), cfg2, inbox2)
                    })();
                    match started {
                        Ok(r) => {
                            let _ = tx.send(Ok(Arc::clone(r.stats())));
                            r.run();
                            drop_reactor(r);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                })
                .map_err(|source| StartError::Setup {
                    id,
                    core: Some(core),
                    source,
                })?;
            let started = rx
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("reactor thread died during start")));
            match started {
                Ok(stats) => {
                    set.remotes.push(Remote { id, inbox });
                    set.stats.push(stats);
                    set.threads.push(th);
                }
                Err(source) => {
                    let _ = th.join();
                    set.shutdown();
                    return Err(StartError::Setup {
                        id,
                        core: Some(core),
                        source,
                    });
                }
            }
        }
        Ok(set)
    }

    /// Handles to every reactor, in core-list order.
    pub fn remotes(&self) -> &[Remote] {
        &self.remotes
    }

    /// Per-reactor counters.
    pub fn stats(&self) -> &[Arc<ReactorStats>] {
        &self.stats
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.remotes.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Stops every reactor (each finishes its in-flight requests) and joins the threads.
    pub fn shutdown(&mut self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.remotes {
            let _ = r.send(Box::new(|rx: &Reactor| rx.stop()));
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ReactorSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Tears a reactor down in the order that keeps kernel-visible memory valid: the ring (and
/// with it every registration) goes before the buffers and the doorbell landing spot.
fn drop_reactor(r: Reactor) {
    let Reactor {
        ring,
        bufs,
        doorbell_buf,
        ..
    } = r;
    drop(ring);
    drop(bufs);
    drop(doorbell_buf);
}

/// Formats a core list compactly: `0-3,6`.
pub fn format_cores(cores: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests;
