//! The per-export IO series of `/metrics` through the real scrape path, without ublk (the
//! host has none): a store on a file-backed pool, a volume whose export record names a
//! device id, and a queue recorder of that device announced to the daemon's registry as
//! a ublk queue does at start; the scrape joins the counters to the volume by the record,
//! and the rendered page passes the strict checker with the expected values.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coreblk_daemon::bdev::sysfs::SysRoot;
use coreblk_daemon::control::claims::Claims;
use coreblk_daemon::control::scrape::Scraper;
use coreblk_daemon::control::store::{Store, VolumeSpec};
use coreblk_daemon::export::stats::Recorder;
use coreblk_daemon::export::{DescOp, PathKind, Plan, Record, RECORD_VERSION};
use coreblk_daemon::metrics::{self, text};

/// A device id no other test in this binary uses (the registry is process-wide).
const DEV_ID: u32 = 0x00c0_ffee;

#[test]
fn exported_volumes_show_their_io_counters_joined_by_the_export_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("pool.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .expect("pool file");
    let reactors = coreblk_daemon::testing::reactors(1, 64);
    let claims = Arc::new(Claims::open(dir.path(), SysRoot::host()).expect("claims"));
    let claim = claims.claim(&img, false).expect("claim the pool file");
    let store = Arc::new(
        Store::open(
            dir.path(),
            Arc::clone(&claims),
            reactors.remotes().to_vec(),
            Some(claim.device_uuid),
        )
        .expect("store"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // What waits for the start-up import (the exports' recovery) wakes once it is done,
        // not before.
        let waiter = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.wait_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "woke before the import");
        Arc::clone(&store).import_all().await;
        assert!(store.is_ready());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter wakes when the import finishes")
            .expect("waiter");
        let make = |name: &str| VolumeSpec {
            pool: "default".into(),
            name: name.into(),
            size_bytes: 16 << 20,
            labels: BTreeMap::new(),
            source: None,
            thick: false,
        };
        let (exported, _) = store.create_volume(make("exported")).await.expect("create");
        let (plain, _) = store.create_volume(make("plain")).await.expect("create");
        let rec = Record {
            version: RECORD_VERSION,
            dev_id: DEV_ID,
            persistent: false,
            read_only: false,
            queue_depth: 4,
            max_io_bytes: 512 << 10,
            nr_queues: 2,
            path: PathKind::Copy,
        };
        store
            .set_export_record(exported.uuid, Some(rec.encode()))
            .await
            .expect("export record");

        // Two queues of the device, as two reactors would serve it.
        let q0 = Recorder::new(DEV_ID, 4);
        let q1 = Recorder::new(DEV_ID, 4);
        let t0 = Instant::now();
        let read = Plan::Read {
            offset: 0,
            len: 4096,
        };
        q0.start(0, DescOp::Read, &read, t0);
        q0.finish(0, 4096, t0 + Duration::from_micros(40));
        q1.start(2, DescOp::Read, &read, t0);
        q1.finish(2, 4096, t0 + Duration::from_micros(60));
        q1.start(
            1,
            DescOp::Write,
            &Plan::Write {
                offset: 0,
                len: 65536,
                fua: false,
            },
            t0,
        );
        q1.finish(1, -libc::ENOSPC, t0 + Duration::from_millis(3));

        let scraper = Scraper::default();
        let page = || async {
            let (pools, objects) = scraper.scrape(&store).await;
            metrics::render(&metrics::Snapshot {
                version: "test",
                node_id: "test".into(),
                start_time: std::time::SystemTime::UNIX_EPOCH,
                state: metrics::DaemonStateSample::Serving,
                reactors: Vec::new(),
                devices: Vec::new(),
                pools,
                objects,
                object_scans: 0,
            })
        };
        let text_page = page().await;
        let parsed = text::parse(&text_page).unwrap_or_else(|e| panic!("{e}\n{text_page}"));
        let uuid = exported.uuid.to_string();
        let value = |name: &str, op: &str| {
            parsed
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.get("uuid") == Some(&uuid)
                        && s.labels.get("op").map(String::as_str) == Some(op)
                })
                .unwrap_or_else(|| panic!("{name} op={op} missing:\n{text_page}"))
                .value
        };
        assert_eq!(value("coreblk_volume_io_ops_total", "read"), 2.0);
        assert_eq!(value("coreblk_volume_io_bytes_total", "read"), 8192.0);
        assert_eq!(value("coreblk_volume_io_ops_total", "write"), 1.0);
        assert_eq!(value("coreblk_volume_io_errors_total", "write"), 1.0);
        assert_eq!(value("coreblk_volume_io_bytes_total", "write"), 0.0);
        assert_eq!(value("coreblk_volume_io_latency_seconds_count", "read"), 2.0);
        assert!(
            text_page.contains(&format!(
                "coreblk_export_info{{uuid=\"{uuid}\",device=\"/dev/ublkb{DEV_ID}\",data_path=\"copy\",read_only=\"false\",persistent=\"false\"}} 1\n"
            )),
            "{text_page}"
        );
        let plain_uuid = plain.uuid.to_string();
        assert!(
            !parsed.iter().any(|s| s.name.starts_with("coreblk_volume_io_")
                && s.labels.get("uuid") == Some(&plain_uuid)),
            "a volume without an export has no IO series:\n{text_page}"
        );

        // More IO shows at the next scrape; once the queues are gone the series go.
        q0.start(3, DescOp::Flush, &Plan::Flush, t0);
        q0.finish(3, 0, t0);
        let text_page = page().await;
        assert!(
            text_page.contains(&format!(
                "coreblk_volume_io_ops_total{{uuid=\"{uuid}\",op=\"flush\"}} 1\n"
            )),
            "{text_page}"
        );
        drop((q0, q1));
        let text_page = page().await;
        text::parse(&text_page).unwrap_or_else(|e| panic!("{e}\n{text_page}"));
        assert!(
            !text_page.contains(&format!("uuid=\"{uuid}\",op=")),
            "{text_page}"
        );
    });
    drop(reactors);
}
