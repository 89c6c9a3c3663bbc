//! Per-volume QoS through a real `coreblkd` and the `coreblk` CLI: limits set at create,
//! changed online with `volume set-qos` (merged, or cleared), absurd values refused with
//! the accepted range, shown by `volume get` (table and JSON) and `/metrics`, kept across
//! a restart, and enforced on the volume's IO path (an image import into a volume with a
//! write-bandwidth cap waits for it, and `/metrics` counts the throttled requests).

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{rt, scrape, workdir, Daemon};
use coreblk_daemon::metrics::text;
use coreblk_proto::v1 as pb;
use serde_json::Value;

fn coreblk(socket: &Path, args: &[&str]) -> Output {
    Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run coreblk")
}

fn json(socket: &Path, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = coreblk(socket, &all);
    assert!(
        out.status.success(),
        "coreblk {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn qos_of(socket: &Path, volume: &str) -> Value {
    json(socket, &["volume", "get", volume])["volumes"][0]["qos"].clone()
}

fn metrics_address(daemon: &Daemon) -> String {
    rt().block_on(async {
        pb::node_client::NodeClient::new(daemon.channel().await)
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .expect("node info")
            .into_inner()
            .metrics_address
    })
}

fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text::parse(page)
        .unwrap_or_else(|e| panic!("{e}\n{page}"))
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[test]
fn qos_limits_set_online_shown_kept_across_a_restart_and_enforced() {
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let sock = dir.path().join("api.sock");
    let created = json(
        &sock,
        &[
            "volume",
            "create",
            "db",
            "--size",
            "4MiB",
            "--max-iops",
            "500",
        ],
    );
    let uuid = created["volumes"][0]["uuid"]
        .as_str()
        .expect("uuid")
        .to_owned();
    assert_eq!(created["volumes"][0]["qos"]["max_iops"], 500);
    // A second limit merges with the first; the table shows both.
    json(
        &sock,
        &["volume", "set-qos", "db", "--max-write-bw", "10MiB"],
    );
    let q = qos_of(&sock, "db");
    assert_eq!(q["max_iops"], 500, "{q}");
    assert_eq!(q["max_write_bytes_per_sec"], 10 << 20, "{q}");
    let table = coreblk(&sock, &["volume", "get", "db"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("iops 500/s") && table.contains("write bw 10.0 MiB/s"),
        "{table}"
    );
    // Absurd values are refused with what is accepted; nothing changes.
    let bad = coreblk(
        &sock,
        &["volume", "set-qos", "db", "--max-iops", "999999999999"],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("max IOPS")
            && err.contains("largest accepted")
            && err.contains("0 for unlimited"),
        "{err}"
    );
    let nothing = coreblk(&sock, &["volume", "set-qos", "db"]);
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("--clear"));
    assert_eq!(qos_of(&sock, "db")["max_iops"], 500);
    // /metrics shows the limits.
    let page = scrape(&metrics_address(&daemon));
    assert_eq!(
        metric(
            &page,
            "coreblk_volume_qos_limit",
            &[("uuid", &uuid), ("limit", "iops")]
        ),
        Some(500.0),
        "{page}"
    );
    assert_eq!(
        metric(
            &page,
            "coreblk_volume_throttled_requests_total",
            &[("uuid", &uuid)]
        ),
        Some(0.0)
    );

    // Kept across a restart.
    assert!(daemon.stop_with(libc::SIGTERM).success());
    let daemon = Daemon::start(dir.path());
    let q = qos_of(&sock, "db");
    assert_eq!(q["max_iops"], 500, "{q}");
    assert_eq!(q["max_write_bytes_per_sec"], 10 << 20, "{q}");

    // Enforced: 4 MiB written through an import at 1 MiB/s (burst 100 ms) waits for the
    // cap, and /metrics counts the requests that waited.
    json(
        &sock,
        &[
            "volume",
            "set-qos",
            "db",
            "--clear",
            "--max-write-bw",
            "256KiB",
        ],
    );
    assert_eq!(qos_of(&sock, "db")["max_iops"], 0);
    let img = dir.path().join("img.raw");
    std::fs::write(&img, vec![0x5a; 4 << 20]).expect("image");
    let t0 = Instant::now();
    json(
        &sock,
        &[
            "image",
            "import",
            img.to_str().expect("utf-8"),
            "--volume",
            "db",
            "--overwrite",
        ],
    );
    let took = t0.elapsed();
    let page = scrape(&metrics_address(&daemon));
    let throttled = metric(
        &page,
        "coreblk_volume_throttled_requests_total",
        &[("uuid", &uuid)],
    )
    .expect("throttled series");
    let waited = metric(
        &page,
        "coreblk_volume_throttled_seconds_total",
        &[("uuid", &uuid)],
    )
    .expect("throttled seconds");
    assert!(
        throttled > 0.0 && waited > 0.0,
        "{throttled} {waited}\n{page}"
    );
    // 4 MiB at 1 MiB/s, of which at most one request (≤ 1 MiB, it may overdraw) and the
    // 0.1 MiB burst go at once: at least ~2.9 s (a lower bound only).
    assert!(
        took > Duration::from_millis(2500),
        "the import took {took:?} under a 1 MiB/s cap"
    );
    // Lifting every limit: the volume has no QoS left.
    json(&sock, &["volume", "set-qos", "db", "--clear"]);
    assert_eq!(qos_of(&sock, "db"), Value::Null);
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
