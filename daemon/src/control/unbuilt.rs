//! The services that need layers this daemon does not have yet: pools, volumes,
//! snapshots and images need the thin volume store (issue 10) and answer UNIMPLEMENTED;
//! exports need ublk (issue 12) and answer FAILED_PRECONDITION. Each says so by name, so
//! a client learns what is missing instead of getting a fake answer.
//!
//! Replace a service here with a real one as its layer lands; the API (and the CLI wired
//! to it) does not change.

use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use super::error::Error;
use super::server::Shared;

/// Stands in for every unbuilt service.
#[derive(Debug)]
pub struct Unbuilt {
    shared: Arc<Shared>,
}

impl Unbuilt {
    /// A stand-in over the daemon's shared state (it still answers UNAVAILABLE while the
    /// daemon stops).
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn refuse(&self, e: Error) -> Status {
        match self.shared.check_serving() {
            Err(stopping) => stopping,
            Ok(()) => e.into(),
        }
    }
}

macro_rules! unbuilt_service {
    ($service:path, $refusal:ident; $($method:ident($req:ty) -> $resp:ty = $rpc:literal;)*) => {
        #[tonic::async_trait]
        impl $service for Unbuilt {
            $(
                async fn $method(
                    &self,
                    _request: Request<$req>,
                ) -> Result<Response<$resp>, Status> {
                    Err(self.refuse(Error::$refusal { rpc: $rpc }))
                }
            )*
        }
    };
}

unbuilt_service! { pb::pools_server::Pools, StoreNotBuilt;
    create_pool(pb::CreatePoolRequest) -> pb::Pool = "CreatePool";
    get_pool(pb::GetPoolRequest) -> pb::Pool = "GetPool";
    list_pools(pb::ListPoolsRequest) -> pb::ListPoolsResponse = "ListPools";
    destroy_pool(pb::DestroyPoolRequest) -> pb::DestroyPoolResponse = "DestroyPool";
    verify_pool(pb::VerifyPoolRequest) -> pb::VerifyPoolResponse = "VerifyPool";
}

unbuilt_service! { pb::volumes_server::Volumes, StoreNotBuilt;
    create_volume(pb::CreateVolumeRequest) -> pb::Volume = "CreateVolume";
    get_volume(pb::GetVolumeRequest) -> pb::Volume = "GetVolume";
    list_volumes(pb::ListVolumesRequest) -> pb::ListVolumesResponse = "ListVolumes";
    delete_volume(pb::DeleteVolumeRequest) -> pb::DeleteVolumeResponse = "DeleteVolume";
    resize_volume(pb::ResizeVolumeRequest) -> pb::Volume = "ResizeVolume";
    set_volume_labels(pb::SetVolumeLabelsRequest) -> pb::Volume = "SetVolumeLabels";
    rollback_volume(pb::RollbackVolumeRequest) -> pb::Volume = "RollbackVolume";
    inflate_volume(pb::InflateVolumeRequest) -> pb::Volume = "InflateVolume";
}

unbuilt_service! { pb::exports_server::Exports, ExportsNotBuilt;
    export_volume(pb::ExportVolumeRequest) -> pb::Export = "ExportVolume";
    unexport_volume(pb::UnexportVolumeRequest) -> pb::UnexportVolumeResponse = "UnexportVolume";
    list_exports(pb::ListExportsRequest) -> pb::ListExportsResponse = "ListExports";
}

/// The stream type of an unbuilt streaming RPC (never produced).
pub type NoStream<T> = tokio_stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl pb::snapshots_server::Snapshots for Unbuilt {
    type DiffSnapshotsStream = NoStream<pb::DiffSnapshotsResponse>;

    async fn create_snapshot(
        &self,
        _request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Err(self.refuse(Error::StoreNotBuilt {
            rpc: "CreateSnapshot",
        }))
    }

    async fn create_snapshot_group(
        &self,
        _request: Request<pb::CreateSnapshotGroupRequest>,
    ) -> Result<Response<pb::CreateSnapshotGroupResponse>, Status> {
        Err(self.refuse(Error::StoreNotBuilt {
            rpc: "CreateSnapshotGroup",
        }))
    }

    async fn get_snapshot(
        &self,
        _request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Err(self.refuse(Error::StoreNotBuilt { rpc: "GetSnapshot" }))
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(self.refuse(Error::StoreNotBuilt {
            rpc: "ListSnapshots",
        }))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(self.refuse(Error::StoreNotBuilt {
            rpc: "DeleteSnapshot",
        }))
    }

    async fn diff_snapshots(
        &self,
        _request: Request<pb::DiffSnapshotsRequest>,
    ) -> Result<Response<Self::DiffSnapshotsStream>, Status> {
        Err(self.refuse(Error::StoreNotBuilt {
            rpc: "DiffSnapshots",
        }))
    }
}

#[tonic::async_trait]
impl pb::images_server::Images for Unbuilt {
    type ImportImageStream = NoStream<pb::ImportImageResponse>;
    type ExportImageStream = NoStream<pb::ExportImageResponse>;

    async fn import_image(
        &self,
        _request: Request<Streaming<pb::ImportImageRequest>>,
    ) -> Result<Response<Self::ImportImageStream>, Status> {
        Err(self.refuse(Error::StoreNotBuilt { rpc: "ImportImage" }))
    }

    async fn export_image(
        &self,
        _request: Request<pb::ExportImageRequest>,
    ) -> Result<Response<Self::ExportImageStream>, Status> {
        Err(self.refuse(Error::StoreNotBuilt { rpc: "ExportImage" }))
    }
}
