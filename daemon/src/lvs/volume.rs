//! Thin volumes on a running pool: the pool's owner-reactor state ([`PoolRt`]) and the IO
//! path of a volume ([`VolumeChannel`]).
//!
//! - Reads: mapped clusters read the device, unmapped ones read zeroes without IO.
//! - Writes to mapped clusters go straight to the device: no metadata (DESIGN §4 inv. 4).
//! - A write to an unmapped cluster allocates a durably-zero cluster, writes the data into
//!   it, then appends a map record; the write is acknowledged when the record's journal
//!   write completed (group commit shares it). A FUA write also flushes. Writes to a
//!   cluster whose allocation is in flight wait for it.
//! - FLUSH is the journal's flush. Discard and write-zeroes unmap whole clusters (freed
//!   through the allocator's pipeline); write-zeroes writes zeroes into partial ones;
//!   discard leaves partial ranges alone and never allocates.
//!
//! This first version serves a volume on the pool's owner reactor only (channels opened
//! elsewhere refuse with EXDEV); serving from every reactor is next. IOs that span several
//! clusters are split and completed when every part has.
//!
//! Must never: acknowledge an allocating write before its map record is written, map a
//! cluster that is not durably zero, or free a cluster while an IO that found it through a
//! mapping is still in flight (it could land after the cluster was zeroed and reused).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use super::alloc::Allocator;
use super::format::{Record, Superblock};
use super::journal::Journal;
use super::map::{ClusterMap, Mapping};
use super::pool::{volume_clusters, Imported, VolumeMeta, VolumeRecord, VolumeTable};
use crate::bdev::{BlockDevice, Channel, Geometry, Io, ReqTable};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor};

/// How often the owner reactor drives the free-cluster pipeline.
const RECYCLE_PERIOD: Duration = Duration::from_millis(5);
/// Most clusters zeroed per pipeline round.
const ZERO_BATCH: usize = 1024;
/// Most writes waiting for a cluster while the pipeline recycles (then ENOSPC).
const MAX_ALLOC_WAITERS: usize = 4096;

type Parked = Box<dyn FnOnce(&Reactor)>;
/// Answer of a control operation on the owner reactor.
pub type Reply<T> = Box<dyn FnOnce(&Reactor, Result<T, String>)>;
type IoDone = Box<dyn FnOnce(&Reactor, IoResult, Option<IoBuf>)>;

/// A continuation that runs at most once.
struct Once(RefCell<Option<Parked>>);

impl Once {
    fn run(&self, rx: &Reactor) {
        if let Some(f) = self.0.borrow_mut().take() {
            f(rx);
        }
    }
}

/// The pool on its owner reactor.
pub struct PoolRt {
    me: Weak<PoolRt>,
    owner: usize,
    sb: Superblock,
    data: Rc<dyn Channel>,
    journal: Rc<Journal>,
    alloc: RefCell<Allocator>,
    table: RefCell<VolumeTable>,
    maps: RefCell<BTreeMap<u32, Arc<ClusterMap>>>,
    /// Allocations in flight, with the writes waiting for each.
    allocating: RefCell<HashMap<(u32, u64), Vec<Parked>>>,
    /// Writes waiting for the pipeline to produce a zeroed cluster.
    alloc_waiters: RefCell<Vec<Parked>>,
    /// Data IOs in flight per physical cluster: a cluster is not freed (so never zeroed and
    /// reused) while an IO that looked it up is still on its way to or from it.
    pc_inflight: RefCell<HashMap<u32, u32>>,
    /// Frees waiting for a cluster's in-flight IOs: cluster → journal seq of the record.
    deferred_free: RefCell<HashMap<u32, u64>>,
    recycling: Cell<bool>,
    /// A pipeline round is scheduled on the reactor's timers.
    scheduled: Cell<bool>,
    /// The volumes' logical block size.
    lbs: u32,
}

impl fmt::Debug for PoolRt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRt")
            .field("owner", &self.owner)
            .field("volumes", &self.table.borrow().volumes.len())
            .field("alloc", &self.alloc.borrow().counts())
            .finish()
    }
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
        let mut in_use = Vec::new();
        for m in imp.maps.values() {
            m.for_each(|_, mapping| in_use.push(mapping.pc));
        }
        let alloc = Allocator::from_in_use(clusters, in_use)?;
        let lbs = dev
            .geometry()
            .logical_block_size
            .max(imp.sb.logical_block_bytes);
        let rt = Rc::new_cyclic(|me| Self {
            me: me.clone(),
            owner: rx.id(),
            journal: Journal::new(journal_ch, imp.sb.clone(), imp.next_seq),
            sb: imp.sb,
            data,
            alloc: RefCell::new(alloc),
            table: RefCell::new(imp.table),
            maps: RefCell::new(imp.maps),
            allocating: RefCell::new(HashMap::new()),
            alloc_waiters: RefCell::new(Vec::new()),
            pc_inflight: RefCell::new(HashMap::new()),
            deferred_free: RefCell::new(HashMap::new()),
            recycling: Cell::new(false),
            scheduled: Cell::new(false),
            lbs,
        });
        rt.kick_recycle(rx);
        Ok(rt)
    }

    fn rc(&self) -> Rc<PoolRt> {
        self.me
            .upgrade()
            .expect("the pool runtime lives while it has work")
    }

    /// Allocator counts (accounting).
    pub fn alloc_counts(&self) -> super::alloc::AllocCounts {
        self.alloc.borrow().counts()
    }

    /// The volume table.
    pub fn volumes(&self) -> VolumeTable {
        self.table.borrow().clone()
    }

    /// Bytes per cluster.
    pub fn cluster_bytes(&self) -> u64 {
        u64::from(self.sb.cluster_bytes)
    }

    /// Creates a volume (by journal record); `done` gets its id.
    pub fn create_volume(&self, rx: &Reactor, mut meta: VolumeMeta, done: Reply<u32>) {
        if let Err(e) = super::pool::validate_meta(&meta.name, &meta.labels) {
            return done(rx, Err(e));
        }
        if meta.size_bytes == 0 || !meta.size_bytes.is_multiple_of(u64::from(self.lbs)) {
            return done(
                rx,
                Err(format!(
                    "volume size {} must be a non-zero multiple of {} bytes",
                    meta.size_bytes, self.lbs
                )),
            );
        }
        let table = self.table.borrow();
        if table.volumes.values().any(|v| v.name == meta.name) {
            return done(rx, Err(format!("a volume named {:?} exists", meta.name)));
        }
        meta.id = table.next_id();
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
                    rt.maps
                        .borrow_mut()
                        .insert(id, Arc::new(ClusterMap::new(clusters)));
                    let applied = rt.table.borrow_mut().apply(&VolumeRecord::Create(meta));
                    done(rx, applied.map(|()| id));
                }
                Err(e) => done(rx, Err(format!("journal: {e}"))),
            }),
        );
    }

    /// Deletes a volume; its clusters return through the free pipeline.
    pub fn delete_volume(&self, rx: &Reactor, id: u32, done: Reply<()>) {
        if !self.table.borrow().volumes.contains_key(&id) {
            return done(rx, Err(format!("no volume with id {id}")));
        }
        let rt = self.rc();
        self.journal.append(
            rx,
            vec![VolumeRecord::Delete { id }.encode()],
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| match res {
                Ok(seq) => {
                    if let Some(map) = rt.maps.borrow_mut().remove(&id) {
                        map.for_each(|_, m| rt.free_cluster(m.pc, seq));
                    }
                    rt.kick_recycle(rx);
                    let r = rt.table.borrow_mut().apply(&VolumeRecord::Delete { id });
                    done(rx, r);
                }
                Err(e) => done(rx, Err(format!("journal: {e}"))),
            }),
        );
    }

    /// Opens the IO path of volume `id` on this reactor.
    pub fn open_volume(&self, rx: &Reactor, id: u32) -> Result<Rc<dyn Channel>, String> {
        if rx.id() != self.owner {
            return Err(format!(
                "volume {id}: served on reactor {} only in this version",
                self.owner
            ));
        }
        let size = self
            .table
            .borrow()
            .volumes
            .get(&id)
            .map(|v| v.size_bytes)
            .ok_or_else(|| format!("no volume with id {id}"))?;
        let map = self
            .maps
            .borrow()
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("volume {id} has no map"))?;
        let dgeo = self.data.geometry();
        let geo = Geometry {
            logical_block_size: self.lbs,
            physical_block_size: dgeo.physical_block_size.max(self.lbs),
            size_bytes: size,
            max_transfer_bytes: dgeo.max_transfer_bytes,
            atomic_write_bytes: dgeo.atomic_write_bytes,
            discard_supported: true,
            discard_zeroes: false,
            write_zeroes_supported: true,
            volatile_cache: true,
        };
        Ok(Rc::new_cyclic(|me| VolumeChannel {
            me: me.clone(),
            rt: self.rc(),
            id,
            map,
            geo,
            reqs: RefCell::new(ReqTable::default()),
        }))
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

    /// Frees `pc` (unreferenced by the record in block `seq`) once no IO uses it.
    fn free_cluster(&self, pc: u32, seq: u64) {
        if self.pc_inflight.borrow().contains_key(&pc) {
            self.deferred_free.borrow_mut().insert(pc, seq);
        } else {
            self.alloc.borrow_mut().free(pc, seq);
        }
    }

    fn phys(&self, pc: u32, in_cluster: u64) -> u64 {
        self.sb.region_start
            + self.sb.data_offset
            + u64::from(pc) * u64::from(self.sb.cluster_bytes)
            + in_cluster
    }

    /// Schedules pipeline rounds while there is something to recycle (an idle pool arms
    /// no timer: ~0% CPU).
    fn kick_recycle(&self, rx: &Reactor) {
        let work = {
            let a = self.alloc.borrow();
            a.counts().recycling > 0 || a.wants_flush()
        };
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
        if self.recycling.get() {
            return;
        }
        let (has_freed, dirty) = {
            let mut a = self.alloc.borrow_mut();
            let c = a.counts();
            let has = c.recycling > 0;
            (
                has,
                if has {
                    a.take_dirty(ZERO_BATCH)
                } else {
                    Vec::new()
                },
            )
        };
        if !has_freed && !self.alloc.borrow().wants_flush() {
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
                            let mut a = rt2.alloc.borrow_mut();
                            a.flush_done(token);
                            a.durable(durable_upto);
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
        for c in dirty {
            let off = self.phys(c, 0);
            let (rt, step) = (Rc::clone(&rt), Rc::clone(&step));
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| {
                rt.alloc.borrow_mut().zeroed(c, res.is_ok());
                step(rx);
            });
            self.data.submit(
                rx,
                Io::WriteZeroes {
                    offset: off,
                    len: self.cluster_bytes(),
                },
                cb,
                0,
            );
        }
        step(rx);
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
    parts: u32,
    err: Option<Errno>,
    bytes: u32,
}

/// A volume's IO path on the owner reactor.
pub struct VolumeChannel {
    me: Weak<VolumeChannel>,
    rt: Rc<PoolRt>,
    id: u32,
    map: Arc<ClusterMap>,
    geo: Geometry,
    reqs: RefCell<ReqTable<Req>>,
}

impl fmt::Debug for VolumeChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeChannel")
            .field("volume", &self.id)
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

fn segments(offset: u64, len: u64, cluster: u64) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let lc = pos / cluster;
        let in_cluster = pos % cluster;
        let n = (cluster - in_cluster).min(end - pos);
        out.push(Seg {
            lc,
            in_cluster,
            buf_off: usize::try_from(pos - offset).expect("IO length fits memory"),
            len: usize::try_from(n).expect("IO length fits memory"),
        });
        pos += n;
    }
    out
}

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
            let r = self.reqs.borrow_mut().take(slot).expect("request present");
            let res = match r.err {
                Some(e) => Err(e),
                None => Ok(r.bytes),
            };
            r.cb.complete(rx, r.tag, res, r.buf);
        }
    }

    fn read_seg(&self, rx: &Reactor, slot: usize, seg: Seg) {
        let Some(m) = self.map.get(seg.lc) else {
            self.with_buf(slot, |b| b[seg.buf_off..seg.buf_off + seg.len].fill(0));
            return self.part_done(rx, slot, Ok(()));
        };
        let me = self.rc();
        self.rt.io_start(m.pc);
        let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf: Option<IoBuf>| {
            me.rt.io_end(rx, m.pc);
            me.seg_done(slot, seg, buf, res.is_ok());
            me.part_done(rx, slot, res.map(drop));
        });
        let io = Io::Read {
            offset: self.rt.phys(m.pc, seg.in_cluster),
            buf: self.seg_buf(slot, seg, false),
        };
        self.rt.data.submit(rx, io, cb, 0);
    }

    fn with_buf(&self, slot: usize, f: impl FnOnce(&mut [u8])) {
        if let Some(Req { buf: Some(b), .. }) = self.reqs.borrow_mut().get_mut(slot) {
            f(b);
        }
    }

    /// The buffer for `seg`'s device IO: the request's own buffer when the segment is the
    /// whole request (no copy: the common single-cluster IO), else a new buffer, holding a
    /// copy of the segment's bytes when `copy_in` (writes).
    fn seg_buf(&self, slot: usize, seg: Seg, copy_in: bool) -> IoBuf {
        let mut reqs = self.reqs.borrow_mut();
        let Some(Req { buf: Some(b), .. }) = reqs.get_mut(slot) else {
            return IoBuf::alloc(seg.len);
        };
        if seg.buf_off == 0 && b.len() == seg.len {
            return reqs
                .get_mut(slot)
                .and_then(|r| r.buf.take())
                .expect("checked above");
        }
        if copy_in {
            IoBuf::from_slice(&b[seg.buf_off..seg.buf_off + seg.len])
        } else {
            IoBuf::alloc(seg.len)
        }
    }

    /// The device IO of `seg` is done: hands a whole-request buffer back to the request,
    /// or copies a successful read's bytes into it.
    fn seg_done(&self, slot: usize, seg: Seg, buf: Option<IoBuf>, copy_out: bool) {
        let mut reqs = self.reqs.borrow_mut();
        let (Some(r), Some(b)) = (reqs.get_mut(slot), buf) else {
            return;
        };
        match &mut r.buf {
            None => r.buf = Some(b),
            Some(dst) if copy_out => dst[seg.buf_off..seg.buf_off + seg.len].copy_from_slice(&b),
            Some(_) => {}
        }
    }

    fn write_seg(&self, rx: &Reactor, slot: usize, seg: Seg, fua: bool) {
        let key = (self.id, seg.lc);
        if let Some(waiters) = self.rt.allocating.borrow_mut().get_mut(&key) {
            let me = self.rc();
            waiters.push(Box::new(move |rx: &Reactor| {
                me.write_seg(rx, slot, seg, fua)
            }));
            return;
        }
        if let Some(m) = self.map.get(seg.lc) {
            let me = self.rc();
            self.rt.io_start(m.pc);
            let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf| {
                me.rt.io_end(rx, m.pc);
                me.seg_done(slot, seg, buf, false);
                me.part_done(rx, slot, res.map(drop))
            });
            let io = Io::Write {
                offset: self.rt.phys(m.pc, seg.in_cluster),
                buf: self.seg_buf(slot, seg, true),
                fua,
            };
            return self.rt.data.submit(rx, io, cb, 0);
        }
        let Some(pc) = self.rt.alloc.borrow_mut().alloc() else {
            let recycling = self.rt.alloc.borrow().counts().recycling > 0;
            let mut waiters = self.rt.alloc_waiters.borrow_mut();
            if recycling && waiters.len() < MAX_ALLOC_WAITERS {
                let me = self.rc();
                waiters.push(Box::new(move |rx: &Reactor| {
                    me.write_seg(rx, slot, seg, fua)
                }));
                return;
            }
            drop(waiters);
            return self.part_done(rx, slot, Err(Errno::ENOSPC));
        };
        self.rt.allocating.borrow_mut().insert(key, Vec::new());
        let me = self.rc();
        let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, buf| {
            me.seg_done(slot, seg, buf, false);
            me.data_written(rx, slot, seg, pc, fua, res)
        });
        let io = Io::Write {
            offset: self.rt.phys(pc, seg.in_cluster),
            buf: self.seg_buf(slot, seg, true),
            fua,
        };
        self.rt.data.submit(rx, io, cb, 0);
    }

    /// The data of an allocating write is on the device: journal the mapping.
    fn data_written(&self, rx: &Reactor, slot: usize, seg: Seg, pc: u32, fua: bool, res: IoResult) {
        let key = (self.id, seg.lc);
        if let Err(e) = res {
            // The cluster was never mapped: it is still zero apart from what may have
            // landed; give it back through the pipeline as dirty.
            self.rt.alloc.borrow_mut().free(pc, 0);
            self.rt.kick_recycle(rx);
            self.end_allocation(rx, key);
            return self.part_done(rx, slot, Err(e));
        }
        let mut records = vec![Record::Map {
            vol: self.id,
            lc: seg.lc,
            pc,
            epoch: 0,
        }];
        let first_write = self
            .rt
            .table
            .borrow()
            .volumes
            .get(&self.id)
            .is_some_and(|v| !v.written);
        if first_write {
            records.push(VolumeRecord::Written { id: self.id }.encode());
        }
        let me = self.rc();
        self.rt.journal.append(
            rx,
            records,
            Box::new(move |rx: &Reactor, res: Result<u64, Errno>| {
                match res {
                    Ok(_) => {
                        me.map.set(seg.lc, Mapping { pc, epoch: 0 });
                        if first_write {
                            let _ = me
                                .rt
                                .table
                                .borrow_mut()
                                .apply(&VolumeRecord::Written { id: me.id });
                        }
                        me.end_allocation(rx, key);
                        if fua {
                            // The record must survive power loss too: one (shared) flush.
                            let me2 = Rc::clone(&me);
                            me.rt.journal.flush(
                                rx,
                                Box::new(move |rx: &Reactor, r: Result<u64, Errno>| {
                                    me2.part_done(rx, slot, r.map(drop))
                                }),
                            );
                        } else {
                            me.part_done(rx, slot, Ok(()));
                        }
                    }
                    Err(e) => {
                        me.rt.alloc.borrow_mut().free(pc, 0);
                        me.rt.kick_recycle(rx);
                        me.end_allocation(rx, key);
                        me.part_done(rx, slot, Err(e));
                    }
                }
            }),
        );
    }

    fn end_allocation(&self, rx: &Reactor, key: (u32, u64)) {
        let waiters = self
            .rt
            .allocating
            .borrow_mut()
            .remove(&key)
            .unwrap_or_default();
        for w in waiters {
            w(rx);
        }
    }

    /// Unmaps whole clusters of `[offset, offset+len)`; `zero_partials` writes zeroes into
    /// the mapped parts of partial clusters (write-zeroes), else leaves them (discard).
    fn unmap_range(&self, rx: &Reactor, slot: usize, offset: u64, len: u64, zero_partials: bool) {
        let cluster = self.rt.cluster_bytes();
        let mut records = Vec::new();
        let mut pcs = Vec::new();
        for seg in segments(offset, len, cluster) {
            let Some(m) = self.map.get(seg.lc) else {
                continue;
            };
            if seg.len as u64 == cluster {
                records.push(Record::Unmap {
                    vol: self.id,
                    lc: seg.lc,
                });
                pcs.push((seg.lc, m.pc));
            } else if zero_partials {
                self.add_parts(slot, 1);
                let me = self.rc();
                self.rt.io_start(m.pc);
                let cb = FnCompletion::boxed(move |rx: &Reactor, res: IoResult, _| {
                    me.rt.io_end(rx, m.pc);
                    me.part_done(rx, slot, res.map(drop))
                });
                self.rt.data.submit(
                    rx,
                    Io::WriteZeroes {
                        offset: self.rt.phys(m.pc, seg.in_cluster),
                        len: seg.len as u64,
                    },
                    cb,
                    0,
                );
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
                    for (lc, pc) in pcs {
                        me.map.clear(lc);
                        me.rt.free_cluster(pc, seq);
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
}

impl Channel for VolumeChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(&self.geo) {
            return crate::bdev::fail_request(rx, cb, tag, e, io.into_buf());
        }
        if rx.id() != self.rt.owner {
            return crate::bdev::fail_request(rx, cb, tag, Errno(libc::EXDEV), io.into_buf());
        }
        let cluster = self.rt.cluster_bytes();
        match io {
            Io::Read { offset, buf } => {
                let segs = segments(offset, buf.len() as u64, cluster);
                let bytes = u32::try_from(buf.len()).expect("validated length");
                let slot = self.new_req(cb, tag, Some(buf), segs.len(), bytes);
                for s in segs {
                    self.read_seg(rx, slot, s);
                }
            }
            Io::Write { offset, buf, fua } => {
                let segs = segments(offset, buf.len() as u64, cluster);
                let bytes = u32::try_from(buf.len()).expect("validated length");
                let slot = self.new_req(cb, tag, Some(buf), segs.len(), bytes);
                for s in segs {
                    self.write_seg(rx, slot, s, fua);
                }
            }
            Io::Flush => {
                let slot = self.new_req(cb, tag, None, 1, 0);
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
                let slot = self.new_req(cb, tag, None, 1, 0);
                self.unmap_range(rx, slot, offset, len, zero);
            }
        }
    }
}

impl VolumeChannel {
    fn new_req(
        &self,
        cb: Rc<dyn Completion>,
        tag: u64,
        buf: Option<IoBuf>,
        parts: usize,
        bytes: u32,
    ) -> usize {
        self.reqs.borrow_mut().insert(Req {
            cb,
            tag,
            buf,
            parts: u32::try_from(parts).expect("segments of one IO fit u32"),
            err: None,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests;
