//! The workload's model, written by the guest and checked by the host: per 4 KiB block of
//! every volume, snapshot and clone, the history of the values it was given, by step; the
//! steps and which of them were flushes. The rules are those of the in-process crash test
//! (`daemon/src/lvs/volume/tests/crash.rs`): a block may read its newest guaranteed value
//! or a later one, nothing else.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

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

    /// A snapshot or clone of `self` taken at `step`.
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

/// One step of the workload as the guest ran it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// 0 is the state when the workload began (pool created, imported and flushed).
    pub index: usize,
    /// What it did (`write`, `flush`, `snapshot`, ...).
    pub op: String,
    /// Requests or operations it submitted.
    pub ios: usize,
    /// Whether it was a FLUSH that completed (everything before it is guaranteed).
    pub flush: bool,
    /// Microseconds since the workload began, at submission and at the last completion.
    pub submit_us: u64,
    /// See `submit_us`.
    pub ack_us: u64,
}

/// Everything the host needs to check a replayed image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Model {
    /// Seed of the workload.
    pub seed: u64,
    /// Size of the device the pool was formatted on.
    pub device_bytes: u64,
    /// The pool's cluster size.
    pub cluster_bytes: u64,
    /// Step 0 first.
    pub steps: Vec<Step>,
    /// Every object the workload created.
    pub objs: Vec<MObj>,
}

impl Model {
    /// The newest flush step at or before `acked` (step 0 counts: the workload began on a
    /// flushed pool).
    pub fn floor(&self, acked: usize) -> usize {
        self.steps[..=acked.min(self.steps.len() - 1)]
            .iter()
            .rposition(|s| s.flush)
            .unwrap_or(0)
    }
}
