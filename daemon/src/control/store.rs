//! The volume store as the control plane sees it: every pool this daemon serves, each
//! running on its owner reactor and reached only by messages.
//!
//! Owns: [`Store`] — the pool registry, the start-up import of the pools on claimed devices
//! (creating the default pool on its first start), pool create and destroy, volume create,
//! delete and listing, and volume IO [`Session`]s for image import and export — plus the
//! record `<var-dir>/pools.json` of what the on-disk format does not hold yet: pool names,
//! overcommit limits and labels, and the volumes whose image import is unfinished.
//!
//! Each pool's `PoolRt` is `!Send`: it lives in a thread-local table on its owner reactor,
//! and so do the IO channels of sessions. The control plane sends closures there and awaits
//! their answers on oneshot channels. Blocking work (pool create and import through a
//! [`BlockingDevice`], the state file) runs on the runtime's blocking pool.
//!
//! Must never: block a reactor or the runtime; hold a lock across an await; touch a
//! `PoolRt` off its owner reactor; delete a volume while a session uses it (an allocating
//! write into a deleted volume would leave a map record the journal cannot replay).
//!
//! Start reading at [`Store::import_all`], then [`Store::create_volume`].

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::claims::{ClaimInfo, Claims};
use super::devices::blocking;
use super::error::{Error, Result};
use crate::bdev::blocking::BlockingDevice;
use crate::bdev::label::{self, Uuid};
use crate::bdev::uring::UringDevice;
use crate::bdev::{BlockDevice, Channel, Io};
use crate::lvs::pool::{self, PoolError, VolumeMeta};
use crate::lvs::volume::{PoolRt, Reply};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, Remote};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "pools.json";
/// The name of the pool on the default device.
pub const DEFAULT_POOL_NAME: &str = "default";
/// Smallest cluster size the API accepts.
pub const MIN_CLUSTER_BYTES: u64 = 64 << 10;
/// Largest cluster size (the store's limit).
pub const MAX_CLUSTER_BYTES: u64 = 4 << 20;
/// Largest volume (bounds the cluster map a volume needs).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Longest a reactor may take to answer a control message.
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a pool's import waits for its free-cluster pipeline to settle before it is
/// served anyway (allocations then wait for zeroed clusters).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest `CreatePool` waits for the new pool to come online before answering with it
/// still importing.
pub const CREATE_WAIT: Duration = Duration::from_secs(30);
/// Least time between two records of an import's progress.
const IMPORT_RECORD_PERIOD: Duration = Duration::from_secs(2);

const STATE_VERSION: u32 = 1;

thread_local! {
    /// The pools this reactor owns.
    static POOLS: RefCell<HashMap<Uuid, Rc<PoolRt>>> = RefCell::new(HashMap::new());
    /// Volume channels of open sessions, by session id.
    static SESSIONS: RefCell<HashMap<u64, Rc<dyn Channel>>> = RefCell::new(HashMap::new());
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

fn pool_rt(uuid: Uuid) -> std::result::Result<Rc<PoolRt>, String> {
    POOLS
        .with(|p| p.borrow().get(&uuid).cloned())
        .ok_or_else(|| format!("pool {uuid} is not running on this reactor"))
}

/// A pool's state.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolState {
    /// Being imported (recovery, or the free-cluster pipeline settling).
    Importing,
    /// Served.
    Online,
    /// Not served; why.
    Failed(String),
}

/// A pool as the registry holds it.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    /// Pool UUID (the device label's).
    pub uuid: Uuid,
    /// Name.
    pub name: String,
    /// The device it lives on.
    pub device_uuid: Uuid,
    /// The device's path.
    pub device_path: PathBuf,
    /// provisioned ≤ limit × capacity.
    pub overcommit_limit: f64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// State.
    pub state: PoolState,
    /// Owner reactor.
    pub owner: usize,
    /// Cluster size (0 when unknown: failed before the superblock was read).
    pub cluster_bytes: u64,
    /// Data capacity.
    pub capacity_bytes: u64,
    dev: Option<Arc<dyn BlockDevice>>,
}

/// Figures read from a running pool.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolFigures {
    /// Free (ready plus on their way back) cluster bytes.
    pub free_bytes: u64,
    /// Allocated cluster bytes.
    pub allocated_bytes: u64,
    /// Sum of volume sizes.
    pub provisioned_bytes: u64,
    /// Volumes.
    pub volume_count: u32,
}

/// A volume as the control plane reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeInfo {
    /// Its pool's UUID.
    pub pool_uuid: Uuid,
    /// Its pool's name.
    pub pool_name: String,
    /// Id inside the pool.
    pub id: u32,
    /// UUID.
    pub uuid: Uuid,
    /// Name.
    pub name: String,
    /// Size.
    pub size_bytes: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Thick.
    pub thick: bool,
    /// Written since creation.
    pub written: bool,
    /// An image import into it is unfinished.
    pub importing: bool,
}

/// What a `CreatePool` asks for (validated by the service).
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Name.
    pub name: String,
    /// The claimed device (path or device UUID).
    pub device: String,
    /// Cluster size.
    pub cluster_bytes: u64,
    /// Overcommit limit.
    pub overcommit_limit: f64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// What a `CreateVolume` asks for (validated by the service).
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Pool name or UUID.
    pub pool: String,
    /// Name.
    pub name: String,
    /// Size.
    pub size_bytes: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PoolRecord {
    uuid: String,
    name: String,
    overcommit_limit: f64,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImportRecord {
    volume_uuid: String,
    durable_offset_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    pools: Vec<PoolRecord>,
    #[serde(default)]
    imports: Vec<ImportRecord>,
}

#[derive(Debug, Clone)]
struct PoolMeta {
    name: String,
    overcommit_limit: f64,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Inner {
    pools: Vec<PoolInfo>,
    /// Every recorded pool (present or not), by UUID.
    records: BTreeMap<Uuid, PoolMeta>,
    /// Volumes whose import is unfinished → offset below which everything is written.
    imports: BTreeMap<Uuid, u64>,
    /// Volumes sessions use → how many sessions.
    busy: HashMap<Uuid, u32>,
    ready: bool,
    progress: String,
}

/// The pools this daemon serves.
#[derive(Debug)]
pub struct Store {
    claims: Arc<Claims>,
    remotes: Vec<Remote>,
    state_path: PathBuf,
    default_device: Option<Uuid>,
    inner: Mutex<Inner>,
    /// Serialises creates and deletes, so an idempotency check and the create it guards
    /// see the same registry.
    ops: tokio::sync::Mutex<()>,
    /// Serialises writes of the state file.
    persisting: Mutex<()>,
    last_import_record: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single insert/remove/field write: a poisoned lock
    // still guards consistent data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends `f` to the reactor behind `remote` and awaits what it sends back.
async fn ask<T: Send + 'static>(
    remote: &Remote,
    f: impl FnOnce(&Reactor, oneshot::Sender<T>) + Send + 'static,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    remote
        .send(Box::new(move |r: &Reactor| f(r, tx)))
        .map_err(|_| Error::ShuttingDown)?;
    match tokio::time::timeout(OP_TIMEOUT, rx).await {
        Ok(Ok(v)) => Ok(v),
        // The message or its reply was dropped unrun: the reactor is stopping.
        Ok(Err(_)) => Err(Error::ShuttingDown),
        Err(_) => Err(Error::Internal(format!(
            "reactor {} did not answer within {} s",
            remote.id(),
            OP_TIMEOUT.as_secs()
        ))),
    }
}

fn store_err<'a>(op: &'static str, object: &'a str) -> impl FnOnce(String) -> Error + 'a {
    move |reason| Error::Store {
        op,
        object: object.to_owned(),
        reason,
    }
}

impl Store {
    /// A store over the claimed devices, reading `<var_dir>/pools.json`; nothing is
    /// imported yet ([`Self::import_all`]). `default_device` is the device the default
    /// pool lives on (created there on the first start). Blocking (reads the state file).
    ///
    /// # Errors
    /// The state file exists but cannot be read or parsed.
    pub fn open(
        var_dir: &Path,
        claims: Arc<Claims>,
        remotes: Vec<Remote>,
        default_device: Option<Uuid>,
    ) -> anyhow::Result<Self> {
        assert!(!remotes.is_empty(), "a store needs a reactor");
        let state_path = var_dir.join(STATE_FILE);
        let mut inner = Inner {
            progress: "not started".to_owned(),
            ..Inner::default()
        };
        match fs::read_to_string(&state_path) {
            Ok(text) => {
                let bad = |what: String| {
                    anyhow::anyhow!(
                        "the record of pools {} is damaged: {what}; fix or remove it (pools \
                         then come back named by their UUID, with no overcommit)",
                        state_path.display()
                    )
                };
                let state: StateFile =
                    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                if state.version != STATE_VERSION {
                    return Err(bad(format!(
                        "version {} (this coreblkd reads version {STATE_VERSION})",
                        state.version
                    )));
                }
                for p in state.pools {
                    let uuid: Uuid = p.uuid.parse().map_err(|e| bad(format!("{e}")))?;
                    inner.records.insert(
                        uuid,
                        PoolMeta {
                            name: p.name,
                            overcommit_limit: p.overcommit_limit,
                            labels: p.labels,
                        },
                    );
                }
                for i in state.imports {
                    let uuid: Uuid = i.volume_uuid.parse().map_err(|e| bad(format!("{e}")))?;
                    inner.imports.insert(uuid, i.durable_offset_bytes);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the record of pools {}: {e}",
                    state_path.display()
                ))
            }
        }
        Ok(Self {
            claims,
            remotes,
            state_path,
            default_device,
            inner: Mutex::new(inner),
            ops: tokio::sync::Mutex::new(()),
            persisting: Mutex::new(()),
            last_import_record: Mutex::new(None),
        })
    }

    /// Whether the start-up import has finished.
    pub fn is_ready(&self) -> bool {
        lock(&self.inner).ready
    }

    /// UNAVAILABLE until the start-up import has finished.
    ///
    /// # Errors
    /// [`Error::Importing`].
    pub fn check_ready(&self) -> Result<()> {
        let inner = lock(&self.inner);
        if inner.ready {
            return Ok(());
        }
        Err(Error::Importing {
            detail: inner.progress.clone(),
        })
    }

    /// The pools, in the order they were found or created.
    pub fn pools(&self) -> Vec<PoolInfo> {
        lock(&self.inner).pools.clone()
    }

    /// The pool on device `device_uuid`, if any.
    pub fn pool_on_device(&self, device_uuid: Uuid) -> Option<PoolInfo> {
        lock(&self.inner)
            .pools
            .iter()
            .find(|p| p.device_uuid == device_uuid)
            .cloned()
    }

    /// A pool by name or UUID.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn pool(&self, name_or_uuid: &str) -> Result<PoolInfo> {
        let by_uuid: Option<Uuid> = name_or_uuid.parse().ok();
        lock(&self.inner)
            .pools
            .iter()
            .find(|p| p.name == name_or_uuid || Some(p.uuid) == by_uuid)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                what: "pool",
                name: name_or_uuid.to_owned(),
                hint: "`coreblk pool list` shows the pools",
            })
    }

    fn online(&self, name_or_uuid: &str) -> Result<PoolInfo> {
        let p = self.pool(name_or_uuid)?;
        match &p.state {
            PoolState::Online => Ok(p),
            PoolState::Importing => Err(Error::PoolImporting { pool: p.name }),
            PoolState::Failed(reason) => Err(Error::PoolFailed {
                pool: p.name.clone(),
                reason: reason.clone(),
            }),
        }
    }

    fn remote(&self, owner: usize) -> &Remote {
        &self.remotes[owner % self.remotes.len()]
    }

    /// Runs a control operation of `pool`'s runtime on its owner reactor.
    async fn pool_op<T: Send + 'static>(
        &self,
        pool: &PoolInfo,
        op: impl FnOnce(&Reactor, Rc<PoolRt>, Reply<T>) + Send + 'static,
    ) -> Result<std::result::Result<T, String>> {
        let uuid = pool.uuid;
        ask(
            self.remote(pool.owner),
            move |r: &Reactor, tx| match pool_rt(uuid) {
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
                Ok(rt) => op(
                    r,
                    rt,
                    Box::new(move |_r: &Reactor, res| {
                        let _ = tx.send(res);
                    }),
                ),
            },
        )
        .await
    }

    /// Reads something of `pool`'s runtime on its owner reactor.
    async fn pool_query<T: Send + 'static>(
        &self,
        pool: &PoolInfo,
        f: impl FnOnce(&PoolRt) -> T + Send + 'static,
    ) -> Result<T> {
        let uuid = pool.uuid;
        let name = pool.name.clone();
        ask(self.remote(pool.owner), move |_r: &Reactor, tx| {
            let _ = tx.send(pool_rt(uuid).map(|rt| f(&rt)));
        })
        .await?
        .map_err(store_err("read pool", &name))
    }

    /// The figures of an online pool.
    ///
    /// # Errors
    /// The reactor does not answer.
    pub async fn figures(&self, pool: &PoolInfo) -> Result<PoolFigures> {
        self.pool_query(pool, |rt| {
            let c = rt.alloc_counts();
            let cluster = rt.cluster_bytes();
            let table = rt.volumes();
            PoolFigures {
                free_bytes: (c.zeroed + c.recycling).saturating_mul(cluster),
                allocated_bytes: c.in_use.saturating_mul(cluster),
                provisioned_bytes: table.volumes.values().map(|v| v.size_bytes).sum(),
                volume_count: u32::try_from(table.volumes.len()).unwrap_or(u32::MAX),
            }
        })
        .await
    }

    // ---- start-up ------------------------------------------------------------------

    /// Imports the pool of every held device (creating the default pool on its first
    /// start), then marks the store ready. Pools that fail are kept as FAILED with the
    /// reason; a claimed device without a pool is left alone.
    pub async fn import_all(self: Arc<Self>) {
        let devices: Vec<ClaimInfo> = self
            .claims
            .snapshot()
            .into_iter()
            .filter(|c| c.present)
            .collect();
        let total = devices.len();
        for (i, c) in devices.iter().enumerate() {
            lock(&self.inner).progress = format!("device {} of {total}", i + 1);
            self.import_device(c, i).await;
        }
        // Pools that were recorded and are still absent stay recorded (their devices may
        // come back); a new default pool gets recorded.
        if let Err(error) = self.persist().await {
            tracing::warn!(%error, "cannot update the record of pools");
        }
        let mut inner = lock(&self.inner);
        inner.ready = true;
        inner.progress = "done".to_owned();
        let online = inner
            .pools
            .iter()
            .filter(|p| p.state == PoolState::Online)
            .count();
        tracing::info!(
            pools = inner.pools.len(),
            online,
            "pool import finished; serving pools and volumes"
        );
    }

    fn open_device(&self, device_uuid: Uuid) -> Result<Arc<dyn BlockDevice>> {
        let (path, file) = self
            .claims
            .device_file(device_uuid)
            .map_err(|e| Error::Internal(format!("cannot reopen device {device_uuid}: {e}")))?
            .ok_or(Error::DeviceNotClaimed {
                device: device_uuid.to_string(),
            })?;
        let dev = UringDevice::from_file(&path, file).map_err(|e| Error::Store {
            op: "open device",
            object: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Arc::new(dev))
    }

    fn unique_name(&self, wanted: String, uuid: Uuid) -> String {
        let inner = lock(&self.inner);
        if inner.pools.iter().any(|p| p.name == wanted) {
            format!("pool-{uuid}")
        } else {
            wanted
        }
    }

    async fn import_device(self: &Arc<Self>, c: &ClaimInfo, owner: usize) {
        let is_default = Some(c.device_uuid) == self.default_device;
        let record = lock(&self.inner).records.get(&c.pool_uuid).cloned();
        let pool_uuid = c.pool_uuid;
        let remote = self.remote(owner).clone();
        let device_uuid = c.device_uuid;
        let me = Arc::clone(self);
        let recorded = record.is_some();
        let found = blocking(move || {
            let dev = me.open_device(device_uuid)?;
            let bd = BlockingDevice::new(Arc::clone(&dev), remote)
                .map_err(|e| Error::Internal(e.to_string()))?;
            match pool::import(&bd) {
                Ok(imp) => Ok(Some((dev, imp, false))),
                Err(PoolError::NoSuperblock { .. }) if !recorded && is_default => {
                    pool::create(&bd, pool::DEFAULT_CLUSTER_BYTES, pool_uuid.0)
                        .and_then(|_| pool::import(&bd))
                        .map(|imp| Some((dev, imp, true)))
                        .map_err(|e| Error::Internal(e.to_string()))
                }
                // A claimed device nobody made a pool on yet.
                Err(PoolError::NoSuperblock { .. }) if !recorded => Ok(None),
                Err(e) => Err(Error::Internal(e.to_string())),
            }
        })
        .await;
        let name = self.unique_name(
            record.as_ref().map_or_else(
                || {
                    if is_default {
                        DEFAULT_POOL_NAME.to_owned()
                    } else {
                        format!("pool-{pool_uuid}")
                    }
                },
                |r| r.name.clone(),
            ),
            pool_uuid,
        );
        let meta = record.unwrap_or(PoolMeta {
            name: name.clone(),
            overcommit_limit: 1.0,
            labels: BTreeMap::new(),
        });
        let mut info = PoolInfo {
            uuid: pool_uuid,
            name,
            device_uuid: c.device_uuid,
            device_path: c.path.clone(),
            overcommit_limit: meta.overcommit_limit,
            labels: meta.labels.clone(),
            state: PoolState::Importing,
            owner,
            cluster_bytes: 0,
            capacity_bytes: 0,
            dev: None,
        };
        let (dev, imp, created) = match found {
            Ok(Some(v)) => v,
            Ok(None) => {
                tracing::info!(device = %c.path.display(), pool = %pool_uuid, "claimed device holds no pool yet");
                return;
            }
            Err(e) => {
                tracing::error!(device = %c.path.display(), pool = %pool_uuid, error = %e, "pool import failed; the pool is not served");
                info.state = PoolState::Failed(e.to_string());
                lock(&self.inner).pools.push(info);
                return;
            }
        };
        if imp.sb.pool_uuid != pool_uuid.0 {
            let reason = format!(
                "the superblock belongs to pool {}, the device label says {pool_uuid}",
                Uuid(imp.sb.pool_uuid)
            );
            tracing::error!(device = %c.path.display(), %reason, "pool import refused");
            info.state = PoolState::Failed(reason);
            lock(&self.inner).pools.push(info);
            return;
        }
        if let Some(problem) = &imp.damaged_copy {
            tracing::warn!(pool = %info.name, %problem, "one superblock copy is damaged; using the other");
        }
        info.cluster_bytes = u64::from(imp.sb.cluster_bytes);
        info.capacity_bytes = imp.sb.clusters.saturating_mul(info.cluster_bytes);
        info.dev = Some(Arc::clone(&dev));
        {
            let mut inner = lock(&self.inner);
            inner.records.insert(pool_uuid, meta);
            inner.pools.push(info.clone());
        }
        if created {
            tracing::info!(pool = %info.name, device = %c.path.display(), "created the default pool");
        }
        if let Err(e) = self.start_pool(&info, dev, imp).await {
            self.set_state(pool_uuid, PoolState::Failed(e.to_string()));
            tracing::error!(pool = %info.name, error = %e, "pool start failed; the pool is not served");
            return;
        }
        self.settle(&info).await;
    }

    async fn start_pool(
        &self,
        info: &PoolInfo,
        dev: Arc<dyn BlockDevice>,
        imp: pool::Imported,
    ) -> Result<()> {
        let uuid = info.uuid;
        let volumes = imp.table.volumes.len();
        ask(self.remote(info.owner), move |r: &Reactor, tx| {
            let res = PoolRt::start(r, &dev, imp).map(|rt| {
                POOLS.with(|p| p.borrow_mut().insert(uuid, rt));
            });
            let _ = tx.send(res);
        })
        .await?
        .map_err(store_err("start pool", &info.name))?;
        tracing::info!(pool = %info.name, uuid = %uuid, reactor = info.owner, volumes, "pool started");
        Ok(())
    }

    /// Waits (bounded) for the pool's free-cluster pipeline to settle after an import
    /// (every unreferenced cluster is zeroed again before use), then serves it.
    async fn settle(&self, info: &PoolInfo) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            match self
                .pool_query(info, |rt| rt.alloc_counts().recycling)
                .await
            {
                Ok(0) => break,
                Ok(n) if Instant::now() >= deadline => {
                    tracing::warn!(pool = %info.name, recycling = n, "free clusters still being zeroed; serving anyway");
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    self.set_state(info.uuid, PoolState::Failed(e.to_string()));
                    return;
                }
            }
        }
        self.set_state(info.uuid, PoolState::Online);
        tracing::info!(pool = %info.name, "pool online");
    }

    fn set_state(&self, uuid: Uuid, state: PoolState) {
        if let Some(p) = lock(&self.inner).pools.iter_mut().find(|p| p.uuid == uuid) {
            p.state = state;
        }
    }

    // ---- pools -----------------------------------------------------------------------

    /// Creates a pool on a claimed device; the same name with the same parameters returns
    /// the existing pool (`false`: not created now).
    ///
    /// # Errors
    /// ALREADY_EXISTS, NOT_FOUND (device), FAILED_PRECONDITION (the device holds a pool),
    /// or the store's failure.
    pub async fn create_pool(self: &Arc<Self>, spec: PoolSpec) -> Result<(PoolInfo, bool)> {
        let _op = self.ops.lock().await;
        self.check_ready()?;
        let device = self.find_claim(&spec.device)?;
        if let Ok(p) = self.pool(&spec.name) {
            let mut diff = Vec::new();
            if p.device_uuid != device.device_uuid {
                diff.push(format!("device {}", p.device_path.display()));
            }
            if p.cluster_bytes != spec.cluster_bytes {
                diff.push(format!("cluster size {} bytes", p.cluster_bytes));
            }
            if (p.overcommit_limit - spec.overcommit_limit).abs() > f64::EPSILON {
                diff.push(format!("overcommit limit {}", p.overcommit_limit));
            }
            if p.labels != spec.labels {
                diff.push("other labels".to_owned());
            }
            if diff.is_empty() {
                return Ok((p, false));
            }
            return Err(Error::AlreadyExists {
                what: "pool",
                name: spec.name,
                difference: diff.join(", "),
            });
        }
        if let Some(p) = self.pool_on_device(device.device_uuid) {
            return Err(Error::InUse {
                what: "device",
                name: device.path.display().to_string(),
                reason: format!(
                    "already holds pool {} (destroy it first, or claim another device)",
                    p.name
                ),
            });
        }
        let owner = lock(&self.inner).pools.len() % self.remotes.len();
        let remote = self.remote(owner).clone();
        let me = Arc::clone(self);
        let (pool_uuid, device_uuid) = (device.pool_uuid, device.device_uuid);
        let cluster = u32::try_from(spec.cluster_bytes).map_err(|_| Error::InvalidArgument {
            field: "cluster_size_bytes",
            reason: "too large".to_owned(),
        })?;
        let name = spec.name.clone();
        let (dev, imp) = blocking(move || {
            let dev = me.open_device(device_uuid)?;
            let bd = BlockingDevice::new(Arc::clone(&dev), remote)
                .map_err(|e| Error::Internal(e.to_string()))?;
            let fail = |e: PoolError| match e {
                PoolError::TooSmall { .. } | PoolError::ClusterSize(_) => Error::InvalidArgument {
                    field: "devices",
                    reason: e.to_string(),
                },
                e => Error::Store {
                    op: "create pool",
                    object: name.clone(),
                    reason: e.to_string(),
                },
            };
            pool::create(&bd, cluster, pool_uuid.0).map_err(fail)?;
            let imp = pool::import(&bd).map_err(fail)?;
            Ok((dev, imp))
        })
        .await?;
        let info = PoolInfo {
            uuid: pool_uuid,
            name: spec.name.clone(),
            device_uuid,
            device_path: device.path.clone(),
            overcommit_limit: spec.overcommit_limit,
            labels: spec.labels.clone(),
            state: PoolState::Importing,
            owner,
            cluster_bytes: u64::from(imp.sb.cluster_bytes),
            capacity_bytes: imp
                .sb
                .clusters
                .saturating_mul(u64::from(imp.sb.cluster_bytes)),
            dev: Some(Arc::clone(&dev)),
        };
        {
            let mut inner = lock(&self.inner);
            inner.records.insert(
                pool_uuid,
                PoolMeta {
                    name: spec.name.clone(),
                    overcommit_limit: spec.overcommit_limit,
                    labels: spec.labels,
                },
            );
            inner.pools.push(info.clone());
        }
        self.persist().await?;
        if let Err(e) = self.start_pool(&info, dev, imp).await {
            self.set_state(pool_uuid, PoolState::Failed(e.to_string()));
            return Err(e);
        }
        tracing::info!(pool = %info.name, device = %info.device_path.display(), "pool created");
        let me = Arc::clone(self);
        let settling = info.clone();
        let task = tokio::spawn(async move { me.settle(&settling).await });
        let _ = tokio::time::timeout(CREATE_WAIT, task).await;
        Ok((self.pool(&info.uuid.to_string())?, true))
    }

    fn find_claim(&self, device: &str) -> Result<ClaimInfo> {
        let by_uuid: Option<Uuid> = device.parse().ok();
        let canonical = fs::canonicalize(device).ok();
        self.claims
            .snapshot()
            .into_iter()
            .find(|c| {
                c.present
                    && (Some(c.device_uuid) == by_uuid
                        || c.path == Path::new(device)
                        || canonical.as_deref() == Some(c.path.as_path()))
            })
            .ok_or_else(|| Error::DeviceNotClaimed {
                device: device.to_owned(),
            })
    }

    /// Destroys a pool: refused while it holds volumes (unless `force`) or a session uses
    /// one; stops its runtime, erases its superblocks, forgets it, and with
    /// `release_device` releases the device and erases its label.
    ///
    /// # Errors
    /// NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE (importing), or an IO failure.
    pub async fn destroy_pool(
        self: &Arc<Self>,
        name_or_uuid: &str,
        force: bool,
        release_device: bool,
    ) -> Result<()> {
        let _op = self.ops.lock().await;
        self.check_ready()?;
        let p = self.pool(name_or_uuid)?;
        if p.state == PoolState::Importing {
            return Err(Error::PoolImporting { pool: p.name });
        }
        if p.state == PoolState::Online {
            let table = self.pool_query(&p, PoolRt::volumes).await?;
            let n = table.volumes.len();
            if n > 0 && !force {
                return Err(Error::InUse {
                    what: "pool",
                    name: p.name,
                    reason: format!(
                        "holds {n} volume(s); delete them first, or destroy with force (their data is lost)"
                    ),
                });
            }
            {
                let inner = lock(&self.inner);
                if table
                    .volumes
                    .values()
                    .any(|v| inner.busy.contains_key(&Uuid(v.uuid)))
                {
                    return Err(Error::InUse {
                        what: "pool",
                        name: p.name,
                        reason:
                            "has a volume an image import or export is using; wait for it to end"
                                .to_owned(),
                    });
                }
            }
            let uuid = p.uuid;
            ask(self.remote(p.owner), move |_r: &Reactor, tx| {
                let rt = POOLS.with(|pools| pools.borrow_mut().remove(&uuid));
                drop(rt);
                let _ = tx.send(());
            })
            .await?;
            // Erase both superblock copies so the pool is not imported again.
            if let Some(dev) = p.dev.clone() {
                let remote = self.remote(p.owner).clone();
                let name = p.name.clone();
                blocking(move || {
                    let bd = BlockingDevice::new(Arc::clone(&dev), remote)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    let start = label::data_region(dev.geometry().size_bytes).start;
                    bd.write(start, &[0u8; 2 * crate::lvs::format::BLOCK_BYTES], true)
                        .and_then(|()| bd.flush())
                        .map_err(|e| Error::Store {
                            op: "destroy pool",
                            object: name,
                            reason: e.to_string(),
                        })
                })
                .await?;
            }
            let mut inner = lock(&self.inner);
            for v in table.volumes.values() {
                inner.imports.remove(&Uuid(v.uuid));
            }
        }
        {
            let mut inner = lock(&self.inner);
            inner.pools.retain(|q| q.uuid != p.uuid);
            inner.records.remove(&p.uuid);
        }
        self.persist().await?;
        tracing::info!(pool = %p.name, force, release_device, "pool destroyed");
        if release_device {
            let claims = Arc::clone(&self.claims);
            let device = p.device_uuid.to_string();
            blocking(move || claims.release(&device, true).map(drop)).await?;
        }
        Ok(())
    }

    // ---- volumes ---------------------------------------------------------------------

    fn volume_info(&self, p: &PoolInfo, m: &VolumeMeta) -> VolumeInfo {
        let uuid = Uuid(m.uuid);
        VolumeInfo {
            pool_uuid: p.uuid,
            pool_name: p.name.clone(),
            id: m.id,
            uuid,
            name: m.name.clone(),
            size_bytes: m.size_bytes,
            labels: m.labels.clone(),
            thick: m.thick,
            written: m.written,
            importing: lock(&self.inner).imports.contains_key(&uuid),
        }
    }

    /// The volumes of one pool (name or UUID) or of every online pool, sorted by name.
    ///
    /// # Errors
    /// The named pool is unknown or not online.
    pub async fn volumes(&self, pool: Option<&str>) -> Result<Vec<VolumeInfo>> {
        self.check_ready()?;
        let pools = match pool {
            Some(p) => vec![self.online(p)?],
            None => self
                .pools()
                .into_iter()
                .filter(|p| p.state == PoolState::Online)
                .collect(),
        };
        let mut out = Vec::new();
        for p in pools {
            let table = self.pool_query(&p, PoolRt::volumes).await?;
            out.extend(table.volumes.values().map(|m| self.volume_info(&p, m)));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        Ok(out)
    }

    /// A volume by name or UUID.
    ///
    /// # Errors
    /// NOT_FOUND, or the store is not ready.
    pub async fn volume(&self, name_or_uuid: &str) -> Result<VolumeInfo> {
        let by_uuid: Option<Uuid> = name_or_uuid.parse().ok();
        self.volumes(None)
            .await?
            .into_iter()
            .find(|v| v.name == name_or_uuid || Some(v.uuid) == by_uuid)
            .ok_or_else(|| Error::NotFound {
                what: "volume",
                name: name_or_uuid.to_owned(),
                hint: "`coreblk volume list` shows the volumes",
            })
    }

    /// Creates a volume; the same name with the same parameters returns the existing one
    /// (`false`: not created now). Names are unique across the node's pools.
    ///
    /// # Errors
    /// ALREADY_EXISTS naming the difference, RESOURCE_EXHAUSTED (overcommit limit, volume
    /// count), NOT_FOUND / UNAVAILABLE for the pool, or the store's failure.
    pub async fn create_volume(&self, spec: VolumeSpec) -> Result<(VolumeInfo, bool)> {
        let _op = self.ops.lock().await;
        self.create_volume_locked(spec).await
    }

    async fn create_volume_locked(&self, spec: VolumeSpec) -> Result<(VolumeInfo, bool)> {
        self.check_ready()?;
        let p = self.online(&spec.pool)?;
        if let Some(v) = self
            .volumes(None)
            .await?
            .into_iter()
            .find(|v| v.name == spec.name)
        {
            let mut diff = Vec::new();
            if v.pool_uuid != p.uuid {
                diff.push(format!("pool {}", v.pool_name));
            }
            if v.size_bytes != spec.size_bytes {
                diff.push(format!("size {} bytes", v.size_bytes));
            }
            if v.labels != spec.labels {
                diff.push("other labels".to_owned());
            }
            if diff.is_empty() {
                return Ok((v, false));
            }
            return Err(Error::AlreadyExists {
                what: "volume",
                name: spec.name,
                difference: diff.join(", "),
            });
        }
        let f = self.figures(&p).await?;
        if f.volume_count >= pool::MAX_VOLUMES {
            return Err(Error::NoSpace {
                pool: p.name,
                reason: format!(
                    "holds {} volumes, the most a pool holds; delete one first",
                    pool::MAX_VOLUMES
                ),
            });
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        // An f64 limit times a byte count: the bound is approximate by nature, and `as`
        // saturates.
        let limit = (p.overcommit_limit * p.capacity_bytes as f64) as u64;
        if f.provisioned_bytes.saturating_add(spec.size_bytes) > limit {
            return Err(Error::NoSpace {
                pool: p.name,
                reason: format!(
                    "a {} byte volume would provision {} of {} bytes allowed (overcommit limit {} x capacity {} bytes); choose a smaller size or another pool",
                    spec.size_bytes,
                    f.provisioned_bytes.saturating_add(spec.size_bytes),
                    limit,
                    p.overcommit_limit,
                    p.capacity_bytes
                ),
            });
        }
        let uuid = Uuid::random()
            .map_err(|e| Error::Internal(format!("cannot make a volume uuid: {e}")))?;
        let meta = VolumeMeta {
            id: 0,
            uuid: uuid.0,
            name: spec.name.clone(),
            size_bytes: spec.size_bytes,
            labels: spec.labels,
            thick: false,
            written: false,
        };
        let id = self
            .pool_op(&p, move |r, rt, reply| rt.create_volume(r, meta, reply))
            .await?
            .map_err(|reason| journal_error("create volume", &spec.name, &p.name, reason))?;
        let table = self.pool_query(&p, PoolRt::volumes).await?;
        let m = table.volumes.get(&id).ok_or_else(|| {
            Error::Internal(format!("volume {} vanished after its create", spec.name))
        })?;
        tracing::info!(volume = %spec.name, uuid = %uuid, pool = %p.name, size_bytes = spec.size_bytes, "volume created");
        Ok((self.volume_info(&p, m), true))
    }

    /// Deletes a volume.
    ///
    /// # Errors
    /// NOT_FOUND, FAILED_PRECONDITION (a session uses it), or the store's failure.
    pub async fn delete_volume(self: &Arc<Self>, name_or_uuid: &str) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let v = self.volume(name_or_uuid).await?;
        if lock(&self.inner).busy.contains_key(&v.uuid) {
            return Err(Error::InUse {
                what: "volume",
                name: v.name,
                reason: "is in use by an image import or export; wait for it to end".to_owned(),
            });
        }
        let p = self.online(&v.pool_uuid.to_string())?;
        let id = v.id;
        self.pool_op(&p, move |r, rt, reply| rt.delete_volume(r, id, reply))
            .await?
            .map_err(|reason| journal_error("delete volume", &v.name, &p.name, reason))?;
        let had_import = lock(&self.inner).imports.remove(&v.uuid).is_some();
        if had_import {
            self.persist().await?;
        }
        tracing::info!(volume = %v.name, uuid = %v.uuid, pool = %p.name, "volume deleted");
        Ok(v)
    }

    /// Grows a volume to `size_bytes` (the same size: nothing to do).
    ///
    /// # Errors
    /// INVALID_ARGUMENT (shrinking), RESOURCE_EXHAUSTED (overcommit limit), NOT_FOUND, or
    /// the store's failure.
    pub async fn resize_volume(&self, name_or_uuid: &str, size_bytes: u64) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let v = self.volume(name_or_uuid).await?;
        if size_bytes == v.size_bytes {
            return Ok(v);
        }
        if size_bytes < v.size_bytes {
            return Err(Error::InvalidArgument {
                field: "size_bytes",
                reason: format!(
                    "volume {} is {} bytes; shrinking to {size_bytes} is refused (data would be lost)",
                    v.name, v.size_bytes
                ),
            });
        }
        let p = self.online(&v.pool_uuid.to_string())?;
        let f = self.figures(&p).await?;
        let limit = overcommit_bytes(&p);
        let after = f.provisioned_bytes - v.size_bytes.min(f.provisioned_bytes) + size_bytes;
        if after > limit {
            return Err(Error::NoSpace {
                pool: p.name,
                reason: format!(
                    "growing {} to {size_bytes} bytes would provision {after} of {limit} bytes allowed (overcommit limit {} x capacity {} bytes)",
                    v.name, p.overcommit_limit, p.capacity_bytes
                ),
            });
        }
        let id = v.id;
        self.pool_op(&p, move |r, rt, reply| rt.resize(r, id, size_bytes, reply))
            .await?
            .map_err(|reason| journal_error("resize volume", &v.name, &p.name, reason))?;
        tracing::info!(volume = %v.name, size_bytes, "volume resized");
        self.volume(&v.uuid.to_string()).await
    }

    /// Replaces a volume's labels with `labels` (checked by the caller against the API's
    /// rules; the store's limits are checked here).
    ///
    /// # Errors
    /// INVALID_ARGUMENT (the store's label limits), NOT_FOUND, or the store's failure.
    pub async fn set_volume_labels(
        &self,
        name_or_uuid: &str,
        set: BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let v = self.volume(name_or_uuid).await?;
        let mut labels = v.labels.clone();
        labels.extend(set);
        for k in remove {
            labels.remove(k);
        }
        if labels == v.labels {
            return Ok(v);
        }
        pool::validate_meta(&v.name, &labels).map_err(|reason| Error::InvalidArgument {
            field: "labels",
            reason: format!("{reason} (the volume store's limit)"),
        })?;
        let p = self.online(&v.pool_uuid.to_string())?;
        let id = v.id;
        self.pool_op(&p, move |r, rt, reply| rt.set_labels(r, id, labels, reply))
            .await?
            .map_err(|reason| journal_error("set labels of volume", &v.name, &p.name, reason))?;
        self.volume(&v.uuid.to_string()).await
    }

    // ---- image imports ---------------------------------------------------------------

    /// Starts (or, with `resume`, continues) the import of a new volume: returns it, a
    /// session on it, and the offset below which everything is already written.
    ///
    /// # Errors
    /// ALREADY_EXISTS (a volume of that name that is not an unfinished import of the same
    /// pool and size, or one without `resume`), FAILED_PRECONDITION (another session uses
    /// it), and the errors of [`Self::create_volume`].
    pub async fn begin_import(
        self: &Arc<Self>,
        spec: VolumeSpec,
        resume: bool,
    ) -> Result<(VolumeInfo, Session, u64)> {
        let _op = self.ops.lock().await;
        self.check_ready()?;
        let existing = self
            .volumes(None)
            .await?
            .into_iter()
            .find(|v| v.name == spec.name);
        let (v, offset) = match existing {
            None => {
                let (v, _) = self.create_volume_locked(spec).await?;
                lock(&self.inner).imports.insert(v.uuid, 0);
                self.persist().await?;
                (v, 0)
            }
            Some(v) => {
                let p = self.pool(&spec.pool)?;
                let recorded = lock(&self.inner).imports.get(&v.uuid).copied();
                let same = v.pool_uuid == p.uuid && v.size_bytes == spec.size_bytes;
                match recorded {
                    Some(off) if resume && same => (v, off),
                    Some(_) if !same => {
                        return Err(Error::AlreadyExists {
                            what: "volume",
                            name: v.name,
                            difference: format!(
                                "an unfinished import into pool {} of size {} bytes",
                                v.pool_name, v.size_bytes
                            ),
                        })
                    }
                    Some(_) => {
                        return Err(Error::AlreadyExists {
                            what: "volume",
                            name: v.name,
                            difference: "an unfinished import (resume it with resume / --resume)"
                                .to_owned(),
                        })
                    }
                    None => {
                        return Err(Error::AlreadyExists {
                            what: "volume",
                            name: v.name,
                            difference:
                                "content already (its import finished, or it was created empty)"
                                    .to_owned(),
                        })
                    }
                }
            }
        };
        let session = self.open_session(&v, true).await?;
        Ok((v, session, offset))
    }

    /// Records that everything below `offset` of an importing volume is written (kept in
    /// memory; written to the state file at most every few seconds).
    pub async fn import_progress(self: &Arc<Self>, volume: Uuid, offset: u64) {
        {
            let mut inner = lock(&self.inner);
            match inner.imports.get_mut(&volume) {
                Some(o) => *o = (*o).max(offset),
                None => return,
            }
        }
        let due = {
            let mut last = lock(&self.last_import_record);
            let due = last.is_none_or(|t| t.elapsed() >= IMPORT_RECORD_PERIOD);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Err(error) = self.persist().await {
                tracing::warn!(%error, "cannot record an import's progress");
            }
        }
    }

    /// Marks an import finished.
    ///
    /// # Errors
    /// The state file cannot be written.
    pub async fn finish_import(self: &Arc<Self>, volume: Uuid) -> Result<()> {
        lock(&self.inner).imports.remove(&volume);
        self.persist().await
    }

    // ---- sessions --------------------------------------------------------------------

    /// Opens an IO session on a volume (on its pool's owner reactor). `exclusive`: refused
    /// while another session uses the volume (imports); otherwise refused only while an
    /// exclusive one does.
    ///
    /// # Errors
    /// FAILED_PRECONDITION (in use), or the volume cannot be opened.
    pub async fn open_session(
        self: &Arc<Self>,
        v: &VolumeInfo,
        exclusive: bool,
    ) -> Result<Session> {
        let p = self.online(&v.pool_uuid.to_string())?;
        {
            let mut inner = lock(&self.inner);
            let n = inner.busy.entry(v.uuid).or_insert(0);
            // u32::MAX marks an exclusive session.
            if *n == u32::MAX || (exclusive && *n > 0) {
                return Err(Error::InUse {
                    what: "volume",
                    name: v.name.clone(),
                    reason: "is in use by another image import or export; wait for it to end"
                        .to_owned(),
                });
            }
            *n = if exclusive { u32::MAX } else { *n + 1 };
        }
        let sid = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let remote = self.remote(p.owner).clone();
        let (uuid, vid) = (p.uuid, v.id);
        let opened = ask(&remote, move |r: &Reactor, tx| {
            let res = pool_rt(uuid)
                .and_then(|rt| rt.open_volume(r, vid))
                .map(|ch| {
                    let max = ch.geometry().max_transfer_bytes;
                    SESSIONS.with(|s| s.borrow_mut().insert(sid, ch));
                    max
                });
            let _ = tx.send(res);
        })
        .await
        .and_then(|r| r.map_err(store_err("open volume", &v.name)));
        match opened {
            Ok(max) => Ok(Session {
                store: Arc::clone(self),
                remote,
                id: sid,
                volume: v.clone(),
                exclusive,
                max_transfer_bytes: u64::from(max.max(4096)),
            }),
            Err(e) => {
                self.end_session(v.uuid, exclusive);
                Err(e)
            }
        }
    }

    fn end_session(&self, volume: Uuid, exclusive: bool) {
        let mut inner = lock(&self.inner);
        if let Some(n) = inner.busy.get_mut(&volume) {
            if exclusive || *n <= 1 {
                inner.busy.remove(&volume);
            } else {
                *n -= 1;
            }
        }
    }

    // ---- stop and state --------------------------------------------------------------

    /// Flushes every online pool that has a volume and stops the pool runtimes. Called
    /// once the API has stopped serving.
    pub async fn stop(&self) {
        for p in self.pools() {
            if p.state != PoolState::Online {
                continue;
            }
            let uuid = p.uuid;
            let (tx, rx) = oneshot::channel::<BatchResult>();
            let sent = self.remote(p.owner).send(Box::new(move |r: &Reactor| {
                let Ok(rt) = pool_rt(uuid) else {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                };
                POOLS.with(|pools| pools.borrow_mut().remove(&uuid));
                let Some(&id) = rt.volumes().volumes.keys().next() else {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                };
                match rt.open_volume(r, id) {
                    Ok(ch) => ch.submit(r, Io::Flush, Batch::new(0, false, tx), 0),
                    Err(e) => {
                        let _ = tx.send(Err(BatchError::Other(e)));
                    }
                }
            }));
            if sent.is_err() {
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(Ok(_))) => tracing::info!(pool = %p.name, "pool flushed and stopped"),
                Ok(Ok(Err(e))) => {
                    tracing::warn!(pool = %p.name, error = ?e, "flushing the pool at stop failed")
                }
                _ => tracing::warn!(pool = %p.name, "flushing the pool at stop did not finish"),
            }
        }
    }

    fn state_text(&self) -> Result<Vec<u8>> {
        let inner = lock(&self.inner);
        let state = StateFile {
            version: STATE_VERSION,
            pools: inner
                .records
                .iter()
                .map(|(uuid, m)| PoolRecord {
                    uuid: uuid.to_string(),
                    name: m.name.clone(),
                    overcommit_limit: m.overcommit_limit,
                    labels: m.labels.clone(),
                })
                .collect(),
            imports: inner
                .imports
                .iter()
                .map(|(uuid, off)| ImportRecord {
                    volume_uuid: uuid.to_string(),
                    durable_offset_bytes: *off,
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&state)
            .map_err(|e| Error::Internal(format!("cannot encode the pool record: {e}")))?;
        text.push(b'\n');
        Ok(text)
    }

    /// Writes the state file atomically (temporary file, fsync, rename, fsync of the
    /// directory) on the blocking pool.
    async fn persist(self: &Arc<Self>) -> Result<()> {
        let me = Arc::clone(self);
        blocking(move || {
            let _one = lock(&me.persisting);
            let text = me.state_text()?;
            let err = |source| Error::State {
                path: me.state_path.clone(),
                source,
            };
            let dir = me
                .state_path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            fs::create_dir_all(dir).map_err(err)?;
            let tmp = me.state_path.with_extension("json.tmp");
            let mut f = File::create(&tmp).map_err(err)?;
            f.write_all(&text).map_err(err)?;
            f.sync_all().map_err(err)?;
            drop(f);
            fs::rename(&tmp, &me.state_path).map_err(err)?;
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
            Ok(())
        })
        .await
    }
}

/// The most a pool may provision: its overcommit limit times its capacity.
#[must_use]
pub fn overcommit_bytes(p: &PoolInfo) -> u64 {
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    // An f64 limit times a byte count: the bound is approximate by nature, and `as`
    // saturates.
    let limit = (p.overcommit_limit * p.capacity_bytes as f64) as u64;
    limit
}

/// A failed journal commit: ENOSPC means the pool's journal ring is full (checkpoints are
/// not built yet).
fn journal_error(op: &'static str, object: &str, pool: &str, reason: String) -> Error {
    if reason.contains(&format!("(errno {})", libc::ENOSPC)) {
        return Error::NoSpace {
            pool: pool.to_owned(),
            reason: format!(
                "{op} {object}: its metadata journal is full ({reason}); this version has no \
                 journal checkpoints yet, so the pool takes no more metadata changes"
            ),
        };
    }
    Error::Store {
        op,
        object: object.to_owned(),
        reason,
    }
}

/// A volume IO session: a channel on the pool's owner reactor, used by one import or
/// export. Closed (and the volume freed for deletion) on drop.
#[derive(Debug)]
pub struct Session {
    store: Arc<Store>,
    remote: Remote,
    id: u64,
    /// The volume.
    pub volume: VolumeInfo,
    exclusive: bool,
    max_transfer_bytes: u64,
}

/// Completes the pieces of one session request on the reactor and sends the result once
/// all are done: the bytes read (for reads) or an empty vector, or the first failure
/// (offset within the request, errno).
struct Batch {
    left: Cell<usize>,
    reading: bool,
    out: RefCell<Vec<u8>>,
    err: Cell<Option<(u64, Errno)>>,
    tx: RefCell<Option<oneshot::Sender<BatchResult>>>,
}

type BatchResult = std::result::Result<Vec<u8>, BatchError>;

/// Why a session request failed.
#[derive(Debug)]
enum BatchError {
    /// A piece failed: its offset within the request, and the error.
    Io(u64, Errno),
    /// The request could not be submitted.
    Other(String),
}

impl Batch {
    fn new(parts: usize, reading: bool, tx: oneshot::Sender<BatchResult>) -> Rc<Self> {
        Rc::new(Self {
            left: Cell::new(parts.max(1)),
            reading,
            out: RefCell::new(Vec::new()),
            err: Cell::new(None),
            tx: RefCell::new(Some(tx)),
        })
    }
}

impl Completion for Batch {
    fn complete(&self, _rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>) {
        match res {
            Err(e) => {
                if self.err.get().is_none() {
                    self.err.set(Some((tag, e)));
                }
            }
            Ok(_) => {
                if let (true, Some(b)) = (self.reading, buf) {
                    let mut out = self.out.borrow_mut();
                    let start = usize::try_from(tag).unwrap_or(usize::MAX);
                    if let Some(dst) = out.get_mut(start..start.saturating_add(b.len())) {
                        dst.copy_from_slice(&b);
                    }
                }
            }
        }
        let left = self.left.get().saturating_sub(1);
        self.left.set(left);
        if left > 0 {
            return;
        }
        if let Some(tx) = self.tx.borrow_mut().take() {
            let res = match self.err.get() {
                Some((at, e)) => Err(BatchError::Io(at, e)),
                None => Ok(std::mem::take(&mut *self.out.borrow_mut())),
            };
            let _ = tx.send(res);
        }
    }
}

/// What one session request does.
enum Op {
    Read(usize),
    Write(Vec<u8>),
    Zero(u64),
    Flush,
}

impl Session {
    /// Largest piece the channel takes in one IO.
    pub fn max_transfer_bytes(&self) -> u64 {
        self.max_transfer_bytes
    }

    async fn run(&self, op_name: &'static str, offset: u64, op: Op) -> Result<Vec<u8>> {
        let sid = self.id;
        let max = self.max_transfer_bytes;
        let (tx, rx) = oneshot::channel::<BatchResult>();
        let sent = self.remote.send(Box::new(move |r: &Reactor| {
            let Some(ch) = SESSIONS.with(|s| s.borrow().get(&sid).cloned()) else {
                let _ = tx.send(Err(BatchError::Other("the session is closed".to_owned())));
                return;
            };
            match op {
                Op::Flush => ch.submit(r, Io::Flush, Batch::new(1, false, tx), 0),
                Op::Zero(len) => ch.submit(
                    r,
                    Io::WriteZeroes { offset, len },
                    Batch::new(1, false, tx),
                    0,
                ),
                Op::Read(len) => {
                    let pieces = split(len as u64, max);
                    let batch = Batch::new(pieces.len(), true, tx);
                    *batch.out.borrow_mut() = vec![0; len];
                    for (at, n) in pieces {
                        let n = usize::try_from(n).unwrap_or(usize::MAX);
                        let buf = r.bufs().take(n).unwrap_or_else(|| IoBuf::alloc(n));
                        let io = Io::Read {
                            offset: offset + at,
                            buf,
                        };
                        ch.submit(r, io, Rc::clone(&batch) as Rc<dyn Completion>, at);
                    }
                }
                Op::Write(data) => {
                    let pieces = split(data.len() as u64, max);
                    let batch = Batch::new(pieces.len(), false, tx);
                    for (at, n) in pieces {
                        let (s, e) = (
                            usize::try_from(at).unwrap_or(usize::MAX),
                            usize::try_from(at + n).unwrap_or(usize::MAX),
                        );
                        let part = &data[s..e];
                        let buf = match r.bufs().take(part.len()) {
                            Some(mut b) => {
                                b.copy_from_slice(part);
                                b
                            }
                            None => IoBuf::from_slice(part),
                        };
                        let io = Io::Write {
                            offset: offset + at,
                            buf,
                            fua: false,
                        };
                        ch.submit(r, io, Rc::clone(&batch) as Rc<dyn Completion>, at);
                    }
                }
            }
        }));
        sent.map_err(|_| Error::ShuttingDown)?;
        let res = match tokio::time::timeout(OP_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(Error::ShuttingDown),
            Err(_) => {
                return Err(Error::Internal(format!(
                    "{op_name} of volume {} at byte {offset} did not complete within {} s",
                    self.volume.name,
                    OP_TIMEOUT.as_secs()
                )))
            }
        };
        res.map_err(|e| match e {
            BatchError::Io(at, errno) => Error::VolumeIo {
                op: op_name,
                volume: self.volume.name.clone(),
                offset_bytes: offset + at,
                errno,
            },
            BatchError::Other(reason) => Error::Store {
                op: op_name,
                object: self.volume.name.clone(),
                reason,
            },
        })
    }

    /// Writes `data` at `offset` (both multiples of the block size); returns once every
    /// piece completed (written, not flushed).
    ///
    /// # Errors
    /// The IO failed.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<()> {
        self.run("write", offset, Op::Write(data)).await.map(drop)
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    ///
    /// # Errors
    /// The IO failed.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.run("write-zeroes", offset, Op::Zero(len))
            .await
            .map(drop)
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// The IO failed.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.run("read", offset, Op::Read(len)).await
    }

    /// Flushes the pool (journal and device).
    ///
    /// # Errors
    /// The flush failed.
    pub async fn flush(&self) -> Result<()> {
        self.run("flush", 0, Op::Flush).await.map(drop)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let sid = self.id;
        let _ = self.remote.send(Box::new(move |r: &Reactor| {
            if let Some(ch) = SESSIONS.with(|s| s.borrow_mut().remove(&sid)) {
                ch.close(r);
            }
        }));
        self.store.end_session(self.volume.uuid, self.exclusive);
    }
}

/// Pieces of at most `max` bytes covering `len`: (offset within, length).
fn split(len: u64, max: u64) -> Vec<(u64, u64)> {
    let max = max.max(4096);
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = max.min(len - at);
        out.push((at, n));
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range_in_bounded_pieces() {
        assert_eq!(split(0, 1 << 20), vec![]);
        assert_eq!(split(4096, 1 << 20), vec![(0, 4096)]);
        assert_eq!(
            split(3 << 20, 1 << 20),
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20)]
        );
        assert_eq!(split(8192, 0), vec![(0, 4096), (4096, 4096)]);
    }

    #[test]
    fn journal_full_is_resource_exhausted() {
        let full = format!("journal: {}", Errno::ENOSPC);
        let e = journal_error("create volume", "v", "p", full);
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let e = journal_error(
            "create volume",
            "v",
            "p",
            format!("journal: {}", Errno::EIO),
        );
        assert_eq!(e.code(), tonic::Code::Internal);
    }
}
