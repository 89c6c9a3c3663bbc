//! Read-only view of the kernel's block-device state: `/sys/block` (disks, partitions,
//! holders, queue limits, NVMe identity), `/proc/self/mountinfo` and `/proc/swaps`.
//!
//! Owns: parsing those files under an injectable [`SysRoot`], so tests run against a fake
//! tree in a temporary directory.
//!
//! Must never: open a device node (only sysfs/procfs attribute files are read; `/dev` is
//! looked at with `lstat` alone), write anything, or decide policy — whether a device may
//! be claimed is [`super::discover`]'s business.
//!
//! Start reading at [`block_dev`] and [`HostUsage::read`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Where the kernel's state is read from. [`SysRoot::host`] in production; tests point
/// the three roots at a fake tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysRoot {
    /// sysfs mount point (`/sys`).
    pub sys: PathBuf,
    /// procfs mount point (`/proc`).
    pub proc_: PathBuf,
    /// Device node directory (`/dev`); only ever `lstat`ed here.
    pub dev: PathBuf,
}

impl SysRoot {
    /// The running host: `/sys`, `/proc`, `/dev`.
    #[must_use]
    pub fn host() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc_: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }

    /// A fake tree: `base/sys`, `base/proc`, `base/dev`.
    #[must_use]
    pub fn under(base: &Path) -> Self {
        Self {
            sys: base.join("sys"),
            proc_: base.join("proc"),
            dev: base.join("dev"),
        }
    }

    /// The device node path for a kernel block device name (`nvme0n1` → `/dev/nvme0n1`).
    #[must_use]
    pub fn dev_path(&self, name: &str) -> PathBuf {
        self.dev.join(name)
    }

    fn sys_block(&self) -> PathBuf {
        self.sys.join("block")
    }
}

/// A device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DevNum {
    /// Major number (driver).
    pub major: u32,
    /// Minor number (instance).
    pub minor: u32,
}

impl DevNum {
    /// Parses the `MAJ:MIN` form used by sysfs `dev` files and mountinfo.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }

    /// From `st_rdev` of a device node.
    #[must_use]
    pub fn from_rdev(rdev: u64) -> Self {
        Self {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// NVMe namespace identity, from sysfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvmeIdentity {
    /// Namespace id (`nsid` attribute, else parsed from the name).
    pub nsid: u32,
    /// Controller firmware revision (`device/firmware_rev`).
    pub firmware: Option<String>,
    /// The namespace's generic char device (`/dev/ngXnY`) when it exists.
    pub ng_path: Option<PathBuf>,
    /// Whether a volatile write cache is on (`queue/write_cache` is `write back`).
    pub volatile_write_cache: Option<bool>,
}

/// One block device (whole disk or partition) as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`nvme0n1`, `sda1`).
    pub name: String,
    /// Its sysfs directory.
    pub sys_dir: PathBuf,
    /// For a partition, the whole disk's name.
    pub parent: Option<String>,
    /// `major:minor`, when sysfs has a `dev` file.
    pub devnum: Option<DevNum>,
    /// Size (`size` × 512).
    pub size_bytes: u64,
    /// `queue/logical_block_size` (of the parent for a partition); 512 when absent.
    pub logical_block_size: u32,
    /// `queue/physical_block_size`; the logical size when absent.
    pub physical_block_size: u32,
    /// `queue/rotational`.
    pub rotational: Option<bool>,
    /// `ro`.
    pub read_only: bool,
    /// `queue/zoned` when not `none` (`host-managed`, `host-aware`).
    pub zoned: Option<String>,
    /// `hidden` (NVMe multipath per-path devices).
    pub hidden: bool,
    /// `device/model` (or `device/vendor` + model for SCSI-like devices).
    pub model: Option<String>,
    /// `device/serial`, or `serial` (virtio).
    pub serial: Option<String>,
    /// Set for NVMe namespaces (`nvmeXnY`).
    pub nvme: Option<NvmeIdentity>,
    /// Names in `holders/` (dm, md, bcache...).
    pub holders: Vec<String>,
    /// Partitions of a whole disk (empty for a partition).
    pub partitions: Vec<BlockDev>,
}

/// The sorted names in `/sys/block` (whole disks only; partitions live below them).
///
/// # Errors
/// `/sys/block` cannot be read.
pub fn block_names(root: &SysRoot) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(root.sys_block())? {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Looks a device up by kernel name: a whole disk in `/sys/block`, or a partition below
/// one. `Ok(None)` when sysfs does not know the name.
///
/// # Errors
/// A sysfs directory exists but cannot be read.
pub fn block_dev(root: &SysRoot, name: &str) -> io::Result<Option<BlockDev>> {
    if !is_plain_name(name) {
        return Ok(None);
    }
    let disk_dir = root.sys_block().join(name);
    if disk_dir.is_dir() {
        return whole_disk(root, name, &disk_dir).map(Some);
    }
    for disk in block_names(root)? {
        let part_dir = root.sys_block().join(&disk).join(name);
        if part_dir.join("partition").is_file() {
            let disk_dir = root.sys_block().join(&disk);
            return partition(&disk_dir, &disk, name).map(Some);
        }
    }
    Ok(None)
}

/// The kernel name behind a device number, from the `/sys/dev/block/MAJ:MIN` link.
#[must_use]
pub fn name_for_devnum(root: &SysRoot, devnum: DevNum) -> Option<String> {
    let link = root.sys.join("dev/block").join(devnum.to_string());
    let target = fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

/// Loop devices and the files behind them (`/sys/block/loopN/loop/backing_file`), read
/// from sysfs without opening any loop device.
#[must_use]
pub fn loop_backing_files(root: &SysRoot) -> Vec<(String, PathBuf)> {
    let Ok(names) = block_names(root) else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter(|n| n.starts_with("loop"))
        .filter_map(|n| {
            let backing = read_attr(&root.sys_block().join(&n).join("loop/backing_file"))?;
            Some((n, PathBuf::from(backing)))
        })
        .collect()
}

/// The namespace id encoded in an NVMe namespace name (`nvme0n3` → 3); `None` for
/// anything else, including per-path multipath devices (`nvme0c1n3`) and partitions.
#[must_use]
pub fn nvme_nsid_from_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("nvme")?;
    let (ctrl, ns) = rest.split_once('n')?;
    if ctrl.is_empty() || !ctrl.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if ns.is_empty() || !ns.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ns.parse().ok()
}

fn whole_disk(root: &SysRoot, name: &str, dir: &Path) -> io::Result<BlockDev> {
    let logical_block_size = read_u32(&dir.join("queue/logical_block_size")).unwrap_or(512);
    let mut dev = BlockDev {
        name: name.to_owned(),
        sys_dir: dir.to_path_buf(),
        parent: None,
        devnum: read_attr(&dir.join("dev")).and_then(|t| DevNum::parse(&t)),
        size_bytes: read_size_bytes(dir),
        logical_block_size,
        physical_block_size: read_u32(&dir.join("queue/physical_block_size"))
            .unwrap_or(logical_block_size),
        rotational: read_attr(&dir.join("queue/rotational")).map(|v| v == "1"),
        read_only: read_attr(&dir.join("ro")).is_some_and(|v| v == "1"),
        zoned: read_attr(&dir.join("queue/zoned")).filter(|z| z != "none"),
        hidden: read_attr(&dir.join("hidden")).is_some_and(|v| v == "1"),
        model: model_of(dir),
        serial: read_attr(&dir.join("device/serial")).or_else(|| read_attr(&dir.join("serial"))),
        nvme: None,
        holders: list_dir_names(&dir.join("holders"))?,
        partitions: Vec::new(),
    };
    dev.nvme = nvme_identity(root, name, dir);
    for entry in list_dir_names(dir)? {
        if dir.join(&entry).join("partition").is_file() {
            dev.partitions.push(partition(dir, name, &entry)?);
        }
    }
    Ok(dev)
}

fn partition(disk_dir: &Path, disk: &str, name: &str) -> io::Result<BlockDev> {
    let dir = disk_dir.join(name);
    let logical_block_size = read_u32(&disk_dir.join("queue/logical_block_size")).unwrap_or(512);
    Ok(BlockDev {
        name: name.to_owned(),
        sys_dir: dir.clone(),
        parent: Some(disk.to_owned()),
        devnum: read_attr(&dir.join("dev")).and_then(|t| DevNum::parse(&t)),
        size_bytes: read_size_bytes(&dir),
        logical_block_size,
        physical_block_size: read_u32(&disk_dir.join("queue/physical_block_size"))
            .unwrap_or(logical_block_size),
        rotational: read_attr(&disk_dir.join("queue/rotational")).map(|v| v == "1"),
        read_only: read_attr(&dir.join("ro")).is_some_and(|v| v == "1"),
        zoned: read_attr(&disk_dir.join("queue/zoned")).filter(|z| z != "none"),
        hidden: false,
        model: model_of(disk_dir),
        serial: read_attr(&disk_dir.join("device/serial"))
            .or_else(|| read_attr(&disk_dir.join("serial"))),
        nvme: None,
        holders: list_dir_names(&dir.join("holders"))?,
        partitions: Vec::new(),
    })
}

fn nvme_identity(root: &SysRoot, name: &str, dir: &Path) -> Option<NvmeIdentity> {
    let nsid_from_name = nvme_nsid_from_name(name)?;
    let nsid = read_u32(&dir.join("nsid")).unwrap_or(nsid_from_name);
    let ng_name = format!("ng{}", name.strip_prefix("nvme")?);
    let ng_path = root.dev_path(&ng_name);
    Some(NvmeIdentity {
        nsid,
        firmware: read_attr(&dir.join("device/firmware_rev")),
        ng_path: fs::symlink_metadata(&ng_path).is_ok().then_some(ng_path),
        volatile_write_cache: read_attr(&dir.join("queue/write_cache")).map(|v| v == "write back"),
    })
}

fn model_of(dir: &Path) -> Option<String> {
    let model = read_attr(&dir.join("device/model"))?;
    // SCSI/ATA disks split the identity into vendor and model; NVMe has no vendor file.
    match read_attr(&dir.join("device/vendor")) {
        Some(vendor) if !vendor.is_empty() && vendor != "ATA" => Some(format!("{vendor} {model}")),
        _ => Some(model),
    }
}

fn read_size_bytes(dir: &Path) -> u64 {
    read_attr(&dir.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(0, |sectors| sectors.saturating_mul(512))
}

/// A sysfs attribute, trimmed; `None` when absent, unreadable or empty.
fn read_attr(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn read_u32(path: &Path) -> Option<u32> {
    read_attr(path)?.parse().ok()
}

/// Sorted entry names of a directory; an absent directory is empty.
fn list_dir_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// A kernel device name never contains a path separator or a dot component.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// One mounted filesystem, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The `st_dev` of the mounted filesystem (field 3).
    pub devnum: Option<DevNum>,
    /// Where it is mounted (field 5, octal escapes decoded).
    pub mountpoint: PathBuf,
    /// Filesystem type (after the `-` separator).
    pub fstype: String,
    /// Mount source (after the type), usually a device path.
    pub source: String,
}

/// What the host is using block devices for right now: mounts and active swap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// Every mount of the calling process's mount namespace.
    pub mounts: Vec<MountEntry>,
    /// Active swap areas (`/proc/swaps` file names).
    pub swaps: Vec<PathBuf>,
}

impl HostUsage {
    /// Reads `proc/self/mountinfo` and `proc/swaps` (absent swap support reads as none).
    ///
    /// # Errors
    /// mountinfo cannot be read: nothing can then be said about mounts, and callers must
    /// treat every device as possibly mounted.
    pub fn read(root: &SysRoot) -> io::Result<Self> {
        let mountinfo = fs::read_to_string(root.proc_.join("self/mountinfo"))?;
        let swaps = match fs::read_to_string(root.proc_.join("swaps")) {
            Ok(text) => parse_swaps(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            mounts: parse_mountinfo(&mountinfo),
            swaps,
        })
    }

    /// Mount points of the device `dev` (matched by device number, or by a mount source
    /// that names the device node).
    #[must_use]
    pub fn mountpoints_of(&self, dev: &BlockDev) -> Vec<PathBuf> {
        self.mounts
            .iter()
            .filter(|m| {
                (dev.devnum.is_some() && m.devnum == dev.devnum) || names_device(&m.source, dev)
            })
            .map(|m| m.mountpoint.clone())
            .collect()
    }

    /// Whether `dev` is an active swap area.
    #[must_use]
    pub fn is_swap(&self, dev: &BlockDev) -> bool {
        self.swaps
            .iter()
            .any(|s| s.to_str().is_some_and(|s| names_device(s, dev)))
    }
}

/// Whether a path from mountinfo or /proc/swaps names `dev` (`/dev/sda1`, or a `/dev`
/// symlink such as `/dev/disk/by-uuid/…` that resolves to it).
fn names_device(source: &str, dev: &BlockDev) -> bool {
    if !source.starts_with('/') {
        return false;
    }
    let path = Path::new(source);
    if path.file_name().and_then(|n| n.to_str()) == Some(dev.name.as_str()) {
        return true;
    }
    // Resolving a /dev symlink reads links only; it opens no device.
    source.starts_with("/dev/")
        && fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .is_some_and(|n| n == dev.name)
}

/// Parses `/proc/self/mountinfo`; malformed lines are skipped.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 {
        return None;
    }
    Some(MountEntry {
        devnum: DevNum::parse(fields.get(2)?),
        mountpoint: PathBuf::from(unescape_octal(fields.get(4)?)),
        fstype: (*fields.get(sep + 1)?).to_owned(),
        source: unescape_octal(fields.get(sep + 2)?),
    })
}

/// Parses `/proc/swaps` (a header line, then `Filename Type Size Used Priority`).
#[must_use]
pub fn parse_swaps(text: &str) -> Vec<PathBuf> {
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(|f| PathBuf::from(unescape_octal(f)))
        .collect()
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash in paths).
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes.get(i), escaped) {
            (Some(b'\\'), Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (Some(&b), _) => {
                out.push(b);
                i += 1;
            }
            (None, _) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Builders for fake sysfs/procfs trees, shared by this crate's unit tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::{DevNum, SysRoot};
    use std::fs;
    use std::path::Path;

    /// A fake host under a temporary directory.
    pub(crate) struct FakeHost {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) root: SysRoot,
    }

    impl FakeHost {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = SysRoot::under(dir.path());
            for d in [
                &root.sys.join("block"),
                &root.sys.join("dev/block"),
                &root.dev,
            ] {
                fs::create_dir_all(d).expect("mkdir");
            }
            fs::create_dir_all(root.proc_.join("self")).expect("mkdir proc");
            let host = Self { dir, root };
            host.set_mountinfo("");
            host.write(
                &host.root.proc_.join("swaps"),
                "Filename Type Size Used Priority\n",
            );
            host
        }

        pub(crate) fn write(&self, path: &Path, text: &str) {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
            fs::write(path, text).expect("write");
        }

        /// A whole disk with `size` (sectors) and `dev`, 512-byte logical blocks.
        pub(crate) fn disk(
            &self,
            name: &str,
            devnum: DevNum,
            size_bytes: u64,
        ) -> std::path::PathBuf {
            let dir = self.root.sys.join("block").join(name);
            self.write(&dir.join("size"), &format!("{}\n", size_bytes / 512));
            self.write(&dir.join("dev"), &format!("{devnum}\n"));
            self.write(&dir.join("ro"), "0\n");
            self.write(&dir.join("queue/logical_block_size"), "512\n");
            self.write(&dir.join("queue/physical_block_size"), "4096\n");
            self.write(&dir.join("queue/rotational"), "0\n");
            self.write(&dir.join("queue/zoned"), "none\n");
            fs::create_dir_all(dir.join("holders")).expect("mkdir holders");
            #[cfg(unix)]
            {
                let link = self.root.sys.join("dev/block").join(devnum.to_string());
                let _ = std::os::unix::fs::symlink(&dir, link);
            }
            dir
        }

        pub(crate) fn partition(&self, disk: &str, name: &str, devnum: DevNum, size_bytes: u64) {
            let dir = self.root.sys.join("block").join(disk).join(name);
            self.write(&dir.join("partition"), "1\n");
            self.write(&dir.join("size"), &format!("{}\n", size_bytes / 512));
            self.write(&dir.join("dev"), &format!("{devnum}\n"));
            fs::create_dir_all(dir.join("holders")).expect("mkdir holders");
        }

        pub(crate) fn holder(&self, sys_dir: &Path, holder: &str) {
            fs::create_dir_all(sys_dir.join("holders").join(holder)).expect("mkdir holder");
        }

        pub(crate) fn set_mountinfo(&self, text: &str) {
            self.write(&self.root.proc_.join("self/mountinfo"), text);
        }

        /// A zero-filled regular file standing in for the device node.
        pub(crate) fn dev_node(&self, name: &str, size_bytes: u64) {
            let f = fs::File::create(self.root.dev_path(name)).expect("create node");
            f.set_len(size_bytes).expect("set_len");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeHost;
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text =
            "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/sdb1 rw\n\
                    37 35 0:40 / /data rw - btrfs /dev/nvme0n1p2 rw\n\
                    garbage line\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(
            mounts[0].devnum,
            Some(DevNum {
                major: 98,
                minor: 0
            })
        );
        assert_eq!(mounts[0].mountpoint, PathBuf::from("/mnt two"));
        assert_eq!(mounts[0].fstype, "ext3");
        assert_eq!(mounts[0].source, "/dev/sdb1");
        assert_eq!(mounts[1].source, "/dev/nvme0n1p2");
    }

    #[test]
    fn parses_swaps() {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                    /dev/sda2                               partition\t8388604\t\t0\t\t-2\n\
                    /swap\\040file file 1024 0 -3\n";
        assert_eq!(
            parse_swaps(text),
            vec![PathBuf::from("/dev/sda2"), PathBuf::from("/swap file")]
        );
    }

    #[test]
    fn nvme_names() {
        assert_eq!(nvme_nsid_from_name("nvme0n1"), Some(1));
        assert_eq!(nvme_nsid_from_name("nvme12n34"), Some(34));
        assert_eq!(nvme_nsid_from_name("nvme0c1n1"), None);
        assert_eq!(nvme_nsid_from_name("nvme0n1p1"), None);
        assert_eq!(nvme_nsid_from_name("sda"), None);
        assert_eq!(nvme_nsid_from_name("nvmen1"), None);
    }

    #[test]
    fn reads_nvme_namespace_identity() {
        let host = FakeHost::new();
        let dir = host.disk(
            "nvme0n1",
            DevNum {
                major: 259,
                minor: 0,
            },
            2 * GIB,
        );
        host.write(&dir.join("device/model"), "Samsung SSD 990 PRO 2TB  \n");
        host.write(&dir.join("device/serial"), "S7DNNJ0W123456\n");
        host.write(&dir.join("device/firmware_rev"), "4B2QJXD7\n");
        host.write(&dir.join("nsid"), "1\n");
        host.write(&dir.join("queue/write_cache"), "write back\n");
        host.dev_node("ng0n1", 0);

        let dev = block_dev(&host.root, "nvme0n1")
            .expect("read")
            .expect("found");
        assert_eq!(dev.size_bytes, 2 * GIB);
        assert_eq!(dev.model.as_deref(), Some("Samsung SSD 990 PRO 2TB"));
        assert_eq!(dev.serial.as_deref(), Some("S7DNNJ0W123456"));
        let nvme = dev.nvme.expect("nvme identity");
        assert_eq!(nvme.nsid, 1);
        assert_eq!(nvme.firmware.as_deref(), Some("4B2QJXD7"));
        assert_eq!(nvme.ng_path, Some(host.root.dev_path("ng0n1")));
        assert_eq!(nvme.volatile_write_cache, Some(true));
        assert_eq!(dev.logical_block_size, 512);
        assert_eq!(dev.physical_block_size, 4096);
    }

    #[test]
    fn finds_partitions_holders_and_mounts() {
        let host = FakeHost::new();
        let sda = host.disk("sda", DevNum { major: 8, minor: 0 }, 4 * GIB);
        host.partition("sda", "sda1", DevNum { major: 8, minor: 1 }, GIB);
        host.partition("sda", "sda2", DevNum { major: 8, minor: 2 }, GIB);
        host.holder(&sda.join("sda2"), "dm-0");
        host.set_mountinfo("22 1 8:1 / /boot rw - ext4 /dev/sda1 rw\n");

        let dev = block_dev(&host.root, "sda").expect("read").expect("found");
        let names: Vec<_> = dev.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["sda1", "sda2"]);
        assert_eq!(dev.partitions[1].holders, ["dm-0"]);
        let usage = HostUsage::read(&host.root).expect("usage");
        assert_eq!(
            usage.mountpoints_of(&dev.partitions[0]),
            [PathBuf::from("/boot")]
        );
        assert!(usage.mountpoints_of(&dev).is_empty());

        let part = block_dev(&host.root, "sda2").expect("read").expect("found");
        assert_eq!(part.parent.as_deref(), Some("sda"));
        assert_eq!(part.size_bytes, GIB);
        assert_eq!(
            name_for_devnum(&host.root, DevNum { major: 8, minor: 0 }).as_deref(),
            Some("sda")
        );
        assert!(block_dev(&host.root, "../etc").expect("read").is_none());
    }

    #[test]
    fn lists_loop_backing_files() {
        let host = FakeHost::new();
        let loop0 = host.disk("loop0", DevNum { major: 7, minor: 0 }, GIB);
        host.write(&loop0.join("loop/backing_file"), "/var/lib/img.raw\n");
        host.disk("loop1", DevNum { major: 7, minor: 1 }, 0);
        assert_eq!(
            loop_backing_files(&host.root),
            [("loop0".to_owned(), PathBuf::from("/var/lib/img.raw"))]
        );
    }
}
