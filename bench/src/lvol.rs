//! `lvol:` targets: formats a fresh pool on the backing device, starts its runtime on
//! reactor 0 (the owner), creates one thin volume and exposes it as a [`BlockDevice`] whose
//! channels are the volume's IO path, so jobs drive it exactly like any other target.
//!
//! The pool's device is wrapped in a [`CountingDevice`] that counts every write the store
//! issues (data, journal and superblock by offset, write-zeroes, flushes): the write
//! amplification reported is measured at the device, not estimated. The wrapper costs one
//! virtual call and a relaxed atomic add per device IO.
//!
//! `--volumes N` adds N - 1 more volumes of the same size ([`Lvol::add_volume`]), each
//! benched by its own job on reactor 0, with QoS limits set through [`Lvol::set_qos`].
//!
//! Must never: run on more than one reactor (a volume is served on its pool's owner reactor
//! only in this version; other reactors get EXDEV), or start timing before the import's
//! background zeroing finished.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coreblk_daemon::bdev::blocking::BlockingDevice;
use coreblk_daemon::bdev::label::Uuid;
use coreblk_daemon::bdev::mem::MallocDevice;
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::{BlockDevice, Channel, Geometry, Io};
use coreblk_daemon::lvs::alloc::AllocCounts;
use coreblk_daemon::lvs::journal::JournalStats;
use coreblk_daemon::lvs::pool::{self, VolumeMeta};
use coreblk_daemon::lvs::qos::QosLimits;
use coreblk_daemon::lvs::volume::{PoolRt, Reply, StoreStats};
use coreblk_daemon::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, ReactorSet, Remote};

use crate::target::LvolBacking;

/// Share of the pool's data clusters the default volume takes (the rest is headroom so a
/// prefill or a long first-write run never reaches the pool-full path).
pub const DEFAULT_VOLUME_PCT: u64 = 90;
/// How long an import's background zeroing may take before we give up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

thread_local! {
    /// The pool runtime, on its owner reactor (reactor 0).
    static POOL: RefCell<Option<Rc<PoolRt>>> = const { RefCell::new(None) };
}

/// Device-level counters of the pool's device (bytes and IOs the store issued).
#[derive(Debug, Default)]
pub struct DevCounters {
    /// Writes into the data clusters.
    data_write_bytes: AtomicU64,
    /// Writes below the data area: superblocks, journal (checkpoints later).
    meta_write_bytes: AtomicU64,
    /// Write IOs.
    write_ios: AtomicU64,
    /// Reads.
    read_bytes: AtomicU64,
    /// Write-zeroes bytes (the free-cluster pipeline).
    zeroes_bytes: AtomicU64,
    /// Device flushes.
    flushes: AtomicU64,
    /// Byte offset where the data clusters start (writes below it are metadata).
    data_start: AtomicU64,
}

/// A snapshot of [`DevCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DevCounts {
    /// Writes into the data clusters.
    pub data_write_bytes: u64,
    /// Writes to metadata (superblocks, journal).
    pub meta_write_bytes: u64,
    /// Write IOs.
    pub write_ios: u64,
    /// Read bytes.
    pub read_bytes: u64,
    /// Write-zeroes bytes.
    pub zeroes_bytes: u64,
    /// Device flushes.
    pub flushes: u64,
}

impl DevCounts {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &DevCounts) -> DevCounts {
        DevCounts {
            data_write_bytes: self.data_write_bytes - earlier.data_write_bytes,
            meta_write_bytes: self.meta_write_bytes - earlier.meta_write_bytes,
            write_ios: self.write_ios - earlier.write_ios,
            read_bytes: self.read_bytes - earlier.read_bytes,
            zeroes_bytes: self.zeroes_bytes - earlier.zeroes_bytes,
            flushes: self.flushes - earlier.flushes,
        }
    }
}

impl DevCounters {
    fn snapshot(&self) -> DevCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DevCounts {
            data_write_bytes: r(&self.data_write_bytes),
            meta_write_bytes: r(&self.meta_write_bytes),
            write_ios: r(&self.write_ios),
            read_bytes: r(&self.read_bytes),
            zeroes_bytes: r(&self.zeroes_bytes),
            flushes: r(&self.flushes),
        }
    }

    fn count(&self, io: &Io) {
        let add = |a: &AtomicU64, n: u64| a.fetch_add(n, Ordering::Relaxed);
        match io {
            Io::Read { buf, .. } => {
                add(&self.read_bytes, buf.len() as u64);
            }
            Io::Write { offset, buf, .. } => {
                add(&self.write_ios, 1);
                if *offset >= self.data_start.load(Ordering::Relaxed) {
                    add(&self.data_write_bytes, buf.len() as u64);
                } else {
                    add(&self.meta_write_bytes, buf.len() as u64);
                }
            }
            Io::Flush => {
                add(&self.flushes, 1);
            }
            Io::WriteZeroes { len, .. } => {
                add(&self.zeroes_bytes, *len);
            }
            Io::Discard { .. } => {}
        }
    }
}

/// A device that counts what is submitted to it, then passes it on unchanged.
#[derive(Debug)]
pub struct CountingDevice {
    inner: Arc<dyn BlockDevice>,
    counters: Arc<DevCounters>,
}

#[derive(Debug)]
struct CountingChannel {
    inner: Rc<dyn Channel>,
    counters: Arc<DevCounters>,
}

impl BlockDevice for CountingDevice {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        Ok(Rc::new(CountingChannel {
            inner: self.inner.open_channel(rx)?,
            counters: Arc::clone(&self.counters),
        }))
    }
}

impl Channel for CountingChannel {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        self.counters.count(&io);
        self.inner.submit(rx, io, cb, tag);
    }
    fn close(&self, rx: &Reactor) {
        self.inner.close(rx);
    }
}

/// The volume as a device: every channel is the volume's IO path on that reactor.
#[derive(Debug)]
pub struct VolumeDevice {
    id: u32,
    geo: Geometry,
    name: String,
}

impl BlockDevice for VolumeDevice {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        let rt = POOL
            .with(|p| p.borrow().clone())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EXDEV))?;
        rt.open_volume(rx, self.id).map_err(std::io::Error::other)
    }
}

/// A pool formatted and running on reactor 0 with one thin volume.
#[derive(Debug)]
pub struct Lvol {
    /// The volume, ready for jobs.
    pub dev: Arc<dyn BlockDevice>,
    /// The volume's id in the pool.
    pub volume_id: u32,
    /// The pool's (counting) device, for re-imports.
    pool_dev: Arc<dyn BlockDevice>,
    /// Cluster size of the pool.
    pub cluster_bytes: u64,
    /// Data clusters of the pool.
    pub pool_clusters: u64,
    /// The volume's size.
    pub volume_bytes: u64,
    counters: Arc<DevCounters>,
}

impl Lvol {
    /// Formats a pool on `backing`, imports it, starts it on reactor 0 of `set`, waits for
    /// the import's background zeroing, and creates one volume of `size_bytes` (default:
    /// `default_volume_pct` % of the pool's data space, rounded down to whole MiB).
    pub fn setup(
        set: &ReactorSet,
        backing: &LvolBacking,
        cluster_bytes: u32,
        size_bytes: Option<u64>,
        default_volume_pct: u64,
    ) -> anyhow::Result<Self> {
        let raw: Arc<dyn BlockDevice> = match backing {
            LvolBacking::Malloc { size_bytes } => Arc::new(
                MallocDevice::new(*size_bytes).context("allocating the lvol malloc device")?,
            ),
            LvolBacking::Path(p) => Arc::new(UringDevice::open(p)?),
        };
        let counters = Arc::new(DevCounters {
            data_start: AtomicU64::new(u64::MAX),
            ..DevCounters::default()
        });
        let dev: Arc<dyn BlockDevice> = Arc::new(CountingDevice {
            inner: raw,
            counters: Arc::clone(&counters),
        });
        let remote = set.remotes()[0].clone();
        let client = BlockingDevice::new(Arc::clone(&dev), remote.clone())?;
        let uuid = Uuid::random().context("pool uuid")?;
        let sb = pool::create(&client, cluster_bytes, uuid.0)
            .with_context(|| format!("formatting a pool on {}", dev.name()))?;
        counters
            .data_start
            .store(sb.region_start + sb.data_offset, Ordering::Relaxed);
        let imp = pool::import(&client).with_context(|| format!("importing {}", dev.name()))?;
        let cluster = u64::from(sb.cluster_bytes);
        let pool_bytes = sb.clusters * cluster;
        let volume_bytes = match size_bytes {
            Some(s) => {
                if s > pool_bytes {
                    bail!(
                        "--size {s}: larger than the pool's {pool_bytes} bytes of data space on {}",
                        dev.name()
                    );
                }
                // Whole logical blocks.
                let lbs = u64::from(sb.logical_block_bytes.max(4096));
                s / lbs * lbs
            }
            None => {
                let mib = 1 << 20;
                (pool_bytes * default_volume_pct / 100 / cluster * cluster / mib * mib).max(cluster)
            }
        };
        if volume_bytes == 0 {
            bail!("--size {size_bytes:?}: a volume needs at least one logical block");
        }
        let d = Arc::clone(&dev);
        remote
            .call(move |rx: &Reactor| -> Result<(), String> {
                let rt = PoolRt::start(rx, &d, imp)?;
                POOL.with(|p| *p.borrow_mut() = Some(rt));
                Ok(())
            })?
            .map_err(|e| anyhow::anyhow!("starting the pool runtime: {e}"))?;
        let lv = Self {
            dev: Arc::clone(&dev),
            volume_id: 0,
            pool_dev: Arc::clone(&dev),
            cluster_bytes: cluster,
            pool_clusters: sb.clusters,
            volume_bytes,
            counters,
        };
        // An import zeroes every unreferenced cluster again in the background: IO timed
        // before that finishes would compete with it.
        lv.settle(set)?;
        // The bench measures the store, not its limits: clones of a large volume (and
        // --measure import's 1,000 volumes) may provision more than the pool holds.
        pool_op(set, "raising the overcommit limit", |rx, rt, reply| {
            rt.set_overcommit(rx, BENCH_OVERCOMMIT_MILLI, reply);
        })?;
        let (volume_id, dev) = lv.add_volume(set, "bench", volume_bytes)?;
        Ok(Self {
            dev,
            volume_id,
            ..lv
        })
    }

    /// Creates one more thin volume of `size_bytes` named `name`; returns its id and the
    /// volume as a device.
    pub fn add_volume(
        &self,
        set: &ReactorSet,
        name: &str,
        size_bytes: u64,
    ) -> anyhow::Result<(u32, Arc<dyn BlockDevice>)> {
        let meta = VolumeMeta {
            uuid: Uuid::random().context("volume uuid")?.0,
            name: name.to_string(),
            size_bytes,
            ..VolumeMeta::default()
        };
        let (id, geo) = pool_op(set, "creating a volume", move |rx, rt, done| {
            let rt2 = Rc::clone(rt);
            rt.create_volume(
                rx,
                meta,
                Box::new(move |rx: &Reactor, res: Result<u32, String>| {
                    done(
                        rx,
                        res.and_then(|id| {
                            let ch = rt2.open_volume(rx, id)?;
                            Ok((id, ch.geometry().clone()))
                        }),
                    );
                }),
            );
        })?;
        let dev: Arc<dyn BlockDevice> = Arc::new(VolumeDevice {
            id,
            geo,
            name: format!("lvol {id} on {}", self.pool_dev.name()),
        });
        Ok((id, dev))
    }

    /// Takes a snapshot named `name` of volume `source`; returns its id and what the
    /// creation cost the store.
    pub fn snapshot(
        &self,
        set: &ReactorSet,
        source: u32,
        name: &str,
    ) -> anyhow::Result<(u32, OpCost)> {
        let meta = VolumeMeta {
            uuid: Uuid::random().context("snapshot uuid")?.0,
            name: name.to_string(),
            ..VolumeMeta::default()
        };
        let (ids, cost) = costed_op(set, "taking a snapshot", move |rx, rt, done| {
            rt.snapshot(rx, vec![(source, meta)], done);
        })?;
        let id = ids
            .first()
            .copied()
            .context("taking a snapshot: no id returned")?;
        Ok((id, cost))
    }

    /// Makes a writable clone named `name` of snapshot (or volume) `source`.
    pub fn clone_of(
        &self,
        set: &ReactorSet,
        source: u32,
        name: &str,
    ) -> anyhow::Result<(u32, OpCost)> {
        let meta = VolumeMeta {
            uuid: Uuid::random().context("clone uuid")?.0,
            name: name.to_string(),
            ..VolumeMeta::default()
        };
        costed_op(set, "cloning", move |rx, rt, done| {
            rt.clone_volume(rx, source, meta, done);
        })
    }

    /// Sets the QoS limits of volume `id` (in force on its channels at their next IO).
    pub fn set_qos(&self, set: &ReactorSet, id: u32, limits: QosLimits) -> anyhow::Result<()> {
        pool_op(set, "setting QoS limits", move |rx, rt, done| {
            done(rx, rt.set_qos(id, &limits));
        })
    }

    /// Writes a checkpoint and waits until it is durable.
    pub fn checkpoint(&self, set: &ReactorSet) -> anyhow::Result<()> {
        pool_op(set, "checkpoint", |rx, rt, done| rt.checkpoint(rx, done))
    }

    /// The pool's counters, read on its owner reactor.
    pub fn counters(&self, set: &ReactorSet) -> anyhow::Result<PoolCounters> {
        set.remotes()[0]
            .call(|_rx: &Reactor| POOL.with(|p| p.borrow().as_ref().map(|rt| counters_of(rt))))?
            .context("the pool is not running")
    }

    /// "Crashes" the daemon: drops the pool runtime without a checkpoint or a flush. The
    /// device keeps everything written so far (a daemon crash, not a power loss), so an
    /// import finds the last checkpoint plus the journal written since.
    pub fn crash(&self, set: &ReactorSet) -> anyhow::Result<()> {
        let was = set.remotes()[0]
            .call(|_rx: &Reactor| POOL.with(|p| p.borrow_mut().take()).is_some())?;
        if !was {
            bail!("the pool is not running");
        }
        Ok(())
    }

    /// Imports the pool again from its device and starts it on reactor 0 (after
    /// [`crash`](Self::crash)); times each step, up to the first IO it served.
    pub fn reimport(&self, set: &ReactorSet) -> anyhow::Result<ImportTimes> {
        let remote = set.remotes()[0].clone();
        let client = BlockingDevice::new(Arc::clone(&self.pool_dev), remote.clone())?;
        let t0 = Instant::now();
        let imp =
            pool::import(&client).with_context(|| format!("importing {}", self.pool_dev.name()))?;
        let import = t0.elapsed();
        let replayed_blocks = imp.next_seq.saturating_sub(imp.sb.first_seq);
        let objects = imp.maps.len();
        let d = Arc::clone(&self.pool_dev);
        let t1 = Instant::now();
        remote
            .call(move |rx: &Reactor| -> Result<(), String> {
                let rt = PoolRt::start(rx, &d, imp)?;
                POOL.with(|p| *p.borrow_mut() = Some(rt));
                Ok(())
            })?
            .map_err(|e| anyhow::anyhow!("starting the pool runtime: {e}"))?;
        let start = t1.elapsed();
        // The pool serves IO: one read of the first block of the bench volume.
        let (tx, done) = crossbeam::channel::bounded(1);
        let lbs = self.dev.geometry().logical_block_size.max(512) as usize;
        let id = self.volume_id;
        remote.send(Box::new(move |rx: &Reactor| {
            let ch = POOL
                .with(|p| p.borrow().clone())
                .ok_or_else(|| "the pool is not running".to_string())
                .and_then(|rt| rt.open_volume(rx, id));
            match ch {
                Ok(ch) => Rc::new(ReadProbe {
                    tx,
                    ch,
                    lbs,
                    retries: Cell::new(0),
                })
                .submit(rx),
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        }))?;
        let eagain_retries = done
            .recv_timeout(Duration::from_secs(30))
            .context("the first read after the import did not complete within 30 s")?
            .map_err(|e| anyhow::anyhow!("the first read after the import failed: {e}"))?;
        let to_first_io = t0.elapsed();
        let t2 = Instant::now();
        self.settle(set)?;
        Ok(ImportTimes {
            import,
            start,
            to_first_io,
            rezero: t2.elapsed(),
            eagain_retries,
            replayed_blocks,
            objects,
        })
    }

    /// The pool's allocator counts, read on its owner reactor.
    pub fn alloc_counts(&self, set: &ReactorSet) -> anyhow::Result<AllocCounts> {
        set.remotes()[0]
            .call(|_rx: &Reactor| POOL.with(|p| p.borrow().as_ref().map(|rt| rt.alloc_counts())))?
            .context("the pool is not running")
    }

    /// Waits until the free-cluster pipeline has nothing left to recycle.
    pub fn settle(&self, set: &ReactorSet) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let c = self.alloc_counts(set)?;
            if c.recycling == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the pool's free-cluster pipeline did not settle within {} s: {c:?}",
                    SETTLE_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the store has issued to its device so far.
    pub fn device_counts(&self) -> DevCounts {
        self.counters.snapshot()
    }

    /// Drops the pool runtime on its reactor (before the reactors stop).
    pub fn stop(&self, set: &ReactorSet) -> anyhow::Result<()> {
        set.remotes()[0].call(|_rx: &Reactor| POOL.with(|p| p.borrow_mut().take()).is_some())?;
        Ok(())
    }
}

/// What [`Lvol::reimport`] measured.
#[derive(Clone, Copy, Debug)]
pub struct ImportTimes {
    /// `pool::import`: superblock, checkpoint, journal replay.
    pub import: Duration,
    /// `PoolRt::start` on the owner reactor.
    pub start: Duration,
    /// From the start of the import until the first read of a volume completed.
    pub to_first_io: Duration,
    /// After that, until the background re-zeroing of free clusters finished.
    pub rezero: Duration,
    /// Times the first read got EAGAIN (a full request table) and was sent again.
    pub eagain_retries: u32,
    /// Journal blocks replayed (from the checkpoint's first sequence to the end).
    pub replayed_blocks: u64,
    /// Volumes and snapshots imported.
    pub objects: usize,
}

/// Gap before the first read after an import is sent again after EAGAIN.
const PROBE_RETRY: Duration = Duration::from_micros(20);
/// Most EAGAIN retries of that read.
const PROBE_MAX_RETRIES: u32 = 100_000;

/// The first read after an import: answers the EAGAIN retries it needed. The request holds
/// the probe, the probe holds the channel, until the read completed.
struct ReadProbe {
    tx: crossbeam::channel::Sender<Result<u32, String>>,
    ch: Rc<dyn Channel>,
    lbs: usize,
    retries: Cell<u32>,
}

impl ReadProbe {
    fn submit(self: Rc<Self>, rx: &Reactor) {
        let io = Io::Read {
            offset: 0,
            buf: IoBuf::alloc(self.lbs),
        };
        let ch = Rc::clone(&self.ch);
        ch.submit(rx, io, self, 0);
    }
}

impl Completion for ReadProbe {
    fn complete(&self, rx: &Reactor, _tag: u64, res: IoResult, _buf: Option<IoBuf>) {
        if res == Err(Errno::EAGAIN) && self.retries.get() < PROBE_MAX_RETRIES {
            self.retries.set(self.retries.get() + 1);
            let again = Rc::new(ReadProbe {
                tx: self.tx.clone(),
                ch: Rc::clone(&self.ch),
                lbs: self.lbs,
                retries: Cell::new(self.retries.get()),
            });
            rx.add_timer(PROBE_RETRY, Box::new(move |rx: &Reactor| again.submit(rx)));
            return;
        }
        let _ = self
            .tx
            .send(res.map(|_| self.retries.get()).map_err(|e| e.to_string()));
    }
}

/// Store counters of a running pool.
#[derive(Clone, Copy, Debug)]
pub struct PoolCounters {
    /// Journal writes, commits, flushes.
    pub journal: JournalStats,
    /// Checkpoints, copy-ups, allocations.
    pub store: StoreStats,
    /// Allocator counts.
    pub alloc: AllocCounts,
    /// `PoolRt::metadata_memory_bytes`.
    pub metadata_memory_bytes: u64,
    /// Data clusters of the pool.
    pub pool_clusters: u64,
}

fn counters_of(rt: &PoolRt) -> PoolCounters {
    PoolCounters {
        journal: rt.journal_stats(),
        store: rt.stats(),
        alloc: rt.alloc_counts(),
        metadata_memory_bytes: rt.metadata_memory_bytes(),
        pool_clusters: rt.superblock().clusters,
    }
}

/// What one snapshot or clone creation cost, read on the owner reactor just before the
/// call and in its reply (no extra messages, so nothing else is charged to it).
#[derive(Clone, Copy, Debug)]
pub struct OpCost {
    /// From the message's send to its answer, seen by the calling thread.
    pub wall: Duration,
    /// From the message running on the owner reactor to the answer (the store's part of
    /// `wall`: without the message's delivery and the caller's wake-up).
    pub on_reactor: Duration,
    /// Journal commits acknowledged meanwhile.
    pub commits: u64,
    /// Journal writes issued meanwhile.
    pub journal_writes: u64,
    /// Device flushes the journal issued meanwhile.
    pub journal_flushes: u64,
    /// Checkpoints written meanwhile.
    pub checkpoints: u64,
}

/// How long a control operation may take before the bench gives up.
const OP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `f` with the pool runtime on its owner reactor and waits for the answer it gives
/// `done`.
/// Overcommit limit of bench pools (× 1000): 1000× the capacity.
const BENCH_OVERCOMMIT_MILLI: u32 = 1_000_000;

/// Sets volume `id`'s QoS limits from any thread through reactor 0 (the pool's owner);
/// returns once they are in force.
pub fn set_qos_on(owner: &Remote, id: u32, limits: QosLimits) -> anyhow::Result<()> {
    owner
        .call(move |_rx: &Reactor| {
            POOL.with(|p| p.borrow().clone())
                .ok_or_else(|| "the pool is not running".to_string())
                .and_then(|rt| rt.set_qos(id, &limits))
        })?
        .map_err(|e| anyhow::anyhow!("setting QoS limits: {e}"))
}

fn pool_op<T, F>(set: &ReactorSet, what: &'static str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Reactor, &Rc<PoolRt>, Reply<T>) + Send + 'static,
{
    let (tx, done) = crossbeam::channel::bounded(1);
    set.remotes()[0].send(Box::new(move |rx: &Reactor| {
        let Some(rt) = POOL.with(|p| p.borrow().clone()) else {
            let _ = tx.send(Err("the pool is not running".to_string()));
            return;
        };
        f(
            rx,
            &rt,
            Box::new(move |_rx: &Reactor, res: Result<T, String>| {
                let _ = tx.send(res);
            }),
        );
    }))?;
    done.recv_timeout(OP_TIMEOUT)
        .with_context(|| format!("{what}: no answer within {} s", OP_TIMEOUT.as_secs()))?
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// [`pool_op`] that also measures what the operation cost (see [`OpCost`]).
fn costed_op<T, F>(set: &ReactorSet, what: &'static str, f: F) -> anyhow::Result<(T, OpCost)>
where
    T: Send + 'static,
    F: FnOnce(&Reactor, &Rc<PoolRt>, Reply<T>) + Send + 'static,
{
    let t0 = Instant::now();
    // Only the O(1) counters: `counters_of` walks every map (metadata memory), which would
    // be charged to the operation.
    let light = |rt: &PoolRt| (rt.journal_stats(), rt.stats());
    let (res, before, after, on_reactor) = pool_op(set, what, move |rx, rt, done| {
        let before = light(rt);
        let rt2 = Rc::clone(rt);
        let began = Instant::now();
        f(
            rx,
            rt,
            Box::new(move |rx: &Reactor, res: Result<T, String>| {
                let on_reactor = began.elapsed();
                let after = light(&rt2);
                done(rx, res.map(|r| (r, before, after, on_reactor)));
            }),
        );
    })?;
    let wall = t0.elapsed();
    Ok((
        res,
        OpCost {
            wall,
            on_reactor,
            commits: after.0.commits - before.0.commits,
            journal_writes: after.0.writes - before.0.writes,
            journal_flushes: after.0.flushes - before.0.flushes,
            checkpoints: after.1.checkpoints - before.1.checkpoints,
        },
    ))
}
