//! The Exports service: volumes (and, read-only, snapshots) as ublk block devices.
//!
//! Owns: [`Exports`] — what the kernel offers (asked once at start), the exports this
//! daemon serves, their records, and the orchestration of a device's life: ADD,
//! `/dev/ublkcN` opened once, one queue per reactor set up by message (`export::install`),
//! SET_PARAMS, START; unexport with an openers check (TRY_STOP_DEV where offered, else an
//! O_EXCL probe), STOP (the kernel answers every FETCH with ABORT), the queues released,
//! DEL. At a daemon stop every queue drains (in-flight requests finish, new ones are held
//! for the next daemon) and the devices stay.
//!
//! Decisions: a snapshot is exported only read-only (it cannot change; clone it to write).
//! Exporting an exported object again with the same settings returns the export; with
//! other settings it is refused (unexport first).
//!
//! Must never: run a ublk control command on the runtime thread or a reactor (they block:
//! `spawn_blocking`); leave a half-made device behind after a failed export.

use std::collections::BTreeMap;
use std::fs::File;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use coreblk_proto::v1 as pb;
use coreblk_ublk as ublk;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::error::{Error, Result};
use super::server::Shared;
use super::store::{open_export_channel, ObjectRef, Store};
use crate::bdev::label::Uuid;
use crate::config::ExportSettings;
use crate::export::queue::QueueSpec;
use crate::export::{self, PathKind, Record, RECORD_VERSION};
use crate::reactor::{Reactor, Remote};

/// Longest a reactor may take to set a queue up or answer.
const REACTOR_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the queues of a stopped device may take to see every FETCH come back.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a re-attach waits for the previous daemon's hold on a device to go.
const RECOVERY_WAIT: Duration = Duration::from_secs(10);
/// Tries of a re-attach at start before its device is left paused (pauses of 0.5, 1, 2
/// s between them: the start-up recovery, which Exports calls wait up to
/// [`RECOVERED_WAIT`] for, is not held up much longer than the first try's own wait).
const REATTACH_ATTEMPTS: u32 = 4;
/// Pause after the first failed re-attach (doubled after each further one).
const REATTACH_FIRST_PAUSE: Duration = Duration::from_millis(500);
/// Exports re-attached at once at start.
const RECOVERY_CONCURRENCY: usize = 16;
/// Longest QUIESCE_DEV at a daemon stop waits for the device's in-flight requests.
const QUIESCE_TIMEOUT_MS: u32 = 30_000;
/// Longest an Exports call waits for the start-up recovery before answering UNAVAILABLE.
const RECOVERED_WAIT: Duration = Duration::from_secs(30);

/// What the running kernel offers, asked once at start.
#[derive(Debug, Clone)]
pub struct KernelUblk {
    /// GET_FEATURES.
    pub features: ublk::Features,
    /// The path and flags chosen for it.
    pub choice: ublk::Choice,
}

/// Asks the kernel what it offers and picks the data path (blocking: call at start-up).
/// `Err`: why exports are unavailable on this node.
pub fn probe_kernel(pref: ublk::PathPref) -> std::result::Result<KernelUblk, String> {
    let features = ublk::Control::open()
        .and_then(|c| c.features())
        .map_err(|e| e.to_string())?;
    let choice = ublk::choose(features, pref).map_err(|e| e.to_string())?;
    Ok(KernelUblk { features, choice })
}

/// One export this daemon serves.
#[derive(Debug, Clone)]
struct Live {
    object: ObjectRef,
    rec: Record,
    char_dev: Arc<File>,
}

/// The exports of this daemon.
#[derive(Debug)]
pub struct Exports {
    settings: ExportSettings,
    kernel: std::result::Result<KernelUblk, String>,
    remotes: Vec<Remote>,
    store: Arc<Store>,
    /// By volume UUID. The async mutex serialises export and unexport calls.
    live: tokio::sync::Mutex<BTreeMap<Uuid, Live>>,
    /// True once [`Exports::recover_all`] is done: until then the calls wait (a listing
    /// right after a restart must show the re-attached exports, and an export call must
    /// not take a device id a recorded export still owns).
    recovered: tokio::sync::watch::Sender<bool>,
}

fn ublk_err(op: &'static str, dev: Option<u32>) -> impl FnOnce(ublk::Error) -> Error {
    move |e| Error::Ublk {
        op,
        dev: dev.map_or_else(|| "new".to_owned(), |d| format!("/dev/ublkb{d}")),
        reason: e.to_string(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a ublk control task failed: {e}")))?
}

/// Sends `f` to a reactor and awaits its answer.
async fn ask<T: Send + 'static>(
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
        Ok(Err(_)) => Err(Error::ShuttingDown),
        Err(_) => Err(Error::Internal(format!(
            "reactor {} did not answer within {} s",
            remote.id(),
            timeout.as_secs()
        ))),
    }
}

impl Exports {
    /// The exports of a daemon whose reactors are `remotes`; `kernel` from
    /// [`probe_kernel`].
    #[must_use]
    pub fn new(
        settings: ExportSettings,
        kernel: std::result::Result<KernelUblk, String>,
        remotes: Vec<Remote>,
        store: Arc<Store>,
    ) -> Self {
        Self {
            settings,
            kernel,
            remotes,
            store,
            live: tokio::sync::Mutex::new(BTreeMap::new()),
            recovered: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Waits (at most [`RECOVERED_WAIT`]) until the exports of the previous daemon are
    /// served again.
    async fn wait_recovered(&self) -> Result<()> {
        let mut rx = self.recovered.subscribe();
        let r = tokio::time::timeout(RECOVERED_WAIT, rx.wait_for(|done| *done))
            .await
            .map(|r| r.map(|_| ()));
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::Importing {
                detail: "the exports of the previous daemon are still being re-attached".to_owned(),
            }),
        }
    }

    /// The export settings.
    #[must_use]
    pub fn settings(&self) -> &ExportSettings {
        &self.settings
    }

    /// How many exports this daemon serves.
    pub async fn count(&self) -> usize {
        self.live.lock().await.len()
    }

    /// What the kernel offers, or why exports are unavailable.
    pub fn kernel(&self) -> std::result::Result<&KernelUblk, &str> {
        self.kernel.as_ref().map_err(String::as_str)
    }

    fn need_kernel(&self, rpc: &'static str) -> Result<&KernelUblk> {
        self.kernel
            .as_ref()
            .map_err(|reason| Error::ExportsUnavailable {
                rpc,
                reason: reason.clone(),
            })
    }

    /// Persists (or clears) the record of an export in its pool's metadata (journaled
    /// and flushed before this returns).
    async fn put_record(&self, volume: Uuid, rec: Option<Vec<u8>>) -> Result<()> {
        self.store.set_export_record(volume, rec).await
    }

    /// Every persisted export record, by volume UUID.
    async fn load_records(&self) -> Result<Vec<(Uuid, Vec<u8>)>> {
        self.store.export_records().await
    }

    async fn resolve(&self, name: &str) -> Result<ObjectRef> {
        match self.store.volume(name).await {
            Ok(v) => Ok(v.object()),
            Err(Error::NotFound { .. }) => match self.store.snapshot(name).await {
                Ok(s) => Ok(s.object()),
                Err(Error::NotFound { .. }) => Err(Error::NotFound {
                    what: "volume",
                    name: name.to_owned(),
                    hint: "`coreblk volume list` and `coreblk snapshot list` show what exists",
                }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Exports a volume (or, read-only, a snapshot); idempotent.
    ///
    /// # Errors
    /// UNAVAILABLE before the pools are imported; NOT_FOUND; INVALID_ARGUMENT (a writable
    /// snapshot export); FAILED_PRECONDITION (no ublk here, or exported with other
    /// settings); INTERNAL when the kernel refuses.
    pub async fn export(
        &self,
        name: &str,
        persistent: bool,
        read_only: bool,
    ) -> Result<pb::Export> {
        let kernel = self.need_kernel("ExportVolume")?.clone();
        self.store.check_ready()?;
        self.wait_recovered().await?;
        let obj = self.resolve(name).await?;
        if obj.snapshot && !read_only {
            return Err(Error::InvalidArgument {
                field: "read_only",
                reason: format!(
                    "{} is a snapshot, which cannot change; export it read-only (--read-only), or clone it and export the clone",
                    obj.name
                ),
            });
        }
        self.export_with(&obj, persistent, read_only, None, &kernel)
            .await
    }

    /// Makes a device for `obj` (with id `want_id` if free) and serves it.
    async fn export_with(
        &self,
        obj: &ObjectRef,
        persistent: bool,
        read_only: bool,
        want_id: Option<u32>,
        kernel: &KernelUblk,
    ) -> Result<pb::Export> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.get(&obj.uuid) {
            if l.rec.persistent == persistent && l.rec.read_only == read_only {
                return Ok(self.message(l));
            }
            return Err(Error::InUse {
                what: if obj.snapshot { "snapshot" } else { "volume" },
                name: obj.name.clone(),
                reason: format!(
                    "is exported as {} with persistent={} read_only={}; unexport it first to change that",
                    ublk::block_path(l.rec.dev_id).display(),
                    l.rec.persistent,
                    l.rec.read_only
                ),
            });
        }
        if live.len() >= self.settings.max_exports as usize {
            return Err(Error::ExportLimit {
                limit: self.settings.max_exports,
            });
        }
        let mut path = export_path(kernel);
        let zc_live = live
            .values()
            .filter(|l| l.rec.path == PathKind::ZeroCopy)
            .count();
        let zc_max = zero_copy_capacity(&self.settings);
        if path == PathKind::ZeroCopy && zc_live >= zc_max {
            // Every reactor's fixed-buffer table is full: the queues would fall back to
            // copy anyway, so say so in the record, the export list and the answer.
            tracing::warn!(
                volume = %obj.name,
                zero_copy_exports = zc_live,
                "zero-copy slots exhausted ({zc_max} exports of queue depth {} fit io_uring's fixed-buffer table); this export uses the copy path",
                self.settings.queue_depth
            );
            path = PathKind::Copy;
        }
        let nr_queues = u16::try_from(self.remotes.len()).map_err(|_| Error::InvalidArgument {
            field: "cores",
            reason: "more reactors than ublk queues".to_owned(),
        })?;
        let rec = Record {
            version: RECORD_VERSION,
            dev_id: 0,
            persistent,
            read_only,
            queue_depth: self.settings.queue_depth,
            max_io_bytes: self.settings.max_io_bytes,
            nr_queues,
            path,
        };
        let flags = add_flags(kernel, path);
        let add = ublk::AddDev {
            dev_id: want_id,
            nr_hw_queues: nr_queues,
            queue_depth: rec.queue_depth,
            max_io_buf_bytes: rec.max_io_bytes,
            flags,
        };
        let info = blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", None))?;
            match c.add(&add) {
                // The old id is taken: any id will do.
                Err(e) if add.dev_id.is_some() && e.errno() == Some(libc::EEXIST) => c
                    .add(&ublk::AddDev {
                        dev_id: None,
                        ..add
                    })
                    .map_err(ublk_err("add", None)),
                r => r.map_err(ublk_err("add", None)),
            }
        })
        .await?;
        let dev_id = info.dev_id;
        let rec = Record { dev_id, ..rec };
        match self.bring_up(obj, &rec, kernel).await {
            Ok(char_dev) => {
                let device = ublk::block_path(dev_id).display().to_string();
                if let Err(e) = self.put_record(obj.uuid, Some(rec.encode())).await {
                    self.tear_down(dev_id, Some(char_dev), true).await;
                    return Err(e);
                }
                self.store.set_exported(obj.uuid, Some(device.clone()));
                tracing::info!(volume = %obj.name, uuid = %obj.uuid, device, persistent, read_only, path = path.name(), "exported");
                let l = Live {
                    object: obj.clone(),
                    rec,
                    char_dev,
                };
                let msg = self.message(&l);
                live.insert(obj.uuid, l);
                Ok(msg)
            }
            Err((e, char_dev)) => {
                self.tear_down(dev_id, char_dev, true).await;
                Err(e)
            }
        }
    }

    /// Opens the char device, sets a queue up on every reactor, sets the parameters and
    /// starts the device. On failure, the char device (if opened) comes back for the
    /// tear-down.
    async fn bring_up(
        &self,
        obj: &ObjectRef,
        rec: &Record,
        kernel: &KernelUblk,
    ) -> std::result::Result<Arc<File>, (Error, Option<Arc<File>>)> {
        let dev_id = rec.dev_id;
        let char_dev = blocking(move || open_char(dev_id))
            .await
            .map_err(|e| (e, None))?;
        let char_dev = Arc::new(char_dev);
        let fail = |e: Error| (e, Some(Arc::clone(&char_dev)));
        let (geo, cluster) = self
            .setup_queues(obj, rec, kernel.choice.ioctl_encode(), rec.path, &char_dev)
            .await
            .map_err(fail)?;
        let params = export::device_params(
            geo.size_bytes,
            geo.logical_block_size,
            cluster,
            rec.max_io_bytes,
            rec.read_only,
        );
        blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            c.set_params(dev_id, &params)
                .map_err(ublk_err("set parameters", Some(dev_id)))?;
            c.start(dev_id, std::process::id().try_into().unwrap_or(i32::MAX))
                .map_err(ublk_err("start", Some(dev_id)))
        })
        .await
        .map_err(fail)?;
        Ok(char_dev)
    }

    /// Sets a queue of device `rec.dev_id` up on each of the first `rec.nr_queues`
    /// reactors (each sends its FETCHes); returns the volume's geometry and cluster size.
    async fn setup_queues(
        &self,
        obj: &ObjectRef,
        rec: &Record,
        ioctl_encode: bool,
        path: PathKind,
        char_dev: &Arc<File>,
    ) -> Result<(crate::bdev::Geometry, u64)> {
        let dev_id = rec.dev_id;
        if usize::from(rec.nr_queues) > self.remotes.len() || rec.nr_queues == 0 {
            return Err(Error::Ublk {
                op: "serve",
                dev: format!("/dev/ublkb{dev_id}"),
                reason: format!(
                    "the device has {} queues and this daemon runs {} reactors (one queue per reactor); run it with at least as many cores",
                    rec.nr_queues,
                    self.remotes.len()
                ),
            });
        }
        let (handle, cluster, _owner) = self.store.export_source(obj).await?;
        let mut geo = None;
        for (q, remote) in self
            .remotes
            .iter()
            .take(usize::from(rec.nr_queues))
            .enumerate()
        {
            let spec = QueueSpec {
                dev_id,
                q_id: u16::try_from(q).unwrap_or(u16::MAX),
                depth: rec.queue_depth,
                char_dev: Arc::clone(char_dev),
                ioctl_encode,
                read_only: rec.read_only,
                zero_copy: path == PathKind::ZeroCopy,
            };
            let (h, pool, id) = (handle.clone(), obj.pool_uuid, obj.id);
            let g = ask(remote, REACTOR_TIMEOUT, move |rx: &Reactor, tx| {
                let r = open_export_channel(rx, pool, id, &h)
                    .and_then(|ch| export::install(rx, spec, ch));
                let _ = tx.send(r);
            })
            .await?
            .map_err(|reason| Error::Ublk {
                op: "set up a queue",
                dev: format!("/dev/ublkb{dev_id}"),
                reason,
            })?;
            geo = Some(g);
        }
        let geo = geo.ok_or_else(|| Error::Internal("no reactor serves exports".to_owned()))?;
        Ok((geo, cluster))
    }

    /// Re-attaches to device `rec.dev_id`, left by an earlier daemon (a crash, a kill, an
    /// upgrade): START_USER_RECOVERY (once the old server is gone), `/dev/ublkcN` opened,
    /// every tag fetched on its reactor, END_USER_RECOVERY with our pid. The kernel then
    /// reissues what the old daemon held.
    /// Returns the char device and the data path the device was added with (its flags
    /// are fixed at ADD, so they, not the record, decide how its queues fetch).
    async fn reattach(&self, obj: &ObjectRef, rec: &Record) -> Result<(Arc<File>, PathKind)> {
        let dev_id = rec.dev_id;
        let info = blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            let info = c.info(dev_id).map_err(ublk_err("get info", Some(dev_id)))?;
            // The old daemon's queues may still be going away: retry while busy.
            let deadline = std::time::Instant::now() + RECOVERY_WAIT;
            loop {
                match c.start_user_recovery(dev_id) {
                    Ok(()) => return Ok(info),
                    Err(e)
                        if e.errno() == Some(libc::EBUSY)
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(ublk_err("start user recovery", Some(dev_id))(e)),
                }
            }
        })
        .await?;
        let rec = Record {
            nr_queues: info.nr_hw_queues,
            queue_depth: info.queue_depth,
            ..rec.clone()
        };
        let char_dev = Arc::new(blocking(move || open_char(dev_id)).await?);
        let ioctl_encode = info.flags & ublk::Features::CMD_IOCTL_ENCODE.0 != 0;
        let path = if info.flags & ublk::Features::AUTO_BUF_REG.0 != 0 {
            PathKind::ZeroCopy
        } else {
            PathKind::Copy
        };
        if path != rec.path {
            tracing::warn!(dev_id, recorded = rec.path.name(), device = path.name(), "the export record's data path differs from the device's flags; serving (and recording) the device's");
        }
        if let Err(e) = self
            .setup_queues(obj, &rec, ioctl_encode, path, &char_dev)
            .await
        {
            self.release_queues(dev_id).await;
            return Err(e);
        }
        let r = blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            c.end_user_recovery(dev_id, std::process::id().try_into().unwrap_or(i32::MAX))
                .map_err(ublk_err("end user recovery", Some(dev_id)))
        })
        .await;
        if let Err(e) = r {
            self.release_queues(dev_id).await;
            return Err(e);
        }
        Ok((char_dev, path))
    }

    /// [`Exports::reattach`], tried again after a failure (the previous daemon's queues
    /// may take longer than [`RECOVERY_WAIT`] to go, a reactor may be busy) with a
    /// doubling pause, up to [`REATTACH_ATTEMPTS`] tries, while the device exists.
    async fn reattach_retrying(
        &self,
        obj: &ObjectRef,
        rec: &Record,
    ) -> Result<(Arc<File>, PathKind)> {
        let mut pause = REATTACH_FIRST_PAUSE;
        let mut attempt = 1;
        loop {
            match self.reattach(obj, rec).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < REATTACH_ATTEMPTS && ublk::char_path(rec.dev_id).exists() => {
                    tracing::warn!(volume = %obj.name, dev_id = rec.dev_id, attempt, error = %e, retry_in_ms = pause.as_millis(), "re-attaching the export failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// At start, once the pools are imported: every recorded export is served again —
    /// its device re-attached where it still exists, re-created after a node reboot when
    /// it is persistent (the others' records are dropped: kubelet stages its volumes
    /// again itself).
    pub async fn recover_all(&self) {
        let t0 = std::time::Instant::now();
        self.recover_records().await;
        let n = self.live.lock().await.len();
        if n > 0 {
            tracing::info!(
                exports = n,
                took_ms = t0.elapsed().as_millis(),
                "exports served again after the start"
            );
        }
        self.recovered.send_replace(true);
    }

    async fn recover_records(&self) {
        let Ok(kernel) = self.kernel.clone() else {
            return;
        };
        let recs = match self.load_records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the export records; exports are not recovered");
                return;
            }
        };
        // Devices are independent: re-attach several at once (each re-attach waits on
        // control commands in blocking threads and on the reactors), so a node with many
        // exports resumes in about the time of a few.
        futures_util::stream::iter(recs)
            .for_each_concurrent(RECOVERY_CONCURRENCY, |(uuid, bytes)| {
                self.recover_one(uuid, bytes, &kernel)
            })
            .await;
    }

    /// Serves one recorded export again (see [`Exports::recover_all`]).
    async fn recover_one(&self, uuid: Uuid, bytes: Vec<u8>, kernel: &KernelUblk) {
        let rec = match Record::decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(volume = %uuid, error = %e, "export record unreadable; left alone");
                return;
            }
        };
        let obj = match self.resolve(&uuid.to_string()).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(volume = %uuid, error = %e, "the exported object is gone; its record is dropped");
                let _ = self.put_record(uuid, None).await;
                return;
            }
        };
        let t0 = std::time::Instant::now();
        let dev = ublk::block_path(rec.dev_id).display().to_string();
        if ublk::char_path(rec.dev_id).exists() {
            // No Exports call runs before the recovery is done (`wait_recovered`), so the
            // table is locked only to insert.
            match self.reattach_retrying(&obj, &rec).await {
                Ok((char_dev, path)) => {
                    let rec = if path == rec.path {
                        rec
                    } else {
                        let fixed = Record { path, ..rec };
                        let _ = self.put_record(obj.uuid, Some(fixed.encode())).await;
                        fixed
                    };
                    self.store.set_exported(obj.uuid, Some(dev.clone()));
                    tracing::info!(volume = %obj.name, device = %dev, took_ms = t0.elapsed().as_millis(), "export re-attached (user recovery)");
                    self.live.lock().await.insert(
                        obj.uuid,
                        Live {
                            object: obj,
                            rec,
                            char_dev,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(volume = %obj.name, device = %dev, error = %e, attempts = REATTACH_ATTEMPTS, "cannot re-attach the export; its IO stays paused: restart coreblkd to try again, or `coreblk export cleanup` removes the device")
                }
            }
        } else if rec.persistent {
            match self
                .export_with(
                    &obj,
                    rec.persistent,
                    rec.read_only,
                    Some(rec.dev_id),
                    kernel,
                )
                .await
            {
                Ok(e) => {
                    tracing::info!(volume = %obj.name, device = %e.device_path, "persistent export re-created")
                }
                Err(e) => {
                    tracing::error!(volume = %obj.name, error = %e, "cannot re-create the persistent export")
                }
            }
        } else {
            tracing::info!(volume = %obj.name, device = %dev, "the device is gone (node reboot?); the export was not persistent: its record is dropped");
            let _ = self.put_record(obj.uuid, None).await;
        }
    }

    /// Releases this device's queues on every reactor without waiting for the kernel
    /// (a failed re-attach: the device stays for the next try or for cleanup).
    async fn release_queues(&self, dev_id: u32) {
        for remote in &self.remotes {
            let _ = remote.send(Box::new(move |rx: &Reactor| export::remove(rx, dev_id)));
        }
    }

    /// Stops a device (unless `stopped`), waits for its queues to see every command
    /// back, releases them, closes the char device and deletes the device. Best effort:
    /// failures are logged (the device is then left for `coreblk export cleanup`).
    async fn tear_down(&self, dev_id: u32, char_dev: Option<Arc<File>>, stop: bool) {
        if stop {
            let r = blocking(move || {
                let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
                c.stop(dev_id).map_err(ublk_err("stop", Some(dev_id)))
            })
            .await;
            if let Err(e) = r {
                tracing::warn!(dev_id, error = %e, "stopping a ublk device failed");
            }
        }
        let released = self
            .wait_queues(dev_id, move |q, rx, done| {
                q.when_stopped(
                    rx,
                    Box::new(move |rx: &Reactor| {
                        export::remove(rx, dev_id);
                        done(rx);
                    }),
                );
            })
            .await;
        if !released {
            tracing::warn!(dev_id, "releasing the queues that did not stop anyway");
            for remote in &self.remotes {
                let _ = remote.send(Box::new(move |rx: &Reactor| export::remove(rx, dev_id)));
            }
        }
        drop(char_dev);
        // DEL_DEV waits for every holder of /dev/ublkcN; a queue that did not stop may hold
        // it a while longer, so then DEL_DEV_ASYNC (the id is freed once it lets go). Either
        // way the caller (who holds the exports table) waits a bounded time.
        let del = blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            if released {
                c.delete(dev_id).map_err(ublk_err("delete", Some(dev_id)))
            } else {
                c.delete_async(dev_id)
                    .map_err(ublk_err("delete (async)", Some(dev_id)))
            }
        });
        match tokio::time::timeout(STOP_TIMEOUT, del).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(dev_id, error = %e, "deleting a ublk device failed (`coreblk export cleanup` removes it)");
            }
            Err(_) => {
                tracing::warn!(dev_id, timeout_s = STOP_TIMEOUT.as_secs(), "deleting a ublk device did not finish in time; it goes once its last holder lets go (`coreblk export cleanup` otherwise)");
            }
        }
    }

    /// Tears a volume's export down once in-flight IO is done. A device that is open
    /// (mounted, held) is refused unless `force`.
    ///
    /// # Errors
    /// NOT_FOUND (not exported), FAILED_PRECONDITION (open, or no ublk here).
    pub async fn unexport(&self, name: &str, force: bool) -> Result<()> {
        let kernel = self.need_kernel("UnexportVolume")?.clone();
        self.store.check_ready()?;
        self.wait_recovered().await?;
        let obj = self.resolve(name).await?;
        let mut live = self.live.lock().await;
        let Some(l) = live.get(&obj.uuid).cloned() else {
            return Err(Error::NotFound {
                what: "export of",
                name: name.to_owned(),
                hint: "`coreblk export list` shows the exports",
            });
        };
        let dev_id = l.rec.dev_id;
        let try_stop = kernel.choice.try_stop;
        // Stopped here already when TRY_STOP_DEV did it.
        let stopped = blocking(move || -> Result<bool> {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            if force {
                return Ok(false);
            }
            if try_stop {
                match c.try_stop(dev_id) {
                    Ok(()) => return Ok(true),
                    Err(ublk::Error::Busy) => return Err(open_refusal(dev_id)),
                    Err(ublk::Error::Unsupported { .. }) => {}
                    Err(e) => return Err(ublk_err("try-stop", Some(dev_id))(e)),
                }
            }
            if device_is_open(dev_id) {
                return Err(open_refusal(dev_id));
            }
            Ok(false)
        })
        .await?;
        // Out of the table first: DEL_DEV waits until every open file of the char device
        // is closed, and the table's entry holds one.
        live.remove(&obj.uuid);
        self.tear_down(dev_id, Some(l.char_dev), !stopped).await;
        self.store.set_exported(obj.uuid, None);
        self.put_record(obj.uuid, None).await?;
        tracing::info!(volume = %obj.name, uuid = %obj.uuid, dev_id, force, "unexported");
        Ok(())
    }

    /// After a volume grew: the device of its export (if any) takes the new size with
    /// UPDATE_SIZE where the kernel offers it (Linux >= 6.16). Otherwise the device keeps
    /// its old size until the next export, and the answer says so. Never fails the resize
    /// (the volume has grown): a failure comes back as a note.
    pub async fn resized(&self, volume: Uuid, size_bytes: u64) -> Option<String> {
        let live = self.live.lock().await;
        let l = live.get(&volume)?;
        let dev_id = l.rec.dev_id;
        let device = ublk::block_path(dev_id).display().to_string();
        let update = self
            .kernel
            .as_ref()
            .is_ok_and(|k| k.features.contains(ublk::Features::UPDATE_SIZE));
        if !update {
            let note = format!(
                "{device} keeps its old size until the volume is exported again: this kernel has no ublk UPDATE_SIZE (Linux >= 6.16)"
            );
            tracing::info!(volume = %l.object.name, device, size_bytes, "{note}");
            return Some(note);
        }
        let sectors = size_bytes / export::SECTOR_BYTES;
        let r = blocking(move || {
            let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
            c.update_size(dev_id, sectors)
                .map_err(ublk_err("update size", Some(dev_id)))
        })
        .await;
        match r {
            Ok(()) => {
                tracing::info!(volume = %l.object.name, device, size_bytes, "export resized");
                None
            }
            Err(e) => {
                tracing::warn!(volume = %l.object.name, device, error = %e, "the export keeps its old size");
                Some(format!(
                    "{device} keeps its old size until the volume is exported again: {e}"
                ))
            }
        }
    }

    /// The exports, sorted by volume UUID.
    ///
    /// # Errors
    /// UNAVAILABLE while the exports of the previous daemon are still being re-attached.
    pub async fn list(&self) -> Result<Vec<pb::Export>> {
        if self.kernel.is_ok() {
            self.wait_recovered().await?;
        }
        let live = self.live.lock().await;
        Ok(live.values().map(|l| self.message(l)).collect())
    }

    /// At a daemon stop: each device is quiesced where the kernel offers QUIESCE_DEV (the
    /// kernel stops sending requests, waits for the ones we serve, and answers every
    /// FETCH with ABORT; it keeps the rest for the next daemon), otherwise each queue
    /// drains (in-flight requests finish, new ones are held unanswered, and the kernel
    /// reissues them to the next daemon). The devices stay. All devices at once; returns
    /// once no request is being served (or after the timeouts).
    pub async fn detach_all(&self) {
        // Requests held by QoS limits must not make the quiesce wait at the cap's pace.
        self.store.lift_qos_for_stop().await;
        let live = self.live.lock().await;
        let quiesce = self.kernel.as_ref().is_ok_and(|k| k.choice.quiesce);
        futures_util::stream::iter(live.values())
            .for_each_concurrent(None, |l| self.detach(l, quiesce))
            .await;
    }

    async fn detach(&self, l: &Live, quiesce: bool) {
        let dev_id = l.rec.dev_id;
        if quiesce {
            let t0 = std::time::Instant::now();
            let r = blocking(move || {
                let c = ublk::Control::open().map_err(ublk_err("open", Some(dev_id)))?;
                // A device made by an older daemon may lack the QUIESCE flag.
                let info = c.info(dev_id).map_err(ublk_err("get info", Some(dev_id)))?;
                if info.flags & ublk::Features::QUIESCE.0 == 0 {
                    return Ok(false);
                }
                c.quiesce(dev_id, QUIESCE_TIMEOUT_MS)
                    .map_err(ublk_err("quiesce", Some(dev_id)))?;
                Ok(true)
            })
            .await;
            match r {
                Ok(true) => {
                    // The kernel sends nothing more; wait until no request is being served
                    // (not for every FETCH to come back: under load some are not aborted
                    // before the daemon exits, and closing the char device ends them).
                    self.wait_queues(dev_id, |q, rx, done| q.drain(rx, done))
                        .await;
                    tracing::info!(dev_id, volume = %l.object.name, took_ms = t0.elapsed().as_millis(), "export quiesced and left for the next daemon");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(dev_id, error = %e, "quiescing the device failed; draining its queues instead");
                }
            }
        }
        self.wait_queues(dev_id, |q, rx, done| q.drain(rx, done))
            .await;
        tracing::info!(dev_id, volume = %l.object.name, "export left for the next daemon");
    }

    /// Asks every reactor's queue of device `dev_id` to call back once quiet (`arm`:
    /// drain or wait-until-stopped) and waits at most [`STOP_TIMEOUT`] for each. A reactor
    /// without the queue (a failed set-up) answers at once. False when one did not answer.
    async fn wait_queues(
        &self,
        dev_id: u32,
        arm: impl Fn(&export::queue::Queue, &Reactor, Box<dyn FnOnce(&Reactor)>) + Copy + Send + 'static,
    ) -> bool {
        let mut all = true;
        for remote in &self.remotes {
            let r = ask(
                remote,
                STOP_TIMEOUT,
                move |rx: &Reactor, tx: oneshot::Sender<()>| match export::with_queue(
                    dev_id,
                    Rc::clone,
                ) {
                    Some(q) => arm(
                        &q,
                        rx,
                        Box::new(move |_rx: &Reactor| {
                            let _ = tx.send(());
                        }),
                    ),
                    None => {
                        let _ = tx.send(());
                    }
                },
            )
            .await;
            if let Err(e) = r {
                tracing::warn!(dev_id, reactor = remote.id(), error = %e, "a ublk queue did not finish in time");
                all = false;
            }
        }
        all
    }

    fn message(&self, l: &Live) -> pb::Export {
        pb::Export {
            volume_uuid: l.object.uuid.to_string(),
            volume_name: l.object.name.clone(),
            device_path: ublk::block_path(l.rec.dev_id).display().to_string(),
            ublk_id: l.rec.dev_id,
            persistent: l.rec.persistent,
            read_only: l.rec.read_only,
            reactors: (0..self.remotes.len())
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                .collect(),
            data_path: l.rec.path.name().to_owned(),
        }
    }
}

/// The data path of a new export: zero copy where the kernel offers AUTO_BUF_REG and the
/// configuration allows it (`ublk::choose`), *with* USER_COPY, which the queues fall back
/// to per request when the bytes must pass through the daemon (see `export::queue`);
/// otherwise the copy path.
pub(crate) fn export_path(k: &KernelUblk) -> PathKind {
    let user_copy = k.choice.flags & ublk::Features::USER_COPY.0 != 0;
    match k.choice.path {
        ublk::DataPath::ZeroCopy if user_copy => PathKind::ZeroCopy,
        _ => PathKind::Copy,
    }
}

/// How many exports can be served zero copy at once: each holds `queue_depth` fixed-buffer
/// slots on every reactor, and a reactor has `max_exports × queue_depth` of them, bounded
/// by io_uring's table (16383 besides index 0: 127 exports at the default depth of 128).
pub(crate) fn zero_copy_capacity(settings: &ExportSettings) -> usize {
    let depth = u64::from(settings.queue_depth.max(1));
    let slots = (u64::from(settings.max_exports) * depth)
        .min(u64::from(crate::reactor::kslots::MAX_TABLE - 1));
    usize::try_from(slots / depth).unwrap_or(usize::MAX)
}

/// ADD flags for an export on `path`: the chosen flags (AUTO_BUF_REG|USER_COPY for zero
/// copy); for the copy path USER_COPY without AUTO_BUF_REG, also where zero copy was
/// chosen but USER_COPY is missing (no fallback for requests that need the bytes).
fn add_flags(k: &KernelUblk, path: PathKind) -> u64 {
    match path {
        PathKind::ZeroCopy => k.choice.flags,
        PathKind::Copy => {
            (k.choice.flags & !ublk::Features::AUTO_BUF_REG.0) | ublk::Features::USER_COPY.0
        }
    }
}

fn open_refusal(dev_id: u32) -> Error {
    Error::InUse {
        what: "export",
        name: ublk::block_path(dev_id).display().to_string(),
        reason: "is open (mounted, or held by a process or another device); unmount or close it first, or unexport with --force (IO of its users then fails)".to_owned(),
    }
}

/// Whether someone holds the block device: an exclusive opener (a mount, a device-mapper
/// table, `O_EXCL`) makes our own `O_EXCL` open fail with EBUSY; holders show in sysfs.
fn device_is_open(dev_id: u32) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let holders = std::fs::read_dir(format!("/sys/block/ublkb{dev_id}/holders"))
        .map(|d| d.count() > 0)
        .unwrap_or(false);
    if holders {
        return true;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(ublk::block_path(dev_id))
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Opens `/dev/ublkcN` (the node appears with the device; give devtmpfs a moment).
fn open_char(dev_id: u32) -> Result<File> {
    let path = ublk::char_path(dev_id);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(Error::Ublk {
                    op: "open",
                    dev: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// The gRPC service.
#[derive(Debug)]
pub struct ExportsService {
    shared: Arc<Shared>,
}

impl ExportsService {
    /// The service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl pb::exports_server::Exports for ExportsService {
    async fn export_volume(
        &self,
        request: Request<pb::ExportVolumeRequest>,
    ) -> std::result::Result<Response<pb::Export>, Status> {
        self.shared.check_serving()?;
        let r = request.into_inner();
        let e = self
            .shared
            .exports
            .export(&r.volume, r.persistent, r.read_only)
            .await?;
        Ok(Response::new(e))
    }

    async fn unexport_volume(
        &self,
        request: Request<pb::UnexportVolumeRequest>,
    ) -> std::result::Result<Response<pb::UnexportVolumeResponse>, Status> {
        self.shared.check_serving()?;
        let r = request.into_inner();
        self.shared.exports.unexport(&r.volume, r.force).await?;
        Ok(Response::new(pb::UnexportVolumeResponse {}))
    }

    async fn list_exports(
        &self,
        request: Request<pb::ListExportsRequest>,
    ) -> std::result::Result<Response<pb::ListExportsResponse>, Status> {
        self.shared.check_serving()?;
        let r = request.into_inner();
        let all = self.shared.exports.list().await?;
        let (exports, next_page_token) =
            super::page::paginate(all, r.page_size, &r.page_token, |e| e.volume_uuid.clone())?;
        Ok(Response::new(pb::ListExportsResponse {
            exports,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_copy_capacity_is_what_fits_the_fixed_buffer_table() {
        let d = ExportSettings::default();
        // 256 exports of depth 128 would need 32768 slots; the table holds 16383.
        assert_eq!(zero_copy_capacity(&d), 127);
        let small = ExportSettings {
            max_exports: 40,
            queue_depth: 64,
            ..ExportSettings::default()
        };
        assert_eq!(zero_copy_capacity(&small), 40);
        let deep = ExportSettings {
            max_exports: 4096,
            queue_depth: 4096,
            ..ExportSettings::default()
        };
        assert_eq!(zero_copy_capacity(&deep), 3);
    }
}
