//! `lvol:` targets: formats a fresh pool on the backing device, starts its runtime on
//! reactor 0 (the owner), creates one thin volume and exposes it as a [`BlockDevice`] whose
//! channels are the volume's IO path, so jobs drive it exactly like any other target.
//!
//! The pool's device is wrapped in a [`CountingDevice`] that counts every write the store
//! issues (data, journal and superblock by offset, write-zeroes, flushes): the write
//! amplification reported is measured at the device, not estimated. The wrapper costs one
//! virtual call and a relaxed atomic add per device IO.
//!
//! Must never: run on more than one reactor (a volume is served on its pool's owner reactor
//! only in this version; other reactors get EXDEV), or start timing before the import's
//! background zeroing finished.

use std::cell::RefCell;
use std::collections::BTreeMap;
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
use coreblk_daemon::lvs::pool::{self, VolumeMeta};
use coreblk_daemon::lvs::volume::PoolRt;
use coreblk_daemon::reactor::{Completion, Reactor, ReactorSet};

use crate::target::LvolBacking;

/// Share of the pool's data clusters the default volume takes (the rest is headroom so a
/// prefill or a long first-write run never reaches the pool-full path).
const DEFAULT_VOLUME_PCT: u64 = 90;
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
    /// [`DEFAULT_VOLUME_PCT`] % of the pool's data space).
    pub fn setup(
        set: &ReactorSet,
        backing: &LvolBacking,
        cluster_bytes: u32,
        size_bytes: Option<u64>,
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
                (pool_bytes * DEFAULT_VOLUME_PCT / 100 / cluster * cluster / mib * mib).max(cluster)
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
            cluster_bytes: cluster,
            pool_clusters: sb.clusters,
            volume_bytes,
            counters,
        };
        // An import zeroes every unreferenced cluster again in the background: IO timed
        // before that finishes would compete with it.
        lv.settle(set)?;
        let meta = VolumeMeta {
            id: 0,
            uuid: Uuid::random().context("volume uuid")?.0,
            name: "bench".into(),
            size_bytes: volume_bytes,
            labels: BTreeMap::new(),
            thick: false,
            written: false,
        };
        let (tx, done) = crossbeam::channel::bounded(1);
        remote.send(Box::new(move |rx: &Reactor| {
            let Some(rt) = POOL.with(|p| p.borrow().clone()) else {
                let _ = tx.send(Err("the pool is not running".to_string()));
                return;
            };
            let rt2 = Rc::clone(&rt);
            rt.create_volume(
                rx,
                meta,
                Box::new(move |rx: &Reactor, res: Result<u32, String>| {
                    let rt = rt2;
                    let _ = tx.send(res.and_then(|id| {
                        let ch = rt.open_volume(rx, id)?;
                        Ok((id, ch.geometry().clone()))
                    }));
                }),
            );
        }))?;
        let (id, geo) = done
            .recv_timeout(Duration::from_secs(30))
            .context("creating the volume: no answer within 30 s")?
            .map_err(|e| anyhow::anyhow!("creating the volume: {e}"))?;
        Ok(Self {
            dev: Arc::new(VolumeDevice {
                id,
                geo,
                name: format!("lvol {id} on {}", dev.name()),
            }),
            ..lv
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
