//! `coreblk-bench`: a bdevperf-style benchmark that drives block devices in process, on the
//! daemon's own reactors, through the same submit/complete path the daemon uses.
//!
//! Each reactor runs one job: `--qd` requests kept in flight against its channel to the
//! target, each with its own pooled buffer, latency timed per IO into an hdrhistogram.
//! Reports IOPS, MiB/s, latency percentiles and CPU nanoseconds per IO (process CPU time
//! over the measured window divided by IOs). `--warmup` seconds run first and are not
//! counted. `--idle-wake SECS` instead measures how long the first IO takes after the
//! reactors have slept for SECS.

mod job;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use coreblk_daemon::bdev::mem::{MallocDevice, NullDevice};
use coreblk_daemon::bdev::nvme::{NvmeDevice, NvmeOptions};
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::config::parse_size;
use coreblk_daemon::reactor::{ReactorConfig, ReactorSet};

use job::{JobParams, Pattern};

#[derive(Debug, Parser)]
#[command(
    name = "coreblk-bench",
    about = "bdevperf-style benchmark on the coreblk reactors"
)]
struct Args {
    /// null | malloc:SIZE | uring:PATH | nvme:DEVICE
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
    /// Limit IO to the first SIZE bytes of the target (default: all of it).
    #[arg(long)]
    size: Option<String>,
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
    /// nvme target: reads/writes/flushes through io_uring NVMe passthrough (/dev/ngXnY).
    #[arg(long)]
    passthrough: bool,
    /// Measure the latency of the first IO after the reactors idled this many seconds.
    #[arg(long)]
    idle_wake: Option<f64>,
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

fn open_target(target: &str, passthrough: bool) -> anyhow::Result<Arc<dyn BlockDevice>> {
    if passthrough && !target.starts_with("nvme:") {
        bail!("--passthrough needs an nvme:/dev/nvmeXnY target");
    }
    let (kind, arg) = target.split_once(':').unwrap_or((target, ""));
    Ok(match kind {
        "null" => Arc::new(NullDevice::new(1 << 40)),
        "malloc" => {
            let size = if arg.is_empty() {
                1 << 30
            } else {
                parse_size(arg)?
            };
            Arc::new(MallocDevice::new(size).context("allocating the malloc target")?)
        }
        "uring" => {
            if arg.is_empty() {
                bail!("--target uring needs a path: uring:/path/to/file-or-device");
            }
            Arc::new(UringDevice::open(&PathBuf::from(arg))?)
        }
        "nvme" => {
            if arg.is_empty() {
                bail!("--target nvme needs a namespace: nvme:/dev/nvme0n1");
            }
            Arc::new(NvmeDevice::open_with(
                &PathBuf::from(arg),
                NvmeOptions { passthrough },
            )?)
        }
        other => {
            bail!("unknown target {other:?}: use null, malloc:SIZE, uring:PATH or nvme:DEVICE")
        }
    })
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
    let dev = open_target(&args.target, args.passthrough)?;
    let geo = dev.geometry().clone();
    if bs % geo.logical_block_size != 0 {
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
    let span = match &args.size {
        Some(s) => parse_size(s)?.min(geo.size_bytes),
        None => geo.size_bytes,
    };
    if span < u64::from(bs) * cores.len() as u64 {
        bail!(
            "target {} is too small ({span} bytes) for --bs {bs} on {} cores",
            args.target,
            cores.len()
        );
    }
    let cfg = ReactorConfig {
        idle_threshold_us: args.idle_threshold_us,
        busy_poll_limit_us: args.busy_poll_us,
        buf_chunk_bytes: bs as usize,
        buf_count: args.qd as usize,
        max_inflight: args.qd.max(64) * 2,
        ring_entries: args.qd.next_power_of_two().max(32),
        big_sqe: args.passthrough,
        ..ReactorConfig::default()
    };
    let mut reactors = ReactorSet::start(&cores, &cfg)?;
    if let Some(secs) = args.idle_wake {
        let r = job::idle_wake(&reactors, &dev, bs, Duration::from_secs_f64(secs))?;
        reactors.shutdown();
        print_idle(&args, &r);
        return Ok(());
    }
    let params = JobParams {
        bs,
        qd: args.qd,
        pattern,
        span_bytes: span,
        warmup: Duration::from_secs_f64(args.warmup),
        time: Duration::from_secs_f64(args.time),
    };
    let result = job::run_jobs(&reactors, &dev, &params)?;
    reactors.shutdown();
    print_result(&args, &params, &cores, &result);
    if result.errors > 0 {
        bail!(
            "{} IOs failed (first error: {})",
            result.errors,
            result.first_error.unwrap_or_default()
        );
    }
    Ok(())
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

fn print_result(args: &Args, p: &JobParams, cores: &[usize], r: &job::JobsResult) {
    let secs = r.elapsed.as_secs_f64();
    let iops = r.ios as f64 / secs;
    let mib_s = r.ios as f64 * f64::from(p.bs) / secs / (1 << 20) as f64;
    let q = |x: f64| r.hist.value_at_quantile(x) as f64 / 1000.0;
    let cpu_ns_per_io = if r.ios > 0 {
        r.cpu_ns as f64 / r.ios as f64
    } else {
        0.0
    };
    if args.json {
        let v = serde_json::json!({
            "target": args.target, "passthrough": args.passthrough, "rw": args.rw, "bs": p.bs, "qd": p.qd, "cores": cores.len(),
            "time_s": secs, "ios": r.ios, "errors": r.errors,
            "iops": iops, "mib_s": mib_s,
            "lat_us": { "mean": r.hist.mean() / 1000.0, "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": r.hist.max() as f64 / 1000.0 },
            "cpu_ns_per_io": cpu_ns_per_io,
            "per_core_iops": r.per_core_ios.iter().map(|n| *n as f64 / secs).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!(
            "{} {} bs={} qd={} cores={}: {:.0} IOPS, {:.1} MiB/s, lat µs p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, {:.0} CPU ns/IO, {} errors",
            args.target,
            args.rw,
            p.bs,
            p.qd,
            cores.len(),
            iops,
            mib_s,
            q(0.5),
            q(0.99),
            q(0.999),
            r.hist.max() as f64 / 1000.0,
            cpu_ns_per_io,
            r.errors
        );
    }
}
