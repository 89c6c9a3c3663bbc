//! The `uring` backend: O_DIRECT IO on a regular file or a block device through the
//! reactor's io_uring, with the descriptor registered per reactor (fixed file) and pooled
//! buffers used as fixed buffers.
//!
//! - FUA: `RWF_DSYNC` on the write.
//! - Flush: the fsync op with DATASYNC (runs in io_uring's workers: a "slow" op).
//! - Discard: on a block device the block layer's `uring_cmd` discard (Linux ≥ 6.12, async,
//!   never the blocking `BLKDISCARD` ioctl); on a file `fallocate(PUNCH_HOLE)`.
//! - Write-zeroes: `fallocate(ZERO_RANGE)` (on a block device the kernel issues write-zeroes
//!   and falls back to writing zero pages; on tmpfs, which lacks ZERO_RANGE, punch a hole).
//!
//! Must never: issue a blocking ioctl on a reactor thread, or buffer IO in the page cache.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use super::{fail_request, BlockDevice, Channel, Geometry, Io};
use crate::reactor::{Completion, OpKind, Reactor};

/// `BLOCK_URING_CMD_DISCARD` = `_IO(0x12, 0)` (include/uapi/linux/fs.h, Linux 6.12).
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`; not exported by the libc crate.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// Smallest file or device the `uring` backend accepts.
pub const MIN_SIZE_BYTES: u64 = 1 << 20;

/// Default largest transfer when the device does not say.
const DEFAULT_MAX_TRANSFER: u32 = 1 << 20;

/// Errors opening a `uring` device; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The path does not exist or cannot be opened.
    #[error("cannot open {path}: {err} (check the path and that coreblkd runs as root)")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{path} is neither a block device nor a regular file; give a /dev/... block device or a file")]
    NotBlockOrFile {
        /// The path.
        path: PathBuf,
    },
    /// Too small to be useful.
    #[error("{path} is {size_bytes} bytes, smaller than the minimum {min_bytes}; use a larger file (e.g. truncate -s 4G {path})")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
        /// The minimum.
        min_bytes: u64,
    },
    /// Querying geometry failed.
    #[error("cannot read the geometry of {path}: {err}")]
    Geometry {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

/// Whether the backing object is a block device or a file (decides discard/zeroing ops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    Block,
    File { punch_for_zeroes: bool },
}

/// A file or block device driven through io_uring with O_DIRECT.
#[derive(Debug)]
pub struct UringDevice {
    path: PathBuf,
    name: String,
    file: File,
    geo: Geometry,
    backing: Backing,
}

impl UringDevice {
    /// Opens `path` read-write with O_DIRECT. Does not claim it: claiming (exclusivity,
    /// signature checks) is [`super::claim`]'s job; this is the IO path.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        // Check the type first: opening a directory read-write fails with a less helpful
        // EISDIR, and opening a FIFO could block.
        if let Ok(meta) = std::fs::metadata(path) {
            let t = meta.file_type();
            if !t.is_file() && !t.is_block_device() {
                return Err(OpenError::NotBlockOrFile {
                    path: path.to_path_buf(),
                });
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| OpenError::Open {
                path: path.to_path_buf(),
                err,
            })?;
        Self::from_file(path, file)
    }

    /// Wraps an already open descriptor (e.g. a claimed device, opened with O_EXCL).
    pub fn from_file(path: &Path, file: File) -> Result<Self, OpenError> {
        let meta = file.metadata().map_err(|err| OpenError::Geometry {
            path: path.to_path_buf(),
            err,
        })?;
        let (geo, backing) = if meta.file_type().is_block_device() {
            (block_geometry(path, &file)?, Backing::Block)
        } else if meta.file_type().is_file() {
            file_geometry(path, &file, meta.len())?
        } else {
            return Err(OpenError::NotBlockOrFile {
                path: path.to_path_buf(),
            });
        };
        if geo.size_bytes < MIN_SIZE_BYTES {
            return Err(OpenError::TooSmall {
                path: path.to_path_buf(),
                size_bytes: geo.size_bytes,
                min_bytes: MIN_SIZE_BYTES,
            });
        }
        Ok(Self {
            name: path.display().to_string(),
            path: path.to_path_buf(),
            file,
            geo,
            backing,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sysfs_queue_attr(file: &File, attr: &str) -> Option<u64> {
    let meta = file.metadata().ok()?;
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/queue/{attr}")).ok()?;
    s.trim().parse().ok()
}

fn sysfs_queue_str(file: &File, attr: &str) -> Option<String> {
    let meta = file.metadata().ok()?;
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/queue/{attr}"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn block_geometry(path: &Path, file: &File) -> Result<Geometry, OpenError> {
    let err = |err| OpenError::Geometry {
        path: path.to_path_buf(),
        err,
    };
    let fd = file.as_raw_fd();
    let mut lbs: libc::c_int = 0;
    let mut pbs: libc::c_uint = 0;
    let mut size: u64 = 0;
    // SAFETY: BLKSSZGET writes one int into the live local `lbs`; `fd` is open.
    if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut lbs) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: BLKPBSZGET writes one unsigned int into the live local `pbs`.
    if unsafe { libc::ioctl(fd, libc::BLKPBSZGET, &mut pbs) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: BLKGETSIZE64 writes one u64 into the live local `size`.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let lbs = u32::try_from(lbs)
        .map_err(|_| err(std::io::Error::other("negative logical block size")))?;
    let max_kb =
        sysfs_queue_attr(file, "max_sectors_kb").unwrap_or(u64::from(DEFAULT_MAX_TRANSFER) / 1024);
    let max_transfer = u32::try_from((max_kb * 1024).min(u64::from(DEFAULT_MAX_TRANSFER) * 4))
        .unwrap_or(DEFAULT_MAX_TRANSFER);
    let atomic = sysfs_queue_attr(file, "atomic_write_unit_max_bytes")
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v >= lbs)
        .unwrap_or(lbs);
    Ok(Geometry {
        logical_block_size: lbs,
        physical_block_size: pbs.max(lbs),
        size_bytes: size - size % u64::from(lbs),
        max_transfer_bytes: max_transfer,
        atomic_write_bytes: atomic,
        discard_supported: sysfs_queue_attr(file, "discard_max_bytes").unwrap_or(0) > 0,
        // Block devices make no promise here (NVMe DLFEAT might); the store never relies
        // on discarded data reading as zeroes.
        discard_zeroes: false,
        write_zeroes_supported: sysfs_queue_attr(file, "write_zeroes_max_bytes").unwrap_or(0) > 0,
        volatile_cache: sysfs_queue_str(file, "write_cache").is_none_or(|s| s != "write through"),
    })
}

fn file_geometry(path: &Path, file: &File, len: u64) -> Result<(Geometry, Backing), OpenError> {
    // SAFETY: statfs is plain data; zeroed is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the live local `st` for the open descriptor.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(OpenError::Geometry {
            path: path.to_path_buf(),
            err: std::io::Error::last_os_error(),
        });
    }
    // tmpfs has no FALLOC_FL_ZERO_RANGE; a punched hole reads back zeroes there too.
    let punch_for_zeroes = st.f_type == libc::TMPFS_MAGIC;
    // 4 KiB satisfies O_DIRECT alignment on every filesystem we run on.
    let lbs = 4096u32;
    Ok((
        Geometry {
            logical_block_size: lbs,
            physical_block_size: lbs,
            size_bytes: len - len % u64::from(lbs),
            max_transfer_bytes: DEFAULT_MAX_TRANSFER,
            atomic_write_bytes: lbs,
            discard_supported: true,
            discard_zeroes: true,
            write_zeroes_supported: true,
            volatile_cache: true,
        },
        Backing::File { punch_for_zeroes },
    ))
}

impl BlockDevice for UringDevice {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        // The channel keeps its own descriptor (a dup) so the fixed-file slot never outlives
        // the file it names, whatever happens to the device object.
        let file = self.file.try_clone()?;
        let fixed = rx.register_file(file.as_raw_fd())?;
        Ok(Rc::new(UringChannel {
            geo: self.geo.clone(),
            backing: self.backing,
            fixed,
            _file: file,
        }))
    }
}

#[derive(Debug)]
struct UringChannel {
    geo: Geometry,
    backing: Backing,
    fixed: u32,
    /// Keeps the registered descriptor open for the channel's lifetime.
    _file: File,
}

impl UringChannel {
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> squeue::Entry {
        opcode::Fallocate::new(types::Fixed(self.fixed), len)
            .offset(offset)
            .mode(mode)
            .build()
    }
}

impl Channel for UringChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn takes_kernel_bufs(&self, _write: bool) -> bool {
        // READ_FIXED / WRITE_FIXED name any buffer of this reactor's table.
        true
    }

    fn submit(&self, rx: &Reactor, mut io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(&self.geo) {
            return fail_request(rx, cb, tag, e, io.into_buf());
        }
        let fd = types::Fixed(self.fixed);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (sqe, kind) = match &mut io {
            Io::Read { offset, buf } => {
                let len = u32::try_from(buf.len()).expect("validated: len ≤ max_transfer_bytes");
                // A kernel buffer's "address" is an offset in it: an integer, not a pointer.
                let (index, addr) = buf.sqe_addr();
                let ptr = addr as *mut u8;
                let sqe = match index {
                    Some(idx) => opcode::ReadFixed::new(fd, ptr, len, idx)
                        .offset(*offset)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(*offset).build(),
                };
                (sqe, OpKind::Fast)
            }
            Io::Write { offset, buf, fua } => {
                let len = u32::try_from(buf.len()).expect("validated: len ≤ max_transfer_bytes");
                let (index, addr) = buf.sqe_addr();
                let ptr = addr as *const u8;
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                let sqe = match index {
                    Some(idx) => opcode::WriteFixed::new(fd, ptr, len, idx)
                        .offset(*offset)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len)
                        .offset(*offset)
                        .rw_flags(flags)
                        .build(),
                };
                // A FUA write to a file may run in the workers (journal commit): poll anyway,
                // it is bounded by the device's latency.
                (sqe, OpKind::Fast)
            }
            Io::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                OpKind::Slow,
            ),
            Io::Discard { offset, len } => match self.backing {
                Backing::Block => {
                    let mut cmd = [0u8; 16];
                    cmd[..8].copy_from_slice(&len.to_le_bytes());
                    let sqe = opcode::UringCmd16::new(fd, BLOCK_URING_CMD_DISCARD)
                        .addr(Some(*offset))
                        .cmd(cmd)
                        .build();
                    (sqe, OpKind::Fast)
                }
                Backing::File { .. } => (
                    self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | keep, *offset, *len),
                    OpKind::Slow,
                ),
            },
            Io::WriteZeroes { offset, len } => {
                let mode = match self.backing {
                    Backing::File {
                        punch_for_zeroes: true,
                    } => libc::FALLOC_FL_PUNCH_HOLE | keep,
                    _ => libc::FALLOC_FL_ZERO_RANGE | keep,
                };
                (self.fallocate(mode, *offset, *len), OpKind::Slow)
            }
        };
        // Read/write SQEs point into `buf`, which moves into the request slot with the SQE and
        // comes back only after the CQE is reaped. Pooled buffers lie in the reactor's
        // registered region (`buf_index` matches); a kernel buffer's SQE carries an offset
        // the kernel resolves and bounds-checks in the buffer registered at its index, which
        // stays registered until its owner gets the buffer back and commits the ublk request.
        // Other SQEs carry no pointers; `self.fixed` was registered on
        // this reactor in `open_channel`, and the channel keeps the descriptor open.
        // SAFETY: the reasons above hold for this call.
        let submitted = unsafe { rx.submit(sqe, kind, Rc::clone(&cb), tag, io.into_buf()) };
        if let Err((_, buf)) = submitted {
            cb.complete(rx, tag, Err(crate::reactor::Errno::EAGAIN), buf);
        }
    }

    fn close(&self, rx: &Reactor) {
        rx.unregister_file(self.fixed);
    }
}
