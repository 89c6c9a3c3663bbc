//! Device discovery: which block devices and files could hold a pool, and, for each,
//! *why* it is or is not claimable ([`RefuseReason`]).
//!
//! Owns: the list of candidates ([`discover`]), the refusal rules shared with
//! [`super::claim`] (mounts, holders, partitions, signatures, labels, size), signature
//! probing through util-linux's `blkid -p` ([`Prober`]: libblkid's own probe, run in a
//! child process, so there is no hand-written magic table and no build-time `-dev`
//! package), and grouping devices by the pool label they carry ([`find_pools`]).
//!
//! Must never:
//! - open, probe or even `stat` a ublk export (`/dev/ublkb*`, `/dev/ublkc*`): those hold
//!   tenants' data (any signature can be forged there) and probing our own export from the
//!   daemon can deadlock it. Not even when named explicitly.
//! - open or probe dm, loop, md, zram, ram, sr, nbd or partition devices found by the scan;
//!   they are looked at only when named explicitly. Holders and partitions of a disk are
//!   known from sysfs alone.
//! - write anything. Listing opens a candidate read-only to read the coreblk label; the
//!   `blkid` child opens it read-only to probe.
//!
//! Start reading at [`discover`], then [`RefuseReason`].

use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use super::label::{self, Label, LabelCopy, LabelStatus, Uuid, MAX_LOGICAL_BLOCK_BYTES};
use super::sysfs::{self, BlockDev, DevNum, HostUsage, SysRoot};

/// Smallest device or file coreblk claims: the reserved head and tail (2 MiB) plus room
/// for metadata and at least a few clusters.
pub const MIN_DEVICE_BYTES: u64 = 64 << 20;

/// Longest a `blkid -p` child may run before the probe counts as failed.
pub const BLKID_TIMEOUT: Duration = Duration::from_secs(30);

/// Kernel name prefixes the scan skips (they are looked at only when named explicitly).
/// `ublkb`/`ublkc` are never looked at, see [`is_ublk_name`].
const SCAN_SKIPPED_PREFIXES: [&str; 10] = [
    "ublkb", "ublkc", "dm-", "loop", "md", "zram", "ram", "sr", "nbd", "fd",
];

/// Why a device cannot be claimed. `Display` is the predicate of a sentence that starts
/// with the device ("device /dev/sdb" + "has an ext4 filesystem"); [`Self::remedy`] says
/// what to do; [`Self::force_overrides`] says whether `--force` claims it anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum RefuseReason {
    /// The device, or one of its partitions, is mounted.
    #[error("is mounted at {} ({device})", mountpoint.display())]
    Mounted {
        /// Kernel name of the mounted device (the disk or a partition).
        device: String,
        /// Where.
        mountpoint: PathBuf,
    },
    /// The device, or one of its partitions, is an active swap area.
    #[error("is in use as swap ({device})")]
    ActiveSwap {
        /// Kernel name of the swap device.
        device: String,
    },
    /// The device, or one of its partitions, is part of a stacked device.
    #[error("is held by {} ({device} is part of a device-mapper, LVM, md or bcache device)", holders.join(", "))]
    HasHolders {
        /// Kernel name of the held device.
        device: String,
        /// The holders (`dm-0`, `md127`).
        holders: Vec<String>,
    },
    /// The disk has partitions (none of them mounted or held).
    #[error("has partitions {}", partitions.join(", "))]
    HasPartitions {
        /// Partition names.
        partitions: Vec<String>,
    },
    /// libblkid found a filesystem, RAID/LVM member, swap, crypto or partition-table
    /// signature.
    #[error("has {}", describe_signature(kind, usage.as_deref()))]
    Signature {
        /// libblkid's TYPE or PTTYPE (`ext4`, `LVM2_member`, `linux_raid_member`, `swap`,
        /// `gpt`).
        kind: String,
        /// libblkid's USAGE (`filesystem`, `raid`, `crypto`, `other`), or
        /// `partition table`.
        usage: Option<String>,
    },
    /// libblkid found several signatures that contradict each other.
    #[error("has several conflicting signatures (blkid -p reports an ambiguous result)")]
    AmbiguousSignature,
    /// A valid coreblk label of a pool other than the one claiming.
    #[error("carries the label of coreblk pool {pool_uuid}")]
    OtherPoolLabel {
        /// The pool named in the label.
        pool_uuid: Uuid,
    },
    /// Our label magic, but neither copy passes its checksum: unknown data.
    #[error("carries a damaged coreblk label (both copies fail their checksum)")]
    DamagedLabel,
    /// Smaller than [`MIN_DEVICE_BYTES`].
    #[error("is too small ({size_bytes} bytes; coreblk needs at least {} MiB)", min_bytes >> 20)]
    TooSmall {
        /// Its size.
        size_bytes: u64,
        /// The minimum.
        min_bytes: u64,
    },
    /// Someone else holds it exclusively (`O_EXCL` failed with EBUSY, or another
    /// coreblkd holds the file's OFD lock).
    #[error("is in use: {detail}")]
    InUse {
        /// Who holds it, as far as we can tell.
        detail: String,
    },
    /// A regular file that backs a loop device: writing it would corrupt whatever uses
    /// the loop device.
    #[error("backs loop device {device}")]
    LoopBacking {
        /// The loop device's kernel name.
        device: String,
    },
    /// A directory, char device, socket...
    #[error("is a {file_type}, not a block device or regular file")]
    NotBlockOrFile {
        /// What it is.
        file_type: String,
    },
    /// The path does not exist.
    #[error("does not exist")]
    NotFound,
    /// A ublk export (`/dev/ublkb*`).
    #[error(
        "is a ublk export device; ublk export devices hold tenant data; coreblk never claims or probes them"
    )]
    UblkDevice,
    /// The kernel or the file permissions say read-only.
    #[error("is read-only")]
    ReadOnly,
    /// A zoned device (ZNS, SMR).
    #[error("is a zoned ({model}) device; coreblk needs a conventional block device")]
    Zoned {
        /// `host-managed` or `host-aware`.
        model: String,
    },
    /// Logical block size outside 512..=4096 or not a power of two.
    #[error("has a {logical_block_size}-byte logical block size; coreblk supports 512 to 4096")]
    UnsupportedBlockSize {
        /// The size.
        logical_block_size: u32,
    },
    /// Something needed to judge the device could not be read or run (sysfs, mountinfo,
    /// the label, `blkid`). Never claimed blind.
    #[error("could not be checked: {error}")]
    CheckFailed {
        /// What failed.
        error: String,
    },
}

impl RefuseReason {
    /// Whether `--force` claims the device despite this reason. Force overwrites
    /// signatures, partition tables and labels; it never takes a device the host is using.
    #[must_use]
    pub fn force_overrides(&self) -> bool {
        matches!(
            self,
            Self::HasPartitions { .. }
                | Self::Signature { .. }
                | Self::AmbiguousSignature
                | Self::OtherPoolLabel { .. }
                | Self::DamagedLabel
        )
    }

    /// What the operator can do about it.
    #[must_use]
    pub fn remedy(&self) -> &'static str {
        match self {
            Self::Mounted { .. } => "unmount it first; --force never overrides a mount",
            Self::ActiveSwap { .. } => "swapoff it first; --force never overrides active swap",
            Self::HasHolders { .. } => {
                "remove the holders first (dmsetup remove, vgchange -an, mdadm --stop); --force never overrides a holder"
            }
            // One wording for everything --force overwrites, so a partitioned disk with a
            // partition-table signature gets one remedy, not two.
            Self::HasPartitions { .. }
            | Self::Signature { .. }
            | Self::AmbiguousSignature
            | Self::DamagedLabel => "use --force to overwrite",
            Self::OtherPoolLabel { .. } => {
                "use --force to take it from that pool (the pool loses its data on this device)"
            }
            Self::TooSmall { .. } => "use a larger device or file",
            Self::InUse { .. } => "stop whatever holds it first; --force never overrides this",
            Self::LoopBacking { .. } => {
                "detach the loop device first (losetup -d); --force never overrides this"
            }
            Self::NotBlockOrFile { .. } => "name a block device or a regular file",
            Self::NotFound => "check the path (coreblkd devices list shows the candidates)",
            Self::UblkDevice => "name the NVMe namespace or disk itself",
            Self::ReadOnly => {
                "make it writable (blockdev --setrw, the write-protect switch, or file permissions)"
            }
            Self::Zoned { .. } => "use a conventional (non-zoned) device",
            Self::UnsupportedBlockSize { .. } => {
                "format the namespace with a 512- or 4096-byte LBA format"
            }
            Self::CheckFailed { .. } => {
                "fix the problem and retry; coreblk does not claim a device it cannot check"
            }
        }
    }
}

fn describe_signature(kind: &str, usage: Option<&str>) -> String {
    let article = match kind.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'x') => "an",
        _ => "a",
    };
    match usage {
        Some("filesystem") => format!("{article} {kind} filesystem"),
        Some("raid") => format!("{article} {kind} RAID/volume-manager member signature"),
        Some("crypto") => format!("{article} {kind} encrypted-volume signature"),
        Some("partition table") => format!("{article} {kind} partition table"),
        _ => format!("{article} {kind} signature"),
    }
}

/// A signature libblkid found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signature {
    /// TYPE (`ext4`, `swap`, `LVM2_member`) or PTTYPE (`gpt`, `dos`).
    pub kind: String,
    /// USAGE, or `partition table` for a PTTYPE.
    pub usage: Option<String>,
    /// UUID or PTUUID.
    pub uuid: Option<String>,
    /// LABEL, when the signature has one.
    pub label: Option<String>,
}

impl Signature {
    fn reason(&self) -> RefuseReason {
        RefuseReason::Signature {
            kind: self.kind.clone(),
            usage: self.usage.clone(),
        }
    }
}

/// What one `blkid -p` run found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Every signature reported (usually zero or one, plus a partition table).
    pub signatures: Vec<Signature>,
    /// blkid exited 8: contradicting signatures.
    pub ambiguous: bool,
}

/// Why probing failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No `blkid` executable.
    #[error("blkid (util-linux) not found: apt-get install util-linux")]
    BlkidMissing,
    /// It could not be started.
    #[error("cannot run {}: {source}", blkid.display())]
    Spawn {
        /// The executable.
        blkid: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// It did not finish in time (a hung device?).
    #[error("blkid -p {} did not finish within {}s", path.display(), after.as_secs())]
    TimedOut {
        /// The probed path.
        path: PathBuf,
        /// The limit.
        after: Duration,
    },
    /// It failed.
    #[error("blkid -p {} failed (exit status {code:?}): {stderr}", path.display())]
    Failed {
        /// The probed path.
        path: PathBuf,
        /// Exit code; `None` when killed by a signal.
        code: Option<i32>,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Signature probing by running util-linux's `blkid` in low-level probe mode
/// (`blkid -p -o export`), which asks libblkid directly and bypasses its cache.
#[derive(Debug, Clone)]
pub struct Prober {
    blkid: Option<PathBuf>,
    timeout: Duration,
}

impl Prober {
    /// Finds `blkid` on `PATH` or in the sbin directories (daemons often run with a
    /// short `PATH`). A missing `blkid` is reported by every [`Prober::probe`] call.
    #[must_use]
    pub fn locate() -> Self {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
        let blkid = dirs
            .into_iter()
            .map(|d| d.join("blkid"))
            .find(|p| p.is_file());
        Self {
            blkid,
            timeout: BLKID_TIMEOUT,
        }
    }

    /// A prober that runs this executable (tests; a `blkid` outside the usual places).
    #[must_use]
    pub fn with_binary(blkid: PathBuf) -> Self {
        Self {
            blkid: Some(blkid),
            timeout: BLKID_TIMEOUT,
        }
    }

    /// Probes `path` for signatures. The caller must already have opened `path`
    /// successfully: blkid reports an unopenable path as "nothing found".
    ///
    /// # Errors
    /// blkid is missing, cannot run, times out or fails.
    pub fn probe(&self, path: &Path) -> Result<ProbeOutcome, ProbeError> {
        assert!(
            !is_ublk_path(path),
            "ublk exports are never probed: {}",
            path.display()
        );
        let blkid = self.blkid.as_ref().ok_or(ProbeError::BlkidMissing)?;
        let mut child = Command::new(blkid)
            .args(["-p", "-o", "export", "--"])
            .arg(path)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => ProbeError::BlkidMissing,
                _ => ProbeError::Spawn {
                    blkid: blkid.clone(),
                    source,
                },
            })?;
        let status =
            wait_with_deadline(&mut child, self.timeout).map_err(|source| ProbeError::Spawn {
                blkid: blkid.clone(),
                source,
            })?;
        let Some(status) = status else {
            let _ = child.kill();
            // A child stuck in uninterruptible IO cannot be reaped now; reap it later
            // instead of blocking the caller on a hung device.
            std::thread::spawn(move || child.wait());
            return Err(ProbeError::TimedOut {
                path: path.to_path_buf(),
                after: self.timeout,
            });
        };
        // blkid's output is a few hundred bytes: it fits in the pipe, so reading after
        // the exit cannot deadlock (a larger output shows up as a timeout instead).
        let stdout = read_pipe(child.stdout.take());
        let stderr = read_pipe(child.stderr.take());
        match status.code() {
            Some(0) => Ok(ProbeOutcome {
                signatures: parse_blkid_export(&stdout),
                ambiguous: false,
            }),
            Some(2) => Ok(ProbeOutcome::default()),
            Some(8) => Ok(ProbeOutcome {
                signatures: Vec::new(),
                ambiguous: true,
            }),
            code => Err(ProbeError::Failed {
                path: path.to_path_buf(),
                code,
                stderr: stderr.trim().to_owned(),
            }),
        }
    }
}

/// Waits for `child` until `timeout`; `Ok(None)` when it is still running then.
fn wait_with_deadline(
    child: &mut std::process::Child,
    timeout: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn read_pipe<R: io::Read>(pipe: Option<R>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        // A read error leaves what was read; blkid's exit status is what counts.
        let _ = pipe.read_to_string(&mut text);
    }
    text
}

/// Parses `blkid -o export` output (`KEY=value` lines) into signatures.
#[must_use]
pub fn parse_blkid_export(text: &str) -> Vec<Signature> {
    let get = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
    };
    let mut signatures = Vec::new();
    if let Some(kind) = get("TYPE") {
        signatures.push(Signature {
            kind,
            usage: get("USAGE"),
            uuid: get("UUID"),
            label: get("LABEL"),
        });
    }
    if let Some(kind) = get("PTTYPE") {
        signatures.push(Signature {
            kind,
            usage: Some("partition table".to_owned()),
            uuid: get("PTUUID"),
            label: None,
        });
    }
    signatures
}

/// What a candidate is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CandidateKind {
    /// An NVMe namespace (`nvmeXnY`).
    Nvme {
        /// Kernel name.
        name: String,
        /// Namespace id.
        nsid: u32,
        /// Controller firmware revision.
        firmware: Option<String>,
        /// `/dev/ngXnY`, for io_uring NVMe passthrough, when present.
        ng_path: Option<PathBuf>,
        /// Volatile write cache on (flushes matter).
        volatile_write_cache: Option<bool>,
    },
    /// Any other block device (SCSI/SATA/virtio disk, or an explicitly named dm, loop,
    /// md device or partition).
    Block {
        /// Kernel name.
        name: String,
        /// The whole disk, for a partition.
        parent: Option<String>,
    },
    /// A regular file (named explicitly).
    File,
    /// Not examined (missing, a ublk export) or not a device at all.
    Unknown,
}

/// One device or file and whether it can be claimed.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// Device node or file path.
    pub path: PathBuf,
    /// What it is, with kind-specific identity.
    pub kind: CandidateKind,
    /// Size.
    pub size_bytes: u64,
    /// Logical block size (the NVMe LBA size); 4096 for files.
    pub logical_block_size: u32,
    /// Physical block size.
    pub physical_block_size: u32,
    /// Spinning media, when the kernel says.
    pub rotational: Option<bool>,
    /// Model, when the device reports one.
    pub model: Option<String>,
    /// Serial number, when the device reports one.
    pub serial: Option<String>,
    /// The coreblk label it carries, if any.
    pub label: Option<Label>,
    /// The label copy that failed its checksum while the other is valid.
    pub label_damaged_copy: Option<LabelCopy>,
    /// What libblkid found (not probed when a coreblk label is present: behind a
    /// label lies tenant data, which may contain anything).
    pub signatures: Vec<Signature>,
    /// No reasons: a plain claim succeeds (barring a race).
    pub claimable: bool,
    /// Every reason is one `--force` overrides.
    pub force_allowed: bool,
    /// Why not, in the order found.
    #[serde(serialize_with = "serialize_reasons")]
    pub reasons: Vec<RefuseReason>,
}

impl Candidate {
    fn new(path: PathBuf, kind: CandidateKind) -> Self {
        Self {
            path,
            kind,
            size_bytes: 0,
            logical_block_size: 0,
            physical_block_size: 0,
            rotational: None,
            model: None,
            serial: None,
            label: None,
            label_damaged_copy: None,
            signatures: Vec::new(),
            claimable: false,
            force_allowed: false,
            reasons: Vec::new(),
        }
    }

    fn refused(path: PathBuf, kind: CandidateKind, reason: RefuseReason) -> Self {
        let mut candidate = Self::new(path, kind);
        candidate.reasons.push(reason);
        candidate.finish()
    }

    fn finish(mut self) -> Self {
        self.claimable = self.reasons.is_empty();
        self.force_allowed = self.reasons.iter().all(RefuseReason::force_overrides);
        self
    }
}

/// Serializes reasons as objects carrying the reason's fields plus `message`, `remedy`
/// and `force_overrides` (for `#[serde(serialize_with)]` wherever reasons reach JSON).
///
/// # Errors
/// The serializer fails.
pub fn serialize_reasons<S: Serializer>(reasons: &[RefuseReason], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Item<'a> {
        #[serde(flatten)]
        reason: &'a RefuseReason,
        message: String,
        remedy: &'static str,
        force_overrides: bool,
    }
    s.collect_seq(reasons.iter().map(|reason| Item {
        reason,
        message: reason.to_string(),
        remedy: reason.remedy(),
        force_overrides: reason.force_overrides(),
    }))
}

/// Whether a kernel device name is a ublk export or its control char device.
#[must_use]
pub fn is_ublk_name(name: &str) -> bool {
    name.starts_with("ublkb") || name.starts_with("ublkc")
}

/// Whether a path's last component names a ublk device. Checked on the path as given,
/// before anything touches it.
#[must_use]
pub fn is_ublk_path(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(is_ublk_name)
}

/// Whether the scan of `/sys/block` skips this name (it is examined only when named).
#[must_use]
pub fn skipped_in_scan(name: &str) -> bool {
    SCAN_SKIPPED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Lists candidates: every disk in `/sys/block` that the scan does not skip, then each
/// `explicit` path not already listed. Probes with the `blkid` found on this host.
#[must_use]
pub fn discover(root: &SysRoot, explicit: &[PathBuf]) -> Vec<Candidate> {
    discover_with(root, explicit, &Prober::locate())
}

/// [`discover`] with a given prober.
#[must_use]
pub fn discover_with(root: &SysRoot, explicit: &[PathBuf], prober: &Prober) -> Vec<Candidate> {
    let usage = HostUsage::read(root).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            root.proc_.join("self/mountinfo").display()
        )
    });
    let mut out = Vec::new();
    match sysfs::block_names(root) {
        Ok(names) => {
            for name in names.iter().filter(|n| !skipped_in_scan(n)) {
                if let Some(candidate) = scan_one(root, name, &usage, prober) {
                    out.push(candidate);
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, sys = %root.sys.display(), "cannot list block devices")
        }
    }
    for path in explicit {
        if !out.iter().any(|c| same_path(&c.path, path)) {
            out.push(assess_path(root, path, &usage, prober));
        }
    }
    out
}

fn scan_one(
    root: &SysRoot,
    name: &str,
    usage: &Result<HostUsage, String>,
    prober: &Prober,
) -> Option<Candidate> {
    match sysfs::block_dev(root, name) {
        Ok(Some(dev)) if !dev.hidden => {
            Some(assess_block(&root.dev_path(name), &dev, usage, prober))
        }
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(%error, device = name, "cannot read sysfs");
            Some(Candidate::refused(
                root.dev_path(name),
                CandidateKind::Block {
                    name: name.to_owned(),
                    parent: None,
                },
                RefuseReason::CheckFailed {
                    error: format!("cannot read sysfs: {error}"),
                },
            ))
        }
    }
}

/// Whether `explicit` names the listed path `listed` (directly or through symlinks).
fn same_path(listed: &Path, explicit: &Path) -> bool {
    if listed == explicit {
        return true;
    }
    if is_ublk_path(explicit) {
        return false;
    }
    // Resolving symlinks reads links only; nothing is opened.
    fs::canonicalize(explicit).is_ok_and(|p| p == listed)
}

/// Assesses one explicitly named path (any kind, including dm/loop/md and partitions;
/// never a ublk export).
fn assess_path(
    root: &SysRoot,
    path: &Path,
    usage: &Result<HostUsage, String>,
    prober: &Prober,
) -> Candidate {
    let refused = |reason| Candidate::refused(path.to_path_buf(), CandidateKind::Unknown, reason);
    if is_ublk_path(path) {
        return refused(RefuseReason::UblkDevice);
    }
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return refused(RefuseReason::NotFound),
        Err(e) => {
            return refused(RefuseReason::CheckFailed {
                error: e.to_string(),
            })
        }
    };
    match classify(root, path, &meta) {
        Ok(Node::Block(dev)) => assess_block(path, &dev, usage, prober),
        Ok(Node::File) => assess_file(root, path, &meta, usage, prober),
        Err(reason) => refused(reason),
    }
}

/// What an explicitly named path is.
pub(crate) enum Node {
    /// A block device, as sysfs describes it.
    Block(Box<BlockDev>),
    /// A regular file.
    File,
}

/// Classifies a path from its metadata; the error is the refusal.
pub(crate) fn classify(root: &SysRoot, path: &Path, meta: &Metadata) -> Result<Node, RefuseReason> {
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok(Node::File);
    }
    if !file_type.is_block_device() {
        return Err(RefuseReason::NotBlockOrFile {
            file_type: describe_file_type(meta).to_owned(),
        });
    }
    let devnum = DevNum::from_rdev(meta.rdev());
    let name = sysfs::name_for_devnum(root, devnum)
        .or_else(|| {
            fs::canonicalize(path)
                .ok()?
                .file_name()?
                .to_str()
                .map(str::to_owned)
        })
        .ok_or_else(|| RefuseReason::CheckFailed {
            error: format!("block device {devnum} is not in sysfs"),
        })?;
    if is_ublk_name(&name) {
        return Err(RefuseReason::UblkDevice);
    }
    match sysfs::block_dev(root, &name) {
        Ok(Some(dev)) => Ok(Node::Block(Box::new(dev))),
        Ok(None) => Err(RefuseReason::CheckFailed {
            error: format!("block device {name} ({devnum}) is not in sysfs"),
        }),
        Err(e) => Err(RefuseReason::CheckFailed {
            error: format!("cannot read sysfs for {name}: {e}"),
        }),
    }
}

fn describe_file_type(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

fn assess_block(
    path: &Path,
    dev: &BlockDev,
    usage: &Result<HostUsage, String>,
    prober: &Prober,
) -> Candidate {
    let kind = match &dev.nvme {
        Some(nvme) => CandidateKind::Nvme {
            name: dev.name.clone(),
            nsid: nvme.nsid,
            firmware: nvme.firmware.clone(),
            ng_path: nvme.ng_path.clone(),
            volatile_write_cache: nvme.volatile_write_cache,
        },
        None => CandidateKind::Block {
            name: dev.name.clone(),
            parent: dev.parent.clone(),
        },
    };
    let mut candidate = Candidate::new(path.to_path_buf(), kind);
    candidate.size_bytes = dev.size_bytes;
    candidate.logical_block_size = dev.logical_block_size;
    candidate.physical_block_size = dev.physical_block_size;
    candidate.rotational = dev.rotational;
    candidate.model = dev.model.clone();
    candidate.serial = dev.serial.clone();
    match usage {
        Ok(usage) => candidate.reasons = sysfs_refusals(dev, usage),
        Err(error) => candidate.reasons.push(RefuseReason::CheckFailed {
            error: error.clone(),
        }),
    }
    examine_if_needed(&mut candidate, prober);
    candidate.finish()
}

fn assess_file(
    root: &SysRoot,
    path: &Path,
    meta: &Metadata,
    usage: &Result<HostUsage, String>,
    prober: &Prober,
) -> Candidate {
    let mut candidate = Candidate::new(path.to_path_buf(), CandidateKind::File);
    candidate.size_bytes = meta.len();
    candidate.logical_block_size = FILE_BLOCK_BYTES;
    candidate.physical_block_size = FILE_BLOCK_BYTES;
    candidate.reasons = file_refusals(root, path, usage);
    candidate.reasons.extend(too_small(meta.len()));
    examine_if_needed(&mut candidate, prober);
    candidate.finish()
}

/// Opens and probes a candidate only when its content can still matter: when every
/// reason found so far is one `--force` overrides. A mounted, held, too small or empty
/// device is refused whatever it holds, so listing leaves it unopened.
fn examine_if_needed(candidate: &mut Candidate, prober: &Prober) {
    if candidate.reasons.iter().all(RefuseReason::force_overrides) {
        examine_content(candidate, prober);
    }
}

/// The block size coreblk uses on a regular file (safe for `O_DIRECT` on any filesystem
/// with blocks up to 4 KiB).
pub const FILE_BLOCK_BYTES: u32 = 4096;

/// Reads the label and, when there is none, probes signatures; records both.
fn examine_content(candidate: &mut Candidate, prober: &Prober) {
    let opened = open_device(&candidate.path, false, false);
    let content = match opened {
        Ok((file, _direct)) => examine(&file, candidate.size_bytes, &candidate.path, prober),
        Err(error) => Content::failed(format!("cannot open it read-only: {error}")),
    };
    candidate.label = content.label;
    candidate.label_damaged_copy = content.label_damaged_copy;
    candidate.signatures = content.signatures;
    candidate.reasons.extend(content.reasons);
}

/// The refusals sysfs and mountinfo alone establish for a block device.
#[must_use]
pub fn sysfs_refusals(dev: &BlockDev, usage: &HostUsage) -> Vec<RefuseReason> {
    let mut reasons = Vec::new();
    for d in std::iter::once(dev).chain(&dev.partitions) {
        for mountpoint in usage.mountpoints_of(d) {
            reasons.push(RefuseReason::Mounted {
                device: d.name.clone(),
                mountpoint,
            });
        }
        if usage.is_swap(d) {
            reasons.push(RefuseReason::ActiveSwap {
                device: d.name.clone(),
            });
        }
        if !d.holders.is_empty() {
            reasons.push(RefuseReason::HasHolders {
                device: d.name.clone(),
                holders: d.holders.clone(),
            });
        }
    }
    if !dev.partitions.is_empty() {
        reasons.push(RefuseReason::HasPartitions {
            partitions: dev.partitions.iter().map(|p| p.name.clone()).collect(),
        });
    }
    if dev.read_only {
        reasons.push(RefuseReason::ReadOnly);
    }
    if let Some(model) = &dev.zoned {
        reasons.push(RefuseReason::Zoned {
            model: model.clone(),
        });
    }
    let lbs = dev.logical_block_size;
    if !(512..=MAX_LOGICAL_BLOCK_BYTES).contains(&lbs) || !lbs.is_power_of_two() {
        reasons.push(RefuseReason::UnsupportedBlockSize {
            logical_block_size: lbs,
        });
    }
    reasons.extend(too_small(dev.size_bytes));
    reasons
}

/// The refusals for a regular file that the host's state establishes: it is an active
/// swap file, or it backs a loop device.
#[must_use]
pub fn file_refusals(
    root: &SysRoot,
    path: &Path,
    usage: &Result<HostUsage, String>,
) -> Vec<RefuseReason> {
    let mut reasons = Vec::new();
    let Ok(canonical) = fs::canonicalize(path) else {
        return reasons;
    };
    match usage {
        Ok(usage) if usage.swaps.contains(&canonical) => {
            reasons.push(RefuseReason::ActiveSwap {
                device: canonical.display().to_string(),
            });
        }
        Ok(_) => {}
        Err(error) => reasons.push(RefuseReason::CheckFailed {
            error: error.clone(),
        }),
    }
    for (device, backing) in sysfs::loop_backing_files(root) {
        if backing == canonical {
            reasons.push(RefuseReason::LoopBacking { device });
        }
    }
    reasons
}

/// `TooSmall` when under [`MIN_DEVICE_BYTES`].
#[must_use]
pub fn too_small(size_bytes: u64) -> Option<RefuseReason> {
    (size_bytes < MIN_DEVICE_BYTES).then_some(RefuseReason::TooSmall {
        size_bytes,
        min_bytes: MIN_DEVICE_BYTES,
    })
}

/// What the first and last blocks of a device say.
#[derive(Debug, Default)]
pub(crate) struct Content {
    pub(crate) label: Option<Label>,
    pub(crate) label_damaged_copy: Option<LabelCopy>,
    pub(crate) signatures: Vec<Signature>,
    pub(crate) reasons: Vec<RefuseReason>,
}

impl Content {
    fn failed(error: String) -> Self {
        Self {
            reasons: vec![RefuseReason::CheckFailed { error }],
            ..Self::default()
        }
    }
}

/// Reads our label from an open device and, only when there is none, asks libblkid.
/// A valid label yields `OtherPoolLabel`; the claimer drops it when the pool is its own.
pub(crate) fn examine(file: &File, size_bytes: u64, path: &Path, prober: &Prober) -> Content {
    match label::read_from(file, size_bytes) {
        Err(error) => Content::failed(format!("cannot read the label area: {error}")),
        Ok(LabelStatus::Valid { label, damaged }) => Content {
            label: Some(label),
            label_damaged_copy: damaged,
            signatures: Vec::new(),
            reasons: vec![RefuseReason::OtherPoolLabel {
                pool_uuid: label.pool_uuid,
            }],
        },
        Ok(LabelStatus::Damaged) => Content {
            reasons: vec![RefuseReason::DamagedLabel],
            ..Content::default()
        },
        Ok(LabelStatus::Absent) => match prober.probe(path) {
            Ok(outcome) => {
                let mut reasons: Vec<_> =
                    outcome.signatures.iter().map(Signature::reason).collect();
                if outcome.ambiguous {
                    reasons.push(RefuseReason::AmbiguousSignature);
                }
                Content {
                    signatures: outcome.signatures,
                    reasons,
                    ..Content::default()
                }
            }
            Err(error) => Content::failed(error.to_string()),
        },
    }
}

/// Opens a device or file, `O_DIRECT` when the filesystem allows it (tmpfs may refuse
/// with EINVAL; then buffered). Returns the file and whether it is `O_DIRECT`.
/// `exclusive` adds `O_EXCL`, which on a block device fails with EBUSY while anyone
/// else (a mount, a holder, another coreblkd) holds it exclusively.
pub(crate) fn open_device(
    path: &Path,
    writable: bool,
    exclusive: bool,
) -> io::Result<(File, bool)> {
    assert!(
        !is_ublk_path(path),
        "ublk exports are never opened: {}",
        path.display()
    );
    let open = |direct: bool| {
        let mut flags = 0;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if exclusive {
            flags |= libc::O_EXCL;
        }
        fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(flags)
            .open(path)
    };
    match open(true) {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(false).map(|f| (f, false)),
        Err(e) => Err(e),
    }
}

/// The devices of one pool, as found by their labels.
#[derive(Debug, Clone, Serialize)]
pub struct PoolDevices {
    /// The pool.
    pub pool_uuid: Uuid,
    /// Its devices (each carries a valid label naming the pool).
    pub devices: Vec<Candidate>,
}

/// Groups candidates by the pool named in their label; sorted by pool uuid.
#[must_use]
pub fn pools_in(candidates: &[Candidate]) -> Vec<PoolDevices> {
    let mut pools: Vec<PoolDevices> = Vec::new();
    for candidate in candidates {
        let Some(label) = candidate.label else {
            continue;
        };
        match pools.iter_mut().find(|p| p.pool_uuid == label.pool_uuid) {
            Some(pool) => pool.devices.push(candidate.clone()),
            None => pools.push(PoolDevices {
                pool_uuid: label.pool_uuid,
                devices: vec![candidate.clone()],
            }),
        }
    }
    pools.sort_by_key(|p| p.pool_uuid);
    pools
}

/// What a restarting daemon runs: discover (plus the configured `explicit` paths, e.g.
/// pool files) and group labelled devices by pool.
#[must_use]
pub fn find_pools(root: &SysRoot, explicit: &[PathBuf]) -> Vec<PoolDevices> {
    pools_in(&discover(root, explicit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::sysfs::fake::FakeHost;

    const GIB: u64 = 1 << 30;

    fn names(candidates: &[Candidate]) -> Vec<String> {
        candidates
            .iter()
            .map(|c| {
                c.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect()
    }

    fn find<'a>(candidates: &'a [Candidate], name: &str) -> &'a Candidate {
        candidates
            .iter()
            .find(|c| c.path.file_name().and_then(|n| n.to_str()) == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed"))
    }

    /// A host with an NVMe namespace, a partitioned disk, a held disk, a mounted disk and
    /// the devices the scan must skip. Only nvme0n1 and vdd get device nodes, so any other
    /// device the code tried to examine would show up as a "cannot open" refusal.
    fn fake_host() -> FakeHost {
        let host = FakeHost::new();
        let nvme = host.disk(
            "nvme0n1",
            DevNum {
                major: 259,
                minor: 0,
            },
            GIB,
        );
        host.write(&nvme.join("device/model"), "QEMU NVMe Ctrl\n");
        host.write(&nvme.join("device/serial"), "deadbeef\n");
        host.write(&nvme.join("device/firmware_rev"), "8.2.2\n");
        host.write(&nvme.join("queue/write_cache"), "write through\n");
        host.dev_node("nvme0n1", GIB);

        host.disk(
            "vda",
            DevNum {
                major: 253,
                minor: 0,
            },
            8 * GIB,
        );
        host.partition(
            "vda",
            "vda1",
            DevNum {
                major: 253,
                minor: 1,
            },
            GIB,
        );
        host.partition(
            "vda",
            "vda2",
            DevNum {
                major: 253,
                minor: 2,
            },
            GIB,
        );

        let vdb = host.disk(
            "vdb",
            DevNum {
                major: 253,
                minor: 16,
            },
            8 * GIB,
        );
        host.holder(&vdb, "dm-0");

        host.disk(
            "vdc",
            DevNum {
                major: 253,
                minor: 32,
            },
            8 * GIB,
        );
        host.set_mountinfo("29 1 253:32 / /srv rw,relatime shared:1 - xfs /dev/vdc rw\n");

        host.disk(
            "vdd",
            DevNum {
                major: 253,
                minor: 48,
            },
            GIB,
        );
        host.dev_node("vdd", GIB);

        for (name, major) in [
            ("ublkb0", 250),
            ("dm-0", 252),
            ("loop0", 7),
            ("md127", 9),
            ("zram0", 251),
            ("sr0", 11),
        ] {
            host.disk(name, DevNum { major, minor: 0 }, GIB);
        }
        let hidden = host.disk(
            "nvme0c0n1",
            DevNum {
                major: 259,
                minor: 1,
            },
            GIB,
        );
        host.write(&hidden.join("hidden"), "1\n");
        host
    }

    #[test]
    fn scan_lists_disks_and_says_why() {
        let host = fake_host();
        let found = discover(&host.root, &[]);
        assert_eq!(names(&found), ["nvme0n1", "vda", "vdb", "vdc", "vdd"]);

        let nvme = find(&found, "nvme0n1");
        assert!(nvme.claimable, "{:?}", nvme.reasons);
        assert_eq!(nvme.model.as_deref(), Some("QEMU NVMe Ctrl"));
        assert_eq!(nvme.serial.as_deref(), Some("deadbeef"));
        assert_eq!(nvme.size_bytes, GIB);
        assert_eq!(
            nvme.kind,
            CandidateKind::Nvme {
                name: "nvme0n1".into(),
                nsid: 1,
                firmware: Some("8.2.2".into()),
                ng_path: None,
                volatile_write_cache: Some(false),
            }
        );

        let vda = find(&found, "vda");
        assert!(!vda.claimable);
        assert!(vda.reasons.contains(&RefuseReason::HasPartitions {
            partitions: vec!["vda1".into(), "vda2".into()]
        }));

        let vdb = find(&found, "vdb");
        assert!(vdb.reasons.contains(&RefuseReason::HasHolders {
            device: "vdb".into(),
            holders: vec!["dm-0".into()]
        }));
        assert!(!vdb.force_allowed);

        let vdc = find(&found, "vdc");
        assert!(vdc.reasons.contains(&RefuseReason::Mounted {
            device: "vdc".into(),
            mountpoint: "/srv".into()
        }));
        assert!(!vdc.force_allowed);

        assert!(find(&found, "vdd").claimable);
    }

    #[test]
    fn a_mounted_or_held_partition_refuses_the_disk_even_with_force() {
        let host = FakeHost::new();
        let sda = host.disk("sda", DevNum { major: 8, minor: 0 }, 8 * GIB);
        host.partition("sda", "sda1", DevNum { major: 8, minor: 1 }, GIB);
        host.partition("sda", "sda2", DevNum { major: 8, minor: 2 }, GIB);
        host.holder(&sda.join("sda2"), "md0");
        host.set_mountinfo("22 1 0:33 / /home rw - btrfs /dev/sda1 rw\n");
        host.write(
            &host.root.proc_.join("swaps"),
            "Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n",
        );
        host.dev_node("sda", 8 * GIB);
        let found = discover(&host.root, &[]);
        let sda = find(&found, "sda");
        assert_eq!(
            sda.reasons[..3],
            [
                RefuseReason::Mounted {
                    device: "sda1".into(),
                    mountpoint: "/home".into()
                },
                RefuseReason::ActiveSwap {
                    device: "sda2".into()
                },
                RefuseReason::HasHolders {
                    device: "sda2".into(),
                    holders: vec!["md0".into()]
                },
            ]
        );
        assert!(!sda.force_allowed);
    }

    #[test]
    fn skipped_devices_are_examined_only_when_named_and_ublk_never() {
        let host = fake_host();
        host.dev_node("loop0", GIB);
        let ublk = host.root.dev_path("ublkb0");
        let found = discover(&host.root, &[host.root.dev_path("loop0"), ublk.clone()]);
        // loop0 is a regular file in the fake /dev, so it is assessed as a file.
        let loop0 = find(&found, "loop0");
        assert_eq!(loop0.kind, CandidateKind::File);
        assert!(loop0.claimable, "{:?}", loop0.reasons);
        let ublk = find(&found, "ublkb0");
        assert_eq!(ublk.reasons, [RefuseReason::UblkDevice]);
        assert!(!ublk.force_allowed);
        assert!(ublk.reasons[0]
            .to_string()
            .contains("coreblk never claims or probes them"));
    }

    #[test]
    fn explicit_paths_report_missing_directories_and_small_files() {
        let host = FakeHost::new();
        let dir = host.dir.path();
        let small = dir.join("small.img");
        fs::File::create(&small)
            .expect("create")
            .set_len(1 << 20)
            .expect("set_len");
        let found = discover(
            &host.root,
            &[dir.join("missing.img"), dir.to_path_buf(), small.clone()],
        );
        assert_eq!(found[0].reasons, [RefuseReason::NotFound]);
        assert_eq!(
            found[1].reasons,
            [RefuseReason::NotBlockOrFile {
                file_type: "directory".into()
            }]
        );
        assert_eq!(
            found[2].reasons,
            [RefuseReason::TooSmall {
                size_bytes: 1 << 20,
                min_bytes: MIN_DEVICE_BYTES
            }]
        );
    }

    #[test]
    fn missing_blkid_refuses_even_a_blank_device() {
        let host = fake_host();
        let prober = Prober::with_binary(host.dir.path().join("no-such-blkid"));
        let found = discover_with(&host.root, &[], &prober);
        let nvme = find(&found, "nvme0n1");
        assert!(!nvme.force_allowed);
        let message = nvme.reasons[0].to_string();
        assert!(
            message.contains("blkid (util-linux) not found"),
            "{message}"
        );
    }

    #[test]
    fn unreadable_mountinfo_refuses_every_disk() {
        let host = fake_host();
        fs::remove_file(host.root.proc_.join("self/mountinfo")).expect("rm");
        let found = discover(&host.root, &[]);
        assert!(found.iter().all(|c| !c.claimable && !c.force_allowed));
    }

    #[test]
    fn labelled_devices_group_into_pools() {
        let host = fake_host();
        let pool = Uuid([7; 16]);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(host.root.dev_path("vdd"))
            .expect("open");
        label::write_to(&file, GIB, &Label::new(pool, Uuid([8; 16]), GIB)).expect("label");
        let found = discover(&host.root, &[]);
        let vdd = find(&found, "vdd");
        assert_eq!(
            vdd.reasons,
            [RefuseReason::OtherPoolLabel { pool_uuid: pool }]
        );
        assert!(vdd.force_allowed);
        assert!(vdd.signatures.is_empty());
        let pools = pools_in(&found);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].pool_uuid, pool);
        assert_eq!(names(&pools[0].devices), ["vdd"]);
    }

    #[test]
    fn json_carries_messages_and_kinds() {
        let host = fake_host();
        let found = discover(&host.root, &[]);
        let json = serde_json::to_value(&found).expect("json");
        let vdc = &json[3];
        assert_eq!(vdc["kind"]["type"], "block");
        assert_eq!(vdc["reasons"][0]["code"], "mounted");
        assert_eq!(vdc["reasons"][0]["mountpoint"], "/srv");
        assert_eq!(vdc["reasons"][0]["force_overrides"], false);
        assert_eq!(vdc["reasons"][0]["message"], "is mounted at /srv (vdc)");
        assert_eq!(json[0]["kind"]["type"], "nvme");
        assert_eq!(json[0]["kind"]["nsid"], 1);
    }

    #[test]
    fn blkid_export_parsing() {
        let text = "DEVNAME=/dev/sdb\nUUID=1234\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\nPTTYPE=gpt\nPTUUID=abcd\n";
        let sigs = parse_blkid_export(text);
        assert_eq!(sigs.len(), 2);
        assert_eq!(sigs[0].kind, "ext4");
        assert_eq!(sigs[0].usage.as_deref(), Some("filesystem"));
        assert_eq!(sigs[1].kind, "gpt");
        assert_eq!(sigs[1].reason().to_string(), "has a gpt partition table");
        assert_eq!(sigs[0].reason().to_string(), "has an ext4 filesystem");
        assert!(parse_blkid_export("DEVNAME=x\n").is_empty());
    }
}
