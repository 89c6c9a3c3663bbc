//! The volume store as the control plane sees it: every pool this daemon serves, each
//! running on its owner reactor and reached only by messages.
//!
//! Owns: [`Store`] — the pool registry, the start-up import of the pools on claimed devices
//! (creating the default pool on its first start), pool create and destroy, volume create
//! (empty or as a clone), delete, listing, rollback and inflate, snapshots (one volume or
//! a group at one instant, delete, diff), and IO [`Session`]s on volumes and snapshots for
//! image import and export — plus the record `<var-dir>/pools.json` of what the on-disk
//! format does not hold yet: pool names, overcommit limits and labels, the volumes whose
//! image import is unfinished, and the origin of snapshots and clones by UUID (their
//! source's UUID and name, which the store's lineage loses when the source is deleted,
//! and the group a snapshot was taken in).
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
use tokio::sync::{oneshot, watch};

use super::claims::{ClaimInfo, Claims};
use super::devices::blocking;
use super::error::{Error, Result};
use super::objrec::ObjectRecord;
use crate::bdev::blocking::BlockingDevice;
use crate::bdev::label::{self, Uuid};
use crate::bdev::uring::UringDevice;
use crate::bdev::{BlockDevice, Channel, Io};
use crate::lvs::pool::{self, PoolError, VolumeMeta};
use crate::lvs::qos::QosLimits;
use crate::lvs::table::{VolumeTable, MAX_CONTROL_BYTES};
use crate::lvs::volume::{Degraded, ObjectUsage, PoolRt, Reply};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, Remote};

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "pools.json";
/// The name of the pool on the default device.
pub const DEFAULT_POOL_NAME: &str = "default";
/// Smallest cluster size the API accepts (the store's limit: one 4 KiB block).
pub const MIN_CLUSTER_BYTES: u64 = 4 << 10;
/// Largest cluster size (the store's limit).
pub const MAX_CLUSTER_BYTES: u64 = 4 << 20;
/// Largest volume (bounds the cluster map a volume needs).
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Puts the QoS limits recorded in `rt`'s control records in force (at pool start).
fn apply_recorded_qos(rt: &PoolRt, pool: &str) {
    let t = rt.volumes();
    for (id, data) in &t.control {
        match ObjectRecord::decode(Some(data)) {
            Ok(ObjectRecord { qos: Some(q), .. }) => {
                if let Err(e) = rt.set_qos(*id, &q) {
                    tracing::error!(pool, id, error = %e, "recorded QoS limits not applied");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(pool, id, error = %e, "unreadable control record"),
        }
    }
}

/// Longest a reactor may take to answer a control message.
pub const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a pool's import waits for its free-cluster pipeline to settle before it is
/// served anyway (allocations then wait for zeroed clusters).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a start-up import waits for the pipeline: every unreferenced cluster is zeroed
/// again after an import, which takes minutes on a large (or slow) device, and the pools
/// (and the exports left by the previous daemon, whose IO is paused meanwhile) must serve
/// within seconds of a restart; the zeroing goes on in the background. Reads and writes
/// to allocated clusters never wait for it (only allocations do), so the wait is a short
/// head start, not a second of every restart (it was 1 s: a native restart of a 2 GiB
/// pool served after 1.47 s, 1.0 s of it this wait).
pub const IMPORT_SETTLE_WAIT: Duration = Duration::from_millis(100);
/// Longest `CreatePool` waits for the new pool to come online before answering with it
/// still importing.
pub const CREATE_WAIT: Duration = Duration::from_secs(30);
/// Longest an inflate may take (it copies every cluster a volume shares).
pub const INFLATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest the final flush and checkpoint of a pool may take at a stop.
const STOP_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two records of an import's progress.
const IMPORT_RECORD_PERIOD: Duration = Duration::from_secs(2);

const STATE_VERSION: u32 = 1;

/// Testing builds only: milliseconds the start-up import waits before it begins, so tests
/// can call the API while it still answers UNAVAILABLE (the window is otherwise a few
/// milliseconds long).
#[cfg(feature = "testing")]
pub const IMPORT_DELAY_ENV: &str = "COREBLK_TEST_IMPORT_DELAY_MS";

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
    /// Freed by deleted objects (and discards, copy-on-write), being recycled.
    pub recycling_bytes: u64,
    /// Held back for thick volumes.
    pub reserved_bytes: u64,
    /// Volumes (clones included).
    pub volume_count: u32,
    /// Snapshots.
    pub snapshot_count: u32,
    /// Served but degraded: metadata changes fail (why: [`Degraded::message`]).
    pub degraded: Option<Degraded>,
}

/// Where a clone came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneSource {
    /// The source's UUID (it may have been deleted since).
    pub uuid: Uuid,
    /// The source is a snapshot (else a volume).
    pub snapshot: bool,
}

/// What a clone is made from, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    /// A snapshot, by name or UUID.
    Snapshot(String),
    /// A volume, by name or UUID.
    Volume(String),
}

/// A volume or snapshot as an IO session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// Its pool's UUID.
    pub pool_uuid: Uuid,
    /// Id inside the pool.
    pub id: u32,
    /// UUID.
    pub uuid: Uuid,
    /// Name.
    pub name: String,
    /// Size.
    pub size_bytes: u64,
    /// A (read-only) snapshot.
    pub snapshot: bool,
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
    /// Clusters it maps (shared or not); filled by [`Store::with_usage`].
    pub allocated_bytes: u64,
    /// Clusters only it references; filled by [`Store::with_usage`].
    pub unique_bytes: u64,
    /// Creation time, where the store has it (clones).
    pub created_unix: Option<u64>,
    /// The clone's source; `None` for a plain volume or an inflated clone.
    pub source: Option<CloneSource>,
    /// The ublk device it is exported as, while it is.
    pub device_path: Option<String>,
    /// QoS limits (unlimited when none are set).
    pub qos: QosLimits,
}

impl VolumeInfo {
    /// The volume as a session sees it.
    #[must_use]
    pub fn object(&self) -> ObjectRef {
        ObjectRef {
            pool_uuid: self.pool_uuid,
            id: self.id,
            uuid: self.uuid,
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            snapshot: false,
        }
    }
}

/// A snapshot as the control plane reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
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
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The volume it was taken of (`None`: deleted before this daemon recorded it).
    pub volume_uuid: Option<Uuid>,
    /// That volume's name (empty when unknown).
    pub volume_name: String,
    /// The group snapshot it belongs to.
    pub group_uuid: Option<Uuid>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Clusters it maps; filled by [`Store::with_usage`].
    pub allocated_bytes: u64,
    /// Clusters only it references; filled by [`Store::with_usage`].
    pub unique_bytes: u64,
}

impl SnapshotInfo {
    /// The snapshot as a session sees it.
    #[must_use]
    pub fn object(&self) -> ObjectRef {
        ObjectRef {
            pool_uuid: self.pool_uuid,
            id: self.id,
            uuid: self.uuid,
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            snapshot: true,
        }
    }
}

/// Objects whose allocated and unique bytes can be filled in.
pub trait HasUsage {
    /// Pool and id.
    fn key(&self) -> (Uuid, u32);
    /// Sets the figures.
    fn set_usage(&mut self, u: ObjectUsage);
}

impl HasUsage for VolumeInfo {
    fn key(&self) -> (Uuid, u32) {
        (self.pool_uuid, self.id)
    }
    fn set_usage(&mut self, u: ObjectUsage) {
        self.allocated_bytes = u.allocated_bytes;
        self.unique_bytes = u.unique_bytes;
    }
}

impl HasUsage for SnapshotInfo {
    fn key(&self) -> (Uuid, u32) {
        (self.pool_uuid, self.id)
    }
    fn set_usage(&mut self, u: ObjectUsage) {
        self.allocated_bytes = u.allocated_bytes;
        self.unique_bytes = u.unique_bytes;
    }
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
    /// Clone source (`size_bytes` 0: the source's size).
    pub source: Option<SourceRef>,
    /// Reserve the whole size up front (thick); clones are always thin.
    pub thick: bool,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OriginRecord {
    uuid: String,
    source_uuid: String,
    source_name: String,
    #[serde(default)]
    source_snapshot: bool,
    #[serde(default)]
    group_uuid: Option<String>,
    #[serde(default)]
    inflated: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    pools: Vec<PoolRecord>,
    #[serde(default)]
    imports: Vec<ImportRecord>,
    #[serde(default)]
    origins: Vec<OriginRecord>,
}

/// Where a snapshot or clone came from, as recorded at its creation (the store keeps only
/// the source's pool-local id, which says nothing once the source is deleted).
#[derive(Debug, Clone, PartialEq)]
struct Origin {
    source_uuid: Uuid,
    source_name: String,
    source_snapshot: bool,
    group: Option<Uuid>,
    inflated: bool,
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
    /// Snapshots and clones → where they came from.
    origins: BTreeMap<Uuid, Origin>,
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
    /// Exported volumes and snapshots → their device path (set by the export layer).
    exported: Mutex<HashMap<Uuid, String>>,
    /// Becomes `true` with `Inner::ready`, for [`Self::wait_ready`].
    ready_tx: watch::Sender<bool>,
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
    ask_within(remote, OP_TIMEOUT, f).await
}

/// [`ask`] with another deadline.
async fn ask_within<T: Send + 'static>(
    remote: &Remote,
    timeout: Duration,
    f: impl FnOnce(&Reactor, oneshot::Sender<T>) + Send + 'static,
) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    remote
        .send(Box::new(move |r: &Reactor| f(r, tx)))
        .map_err(|_| Error::ShuttingDown)?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => Ok(v),
        // The message or its reply was dropped unrun: the reactor is stopping.
        Ok(Err(_)) => Err(Error::ShuttingDown),
        Err(_) => Err(Error::Internal(format!(
            "reactor {} did not answer within {} s",
            remote.id(),
            timeout.as_secs()
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
                for o in state.origins {
                    let parse = |s: &str| s.parse::<Uuid>().map_err(|e| bad(format!("{e}")));
                    let group = match o.group_uuid.as_deref() {
                        Some(g) => Some(parse(g)?),
                        None => None,
                    };
                    inner.origins.insert(
                        parse(&o.uuid)?,
                        Origin {
                            source_uuid: parse(&o.source_uuid)?,
                            source_name: o.source_name,
                            source_snapshot: o.source_snapshot,
                            group,
                            inflated: o.inflated,
                        },
                    );
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
            exported: Mutex::new(HashMap::new()),
            ready_tx: watch::Sender::new(false),
        })
    }

    /// Whether the start-up import has finished.
    pub fn is_ready(&self) -> bool {
        lock(&self.inner).ready
    }

    /// Returns once the start-up import has finished.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready_tx.subscribe();
        // The sender lives as long as `self`: `wait_for` ends only when ready.
        let _ = rx.wait_for(|ready| *ready).await;
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
        self.pool_op_within(pool, OP_TIMEOUT, op).await
    }

    /// [`Self::pool_op`] with another deadline.
    async fn pool_op_within<T: Send + 'static>(
        &self,
        pool: &PoolInfo,
        timeout: Duration,
        op: impl FnOnce(&Reactor, Rc<PoolRt>, Reply<T>) + Send + 'static,
    ) -> Result<std::result::Result<T, String>> {
        let uuid = pool.uuid;
        ask_within(
            self.remote(pool.owner),
            timeout,
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
    pub(crate) async fn pool_query<T: Send + 'static>(
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
            let u = rt.usage();
            PoolFigures {
                free_bytes: u.free_bytes,
                allocated_bytes: u.allocated_bytes,
                provisioned_bytes: u.provisioned_bytes,
                recycling_bytes: u.recycling_bytes,
                reserved_bytes: u.reserved_bytes,
                volume_count: u32::try_from(u.volumes).unwrap_or(u32::MAX),
                snapshot_count: u32::try_from(u.snapshots).unwrap_or(u32::MAX),
                degraded: rt.health(),
            }
        })
        .await
    }

    // ---- start-up ------------------------------------------------------------------

    /// Imports the pool of every held device (creating the default pool on its first
    /// start), then marks the store ready. Pools that fail are kept as FAILED with the
    /// reason; a claimed device without a pool is left alone.
    pub async fn import_all(self: Arc<Self>) {
        #[cfg(feature = "testing")]
        if let Some(ms) = std::env::var(IMPORT_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            lock(&self.inner).progress = format!("delayed {ms} ms by {IMPORT_DELAY_ENV}");
            tracing::warn!(delay_ms = ms, "testing build: the pool import waits first");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
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
        self.ready_tx.send_replace(true);
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
        let began = Instant::now();
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
        let imported = began.elapsed();
        let t = imp.timings;
        let started = Instant::now();
        if let Err(e) = self.start_pool(&info, dev, imp).await {
            self.set_state(pool_uuid, PoolState::Failed(e.to_string()));
            tracing::error!(pool = %info.name, error = %e, "pool start failed; the pool is not served");
            return;
        }
        let start = started.elapsed();
        self.settle(&info, IMPORT_SETTLE_WAIT).await;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            pool = %info.name,
            total_ms = ms(began.elapsed()),
            import_ms = ms(imported),
            checkpoint_ms = ms(t.checkpoint),
            journal_ms = ms(t.journal),
            replayed_blocks = t.replayed_blocks,
            apply_ms = ms(t.apply),
            start_ms = ms(start),
            "pool import timings"
        );
    }

    async fn start_pool(
        &self,
        info: &PoolInfo,
        dev: Arc<dyn BlockDevice>,
        imp: pool::Imported,
    ) -> Result<()> {
        let uuid = info.uuid;
        let volumes = imp.table.volumes.len();
        let milli = overcommit_milli(info.overcommit_limit);
        let name = info.name.clone();
        ask(self.remote(info.owner), move |r: &Reactor, tx| {
            let res = PoolRt::start(r, &dev, imp).map(|rt| {
                // QoS limits are in force before any channel serves IO (exports are
                // re-attached after the import).
                apply_recorded_qos(&rt, &name);
                // The store enforces the limit atomically at create/resize: keep it in step.
                if rt.usage().overcommit_milli != milli {
                    rt.set_overcommit(
                        r,
                        milli,
                        Box::new(move |_r: &Reactor, res: std::result::Result<(), String>| {
                            if let Err(e) = res {
                                tracing::warn!(pool = %name, error = %e, "could not record the overcommit limit in the pool");
                            }
                        }),
                    );
                }
                POOLS.with(|p| p.borrow_mut().insert(uuid, rt));
            });
            let _ = tx.send(res);
        })
        .await?
        .map_err(store_err("start pool", &info.name))?;
        tracing::info!(pool = %info.name, uuid = %uuid, reactor = info.owner, volumes, "pool started");
        Ok(())
    }

    /// Waits (at most `max_wait`) for the pool's free-cluster pipeline to settle after an
    /// import (every unreferenced cluster is zeroed again before use), then serves it.
    async fn settle(&self, info: &PoolInfo, max_wait: Duration) {
        let deadline = Instant::now() + max_wait;
        loop {
            match self
                .pool_query(info, |rt| rt.alloc_counts().recycling)
                .await
            {
                Ok(0) => break,
                Ok(n) if Instant::now() >= deadline => {
                    tracing::info!(pool = %info.name, recycling = n, "free clusters still being zeroed; serving meanwhile (allocations wait for zeroed clusters)");
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
        let task = tokio::spawn(async move { me.settle(&settling, SETTLE_TIMEOUT).await });
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
            let n = table.volumes.len() + table.snapshots.len();
            if n > 0 && !force {
                return Err(Error::InUse {
                    what: "pool",
                    name: p.name,
                    reason: format!(
                        "holds {n} volume(s) and snapshot(s); delete them first, or destroy with force (their data is lost)"
                    ),
                });
            }
            {
                let exported = lock(&self.exported);
                if let Some((v, device)) = table
                    .volumes
                    .values()
                    .chain(table.snapshots.values())
                    .find_map(|v| Some((v, exported.get(&Uuid(v.uuid))?)))
                {
                    return Err(Error::Exported {
                        what: "pool",
                        name: format!("{} (its volume {})", p.name, v.name),
                        device: device.clone(),
                    });
                }
            }
            {
                let inner = lock(&self.inner);
                if table
                    .volumes
                    .values()
                    .chain(table.snapshots.values())
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
            for v in table.volumes.values().chain(table.snapshots.values()) {
                inner.imports.remove(&Uuid(v.uuid));
                inner.origins.remove(&Uuid(v.uuid));
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

    fn volume_info(&self, p: &PoolInfo, m: &VolumeMeta, table: &VolumeTable) -> VolumeInfo {
        let uuid = Uuid(m.uuid);
        // Before `inner`: the two locks are never held together.
        let device_path = lock(&self.exported).get(&uuid).cloned();
        let inner = lock(&self.inner);
        let lineage = table.lineage.get(&m.id);
        let source = match inner.origins.get(&uuid) {
            Some(o) if o.inflated => None,
            Some(o) => Some(CloneSource {
                uuid: o.source_uuid,
                snapshot: o.source_snapshot,
            }),
            // Not recorded (a crash between the store's commit and the record): the
            // store's lineage, while the source lives.
            None => lineage.and_then(|l| {
                table.get(l.source).map(|s| CloneSource {
                    uuid: Uuid(s.uuid),
                    snapshot: table.is_snapshot(l.source),
                })
            }),
        };
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
            importing: inner.imports.contains_key(&uuid),
            allocated_bytes: 0,
            unique_bytes: 0,
            created_unix: lineage.map(|l| l.created_unix),
            source,
            device_path,
            qos: ObjectRecord::decode(table.control.get(&m.id).map(Vec::as_slice))
                .ok()
                .and_then(|r| r.qos)
                .unwrap_or_default(),
        }
    }

    fn snapshot_info(&self, p: &PoolInfo, m: &VolumeMeta, table: &VolumeTable) -> SnapshotInfo {
        let uuid = Uuid(m.uuid);
        let inner = lock(&self.inner);
        let lineage = table.lineage.get(&m.id).copied().unwrap_or_default();
        let origin = inner.origins.get(&uuid);
        let (volume_uuid, volume_name) = match origin {
            Some(o) => (Some(o.source_uuid), o.source_name.clone()),
            None => table
                .volumes
                .get(&lineage.source)
                .map_or((None, String::new()), |v| {
                    (Some(Uuid(v.uuid)), v.name.clone())
                }),
        };
        SnapshotInfo {
            pool_uuid: p.uuid,
            pool_name: p.name.clone(),
            id: m.id,
            uuid,
            name: m.name.clone(),
            size_bytes: m.size_bytes,
            labels: m.labels.clone(),
            volume_uuid,
            volume_name,
            group_uuid: origin.and_then(|o| o.group),
            created_unix: lineage.created_unix,
            allocated_bytes: 0,
            unique_bytes: 0,
        }
    }

    fn pools_to_list(&self, pool: Option<&str>) -> Result<Vec<PoolInfo>> {
        self.check_ready()?;
        Ok(match pool {
            Some(p) => vec![self.online(p)?],
            None => self
                .pools()
                .into_iter()
                .filter(|p| p.state == PoolState::Online)
                .collect(),
        })
    }

    /// The volumes of one pool (name or UUID) or of every online pool, sorted by name,
    /// without their allocated and unique bytes ([`Self::with_usage`]).
    ///
    /// # Errors
    /// The named pool is unknown or not online.
    pub async fn volumes(&self, pool: Option<&str>) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for p in self.pools_to_list(pool)? {
            let table = self.pool_query(&p, PoolRt::volumes).await?;
            out.extend(
                table
                    .volumes
                    .values()
                    .map(|m| self.volume_info(&p, m, &table)),
            );
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        Ok(out)
    }

    /// The snapshots of one pool (name or UUID) or of every online pool, sorted by name,
    /// without their allocated and unique bytes ([`Self::with_usage`]).
    ///
    /// # Errors
    /// The named pool is unknown or not online.
    pub async fn snapshots(&self, pool: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for p in self.pools_to_list(pool)? {
            let table = self.pool_query(&p, PoolRt::volumes).await?;
            out.extend(
                table
                    .snapshots
                    .values()
                    .map(|m| self.snapshot_info(&p, m, &table)),
            );
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
        Ok(out)
    }

    /// Fills in the allocated and unique bytes of `items` (one scan of each object's map
    /// on its pool's owner reactor: do it for a page, not for a whole listing).
    ///
    /// # Errors
    /// A reactor does not answer.
    pub async fn with_usage<T: HasUsage>(&self, mut items: Vec<T>) -> Result<Vec<T>> {
        let mut by_pool: BTreeMap<Uuid, Vec<u32>> = BTreeMap::new();
        for i in &items {
            let (pool, id) = i.key();
            by_pool.entry(pool).or_default().push(id);
        }
        let mut usage: HashMap<(Uuid, u32), ObjectUsage> = HashMap::new();
        for (pool, ids) in by_pool {
            let Ok(p) = self.online(&pool.to_string()) else {
                continue;
            };
            let got = self
                .pool_query(&p, move |rt| {
                    ids.iter()
                        .filter_map(|id| rt.object_usage(*id).map(|u| (*id, u)))
                        .collect::<Vec<_>>()
                })
                .await?;
            usage.extend(got.into_iter().map(|(id, u)| ((pool, id), u)));
        }
        for i in &mut items {
            if let Some(u) = usage.get(&i.key()) {
                i.set_usage(*u);
            }
        }
        Ok(items)
    }

    /// A volume by name or UUID (without usage figures).
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

    /// A snapshot by name or UUID (without usage figures).
    ///
    /// # Errors
    /// NOT_FOUND, or the store is not ready.
    pub async fn snapshot(&self, name_or_uuid: &str) -> Result<SnapshotInfo> {
        let by_uuid: Option<Uuid> = name_or_uuid.parse().ok();
        self.snapshots(None)
            .await?
            .into_iter()
            .find(|s| s.name == name_or_uuid || Some(s.uuid) == by_uuid)
            .ok_or_else(|| Error::NotFound {
                what: "snapshot",
                name: name_or_uuid.to_owned(),
                hint: "`coreblk snapshot list` shows the snapshots",
            })
    }

    /// Creates a volume, empty or as a clone; the same name with the same parameters
    /// returns the existing one (`false`: not created now). Names are unique across the
    /// node's pools.
    ///
    /// # Errors
    /// ALREADY_EXISTS naming the difference, RESOURCE_EXHAUSTED (overcommit limit, volume
    /// count), NOT_FOUND / UNAVAILABLE for the pool or source, INVALID_ARGUMENT (a clone
    /// smaller than its source, or in another pool), or the store's failure.
    pub async fn create_volume(self: &Arc<Self>, spec: VolumeSpec) -> Result<(VolumeInfo, bool)> {
        let _op = self.ops.lock().await;
        self.create_volume_locked(spec).await
    }

    /// The source of a clone request: its pool, id, UUID, name, size, kind.
    async fn resolve_source(&self, source: &SourceRef) -> Result<(PoolInfo, ObjectRef)> {
        let o = match source {
            SourceRef::Snapshot(s) => self.snapshot(s).await?.object(),
            SourceRef::Volume(v) => {
                let v = self.volume(v).await?;
                if v.importing {
                    return Err(Error::InUse {
                        what: "volume",
                        name: v.name,
                        reason:
                            "is being imported; finish (or delete) the import before cloning it"
                                .to_owned(),
                    });
                }
                v.object()
            }
        };
        Ok((self.online(&o.pool_uuid.to_string())?, o))
    }

    async fn create_volume_locked(
        self: &Arc<Self>,
        mut spec: VolumeSpec,
    ) -> Result<(VolumeInfo, bool)> {
        self.check_ready()?;
        let source = match &spec.source {
            Some(s) => Some(self.resolve_source(s).await?),
            None => None,
        };
        let p = match &source {
            Some((sp, _)) => {
                if !spec.pool.is_empty() && self.pool(&spec.pool)?.uuid != sp.uuid {
                    return Err(Error::InvalidArgument {
                        field: "pool",
                        reason: format!(
                            "a clone lives in its source's pool {}; leave the pool empty or name that one",
                            sp.name
                        ),
                    });
                }
                sp.clone()
            }
            None => self.online(&spec.pool)?,
        };
        if let Some((_, src)) = &source {
            if spec.size_bytes == 0 {
                spec.size_bytes = src.size_bytes;
            }
            if spec.size_bytes < src.size_bytes {
                return Err(Error::InvalidArgument {
                    field: "size_bytes",
                    reason: format!(
                        "{} bytes cannot hold the {}-byte source {}; give 0 (the source's size) or more",
                        spec.size_bytes, src.size_bytes, src.name
                    ),
                });
            }
        }
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
            if v.thick != spec.thick {
                diff.push(if v.thick { "thick" } else { "thin" }.to_owned());
            }
            let want = source.as_ref().map(|(_, s)| s.uuid);
            // An inflated clone reports no source; its record still knows it.
            let had = lock(&self.inner)
                .origins
                .get(&v.uuid)
                .map(|o| o.source_uuid)
                .or(v.source.map(|s| s.uuid));
            if had != want {
                diff.push(match had {
                    Some(u) => format!("source {u}"),
                    None => "no source (an empty volume)".to_owned(),
                });
            }
            if diff.is_empty() {
                let v = self.with_usage(vec![v]).await?;
                return v
                    .into_iter()
                    .next()
                    .map(|v| (v, false))
                    .ok_or_else(|| Error::Internal("a listed volume vanished".to_owned()));
            }
            return Err(Error::AlreadyExists {
                what: "volume",
                name: spec.name,
                difference: diff.join(", "),
            });
        }
        let f = self.figures(&p).await?;
        let objects = f.volume_count.saturating_add(f.snapshot_count);
        if objects >= pool::MAX_VOLUMES {
            return Err(Error::NoSpace {
                pool: p.name,
                reason: format!(
                    "holds {objects} volumes and snapshots, the most a pool holds ({}); delete some first",
                    pool::MAX_VOLUMES
                ),
            });
        }
        let limit = overcommit_bytes(&p);
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
            thick: spec.thick,
            written: false,
        };
        let id = match &source {
            None => self
                .pool_op(&p, move |r, rt, reply| rt.create_volume(r, meta, reply))
                .await?
                .map_err(|reason| journal_error("create volume", &spec.name, &p.name, reason))?,
            Some((_, src)) => {
                let sid = src.id;
                let id = self
                    .pool_op(&p, move |r, rt, reply| rt.clone_volume(r, sid, meta, reply))
                    .await?
                    .map_err(|reason| journal_error("clone", &spec.name, &p.name, reason))?;
                lock(&self.inner).origins.insert(
                    uuid,
                    Origin {
                        source_uuid: src.uuid,
                        source_name: src.name.clone(),
                        source_snapshot: src.snapshot,
                        group: None,
                        inflated: false,
                    },
                );
                self.persist().await?;
                id
            }
        };
        let table = self.pool_query(&p, PoolRt::volumes).await?;
        let m = table.volumes.get(&id).ok_or_else(|| {
            Error::Internal(format!("volume {} vanished after its create", spec.name))
        })?;
        let v = self.volume_info(&p, m, &table);
        tracing::info!(volume = %spec.name, uuid = %uuid, pool = %p.name, size_bytes = spec.size_bytes, source = ?v.source, "volume created");
        let v = self.with_usage(vec![v]).await?;
        v.into_iter()
            .next()
            .map(|v| (v, true))
            .ok_or_else(|| Error::Internal("a created volume vanished".to_owned()))
    }

    /// Deletes a volume. Its snapshots and clones stay whole.
    ///
    /// # Errors
    /// NOT_FOUND, FAILED_PRECONDITION (a session uses it), or the store's failure.
    pub async fn delete_volume(self: &Arc<Self>, name_or_uuid: &str) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let v = self.volume(name_or_uuid).await?;
        self.check_idle("volume", &v.name, v.uuid)?;
        let p = self.online(&v.pool_uuid.to_string())?;
        let id = v.id;
        self.pool_op(&p, move |r, rt, reply| rt.delete_volume(r, id, reply))
            .await?
            .map_err(|reason| journal_error("delete volume", &v.name, &p.name, reason))?;
        let changed = {
            let mut inner = lock(&self.inner);
            let a = inner.imports.remove(&v.uuid).is_some();
            let b = inner.origins.remove(&v.uuid).is_some();
            a || b
        };
        if changed {
            self.persist().await?;
        }
        tracing::info!(volume = %v.name, uuid = %v.uuid, pool = %p.name, "volume deleted");
        Ok(v)
    }

    fn check_idle(&self, what: &'static str, name: &str, uuid: Uuid) -> Result<()> {
        if let Some(device) = lock(&self.exported).get(&uuid) {
            return Err(Error::Exported {
                what,
                name: name.to_owned(),
                device: device.clone(),
            });
        }
        if lock(&self.inner).busy.contains_key(&uuid) {
            return Err(Error::InUse {
                what,
                name: name.to_owned(),
                reason: "is in use by an image import or export; wait for it to end".to_owned(),
            });
        }
        Ok(())
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
            return self.one_with_usage(v).await;
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
        self.volume_with_usage(&v.uuid.to_string()).await
    }

    async fn one_with_usage(&self, v: VolumeInfo) -> Result<VolumeInfo> {
        self.with_usage(vec![v])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("a listed volume vanished".to_owned()))
    }

    /// A volume by name or UUID, with its usage figures.
    ///
    /// # Errors
    /// NOT_FOUND, or the store is not ready.
    pub async fn volume_with_usage(&self, name_or_uuid: &str) -> Result<VolumeInfo> {
        let v = self.volume(name_or_uuid).await?;
        self.one_with_usage(v).await
    }

    /// A snapshot by name or UUID, with its usage figures.
    ///
    /// # Errors
    /// NOT_FOUND, or the store is not ready.
    pub async fn snapshot_with_usage(&self, name_or_uuid: &str) -> Result<SnapshotInfo> {
        let s = self.snapshot(name_or_uuid).await?;
        self.with_usage(vec![s])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("a listed snapshot vanished".to_owned()))
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
            return self.one_with_usage(v).await;
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
        self.volume_with_usage(&v.uuid.to_string()).await
    }

    /// Persists (`Some`) or clears (`None`) the export record of the volume or snapshot
    /// `uuid` in its pool's journal (FORMAT.md record type 8): durable — written and
    /// flushed — when this returns Ok, deleted with the object. The bytes are the export
    /// layer's; at most [`MAX_CONTROL_BYTES`].
    ///
    /// # Errors
    /// NOT_FOUND, INVALID_ARGUMENT (too large), UNAVAILABLE (pool not online), or the
    /// store's failure.
    pub async fn set_export_record(&self, uuid: Uuid, rec: Option<Vec<u8>>) -> Result<()> {
        let data = rec.unwrap_or_default();
        if data.len() > MAX_CONTROL_BYTES {
            return Err(Error::InvalidArgument {
                field: "export record",
                reason: format!(
                    "{} bytes; the volume store keeps at most {MAX_CONTROL_BYTES}",
                    data.len()
                ),
            });
        }
        let key = uuid.to_string();
        let obj = match self.volume(&key).await {
            Ok(v) => v.object(),
            Err(Error::NotFound { .. }) => self.snapshot(&key).await?.object(),
            Err(e) => return Err(e),
        };
        let p = self.online(&obj.pool_uuid.to_string())?;
        let id = obj.id;
        let export = (!data.is_empty()).then_some(data);
        // The record's other part (QoS limits) stays as it is.
        let update = Box::new(move |cur: Option<&[u8]>| {
            ObjectRecord {
                export,
                ..ObjectRecord::decode(cur)?
            }
            .encode()
        });
        self.pool_op(&p, move |r, rt, reply| {
            rt.update_control(r, id, update, reply)
        })
        .await?
        .map_err(|reason| journal_error("record the export of", &obj.name, &p.name, reason))
    }

    /// Replaces the QoS limits of volume `name_or_uuid`: recorded durably in its control
    /// record (FORMAT.md record type 8, beside its export record), then in force on every
    /// reactor at its channels' next IO.
    ///
    /// # Errors
    /// NOT_FOUND, INVALID_ARGUMENT (an absurd limit, with the accepted range), UNAVAILABLE
    /// (pool not online), or the store's failure.
    pub async fn set_volume_qos(
        &self,
        name_or_uuid: &str,
        limits: QosLimits,
    ) -> Result<VolumeInfo> {
        limits.validate().map_err(|reason| Error::InvalidArgument {
            field: "qos",
            reason,
        })?;
        let v = self.volume(name_or_uuid).await?;
        if v.qos == limits {
            return self.one_with_usage(v).await;
        }
        let p = self.online(&v.pool_uuid.to_string())?;
        let id = v.id;
        let update = Box::new(move |cur: Option<&[u8]>| {
            ObjectRecord {
                qos: Some(limits),
                ..ObjectRecord::decode(cur)?
            }
            .encode()
        });
        self.pool_op(&p, move |r, rt, reply| {
            let rt2 = Rc::clone(&rt);
            rt.update_control(
                r,
                id,
                update,
                Box::new(move |r: &Reactor, res: std::result::Result<(), String>| {
                    reply(r, res.and_then(|()| rt2.set_qos(id, &limits)));
                }),
            );
        })
        .await?
        .map_err(|reason| journal_error("set QoS limits of volume", &v.name, &p.name, reason))?;
        tracing::info!(volume = %v.uuid, qos = %limits, "QoS limits set");
        self.volume_with_usage(&v.uuid.to_string()).await
    }

    /// Every export record kept by the online pools, by volume or snapshot UUID.
    ///
    /// # Errors
    /// The store is not ready, or a reactor does not answer.
    pub async fn export_records(&self) -> Result<Vec<(Uuid, Vec<u8>)>> {
        self.check_ready()?;
        let mut out = Vec::new();
        for p in self.pools() {
            if p.state != PoolState::Online {
                continue;
            }
            let recs = self
                .pool_query(&p, |rt| {
                    let t = rt.volumes();
                    t.control
                        .iter()
                        .filter_map(|(id, data)| {
                            let uuid = t.get(*id)?.uuid;
                            match ObjectRecord::decode(Some(data)) {
                                Ok(r) => Some((uuid, r.export?)),
                                Err(e) => {
                                    tracing::error!(object = %Uuid(uuid), error = %e, "unreadable control record; its export is not re-attached");
                                    None
                                }
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .await?;
            out.extend(recs.into_iter().map(|(u, d)| (Uuid(u), d)));
        }
        Ok(out)
    }

    /// Makes a volume's content that of one of its snapshots.
    ///
    /// # Errors
    /// NOT_FOUND, FAILED_PRECONDITION (a session uses the volume, or the snapshot was
    /// taken of another volume), or the store's failure.
    pub async fn rollback_volume(
        self: &Arc<Self>,
        volume: &str,
        snapshot: &str,
    ) -> Result<VolumeInfo> {
        let _op = self.ops.lock().await;
        let v = self.volume(volume).await?;
        let s = self.snapshot(snapshot).await?;
        if s.volume_uuid != Some(v.uuid) {
            return Err(Error::Refused {
                what: "snapshot",
                name: s.name,
                reason: format!(
                    "was taken of volume {}, not of {}; roll back to one of {}'s snapshots (`coreblk snapshot list --volume {}`)",
                    if s.volume_name.is_empty() { "(deleted)" } else { &s.volume_name },
                    v.name,
                    v.name,
                    v.name
                ),
            });
        }
        self.check_idle("volume", &v.name, v.uuid)?;
        let p = self.online(&v.pool_uuid.to_string())?;
        let (id, sid) = (v.id, s.id);
        self.pool_op(&p, move |r, rt, reply| rt.rollback(r, id, sid, reply))
            .await?
            .map_err(|reason| journal_error("roll back volume", &v.name, &p.name, reason))?;
        tracing::info!(volume = %v.name, snapshot = %s.name, "volume rolled back");
        self.volume_with_usage(&v.uuid.to_string()).await
    }

    /// Copies every cluster a volume shares with a snapshot or clone, so it stands alone;
    /// from then on it reports no source.
    ///
    /// # Errors
    /// NOT_FOUND, or the store's failure.
    pub async fn inflate_volume(self: &Arc<Self>, volume: &str) -> Result<VolumeInfo> {
        let v = {
            // Resolve under the lock, but copy without it: an inflate takes a while and
            // the store parks writes, not control calls, meanwhile.
            let _op = self.ops.lock().await;
            self.volume(volume).await?
        };
        let p = self.online(&v.pool_uuid.to_string())?;
        let id = v.id;
        self.pool_op_within(&p, INFLATE_TIMEOUT, move |r, rt, reply| {
            rt.inflate(r, id, reply)
        })
        .await?
        .map_err(|reason| journal_error("inflate volume", &v.name, &p.name, reason))?;
        let changed = {
            let mut inner = lock(&self.inner);
            match inner.origins.get_mut(&v.uuid) {
                Some(o) if !o.inflated => {
                    o.inflated = true;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.persist().await?;
        }
        tracing::info!(volume = %v.name, "volume inflated");
        self.volume_with_usage(&v.uuid.to_string()).await
    }

    // ---- snapshots -------------------------------------------------------------------

    /// Snapshots `members` (volume, snapshot name) at one instant; `group`: they form a
    /// group snapshot (it gets a UUID). The same names with the same volumes and labels
    /// return the existing snapshots (`false`: not created now).
    ///
    /// # Errors
    /// INVALID_ARGUMENT (no member, a volume or name twice, volumes of several pools),
    /// ALREADY_EXISTS naming the difference, NOT_FOUND (a volume), FAILED_PRECONDITION (a
    /// volume being imported), RESOURCE_EXHAUSTED (the pool's object limit), or the
    /// store's failure.
    pub async fn create_snapshots(
        self: &Arc<Self>,
        members: Vec<(String, String)>,
        labels: BTreeMap<String, String>,
        group: bool,
    ) -> Result<(Vec<SnapshotInfo>, bool)> {
        let _op = self.ops.lock().await;
        self.check_ready()?;
        if members.is_empty() {
            return Err(Error::InvalidArgument {
                field: "members",
                reason: "name at least one volume to snapshot".to_owned(),
            });
        }
        let all = self.volumes(None).await?;
        let mut vols: Vec<VolumeInfo> = Vec::new();
        for (vol, name) in &members {
            let by_uuid: Option<Uuid> = vol.parse().ok();
            let v = all
                .iter()
                .find(|v| &v.name == vol || Some(v.uuid) == by_uuid)
                .ok_or_else(|| Error::NotFound {
                    what: "volume",
                    name: vol.clone(),
                    hint: "`coreblk volume list` shows the volumes",
                })?;
            if vols.iter().any(|o| o.uuid == v.uuid) {
                return Err(Error::InvalidArgument {
                    field: "members",
                    reason: format!("volume {} is named twice", v.name),
                });
            }
            if members.iter().filter(|(_, n)| n == name).count() > 1 {
                return Err(Error::InvalidArgument {
                    field: "members",
                    reason: format!("snapshot name {name} is given twice"),
                });
            }
            if let Some(first) = vols.first() {
                if first.pool_uuid != v.pool_uuid {
                    return Err(Error::InvalidArgument {
                        field: "members",
                        reason: format!(
                            "volumes {} (pool {}) and {} (pool {}) are in different pools; a group snapshot takes volumes of one pool",
                            first.name, first.pool_name, v.name, v.pool_name
                        ),
                    });
                }
            }
            vols.push(v.clone());
        }
        // Idempotency: every name taken by the same request → the existing snapshots.
        let existing = self.snapshots(None).await?;
        let found: Vec<Option<&SnapshotInfo>> = members
            .iter()
            .map(|(_, name)| existing.iter().find(|s| &s.name == name))
            .collect();
        if found.iter().any(Option::is_some) {
            let mut diff = Vec::new();
            let mut first_name = String::new();
            for ((v, (_, name)), s) in vols.iter().zip(&members).zip(&found) {
                let Some(s) = s else {
                    diff.push(format!("snapshot {name} missing from that group"));
                    continue;
                };
                if first_name.is_empty() {
                    first_name = s.name.clone();
                }
                if s.volume_uuid != Some(v.uuid) {
                    diff.push(format!(
                        "{} taken of volume {}",
                        s.name,
                        if s.volume_name.is_empty() {
                            "(deleted)"
                        } else {
                            &s.volume_name
                        }
                    ));
                }
                if s.labels != labels {
                    diff.push(format!("{} has other labels", s.name));
                }
            }
            let groups: Vec<Option<Uuid>> = found.iter().flatten().map(|s| s.group_uuid).collect();
            if group
                && (groups.iter().any(Option::is_none) || groups.windows(2).any(|w| w[0] != w[1]))
            {
                diff.push("snapshots not taken together as one group".to_owned());
            }
            if !group && groups.iter().any(Option::is_some) {
                diff.push("a snapshot taken as part of a group".to_owned());
            }
            if diff.is_empty() {
                let snaps: Vec<SnapshotInfo> = found.into_iter().flatten().cloned().collect();
                return Ok((self.with_usage(snaps).await?, false));
            }
            return Err(Error::AlreadyExists {
                what: "snapshot",
                name: first_name,
                difference: diff.join(", "),
            });
        }
        if let Some(v) = vols.iter().find(|v| v.importing) {
            return Err(Error::InUse {
                what: "volume",
                name: v.name.clone(),
                reason: "is being imported; finish (or delete) the import before snapshotting it"
                    .to_owned(),
            });
        }
        let p = self.online(&vols[0].pool_uuid.to_string())?;
        let group_uuid = if group {
            Some(
                Uuid::random()
                    .map_err(|e| Error::Internal(format!("cannot make a group uuid: {e}")))?,
            )
        } else {
            None
        };
        let mut req = Vec::new();
        let mut uuids = Vec::new();
        for (v, (_, name)) in vols.iter().zip(&members) {
            let uuid = Uuid::random()
                .map_err(|e| Error::Internal(format!("cannot make a snapshot uuid: {e}")))?;
            uuids.push(uuid);
            req.push((
                v.id,
                VolumeMeta {
                    uuid: uuid.0,
                    name: name.clone(),
                    labels: labels.clone(),
                    ..VolumeMeta::default()
                },
            ));
        }
        let what = members
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        self.pool_op(&p, move |r, rt, reply| rt.snapshot(r, req, reply))
            .await?
            .map_err(|reason| journal_error("snapshot", &what, &p.name, reason))?;
        {
            let mut inner = lock(&self.inner);
            for (v, uuid) in vols.iter().zip(&uuids) {
                inner.origins.insert(
                    *uuid,
                    Origin {
                        source_uuid: v.uuid,
                        source_name: v.name.clone(),
                        source_snapshot: false,
                        group: group_uuid,
                        inflated: false,
                    },
                );
            }
        }
        self.persist().await?;
        tracing::info!(snapshots = %what, pool = %p.name, group = ?group_uuid, "snapshot taken");
        let now = self.snapshots(Some(&p.uuid.to_string())).await?;
        let mut out = Vec::new();
        for uuid in &uuids {
            let s = now.iter().find(|s| s.uuid == *uuid).ok_or_else(|| {
                Error::Internal(format!("snapshot {uuid} vanished after its create"))
            })?;
            out.push(s.clone());
        }
        Ok((self.with_usage(out).await?, true))
    }

    /// Deletes a snapshot. Clones made from it stay whole.
    ///
    /// # Errors
    /// NOT_FOUND, FAILED_PRECONDITION (an export reads it), or the store's failure.
    pub async fn delete_snapshot(self: &Arc<Self>, name_or_uuid: &str) -> Result<SnapshotInfo> {
        let _op = self.ops.lock().await;
        let s = self.snapshot(name_or_uuid).await?;
        self.check_idle("snapshot", &s.name, s.uuid)?;
        let p = self.online(&s.pool_uuid.to_string())?;
        let id = s.id;
        self.pool_op(&p, move |r, rt, reply| rt.delete_volume(r, id, reply))
            .await?
            .map_err(|reason| journal_error("delete snapshot", &s.name, &p.name, reason))?;
        if lock(&self.inner).origins.remove(&s.uuid).is_some() {
            self.persist().await?;
        }
        tracing::info!(snapshot = %s.name, uuid = %s.uuid, pool = %p.name, "snapshot deleted");
        Ok(s)
    }

    /// The byte ranges whose content differs between `from` and `to` (objects of one
    /// pool), at cluster granularity; with `from` `None`, the ranges `to` maps.
    ///
    /// # Errors
    /// INVALID_ARGUMENT (objects of different pools), or the store's failure.
    pub async fn diff(&self, from: Option<&ObjectRef>, to: &ObjectRef) -> Result<Vec<(u64, u64)>> {
        if let Some(f) = from {
            if f.pool_uuid != to.pool_uuid {
                return Err(Error::InvalidArgument {
                    field: "base",
                    reason: format!(
                        "{} and {} are in different pools; a diff compares objects of one lineage",
                        f.name, to.name
                    ),
                });
            }
        }
        let p = self.online(&to.pool_uuid.to_string())?;
        let (fid, tid) = (from.map(|f| f.id), to.id);
        self.pool_query(&p, move |rt| rt.diff(fid, tid))
            .await?
            .map_err(|reason| Error::Store {
                op: "diff",
                object: to.name.clone(),
                reason,
            })
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
                (
                    VolumeInfo {
                        importing: true,
                        ..v
                    },
                    0,
                )
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
        let session = self.open_session(&v.object(), true).await?;
        Ok((v, session, offset))
    }

    /// Starts writing an image over an existing volume (`ImportStart.overwrite`): returns
    /// it and an exclusive session on it.
    ///
    /// # Errors
    /// NOT_FOUND, INVALID_ARGUMENT (a size larger than the volume, or another pool),
    /// FAILED_PRECONDITION (another session uses it).
    pub async fn begin_overwrite(
        self: &Arc<Self>,
        pool: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<(VolumeInfo, Session, u64)> {
        let _op = self.ops.lock().await;
        let v = self.volume(name).await?;
        if v.importing {
            return Err(Error::InUse {
                what: "volume",
                name: v.name,
                reason: "has an unfinished import; resume it (or delete the volume) first"
                    .to_owned(),
            });
        }
        if !pool.is_empty() && self.pool(pool)?.uuid != v.pool_uuid {
            return Err(Error::InvalidArgument {
                field: "pool",
                reason: format!("volume {} is in pool {}", v.name, v.pool_name),
            });
        }
        if size_bytes > v.size_bytes {
            return Err(Error::InvalidArgument {
                field: "size_bytes",
                reason: format!(
                    "a {size_bytes}-byte image does not fit volume {} of {} bytes (grow it first)",
                    v.name, v.size_bytes
                ),
            });
        }
        let session = self.open_session(&v.object(), true).await?;
        Ok((v, session, 0))
    }

    /// Records that everything below `offset` of an importing volume is written, before
    /// the chunks below it are acknowledged (the import calls it once for the chunks that
    /// arrived together): the state file is replaced on every call (a rename
    /// without fsync survives a daemon crash, the rule imports are acknowledged by) and
    /// synced at most every [`IMPORT_RECORD_PERIOD`].
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
        if let Err(error) = self.persist_synced(due).await {
            tracing::warn!(%error, "cannot record an import's progress");
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

    /// Opens an IO session on a volume or snapshot (on its pool's owner reactor; a
    /// snapshot's channel is read-only). `exclusive`: refused while another session uses
    /// the object (imports); otherwise refused only while an exclusive one does. While a
    /// session is open the object is not deleted (nor a volume rolled back).
    ///
    /// # Errors
    /// FAILED_PRECONDITION (in use), or the object cannot be opened.
    pub async fn open_session(self: &Arc<Self>, v: &ObjectRef, exclusive: bool) -> Result<Session> {
        let p = self.online(&v.pool_uuid.to_string())?;
        {
            let mut inner = lock(&self.inner);
            let n = inner.busy.entry(v.uuid).or_insert(0);
            // u32::MAX marks an exclusive session.
            if *n == u32::MAX || (exclusive && *n > 0) {
                return Err(Error::InUse {
                    what: if v.snapshot { "snapshot" } else { "volume" },
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
                object: v.clone(),
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

    // ---- exports ---------------------------------------------------------------------

    /// Marks a volume or snapshot exported as `device` (`None`: no longer): while it is,
    /// it is not deleted or rolled back and its pool is not destroyed (FAILED_PRECONDITION
    /// naming the export).
    pub fn set_exported(&self, uuid: Uuid, device: Option<String>) {
        let mut e = lock(&self.exported);
        match device {
            Some(d) => e.insert(uuid, d),
            None => e.remove(&uuid),
        };
    }

    /// What serving `v` from every reactor needs: a handle to open on each reactor
    /// ([`open_export_channel`]), its pool's cluster size and its owner reactor.
    ///
    /// # Errors
    /// The pool is not online, or the object cannot be opened.
    pub async fn export_source(
        &self,
        v: &ObjectRef,
    ) -> Result<(crate::lvs::volume::VolumeHandle, u64, usize)> {
        let p = self.online(&v.pool_uuid.to_string())?;
        let (uuid, vid, owner) = (p.uuid, v.id, p.owner);
        ask(self.remote(p.owner), move |r: &Reactor, tx| {
            let res = pool_rt(uuid)
                .and_then(|rt| Ok((rt.volume_handle(r, vid)?, rt.cluster_bytes(), owner)));
            let _ = tx.send(res);
        })
        .await?
        .map_err(store_err("export", &v.name))
    }

    // ---- stop and state --------------------------------------------------------------

    /// At a stop, before exports are quiesced: lifts the QoS limits of every volume of the
    /// online pools in the running daemon only (their records keep them for the next
    /// daemon), so requests a limit holds finish now instead of at the cap's pace (a volume
    /// capped at a few IOPS with a deep queue would otherwise hold the stop for minutes).
    pub async fn lift_qos_for_stop(&self) {
        for p in self.pools() {
            if p.state != PoolState::Online {
                continue;
            }
            if let Err(e) = self.pool_query(&p, |rt| rt.lift_qos()).await {
                tracing::warn!(pool = %p.name, error = %e, "could not lift QoS limits for the stop");
            }
        }
    }

    /// Flushes every online pool, writes a metadata checkpoint (so the next start
    /// replays no journal), and stops the pool runtimes. Called once the API has stopped
    /// serving.
    pub async fn stop(&self) {
        for p in self.pools() {
            if p.state != PoolState::Online {
                continue;
            }
            let uuid = p.uuid;
            let remote = self.remote(p.owner);
            // The final flush, through a channel on any object (a pool with none has no
            // data to flush; its checkpoint below still makes the metadata durable).
            let flushed = ask_within(remote, STOP_STEP_TIMEOUT, move |r: &Reactor, tx| {
                let Ok(rt) = pool_rt(uuid) else {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                };
                let table = rt.volumes();
                let Some(&id) = table.volumes.keys().chain(table.snapshots.keys()).next() else {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                };
                match rt.open_volume(r, id) {
                    Ok(ch) => ch.submit(r, Io::Flush, Batch::new(0, false, tx), 0),
                    Err(e) => {
                        let _ = tx.send(Err(BatchError::Other(e)));
                    }
                }
            })
            .await;
            match flushed {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(pool = %p.name, error = ?e, "flushing the pool at stop failed")
                }
                Err(e) => {
                    tracing::warn!(pool = %p.name, error = %e, "flushing the pool at stop did not finish")
                }
            }
            let checkpointed = ask_within(remote, STOP_STEP_TIMEOUT, move |r: &Reactor, tx| {
                let Some(rt) = POOLS.with(|pools| pools.borrow_mut().remove(&uuid)) else {
                    let _ = tx.send(Ok(()));
                    return;
                };
                // The runtime lives until its checkpoint answers (the checkpoint runs
                // from a timer that holds only a weak reference).
                let keep = Rc::clone(&rt);
                rt.checkpoint(
                    r,
                    Box::new(move |_r: &Reactor, res| {
                        drop(keep);
                        let _ = tx.send(res);
                    }),
                );
            })
            .await;
            match checkpointed {
                Ok(Ok(())) => {
                    tracing::info!(pool = %p.name, "pool flushed, checkpointed and stopped")
                }
                Ok(Err(e)) => {
                    tracing::warn!(pool = %p.name, error = %e, "the checkpoint at stop failed; the next start replays the journal")
                }
                Err(e) => {
                    tracing::warn!(pool = %p.name, error = %e, "the checkpoint at stop did not finish")
                }
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
            origins: inner
                .origins
                .iter()
                .map(|(uuid, o)| OriginRecord {
                    uuid: uuid.to_string(),
                    source_uuid: o.source_uuid.to_string(),
                    source_name: o.source_name.clone(),
                    source_snapshot: o.source_snapshot,
                    group_uuid: o.group.map(|g| g.to_string()),
                    inflated: o.inflated,
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
        self.persist_synced(true).await
    }

    /// [`Self::persist`]; without `sync`, the new file survives a crash of the daemon but
    /// not of the machine.
    async fn persist_synced(self: &Arc<Self>, sync: bool) -> Result<()> {
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
            if sync {
                f.sync_all().map_err(err)?;
            }
            drop(f);
            fs::rename(&tmp, &me.state_path).map_err(err)?;
            if sync {
                File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
            }
            Ok(())
        })
        .await
    }
}

/// The overcommit limit in the store's unit (thousandths, at least 1000).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn overcommit_milli(limit: f64) -> u32 {
    // Clamped to [1.0, 1e6] first, so the cast neither truncates nor loses a sign.
    (limit.clamp(1.0, 1e6) * 1000.0).round() as u32
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

/// A failed store operation. ENOSPC from a journal commit means the pool's metadata has
/// no room (journal full and no checkpoint could make room); other reasons keep the
/// store's words and get their code in `error.rs`.
fn journal_error(op: &'static str, object: &str, pool: &str, reason: String) -> Error {
    if reason.contains(&format!("(errno {})", libc::ENOSPC)) {
        return Error::NoSpace {
            pool: pool.to_owned(),
            reason: format!(
                "{op} {object}: its metadata has no room ({reason}); delete snapshots or \
                 volumes to shrink it, then retry"
            ),
        };
    }
    Error::Store {
        op,
        object: object.to_owned(),
        reason,
    }
}

/// Opens the IO path of volume or snapshot `id` of pool `pool` on this reactor for an
/// export: the owner's channel on the pool's owner reactor, a remote channel elsewhere.
///
/// # Errors
/// The object cannot be opened (deleted, or the pool stopped).
pub fn open_export_channel(
    rx: &Reactor,
    pool: Uuid,
    id: u32,
    h: &crate::lvs::volume::VolumeHandle,
) -> std::result::Result<Rc<dyn Channel>, String> {
    match pool_rt(pool) {
        Ok(rt) => rt.open_volume(rx, id),
        Err(_) => h.open(rx),
    }
}

/// An IO session on a volume or snapshot: a channel on the pool's owner reactor, used by
/// one import or export. Closed (and the object freed for deletion) on drop.
#[derive(Debug)]
pub struct Session {
    store: Arc<Store>,
    remote: Remote,
    id: u64,
    /// The volume or snapshot.
    pub object: ObjectRef,
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
                    // Our own pooled or heap buffers: host memory.
                    if let (Some(dst), Some(src)) = (
                        out.get_mut(start..start.saturating_add(b.len())),
                        b.as_slice(),
                    ) {
                        dst.copy_from_slice(src);
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
                                b.as_mut_slice()
                                    .expect("pooled buffers are host memory")
                                    .copy_from_slice(part);
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
                    self.object.name,
                    OP_TIMEOUT.as_secs()
                )))
            }
        };
        res.map_err(|e| match e {
            BatchError::Io(at, errno) => Error::VolumeIo {
                op: op_name,
                volume: self.object.name.clone(),
                offset_bytes: offset + at,
                errno,
            },
            BatchError::Other(reason) => Error::Store {
                op: op_name,
                object: self.object.name.clone(),
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
        self.store.end_session(self.object.uuid, self.exclusive);
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
