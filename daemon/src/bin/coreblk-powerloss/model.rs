//! The workload's model, written by the guest and checked by the host: per 4 KiB block of
//! every volume, snapshot and clone, the history of the values it was given, by step; the
//! steps and which of them were flushes. The rules are those of the in-process crash test
//! (`daemon/src/lvs/volume/tests/crash.rs`): a block may read its newest guaranteed value
//! or a later one, nothing else.

use serde::{Deserialize, Serialize};

pub use coreblk_daemon::testing::crash_model::{stamp, MObj, BLK, BLK_USIZE};

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
    /// This run's identity: the workload marks `run-<run_id as 16 hex digits>` into the log
    /// before `s0`, so a log can be matched to the model it belongs to (the seed alone does
    /// not tell two runs apart). 0 in models from before it existed.
    #[serde(default)]
    pub run_id: u64,
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
