//! The control plane's error type and its one mapping to gRPC status codes.
//!
//! Owns: [`Error`] (every way a control-plane call fails, named for what went wrong and
//! carrying what a person needs to act) and `impl From<Error> for tonic::Status`, the
//! *only* place that picks a gRPC code (STYLE: one code per error, in one place).
//! Must never: build a `tonic::Status` anywhere else in the control plane.

use std::io;
use std::path::PathBuf;

use crate::bdev::claim::ClaimError;
use crate::bdev::discover::RefuseReason;
use crate::reactor::Errno;

/// Every way a control-plane call fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name breaks the naming rule.
    #[error("{what} name {name:?} is invalid: {rule}")]
    InvalidName {
        /// What was being named (`volume`, `pool`, `snapshot`).
        what: &'static str,
        /// The name as given (cut to a readable length).
        name: String,
        /// The rule, in words.
        rule: String,
    },
    /// A request field is missing or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field (`path`, `size_bytes`, `labels`).
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// Claiming (or reading) a device was refused or failed.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// A release (or another call) names a device this daemon does not hold.
    #[error(
        "device {device} is not claimed by this daemon (`coreblk device list` shows what it holds)"
    )]
    DeviceNotClaimed {
        /// The path or device UUID as given.
        device: String,
    },
    /// The call needs a feature this daemon does not serve yet (not in the volume store, or
    /// not wired into the control plane).
    #[error("{rpc}: {feature}; not served by this coreblkd yet (pools, volumes and images are)")]
    StoreLacks {
        /// The RPC that was called.
        rpc: &'static str,
        /// What is missing, in words.
        feature: &'static str,
    },
    /// The daemon is still importing its pools.
    #[error("coreblkd is importing its pools ({detail}); retry in a moment")]
    Importing {
        /// Progress, in words.
        detail: String,
    },
    /// One pool is still being imported.
    #[error("pool {pool} is being imported (recovery running); retry in a moment")]
    PoolImporting {
        /// The pool's name.
        pool: String,
    },
    /// A pool could not be imported and is not served.
    #[error("pool {pool} is not served: its import failed: {reason} (fix the device, then restart coreblkd, or destroy the pool)")]
    PoolFailed {
        /// The pool's name.
        pool: String,
        /// Why the import failed.
        reason: String,
    },
    /// The same long operation is already running on the object (one at a time).
    #[error("{op} of {what} {name:?} is already running; {reason}")]
    AlreadyRunning {
        /// `verify`.
        op: &'static str,
        /// `pool`.
        what: &'static str,
        /// The name.
        name: String,
        /// The limit, and what to do.
        reason: String,
    },
    /// No object of that name or UUID.
    #[error("{what} {name:?} not found ({hint})")]
    NotFound {
        /// `pool`, `volume`.
        what: &'static str,
        /// The name or UUID as given.
        name: String,
        /// Where to look.
        hint: &'static str,
    },
    /// A create names an existing object with other parameters.
    #[error(
        "{what} {name:?} already exists with {difference}; choose another name or delete it first"
    )]
    AlreadyExists {
        /// `pool`, `volume`.
        what: &'static str,
        /// The name.
        name: String,
        /// How the existing object differs from the request.
        difference: String,
    },
    /// The object is in a state that refuses the call.
    #[error("{what} {name:?} {reason}")]
    InUse {
        /// `pool`, `volume`, `device`.
        what: &'static str,
        /// The name.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The objects named do not go together for this call (a snapshot of another volume).
    #[error("{what} {name:?} {reason}")]
    Refused {
        /// `snapshot`, `volume`.
        what: &'static str,
        /// The name.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// No space: the pool is full or the overcommit limit forbids it.
    #[error("pool {pool}: {reason}")]
    NoSpace {
        /// The pool's name.
        pool: String,
        /// The figures, and what to do.
        reason: String,
    },
    /// A volume IO failed.
    #[error("{op} of volume {volume} at byte {offset_bytes} failed: {errno}{}", io_hint(*errno))]
    VolumeIo {
        /// `read`, `write`, `flush`.
        op: &'static str,
        /// The volume's name.
        volume: String,
        /// Where.
        offset_bytes: u64,
        /// The error.
        errno: Errno,
    },
    /// A volume-store operation failed; the store says why in words, and [`store_code`]
    /// reads the code from them.
    #[error("{op} {object}: {reason}")]
    Store {
        /// `create pool`, `import pool`, `create volume`.
        op: &'static str,
        /// The object's name.
        object: String,
        /// Why.
        reason: String,
    },
    /// The object is exported as a block device; the call would change or remove what
    /// the device serves.
    #[error("{what} {name:?} is exported as {device}; unexport it first (`coreblk unexport`)")]
    Exported {
        /// `volume`, `snapshot`, `pool`.
        what: &'static str,
        /// The name.
        name: String,
        /// The device path.
        device: String,
    },
    /// This node cannot make ublk exports (no driver, or no usable data path).
    #[error("{rpc}: ublk exports are not available on this node: {reason}")]
    ExportsUnavailable {
        /// The RPC that was called.
        rpc: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// A ublk control command or queue set-up failed.
    #[error("{op} of ublk device {dev}: {reason}")]
    Ublk {
        /// `add`, `start`, `stop`...
        op: &'static str,
        /// The device (`/dev/ublkbN`, or `new` before it has an id).
        dev: String,
        /// What went wrong.
        reason: String,
    },
    /// The node serves as many exports as it is configured for.
    #[error("this node already serves {limit} exports, its limit (export.max_exports in coreblkd's config file); unexport one, or raise the limit and restart coreblkd")]
    ExportLimit {
        /// `export.max_exports`.
        limit: u32,
    },
    /// An image import failed part way; its new volume stays importing.
    #[error("{source}; volume {volume:?} stays importing: resume the import (`coreblk image import --resume`) or delete the volume")]
    ImportInterrupted {
        /// The importing volume.
        volume: String,
        /// Why the import failed (it picks the code).
        source: Box<Error>,
    },
    /// The daemon is stopping.
    #[error("coreblkd is stopping; retry once it (or its successor) is serving again")]
    ShuttingDown,
    /// Recording the claimed devices on disk failed.
    #[error("cannot record claimed devices in {}: {source} (check that the state directory is writable)", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bug or an unexpected failure inside the daemon.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a person can do about a failed volume IO, for the errnos that have an answer.
fn io_hint(errno: Errno) -> &'static str {
    if errno.0 == libc::ENOSPC {
        "; the volume's pool is full (`coreblk pool get` shows its space): delete \
         snapshots or volumes in it, then retry"
    } else {
        ""
    }
}

impl Error {
    /// The gRPC code this error maps to.
    #[must_use]
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidName { .. } | Self::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Self::Claim(ClaimError::Refused { reasons, .. }) => {
                if reasons.iter().all(|r| matches!(r, RefuseReason::NotFound)) {
                    tonic::Code::NotFound
                } else if reasons.iter().all(|r| {
                    matches!(
                        r,
                        RefuseReason::NotBlockOrFile { .. } | RefuseReason::UblkDevice
                    )
                }) {
                    tonic::Code::InvalidArgument
                } else {
                    tonic::Code::FailedPrecondition
                }
            }
            Self::Claim(ClaimError::Io { .. }) | Self::State { .. } | Self::Internal(_) => {
                tonic::Code::Internal
            }
            Self::DeviceNotClaimed { .. } => tonic::Code::NotFound,
            Self::StoreLacks { .. } => tonic::Code::Unimplemented,
            Self::Importing { .. } | Self::PoolImporting { .. } => tonic::Code::Unavailable,
            Self::PoolFailed { .. } | Self::InUse { .. } | Self::Refused { .. } => {
                tonic::Code::FailedPrecondition
            }
            Self::NotFound { .. } => tonic::Code::NotFound,
            Self::AlreadyRunning { .. } => tonic::Code::Aborted,
            Self::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            Self::NoSpace { .. } => tonic::Code::ResourceExhausted,
            Self::VolumeIo { errno, .. } if errno.0 == libc::ENOSPC => {
                tonic::Code::ResourceExhausted
            }
            Self::Store { reason, .. } => store_code(reason),
            Self::VolumeIo { .. } => tonic::Code::Internal,
            Self::Exported { .. } | Self::ExportsUnavailable { .. } => {
                tonic::Code::FailedPrecondition
            }
            Self::Ublk { .. } => tonic::Code::Internal,
            Self::ExportLimit { .. } => tonic::Code::ResourceExhausted,
            Self::ShuttingDown => tonic::Code::Unavailable,
            Self::ImportInterrupted { source, .. } => source.code(),
        }
    }
}

/// The code a volume-store failure calls for, read from its message. The store reports
/// errors as strings (`lvs/volume.rs`); these are the phrases it uses. Anything else is a
/// failure inside the store: INTERNAL.
#[must_use]
pub fn store_code(reason: &str) -> tonic::Code {
    let has = |needles: &[&str]| needles.iter().any(|n| reason.contains(n));
    if reason.contains(&format!("(errno {})", libc::ENOSPC))
        || has(&["at most", "does not fit", "no space", "overcommit limit"])
    {
        tonic::Code::ResourceExhausted
    } else if has(&[" exists", "created twice"]) {
        tonic::Code::AlreadyExists
    } else if has(&[
        "deleted meanwhile",
        "was deleted",
        "not running on this reactor",
    ]) {
        tonic::Code::Aborted
    } else if reason.starts_with("no ") && has(&["with id", "snapshot with id"])
        || has(&["unknown id", "unknown volume", "unknown snapshot"])
    {
        tonic::Code::NotFound
    } else if has(&["was not taken of"]) {
        tonic::Code::FailedPrecondition
    } else if has(&[
        "must be",
        "cannot hold",
        "larger than",
        "is a snapshot",
        "named twice",
        "needs at least",
        "not supported",
        "volume name",
        "label",
    ]) {
        tonic::Code::InvalidArgument
    } else {
        tonic::Code::Internal
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if code == tonic::Code::Internal {
            tracing::error!(error = %e, "control-plane call failed");
        }
        tonic::Status::new(code, e.to_string())
    }
}

/// Shorthand for control-plane results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(reasons: Vec<RefuseReason>) -> Error {
        Error::Claim(ClaimError::Refused {
            path: "/dev/x".into(),
            reasons,
            force: false,
        })
    }

    #[test]
    fn each_error_has_one_code_and_keeps_its_message() {
        assert_eq!(
            refused(vec![RefuseReason::NotFound]).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            refused(vec![RefuseReason::UblkDevice]).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            refused(vec![RefuseReason::DamagedLabel]).code(),
            tonic::Code::FailedPrecondition
        );
        let status = tonic::Status::from(Error::StoreLacks {
            rpc: "CreateSnapshot",
            feature: "snapshots",
        });
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(status.message().starts_with("CreateSnapshot: snapshots"));
        let status = tonic::Status::from(Error::VolumeIo {
            op: "write",
            volume: "v".into(),
            offset_bytes: 0,
            errno: Errno(libc::ENOSPC),
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("pool is full") && status.message().contains("delete"),
            "{}",
            status.message()
        );
        let status = tonic::Status::from(Error::VolumeIo {
            op: "read",
            volume: "v".into(),
            offset_bytes: 0,
            errno: Errno(libc::EIO),
        });
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            !status.message().contains("pool is full"),
            "{}",
            status.message()
        );
        // An interrupted import keeps its cause's code and says what to do with the volume.
        let status = tonic::Status::from(Error::ImportInterrupted {
            volume: "img".into(),
            source: Box::new(Error::VolumeIo {
                op: "write",
                volume: "img".into(),
                offset_bytes: 4096,
                errno: Errno(libc::ENOSPC),
            }),
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("pool is full")
                && status.message().contains("stays importing")
                && status.message().contains("--resume"),
            "{}",
            status.message()
        );
        assert_eq!(
            tonic::Status::from(Error::Importing { detail: "x".into() }).code(),
            tonic::Code::Unavailable
        );
        let status = tonic::Status::from(Error::ExportsUnavailable {
            rpc: "ExportVolume",
            reason: "no ublk driver".to_owned(),
        });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let status = tonic::Status::from(Error::Exported {
            what: "volume",
            name: "v1".to_owned(),
            device: "/dev/ublkb0".to_owned(),
        });
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("/dev/ublkb0"),
            "{}",
            status.message()
        );
        assert_eq!(
            tonic::Status::from(Error::ShuttingDown).code(),
            tonic::Code::Unavailable
        );
        let status = tonic::Status::from(Error::ExportLimit { limit: 3 });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("3 exports") && status.message().contains("max_exports"),
            "{}",
            status.message()
        );
        for (reason, code) in [
            ("no volume or snapshot with id 7", tonic::Code::NotFound),
            (
                "no snapshot or volume with id 7 to clone",
                tonic::Code::NotFound,
            ),
            ("a snapshot named \"s\" exists", tonic::Code::AlreadyExists),
            (
                "the pool holds 4096 volumes and snapshots; at most 4096: delete some first",
                tonic::Code::ResourceExhausted,
            ),
            (
                "journal: No space left on device (errno 28)",
                tonic::Code::ResourceExhausted,
            ),
            (
                "snapshot id 3 was not taken of volume id 1",
                tonic::Code::FailedPrecondition,
            ),
            (
                "id 3 is a snapshot; inflate a volume",
                tonic::Code::InvalidArgument,
            ),
            ("volume id 1 was deleted meanwhile", tonic::Code::Aborted),
            (
                "journal: Input/output error (errno 5)",
                tonic::Code::Internal,
            ),
        ] {
            let e = Error::Store {
                op: "x",
                object: "o".into(),
                reason: reason.into(),
            };
            assert_eq!(e.code(), code, "{reason}");
        }
        let status = tonic::Status::from(Error::DeviceNotClaimed {
            device: "/dev/nvme9n1".into(),
        });
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().contains("/dev/nvme9n1"));
    }
}
