//! The cluster allocator and its free-cluster pipeline (FORMAT.md §5, DESIGN §4 invariants
//! 2a and 3). Pure state: it decides, the pool issues the IO and reports back.
//!
//! A cluster is handed out only when it is *durably zero*. The path back from use:
//!
//! ```text
//! InUse --free(seq)--> Freed(seq) --durable(≥ seq)--> Dirty --take_dirty--> Zeroing
//!   ^                                                                          |
//!   +--alloc-- Zeroed <--flush_done(token of a flush begun after)-- ZeroedUnflushed <-zeroed
//! ```
//!
//! - `Freed(seq)`: the journal record that stopped referencing the cluster is in block
//!   `seq` but may not be durable yet: reusing it now could let a power cut resurrect the
//!   old mapping onto new data (invariant 3).
//! - `Dirty` → `Zeroing` → `ZeroedUnflushed`: the pool write-zeroes the cluster; the zeroes
//!   count only once a device flush that *started after* the zeroing completed has finished
//!   (invariant 2a: a mapping whose data was lost must read zeroes).
//!
//! An in-use cluster carries a reference count: the number of map leaves holding it
//! (snapshots and clones share leaves, `map.rs`); it leaves `InUse` when the last goes.
//!
//! Must never: hand out a cluster twice, or before it is durably zero. Memory: three bytes
//! per cluster (state and count) plus the queues.

use std::collections::VecDeque;

/// State of one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ClusterState {
    /// Durably zero, ready to hand out.
    Zeroed = 0,
    /// Referenced by a mapping.
    InUse = 1,
    /// Unreferenced by a record that may not be durable yet.
    Freed = 2,
    /// Unreferenced durably; content unknown: must be zeroed.
    Dirty = 3,
    /// A write-zeroes is in flight.
    Zeroing = 4,
    /// Zeroed, waiting for a flush to make the zeroes durable.
    ZeroedUnflushed = 5,
}

/// A flush the pool started, covering the zeroings completed before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushToken(u64);

/// Counts per state, for accounting and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocCounts {
    /// Ready to hand out.
    pub zeroed: u64,
    /// In use.
    pub in_use: u64,
    /// On their way back (freed, dirty, zeroing, unflushed): free space, not yet usable.
    pub recycling: u64,
}

/// The allocator of one pool.
#[derive(Debug)]
pub struct Allocator {
    state: Vec<ClusterState>,
    /// References of in-use clusters (0 otherwise).
    refs: Vec<u16>,
    /// Ready clusters, handed out lowest first within the order they became ready.
    zeroed: VecDeque<u32>,
    /// (journal block seq of the freeing record, cluster), in seq order.
    freed: VecDeque<(u64, u32)>,
    dirty: VecDeque<u32>,
    /// (zeroing completion epoch, cluster).
    unflushed: VecDeque<(u64, u32)>,
    zeroing: u64,
    epoch: u64,
    in_use: u64,
}

impl Allocator {
    /// A new pool whose data area was zeroed and flushed at creation: everything is ready.
    pub fn new_zeroed(clusters: u32) -> Self {
        let mut a = Self::empty(clusters, ClusterState::Zeroed);
        a.zeroed = (0..clusters).collect();
        a
    }

    /// An imported pool: clusters referenced by the maps are in use; every other cluster
    /// has unknown content (a zeroing may have been cut short) and is zeroed again.
    pub fn from_in_use(
        clusters: u32,
        in_use: impl IntoIterator<Item = u32>,
    ) -> Result<Self, String> {
        let mut a = Self::empty(clusters, ClusterState::Dirty);
        for c in in_use {
            let s = a
                .state
                .get_mut(c as usize)
                .ok_or_else(|| format!("mapping to cluster {c} past the pool's {clusters}"))?;
            if *s == ClusterState::InUse {
                let r = &mut a.refs[c as usize];
                *r = r
                    .checked_add(1)
                    .ok_or_else(|| format!("cluster {c} held by more than {} leaves", u16::MAX))?;
                continue;
            }
            *s = ClusterState::InUse;
            a.refs[c as usize] = 1;
            a.in_use += 1;
        }
        a.dirty = (0..clusters)
            .filter(|&c| a.state[c as usize] == ClusterState::Dirty)
            .collect();
        Ok(a)
    }

    fn empty(clusters: u32, fill: ClusterState) -> Self {
        Self {
            state: vec![fill; clusters as usize],
            refs: vec![0; clusters as usize],
            zeroed: VecDeque::new(),
            freed: VecDeque::new(),
            dirty: VecDeque::new(),
            unflushed: VecDeque::new(),
            zeroing: 0,
            epoch: 0,
            in_use: 0,
        }
    }

    /// State of cluster `c`.
    pub fn state(&self, c: u32) -> ClusterState {
        self.state[c as usize]
    }

    /// Counts per state.
    pub fn counts(&self) -> AllocCounts {
        let total = self.state.len() as u64;
        let zeroed = self.zeroed.len() as u64;
        AllocCounts {
            zeroed,
            in_use: self.in_use,
            recycling: total - zeroed - self.in_use,
        }
    }

    /// Hands out a durably zero cluster. `None` with `recycling > 0` means "wait for the
    /// pipeline"; `None` with nothing recycling means the pool is full (ENOSPC).
    pub fn alloc(&mut self) -> Option<u32> {
        let c = self.zeroed.pop_front()?;
        let s = &mut self.state[c as usize];
        assert_eq!(
            *s,
            ClusterState::Zeroed,
            "cluster {c} on the ready queue in state {s:?}"
        );
        *s = ClusterState::InUse;
        self.refs[c as usize] = 1;
        self.in_use += 1;
        Some(c)
    }

    /// References to in-use cluster `c` (0 when not in use).
    pub fn refs(&self, c: u32) -> u16 {
        self.refs[c as usize]
    }

    /// One more leaf holds in-use cluster `c`.
    pub fn share(&mut self, c: u32) {
        assert_eq!(
            self.state[c as usize],
            ClusterState::InUse,
            "share of cluster {c} not in use"
        );
        let r = &mut self.refs[c as usize];
        *r = r
            .checked_add(1)
            .expect("fewer sharers than maps, and maps < u16::MAX");
    }

    /// One reference to cluster `c` went, by a record in journal block `seq`; returns
    /// whether it was the last (the cluster starts its way back to the ready queue).
    pub fn free(&mut self, c: u32, seq: u64) -> bool {
        let s = &mut self.state[c as usize];
        assert_eq!(
            *s,
            ClusterState::InUse,
            "free of cluster {c} in state {s:?}"
        );
        let r = &mut self.refs[c as usize];
        *r -= 1;
        if *r > 0 {
            return false;
        }
        *s = ClusterState::Freed;
        self.in_use -= 1;
        // Mostly in sequence order; a free deferred behind in-flight IO may arrive with an
        // older seq and then waits for the entries ahead of it (later, never early).
        self.freed.push_back((seq, c));
        true
    }

    /// Every journal block up to `seq` is durable (a flush covering it completed).
    pub fn durable(&mut self, seq: u64) {
        while let Some(&(s, c)) = self.freed.front() {
            if s > seq {
                break;
            }
            self.freed.pop_front();
            self.state[c as usize] = ClusterState::Dirty;
            self.dirty.push_back(c);
        }
    }

    /// Dirty clusters to zero now, as runs of consecutive clusters `(first, count)` in
    /// queue order: at most `max_clusters` clusters in at most `max_runs` runs (one
    /// write-zeroes each). The pool zeroes a fresh or re-imported pool's free space
    /// (whole runs in ascending order) with few commands this way.
    pub fn take_dirty_runs(&mut self, max_clusters: usize, max_runs: usize) -> Vec<(u32, u32)> {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut taken = 0usize;
        while taken < max_clusters {
            let Some(&c) = self.dirty.front() else {
                break;
            };
            let full = runs.len() == max_runs;
            match runs.last_mut() {
                Some((first, n)) if first.checked_add(*n) == Some(c) => *n += 1,
                _ if full => break,
                _ => runs.push((c, 1)),
            }
            self.dirty.pop_front();
            self.state[c as usize] = ClusterState::Zeroing;
            taken += 1;
        }
        self.zeroing += taken as u64;
        runs
    }

    /// The write-zeroes of cluster `c` completed (`ok = false`: it failed; retry later).
    pub fn zeroed(&mut self, c: u32, ok: bool) {
        let s = &mut self.state[c as usize];
        assert_eq!(
            *s,
            ClusterState::Zeroing,
            "zeroing completion for cluster {c} in state {s:?}"
        );
        self.zeroing -= 1;
        if ok {
            *s = ClusterState::ZeroedUnflushed;
            self.unflushed.push_back((self.epoch, c));
        } else {
            *s = ClusterState::Dirty;
            self.dirty.push_back(c);
        }
    }

    /// Whether zeroed clusters wait for a flush.
    pub fn wants_flush(&self) -> bool {
        !self.unflushed.is_empty()
    }

    /// The pool is submitting a device flush now: it covers the zeroings completed so far.
    pub fn begin_flush(&mut self) -> FlushToken {
        self.epoch += 1;
        FlushToken(self.epoch)
    }

    /// The flush begun with `token` completed: its zeroes are durable.
    pub fn flush_done(&mut self, token: FlushToken) {
        while let Some(&(e, c)) = self.unflushed.front() {
            if e >= token.0 {
                break;
            }
            self.unflushed.pop_front();
            self.state[c as usize] = ClusterState::Zeroed;
            self.zeroed.push_back(c);
        }
    }

    /// Checks that the queues and the per-cluster states agree (for `verify` and tests).
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.state.len()];
        let mut mark = |c: u32, want: ClusterState, q: &str| -> Result<(), String> {
            let i = c as usize;
            if self.state[i] != want {
                return Err(format!(
                    "cluster {c} in {q} but in state {:?}",
                    self.state[i]
                ));
            }
            seen[i] += 1;
            Ok(())
        };
        for &c in &self.zeroed {
            mark(c, ClusterState::Zeroed, "the ready queue")?;
        }
        for &(_, c) in &self.freed {
            mark(c, ClusterState::Freed, "the freed queue")?;
        }
        for &c in &self.dirty {
            mark(c, ClusterState::Dirty, "the dirty queue")?;
        }
        for &(_, c) in &self.unflushed {
            mark(c, ClusterState::ZeroedUnflushed, "the unflushed queue")?;
        }
        let mut zeroing = 0;
        let mut in_use = 0;
        for (i, s) in self.state.iter().enumerate() {
            match s {
                ClusterState::InUse => in_use += 1,
                ClusterState::Zeroing => zeroing += 1,
                _ if seen[i] != 1 => {
                    return Err(format!(
                        "cluster {i} in state {s:?} is on {} queues",
                        seen[i]
                    ))
                }
                _ => {}
            }
        }
        if in_use != self.in_use || zeroing != self.zeroing {
            return Err(format!(
                "counts: in use {in_use} vs {}, zeroing {zeroing} vs {}",
                self.in_use, self.zeroing
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Alloc,
        Free(usize),
        Durable(u64),
        TakeDirty(usize, usize),
        Zeroed(usize, bool),
        BeginFlush,
        FlushDone(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            2 => (0u64..8).prop_map(Op::Durable),
            2 => (0usize..5, 1usize..3).prop_map(|(k, runs)| Op::TakeDirty(k, runs)),
            2 => (any::<usize>(), prop::bool::weighted(0.9)).prop_map(|(i, ok)| Op::Zeroed(i, ok)),
            1 => Just(Op::BeginFlush),
            1 => any::<usize>().prop_map(Op::FlushDone),
        ]
    }

    /// What the test knows about a cluster's history, independent of the allocator.
    #[derive(Clone, Copy, Debug, Default)]
    struct Truth {
        in_use: bool,
        /// Freed by a record in this block, not yet known durable.
        freed_seq: Option<u64>,
        /// Content is zero (a zeroing completed after the last use) ...
        zero_written_at: Option<u64>,
        /// ... and a flush begun after that zeroing completed.
        zero_durable: bool,
    }

    proptest! {
        #[test]
        fn never_hands_out_a_cluster_in_use_or_not_durably_zero(ops in prop::collection::vec(op(), 1..300), fresh in any::<bool>()) {
            let n = 12u32;
            let mut a = if fresh { Allocator::new_zeroed(n) } else { Allocator::from_in_use(n, [1, 5, 7]).expect("import") };
            let mut truth = vec![Truth { zero_durable: fresh, zero_written_at: fresh.then_some(0), ..Truth::default() }; n as usize];
            if !fresh {
                for c in [1, 5, 7] {
                    truth[c].in_use = true;
                }
            }
            let mut seq = 1u64;
            let mut clock = 1u64;
            let mut zeroing: Vec<u32> = Vec::new();
            let mut flushes: Vec<(FlushToken, u64)> = Vec::new();
            for op in ops {
                clock += 1;
                match op {
                    Op::Alloc => {
                        if let Some(c) = a.alloc() {
                            let t = &mut truth[c as usize];
                            prop_assert!(!t.in_use, "cluster {c} handed out twice");
                            prop_assert!(t.freed_seq.is_none(), "cluster {c} reused before its freeing record was durable");
                            prop_assert!(t.zero_durable, "cluster {c} handed out before it was durably zero");
                            t.in_use = true;
                            t.zero_durable = false;
                            t.zero_written_at = None;
                        } else {
                            prop_assert_eq!(a.counts().zeroed, 0);
                        }
                    }
                    Op::Free(i) => {
                        let used: Vec<u32> = (0..n).filter(|&c| truth[c as usize].in_use).collect();
                        if !used.is_empty() {
                            let c = used[i % used.len()];
                            seq += 1;
                            a.free(c, seq);
                            truth[c as usize] = Truth { freed_seq: Some(seq), ..Truth::default() };
                        }
                    }
                    Op::Durable(back) => {
                        let upto = seq.saturating_sub(back);
                        a.durable(upto);
                        for t in truth.iter_mut() {
                            if t.freed_seq.is_some_and(|s| s <= upto) {
                                t.freed_seq = None;
                            }
                        }
                    }
                    Op::TakeDirty(k, most_runs) => {
                        let runs = a.take_dirty_runs(k, most_runs);
                        prop_assert!(runs.len() <= most_runs);
                        prop_assert!(runs.iter().map(|r| r.1 as usize).sum::<usize>() <= k);
                        for (first, len) in runs {
                            prop_assert!(len > 0, "an empty run");
                            for c in first..first + len {
                                prop_assert!(truth[c as usize].freed_seq.is_none() && !truth[c as usize].in_use);
                                zeroing.push(c);
                            }
                        }
                    }
                    Op::Zeroed(i, ok) => {
                        if !zeroing.is_empty() {
                            let c = zeroing.swap_remove(i % zeroing.len());
                            a.zeroed(c, ok);
                            if ok {
                                truth[c as usize].zero_written_at = Some(clock);
                            }
                        }
                    }
                    Op::BeginFlush => flushes.push((a.begin_flush(), clock)),
                    Op::FlushDone(i) => {
                        if !flushes.is_empty() {
                            let (tok, began) = flushes.remove(i % flushes.len());
                            a.flush_done(tok);
                            for t in truth.iter_mut() {
                                if t.zero_written_at.is_some_and(|z| z < began) {
                                    t.zero_durable = true;
                                }
                            }
                        }
                    }
                }
                a.check().map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn import_refuses_impossible_maps_and_zeroes_everything_unreferenced() {
        assert!(Allocator::from_in_use(4, [9])
            .expect_err("past the end")
            .contains("past"));
        // A cluster listed twice is held by two leaves (a snapshot shares it).
        let mut shared = Allocator::from_in_use(4, [1, 1]).expect("shared");
        assert_eq!(shared.refs(1), 2);
        assert!(!shared.free(1, 1), "one leaf still holds it");
        assert!(shared.free(1, 1), "the last reference frees it");
        let mut a = Allocator::from_in_use(4, [2]).expect("import");
        assert_eq!(a.alloc(), None, "nothing is known zero after an import");
        assert_eq!(
            a.counts(),
            AllocCounts {
                zeroed: 0,
                in_use: 1,
                recycling: 3
            }
        );
        let d = a.take_dirty_runs(10, 8);
        assert_eq!(d, vec![(0, 2), (3, 1)], "consecutive clusters share a run");
        for (first, n) in d {
            for c in first..first + n {
                a.zeroed(c, true);
            }
        }
        let early = a.begin_flush();
        a.flush_done(early);
        assert_eq!(a.alloc(), Some(0));
        a.check().expect("consistent");
    }

    #[test]
    fn dirty_runs_stop_at_the_cluster_or_run_limit() {
        let mut a = Allocator::from_in_use(10, [4]).expect("import");
        assert_eq!(a.take_dirty_runs(3, 8), vec![(0, 3)]);
        assert_eq!(
            a.take_dirty_runs(10, 1),
            vec![(3, 1)],
            "one run: 3, then 5 starts another"
        );
        assert_eq!(a.take_dirty_runs(10, 8), vec![(5, 5)]);
        assert_eq!(a.take_dirty_runs(10, 8), vec![]);
        assert_eq!(a.counts().recycling, 9);
    }
}
