//! `/metrics` against a real `coreblkd`: after creating volumes (one with PVC labels and a
//! user label), importing data, snapshotting, overwriting and deleting, the page parses
//! with the strict exposition checker and its pool, volume and snapshot figures equal what
//! `GetPool`, `GetVolume` and `GetSnapshot` (what `coreblk pool get` / `volume get` print)
//! report.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{api_view, rt, scrape, seeded, workdir, ApiView, Daemon};
use coreblk_daemon::metrics::text::{self, ParsedSample};
use coreblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

fn value(samples: &[ParsedSample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// The pool and object series of a page (reactor counters move between two scrapes).
fn store_lines(page: &str) -> Vec<&str> {
    page.lines()
        .filter(|l| l.starts_with("coreblk_pool_") || l.starts_with("coreblk_object_"))
        .collect()
}

#[allow(clippy::cast_precision_loss)]
fn f(n: u64) -> f64 {
    n as f64
}

async fn import(channel: tonic::transport::Channel, name: &str, pieces: &[(u64, Vec<u8>)]) {
    let mut msgs = vec![pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
            pool: "default".into(),
            volume_name: name.into(),
            size_bytes: 16 * MIB,
            ..Default::default()
        })),
    }];
    for (offset, data) in pieces {
        msgs.push(pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                offset_bytes: *offset,
                data: data.clone(),
                zero: false,
                length_bytes: 0,
            })),
        });
    }
    msgs.push(pb::ImportImageRequest {
        msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
            expected_size_bytes: 0,
        })),
    });
    let mut resp = pb::images_client::ImagesClient::new(channel)
        .import_image(tokio_stream::iter(msgs))
        .await
        .expect("import")
        .into_inner();
    let mut finished = false;
    while let Some(m) = resp.message().await.expect("import runs") {
        finished |= matches!(m.msg, Some(pb::import_image_response::Msg::Finished(_)));
    }
    assert!(finished, "the import of {name} did not finish");
}

async fn overwrite(channel: tonic::transport::Channel, name: &str, offset: u64, data: Vec<u8>) {
    let msgs = vec![
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                volume_name: name.into(),
                overwrite: true,
                ..Default::default()
            })),
        },
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Chunk(pb::ImageChunk {
                offset_bytes: offset,
                data,
                zero: false,
                length_bytes: 0,
            })),
        },
        pb::ImportImageRequest {
            msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
                expected_size_bytes: 0,
            })),
        },
    ];
    let mut resp = pb::images_client::ImagesClient::new(channel)
        .import_image(tokio_stream::iter(msgs))
        .await
        .expect("overwrite")
        .into_inner();
    while resp.message().await.expect("overwrite runs").is_some() {}
}

/// Every figure the page and the API both show, as (what, page, api); `None` on the page
/// side when the series is missing.
fn compare(page: &[ParsedSample], api: &ApiView) -> Vec<(String, Option<f64>, f64)> {
    let p = &api.pool;
    let pool = [("pool", "default")];
    let mut out = vec![];
    let mut push = |what: String, got: Option<f64>, want: f64| out.push((what, got, want));
    for (name, want) in [
        ("coreblk_pool_capacity_bytes", p.capacity_bytes),
        ("coreblk_pool_free_bytes", p.free_bytes),
        ("coreblk_pool_allocated_bytes", p.allocated_bytes),
        ("coreblk_pool_provisioned_bytes", p.provisioned_bytes),
        ("coreblk_pool_reserved_bytes", p.reserved_bytes),
        (
            "coreblk_pool_held_by_deleted_bytes",
            p.held_by_deleted_bytes,
        ),
        ("coreblk_pool_volumes", u64::from(p.volume_count)),
        ("coreblk_pool_snapshots", u64::from(p.snapshot_count)),
    ] {
        push(name.into(), value(page, name, &pool), f(want));
    }
    push(
        "overcommit".into(),
        value(page, "coreblk_pool_overcommit_limit_ratio", &pool),
        p.overcommit_limit,
    );
    for v in &api.volumes {
        let key = [
            ("uuid", v.uuid.as_str()),
            ("kind", "volume"),
            ("pool", "default"),
        ];
        push(
            format!("{} allocated", v.name),
            value(page, "coreblk_object_allocated_bytes", &key),
            f(v.allocated_bytes),
        );
        push(
            format!("{} unique", v.name),
            value(page, "coreblk_object_unique_bytes", &key),
            f(v.unique_bytes),
        );
    }
    for s in &api.snapshots {
        let key = [
            ("uuid", s.uuid.as_str()),
            ("kind", "snapshot"),
            ("pool", "default"),
        ];
        push(
            format!("{} allocated", s.name),
            value(page, "coreblk_object_allocated_bytes", &key),
            f(s.allocated_bytes),
        );
        push(
            format!("{} unique", s.name),
            value(page, "coreblk_object_unique_bytes", &key),
            f(s.unique_bytes),
        );
    }
    out
}

#[test]
fn metrics_equal_what_pool_get_and_volume_get_report() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    rt().block_on(async {
        let channel = daemon.channel().await;
        let info = pb::node_client::NodeClient::new(channel.clone())
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .expect("node info")
            .into_inner();
        let addr = info.metrics_address.clone();
        let mut vc = pb::volumes_client::VolumesClient::new(channel.clone());
        let labels: HashMap<String, String> = [
            ("csi.storage.k8s.io/pvc/name", "data-0"),
            ("csi.storage.k8s.io/pvc/namespace", "shop"),
            ("team", "storage-secret-label"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let pvc = vc
            .create_volume(pb::CreateVolumeRequest {
                pool: "default".into(),
                name: "pvc-vol".into(),
                size_bytes: 8 * MIB,
                labels,
                ..Default::default()
            })
            .await
            .expect("create")
            .into_inner();
        // Data: two runs, one of them overwritten after a snapshot (copy-on-write).
        import(
            channel.clone(),
            "imported",
            &[(0, seeded(1 << 20, 1)), (4 * MIB, seeded(512 << 10, 2))],
        )
        .await;
        let mut sc = pb::snapshots_client::SnapshotsClient::new(channel.clone());
        let snap = sc
            .create_snapshot(pb::CreateSnapshotRequest {
                volume: "imported".into(),
                name: "imported-s1".into(),
                ..Default::default()
            })
            .await
            .expect("snapshot")
            .into_inner();
        overwrite(channel.clone(), "imported", 0, seeded(256 << 10, 3)).await;
        // A volume with data, and a snapshot of it, deleted.
        import(channel.clone(), "doomed", &[(0, seeded(2 << 20, 4))]).await;
        sc.create_snapshot(pb::CreateSnapshotRequest {
            volume: "doomed".into(),
            name: "doomed-s1".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot");
        sc.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot: "doomed-s1".into(),
        })
        .await
        .expect("delete snapshot");
        vc.delete_volume(pb::DeleteVolumeRequest {
            volume: "doomed".into(),
        })
        .await
        .expect("delete volume");

        // Deletes settle (references dropped once durable, clusters recycled): the page
        // and the API agree once a scrape and the reads around it saw the same state.
        let mut last;
        let end = Instant::now() + Duration::from_secs(15);
        let agreed = loop {
            let page = scrape(&addr);
            let samples = text::parse(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
            let api = api_view(channel.clone()).await;
            let page2 = scrape(&addr);
            let diffs: Vec<_> = compare(&samples, &api)
                .into_iter()
                .filter(|(_, got, want)| *got != Some(*want))
                .collect();
            last = format!("{diffs:?}\n{page}");
            if diffs.is_empty() && store_lines(&page) == store_lines(&page2) {
                break true;
            }
            if Instant::now() > end {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(agreed, "the page and the API disagree: {last}");

        let page = scrape(&addr);
        let samples = text::parse(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        let api = api_view(channel.clone()).await;
        assert_eq!(api.volumes.len(), 2, "pvc-vol and imported");
        assert_eq!(api.snapshots.len(), 1);
        let imported = api
            .volumes
            .iter()
            .find(|v| v.name == "imported")
            .expect("imported");
        assert_eq!(imported.allocated_bytes, MIB + (512 << 10));
        assert!(imported.unique_bytes >= 256 << 10, "{imported:?}");
        assert!(api.snapshots[0].unique_bytes >= 256 << 10);
        // One info series per volume with its PVC; user labels never become metric labels.
        assert_eq!(
            value(
                &samples,
                "coreblk_volume_info",
                &[
                    ("uuid", pvc.uuid.as_str()),
                    ("name", "pvc-vol"),
                    ("pool", "default"),
                    ("pvc_namespace", "shop"),
                    ("pvc_name", "data-0"),
                ]
            ),
            Some(1.0)
        );
        assert!(!page.contains("storage-secret-label"), "{page}");
        assert!(!page.contains("team="), "{page}");
        assert_eq!(
            value(
                &samples,
                "coreblk_snapshot_info",
                &[
                    ("uuid", snap.uuid.as_str()),
                    ("volume_uuid", imported.uuid.as_str())
                ]
            ),
            Some(1.0)
        );
        // Deleted objects are gone from the page.
        assert!(!page.contains("doomed"), "{page}");
        assert_eq!(
            samples
                .iter()
                .filter(|s| s.name == "coreblk_object_allocated_bytes")
                .count(),
            3
        );
        let pool = [("pool", "default")];
        assert_eq!(
            value(
                &samples,
                "coreblk_pool_state",
                &[("pool", "default"), ("state", "online")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                "coreblk_pool_state",
                &[("pool", "default"), ("state", "importing")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&samples, "coreblk_pool_scrape_success", &pool),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "coreblk_pool_stale_objects", &pool),
            Some(0.0)
        );
        assert_eq!(
            value(
                &samples,
                "coreblk_pool_info",
                &[("pool_uuid", api.pool.uuid.as_str())]
            ),
            Some(1.0)
        );
        // Four imports and overwrites, two snapshots, two deletes, a create: each commits.
        let commits =
            value(&samples, "coreblk_pool_journal_commits_total", &pool).expect("commits");
        assert!(commits >= 8.0, "{commits}");
        assert!(
            value(&samples, "coreblk_pool_journal_flushes_total", &pool).expect("flushes") >= 1.0
        );
        assert!(
            value(&samples, "coreblk_pool_journal_blocks_total", &pool).expect("blocks") >= 1.0
        );
        assert!(value(&samples, "coreblk_pool_copy_ups_total", &pool).is_some());
        // Journal write latency: a histogram per pool (the parser checked it is whole),
        // one observation per completed journal write.
        let h_count = "coreblk_journal_commit_seconds_count";
        let latency_writes = value(&samples, h_count, &pool).expect("latency histogram");
        let journal_writes =
            value(&samples, "coreblk_pool_journal_writes_total", &pool).expect("writes");
        assert!(
            latency_writes >= 8.0 && latency_writes <= journal_writes,
            "{latency_writes} timed of {journal_writes} journal writes"
        );
        assert!(value(&samples, "coreblk_journal_commit_seconds_sum", &pool).expect("sum") > 0.0);
        assert_eq!(
            value(
                &samples,
                "coreblk_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        assert!(value(&samples, "coreblk_start_time_seconds", &[]).expect("start") > 1.6e9);
        // An unchanged pool is not scanned again; a change rescans its objects.
        let scans = |page: &str| {
            let samples = text::parse(page).unwrap_or_else(|e| panic!("{e}\n{page}"));
            value(&samples, "coreblk_metrics_object_scans_total", &[]).expect("scans")
        };
        let before = scans(&scrape(&addr));
        assert_eq!(
            scans(&scrape(&addr)),
            before,
            "an idle pool was scanned again"
        );
        overwrite(channel.clone(), "imported", 2 * MIB, seeded(64 << 10, 5)).await;
        let after = scans(&scrape(&addr));
        assert!(after >= before + 3.0, "{before} -> {after}");
        let v = pb::volumes_client::VolumesClient::new(channel.clone())
            .get_volume(pb::GetVolumeRequest {
                volume: "imported".into(),
            })
            .await
            .expect("get")
            .into_inner();
        let page = scrape(&addr);
        let samples = text::parse(&page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        assert_eq!(
            value(
                &samples,
                "coreblk_object_allocated_bytes",
                &[("uuid", v.uuid.as_str()), ("kind", "volume")]
            ),
            Some(f(v.allocated_bytes))
        );
        assert_eq!(v.allocated_bytes, MIB + (512 << 10) + (64 << 10));
        // The overwrite allocated a cluster: its journal write was timed.
        let now = value(&samples, h_count, &pool).expect("latency histogram");
        assert!(now > latency_writes, "{latency_writes} -> {now}");
    });
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
