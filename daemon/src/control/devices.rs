//! The `Devices` service: list (discovery with reasons), claim (held in [`Claims`]) and
//! release, plus the conversions of discovery and claim results to their API messages.
//!
//! Must never: run discovery or a claim on the async runtime (both run `blkid` and read
//! disks: [`blocking`]); accept a relative path (it would be resolved against the daemon's
//! working directory, not the caller's).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::claims::ClaimInfo;
use super::error::{Error, Result};
use super::server::Shared;
use crate::bdev::claim::ClaimedKind;
use crate::bdev::discover::{self, Candidate, CandidateKind, RefuseReason, Signature};
use crate::bdev::sysfs::SysRoot;

/// Most extra paths one list call may name.
pub const MAX_LIST_PATHS: usize = 64;
/// Longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;

/// Runs `f` on the runtime's blocking pool.
///
/// # Errors
/// What `f` returns, or [`Error::Internal`] when it panicked.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking control-plane task failed: {e}")))?
}

/// Checks a path from a request: non-empty, absolute, bounded.
///
/// # Errors
/// [`Error::InvalidArgument`] saying what is accepted.
pub fn request_path(field: &'static str, path: &str) -> Result<PathBuf> {
    let invalid = |reason: String| Error::InvalidArgument { field, reason };
    if path.is_empty() {
        return Err(invalid("no path given".to_owned()));
    }
    if path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(invalid(format!(
            "not a usable path (at most {MAX_PATH_BYTES} bytes, no NUL)"
        )));
    }
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(invalid(format!(
            "{path:?} is relative; the daemon needs an absolute path (the coreblk CLI makes \
             relative paths absolute for you)"
        )));
    }
    Ok(p)
}

/// The `Devices` service.
#[derive(Debug)]
pub struct DevicesService {
    shared: Arc<Shared>,
}

impl DevicesService {
    /// A service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl pb::devices_server::Devices for DevicesService {
    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        self.shared.check_serving()?;
        let req = request.into_inner();
        if req.paths.len() > MAX_LIST_PATHS {
            return Err(Error::InvalidArgument {
                field: "paths",
                reason: format!(
                    "{} paths named; at most {MAX_LIST_PATHS} per call",
                    req.paths.len()
                ),
            }
            .into());
        }
        let mut explicit = req
            .paths
            .iter()
            .map(|p| request_path("paths", p))
            .collect::<Result<Vec<_>>>()?;
        let claims = Arc::clone(&self.shared.claims);
        let devices = blocking(move || {
            for held in claims.held_file_paths() {
                if !explicit.contains(&held) {
                    explicit.push(held);
                }
            }
            let candidates = discover::discover(&SysRoot::host(), &explicit);
            let held = claims.held_device_uuids();
            Ok(candidates
                .iter()
                .map(|c| {
                    let claimed = c.label.is_some_and(|l| held.contains(&l.device_uuid));
                    device_message(c, claimed)
                })
                .collect())
        })
        .await?;
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn claim_device(
        &self,
        request: Request<pb::ClaimDeviceRequest>,
    ) -> Result<Response<pb::ClaimedDevice>, Status> {
        self.shared.check_serving()?;
        let req = request.into_inner();
        let path = request_path("path", &req.path)?;
        let claims = Arc::clone(&self.shared.claims);
        let info = blocking(move || claims.claim(&path, req.force)).await?;
        Ok(Response::new(claimed_message(&info)))
    }

    async fn release_device(
        &self,
        request: Request<pb::ReleaseDeviceRequest>,
    ) -> Result<Response<pb::ReleaseDeviceResponse>, Status> {
        self.shared.check_serving()?;
        let req = request.into_inner();
        if req.device.is_empty() {
            return Err(Error::InvalidArgument {
                field: "device",
                reason: "no device given (a path it was claimed by, or its device uuid)".to_owned(),
            }
            .into());
        }
        // A device under a pool stays: releasing it would pull the pool from under its
        // volumes.
        let by_uuid: Option<crate::bdev::label::Uuid> = req.device.parse().ok();
        let canonical = std::fs::canonicalize(&req.device).ok();
        if let Some(c) = self.shared.claims.snapshot().into_iter().find(|c| {
            Some(c.device_uuid) == by_uuid
                || c.path == Path::new(&req.device)
                || canonical.as_deref() == Some(c.path.as_path())
        }) {
            self.shared.store.check_ready()?;
            if let Some(p) = self.shared.store.pool_on_device(c.device_uuid) {
                return Err(Error::InUse {
                    what: "device",
                    name: c.path.display().to_string(),
                    reason: format!(
                        "holds pool {}; destroy the pool first (`coreblk pool destroy {}`)",
                        p.name, p.name
                    ),
                }
                .into());
            }
        }
        let claims = Arc::clone(&self.shared.claims);
        let info = blocking(move || claims.release(&req.device, req.wipe_label)).await?;
        Ok(Response::new(pb::ReleaseDeviceResponse {
            device: Some(claimed_message(&info)),
        }))
    }
}

/// A refusal reason as the API reports it.
#[must_use]
pub fn reason_message(r: &RefuseReason) -> pb::RefuseReason {
    let code = serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default();
    pb::RefuseReason {
        code,
        message: r.to_string(),
        remedy: r.remedy().to_owned(),
        force_overrides: r.force_overrides(),
    }
}

fn signature_message(s: &Signature) -> pb::Signature {
    pb::Signature {
        kind: s.kind.clone(),
        usage: s.usage.clone().unwrap_or_default(),
    }
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

/// A discovered candidate as the API reports it.
#[must_use]
pub fn device_message(c: &Candidate, claimed: bool) -> pb::Device {
    let (kind, kernel_name, nsid) = match &c.kind {
        CandidateKind::Nvme { name, nsid, .. } => (pb::DeviceKind::Nvme, name.clone(), *nsid),
        CandidateKind::Block { name, .. } => (pb::DeviceKind::Block, name.clone(), 0),
        CandidateKind::File => (pb::DeviceKind::File, String::new(), 0),
        CandidateKind::Unknown => (pb::DeviceKind::Unknown, String::new(), 0),
    };
    pb::Device {
        path: path_string(&c.path),
        kind: kind.into(),
        kernel_name,
        size_bytes: c.size_bytes,
        logical_block_size_bytes: c.logical_block_size,
        physical_block_size_bytes: c.physical_block_size,
        model: c.model.clone().unwrap_or_default(),
        serial: c.serial.clone().unwrap_or_default(),
        nsid,
        claimable: c.claimable,
        force_allowed: c.force_allowed,
        reasons: c.reasons.iter().map(reason_message).collect(),
        label_pool_uuid: c.label.map(|l| l.pool_uuid.to_string()).unwrap_or_default(),
        label_device_uuid: c
            .label
            .map(|l| l.device_uuid.to_string())
            .unwrap_or_default(),
        signatures: c.signatures.iter().map(signature_message).collect(),
        claimed,
    }
}

/// A claimed device as the API reports it.
#[must_use]
pub fn claimed_message(info: &ClaimInfo) -> pb::ClaimedDevice {
    let kind = match &info.kind {
        Some(ClaimedKind::Block { name }) if name.starts_with("nvme") => pb::DeviceKind::Nvme,
        Some(ClaimedKind::Block { .. }) => pb::DeviceKind::Block,
        Some(ClaimedKind::File) => pb::DeviceKind::File,
        None => pb::DeviceKind::Unknown,
    };
    pb::ClaimedDevice {
        path: path_string(&info.path),
        kind: kind.into(),
        pool_uuid: info.pool_uuid.to_string(),
        device_uuid: info.device_uuid.to_string(),
        size_bytes: info.size_bytes,
        logical_block_size_bytes: info.logical_block_size,
        physical_block_size_bytes: info.physical_block_size,
        direct_io: info.direct_io,
        newly_labelled: info.newly_labelled,
        overridden: info.overridden.iter().map(reason_message).collect(),
        residual_signatures: info
            .residual_signatures
            .iter()
            .map(signature_message)
            .collect(),
        present: info.present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_must_be_absolute() {
        assert!(request_path("path", "/dev/nvme0n1").is_ok());
        for bad in ["", "dev/nvme0n1", "./x", "/a\0b"] {
            let e = request_path("path", bad).expect_err(bad);
            assert!(
                matches!(e, Error::InvalidArgument { field: "path", .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn reasons_carry_their_code_and_remedy() {
        let m = reason_message(&RefuseReason::Mounted {
            device: "vdc".into(),
            mountpoint: "/srv".into(),
        });
        assert_eq!(m.code, "mounted");
        assert_eq!(m.message, "is mounted at /srv (vdc)");
        assert!(m.remedy.contains("unmount"));
        assert!(!m.force_overrides);
    }
}
