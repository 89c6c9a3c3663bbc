//! The `nvme` backend: an NVMe namespace identified through sysfs (model, serial, firmware,
//! nsid, LBA format, capacity, volatile write cache), with IO through its block device on
//! the [`super::uring`] path.
//!
//! The io_uring NVMe passthrough path (`/dev/ngXnY`, `IORING_OP_URING_CMD` with 128-byte
//! SQEs) is reported (`ng_path`) but not driven yet: it needs SQE128/CQE32 rings on the
//! reactors; see ARCHITECTURE.md "open items".
//!
//! Must never: claim the device (that is [`super::claim`]'s job) or probe its contents.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::sysfs::{self, NvmeIdentity, SysRoot};
use super::uring::{OpenError, UringDevice};
use super::{BlockDevice, Channel, Geometry};
use crate::reactor::Reactor;

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
}

impl NvmeDevice {
    /// Opens the namespace at `path` (`/dev/nvmeXnY`).
    pub fn open(path: &Path) -> Result<Self, NvmeError> {
        Self::open_in(&SysRoot::host(), path)
    }

    /// As [`Self::open`], reading identity from `root`.
    pub fn open_in(root: &SysRoot, path: &Path) -> Result<Self, NvmeError> {
        let info = identify(root, path)?;
        let io = UringDevice::open(path)?;
        Ok(Self { info, io })
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
        self.io.open_channel(rx)
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
