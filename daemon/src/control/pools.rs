//! The `Pools` service: create on a claimed device, get, list, destroy (verify waits for
//! the store's checker), and the per-pool figures `Node.GetCapacity` reports.
//!
//! Must never: answer from a pool that is not online as if it were (importing pools say
//! so in their state; their figures are zero until online).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::error::{Error, Result};
use super::names::{validate_labels, validate_name};
use super::page::paginate;
use super::server::Shared;
use super::store::{
    PoolFigures, PoolInfo, PoolSpec, PoolState, MAX_CLUSTER_BYTES, MIN_CLUSTER_BYTES,
};
use crate::lvs::pool::DEFAULT_CLUSTER_BYTES;

/// Most overcommit a pool may be given.
pub const MAX_OVERCOMMIT: f64 = 1000.0;

/// Converts request labels to the store's ordered map.
pub fn label_map(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// A pool as the API reports it.
#[must_use]
pub fn pool_message(p: &PoolInfo, f: PoolFigures) -> pb::Pool {
    let (state, state_message) = match &p.state {
        PoolState::Importing => (pb::PoolState::Importing, String::new()),
        PoolState::Online => (pb::PoolState::Online, String::new()),
        PoolState::Failed(why) => (pb::PoolState::Failed, why.clone()),
    };
    pb::Pool {
        uuid: p.uuid.to_string(),
        name: p.name.clone(),
        device_paths: vec![p.device_path.display().to_string()],
        cluster_size_bytes: p.cluster_bytes,
        capacity_bytes: p.capacity_bytes,
        free_bytes: f.free_bytes,
        allocated_bytes: f.allocated_bytes,
        provisioned_bytes: f.provisioned_bytes,
        reserved_bytes: f.reserved_bytes,
        // Clusters deleted objects (and discards, copy-on-write) let go of, on their way
        // back to free; what deleted objects still share with live ones is allocated.
        held_by_deleted_bytes: f.recycling_bytes,
        overcommit_limit: p.overcommit_limit,
        volume_count: f.volume_count,
        snapshot_count: f.snapshot_count,
        state: state.into(),
        state_message,
        labels: p.labels.clone().into_iter().collect(),
    }
}

/// The figures of `p`, zero unless it is online.
///
/// # Errors
/// The owner reactor does not answer.
pub async fn figures(shared: &Shared, p: &PoolInfo) -> Result<PoolFigures> {
    if p.state == PoolState::Online {
        shared.store.figures(p).await
    } else {
        Ok(PoolFigures::default())
    }
}

/// What CSI GetCapacity reports for `p`.
///
/// # Errors
/// The owner reactor does not answer.
pub async fn capacity(shared: &Shared, p: &PoolInfo) -> Result<pb::PoolCapacity> {
    let f = figures(shared, p).await?;
    let limit = super::store::overcommit_bytes(p);
    let available = if p.state == PoolState::Online {
        limit.saturating_sub(f.provisioned_bytes) / 4096 * 4096
    } else {
        0
    };
    Ok(pb::PoolCapacity {
        pool_uuid: p.uuid.to_string(),
        pool_name: p.name.clone(),
        capacity_bytes: p.capacity_bytes,
        available_bytes: available,
        maximum_volume_size_bytes: available.min(super::store::MAX_VOLUME_BYTES),
        free_bytes: f.free_bytes,
        provisioned_bytes: f.provisioned_bytes,
        overcommit_limit: p.overcommit_limit,
    })
}

/// The `Pools` service.
#[derive(Debug)]
pub struct PoolsService {
    shared: Arc<Shared>,
}

impl PoolsService {
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

fn spec(r: pb::CreatePoolRequest) -> Result<PoolSpec> {
    validate_name("pool", &r.name)?;
    validate_labels(&r.labels)?;
    let device = match r.devices.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Error::InvalidArgument {
                field: "devices",
                reason:
                    "name the claimed device to make the pool on (`coreblk device claim` first)"
                        .to_owned(),
            })
        }
        _ => {
            return Err(Error::InvalidArgument {
                field: "devices",
                reason: format!(
                    "{} devices given; a pool lives on one device in this version",
                    r.devices.len()
                ),
            })
        }
    };
    let cluster_bytes = if r.cluster_size_bytes == 0 {
        u64::from(DEFAULT_CLUSTER_BYTES)
    } else {
        r.cluster_size_bytes
    };
    if !cluster_bytes.is_power_of_two()
        || !(MIN_CLUSTER_BYTES..=MAX_CLUSTER_BYTES).contains(&cluster_bytes)
    {
        return Err(Error::InvalidArgument {
            field: "cluster_size_bytes",
            reason: format!(
                "{cluster_bytes} is not a power of two from {MIN_CLUSTER_BYTES} to {MAX_CLUSTER_BYTES} (0: {DEFAULT_CLUSTER_BYTES})"
            ),
        });
    }
    let overcommit_limit = r.overcommit_limit.unwrap_or(1.0);
    if !(overcommit_limit > 0.0 && overcommit_limit <= MAX_OVERCOMMIT) {
        return Err(Error::InvalidArgument {
            field: "overcommit_limit",
            reason: format!(
                "{overcommit_limit} is not in (0, {MAX_OVERCOMMIT}] (1.0: no overcommit)"
            ),
        });
    }
    Ok(PoolSpec {
        name: r.name,
        device,
        cluster_bytes,
        overcommit_limit,
        labels: label_map(r.labels),
    })
}

#[tonic::async_trait]
impl pb::pools_server::Pools for PoolsService {
    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        self.check()?;
        let spec = spec(request.into_inner())?;
        let (p, _created) = self.shared.store.create_pool(spec).await?;
        let f = figures(&self.shared, &p).await?;
        Ok(Response::new(pool_message(&p, f)))
    }

    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        self.check()?;
        let p = self.shared.store.pool(&request.into_inner().pool)?;
        let f = figures(&self.shared, &p).await?;
        Ok(Response::new(pool_message(&p, f)))
    }

    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.check()?;
        let r = request.into_inner();
        let mut pools = self.shared.store.pools();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        let (page, next) = paginate(pools, r.page_size, &r.page_token, |p| p.name.clone())?;
        let mut out = Vec::with_capacity(page.len());
        for p in &page {
            out.push(pool_message(p, figures(&self.shared, p).await?));
        }
        Ok(Response::new(pb::ListPoolsResponse {
            pools: out,
            next_page_token: next,
        }))
    }

    async fn destroy_pool(
        &self,
        request: Request<pb::DestroyPoolRequest>,
    ) -> Result<Response<pb::DestroyPoolResponse>, Status> {
        self.check()?;
        let r = request.into_inner();
        self.shared
            .store
            .destroy_pool(&r.pool, r.force, r.release_devices)
            .await?;
        Ok(Response::new(pb::DestroyPoolResponse {}))
    }

    async fn verify_pool(
        &self,
        request: Request<pb::VerifyPoolRequest>,
    ) -> Result<Response<pb::VerifyPoolResponse>, Status> {
        self.check()?;
        self.shared.store.pool(&request.into_inner().pool)?;
        Err(Error::StoreLacks {
            rpc: "VerifyPool",
            feature: "pool verification (a metadata checker)",
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_are_checked() {
        let ok = pb::CreatePoolRequest {
            name: "p1".into(),
            devices: vec!["/dev/x".into()],
            ..Default::default()
        };
        let s = spec(ok.clone()).expect("ok");
        assert_eq!(s.cluster_bytes, u64::from(DEFAULT_CLUSTER_BYTES));
        assert!((s.overcommit_limit - 1.0).abs() < f64::EPSILON);
        for bad in [
            pb::CreatePoolRequest {
                cluster_size_bytes: 3 << 20,
                ..ok.clone()
            },
            pb::CreatePoolRequest {
                cluster_size_bytes: 8 << 20,
                ..ok.clone()
            },
            pb::CreatePoolRequest {
                overcommit_limit: Some(0.0),
                ..ok.clone()
            },
            pb::CreatePoolRequest {
                devices: vec![],
                ..ok.clone()
            },
            pb::CreatePoolRequest {
                name: "-x".into(),
                ..ok
            },
        ] {
            let e = spec(bad).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
    }
}
