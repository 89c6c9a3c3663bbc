//! Claiming a device for a pool: exclusive open, every refusal check, then the label.
//!
//! Owns: the claim sequence ([`claim`]) and the open file that *is* the claim
//! ([`ClaimedDevice`]: a block device open with `O_EXCL`, or a regular file holding a
//! whole-file OFD write lock, `F_OFD_SETLK`, since `O_EXCL` means nothing on a file);
//! reading a device's label from a path ([`read_label`]); the `coreblkd devices list` /
//! `devices claim` glue ([`cli_list`], [`cli_claim`]).
//!
//! Must never: claim a device the host is using (mounted, swap, holders, a loop device's
//! backing file) even with `--force`; claim a device it could not check (no `blkid`,
//! unreadable sysfs); open a ublk export; write a byte before every check has passed
//! with the exclusive open (or the lock) already held.
//!
//! Sequence for a block device: sysfs checks (no open) → `open(O_RDWR|O_EXCL|O_DIRECT)`
//! (EBUSY: someone holds it) → sysfs checks again (now stable: nobody can mount or stack
//! on it while we hold it) → label, then libblkid signatures → decide → zero the reserved
//! regions and write the label. For a file: open → OFD lock → checks → label.
//!
//! Start reading at [`claim`].

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::discover::{
    self, classify, examine, file_refusals, is_ublk_path, open_device, sysfs_refusals, too_small,
    Candidate, Node, Prober, RefuseReason, Signature, FILE_BLOCK_BYTES,
};
use super::label::{self, Label, LabelStatus, Uuid};
use super::sysfs::{self, BlockDev, HostUsage, SysRoot};

/// Why a claim (or a label read) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The device may not be claimed; the reasons say why and what to do.
    #[error("{}", refusal_message(path, reasons, *force))]
    Refused {
        /// The path as given.
        path: PathBuf,
        /// Every reason found (with `force`, those it overrides are included).
        reasons: Vec<RefuseReason>,
        /// Whether `--force` was given.
        force: bool,
    },
    /// An IO step failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// The path as given.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ClaimError {
    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// "device /dev/nvme1n1 has an ext4 filesystem; refusing to claim it (use --force to
/// overwrite)". With `force`, only the remedies of reasons force did not override.
fn refusal_message(path: &Path, reasons: &[RefuseReason], force: bool) -> String {
    let what: Vec<String> = reasons.iter().map(ToString::to_string).collect();
    let mut remedies: Vec<&str> = Vec::new();
    for reason in reasons.iter().filter(|r| !(force && r.force_overrides())) {
        if !remedies.contains(&reason.remedy()) {
            remedies.push(reason.remedy());
        }
    }
    format!(
        "device {} {}; refusing to claim it ({})",
        path.display(),
        what.join("; "),
        remedies.join("; ")
    )
}

/// What was claimed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClaimedKind {
    /// A block device, held with `O_EXCL`.
    Block {
        /// Kernel name.
        name: String,
    },
    /// A regular file, held with an OFD write lock.
    File,
}

/// A claimed device. Holding it holds the claim (the exclusive open or the OFD lock);
/// dropping it releases the claim and leaves the label in place.
#[derive(Debug)]
pub struct ClaimedDevice {
    path: PathBuf,
    file: File,
    kind: ClaimedKind,
    size_bytes: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    direct_io: bool,
    label: Label,
    newly_labelled: bool,
    overridden: Vec<RefuseReason>,
    residual_signatures: Vec<Signature>,
}

impl ClaimedDevice {
    /// The path it was claimed by.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (read-write; `O_DIRECT` when [`Self::direct_io`]).
    #[must_use]
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Block device or file.
    #[must_use]
    pub fn kind(&self) -> &ClaimedKind {
        &self.kind
    }

    /// Size now.
    #[must_use]
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Logical block size (the IO alignment); 4096 for files.
    #[must_use]
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Physical block size.
    #[must_use]
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// Whether the file is open with `O_DIRECT` (a file on tmpfs may not be).
    #[must_use]
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// The label on the device.
    #[must_use]
    pub fn label(&self) -> &Label {
        &self.label
    }

    /// Whether this claim wrote the label (false: it was already this pool's).
    #[must_use]
    pub fn newly_labelled(&self) -> bool {
        self.newly_labelled
    }

    /// What `--force` overrode.
    #[must_use]
    pub fn overridden(&self) -> &[RefuseReason] {
        &self.overridden
    }

    /// Signatures libblkid still finds after a forced claim wiped the reserved regions
    /// (normally none; anything here lies outside the first and last MiB).
    #[must_use]
    pub fn residual_signatures(&self) -> &[Signature] {
        &self.residual_signatures
    }

    /// Releases the claim; with `wipe_label`, first erases both label copies so the
    /// device no longer belongs to the pool.
    ///
    /// # Errors
    /// Erasing the label fails (the claim is released anyway).
    pub fn release(self, wipe_label: bool) -> Result<(), ClaimError> {
        if wipe_label {
            label::erase(&self.file, self.size_bytes)
                .map_err(ClaimError::io(&self.path, "erase the label of"))?;
            tracing::info!(device = %self.path.display(), pool = %self.label.pool_uuid, "label erased");
        }
        Ok(())
    }
}

/// Claims `path` for `pool_uuid`, probing with the host's `blkid`. A device that already
/// carries this pool's label is opened again without rewriting it (how a restarted
/// daemon takes its devices back).
///
/// # Errors
/// [`ClaimError::Refused`] with every reason found, or an IO error.
pub fn claim(
    root: &SysRoot,
    path: &Path,
    pool_uuid: Uuid,
    force: bool,
) -> Result<ClaimedDevice, ClaimError> {
    claim_with(root, path, pool_uuid, force, &Prober::locate())
}

/// [`claim`] with a given prober.
///
/// # Errors
/// As [`claim`].
pub fn claim_with(
    root: &SysRoot,
    path: &Path,
    pool_uuid: Uuid,
    force: bool,
    prober: &Prober,
) -> Result<ClaimedDevice, ClaimError> {
    assert!(!pool_uuid.is_nil(), "the nil uuid is not a pool id");
    let refuse = |reasons: Vec<RefuseReason>| ClaimError::Refused {
        path: path.to_path_buf(),
        reasons,
        force,
    };
    if refers_to_ublk(path) {
        return Err(refuse(vec![RefuseReason::UblkDevice]));
    }
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refuse(vec![RefuseReason::NotFound]))
        }
        Err(e) => return Err(ClaimError::io(path, "stat")(e)),
    };
    let opened = match classify(root, path, &meta).map_err(|r| refuse(vec![r]))? {
        Node::Block(dev) => open_block(root, path, &dev, force)?,
        Node::File => open_file(root, path, force)?,
    };
    finish_claim(path, opened, pool_uuid, force, prober)
}

/// A device opened exclusively, with the refusals known before looking at its content.
struct Opened {
    file: File,
    direct_io: bool,
    kind: ClaimedKind,
    size_bytes: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    reasons: Vec<RefuseReason>,
}

/// Refuses, listing every reason, when one blocks: any reason force does not override,
/// or any at all without force.
fn check(path: &Path, reasons: &[RefuseReason], force: bool) -> Result<(), ClaimError> {
    refuse_if(path, reasons, force, |r| !(force && r.force_overrides()))
}

/// Refuses, listing every reason, when one of them is a reason force never overrides.
/// Used before looking further: such a device is refused whatever else it holds.
fn check_hard(path: &Path, reasons: &[RefuseReason], force: bool) -> Result<(), ClaimError> {
    refuse_if(path, reasons, force, |r| !r.force_overrides())
}

fn refuse_if(
    path: &Path,
    reasons: &[RefuseReason],
    force: bool,
    blocks: impl Fn(&RefuseReason) -> bool,
) -> Result<(), ClaimError> {
    if reasons.iter().any(blocks) {
        return Err(ClaimError::Refused {
            path: path.to_path_buf(),
            reasons: reasons.to_vec(),
            force,
        });
    }
    Ok(())
}

fn host_usage(root: &SysRoot) -> Result<HostUsage, String> {
    HostUsage::read(root).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            root.proc_.join("self/mountinfo").display()
        )
    })
}

/// The sysfs/mountinfo refusals for the block device `name`, read afresh.
fn host_refusals(root: &SysRoot, name: &str) -> (Option<BlockDev>, Vec<RefuseReason>) {
    let dev = match sysfs::block_dev(root, name) {
        Ok(Some(dev)) => dev,
        Ok(None) => {
            let error = format!("block device {name} vanished from sysfs");
            return (None, vec![RefuseReason::CheckFailed { error }]);
        }
        Err(e) => {
            let error = format!("cannot read sysfs for {name}: {e}");
            return (None, vec![RefuseReason::CheckFailed { error }]);
        }
    };
    let reasons = match host_usage(root) {
        Ok(usage) => sysfs_refusals(&dev, &usage),
        Err(error) => vec![RefuseReason::CheckFailed { error }],
    };
    (Some(dev), reasons)
}

fn open_block(
    root: &SysRoot,
    path: &Path,
    dev: &BlockDev,
    force: bool,
) -> Result<Opened, ClaimError> {
    // Refuse what sysfs already rules out, without opening the device at all.
    let (_, early) = host_refusals(root, &dev.name);
    check_hard(path, &early, force)?;
    let opened = retry_while_busy(|| open_device(path, true, true), libc::EBUSY);
    let (mut file, direct_io) = opened.map_err(|e| {
        let reason = match e.raw_os_error() {
            Some(libc::EBUSY) => RefuseReason::InUse {
                detail: "another process holds it exclusively (a mount, device-mapper, md, \
                         LVM, or another coreblkd)"
                    .to_owned(),
            },
            Some(libc::EROFS) => RefuseReason::ReadOnly,
            _ => return ClaimError::io(path, "open (O_RDWR|O_EXCL|O_DIRECT)")(e),
        };
        ClaimError::Refused {
            path: path.to_path_buf(),
            reasons: vec![reason],
            force,
        }
    })?;
    // We hold it exclusively now, so nobody can mount or stack on it: check again, and
    // this time the answer stays true.
    let (fresh, reasons) = host_refusals(root, &dev.name);
    let geometry = fresh.as_ref().unwrap_or(dev);
    let size_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(ClaimError::io(path, "find the size of"))?;
    Ok(Opened {
        file,
        direct_io,
        kind: ClaimedKind::Block {
            name: dev.name.clone(),
        },
        size_bytes,
        logical_block_size: geometry.logical_block_size,
        physical_block_size: geometry.physical_block_size,
        reasons,
    })
}

fn open_file(root: &SysRoot, path: &Path, force: bool) -> Result<Opened, ClaimError> {
    let refuse = |reason| ClaimError::Refused {
        path: path.to_path_buf(),
        reasons: vec![reason],
        force,
    };
    let (file, direct_io) = open_device(path, true, false).map_err(|e| match e.raw_os_error() {
        Some(libc::EROFS) => refuse(RefuseReason::ReadOnly),
        _ => ClaimError::io(path, "open (O_RDWR|O_DIRECT)")(e),
    })?;
    retry_while_busy(|| lock_whole_file(&file), libc::EAGAIN).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => refuse(RefuseReason::InUse {
                detail: "another coreblkd holds its lock (OFD write lock on the file)".to_owned(),
            }),
            _ => ClaimError::io(path, "lock (F_OFD_SETLK)")(e),
        }
    })?;
    let size_bytes = file.metadata().map_err(ClaimError::io(path, "stat"))?.len();
    let mut reasons = file_refusals(root, path, &host_usage(root));
    reasons.extend(too_small(size_bytes));
    Ok(Opened {
        file,
        direct_io,
        kind: ClaimedKind::File,
        size_bytes,
        logical_block_size: FILE_BLOCK_BYTES,
        physical_block_size: FILE_BLOCK_BYTES,
        reasons,
    })
}

/// How long a claim keeps retrying an open or lock that reports "busy".
///
/// A holder that matters (a mount, another coreblkd) holds for far longer. A transient
/// one does not: when any thread of this process forks (to run `blkid`, say), the child
/// owns copies of every fd until its `exec` closes them, so an exclusive open or OFD lock
/// just released by one thread can still look held for a moment.
const BUSY_RETRY: Duration = Duration::from_millis(500);

fn retry_while_busy<T>(
    mut attempt: impl FnMut() -> io::Result<T>,
    busy_errno: i32,
) -> io::Result<T> {
    let deadline = Instant::now() + BUSY_RETRY;
    let mut pause = Duration::from_millis(1);
    loop {
        match attempt() {
            Err(e) if e.raw_os_error() == Some(busy_errno) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

/// Takes a write lock on the whole file (however it grows) for this open file
/// description. OFD locks conflict between descriptions even inside one process, and go
/// away with the last fd of the description, so the claim lives exactly as long as the
/// [`ClaimedDevice`].
fn lock_whole_file(file: &File) -> io::Result<()> {
    let lock = libc::flock {
        l_type: libc::c_short::try_from(libc::F_WRLCK).expect("F_WRLCK fits in c_short"),
        l_whence: libc::c_short::try_from(libc::SEEK_SET).expect("SEEK_SET fits in c_short"),
        l_start: 0,
        // 0: to the end of the file, wherever that is.
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    // F_OFD_SETLK reads exactly one `struct flock` through the third argument,
    // which points to `lock`, a fully initialised local that outlives the call; the fd
    // is owned by `file`, which is borrowed (so open) for the whole call; the kernel
    // keeps no reference to the pointer after returning.
    // SAFETY: the reasons above hold for this call.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_SETLK,
            std::ptr::from_ref(&lock),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Looks at the content, decides, and labels.
fn finish_claim(
    path: &Path,
    opened: Opened,
    pool_uuid: Uuid,
    force: bool,
    prober: &Prober,
) -> Result<ClaimedDevice, ClaimError> {
    let Opened {
        file,
        direct_io,
        kind,
        size_bytes,
        logical_block_size,
        physical_block_size,
        mut reasons,
    } = opened;
    // Too small, mounted...: refused whatever the content, so do not read it.
    check_hard(path, &reasons, force)?;
    let content = examine(&file, size_bytes, path, prober);
    let own = content.label.filter(|l| l.pool_uuid == pool_uuid);
    reasons.extend(
        content
            .reasons
            .into_iter()
            .filter(|r| !(own.is_some() && matches!(r, RefuseReason::OtherPoolLabel { .. }))),
    );
    check(path, &reasons, force)?;

    let (label, newly_labelled) = match own {
        Some(label) if content.label_damaged_copy.is_none() => (label, false),
        Some(old) => {
            // One copy is damaged: rewrite both, one generation up.
            let label = Label {
                generation: old.generation + 1,
                ..old
            };
            label::write_to(&file, size_bytes, &label)
                .map_err(ClaimError::io(path, "repair the label of"))?;
            tracing::warn!(device = %path.display(), pool = %pool_uuid, "repaired a damaged label copy");
            (label, false)
        }
        None => (write_new_label(path, &file, size_bytes, pool_uuid)?, true),
    };
    let residual_signatures = if reasons.is_empty() || !newly_labelled {
        Vec::new()
    } else {
        residual_signatures(path, prober)
    };
    tracing::info!(
        device = %path.display(),
        pool = %label.pool_uuid,
        device_uuid = %label.device_uuid,
        newly_labelled,
        forced = !reasons.is_empty(),
        "device claimed"
    );
    Ok(ClaimedDevice {
        path: path.to_path_buf(),
        file,
        kind,
        size_bytes,
        logical_block_size,
        physical_block_size,
        direct_io,
        label,
        newly_labelled,
        overridden: reasons,
        residual_signatures,
    })
}

/// Zeroes the reserved head and tail (wiping the signatures there) and writes the label.
fn write_new_label(
    path: &Path,
    file: &File,
    size_bytes: u64,
    pool_uuid: Uuid,
) -> Result<Label, ClaimError> {
    let device_uuid = Uuid::random().map_err(ClaimError::io(path, "make a device uuid for"))?;
    label::zero_reserved_regions(file, size_bytes)
        .map_err(ClaimError::io(path, "zero the reserved regions of"))?;
    let label = Label::new(pool_uuid, device_uuid, size_bytes);
    label::write_to(file, size_bytes, &label)
        .map_err(ClaimError::io(path, "write the label of"))?;
    Ok(label)
}

/// After a forced claim: what libblkid still sees (it does not know our label, so any
/// hit lies outside the wiped regions). Logged, never fatal.
fn residual_signatures(path: &Path, prober: &Prober) -> Vec<Signature> {
    match prober.probe(path) {
        Ok(outcome) => {
            for sig in &outcome.signatures {
                tracing::warn!(device = %path.display(), kind = %sig.kind, "signature survives the forced claim");
            }
            outcome.signatures
        }
        Err(error) => {
            tracing::warn!(device = %path.display(), %error, "cannot re-probe after the forced claim");
            Vec::new()
        }
    }
}

/// Whether `path`, or what its symlinks resolve to, is a ublk device. Looks at names
/// only: resolving links reads `/dev` entries and opens nothing.
fn refers_to_ublk(path: &Path) -> bool {
    is_ublk_path(path) || fs::canonicalize(path).is_ok_and(|p| is_ublk_path(&p))
}

/// Reads the coreblk label of a device or file without claiming it. `Ok(None)`: no label.
///
/// # Errors
/// The path is a ublk export, cannot be opened or read, or both label copies are damaged
/// ([`RefuseReason::DamagedLabel`]).
pub fn read_label(path: &Path) -> Result<Option<Label>, ClaimError> {
    let refuse = |reason| ClaimError::Refused {
        path: path.to_path_buf(),
        reasons: vec![reason],
        force: false,
    };
    if refers_to_ublk(path) {
        return Err(refuse(RefuseReason::UblkDevice));
    }
    let (mut file, _direct) = open_device(path, false, false).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => refuse(RefuseReason::NotFound),
        _ => ClaimError::io(path, "open")(e),
    })?;
    let size_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(ClaimError::io(path, "find the size of"))?;
    match label::read_from(&file, size_bytes).map_err(ClaimError::io(path, "read the label of"))? {
        LabelStatus::Absent => Ok(None),
        LabelStatus::Valid { label, .. } => Ok(Some(label)),
        LabelStatus::Damaged => Err(refuse(RefuseReason::DamagedLabel)),
    }
}

// ---- `coreblkd devices ...` glue -------------------------------------------------------

/// `coreblkd devices list [--json] [PATH...]`: every candidate (plus the named paths) as a
/// table or a JSON array.
///
/// # Errors
/// Writing to stdout fails.
pub fn cli_list(json: bool, explicit: Vec<PathBuf>) -> anyhow::Result<()> {
    let candidates = discover::discover(&SysRoot::host(), &explicit);
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &candidates)?;
        writeln!(out)?;
    } else {
        out.write_all(render_table(&candidates).as_bytes())?;
    }
    Ok(())
}

/// `coreblkd devices claim PATH [--force] [--json]`: claims the device for a new pool
/// (fresh random uuid), prints the result, and releases the claim on exit (the label
/// stays).
///
/// # Errors
/// The claim is refused or fails (the message names the reason and the fix).
pub fn cli_claim(path: &Path, force: bool, json: bool) -> anyhow::Result<()> {
    let pool_uuid = Uuid::random()?;
    let mut out = io::stdout().lock();
    match claim(&SysRoot::host(), path, pool_uuid, force) {
        Ok(device) => {
            if json {
                serde_json::to_writer_pretty(&mut out, &ClaimReport::from(&device))?;
                writeln!(out)?;
            } else {
                write_claim_summary(&mut out, &device)?;
            }
            Ok(())
        }
        Err(error) => {
            if json {
                let reasons = match &error {
                    ClaimError::Refused { reasons, .. } => reasons.as_slice(),
                    ClaimError::Io { .. } => &[],
                };
                let report = RefusalReport {
                    path,
                    claimed: false,
                    error: error.to_string(),
                    reasons,
                };
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            }
            Err(error.into())
        }
    }
}

/// The JSON form of a failed claim.
#[derive(Debug, Serialize)]
struct RefusalReport<'a> {
    path: &'a Path,
    claimed: bool,
    error: String,
    #[serde(serialize_with = "discover::serialize_reasons")]
    reasons: &'a [RefuseReason],
}

/// The JSON form of a successful claim.
#[derive(Debug, Serialize)]
struct ClaimReport<'a> {
    path: &'a Path,
    claimed: bool,
    kind: &'a ClaimedKind,
    pool_uuid: Uuid,
    device_uuid: Uuid,
    size_bytes: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    direct_io: bool,
    newly_labelled: bool,
    #[serde(serialize_with = "discover::serialize_reasons")]
    overridden: &'a [RefuseReason],
    residual_signatures: &'a [Signature],
}

impl<'a> From<&'a ClaimedDevice> for ClaimReport<'a> {
    fn from(d: &'a ClaimedDevice) -> Self {
        Self {
            path: &d.path,
            claimed: true,
            kind: &d.kind,
            pool_uuid: d.label.pool_uuid,
            device_uuid: d.label.device_uuid,
            size_bytes: d.size_bytes,
            logical_block_size: d.logical_block_size,
            physical_block_size: d.physical_block_size,
            direct_io: d.direct_io,
            newly_labelled: d.newly_labelled,
            overridden: &d.overridden,
            residual_signatures: &d.residual_signatures,
        }
    }
}

fn write_claim_summary(out: &mut impl Write, d: &ClaimedDevice) -> io::Result<()> {
    writeln!(
        out,
        "claimed {} ({}) for pool {}: device {}, logical block {} B, {}",
        d.path.display(),
        human_size(d.size_bytes),
        d.label.pool_uuid,
        d.label.device_uuid,
        d.logical_block_size,
        if d.direct_io {
            "O_DIRECT"
        } else {
            "buffered IO (the filesystem refuses O_DIRECT)"
        },
    )?;
    for reason in &d.overridden {
        writeln!(out, "  overridden with --force: {reason}")?;
    }
    for sig in &d.residual_signatures {
        writeln!(
            out,
            "  warning: libblkid still finds a {} signature",
            sig.kind
        )?;
    }
    Ok(())
}

/// The `devices list` table: PATH SIZE MODEL SERIAL CLAIMABLE REASON.
#[must_use]
pub fn render_table(candidates: &[Candidate]) -> String {
    let header = ["PATH", "SIZE", "MODEL", "SERIAL", "CLAIMABLE", "REASON"].map(str::to_owned);
    let mut rows = vec![header];
    for c in candidates {
        let claimable = if c.claimable {
            "yes"
        } else if c.force_allowed {
            "force"
        } else {
            "no"
        };
        let reason = if c.reasons.is_empty() {
            "-".to_owned()
        } else {
            c.reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        rows.push([
            c.path.display().to_string(),
            human_size(c.size_bytes),
            c.model.clone().unwrap_or_else(|| "-".to_owned()),
            c.serial.clone().unwrap_or_else(|| "-".to_owned()),
            claimable.to_owned(),
            reason,
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Binary units, one decimal: `1.0 GiB`.
#[must_use]
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut divisor: u128 = 1;
    while unit + 1 < UNITS.len() && u128::from(bytes) >= divisor * 1024 {
        divisor *= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let tenths = u128::from(bytes) * 10 / divisor;
    format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
}
