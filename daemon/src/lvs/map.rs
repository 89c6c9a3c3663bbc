//! A volume's cluster map: logical cluster → (physical cluster, birth epoch), readable from
//! every reactor without a lock, written by the pool's owner reactor only.
//!
//! Two levels: a top array of leaf pointers and leaves of [`LEAF_ENTRIES`] atomic entries,
//! allocated when the first entry in their range is mapped (a thin volume pays for what it
//! maps: 8 bytes per mapped cluster's leaf slot). Growing the volume installs a larger top
//! array; the old one is retired, not freed, until the map is dropped, so a reader that
//! loaded it a moment ago still reads valid memory (the cost: at most the sum of a
//! geometric series of small arrays).
//!
//! Entry encoding: `0` = unmapped, else `(physical + 1) | epoch << 32`.
//!
//! Must never: be written from two threads (the owner reactor is the only writer), free a
//! leaf or a top array while the map lives.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

/// Entries per leaf (32 KiB of entries).
pub const LEAF_ENTRIES: usize = 4096;

type Leaf = [AtomicU64; LEAF_ENTRIES];
type Top = Box<[AtomicPtr<Leaf>]>;

/// One mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Physical cluster.
    pub pc: u32,
    /// Snapshot epoch the mapping was born in.
    pub epoch: u32,
}

impl Mapping {
    fn encode(self) -> u64 {
        assert!(
            self.pc < u32::MAX,
            "physical cluster {} out of range (pools have < 2^32 - 1 clusters)",
            self.pc
        );
        (u64::from(self.pc) + 1) | (u64::from(self.epoch) << 32)
    }

    fn decode(v: u64) -> Option<Self> {
        let low = v & 0xFFFF_FFFF;
        (low != 0).then(|| Self {
            pc: u32::try_from(low - 1).expect("low 32 bits minus one fit u32"),
            epoch: u32::try_from(v >> 32).expect("high 32 bits fit u32"),
        })
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
}

// SAFETY: every field is accessed through atomics or the mutex; the raw pointers point to
// heap memory owned by the map and freed only in Drop (after every reader has gone, since
// readers hold the map).
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

impl ClusterMap {
    /// An empty map for `clusters` logical clusters.
    pub fn new(clusters: u64) -> Self {
        Self {
            top: AtomicPtr::new(new_top(leaves_for(clusters).max(1))),
            len: AtomicU64::new(clusters),
            retired: Mutex::new(Vec::new()),
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
        // SAFETY: `top` always points to a live Top: installed from Box::into_raw, and a
        // replaced one is retired (kept alive) until Drop, which needs `&mut self`.
        unsafe { &*self.top.load(Ordering::Acquire) }
    }

    fn leaf(&self, lc: u64) -> Option<(&Leaf, usize)> {
        if lc >= self.len() {
            return None;
        }
        let idx = usize::try_from(lc).ok()?;
        let p = self.top().get(idx / LEAF_ENTRIES)?.load(Ordering::Acquire);
        // SAFETY: a non-null leaf pointer comes from Box::into_raw in `set` and is freed
        // only in Drop; the Acquire load pairs with the Release store that published it.
        let leaf = unsafe { p.as_ref()? };
        Some((leaf, idx % LEAF_ENTRIES))
    }

    /// The mapping of logical cluster `lc`, if any. Lock-free; any thread.
    pub fn get(&self, lc: u64) -> Option<Mapping> {
        let (leaf, i) = self.leaf(lc)?;
        Mapping::decode(leaf[i].load(Ordering::Acquire))
    }

    /// Maps `lc`. Owner reactor only. Panics if `lc` is past the map's length (callers
    /// check against the volume size first).
    pub fn set(&self, lc: u64, m: Mapping) {
        assert!(
            lc < self.len(),
            "map set at {lc} past {} clusters",
            self.len()
        );
        let idx = usize::try_from(lc).expect("checked against len");
        let slot = &self.top()[idx / LEAF_ENTRIES];
        let mut p = slot.load(Ordering::Acquire);
        if p.is_null() {
            let leaf: Box<Leaf> = Box::new(std::array::from_fn(|_| AtomicU64::new(0)));
            p = Box::into_raw(leaf);
            slot.store(p, Ordering::Release);
        }
        // SAFETY: `p` is a live leaf (just published, or published earlier and never freed
        // before Drop).
        let leaf = unsafe { &*p };
        leaf[idx % LEAF_ENTRIES].store(m.encode(), Ordering::Release);
    }

    /// Unmaps `lc`, returning what it mapped. Owner reactor only.
    pub fn clear(&self, lc: u64) -> Option<Mapping> {
        let (leaf, i) = self.leaf(lc)?;
        Mapping::decode(leaf[i].swap(0, Ordering::AcqRel))
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

    /// Calls `f(lc, mapping)` for every mapped cluster in order (checkpoints, accounting).
    pub fn for_each(&self, mut f: impl FnMut(u64, Mapping)) {
        let len = self.len();
        for (li, slot) in self.top().iter().enumerate() {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: as in `leaf`: published leaves live until Drop.
            let Some(leaf) = (unsafe { p.as_ref() }) else {
                continue;
            };
            for (i, e) in leaf.iter().enumerate() {
                let lc = (li * LEAF_ENTRIES + i) as u64;
                if lc >= len {
                    return;
                }
                if let Some(m) = Mapping::decode(e.load(Ordering::Acquire)) {
                    f(lc, m);
                }
            }
        }
    }

    /// Bytes of memory the map uses (top arrays and leaves).
    pub fn memory_bytes(&self) -> usize {
        let top = self.top();
        let leaves = top
            .iter()
            .filter(|p| !p.load(Ordering::Acquire).is_null())
            .count();
        let retired: usize = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            // SAFETY: retired tops are alive until Drop.
            .map(|&t| unsafe { (&*t).len() } * std::mem::size_of::<AtomicPtr<Leaf>>())
            .sum();
        top.len() * std::mem::size_of::<AtomicPtr<Leaf>>()
            + leaves * std::mem::size_of::<Leaf>()
            + retired
    }
}

impl Drop for ClusterMap {
    fn drop(&mut self) {
        let top = *self.top.get_mut();
        // SAFETY: `&mut self`: no reader is left. Each leaf pointer was created by
        // Box::into_raw and appears in the current top exactly once (growth copies
        // pointers into the new top; retired tops are freed below without their leaves).
        unsafe {
            for slot in (&*top).iter() {
                let p = slot.load(Ordering::Relaxed);
                if !p.is_null() {
                    drop(Box::from_raw(p));
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
            // SAFETY: retired tops came from Box::into_raw and are freed once, here; their
            // leaves are owned by the current top and were freed above.
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
                        let m = Mapping { pc: pc % u32::MAX, epoch: pc % 7 };
                        map.set(lc, m);
                        model.insert(lc, m);
                    }
                    2 => prop_assert_eq!(map.clear(lc), model.remove(&lc)),
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

    #[test]
    fn readers_on_other_threads_see_only_values_the_writer_stored() {
        let map = Arc::new(ClusterMap::new(LEAF_ENTRIES as u64));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (map, stop) = (Arc::clone(&map), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let len = map.len();
                        for lc in (0..len).step_by(977) {
                            if let Some(m) = map.get(lc) {
                                // The writer maps lc to pc = lc ^ 0x5a5a and epoch = 3.
                                assert_eq!(
                                    m,
                                    Mapping {
                                        pc: u32::try_from(lc).expect("small") ^ 0x5a5a,
                                        epoch: 3
                                    }
                                );
                            }
                            reads += 1;
                        }
                    }
                    reads
                })
            })
            .collect();
        for round in 1..=40u64 {
            map.grow(round * LEAF_ENTRIES as u64 * 3);
            for lc in (0..map.len()).step_by(31) {
                map.set(
                    lc,
                    Mapping {
                        pc: u32::try_from(lc).expect("small") ^ 0x5a5a,
                        epoch: 3,
                    },
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(reads > 0);
        assert_eq!(
            map.get(31),
            Some(Mapping {
                pc: 31 ^ 0x5a5a,
                epoch: 3
            })
        );
        assert_eq!(map.get(map.len()), None);
    }

    #[test]
    fn memory_grows_with_what_is_mapped_not_with_the_size() {
        let map = ClusterMap::new(1 << 24); // 16 Mi clusters = 1 TiB at 64 KiB
        let empty = map.memory_bytes();
        assert!(
            empty <= 4096 * 8 + 64,
            "an empty 1 TiB map costs only its top array: {empty}"
        );
        for lc in 0..LEAF_ENTRIES as u64 {
            map.set(lc, Mapping { pc: 1, epoch: 0 });
        }
        let full_leaf = map.memory_bytes() - empty;
        assert_eq!(
            full_leaf,
            LEAF_ENTRIES * 8,
            "8 bytes per mapped cluster in a full leaf"
        );
    }
}
