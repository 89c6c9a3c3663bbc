//! The `Pools` service: create on a claimed device, get, list, destroy, verify (the
//! metadata checker of `lvs/verify.rs` on a served pool, through a read-only handle of
//! its own), and the per-pool figures `Node.GetCapacity` reports.
//!
//! Must never: answer from a pool that is not online as if it were (importing pools say
//! so in their state; their figures are zero until online); run a check on the runtime
//! thread, or more than one check of a pool at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::devices::blocking;
use super::error::{Error, Result};
use super::names::{validate_labels, validate_name};
use super::page::paginate;
use super::server::Shared;
use super::store::{
    PoolFigures, PoolInfo, PoolSpec, PoolState, MAX_CLUSTER_BYTES, MIN_CLUSTER_BYTES,
};
use crate::bdev::label::Uuid;
use crate::lvs::pool::DEFAULT_CLUSTER_BYTES;
use crate::lvs::verify::{self, Report};

/// Most overcommit a pool may be given.
pub const MAX_OVERCOMMIT: f64 = 1000.0;
/// Most pool checks running at once (each holds one of the runtime's few blocking threads
/// and a reactor thread of its own).
pub const MAX_VERIFIES: usize = 2;

/// Converts request labels to the store's ordered map.
pub fn label_map(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// A pool as the API reports it.
#[must_use]
pub fn pool_message(p: &PoolInfo, f: PoolFigures) -> pb::Pool {
    let (state, state_message) = match &p.state {
        PoolState::Importing => (pb::PoolState::Importing, String::new()),
        PoolState::Online => match f.degraded {
            Some(d) => (pb::PoolState::Degraded, d.message().to_owned()),
            None => (pb::PoolState::Online, String::new()),
        },
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

/// The pools being checked now.
type Verifying = Arc<Mutex<HashSet<Uuid>>>;

/// A pool's place among the running checks, given back when the check ends (it moves into
/// the blocking task, so a client that hangs up does not free it early).
#[derive(Debug)]
struct VerifySlot {
    running: Verifying,
    pool: Uuid,
}

impl VerifySlot {
    fn take(running: &Verifying, pool: Uuid, name: &str) -> Result<Self> {
        let mut set = running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let busy = |reason: String| Error::AlreadyRunning {
            op: "verify",
            what: "pool",
            name: name.to_owned(),
            reason,
        };
        if set.contains(&pool) {
            return Err(busy(
                "one check of a pool runs at a time: wait for it to finish, then ask again"
                    .to_owned(),
            ));
        }
        if set.len() >= MAX_VERIFIES {
            return Err(busy(format!(
                "{MAX_VERIFIES} pool checks are running, the most at once: ask again when one has finished"
            )));
        }
        set.insert(pool);
        Ok(Self {
            running: Arc::clone(running),
            pool,
        })
    }
}

impl Drop for VerifySlot {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.pool);
    }
}

/// A second, read-only `O_DIRECT` descriptor of the claimed device behind `file` (through
/// `/proc/self/fd`, so it is the same device even if its path changed since the claim;
/// without `O_EXCL`, which the claim itself holds).
fn reopen_read_only(path: &std::path::Path, file: &File) -> Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| {
            Error::Internal(format!(
                "cannot open {} again read-only to check it: {e}",
                path.display()
            ))
        })
}

/// The answer to `VerifyPool` from a checker's report: `ok` when no damage was found and
/// the check ran to the end (warnings are listed but leave it ok).
#[must_use]
pub fn verify_response(r: &Report) -> pb::VerifyPoolResponse {
    let mut problems: Vec<String> = Vec::new();
    if let Some(why) = &r.incomplete {
        problems.push(format!("not checked to the end: {why}"));
    }
    problems.extend(r.problems.iter().map(ToString::to_string));
    if r.unlisted_problems > 0 {
        problems.push(format!(
            "… and {} more problems not listed (run `coreblkd verify --device` on the stopped pool for all)",
            r.unlisted_problems
        ));
    }
    pb::VerifyPoolResponse {
        ok: r.is_clean(),
        problems,
        checked_bytes: r.checked_bytes,
    }
}

/// The `Pools` service.
#[derive(Debug)]
pub struct PoolsService {
    shared: Arc<Shared>,
    verifying: Verifying,
}

impl PoolsService {
    /// A service over the daemon's shared state.
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            verifying: Verifying::default(),
        }
    }

    /// Checks `p`'s metadata on its device: live (the pool keeps serving; see
    /// `lvs/verify.rs`, "Checking a running pool") when online, offline when its import
    /// failed (nothing writes it then). On the blocking pool, one check per pool.
    async fn verify(&self, p: &PoolInfo) -> Result<Report> {
        let live = match &p.state {
            PoolState::Online => true,
            PoolState::Failed(_) => false,
            PoolState::Importing => {
                return Err(Error::PoolImporting {
                    pool: p.name.clone(),
                })
            }
        };
        let slot = VerifySlot::take(&self.verifying, p.uuid, &p.name)?;
        let (path, held): (PathBuf, File) = self
            .shared
            .claims
            .device_file(p.device_uuid)
            .map_err(|e| {
                Error::Internal(format!("cannot reach the device of pool {}: {e}", p.name))
            })?
            .ok_or_else(|| Error::DeviceNotClaimed {
                device: p.device_path.display().to_string(),
            })?;
        let file = reopen_read_only(&path, &held)?;
        drop(held);
        let name = p.name.clone();
        blocking(move || {
            let _slot = slot;
            let started = std::time::Instant::now();
            let report = verify::verify_file(&path, file, live).map_err(|e| Error::Store {
                op: "verify pool",
                object: name.clone(),
                reason: e.to_string(),
            })?;
            tracing::info!(
                pool = %name,
                live,
                clean = report.is_clean(),
                problems = report.problems.len(),
                checked_bytes = report.checked_bytes,
                ms = started.elapsed().as_millis(),
                "pool verified"
            );
            Ok(report)
        })
        .await
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
        let r = request.into_inner();
        if r.check_data {
            return Err(Error::InvalidArgument {
                field: "check_data",
                reason: "the volume store keeps no checksums of data, so there is nothing to \
                         check data against; verify checks the pool's metadata (leave \
                         check_data unset)"
                    .to_owned(),
            }
            .into());
        }
        let p = self.shared.store.pool(&r.pool)?;
        let report = self.verify(&p).await?;
        Ok(Response::new(verify_response(&report)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_check_per_pool_and_a_bounded_number_at_once() {
        let running = Verifying::default();
        let a = VerifySlot::take(&running, Uuid([1; 16]), "a").expect("first check of a");
        let e = VerifySlot::take(&running, Uuid([1; 16]), "a").expect_err("a second of a");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
        let b = VerifySlot::take(&running, Uuid([2; 16]), "b").expect("b beside a");
        assert_eq!(MAX_VERIFIES, 2);
        let e = VerifySlot::take(&running, Uuid([3; 16]), "c").expect_err("a third pool");
        assert!(e.to_string().contains("most at once"), "{e}");
        drop(a);
        let _a = VerifySlot::take(&running, Uuid([1; 16]), "a").expect("a again once done");
        drop(b);
        assert_eq!(running.lock().expect("lock").len(), 1);
    }

    #[test]
    fn a_report_becomes_sentences_and_ok_only_when_clean() {
        use crate::lvs::verify::{Part, Problem, Severity};
        let warning = Problem {
            severity: Severity::Warning,
            part: Part::Superblock,
            object: "superblock copy 1".into(),
            message: "checksum mismatch".into(),
        };
        let mut r = Report {
            problems: vec![warning.clone()],
            checked_bytes: 8192,
            ..Report::default()
        };
        let v = verify_response(&r);
        assert!(v.ok, "warnings leave the pool ok");
        assert_eq!(
            v.problems,
            ["warning: superblock copy 1: checksum mismatch"]
        );
        assert_eq!(v.checked_bytes, 8192);
        r.problems.push(Problem {
            severity: Severity::Damaged,
            object: "journal block 7".into(),
            part: Part::Journal,
            message: "a hole".into(),
        });
        r.unlisted_problems = 3;
        let v = verify_response(&r);
        assert!(!v.ok);
        assert_eq!(v.problems[1], "damaged: journal block 7: a hole");
        assert!(
            v.problems[2].contains("3 more problems"),
            "{:?}",
            v.problems
        );
        let v = verify_response(&Report {
            incomplete: Some("reading 4096 bytes at byte 0: EIO".into()),
            ..Report::default()
        });
        assert!(!v.ok);
        assert!(
            v.problems[0].starts_with("not checked to the end"),
            "{:?}",
            v.problems
        );
    }

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
