//! Metrics (DESIGN §8): the Prometheus `/metrics` endpoint.
//!
//! Owns: what the daemon exports ([`Snapshot`] → [`render`]), the text exposition format
//! writer and a strict checker for it ([`text`]), and a tiny HTTP/1.1 responder on the
//! control plane's tokio runtime ([`http`]).
//!
//! Must never: touch a reactor (it reads the reactors' atomic counters only); turn user
//! labels or names into metric labels (cardinality: objects are keyed by uuid, and one
//! `*_info` series carries the names to join on); block the runtime.
//!
//! Names follow Prometheus conventions: `coreblk_` prefix, base units (`_bytes`,
//! `_seconds`), `_total` for counters. Pools are keyed by their name (`pool`), volumes and
//! snapshots by `uuid` (with `pool` and `kind`); `coreblk_volume_info` and
//! `coreblk_snapshot_info` carry the names to join on. Journal write latency is a
//! histogram per pool (`coreblk_journal_commit_seconds`, recorded by the journal in fixed
//! atomic buckets). Each volume (or snapshot) this daemon exports has
//! `coreblk_export_info` and `coreblk_volume_io_*` by `uuid` and `op`: requests, bytes,
//! errors and a latency histogram, recorded by its ublk queues on their reactors
//! (`export::stats`) and summed over the queues at scrape time. `coreblk_daemon_state`
//! says whether the daemon serves calls yet (the alert rules in
//! `csi/deploy/monitoring/` watch it after a restart). Volumes with QoS limits (or that
//! were throttled) have `coreblk_volume_qos_limit` by `limit` and
//! `coreblk_volume_throttled_{seconds,requests}_total`, read from the volume store's
//! per-volume atomics (`lvs::qos`) at scrape time.
//! Start reading at [`render`].

pub mod http;
pub mod status;
pub mod text;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use text::{Exposition, Kind};

use crate::export::stats::{IoCounts, IoOp, LATENCY_BOUNDS_NS, LATENCY_CLASSES};
use crate::lvs::journal::{LatencyCounts, WRITE_LATENCY_BOUNDS_NS};
use crate::lvs::qos::QosLimits;

/// One reactor's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReactorSample {
    /// Reactor id.
    pub id: usize,
    /// The core it runs on.
    pub core: usize,
    /// Nanoseconds in loop iterations that found work.
    pub busy_ns: u64,
    /// Nanoseconds asleep in the kernel.
    pub sleep_ns: u64,
    /// Times it went to sleep.
    pub sleeps: u64,
    /// Of those, sleeps taken without polling first (hybrid polling).
    pub early_sleeps: u64,
    /// Requests completed.
    pub completions: u64,
}

/// One claimed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSample {
    /// Its UUID (from the label).
    pub device_uuid: String,
    /// The pool its label names.
    pub pool_uuid: String,
    /// Its path now.
    pub path: String,
    /// Size (0 when not present).
    pub size_bytes: u64,
    /// Held open now.
    pub present: bool,
}

/// The daemon's state as `coreblk_daemon_state` shows it (the node API's `DaemonState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonStateSample {
    /// Importing pools: pool, volume and snapshot calls answer UNAVAILABLE.
    Starting,
    /// Serving calls.
    Serving,
    /// Stopping: finishing in-flight calls, refusing new ones.
    Stopping,
}

impl DaemonStateSample {
    const ALL: [Self; 3] = [Self::Starting, Self::Serving, Self::Stopping];

    /// The `state` label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Serving => "serving",
            Self::Stopping => "stopping",
        }
    }
}

/// A pool's state as `coreblk_pool_state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStateSample {
    /// Being imported.
    Importing,
    /// Served.
    Online,
    /// Not served.
    Failed,
    /// Served, but metadata changes fail (a journal write or the last checkpoint failed).
    Degraded,
}

impl PoolStateSample {
    const ALL: [Self; 4] = [Self::Importing, Self::Online, Self::Failed, Self::Degraded];

    fn as_str(self) -> &'static str {
        match self {
            Self::Importing => "importing",
            Self::Online => "online",
            Self::Failed => "failed",
            Self::Degraded => "degraded",
        }
    }
}

/// Figures read from a running pool on its owner reactor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolFiguresSample {
    /// Not held by any map (ready or being recycled), less what thick volumes reserve.
    pub free_bytes: u64,
    /// Held by at least one map.
    pub allocated_bytes: u64,
    /// Sum of the volumes' sizes.
    pub provisioned_bytes: u64,
    /// Reserved for thick volumes.
    pub reserved_bytes: u64,
    /// Freed by deleted objects (and discards, copy-on-write), being recycled.
    pub held_by_deleted_bytes: u64,
    /// Volumes (clones included).
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Journal commits acknowledged.
    pub journal_commits: u64,
    /// Journal device flushes.
    pub journal_flushes: u64,
    /// Journal blocks written.
    pub journal_blocks: u64,
    /// Journal writes issued.
    pub journal_writes: u64,
    /// Journal records written.
    pub journal_records: u64,
    /// Metadata checkpoints written.
    pub checkpoints: u64,
    /// Clusters copied up for copy-on-write.
    pub copy_ups: u64,
    /// Allocating writes into new clusters.
    pub allocations: u64,
    /// Volumes and snapshots whose usage figures predate the pool's last change (the
    /// per-scrape scan bound was reached, or the pool changed during the scrape).
    pub stale_objects: u64,
    /// Journal writes by latency (submit to completion).
    pub journal_write_latency: LatencyCounts,
}

/// One pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSample {
    /// Name (the `pool` label).
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// State.
    pub state: PoolStateSample,
    /// Data capacity (0 when unknown).
    pub capacity_bytes: u64,
    /// provisioned ≤ limit × capacity.
    pub overcommit_limit: f64,
    /// Figures, when the pool is online and its reactor answered.
    pub figures: Option<PoolFiguresSample>,
}

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A writable volume (clones included).
    Volume,
    /// A read-only snapshot.
    Snapshot,
}

impl ObjectKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::Snapshot => "snapshot",
        }
    }
}

/// One volume or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSample {
    /// Its pool's name.
    pub pool: String,
    /// UUID.
    pub uuid: String,
    /// Name.
    pub name: String,
    /// Volume or snapshot.
    pub kind: ObjectKind,
    /// A snapshot's volume UUID (empty for a volume, or when unknown).
    pub volume_uuid: String,
    /// The `csi.storage.k8s.io/pvc/namespace` label (empty when unset).
    pub pvc_namespace: String,
    /// The `csi.storage.k8s.io/pvc/name` label (empty when unset).
    pub pvc_name: String,
    /// Logical size, bytes.
    pub size_bytes: u64,
    /// Its user labels: for the status page only, never metric labels (cardinality).
    pub labels: BTreeMap<String, String>,
    /// Clusters it maps, shared or not (`None`: never scanned yet).
    pub allocated_bytes: Option<u64>,
    /// Clusters only it references.
    pub unique_bytes: Option<u64>,
    /// Its ublk export, when this daemon serves one.
    pub export: Option<ExportSample>,
    /// Its QoS limits and throttling (volumes with limits, or throttled since start).
    pub qos: Option<QosSample>,
}

/// A volume's QoS: its limits and how much they held its requests back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QosSample {
    /// The limits in force.
    pub limits: QosLimits,
    /// Requests that waited for the limits (since the pool started here).
    pub throttled_ios: u64,
    /// Time they waited, summed over requests, nanoseconds.
    pub throttled_ns: u64,
}

/// One export this daemon serves, with its IO counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSample {
    /// `/dev/ublkbN`.
    pub device: String,
    /// The data path (`copy`, `zero-copy`).
    pub data_path: &'static str,
    /// Exported read-only.
    pub read_only: bool,
    /// Re-created after a node reboot.
    pub persistent: bool,
    /// Its requests so far, summed over its queues.
    pub io: IoCounts,
}

/// Everything `/metrics` shows, gathered at scrape time.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The daemon's version.
    pub version: &'static str,
    /// The node id this daemon reports (the status page's title).
    pub node_id: String,
    /// When the daemon started.
    pub start_time: SystemTime,
    /// Starting, serving or stopping.
    pub state: DaemonStateSample,
    /// Per-reactor counters.
    pub reactors: Vec<ReactorSample>,
    /// Claimed devices (present or recorded).
    pub devices: Vec<DeviceSample>,
    /// Pools.
    pub pools: Vec<PoolSample>,
    /// Volumes and snapshots of the online pools.
    pub objects: Vec<ObjectSample>,
    /// Volume and snapshot maps scanned for their figures since start.
    pub object_scans: u64,
}

/// A per-pool figure family: name, kind, help, and how to read it.
type PoolFamily = (
    &'static str,
    Kind,
    &'static str,
    fn(&PoolFiguresSample) -> u64,
);

const POOL_FAMILIES: [PoolFamily; 16] = [
    (
        "coreblk_pool_free_bytes",
        Kind::Gauge,
        "Space of each online pool held by no volume or snapshot (ready, or being recycled), less what thick volumes reserve.",
        |f| f.free_bytes,
    ),
    (
        "coreblk_pool_allocated_bytes",
        Kind::Gauge,
        "Space of each online pool held by at least one volume or snapshot.",
        |f| f.allocated_bytes,
    ),
    (
        "coreblk_pool_provisioned_bytes",
        Kind::Gauge,
        "Sum of the sizes of each online pool's volumes (thin: may exceed capacity up to the overcommit limit).",
        |f| f.provisioned_bytes,
    ),
    (
        "coreblk_pool_reserved_bytes",
        Kind::Gauge,
        "Space of each online pool reserved for thick volumes and not yet written.",
        |f| f.reserved_bytes,
    ),
    (
        "coreblk_pool_held_by_deleted_bytes",
        Kind::Gauge,
        "Space deleted volumes and snapshots (and discards, copy-on-write) freed that is still being recycled before reuse.",
        |f| f.held_by_deleted_bytes,
    ),
    (
        "coreblk_pool_volumes",
        Kind::Gauge,
        "Volumes (clones included) in each online pool.",
        |f| f.volumes,
    ),
    (
        "coreblk_pool_snapshots",
        Kind::Gauge,
        "Snapshots in each online pool.",
        |f| f.snapshots,
    ),
    (
        "coreblk_pool_journal_commits_total",
        Kind::Counter,
        "Metadata journal commits acknowledged, per pool, since the pool was imported.",
        |f| f.journal_commits,
    ),
    (
        "coreblk_pool_journal_flushes_total",
        Kind::Counter,
        "Device flushes the metadata journal issued, per pool, since the pool was imported.",
        |f| f.journal_flushes,
    ),
    (
        "coreblk_pool_journal_blocks_total",
        Kind::Counter,
        "Metadata journal blocks written, per pool, since the pool was imported.",
        |f| f.journal_blocks,
    ),
    (
        "coreblk_pool_journal_writes_total",
        Kind::Counter,
        "Metadata journal writes issued, per pool, since the pool was imported.",
        |f| f.journal_writes,
    ),
    (
        "coreblk_pool_journal_records_total",
        Kind::Counter,
        "Metadata journal records written, per pool, since the pool was imported.",
        |f| f.journal_records,
    ),
    (
        "coreblk_pool_checkpoints_total",
        Kind::Counter,
        "Metadata checkpoints written, per pool, since the pool was imported.",
        |f| f.checkpoints,
    ),
    (
        "coreblk_pool_copy_ups_total",
        Kind::Counter,
        "Clusters copied for copy-on-write (partial writes to shared clusters, inflate), per pool.",
        |f| f.copy_ups,
    ),
    (
        "coreblk_pool_allocations_total",
        Kind::Counter,
        "Writes that allocated a new cluster, per pool.",
        |f| f.allocations,
    ),
    (
        "coreblk_pool_stale_objects",
        Kind::Gauge,
        "Volumes and snapshots whose allocated/unique figures predate the pool's last metadata change (refreshed on later scrapes).",
        |f| f.stale_objects,
    ),
];

/// A per-reactor counter family: name, help, and how to read it from a sample.
type ReactorFamily = (&'static str, &'static str, fn(&ReactorSample) -> f64);

fn seconds(ns: u64) -> f64 {
    Duration::from_nanos(ns).as_secs_f64()
}

/// The exposition of `s`.
#[must_use]
pub fn render(s: &Snapshot) -> String {
    let mut e = Exposition::new();
    e.family(
        "coreblk_build_info",
        Kind::Gauge,
        "Always 1; the labels say which coreblkd build is running.",
    );
    e.sample("coreblk_build_info", &[("version", s.version)], 1.0);
    e.family(
        "coreblk_start_time_seconds",
        Kind::Gauge,
        "When the daemon started, in seconds since the Unix epoch.",
    );
    let start = s
        .start_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    e.sample("coreblk_start_time_seconds", &[], start);
    e.family(
        "coreblk_daemon_state",
        Kind::Gauge,
        "1 for the daemon's current state (starting: importing pools, calls answer UNAVAILABLE; serving; stopping), 0 for the others.",
    );
    for st in DaemonStateSample::ALL {
        let on = if st == s.state { 1.0 } else { 0.0 };
        e.sample("coreblk_daemon_state", &[("state", st.as_str())], on);
    }

    let reactor_families: [ReactorFamily; 5] = [
        (
            "coreblk_reactor_busy_seconds_total",
            "Time each reactor spent in loop iterations that found work.",
            |r| seconds(r.busy_ns),
        ),
        (
            "coreblk_reactor_sleep_seconds_total",
            "Time each reactor spent asleep in the kernel waiting for work.",
            |r| seconds(r.sleep_ns),
        ),
        (
            "coreblk_reactor_sleeps_total",
            "Times each reactor went to sleep in the kernel.",
            |r| count(r.sleeps),
        ),
        (
            "coreblk_reactor_early_sleeps_total",
            "Sleeps a reactor took without polling first, because work lately came later than poll_max_gap_us (hybrid polling); a part of coreblk_reactor_sleeps_total.",
            |r| count(r.early_sleeps),
        ),
        (
            "coreblk_reactor_completions_total",
            "Requests each reactor completed (device IO and software completions).",
            |r| count(r.completions),
        ),
    ];
    for (name, help, value) in reactor_families {
        e.family(name, Kind::Counter, help);
        for r in &s.reactors {
            let (id, core) = (r.id.to_string(), r.core.to_string());
            e.sample(name, &[("reactor", &id), ("core", &core)], value(r));
        }
    }

    let present = s.devices.iter().filter(|d| d.present).count();
    e.family(
        "coreblk_claimed_devices",
        Kind::Gauge,
        "Devices this daemon holds, by state: present (held open) or missing (recorded as claimed, not found at start-up).",
    );
    e.sample(
        "coreblk_claimed_devices",
        &[("state", "present")],
        count_usize(present),
    );
    e.sample(
        "coreblk_claimed_devices",
        &[("state", "missing")],
        count_usize(s.devices.len() - present),
    );
    e.family(
        "coreblk_claimed_device_size_bytes",
        Kind::Gauge,
        "Size of each claimed device that is present.",
    );
    for d in s.devices.iter().filter(|d| d.present) {
        e.sample(
            "coreblk_claimed_device_size_bytes",
            &[
                ("device_uuid", &d.device_uuid),
                ("pool_uuid", &d.pool_uuid),
                ("path", &d.path),
            ],
            count(d.size_bytes),
        );
    }
    render_pools(&mut e, &s.pools);
    render_objects(&mut e, &s.objects);
    e.family(
        "coreblk_metrics_object_scans_total",
        Kind::Counter,
        "Volume and snapshot maps scanned on their owner reactors for /metrics (figures are cached while a pool is unchanged).",
    );
    e.sample(
        "coreblk_metrics_object_scans_total",
        &[],
        count(s.object_scans),
    );
    e.finish()
}

fn render_pools(e: &mut Exposition, pools: &[PoolSample]) {
    e.family(
        "coreblk_pool_state",
        Kind::Gauge,
        "1 for each pool's current state (importing, online, failed, degraded: served but metadata changes fail), 0 for the others.",
    );
    for p in pools {
        for st in PoolStateSample::ALL {
            let on = if st == p.state { 1.0 } else { 0.0 };
            e.sample(
                "coreblk_pool_state",
                &[("pool", &p.name), ("state", st.as_str())],
                on,
            );
        }
    }
    e.family(
        "coreblk_pool_info",
        Kind::Gauge,
        "Always 1; the labels give each pool's UUID.",
    );
    for p in pools {
        e.sample(
            "coreblk_pool_info",
            &[("pool", &p.name), ("pool_uuid", &p.uuid)],
            1.0,
        );
    }
    e.family(
        "coreblk_pool_capacity_bytes",
        Kind::Gauge,
        "Space of each pool for data (its device less metadata); 0 when not known yet.",
    );
    for p in pools {
        e.sample(
            "coreblk_pool_capacity_bytes",
            &[("pool", &p.name)],
            count(p.capacity_bytes),
        );
    }
    e.family(
        "coreblk_pool_overcommit_limit_ratio",
        Kind::Gauge,
        "Each pool's overcommit limit: provisioned bytes may reach this many times the capacity.",
    );
    for p in pools {
        e.sample(
            "coreblk_pool_overcommit_limit_ratio",
            &[("pool", &p.name)],
            p.overcommit_limit,
        );
    }
    e.family(
        "coreblk_pool_scrape_success",
        Kind::Gauge,
        "1 when an online pool's figures were read for this page, 0 when its reactor did not answer in time; absent for pools not online.",
    );
    for p in pools
        .iter()
        .filter(|p| matches!(p.state, PoolStateSample::Online | PoolStateSample::Degraded))
    {
        let ok = if p.figures.is_some() { 1.0 } else { 0.0 };
        e.sample("coreblk_pool_scrape_success", &[("pool", &p.name)], ok);
    }
    for (name, kind, help, value) in POOL_FAMILIES {
        e.family(name, kind, help);
        for p in pools {
            if let Some(f) = &p.figures {
                e.sample(name, &[("pool", &p.name)], count(value(f)));
            }
        }
    }
    let bounds_s = WRITE_LATENCY_BOUNDS_NS.map(seconds);
    e.family(
        "coreblk_journal_commit_seconds",
        Kind::Histogram,
        "Latency of each online pool's metadata journal writes, submit to completion (one write carries every commit that waited for it), since the pool was imported.",
    );
    for p in pools {
        if let Some(f) = &p.figures {
            let h = &f.journal_write_latency;
            e.histogram(
                "coreblk_journal_commit_seconds",
                &[("pool", &p.name)],
                &bounds_s,
                &h.buckets,
                seconds(h.sum_ns),
            );
        }
    }
}

fn render_objects(e: &mut Exposition, objects: &[ObjectSample]) {
    e.family(
        "coreblk_volume_info",
        Kind::Gauge,
        "Always 1, one series per volume: its name and PVC to join the per-uuid series on (user labels are never metric labels).",
    );
    for o in objects.iter().filter(|o| o.kind == ObjectKind::Volume) {
        e.sample(
            "coreblk_volume_info",
            &[
                ("uuid", &o.uuid),
                ("name", &o.name),
                ("pool", &o.pool),
                ("pvc_namespace", &o.pvc_namespace),
                ("pvc_name", &o.pvc_name),
            ],
            1.0,
        );
    }
    e.family(
        "coreblk_snapshot_info",
        Kind::Gauge,
        "Always 1, one series per snapshot: its name and the UUID of the volume it was taken of.",
    );
    for o in objects.iter().filter(|o| o.kind == ObjectKind::Snapshot) {
        e.sample(
            "coreblk_snapshot_info",
            &[
                ("uuid", &o.uuid),
                ("name", &o.name),
                ("pool", &o.pool),
                ("volume_uuid", &o.volume_uuid),
            ],
            1.0,
        );
    }
    type ObjectFamily = (&'static str, &'static str, fn(&ObjectSample) -> Option<u64>);
    let families: [ObjectFamily; 3] = [
        (
            "coreblk_object_size_bytes",
            "Logical size of each volume or snapshot (what its user sees; kind says which).",
            |o| Some(o.size_bytes),
        ),
        (
            "coreblk_object_allocated_bytes",
            "Space each volume or snapshot maps, shared or not (kind says which).",
            |o| o.allocated_bytes,
        ),
        (
            "coreblk_object_unique_bytes",
            "Space only this volume or snapshot references: what deleting it would free.",
            |o| o.unique_bytes,
        ),
    ];
    for (name, help, value) in families {
        e.family(name, Kind::Gauge, help);
        for o in objects {
            if let Some(v) = value(o) {
                e.sample(
                    name,
                    &[
                        ("pool", &o.pool),
                        ("uuid", &o.uuid),
                        ("kind", o.kind.as_str()),
                    ],
                    count(v),
                );
            }
        }
    }
    render_exports(e, objects);
    render_qos(e, objects);
}

fn render_qos(e: &mut Exposition, objects: &[ObjectSample]) {
    let qos: Vec<(&str, &QosSample)> = objects
        .iter()
        .filter_map(|o| Some((o.uuid.as_str(), o.qos.as_ref()?)))
        .collect();
    e.family(
        "coreblk_volume_qos_limit",
        Kind::Gauge,
        "QoS limits of each volume that has any, by limit (iops, read_iops, write_iops in requests per second; bytes, read_bytes, write_bytes in bytes per second); unset limits have no series.",
    );
    let names = [
        "iops",
        "read_iops",
        "write_iops",
        "bytes",
        "read_bytes",
        "write_bytes",
    ];
    for (uuid, q) in &qos {
        for (v, name) in q.limits.rates().iter().zip(names) {
            if *v > 0 {
                e.sample(
                    "coreblk_volume_qos_limit",
                    &[("uuid", uuid), ("limit", name)],
                    count(*v),
                );
            }
        }
    }
    e.family(
        "coreblk_volume_throttled_seconds_total",
        Kind::Counter,
        "Time requests of each volume waited for its QoS limits, summed over requests (two requests waiting 1 s each count 2 s), since its pool started in this daemon.",
    );
    for (uuid, q) in &qos {
        e.sample(
            "coreblk_volume_throttled_seconds_total",
            &[("uuid", uuid)],
            seconds(q.throttled_ns),
        );
    }
    e.family(
        "coreblk_volume_throttled_requests_total",
        Kind::Counter,
        "Requests of each volume that waited for its QoS limits, since its pool started in this daemon.",
    );
    for (uuid, q) in &qos {
        e.sample(
            "coreblk_volume_throttled_requests_total",
            &[("uuid", uuid)],
            count(q.throttled_ios),
        );
    }
}

fn render_exports(e: &mut Exposition, objects: &[ObjectSample]) {
    let exports: Vec<(&str, &ExportSample)> = objects
        .iter()
        .filter_map(|o| Some((o.uuid.as_str(), o.export.as_ref()?)))
        .collect();
    e.family(
        "coreblk_export_info",
        Kind::Gauge,
        "Always 1, one series per volume or snapshot this daemon exports: its ublk device and data path.",
    );
    for (uuid, x) in &exports {
        e.sample(
            "coreblk_export_info",
            &[
                ("uuid", uuid),
                ("device", &x.device),
                ("data_path", x.data_path),
                ("read_only", bool_label(x.read_only)),
                ("persistent", bool_label(x.persistent)),
            ],
            1.0,
        );
    }
    type IoFamily = (&'static str, &'static str, fn(&IoCounts, IoOp) -> u64);
    let families: [IoFamily; 3] = [
        (
            "coreblk_volume_io_ops_total",
            "Requests the kernel sent to each exported volume and this daemon answered, by op (since it was exported by this daemon).",
            IoCounts::ops,
        ),
        (
            "coreblk_volume_io_bytes_total",
            "Bytes of each exported volume's requests answered without error, by op (discard and write_zeroes count their range).",
            IoCounts::bytes,
        ),
        (
            "coreblk_volume_io_errors_total",
            "Requests of each exported volume answered with an error (no space, unsupported, IO error), by op.",
            IoCounts::errors,
        ),
    ];
    for (name, help, value) in families {
        e.family(name, Kind::Counter, help);
        for (uuid, x) in &exports {
            for op in IoOp::ALL {
                e.sample(
                    name,
                    &[("uuid", uuid), ("op", op.name())],
                    count(value(&x.io, op)),
                );
            }
        }
    }
    let bounds_s = LATENCY_BOUNDS_NS.map(seconds);
    e.family(
        "coreblk_volume_io_latency_seconds",
        Kind::Histogram,
        "Latency of each exported volume's requests in this daemon, from the request seen (its fetch completed) to its answer submitted, by op (read, write, other); resolution one reactor loop iteration.",
    );
    for (uuid, x) in &exports {
        for (h, op) in x.io.latency.iter().zip(LATENCY_CLASSES) {
            e.histogram(
                "coreblk_volume_io_latency_seconds",
                &[("uuid", uuid), ("op", op)],
                &bounds_s,
                &h.buckets,
                seconds(h.sum_ns),
            );
        }
    }
}

fn bool_label(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// A counter as a sample value. Prometheus values are doubles: above 2^53 the value is
/// rounded, which is how every exporter reports large counters.
#[allow(clippy::cast_precision_loss)]
fn count(n: u64) -> f64 {
    n as f64
}

fn count_usize(n: usize) -> f64 {
    count(u64::try_from(n).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 4 KiB reads (30 µs, 5 ms) and a failed 8 KiB write (2 ms) through the
    /// recorder, as one queue of a device would see them.
    fn sample_io() -> IoCounts {
        use crate::export::stats::{Recorder, Registry};
        use crate::export::{DescOp, Plan};
        let reg = Registry::new();
        let q = Recorder::with_registry(&reg, 3, 8);
        let t0 = std::time::Instant::now();
        let read = Plan::Read {
            offset: 0,
            len: 4096,
        };
        q.start(0, DescOp::Read, &read, t0);
        q.start(1, DescOp::Read, &read, t0);
        let write = Plan::Write {
            offset: 0,
            len: 8192,
            fua: false,
        };
        q.start(2, DescOp::Write, &write, t0);
        q.finish(0, 4096, t0 + Duration::from_micros(30));
        q.finish(1, 4096, t0 + Duration::from_millis(5));
        q.finish(2, -libc::ENOSPC, t0 + Duration::from_millis(2));
        reg.collect()[&3]
    }

    fn sample() -> Snapshot {
        Snapshot {
            version: "0.1.0",
            node_id: "node-a".into(),
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            state: DaemonStateSample::Starting,
            reactors: vec![
                ReactorSample {
                    id: 0,
                    core: 2,
                    busy_ns: 1_500_000_000,
                    sleep_ns: 3_000_000_000,
                    sleeps: 7,
                    early_sleeps: 3,
                    completions: 42,
                },
                ReactorSample {
                    id: 1,
                    core: 3,
                    ..ReactorSample::default()
                },
            ],
            devices: vec![
                DeviceSample {
                    device_uuid: "d1".into(),
                    pool_uuid: "p1".into(),
                    path: "/var/lib/x \"quoted\"\\.img".into(),
                    size_bytes: 1 << 30,
                    present: true,
                },
                DeviceSample {
                    device_uuid: "d2".into(),
                    pool_uuid: "p1".into(),
                    path: "/dev/nvme9n1".into(),
                    size_bytes: 0,
                    present: false,
                },
            ],
            pools: vec![
                PoolSample {
                    name: "default".into(),
                    uuid: "p1".into(),
                    state: PoolStateSample::Online,
                    capacity_bytes: 1 << 30,
                    overcommit_limit: 1.5,
                    figures: Some(PoolFiguresSample {
                        free_bytes: 100,
                        allocated_bytes: 200,
                        journal_commits: 9,
                        journal_write_latency: LatencyCounts {
                            // 2 writes ≤ 100 µs, 1 ≤ 1 ms, 1 past 2.5 s.
                            buckets: std::array::from_fn(|i| match i {
                                0 => 2,
                                3 | 14 => 1,
                                _ => 0,
                            }),
                            sum_ns: 3_000_500_000,
                        },
                        ..PoolFiguresSample::default()
                    }),
                },
                PoolSample {
                    name: "broken".into(),
                    uuid: "p2".into(),
                    state: PoolStateSample::Failed,
                    capacity_bytes: 0,
                    overcommit_limit: 1.0,
                    figures: None,
                },
            ],
            objects: vec![
                ObjectSample {
                    pool: "default".into(),
                    uuid: "v1".into(),
                    name: "pvc-1".into(),
                    kind: ObjectKind::Volume,
                    volume_uuid: String::new(),
                    pvc_namespace: "ns".into(),
                    pvc_name: "data".into(),
                    size_bytes: 1 << 20,
                    labels: BTreeMap::from([("team".into(), "<b>db</b>".into())]),
                    allocated_bytes: Some(65536),
                    unique_bytes: Some(0),
                    export: Some(ExportSample {
                        device: "/dev/ublkb3".into(),
                        data_path: "copy",
                        read_only: false,
                        persistent: true,
                        io: sample_io(),
                    }),
                    qos: Some(QosSample {
                        limits: QosLimits {
                            iops: 5000,
                            write_bytes_per_sec: 1 << 20,
                            ..QosLimits::default()
                        },
                        throttled_ios: 7,
                        throttled_ns: 1_500_000_000,
                    }),
                },
                ObjectSample {
                    pool: "default".into(),
                    uuid: "s1".into(),
                    name: "snap".into(),
                    kind: ObjectKind::Snapshot,
                    volume_uuid: "v1".into(),
                    pvc_namespace: String::new(),
                    pvc_name: String::new(),
                    size_bytes: 1 << 20,
                    labels: BTreeMap::new(),
                    allocated_bytes: None,
                    unique_bytes: None,
                    export: None,
                    qos: None,
                },
            ],
            object_scans: 5,
        }
    }

    #[test]
    fn the_page_is_valid_exposition_text_with_the_expected_values() {
        let page = render(&sample());
        let parsed = text::parse(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        let value = |name: &str, labels: &[(&str, &str)]| {
            parsed
                .iter()
                .find(|s| {
                    s.name == name
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{page}"))
                .value
        };
        let h = "coreblk_journal_commit_seconds";
        let bucket = |le: &str| value(&format!("{h}_bucket"), &[("pool", "default"), ("le", le)]);
        assert_eq!(bucket("0.0001"), 2.0);
        assert_eq!(bucket("0.001"), 3.0);
        assert_eq!(bucket("2.5"), 3.0);
        assert_eq!(bucket("+Inf"), 4.0);
        assert_eq!(value(&format!("{h}_count"), &[("pool", "default")]), 4.0);
        assert_eq!(
            value("coreblk_volume_throttled_seconds_total", &[("uuid", "v1")]),
            1.5
        );
        assert_eq!(
            value("coreblk_volume_throttled_requests_total", &[("uuid", "v1")]),
            7.0
        );
        assert_eq!(
            value(
                "coreblk_volume_qos_limit",
                &[("uuid", "v1"), ("limit", "iops")]
            ),
            5000.0
        );
        assert_eq!(
            value(
                "coreblk_volume_qos_limit",
                &[("uuid", "v1"), ("limit", "write_bytes")]
            ),
            1_048_576.0
        );
        assert!(
            !page.contains("limit=\"read_iops\"")
                && !page.contains("coreblk_volume_throttled_seconds_total{uuid=\"s1\"}"),
            "unset limits and objects without QoS have no series:\n{page}"
        );
        assert!((value(&format!("{h}_sum"), &[("pool", "default")]) - 3.0005).abs() < 1e-9);
        assert!(
            !page.contains(&format!("{h}_count{{pool=\"broken\"}}")),
            "a pool not online has no histogram:\n{page}"
        );
        assert_eq!(value("coreblk_build_info", &[("version", "0.1.0")]), 1.0);
        assert_eq!(value("coreblk_start_time_seconds", &[]), 1_700_000_000.0);
        assert_eq!(value("coreblk_daemon_state", &[("state", "starting")]), 1.0);
        assert_eq!(value("coreblk_daemon_state", &[("state", "serving")]), 0.0);
        assert_eq!(value("coreblk_daemon_state", &[("state", "stopping")]), 0.0);
        assert_eq!(
            value(
                "coreblk_reactor_busy_seconds_total",
                &[("reactor", "0"), ("core", "2")]
            ),
            1.5
        );
        assert_eq!(
            value("coreblk_reactor_sleep_seconds_total", &[("reactor", "0")]),
            3.0
        );
        assert_eq!(
            value("coreblk_reactor_completions_total", &[("reactor", "0")]),
            42.0
        );
        assert_eq!(
            value("coreblk_reactor_completions_total", &[("reactor", "1")]),
            0.0
        );
        assert_eq!(
            value("coreblk_claimed_devices", &[("state", "present")]),
            1.0
        );
        assert_eq!(
            value("coreblk_claimed_devices", &[("state", "missing")]),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_claimed_device_size_bytes",
                &[("path", "/var/lib/x \"quoted\"\\.img")]
            ),
            1_073_741_824.0
        );
        assert_eq!(
            value(
                "coreblk_pool_state",
                &[("pool", "default"), ("state", "online")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_pool_state",
                &[("pool", "broken"), ("state", "online")]
            ),
            0.0
        );
        assert_eq!(
            value(
                "coreblk_pool_state",
                &[("pool", "broken"), ("state", "failed")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_pool_overcommit_limit_ratio",
                &[("pool", "default")]
            ),
            1.5
        );
        assert_eq!(
            value("coreblk_pool_free_bytes", &[("pool", "default")]),
            100.0
        );
        assert_eq!(
            value("coreblk_pool_journal_commits_total", &[("pool", "default")]),
            9.0
        );
        assert!(!parsed
            .iter()
            .any(|s| s.name == "coreblk_pool_free_bytes" && s.labels["pool"] == "broken"));
        assert_eq!(
            value("coreblk_pool_scrape_success", &[("pool", "default")]),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_volume_info",
                &[
                    ("uuid", "v1"),
                    ("name", "pvc-1"),
                    ("pvc_namespace", "ns"),
                    ("pvc_name", "data")
                ]
            ),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_snapshot_info",
                &[("uuid", "s1"), ("volume_uuid", "v1")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "coreblk_object_allocated_bytes",
                &[("uuid", "v1"), ("kind", "volume"), ("pool", "default")]
            ),
            65536.0
        );
        // Never scanned: absent rather than a made-up zero.
        assert!(!parsed
            .iter()
            .any(|s| s.name == "coreblk_object_allocated_bytes"
                && s.labels.get("uuid").map(String::as_str) == Some("s1")));
        // The size is known without a scan.
        assert_eq!(
            value(
                "coreblk_object_size_bytes",
                &[("uuid", "s1"), ("kind", "snapshot"), ("pool", "default")]
            ),
            1048576.0
        );
        // User labels never become metric labels, nor values.
        assert!(!page.contains("team") && !page.contains("<b>"), "{page}");
        assert_eq!(value("coreblk_metrics_object_scans_total", &[]), 5.0);
        assert_eq!(
            value(
                "coreblk_export_info",
                &[
                    ("uuid", "v1"),
                    ("device", "/dev/ublkb3"),
                    ("data_path", "copy"),
                    ("read_only", "false"),
                    ("persistent", "true")
                ]
            ),
            1.0
        );
        let io = |name: &str, op: &str| value(name, &[("uuid", "v1"), ("op", op)]);
        assert_eq!(io("coreblk_volume_io_ops_total", "read"), 2.0);
        assert_eq!(io("coreblk_volume_io_bytes_total", "read"), 8192.0);
        assert_eq!(io("coreblk_volume_io_errors_total", "read"), 0.0);
        assert_eq!(io("coreblk_volume_io_ops_total", "write"), 1.0);
        assert_eq!(io("coreblk_volume_io_bytes_total", "write"), 0.0);
        assert_eq!(io("coreblk_volume_io_errors_total", "write"), 1.0);
        assert_eq!(io("coreblk_volume_io_ops_total", "write_zeroes"), 0.0);
        let lat = "coreblk_volume_io_latency_seconds";
        let bucket = |op: &str, le: &str| {
            value(
                &format!("{lat}_bucket"),
                &[("uuid", "v1"), ("op", op), ("le", le)],
            )
        };
        assert_eq!(bucket("read", "0.00001"), 0.0);
        assert_eq!(bucket("read", "0.00005"), 1.0);
        assert_eq!(bucket("read", "0.005"), 2.0);
        assert_eq!(bucket("write", "0.001"), 0.0);
        assert_eq!(bucket("write", "0.0025"), 1.0);
        assert_eq!(bucket("other", "+Inf"), 0.0);
        assert_eq!(io(&format!("{lat}_count"), "read"), 2.0);
        assert!((io(&format!("{lat}_sum"), "read") - 0.00503).abs() < 1e-12);
        // Volumes not exported, and snapshots, have no IO series.
        assert!(!parsed
            .iter()
            .any(|s| s.name.starts_with("coreblk_volume_io_")
                && s.labels.get("uuid").map(String::as_str) == Some("s1")));
        assert!(page.contains("# TYPE coreblk_reactor_busy_seconds_total counter\n"));
        assert!(page.ends_with('\n'));
    }
}
