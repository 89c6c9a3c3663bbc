//! The CSI Controller service on the node plugin: volumes and snapshots of this node's
//! daemon, by CSI name and ID (`ids.rs`), idempotent as the spec asks, each call mapped
//! onto one or a few daemon calls. CreateSnapshot of a volume whose filesystem is mounted
//! on this node freezes that filesystem for the instant of the daemon's snapshot
//! (`freeze.rs`), so the snapshot is filesystem-consistent.
//!
//! Owns: [`Controller`] (the node plugin's) and [`CentralController`] (the stateless
//! central instance csi-resizer talks to: capabilities only, no EXPAND_VOLUME, so
//! Kubernetes takes the node-expansion path; DESIGN §7). Must never: hold state of its own,
//! or act on an ID that names another node (it answers with that node's name instead).
//!
//! Start reading at `create_volume`.

use std::collections::HashMap;

use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::controller_service_capability::rpc::Type as Cap;
use tonic::{Code, Request, Response, Status};

use crate::busy::Busy;
use crate::daemon::Daemon;
use crate::error::{elsewhere_message, Error};
use crate::freeze::{self, FreezeError, Frozen, Fsfreeze, Window};
use crate::fsopts;
use crate::ids::{CsiId, Kind};
use crate::mounts;
use crate::params::{
    check_capabilities, node_topology, topology_allows, volume_size, SizeError, VolumeParams,
    DEFAULT_POOL, K8S_PREFIX, KEPT_AS_LABELS, PARAM_THICK, TOPOLOGY_KEY,
};
use crate::qos::QosParams;

/// Most entries a list page holds (the daemon's page limit).
const MAX_PAGE_ENTRIES: u32 = 1000;
/// The volume context key that names the volume's pool.
pub const CONTEXT_POOL: &str = "csi.coreblk.io/pool";

/// The capabilities of the node plugin's controller.
const CAPS: [Cap; 10] = [
    Cap::CreateDeleteVolume,
    Cap::ListVolumes,
    Cap::GetCapacity,
    Cap::CreateDeleteSnapshot,
    Cap::ListSnapshots,
    Cap::CloneVolume,
    Cap::VolumeCondition,
    Cap::GetVolume,
    Cap::SingleNodeMultiWriter,
    Cap::ModifyVolume,
];

fn caps_response(caps: &[Cap]) -> csi::ControllerGetCapabilitiesResponse {
    csi::ControllerGetCapabilitiesResponse {
        capabilities: caps
            .iter()
            .map(|c| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc {
                        r#type: (*c).into(),
                    },
                )),
            })
            .collect(),
    }
}

/// Where an ID points.
enum Located {
    /// At this node's daemon: the object's UUID.
    Here(String),
    /// At another node's daemon.
    Elsewhere(CsiId),
    /// Not an ID of this driver: no such object exists.
    NoSuchId,
}

/// The node plugin's Controller service.
#[derive(Debug, Clone)]
pub struct Controller {
    daemon: Daemon,
    node_id: String,
    /// Volumes with a call in progress, shared with the Node service: a snapshot holds
    /// its volume while it may freeze the filesystem.
    busy: Busy,
    /// TEST ONLY: the wait inside each frozen window (`freeze::TEST_HOLD_ENV`).
    freeze_hold: std::time::Duration,
}

fn required(rpc: &'static str, field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        Err(Error::Missing { rpc, field })
    } else {
        Ok(())
    }
}

/// Whether a volume of `size_bytes` meets a capacity range.
fn size_fits(size_bytes: u64, range: Option<&csi::CapacityRange>) -> bool {
    let Some(r) = range else { return true };
    let at_least = u64::try_from(r.required_bytes).unwrap_or(u64::MAX);
    let at_most = match u64::try_from(r.limit_bytes) {
        Ok(0) => u64::MAX,
        Ok(n) => n,
        Err(_) => 0,
    };
    size_bytes >= at_least && size_bytes <= at_most
}

/// A page token this driver handed out: the daemon's (hex of the last name returned).
fn token_ok(token: &str) -> bool {
    token.len().is_multiple_of(2) && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn page_size(rpc: &'static str, max_entries: i32) -> Result<u32, Error> {
    let n = u32::try_from(max_entries).map_err(|_| Error::Invalid {
        rpc,
        reason: format!(
            "max_entries is negative ({max_entries}); give 0 (no limit) or a positive count"
        ),
    })?;
    Ok(n.min(MAX_PAGE_ENTRIES))
}

fn volume_condition(v: &pb::Volume) -> csi::VolumeCondition {
    match v.state() {
        pb::VolumeState::Ready => csi::VolumeCondition {
            abnormal: false,
            message: "volume is ready".to_owned(),
        },
        pb::VolumeState::Importing => csi::VolumeCondition {
            abnormal: true,
            message: "volume is being filled by an image import; resume the import or delete \
                      the volume"
                .to_owned(),
        },
        pb::VolumeState::Unspecified => csi::VolumeCondition {
            abnormal: true,
            message: "coreblkd reports no state for the volume".to_owned(),
        },
    }
}

impl Controller {
    /// The controller of node `node_id`, whose daemon is `daemon`; `busy` is shared with
    /// the Node service.
    pub fn new(daemon: Daemon, node_id: &str, busy: Busy) -> Self {
        Self {
            daemon,
            node_id: node_id.to_owned(),
            busy,
            freeze_hold: freeze::test_hold(),
        }
    }

    fn err(&self, rpc: &'static str, status: Status) -> Error {
        Error::Daemon {
            rpc,
            socket: self.daemon.socket().to_path_buf(),
            status,
        }
    }

    fn owned_elsewhere(&self, rpc: &'static str, id: CsiId) -> Error {
        Error::OwnedElsewhere {
            rpc,
            id,
            here: self.node_id.clone(),
        }
    }

    fn not_here(&self, rpc: &'static str, id: CsiId) -> Error {
        Error::NotHere {
            rpc,
            id,
            here: self.node_id.clone(),
        }
    }

    fn locate(&self, kind: Kind, text: &str) -> Located {
        match CsiId::parse(kind, text) {
            None => Located::NoSuchId,
            Some(id) if id.node_id == self.node_id => Located::Here(id.uuid),
            Some(id) => Located::Elsewhere(id),
        }
    }

    fn volume_id(&self, uuid: &str) -> String {
        CsiId::new(Kind::Volume, &self.node_id, uuid).to_string()
    }

    fn snapshot_id(&self, uuid: &str) -> String {
        CsiId::new(Kind::Snapshot, &self.node_id, uuid).to_string()
    }

    fn content_source(&self, v: &pb::Volume) -> Option<csi::VolumeContentSource> {
        use csi::volume_content_source as src;
        let t = if !v.source_snapshot_uuid.is_empty() {
            src::Type::Snapshot(src::SnapshotSource {
                snapshot_id: self.snapshot_id(&v.source_snapshot_uuid),
            })
        } else if !v.source_volume_uuid.is_empty() {
            src::Type::Volume(src::VolumeSource {
                volume_id: self.volume_id(&v.source_volume_uuid),
            })
        } else {
            return None;
        };
        Some(csi::VolumeContentSource { r#type: Some(t) })
    }

    fn csi_volume(&self, v: &pb::Volume) -> csi::Volume {
        csi::Volume {
            capacity_bytes: i64::try_from(v.size_bytes).unwrap_or(i64::MAX),
            volume_id: self.volume_id(&v.uuid),
            volume_context: HashMap::from([(CONTEXT_POOL.to_owned(), v.pool_name.clone())]),
            content_source: self.content_source(v),
            accessible_topology: vec![node_topology(&self.node_id)],
        }
    }

    fn csi_snapshot(&self, s: &pb::Snapshot) -> csi::Snapshot {
        csi::Snapshot {
            size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
            snapshot_id: self.snapshot_id(&s.uuid),
            source_volume_id: self.volume_id(&s.volume_uuid),
            creation_time: s.create_time,
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    /// The daemon's volume `uuid`, `None` when it has none.
    async fn get_volume(&self, rpc: &'static str, uuid: &str) -> Result<Option<pb::Volume>, Error> {
        match self
            .daemon
            .volumes()
            .get_volume(pb::GetVolumeRequest {
                volume: uuid.to_owned(),
            })
            .await
        {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.err(rpc, s)),
        }
    }

    /// The daemon's snapshot `uuid`, `None` when it has none.
    async fn get_snapshot_by_uuid(
        &self,
        rpc: &'static str,
        uuid: &str,
    ) -> Result<Option<pb::Snapshot>, Error> {
        match self
            .daemon
            .snapshots()
            .get_snapshot(pb::GetSnapshotRequest {
                snapshot: uuid.to_owned(),
            })
            .await
        {
            Ok(s) => Ok(Some(s.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.err(rpc, s)),
        }
    }

    /// A pool named by a request, or a clear INVALID_ARGUMENT.
    async fn pool(&self, rpc: &'static str, pool: &str) -> Result<pb::Pool, Error> {
        match self
            .daemon
            .pools()
            .get_pool(pb::GetPoolRequest {
                pool: pool.to_owned(),
            })
            .await
        {
            Ok(p) => Ok(p.into_inner()),
            Err(s) if s.code() == Code::NotFound => Err(Error::Invalid {
                rpc,
                reason: format!(
                    "parameter pool names {pool:?}, which node {} does not have: create the \
                     pool there (coreblk pool create) or fix the StorageClass",
                    self.node_id
                ),
            }),
            Err(s) => Err(self.err(rpc, s)),
        }
    }

    /// The clone source of a CreateVolume: the daemon request's source, its size and pool.
    async fn clone_source(
        &self,
        source: &csi::VolumeContentSource,
    ) -> Result<(pb::create_volume_request::Source, u64, String), Error> {
        use csi::volume_content_source::Type;
        const RPC: &str = "CreateVolume";
        let (kind, text) = match &source.r#type {
            Some(Type::Snapshot(s)) => (Kind::Snapshot, s.snapshot_id.as_str()),
            Some(Type::Volume(v)) => (Kind::Volume, v.volume_id.as_str()),
            None => {
                return Err(Error::Invalid {
                    rpc: RPC,
                    reason: "volume_content_source has neither a snapshot nor a volume".to_owned(),
                })
            }
        };
        let missing = || Error::NotFound {
            rpc: RPC,
            what: format!("source {} {text:?}", kind.noun()),
        };
        let uuid = match self.locate(kind, text) {
            Located::NoSuchId => return Err(missing()),
            // RESOURCE_EXHAUSTED: the volume cannot be made in this topology; the provisioner
            // then lets the scheduler pick another node, and the message says which one works.
            Located::Elsewhere(id) => {
                return Err(Error::CannotPlace {
                    rpc: RPC,
                    reason: format!(
                        "the source {}; schedule the pod to node {} (for example with a \
                         nodeSelector kubernetes.io/hostname) to restore or clone it",
                        elsewhere_message(&id, &self.node_id),
                        id.node_id
                    ),
                })
            }
            Located::Here(u) => u,
        };
        match kind {
            Kind::Snapshot => {
                let s = self
                    .get_snapshot_by_uuid(RPC, &uuid)
                    .await?
                    .ok_or_else(missing)?;
                Ok((
                    pb::create_volume_request::Source::SourceSnapshot(s.uuid),
                    s.size_bytes,
                    s.pool_uuid,
                ))
            }
            Kind::Volume => {
                let v = self.get_volume(RPC, &uuid).await?.ok_or_else(missing)?;
                Ok((
                    pb::create_volume_request::Source::SourceVolume(v.uuid),
                    v.size_bytes,
                    v.pool_uuid,
                ))
            }
        }
    }

    /// What CreateVolume would accept now for `params` in the pool: the overcommit
    /// headroom, for thick volumes also the unreserved free space, in whole clusters.
    async fn capacity(&self, params: &VolumeParams) -> Result<u64, Error> {
        const RPC: &str = "GetCapacity";
        let pool = self
            .pool(RPC, params.pool.as_deref().unwrap_or(DEFAULT_POOL))
            .await?;
        if pool.state() != pb::PoolState::Online {
            return Ok(0);
        }
        let figures = self
            .daemon
            .node()
            .get_capacity(pb::GetCapacityRequest {
                pool: pool.uuid.clone(),
            })
            .await
            .map_err(|s| self.err(RPC, s))?
            .into_inner();
        let Some(c) = figures.pools.into_iter().find(|c| c.pool_uuid == pool.uuid) else {
            return Ok(0);
        };
        let mut bytes = c.available_bytes.min(c.maximum_volume_size_bytes);
        if params.thick {
            // The pool's free space is already net of thick volumes' reserves (the store
            // counts a cluster free only when no reserve claims it).
            bytes = bytes.min(pool.free_bytes);
        }
        let cluster = pool.cluster_size_bytes.max(4096);
        Ok(bytes / cluster * cluster)
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        const RPC: &str = "CreateVolume";
        let r = request.into_inner();
        let invalid = |reason: String| Error::Invalid { rpc: RPC, reason };
        required(RPC, "name", &r.name)?;
        if r.volume_capabilities.is_empty() {
            return Err(Error::Missing {
                rpc: RPC,
                field: "volume_capabilities",
            }
            .into());
        }
        let cap_fs = check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        let mut params = VolumeParams::parse(&r.parameters).map_err(invalid)?;
        // A VolumeAttributesClass named by the claim: QoS keys only, over the class's.
        QosParams::only_qos_keys(&r.mutable_parameters).map_err(invalid)?;
        let qos = params
            .qos
            .overlay(&QosParams::parse(&r.mutable_parameters).map_err(invalid)?);
        if let Some(fs) = &params.fs_type {
            if !cap_fs.is_empty() && cap_fs != *fs {
                return Err(invalid(format!(
                    "the parameters name filesystem {fs} but the capability asks for {cap_fs}; \
                     give one"
                ))
                .into());
            }
        }
        self.check_node_params(&cap_fs, &mut params, r.volume_content_source.as_ref())
            .await?;
        if !topology_allows(r.accessibility_requirements.as_ref(), &self.node_id) {
            return Err(Error::CannotPlace {
                rpc: RPC,
                reason: format!(
                    "this plugin makes volumes on node {} only, and the request's requisite \
                     topology does not include {TOPOLOGY_KEY}={} (the request reached the \
                     wrong node's plugin)",
                    self.node_id, self.node_id
                ),
            }
            .into());
        }
        let (source, source_bytes, pool_ref) = match &r.volume_content_source {
            Some(s) => {
                if params.thick {
                    return Err(invalid(
                        "thick: a clone or restore shares its source's clusters and is always \
                         thin; use a thin StorageClass (thick: \"false\") for it"
                            .to_owned(),
                    )
                    .into());
                }
                let (src, bytes, src_pool) = self.clone_source(s).await?;
                (Some(src), Some(bytes), src_pool)
            }
            None => (
                None,
                None,
                params
                    .pool
                    .clone()
                    .unwrap_or_else(|| DEFAULT_POOL.to_owned()),
            ),
        };
        let pool = self.pool(RPC, &pool_ref).await?;
        if let (Some(_), Some(named)) = (&source, &params.pool) {
            if *named != pool.name && *named != pool.uuid {
                return Err(invalid(format!(
                    "the source lives in pool {} and a clone lives in its source's pool, but \
                     parameter pool names {named:?}: use a StorageClass for pool {}",
                    pool.name, pool.name
                ))
                .into());
            }
        }
        let mut size_bytes = volume_size(
            r.capacity_range.as_ref(),
            source_bytes,
            pool.cluster_size_bytes,
        )
        .map_err(|e| match e {
            SizeError::Negative(m) => invalid(m),
            SizeError::OutOfRange(reason) => Error::OutOfRange { rpc: RPC, reason },
        })?;
        // A volume of this name whose size the range accepts is the one asked for (the
        // spec's idempotency is by compatibility, the daemon's by equal size): ask the
        // daemon with its size, so it compares everything else (pool, thick, source).
        if let Some(existing) = self.get_volume(RPC, &r.name).await? {
            // (The daemon also finds volumes by UUID: only a name match counts.)
            if existing.name == r.name && size_fits(existing.size_bytes, r.capacity_range.as_ref())
            {
                size_bytes = existing.size_bytes;
            }
        }
        let created = self
            .daemon
            .volumes()
            .create_volume(pb::CreateVolumeRequest {
                qos: qos.limits(size_bytes).map_err(invalid)?,
                pool: pool.uuid.clone(),
                name: r.name.clone(),
                size_bytes,
                thick: params.thick,
                labels: params.labels,
                source,
            })
            .await
            .map_err(|s| self.err(RPC, s))?
            .into_inner();
        tracing::info!(volume = %created.uuid, name = %r.name, size_bytes, "volume created");
        let mut volume = self.csi_volume(&created);
        // The spec asks for the request's source back as it was given.
        if r.volume_content_source.is_some() {
            volume.content_source = r.volume_content_source;
        }
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        const RPC: &str = "DeleteVolume";
        let r = request.into_inner();
        required(RPC, "volume_id", &r.volume_id)?;
        let uuid = match self.locate(Kind::Volume, &r.volume_id) {
            // No such volume can exist: deleted, as the spec wants for an unknown ID.
            Located::NoSuchId => return Ok(Response::new(csi::DeleteVolumeResponse {})),
            Located::Elsewhere(id) => return Err(self.owned_elsewhere(RPC, id).into()),
            Located::Here(u) => u,
        };
        match self
            .daemon
            .volumes()
            .delete_volume(pb::DeleteVolumeRequest {
                volume: uuid.clone(),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(volume = %uuid, "volume deleted");
                Ok(Response::new(csi::DeleteVolumeResponse {}))
            }
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(s) => Err(self.err(RPC, s).into()),
        }
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerPublishVolume",
            "coreblk volumes need no attach (CSIDriver attachRequired: false)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerUnpublishVolume",
            "coreblk volumes need no attach (CSIDriver attachRequired: false)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        const RPC: &str = "ValidateVolumeCapabilities";
        let r = request.into_inner();
        required(RPC, "volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Error::Missing {
                rpc: RPC,
                field: "volume_capabilities",
            }
            .into());
        }
        let not_found = || Error::NotFound {
            rpc: RPC,
            what: format!("volume {:?}", r.volume_id),
        };
        let uuid = match self.locate(Kind::Volume, &r.volume_id) {
            Located::NoSuchId => return Err(not_found().into()),
            Located::Elsewhere(id) => return Err(self.not_here(RPC, id).into()),
            Located::Here(u) => u,
        };
        let volume = self.get_volume(RPC, &uuid).await?.ok_or_else(not_found)?;
        let verdict = check_capabilities(&r.volume_capabilities)
            .map(|_| ())
            .and_then(|()| VolumeParams::parse(&r.parameters))
            .and_then(|p| match p {
                VolumeParams {
                    pool: Some(pool), ..
                } if pool != volume.pool_name && pool != volume.pool_uuid => Err(format!(
                    "the volume lives in pool {}, not in {pool}",
                    volume.pool_name
                )),
                VolumeParams { thick, .. }
                    if r.parameters.contains_key(PARAM_THICK) && thick != volume.thick =>
                {
                    Err(format!(
                        "the volume is {}, the parameters ask for {}",
                        if volume.thick { "thick" } else { "thin" },
                        if thick { "thick" } else { "thin" }
                    ))
                }
                _ => Ok(()),
            });
        let response = match verdict {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        const RPC: &str = "ListVolumes";
        let r = request.into_inner();
        let page_size = page_size(RPC, r.max_entries)?;
        let aborted = || Error::BadToken {
            rpc: RPC,
            token: r.starting_token.clone(),
        };
        if !token_ok(&r.starting_token) {
            return Err(aborted().into());
        }
        let page = match self
            .daemon
            .volumes()
            .list_volumes(pb::ListVolumesRequest {
                pool: String::new(),
                label_selector: HashMap::new(),
                page_size,
                page_token: r.starting_token.clone(),
            })
            .await
        {
            Ok(p) => p.into_inner(),
            Err(s) if s.code() == Code::InvalidArgument && !r.starting_token.is_empty() => {
                return Err(aborted().into())
            }
            Err(s) => return Err(self.err(RPC, s).into()),
        };
        let entries = page
            .volumes
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(self.csi_volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(volume_condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token: page.next_page_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        const RPC: &str = "GetCapacity";
        let r = request.into_inner();
        let params = VolumeParams::parse(&r.parameters)
            .map_err(|reason| Error::Invalid { rpc: RPC, reason })?;
        let elsewhere = r.accessible_topology.as_ref().is_some_and(|t| {
            !t.segments.is_empty()
                && t.segments.get(TOPOLOGY_KEY).map(String::as_str) != Some(self.node_id.as_str())
        });
        // Nothing fits a segment of another node, or capabilities this driver cannot serve.
        let bytes = if elsewhere || check_capabilities(&r.volume_capabilities).is_err() {
            0
        } else {
            self.capacity(&params).await?
        };
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: bytes,
            maximum_volume_size: Some(bytes),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(caps_response(&CAPS)))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        const RPC: &str = "CreateSnapshot";
        let r = request.into_inner();
        required(RPC, "source_volume_id", &r.source_volume_id)?;
        required(RPC, "name", &r.name)?;
        let mut labels = HashMap::new();
        for (k, v) in &r.parameters {
            if KEPT_AS_LABELS.contains(&k.as_str()) {
                labels.insert(k.clone(), v.clone());
            } else if !k.starts_with(K8S_PREFIX) {
                return Err(Error::Invalid {
                    rpc: RPC,
                    reason: format!(
                        "unknown parameter {k:?}: coreblk snapshot classes take no parameters \
                         (fix the VolumeSnapshotClass)"
                    ),
                }
                .into());
            }
        }
        let uuid = match self.locate(Kind::Volume, &r.source_volume_id) {
            Located::NoSuchId => {
                return Err(Error::NotFound {
                    rpc: RPC,
                    what: format!("source volume {:?}", r.source_volume_id),
                }
                .into())
            }
            Located::Elsewhere(id) => return Err(self.owned_elsewhere(RPC, id).into()),
            Located::Here(u) => u,
        };
        // A snapshot of an encrypted volume says so: its restores are encrypted too, also
        // once the volume is gone.
        if let Some(v) = self.get_volume(RPC, &uuid).await? {
            if let Some(e) = v.labels.get(fsopts::PARAM_ENCRYPTION) {
                labels.insert(fsopts::PARAM_ENCRYPTION.to_owned(), e.clone());
            }
        }
        let request = pb::CreateSnapshotRequest {
            volume: uuid.clone(),
            name: r.name.clone(),
            labels,
        };
        // Held until the filesystem is thawed (moved into the frozen task): no stage,
        // unstage or second snapshot of the volume meanwhile.
        let op = self.busy.begin(RPC, &r.source_volume_id)?;
        // A retry of a snapshot that exists: the daemon answers it (or ALREADY_EXISTS for
        // another volume) without a second freeze.
        // (The daemon's GetSnapshot takes a name as well as a UUID.)
        let exists = self.get_snapshot_by_uuid(RPC, &r.name).await?.is_some();
        let point = if exists {
            None
        } else {
            self.freeze_point(&uuid).await?
        };
        let s = match point {
            None => {
                drop(op);
                self.daemon
                    .snapshots()
                    .create_snapshot(request)
                    .await
                    .map_err(|s| self.err(RPC, s))?
                    .into_inner()
            }
            Some(point) => self.create_frozen(op, &r, point, request).await?,
        };
        tracing::info!(snapshot = %s.uuid, volume = %s.volume_uuid, name = %r.name, "snapshot created");
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(self.csi_snapshot(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        const RPC: &str = "DeleteSnapshot";
        let r = request.into_inner();
        required(RPC, "snapshot_id", &r.snapshot_id)?;
        let uuid = match self.locate(Kind::Snapshot, &r.snapshot_id) {
            Located::NoSuchId => return Ok(Response::new(csi::DeleteSnapshotResponse {})),
            Located::Elsewhere(id) => return Err(self.owned_elsewhere(RPC, id).into()),
            Located::Here(u) => u,
        };
        match self
            .daemon
            .snapshots()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: uuid.clone(),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(snapshot = %uuid, "snapshot deleted");
                Ok(Response::new(csi::DeleteSnapshotResponse {}))
            }
            Err(s) if s.code() == Code::NotFound => {
                Ok(Response::new(csi::DeleteSnapshotResponse {}))
            }
            Err(s) => Err(self.err(RPC, s).into()),
        }
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        const RPC: &str = "ListSnapshots";
        let r = request.into_inner();
        let page_size = page_size(RPC, r.max_entries)?;
        let empty = || Ok(Response::new(csi::ListSnapshotsResponse::default()));
        if !r.snapshot_id.is_empty() {
            // One snapshot, or none: a list filtered by ID has no pages.
            let Located::Here(uuid) = self.locate(Kind::Snapshot, &r.snapshot_id) else {
                return empty();
            };
            let Some(s) = self.get_snapshot_by_uuid(RPC, &uuid).await? else {
                return empty();
            };
            if !r.source_volume_id.is_empty()
                && self.volume_id(&s.volume_uuid) != r.source_volume_id
            {
                return empty();
            }
            return Ok(Response::new(csi::ListSnapshotsResponse {
                entries: vec![csi::list_snapshots_response::Entry {
                    snapshot: Some(self.csi_snapshot(&s)),
                }],
                next_token: String::new(),
            }));
        }
        let volume = if r.source_volume_id.is_empty() {
            String::new()
        } else {
            match self.locate(Kind::Volume, &r.source_volume_id) {
                Located::Here(u) => u,
                Located::NoSuchId | Located::Elsewhere(_) => return empty(),
            }
        };
        let aborted = || Error::BadToken {
            rpc: RPC,
            token: r.starting_token.clone(),
        };
        if !token_ok(&r.starting_token) {
            return Err(aborted().into());
        }
        let page = match self
            .daemon
            .snapshots()
            .list_snapshots(pb::ListSnapshotsRequest {
                volume: volume.clone(),
                pool: String::new(),
                page_size,
                page_token: r.starting_token.clone(),
            })
            .await
        {
            Ok(p) => p.into_inner(),
            // The source volume was deleted: snapshots taken of it still name it.
            Err(s) if s.code() == Code::NotFound && !volume.is_empty() => {
                return self.snapshots_of_deleted(&volume, &r, page_size).await
            }
            Err(s) if s.code() == Code::InvalidArgument && !r.starting_token.is_empty() => {
                return Err(aborted().into())
            }
            Err(s) => return Err(self.err(RPC, s).into()),
        };
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: page
                .snapshots
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(self.csi_snapshot(s)),
                })
                .collect(),
            next_token: page.next_page_token,
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        const RPC: &str = "GetSnapshot";
        let r = request.into_inner();
        required(RPC, "snapshot_id", &r.snapshot_id)?;
        let not_found = || Error::NotFound {
            rpc: RPC,
            what: format!("snapshot {:?}", r.snapshot_id),
        };
        let uuid = match self.locate(Kind::Snapshot, &r.snapshot_id) {
            Located::NoSuchId => return Err(not_found().into()),
            Located::Elsewhere(id) => return Err(self.not_here(RPC, id).into()),
            Located::Here(u) => u,
        };
        let s = self
            .get_snapshot_by_uuid(RPC, &uuid)
            .await?
            .ok_or_else(not_found)?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(self.csi_snapshot(&s)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        _request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(unimplemented(
            "ControllerExpandVolume",
            "coreblk grows volumes in NodeExpandVolume on the owning node (the controller has \
             no EXPAND_VOLUME capability)",
        ))
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        const RPC: &str = "ControllerGetVolume";
        let r = request.into_inner();
        required(RPC, "volume_id", &r.volume_id)?;
        let not_found = || Error::NotFound {
            rpc: RPC,
            what: format!("volume {:?}", r.volume_id),
        };
        let uuid = match self.locate(Kind::Volume, &r.volume_id) {
            Located::NoSuchId => return Err(not_found().into()),
            Located::Elsewhere(id) => return Err(self.not_here(RPC, id).into()),
            Located::Here(u) => u,
        };
        let v = self.get_volume(RPC, &uuid).await?.ok_or_else(not_found)?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(volume_condition(&v)),
            }),
        }))
    }

    /// A VolumeAttributesClass change: the volume's QoS limits, online, on the node that
    /// holds it (another node's volume is refused with its name). Every limit is replaced
    /// (a class describes them all); unknown keys are refused.
    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        const RPC: &str = "ControllerModifyVolume";
        let r = request.into_inner();
        let invalid = |reason: String| Error::Invalid { rpc: RPC, reason };
        required(RPC, "volume_id", &r.volume_id)?;
        QosParams::only_qos_keys(&r.mutable_parameters).map_err(invalid)?;
        let qos = QosParams::parse(&r.mutable_parameters).map_err(invalid)?;
        let not_found = || Error::NotFound {
            rpc: RPC,
            what: format!("volume {:?}", r.volume_id),
        };
        let uuid = match self.locate(Kind::Volume, &r.volume_id) {
            Located::NoSuchId => return Err(not_found().into()),
            Located::Elsewhere(id) => return Err(self.owned_elsewhere(RPC, id).into()),
            Located::Here(u) => u,
        };
        let v = self.get_volume(RPC, &uuid).await?.ok_or_else(not_found)?;
        let limits = qos.limits(v.size_bytes).map_err(invalid)?;
        self.daemon
            .volumes()
            .set_volume_qos(pb::SetVolumeQosRequest {
                volume: uuid.clone(),
                qos: limits,
            })
            .await
            .map_err(|s| self.err(RPC, s))?;
        tracing::info!(volume = %uuid, ?limits, "QoS limits modified");
        Ok(Response::new(csi::ControllerModifyVolumeResponse {}))
    }
}

impl Controller {
    /// The node-side parameters of a CreateVolume (fsopts.rs): the mkfs options must suit
    /// the filesystem, and a clone or restore of an encrypted source is encrypted too
    /// (it holds the source's LUKS2 header and is never formatted), whatever its class
    /// says; a class asking for encryption cannot get it from a plain source (the data
    /// would have to be rewritten).
    async fn check_node_params(
        &self,
        cap_fs: &str,
        params: &mut VolumeParams,
        source: Option<&csi::VolumeContentSource>,
    ) -> Result<(), Error> {
        const RPC: &str = "CreateVolume";
        let fs = match (&params.fs_type, cap_fs) {
            (Some(f), _) => f.clone(),
            (None, "") => "ext4".to_owned(),
            (None, f) => f.to_owned(),
        };
        if let Some(o) = params.labels.get(fsopts::PARAM_MKFS_OPTIONS) {
            fsopts::mkfs_args(&fs, o).map_err(|reason| Error::Invalid { rpc: RPC, reason })?;
        }
        let Some(source) = source else { return Ok(()) };
        let asked = params.labels.contains_key(fsopts::PARAM_ENCRYPTION);
        let source_encrypted = self.source_encrypted(source).await?;
        if asked && !source_encrypted {
            return Err(Error::Invalid {
                rpc: RPC,
                reason: format!(
                    "the StorageClass asks for {}={} but the source is not encrypted, and a                      clone or restore keeps its source's bytes; restore into a class without                      encryption, or copy the data into a new encrypted volume",
                    fsopts::PARAM_ENCRYPTION,
                    fsopts::ENCRYPTION_LUKS2
                ),
            });
        }
        if source_encrypted {
            params.labels.insert(
                fsopts::PARAM_ENCRYPTION.to_owned(),
                fsopts::ENCRYPTION_LUKS2.to_owned(),
            );
        }
        Ok(())
    }

    /// Whether a clone source is LUKS2-encrypted: a volume by its label; a snapshot by
    /// its own label (CreateSnapshot copies it) or, for a snapshot taken otherwise, by
    /// its origin volume's while that exists. Unknown sources are refused later.
    async fn source_encrypted(&self, source: &csi::VolumeContentSource) -> Result<bool, Error> {
        use csi::volume_content_source::Type;
        const RPC: &str = "CreateVolume";
        let encrypted = |labels: &HashMap<String, String>| {
            labels.get(fsopts::PARAM_ENCRYPTION).map(String::as_str)
                == Some(fsopts::ENCRYPTION_LUKS2)
        };
        match &source.r#type {
            Some(Type::Volume(v)) => match self.locate(Kind::Volume, &v.volume_id) {
                Located::Here(u) => Ok(self
                    .get_volume(RPC, &u)
                    .await?
                    .is_some_and(|v| encrypted(&v.labels))),
                _ => Ok(false),
            },
            Some(Type::Snapshot(s)) => match self.locate(Kind::Snapshot, &s.snapshot_id) {
                Located::Here(u) => {
                    let Some(s) = self.get_snapshot_by_uuid(RPC, &u).await? else {
                        return Ok(false);
                    };
                    if encrypted(&s.labels) {
                        return Ok(true);
                    }
                    Ok(self
                        .get_volume(RPC, &s.volume_uuid)
                        .await?
                        .is_some_and(|v| encrypted(&v.labels)))
                }
                _ => Ok(false),
            },
            None => Ok(false),
        }
    }

    /// A mount point through which to freeze volume `uuid`'s filesystem: `None` when the
    /// volume is not exported on this node or its device holds no mounted filesystem
    /// (block mode, not staged) — then the snapshot is taken without a freeze.
    async fn freeze_point(&self, uuid: &str) -> Result<Option<std::path::PathBuf>, Error> {
        const RPC: &str = "CreateSnapshot";
        let Some(device) = self
            .daemon
            .export_device(uuid)
            .await
            .map_err(|s| self.err(RPC, s))?
        else {
            return Ok(None);
        };
        let mut name = device.rsplit('/').next().unwrap_or(&device).to_owned();
        // An encrypted volume's filesystem sits on its LUKS2 mapping over the device.
        if let Some(dm) = crate::crypt::mapped(&crate::crypt::mapping_name(uuid)) {
            if crate::crypt::maps_onto(&dm, &name) {
                name = dm;
            }
        }
        let Ok(numbers) = mounts::device_numbers(&name) else {
            return Ok(None);
        };
        let table = mounts::mount_table().map_err(|e| Error::Node {
            rpc: RPC,
            reason: format!("reading /proc/self/mountinfo: {e}"),
        })?;
        let candidates = freeze::freeze_candidates(&table, &numbers);
        if candidates.is_empty() {
            return Ok(None);
        }
        freeze::reachable_point(&candidates, &numbers)
            .map(Some)
            .ok_or_else(|| Error::Node {
                rpc: RPC,
                reason: format!(
                    "the filesystem on {device} is mounted at {} but no mount point resolves \
                     to it (each is hidden under another mount), so it cannot be frozen for \
                     a consistent snapshot; unmount what hides it",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// The daemon's CreateSnapshot with the filesystem at `point` frozen around it. The
    /// window runs in its own task, which owns `op` (the volume's busy mark): if this
    /// call is dropped (the caller went away) the window still closes and thaws.
    async fn create_frozen(
        &self,
        op: crate::busy::InProgress,
        r: &csi::CreateSnapshotRequest,
        point: std::path::PathBuf,
        request: pb::CreateSnapshotRequest,
    ) -> Result<pb::Snapshot, Error> {
        const RPC: &str = "CreateSnapshot";
        let volume_id = r.source_volume_id.clone();
        let mut client = self.daemon.snapshots();
        let hold = self.freeze_hold;
        let task_point = point.clone();
        let task = tokio::spawn(async move {
            let _op = op;
            freeze::presync(&task_point).await;
            let window = Window {
                volume: &volume_id,
                point: &task_point,
                max: freeze::FROZEN_WINDOW_MAX,
                late_wait: freeze::LATE_RESULT_WAIT,
                hold,
            };
            freeze::with_frozen(&Fsfreeze, &window, async move {
                client.create_snapshot(request).await
            })
            .await
        });
        let outcome = task.await.map_err(|e| Error::Node {
            rpc: RPC,
            reason: format!(
                "the snapshot's frozen window ended abnormally ({e}); the filesystem at {} \
                 was thawed from its guard",
                point.display()
            ),
        })?;
        let window_s = freeze::FROZEN_WINDOW_MAX.as_secs();
        match outcome {
            Ok(Frozen::InTime(Ok(s))) => Ok(s.into_inner()),
            Ok(Frozen::InTime(Err(status))) => Err(self.err(RPC, status)),
            Ok(Frozen::TooLate(late)) => {
                // Taken after the thaw, or not: not consistent, so not handed out. The
                // name stays free for the snapshotter's retry.
                let fate = match late {
                    Some(Ok(s)) => {
                        let s = s.into_inner();
                        match self
                            .daemon
                            .snapshots()
                            .delete_snapshot(pb::DeleteSnapshotRequest {
                                snapshot: s.uuid.clone(),
                            })
                            .await
                        {
                            Ok(_) => format!(
                                "it completed later, after the thaw, and was deleted again \
                                 (snapshot {})",
                                s.uuid
                            ),
                            Err(e) => format!(
                                "it completed later, after the thaw, and deleting it failed \
                                 ({}): delete snapshot {} (coreblk snapshot delete) before \
                                 the retry, which would return it",
                                e.message(),
                                s.uuid
                            ),
                        }
                    }
                    Some(Err(e)) => format!("it then failed: {}", e.message()),
                    None => format!(
                        "coreblkd had not answered {} s later either; if a snapshot named {} \
                         appears, delete it (it may not be consistent)",
                        freeze::LATE_RESULT_WAIT.as_secs(),
                        r.name
                    ),
                };
                Err(Error::FrozenTooLong {
                    rpc: RPC,
                    reason: format!(
                        "snapshot {} of volume {} did not complete within {window_s} s of \
                         freezing its filesystem at {}; the filesystem was thawed and {fate}; \
                         retry (is coreblkd overloaded?)",
                        r.name,
                        r.source_volume_id,
                        point.display()
                    ),
                })
            }
            Err(e @ FreezeError::AlreadyFrozen { .. }) => Err(Error::AlreadyFrozen {
                rpc: RPC,
                reason: format!("snapshot {} of volume {}: {e}", r.name, r.source_volume_id),
            }),
            Err(e) => Err(Error::Node {
                rpc: RPC,
                reason: format!("snapshot {} of volume {}: {e}", r.name, r.source_volume_id),
            }),
        }
    }

    /// ListSnapshots of a source volume the daemon no longer has: its snapshots stay, and
    /// still name it. Lists every snapshot and keeps that volume's (one page: no token).
    async fn snapshots_of_deleted(
        &self,
        volume_uuid: &str,
        r: &csi::ListSnapshotsRequest,
        page_size: u32,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        const RPC: &str = "ListSnapshots";
        let mut entries = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .daemon
                .snapshots()
                .list_snapshots(pb::ListSnapshotsRequest {
                    volume: String::new(),
                    pool: String::new(),
                    page_size: MAX_PAGE_ENTRIES,
                    page_token: token,
                })
                .await
                .map_err(|s| self.err(RPC, s))?
                .into_inner();
            entries.extend(
                page.snapshots
                    .iter()
                    .filter(|s| s.volume_uuid == volume_uuid)
                    .map(|s| csi::list_snapshots_response::Entry {
                        snapshot: Some(self.csi_snapshot(s)),
                    }),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if !r.starting_token.is_empty() {
            // One page only: no token is handed out for a deleted volume's snapshots.
            return Err(Error::BadToken {
                rpc: RPC,
                token: r.starting_token.clone(),
            }
            .into());
        }
        if page_size > 0 {
            entries.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        }
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries,
            next_token: String::new(),
        }))
    }
}

/// The central controller: a stateless instance without a daemon, for csi-resizer (which
/// has no node-deployment mode). It advertises no EXPAND_VOLUME, so the resizer leaves the
/// growing to NodeExpandVolume on the node that owns the volume; every other call is
/// UNIMPLEMENTED and says where the work happens.
#[derive(Debug, Clone, Default)]
pub struct CentralController;

fn central_only(rpc: &'static str) -> Status {
    unimplemented(
        rpc,
        "this is the central coreblk-csi controller (--mode controller), which only answers \
         capabilities; volumes are served by the coreblk-csi node plugin on the node that \
         holds them",
    )
}

fn unimplemented(rpc: &'static str, reason: &str) -> Status {
    Error::Unimplemented {
        rpc,
        reason: reason.to_owned(),
    }
    .into()
}

#[tonic::async_trait]
impl csi::controller_server::Controller for CentralController {
    async fn create_volume(
        &self,
        _r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        Err(central_only("CreateVolume"))
    }
    async fn delete_volume(
        &self,
        _r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        Err(central_only("DeleteVolume"))
    }
    async fn controller_publish_volume(
        &self,
        _r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(central_only("ControllerPublishVolume"))
    }
    async fn controller_unpublish_volume(
        &self,
        _r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(central_only("ControllerUnpublishVolume"))
    }
    async fn validate_volume_capabilities(
        &self,
        _r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        Err(central_only("ValidateVolumeCapabilities"))
    }
    async fn list_volumes(
        &self,
        _r: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Err(central_only("ListVolumes"))
    }
    async fn get_capacity(
        &self,
        _r: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Err(central_only("GetCapacity"))
    }
    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(caps_response(&[])))
    }
    async fn create_snapshot(
        &self,
        _r: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(central_only("CreateSnapshot"))
    }
    async fn delete_snapshot(
        &self,
        _r: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(central_only("DeleteSnapshot"))
    }
    async fn list_snapshots(
        &self,
        _r: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(central_only("ListSnapshots"))
    }
    async fn get_snapshot(
        &self,
        _r: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(central_only("GetSnapshot"))
    }
    async fn controller_expand_volume(
        &self,
        _r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        Err(central_only("ControllerExpandVolume"))
    }
    async fn controller_get_volume(
        &self,
        _r: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(central_only("ControllerGetVolume"))
    }
    async fn controller_modify_volume(
        &self,
        _r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(central_only("ControllerModifyVolume"))
    }
}
