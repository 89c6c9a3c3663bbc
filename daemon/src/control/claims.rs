//! The devices this daemon holds: the registry of [`ClaimedDevice`]s owned by the control
//! plane, and its record on disk so a restarted daemon takes the same devices back.
//!
//! Owns: [`Claims`] (claim, release, snapshot, restore at start-up) and the state file
//! `<var-dir>/claims.json` (pool and device UUIDs plus the last path seen), written
//! atomically (temporary file, fsync, rename, fsync of the directory).
//!
//! A device is found again by its **label**, not its path: at start-up every recorded
//! device is looked for among the discovered candidates (and the recorded paths, for
//! files) by its device UUID, and claimed again with its pool UUID, which reopens it
//! without rewriting anything. A recorded device that is not found stays recorded (listed
//! as not present) and is taken when it reappears at a later start.
//!
//! Must never: block a reactor or the async runtime (every method here may run `blkid` or
//! touch the disk: call it from a blocking context); hand a held device to anyone (the
//! open file *is* the claim); forget a claim without releasing it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use crate::bdev::claim::{self, ClaimedDevice, ClaimedKind};
use crate::bdev::discover::{self, Candidate, RefuseReason, Signature};
use crate::bdev::label::Uuid;
use crate::bdev::sysfs::SysRoot;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "claims.json";
/// Most devices one daemon holds (a bound on the registry; NVMe nodes have a handful).
pub const MAX_CLAIMED_DEVICES: usize = 64;

/// One recorded device, as written to the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Where it was last seen.
    path: PathBuf,
    pool_uuid: String,
    device_uuid: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    devices: Vec<Record>,
}

const STATE_VERSION: u32 = 1;

/// A recorded device and, when present, the open claim.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    pool_uuid: Uuid,
    device_uuid: Uuid,
    device: Option<ClaimedDevice>,
}

/// What the API reports about a claimed device (a copy: the claim itself stays here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    /// Path it was claimed by (or last seen at).
    pub path: PathBuf,
    /// Block device or file; `None` when not present.
    pub kind: Option<ClaimedKind>,
    /// The pool its label names.
    pub pool_uuid: Uuid,
    /// Its own UUID.
    pub device_uuid: Uuid,
    /// Size (0 when not present).
    pub size_bytes: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Physical block size.
    pub physical_block_size: u32,
    /// Opened with `O_DIRECT`.
    pub direct_io: bool,
    /// This claim wrote the label.
    pub newly_labelled: bool,
    /// What `force` overrode.
    pub overridden: Vec<RefuseReason>,
    /// Signatures left after a forced claim.
    pub residual_signatures: Vec<Signature>,
    /// Held open now.
    pub present: bool,
}

impl ClaimInfo {
    fn of(entry: &Entry) -> Self {
        match &entry.device {
            Some(d) => Self {
                path: entry.path.clone(),
                kind: Some(d.kind().clone()),
                pool_uuid: entry.pool_uuid,
                device_uuid: entry.device_uuid,
                size_bytes: d.size_bytes(),
                logical_block_size: d.logical_block_size(),
                physical_block_size: d.physical_block_size(),
                direct_io: d.direct_io(),
                newly_labelled: d.newly_labelled(),
                overridden: d.overridden().to_vec(),
                residual_signatures: d.residual_signatures().to_vec(),
                present: true,
            },
            None => Self {
                path: entry.path.clone(),
                kind: None,
                pool_uuid: entry.pool_uuid,
                device_uuid: entry.device_uuid,
                size_bytes: 0,
                logical_block_size: 0,
                physical_block_size: 0,
                direct_io: false,
                newly_labelled: false,
                overridden: Vec::new(),
                residual_signatures: Vec::new(),
                present: false,
            },
        }
    }
}

/// The registry of claimed devices.
#[derive(Debug)]
pub struct Claims {
    root: SysRoot,
    state_path: PathBuf,
    entries: Mutex<Vec<Entry>>,
    /// Serialises claims and releases (each may run `blkid` for seconds), so two calls on
    /// one device cannot interleave, while snapshots keep reading `entries`.
    ops: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data consistent (every update is a single
    // push/remove/field write), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Claims {
    /// An empty registry recording into `<var_dir>/claims.json`, without reading it
    /// (see [`Self::open`]).
    #[must_use]
    pub fn empty(var_dir: &Path, root: SysRoot) -> Self {
        Self {
            root,
            state_path: var_dir.join(STATE_FILE),
            entries: Mutex::new(Vec::new()),
            ops: Mutex::new(()),
        }
    }

    /// Reads the state file in `var_dir` (none: no devices) and takes back every recorded
    /// device that can be found by its label. Blocking (discovery).
    ///
    /// # Errors
    /// The state file exists but cannot be read or parsed (it is never silently dropped:
    /// it names devices that belong to this daemon).
    pub fn open(var_dir: &Path, root: SysRoot) -> anyhow::Result<Self> {
        let claims = Self::empty(var_dir, root);
        let records = claims.load()?;
        if records.is_empty() {
            return Ok(claims);
        }
        claims.restore(records);
        Ok(claims)
    }

    fn load(&self) -> anyhow::Result<Vec<(PathBuf, Uuid, Uuid)>> {
        let text = match fs::read_to_string(&self.state_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the record of claimed devices {}: {e}",
                    self.state_path.display()
                ))
            }
        };
        let bad = |what: String| {
            anyhow::anyhow!(
                "the record of claimed devices {} is damaged: {what}; fix or remove it (the \
                 devices keep their labels: `coreblk device claim PATH` takes them back)",
                self.state_path.display()
            )
        };
        let state: StateFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(bad(format!(
                "version {} (this coreblkd reads version {STATE_VERSION})",
                state.version
            )));
        }
        state
            .devices
            .into_iter()
            .map(|r| {
                let pool = r.pool_uuid.parse().map_err(|e| bad(format!("{e}")))?;
                let device = r.device_uuid.parse().map_err(|e| bad(format!("{e}")))?;
                Ok((r.path, pool, device))
            })
            .collect()
    }

    /// Finds each recorded device by its label and claims it again.
    fn restore(&self, records: Vec<(PathBuf, Uuid, Uuid)>) {
        let explicit: Vec<PathBuf> = records
            .iter()
            .map(|(p, _, _)| p.clone())
            .filter(|p| p.is_file())
            .collect();
        let candidates = discover::discover(&self.root, &explicit);
        let deadline = std::time::Instant::now() + TAKE_BACK_WAIT;
        let mut entries = Vec::new();
        for (last_path, pool_uuid, device_uuid) in records {
            let found = candidates.iter().find(|c: &&Candidate| {
                c.label
                    .is_some_and(|l| l.device_uuid == device_uuid && l.pool_uuid == pool_uuid)
            });
            let device = match found {
                None => {
                    tracing::warn!(
                        device_uuid = %device_uuid, pool = %pool_uuid, last_path = %last_path.display(),
                        "a claimed device was not found by its label; it stays recorded and is taken back when it reappears"
                    );
                    None
                }
                Some(c) => match take_back(&self.root, &c.path, pool_uuid, deadline) {
                    Ok(d) => {
                        tracing::info!(device = %c.path.display(), device_uuid = %device_uuid, pool = %pool_uuid, "took back a claimed device");
                        Some(d)
                    }
                    Err(error) => {
                        tracing::warn!(device = %c.path.display(), device_uuid = %device_uuid, %error, "cannot take back a claimed device");
                        None
                    }
                },
            };
            let path = device
                .as_ref()
                .map_or(last_path, |d| d.path().to_path_buf());
            entries.push(Entry {
                path,
                pool_uuid,
                device_uuid,
                device,
            });
        }
        *lock(&self.entries) = entries;
        if let Err(error) = self.persist() {
            tracing::warn!(%error, "cannot update the record of claimed devices");
        }
    }

    /// Every recorded device, in claim order.
    #[must_use]
    pub fn snapshot(&self) -> Vec<ClaimInfo> {
        lock(&self.entries).iter().map(ClaimInfo::of).collect()
    }

    /// Device UUIDs of the devices held now.
    #[must_use]
    pub fn held_device_uuids(&self) -> HashSet<Uuid> {
        lock(&self.entries)
            .iter()
            .filter(|e| e.device.is_some())
            .map(|e| e.device_uuid)
            .collect()
    }

    /// Paths of held regular files (discovery lists files only when named).
    #[must_use]
    pub fn held_file_paths(&self) -> Vec<PathBuf> {
        lock(&self.entries)
            .iter()
            .filter(|e| {
                e.device
                    .as_ref()
                    .is_some_and(|d| *d.kind() == ClaimedKind::File)
            })
            .map(|e| e.path.clone())
            .collect()
    }

    /// A second descriptor of the held device `device_uuid` (for its IO path), with its
    /// path; `None` when it is not held now. The claim stays with the registry.
    ///
    /// # Errors
    /// Duplicating the descriptor fails.
    pub fn device_file(&self, device_uuid: Uuid) -> io::Result<Option<(PathBuf, File)>> {
        let entries = lock(&self.entries);
        let Some(d) = entries
            .iter()
            .find(|e| e.device_uuid == device_uuid)
            .and_then(|e| e.device.as_ref())
        else {
            return Ok(None);
        };
        Ok(Some((d.path().to_path_buf(), d.file().try_clone()?)))
    }

    /// Claims `path` (absolute) and keeps it held. A device this daemon already holds is
    /// returned as it is; a recorded but absent device is taken back with its own pool.
    /// Blocking.
    ///
    /// # Errors
    /// The claim is refused or fails, the registry is full, or the record cannot be
    /// written (then the claim is let go again).
    pub fn claim(&self, path: &Path, force: bool) -> Result<ClaimInfo> {
        let _op = lock(&self.ops);
        let canonical = fs::canonicalize(path).ok();
        let same = |p: &Path| {
            p == path
                || canonical
                    .as_deref()
                    .is_some_and(|c| fs::canonicalize(p).is_ok_and(|q| q == c))
        };
        if let Some(held) = lock(&self.entries)
            .iter()
            .find(|e| e.device.is_some() && same(&e.path))
        {
            return Ok(ClaimInfo::of(held));
        }
        // Ours already (recorded, not present)? Take it back with its own pool uuid.
        let label = claim::read_label(path).ok().flatten();
        let recorded = label.and_then(|l| {
            lock(&self.entries)
                .iter()
                .find(|e| e.device.is_none() && e.device_uuid == l.device_uuid)
                .map(|e| e.pool_uuid)
        });
        if recorded.is_none() && lock(&self.entries).len() >= MAX_CLAIMED_DEVICES {
            return Err(Error::InvalidArgument {
                field: "path",
                reason: format!(
                    "this daemon already holds {MAX_CLAIMED_DEVICES} devices, the most it \
                     manages; release one first"
                ),
            });
        }
        let pool_uuid = match recorded {
            Some(p) => p,
            None => Uuid::random()
                .map_err(|e| Error::Internal(format!("cannot make a pool uuid: {e}")))?,
        };
        let device = claim::claim(&self.root, path, pool_uuid, force)?;
        let device_uuid = device.label().device_uuid;
        {
            let mut entries = lock(&self.entries);
            entries.retain(|e| e.device_uuid != device_uuid);
            entries.push(Entry {
                path: device.path().to_path_buf(),
                pool_uuid,
                device_uuid,
                device: Some(device),
            });
        }
        if let Err(e) = self.persist() {
            let entry = {
                let mut entries = lock(&self.entries);
                let i = entries.iter().position(|e| e.device_uuid == device_uuid);
                i.map(|i| entries.remove(i))
            };
            if let Some(d) = entry.and_then(|e| e.device) {
                let _ = d.release(false);
            }
            return Err(e);
        }
        let entries = lock(&self.entries);
        let entry = entries
            .iter()
            .find(|e| e.device_uuid == device_uuid)
            .ok_or_else(|| Error::Internal("a claim vanished from the registry".to_owned()))?;
        Ok(ClaimInfo::of(entry))
    }

    /// Releases a held (or recorded) device named by its path or device UUID; with
    /// `wipe_label`, erases its label first. Blocking.
    ///
    /// # Errors
    /// [`Error::DeviceNotClaimed`]; the record cannot be written (the device stays held);
    /// erasing the label fails (the claim is let go all the same).
    pub fn release(&self, device: &str, wipe_label: bool) -> Result<ClaimInfo> {
        let _op = lock(&self.ops);
        let by_uuid: Option<Uuid> = device.parse().ok();
        let canonical = fs::canonicalize(device).ok();
        let entry = {
            let mut entries = lock(&self.entries);
            let i = entries.iter().position(|e| {
                Some(e.device_uuid) == by_uuid
                    || e.path == Path::new(device)
                    || canonical
                        .as_deref()
                        .is_some_and(|c| fs::canonicalize(&e.path).is_ok_and(|q| q == c))
            });
            match i {
                Some(i) => entries.remove(i),
                None => {
                    return Err(Error::DeviceNotClaimed {
                        device: device.to_owned(),
                    })
                }
            }
        };
        if let Err(e) = self.persist() {
            lock(&self.entries).push(entry);
            return Err(e);
        }
        let info = ClaimInfo::of(&entry);
        tracing::info!(device = %entry.path.display(), device_uuid = %entry.device_uuid, wipe_label, "device released");
        match entry.device {
            Some(d) => d.release(wipe_label)?,
            None if wipe_label => {
                return Err(Error::InvalidArgument {
                    field: "wipe_label",
                    reason: format!(
                        "device {} is not present, so its label cannot be erased; the claim \
                         record is removed",
                        entry.path.display()
                    ),
                })
            }
            None => {}
        }
        Ok(info)
    }

    /// Writes the record atomically.
    fn persist(&self) -> Result<()> {
        let records: Vec<Record> = lock(&self.entries)
            .iter()
            .map(|e| Record {
                path: e.path.clone(),
                pool_uuid: e.pool_uuid.to_string(),
                device_uuid: e.device_uuid.to_string(),
            })
            .collect();
        let state = StateFile {
            version: STATE_VERSION,
            devices: records,
        };
        let err = |source| Error::State {
            path: self.state_path.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(&state)
            .map_err(|e| Error::Internal(format!("cannot encode the claim record: {e}")))?;
        text.push(b'\n');
        let dir = self
            .state_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        let tmp = self.state_path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &self.state_path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

/// How long a start keeps trying to take back its own devices while they are held
/// exclusively (all devices together).
///
/// After a `kill -9` the previous daemon's process is gone before its io_uring is: the
/// ring's teardown runs in the kernel afterwards and holds the ring's files (the pool
/// device, opened `O_EXCL`) until every request it had — a hundred exports' ublk commands
/// among them — is cancelled or completed. A take-back that gave up after the claim's
/// short retry left the pool unimported and its exports hanging (seen in the 100-export
/// restart benchmark on 7.3: 45 devices never answered again).
pub const TAKE_BACK_WAIT: Duration = Duration::from_secs(30);

/// Claims a recorded device again, retrying while it is held exclusively until
/// `deadline` (see [`TAKE_BACK_WAIT`]); other refusals are final at once.
fn take_back(
    root: &SysRoot,
    path: &Path,
    pool_uuid: Uuid,
    deadline: std::time::Instant,
) -> Result<ClaimedDevice, claim::ClaimError> {
    let mut logged = false;
    loop {
        match claim::claim(root, path, pool_uuid, false) {
            Err(e) if is_held(&e) && std::time::Instant::now() < deadline => {
                if !logged {
                    tracing::info!(device = %path.display(), "a recorded device is still held (a previous daemon's io_uring going away?); waiting for it");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Whether a claim was refused only because someone holds the device exclusively.
fn is_held(e: &claim::ClaimError) -> bool {
    matches!(e, claim::ClaimError::Refused { reasons, .. }
        if !reasons.is_empty() && reasons.iter().all(|r| matches!(r, RefuseReason::InUse { .. })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p)
            .expect("create")
            .set_len(80 << 20)
            .expect("size");
        p
    }

    #[test]
    fn claims_are_held_recorded_and_taken_back_by_label() {
        let dir = tempfile::tempdir().expect("tmp");
        let var = dir.path().join("var");
        let img = image(dir.path(), "a.img");
        let claims = Claims::open(&var, SysRoot::host()).expect("open");
        let first = claims.claim(&img, false).expect("claim");
        assert!(first.present && first.newly_labelled);
        // Held: a second claimer is refused by the lock.
        let other = claim::claim(&SysRoot::host(), &img, Uuid::random().expect("uuid"), true)
            .expect_err("held");
        assert!(other.to_string().contains("in use"), "{other}");
        // Idempotent.
        assert_eq!(claims.claim(&img, false).expect("again"), first);
        drop(claims);

        // A restart: the file moved, the label finds it.
        let moved = dir.path().join("b.img");
        fs::rename(&img, &moved).expect("mv");
        let state = fs::read_to_string(var.join(STATE_FILE)).expect("state");
        fs::write(
            var.join(STATE_FILE),
            state.replace(&img.display().to_string(), &moved.display().to_string()),
        )
        .expect("rewrite path (files are found by their recorded path)");
        let claims = Claims::open(&var, SysRoot::host()).expect("reopen");
        let snap = claims.snapshot();
        assert_eq!(snap.len(), 1);
        assert!(snap[0].present);
        assert!(!snap[0].newly_labelled);
        assert_eq!(snap[0].device_uuid, first.device_uuid);
        assert_eq!(snap[0].pool_uuid, first.pool_uuid);

        let released = claims
            .release(&first.device_uuid.to_string(), true)
            .expect("release");
        assert_eq!(released.path, moved);
        assert!(claims.snapshot().is_empty());
        assert_eq!(claim::read_label(&moved).expect("read"), None);
        let e = claims
            .release(&moved.display().to_string(), false)
            .expect_err("not held");
        assert!(matches!(e, Error::DeviceNotClaimed { .. }), "{e}");
    }

    #[test]
    fn a_restart_waits_for_a_device_still_held_by_the_previous_daemon() {
        // The previous daemon's io_uring can hold the pool device for a while after its
        // process died: here another open file description holds the lock and lets go
        // after 700 ms, longer than a claim's own busy retry.
        let dir = tempfile::tempdir().expect("tmp");
        let var = dir.path().join("var");
        let img = image(dir.path(), "a.img");
        let claims = Claims::open(&var, SysRoot::host()).expect("open");
        let first = claims.claim(&img, false).expect("claim");
        drop(claims);
        let holder = claim::claim(&SysRoot::host(), &img, first.pool_uuid, false).expect("hold");
        let t0 = std::time::Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(holder);
        });
        let claims = Claims::open(&var, SysRoot::host()).expect("reopen");
        release.join().expect("join");
        let snap = claims.snapshot();
        assert!(snap[0].present, "not taken back after {:?}", t0.elapsed());
        assert!(t0.elapsed() >= Duration::from_millis(700));
        drop(claims);
        // A holder that stays is given up on at the deadline, with the reason.
        let holder = claim::claim(&SysRoot::host(), &img, first.pool_uuid, false).expect("hold");
        let e = take_back(
            &SysRoot::host(),
            &img,
            first.pool_uuid,
            std::time::Instant::now(),
        )
        .expect_err("held");
        assert!(is_held(&e), "{e}");
        drop(holder);
    }

    #[test]
    fn a_missing_device_stays_recorded() {
        let dir = tempfile::tempdir().expect("tmp");
        let var = dir.path().join("var");
        let img = image(dir.path(), "a.img");
        let claims = Claims::open(&var, SysRoot::host()).expect("open");
        let info = claims.claim(&img, false).expect("claim");
        drop(claims);
        let aside = dir.path().join("aside.img");
        fs::rename(&img, &aside).expect("hide");
        let claims = Claims::open(&var, SysRoot::host()).expect("reopen");
        let snap = claims.snapshot();
        assert_eq!(snap.len(), 1);
        assert!(!snap[0].present);
        drop(claims);
        fs::rename(&aside, &img).expect("back");
        let claims = Claims::open(&var, SysRoot::host()).expect("reopen");
        assert!(claims.snapshot()[0].present);
        assert_eq!(claims.snapshot()[0].device_uuid, info.device_uuid);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().expect("tmp");
        fs::write(dir.path().join(STATE_FILE), "{ nope").expect("write");
        let e = Claims::open(dir.path(), SysRoot::host()).expect_err("damaged");
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
