//! The `nvme` backend: an NVMe namespace identified through sysfs (model, serial, firmware,
//! nsid, LBA format, capacity, volatile write cache), with IO through its block device on
//! the [`super::uring`] path.
//!
//! Optionally (off by default) reads, writes and flushes go through io_uring NVMe
//! passthrough on the namespace's generic char device `/dev/ngXnY` (`IORING_OP_URING_CMD`
//! with `NVME_URING_CMD_IO`, 128-byte SQEs: the reactors must run with
//! `ReactorConfig::big_sqe`), skipping the block layer; discard and write-zeroes still use
//! the block device. Which path is faster depends on the drive and kernel: the VM's
//! emulated timings cannot choose a default for real drives.
//!
//! Must never: claim the device (that is [`super::claim`]'s job) or probe its contents.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use io_uring::{opcode, types};

use super::sysfs::{self, NvmeIdentity, SysRoot};
use super::uring::{OpenError, UringDevice};
use super::{fail_request, BlockDevice, Channel, Geometry, Io};
use crate::reactor::{Completion, Errno, OpKind, Reactor, ResultMap};

/// `NVME_URING_CMD_IO` = `_IOWR('N', 0x80, struct nvme_uring_cmd)` (72-byte struct).
const NVME_URING_CMD_IO: u32 = 0xC048_4E80;
const NVME_CMD_FLUSH: u8 = 0x00;
const NVME_CMD_WRITE: u8 = 0x01;
const NVME_CMD_READ: u8 = 0x02;
/// Force Unit Access bit in CDW12 of read/write commands.
const NVME_RW_FUA: u32 = 1 << 30;

/// Errors opening an NVMe namespace.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The name is not an NVMe namespace's block device.
    #[error("{path} is not an NVMe namespace block device (expected /dev/nvmeXnY); for other devices use uring:PATH")]
    NotNvme {
        /// The path.
        path: PathBuf,
    },
    /// sysfs has no record of it.
    #[error("{path}: no sysfs entry for {name} ({why}); is the nvme driver loaded?")]
    NoSysfs {
        /// The path.
        path: PathBuf,
        /// Kernel name.
        name: String,
        /// Why.
        why: String,
    },
    /// Opening the block device failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Passthrough was asked for but is not possible.
    #[error("{path}: NVMe passthrough unavailable: {why}")]
    Passthrough {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// How to drive a namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeOptions {
    /// Reads, writes and flushes through io_uring NVMe passthrough on `/dev/ngXnY`.
    pub passthrough: bool,
}

/// Identity of a namespace, as sysfs reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NvmeInfo {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    /// Controller model.
    pub model: Option<String>,
    /// Controller serial.
    pub serial: Option<String>,
    /// Namespace identity (nsid, firmware, generic char device, write cache).
    pub identity: NvmeIdentity,
    /// LBA data size in use (the logical block size).
    pub lba_bytes: u32,
    /// Capacity in bytes.
    pub size_bytes: u64,
}

/// An NVMe namespace driven through its block device.
#[derive(Debug)]
pub struct NvmeDevice {
    info: NvmeInfo,
    io: UringDevice,
    /// The generic char device, when passthrough is on.
    ng: Option<File>,
}

impl NvmeDevice {
    /// Opens the namespace at `path` (`/dev/nvmeXnY`) with IO through the block device.
    pub fn open(path: &Path) -> Result<Self, NvmeError> {
        Self::open_in(&SysRoot::host(), path, NvmeOptions::default())
    }

    /// Opens the namespace with `opts`.
    pub fn open_with(path: &Path, opts: NvmeOptions) -> Result<Self, NvmeError> {
        Self::open_in(&SysRoot::host(), path, opts)
    }

    /// As [`Self::open_with`], reading identity from `root`.
    pub fn open_in(root: &SysRoot, path: &Path, opts: NvmeOptions) -> Result<Self, NvmeError> {
        let info = identify(root, path)?;
        let io = UringDevice::open(path)?;
        let ng = if opts.passthrough {
            let unavailable = |why: String| NvmeError::Passthrough {
                path: path.to_path_buf(),
                why,
            };
            let ng_path = info
                .identity
                .ng_path
                .clone()
                .ok_or_else(|| unavailable("no /dev/ngXnY generic device (kernel ≥ 5.13 with CONFIG_NVME_MULTIPATH-independent ng nodes)".into()))?;
            if !info.lba_bytes.is_power_of_two() {
                return Err(unavailable(format!(
                    "LBA size {} is not a power of two",
                    info.lba_bytes
                )));
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&ng_path)
                .map_err(|e| unavailable(format!("opening {}: {e}", ng_path.display())))?;
            Some(f)
        } else {
            None
        };
        Ok(Self { info, io, ng })
    }

    /// Whether reads/writes/flushes use passthrough.
    pub fn passthrough(&self) -> bool {
        self.ng.is_some()
    }

    /// What sysfs says about the namespace.
    pub fn info(&self) -> &NvmeInfo {
        &self.info
    }
}

/// Reads a namespace's identity from sysfs without opening the device.
pub fn identify(root: &SysRoot, path: &Path) -> Result<NvmeInfo, NvmeError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("nvme") && sysfs::nvme_nsid_from_name(n).is_some())
        .ok_or_else(|| NvmeError::NotNvme {
            path: path.to_path_buf(),
        })?
        .to_string();
    let no_sysfs = |why: String| NvmeError::NoSysfs {
        path: path.to_path_buf(),
        name: name.clone(),
        why,
    };
    let dev = sysfs::block_dev(root, &name)
        .map_err(|e| no_sysfs(e.to_string()))?
        .ok_or_else(|| no_sysfs("not in /sys/block".into()))?;
    let identity = dev.nvme.clone().ok_or_else(|| NvmeError::NotNvme {
        path: path.to_path_buf(),
    })?;
    Ok(NvmeInfo {
        name,
        model: dev.model,
        serial: dev.serial,
        identity,
        lba_bytes: dev.logical_block_size,
        size_bytes: dev.size_bytes,
    })
}

impl BlockDevice for NvmeDevice {
    fn geometry(&self) -> &Geometry {
        self.io.geometry()
    }
    fn name(&self) -> &str {
        self.io.name()
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        let block = self.io.open_channel(rx)?;
        let Some(ng) = &self.ng else { return Ok(block) };
        if !rx.has_big_sqe() {
            block.close(rx);
            return Err(std::io::Error::other(format!(
                "{}: NVMe passthrough needs reactors started with 128-byte SQEs (ReactorConfig::big_sqe)",
                self.io.name()
            )));
        }
        let ng = ng.try_clone()?;
        let fixed = rx.register_file(ng.as_raw_fd())?;
        Ok(Rc::new(PassthroughChannel {
            geo: self.io.geometry().clone(),
            block,
            fixed,
            nsid: self.info.identity.nsid,
            lba_shift: self.info.lba_bytes.trailing_zeros(),
            _ng: ng,
        }))
    }
}

/// One reactor's passthrough access: reads/writes/flushes as NVMe commands on the char
/// device, discard and write-zeroes through the block device channel.
#[derive(Debug)]
struct PassthroughChannel {
    geo: Geometry,
    block: Rc<dyn Channel>,
    fixed: u32,
    nsid: u32,
    lba_shift: u32,
    /// Keeps the registered descriptor open for the channel's lifetime.
    _ng: File,
}

/// Encodes `struct nvme_uring_cmd` (include/uapi/linux/nvme_ioctl.h) into the SQE's
/// 80-byte command area, at its documented offsets.
fn nvme_cmd(
    opcode: u8,
    nsid: u32,
    addr: u64,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[0] = opcode;
    c[4..8].copy_from_slice(&nsid.to_le_bytes());
    c[24..32].copy_from_slice(&addr.to_le_bytes());
    c[36..40].copy_from_slice(&data_len.to_le_bytes());
    c[40..44].copy_from_slice(&cdw10.to_le_bytes());
    c[44..48].copy_from_slice(&cdw11.to_le_bytes());
    c[48..52].copy_from_slice(&cdw12.to_le_bytes());
    c
}

impl Channel for PassthroughChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn takes_kernel_bufs(&self, _write: bool) -> bool {
        // The command's data is a fixed buffer of this reactor's table
        // (IORING_URING_CMD_FIXED), resolved by the kernel like READ_FIXED's.
        true
    }

    fn submit(&self, rx: &Reactor, mut io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(&self.geo) {
            return fail_request(rx, cb, tag, e, io.into_buf());
        }
        let (op, fua) = match &io {
            Io::Write { fua, .. } => (NVME_CMD_WRITE, *fua),
            _ => (NVME_CMD_READ, false),
        };
        let (cmd, buf_index, ok_bytes) = match &mut io {
            Io::Read { offset, buf } | Io::Write { offset, buf, .. } => {
                let len = u32::try_from(buf.len()).expect("validated: len ≤ max_transfer_bytes");
                let slba = *offset >> self.lba_shift;
                let nlb0 = (len >> self.lba_shift) - 1;
                // With a fixed buffer the data address is resolved in it (an offset for a
                // kernel-registered ublk request buffer): IORING_URING_CMD_FIXED.
                let (buf_index, addr) = buf.sqe_addr();
                let cdw12 = nlb0 | if fua { NVME_RW_FUA } else { 0 };
                #[allow(clippy::cast_possible_truncation)] // splitting a u64 into its halves
                let cmd = nvme_cmd(
                    op,
                    self.nsid,
                    addr,
                    len,
                    slba as u32,
                    (slba >> 32) as u32,
                    cdw12,
                );
                (cmd, buf_index, len)
            }
            Io::Flush => (nvme_cmd(NVME_CMD_FLUSH, self.nsid, 0, 0, 0, 0, 0), None, 0),
            Io::Discard { .. } | Io::WriteZeroes { .. } => {
                return self.block.submit(rx, io, cb, tag)
            }
        };
        let sqe = opcode::UringCmd80::new(types::Fixed(self.fixed), NVME_URING_CMD_IO)
            .cmd(cmd)
            .buf_index(buf_index)
            .build();
        // Why the submit is sound:
        // - the command's data address points into the request's buffer, which moves into
        //   the request slot with the SQE and comes back only after the CQE is reaped
        //   (a pooled buffer lies in the reactor's registered region: `buf_index` 0; a
        //   kernel buffer is an offset the kernel resolves in the buffer registered at its
        //   index, registered until the buffer comes back);
        // - `self.fixed` is registered on this reactor and the channel keeps it open;
        // - the ring has 128-byte SQEs (checked in `open_channel`).
        // SAFETY: the reasons above hold for this call.
        let submitted = unsafe {
            rx.submit128(
                sqe,
                OpKind::Fast,
                ResultMap::NvmeStatus { ok_bytes },
                Rc::clone(&cb),
                tag,
                io.into_buf(),
            )
        };
        if let Err((_, buf)) = submitted {
            cb.complete(rx, tag, Err(Errno::EAGAIN), buf);
        }
    }

    fn close(&self, rx: &Reactor) {
        rx.unregister_file(self.fixed);
        self.block.close(rx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_nvme_names_are_refused_with_advice() {
        let e = identify(&SysRoot::host(), Path::new("/dev/sda")).expect_err("sda");
        assert!(e.to_string().contains("not an NVMe namespace"), "{e}");
        let e = identify(&SysRoot::host(), Path::new("/dev/nvme9n9")).expect_err("absent");
        assert!(e.to_string().contains("nvme9n9"), "{e}");
    }
}
