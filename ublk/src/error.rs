//! The crate's one error type. Each variant names what went wrong and what to do.

use std::path::PathBuf;

use crate::Features;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/ublk-control` does not exist.
    #[error(
        "/dev/ublk-control is missing: the ublk driver is not loaded (load it: modprobe ublk_drv)"
    )]
    NoControl,
    /// A device node or the control node could not be opened.
    #[error("cannot open {path}: {source}{}", open_hint(.source))]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel refused a command.
    #[error("ublk {op} of {} failed: {} (errno {errno}){}", dev_name(*.dev_id), errno_text(*.errno), hint(op, *.errno))]
    Io {
        op: &'static str,
        dev_id: u32,
        errno: i32,
    },
    /// TRY_STOP_DEV: the block device is open (mounted, or held by a process).
    #[error("the ublk block device is open (mounted or held by a process): unmount or close it first, or stop it by force")]
    Busy,
    /// The running kernel does not offer a feature the call needs.
    #[error("the running kernel does not offer {what} (its ublk features: {kernel_features})")]
    Unsupported {
        what: &'static str,
        kernel_features: Features,
    },
    /// No such device id.
    #[error("ublk device {0} does not exist (see /sys/class/ublk-char)")]
    NotFound(u32),
    /// Device parameters the kernel would refuse.
    #[error("invalid ublk device parameters: {0}")]
    InvalidParams(String),
    /// A request argument out of range (queue count, depth, pid ...).
    #[error("invalid ublk request: {0}")]
    InvalidArg(String),
    /// The control ring could not be set up or waited on.
    #[error("io_uring for /dev/ublk-control: {0} (needs Linux >= 6.0 with io_uring enabled: sysctl kernel.io_uring_disabled=0)")]
    Ring(std::io::Error),
    /// The IO descriptor array of a queue could not be mapped.
    #[error("mmap of the IO descriptors of queue {q_id} (depth {queue_depth}): {source}")]
    MapDescs {
        q_id: u16,
        queue_depth: u16,
        source: std::io::Error,
    },
}

impl Error {
    /// The negative errno the kernel answered, when it did.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { errno, .. } => Some(*errno),
            Error::Busy => Some(libc::EBUSY),
            Error::NotFound(_) => Some(libc::ENODEV),
            _ => None,
        }
    }
}

fn dev_name(dev_id: u32) -> String {
    if dev_id == u32::MAX {
        "a new device".to_string()
    } else {
        format!("device {dev_id}")
    }
}

/// `strerror` without the "(os error N)" suffix std adds: the message shows the errno.
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn open_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => " (ublk needs root or CAP_SYS_ADMIN)",
        std::io::ErrorKind::NotFound => {
            " (the device is gone, or the ublk driver is not loaded: modprobe ublk_drv)"
        }
        _ => "",
    }
}

/// What a person can do about an errno from a given command (`op` is the command name).
fn hint(op: &str, errno: i32) -> &'static str {
    match (op, errno) {
        (_, libc::EPERM) => "; ublk control needs CAP_SYS_ADMIN (run coreblkd as root)",
        ("SET_PARAMS", libc::EACCES) => {
            "; parameters can only be set before START (the device is live)"
        }
        ("SET_PARAMS", libc::EINVAL) => "; the kernel refused the parameters (see dmesg)",
        ("ADD_DEV", libc::EEXIST) => "; that device id is taken (omit it to let the kernel pick)",
        ("ADD_DEV", libc::EINVAL) => "; the kernel refused the flags or sizes (see dmesg)",
        ("START_DEV", libc::EEXIST) => "; the device is already started",
        ("START_DEV" | "END_USER_RECOVERY", libc::EINVAL) => {
            "; pass the pid (tgid) of the process whose threads issued FETCH"
        }
        ("START_USER_RECOVERY", libc::EBUSY) => {
            "; the previous server has not exited yet, or the device is not in a recoverable state"
        }
        ("QUIESCE_DEV", libc::EBUSY) => {
            "; in-flight requests did not finish within the timeout; retry"
        }
        ("QUIESCE_DEV", libc::EINVAL) => "; quiesce needs a live device created with USER_RECOVERY",
        ("UPDATE_SIZE", libc::EINVAL) => "; the device must be started and live",
        (_, libc::EINTR) => "; interrupted, retry",
        (_, libc::EOPNOTSUPP | libc::ENOTTY) => "; this kernel does not know the command",
        (_, libc::ENODEV) => "; the device does not exist",
        _ => "",
    }
}
