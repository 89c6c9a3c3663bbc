//! One benchmark job per reactor: keeps `qd` requests in flight, times each, and reports
//! back to the main thread when its time is up and its requests have drained. With
//! `flush_every = N` a job follows every N-th completed write with a FLUSH from the same
//! slot (the slot's next IO waits for it); flushes are timed into their own histogram and
//! are not counted as IOs. [`prefill`] writes a target's range once, sequentially, before a
//! run; [`write_list`] writes a list of offsets (the rewrites of a snapshot history).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use coreblk_daemon::bdev::{BlockDevice, Channel, Io};
use coreblk_daemon::reactor::{Completion, IoBuf, IoResult, Reactor, ReactorSet};
use hdrhistogram::Histogram;

/// Access pattern.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    /// Random offsets (else sequential).
    pub random: bool,
    /// Percentage of reads.
    pub read_pct: u8,
}

/// What every job does.
#[derive(Clone, Debug)]
pub struct JobParams {
    /// IO size.
    pub bs: u32,
    /// Requests in flight per reactor.
    pub qd: u32,
    /// Pattern.
    pub pattern: Pattern,
    /// Bytes of the target used.
    pub span_bytes: u64,
    /// Uncounted lead-in.
    pub warmup: Duration,
    /// Counted time.
    pub time: Duration,
    /// Issue a FLUSH after every this many writes (0: never).
    pub flush_every: u64,
}

/// Tag bit marking a slot's FLUSH (the low bits are the slot).
const FLUSH_TAG: u64 = 1 << 63;

/// A control action at a given time of the measured window (a QoS change).
pub struct Event {
    /// When, from the start of the measured window.
    pub at: Duration,
    /// What it does, for the report.
    pub what: String,
    /// Does it (on the main thread; it may message reactors).
    pub run: Box<dyn FnOnce() -> anyhow::Result<()>>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("at", &self.at)
            .field("what", &self.what)
            .finish()
    }
}

/// One job's counted IOs and bytes, in total and per second of the measured window.
#[derive(Clone, Debug, Default)]
pub struct JobSeries {
    /// Counted IOs.
    pub ios: u64,
    /// Their bytes.
    pub bytes: u64,
    /// (IOs, bytes) completed in each whole second of the measured window.
    pub per_sec: Vec<(u64, u64)>,
}

/// One job's outcome.
#[derive(Debug)]
struct JobResult {
    series: JobSeries,
    ios: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
    flushes: u64,
    inline_completions: u64,
    flush_hist: Histogram<u64>,
    write_bytes_all: u64,
}

/// All jobs' outcome.
#[derive(Debug)]
pub struct JobsResult {
    /// Counted IOs.
    pub ios: u64,
    /// Failed IOs.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Latency in ns, all reactors merged.
    pub hist: Histogram<u64>,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Process CPU time over the measured window.
    pub cpu_ns: u64,
    /// Counted IOs per reactor.
    pub per_core_ios: Vec<u64>,
    /// Counted flushes.
    pub flushes: u64,
    /// Completions delivered inside `submit` instead of from the reactor loop (an
    /// ARCHITECTURE.md invariant says this happens only for a full request table).
    pub inline_completions: u64,
    /// Flush latency in ns, all reactors merged.
    pub flush_hist: Histogram<u64>,
    /// Bytes of every successful write, warm-up and drain included (the run's whole
    /// user-visible write volume, for write amplification).
    pub write_bytes_all: u64,
    /// Each job's series, in the order the jobs were given.
    pub per_job: Vec<JobSeries>,
    /// The events run, with the time each was done (from the window's start).
    pub events: Vec<(String, Duration)>,
}

struct Job {
    /// (IOs, bytes) per whole second of the measured window.
    per_sec: RefCell<Vec<(u64, u64)>>,
    bytes: Cell<u64>,
    me: std::rc::Weak<Job>,
    ch: Rc<dyn Channel>,
    p: JobParams,
    /// Per-slot submit time.
    started: RefCell<Vec<Instant>>,
    /// Per-slot: the IO in flight is a write.
    writing: RefCell<Vec<bool>>,
    /// Per-slot buffer held while the slot's FLUSH is in flight.
    parked: RefCell<Vec<Option<IoBuf>>>,
    writes_since_flush: Cell<u64>,
    /// Inside `ch.submit`: a completion now arrived inline (not from the reactor loop).
    in_submit: Cell<bool>,
    /// Some frame is draining `deferred`: nested submits leave inline completions to it.
    draining: Cell<bool>,
    /// Completions that arrived inline, handled after `submit` returned (a trampoline:
    /// handling them in place would recurse once per IO and overflow the stack).
    deferred: RefCell<VecDeque<(u64, IoResult, Option<IoBuf>)>>,
    inline_completions: Cell<u64>,
    rng: Cell<u64>,
    next_seq: Cell<u64>,
    /// Region of the target this job's sequential stream walks.
    region: (u64, u64),
    measure_from: Instant,
    end: Instant,
    inflight: Cell<u32>,
    ios: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    hist: RefCell<Histogram<u64>>,
    flushes: Cell<u64>,
    flush_hist: RefCell<Histogram<u64>>,
    write_bytes_all: Cell<u64>,
    done: RefCell<Option<crossbeam::channel::Sender<JobResult>>>,
}

impl Job {
    fn next_offset(&self) -> u64 {
        let bs = u64::from(self.p.bs);
        let (start, len) = self.region;
        let blocks = (len / bs).max(1);
        let idx = if self.p.pattern.random {
            let mut x = self.rng.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng.set(x);
            x % blocks
        } else {
            let s = self.next_seq.get();
            self.next_seq.set(if s + 1 >= blocks { 0 } else { s + 1 });
            s
        };
        start + idx * bs
    }

    fn is_read(&self) -> bool {
        match self.p.pattern.read_pct {
            100 => true,
            0 => false,
            pct => (self.rng.get() >> 32) % 100 < u64::from(pct),
        }
    }

    fn issue(&self, rx: &Reactor, slot: u64, buf: IoBuf, now: Instant) {
        let offset = self.next_offset();
        let read = self.is_read();
        let io = if read {
            Io::Read { offset, buf }
        } else {
            Io::Write {
                offset,
                buf,
                fua: false,
            }
        };
        let i = usize::try_from(slot).expect("slot < qd");
        self.started.borrow_mut()[i] = now;
        self.writing.borrow_mut()[i] = !read;
        self.submit(rx, io, slot);
    }

    /// Holds `buf` and sends a FLUSH from `slot`; the slot's next IO follows its completion.
    fn issue_flush(&self, rx: &Reactor, slot: u64, buf: Option<IoBuf>, now: Instant) {
        let i = usize::try_from(slot).expect("slot < qd");
        self.parked.borrow_mut()[i] = buf;
        self.started.borrow_mut()[i] = now;
        self.submit(rx, Io::Flush, slot | FLUSH_TAG);
    }

    fn submit(&self, rx: &Reactor, io: Io, tag: u64) {
        self.inflight.set(self.inflight.get() + 1);
        let me: Rc<dyn Completion> = self
            .me
            .upgrade()
            .expect("the job lives until its last completion");
        self.in_submit.set(true);
        self.ch.submit(rx, io, me, tag);
        self.in_submit.set(false);
        if self.draining.replace(true) {
            return;
        }
        loop {
            let next = self.deferred.borrow_mut().pop_front();
            let Some((tag, res, buf)) = next else { break };
            self.on_complete(rx, tag, res, buf);
        }
        self.draining.set(false);
    }

    fn record_error(&self, e: &coreblk_daemon::reactor::Errno, what: &str) {
        self.errors.set(self.errors.get() + 1);
        self.first_error
            .borrow_mut()
            .get_or_insert_with(|| format!("{what}: {e}"));
    }

    fn finish(&self) {
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(JobResult {
                series: JobSeries {
                    ios: self.ios.get(),
                    bytes: self.bytes.get(),
                    per_sec: self.per_sec.borrow().clone(),
                },
                ios: self.ios.get(),
                errors: self.errors.get(),
                first_error: self.first_error.borrow_mut().take(),
                hist: self.hist.borrow().clone(),
                flushes: self.flushes.get(),
                inline_completions: self.inline_completions.get(),
                flush_hist: self.flush_hist.borrow().clone(),
                write_bytes_all: self.write_bytes_all.get(),
            });
        }
    }
}

/// Completion handler of a job; `Rc<Job>` is what gets registered.
impl Completion for Job {
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>) {
        if self.in_submit.get() {
            self.inline_completions
                .set(self.inline_completions.get() + 1);
            self.deferred.borrow_mut().push_back((tag, res, buf));
            return;
        }
        self.on_complete(rx, tag, res, buf);
    }
}

impl Job {
    fn on_complete(&self, rx: &Reactor, tag: u64, res: IoResult, mut buf: Option<IoBuf>) {
        let now = Instant::now();
        self.inflight.set(self.inflight.get() - 1);
        let slot = tag & !FLUSH_TAG;
        let i = usize::try_from(slot).expect("slot < qd");
        let started = self.started.borrow()[i];
        let counted = started >= self.measure_from;
        let ns = u64::try_from(now.duration_since(started).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        if tag & FLUSH_TAG != 0 {
            match res {
                Ok(_) if counted => {
                    self.flushes.set(self.flushes.get() + 1);
                    self.flush_hist.borrow_mut().saturating_record(ns);
                }
                Ok(_) => {}
                Err(e) => self.record_error(&e, "flush"),
            }
            buf = self.parked.borrow_mut()[i].take();
        } else {
            let write = self.writing.borrow()[i];
            match res {
                Ok(n) => {
                    if counted {
                        self.ios.set(self.ios.get() + 1);
                        self.bytes.set(self.bytes.get() + u64::from(n));
                        self.hist.borrow_mut().saturating_record(ns);
                        let sec = now.saturating_duration_since(self.measure_from).as_secs();
                        if let Ok(i) = usize::try_from(sec) {
                            if let Some(b) = self.per_sec.borrow_mut().get_mut(i) {
                                b.0 += 1;
                                b.1 += u64::from(n);
                            }
                        }
                    }
                    if write {
                        self.write_bytes_all
                            .set(self.write_bytes_all.get() + u64::from(n));
                    }
                }
                Err(e) => self.record_error(&e, if write { "write" } else { "read" }),
            }
            if write && self.p.flush_every > 0 && now < self.end {
                let n = self.writes_since_flush.get() + 1;
                if n >= self.p.flush_every {
                    self.writes_since_flush.set(0);
                    return self.issue_flush(rx, slot, buf, now);
                }
                self.writes_since_flush.set(n);
            }
        }
        if now < self.end {
            if let Some(buf) = buf {
                self.issue(rx, slot, buf, now);
                return;
            }
        }
        if self.inflight.get() == 0 {
            self.finish();
        }
    }
}

fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn process_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread (call it on a reactor to read that reactor's).
pub fn thread_cpu_ns() -> u64 {
    cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Runs one job per reactor and merges their results.
pub fn run_jobs(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    p: &JobParams,
) -> anyhow::Result<JobsResult> {
    let jobs: Vec<(usize, Arc<dyn BlockDevice>)> =
        (0..set.len()).map(|i| (i, Arc::clone(dev))).collect();
    run_jobs_on(set, &jobs, p, Vec::new())
}

/// Runs one job per `(reactor, device)` of `jobs` (several may share a reactor), runs
/// `events` at their times of the measured window, and merges the results.
pub fn run_jobs_on(
    set: &ReactorSet,
    jobs: &[(usize, Arc<dyn BlockDevice>)],
    p: &JobParams,
    mut events: Vec<Event>,
) -> anyhow::Result<JobsResult> {
    let n = set.len() as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + p.warmup;
    let end = measure_from + p.time;
    let secs = usize::try_from(p.time.as_secs()).unwrap_or(0);
    let mut waits = Vec::new();
    for (j, (i, dev)) in jobs.iter().enumerate() {
        let (i, j) = (*i, j as u64);
        let r = set
            .remotes()
            .get(i)
            .with_context(|| format!("no reactor {i}"))?;
        let (tx, rx) = crossbeam::channel::bounded(1);
        let dev = Arc::clone(dev);
        let p2 = p.clone();
        // Each job walks its own slice for sequential patterns; random covers everything.
        let slice = p.span_bytes / n / u64::from(p.bs) * u64::from(p.bs);
        let region = if p.pattern.random {
            (0, p.span_bytes)
        } else {
            (slice * i as u64, slice)
        };
        r.call(move |rx: &Reactor| -> anyhow::Result<()> {
            let ch = dev
                .open_channel(rx)
                .with_context(|| format!("opening {} on reactor {}", dev.name(), rx.id()))?;
            let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?;
            let job = Rc::new_cyclic(|me| Job {
                per_sec: RefCell::new(vec![(0, 0); secs]),
                bytes: Cell::new(0),
                me: me.clone(),
                ch,
                started: RefCell::new(vec![start; p2.qd as usize]),
                writing: RefCell::new(vec![false; p2.qd as usize]),
                parked: RefCell::new((0..p2.qd).map(|_| None).collect()),
                writes_since_flush: Cell::new(0),
                in_submit: Cell::new(false),
                draining: Cell::new(false),
                deferred: RefCell::new(VecDeque::new()),
                inline_completions: Cell::new(0),
                rng: Cell::new(
                    0x9E37_79B9_7F4A_7C15
                        ^ (rx.id() as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
                        ^ j.wrapping_mul(0x94D0_49BB_1331_11EB),
                ),
                next_seq: Cell::new(0),
                region,
                measure_from,
                end,
                inflight: Cell::new(0),
                ios: Cell::new(0),
                errors: Cell::new(0),
                first_error: RefCell::new(None),
                hist: RefCell::new(hist.clone()),
                flushes: Cell::new(0),
                flush_hist: RefCell::new(hist),
                write_bytes_all: Cell::new(0),
                done: RefCell::new(Some(tx)),
                p: p2,
            });
            let mut bufs = Vec::new();
            for _ in 0..job.p.qd {
                let buf = rx
                    .bufs()
                    .take(job.p.bs as usize)
                    .context("buffer pool smaller than the queue depth")?;
                bufs.push(buf);
            }
            // Start together with the other reactors.
            let delay = start.saturating_duration_since(Instant::now());
            rx.add_timer(
                delay,
                Box::new(move |rx: &Reactor| {
                    let now = Instant::now();
                    for (slot, buf) in bufs.into_iter().enumerate() {
                        job.issue(rx, slot as u64, buf, now);
                    }
                }),
            );
            Ok(())
        })??;
        waits.push((i, rx));
    }
    // CPU time is sampled at the window's edges by this (sleeping) thread.
    std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
    events.sort_by_key(|e| e.at);
    let mut done_events = Vec::new();
    for e in events {
        std::thread::sleep((measure_from + e.at).saturating_duration_since(Instant::now()));
        (e.run)().with_context(|| format!("event {}", e.what))?;
        done_events.push((
            e.what,
            Instant::now().saturating_duration_since(measure_from),
        ));
    }
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let cpu1 = process_cpu_ns();
    let elapsed = t0.elapsed();
    let mut out = JobsResult {
        ios: 0,
        errors: 0,
        first_error: None,
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?,
        elapsed,
        cpu_ns: cpu1.saturating_sub(cpu0),
        per_core_ios: vec![0; set.len()],
        flushes: 0,
        inline_completions: 0,
        flush_hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram")?,
        write_bytes_all: 0,
        per_job: Vec::new(),
        events: done_events,
    };
    for (i, w) in waits {
        let r = w
            .recv_timeout(Duration::from_secs(60))
            .context("a job did not finish within 60 s after its time (stuck IO?)")?;
        out.ios += r.ios;
        out.errors += r.errors;
        out.per_core_ios[i] += r.ios;
        out.per_job.push(r.series);
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        out.hist.add(&r.hist).context("merging histograms")?;
        out.flushes += r.flushes;
        out.inline_completions += r.inline_completions;
        out.write_bytes_all += r.write_bytes_all;
        out.flush_hist
            .add(&r.flush_hist)
            .context("merging histograms")?;
    }
    Ok(out)
}

/// What a prefill did.
#[derive(Debug)]
pub struct Prefilled {
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a [`Prefill`] writes: a range sequentially, or a list of offsets.
enum Plan {
    /// `[0, span_bytes)` in buffer-sized writes; the last one cut to whole blocks of `lbs`.
    Sequential { span_bytes: u64, lbs: u64 },
    /// One buffer-sized write at each offset, in order.
    List(Vec<u64>),
}

/// The writer of [`prefill`] and [`write_list`] on reactor 0.
struct Prefill {
    me: std::rc::Weak<Prefill>,
    ch: Rc<dyn Channel>,
    plan: Plan,
    /// Sequential: the next byte offset; list: the next index.
    next: Cell<u64>,
    inflight: Cell<u32>,
    bytes: Cell<u64>,
    first_error: RefCell<Option<String>>,
    done: RefCell<Option<crossbeam::channel::Sender<Result<u64, String>>>>,
}

impl Prefill {
    /// Writes the next chunk with `buf` (cut to what is left); false when nothing is left.
    fn issue(&self, rx: &Reactor, buf: IoBuf) -> bool {
        if self.first_error.borrow().is_some() {
            return false;
        }
        let next = self.next.get();
        let (off, buf) = match &self.plan {
            Plan::Sequential { span_bytes, lbs } => {
                let left = span_bytes.saturating_sub(next) / lbs * lbs;
                if left == 0 {
                    return false;
                }
                let buf = if (buf.len() as u64) <= left {
                    buf
                } else {
                    let len = usize::try_from(left).expect("less than a buffer");
                    IoBuf::from_slice(&buf.as_slice().expect("heap memory")[..len])
                };
                self.next.set(next + buf.len() as u64);
                (next, buf)
            }
            Plan::List(offsets) => {
                let Some(off) = usize::try_from(next).ok().and_then(|i| offsets.get(i)) else {
                    return false;
                };
                self.next.set(next + 1);
                (*off, buf)
            }
        };
        self.inflight.set(self.inflight.get() + 1);
        let me: Rc<dyn Completion> = self.me.upgrade().expect("prefill lives until drained");
        self.ch.submit(
            rx,
            Io::Write {
                offset: off,
                buf,
                fua: false,
            },
            me,
            0,
        );
        true
    }
}

impl Completion for Prefill {
    fn complete(&self, rx: &Reactor, _tag: u64, res: IoResult, buf: Option<IoBuf>) {
        self.inflight.set(self.inflight.get() - 1);
        match res {
            Ok(n) => self.bytes.set(self.bytes.get() + u64::from(n)),
            Err(e) => {
                self.first_error.borrow_mut().get_or_insert_with(|| {
                    format!("prefill write (step {}): {e}", self.next.get())
                });
            }
        }
        if let Some(buf) = buf {
            if self.issue(rx, buf) {
                return;
            }
        }
        if self.inflight.get() == 0 {
            self.ch.close(rx);
            if let Some(tx) = self.done.borrow_mut().take() {
                let res = match self.first_error.borrow_mut().take() {
                    Some(e) => Err(e),
                    None => Ok(self.bytes.get()),
                };
                let _ = tx.send(res);
            }
        }
    }
}

/// Writes `[0, span_bytes)` of `dev` once, sequentially, from reactor 0: `chunk_bytes`
/// writes, `qd` in flight, buffers filled with a non-zero pattern (so nothing can shortcut
/// zeroes). Runs before the reactors time anything.
pub fn prefill(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    span_bytes: u64,
    chunk_bytes: u32,
    qd: u32,
) -> anyhow::Result<Prefilled> {
    let lbs = u64::from(dev.geometry().logical_block_size.max(1));
    write_plan(
        set,
        dev,
        Plan::Sequential { span_bytes, lbs },
        chunk_bytes,
        qd,
    )
}

/// Writes `len_bytes` at each of `offsets` (in order, `qd` in flight, the same non-zero
/// pattern as [`prefill`]) from reactor 0: the rewrites between the snapshots of a
/// `--snapshots` history.
pub fn write_list(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    offsets: Vec<u64>,
    len_bytes: u32,
    qd: u32,
) -> anyhow::Result<Prefilled> {
    write_plan(set, dev, Plan::List(offsets), len_bytes, qd)
}

fn write_plan(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    plan: Plan,
    chunk_bytes: u32,
    qd: u32,
) -> anyhow::Result<Prefilled> {
    let t0 = Instant::now();
    let (tx, done) = crossbeam::channel::bounded(1);
    let d = Arc::clone(dev);
    set.remotes()[0].call(move |rx: &Reactor| -> anyhow::Result<()> {
        let ch = d
            .open_channel(rx)
            .with_context(|| format!("opening {} for the prefill", d.name()))?;
        let p = Rc::new_cyclic(|me| Prefill {
            me: me.clone(),
            ch,
            plan,
            next: Cell::new(0),
            inflight: Cell::new(0),
            bytes: Cell::new(0),
            first_error: RefCell::new(None),
            done: RefCell::new(Some(tx)),
        });
        let mut any = false;
        for _ in 0..qd {
            let mut buf = IoBuf::alloc(chunk_bytes as usize);
            buf.as_mut_slice().expect("heap memory").fill(0x5A);
            any |= p.issue(rx, buf);
        }
        if !any {
            if let Some(tx) = p.done.borrow_mut().take() {
                let _ = tx.send(Ok(0));
            }
        }
        Ok(())
    })??;
    let bytes = done
        .recv_timeout(Duration::from_secs(3600))
        .context("the prefill did not finish within an hour (stuck IO?)")?
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Prefilled {
        bytes,
        elapsed: t0.elapsed(),
    })
}

/// Result of the idle wake-up probe.
#[derive(Debug)]
pub struct IdleWake {
    /// How long the reactors idled.
    pub idle: Duration,
    /// Latency of the first IO after that.
    pub first_io: Duration,
    /// Times reactor 0 went to sleep since it started (≥ 1: it was asleep).
    pub sleeps: u64,
}

struct Probe(crossbeam::channel::Sender<Instant>);
impl Completion for Probe {
    fn complete(&self, _rx: &Reactor, _tag: u64, _res: IoResult, _buf: Option<IoBuf>) {
        let _ = self.0.send(Instant::now());
    }
}

/// Lets the reactors idle for `idle`, then times one read submitted from outside: message
/// delivery (doorbell wake-up) + IO + completion.
pub fn idle_wake(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    bs: u32,
    idle: Duration,
) -> anyhow::Result<IdleWake> {
    let r = &set.remotes()[0];
    let d = Arc::clone(dev);
    r.call(move |rx: &Reactor| -> anyhow::Result<()> {
        let ch = d.open_channel(rx)?;
        CH.with(|c| *c.borrow_mut() = Some(ch));
        Ok(())
    })??;
    std::thread::sleep(idle);
    let sleeps = set.stats()[0].sleeps.load(Ordering::Relaxed);
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    let t0 = Instant::now();
    r.send(Box::new(move |rx: &Reactor| {
        let buf = rx
            .bufs()
            .take(bs as usize)
            .unwrap_or_else(|| IoBuf::alloc(bs as usize));
        if let Some(ch) = CH.with(|c| c.borrow().clone()) {
            ch.submit(rx, Io::Read { offset: 0, buf }, Rc::new(Probe(tx)), 0);
        }
    }))?;
    let t1 = rx_done
        .recv_timeout(Duration::from_secs(10))
        .context("the probe IO did not complete")?;
    Ok(IdleWake {
        idle,
        first_io: t1.duration_since(t0),
        sleeps,
    })
}

thread_local! {
    static CH: RefCell<Option<Rc<dyn Channel>>> = const { RefCell::new(None) };
}
