//! Thin volumes, snapshots and clones on a running pool: the pool's owner-reactor state
//! ([`PoolRt`]) and the IO path of a volume ([`VolumeChannel`]).
//!
//! - Reads: mapped clusters read the device, unmapped ones read zeroes without IO.
//! - Writes to mapped clusters held by this volume alone go straight to the device: no
//!   metadata (DESIGN §4 inv. 4).
//! - A write to an unmapped cluster allocates a durably-zero cluster, writes the data into
//!   it, then appends a map record; the write is acknowledged when the record's journal
//!   write completed (group commit shares it). A FUA write also flushes. Writes to a
//!   cluster whose allocation is in flight wait for it.
//! - A write to a cluster shared with a snapshot or clone (its map leaf is shared, or the
//!   cluster is held by another leaf) copies first: a whole-cluster write goes to a new
//!   cluster; a partial one copies the old cluster up (read, write to a new cluster with
//!   FUA — the copy must survive power loss before its record does), then writes in place.
//! - FLUSH is the journal's flush. Discard and write-zeroes unmap whole clusters (freed
//!   when no map holds them); write-zeroes writes zeroes into partial ones; discard leaves
//!   partial ranges alone and never allocates.
//! - Snapshots, clones, rollback and delete *freeze* the volumes they read or replace:
//!   new write-type requests park, and the operation runs once those in flight finished,
//!   so a snapshot holds exactly the writes acknowledged before it and none after.
//! - Checkpoints (`checkpoint.rs`) are written when the journal ring is half used.
//!
//! - Every reactor serves IO: on the owner through [`PoolRt::open_volume`], elsewhere
//!   through a [`VolumeHandle`] ([`RemoteChannel`]). A remote channel reads on its own
//!   reactor — a lock-free map lookup, then its own device channel — inside a grace period
//!   ([`Grace`]) that keeps the owner from zeroing and reusing a cluster, or freeing a map
//!   leaf, that such a read may still use. Writes, discards, write-zeroes and flushes go to
//!   the owner as messages (they may allocate, copy or journal) and complete back on the
//!   origin reactor. Next: overwrites of clusters the volume holds alone in place on the
//!   serving reactor (needs the freeze to reach every reactor).
//!
//! IOs that span several clusters are split and completed when every part has.
//!
//! Must never: acknowledge an allocating write before its map record is written, map a
//! cluster that is not durably zero, write into a cluster another map holds, or free a
//! cluster while an IO that found it through a mapping is still in flight (it could land
//! after the cluster was zeroed and reused).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::alloc::Allocator;
use super::format::{Record, Superblock};
use super::journal::{Journal, JournalStats};
use super::map::{ClusterMap, LeafRetire, Mapping, RetiredLeaves, LEAF_ENTRIES};
use super::pool::{
    volume_clusters, Imported, Maps, VolumeMeta, VolumeRecord, VolumeTable, MAX_VOLUMES,
};
use super::qos::{self, Limiter, QosLimits, QosStats, Throttled};
use super::table::Lineage;
use crate::bdev::{BlockDevice, Channel, Geometry, Io, ReqTable};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, Remote};

/// How often the owner reactor drives the free-cluster pipeline.
const RECYCLE_PERIOD: Duration = Duration::from_millis(5);
/// Most write-zeroes in flight per pipeline round: well below a reactor's request slots
/// (1024 by default), so IO never finds the table full because of re-zeroing.
const ZERO_BATCH: usize = 256;
/// Most bytes zeroed per pipeline round (runs of consecutive clusters share one
/// write-zeroes): a fresh or re-imported pool of small clusters is zeroed in MiB-sized
/// commands, not one per 4 KiB cluster.
const ZERO_BATCH_BYTES: u64 = 16 << 20;
/// Most writes waiting for a cluster while the pipeline recycles (then ENOSPC). Each
/// waiter is a request in flight, bounded by the reactors' request slots and the exports'
/// queue depths, so this is a backstop writes do not reach: after an import every free
/// cluster is zeroed again while the pool already serves (the control plane waits at most
/// a second for it), and first writes wait for zeroed clusters instead of failing (4096
/// here made a busy node's writes fail with ENOSPC after a daemon restart).
const MAX_ALLOC_WAITERS: usize = 1 << 16;
/// Checkpoint bytes per write.
const CKPT_CHUNK: usize = 1 << 20;

type Parked = Box<dyn FnOnce(&Reactor)>;
/// Answer of a control operation on the owner reactor.
pub type Reply<T> = Box<dyn FnOnce(&Reactor, Result<T, String>)>;

/// Makes an object's new control record from its current one ([`PoolRt::update_control`]).
pub type ControlUpdate = Box<dyn FnOnce(Option<&[u8]>) -> Result<Vec<u8>, String> + Send>;
type IoDone = Box<dyn FnOnce(&Reactor, IoResult, Option<IoBuf>)>;
type StepDone = Box<dyn FnOnce(&Reactor, Result<(), Errno>)>;
/// Sources to freeze, records to commit, new ids.
type Derivation = (Vec<Rc<VolRt>>, Vec<VolumeRecord>, Vec<u32>);

/// A continuation that runs at most once.
struct Once(RefCell<Option<Parked>>);

impl Once {
    fn run(&self, rx: &Reactor) {
        if let Some(f) = self.0.borrow_mut().take() {
            f(rx);
        }
    }
}

/// Space of a pool, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Data clusters × cluster size.
    pub capacity_bytes: u64,
    /// Not held by any map (ready, or on its way back through the zeroing pipeline).
    pub free_bytes: u64,
    /// Held by at least one map.
    pub allocated_bytes: u64,
    /// Sum of the volumes' sizes (snapshots excluded).
    pub provisioned_bytes: u64,
    /// Freed by deletes, discards and copy-on-write, not yet zeroed and reusable.
    pub recycling_bytes: u64,
    /// Held back for thick volumes (counts as used: `free_bytes` excludes it).
    pub reserved_bytes: u64,
    /// Overcommit limit × 1000: provisioned ≤ limit × capacity.
    pub overcommit_milli: u32,
    /// Volumes (incl. clones).
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
}

/// Why a served pool is degraded ([`PoolRt::health`]): reads and overwrites of mapped
/// clusters still work, metadata changes do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Degraded {
    /// A journal write failed: every metadata change (allocating writes, creates,
    /// snapshots, deletes) fails with EIO until the pool is imported again.
    JournalFailed,
    /// The last checkpoint failed: once the journal ring is full, metadata changes fail
    /// with ENOSPC; the next checkpoint that succeeds clears it.
    CheckpointFailed,
}

impl Degraded {
    /// What happened and what to do, for the API and the log.
    pub fn message(self) -> &'static str {
        match self {
            Self::JournalFailed => {
                "a journal write failed: the pool takes no metadata change (allocating \
                 writes, creates, snapshots, deletes fail with EIO); check the device \
                 (kernel log, SMART) and restart coreblkd to import the pool again"
            }
            Self::CheckpointFailed => {
                "the last metadata checkpoint failed: metadata changes fail with ENOSPC once \
                 the journal is full; check the device (kernel log, SMART); the next \
                 checkpoint that succeeds clears this"
            }
        }
    }
}

/// Space of one volume or snapshot, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectUsage {
    /// Mapped clusters × cluster size.
    pub allocated_bytes: u64,
    /// Clusters only this object holds: what deleting it would free.
    pub unique_bytes: u64,
}

/// Store counters (metrics, tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Bytes of the last checkpoint.
    pub last_checkpoint_bytes: u64,
    /// Clusters copied up for copy-on-write (partial writes to shared clusters, inflate).
    pub copy_ups: u64,
    /// Allocating writes into new clusters (first writes and whole-cluster copy-on-write).
    pub allocations: u64,
}

/// A volume or snapshot on the owner reactor.
struct VolRt {
    id: u32,
    map: Arc<ClusterMap>,
    snapshot: bool,
    size: Cell<u64>,
    /// Write-type requests (and inflate steps) in flight.
    writes: Cell<u32>,
    /// Freezes held: new write-type requests park while > 0.
    frozen: Cell<u32>,
    parked: RefCell<Vec<Parked>>,
    /// Run when `writes` drops to 0.
    drained: RefCell<Vec<Parked>>,
    deleted: Cell<bool>,
    /// Size and deletion as other reactors see them.
    shared: Arc<VolShared>,
    /// Thick: clusters are reserved so it can always be written whole.
    thick: bool,
    /// Clusters held back for it: at least the number of its logical clusters that a
    /// write would need a new cluster for (unmapped, or shared with a snapshot).
    reserve: Cell<u64>,
}

impl VolRt {
    fn new(id: u32, map: Arc<ClusterMap>, snapshot: bool, size: u64) -> Rc<Self> {
        Rc::new(Self {
            id,
            shared: Arc::new(VolShared {
                size: AtomicU64::new(size),
                deleted: AtomicBool::new(false),
                qos: Arc::default(),
            }),
            thick: false,
            reserve: Cell::new(0),
            map,
            snapshot,
            size: Cell::new(size),
            writes: Cell::new(0),
            frozen: Cell::new(0),
            parked: RefCell::new(Vec::new()),
            drained: RefCell::new(Vec::new()),
            deleted: Cell::new(false),
        })
    }

    fn write_end(&self, rx: &Reactor) {
        self.writes.set(self.writes.get() - 1);
        if self.writes.get() == 0 {
            let d = std::mem::take(&mut *self.drained.borrow_mut());
            for f in d {
                f(rx);
            }
        }
    }
}

/// The pool on its owner reactor.
pub struct PoolRt {
    me: Weak<PoolRt>,
    owner: usize,
    /// Geometry (never changes while running).
    sb: Superblock,
    /// The superblock as last written (checkpoint fields, generation).
    live: RefCell<Superblock>,
    data: Rc<dyn Channel>,
    journal: Rc<Journal>,
    alloc: RefCell<Allocator>,
    table: RefCell<VolumeTable>,
    vols: RefCell<BTreeMap<u32, Rc<VolRt>>>,
    /// Allocations in flight, with the writes waiting for each.
    allocating: RefCell<IntMap<(u32, u64), Vec<Parked>>>,
    /// Writes waiting for the pipeline to produce a zeroed cluster.
    alloc_waiters: RefCell<Vec<Parked>>,
    /// Data IOs in flight per physical cluster: a cluster is not freed (so never zeroed and
    /// reused) while an IO that looked it up is still on its way to or from it.
    pc_inflight: RefCell<IntMap<u32, u32>>,
    /// Frees waiting for a cluster's in-flight IOs: cluster → journal seq of the record.
    deferred_free: RefCell<IntMap<u32, u64>>,
    recycling: Cell<bool>,
    /// A pipeline round is scheduled on the reactor's timers.
    scheduled: Cell<bool>,
    ckpt_scheduled: Cell<bool>,
    ckpt_running: Cell<bool>,
    /// The last checkpoint failed (cleared by the next one that succeeds).
    ckpt_failed: Cell<bool>,
    ckpt_waiters: RefCell<Vec<Reply<()>>>,
    stats: Cell<StoreStats>,
    /// The volumes' logical block size.
    lbs: u32,
    dev: Arc<dyn BlockDevice>,
    /// Readers on other reactors, and what waits for them (see [`Grace`]).
    grace: Arc<Grace>,
    /// The grace period running: its parity, the journal sequence it covers, and the
    /// leaves retired before it.
    grace_wait: RefCell<Option<(usize, u64, RetiredLeaves)>>,
    /// Frees recorded up to this journal sequence are past a grace period.
    grace_upto: Cell<u64>,
    leaf_retire: Arc<LeafRetire>,
    /// The owner's own channels of volumes, serving forwarded requests.
    owner_chans: RefCell<HashMap<u32, Rc<dyn Channel>>>,
    /// Sum of the thick volumes' reserves.
    reserved: Cell<u64>,
    /// References dropped by records not yet durable: (journal seq, cluster). Applied
    /// once a flush covers the record — until then the cluster counts as shared, so no
    /// one writes it in place (power loss could bring the dropped reference back).
    unrefs: RefCell<std::collections::VecDeque<(u64, u32)>>,
    /// Maps let go of by records not yet durable (deletes, rollbacks): they keep their
    /// leaves (so what they shared stays shared) until a flush covers the record.
    zombies: RefCell<Vec<(u64, Arc<ClusterMap>, bool)>>,
    /// A control operation (create, delete, snapshot, clone, rollback, resize, labels,
    /// settings) is running; the others wait here, so none checks the table while
    /// another's record is on its way (two could journal contradictory records, and
    /// replay would refuse the pool).
    ctl_busy: Cell<bool>,
    ctl_queue: RefCell<std::collections::VecDeque<Parked>>,
    /// Clusters allocated from a thick volume's reserve and not mapped yet (an abandoned
    /// one gives its unit back; others do not).
    from_reserve: RefCell<HashSet<u32>>,
}

impl Drop for PoolRt {
    fn drop(&mut self) {
        let key = self.sb.pool_uuid;
        let _ = OWNED.try_with(|o| o.borrow_mut().remove(&key));
    }
}

impl fmt::Debug for PoolRt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRt")
            .field("owner", &self.owner)
            .field("objects", &self.vols.borrow().len())
            .field("alloc", &self.alloc.borrow().counts())
            .finish()
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PoolRt {
    /// Starts an imported pool on this reactor (its owner). `dev` is the pool's device.
    pub fn start(
        rx: &Reactor,
        dev: &Arc<dyn BlockDevice>,
        imp: Imported,
    ) -> Result<Rc<Self>, String> {
        let data = dev
            .open_channel(rx)
            .map_err(|e| format!("opening {}: {e}", dev.name()))?;
        let journal_ch = dev
            .open_channel(rx)
            .map_err(|e| format!("opening {}: {e}", dev.name()))?;
        let clusters =
            u32::try_from(imp.sb.clusters).map_err(|_| "too many clusters".to_string())?;
        // A cluster's references are the distinct leaves holding it.
        let mut in_use = Vec::new();
        let mut seen = HashSet::new();
        for m in imp.maps.values() {
            for (index, key) in m.leaf_ids() {
                if seen.insert(key) {
                    let base = (index * LEAF_ENTRIES) as u64;
                    for lc in base..(base + LEAF_ENTRIES as u64).min(m.len()) {
                        if let Some(x) = m.get(lc) {
                            in_use.push(x.pc);
                        }
                    }
                }
            }
        }
        let (mut alloc, mapped_zeroed) =
            Allocator::from_import(clusters, in_use, &imp.table.zeroed)?;
        if mapped_zeroed > 0 {
            tracing::warn!(
                clusters = mapped_zeroed,
                "clusters recorded zero are mapped: they count as in use (run coreblkd verify)"
            );
        }
        alloc.set_window(ready_window(imp.sb.clusters, imp.sb.cluster_bytes));
        let mut imp = imp;
        imp.table.zeroed = Default::default();
        let torn_tail = std::mem::take(&mut imp.torn_tail);
        let lbs = dev
            .geometry()
            .logical_block_size
            .max(imp.sb.logical_block_bytes);
        let leaf_retire = LeafRetire::new();
        let mut vols = BTreeMap::new();
        for (id, map) in imp.maps {
            map.set_retire(Arc::clone(&leaf_retire));
            let (snapshot, size) = match (imp.table.volumes.get(&id), imp.table.snapshots.get(&id))
            {
                (Some(v), _) => (false, v.size_bytes),
                (None, Some(s)) => (true, s.size_bytes),
                (None, None) => return Err(format!("map of unknown id {id}")),
            };
            let mut v = VolRt::new(id, map, snapshot, size);
            if imp.table.volumes.get(&id).is_some_and(|m| m.thick) {
                Rc::get_mut(&mut v).expect("not shared yet").thick = true;
            }
            vols.insert(id, v);
        }
        let rt = Rc::new_cyclic(|me| Self {
            me: me.clone(),
            owner: rx.id(),
            journal: Journal::new(journal_ch, imp.sb.clone(), imp.next_seq),
            live: RefCell::new(imp.sb.clone()),
            sb: imp.sb,
            data,
            alloc: RefCell::new(alloc),
            table: RefCell::new(imp.table),
            vols: RefCell::new(vols),
            allocating: RefCell::new(IntMap::default()),
            alloc_waiters: RefCell::new(Vec::new()),
            pc_inflight: RefCell::new(IntMap::default()),
            deferred_free: RefCell::new(IntMap::default()),
            recycling: Cell::new(false),
            scheduled: Cell::new(false),
            ckpt_scheduled: Cell::new(false),
            ckpt_running: Cell::new(false),
            ckpt_failed: Cell::new(false),
            ckpt_waiters: RefCell::new(Vec::new()),
            stats: Cell::new(StoreStats::default()),
            lbs,
            dev: Arc::clone(dev),
            grace: Arc::new(Grace::default()),
            grace_wait: RefCell::new(None),
            grace_upto: Cell::new(0),
            leaf_retire,
            owner_chans: RefCell::new(HashMap::new()),
            reserved: Cell::new(0),
            unrefs: RefCell::new(std::collections::VecDeque::new()),
            zombies: RefCell::new(Vec::new()),
            ctl_busy: Cell::new(false),
            ctl_queue: RefCell::new(std::collections::VecDeque::new()),
            from_reserve: RefCell::new(HashSet::new()),
        });
        OWNED.with(|o| o.borrow_mut().insert(rt.sb.pool_uuid, Rc::downgrade(&rt)));
        rt.recompute_reserves();
        let weak = rt.me.clone();
        rt.journal.set_pressure_hook(Rc::new(move |rx: &Reactor| {
            if let Some(rt) = weak.upgrade() {
                rt.schedule_checkpoint(rx);
            }
        }));
        rt.journal.fence(rx, &torn_tail);
        rt.kick_recycle(rx);
        Ok(rt)
    }

    fn rc(&self) -> Rc<PoolRt> {
        self.me
            .upgrade()
            .expect("the pool runtime lives while it has work")
    }

    fn bump(&self, f: impl FnOnce(&mut StoreStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Allocator counts (accounting).
    pub fn alloc_counts(&self) -> super::alloc::AllocCounts {
        self.alloc.borrow().counts()
    }

    /// Journal counters.
    pub fn journal_stats(&self) -> JournalStats {
        self.journal.stats()
    }

    /// Store counters.
    pub fn stats(&self) -> StoreStats {
        self.stats.get()
    }

    /// The volume table (volumes, snapshots, lineage).
    pub fn volumes(&self) -> VolumeTable {
        self.table.borrow().clone()
    }

    /// Bytes per cluster.
    pub fn cluster_bytes(&self) -> u64 {
        u64::from(self.sb.cluster_bytes)
    }

    /// The pool's superblock as last written.
    pub fn superblock(&self) -> Superblock {
        self.live.borrow().clone()
    }

    /// Why the pool is degraded, if it is: served, but metadata changes fail.
    pub fn health(&self) -> Option<Degraded> {
        if self.journal.has_failed() {
            Some(Degraded::JournalFailed)
        } else if self.ckpt_failed.get() {
            Some(Degraded::CheckpointFailed)
        } else {
            None
        }
    }

    /// Space of the pool.
    pub fn usage(&self) -> PoolUsage {
        let c = self.alloc.borrow().counts();
        let cl = self.cluster_bytes();
        let t = self.table.borrow();
        PoolUsage {
            capacity_bytes: self.sb.clusters * cl,
            free_bytes: (c.zeroed + c.recycling + c.clean).saturating_sub(self.reserved.get()) * cl,
            allocated_bytes: c.in_use * cl,
            provisioned_bytes: t.volumes.values().map(|v| v.size_bytes).sum(),
            recycling_bytes: c.recycling * cl,
            reserved_bytes: self.reserved.get() * cl,
            overcommit_milli: t.overcommit(),
            volumes: t.volumes.len() as u64,
            snapshots: t.snapshots.len() as u64,
        }
    }

    /// Space of volume or snapshot `id` (a scan of its map).
    pub fn object_usage(&self, id: u32) -> Option<ObjectUsage> {
        let v = self.vols.borrow().get(&id).cloned()?;
        let a = self.alloc.borrow();
        let (mut mapped, mut unique) = (0u64, 0u64);
        v.map.for_each_shared(|_, m, shared| {
            mapped += 1;
            if !shared && a.refs(m.pc) == 1 {
                unique += 1;
            }
        });
        let cl = self.cluster_bytes();
        Some(ObjectUsage {
            allocated_bytes: mapped * cl,
            unique_bytes: unique * cl,
        })
    }

    /// Resident bytes of metadata: maps (shared leaves divided among their maps) and the
    /// allocator's per-cluster state.
    pub fn metadata_memory_bytes(&self) -> u64 {
        let maps: usize = self
            .vols
            .borrow()
            .values()
            .map(|v| v.map.memory_bytes())
            .sum();
        maps as u64 + self.sb.clusters * 3
    }

    /// Byte ranges whose contents differ between `from` and `to` (two objects of the pool,
    /// usually snapshots of one lineage), at cluster granularity; with `from = None`, the
    /// mapped ranges of `to` (what a sparse export sends). Leaves both maps share are
    /// skipped without a look at their entries.
    pub fn diff(&self, from: Option<u32>, to: u32) -> Result<Vec<(u64, u64)>, String> {
        let vols = self.vols.borrow();
        let t = vols
            .get(&to)
            .ok_or_else(|| format!("no volume or snapshot with id {to}"))?;
        let f = match from {
            Some(id) => Some(
                vols.get(&id)
                    .ok_or_else(|| format!("no volume or snapshot with id {id}"))?,
            ),
            None => None,
        };
        let cl = self.cluster_bytes();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |lc: u64| {
            let off = lc * cl;
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += cl,
                _ => out.push((off, cl)),
            }
        };
        match f {
            None => t.map.for_each(|lc, _| push(lc)),
            Some(f) => {
                let n = t.map.len().max(f.map.len());
                let leaves = usize::try_from(n.div_ceil(LEAF_ENTRIES as u64)).unwrap_or(0);
                for li in 0..leaves {
                    if t.map.same_leaf(&f.map, li) {
                        continue;
                    }
                    let base = (li * LEAF_ENTRIES) as u64;
                    for lc in base..(base + LEAF_ENTRIES as u64).min(n) {
                        if t.map.get(lc) != f.map.get(lc) {
                            push(lc);
                        }
                    }
                }
            }
        }
        // Clip the last range to the object's size.
        let size = t.size.get();
        out.retain(|(o, _)| *o < size);
        if let Some((o, l)) = out.last_mut() {
            *l = (*l).min(size - *o);
        }
        Ok(out)
    }

    /// Clusters free for thin allocations (ready, clean or recycling, minus the reserves).
    fn unreserved(&self) -> u64 {
        let c = self.alloc.borrow().counts();
        (c.zeroed + c.recycling + c.clean).saturating_sub(self.reserved.get())
    }

    /// Sets `v`'s reserve (thick volumes), keeping the pool's sum.
    fn set_reserve(&self, v: &VolRt, r: u64) {
        self.reserved.set(self.reserved.get() - v.reserve.get() + r);
        v.reserve.set(r);
    }

    /// Clusters a write to every block of `v` would need now: its logical clusters that
    /// are unmapped or shared.
    fn needed(&self, v: &VolRt) -> u64 {
        let a = self.alloc.borrow();
        let mut alone = 0u64;
        v.map.for_each_shared(|_, m, shared| {
            if !shared && a.refs(m.pc) == 1 {
                alone += 1;
            }
        });
        volume_clusters(v.size.get(), self.sb.cluster_bytes) - alone
    }

    /// Recomputes every thick volume's reserve (start, after a snapshot delete).
    fn recompute_reserves(&self) {
        let vols: Vec<Rc<VolRt>> = self
            .vols
            .borrow()
            .values()
            .filter(|v| v.thick)
            .cloned()
            .collect();
        for v in vols {
            let n = self.needed(&v);
            self.set_reserve(&v, n);
        }
    }

    /// Checks that `extra` more reserved clusters fit the pool.
    fn check_reserve(&self, extra: u64, what: &str) -> Result<(), String> {
        let free = self.unreserved();
        if extra > free {
            return Err(format!(
                "no space: {what} needs {} bytes reserved, the pool has {} unreserved bytes free",
                extra * self.cluster_bytes(),
                free * self.cluster_bytes()
            ));
        }
        Ok(())
    }

    /// Checks that thick volumes among `vols` can be topped up to a full reserve (a
    /// snapshot, clone or rollback makes all their clusters shared).
    fn check_top_up(&self, vols: &[Rc<VolRt>]) -> Result<(), String> {
        let extra: u64 = vols
            .iter()
            .filter(|v| v.thick)
            .map(|v| volume_clusters(v.size.get(), self.sb.cluster_bytes) - v.reserve.get())
            .sum();
        self.check_reserve(extra, "keeping the thick volume writable whole after this")
    }

    /// Checks the overcommit limit for `extra` more provisioned bytes.
    fn check_provision(&self, extra: u64) -> Result<(), String> {
        let t = self.table.borrow();
        let provisioned: u64 = t.volumes.values().map(|v| v.size_bytes).sum();
        let limit =
            u128::from(self.sb.clusters * self.cluster_bytes()) * u128::from(t.overcommit()) / 1000;
        if u128::from(provisioned) + u128::from(extra) > limit {
            return Err(format!(
                "no space: provisioning {extra} more bytes would exceed the pool's overcommit limit ({}.{:03} × capacity = {limit} bytes; {provisioned} provisioned): raise the limit or free space",
                t.overcommit() / 1000,
                t.overcommit() % 1000
            ));
        }
        Ok(())
    }

    /// Runs control operation `op` once the ones before it finished.
    fn serialized<T: 'static>(
        &self,
        rx: &Reactor,
        done: Reply<T>,
        op: impl FnOnce(&Reactor, Reply<T>) + 'static,
    ) {
        let rt = self.rc();
        let run: Parked = Box::new(move |rx: &Reactor| {
            let rt2 = Rc::clone(&rt);
            op(
                rx,
                Box::new(move |rx: &Reactor, r: Result<T, String>| {
                    done(rx, r);
                    rt2.ctl_next(rx);
                }),
            );
        });
        if self.ctl_busy.replace(true) {
            self.ctl_queue.borrow_mut().push_back(run);
        } else {
            run(rx);
        }
    }

    fn ctl_next(&self, rx: &Reactor) {
        let next = self.ctl_queue.borrow_mut().pop_front();
        match next {
            Some(op) => op(rx),
            None => self.ctl_busy.set(false),
        }
    }

    /// Sets the pool's overcommit limit (× 1000, at least 1000).
    pub fn set_overcommit(&self, rx: &Reactor, overcommit_milli: u32, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.set_overcommit_now(rx, overcommit_milli, done)
        });
    }

    /// Creates a volume (by journal record); `done` gets its id.
    pub fn create_volume(&self, rx: &Reactor, meta: VolumeMeta, done: Reply<u32>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.create_volume_now(rx, meta, done)
        });
    }

    /// Deletes a volume or snapshot. Its name goes at once; clusters that no other map
    /// holds return through the free pipeline once the delete is durable; snapshots and
    /// clones made from it keep theirs.
    pub fn delete_volume(&self, rx: &Reactor, id: u32, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| rt.delete_volume_now(rx, id, done));
    }

    /// Takes snapshots of several volumes at one instant (one commit; a group of one is a
    /// plain snapshot). `group` pairs each source volume id with the new snapshot's name,
    /// uuid and labels; `done` gets the new ids in the same order.
    pub fn snapshot(&self, rx: &Reactor, group: Vec<(u32, VolumeMeta)>, done: Reply<Vec<u32>>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| rt.snapshot_now(rx, group, done));
    }

    /// Makes a writable clone of snapshot (or volume) `source`; `meta.size_bytes` must be at
    /// least the source's size (0 = the same). `done` gets the clone's id.
    pub fn clone_volume(&self, rx: &Reactor, source: u32, meta: VolumeMeta, done: Reply<u32>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.clone_volume_now(rx, source, meta, done)
        });
    }

    /// Rolls volume `id` back to snapshot `snap` (taken of it): its contents become the
    /// snapshot's at once (its size stays; what lies past the snapshot's size reads zeroes).
    pub fn rollback(&self, rx: &Reactor, id: u32, snap: u32, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.rollback_now(rx, id, snap, done)
        });
    }

    /// Grows volume `id` to `size_bytes` online.
    pub fn resize(&self, rx: &Reactor, id: u32, size_bytes: u64, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.resize_now(rx, id, size_bytes, done)
        });
    }

    /// Replaces the labels of volume or snapshot `id`.
    pub fn set_labels(
        &self,
        rx: &Reactor,
        id: u32,
        labels: BTreeMap<String, String>,
        done: Reply<()>,
    ) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.set_labels_now(rx, id, labels, done)
        });
    }

    /// Replaces the control plane's record of volume or snapshot `id` (an export record;
    /// empty clears it). `done` runs once the record is durable — written and flushed — so
    /// it survives a power loss as well as a daemon crash.
    pub fn set_control(&self, rx: &Reactor, id: u32, data: Vec<u8>, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            rt.set_control_now(rx, id, data, done)
        });
    }

    /// Replaces the control record of `id` with what `f` makes of the current one, with no
    /// other control operation in between (a read-modify-write of records several owners
    /// share); durable as [`set_control`](Self::set_control).
    pub fn update_control(&self, rx: &Reactor, id: u32, f: ControlUpdate, done: Reply<()>) {
        let rt = self.rc();
        self.serialized(rx, done, move |rx, done| {
            let data = {
                let t = rt.table.borrow();
                f(t.control.get(&id).map(Vec::as_slice))
            };
            match data {
                Ok(data) => rt.set_control_now(rx, id, data, done),
                Err(e) => done(rx, Err(e)),
            }
        });
    }

    fn set_control_now(&self, rx: &Reactor, id: u32, data: Vec<u8>, done: Reply<()>) {
        let rec = VolumeRecord::Control { id, data };
        if let Err(e) = self.table.borrow().clone().apply(&rec) {
            return done(rx, Err(e));
        }
        let rt = self.rc();
        self.journal.append(
            rx,
            vec![rec.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                if let Err(e) = res {
                    return done(rx, Err(format!("journal: {e}")));
                }
                if let Err(e) = rt.table.borrow_mut().apply(&rec) {
                    return done(rx, Err(e));
                }
                let journal = Rc::clone(&rt.journal);
                journal.flush(
                    rx,
                    Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                        done(
                            rx,
                            res.map(|_| ()).map_err(|e| format!("journal flush: {e}")),
                        );
                    }),
                );
            }),
        );
    }

    fn set_overcommit_now(&self, rx: &Reactor, overcommit_milli: u32, done: Reply<()>) {
        let rec = VolumeRecord::Settings { overcommit_milli };
        if let Err(e) = self.table.borrow().clone().apply(&rec) {
            return done(rx, Err(e));
        }
        let rt = self.rc();
        self.journal.append(
            rx,
            vec![rec.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                let r = match res {
                    Ok(_) => rt.table.borrow_mut().apply(&rec),
                    Err(e) => Err(format!("journal: {e}")),
                };
                done(rx, r);
            }),
        );
    }

    fn check_count(&self, adding: usize) -> Result<(), String> {
        let n = self.table.borrow().len();
        if n + adding > MAX_VOLUMES as usize {
            return Err(format!(
                "the pool holds {n} volumes and snapshots; at most {MAX_VOLUMES}: delete some first"
            ));
        }
        Ok(())
    }

    fn check_size(&self, size: u64) -> Result<(), String> {
        if size == 0 || !size.is_multiple_of(u64::from(self.lbs)) {
            return Err(format!(
                "size {size} must be a non-zero multiple of {} bytes",
                self.lbs
            ));
        }
        if volume_clusters(size, self.sb.cluster_bytes) > super::pool::MAX_VOLUME_CLUSTERS {
            return Err(format!(
                "size {size} is larger than a volume can address ({} clusters of {} bytes)",
                super::pool::MAX_VOLUME_CLUSTERS,
                self.sb.cluster_bytes
            ));
        }
        Ok(())
    }

    /// Creates a volume (by journal record); `done` gets its id.
    fn create_volume_now(&self, rx: &Reactor, mut meta: VolumeMeta, done: Reply<u32>) {
        let clusters = volume_clusters(meta.size_bytes, self.sb.cluster_bytes);
        let checks = super::pool::validate_meta(&meta.name, &meta.labels)
            .and_then(|()| self.check_size(meta.size_bytes))
            .and_then(|()| self.check_count(1))
            .and_then(|()| self.check_provision(meta.size_bytes))
            .and_then(|()| {
                if meta.thick {
                    self.check_reserve(clusters, "a thick volume")
                } else {
                    Ok(())
                }
            });
        if let Err(e) = checks {
            return done(rx, Err(e));
        }
        let table = self.table.borrow();
        if table.volume_named(&meta.name).is_some() {
            return done(rx, Err(format!("a volume named {:?} exists", meta.name)));
        }
        meta.id = table.next_id();
        meta.written = false;
        drop(table);
        let rec = VolumeRecord::Create(meta.clone());
        let rt = self.rc();
        self.journal.append(
            rx,
            vec![rec.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| match res {
                Ok(_) => {
                    let id = meta.id;
                    let clusters = volume_clusters(meta.size_bytes, rt.sb.cluster_bytes);
                    let map = Arc::new(ClusterMap::new(clusters));
                    map.set_retire(Arc::clone(&rt.leaf_retire));
                    let mut v = VolRt::new(id, map, false, meta.size_bytes);
                    if meta.thick {
                        Rc::get_mut(&mut v).expect("new").thick = true;
                        rt.set_reserve(&v, clusters);
                    }
                    rt.vols.borrow_mut().insert(id, v);
                    let applied = rt.table.borrow_mut().apply(&VolumeRecord::Create(meta));
                    done(rx, applied.map(|()| id));
                }
                Err(e) => done(rx, Err(format!("journal: {e}"))),
            }),
        );
    }

    fn vol(&self, id: u32) -> Result<Rc<VolRt>, String> {
        self.vols
            .borrow()
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("no volume or snapshot with id {id}"))
    }

    /// Freezes `ids` (new write-type requests park) and runs `then` once the writes in
    /// flight on all of them have finished. Pair with [`thaw`](Self::thaw).
    fn freeze(&self, rx: &Reactor, vols: &[Rc<VolRt>], then: Parked) {
        let pending = Rc::new(Cell::new(vols.len() + 1));
        let once = Rc::new(Once(RefCell::new(Some(then))));
        let step = {
            let (pending, once) = (Rc::clone(&pending), Rc::clone(&once));
            Rc::new(move |rx: &Reactor| {
                pending.set(pending.get() - 1);
                if pending.get() == 0 {
                    once.run(rx);
                }
            })
        };
        for v in vols {
            v.frozen.set(v.frozen.get() + 1);
            if v.writes.get() == 0 {
                step(rx);
            } else {
                let s = Rc::clone(&step);
                v.drained
                    .borrow_mut()
                    .push(Box::new(move |rx: &Reactor| s(rx)));
            }
        }
        step(rx);
    }

    fn thaw(&self, rx: &Reactor, vols: &[Rc<VolRt>]) {
        for v in vols {
            v.frozen.set(v.frozen.get() - 1);
            if v.frozen.get() == 0 {
                let parked = std::mem::take(&mut *v.parked.borrow_mut());
                for p in parked {
                    p(rx);
                }
            }
        }
    }

    /// Deletes a volume or snapshot. Its name goes at once; clusters that no other map
    /// holds return through the free pipeline; snapshots and clones made from it keep
    /// theirs.
    fn delete_volume_now(&self, rx: &Reactor, id: u32, done: Reply<()>) {
        let v = match self.vol(id) {
            Ok(v) => v,
            Err(e) => return done(rx, Err(e)),
        };
        let rt = self.rc();
        let frozen = vec![Rc::clone(&v)];
        self.freeze(
            rx,
            &frozen.clone(),
            Box::new(move |rx: &Reactor| {
                if v.deleted.get() {
                    rt.thaw(rx, &frozen);
                    return done(rx, Err(format!("no volume or snapshot with id {id}")));
                }
                let rt2 = Rc::clone(&rt);
                rt.journal.append(
                    rx,
                    vec![VolumeRecord::Delete { id }.encode()],
                    Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                        let r = match res {
                            Ok(seq) => {
                                v.deleted.set(true);
                                v.shared.deleted.store(true, Ordering::Release);
                                rt2.set_reserve(&v, 0);
                                rt2.owner_chans.borrow_mut().remove(&id);
                                rt2.vols.borrow_mut().remove(&id);
                                // Its leaves stay held until the delete is durable.
                                rt2.zombies.borrow_mut().push((
                                    seq,
                                    Arc::clone(&v.map),
                                    v.snapshot,
                                ));
                                rt2.kick_recycle(rx);
                                rt2.table.borrow_mut().apply(&VolumeRecord::Delete { id })
                            }
                            Err(e) => Err(format!("journal: {e}")),
                        };
                        rt2.thaw(rx, &frozen);
                        done(rx, r);
                    }),
                );
            }),
        );
    }

    /// Takes snapshots of several volumes at one instant (one commit; a group of one is a
    /// plain snapshot). `group` pairs each source volume id with the new snapshot's name,
    /// uuid and labels; `done` gets the new ids in the same order.
    fn snapshot_now(&self, rx: &Reactor, group: Vec<(u32, VolumeMeta)>, done: Reply<Vec<u32>>) {
        let prep = || -> Result<Derivation, String> {
            if group.is_empty() {
                return Err("a snapshot needs at least one volume".into());
            }
            self.check_count(group.len())?;
            let table = self.table.borrow();
            let first = table.next_id();
            let (mut vols, mut recs, mut ids, mut names) =
                (Vec::new(), Vec::new(), Vec::new(), HashSet::new());
            for (next, (src, meta)) in (first..).zip(group.iter()) {
                super::pool::validate_meta(&meta.name, &meta.labels)?;
                let s = table
                    .volumes
                    .get(src)
                    .ok_or_else(|| format!("no volume with id {src} to snapshot"))?;
                if table.snapshot_named(&meta.name).is_some() || !names.insert(meta.name.clone()) {
                    return Err(format!("a snapshot named {:?} exists", meta.name));
                }
                if vols.iter().any(|v: &Rc<VolRt>| v.id == *src) {
                    return Err(format!("volume id {src} named twice in one group"));
                }
                vols.push(self.vol(*src)?);
                let m = VolumeMeta {
                    id: next,
                    size_bytes: s.size_bytes,
                    written: s.written,
                    thick: false,
                    ..meta.clone()
                };
                ids.push(next);
                recs.push(VolumeRecord::Derive {
                    meta: m,
                    lineage: Lineage {
                        source: *src,
                        created_unix: now_unix(),
                    },
                    snapshot: true,
                    grouped: group.len() > 1,
                });
            }
            if group.len() > 1 {
                recs.push(VolumeRecord::Group { ids: ids.clone() });
            }
            drop(table);
            self.check_top_up(&vols)?;
            Ok((vols, recs, ids))
        };
        let (vols, recs, ids) = match prep() {
            Ok(x) => x,
            Err(e) => return done(rx, Err(e)),
        };
        let rt = self.rc();
        self.freeze(
            rx,
            &vols.clone(),
            Box::new(move |rx: &Reactor| rt.commit_derive(rx, vols, recs, ids, done)),
        );
    }

    /// Makes a writable clone of snapshot (or volume) `source`; `meta.size_bytes` must be at
    /// least the source's size (0 = the same). `done` gets the clone's id.
    fn clone_volume_now(&self, rx: &Reactor, source: u32, meta: VolumeMeta, done: Reply<u32>) {
        let prep = || -> Result<Derivation, String> {
            super::pool::validate_meta(&meta.name, &meta.labels)?;
            self.check_count(1)?;
            let table = self.table.borrow();
            let s = table
                .get(source)
                .ok_or_else(|| format!("no snapshot or volume with id {source} to clone"))?;
            let size = if meta.size_bytes == 0 {
                s.size_bytes
            } else {
                meta.size_bytes
            };
            self.check_size(size)?;
            if size < s.size_bytes {
                return Err(format!(
                    "a clone of {} bytes cannot hold its {}-byte source",
                    size, s.size_bytes
                ));
            }
            if table.volume_named(&meta.name).is_some() {
                return Err(format!("a volume named {:?} exists", meta.name));
            }
            let id = table.next_id();
            let m = VolumeMeta {
                id,
                size_bytes: size,
                written: s.written,
                thick: false,
                ..meta.clone()
            };
            drop(table);
            self.check_provision(size)?;
            let src = self.vol(source)?;
            self.check_top_up(std::slice::from_ref(&src))?;
            // A live source is frozen for the instant of the copy; a snapshot is read-only.
            let vols = if src.snapshot { Vec::new() } else { vec![src] };
            Ok((
                vols,
                vec![VolumeRecord::Derive {
                    meta: m,
                    lineage: Lineage {
                        source,
                        created_unix: now_unix(),
                    },
                    snapshot: false,
                    grouped: false,
                }],
                vec![id],
            ))
        };
        let (vols, recs, ids) = match prep() {
            Ok(x) => x,
            Err(e) => return done(rx, Err(e)),
        };
        let rt = self.rc();
        self.freeze(
            rx,
            &vols.clone(),
            Box::new(move |rx: &Reactor| {
                rt.commit_derive(
                    rx,
                    vols,
                    recs,
                    ids,
                    Box::new(move |rx: &Reactor, r: Result<Vec<u32>, String>| {
                        done(rx, r.map(|ids| ids[0]))
                    }),
                )
            }),
        );
    }

    /// Journals derive records (snapshots, clones) of frozen sources and shares the maps.
    fn commit_derive(
        &self,
        rx: &Reactor,
        frozen: Vec<Rc<VolRt>>,
        recs: Vec<VolumeRecord>,
        ids: Vec<u32>,
        done: Reply<Vec<u32>>,
    ) {
        if let Some(v) = frozen.iter().find(|v| v.deleted.get()) {
            let id = v.id;
            self.thaw(rx, &frozen);
            return done(rx, Err(format!("volume id {id} was deleted meanwhile")));
        }
        let rt = self.rc();
        let encoded = recs.iter().map(VolumeRecord::encode).collect();
        self.journal.append(
            rx,
            encoded,
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                let r = match res {
                    Ok(_) => rt.apply_derive(&recs).map(|()| ids),
                    Err(e) => Err(format!("journal: {e}")),
                };
                rt.thaw(rx, &frozen);
                done(rx, r);
            }),
        );
    }

    fn apply_derive(&self, recs: &[VolumeRecord]) -> Result<(), String> {
        for r in recs {
            self.table.borrow_mut().apply(r)?;
            if let VolumeRecord::Derive {
                meta,
                lineage,
                snapshot,
                ..
            } = r
            {
                let src = self.vol(lineage.source)?;
                if src.thick {
                    // Every cluster of the source is shared now: a full reserve again.
                    self.set_reserve(&src, volume_clusters(src.size.get(), self.sb.cluster_bytes));
                }
                let map = src.map.share();
                map.grow(volume_clusters(meta.size_bytes, self.sb.cluster_bytes));
                self.vols.borrow_mut().insert(
                    meta.id,
                    VolRt::new(meta.id, Arc::new(map), *snapshot, meta.size_bytes),
                );
            }
        }
        Ok(())
    }

    /// Rolls volume `id` back to snapshot `snap` (taken of it): its contents become the
    /// snapshot's at once (its size stays; what lies past the snapshot's size reads zeroes).
    fn rollback_now(&self, rx: &Reactor, id: u32, snap: u32, done: Reply<()>) {
        let prep = || -> Result<(Rc<VolRt>, Rc<VolRt>), String> {
            let t = self.table.borrow();
            if !t.volumes.contains_key(&id) {
                return Err(format!("no volume with id {id} to roll back"));
            }
            if !t.snapshots.contains_key(&snap) {
                return Err(format!("no snapshot with id {snap}"));
            }
            if t.lineage.get(&snap).map(|l| l.source) != Some(id) {
                return Err(format!(
                    "snapshot id {snap} was not taken of volume id {id}"
                ));
            }
            drop(t);
            let v = self.vol(id)?;
            self.check_top_up(std::slice::from_ref(&v))?;
            Ok((v, self.vol(snap)?))
        };
        let (v, s) = match prep() {
            Ok(x) => x,
            Err(e) => return done(rx, Err(e)),
        };
        let rt = self.rc();
        let frozen = vec![Rc::clone(&v)];
        self.freeze(
            rx,
            &frozen.clone(),
            Box::new(move |rx: &Reactor| {
                if v.deleted.get() || s.deleted.get() {
                    rt.thaw(rx, &frozen);
                    return done(rx, Err("deleted meanwhile".into()));
                }
                let rt2 = Rc::clone(&rt);
                let rec = VolumeRecord::Rollback { id, snap };
                rt.journal.append(
                    rx,
                    vec![rec.encode()],
                    Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                        let r = match res {
                            Ok(seq) => rt2.table.borrow_mut().apply(&rec).map(|()| {
                                // The old contents stay held until the rollback is durable.
                                let old = Arc::new(v.map.share());
                                v.map
                                    .replace_with(&s.map, &mut |m| rt2.free_cluster(m.pc, seq));
                                rt2.zombies.borrow_mut().push((seq, old, false));
                                rt2.kick_recycle(rx);
                                if v.thick {
                                    let full = volume_clusters(v.size.get(), rt2.sb.cluster_bytes);
                                    rt2.set_reserve(&v, full);
                                }
                            }),
                            Err(e) => Err(format!("journal: {e}")),
                        };
                        rt2.thaw(rx, &frozen);
                        done(rx, r);
                    }),
                );
            }),
        );
    }

    /// Grows volume `id` to `size_bytes` online.
    fn resize_now(&self, rx: &Reactor, id: u32, size_bytes: u64, done: Reply<()>) {
        let prep = || -> Result<Rc<VolRt>, String> {
            self.check_size(size_bytes)?;
            let t = self.table.borrow();
            let v = t
                .volumes
                .get(&id)
                .ok_or_else(|| format!("no volume with id {id} to resize"))?;
            if size_bytes < v.size_bytes {
                return Err(format!(
                    "volume id {id} is {} bytes; shrinking to {size_bytes} is not supported",
                    v.size_bytes
                ));
            }
            let grow = size_bytes - v.size_bytes;
            let grow_clusters = volume_clusters(size_bytes, self.sb.cluster_bytes)
                - volume_clusters(v.size_bytes, self.sb.cluster_bytes);
            drop(t);
            self.check_provision(grow)?;
            let vr = self.vol(id)?;
            if vr.thick {
                self.check_reserve(grow_clusters, "growing a thick volume")?;
            }
            Ok(vr)
        };
        let v = match prep() {
            Ok(v) => v,
            Err(e) => return done(rx, Err(e)),
        };
        let rt = self.rc();
        let rec = VolumeRecord::Resize { id, size_bytes };
        self.journal.append(
            rx,
            vec![rec.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                let r = match res {
                    Ok(_) => rt.table.borrow_mut().apply(&rec).map(|()| {
                        let old = volume_clusters(v.size.get(), rt.sb.cluster_bytes);
                        let new = volume_clusters(size_bytes, rt.sb.cluster_bytes);
                        v.map.grow(new);
                        v.size.set(size_bytes);
                        v.shared.size.store(size_bytes, Ordering::Release);
                        if v.thick {
                            rt.set_reserve(&v, v.reserve.get() + (new - old));
                        }
                    }),
                    Err(e) => Err(format!("journal: {e}")),
                };
                done(rx, r);
            }),
        );
    }

    /// Replaces the labels of volume or snapshot `id`.
    fn set_labels_now(
        &self,
        rx: &Reactor,
        id: u32,
        labels: BTreeMap<String, String>,
        done: Reply<()>,
    ) {
        let name = match self.table.borrow().get(id) {
            Some(m) => m.name.clone(),
            None => return done(rx, Err(format!("no volume or snapshot with id {id}"))),
        };
        if let Err(e) = super::pool::validate_meta(&name, &labels) {
            return done(rx, Err(e));
        }
        let rt = self.rc();
        let rec = VolumeRecord::Labels { id, labels };
        self.journal.append(
            rx,
            vec![rec.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                let r = match res {
                    Ok(_) => rt.table.borrow_mut().apply(&rec),
                    Err(e) => Err(format!("journal: {e}")),
                };
                done(rx, r);
            }),
        );
    }

    /// Inflates volume `id`: copies every cluster it shares with a snapshot or clone, so
    /// it holds all its data alone (deleting its source then frees what only the source
    /// held, and its unique bytes equal its allocated bytes).
    pub fn inflate(&self, rx: &Reactor, id: u32, done: Reply<()>) {
        let v = match self.vol(id) {
            Ok(v) if !v.snapshot => v,
            Ok(_) => return done(rx, Err(format!("id {id} is a snapshot; inflate a volume"))),
            Err(e) => return done(rx, Err(e)),
        };
        self.inflate_from(rx, v, 0, done);
    }

    fn inflate_from(&self, rx: &Reactor, v: Rc<VolRt>, mut lc: u64, done: Reply<()>) {
        if v.deleted.get() {
            return done(rx, Err(format!("volume id {} was deleted", v.id)));
        }
        if v.frozen.get() > 0 {
            let rt = self.rc();
            let v2 = Rc::clone(&v);
            v.parked.borrow_mut().push(Box::new(move |rx: &Reactor| {
                rt.inflate_from(rx, v2, lc, done)
            }));
            return;
        }
        let len = v.map.len();
        while lc < len {
            match v.map.get(lc) {
                Some(m) if self.shared(&v, lc, m) => break,
                _ => lc += 1,
            }
        }
        if lc >= len {
            return done(rx, Ok(()));
        }
        v.writes.set(v.writes.get() + 1);
        let rt = self.rc();
        let v2 = Rc::clone(&v);
        self.copy_up(
            rx,
            &v,
            lc,
            Box::new(move |rx: &Reactor, r: Result<(), Errno>| {
                v2.write_end(rx);
                match r {
                    Ok(()) => rt.inflate_from(rx, v2, lc + 1, done),
                    Err(e) => done(rx, Err(format!("inflate at cluster {lc}: {e}"))),
                }
            }),
        );
    }

    /// Writes a checkpoint now (tests, clean shutdown); `done` when it is durable.
    pub fn checkpoint(&self, rx: &Reactor, done: Reply<()>) {
        self.ckpt_waiters.borrow_mut().push(done);
        self.schedule_checkpoint(rx);
    }

    fn schedule_checkpoint(&self, rx: &Reactor) {
        if self.ckpt_scheduled.replace(true) {
            return;
        }
        let weak = self.me.clone();
        // From a timer: no journal completion is half-applied, so the in-memory state is
        // exactly the records up to `completed_seq`.
        rx.add_timer(
            Duration::ZERO,
            Box::new(move |rx: &Reactor| {
                if let Some(rt) = weak.upgrade() {
                    rt.ckpt_scheduled.set(false);
                    rt.run_checkpoint(rx);
                }
            }),
        );
    }

    fn finish_checkpoint(&self, rx: &Reactor, r: Result<(), String>) {
        self.ckpt_running.set(false);
        self.ckpt_failed.set(r.is_err());
        if let Err(e) = &r {
            tracing::error!(error = %e, "checkpoint failed; the pool is degraded until one succeeds");
            self.journal.fail_waiting(rx, Errno::ENOSPC);
        }
        let waiters = std::mem::take(&mut *self.ckpt_waiters.borrow_mut());
        for w in waiters {
            w(rx, r.clone());
        }
    }

    fn run_checkpoint(&self, rx: &Reactor) {
        if self.ckpt_running.replace(true) {
            // The running one finishes and a later pressure call starts the next.
            return;
        }
        let Some(seq) = self.journal.checkpoint_seq() else {
            // A commit is split across journal writes: its first part is written but not
            // applied. Try again after the next write.
            self.ckpt_running.set(false);
            let weak = self.me.clone();
            rx.add_timer(
                Duration::from_millis(1),
                Box::new(move |rx: &Reactor| {
                    if let Some(rt) = weak.upgrade() {
                        rt.run_checkpoint(rx);
                    }
                }),
            );
            return;
        };
        let maps: Maps = self
            .vols
            .borrow()
            .iter()
            .map(|(id, v)| (*id, Arc::clone(&v.map)))
            .collect();
        let bytes = super::checkpoint::encode(
            &self.sb,
            &self.table.borrow(),
            &maps,
            self.alloc.borrow().clean(),
        );
        if bytes.len() as u64 > self.sb.ckpt_bytes {
            return self.finish_checkpoint(
                rx,
                Err(format!(
                    "checkpoint of {} bytes does not fit its {}-byte area: delete snapshots to shrink the metadata",
                    bytes.len(),
                    self.sb.ckpt_bytes
                )),
            );
        }
        let area = if self.live.borrow().active_ckpt == 0 {
            1
        } else {
            0
        };
        let mut next = self.live.borrow().clone();
        next.generation += 1;
        next.active_ckpt = area;
        next.ckpt_crc = crc32c::crc32c(&bytes);
        next.ckpt_len = bytes.len() as u64;
        next.first_seq = seq + 1;
        let base = self.sb.region_start + self.sb.ckpt_offsets[area as usize];
        self.write_ckpt_chunk(rx, Rc::new(bytes), base, 0, next);
    }

    fn write_ckpt_chunk(
        &self,
        rx: &Reactor,
        bytes: Rc<Vec<u8>>,
        base: u64,
        off: usize,
        next: Superblock,
    ) {
        let rt = self.rc();
        if off >= bytes.len() {
            // Checkpoint written: flush it, then the superblock that names it (FUA).
            let rt2 = Rc::clone(&rt);
            return self.journal.flush(
                rx,
                Box::new(move |rx: &Reactor, r: Result<u64, Errno>| {
                    if let Err(e) = r {
                        return rt2.finish_checkpoint(rx, Err(format!("flush: {e}")));
                    }
                    let rt3 = Rc::clone(&rt2);
                    let io = Io::Write {
                        offset: next.slot_offset(next.copy()),
                        buf: IoBuf::from_slice(&next.encode()),
                        fua: true,
                    };
                    rt2.data.submit(
                        rx,
                        io,
                        FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| {
                            if let Err(e) = res {
                                return rt3
                                    .finish_checkpoint(rx, Err(format!("superblock write: {e}")));
                            }
                            let first = next.first_seq;
                            let len = next.ckpt_len;
                            *rt3.live.borrow_mut() = next;
                            rt3.bump(|s| {
                                s.checkpoints += 1;
                                s.last_checkpoint_bytes = len;
                            });
                            rt3.journal.set_checkpointed(first);
                            rt3.journal.resume(rx);
                            rt3.finish_checkpoint(rx, Ok(()));
                        }),
                        0,
                    );
                }),
            );
        }
        // Within the device's largest transfer (the checkpoint is in 4 KiB blocks).
        let most = usize::try_from(self.piece_bytes()).unwrap_or(CKPT_CHUNK);
        let n = CKPT_CHUNK.min(most).min(bytes.len() - off);
        let io = Io::Write {
            offset: base + off as u64,
            buf: IoBuf::from_slice(&bytes[off..off + n]),
            fua: false,
        };
        self.data.submit(
            rx,
            io,
            FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| match res {
                Ok(_) => rt.write_ckpt_chunk(rx, bytes, base, off + n, next),
                Err(e) => rt.finish_checkpoint(rx, Err(format!("checkpoint write: {e}"))),
            }),
            0,
        );
    }

    /// Advances grace periods: frees and retired leaves recorded before a completed one
    /// are safe from readers on other reactors.
    fn grace_step(&self) {
        if !self.grace.has_readers() {
            // Nobody reads elsewhere: everything recorded so far is safe now.
            self.grace_upto.set(self.journal.completed_seq());
            drop(self.leaf_retire.take());
            drop(self.grace_wait.borrow_mut().take());
            return;
        }
        let mut w = self.grace_wait.borrow_mut();
        if let Some((parity, seq, _)) = &*w {
            if self.grace.quiescent(*parity) {
                self.grace_upto.set(*seq);
                *w = None;
            }
        }
        if w.is_none() {
            let seq = self.journal.completed_seq();
            let leaves = self.leaf_retire.take();
            *w = Some((self.grace.flip(), seq, leaves));
        }
    }

    /// A handle for serving volume or snapshot `id` from another reactor
    /// ([`VolumeHandle::open`] there).
    pub fn volume_handle(&self, rx: &Reactor, id: u32) -> Result<VolumeHandle, String> {
        let vol = self.vol(id)?;
        let ch = self.open_volume(rx, id)?;
        Ok(VolumeHandle {
            id,
            pool: self.sb.pool_uuid,
            snapshot: vol.snapshot,
            map: Arc::clone(&vol.map),
            shared: Arc::clone(&vol.shared),
            owner: rx.remote(),
            dev: Arc::clone(&self.dev),
            grace: Arc::clone(&self.grace),
            geo: ch.geometry().clone(),
            data_start: self.sb.region_start + self.sb.data_offset,
            cluster: self.cluster_bytes(),
        })
    }

    /// The owner's channel of `id`, for requests forwarded from other reactors.
    fn owner_channel(&self, rx: &Reactor, id: u32) -> Result<Rc<dyn Channel>, String> {
        if let Some(ch) = self.owner_chans.borrow().get(&id) {
            return Ok(Rc::clone(ch));
        }
        // Forwarded requests were limited where they entered.
        let ch = self.open_channel(rx, id, false)?;
        self.owner_chans.borrow_mut().insert(id, Rc::clone(&ch));
        Ok(ch)
    }

    /// Opens the IO path of volume or snapshot `id` on this reactor (snapshots read-only),
    /// under the volume's QoS limits.
    pub fn open_volume(&self, rx: &Reactor, id: u32) -> Result<Rc<dyn Channel>, String> {
        self.open_channel(rx, id, true)
    }

    /// Sets the QoS limits of volume or snapshot `id` in force on every reactor (not
    /// persisted here: the control plane keeps them in the object's control record).
    pub fn set_qos(&self, id: u32, limits: &QosLimits) -> Result<(), String> {
        limits.validate()?;
        self.vol(id)?.shared.qos.set(limits);
        Ok(())
    }

    /// Lifts every object's QoS limits on every reactor (at a daemon stop: requests held
    /// by a limit finish now instead of at the cap's pace while devices are quiesced; the
    /// control plane's records keep the limits for the next daemon).
    pub fn lift_qos(&self) {
        for v in self.vols.borrow().values() {
            if !v.shared.qos.get().is_unlimited() {
                v.shared.qos.set(&QosLimits::default());
            }
        }
    }

    /// The QoS limits in force on `id` and its throttling statistics.
    pub fn qos(&self, id: u32) -> Result<(QosLimits, QosStats), String> {
        let v = self.vol(id)?;
        Ok((v.shared.qos.get(), v.shared.qos.stats()))
    }

    fn open_channel(
        &self,
        rx: &Reactor,
        id: u32,
        limited: bool,
    ) -> Result<Rc<dyn Channel>, String> {
        if rx.id() != self.owner {
            return Err(format!(
                "volume {id}: reactor {} owns the pool; open other reactors' channels through PoolRt::volume_handle",
                self.owner
            ));
        }
        let vol = self.vol(id)?;
        let dgeo = self.data.geometry();
        let geo = Geometry {
            logical_block_size: self.lbs,
            physical_block_size: dgeo.physical_block_size.max(self.lbs),
            size_bytes: vol.size.get(),
            max_transfer_bytes: dgeo.max_transfer_bytes,
            atomic_write_bytes: dgeo.atomic_write_bytes,
            discard_supported: true,
            discard_zeroes: false,
            write_zeroes_supported: true,
            volatile_cache: true,
        };
        let qos = limited.then(|| Limiter::new(&vol.shared.qos));
        Ok(Rc::new_cyclic(|me| VolumeChannel {
            me: me.clone(),
            rt: self.rc(),
            qos,
            vol,
            geo,
            reqs: RefCell::new(ReqTable::default()),
            in_submit: Cell::new(false),
        }))
    }

    /// Whether a write to `lc` of `v` (mapped to `m`) must not go in place.
    fn shared(&self, v: &VolRt, lc: u64, m: Mapping) -> bool {
        v.map.leaf_shared(lc) || self.alloc.borrow().refs(m.pc) > 1
    }

    /// An IO is about to use cluster `pc` (found through a mapping).
    fn io_start(&self, pc: u32) {
        *self.pc_inflight.borrow_mut().entry(pc).or_insert(0) += 1;
    }

    /// An IO on `pc` finished; a free that waited for it happens now.
    fn io_end(&self, rx: &Reactor, pc: u32) {
        let mut inflight = self.pc_inflight.borrow_mut();
        let n = inflight.get_mut(&pc).expect("io_end pairs with io_start");
        *n -= 1;
        if *n > 0 {
            return;
        }
        inflight.remove(&pc);
        drop(inflight);
        if let Some(seq) = self.deferred_free.borrow_mut().remove(&pc) {
            self.alloc.borrow_mut().free(pc, seq);
            self.kick_recycle(rx);
        }
    }

    /// Drops one reference to `pc` by the record in block `seq`, once that record is
    /// durable ([`apply_durable`](Self::apply_durable)).
    fn free_cluster(&self, pc: u32, seq: u64) {
        self.unrefs.borrow_mut().push_back((seq, pc));
    }

    /// Whether every dropped reference has been applied (tests: accounting is exact).
    pub fn settled(&self) -> bool {
        self.unrefs.borrow().is_empty() && self.zombies.borrow().is_empty()
    }

    /// Records up to `upto` are durable: apply the references they dropped.
    fn apply_durable(&self, upto: u64) {
        let zombies: Vec<(u64, Arc<ClusterMap>, bool)> = {
            let mut z = self.zombies.borrow_mut();
            let (done, keep): (Vec<_>, Vec<_>) = z.drain(..).partition(|(s, _, _)| *s <= upto);
            *z = keep;
            done
        };
        let mut snapshot_gone = false;
        for (seq, map, snapshot) in zombies {
            snapshot_gone |= snapshot;
            map.release(&mut |m| self.apply_unref(m.pc, seq));
        }
        loop {
            let next = {
                let mut q = self.unrefs.borrow_mut();
                match q.front() {
                    Some(&(s, _)) if s <= upto => q.pop_front(),
                    _ => None,
                }
            };
            let Some((seq, pc)) = next else { break };
            self.apply_unref(pc, seq);
        }
        if snapshot_gone {
            // Clusters only a deleted snapshot shared may now be a volume's alone.
            self.recompute_reserves();
        }
    }

    /// Drops one reference to `pc` now; the last one frees it once no IO uses it.
    fn apply_unref(&self, pc: u32, seq: u64) {
        let last = self.alloc.borrow().refs(pc) == 1;
        if last && self.pc_inflight.borrow().contains_key(&pc) {
            self.deferred_free.borrow_mut().insert(pc, seq);
        } else {
            self.alloc.borrow_mut().free(pc, seq);
        }
    }

    /// The map changes `lc` of `v` to `new` (journaled in block `seq`), keeping the
    /// reference counts: a copied leaf's entries gain one, the replaced mapping loses one.
    fn set_mapping(&self, v: &VolRt, lc: u64, new: Mapping, seq: u64) {
        let prev = {
            let mut a = self.alloc.borrow_mut();
            v.map.set(lc, new, &mut |c| a.share(c.pc))
        };
        if let Some(p) = prev {
            self.free_cluster(p.pc, seq);
        }
    }

    fn clear_mapping(&self, v: &VolRt, lc: u64, seq: u64) {
        if v.thick {
            if let Some(m) = v.map.get(lc) {
                if !self.shared(v, lc, m) {
                    // Written alone before; a write after this needs a new cluster.
                    let cap = volume_clusters(v.size.get(), self.sb.cluster_bytes);
                    self.set_reserve(v, (v.reserve.get() + 1).min(cap));
                }
            }
        }
        let prev = {
            let mut a = self.alloc.borrow_mut();
            v.map.clear(lc, &mut |c| a.share(c.pc))
        };
        if let Some(p) = prev {
            self.free_cluster(p.pc, seq);
        }
    }

    fn phys(&self, pc: u32, in_cluster: u64) -> u64 {
        self.sb.region_start
            + self.sb.data_offset
            + u64::from(pc) * u64::from(self.sb.cluster_bytes)
            + in_cluster
    }

    /// A durably zero cluster; `Ok(None)`: none now, but the pipeline is recycling
    /// (park the caller with [`park_alloc`](Self::park_alloc)); ENOSPC: the pool is full.
    /// A thick volume draws on its reserve; others only on what no reserve holds.
    fn try_alloc(&self, rx: &Reactor, v: &VolRt) -> Result<Option<u32>, Errno> {
        let from_reserve = v.thick && v.reserve.get() > 0;
        if !from_reserve && self.unreserved() == 0 {
            return Err(Errno::ENOSPC);
        }
        let got = self.alloc.borrow_mut().alloc();
        if let Some(pc) = got {
            if from_reserve {
                self.set_reserve(v, v.reserve.get() - 1);
                self.from_reserve.borrow_mut().insert(pc);
            }
            if self.alloc.borrow().wants_withdraw() {
                // The ready window runs low: refill it from the clean set.
                self.kick_recycle(rx);
            }
            return Ok(Some(pc));
        }
        let c = self.alloc.borrow().counts();
        let coming = c.recycling > 0 || c.clean > 0;
        if coming && self.alloc_waiters.borrow().len() < MAX_ALLOC_WAITERS {
            return Ok(None);
        }
        Err(Errno::ENOSPC)
    }

    fn park_alloc(&self, rx: &Reactor, retry: Parked) {
        self.alloc_waiters.borrow_mut().push(retry);
        self.kick_recycle(rx);
    }

    /// A cluster allocated for `key` was never mapped: back through the pipeline (it may
    /// hold partial data, so it is zeroed again).
    fn abandon(&self, rx: &Reactor, pc: u32, key: (u32, u64)) {
        if self.from_reserve.borrow_mut().remove(&pc) {
            if let Some(v) = self.vols.borrow().get(&key.0).filter(|v| v.thick) {
                // Its reserve paid for this cluster: give the reservation back.
                let cap = volume_clusters(v.size.get(), self.sb.cluster_bytes);
                self.set_reserve(v, (v.reserve.get() + 1).min(cap));
            }
        }
        self.alloc.borrow_mut().free(pc, 0);
        self.kick_recycle(rx);
        self.end_allocation(rx, key);
    }

    fn end_allocation(&self, rx: &Reactor, key: (u32, u64)) {
        let waiters = self
            .allocating
            .borrow_mut()
            .remove(&key)
            .unwrap_or_default();
        for w in waiters {
            w(rx);
        }
    }

    /// Copies shared cluster `lc` of `v` to a new cluster of its own (read, write FUA,
    /// journal the mapping). `done(Ok)` also when there was nothing to copy.
    fn copy_up(&self, rx: &Reactor, v: &Rc<VolRt>, lc: u64, done: StepDone) {
        let key = (v.id, lc);
        if let Some(w) = self.allocating.borrow_mut().get_mut(&key) {
            let (rt, v2) = (self.rc(), Rc::clone(v));
            w.push(Box::new(move |rx: &Reactor| rt.copy_up(rx, &v2, lc, done)));
            return;
        }
        let Some(m) = v.map.get(lc).filter(|&m| self.shared(v, lc, m)) else {
            return done(rx, Ok(()));
        };
        let pc = match self.try_alloc(rx, v) {
            Ok(Some(pc)) => pc,
            Ok(None) => {
                let (rt, v2) = (self.rc(), Rc::clone(v));
                return self.park_alloc(
                    rx,
                    Box::new(move |rx: &Reactor| rt.copy_up(rx, &v2, lc, done)),
                );
            }
            Err(e) => return done(rx, Err(e)),
        };
        self.allocating.borrow_mut().insert(key, Vec::new());
        self.bump(|s| s.copy_ups += 1);
        self.io_start(m.pc);
        let (rt, v2) = (self.rc(), Rc::clone(v));
        self.copy_cluster(
            rx,
            m.pc,
            pc,
            0,
            Box::new(move |rx: &Reactor, r: Result<(), Errno>| {
                rt.io_end(rx, m.pc);
                match r {
                    Ok(()) => rt.journal_mapping(rx, &v2, lc, pc, false, done),
                    Err(e) => {
                        rt.abandon(rx, pc, key);
                        done(rx, Err(e));
                    }
                }
            }),
        );
    }

    /// Copies cluster `from` to cluster `to` from byte `off` on, in pieces the device takes
    /// in one request (a cluster may be larger than its largest transfer). Each piece is
    /// written FUA: the copy must be durable before the record that maps it (power loss
    /// would otherwise show zeroes where flushed data was).
    fn copy_cluster(&self, rx: &Reactor, from: u32, to: u32, off: u64, done: StepDone) {
        let cluster = self.cluster_bytes();
        if off >= cluster {
            return done(rx, Ok(()));
        }
        let n = self.piece_bytes().min(cluster - off);
        let rt = self.rc();
        let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf: Option<IoBuf>| {
            let (Ok(_), Some(buf)) = (res, buf) else {
                return done(rx, Err(res.err().unwrap_or(Errno::EIO)));
            };
            let rt2 = Rc::clone(&rt);
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| match res {
                Ok(_) => rt2.copy_cluster(rx, from, to, off + n, done),
                Err(e) => done(rx, Err(e)),
            });
            let io = Io::Write {
                offset: rt.phys(to, off),
                buf,
                fua: true,
            };
            rt.data.submit(rx, io, cb, 0);
        });
        let io = Io::Read {
            offset: self.phys(from, off),
            buf: IoBuf::alloc(usize::try_from(n).expect("a piece fits memory")),
        };
        self.data.submit(rx, io, cb, 0);
    }

    /// Most bytes of one device read or write of whole-cluster and checkpoint work: the
    /// device's largest transfer, in 4 KiB units (at least one).
    fn piece_bytes(&self) -> u64 {
        let max = u64::from(self.data.geometry().max_transfer_bytes);
        let block = super::format::BLOCK_BYTES as u64;
        (max - max % block).max(block)
    }

    /// Data for `lc` of `v` is in new cluster `pc`: journal the mapping (and the volume's
    /// first-write flag), then map it and end the allocation.
    fn journal_mapping(
        &self,
        rx: &Reactor,
        v: &Rc<VolRt>,
        lc: u64,
        pc: u32,
        first_write: bool,
        done: StepDone,
    ) {
        let key = (v.id, lc);
        if v.deleted.get() {
            self.abandon(rx, pc, key);
            return done(rx, Err(Errno(libc::ENODEV)));
        }
        let mut records = vec![Record::Map {
            vol: v.id,
            lc,
            pc,
            epoch: 0,
        }];
        let first_write = first_write
            && self
                .table
                .borrow()
                .volumes
                .get(&v.id)
                .is_some_and(|m| !m.written);
        if first_write {
            records.push(VolumeRecord::Written { id: v.id }.encode());
        }
        let (rt, v2) = (self.rc(), Rc::clone(v));
        self.journal.append(
            rx,
            records,
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| match res {
                Ok(seq) => {
                    rt.from_reserve.borrow_mut().remove(&pc);
                    rt.set_mapping(&v2, lc, Mapping { pc }, seq);
                    rt.kick_recycle(rx);
                    if first_write {
                        let _ = rt
                            .table
                            .borrow_mut()
                            .apply(&VolumeRecord::Written { id: v2.id });
                    }
                    rt.end_allocation(rx, key);
                    done(rx, Ok(()));
                }
                Err(e) => {
                    rt.abandon(rx, pc, key);
                    done(rx, Err(e));
                }
            }),
        );
    }

    /// Schedules pipeline rounds while there is something to recycle (an idle pool arms
    /// no timer: ~0% CPU).
    fn kick_recycle(&self, rx: &Reactor) {
        let work = {
            let a = self.alloc.borrow();
            a.counts().recycling > 0 || a.wants_flush() || a.wants_withdraw()
        } || !self.settled();
        if !work || self.scheduled.replace(true) {
            return;
        }
        let weak = self.me.clone();
        rx.add_timer(
            RECYCLE_PERIOD,
            Box::new(move |rx: &Reactor| {
                if let Some(rt) = weak.upgrade() {
                    rt.scheduled.set(false);
                    rt.recycle(rx);
                    rt.kick_recycle(rx);
                }
            }),
        );
    }
    /// One round of the free-cluster pipeline: make freeing records durable, zero dirty
    /// clusters, flush zeroes, and wake writes waiting for space.
    fn recycle(&self, rx: &Reactor) {
        self.withdraw(rx);
        if self.recycling.get() {
            return;
        }
        self.grace_step();
        let (has_freed, dirty) = {
            let mut a = self.alloc.borrow_mut();
            let c = a.counts();
            let has = c.recycling > 0;
            (
                has,
                if has {
                    let most = (ZERO_BATCH_BYTES / self.cluster_bytes()).max(1);
                    a.take_dirty_runs(usize::try_from(most).unwrap_or(ZERO_BATCH), ZERO_BATCH)
                } else {
                    Vec::new()
                },
            )
        };
        if !has_freed && !self.alloc.borrow().wants_flush() && self.settled() {
            return;
        }
        self.recycling.set(true);
        let pending = Rc::new(Cell::new(dirty.len() + 1));
        let rt = self.rc();
        let after_zeroing = {
            let rt = Rc::clone(&rt);
            move |rx: &Reactor| {
                // One flush makes the zeroes and every journal block so far durable.
                let token = rt.alloc.borrow_mut().begin_flush();
                let durable_upto = rt.journal.next_seq().saturating_sub(1);
                let rt2 = Rc::clone(&rt);
                rt.journal.flush(
                    rx,
                    Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                        if res.is_ok() {
                            rt2.apply_durable(durable_upto);
                            let mut a = rt2.alloc.borrow_mut();
                            a.flush_done(token);
                            // Durable, and past a grace period for readers elsewhere.
                            a.durable(durable_upto.min(rt2.grace_upto.get()));
                            drop(a);
                            rt2.journal_zeroed(rx);
                        }
                        rt2.recycling.set(false);
                        let waiters = std::mem::take(&mut *rt2.alloc_waiters.borrow_mut());
                        for w in waiters {
                            w(rx);
                        }
                    }),
                );
            }
        };
        let after_zeroing = Rc::new(Once(RefCell::new(Some(Box::new(after_zeroing)))));
        let step = {
            let (pending, after) = (Rc::clone(&pending), Rc::clone(&after_zeroing));
            move |rx: &Reactor| {
                pending.set(pending.get() - 1);
                if pending.get() == 0 {
                    after.run(rx);
                }
            }
        };
        let step: Rc<dyn Fn(&Reactor)> = Rc::new(step);
        for (first, n) in dirty {
            let off = self.phys(first, 0);
            let (rt, step) = (Rc::clone(&rt), Rc::clone(&step));
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| {
                let mut a = rt.alloc.borrow_mut();
                for c in first..first + n {
                    a.zeroed(c, res.is_ok());
                }
                drop(a);
                step(rx);
            });
            self.data.submit(
                rx,
                Io::WriteZeroes {
                    offset: off,
                    len: u64::from(n) * self.cluster_bytes(),
                },
                cb,
                0,
            );
        }
        step(rx);
    }
}

/// Ready clusters a pool keeps (the rest of its durably zero free space is journaled as
/// such, FORMAT.md §5): about 1 GiB, at most a quarter of the pool, at least 16. An import
/// zeroes this window again, not the whole free space.
fn ready_window(clusters: u64, cluster_bytes: u32) -> u64 {
    ((1u64 << 30) / u64::from(cluster_bytes).max(1))
        .min(clusters / 4)
        .max(16)
}

impl PoolRt {
    /// Journals the clusters that became clean (zeroed records; losing them only means
    /// zeroing again after an import).
    fn journal_zeroed(&self, rx: &Reactor) {
        let runs = self.alloc.borrow_mut().take_new_clean();
        if runs.is_empty() {
            return;
        }
        self.journal.append(
            rx,
            VolumeRecord::for_runs(&runs, true),
            Box::new(|_rx: &Reactor, _res: Result<u64, Errno>| {}),
        );
    }

    /// Refills the ready window from the clean set: a withdrawn record naming the
    /// clusters must be written and flushed before any is handed out, or a crash could
    /// leave the journal calling a cluster zero that holds data (FORMAT.md §5).
    fn withdraw(&self, rx: &Reactor) {
        if !self.alloc.borrow().wants_withdraw() {
            return;
        }
        // Zeroed records first: a cluster's zeroed record never follows its withdrawal.
        let mut records = VolumeRecord::for_runs(&self.alloc.borrow_mut().take_new_clean(), true);
        let runs = self.alloc.borrow_mut().begin_withdraw();
        records.extend(VolumeRecord::for_runs(&runs, false));
        let rt = self.rc();
        self.journal.append(
            rx,
            records,
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                if let Err(e) = res {
                    return rt.withdrawn(rx, &runs, Err(e));
                }
                let rt2 = Rc::clone(&rt);
                rt.journal.flush(
                    rx,
                    Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                        rt2.withdrawn(rx, &runs, res.map(|_| ()));
                    }),
                );
            }),
        );
    }

    fn withdrawn(&self, rx: &Reactor, runs: &[(u32, u32)], res: Result<(), Errno>) {
        if let Err(e) = res {
            tracing::error!(error = %e, "journaling a withdrawal of zeroed clusters failed");
        }
        self.alloc.borrow_mut().withdrawn(runs, res.is_ok());
        let waiters = std::mem::take(&mut *self.alloc_waiters.borrow_mut());
        for w in waiters {
            w(rx);
        }
        self.kick_recycle(rx);
    }
}

/// Grace periods for readers on other reactors (sleepable-RCU style): a reader counts
/// itself in the slot of the current epoch's parity for the length of one request (map
/// lookup and device IO). The owner flips the epoch and waits until the old parity's
/// counts are zero on every reactor: then no request that could have found a cluster or a
/// leaf through a mapping removed before the flip is still running, and the cluster may
/// be zeroed and reused, the leaf freed.
#[derive(Debug, Default)]
pub struct Grace {
    epoch: AtomicU64,
    slots: Mutex<Vec<Arc<GraceSlot>>>,
}

/// One reactor's counts of requests in flight, by epoch parity.
#[derive(Debug, Default)]
pub struct GraceSlot {
    inflight: [AtomicU64; 2],
}

impl Grace {
    fn register(&self) -> Arc<GraceSlot> {
        let slot = Arc::new(GraceSlot::default());
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&slot));
        slot
    }

    fn unregister(&self, slot: &Arc<GraceSlot>) {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|s| !Arc::ptr_eq(s, slot));
    }

    fn has_readers(&self) -> bool {
        !self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// A reader enters: returns the parity to leave with.
    fn enter(&self, slot: &GraceSlot) -> usize {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let p = usize::from(e & 1 == 1);
            slot.inflight[p].fetch_add(1, Ordering::SeqCst);
            // The count is visible before this reader's map loads (pairs with `flip`).
            fence(Ordering::SeqCst);
            // A reader delayed between reading the epoch and counting itself may have
            // missed a whole grace period (and the next one waits on the other parity):
            // count again under the current epoch.
            if self.epoch.load(Ordering::SeqCst) == e {
                return p;
            }
            slot.inflight[p].fetch_sub(1, Ordering::Release);
        }
    }

    fn leave(slot: &GraceSlot, parity: usize) {
        slot.inflight[parity].fetch_sub(1, Ordering::Release);
    }

    /// Starts a grace period; returns the parity to wait for.
    fn flip(&self) -> usize {
        // Map changes before this point are visible to readers counted after it.
        fence(Ordering::SeqCst);
        usize::from(self.epoch.fetch_add(1, Ordering::SeqCst) & 1 == 1)
    }

    fn quiescent(&self, parity: usize) -> bool {
        fence(Ordering::SeqCst);
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .all(|s| s.inflight[parity].load(Ordering::Acquire) == 0)
    }
}

/// What readers on other reactors see of a volume: kept current by the owner.
#[derive(Debug)]
struct VolShared {
    size: AtomicU64,
    deleted: AtomicBool,
    /// QoS limits and throttling statistics (every reactor's channels read them).
    qos: Arc<qos::QosShared>,
}

thread_local! {
    /// Pools owned by this reactor, by pool uuid (forwarded requests find theirs here).
    static OWNED: RefCell<HashMap<[u8; 16], Weak<PoolRt>>> = RefCell::new(HashMap::new());
    /// Channels on this reactor waiting for answers of forwarded requests.
    static FORWARDERS: RefCell<HashMap<u64, Weak<RemoteChannel>>> = RefCell::new(HashMap::new());
}

static NEXT_FORWARDER: AtomicU64 = AtomicU64::new(1);

/// Sends `msg` to another reactor from a reactor, retrying from a timer while its queue is
/// full (never blocks). A stopped reactor drops the message (its requests fail there).
fn send_from_reactor(rx: &Reactor, to: Remote, msg: crate::reactor::Message) {
    match to.try_send(msg) {
        Ok(()) | Err((_, Some(_))) => {}
        Err((msg, None)) => {
            rx.add_timer(
                Duration::from_micros(20),
                Box::new(move |rx: &Reactor| send_from_reactor(rx, to, msg)),
            );
        }
    }
}

/// Everything a reactor other than the owner needs to serve a volume: `Send`, made by
/// [`PoolRt::volume_handle`] on the owner and opened with [`VolumeHandle::open`] on the
/// serving reactor.
#[derive(Clone)]
pub struct VolumeHandle {
    id: u32,
    pool: [u8; 16],
    snapshot: bool,
    map: Arc<ClusterMap>,
    shared: Arc<VolShared>,
    owner: Remote,
    dev: Arc<dyn BlockDevice>,
    grace: Arc<Grace>,
    geo: Geometry,
    data_start: u64,
    cluster: u64,
}

impl fmt::Debug for VolumeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeHandle")
            .field("id", &self.id)
            .field("owner", &self.owner.id())
            .finish()
    }
}

impl VolumeHandle {
    /// Opens the volume's IO path on this reactor (not the owner: use
    /// [`PoolRt::open_volume`] there).
    pub fn open(&self, rx: &Reactor) -> Result<Rc<dyn Channel>, String> {
        if rx.id() == self.owner.id() {
            return Err(format!(
                "volume {}: reactor {} owns the pool; open it with PoolRt::open_volume",
                self.id,
                rx.id()
            ));
        }
        let data = self
            .dev
            .open_channel(rx)
            .map_err(|e| format!("opening {}: {e}", self.dev.name()))?;
        let key = NEXT_FORWARDER.fetch_add(1, Ordering::Relaxed);
        let ch = Rc::new_cyclic(|me| RemoteChannel {
            me: me.clone(),
            qos: Limiter::new(&self.shared.qos),
            h: self.clone(),
            slot: self.grace.register(),
            data,
            key,
            reqs: RefCell::new(ReqTable::default()),
            in_submit: Cell::new(false),
        });
        let weak = Rc::downgrade(&ch);
        FORWARDERS.with(|f| f.borrow_mut().insert(key, weak));
        Ok(ch)
    }
}

/// Takes a request's buffer back from the pieces lent to its parts once every part is done
/// (each dropped its piece); a piece still alive is a bug, reported as EIO.
fn take_back_lent(lent: &mut Option<Rc<IoBuf>>, buf: &mut Option<IoBuf>, err: &mut Option<Errno>) {
    if let Some(whole) = lent.take() {
        match Rc::try_unwrap(whole) {
            Ok(b) => *buf = Some(b),
            Err(_) => {
                tracing::error!("a piece of a request's buffer outlived the request");
                err.get_or_insert(Errno(libc::EIO));
            }
        }
    }
}

/// A request of a remote channel in flight.
struct RemoteReq {
    cb: Rc<dyn Completion>,
    tag: u64,
    buf: Option<IoBuf>,
    /// A kernel buffer lent out in pieces, one per segment (see `read_kernel`).
    lent: Option<Rc<IoBuf>>,
    parts: u32,
    err: Option<Errno>,
    bytes: u32,
    parity: usize,
}

/// A volume's IO path on a reactor other than the pool's owner. Reads look the map up
/// without a lock and go to the device through this reactor's own channel (counted in a
/// grace period so the owner never reuses a cluster or frees a leaf under them). Writes,
/// discards, write-zeroes and flushes go to the owner as messages (they may allocate, copy
/// or journal, which only the owner does) and their answers come back the same way.
pub struct RemoteChannel {
    me: Weak<RemoteChannel>,
    qos: Limiter,
    h: VolumeHandle,
    slot: Arc<GraceSlot>,
    data: Rc<dyn Channel>,
    key: u64,
    reqs: RefCell<ReqTable<RemoteReq>>,
    in_submit: Cell<bool>,
}

impl fmt::Debug for RemoteChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteChannel")
            .field("volume", &self.h.id)
            .finish()
    }
}

impl Drop for RemoteChannel {
    fn drop(&mut self) {
        let key = self.key;
        let _ = FORWARDERS.try_with(|f| f.borrow_mut().remove(&key));
        // No request is in flight (each holds the channel): its grace slot can go.
        self.h.grace.unregister(&self.slot);
    }
}

impl RemoteChannel {
    fn rc(&self) -> Rc<RemoteChannel> {
        self.me.upgrade().expect("channel alive while it has IO")
    }

    fn finish(&self, rx: &Reactor, r: RemoteReq) {
        let res = match r.err {
            Some(e) => Err(e),
            None => Ok(r.bytes),
        };
        if self.in_submit.get() {
            crate::bdev::complete_soft(rx, r.cb, r.tag, res, r.buf);
        } else {
            r.cb.complete(rx, r.tag, res, r.buf);
        }
    }

    fn read_part_done(&self, rx: &Reactor, slot: usize, res: Result<(), Errno>) {
        let done = {
            let mut reqs = self.reqs.borrow_mut();
            let Some(r) = reqs.get_mut(slot) else { return };
            if let Err(e) = res {
                r.err.get_or_insert(e);
            }
            r.parts -= 1;
            r.parts == 0
        };
        if done {
            let mut r = self.reqs.borrow_mut().take(slot).expect("request present");
            // Every segment is done and dropped its piece.
            take_back_lent(&mut r.lent, &mut r.buf, &mut r.err);
            Grace::leave(&self.slot, r.parity);
            self.finish(rx, r);
        }
    }

    /// The segments of a read into a kernel buffer (ublk zero copy): each reads into its
    /// piece of the buffer — the bytes never pass through here — and unmapped ones are
    /// zero-filled from `/dev/zero`.
    fn read_kernel(&self, rx: &Reactor, slot: usize, segs: Segments, whole: &Rc<IoBuf>) {
        for seg in segs {
            // the segments are disjoint ranges of the request, each with one IO;
            // a kernel buffer has no bytes here to alias in any case.
            // SAFETY: the reasons above hold here.
            let piece = unsafe { IoBuf::piece(whole, seg.buf_off, seg.len) };
            let me = self.rc();
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, b: Option<IoBuf>| {
                drop(b);
                me.read_part_done(rx, slot, res.map(drop));
            });
            match self.h.map.get(seg.lc) {
                None => crate::bdev::zero_fill(rx, piece, cb, 0),
                Some(m) => {
                    let io = Io::Read {
                        offset: self.h.data_start
                            + u64::from(m.pc) * self.h.cluster
                            + seg.in_cluster,
                        buf: piece,
                    };
                    self.data.submit(rx, io, cb, 0);
                }
            }
        }
    }

    fn read(&self, rx: &Reactor, offset: u64, buf: IoBuf, cb: Rc<dyn Completion>, tag: u64) {
        let segs = segments(offset, buf.len() as u64, self.h.cluster);
        let bytes = u32::try_from(buf.len()).expect("validated length");
        let parity = self.h.grace.enter(&self.slot);
        if self.h.shared.deleted.load(Ordering::Acquire) {
            // Deleted before this read counted itself: its clusters may be on their way
            // back to the free pool.
            Grace::leave(&self.slot, parity);
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::ENODEV), Some(buf));
        }
        let parts = u32::try_from(segs.len()).expect("segments fit u32");
        if buf.is_kernel() {
            let whole = Rc::new(buf);
            let slot = self.reqs.borrow_mut().insert(RemoteReq {
                cb,
                tag,
                buf: None,
                lent: Some(Rc::clone(&whole)),
                parts,
                err: None,
                bytes,
                parity,
            });
            return self.read_kernel(rx, slot, segs, &whole);
        }
        let slot = self.reqs.borrow_mut().insert(RemoteReq {
            cb,
            tag,
            buf: Some(buf),
            lent: None,
            parts,
            err: None,
            bytes,
            parity,
        });
        for seg in segs {
            let Some(m) = self.h.map.get(seg.lc) else {
                if let Some(RemoteReq { buf: Some(b), .. }) = self.reqs.borrow_mut().get_mut(slot) {
                    if let Some(bytes) = b.as_mut_slice() {
                        bytes[seg.buf_off..seg.buf_off + seg.len].fill(0);
                    }
                }
                self.read_part_done(rx, slot, Ok(()));
                continue;
            };
            let whole = {
                let mut reqs = self.reqs.borrow_mut();
                let r = reqs.get_mut(slot).expect("request present");
                let b = r.buf.as_ref().expect("read buffer");
                if seg.buf_off == 0 && b.len() == seg.len {
                    r.buf.take()
                } else {
                    None
                }
            };
            let single = whole.is_some();
            let io_buf = whole.unwrap_or_else(|| IoBuf::alloc(seg.len));
            let me = self.rc();
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, b: Option<IoBuf>| {
                if let (Some(b), Some(r)) = (b, me.reqs.borrow_mut().get_mut(slot)) {
                    if single {
                        r.buf = Some(b);
                    } else if res.is_ok() {
                        // Host memory both (kernel buffers go through `read_kernel`).
                        if let (Some(dst), Some(src)) =
                            (r.buf.as_mut().and_then(IoBuf::as_mut_slice), b.as_slice())
                        {
                            dst[seg.buf_off..seg.buf_off + seg.len].copy_from_slice(src);
                        }
                    }
                }
                me.read_part_done(rx, slot, res.map(drop));
            });
            let io = Io::Read {
                offset: self.h.data_start + u64::from(m.pc) * self.h.cluster + seg.in_cluster,
                buf: io_buf,
            };
            self.data.submit(rx, io, cb, 0);
        }
    }

    /// Sends a write-type request or flush to the owner; the answer completes it here.
    fn forward(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let (kind, data, buf) = match io {
            Io::Write { offset, buf, fua } => {
                // The bytes travel to the owner by message; a kernel buffer (which this
                // channel declines: `takes_kernel_bufs`) has none to send.
                let Some(data) = buf.to_vec() else {
                    return crate::bdev::fail_request(rx, cb, tag, Errno(libc::EFAULT), Some(buf));
                };
                (Fwd::Write { offset, fua }, data, Some(buf))
            }
            Io::Discard { offset, len } => (Fwd::Discard { offset, len }, Vec::new(), None),
            Io::WriteZeroes { offset, len } => (Fwd::Zero { offset, len }, Vec::new(), None),
            Io::Flush => (Fwd::Flush, Vec::new(), None),
            Io::Read { .. } => unreachable!("reads are served here"),
        };
        let bytes = buf
            .as_ref()
            .map_or(0, |b| u32::try_from(b.len()).expect("validated length"));
        let slot = self.reqs.borrow_mut().insert(RemoteReq {
            cb,
            tag,
            buf,
            lent: None,
            parts: 1,
            err: None,
            bytes,
            parity: 0,
        });
        let (pool, id, key, origin) = (self.h.pool, self.h.id, self.key, rx.remote());
        let msg: crate::reactor::Message = Box::new(move |orx: &Reactor| {
            serve_forwarded(orx, pool, id, kind, data, key, slot, origin);
        });
        send_from_reactor(rx, self.h.owner.clone(), msg);
    }

    fn forwarded_done(&self, rx: &Reactor, slot: usize, res: Result<(), Errno>) {
        let Some(mut r) = self.reqs.borrow_mut().take(slot) else {
            return;
        };
        if let Err(e) = res {
            r.err = Some(e);
        }
        self.finish(rx, r);
    }
}

/// A forwarded request's kind.
#[derive(Clone, Copy, Debug)]
enum Fwd {
    Write { offset: u64, fua: bool },
    Discard { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
    Flush,
}

/// On the owner: runs a forwarded request through the owner's channel of the volume and
/// sends the answer back to the origin reactor.
#[allow(clippy::too_many_arguments)]
fn serve_forwarded(
    rx: &Reactor,
    pool: [u8; 16],
    id: u32,
    kind: Fwd,
    data: Vec<u8>,
    key: u64,
    slot: usize,
    origin: Remote,
) {
    let answer = move |rx: &Reactor, res: Result<(), Errno>| {
        let msg: crate::reactor::Message = Box::new(move |_rx: &Reactor| {
            let ch = FORWARDERS.with(|f| f.borrow().get(&key).and_then(Weak::upgrade));
            if let Some(ch) = ch {
                ch.forwarded_done(_rx, slot, res);
            }
        });
        send_from_reactor(rx, origin, msg);
    };
    let ch = OWNED
        .with(|o| o.borrow().get(&pool).and_then(Weak::upgrade))
        .ok_or_else(|| "pool stopped".to_string())
        .and_then(|rt| rt.owner_channel(rx, id));
    let ch = match ch {
        Ok(ch) => ch,
        Err(_) => return answer(rx, Err(Errno(libc::ENODEV))),
    };
    let io = match kind {
        Fwd::Write { offset, fua } => Io::Write {
            offset,
            buf: IoBuf::from_slice(&data),
            fua,
        },
        Fwd::Discard { offset, len } => Io::Discard { offset, len },
        Fwd::Zero { offset, len } => Io::WriteZeroes { offset, len },
        Fwd::Flush => Io::Flush,
    };
    ch.submit(
        rx,
        io,
        FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| answer(rx, res.map(drop))),
        0,
    );
}

impl Channel for RemoteChannel {
    fn geometry(&self) -> &Geometry {
        &self.h.geo
    }

    fn takes_kernel_bufs(&self, write: bool) -> bool {
        // Reads go to this reactor's own device channel (pieces, zero fill by io_uring);
        // writes travel to the owner as bytes.
        !write && self.data.takes_kernel_bufs(false)
    }

    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let size = self.h.shared.size.load(Ordering::Acquire);
        let valid = if size == self.h.geo.size_bytes {
            io.validate(&self.h.geo)
        } else {
            let mut g = self.h.geo.clone();
            g.size_bytes = size;
            io.validate(&g)
        };
        let write = matches!(
            io,
            Io::Write { .. } | Io::Discard { .. } | Io::WriteZeroes { .. }
        );
        let refuse = if let Err(e) = valid {
            Some(e)
        } else if self.h.shared.deleted.load(Ordering::Acquire) {
            Some(Errno(libc::ENODEV))
        } else if write && self.h.snapshot {
            Some(Errno(libc::EROFS))
        } else {
            None
        };
        if let Some(e) = refuse {
            return crate::bdev::fail_request(rx, cb, tag, e, io.into_buf());
        }
        let (io, cb, tag) = if self.qos.active() {
            match qos::gate(&self.rc(), rx, io, cb, tag) {
                Some(go) => go,
                None => return,
            }
        } else {
            (io, cb, tag)
        };
        self.admitted(rx, io, cb, tag);
    }
}

impl Throttled for RemoteChannel {
    fn limiter(&self) -> &Limiter {
        &self.qos
    }

    fn release(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if self.h.shared.deleted.load(Ordering::Acquire) {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::ENODEV), io.into_buf());
        }
        self.admitted(rx, io, cb, tag);
    }
}

impl RemoteChannel {
    /// A request past validation and QoS.
    fn admitted(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let was = self.in_submit.replace(true);
        match io {
            Io::Read { offset, buf } => self.read(rx, offset, buf, cb, tag),
            other => self.forward(rx, other, cb, tag),
        }
        self.in_submit.set(was);
    }
}

/// A completion from a closure (control-path and slow-path requests; the hot path uses the
/// channel's own slot table).
struct FnCompletion(RefCell<Option<IoDone>>);

impl FnCompletion {
    fn boxed(f: impl FnOnce(&Reactor, IoResult, Option<IoBuf>) + 'static) -> Rc<dyn Completion> {
        Rc::new(Self(RefCell::new(Some(Box::new(f)))))
    }
}

impl Completion for FnCompletion {
    fn complete(&self, rx: &Reactor, _tag: u64, res: IoResult, buf: Option<IoBuf>) {
        if let Some(f) = self.0.borrow_mut().take() {
            f(rx, res, buf);
        }
    }
}

/// One request of a volume in flight: the caller's completion and tag, the buffer, and how
/// many parts are outstanding.
struct Req {
    cb: Rc<dyn Completion>,
    tag: u64,
    buf: Option<IoBuf>,
    /// The buffer while it is lent out in pieces to several device IOs (`buf` is `None`
    /// then); back into `buf` when the request finishes.
    lent: Option<Rc<IoBuf>>,
    parts: u32,
    err: Option<Errno>,
    bytes: u32,
    /// A write-type request (counted in the volume's `writes`).
    write: bool,
    /// The request's last device IO, when the channel itself is its completion (see
    /// [`VolumeChannel::run_completion`]).
    run: Option<Run>,
}

/// The device IO that ends a request, completed by the channel itself (no closure):
/// segments `n` in physical clusters `pc0..pc0 + n`.
#[derive(Clone, Copy, Debug)]
struct Run {
    pc0: u32,
    n: u32,
    /// A FUA write whose mapping may not be durable yet: a journal flush follows.
    flush_after: bool,
}

/// A volume's (or snapshot's) IO path on the owner reactor.
pub struct VolumeChannel {
    me: Weak<VolumeChannel>,
    rt: Rc<PoolRt>,
    /// QoS (none on the owner's channel for forwarded requests: limited where they entered).
    qos: Option<Limiter>,
    vol: Rc<VolRt>,
    geo: Geometry,
    reqs: RefCell<ReqTable<Req>>,
    /// Inside `submit`: completions are deferred to the reactor loop.
    in_submit: Cell<bool>,
}

impl fmt::Debug for VolumeChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeChannel")
            .field("volume", &self.vol.id)
            .finish()
    }
}

/// A piece of a request inside one cluster.
#[derive(Clone, Copy, Debug)]
struct Seg {
    lc: u64,
    in_cluster: u64,
    /// Offset within the request's buffer.
    buf_off: usize,
    len: usize,
}

/// What a segment writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegOp {
    /// The request's bytes.
    Data { fua: bool },
    /// Zeroes (the partial ends of a write-zeroes).
    Zeroes,
}

/// The consecutive segments `segs` of one request as one piece (one device IO).
fn joined(segs: &[Seg]) -> Seg {
    let first = segs[0];
    Seg {
        len: segs.iter().map(|s| s.len).sum(),
        ..first
    }
}

/// The pieces of the request `[offset, offset + len)`, one per cluster it touches, in
/// order; computed as they are taken (no allocation per IO).
fn segments(offset: u64, len: u64, cluster: u64) -> Segments {
    Segments {
        start: offset,
        pos: offset,
        end: offset + len,
        cluster,
    }
}

/// Iterator of [`segments`].
struct Segments {
    start: u64,
    pos: u64,
    end: u64,
    cluster: u64,
}

impl Iterator for Segments {
    type Item = Seg;

    fn next(&mut self) -> Option<Seg> {
        if self.pos >= self.end {
            return None;
        }
        let lc = self.pos / self.cluster;
        let in_cluster = self.pos % self.cluster;
        let n = (self.cluster - in_cluster).min(self.end - self.pos);
        let seg = Seg {
            lc,
            in_cluster,
            buf_off: usize::try_from(self.pos - self.start).expect("IO length fits memory"),
            len: usize::try_from(n).expect("IO length fits memory"),
        };
        self.pos += n;
        Some(seg)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.pos >= self.end {
            0
        } else {
            usize::try_from((self.end - 1) / self.cluster - self.pos / self.cluster + 1)
                .expect("IO length fits memory")
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for Segments {}

/// Hasher for the IO path's maps keyed by cluster numbers: FxHash's rotate-xor-multiply
/// per word instead of SipHash's rounds. Keys are bounded by what is in flight, so a
/// tenant choosing colliding logical clusters makes at most a queue depth's worth of
/// probes, not an attack.
#[derive(Clone, Copy, Default)]
struct IntHasher(u64);

impl IntHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.add(u64::from(*b));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

/// A `HashMap` with [`IntHasher`].
type IntMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IntHasher>>;

impl VolumeChannel {
    fn rc(&self) -> Rc<VolumeChannel> {
        self.me.upgrade().expect("channel alive while it has IO")
    }

    /// Ends one part of request `slot`; the last part completes the caller's request.
    fn part_done(&self, rx: &Reactor, slot: usize, res: Result<(), Errno>) {
        let done = {
            let mut reqs = self.reqs.borrow_mut();
            let Some(r) = reqs.get_mut(slot) else { return };
            if let Err(e) = res {
                r.err.get_or_insert(e);
            }
            r.parts -= 1;
            r.parts == 0
        };
        if done {
            let mut r = self.reqs.borrow_mut().take(slot).expect("request present");
            // Every part is done and each dropped its piece in `seg_done`.
            take_back_lent(&mut r.lent, &mut r.buf, &mut r.err);
            let res = match r.err {
                Some(e) => Err(e),
                None => Ok(r.bytes),
            };
            if r.write {
                self.vol.write_end(rx);
            }
            if self.in_submit.get() {
                // Completed inside `submit` (unmapped reads, nothing to unmap, ENOSPC):
                // through the reactor's software completions, never re-entrantly.
                crate::bdev::complete_soft(rx, r.cb, r.tag, res, r.buf);
            } else {
                r.cb.complete(rx, r.tag, res, r.buf);
            }
        }
    }

    fn read_seg(&self, rx: &Reactor, slot: usize, seg: Seg) {
        let Some(m) = self.vol.map.get(seg.lc) else {
            let mut b = self.seg_buf(slot, seg);
            if let Some(bytes) = b.as_mut_slice() {
                bytes.fill(0);
                self.seg_done(slot, Some(b));
                return self.part_done(rx, slot, Ok(()));
            }
            // A kernel buffer (ublk zero copy): zeroes only by an io_uring read.
            let me = self.rc();
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf: Option<IoBuf>| {
                me.seg_done(slot, buf);
                me.part_done(rx, slot, res.map(drop));
            });
            return crate::bdev::zero_fill(rx, b, cb, 0);
        };
        self.read_run(rx, slot, &[seg], m.pc);
    }

    /// Reads a request of several clusters: segments mapped to consecutive physical
    /// clusters share one device read (a sequential volume reads as the raw device does);
    /// unmapped ones read zeroes.
    fn read_segs(&self, rx: &Reactor, slot: usize, segs: Segments) {
        let mut run: Vec<Seg> = Vec::new();
        let mut run_pc = 0u32;
        for seg in segs {
            let m = self.vol.map.get(seg.lc);
            if let Some(m) = m {
                let next = u32::try_from(run.len())
                    .ok()
                    .and_then(|n| run_pc.checked_add(n));
                if !run.is_empty() && next == Some(m.pc) {
                    run.push(seg);
                    continue;
                }
            }
            if !run.is_empty() {
                self.read_run(rx, slot, &run, run_pc);
                run.clear();
            }
            match m {
                Some(m) => {
                    run_pc = m.pc;
                    run.push(seg);
                }
                None => self.read_seg(rx, slot, seg),
            }
        }
        if !run.is_empty() {
            self.read_run(rx, slot, &run, run_pc);
        }
    }

    /// One device read for `segs` (consecutive pieces of request `slot`), mapped to the
    /// physical clusters `pc0`, `pc0 + 1`, ...; each segment ends as a part of the request.
    fn read_run(&self, rx: &Reactor, slot: usize, segs: &[Seg], pc0: u32) {
        let n = u32::try_from(segs.len()).expect("segments of one IO fit u32");
        for pc in pc0..pc0 + n {
            self.rt.io_start(pc);
        }
        let run = Run {
            pc0,
            n,
            flush_after: false,
        };
        let io = Io::Read {
            offset: self.rt.phys(pc0, segs[0].in_cluster),
            buf: self.seg_buf(slot, joined(segs)),
        };
        let (cb, tag) = self.run_completion(slot, run);
        self.rt.data.submit(rx, io, cb, tag);
    }

    /// The buffer for `seg`'s device IO: the request's own buffer when the segment is the
    /// whole request (the common single-cluster IO), else a piece of it (reads land and
    /// writes are taken in place, no copy); a new zeroed buffer when the request has none.
    fn seg_buf(&self, slot: usize, seg: Seg) -> IoBuf {
        let mut reqs = self.reqs.borrow_mut();
        let Some(r) = reqs.get_mut(slot) else {
            return IoBuf::alloc(seg.len);
        };
        if r.lent.is_none() {
            let Some(b) = r.buf.take() else {
                return IoBuf::alloc(seg.len);
            };
            if seg.buf_off == 0 && b.len() == seg.len {
                return b;
            }
            r.lent = Some(Rc::new(b));
        }
        let whole = r.lent.as_ref().expect("lent above");
        // the segments of one request are disjoint ranges of its buffer and each
        // has at most one device IO (so one piece) at a time; while lent, the buffer is
        // reached only through pieces, and it is taken back in `part_done` after every
        // part has finished and dropped its piece in `seg_done`.
        // SAFETY: the reasons above hold here.
        unsafe { IoBuf::piece(whole, seg.buf_off, seg.len) }
    }

    /// The device IO of a segment is done: a whole-request buffer goes back to the
    /// request; a piece (its bytes are already in place) or a scratch buffer is dropped.
    fn seg_done(&self, slot: usize, buf: Option<IoBuf>) {
        let Some(b) = buf.filter(|b| !b.is_piece()) else {
            return;
        };
        if let Some(r) = self.reqs.borrow_mut().get_mut(slot) {
            if r.buf.is_none() && r.lent.is_none() {
                r.buf = Some(b);
            }
        }
    }

    fn write_seg(&self, rx: &Reactor, slot: usize, seg: Seg, op: SegOp) {
        let key = (self.vol.id, seg.lc);
        if let Some(waiters) = self.rt.allocating.borrow_mut().get_mut(&key) {
            let me = self.rc();
            waiters.push(Box::new(move |rx: &Reactor| {
                me.write_seg(rx, slot, seg, op)
            }));
            return;
        }
        let whole = seg.len as u64 == self.rt.cluster_bytes();
        let cur = self.vol.map.get(seg.lc);
        match cur {
            None if op == SegOp::Zeroes => self.part_done(rx, slot, Ok(())),
            Some(m) if !self.rt.shared(&self.vol, seg.lc, m) => {
                self.write_in_place(rx, slot, seg, op, m)
            }
            Some(_) if !whole || op == SegOp::Zeroes => {
                // Part of a shared cluster: copy it up, then write in place.
                let me = self.rc();
                self.rt.copy_up(
                    rx,
                    &self.vol,
                    seg.lc,
                    Box::new(move |rx: &Reactor, r: Result<(), Errno>| match r {
                        Ok(()) if op == (SegOp::Data { fua: true }) => {
                            // The FUA write lands in the copy: the copy's record must be
                            // durable first, or power loss maps the old cluster back.
                            let me2 = Rc::clone(&me);
                            me.rt.journal.flush(
                                rx,
                                Box::new(move |rx: &Reactor, r: Result<u64, Errno>| match r {
                                    Ok(_) => me2.write_seg(rx, slot, seg, op),
                                    Err(e) => me2.part_done(rx, slot, Err(e)),
                                }),
                            );
                        }
                        Ok(()) => me.write_seg(rx, slot, seg, op),
                        Err(e) => me.part_done(rx, slot, Err(e)),
                    }),
                );
            }
            _ => self.write_new(rx, slot, seg, op, cur.is_some()),
        }
    }

    fn write_in_place(&self, rx: &Reactor, slot: usize, seg: Seg, op: SegOp, m: Mapping) {
        self.write_in_place_run(rx, slot, &[seg], op, m.pc);
    }

    /// One device write for `segs` (consecutive pieces of request `slot`) in place, in
    /// the physical clusters `pc0`, `pc0 + 1`, ... they are mapped to (none shared).
    fn write_in_place_run(&self, rx: &Reactor, slot: usize, segs: &[Seg], op: SegOp, pc0: u32) {
        let n = u32::try_from(segs.len()).expect("segments of one IO fit u32");
        for pc in pc0..pc0 + n {
            self.rt.io_start(pc);
        }
        // A FUA write is durable only with the record that maps its cluster: if that
        // record may not be flushed yet (it completed after the last flush began), the
        // write is followed by a journal flush before it is acknowledged.
        let flush_after = matches!(op, SegOp::Data { fua: true })
            && self.rt.journal.flushed_seq() < self.rt.journal.completed_seq();
        let seg = joined(segs);
        let offset = self.rt.phys(pc0, seg.in_cluster);
        let io = match op {
            SegOp::Data { fua } => Io::Write {
                offset,
                buf: self.seg_buf(slot, seg),
                fua,
            },
            SegOp::Zeroes => Io::WriteZeroes {
                offset,
                len: seg.len as u64,
            },
        };
        let (cb, tag) = self.run_completion(
            slot,
            Run {
                pc0,
                n,
                flush_after,
            },
        );
        self.rt.data.submit(rx, io, cb, tag);
    }

    /// Writes a request of several clusters. Runs of segments that go in place into
    /// consecutive physical clusters share one device write; so do runs of whole-cluster
    /// first writes whose new clusters come out of the allocator consecutively (a
    /// sequential writer's common case), each segment still journaling its own mapping
    /// (one group commit). Everything else goes segment by segment (`write_seg`).
    fn write_segs(&self, rx: &Reactor, slot: usize, segs: Segments, fua: bool) {
        let op = SegOp::Data { fua };
        let mut run: Vec<Seg> = Vec::new();
        // In place: the first segment's physical cluster; new: `None`.
        let mut run_pc: Option<u32> = None;
        let flush = |me: &Self, run: &mut Vec<Seg>, run_pc: Option<u32>| {
            if run.is_empty() {
                return;
            }
            match run_pc {
                Some(pc0) => me.write_in_place_run(rx, slot, run, op, pc0),
                None => me.write_new_segs(rx, slot, run, fua),
            }
            run.clear();
        };
        for seg in segs {
            let key = (self.vol.id, seg.lc);
            let busy = self.rt.allocating.borrow().contains_key(&key);
            let whole = seg.len as u64 == self.rt.cluster_bytes();
            let kind = match self.vol.map.get(seg.lc) {
                _ if busy => None,
                None if whole => Some(None),
                Some(m) if !self.rt.shared(&self.vol, seg.lc, m) => Some(Some(m.pc)),
                _ => None,
            };
            let extends = match (kind, run_pc) {
                (Some(None), None) => !run.is_empty(),
                (Some(Some(pc)), Some(pc0)) => {
                    u32::try_from(run.len())
                        .ok()
                        .and_then(|n| pc0.checked_add(n))
                        == Some(pc)
                }
                _ => false,
            };
            if extends {
                run.push(seg);
                continue;
            }
            flush(self, &mut run, run_pc);
            match kind {
                Some(pc) => {
                    run_pc = pc;
                    run.push(seg);
                }
                None => self.write_seg(rx, slot, seg, op),
            }
        }
        flush(self, &mut run, run_pc);
    }

    /// First writes of whole clusters `segs` (consecutive, unmapped, not being
    /// allocated): allocates a cluster for each and writes each run of consecutive new
    /// clusters with one device write. A segment the allocator cannot serve at once goes
    /// through `write_seg` (which waits for the pipeline or fails with ENOSPC).
    fn write_new_segs(&self, rx: &Reactor, slot: usize, segs: &[Seg], fua: bool) {
        let mut pcs: Vec<u32> = Vec::with_capacity(segs.len());
        for _ in segs {
            match self.rt.try_alloc(rx, &self.vol) {
                Ok(Some(pc)) => pcs.push(pc),
                _ => break,
            }
        }
        let mut start = 0;
        for i in 1..=pcs.len() {
            if i == pcs.len() || pcs[i - 1].checked_add(1) != Some(pcs[i]) {
                self.write_new_run(rx, slot, &segs[start..i], pcs[start], fua, false);
                start = i;
            }
        }
        for &seg in &segs[pcs.len()..] {
            self.write_seg(rx, slot, seg, SegOp::Data { fua });
        }
    }

    /// Writes `seg` (data) into a newly allocated cluster: a first write, or a whole-cluster
    /// write over a shared one (`replacing`: then the data must be durable before its
    /// record, as for a copy-up).
    fn write_new(&self, rx: &Reactor, slot: usize, seg: Seg, op: SegOp, replacing: bool) {
        let SegOp::Data { fua } = op else {
            return self.part_done(rx, slot, Ok(()));
        };
        let pc = match self.rt.try_alloc(rx, &self.vol) {
            Ok(Some(pc)) => pc,
            Ok(None) => {
                let me = self.rc();
                return self.rt.park_alloc(
                    rx,
                    Box::new(move |rx: &Reactor| me.write_seg(rx, slot, seg, op)),
                );
            }
            Err(e) => return self.part_done(rx, slot, Err(e)),
        };
        self.write_new_run(rx, slot, &[seg], pc, fua, replacing);
    }

    /// Writes `segs` (consecutive pieces of request `slot`) into the newly allocated
    /// clusters `pc0`, `pc0 + 1`, ... with one device write; then each segment journals
    /// its mapping (they share the group commit) and ends as a part of the request.
    fn write_new_run(
        &self,
        rx: &Reactor,
        slot: usize,
        segs: &[Seg],
        pc0: u32,
        fua: bool,
        replacing: bool,
    ) {
        // The segments of one request are consecutive logical clusters.
        let lcs = segs[0].lc..segs[0].lc + segs.len() as u64;
        for lc in lcs.clone() {
            self.rt
                .allocating
                .borrow_mut()
                .insert((self.vol.id, lc), Vec::new());
            self.rt.bump(|s| s.allocations += 1);
        }
        let me = self.rc();
        let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf| {
            me.seg_done(slot, buf);
            for (pc, lc) in (pc0..).zip(lcs.clone()) {
                if let Err(e) = res {
                    me.rt.abandon(rx, pc, (me.vol.id, lc));
                    me.part_done(rx, slot, Err(e));
                    continue;
                }
                let me2 = Rc::clone(&me);
                me.rt.journal_mapping(
                    rx,
                    &me.vol,
                    lc,
                    pc,
                    true,
                    Box::new(move |rx: &Reactor, r: Result<(), Errno>| match r {
                        Ok(()) if fua => {
                            // The record must survive power loss too: one (shared) flush.
                            let me3 = Rc::clone(&me2);
                            me2.rt.journal.flush(
                                rx,
                                Box::new(move |rx: &Reactor, r: Result<u64, Errno>| {
                                    me3.part_done(rx, slot, r.map(drop))
                                }),
                            );
                        }
                        r => me2.part_done(rx, slot, r),
                    }),
                );
            }
        });
        let seg = joined(segs);
        let io = Io::Write {
            offset: self.rt.phys(pc0, seg.in_cluster),
            buf: self.seg_buf(slot, seg),
            fua: fua || replacing,
        };
        self.rt.data.submit(rx, io, cb, 0);
    }

    /// Unmaps whole clusters of `[offset, offset+len)`; `zero_partials` writes zeroes into
    /// the mapped parts of partial clusters (write-zeroes, copying shared ones up first),
    /// else leaves them (discard).
    fn unmap_range(&self, rx: &Reactor, slot: usize, offset: u64, len: u64, zero_partials: bool) {
        let cluster = self.rt.cluster_bytes();
        let mut records = Vec::new();
        let mut lcs = Vec::new();
        for seg in segments(offset, len, cluster) {
            if self.vol.map.get(seg.lc).is_none() {
                continue;
            }
            if seg.len as u64 == cluster {
                records.push(Record::Unmap {
                    vol: self.vol.id,
                    lc: seg.lc,
                });
                lcs.push(seg.lc);
            } else if zero_partials {
                self.add_parts(slot, 1);
                self.write_seg(rx, slot, seg, SegOp::Zeroes);
            }
        }
        if records.is_empty() {
            return self.part_done(rx, slot, Ok(()));
        }
        let me = self.rc();
        self.rt.journal.append(
            rx,
            records,
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                if let Ok(seq) = res {
                    for lc in lcs {
                        me.rt.clear_mapping(&me.vol, lc, seq);
                    }
                    me.rt.kick_recycle(rx);
                }
                me.part_done(rx, slot, res.map(drop));
            }),
        );
    }

    fn add_parts(&self, slot: usize, n: u32) {
        if let Some(r) = self.reqs.borrow_mut().get_mut(slot) {
            r.parts += n;
        }
    }

    fn new_req(
        &self,
        cb: Rc<dyn Completion>,
        tag: u64,
        buf: Option<IoBuf>,
        parts: usize,
        bytes: u32,
        write: bool,
    ) -> usize {
        if write {
            self.vol.writes.set(self.vol.writes.get() + 1);
        }
        self.reqs.borrow_mut().insert(Req {
            cb,
            tag,
            buf,
            lent: None,
            parts: u32::try_from(parts).expect("segments of one IO fit u32"),
            err: None,
            bytes,
            write,
            run: None,
        })
    }

    /// The completion of a run's device IO: the channel itself when the run ends its
    /// request (the common single-cluster IO: no allocation per IO), else a closure.
    /// `slot` has `parts` outstanding = the run's segments plus those not yet issued, so
    /// `parts == n` means nothing else of the request is in flight or still to come.
    fn run_completion(&self, slot: usize, run: Run) -> (Rc<dyn Completion>, u64) {
        let fast = {
            let mut reqs = self.reqs.borrow_mut();
            match reqs.get_mut(slot) {
                Some(r) if r.parts == run.n && r.run.is_none() => {
                    r.run = Some(run);
                    true
                }
                _ => false,
            }
        };
        if fast {
            return (self.rc(), slot as u64);
        }
        let me = self.rc();
        let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf: Option<IoBuf>| {
            me.run_done(rx, slot, run, res, buf);
        });
        (cb, 0)
    }

    /// A run's device IO is done: its clusters' IO counts drop, its segments end as parts
    /// of request `slot` (after a journal flush for a FUA write that needs one).
    fn run_done(&self, rx: &Reactor, slot: usize, run: Run, res: IoResult, buf: Option<IoBuf>) {
        let Run {
            pc0,
            n,
            flush_after,
        } = run;
        for pc in pc0..pc0 + n {
            self.rt.io_end(rx, pc);
        }
        self.seg_done(slot, buf);
        if flush_after && res.is_ok() {
            let me = self.rc();
            return self.rt.journal.flush(
                rx,
                Box::new(move |rx: &Reactor, r: Result<u64, Errno>| {
                    let r = r.map(drop);
                    for _ in 0..n {
                        me.part_done(rx, slot, r);
                    }
                }),
            );
        }
        let res = res.map(drop);
        for _ in 0..n {
            self.part_done(rx, slot, res);
        }
    }
}

impl Completion for VolumeChannel {
    /// The device IO of a request's last run (`run_completion`); `tag` is its slot.
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>) {
        let Ok(slot) = usize::try_from(tag) else {
            return;
        };
        let run = self
            .reqs
            .borrow_mut()
            .get_mut(slot)
            .and_then(|r| r.run.take());
        if let Some(run) = run {
            self.run_done(rx, slot, run, res, buf);
        }
    }
}

impl Channel for VolumeChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn takes_kernel_bufs(&self, write: bool) -> bool {
        // Data moves between the request's buffer (or its pieces) and the device only:
        // copy-ups use their own buffer, unmapped reads are zero-filled by io_uring.
        self.rt.data.takes_kernel_bufs(write)
    }

    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let size = self.vol.size.get();
        let valid = if size == self.geo.size_bytes {
            io.validate(&self.geo)
        } else {
            // Grown online since the channel was opened.
            let mut g = self.geo.clone();
            g.size_bytes = size;
            io.validate(&g)
        };
        if let Err(e) = valid {
            return crate::bdev::fail_request(rx, cb, tag, e, io.into_buf());
        }
        if rx.id() != self.rt.owner {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::EXDEV), io.into_buf());
        }
        if self.vol.deleted.get() {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::ENODEV), io.into_buf());
        }
        let write = matches!(
            io,
            Io::Write { .. } | Io::Discard { .. } | Io::WriteZeroes { .. }
        );
        if write && self.vol.snapshot {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::EROFS), io.into_buf());
        }
        let (io, cb, tag) = match &self.qos {
            Some(q) if q.active() => match qos::gate(&self.rc(), rx, io, cb, tag) {
                Some(go) => go,
                None => return,
            },
            _ => (io, cb, tag),
        };
        self.admitted(rx, io, cb, tag);
    }
}

impl Throttled for VolumeChannel {
    fn limiter(&self) -> &Limiter {
        self.qos.as_ref().expect("only a limited channel throttles")
    }

    fn release(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if self.vol.deleted.get() {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::ENODEV), io.into_buf());
        }
        let was = self.in_submit.replace(true);
        self.admitted(rx, io, cb, tag);
        self.in_submit.set(was);
    }
}

impl VolumeChannel {
    /// A request past validation and QoS: parks while the volume is frozen, else runs.
    fn admitted(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let write = matches!(
            io,
            Io::Write { .. } | Io::Discard { .. } | Io::WriteZeroes { .. }
        );
        if write && self.vol.frozen.get() > 0 {
            let me = self.rc();
            self.vol
                .parked
                .borrow_mut()
                .push(Box::new(move |rx: &Reactor| {
                    if me.vol.deleted.get() {
                        return crate::bdev::fail_request(
                            rx,
                            cb,
                            tag,
                            Errno(libc::ENODEV),
                            io.into_buf(),
                        );
                    }
                    me.admitted(rx, io, cb, tag);
                }));
            return;
        }
        let was = self.in_submit.replace(true);
        self.dispatch(rx, io, cb, tag);
        self.in_submit.set(was);
    }

    fn dispatch(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let cluster = self.rt.cluster_bytes();
        match io {
            Io::Read { offset, buf } => {
                let segs = segments(offset, buf.len() as u64, cluster);
                let n = segs.len();
                let bytes = u32::try_from(buf.len()).expect("validated length");
                let slot = self.new_req(cb, tag, Some(buf), n, bytes, false);
                if n == 1 {
                    for s in segs {
                        self.read_seg(rx, slot, s);
                    }
                } else {
                    self.read_segs(rx, slot, segs);
                }
            }
            Io::Write { offset, buf, fua } => {
                let segs = segments(offset, buf.len() as u64, cluster);
                let n = segs.len();
                let bytes = u32::try_from(buf.len()).expect("validated length");
                let slot = self.new_req(cb, tag, Some(buf), n, bytes, true);
                if n == 1 {
                    for s in segs {
                        self.write_seg(rx, slot, s, SegOp::Data { fua });
                    }
                } else {
                    self.write_segs(rx, slot, segs, fua);
                }
            }
            Io::Flush => {
                let slot = self.new_req(cb, tag, None, 1, 0, false);
                let me = self.rc();
                self.rt.journal.flush(
                    rx,
                    Box::new(move |rx: &Reactor, r: Result<u64, Errno>| {
                        me.part_done(rx, slot, r.map(drop))
                    }),
                );
            }
            Io::Discard { offset, len } | Io::WriteZeroes { offset, len } => {
                let zero = matches!(io, Io::WriteZeroes { .. });
                let slot = self.new_req(cb, tag, None, 1, 0, true);
                self.unmap_range(rx, slot, offset, len, zero);
            }
        }
    }
}

#[cfg(test)]
mod tests;
