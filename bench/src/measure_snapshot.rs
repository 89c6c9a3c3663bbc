//! `--measure snapshot`: what creating a snapshot (and a clone of it) costs on a prefilled
//! volume, in four numbers per creation: wall latency, journal commits (and writes), reactor
//! CPU including deferred work, and the effect on concurrent IO latency.
//!
//! Method (printed with the results, so a reader sees how each number was made):
//! - **CPU, idle reactor.** The load is a closed loop that keeps the reactor 100 % busy, so
//!   under load its thread CPU time equals wall time with or without snapshots; the
//!   difference is zero by construction. CPU is therefore measured with the reactor
//!   otherwise idle (asleep in the kernel): reactor 0's `CLOCK_THREAD_CPUTIME_ID`, read on
//!   the reactor by a message, over [before the first creation, `tail` after the last], minus
//!   the same reading over a baseline interval of the same length and the same two samples
//!   without creations, divided by the creations. The reading includes the reactor's poll-before-sleep after every
//!   wake-up (`--idle-threshold-us`, the reactor's policy, not the store's), so the
//!   reactor's `busy_ns` (loop iterations that found work) is reported beside it.
//! - **Journal commits, writes, checkpoints**: the store's counters read on the reactor just
//!   before the call and in its reply (no extra messages).
//! - **Under load**: `repeat` alternating pairs of timed runs of the load (`--rw`, `--qd`,
//!   ...) on the volume, A without and B with `creations` snapshots + as many clones spread
//!   evenly over the measured window; latency percentiles of each, medians over the pairs.
//!   The IO a B run lost against its A run, in reactor time per creation, is printed as a
//!   second (noisy) CPU estimate.
//!
//! Must never: time creations while the free-cluster pipeline still runs (the setup
//! settles it), or charge sampling messages to one interval and not the other.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::reactor::{Reactor, ReactorSet};

use crate::job::{self, JobParams, JobsResult};
use crate::lvol::{Lvol, OpCost};

/// Gap between two creations in the idle CPU phases.
const IDLE_SPACING: Duration = Duration::from_millis(20);

/// What `--measure snapshot` does.
#[derive(Clone, Debug)]
pub struct Params {
    /// Snapshots (and as many clones) per phase.
    pub creations: u32,
    /// How long after the last creation deferred work is still counted.
    pub tail: Duration,
    /// Alternating load pairs.
    pub repeat: u32,
    /// The load's `--rw` (for the report).
    pub rw: String,
    /// The concurrent load.
    pub load: JobParams,
}

/// Reactor 0's clocks.
#[derive(Clone, Copy, Debug)]
struct Sample {
    cpu_ns: u64,
    busy_ns: u64,
}

fn sample(set: &ReactorSet) -> anyhow::Result<Sample> {
    let cpu_ns = set.remotes()[0].call(|_rx: &Reactor| job::thread_cpu_ns())?;
    Ok(Sample {
        cpu_ns,
        busy_ns: set.stats()[0].busy_ns.load(Ordering::Relaxed),
    })
}

/// One idle phase: creations, then the tail.
#[derive(Debug)]
struct IdlePhase {
    costs: Vec<OpCost>,
    /// Thread CPU over the phase, less the baseline's.
    cpu_ns_extra: f64,
    /// `busy_ns` likewise.
    busy_ns_extra: f64,
}

impl IdlePhase {
    fn per_creation_us(&self) -> (f64, f64) {
        let n = self.costs.len().max(1) as f64;
        (
            self.cpu_ns_extra / n / 1000.0,
            self.busy_ns_extra / n / 1000.0,
        )
    }
}

/// What the reactor spent over a baseline interval (same sleeps, same two samples at its
/// edges, no creations): the edges' own wake-ups dominate it, so it is subtracted whole,
/// not as a rate.
#[derive(Clone, Copy, Debug)]
struct Baseline {
    cpu_ns: f64,
    busy_ns: f64,
}

fn idle_phase(
    set: &ReactorSet,
    base: Baseline,
    tail: Duration,
    n: usize,
    mut create: impl FnMut(usize) -> anyhow::Result<OpCost>,
) -> anyhow::Result<IdlePhase> {
    let s0 = sample(set)?;
    let mut costs = Vec::new();
    for i in 0..n {
        costs.push(create(i)?);
        std::thread::sleep(IDLE_SPACING);
    }
    std::thread::sleep(tail);
    let s1 = sample(set)?;
    Ok(IdlePhase {
        costs,
        cpu_ns_extra: (s1.cpu_ns - s0.cpu_ns) as f64 - base.cpu_ns,
        busy_ns_extra: (s1.busy_ns - s0.busy_ns) as f64 - base.busy_ns,
    })
}

/// One load run's numbers.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct LoadRun {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    errors: u64,
}

impl LoadRun {
    fn of(r: &JobsResult) -> Self {
        let q = |x: f64| r.hist.value_at_quantile(x) as f64 / 1000.0;
        Self {
            iops: r.ios as f64 / r.elapsed.as_secs_f64().max(1e-9),
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: r.hist.max() as f64 / 1000.0,
            errors: r.errors,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Latency summary of creations, µs: wall (caller's view) and on the reactor.
fn wall_summary(costs: &[OpCost]) -> serde_json::Value {
    let stats = |f: fn(&OpCost) -> Duration| {
        let mut us: Vec<f64> = costs.iter().map(|c| f(c).as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let max = us.last().copied().unwrap_or(0.0);
        let min = us.first().copied().unwrap_or(0.0);
        (min, median(us), max)
    };
    let (min, med, max) = stats(|c| c.wall);
    let (rmin, rmed, rmax) = stats(|c| c.on_reactor);
    serde_json::json!({ "n": costs.len(), "min": min, "median": med, "max": max,
                        "on_reactor": { "min": rmin, "median": rmed, "max": rmax } })
}

/// Journal use of creations: totals and the most any one used.
fn journal_summary(costs: &[OpCost]) -> serde_json::Value {
    let n = costs.len().max(1) as f64;
    let sum = |f: fn(&OpCost) -> u64| costs.iter().map(f).sum::<u64>();
    let max = |f: fn(&OpCost) -> u64| costs.iter().map(f).max().unwrap_or(0);
    serde_json::json!({
        "commits_per_creation": sum(|c| c.commits) as f64 / n,
        "commits_max": max(|c| c.commits),
        "journal_writes_per_creation": sum(|c| c.journal_writes) as f64 / n,
        "journal_flushes_per_creation": sum(|c| c.journal_flushes) as f64 / n,
        "checkpoints": sum(|c| c.checkpoints),
    })
}

/// Runs the measurement on the prefilled, settled bench volume of `lv`; prints the report.
pub fn run(
    set: &ReactorSet,
    dev: &std::sync::Arc<dyn BlockDevice>,
    lv: &Lvol,
    p: &Params,
    json: bool,
) -> anyhow::Result<()> {
    let k = usize::try_from(p.creations).context("--creations")?;
    let before = lv.counters(set)?;
    let vol = lv.volume_id;
    let mut snaps = 0usize;
    let mut next_name = |kind: &str| {
        snaps += 1;
        format!("m-{kind}-{snaps}")
    };

    // Idle CPU: baseline, snapshots, clones of those snapshots.
    let phase_len = IDLE_SPACING * p.creations + p.tail;
    let b0 = sample(set)?;
    std::thread::sleep(phase_len);
    let b1 = sample(set)?;
    let base = Baseline {
        cpu_ns: (b1.cpu_ns - b0.cpu_ns) as f64,
        busy_ns: (b1.busy_ns - b0.busy_ns) as f64,
    };
    let mut ids = Vec::new();
    let snap_phase = idle_phase(set, base, p.tail, k, |_| {
        let (id, cost) = lv.snapshot(set, vol, &next_name("snap"))?;
        ids.push(id);
        Ok(cost)
    })?;
    let clone_phase = idle_phase(set, base, p.tail, k, |i| {
        let (_, cost) = lv.clone_of(set, ids[i], &next_name("clone"))?;
        Ok(cost)
    })?;

    // Under load: alternating pairs, A without creations, B with.
    let mut runs_a = Vec::new();
    let mut runs_b = Vec::new();
    let mut load_snaps = Vec::new();
    let mut load_clones = Vec::new();
    let mut deficit_us = Vec::new();
    for _ in 0..p.repeat {
        let a = job::run_jobs(set, dev, &p.load)?;
        let names: Vec<(String, String)> = (0..k)
            .map(|_| (next_name("snap"), next_name("clone")))
            .collect();
        let (b, costs) = std::thread::scope(|s| {
            let creator = s.spawn(|| -> anyhow::Result<Vec<(OpCost, OpCost)>> {
                // run_jobs starts 20 ms after it is called, measures after the warm-up;
                // spread the creations over the measured window.
                let gap = p.load.time / (p.creations + 1);
                std::thread::sleep(Duration::from_millis(20) + p.load.warmup + gap / 2);
                let mut out = Vec::new();
                for (sname, cname) in &names {
                    let (id, sc) = lv.snapshot(set, vol, sname)?;
                    let (_, cc) = lv.clone_of(set, id, cname)?;
                    out.push((sc, cc));
                    std::thread::sleep(gap.saturating_sub(sc.wall + cc.wall));
                }
                Ok(out)
            });
            let b = job::run_jobs(set, dev, &p.load);
            let costs = creator
                .join()
                .map_err(|_| anyhow::anyhow!("the creating thread panicked"))?;
            anyhow::Ok((b?, costs?))
        })?;
        let (ra, rb) = (LoadRun::of(&a), LoadRun::of(&b));
        if ra.iops > 0.0 && !costs.is_empty() {
            let lost_s = (1.0 - rb.iops / ra.iops) * b.elapsed.as_secs_f64();
            deficit_us.push(lost_s * 1e6 / (2 * costs.len()) as f64);
        }
        for (sc, cc) in costs {
            load_snaps.push(sc);
            load_clones.push(cc);
        }
        runs_a.push(ra);
        runs_b.push(rb);
    }
    let after = lv.counters(set)?;

    let med = |runs: &[LoadRun], f: fn(&LoadRun) -> f64| median(runs.iter().map(f).collect());
    let load_summary = |runs: &[LoadRun]| {
        serde_json::json!({
            "iops": med(runs, |r| r.iops), "p50_us": med(runs, |r| r.p50_us),
            "p99_us": med(runs, |r| r.p99_us), "p999_us": med(runs, |r| r.p999_us),
            "max_us": med(runs, |r| r.max_us),
            "errors": runs.iter().map(|r| r.errors).sum::<u64>(),
            "runs": runs,
        })
    };
    let (snap_cpu, snap_busy) = snap_phase.per_creation_us();
    let (clone_cpu, clone_busy) = clone_phase.per_creation_us();
    let mapped = before.alloc.in_use;
    let report = serde_json::json!({
        "volume_bytes": lv.volume_bytes, "cluster_bytes": lv.cluster_bytes,
        "mapped_clusters": mapped,
        "idle": {
            "tail_s": p.tail.as_secs_f64(),
            "baseline_cpu_us": base.cpu_ns / 1000.0, "baseline_busy_us": base.busy_ns / 1000.0,
            "snapshot": { "cpu_us_per_creation": snap_cpu, "busy_us_per_creation": snap_busy,
                          "wall_us": wall_summary(&snap_phase.costs), "journal": journal_summary(&snap_phase.costs) },
            "clone": { "cpu_us_per_creation": clone_cpu, "busy_us_per_creation": clone_busy,
                       "wall_us": wall_summary(&clone_phase.costs), "journal": journal_summary(&clone_phase.costs) },
        },
        "load": {
            "rw": p.rw, "qd": p.load.qd, "bs": p.load.bs,
            "without": load_summary(&runs_a), "with": load_summary(&runs_b),
            "snapshot": { "wall_us": wall_summary(&load_snaps), "journal": journal_summary(&load_snaps) },
            "clone": { "wall_us": wall_summary(&load_clones), "journal": journal_summary(&load_clones) },
            "io_deficit_us_per_creation": median(deficit_us.clone()),
        },
        "checkpoints_during": after.store.checkpoints - before.store.checkpoints,
    });
    if json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "snapshot/clone creation on a volume of {} MiB, {} KiB clusters, {} mapped clusters",
        lv.volume_bytes >> 20,
        lv.cluster_bytes >> 10,
        mapped
    );
    println!(
        "  idle reactor (CPU counted until {:.1} s after the last creation, less a baseline interval of the same length: {:.1} µs CPU, {:.1} µs busy):",
        p.tail.as_secs_f64(),
        base.cpu_ns / 1000.0,
        base.busy_ns / 1000.0
    );
    for (kind, ph, cpu, busy) in [
        ("snapshot", &snap_phase, snap_cpu, snap_busy),
        ("clone", &clone_phase, clone_cpu, clone_busy),
    ] {
        let w = wall_summary(&ph.costs);
        let j = journal_summary(&ph.costs);
        println!(
            "    {kind:8} x{}: wall µs min {:.1} median {:.1} max {:.1} (on the reactor median {:.1} max {:.1}); journal commits/creation {} (max {}), writes/creation {}, flushes/creation {}; reactor CPU/creation {cpu:.1} µs (busy loop time {busy:.1} µs)",
            w["n"], f(&w["min"]), f(&w["median"]), f(&w["max"]),
            f(&w["on_reactor"]["median"]), f(&w["on_reactor"]["max"]),
            j["commits_per_creation"], j["commits_max"], j["journal_writes_per_creation"],
            j["journal_flushes_per_creation"],
        );
    }
    let (a, b) = (&report["load"]["without"], &report["load"]["with"]);
    println!(
        "  under load ({} qd {} bs {}, {} pairs, medians): without creations {:.0} IOPS p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs",
        p.rw, p.load.qd, p.load.bs, p.repeat,
        f(&a["iops"]), f(&a["p50_us"]), f(&a["p99_us"]), f(&a["p999_us"]), f(&a["max_us"]),
    );
    println!(
        "    with {} snapshots + {} clones per run: {:.0} IOPS p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} µs",
        p.creations, p.creations,
        f(&b["iops"]), f(&b["p50_us"]), f(&b["p99_us"]), f(&b["p999_us"]), f(&b["max_us"]),
    );
    for kind in ["snapshot", "clone"] {
        let w = &report["load"][kind]["wall_us"];
        let j = &report["load"][kind]["journal"];
        println!(
            "    {kind:8} x{} under load: wall µs min {:.1} median {:.1} max {:.1} (on the reactor median {:.1} max {:.1}); journal commits/creation {} (max {})",
            w["n"], f(&w["min"]), f(&w["median"]), f(&w["max"]),
            f(&w["on_reactor"]["median"]), f(&w["on_reactor"]["max"]),
            j["commits_per_creation"], j["commits_max"],
        );
    }
    println!(
        "    IO lost per creation (reactor time, noisy): {:.1} µs; checkpoints during the measurement: {}",
        f(&report["load"]["io_deficit_us_per_creation"]),
        report["checkpoints_during"]
    );
    Ok(())
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
