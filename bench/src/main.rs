//! `coreblk-bench`: a bdevperf-style benchmark that drives block devices in process, on the
//! daemon's own reactors, through the same submit/complete path the daemon uses.
//!
//! Each reactor runs one job: `--qd` requests kept in flight against its channel to the
//! target, each with its own pooled buffer, latency timed per IO into an hdrhistogram.
//! Reports IOPS, MiB/s, latency percentiles and CPU nanoseconds per IO (process CPU time
//! over the measured window divided by IOs). `--warmup` seconds run first and are not
//! counted. `--idle-wake SECS` instead measures how long the first IO takes after the
//! reactors have slept for SECS.
//!
//! `lvol:` targets ([`lvol`]) format a pool on a device and bench one thin volume on it
//! (or `--volumes N` of them at once, one job each, with per-volume QoS limits `--qos` and
//! online changes `--qos-change` ([`qos`]); the report then has each volume's IOPS and
//! MiB/s per second of the window);
//! `--prefill` writes the range once before timing (allocated clusters instead of first
//! writes), `--flush-every N` follows every N-th write with a FLUSH, `--snapshots N` gives
//! the volume an N-snapshot history first ([`history`]). Target specs are parsed in
//! [`target`]. `--measure snapshot` ([`measure_snapshot`]) and `--measure import`
//! ([`measure_import`]) measure the store's control operations instead of an IO run.

mod history;
mod job;
mod lvol;
mod measure_import;
mod measure_snapshot;
mod qos;
mod target;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::config::parse_size;
use coreblk_daemon::lvs::alloc::AllocCounts;
use coreblk_daemon::lvs::qos::QosLimits;
use coreblk_daemon::reactor::{ReactorConfig, ReactorSet};

use job::{JobParams, Pattern};
use lvol::{DevCounts, Lvol, DEFAULT_VOLUME_PCT};
use target::TargetSpec;

/// Largest prefill write.
const PREFILL_CHUNK_BYTES: u32 = 1 << 20;
/// Prefill writes in flight.
const PREFILL_QD: u32 = 16;
/// Most cluster-sized segments one prefill write is split into on a volume (bounds the
/// device IOs in flight: `PREFILL_QD` × this).
const PREFILL_MAX_SEGMENTS: u64 = 16;

#[derive(Debug, Parser)]
#[command(
    name = "coreblk-bench",
    about = "bdevperf-style benchmark on the coreblk reactors"
)]
struct Args {
    /// null | malloc:SIZE | uring:PATH | nvme:DEVICE | lvol:PATH[,cluster=SIZE] |
    /// lvol:malloc:SIZE[,cluster=SIZE]. An lvol target formats a new pool on PATH (its
    /// contents are lost) and benches one thin volume on it (default size: 90% of the pool's
    /// data space, or --size); one core only.
    #[arg(long, default_value = "null")]
    target: String,
    /// randread | randwrite | read | write | randrw[:READPCT]
    #[arg(long, default_value = "randread")]
    rw: String,
    /// IO size, e.g. 4k.
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Requests in flight per reactor.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Number of reactors (cores 0..N).
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Explicit core list instead of 0..N, e.g. "1" or "0,1".
    #[arg(long)]
    core_list: Option<String>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    time: f64,
    /// Seconds run first and not counted.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Limit IO to the first SIZE bytes of the target (default: all of it); for lvol
    /// targets, the volume's size.
    #[arg(long)]
    size: Option<String>,
    /// Before the timed run, write the whole range once sequentially (1 MiB writes, QD 16),
    /// so the run measures allocated clusters (lvol) / written blocks (files).
    #[arg(long)]
    prefill: bool,
    /// Each job issues a FLUSH after every N of its writes (0: never). Flushes are timed
    /// separately (flush latency) and not counted as IOs; a slot waits for its flush before
    /// its next IO. `--rw randwrite --qd 1 --flush-every 1` is a database's write+fdatasync.
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Reactor idle threshold (µs).
    #[arg(long, default_value_t = ReactorConfig::default().idle_threshold_us)]
    idle_threshold_us: u64,
    /// With IO in flight but no completion for this long (µs), sleep in the kernel instead
    /// of polling.
    #[arg(long, default_value_t = ReactorConfig::default().busy_poll_limit_us)]
    busy_poll_us: u64,
    /// Hybrid polling: poll only while work lately came within this many µs (0: always).
    #[arg(long, default_value_t = ReactorConfig::default().poll_max_gap_us)]
    poll_max_gap_us: u64,
    /// nvme target: reads/writes/flushes through io_uring NVMe passthrough (/dev/ngXnY).
    #[arg(long)]
    passthrough: bool,
    /// Measure the latency of the first IO after the reactors idled this many seconds.
    #[arg(long)]
    idle_wake: Option<f64>,
    /// lvol, with --prefill: after the prefill take N snapshots of the volume, rewriting a
    /// random 1/N of its clusters (whole clusters) after each, so the timed run works on a
    /// volume with N snapshots in its history. The default volume size becomes 30% of the
    /// pool (room for the rewrites and a full copy-up); compare runs with the same --size.
    #[arg(long, default_value_t = 0)]
    snapshots: u32,
    /// Measure a control operation of an lvol target instead of an IO run:
    /// `snapshot`: on the prefilled volume, --creations snapshots and clones one at a time,
    /// with the reactor otherwise idle (CPU incl. work deferred up to --tail-secs later,
    /// from the reactor thread's CPU clock minus a baseline interval) and then under the
    /// --rw/--qd/--bs load (--repeat alternating pairs of runs without/with creations: IO
    /// latency percentiles); per creation: wall latency and journal commits.
    /// `import`: a pool of --volumes volumes of --size each (default: 1 Mi clusters in
    /// total), written whole; --repeat times: crash (drop the runtime, no checkpoint),
    /// `pool::import` + `PoolRt::start` until the first read completes, and the same right
    /// after a checkpoint; metadata memory per mapped cluster.
    #[arg(long, value_name = "snapshot|import")]
    measure: Option<String>,
    /// --measure snapshot: snapshots (and as many clones) per phase.
    #[arg(long, default_value_t = 16)]
    creations: u32,
    /// --measure snapshot: seconds after the last creation whose reactor CPU still counts.
    #[arg(long, default_value_t = 10.0)]
    tail_secs: f64,
    /// --measure: alternating load pairs (snapshot) / imports per case (import).
    #[arg(long, default_value_t = 5)]
    repeat: u32,
    /// lvol IO runs: thin volumes of the pool benched at once, each by its own job with
    /// --qd requests on the one core (default 1; each of --size). --measure import: volumes
    /// in the pool (default 1000).
    #[arg(long)]
    volumes: Option<u32>,
    /// lvol: QoS limits of volume VOL (0-based) before the run: VOL:SPEC, SPEC = none or a
    /// comma list of iops=N, read-iops=N, write-iops=N, bw=SIZE, read-bw=SIZE,
    /// write-bw=SIZE (per second), burst-ms=N. Repeatable.
    #[arg(long, value_name = "VOL:SPEC")]
    qos: Vec<String>,
    /// lvol: change volume VOL's QoS limits SECS into the measured window: SECS:VOL:SPEC.
    /// Repeatable.
    #[arg(long, value_name = "SECS:VOL:SPEC")]
    qos_change: Vec<String>,
}

/// Default of `--volumes` for `--measure import`.
const IMPORT_VOLUMES: u32 = 1000;

/// What `--measure` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    /// Snapshot and clone creation.
    Snapshot,
    /// Pool import after a crash.
    Import,
}

fn parse_measure(s: &str) -> anyhow::Result<Measure> {
    match s {
        "snapshot" | "snapshots" => Ok(Measure::Snapshot),
        "import" => Ok(Measure::Import),
        other => bail!("unknown --measure {other:?}: use snapshot or import"),
    }
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coreblk-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Moves the calling thread (and the threads it starts later) off the reactors' cores when
/// other cores are allowed: a bench thread that wakes up (a creation, a sample) must not
/// preempt a busy-polling reactor and show up as IO latency.
fn keep_off_cores(reactor_cores: &[usize]) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: passes a live, correctly sized cpu_set_t to fill; 0 = the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let limit = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    for &c in reactor_cores.iter().filter(|&&c| c < limit) {
        // SAFETY: CPU_CLR writes inside `set`; `c` is below CPU_SETSIZE.
        unsafe { libc::CPU_CLR(c, &mut set) };
    }
    // SAFETY: CPU_COUNT only reads the live set.
    if unsafe { libc::CPU_COUNT(&set) } == 0 {
        return Ok(());
    }
    // SAFETY: passes a live, correctly sized cpu_set_t; 0 = the calling thread.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

fn parse_rw(rw: &str) -> anyhow::Result<Pattern> {
    let (name, pct) = rw.split_once(':').unwrap_or((rw, ""));
    Ok(match name {
        "randread" => Pattern {
            random: true,
            read_pct: 100,
        },
        "randwrite" => Pattern {
            random: true,
            read_pct: 0,
        },
        "read" => Pattern {
            random: false,
            read_pct: 100,
        },
        "write" => Pattern {
            random: false,
            read_pct: 0,
        },
        "randrw" => {
            let read_pct = if pct.is_empty() {
                50
            } else {
                pct.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 100)
                    .with_context(|| {
                        format!("--rw randrw:{pct}: the read percentage must be 0..=100")
                    })?
            };
            Pattern {
                random: true,
                read_pct,
            }
        }
        other => bail!(
            "unknown --rw {other:?}: use randread, randwrite, read, write or randrw[:READPCT]"
        ),
    })
}

/// What the lvol target adds to a run's report.
#[derive(Debug)]
struct LvolReport {
    cluster_bytes: u64,
    volume_bytes: u64,
    pool_clusters: u64,
    /// Allocator counts after the run.
    alloc: AllocCounts,
    /// Clusters allocated during the timed run (first writes).
    clusters_allocated: u64,
    /// What the store wrote to its device during the timed run (warm-up and drain included).
    device: DevCounts,
}

fn run(args: Args) -> anyhow::Result<()> {
    let bs = parse_size(&args.bs)?;
    let bs = u32::try_from(bs)
        .ok()
        .filter(|b| *b > 0 && *b <= 1 << 20)
        .with_context(|| format!("--bs {}: must be between 1 byte and 1 MiB", args.bs))?;
    if args.qd == 0 || args.qd > 1024 {
        bail!("--qd {}: must be between 1 and 1024", args.qd);
    }
    let time_ok = args.time > 0.0 && args.time.is_finite();
    let warmup_ok = args.warmup >= 0.0 && args.warmup.is_finite();
    if !time_ok || !warmup_ok {
        bail!("--time must be > 0 and --warmup ≥ 0 seconds");
    }
    let cores = match &args.core_list {
        Some(list) => coreblk_daemon::reactor::parse_core_list(list)?,
        None => {
            if args.cores == 0 {
                bail!("--cores must be at least 1");
            }
            (0..args.cores).collect()
        }
    };
    let pattern = parse_rw(&args.rw)?;
    let spec = TargetSpec::parse(&args.target)?;
    let mut size = args.size.as_deref().map(parse_size).transpose()?;
    let measure = args.measure.as_deref().map(parse_measure).transpose()?;
    if (measure.is_some() || args.snapshots > 0) && !spec.is_lvol() {
        bail!("--measure and --snapshots need an lvol: target");
    }
    if args.snapshots > 0 && !args.prefill && measure.is_none() {
        bail!("--snapshots needs --prefill (a history of an empty volume shares nothing)");
    }
    if args.snapshots > history::MAX_SNAPSHOTS {
        bail!(
            "--snapshots {}: at most {}",
            args.snapshots,
            history::MAX_SNAPSHOTS
        );
    }
    let tail_ok = args.tail_secs >= 0.0 && args.tail_secs.is_finite();
    if measure.is_some() && (args.repeat == 0 || args.creations == 0 || !tail_ok) {
        bail!("--measure needs --repeat ≥ 1, --creations ≥ 1 and --tail-secs ≥ 0");
    }
    let volumes = args.volumes.unwrap_or(if measure == Some(Measure::Import) {
        IMPORT_VOLUMES
    } else {
        1
    });
    if volumes == 0 || volumes > 4000 {
        bail!("--volumes {volumes}: must be between 1 and 4000 (a pool holds 4096 objects)");
    }
    let qos_sets = args
        .qos
        .iter()
        .map(|s| qos::parse_set(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let qos_changes = args
        .qos_change
        .iter()
        .map(|s| qos::parse_change(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let qos_flags = !qos_sets.is_empty() || !qos_changes.is_empty();
    // --measure import reads --volumes as its own count.
    let multi = measure.is_none() && (volumes > 1 || qos_flags);
    if (multi || qos_flags) && (measure.is_some() || args.snapshots > 0 || !spec.is_lvol()) {
        bail!("--volumes (above 1 for IO runs), --qos and --qos-change need an lvol: target and an IO run (no --measure, no --snapshots)");
    }
    for v in qos_sets
        .iter()
        .map(|s| s.volume)
        .chain(qos_changes.iter().map(|c| c.set.volume))
    {
        if v >= volumes as usize {
            bail!("--qos/--qos-change name volume {v}, but the run has {volumes} (--volumes; indices from 0)");
        }
    }
    if let Some(c) = qos_changes.iter().find(|c| c.at_s >= args.time) {
        bail!(
            "--qos-change at {} s is not inside the measured window of --time {} s",
            c.at_s,
            args.time
        );
    }
    if measure == Some(Measure::Import) {
        if let TargetSpec::Lvol { cluster_bytes, .. } = &spec {
            let per = measure_import::clusters_per_volume(
                measure_import::DEFAULT_MAPPED_CLUSTERS,
                volumes,
            );
            size.get_or_insert(per * u64::from(*cluster_bytes));
        }
    }
    if spec.is_lvol() {
        if cores.len() != 1 {
            bail!(
                "{}: lvol targets run on one core only (--cores 1 or a one-core --core-list): \
                 a volume is served only on its pool's owner reactor in this version (other \
                 reactors get EXDEV)",
                args.target
            );
        }
        if args.passthrough {
            bail!("--passthrough needs an nvme:/dev/nvmeXnY target");
        }
        if args.idle_wake.is_some() {
            bail!("--idle-wake is not supported on lvol targets");
        }
    }
    let raw = if spec.is_lvol() {
        None
    } else {
        Some(spec.open_raw(args.passthrough)?)
    };
    let jobs_per_core = if multi { volumes as usize } else { 1 };
    let cfg = ReactorConfig {
        idle_threshold_us: args.idle_threshold_us,
        busy_poll_limit_us: args.busy_poll_us,
        poll_max_gap_us: args.poll_max_gap_us,
        buf_chunk_bytes: bs as usize,
        // One job per volume on the one core of an lvol target.
        buf_count: args.qd as usize * jobs_per_core,
        // A volume IO can become several device IOs (one per cluster, plus journal writes);
        // a prefill keeps PREFILL_QD × PREFILL_MAX_SEGMENTS in flight.
        max_inflight: if spec.is_lvol() {
            (args.qd * 4 * volumes).max(1024)
        } else {
            args.qd.max(64) * 2
        },
        ring_entries: args.qd.next_power_of_two().max(32),
        big_sqe: args.passthrough,
        ..ReactorConfig::default()
    };
    let mut reactors = ReactorSet::start(&cores, &cfg)?;
    if cfg.pin {
        keep_off_cores(&cores)?;
    }
    let run = Run {
        args: &args,
        volumes,
        qos_sets,
        qos_changes,
        measure,
        size,
        bs,
        pattern,
        cores: &cores,
    };
    let res = run_on(&run, &reactors, &spec, raw);
    reactors.shutdown();
    res
}

/// A run's checked arguments.
#[derive(Debug)]
struct Run<'a> {
    args: &'a Args,
    /// `--volumes` (or its default).
    volumes: u32,
    qos_sets: Vec<qos::QosSet>,
    qos_changes: Vec<qos::QosChange>,
    measure: Option<Measure>,
    /// `--size` (lvol: the volume's size; import: each volume's).
    size: Option<u64>,
    bs: u32,
    pattern: Pattern,
    cores: &'a [usize],
}

fn run_on(
    run: &Run<'_>,
    reactors: &ReactorSet,
    spec: &TargetSpec,
    raw: Option<Arc<dyn BlockDevice>>,
) -> anyhow::Result<()> {
    let (args, size) = (run.args, run.size);
    let (dev, lv) = match (raw, spec) {
        (Some(dev), _) => (dev, None),
        (
            None,
            TargetSpec::Lvol {
                backing,
                cluster_bytes,
            },
        ) => {
            let pct = if args.snapshots > 0 {
                history::HISTORY_VOLUME_PCT
            } else {
                DEFAULT_VOLUME_PCT
            };
            let lv = Lvol::setup(reactors, backing, *cluster_bytes, size, pct)?;
            (Arc::clone(&lv.dev), Some(lv))
        }
        (None, _) => bail!("internal: no device for {}", args.target),
    };
    let res = run_dev(run, reactors, &dev, lv.as_ref());
    if let Some(lv) = &lv {
        lv.stop(reactors)?;
    }
    res
}

fn run_dev(
    run: &Run<'_>,
    reactors: &ReactorSet,
    dev: &Arc<dyn BlockDevice>,
    lv: Option<&Lvol>,
) -> anyhow::Result<()> {
    let (args, size, bs, cores) = (run.args, run.size, run.bs, run.cores);
    let geo = dev.geometry().clone();
    if !bs.is_multiple_of(geo.logical_block_size) {
        bail!(
            "--bs {bs} is not a multiple of the target's logical block size {}",
            geo.logical_block_size
        );
    }
    if bs > geo.max_transfer_bytes {
        bail!(
            "--bs {bs} exceeds the target's max transfer of {} bytes",
            geo.max_transfer_bytes
        );
    }
    let span = size.map_or(geo.size_bytes, |s| s.min(geo.size_bytes));
    if span < u64::from(bs) * cores.len() as u64 {
        bail!(
            "target {} is too small ({span} bytes) for --bs {bs} on {} cores",
            args.target,
            cores.len()
        );
    }
    if let Some(secs) = args.idle_wake {
        let r = job::idle_wake(reactors, dev, bs, Duration::from_secs_f64(secs))?;
        print_idle(args, &r);
        return Ok(());
    }
    if let (Some(Measure::Import), Some(lv)) = (run.measure, lv) {
        let needed = lv.volume_bytes / lv.cluster_bytes * u64::from(run.volumes);
        if needed > lv.pool_clusters {
            bail!(
                "--measure import: {} volumes of {} bytes need {needed} clusters; the pool has {} (use a larger device or a smaller --size)",
                run.volumes,
                lv.volume_bytes,
                lv.pool_clusters
            );
        }
        return measure_import::run(reactors, lv, run.volumes, args.repeat, args.json);
    }
    if let Some(lv) = lv.filter(|_| args.snapshots > 0) {
        let needed = history::needed_clusters(lv.volume_bytes / lv.cluster_bytes, args.snapshots);
        if needed > lv.pool_clusters {
            bail!(
                "--snapshots {}: the prefill and the history's rewrites need {needed} clusters; the pool has {} (use a smaller --size)",
                args.snapshots,
                lv.pool_clusters
            );
        }
    }
    // The volumes benched (the first is `dev`) and their ids.
    let mut vols: Vec<(Option<u32>, Arc<dyn BlockDevice>)> =
        vec![(lv.map(|l| l.volume_id), Arc::clone(dev))];
    if let Some(lv) = lv {
        for i in 1..run.volumes {
            let (id, d) = lv.add_volume(reactors, &format!("bench{i}"), lv.volume_bytes)?;
            vols.push((Some(id), d));
        }
    }
    if args.prefill || run.measure.is_some() {
        let lbs = geo.logical_block_size.max(1);
        let mut chunk = PREFILL_CHUNK_BYTES.min(geo.max_transfer_bytes);
        if let Some(lv) = lv {
            let most = u32::try_from(lv.cluster_bytes * PREFILL_MAX_SEGMENTS).unwrap_or(u32::MAX);
            chunk = chunk.min(most);
        }
        let chunk = (chunk / lbs * lbs).max(lbs);
        for (_, dev) in &vols {
            let r = job::prefill(reactors, dev, span, chunk, PREFILL_QD)?;
            if let Some(lv) = lv {
                lv.settle(reactors)?;
            }
            eprintln!(
                "prefilled {} MiB of {} in {:.2} s ({:.0} MiB/s)",
                r.bytes >> 20,
                dev.name(),
                r.elapsed.as_secs_f64(),
                r.bytes as f64 / (1 << 20) as f64 / r.elapsed.as_secs_f64().max(1e-9)
            );
        }
    }
    if let Some(lv) = lv.filter(|_| args.snapshots > 0) {
        let h = history::build(reactors, lv, args.snapshots)?;
        eprintln!(
            "history: {} snapshots, {} cluster rewrites, in {:.2} s",
            h.snapshots,
            h.rewrites,
            h.elapsed.as_secs_f64()
        );
    }
    let params = JobParams {
        bs,
        qd: args.qd,
        pattern: run.pattern,
        span_bytes: span,
        warmup: Duration::from_secs_f64(args.warmup),
        time: Duration::from_secs_f64(args.time),
        flush_every: args.flush_every,
    };
    if let (Some(Measure::Snapshot), Some(lv)) = (run.measure, lv) {
        let p = measure_snapshot::Params {
            creations: args.creations,
            tail: Duration::from_secs_f64(args.tail_secs),
            repeat: args.repeat,
            rw: args.rw.clone(),
            load: params,
        };
        return measure_snapshot::run(reactors, dev, lv, &p, args.json);
    }
    let before = match lv {
        Some(lv) => Some((lv.device_counts(), lv.alloc_counts(reactors)?)),
        None => None,
    };
    let mut qos_now = vec![QosLimits::default(); vols.len()];
    let mut events = Vec::new();
    if let Some(lv) = lv {
        for s in &run.qos_sets {
            let id = vols[s.volume].0.context("an lvol volume has an id")?;
            lv.set_qos(reactors, id, s.limits)?;
            qos_now[s.volume] = s.limits;
        }
        for c in &run.qos_changes {
            let id = vols[c.set.volume].0.context("an lvol volume has an id")?;
            let (set, limits) = (reactors.remotes()[0].clone(), c.set.limits);
            events.push(job::Event {
                at: Duration::from_secs_f64(c.at_s),
                what: format!("{}:{}", c.set.volume, limits),
                run: Box::new(move || lvol::set_qos_on(&set, id, limits)),
            });
        }
    }
    let result = if run.volumes > 1 || !run.qos_sets.is_empty() || !events.is_empty() {
        let jobs: Vec<(usize, Arc<dyn BlockDevice>)> =
            vols.iter().map(|(_, d)| (0, Arc::clone(d))).collect();
        job::run_jobs_on(reactors, &jobs, &params, events)?
    } else {
        job::run_jobs(reactors, dev, &params)?
    };
    let lvol_report = match (lv, before) {
        (Some(lv), Some((dev0, alloc0))) => {
            let alloc = lv.alloc_counts(reactors)?;
            Some(LvolReport {
                cluster_bytes: lv.cluster_bytes,
                volume_bytes: lv.volume_bytes,
                pool_clusters: lv.pool_clusters,
                alloc,
                clusters_allocated: alloc.in_use.saturating_sub(alloc0.in_use),
                device: lv.device_counts().since(&dev0),
            })
        }
        _ => None,
    };
    let multi = run.volumes > 1 || !run.qos_sets.is_empty() || !run.qos_changes.is_empty();
    if args.json {
        let volumes = multi
            .then(|| print_volumes(args, &result, &qos_now))
            .flatten();
        print_result(args, &params, cores, &result, lvol_report.as_ref(), volumes);
    } else {
        print_result(args, &params, cores, &result, lvol_report.as_ref(), None);
        if multi {
            print_volumes(args, &result, &qos_now);
        }
    }
    if result.errors > 0 {
        bail!(
            "{} IOs failed (first error: {})",
            result.errors,
            result.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

/// Each volume's figures of a multi-volume run: totals and per second of the window;
/// printed as text, or returned as JSON for the run's report.
fn print_volumes(
    args: &Args,
    r: &job::JobsResult,
    qos_before: &[QosLimits],
) -> Option<serde_json::Value> {
    let secs = r.elapsed.as_secs_f64();
    let mib = (1u64 << 20) as f64;
    if args.json {
        let vols: Vec<_> = r
            .per_job
            .iter()
            .zip(qos_before)
            .enumerate()
            .map(|(i, (s, q))| {
                serde_json::json!({
                    "volume": i, "qos": q.to_string(), "ios": s.ios,
                    "iops": s.ios as f64 / secs, "mib_s": s.bytes as f64 / mib / secs,
                    "per_sec_iops": s.per_sec.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "per_sec_mib_s": s.per_sec.iter().map(|p| p.1 as f64 / mib).collect::<Vec<_>>(),
                })
            })
            .collect();
        let changes: Vec<_> = r
            .events
            .iter()
            .map(|(what, at)| serde_json::json!({ "change": what, "applied_at_s": at.as_secs_f64() }))
            .collect();
        return Some(serde_json::json!({ "volumes": vols, "qos_changes": changes }));
    }
    {
        for (i, (s, q)) in r.per_job.iter().zip(qos_before).enumerate() {
            let per: Vec<String> = s.per_sec.iter().map(|p| p.0.to_string()).collect();
            println!(
                "  volume {i} (QoS {q}): {:.0} IOPS, {:.1} MiB/s; IOPS per second: {}",
                s.ios as f64 / secs,
                s.bytes as f64 / mib / secs,
                per.join(" ")
            );
        }
        for (what, at) in &r.events {
            println!("  QoS change {what} applied at {:.3} s", at.as_secs_f64());
        }
    }
    None
}

fn print_idle(args: &Args, r: &job::IdleWake) {
    if args.json {
        let v = serde_json::json!({ "idle_s": r.idle.as_secs_f64(), "first_io_us": r.first_io.as_secs_f64() * 1e6, "sleeps": r.sleeps });
        println!("{v}");
    } else {
        println!(
            "after {:.1} s idle ({} sleeps): first IO completed in {:.1} µs",
            r.idle.as_secs_f64(),
            r.sleeps,
            r.first_io.as_secs_f64() * 1e6
        );
    }
}

/// Write amplification of the run: what the store wrote to its device (data + metadata) per
/// byte the jobs wrote. `None` without writes.
fn write_amplification(l: &LvolReport, user_write_bytes: u64) -> Option<f64> {
    (user_write_bytes > 0).then(|| {
        (l.device.data_write_bytes + l.device.meta_write_bytes) as f64 / user_write_bytes as f64
    })
}

fn print_result(
    args: &Args,
    p: &JobParams,
    cores: &[usize],
    r: &job::JobsResult,
    lvol: Option<&LvolReport>,
    volumes: Option<serde_json::Value>,
) {
    let secs = r.elapsed.as_secs_f64();
    let iops = r.ios as f64 / secs;
    let mib_s = r.ios as f64 * f64::from(p.bs) / secs / (1 << 20) as f64;
    let q = |x: f64| r.hist.value_at_quantile(x) as f64 / 1000.0;
    let fq = |x: f64| r.flush_hist.value_at_quantile(x) as f64 / 1000.0;
    let cpu_ns_per_io = if r.ios > 0 {
        r.cpu_ns as f64 / r.ios as f64
    } else {
        0.0
    };
    if args.json {
        let flush_lat = (r.flushes > 0).then(|| {
            serde_json::json!({ "mean": r.flush_hist.mean() / 1000.0, "p50": fq(0.5), "p99": fq(0.99), "p999": fq(0.999), "max": r.flush_hist.max() as f64 / 1000.0 })
        });
        let lvol = lvol.map(|l| {
            serde_json::json!({
                "cluster_bytes": l.cluster_bytes, "volume_bytes": l.volume_bytes, "pool_clusters": l.pool_clusters,
                "alloc": { "zeroed": l.alloc.zeroed, "clean": l.alloc.clean, "in_use": l.alloc.in_use, "recycling": l.alloc.recycling },
                "clusters_allocated": l.clusters_allocated,
                "user_write_bytes": r.write_bytes_all,
                "device": l.device,
                "write_amplification": write_amplification(l, r.write_bytes_all),
            })
        });
        let v = serde_json::json!({
            "target": args.target, "passthrough": args.passthrough, "rw": args.rw, "bs": p.bs, "qd": p.qd, "cores": cores.len(),
            "prefill": args.prefill, "flush_every": p.flush_every, "snapshots": args.snapshots,
            "time_s": secs, "ios": r.ios, "errors": r.errors,
            "iops": iops, "mib_s": mib_s,
            "lat_us": { "mean": r.hist.mean() / 1000.0, "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": r.hist.max() as f64 / 1000.0 },
            "flushes": r.flushes, "flush_lat_us": flush_lat, "inline_completions": r.inline_completions,
            "cpu_ns_per_io": cpu_ns_per_io,
            "per_core_iops": r.per_core_ios.iter().map(|n| *n as f64 / secs).collect::<Vec<_>>(),
            "lvol": lvol,
        });
        let mut v = v;
        if let (Some(obj), Some(serde_json::Value::Object(extra))) = (v.as_object_mut(), volumes) {
            obj.extend(extra);
        }
        println!("{v}");
    } else {
        println!(
            "{} {} bs={} qd={} cores={}{}: {:.0} IOPS, {:.1} MiB/s, lat µs p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, {:.0} CPU ns/IO, {} errors",
            args.target,
            args.rw,
            p.bs,
            p.qd,
            cores.len(),
            if args.snapshots > 0 {
                format!(" prefilled, {} snapshots", args.snapshots)
            } else if args.prefill {
                " prefilled".to_string()
            } else {
                String::new()
            },
            iops,
            mib_s,
            q(0.5),
            q(0.99),
            q(0.999),
            r.hist.max() as f64 / 1000.0,
            cpu_ns_per_io,
            r.errors
        );
        if r.inline_completions > 0 {
            println!(
                "  {} completions arrived inline (inside submit, not from the reactor loop)",
                r.inline_completions
            );
        }
        if p.flush_every > 0 {
            println!(
                "  flush every {} writes: {} flushes ({:.0}/s), flush lat µs p50 {:.1} p99 {:.1} max {:.1}",
                p.flush_every,
                r.flushes,
                r.flushes as f64 / secs,
                fq(0.5),
                fq(0.99),
                r.flush_hist.max() as f64 / 1000.0
            );
        }
        if let Some(l) = lvol {
            let d = &l.device;
            println!(
                "  lvol: cluster {} KiB, volume {} MiB, pool clusters {} (ready {}, clean {}, in use {}, recycling {}); run allocated {} clusters",
                l.cluster_bytes >> 10,
                l.volume_bytes >> 20,
                l.pool_clusters,
                l.alloc.zeroed,
                l.alloc.clean,
                l.alloc.in_use,
                l.alloc.recycling,
                l.clusters_allocated
            );
            println!(
                "  device writes: data {} MiB, metadata {} KiB ({} write IOs), zeroes {} MiB, {} flushes; user writes {} MiB; write amplification {}",
                d.data_write_bytes >> 20,
                d.meta_write_bytes >> 10,
                d.write_ios,
                d.zeroes_bytes >> 20,
                d.flushes,
                r.write_bytes_all >> 20,
                write_amplification(l, r.write_bytes_all)
                    .map_or_else(|| "n/a (no writes)".to_string(), |w| format!("{w:.3}"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_measure_modes() {
        assert_eq!(parse_measure("snapshot").ok(), Some(Measure::Snapshot));
        assert_eq!(parse_measure("snapshots").ok(), Some(Measure::Snapshot));
        assert_eq!(parse_measure("import").ok(), Some(Measure::Import));
        for bad in ["", "Import", "clone", "import "] {
            let e = parse_measure(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref()
                    .is_some_and(|m| m.contains("use snapshot or import")),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn parses_rw_patterns() {
        let p = parse_rw("randrw:70").expect("randrw:70");
        assert!(p.random && p.read_pct == 70);
        assert!(parse_rw("randrw:101").is_err());
        assert!(parse_rw("sideways").is_err());
    }
}
