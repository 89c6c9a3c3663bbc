//! Why a CSI call failed, and the one place each reason becomes a gRPC status code
//! (`impl From<Error> for Status`), with the codes the CSI spec names for it.
//!
//! Owns: [`Error`]. Must never: invent a code elsewhere; a daemon error keeps the
//! daemon's code (its codes already mean what CSI's do, `coreblk.v1/common.proto`).

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::ids::CsiId;

/// A failed CSI call. `rpc` names the CSI call in every message.
#[derive(Debug)]
pub enum Error {
    /// A required field is empty: INVALID_ARGUMENT.
    Missing {
        /// The CSI call.
        rpc: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A field or parameter is invalid or unsupported: INVALID_ARGUMENT.
    Invalid {
        /// The CSI call.
        rpc: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// No size in the capacity range can be made: OUT_OF_RANGE.
    OutOfRange {
        /// The CSI call.
        rpc: &'static str,
        /// Why.
        reason: String,
    },
    /// The object does not exist: NOT_FOUND.
    NotFound {
        /// The CSI call.
        rpc: &'static str,
        /// The object, as a phrase (`volume "vol:…"`).
        what: String,
    },
    /// A lookup of another node's object: NOT_FOUND here, with the owner's name.
    NotHere {
        /// The CSI call.
        rpc: &'static str,
        /// The object's ID.
        id: CsiId,
        /// This node.
        here: String,
    },
    /// A change to another node's object: FAILED_PRECONDITION, with the owner's name.
    OwnedElsewhere {
        /// The CSI call.
        rpc: &'static str,
        /// The object's ID.
        id: CsiId,
        /// This node.
        here: String,
    },
    /// The volume cannot be made on this node (topology, a source on another node):
    /// RESOURCE_EXHAUSTED, so the provisioner lets the scheduler pick again.
    CannotPlace {
        /// The CSI call.
        rpc: &'static str,
        /// Why, and where it can be made.
        reason: String,
    },
    /// A page token this plugin did not hand out: ABORTED, as the spec asks.
    BadToken {
        /// The CSI call.
        rpc: &'static str,
        /// The token as given.
        token: String,
    },
    /// The request cannot be served in the node's present state (not staged, not
    /// exported, the device has not followed a resize yet): FAILED_PRECONDITION.
    Precondition {
        /// The CSI call.
        rpc: &'static str,
        /// What is missing and what to do.
        reason: String,
    },
    /// Something else is already mounted at a path the request names, or the volume is
    /// there with other settings: ALREADY_EXISTS, as the spec asks of stage and publish.
    Conflict {
        /// The CSI call.
        rpc: &'static str,
        /// What is there.
        reason: String,
    },
    /// A credential in the request (a LUKS2 passphrase) does not unlock the volume:
    /// PERMISSION_DENIED. The request is well formed (not INVALID_ARGUMENT, which gRPC
    /// keeps for arguments wrong whatever the system's state); whether the secret opens
    /// the volume depends on the volume's header.
    Denied {
        /// The CSI call.
        rpc: &'static str,
        /// What was refused and what to do.
        reason: String,
    },
    /// Another call for the same volume is in progress: ABORTED, as the spec asks.
    Pending {
        /// The CSI call.
        rpc: &'static str,
        /// The volume ID.
        volume_id: String,
    },
    /// A mount, mkfs or resize tool failed on this node: INTERNAL.
    Node {
        /// The CSI call.
        rpc: &'static str,
        /// What failed, with the tool's output.
        reason: String,
    },
    /// A snapshot did not complete inside its filesystem's frozen window (the filesystem
    /// was thawed): DEADLINE_EXCEEDED, which the snapshotter retries.
    FrozenTooLong {
        /// The CSI call.
        rpc: &'static str,
        /// What happened, and what became of the snapshot.
        reason: String,
    },
    /// The filesystem to snapshot is frozen by another process: ABORTED, retried.
    AlreadyFrozen {
        /// The CSI call.
        rpc: &'static str,
        /// Which filesystem, and what to do.
        reason: String,
    },
    /// Not offered by this plugin or mode: UNIMPLEMENTED.
    Unimplemented {
        /// The CSI call.
        rpc: &'static str,
        /// Why, and what to use instead.
        reason: String,
    },
    /// The daemon answered with an error (its code), or could not be reached
    /// (UNAVAILABLE, which the sidecars retry).
    Daemon {
        /// The CSI call.
        rpc: &'static str,
        /// The daemon's socket.
        socket: PathBuf,
        /// Its answer.
        status: Status,
    },
}

fn elsewhere(id: &CsiId, here: &str) -> String {
    format!(
        "{} {id} lives on node {} (this is node {here}); coreblk volumes are local to one \
         node: the call must reach the coreblk plugin on node {}",
        id.kind.noun(),
        id.node_id,
        id.node_id
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Missing { rpc, field } => {
                Status::invalid_argument(format!("{rpc}: {field} is required"))
            }
            Error::Invalid { rpc, reason } => Status::invalid_argument(format!("{rpc}: {reason}")),
            Error::OutOfRange { rpc, reason } => Status::out_of_range(format!("{rpc}: {reason}")),
            Error::NotFound { rpc, what } => {
                Status::not_found(format!("{rpc}: {what} does not exist"))
            }
            Error::NotHere { rpc, id, here } => {
                Status::not_found(format!("{rpc}: {}", elsewhere(&id, &here)))
            }
            Error::OwnedElsewhere { rpc, id, here } => {
                Status::failed_precondition(format!("{rpc}: {}", elsewhere(&id, &here)))
            }
            Error::CannotPlace { rpc, reason } => {
                Status::resource_exhausted(format!("{rpc}: {reason}"))
            }
            Error::BadToken { rpc, token } => Status::aborted(format!(
                "{rpc}: starting_token {token:?} is not one this plugin handed out; list again \
                 from the start"
            )),
            Error::Precondition { rpc, reason } => {
                Status::failed_precondition(format!("{rpc}: {reason}"))
            }
            Error::Conflict { rpc, reason } => Status::already_exists(format!("{rpc}: {reason}")),
            Error::Pending { rpc, volume_id } => Status::aborted(format!(
                "{rpc}: another call for volume {volume_id} is in progress on this node; retry \
                 once it has finished"
            )),
            Error::Node { rpc, reason } => Status::internal(format!("{rpc}: {reason}")),
            Error::Denied { rpc, reason } => Status::permission_denied(format!("{rpc}: {reason}")),
            Error::FrozenTooLong { rpc, reason } => {
                Status::deadline_exceeded(format!("{rpc}: {reason}"))
            }
            Error::AlreadyFrozen { rpc, reason } => Status::aborted(format!("{rpc}: {reason}")),
            Error::Unimplemented { rpc, reason } => {
                Status::unimplemented(format!("{rpc}: {reason}"))
            }
            Error::Daemon {
                rpc,
                socket,
                status,
            } => match status.code() {
                // Down, starting (importing pools) or stopping.
                Code::Unavailable => Status::unavailable(format!(
                    "{rpc}: coreblkd at {} is unavailable ({}); retry once the coreblkd pod on \
                     this node runs and has imported its pools",
                    socket.display(),
                    status.message()
                )),
                code => Status::new(code, format!("{rpc}: coreblkd: {}", status.message())),
            },
        }
    }
}

/// The message that names the node holding `id` (for errors built around it).
pub fn elsewhere_message(id: &CsiId, here: &str) -> String {
    elsewhere(id, here)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    #[test]
    fn each_reason_has_its_code_and_names_the_call() {
        let id = CsiId::new(
            Kind::Volume,
            "node-b",
            "0f8e5a2c-1b2d-4e3f-8a9b-0c1d2e3f4a5b",
        );
        let here = "node-a".to_owned();
        let rpc = "CreateVolume";
        let cases = [
            (Error::Missing { rpc, field: "name" }, Code::InvalidArgument),
            (
                Error::Invalid {
                    rpc,
                    reason: "x".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::OutOfRange {
                    rpc,
                    reason: "x".into(),
                },
                Code::OutOfRange,
            ),
            (
                Error::NotFound {
                    rpc,
                    what: "volume \"v\"".into(),
                },
                Code::NotFound,
            ),
            (
                Error::NotHere {
                    rpc,
                    id: id.clone(),
                    here: here.clone(),
                },
                Code::NotFound,
            ),
            (
                Error::OwnedElsewhere {
                    rpc,
                    id: id.clone(),
                    here: here.clone(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::CannotPlace {
                    rpc,
                    reason: "x".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                Error::BadToken {
                    rpc,
                    token: "t".into(),
                },
                Code::Aborted,
            ),
            (
                Error::Unimplemented {
                    rpc,
                    reason: "x".into(),
                },
                Code::Unimplemented,
            ),
            (
                Error::Precondition {
                    rpc,
                    reason: "x".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Conflict {
                    rpc,
                    reason: "x".into(),
                },
                Code::AlreadyExists,
            ),
            (
                Error::Pending {
                    rpc,
                    volume_id: "v".into(),
                },
                Code::Aborted,
            ),
            (
                Error::Node {
                    rpc,
                    reason: "x".into(),
                },
                Code::Internal,
            ),
            (
                Error::FrozenTooLong {
                    rpc,
                    reason: "x".into(),
                },
                Code::DeadlineExceeded,
            ),
            (
                Error::AlreadyFrozen {
                    rpc,
                    reason: "x".into(),
                },
                Code::Aborted,
            ),
            (
                Error::Daemon {
                    rpc,
                    socket: PathBuf::from("/run/coreblk/coreblkd.sock"),
                    status: Status::already_exists("volume v exists with size 1"),
                },
                Code::AlreadyExists,
            ),
            (
                Error::Daemon {
                    rpc,
                    socket: PathBuf::from("/run/coreblk/coreblkd.sock"),
                    status: Status::unavailable("connection refused"),
                },
                Code::Unavailable,
            ),
        ];
        for (e, code) in cases {
            let shown = format!("{e:?}");
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{shown}");
            assert!(s.message().starts_with("CreateVolume: "), "{}", s.message());
        }
        let s = Status::from(Error::OwnedElsewhere { rpc, id, here });
        assert!(
            s.message().contains("lives on node node-b"),
            "{}",
            s.message()
        );
    }
}
