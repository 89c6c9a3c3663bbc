//! The `Volumes` service: create (empty, or as a clone of a snapshot or volume;
//! idempotent by name), get, list (by pool and labels, paginated), delete (snapshots and
//! clones of it stay whole), resize (grow), set labels, roll back to a snapshot, inflate,
//! set QoS limits (online; validated here and in the store).
//! Thick volumes reserve their size in the store (clones are thin).
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
use super::store::{SourceRef, VolumeInfo, VolumeSpec, MAX_VOLUME_BYTES};
use crate::lvs::pool::validate_meta;
use crate::lvs::qos::QosLimits;

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
    let (source_snapshot_uuid, source_volume_uuid) = match v.source {
        Some(s) if s.snapshot => (s.uuid.to_string(), String::new()),
        Some(s) => (String::new(), s.uuid.to_string()),
        None => (String::new(), String::new()),
    };
    pb::Volume {
        uuid: v.uuid.to_string(),
        name: v.name.clone(),
        pool_uuid: v.pool_uuid.to_string(),
        pool_name: v.pool_name.clone(),
        size_bytes: v.size_bytes,
        allocated_bytes: v.allocated_bytes,
        unique_bytes: v.unique_bytes,
        thick: v.thick,
        state: state.into(),
        never_written: !v.written,
        source_snapshot_uuid,
        source_volume_uuid,
        device_path: v.device_path.clone().unwrap_or_default(),
        // The store records creation times of clones (and snapshots) only.
        create_time: v.created_unix.map(timestamp),
        labels: v.labels.clone().into_iter().collect(),
        qos: (!v.qos.is_unlimited()).then(|| qos_message(&v.qos)),
    }
}

/// QoS limits as the API carries them.
#[must_use]
pub fn qos_message(l: &QosLimits) -> pb::VolumeQos {
    pb::VolumeQos {
        max_iops: l.iops,
        max_read_iops: l.read_iops,
        max_write_iops: l.write_iops,
        max_bytes_per_sec: l.bytes_per_sec,
        max_read_bytes_per_sec: l.read_bytes_per_sec,
        max_write_bytes_per_sec: l.write_bytes_per_sec,
        burst_ms: l.burst_ms,
    }
}

/// QoS limits from the API (absent: unlimited), validated.
///
/// # Errors
/// INVALID_ARGUMENT naming the limit, what is wrong and the accepted range.
pub fn qos_limits(q: Option<&pb::VolumeQos>) -> Result<QosLimits> {
    let l = q.map_or_else(QosLimits::default, |q| QosLimits {
        iops: q.max_iops,
        read_iops: q.max_read_iops,
        write_iops: q.max_write_iops,
        bytes_per_sec: q.max_bytes_per_sec,
        read_bytes_per_sec: q.max_read_bytes_per_sec,
        write_bytes_per_sec: q.max_write_bytes_per_sec,
        burst_ms: q.burst_ms,
    });
    l.validate().map_err(|reason| Error::InvalidArgument {
        field: "qos",
        reason,
    })?;
    Ok(l)
}

/// Seconds since the Unix epoch as a protobuf timestamp.
#[must_use]
pub fn timestamp(unix_s: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// Checks a new volume's name, size and labels against the API's rules and the store's.
/// A clone (`source`) may leave the pool empty (its source's) and the size 0 (its
/// source's).
///
/// # Errors
/// [`Error::InvalidName`] or [`Error::InvalidArgument`] stating the rule.
pub fn volume_spec(
    pool: String,
    name: String,
    size_bytes: u64,
    labels: std::collections::HashMap<String, String>,
    source: Option<SourceRef>,
) -> Result<VolumeSpec> {
    validate_name("volume", &name)?;
    validate_labels(&labels)?;
    match &source {
        Some(SourceRef::Snapshot(s) | SourceRef::Volume(s)) if s.is_empty() => {
            return Err(Error::InvalidArgument {
                field: "source",
                reason: "name the snapshot or volume to clone (name or UUID)".to_owned(),
            })
        }
        _ => {}
    }
    let clone = source.is_some();
    if pool.is_empty() && !clone {
        return Err(Error::InvalidArgument {
            field: "pool",
            reason: "name the pool (name or UUID; `coreblk pool list` shows them)".to_owned(),
        });
    }
    let size_ok = (size_bytes == 0 && clone)
        || (size_bytes != 0
            && size_bytes.is_multiple_of(VOLUME_BLOCK_BYTES)
            && size_bytes <= MAX_VOLUME_BYTES);
    if !size_ok {
        return Err(Error::InvalidArgument {
            field: "size_bytes",
            reason: format!(
                "{size_bytes} is not a non-zero multiple of {VOLUME_BLOCK_BYTES} up to {MAX_VOLUME_BYTES}{}",
                if clone { " (0 for a clone: its source's size)" } else { "" }
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
        source,
        thick: false,
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
}

#[tonic::async_trait]
impl pb::volumes_server::Volumes for VolumesService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        if r.thick && r.source.is_some() {
            return Err(Error::InvalidArgument {
                field: "thick",
                reason: "clones are thin (they share their source's clusters); create the clone without thick, or inflate it afterwards".to_owned(),
            }
            .into());
        }
        let source = r.source.map(|s| match s {
            pb::create_volume_request::Source::SourceSnapshot(s) => SourceRef::Snapshot(s),
            pb::create_volume_request::Source::SourceVolume(v) => SourceRef::Volume(v),
        });
        let qos = qos_limits(r.qos.as_ref())?;
        let mut spec = volume_spec(r.pool, r.name, r.size_bytes, r.labels, source)?;
        spec.thick = r.thick;
        let (v, _created) = self.shared.store.create_volume(spec).await?;
        // QoS is mutable, so it is not part of the create's identity: a retried create (or
        // one interrupted between the volume and its limits) ends with the limits asked.
        let v = if v.qos == qos {
            v
        } else {
            self.shared
                .store
                .set_volume_qos(&v.uuid.to_string(), qos)
                .await?
        };
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
            .volume_with_usage(&request.into_inner().volume)
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
        let page = self.shared.store.with_usage(page).await?;
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
        let mut resp = Response::new(volume_message(&v));
        // An exported volume's device grows too where the kernel can (UPDATE_SIZE); where
        // it cannot, the answer carries why in its `coreblk-note` metadata.
        if let Some(note) = self.shared.exports.resized(v.uuid, v.size_bytes).await {
            if let Ok(val) = tonic::metadata::MetadataValue::try_from(note.as_str()) {
                resp.metadata_mut().insert("coreblk-note", val);
            }
        }
        Ok(resp)
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

    async fn set_volume_qos(
        &self,
        request: Request<pb::SetVolumeQosRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        let qos = qos_limits(r.qos.as_ref())?;
        let v = self.shared.store.set_volume_qos(&r.volume, qos).await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn rollback_volume(
        &self,
        request: Request<pb::RollbackVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let r = request.into_inner();
        let v = self
            .shared
            .store
            .rollback_volume(&r.volume, &r.snapshot)
            .await?;
        Ok(Response::new(volume_message(&v)))
    }

    async fn inflate_volume(
        &self,
        request: Request<pb::InflateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        self.check()?;
        let v = self
            .shared
            .store
            .inflate_volume(&request.into_inner().volume)
            .await?;
        Ok(Response::new(volume_message(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn specs_follow_the_api_and_store_rules() {
        let ok = volume_spec("p".into(), "v".into(), 1 << 20, HashMap::new(), None).expect("ok");
        assert_eq!(ok.size_bytes, 1 << 20);
        for (pool, name, size) in [
            ("", "v", 4096),
            ("p", "", 4096),
            ("p", "v", 0),
            ("p", "v", 4095),
            ("p", "v", MAX_VOLUME_BYTES + 4096),
        ] {
            let e = volume_spec(pool.into(), name.into(), size, HashMap::new(), None)
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
        // The API allows 1 KiB values; the store keeps at most its own limit.
        let long = HashMap::from([("k".to_owned(), "x".repeat(1000))]);
        let e = volume_spec("p".into(), "v".into(), 4096, long, None).expect_err("store limit");
        assert!(e.to_string().contains("volume store"), "{e}");
        // A clone takes its source's pool and size when they are left out.
        let src = Some(SourceRef::Snapshot("s".into()));
        let c = volume_spec(String::new(), "c".into(), 0, HashMap::new(), src).expect("clone");
        assert_eq!(c.size_bytes, 0);
        let e = volume_spec(
            String::new(),
            "c".into(),
            0,
            HashMap::new(),
            Some(SourceRef::Volume(String::new())),
        )
        .expect_err("no source named");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
