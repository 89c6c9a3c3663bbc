//! The `Snapshots` service: create (one volume, or a group of volumes of one pool at one
//! instant; idempotent by name), get, list (by volume and pool, paginated), delete (clones
//! made from it stay whole), and the byte ranges that differ between two snapshots.
//!
//! Must never: take a snapshot the store could not record (names and labels are checked
//! against the API's rules and the store's here, with the rule in the error); stream a
//! diff without a bound on each message.
//!
//! Start reading at [`SnapshotsService`]'s `create_snapshot_group`, then
//! [`Store::create_snapshots`](super::store::Store::create_snapshots).

use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tokio_stream::Iter;
use tonic::{Request, Response, Status};

use super::error::{Error, Result};
use super::names::{validate_labels, validate_name};
use super::page::paginate;
use super::pools::label_map;
use super::server::Shared;
use super::store::SnapshotInfo;
use super::volumes::timestamp;
use crate::lvs::pool::validate_meta;

/// Ranges per `DiffSnapshotsResponse` message.
pub const DIFF_BATCH: usize = 1024;

/// A snapshot as the API reports it.
#[must_use]
pub fn snapshot_message(s: &SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        uuid: s.uuid.to_string(),
        name: s.name.clone(),
        volume_uuid: s.volume_uuid.map(|u| u.to_string()).unwrap_or_default(),
        volume_name: s.volume_name.clone(),
        pool_uuid: s.pool_uuid.to_string(),
        size_bytes: s.size_bytes,
        allocated_bytes: s.allocated_bytes,
        unique_bytes: s.unique_bytes,
        group_uuid: s.group_uuid.map(|u| u.to_string()).unwrap_or_default(),
        create_time: Some(timestamp(s.created_unix)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

/// Checks a snapshot's name and its labels against the API's rules and the store's.
fn check_new(name: &str, labels: &std::collections::BTreeMap<String, String>) -> Result<()> {
    validate_name("snapshot", name)?;
    validate_meta(name, labels).map_err(|reason| Error::InvalidArgument {
        field: "labels",
        reason: format!("{reason} (the volume store's limit)"),
    })
}

/// Diff ranges as response batches of at most [`DIFF_BATCH`] ranges (at least one
/// message, so an empty diff still answers).
#[must_use]
pub fn diff_batches(ranges: &[(u64, u64)]) -> Vec<pb::DiffSnapshotsResponse> {
    let mut out: Vec<pb::DiffSnapshotsResponse> = ranges
        .chunks(DIFF_BATCH)
        .map(|c| pb::DiffSnapshotsResponse {
            changed: c
                .iter()
                .map(|&(offset_bytes, length_bytes)| pb::ByteRange {
                    offset_bytes,
                    length_bytes,
                })
                .collect(),
        })
        .collect();
    if out.is_empty() {
        out.push(pb::DiffSnapshotsResponse::default());
    }
    out
}

/// The `Snapshots` service.
#[derive(Debug)]
pub struct SnapshotsService {
    shared: Arc<Shared>,
}

impl SnapshotsService {
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

type DiffStream = Iter<std::vec::IntoIter<Result<pb::DiffSnapshotsResponse, Status>>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for SnapshotsService {
    type DiffSnapshotsStream = DiffStream;

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        self.check()?;
        let r = request.into_inner();
        validate_labels(&r.labels)?;
        let labels = label_map(r.labels);
        check_new(&r.name, &labels)?;
        if r.volume.is_empty() {
            return Err(Error::InvalidArgument {
                field: "volume",
                reason: "name the volume to snapshot (name or UUID)".to_owned(),
            }
            .into());
        }
        let (snaps, _created) = self
            .shared
            .store
            .create_snapshots(vec![(r.volume, r.name)], labels, false)
            .await?;
        let s = snaps
            .first()
            .ok_or_else(|| Error::Internal("a snapshot create returned nothing".to_owned()))?;
        Ok(Response::new(snapshot_message(s)))
    }

    async fn create_snapshot_group(
        &self,
        request: Request<pb::CreateSnapshotGroupRequest>,
    ) -> Result<Response<pb::CreateSnapshotGroupResponse>, Status> {
        self.check()?;
        let r = request.into_inner();
        validate_labels(&r.labels)?;
        let labels = label_map(r.labels);
        let mut members = Vec::new();
        for m in r.members {
            check_new(&m.name, &labels)?;
            members.push((m.volume, m.name));
        }
        let (snaps, _created) = self
            .shared
            .store
            .create_snapshots(members, labels, true)
            .await?;
        let group_uuid = snaps
            .first()
            .and_then(|s| s.group_uuid)
            .map(|u| u.to_string())
            .unwrap_or_default();
        Ok(Response::new(pb::CreateSnapshotGroupResponse {
            group_uuid,
            snapshots: snaps.iter().map(snapshot_message).collect(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        self.check()?;
        let s = self
            .shared
            .store
            .snapshot_with_usage(&request.into_inner().snapshot)
            .await?;
        Ok(Response::new(snapshot_message(&s)))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        self.check()?;
        let r = request.into_inner();
        let pool = (!r.pool.is_empty()).then_some(r.pool.as_str());
        let mut snaps = self.shared.store.snapshots(pool).await?;
        if !r.volume.is_empty() {
            // The volume may have been deleted: match the name or UUID the snapshot
            // records, and name a live volume only if one exists.
            let by_uuid = r.volume.parse().ok();
            let live = self.shared.store.volume(&r.volume).await.ok();
            snaps.retain(|s| {
                s.volume_name == r.volume
                    || (s.volume_uuid.is_some() && s.volume_uuid == by_uuid)
                    || live.as_ref().is_some_and(|v| s.volume_uuid == Some(v.uuid))
            });
            if snaps.is_empty() && live.is_none() {
                return Err(Error::NotFound {
                    what: "volume",
                    name: r.volume,
                    hint: "no volume, live or deleted, with snapshots has that name or UUID",
                }
                .into());
            }
        }
        let (page, next) = paginate(snaps, r.page_size, &r.page_token, |s| {
            format!("{}\u{0}{}", s.name, s.uuid)
        })?;
        let page = self.shared.store.with_usage(page).await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: page.iter().map(snapshot_message).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.check()?;
        self.shared
            .store
            .delete_snapshot(&request.into_inner().snapshot)
            .await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn diff_snapshots(
        &self,
        request: Request<pb::DiffSnapshotsRequest>,
    ) -> Result<Response<Self::DiffSnapshotsStream>, Status> {
        self.check()?;
        let r = request.into_inner();
        if r.base.is_empty() || r.target.is_empty() {
            return Err(Error::InvalidArgument {
                field: "base",
                reason: "name both snapshots: the older (base) and the newer (target)".to_owned(),
            }
            .into());
        }
        let store = &self.shared.store;
        let base = store.snapshot(&r.base).await?;
        let target = store.snapshot(&r.target).await?;
        let ranges = store.diff(Some(&base.object()), &target.object()).await?;
        let msgs: Vec<Result<pb::DiffSnapshotsResponse, Status>> =
            diff_batches(&ranges).into_iter().map(Ok).collect();
        Ok(Response::new(tokio_stream::iter(msgs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_are_batched_and_never_empty() {
        assert_eq!(diff_batches(&[]).len(), 1);
        let ranges: Vec<(u64, u64)> = (0..2500u64).map(|i| (i * 131_072, 65_536)).collect();
        let b = diff_batches(&ranges);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].changed.len(), DIFF_BATCH);
        assert_eq!(b[2].changed.len(), 2500 - 2 * DIFF_BATCH);
        assert_eq!(b[2].changed[0].offset_bytes, 2048 * 131_072);
    }

    #[test]
    fn names_and_labels_are_checked() {
        let l = [("k".to_owned(), "v".to_owned())].into_iter().collect();
        assert!(check_new("s1", &l).is_ok());
        for bad in ["", "-s", "a/b"] {
            let e = check_new(bad, &l).expect_err("bad name");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }
}
