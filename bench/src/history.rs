//! `--snapshots N`: gives the bench volume a snapshot history before the timed run. After
//! the prefill, N rounds of: take a snapshot, then rewrite a random 1/N of the volume's
//! clusters (whole clusters, so each rewrite allocates a new cluster and the old one stays
//! with the snapshot). The timed run then reads and writes a volume whose map has been
//! copied N times and whose clusters are spread over N generations.
//!
//! The cluster choice is a fixed-seed xorshift, so two runs build the same history. Must
//! never: run without a prefill (there would be nothing to share), or need more clusters
//! than the pool has ([`needed_clusters`] is checked before anything is written).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coreblk_daemon::reactor::ReactorSet;

use crate::job;
use crate::lvol::Lvol;

/// Most snapshots a history may have (the pool holds at most 4096 objects; keep room).
pub const MAX_SNAPSHOTS: u32 = 1024;
/// Default volume size with a history, in percent of the pool's data space: the volume,
/// its rewrites (one more volume's worth) and a full copy-up of it by a timed write run.
pub const HISTORY_VOLUME_PCT: u64 = 30;
/// Rewrites in flight.
const REWRITE_QD: u32 = 16;
/// Largest rewrite (a cluster larger than this is rewritten in part: a copy-up).
const MAX_REWRITE_BYTES: u64 = 1 << 20;
/// Seed of the cluster choice.
const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// Clusters rewritten per round: 1/`rounds` of the volume, at least one.
pub fn per_round(volume_clusters: u64, rounds: u32) -> u64 {
    volume_clusters.div_ceil(u64::from(rounds.max(1))).max(1)
}

/// Clusters a history needs at most: the prefilled volume plus every rewrite.
pub fn needed_clusters(volume_clusters: u64, rounds: u32) -> u64 {
    if rounds == 0 {
        return volume_clusters;
    }
    volume_clusters + u64::from(rounds) * per_round(volume_clusters, rounds)
}

/// The clusters each round rewrites: [`per_round`] random picks in `[0, volume_clusters)`
/// (with replacement), sorted, duplicates removed.
pub fn rounds(volume_clusters: u64, rounds: u32) -> Vec<Vec<u64>> {
    let mut x = SEED;
    let n = per_round(volume_clusters, rounds);
    (0..rounds)
        .map(|_| {
            let mut picks: Vec<u64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % volume_clusters.max(1)
                })
                .collect();
            picks.sort_unstable();
            picks.dedup();
            picks
        })
        .collect()
}

/// What building the history did.
#[derive(Debug)]
pub struct History {
    /// Snapshots taken.
    pub snapshots: u32,
    /// Cluster rewrites (after de-duplication within a round).
    pub rewrites: u64,
    /// Wall time, snapshots and rewrites.
    pub elapsed: Duration,
}

/// Builds an `n`-snapshot history on the (prefilled) bench volume of `lv`.
pub fn build(set: &ReactorSet, lv: &Lvol, n: u32) -> anyhow::Result<History> {
    if n > MAX_SNAPSHOTS {
        bail!("--snapshots {n}: at most {MAX_SNAPSHOTS}");
    }
    let t0 = Instant::now();
    let volume_clusters = lv.volume_bytes / lv.cluster_bytes;
    let len = u32::try_from(
        lv.cluster_bytes
            .min(MAX_REWRITE_BYTES)
            .min(u64::from(lv.dev.geometry().max_transfer_bytes)),
    )
    .context("rewrite size")?;
    let mut rewrites = 0;
    for (i, round) in rounds(volume_clusters, n).into_iter().enumerate() {
        lv.snapshot(set, lv.volume_id, &format!("history-{i}"))
            .with_context(|| format!("snapshot {i} of the history"))?;
        rewrites += round.len() as u64;
        let offsets = round.iter().map(|lc| lc * lv.cluster_bytes).collect();
        job::write_list(set, &lv.dev, offsets, len, REWRITE_QD)
            .with_context(|| format!("rewrites after snapshot {i} of the history"))?;
    }
    lv.settle(set)?;
    Ok(History {
        snapshots: n,
        rewrites,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_pick_a_share_of_the_volume_in_range_sorted() {
        let r = rounds(16_384, 64);
        assert_eq!(r.len(), 64);
        for round in &r {
            assert!(round.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
            assert!(round.iter().all(|lc| *lc < 16_384));
            // 256 picks with replacement out of 16 K: few collide.
            assert!((240..=256).contains(&round.len()), "{}", round.len());
        }
        // Different rounds pick different clusters; the same call picks the same ones.
        assert_ne!(r[0], r[1]);
        assert_eq!(r, rounds(16_384, 64));
    }

    #[test]
    fn sizes_and_bounds() {
        assert_eq!(per_round(1000, 64), 16);
        assert_eq!(per_round(10, 64), 1);
        assert_eq!(per_round(10, 0), 10);
        assert_eq!(needed_clusters(1000, 0), 1000);
        assert_eq!(needed_clusters(1024, 64), 2048);
        assert!(rounds(1000, 0).is_empty());
        assert_eq!(rounds(1, 3), vec![vec![0], vec![0], vec![0]]);
    }
}
