//! The daemon's own mount namespace (DESIGN §5 "Safety"): a ublk server that shares a
//! mount namespace with a mount of one of its own `/dev/ublkbN` devices can deadlock when
//! it exits (libublk-rs issue 50, ublksrv issue 186): tearing the namespace down unmounts
//! the filesystem, which flushes it to the device, which waits for the server that is
//! exiting. So `coreblkd` starts by entering a mount namespace of its own, makes every
//! mount in it private (nothing mounted later on the host propagates in, and nothing done
//! here propagates out), and lazily detaches every mount it inherited whose filesystem
//! lives on a ublk device — directly (`ublkbN`, `ublkbNpM`) or stacked on one (dm-crypt,
//! LVM or md over a ublk device, found through sysfs `slaves/`). The host's mounts are
//! untouched.
//!
//! Owns: the decision which mounts are ublk mounts (parsed from mountinfo under an
//! injectable [`SysRoot`], so tests run against a fake tree) and the three system calls.
//!
//! Must never: be called after a thread has started (a namespace is per thread until the
//! threads that exist have left; [`enter_own_mount_namespace`] refuses then), open a
//! device, or detach a mount that is not on a ublk device.
//!
//! Start reading at [`enter_own_mount_namespace`].

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::bdev::sysfs::{name_for_devnum, DevNum, SysRoot};

/// Passes over mountinfo before giving up on a ublk mount that will not go (one pass
/// detaches what is on top at each path; an over-mount needs another).
const MAX_PASSES: usize = 8;
/// How deep device stacking (dm over dm over ublk ...) is followed in sysfs.
const MAX_STACK_DEPTH: usize = 8;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRow {
    /// Mount id (field 1).
    pub id: u32,
    /// Parent mount id (field 2).
    pub parent: u32,
    /// `st_dev` of the mounted filesystem (field 3).
    pub devnum: Option<DevNum>,
    /// Where it is mounted (field 5, octal escapes decoded).
    pub mountpoint: PathBuf,
    /// Filesystem type (after the `-` separator).
    pub fstype: String,
    /// Mount source (after the type), usually a device path.
    pub source: String,
}

/// Parses mountinfo text; malformed lines are skipped.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<MountRow> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountRow> {
    let fields: Vec<&str> = line.split(' ').collect();
    // id parent maj:min root mountpoint options [optional...] - fstype source superopts
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 {
        return None;
    }
    Some(MountRow {
        id: fields.first()?.parse().ok()?,
        parent: fields.get(1)?.parse().ok()?,
        devnum: DevNum::parse(fields.get(2)?),
        mountpoint: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(fields.get(4)?))),
        fstype: (*fields.get(sep + 1)?).to_owned(),
        source: String::from_utf8_lossy(&unescape(fields.get(sep + 2)?)).into_owned(),
    })
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Whether a kernel block device name is a ublk disk or one of its partitions.
fn is_ublk_name(name: &str) -> bool {
    name.strip_prefix("ublkb")
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c.is_ascii_digit())
}

/// Whether the block device `name` is a ublk device or is stacked on one (its sysfs
/// `slaves/`, followed down to [`MAX_STACK_DEPTH`]).
fn name_on_ublk(root: &SysRoot, name: &str, depth: usize) -> bool {
    if is_ublk_name(name) {
        return true;
    }
    if depth >= MAX_STACK_DEPTH {
        return false;
    }
    let Ok(slaves) = fs::read_dir(root.sys.join("class/block").join(name).join("slaves")) else {
        return false;
    };
    slaves.flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|s| name_on_ublk(root, s, depth + 1))
    })
}

/// Whether this mount's filesystem lives on a ublk device: its device number resolves (in
/// sysfs) to a ublk disk or partition or to a device stacked on one, or its source names
/// one (`/dev/ublkbN…`).
#[must_use]
pub fn is_ublk_mount(root: &SysRoot, m: &MountRow) -> bool {
    let by_source = m
        .source
        .strip_prefix("/dev/")
        .is_some_and(|n| is_ublk_name(n) || name_on_ublk(root, n, 0));
    let by_devnum = m
        .devnum
        .filter(|d| d.major != 0)
        .and_then(|d| name_for_devnum(root, d))
        .is_some_and(|n| name_on_ublk(root, &n, 0));
    by_source || by_devnum
}

/// The ublk mounts among `mounts`, deepest in the mount tree first (so a mount is
/// detached before the one it sits on).
#[must_use]
pub fn ublk_mounts(root: &SysRoot, mounts: &[MountRow]) -> Vec<MountRow> {
    let depth = |m: &MountRow| {
        let mut d = 0usize;
        let mut cur = m.parent;
        while let Some(p) = mounts.iter().find(|x| x.id == cur) {
            d += 1;
            if d > mounts.len() || p.parent == p.id {
                break;
            }
            cur = p.parent;
        }
        d
    };
    let mut found: Vec<(usize, MountRow)> = mounts
        .iter()
        .filter(|m| is_ublk_mount(root, m))
        .map(|m| (depth(m), m.clone()))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.0));
    found.into_iter().map(|(_, m)| m).collect()
}

/// What entering the namespace did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In a namespace of its own; these ublk mounts were detached in it.
    Isolated {
        /// Mount points detached (the host keeps them).
        detached: Vec<PathBuf>,
    },
    /// `unshare` was refused (no CAP_SYS_ADMIN): such a daemon cannot create or recover
    /// privileged ublk devices either.
    NotPermitted,
}

/// Enters a mount namespace of the daemon's own, makes `/` recursively private in it and
/// detaches every inherited mount on a ublk device (see the module docs). Call it first
/// thing, while the process has one thread.
///
/// # Errors
/// The process already runs other threads; `unshare` failed for another reason than a
/// missing privilege; `/` could not be made private; mountinfo could not be read; or a
/// ublk mount is still there after every pass.
pub fn enter_own_mount_namespace() -> anyhow::Result<Isolation> {
    let threads = fs::read_dir("/proc/self/task").map_or(1, Iterator::count);
    anyhow::ensure!(
        threads == 1,
        "entering a mount namespace must happen before any thread starts ({threads} running)"
    );
    // SAFETY: unshare takes only flags and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Ok(Isolation::NotPermitted);
        }
        return Err(e).context("unshare(CLONE_NEWNS)");
    }
    let slash = CString::new("/").expect("no NUL");
    // The other pointers may be NULL for a propagation change.
    // SAFETY: `slash` is a live NUL-terminated string for the whole call.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("making / rprivate in the new namespace");
    }
    let root = SysRoot::host();
    let mut detached = Vec::new();
    for _ in 0..MAX_PASSES {
        let text =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        let found = ublk_mounts(&root, &parse_mountinfo(&text));
        if found.is_empty() {
            return Ok(Isolation::Isolated { detached });
        }
        for m in found {
            // A failure (gone with its parent already, say) shows on the next pass.
            if detach(&m.mountpoint).is_ok() {
                detached.push(m.mountpoint);
            }
        }
    }
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let left: Vec<String> = ublk_mounts(&root, &parse_mountinfo(&text))
        .iter()
        .map(|m| format!("{} ({})", m.mountpoint.display(), m.source))
        .collect();
    anyhow::ensure!(
        left.is_empty(),
        "ublk mounts could not be detached from the daemon's mount namespace: {}",
        left.join(", ")
    );
    Ok(Isolation::Isolated { detached })
}

/// `umount2(path, MNT_DETACH)`.
fn detach(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a live NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> (tempfile::TempDir, SysRoot) {
        let dir = tempfile::tempdir().expect("tmp");
        let root = SysRoot::under(dir.path());
        // nvme0n1 259:0, ublkb0 259:1, ublkb0p1 259:2, dm-0 253:0 over ublkb0p1,
        // dm-1 253:1 over dm-0, dm-2 253:2 over nvme0n1.
        let devs = [
            ("nvme0n1", "259:0", &[][..]),
            ("ublkb0", "259:1", &[][..]),
            ("ublkb0p1", "259:2", &[][..]),
            ("dm-0", "253:0", &["ublkb0p1"][..]),
            ("dm-1", "253:1", &["dm-0"][..]),
            ("dm-2", "253:2", &["nvme0n1"][..]),
        ];
        for (name, num, slaves) in devs {
            let class = root.sys.join("class/block").join(name);
            fs::create_dir_all(class.join("slaves")).expect("mkdir");
            for s in slaves {
                fs::create_dir_all(class.join("slaves").join(s)).expect("mkdir");
            }
            let target = root.sys.join("devices/virtual/block").join(name);
            fs::create_dir_all(&target).expect("mkdir");
            fs::create_dir_all(root.sys.join("dev/block")).expect("mkdir");
            std::os::unix::fs::symlink(&target, root.sys.join("dev/block").join(num))
                .expect("link");
        }
        (dir, root)
    }

    const MOUNTINFO: &str = "\
21 1 0:20 / / rw,relatime shared:1 - 9p host rw\n\
22 21 0:5 / /dev rw shared:2 - devtmpfs udev rw\n\
30 21 259:0 / /data rw,noatime shared:9 - ext4 /dev/nvme0n1 rw\n\
31 30 259:1 / /data/pod\\040one rw master:3 - ext4 /dev/ublkb0 rw\n\
32 31 0:44 / /data/pod\\040one/tmp rw - tmpfs tmpfs rw\n\
33 21 259:2 / /mnt/part rw - xfs /dev/ublkb0p1 rw\n\
34 21 253:1 / /mnt/crypt rw - ext4 /dev/mapper/luks rw\n\
35 21 253:2 / /mnt/lvm rw - ext4 /dev/mapper/vg-lv rw\n\
36 22 0:5 /ublkb0 /var/lib/kubelet/dev/ublkb0 rw - devtmpfs udev rw\n\
37 21 0:50 / /mnt/gone rw - ext4 /dev/ublkb7 rw\n\
bad line here\n";

    #[test]
    fn mountinfo_lines_parse_with_ids_escapes_and_optional_fields() {
        let rows = parse_mountinfo(MOUNTINFO);
        assert_eq!(rows.len(), 10, "the bad line is skipped");
        let r = &rows[3];
        assert_eq!((r.id, r.parent), (31, 30));
        assert_eq!(
            r.devnum,
            Some(DevNum {
                major: 259,
                minor: 1
            })
        );
        assert_eq!(r.mountpoint, Path::new("/data/pod one"));
        assert_eq!(r.fstype, "ext4");
        assert_eq!(r.source, "/dev/ublkb0");
        assert_eq!(rows[0].fstype, "9p");
        assert_eq!(unescape("a\\134b\\011c\\012"), b"a\\b\tc\n");
        assert_eq!(unescape("trailing\\04"), b"trailing\\04");
        assert_eq!(unescape("not\\999octal"), b"not\\999octal");
    }

    #[test]
    fn ublk_mounts_are_found_by_device_number_source_and_stacking_deepest_first() {
        let (_dir, root) = fake();
        let rows = parse_mountinfo(MOUNTINFO);
        let found: Vec<PathBuf> = ublk_mounts(&root, &rows)
            .into_iter()
            .map(|m| m.mountpoint)
            .collect();
        // ublkb0 (by number and source), its partition, dm over dm over the partition,
        // and a source naming a ublk device whose number sysfs does not know; not the
        // NVMe mount, not dm over NVMe, not the tmpfs on top of a ublk mount, not a bind
        // mount of the device node.
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(found[0], Path::new("/data/pod one"), "deepest first");
        for p in ["/mnt/part", "/mnt/crypt", "/mnt/gone"] {
            assert!(found.contains(&PathBuf::from(p)), "{p} in {found:?}");
        }
        for p in ["/data", "/mnt/lvm", "/data/pod one/tmp", "/dev"] {
            assert!(!found.contains(&PathBuf::from(p)), "{p} in {found:?}");
        }
    }

    #[test]
    fn ublk_names_are_exact() {
        for yes in ["ublkb0", "ublkb12", "ublkb3p1"] {
            assert!(is_ublk_name(yes), "{yes}");
        }
        for no in ["ublkc0", "ublkb", "ublkbx", "nvme0n1", "ublk-control"] {
            assert!(!is_ublk_name(no), "{no}");
        }
    }

    #[test]
    fn a_cycle_in_the_mount_tree_does_not_hang() {
        let (_dir, root) = fake();
        let rows = parse_mountinfo(
            "5 6 259:1 / /a rw - ext4 /dev/ublkb0 rw\n6 5 0:1 / /b rw - tmpfs t rw\n",
        );
        assert_eq!(ublk_mounts(&root, &rows).len(), 1);
    }
}
