//! One benchmark job per reactor: keeps `qd` requests in flight, times each, and reports
//! back to the main thread when its time is up and its requests have drained.

use std::cell::{Cell, RefCell};
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
}

/// One job's outcome.
#[derive(Debug)]
struct JobResult {
    ios: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
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
}

struct Job {
    me: std::rc::Weak<Job>,
    ch: Rc<dyn Channel>,
    p: JobParams,
    /// Per-slot submit time.
    started: RefCell<Vec<Instant>>,
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
        let io = if self.is_read() {
            Io::Read { offset, buf }
        } else {
            Io::Write {
                offset,
                buf,
                fua: false,
            }
        };
        self.started.borrow_mut()[usize::try_from(slot).expect("slot < qd")] = now;
        self.inflight.set(self.inflight.get() + 1);
        let me: Rc<dyn Completion> = self
            .me
            .upgrade()
            .expect("the job lives until its last completion");
        self.ch.submit(rx, io, me, slot);
    }

    fn finish(&self) {
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(JobResult {
                ios: self.ios.get(),
                errors: self.errors.get(),
                first_error: self.first_error.borrow_mut().take(),
                hist: self.hist.borrow().clone(),
            });
        }
    }
}

/// Completion handler of a job; `Rc<Job>` is what gets registered.
impl Completion for Job {
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>) {
        let now = Instant::now();
        self.inflight.set(self.inflight.get() - 1);
        let started = self.started.borrow()[usize::try_from(tag).expect("slot < qd")];
        if started >= self.measure_from {
            match res {
                Ok(_) => {
                    self.ios.set(self.ios.get() + 1);
                    let ns =
                        u64::try_from(now.duration_since(started).as_nanos()).unwrap_or(u64::MAX);
                    self.hist.borrow_mut().saturating_record(ns.max(1));
                }
                Err(e) => {
                    self.errors.set(self.errors.get() + 1);
                    self.first_error
                        .borrow_mut()
                        .get_or_insert_with(|| e.to_string());
                }
            }
        }
        if now < self.end {
            if let Some(buf) = buf {
                self.issue(rx, tag, buf, now);
                return;
            }
        }
        if self.inflight.get() == 0 {
            self.finish();
        }
    }
}

fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Runs one job per reactor and merges their results.
pub fn run_jobs(
    set: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    p: &JobParams,
) -> anyhow::Result<JobsResult> {
    let n = set.len() as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + p.warmup;
    let end = measure_from + p.time;
    let mut waits = Vec::new();
    for (i, r) in set.remotes().iter().enumerate() {
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
                me: me.clone(),
                ch,
                started: RefCell::new(vec![start; p2.qd as usize]),
                rng: Cell::new(
                    0x9E37_79B9_7F4A_7C15
                        ^ (rx.id() as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
                ),
                next_seq: Cell::new(0),
                region,
                measure_from,
                end,
                inflight: Cell::new(0),
                ios: Cell::new(0),
                errors: Cell::new(0),
                first_error: RefCell::new(None),
                hist: RefCell::new(hist),
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
        waits.push(rx);
    }
    // CPU time is sampled at the window's edges by this (sleeping) thread.
    std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
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
        per_core_ios: Vec::new(),
    };
    for w in waits {
        let r = w
            .recv_timeout(Duration::from_secs(60))
            .context("a job did not finish within 60 s after its time (stuck IO?)")?;
        out.ios += r.ios;
        out.errors += r.errors;
        out.per_core_ios.push(r.ios);
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        out.hist.add(&r.hist).context("merging histograms")?;
    }
    Ok(out)
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
