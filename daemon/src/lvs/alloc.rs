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
//! Free space that is durably zero survives a restart (FORMAT.md §5): beyond a window of
//! ready clusters, zeroed clusters become `Clean` and the pool journals them (a *zeroed*
//! record); a clean cluster is handed out only after a *withdrawn* record naming it was
//! written and flushed (`Withdrawing`), so the journal never calls a cluster zero that may
//! hold data. An import starts from the recorded clean set and zeroes only the rest of the
//! free space: the ready window, and what was freed since.
//!
//! ```text
//! ZeroedUnflushed --flush_done, window full--> Clean --begin_withdraw--> Withdrawing
//!                                                  ^                          |
//!                                                  +--withdrawn(failed)-------+--withdrawn--> Zeroed
//! ```
//!
//! Must never: hand out a cluster twice, or before it is durably zero. Memory: three bytes
//! per cluster (state and count) plus the queues and the clean runs (at most
//! [`MAX_CLEAN_RUNS`]).

use std::collections::{BTreeMap, VecDeque};

/// The most runs the clean set holds (memory and checkpoint space stay bounded: 8 bytes
/// per run in a checkpoint); a zeroed cluster that would start a run past it stays ready.
pub const MAX_CLEAN_RUNS: usize = 1 << 16;

/// A set of clusters as runs `first -> count` (disjoint, never adjacent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZeroRuns {
    runs: BTreeMap<u32, u32>,
    clusters: u64,
}

impl ZeroRuns {
    /// Clusters in the set.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    /// Runs in the set.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs `(first, count)`, ascending.
    pub fn runs(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.runs.iter().map(|(&f, &n)| (f, n))
    }

    /// Whether cluster `c` is in the set.
    pub fn contains(&self, c: u32) -> bool {
        self.runs
            .range(..=c)
            .next_back()
            .is_some_and(|(&f, &n)| u64::from(c) < u64::from(f) + u64::from(n))
    }

    /// Whether adding `[first, first + n)` to the set would start a new run.
    fn starts_run(&self, first: u32, n: u32) -> bool {
        let joins_before = self
            .runs
            .range(..=first)
            .next_back()
            .is_some_and(|(&f, &m)| u64::from(f) + u64::from(m) >= u64::from(first));
        let joins_after = first
            .checked_add(n)
            .and_then(|end| self.runs.range(..=end).next_back())
            .is_some_and(|(&f, _)| f >= first);
        !(joins_before || joins_after)
    }

    /// Adds `[first, first + n)` (parts already in the set are fine).
    pub fn add(&mut self, first: u32, n: u32) {
        if n == 0 {
            return;
        }
        let mut lo = u64::from(first);
        // Cluster numbers are u32 and below the pool's count (itself a u32).
        let mut hi = (lo + u64::from(n)).min(u64::from(u32::MAX));
        if hi <= lo {
            return;
        }
        // Absorb every run that overlaps or touches [lo, hi).
        let touching: Vec<(u32, u32)> = self
            .runs
            .range(..=u32::try_from(hi).unwrap_or(u32::MAX))
            .rev()
            .take_while(|(&f, &m)| u64::from(f) + u64::from(m) >= lo)
            .map(|(&f, &m)| (f, m))
            .collect();
        for (f, m) in touching {
            self.runs.remove(&f);
            self.clusters -= u64::from(m);
            lo = lo.min(u64::from(f));
            hi = hi.max(u64::from(f) + u64::from(m));
        }
        let first = u32::try_from(lo).expect("below the first added cluster");
        let n = u32::try_from(hi - lo).expect("runs of u32 clusters");
        self.runs.insert(first, n);
        self.clusters += u64::from(n);
    }

    /// Removes `[first, first + n)` (parts not in the set are fine).
    pub fn remove(&mut self, first: u32, n: u32) {
        let lo = u64::from(first);
        let hi = lo + u64::from(n);
        if n == 0 {
            return;
        }
        let hit: Vec<(u32, u32)> = self
            .runs
            .range(..u32::try_from(hi).unwrap_or(u32::MAX))
            .rev()
            .take_while(|(&f, &m)| u64::from(f) + u64::from(m) > lo)
            .map(|(&f, &m)| (f, m))
            .collect();
        for (f, m) in hit {
            let (f64_, end) = (u64::from(f), u64::from(f) + u64::from(m));
            if end <= lo || f64_ >= hi {
                continue;
            }
            self.runs.remove(&f);
            self.clusters -= u64::from(m);
            if f64_ < lo {
                self.runs
                    .insert(f, u32::try_from(lo - f64_).expect("part of a run"));
                self.clusters += lo - f64_;
            }
            if end > hi {
                let tail = u32::try_from(hi).expect("inside a run");
                self.runs
                    .insert(tail, u32::try_from(end - hi).expect("part of a run"));
                self.clusters += end - hi;
            }
        }
    }

    /// Takes up to `most` clusters from the lowest runs.
    fn take_front(&mut self, most: u64) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut left = most;
        while left > 0 {
            let Some((&f, &m)) = self.runs.iter().next() else {
                break;
            };
            let take = u32::try_from(left.min(u64::from(m))).expect("at most a run");
            self.remove(f, take);
            out.push((f, take));
            left -= u64::from(take);
        }
        out
    }
}

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
    /// Durably zero and in the clean set (journaled as such): not handed out until a
    /// withdrawn record naming it is durable.
    Clean = 6,
    /// A withdrawn record naming it is on its way to the journal and a flush.
    Withdrawing = 7,
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
    /// Clean or being withdrawn: durably zero free space, usable after a withdrawal.
    pub clean: u64,
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
    /// Clusters in state `Clean`.
    clean: ZeroRuns,
    /// Clusters in state `Withdrawing`.
    withdrawing: u64,
    /// Runs that became clean and whose zeroed records the pool has not journaled yet.
    new_clean: Vec<(u32, u32)>,
    /// Ready clusters to keep; past it, zeroed clusters become clean (0: never).
    window: u64,
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
        Self::from_import(clusters, in_use, &ZeroRuns::default()).map(|(a, _)| a)
    }

    /// An imported pool whose journal recorded `clean` clusters as durably zero and not
    /// handed out: they start clean; every other unreferenced cluster is zeroed again.
    /// Also returns how many recorded clean clusters are mapped (damage: they count as in
    /// use and leave the clean set).
    pub fn from_import(
        clusters: u32,
        in_use: impl IntoIterator<Item = u32>,
        clean: &ZeroRuns,
    ) -> Result<(Self, u64), String> {
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
        let mut mapped_clean = 0u64;
        for (first, n) in clean.runs() {
            let end = u64::from(first) + u64::from(n);
            if end > u64::from(clusters) {
                return Err(format!(
                    "clusters {first}..{end} recorded zero past the pool's {clusters}"
                ));
            }
            let mut run: Option<(u32, u32)> = None;
            for c in first..first + n {
                let s = &mut a.state[c as usize];
                if *s == ClusterState::InUse {
                    mapped_clean += 1;
                    continue;
                }
                *s = ClusterState::Clean;
                match &mut run {
                    Some((f, m)) if *f + *m == c => *m += 1,
                    _ => {
                        if let Some((f, m)) = run.take() {
                            a.clean.add(f, m);
                        }
                        run = Some((c, 1));
                    }
                }
            }
            if let Some((f, m)) = run {
                a.clean.add(f, m);
            }
        }
        a.dirty = (0..clusters)
            .filter(|&c| a.state[c as usize] == ClusterState::Dirty)
            .collect();
        Ok((a, mapped_clean))
    }

    /// Keeps `ready` clusters ready to hand out; zeroed clusters past that become clean
    /// (journaled, so an import need not zero them again).
    pub fn set_window(&mut self, ready: u64) {
        self.window = ready;
    }

    /// The clean set (what a checkpoint records as durably zero).
    pub fn clean(&self) -> &ZeroRuns {
        &self.clean
    }

    /// Runs that became clean since the last call: the pool journals them (zeroed
    /// records) before any withdrawn record it appends later.
    pub fn take_new_clean(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.new_clean)
    }

    /// Whether the ready queue runs low while clean clusters wait (and no withdrawal is
    /// under way).
    pub fn wants_withdraw(&self) -> bool {
        self.withdrawing == 0
            && !self.clean.is_empty()
            && (self.zeroed.len() as u64) < self.window.div_ceil(2).max(1)
    }

    /// Takes clean clusters (lowest first) to refill the ready window: the pool journals a
    /// withdrawn record naming these runs, flushes, then calls [`withdrawn`](Self::withdrawn).
    pub fn begin_withdraw(&mut self) -> Vec<(u32, u32)> {
        let want = self
            .window
            .max(1)
            .saturating_sub(self.zeroed.len() as u64)
            .max(1);
        let runs = self.clean.take_front(want);
        for &(f, n) in &runs {
            for c in f..f + n {
                self.state[c as usize] = ClusterState::Withdrawing;
            }
            self.withdrawing += u64::from(n);
        }
        runs
    }

    /// The withdrawn record for `runs` is durable (`ok`): they are ready. Otherwise they
    /// stay clean (still zero, never handed out).
    pub fn withdrawn(&mut self, runs: &[(u32, u32)], ok: bool) {
        for &(f, n) in runs {
            for c in f..f + n {
                let s = &mut self.state[c as usize];
                assert_eq!(
                    *s,
                    ClusterState::Withdrawing,
                    "withdrawal of cluster {c} in state {s:?}"
                );
                if ok {
                    *s = ClusterState::Zeroed;
                    self.zeroed.push_back(c);
                } else {
                    *s = ClusterState::Clean;
                }
            }
            self.withdrawing -= u64::from(n);
            if !ok {
                self.clean.add(f, n);
            }
        }
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
            clean: ZeroRuns::default(),
            withdrawing: 0,
            new_clean: Vec::new(),
            window: 0,
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
        let clean = self.clean.clusters() + self.withdrawing;
        AllocCounts {
            zeroed,
            in_use: self.in_use,
            recycling: total - zeroed - self.in_use - clean,
            clean,
        }
    }

    /// Hands out a durably zero cluster. `None` with `recycling > 0` or `clean > 0` means
    /// "wait for the pipeline"; `None` with neither means the pool is full (ENOSPC).
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
            let keep_ready = (self.zeroed.len() as u64) < self.window
                || self.window == 0
                || (self.clean.len() >= MAX_CLEAN_RUNS && self.clean.starts_run(c, 1));
            if keep_ready {
                self.state[c as usize] = ClusterState::Zeroed;
                self.zeroed.push_back(c);
                continue;
            }
            self.state[c as usize] = ClusterState::Clean;
            self.clean.add(c, 1);
            match self.new_clean.last_mut() {
                Some((f, n)) if *f + *n == c => *n += 1,
                _ => self.new_clean.push((c, 1)),
            }
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
        for (f, n) in self.clean.runs() {
            for c in f..f + n {
                mark(c, ClusterState::Clean, "the clean set")?;
            }
        }
        let mut zeroing = 0;
        let mut in_use = 0;
        let mut withdrawing = 0;
        for (i, s) in self.state.iter().enumerate() {
            match s {
                ClusterState::InUse => in_use += 1,
                ClusterState::Zeroing => zeroing += 1,
                ClusterState::Withdrawing => withdrawing += 1,
                _ if seen[i] != 1 => {
                    return Err(format!(
                        "cluster {i} in state {s:?} is on {} queues",
                        seen[i]
                    ))
                }
                _ => {}
            }
        }
        if in_use != self.in_use || zeroing != self.zeroing || withdrawing != self.withdrawing {
            return Err(format!(
                "counts: in use {in_use} vs {}, zeroing {zeroing} vs {}, withdrawing {withdrawing} vs {}",
                self.in_use, self.zeroing, self.withdrawing
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
        /// Journal the new clean runs, then begin a withdrawal (as the pool does).
        Withdraw,
        WithdrawDone(usize, bool),
        Journal,
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
            1 => Just(Op::Withdraw),
            1 => (any::<usize>(), prop::bool::weighted(0.9)).prop_map(|(i, ok)| Op::WithdrawDone(i, ok)),
            1 => Just(Op::Journal),
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
        fn never_hands_out_a_cluster_in_use_or_not_durably_zero(ops in prop::collection::vec(op(), 1..300), fresh in any::<bool>(), window in 0u64..6, clean_mask in any::<u16>()) {
            let n = 12u32;
            // What the journal says is clean, as an import would replay it.
            let mut journal = ZeroRuns::default();
            if !fresh {
                for c in 0..n {
                    if clean_mask & (1 << c) != 0 {
                        journal.add(c, 1);
                    }
                }
            }
            let mut a = if fresh {
                Allocator::new_zeroed(n)
            } else {
                let (a, mapped) = Allocator::from_import(n, [1, 5, 7], &journal).expect("import");
                let want = [1u32, 5, 7].iter().filter(|&&c| journal.contains(c)).count() as u64;
                prop_assert_eq!(mapped, want, "recorded clean but mapped");
                for c in [1, 5, 7] {
                    journal.remove(c, 1);
                }
                a
            };
            a.set_window(window);
            let mut truth = vec![Truth { zero_durable: fresh, zero_written_at: fresh.then_some(0), ..Truth::default() }; n as usize];
            if !fresh {
                for c in [1, 5, 7] {
                    truth[c].in_use = true;
                }
                for c in 0..n {
                    if journal.contains(c) {
                        prop_assert_eq!(a.state(c), ClusterState::Clean);
                        truth[c as usize] = Truth { zero_durable: true, zero_written_at: Some(0), ..Truth::default() };
                    }
                }
            }
            let mut withdrawals: Vec<Vec<(u32, u32)>> = Vec::new();
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
                    Op::Withdraw => {
                        for (f, m) in a.take_new_clean() {
                            journal.add(f, m);
                        }
                        if a.wants_withdraw() {
                            let runs = a.begin_withdraw();
                            prop_assert!(!runs.is_empty());
                            for &(f, m) in &runs {
                                journal.remove(f, m);
                            }
                            withdrawals.push(runs);
                        }
                    }
                    Op::WithdrawDone(i, ok) => {
                        if !withdrawals.is_empty() {
                            let runs = withdrawals.remove(i % withdrawals.len());
                            a.withdrawn(&runs, ok);
                            if !ok {
                                // Still zero and never handed out: the next checkpoint may
                                // record it clean again.
                                for &(f, m) in &runs {
                                    journal.add(f, m);
                                }
                            }
                        }
                    }
                    Op::Journal => {
                        for (f, m) in a.take_new_clean() {
                            journal.add(f, m);
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
                for (f, m) in journal.runs() {
                    for c in f..f + m {
                        let t = truth[c as usize];
                        prop_assert!(t.zero_durable && !t.in_use, "cluster {c} journaled clean but {t:?}");
                    }
                }
                let cn = a.counts();
                prop_assert_eq!(cn.zeroed + cn.in_use + cn.recycling + cn.clean, u64::from(n));
            }
        }

        #[test]
        fn zero_runs_equal_a_set(ops in prop::collection::vec((any::<bool>(), 0u32..40, 0u32..8), 1..60)) {
            let mut z = ZeroRuns::default();
            let mut model = std::collections::BTreeSet::new();
            for (add, first, len) in ops {
                if add {
                    z.add(first, len);
                    model.extend(first..first + len);
                } else {
                    z.remove(first, len);
                    for c in first..first + len {
                        model.remove(&c);
                    }
                }
                let got: Vec<u32> = z.runs().flat_map(|(f, m)| f..f + m).collect();
                prop_assert_eq!(&got, &model.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(z.clusters(), model.len() as u64);
                let runs: Vec<(u32, u32)> = z.runs().collect();
                for w in runs.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "runs {:?} touch or overlap", w);
                }
                for c in 0..50 {
                    prop_assert_eq!(z.contains(c), model.contains(&c));
                }
            }
        }
    }

    #[test]
    fn clean_clusters_need_a_withdrawal_and_runs_are_bounded() {
        let mut a = Allocator::from_in_use(8, []).expect("import");
        a.set_window(2);
        let d = a.take_dirty_runs(8, 8);
        assert_eq!(d, vec![(0, 8)]);
        for c in 0..8 {
            a.zeroed(c, true);
        }
        let t = a.begin_flush();
        a.flush_done(t);
        assert_eq!(a.counts().zeroed, 2, "the window");
        assert_eq!(a.counts().clean, 6);
        assert_eq!(a.take_new_clean(), vec![(2, 6)]);
        assert_eq!(a.alloc(), Some(0));
        assert!(!a.wants_withdraw(), "one ready: half the window of 2");
        assert_eq!(a.alloc(), Some(1));
        assert!(a.wants_withdraw(), "none ready");
        let w = a.begin_withdraw();
        assert_eq!(w, vec![(2, 2)], "refills the window, lowest first");
        assert!(!a.wants_withdraw(), "one withdrawal at a time");
        assert_eq!(a.alloc(), None, "withdrawn clusters wait for their record");
        assert!(a.counts().clean > 0, "so the caller waits, not ENOSPC");
        a.withdrawn(&w, true);
        assert_eq!(a.alloc(), Some(2));
        a.check().expect("consistent");
        // A clean set fragmented to the limit keeps further clusters ready.
        let mut z = ZeroRuns::default();
        for i in 0..4u32 {
            z.add(i * 2, 1);
        }
        assert!(z.starts_run(100, 1));
        assert!(!z.starts_run(1, 1), "joins 0 and 2");
        assert!(!z.starts_run(7, 1), "extends 6");
        z.add(20, 1);
        assert!(!z.starts_run(17, 3), "ends where 20 begins");
        assert!(z.starts_run(16, 3), "16..19 stops short of 20");
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
                recycling: 3,
                clean: 0,
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
