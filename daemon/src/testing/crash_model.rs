//! The crash contract as a model, shared by the in-process crash test
//! (`lvs/volume/tests/crash.rs`) and the dm-log-writes power-loss check
//! (`bin/coreblk-powerloss`): per 4 KiB block of every volume, snapshot and clone, the
//! history of values it was given by workload step, and what a block may read after a
//! crash — its newest guaranteed value or a later one, nothing else (DESIGN §4). Blocks
//! carry 8-byte stamps repeated, so torn, foreign or garbage blocks are recognised.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::lvs::alloc::Allocator;
use crate::lvs::map::LEAF_ENTRIES;
use crate::lvs::pool::Imported;

/// Model block size (the pool's logical block).
pub const BLK: u64 = 4096;
/// [`BLK`] as a length.
pub const BLK_USIZE: usize = 4096;

/// A block of value `v`: `v` repeated, so a torn or foreign block is recognised.
pub fn stamp(v: u64) -> Vec<u8> {
    v.to_le_bytes().repeat(BLK_USIZE / 8)
}

/// One model object: per 4 KiB block, its history of (step, value); value 0 = zeroes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MObj {
    /// The store's id.
    pub id: u32,
    /// Its name (for messages).
    pub name: String,
    /// A read-only snapshot (else a volume or clone).
    pub snapshot: bool,
    /// Step that created it.
    pub created: usize,
    /// Step that deleted it.
    pub deleted: Option<usize>,
    /// Per block: (step, value) in order.
    pub hist: Vec<Vec<(usize, u64)>>,
    /// Per block: steps of acknowledged FUA writes.
    pub fua: Vec<Vec<usize>>,
}

impl MObj {
    /// A new volume of `blocks` zero blocks.
    pub fn new(id: u32, name: String, step: usize, blocks: usize) -> Self {
        Self {
            id,
            name,
            snapshot: false,
            created: step,
            deleted: None,
            hist: vec![vec![(step, 0)]; blocks],
            fua: vec![Vec::new(); blocks],
        }
    }

    /// A snapshot or clone of `self` taken at `step`: it inherits the history (what a
    /// crash may leave of it is what it may leave of the source up to `step`).
    pub fn derive(&self, id: u32, name: String, step: usize, snapshot: bool) -> Self {
        Self {
            id,
            name,
            snapshot,
            created: step,
            deleted: None,
            hist: self.hist.clone(),
            fua: self.fua.clone(),
        }
    }

    /// The values block `b` may read when every step up to `floor` is guaranteed, steps
    /// up to `acked` were acknowledged (their FUA writes are guaranteed) and steps up to
    /// `last` may have happened.
    pub fn allowed(&self, b: usize, floor: usize, acked: usize, last: usize) -> HashSet<u64> {
        let h = &self.hist[b];
        let floor = self.fua[b]
            .iter()
            .copied()
            .filter(|&s| s <= acked)
            .fold(floor, usize::max);
        let base = h.iter().filter(|(s, _)| *s <= floor).map(|(s, _)| *s).max();
        h.iter()
            .filter(|(s, _)| Some(*s) == base || (*s > floor && *s <= last))
            .map(|(_, v)| *v)
            .collect()
    }
}

/// Checks that a recovered pool's maps are sane: every physical cluster inside the pool,
/// none mapped twice by one map, and the reference counts buildable (what a start does).
pub fn check_maps(imp: &Imported) -> Result<(), String> {
    let sb = &imp.sb;
    let mut in_use = Vec::new();
    let mut seen_leaves = HashSet::new();
    for (id, map) in &imp.maps {
        let mut mine = HashSet::new();
        let mut bad = None;
        map.for_each(|lc, x| {
            if u64::from(x.pc) >= sb.clusters {
                bad = Some(format!("id {id} maps logical cluster {lc} past the pool"));
            } else if !mine.insert(x.pc) {
                bad = Some(format!("id {id} maps cluster {} twice (at {lc})", x.pc));
            }
        });
        if let Some(why) = bad {
            return Err(why);
        }
        for (index, key) in map.leaf_ids() {
            if seen_leaves.insert(key) {
                let base = (index * LEAF_ENTRIES) as u64;
                for lc in base..(base + LEAF_ENTRIES as u64).min(map.len()) {
                    if let Some(x) = map.get(lc) {
                        in_use.push(x.pc);
                    }
                }
            }
        }
    }
    let clusters = u32::try_from(sb.clusters).map_err(|_| "too many clusters".to_string())?;
    Allocator::from_in_use(clusters, in_use).map_err(|e| format!("reference counts: {e}"))?;
    Ok(())
}
