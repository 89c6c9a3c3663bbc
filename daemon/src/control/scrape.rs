//! What `/metrics` reads of the pools at scrape time, and the cache that bounds it.
//!
//! Owns: [`Scraper`] — per online pool, one message to its owner reactor for the pool's
//! figures, journal and store counters and object table (with each object's export
//! record), then the allocated/unique bytes of its volumes and snapshots from a cache, and
//! the IO counters of the exported ones (`export::stats`: read from atomics, joined to
//! their volume through the export record's device id).
//!
//! The cost rule: an object's figures are a scan of its map on the owner reactor, so they
//! are not recomputed for every object on every scrape. A pool's cached figures stay
//! valid while its journal commit count is unchanged and it has no dropped references
//! waiting to be applied (`PoolRt::settled`): every change of a map or a reference count
//! comes from a commit, or from applying the references a commit dropped. When a pool
//! has changed, at most [`MAX_SCANS_PER_SCRAPE`] objects (never scanned first, then the
//! longest unscanned) are scanned per scrape, [`SCAN_BATCH`] per reactor message so the
//! reactor runs IO between batches; the rest keep their older figures and are counted
//! by `coreblk_pool_stale_objects`.
//!
//! Must never: block the runtime or a reactor; wait on a reactor longer than
//! [`POOL_TIMEOUT`] per message (a stuck pool shows `coreblk_pool_scrape_success 0`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::objrec::ObjectRecord;
use super::store::{PoolInfo, PoolState, Store};
use crate::bdev::label::Uuid;
use crate::export::stats::{IoCounts, REGISTRY};
use crate::lvs::qos::QosStats;
use crate::lvs::volume::ObjectUsage;
use crate::metrics::{
    ExportSample, ObjectKind, ObjectSample, PoolFiguresSample, PoolSample, PoolStateSample,
    QosSample,
};

/// Most volume and snapshot maps scanned per pool per scrape.
pub const MAX_SCANS_PER_SCRAPE: usize = 256;
/// Maps scanned per reactor message.
pub const SCAN_BATCH: usize = 16;
/// Longest one message to a pool's reactor may take during a scrape.
pub const POOL_TIMEOUT: Duration = Duration::from_secs(3);

/// The label CSI's external-provisioner gives the PVC name (`--extra-create-metadata`).
pub const PVC_NAME_LABEL: &str = "csi.storage.k8s.io/pvc/name";
/// The label for the PVC's namespace.
pub const PVC_NAMESPACE_LABEL: &str = "csi.storage.k8s.io/pvc/namespace";

/// When a pool's figures can be trusted: its commit count, if nothing was pending.
type Stamp = Option<u64>;

#[derive(Debug, Clone, Copy)]
struct Cached {
    usage: ObjectUsage,
    /// The pool's stamp when it was scanned.
    stamp: Stamp,
    /// The scrape that scanned it.
    scrape: u64,
}

#[derive(Debug, Default)]
struct PoolCache {
    objects: HashMap<u32, Cached>,
}

/// One object as the pool's table has it.
struct ObjectRow {
    id: u32,
    uuid: Uuid,
    name: String,
    snapshot: bool,
    volume_uuid: Option<Uuid>,
    pvc_namespace: String,
    pvc_name: String,
    size_bytes: u64,
    labels: std::collections::BTreeMap<String, String>,
    /// Its export record, if it has one.
    export: Option<Vec<u8>>,
    /// Its QoS limits and throttling, when it has limits or was ever throttled.
    qos: Option<QosSample>,
}

/// An object's export record (the export part of its control record).
fn export_part(table: &crate::lvs::pool::VolumeTable, id: u32) -> Option<Vec<u8>> {
    ObjectRecord::decode(table.control.get(&id).map(Vec::as_slice))
        .ok()
        .and_then(|r| r.export)
}

/// An object's QoS as `/metrics` shows it (read on the owner reactor).
fn qos_sample(rt: &crate::lvs::volume::PoolRt, id: u32) -> Option<QosSample> {
    let (limits, stats) = rt.qos(id).ok()?;
    (!limits.is_unlimited() || stats != QosStats::default()).then_some(QosSample {
        limits,
        throttled_ios: stats.throttled_ios,
        throttled_ns: stats.throttled_ns,
    })
}

struct PoolRead {
    figures: PoolFiguresSample,
    /// Served but degraded (`PoolRt::health`).
    degraded: bool,
    stamp: Stamp,
    rows: Vec<ObjectRow>,
}

/// Gathers the pool part of `/metrics`, caching object figures between scrapes.
#[derive(Debug, Default)]
pub struct Scraper {
    cache: tokio::sync::Mutex<(u64, HashMap<Uuid, PoolCache>)>,
    /// Maps scanned since start (`coreblk_metrics_object_scans_total`).
    scans: AtomicU64,
}

impl Scraper {
    /// Volume and snapshot maps scanned so far.
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// The pools and their objects now. Scrapes run one at a time.
    pub async fn scrape(&self, store: &Store) -> (Vec<PoolSample>, Vec<ObjectSample>) {
        let mut guard = self.cache.lock().await;
        let (scrapes, caches) = &mut *guard;
        *scrapes += 1;
        let scrape = *scrapes;
        let pools = store.pools();
        let io = REGISTRY.collect();
        caches.retain(|uuid, _| pools.iter().any(|p| p.uuid == *uuid));
        let (mut out_pools, mut out_objects) = (Vec::new(), Vec::new());
        for p in &pools {
            let state = match p.state {
                PoolState::Importing => PoolStateSample::Importing,
                PoolState::Online => PoolStateSample::Online,
                PoolState::Failed(_) => PoolStateSample::Failed,
            };
            let mut sample = PoolSample {
                name: p.name.clone(),
                uuid: p.uuid.to_string(),
                state,
                capacity_bytes: p.capacity_bytes,
                overcommit_limit: p.overcommit_limit,
                figures: None,
            };
            if p.state == PoolState::Online {
                let cache = caches.entry(p.uuid).or_default();
                match scrape_pool(store, p, cache, scrape, &self.scans, &io).await {
                    Ok((figures, objects, degraded)) => {
                        if degraded {
                            sample.state = PoolStateSample::Degraded;
                        }
                        sample.figures = Some(figures);
                        out_objects.extend(objects);
                    }
                    Err(error) => {
                        tracing::warn!(pool = %p.name, %error, "metrics could not read the pool");
                    }
                }
            }
            out_pools.push(sample);
        }
        (out_pools, out_objects)
    }
}

async fn read_pool(store: &Store, p: &PoolInfo) -> super::Result<PoolRead> {
    let q = store.pool_query(p, |rt| {
        let u = rt.usage();
        let j = rt.journal_stats();
        let st = rt.stats();
        let table = rt.volumes();
        let label = |m: &crate::lvs::pool::VolumeMeta, k: &str| {
            m.labels.get(k).cloned().unwrap_or_default()
        };
        let mut rows: Vec<ObjectRow> = table
            .volumes
            .values()
            .map(|m| ObjectRow {
                id: m.id,
                uuid: Uuid(m.uuid),
                name: m.name.clone(),
                snapshot: false,
                volume_uuid: None,
                pvc_namespace: label(m, PVC_NAMESPACE_LABEL),
                pvc_name: label(m, PVC_NAME_LABEL),
                size_bytes: m.size_bytes,
                labels: m.labels.clone(),
                export: export_part(&table, m.id),
                qos: qos_sample(rt, m.id),
            })
            .collect();
        rows.extend(table.snapshots.values().map(|m| {
            ObjectRow {
                id: m.id,
                uuid: Uuid(m.uuid),
                name: m.name.clone(),
                snapshot: true,
                volume_uuid: table
                    .lineage
                    .get(&m.id)
                    .and_then(|l| table.get(l.source))
                    .map(|s| Uuid(s.uuid)),
                pvc_namespace: String::new(),
                pvc_name: String::new(),
                size_bytes: m.size_bytes,
                labels: m.labels.clone(),
                export: export_part(&table, m.id),
                qos: None,
            }
        }));
        PoolRead {
            degraded: rt.health().is_some(),
            figures: PoolFiguresSample {
                free_bytes: u.free_bytes,
                allocated_bytes: u.allocated_bytes,
                provisioned_bytes: u.provisioned_bytes,
                reserved_bytes: u.reserved_bytes,
                held_by_deleted_bytes: u.recycling_bytes,
                volumes: u.volumes,
                snapshots: u.snapshots,
                journal_commits: j.commits,
                journal_flushes: j.flushes,
                journal_blocks: j.blocks,
                journal_writes: j.writes,
                journal_records: j.records,
                journal_write_latency: j.write_latency,
                checkpoints: st.checkpoints,
                copy_ups: st.copy_ups,
                allocations: st.allocations,
                stale_objects: 0,
            },
            stamp: rt.settled().then_some(j.commits),
            rows,
        }
    });
    tokio::time::timeout(POOL_TIMEOUT, q)
        .await
        .map_err(|_| timeout_error(p))?
}

fn timeout_error(p: &PoolInfo) -> super::Error {
    super::Error::Internal(format!(
        "pool {} (reactor {}) did not answer the metrics scrape within {} s",
        p.name,
        p.owner,
        POOL_TIMEOUT.as_secs()
    ))
}

/// Scans `ids` on the owner reactor: the pool's stamp then, and each live object's figures.
async fn scan(
    store: &Store,
    p: &PoolInfo,
    ids: Vec<u32>,
) -> super::Result<(Stamp, Vec<(u32, ObjectUsage)>)> {
    let q = store.pool_query(p, move |rt| {
        let stamp = rt.settled().then_some(rt.journal_stats().commits);
        let got = ids
            .iter()
            .filter_map(|id| rt.object_usage(*id).map(|u| (*id, u)))
            .collect::<Vec<_>>();
        (stamp, got)
    });
    tokio::time::timeout(POOL_TIMEOUT, q)
        .await
        .map_err(|_| timeout_error(p))?
}

async fn scrape_pool(
    store: &Store,
    p: &PoolInfo,
    cache: &mut PoolCache,
    scrape: u64,
    scans: &AtomicU64,
    io: &HashMap<u32, IoCounts>,
) -> super::Result<(PoolFiguresSample, Vec<ObjectSample>, bool)> {
    let read = read_pool(store, p).await?;
    cache
        .objects
        .retain(|id, _| read.rows.iter().any(|r| r.id == *id));
    let mut latest = read.stamp;
    // Never scanned first, then the oldest scans.
    let mut todo: Vec<(u64, u32)> = read
        .rows
        .iter()
        .filter_map(|r| match cache.objects.get(&r.id) {
            None => Some((0, r.id)),
            Some(c) if c.stamp.is_none() || c.stamp != read.stamp => Some((c.scrape, r.id)),
            Some(_) => None,
        })
        .collect();
    todo.sort_unstable();
    todo.truncate(MAX_SCANS_PER_SCRAPE);
    for batch in todo.chunks(SCAN_BATCH) {
        let ids: Vec<u32> = batch.iter().map(|(_, id)| *id).collect();
        let n = u64::try_from(ids.len()).unwrap_or(u64::MAX);
        let (stamp, got) = scan(store, p, ids).await?;
        scans.fetch_add(n, Ordering::Relaxed);
        latest = stamp;
        for (id, usage) in got {
            cache.objects.insert(
                id,
                Cached {
                    usage,
                    stamp,
                    scrape,
                },
            );
        }
    }
    let mut figures = read.figures;
    let mut objects = Vec::with_capacity(read.rows.len());
    for r in read.rows {
        let cached = cache.objects.get(&r.id);
        if cached.is_none_or(|c| c.stamp.is_none() || c.stamp != latest) {
            figures.stale_objects += 1;
        }
        objects.push(ObjectSample {
            pool: p.name.clone(),
            uuid: r.uuid.to_string(),
            name: r.name,
            kind: if r.snapshot {
                ObjectKind::Snapshot
            } else {
                ObjectKind::Volume
            },
            volume_uuid: r.volume_uuid.map(|u| u.to_string()).unwrap_or_default(),
            pvc_namespace: r.pvc_namespace,
            pvc_name: r.pvc_name,
            size_bytes: r.size_bytes,
            labels: r.labels,
            allocated_bytes: cached.map(|c| c.usage.allocated_bytes),
            unique_bytes: cached.map(|c| c.usage.unique_bytes),
            export: r.export.as_deref().and_then(|rec| export_sample(rec, io)),
            qos: r.qos,
        });
    }
    Ok((figures, objects, read.degraded))
}

/// An object's export as `/metrics` shows it: its record (device id, path, flags) and the
/// counters of the queues serving that device here; `None` when the record is unreadable
/// or no queue of this daemon serves the device (yet).
fn export_sample(record: &[u8], io: &HashMap<u32, IoCounts>) -> Option<ExportSample> {
    let rec = crate::export::Record::decode(record).ok()?;
    Some(ExportSample {
        device: coreblk_ublk::block_path(rec.dev_id).display().to_string(),
        data_path: rec.path.name(),
        read_only: rec.read_only,
        persistent: rec.persistent,
        io: *io.get(&rec.dev_id)?,
    })
}
