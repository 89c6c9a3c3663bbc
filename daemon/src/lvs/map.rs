//! A volume's cluster map: logical cluster → physical cluster, readable from
//! every reactor without a lock, written by the pool's owner reactor only.
//!
//! Two levels: a top array of leaf pointers and leaves of [`LEAF_ENTRIES`] atomic entries,
//! allocated when the first entry in their range is mapped (a thin volume pays for what it
//! maps). Growing the volume installs a larger top array; the old one is retired, not
//! freed, until the map is dropped, so a reader that loaded it a moment ago still reads
//! valid memory (the cost: at most the sum of a geometric series of small arrays).
//!
//! **Shared leaves** (snapshots and clones, dm-thin's idea at the leaf level): a leaf
//! carries a count of the maps whose top points to it. [`ClusterMap::share`] makes a new
//! map pointing to the same leaves — O(size / `LEAF_ENTRIES`) pointer copies, no entry is
//! touched — and the first change through either map to a shared leaf copies that leaf
//! (copy-on-write of metadata). Every map stays a complete two-level lookup, so reads never
//! get slower as snapshots accumulate. The entries of a copied leaf are now held by one
//! more leaf: the mutating methods report each of them to the caller (`on_copy`), which
//! keeps the physical clusters' reference counts (`alloc.rs`).
//!
//! Entry encoding: a `u32`, `0` = unmapped, else physical + 1 (pools have fewer than
//! 2^32 - 1 clusters), so a mapped cluster costs 4 bytes of leaf.
//!
//! Readers on other reactors may hold a leaf pointer for the length of one lookup. A leaf
//! that no map holds any more is therefore not freed at once when the map has a
//! [`LeafRetire`]: it is queued there, and the pool frees the queue after a grace period in
//! which every such reader finished (volume.rs, `Grace`).
//!
//! Must never: be written from two threads (the owner reactor is the only writer), free a
//! top array while the map lives, or free a leaf that a reader may still hold.

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Leaves no map holds any more, waiting for a grace period before they are freed.
#[derive(Debug, Default)]
pub struct LeafRetire {
    queue: Mutex<Vec<usize>>,
}

/// A batch of retired leaves; dropping it frees them. Hold it until every reader that
/// could have loaded one of them has finished.
#[derive(Debug, Default)]
pub struct RetiredLeaves(Vec<usize>);

impl RetiredLeaves {
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for RetiredLeaves {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            // each pointer came from `Leaf::new_raw`, reached zero references
            // (no top array points to it) and was queued once; the holder waited for a
            // grace period, so no reader still uses it.
            // SAFETY: the reasons above hold here.
            drop(unsafe { Box::from_raw(p as *mut Leaf) });
        }
    }
}

impl LeafRetire {
    /// A new, empty queue.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn push(&self, p: *mut Leaf) {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(p as usize);
    }

    /// Takes every leaf retired so far.
    pub fn take(&self) -> RetiredLeaves {
        RetiredLeaves(std::mem::take(
            &mut *self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

impl Drop for LeafRetire {
    fn drop(&mut self) {
        // The queue goes when every map and channel sharing it has gone: no reader left.
        drop(self.take());
    }
}

/// Entries per leaf (4 KiB of entries): small enough that copying a shared leaf on the
/// first write after a snapshot is cheap, large enough that sharing a 1 TiB map is 16 Ki
/// pointer copies.
pub const LEAF_ENTRIES: usize = 1024;

struct Leaf {
    /// Maps whose top points to this leaf.
    refs: AtomicU32,
    e: [AtomicU32; LEAF_ENTRIES],
}

impl Leaf {
    fn new_raw() -> *mut Leaf {
        Box::into_raw(Box::new(Leaf {
            refs: AtomicU32::new(1),
            e: std::array::from_fn(|_| AtomicU32::new(0)),
        }))
    }
}

type Top = Box<[AtomicPtr<Leaf>]>;

/// How many leaves ahead [`ClusterMap::share`] prefetches.
const SHARE_PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to bring the cache line at `p` in (a hint: never faults, even for null or
/// freed memory, and changes nothing).
#[inline]
fn prefetch(p: *const Leaf) {
    // PREFETCHT0 does not access memory architecturally, whatever address it is given.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: so it cannot fault and has no effect on program state.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// One mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Physical cluster.
    pub pc: u32,
}

impl Mapping {
    fn encode(self) -> u32 {
        assert!(
            self.pc < u32::MAX,
            "physical cluster {} out of range (pools have < 2^32 - 1 clusters)",
            self.pc
        );
        self.pc + 1
    }

    fn decode(v: u32) -> Option<Self> {
        (v != 0).then(|| Self { pc: v - 1 })
    }
}

/// The map. Share it as `Arc<ClusterMap>` with the reactors that read it.
#[derive(Debug)]
pub struct ClusterMap {
    top: AtomicPtr<Top>,
    /// Logical clusters addressable now.
    len: AtomicU64,
    /// Top arrays replaced by growth; freed on drop. Touched only by the writer.
    retired: Mutex<Vec<*mut Top>>,
    /// Where leaves this map drops last go (readers on other reactors), if any.
    retire: OnceLock<Arc<LeafRetire>>,
}

// SAFETY: every field is accessed through atomics or the mutex; the raw pointers point to
// heap memory owned by the map (leaves: shared with other maps, counted) and freed only when
// the last owner lets go (see the module's "Must never").
unsafe impl Send for ClusterMap {}
// SAFETY: as for Send: shared access goes through atomics; the single-writer rule is a
// documented contract of the mutating methods, which only ever make entries change between
// valid values.
unsafe impl Sync for ClusterMap {}

fn new_top(leaves: usize) -> *mut Top {
    let top: Top = (0..leaves)
        .map(|_| AtomicPtr::new(std::ptr::null_mut()))
        .collect();
    Box::into_raw(Box::new(top))
}

fn leaves_for(clusters: u64) -> usize {
    usize::try_from(clusters.div_ceil(LEAF_ENTRIES as u64)).expect("leaf count fits memory")
}

/// Drops one map's reference to leaf `p`; the last one frees it, first reporting each
/// mapped entry to `on_unref`.
///
/// # Safety
/// `p` is a live leaf from `Leaf::new_raw` and the caller owns one of its references
/// (it has just removed `p` from a top array, or owns the whole map).
unsafe fn drop_leaf_ref(
    p: *mut Leaf,
    on_unref: &mut dyn FnMut(Mapping),
    retire: Option<&LeafRetire>,
) {
    // SAFETY: the caller's reference keeps `p` alive until this decrement.
    let leaf = unsafe { &*p };
    if leaf.refs.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    for e in &leaf.e {
        if let Some(m) = Mapping::decode(e.load(Ordering::Acquire)) {
            on_unref(m);
        }
    }
    match retire {
        Some(r) => r.push(p),
        // that was the last reference: no top array points to `p` any more, and
        // without a retire queue no reader outside the owner uses this map.
        // SAFETY: the reasons above hold here.
        None => drop(unsafe { Box::from_raw(p) }),
    }
}

impl ClusterMap {
    /// An empty map for `clusters` logical clusters.
    pub fn new(clusters: u64) -> Self {
        Self {
            top: AtomicPtr::new(new_top(leaves_for(clusters).max(1))),
            len: AtomicU64::new(clusters),
            retired: Mutex::new(Vec::new()),
            retire: OnceLock::new(),
        }
    }

    /// Sends leaves this map drops last to `retire` instead of freeing them (set once,
    /// before the map is shared with readers on other reactors; maps made by `share`
    /// inherit it).
    pub fn set_retire(&self, retire: Arc<LeafRetire>) {
        let _ = self.retire.set(retire);
    }

    fn retire_queue(&self) -> Option<&LeafRetire> {
        self.retire.get().map(|r| &**r)
    }

    /// A new map with the same length and contents that shares every leaf with this one
    /// (a snapshot or clone). Owner reactor only. Costs one pointer copy per leaf.
    pub fn share(&self) -> ClusterMap {
        let len = self.len();
        let src = self.top();
        let new = new_top(src.len());
        // SAFETY: `new` was just created and is not shared yet.
        let dst = unsafe { &*new };
        for (i, (d, s)) in dst.iter().zip(src.iter()).enumerate() {
            // Each leaf's count sits in its own cache line, usually cold: a locked increment
            // waits for its miss, so misses would come one at a time (a 1 Mi-cluster map
            // took ~70 µs); prefetching a few leaves ahead overlaps them.
            if let Some(ahead) = src.get(i + SHARE_PREFETCH_AHEAD) {
                prefetch(ahead.load(Ordering::Acquire));
            }
            let p = s.load(Ordering::Acquire);
            // SAFETY: a non-null pointer in a live top is a live leaf (module contract).
            if let Some(leaf) = unsafe { p.as_ref() } {
                leaf.refs.fetch_add(1, Ordering::AcqRel);
                d.store(p, Ordering::Relaxed);
            }
        }
        let retire = OnceLock::new();
        if let Some(r) = self.retire.get() {
            let _ = retire.set(Arc::clone(r));
        }
        Self {
            top: AtomicPtr::new(new),
            len: AtomicU64::new(len),
            retired: Mutex::new(Vec::new()),
            retire,
        }
    }

    /// Logical clusters addressable.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Whether the map addresses no cluster.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn top(&self) -> &Top {
        // `top` always points to a live Top: installed from Box::into_raw, and a
        // replaced one is retired (kept alive) until Drop, which needs `&mut self`.
        // SAFETY: the reasons above hold here.
        unsafe { &*self.top.load(Ordering::Acquire) }
    }

    fn leaf(&self, lc: u64) -> Option<(&Leaf, usize)> {
        if lc >= self.len() {
            return None;
        }
        let idx = usize::try_from(lc).ok()?;
        let p = self.top().get(idx / LEAF_ENTRIES)?.load(Ordering::Acquire);
        // a non-null leaf pointer in a live top is a live leaf (module contract);
        // the Acquire load pairs with the Release store that published it.
        // SAFETY: the reasons above hold here.
        let leaf = unsafe { p.as_ref()? };
        Some((leaf, idx % LEAF_ENTRIES))
    }

    /// The mapping of logical cluster `lc`, if any. Lock-free; any thread.
    pub fn get(&self, lc: u64) -> Option<Mapping> {
        let (leaf, i) = self.leaf(lc)?;
        Mapping::decode(leaf.e[i].load(Ordering::Acquire))
    }

    /// Whether the leaf holding `lc` is shared with another map (a change through this map
    /// would copy it, and every mapping in it is shared).
    pub fn leaf_shared(&self, lc: u64) -> bool {
        self.leaf(lc)
            .is_some_and(|(l, _)| l.refs.load(Ordering::Acquire) > 1)
    }

    /// The leaf holding `lc`, private to this map: copied first when shared (each mapped
    /// entry of the copy goes to `on_copy`), created when absent and `create`.
    fn private_leaf(
        &self,
        lc: u64,
        create: bool,
        on_copy: &mut dyn FnMut(Mapping),
    ) -> Option<(&Leaf, usize)> {
        assert!(
            lc < self.len(),
            "map change at {lc} past {} clusters",
            self.len()
        );
        let idx = usize::try_from(lc).expect("checked against len");
        let slot = &self.top()[idx / LEAF_ENTRIES];
        let mut p = slot.load(Ordering::Acquire);
        if p.is_null() {
            if !create {
                return None;
            }
            p = Leaf::new_raw();
            slot.store(p, Ordering::Release);
        } else {
            // SAFETY: non-null pointers in a live top are live leaves.
            let old = unsafe { &*p };
            if old.refs.load(Ordering::Acquire) > 1 {
                let copy = Leaf::new_raw();
                // SAFETY: `copy` was just created and is not shared yet.
                let c = unsafe { &*copy };
                for (d, s) in c.e.iter().zip(old.e.iter()) {
                    let v = s.load(Ordering::Acquire);
                    if let Some(m) = Mapping::decode(v) {
                        on_copy(m);
                    }
                    d.store(v, Ordering::Relaxed);
                }
                slot.store(copy, Ordering::Release);
                // Shared: other maps still hold `old`, so this never frees it.
                old.refs.fetch_sub(1, Ordering::AcqRel);
                p = copy;
            }
        }
        // SAFETY: `p` is live: just published, or published earlier and held by this map.
        Some((unsafe { &*p }, idx % LEAF_ENTRIES))
    }

    /// Maps `lc`, returning what it mapped before. Owner reactor only. Panics if `lc` is
    /// past the map's length (callers check against the volume size first).
    pub fn set(&self, lc: u64, m: Mapping, on_copy: &mut dyn FnMut(Mapping)) -> Option<Mapping> {
        let (leaf, i) = self
            .private_leaf(lc, true, on_copy)
            .expect("created when absent");
        Mapping::decode(leaf.e[i].swap(m.encode(), Ordering::AcqRel))
    }

    /// Unmaps `lc`, returning what it mapped. Owner reactor only.
    pub fn clear(&self, lc: u64, on_copy: &mut dyn FnMut(Mapping)) -> Option<Mapping> {
        self.get(lc)?;
        let (leaf, i) = self.private_leaf(lc, false, on_copy)?;
        Mapping::decode(leaf.e[i].swap(0, Ordering::AcqRel))
    }

    /// Grows the map to `clusters`. Owner reactor only. Readers keep working throughout.
    pub fn grow(&self, clusters: u64) {
        if clusters <= self.len() {
            return;
        }
        let old = self.top();
        let want = leaves_for(clusters);
        if want > old.len() {
            // Double at least, so repeated small grows retire few arrays.
            let new = new_top(want.max(old.len() * 2));
            // SAFETY: `new` was just created and is not shared yet.
            let new_ref = unsafe { &*new };
            for (dst, src) in new_ref.iter().zip(old.iter()) {
                dst.store(src.load(Ordering::Acquire), Ordering::Relaxed);
            }
            let old_ptr = self.top.swap(new, Ordering::AcqRel);
            self.retired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(old_ptr);
        }
        self.len.store(clusters, Ordering::Release);
    }

    /// Drops every leaf of this map (a delete): leaves no other map holds are freed, and
    /// their mappings go to `on_unref`. The map is empty afterwards. Owner reactor only.
    pub fn release(&self, on_unref: &mut dyn FnMut(Mapping)) {
        for slot in self.top().iter() {
            let p = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: `p` came out of this map's top: the map owned one reference.
                unsafe { drop_leaf_ref(p, on_unref, self.retire_queue()) };
            }
        }
    }

    /// Makes this map's contents those of `src` (a rollback), sharing its leaves; this
    /// map's old leaves are dropped as by [`release`](Self::release). Clusters past `src`'s
    /// length read unmapped. Owner reactor only.
    pub fn replace_with(&self, src: &ClusterMap, on_unref: &mut dyn FnMut(Mapping)) {
        let (dst, s) = (self.top(), src.top());
        for (i, slot) in dst.iter().enumerate() {
            let np = s
                .get(i)
                .map_or(std::ptr::null_mut(), |p| p.load(Ordering::Acquire));
            // SAFETY: non-null pointers in a live top are live leaves.
            if let Some(l) = unsafe { np.as_ref() } {
                l.refs.fetch_add(1, Ordering::AcqRel);
            }
            let old = slot.swap(np, Ordering::AcqRel);
            if !old.is_null() {
                // SAFETY: `old` came out of this map's top: the map owned one reference.
                unsafe { drop_leaf_ref(old, on_unref, self.retire_queue()) };
            }
        }
    }

    /// Calls `f(lc, mapping)` for every mapped cluster in order (checkpoints, accounting).
    pub fn for_each(&self, mut f: impl FnMut(u64, Mapping)) {
        self.for_each_shared(|lc, m, _| f(lc, m));
    }

    /// Like [`for_each`](Self::for_each), also telling whether the entry's leaf is shared
    /// with another map.
    pub fn for_each_shared(&self, mut f: impl FnMut(u64, Mapping, bool)) {
        let len = self.len();
        for (li, slot) in self.top().iter().enumerate() {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: as in `leaf`: published leaves live while this map holds them.
            let Some(leaf) = (unsafe { p.as_ref() }) else {
                continue;
            };
            let shared = leaf.refs.load(Ordering::Acquire) > 1;
            for (i, e) in leaf.e.iter().enumerate() {
                let lc = (li * LEAF_ENTRIES + i) as u64;
                if lc >= len {
                    return;
                }
                if let Some(m) = Mapping::decode(e.load(Ordering::Acquire)) {
                    f(lc, m, shared);
                }
            }
        }
    }

    /// The leaves of this map: (leaf index, identity) for each present leaf. The identity
    /// is the same for maps sharing the leaf (checkpoints store a shared leaf once).
    pub fn leaf_ids(&self) -> Vec<(usize, usize)> {
        self.top()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let p = s.load(Ordering::Acquire);
                (!p.is_null()).then_some((i, p as usize))
            })
            .collect()
    }

    /// The mapped entries of leaf `index` as (slot, mapping), whatever this map's length
    /// (a leaf is shared as a whole).
    pub fn leaf_entries(&self, index: usize) -> Vec<(usize, Mapping)> {
        let p = self
            .top()
            .get(index)
            .map_or(std::ptr::null_mut(), |p| p.load(Ordering::Acquire));
        // SAFETY: a non-null pointer in a live top is a live leaf (module contract).
        let Some(leaf) = (unsafe { p.as_ref() }) else {
            return Vec::new();
        };
        leaf.e
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Mapping::decode(e.load(Ordering::Acquire)).map(|m| (i, m)))
            .collect()
    }

    /// Whether leaf `index` is present.
    pub fn has_leaf(&self, index: usize) -> bool {
        self.top()
            .get(index)
            .is_some_and(|p| !p.load(Ordering::Acquire).is_null())
    }

    /// Whether leaf `index` is the same leaf in both maps (both absent counts as the same).
    pub fn same_leaf(&self, other: &ClusterMap, index: usize) -> bool {
        let get = |m: &ClusterMap| {
            m.top()
                .get(index)
                .map_or(std::ptr::null_mut(), |p| p.load(Ordering::Acquire))
        };
        get(self) == get(other)
    }

    /// Makes leaf `index` of this map the same leaf as leaf `index` of `src` (import of a
    /// checkpoint that stores a shared leaf once). This map's slot must be empty. Owner only.
    pub fn adopt_leaf(&self, src: &ClusterMap, src_index: usize, index: usize) {
        let p = src.top()[src_index].load(Ordering::Acquire);
        // SAFETY: non-null pointers in a live top are live leaves.
        let Some(l) = (unsafe { p.as_ref() }) else {
            return;
        };
        let slot = &self.top()[index];
        assert!(
            slot.load(Ordering::Acquire).is_null(),
            "adopt into an empty slot"
        );
        l.refs.fetch_add(1, Ordering::AcqRel);
        slot.store(p, Ordering::Release);
    }

    /// Bytes of memory the map uses (top arrays, and leaves divided among the maps sharing
    /// them).
    pub fn memory_bytes(&self) -> usize {
        let top = self.top();
        let leaves: usize = top
            .iter()
            .map(|p| {
                // SAFETY: as in `leaf`.
                unsafe { p.load(Ordering::Acquire).as_ref() }.map_or(0, |l| {
                    std::mem::size_of::<Leaf>() / (l.refs.load(Ordering::Acquire).max(1) as usize)
                })
            })
            .sum();
        let retired: usize = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            // SAFETY: retired tops are alive until Drop.
            .map(|&t| unsafe { (&*t).len() } * std::mem::size_of::<AtomicPtr<Leaf>>())
            .sum();
        top.len() * std::mem::size_of::<AtomicPtr<Leaf>>() + leaves + retired
    }
}

impl Drop for ClusterMap {
    fn drop(&mut self) {
        let top = *self.top.get_mut();
        let retire = self.retire.get().cloned();
        // `&mut self`: no reader of this map is left. Each leaf pointer appears in
        // the current top exactly once (growth copies pointers into the new top) and this
        // map owns one reference to it; retired tops are freed below without their leaves.
        // SAFETY: the reasons above hold here.
        unsafe {
            for slot in (&*top).iter() {
                let p = slot.load(Ordering::Relaxed);
                if !p.is_null() {
                    drop_leaf_ref(p, &mut |_| {}, retire.as_deref());
                }
            }
            drop(Box::from_raw(top));
        }
        let retired = std::mem::take(
            self.retired
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in retired {
            // retired tops came from Box::into_raw and are freed once, here; their
            // leaves are owned by the current top and were handled above.
            // SAFETY: the reasons above hold here.
            drop(unsafe { Box::from_raw(t) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    proptest! {
        #[test]
        fn behaves_like_an_ordered_map(ops in prop::collection::vec((0u64..20_000, any::<u32>(), 0u8..4), 1..400)) {
            let map = ClusterMap::new(5000);
            let mut model = BTreeMap::new();
            for (lc, pc, what) in ops {
                match what {
                    0 | 1 if lc < map.len() => {
                        let m = Mapping { pc: pc % u32::MAX };
                        map.set(lc, m, &mut |_| {});
                        model.insert(lc, m);
                    }
                    2 => prop_assert_eq!(map.clear(lc, &mut |_| {}), model.remove(&lc)),
                    3 => map.grow(map.len() + lc),
                    _ => {}
                }
                prop_assert_eq!(map.get(lc), model.get(&lc).copied());
            }
            let mut seen = Vec::new();
            map.for_each(|lc, m| seen.push((lc, m)));
            prop_assert_eq!(seen, model.into_iter().collect::<Vec<_>>());
        }
    }

    /// Reference counts the way the pool keeps them: per physical cluster, the number of
    /// leaves holding it.
    #[derive(Default)]
    struct Refs(BTreeMap<u32, i64>);

    impl Refs {
        fn add(&mut self, pc: u32, d: i64) {
            *self.0.entry(pc).or_default() += d;
            if self.0[&pc] == 0 {
                self.0.remove(&pc);
            }
        }
    }

    proptest! {
        /// Several maps made by `share`, changed independently and released: each reads
        /// like its own model, and the counts reported through `on_copy` / returned /
        /// `on_unref` always equal the number of leaves holding each cluster.
        #[test]
        fn shared_maps_diverge_independently(ops in prop::collection::vec((0usize..4, 0u64..3000, 0u8..6), 1..300)) {
            let mut maps: Vec<(ClusterMap, BTreeMap<u64, Mapping>)> = vec![(ClusterMap::new(3000), BTreeMap::new())];
            let mut refs = Refs::default();
            let mut next_pc = 0u32;
            for (who, lc, what) in ops {
                let i = who % maps.len();
                match what {
                    0 | 1 => {
                        next_pc += 1;
                        let m = Mapping { pc: next_pc };
                        refs.add(next_pc, 1);
                        let (map, model) = &mut maps[i];
                        let old = map.set(lc, m, &mut |c| refs.add(c.pc, 1));
                        if let Some(o) = old { refs.add(o.pc, -1); }
                        prop_assert_eq!(old, model.insert(lc, m));
                    }
                    2 => {
                        let (map, model) = &mut maps[i];
                        let old = map.clear(lc, &mut |c| refs.add(c.pc, 1));
                        if let Some(o) = old { refs.add(o.pc, -1); }
                        prop_assert_eq!(old, model.remove(&lc));
                    }
                    3 if maps.len() < 6 => {
                        let copy = (maps[i].0.share(), maps[i].1.clone());
                        maps.push(copy);
                    }
                    4 if maps.len() > 1 => {
                        let (map, _) = maps.remove(i);
                        map.release(&mut |c| refs.add(c.pc, -1));
                    }
                    5 if maps.len() > 1 => {
                        let j = (i + 1) % maps.len();
                        let src_model = maps[j].1.clone();
                        let (dst, src) = if i < j {
                            let (a, b) = maps.split_at_mut(j);
                            (&a[i], &b[0])
                        } else {
                            let (a, b) = maps.split_at_mut(i);
                            (&b[0], &a[j])
                        };
                        dst.0.replace_with(&src.0, &mut |c| refs.add(c.pc, -1));
                        maps[i].1 = src_model;
                    }
                    _ => {}
                }
            }
            // Every map reads its model.
            let mut want = Refs::default();
            let mut seen_leaves = std::collections::HashSet::new();
            for (map, model) in &maps {
                let mut got = Vec::new();
                map.for_each(|lc, m| got.push((lc, m)));
                prop_assert_eq!(got, model.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
                for (li, id) in map.leaf_ids() {
                    if seen_leaves.insert(id) {
                        for lc in (li * LEAF_ENTRIES) as u64..((li + 1) * LEAF_ENTRIES) as u64 {
                            if let Some(m) = map.get(lc) { want.add(m.pc, 1); }
                        }
                    }
                }
            }
            prop_assert_eq!(&refs.0, &want.0);
            // Releasing everything returns every count to zero.
            let mut refs = want;
            for (map, _) in maps {
                map.release(&mut |c| refs.add(c.pc, -1));
            }
            prop_assert!(refs.0.is_empty(), "left: {:?}", refs.0);
        }
    }

    #[test]
    fn share_costs_pointer_copies_not_entries() {
        let map = ClusterMap::new(1 << 20);
        for lc in 0..(1u64 << 20) {
            map.set(
                lc,
                Mapping {
                    pc: u32::try_from(lc).expect("small"),
                },
                &mut |_| {},
            );
        }
        let snap = map.share();
        assert!(map.leaf_shared(0) && snap.leaf_shared(5));
        let mut copied = 0;
        map.set(7, Mapping { pc: 9_999_999 }, &mut |_| copied += 1);
        assert_eq!(copied, LEAF_ENTRIES, "the first change copies one leaf");
        assert!(
            !map.leaf_shared(7) && !snap.leaf_shared(7) && map.leaf_shared(LEAF_ENTRIES as u64)
        );
        assert_eq!(snap.get(7), Some(Mapping { pc: 7 }));
        assert_eq!(map.get(7), Some(Mapping { pc: 9_999_999 }));
        assert!(map.same_leaf(&snap, 3) && !map.same_leaf(&snap, 0));
    }

    #[test]
    fn readers_on_other_threads_see_only_values_the_writer_stored() {
        let map = Arc::new(ClusterMap::new(LEAF_ENTRIES as u64));
        let stop = Arc::new(AtomicBool::new(false));
        // The writer starts once both readers run, and each reader makes at least one
        // pass after that, so on a loaded machine the readers cannot miss the writes
        // altogether (they once read nothing before the writer had finished).
        let started = Arc::new(std::sync::Barrier::new(3));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (map, stop) = (Arc::clone(&map), Arc::clone(&stop));
                let started = Arc::clone(&started);
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    started.wait();
                    loop {
                        let done = stop.load(Ordering::Relaxed);
                        let len = map.len();
                        for lc in (0..len).step_by(977) {
                            if let Some(m) = map.get(lc) {
                                // The writer maps lc to pc = lc ^ 0x5a5a.
                                assert_eq!(
                                    m,
                                    Mapping {
                                        pc: u32::try_from(lc).expect("small") ^ 0x5a5a
                                    }
                                );
                            }
                            reads += 1;
                        }
                        if done {
                            break;
                        }
                    }
                    reads
                })
            })
            .collect();
        started.wait();
        for round in 1..=40u64 {
            map.grow(round * LEAF_ENTRIES as u64 * 3);
            for lc in (0..map.len()).step_by(31) {
                map.set(
                    lc,
                    Mapping {
                        pc: u32::try_from(lc).expect("small") ^ 0x5a5a,
                    },
                    &mut |_| {},
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(reads > 0);
        assert_eq!(map.get(31), Some(Mapping { pc: 31 ^ 0x5a5a }));
        assert_eq!(map.get(map.len()), None);
    }

    #[test]
    fn memory_grows_with_what_is_mapped_not_with_the_size() {
        let map = ClusterMap::new(1 << 24); // 16 Mi clusters = 1 TiB at 64 KiB
        let empty = map.memory_bytes();
        assert!(
            empty <= leaves_for(1 << 24) * 8 + 64,
            "an empty 1 TiB map costs only its top array: {empty}"
        );
        for lc in 0..LEAF_ENTRIES as u64 {
            map.set(lc, Mapping { pc: 1 }, &mut |_| {});
        }
        let full_leaf = map.memory_bytes() - empty;
        assert_eq!(
            full_leaf,
            LEAF_ENTRIES * 4 + 4,
            "4 bytes per mapped cluster in a full leaf, plus its reference count"
        );
    }
}
