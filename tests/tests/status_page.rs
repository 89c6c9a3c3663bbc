//! The status page at `/` of the metrics address, loaded in a real headless Chromium
//! (Debian's `chromium`) against a real `coreblkd`: after creating volumes (one with PVC
//! labels and a label holding a `<script>`), importing data, snapshotting, overwriting
//! and deleting through the CLI, the DOM Chromium built has the pool's and every
//! volume's and snapshot's figures equal to what `GetPool` / `GetVolume` /
//! `GetSnapshot` report, volumes largest first with their snapshots under them, the
//! script label shown as text (never run), and the page's own refresh working. A
//! screenshot and the DOM are kept as artifacts (`target/artifacts/status-page.*`).
//! `coreblk status` is checked against the same figures.
//!
//! Chromium is found on `PATH` (or `COREBLK_CHROMIUM`). Without it the test says so and
//! passes, unless `COREBLK_REQUIRE_CHROMIUM` is set (`scripts/test` sets it and installs
//! the package, so CI cannot skip it silently).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{api_view, rt, seeded, workdir, ApiView, Daemon};
use coreblk_proto::v1 as pb;

/// The label whose value must show as text.
const SCRIPT_LABEL: &str =
    "<script>document.body.setAttribute('data-pwned','1')</script><img src=x onerror=alert(1)>";
/// Longest the page may take to agree with the API (scans, recycling).
const AGREE_DEADLINE: Duration = Duration::from_secs(60);

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COREBLK_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Runs Chromium headless on `url` with `args`; its stdout.
fn run_chromium(bin: &Path, profile: &Path, url: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn cli(d: &Daemon, args: &[&str]) -> Output {
    Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run coreblk")
}

fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = cli(d, args);
    assert!(
        out.status.success(),
        "coreblk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The attributes of every start tag in `html` that begins with `prefix` (e.g.
/// `<tr class="`), in document order.
fn tags(html: &str, prefix: &str) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(prefix) {
        let tag = &rest[at..];
        let end = tag.find('>').expect("tag ends");
        let mut attrs = HashMap::new();
        let mut body = &tag[1..end];
        while let Some(eq) = body.find("=\"") {
            let name = body[..eq].rsplit(' ').next().unwrap_or("").to_owned();
            let after = &body[eq + 2..];
            let close = after.find('"').expect("attribute value ends");
            attrs.insert(name, unescape(&after[..close]));
            body = &after[close + 1..];
        }
        out.push(attrs);
        rest = &tag[end..];
    }
    out
}

/// Where the DOM and the API differ (empty: they agree).
fn differences(dom: &str, api: &ApiView) -> Vec<String> {
    let mut diffs = Vec::new();
    let pools = tags(dom, "<div class=\"pool\"");
    let Some(pool) = pools.iter().find(|p| p["data-pool"] == "default") else {
        return vec![format!("no pool `default` on the page: {pools:?}")];
    };
    let p = &api.pool;
    for (attr, want) in [
        ("data-capacity-bytes", p.capacity_bytes),
        ("data-allocated-bytes", p.allocated_bytes),
        ("data-free-bytes", p.free_bytes),
        ("data-provisioned-bytes", p.provisioned_bytes),
        ("data-reserved-bytes", p.reserved_bytes),
        ("data-held-by-deleted-bytes", p.held_by_deleted_bytes),
        ("data-volumes", u64::from(p.volume_count)),
        ("data-snapshots", u64::from(p.snapshot_count)),
    ] {
        let got = pool.get(attr).map(String::as_str).unwrap_or("missing");
        if got != want.to_string() {
            diffs.push(format!("pool {attr}: page {got}, API {want}"));
        }
    }
    let rows = tags(dom, "<tr class=\"");
    let mut want: Vec<(String, &str, u64, u64, u64)> = api
        .volumes
        .iter()
        .map(|v| {
            let f = (v.size_bytes, v.allocated_bytes, v.unique_bytes);
            (v.uuid.clone(), "volume", f.0, f.1, f.2)
        })
        .collect();
    want.extend(api.snapshots.iter().map(|s| {
        let f = (s.size_bytes, s.allocated_bytes, s.unique_bytes);
        (s.uuid.clone(), "snapshot", f.0, f.1, f.2)
    }));
    if rows.len() != want.len() {
        diffs.push(format!(
            "{} rows on the page, the API has {} volumes and snapshots",
            rows.len(),
            want.len()
        ));
    }
    for (uuid, kind, size, allocated, unique) in want {
        let Some(r) = rows.iter().find(|r| r["data-uuid"] == uuid) else {
            diffs.push(format!("{kind} {uuid} not on the page"));
            continue;
        };
        if !r["class"].starts_with(kind) {
            diffs.push(format!("{uuid}: class {} is not {kind}", r["class"]));
        }
        for (attr, want) in [
            ("data-size-bytes", size),
            ("data-allocated-bytes", allocated),
            ("data-unique-bytes", unique),
        ] {
            if r[attr] != want.to_string() {
                diffs.push(format!(
                    "{kind} {}: {attr} page {:?}, API {want}",
                    r["data-name"], r[attr]
                ));
            }
        }
    }
    diffs
}

#[test]
fn the_status_page_in_a_real_browser_shows_what_the_api_reports() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("COREBLK_REQUIRE_CHROMIUM").is_none(),
            "COREBLK_REQUIRE_CHROMIUM is set but no chromium was found on PATH \
             (install Debian's `chromium`, or set COREBLK_CHROMIUM)"
        );
        eprintln!("SKIP: no chromium on PATH (apt-get install chromium); the status page was not loaded in a browser");
        return;
    };
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let rt = rt();
    let channel = rt.block_on(daemon.channel());
    let info = rt
        .block_on(
            pb::node_client::NodeClient::new(channel.clone())
                .get_node_info(pb::GetNodeInfoRequest {}),
        )
        .expect("node info")
        .into_inner();
    let url = format!("http://{}/", info.metrics_address);

    // Objects of every kind, through the CLI.
    let script_label = format!("note={SCRIPT_LABEL}");
    cli_ok(
        &daemon,
        &[
            "volume",
            "create",
            "big",
            "--size",
            "48M",
            "--label",
            "csi.storage.k8s.io/pvc/namespace=prod",
            "--label",
            "csi.storage.k8s.io/pvc/name=db-0",
            "--label",
            &script_label,
        ],
    );
    cli_ok(&daemon, &["volume", "create", "small", "--size", "4M"]);
    let image = dir.path().join("image.raw");
    std::fs::write(&image, seeded(6 << 20, 7)).expect("image");
    let image = image.to_str().expect("utf-8 path");
    cli_ok(
        &daemon,
        &["image", "import", "--name", "data", "--size", "16M", image],
    );
    cli_ok(&daemon, &["snapshot", "create", "data", "data-snap"]);
    let patch = dir.path().join("patch.raw");
    std::fs::write(&patch, seeded(2 << 20, 9)).expect("patch");
    let patch = patch.to_str().expect("utf-8 path");
    cli_ok(
        &daemon,
        &["image", "import", "--name", "data", "--overwrite", patch],
    );
    cli_ok(&daemon, &["image", "import", "--name", "doomed", image]);
    cli_ok(&daemon, &["snapshot", "create", "doomed", "doomed-snap"]);
    cli_ok(&daemon, &["volume", "delete", "doomed"]);

    // The page as Chromium builds it, until it agrees with the API (figures of changed
    // pools are rescanned over a few scrapes, and deleted clusters are being recycled).
    let profile = dir.path().join("chromium-profile");
    let start = Instant::now();
    let (dom, api) = loop {
        let dom = String::from_utf8(run_chromium(&browser, &profile, &url, &["--dump-dom"]))
            .expect("utf-8 DOM");
        let api = rt.block_on(api_view(channel.clone()));
        let diffs = differences(&dom, &api);
        if diffs.is_empty() {
            break (dom, api);
        }
        assert!(
            start.elapsed() < AGREE_DEADLINE,
            "the page never agreed with the API in {AGREE_DEADLINE:?}:\n{}\n{dom}",
            diffs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let art = artifacts();
    std::fs::write(art.join("status-page.html"), &dom).expect("keep the DOM");
    assert!(
        api.pool.allocated_bytes > 0 && api.snapshots.len() == 2,
        "the setup ran"
    );
    let data_snap = api
        .snapshots
        .iter()
        .find(|s| s.name == "data-snap")
        .expect("data-snap");
    assert!(
        data_snap.unique_bytes > 0,
        "the overwrite left the snapshot unique clusters"
    );

    // Largest volume first, each volume's snapshots right after it, the snapshot of the
    // deleted volume at the end.
    let order: Vec<String> = tags(&dom, "<tr class=\"")
        .iter()
        .map(|r| r["data-name"].clone())
        .collect();
    assert_eq!(
        order,
        ["big", "data", "data-snap", "small", "doomed-snap"],
        "{dom}"
    );
    assert!(dom.contains("prod/db-0"), "the PVC is shown");
    assert!(
        dom.contains("id=\"daemon-state\">serving<"),
        "the daemon's state is shown"
    );

    // The script label is text: escaped in the DOM, never run.
    assert!(
        dom.contains("note=&lt;script&gt;document.body.setAttribute('data-pwned','1')&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"),
        "the label is shown as text:\n{dom}"
    );
    assert!(
        !dom.contains("data-pwned=\""),
        "the label's script ran:\n{dom}"
    );
    assert_eq!(
        dom.matches("<script").count(),
        1,
        "only the page's own script:\n{dom}"
    );
    assert_eq!(
        dom.matches("<img").count(),
        0,
        "no element from a label:\n{dom}"
    );

    // The page refreshes itself: with virtual time past the refresh period, the
    // "updated" stamp is replaced by the time of a successful refresh.
    let later = String::from_utf8(run_chromium(
        &browser,
        &profile,
        &url,
        &["--virtual-time-budget=25000", "--dump-dom"],
    ))
    .expect("utf-8 DOM");
    let updated = later
        .split("id=\"updated\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the updated stamp");
    assert!(
        updated != "now" && !updated.contains("failed"),
        "the refresh did not run or failed: {updated:?}"
    );
    assert_eq!(tags(&later, "<tr class=\"").len(), order.len(), "{later}");

    // A screenshot for people.
    let shot = art.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &browser,
        &profile,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real PNG"
    );
    eprintln!("status page artifacts: {}", art.display());

    // `coreblk status` shows the same pool figures and the volumes largest first.
    let status: serde_json::Value =
        serde_json::from_str(&cli_ok(&daemon, &["-o", "json", "status"])).expect("JSON");
    let p = &status["pools"][0];
    let api_pool = rt.block_on(api_view(channel)).pool;
    assert_eq!(p["capacity_bytes"], api_pool.capacity_bytes, "{status}");
    assert_eq!(
        p["provisioned_bytes"], api_pool.provisioned_bytes,
        "{status}"
    );
    let names: Vec<&str> = status["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["big", "data", "small"], "{status}");
    let text = cli_ok(&daemon, &["status"]);
    assert!(text.contains("pool default  online  [#"), "{text}");
    assert!(text.contains("  @data-snap"), "{text}");
    assert!(text.contains("  @doomed-snap (volume deleted)"), "{text}");
}
