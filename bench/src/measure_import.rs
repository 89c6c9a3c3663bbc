//! `--measure import`: how long a pool takes to come back after a daemon crash, and how
//! much memory its metadata holds.
//!
//! Builds a pool with `volumes` volumes (the bench volume and `volumes - 1` more, each of
//! `--size`), writes every volume whole (so every cluster is mapped), then, `repeat` times:
//! drops the pool runtime without a checkpoint (a daemon crash: the device keeps what was
//! written; the import reads the last checkpoint — the ones the journal's pressure wrote
//! while filling — and replays the journal since), and times `pool::import` +
//! `PoolRt::start` up to the first completed read of a volume. The background re-zeroing of
//! free clusters that every import starts is timed separately. Then it writes a checkpoint
//! and measures the same `repeat` times again (an import right after a checkpoint: nothing
//! to replay). Prints `metadata_memory_bytes` and bytes per mapped cluster.
//!
//! Must never: drop the runtime while a write or the free-cluster pipeline is in flight
//! (it settles first), or count the re-zeroing in the time to the first IO.

use std::time::{Duration, Instant};

use anyhow::Context;
use coreblk_daemon::reactor::ReactorSet;

use crate::job;
use crate::lvol::{ImportTimes, Lvol};

/// Clusters mapped in total when `--size` is not given (the 1 M).
pub const DEFAULT_MAPPED_CLUSTERS: u64 = 1 << 20;
/// Prefill writes in flight per volume.
const FILL_QD: u32 = 16;

/// Per-volume clusters so that `volumes` volumes map at least `total` clusters.
pub fn clusters_per_volume(total: u64, volumes: u32) -> u64 {
    total.div_ceil(u64::from(volumes.max(1))).max(1)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn case_json(runs: &[ImportTimes]) -> serde_json::Value {
    let m = |f: fn(&ImportTimes) -> Duration| ms(median(runs.iter().map(f).collect()));
    let max = |f: fn(&ImportTimes) -> Duration| ms(runs.iter().map(f).max().unwrap_or_default());
    serde_json::json!({
        "runs": runs.len(),
        "import_ms": m(|t| t.import), "start_ms": m(|t| t.start),
        "to_first_io_ms": m(|t| t.to_first_io), "to_first_io_ms_max": max(|t| t.to_first_io),
        "rezero_ms": m(|t| t.rezero),
        "first_io_eagain_retries_max": runs.iter().map(|t| t.eagain_retries).max().unwrap_or(0),
        "replayed_blocks": runs.first().map_or(0, |t| t.replayed_blocks),
        "objects": runs.first().map_or(0, |t| t.objects),
    })
}

/// Builds the pool's volumes on `lv` (whose bench volume exists), then measures.
pub fn run(
    set: &ReactorSet,
    lv: &Lvol,
    volumes: u32,
    repeat: u32,
    json: bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let size = lv.volume_bytes;
    let chunk = u32::try_from((lv.cluster_bytes * 16).min(1 << 20)).context("chunk")?;
    job::prefill(set, &lv.dev, size, chunk, FILL_QD).context("filling volume 0")?;
    for i in 1..volumes {
        let (_, dev) = lv.add_volume(set, &format!("v{i}"), size)?;
        job::prefill(set, &dev, size, chunk, FILL_QD)
            .with_context(|| format!("filling volume {i}"))?;
    }
    lv.settle(set)?;
    let built = t0.elapsed();
    let c = lv.counters(set)?;
    let mapped = c.alloc.in_use;
    eprintln!(
        "built {volumes} volumes of {} KiB, {mapped} mapped clusters of {} KiB in {:.1} s ({} checkpoints, {} journal writes)",
        size >> 10,
        lv.cluster_bytes >> 10,
        built.as_secs_f64(),
        c.store.checkpoints,
        c.journal.writes
    );
    let mut crash = Vec::new();
    for _ in 0..repeat {
        lv.crash(set)?;
        crash.push(lv.reimport(set)?);
    }
    let mem = lv.counters(set)?;
    lv.checkpoint(set)?;
    let mut ckpt = Vec::new();
    for _ in 0..repeat {
        lv.crash(set)?;
        ckpt.push(lv.reimport(set)?);
    }
    let mem_bytes = mem.metadata_memory_bytes;
    // The allocator keeps 3 bytes per pool cluster (PoolRt::metadata_memory_bytes); the
    // rest is the maps.
    let alloc_bytes = mem.pool_clusters * 3;
    let maps_bytes = mem_bytes.saturating_sub(alloc_bytes);
    let per_mapped = mem_bytes as f64 / mapped.max(1) as f64;
    let maps_per_mapped = maps_bytes as f64 / mapped.max(1) as f64;
    let report = serde_json::json!({
        "volumes": volumes, "volume_bytes": size, "cluster_bytes": lv.cluster_bytes,
        "mapped_clusters": mapped, "pool_clusters": mem.pool_clusters,
        "build_s": built.as_secs_f64(), "checkpoints_while_building": c.store.checkpoints,
        "after_crash": case_json(&crash), "after_checkpoint": case_json(&ckpt),
        "metadata_memory_bytes": mem_bytes, "maps_bytes": maps_bytes, "allocator_bytes": alloc_bytes,
        "bytes_per_mapped_cluster": per_mapped, "map_bytes_per_mapped_cluster": maps_per_mapped,
    });
    if json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "import of a pool with {volumes} volumes, {mapped} mapped clusters of {} KiB ({} data clusters):",
        lv.cluster_bytes >> 10,
        mem.pool_clusters
    );
    for (what, v) in [
        ("after a crash     ", &report["after_crash"]),
        ("after a checkpoint", &report["after_checkpoint"]),
    ] {
        println!(
            "  {what} ({} runs, medians): import {:.1} ms ({} journal blocks replayed, {} objects) + start {:.1} ms; first IO served {:.1} ms after the import began (max {:.1}; up to {} EAGAIN retries); background re-zeroing then {:.1} ms",
            v["runs"],
            v["import_ms"].as_f64().unwrap_or(f64::NAN),
            v["replayed_blocks"],
            v["objects"],
            v["start_ms"].as_f64().unwrap_or(f64::NAN),
            v["to_first_io_ms"].as_f64().unwrap_or(f64::NAN),
            v["to_first_io_ms_max"].as_f64().unwrap_or(f64::NAN),
            v["first_io_eagain_retries_max"],
            v["rezero_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "  metadata memory {} bytes ({:.2} MiB): maps {maps_bytes} + allocator {alloc_bytes} (3 B × pool cluster); {per_mapped:.2} B per mapped cluster (maps alone {maps_per_mapped:.2})",
        mem_bytes,
        mem_bytes as f64 / f64::from(1 << 20),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_per_volume_covers_the_total() {
        assert_eq!(clusters_per_volume(1 << 20, 1000), 1049);
        assert!(clusters_per_volume(1 << 20, 1000) * 1000 >= 1 << 20);
        assert_eq!(clusters_per_volume(10, 0), 10);
        assert_eq!(clusters_per_volume(0, 5), 1);
    }

    #[test]
    fn median_of_durations() {
        let d = Duration::from_millis;
        assert_eq!(median(vec![d(3), d(1), d(2)]), d(2));
        assert_eq!(median(vec![d(4), d(2)]), d(3));
        assert_eq!(median(Vec::new()), Duration::ZERO);
    }
}
