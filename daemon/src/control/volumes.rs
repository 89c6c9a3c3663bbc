//! The `Volumes` service: create (idempotent by name), get, list (by pool and labels,
//! paginated), delete, resize (grow), set labels. Rollback and inflate answer
//! UNIMPLEMENTED until the control plane serves snapshots and clones; so do thick volumes.
//!
//! Must never: create a volume the store could not record (its own name and label limits
//! are checked here too, with the rule in the error).

use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::error::{Error, Result};
use super::names::{validate_labels, validate_name};
use super::page::paginate;
use super::pools::label_map;
use super::server::Shared;
use super::store::{VolumeInfo, VolumeSpec, MAX_VOLUME_BYTES};
use crate::lvs::pool::validate_meta;

/// Volume sizes are multiples of this.
pub const VOLUME_BLOCK_BYTES: u64 = 4096;

/// A volume as the API reports it.
#[must_use]
pub fn volume_message(v: &VolumeInfo) -> pb::Volume {
    let state = if v.importing {
        pb::VolumeState::Importing
    } else {
        pb::VolumeState::Ready
    };
    pb::Volume {
        uuid: v.uuid.to_string(),
        name: v.name.clone(),
        pool_uuid: v.pool_uuid.to_string(),
        pool_name: v.pool_name.clone(),
        size_bytes: v.size_bytes,
        // TODO(issue 10): the store has no per-volume allocation count yet.
        allocated_bytes: 0,
        unique_bytes: 0,
        thick: v.thick,
        state: state.into(),
        never_written: !v.written,
        source_snapshot_uuid: String::new(),
        source_volume_uuid: String::new(),
        device_path: String::new(),
        // TODO(issue 10): the store does not record creation times.
        create_time: None,
        labels: v.labels.clone().into_iter().collect(),
    }
}

/// Checks a new volume's name, size and labels against the API's rules and the store's.
///
/// # Errors
/// [`Error::InvalidName`] or [`Error::InvalidArgument`] stating the rule.
pub fn volume_spec(
    pool: String,
    name: String,
    size_bytes: u64,
    labels: std::collections::HashMap<String, String>,
) -> Result<VolumeSpec> {
    validate_name("volume", &name)?;
    validate_labels(&labels)?;
    if pool.is_empty() {
        return Err(Error::InvalidArgument {
            field: "pool",
            reason: "name the pool (name or UUID; `coreblk pool list` shows them)".to_owned(),
        });
    }
    if size_bytes == 0
        || !size_bytes.is_multiple_of(VOLUME_BLOCK_BYTES)
        || size_bytes > MAX_VOLUME_BYTES
    {
        return Err(Error::InvalidArgument {
            field: "size_bytes",
            reason: format!(
                "{size_bytes} is not a non-zero multiple of {VOLUME_BLOCK_BYTES} up to {MAX_VOLUME_BYTES}"
            ),
        });
    }
    let labels = label_map(labels);
    validate_meta(&name, &labels).map_err(|reason| Error::InvalidArgument {
        field: "labels",
        reason: format!("{reason} (the volume store's limit)"),
    })?;
    Ok(VolumeSpec {
        pool,
        name,
        size_bytes,
        labels,
    })
}

/// The `Volumes` service.
#[derive(Debug)]
pub struct VolumesService {
    shared: Arc<Shared>,
}

impl VolumesService {
    /// A service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn check(&self) -> Result<(), Status> {
        self.shared.check_serving()?;
        self.shared.store.check_ready()?;
        Ok(())
    }

    async fn lacks(&self, volume: &str, rpc: &'static str, feature: &'static str) -> Status {
        if let Err(e) = self.shared.store.volume(volume).await {
            return e.into();
        }
        Error::StoreLacks { rpc, feature }.into()
    }
}

#[tonic::async_trait]
impl pb::volumes_server::Volumes for VolumesService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        if r.source.is_some() {
            return Err(Error::StoreLacks {
                rpc: "CreateVolume",
                feature: "clones (of a snapshot or a volume) are not wired from the volume store into the API",
            }
            .into());
        }
        if r.thick {
            return Err(Error::StoreLacks {
                rpc: "CreateVolume",
                feature: "thick volumes (space reserved up front); create it thin",
            }
            .into());
        }
        let spec = volume_spec(r.pool, r.name, r.size_bytes, r.labels)?;
        let (v, _created) = self.shared.store.create_volume(spec).await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let v = self
            .shared
            .store
            .volume(&request.into_inner().volume)
            .await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.check()?;
        let r = request.into_inner();
        let pool = (!r.pool.is_empty()).then_some(r.pool.as_str());
        let mut volumes = self.shared.store.volumes(pool).await?;
        volumes.retain(|v| {
            r.label_selector
                .iter()
                .all(|(k, want)| v.labels.get(k) == Some(want))
        });
        let (page, next) = paginate(volumes, r.page_size, &r.page_token, |v| v.name.clone())?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: page.iter().map(volume_message).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.check()?;
        self.shared
            .store
            .delete_volume(&request.into_inner().volume)
            .await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn resize_volume(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        if r.size_bytes == 0
            || !r.size_bytes.is_multiple_of(VOLUME_BLOCK_BYTES)
            || r.size_bytes > MAX_VOLUME_BYTES
        {
            return Err(Error::InvalidArgument {
                field: "size_bytes",
                reason: format!(
                    "{} is not a non-zero multiple of {VOLUME_BLOCK_BYTES} up to {MAX_VOLUME_BYTES}",
                    r.size_bytes
                ),
            }
            .into());
        }
        let v = self
            .shared
            .store
            .resize_volume(&r.volume, r.size_bytes)
            .await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn set_volume_labels(
        &self,
        request: Request<pb::SetVolumeLabelsRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        validate_labels(&r.set)?;
        let v = self
            .shared
            .store
            .set_volume_labels(&r.volume, label_map(r.set), &r.remove)
            .await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn rollback_volume(
        &self,
        request: Request<pb::RollbackVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        Err(self
            .lacks(
                &r.volume,
                "RollbackVolume",
                "rollback needs snapshots, which the API does not serve yet",
            )
            .await)
    }

    async fn inflate_volume(
        &self,
        request: Request<pb::InflateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        Err(self
            .lacks(
                &r.volume,
                "InflateVolume",
                "inflating needs clones, which the API does not create yet",
            )
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn specs_follow_the_api_and_store_rules() {
        let ok = volume_spec("p".into(), "v".into(), 1 << 20, HashMap::new()).expect("ok");
        assert_eq!(ok.size_bytes, 1 << 20);
        for (pool, name, size) in [
            ("", "v", 4096),
            ("p", "", 4096),
            ("p", "v", 0),
            ("p", "v", 4095),
            ("p", "v", MAX_VOLUME_BYTES + 4096),
        ] {
            let e =
                volume_spec(pool.into(), name.into(), size, HashMap::new()).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        // The API allows 1 KiB values; the store keeps at most its own limit.
        let long = HashMap::from([("k".to_owned(), "x".repeat(1000))]);
        let e = volume_spec("p".into(), "v".into(), 4096, long).expect_err("store limit");
        assert!(e.to_string().contains("volume store"), "{e}");
    }
}
