//! The monitoring kit (`csi/deploy/monitoring`, issue 14) against a real `coreblkd` and a
//! real Prometheus (Debian's `prometheus` package, started here on a loopback port with its
//! own storage in a temp dir, scraping the daemon every second with the kit's rules loaded).
//!
//! After creating a volume with a PVC, importing data (`coreblk image import`),
//! snapshotting, overwriting and deleting, the figures Prometheus answers through its HTTP
//! API equal what `coreblk pool get` / `volume get` / `snapshot get` print, the deleted
//! volume's series are gone, and the recording rules agree. Then: `promtool check metrics`
//! on the daemon's page; `promtool check rules` and `promtool test rules` on the alert rules,
//! which Prometheus evaluated without error and none of which fires against this healthy
//! daemon; every metric the rules and the dashboard name is on the page; every dashboard
//! query runs, and those that must have data have it.
//!
//! Without `prometheus` and `promtool` on `PATH` the test says so and passes, unless
//! `COREBLK_REQUIRE_PROMETHEUS` is set (scripts/test part monitoring sets it): then their
//! absence is a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{rt, scrape, seeded, wait_for, workdir, Daemon};
use coreblk_proto::v1 as pb;
use serde_json::Value;

const REQUIRE_ENV: &str = "COREBLK_REQUIRE_PROMETHEUS";
/// Longest the daemon's figures may take to reach Prometheus (1 s scrapes, 1 s rule
/// evaluation, deletes that settle).
const AGREE_DEADLINE: Duration = Duration::from_secs(30);

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../csi/deploy/monitoring")
}

/// `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// An instant vector: each series' labels and value.
type Series = Vec<(BTreeMap<String, String>, f64)>;

/// A running Prometheus, killed on drop (also when the test fails).
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, dir: &Path, target: &str, rules: &Path) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: coreblkd\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("write prometheus.yml");
        // A free loopback port: bound by us, released, then handed to Prometheus.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn prometheus");
        let mut p = Self { child, addr, log };
        let ready = wait_for(Duration::from_secs(60), || {
            matches!(p.child.try_wait(), Ok(None))
                && http_get(&p.addr, "/-/ready").is_ok_and(|(code, _)| code == 200)
        });
        assert!(
            ready,
            "prometheus did not become ready on {}:\n{}",
            p.addr,
            p.log_text()
        );
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path`: the JSON body's `data`, or why not.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) = http_get(&self.addr, path).map_err(|e| format!("GET {path}: {e}"))?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {body}"))?;
        if code != 200 || v["status"] != "success" {
            return Err(format!("GET {path}: HTTP {code}: {body}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query: each series' labels and value.
    fn query(&self, expr: &str) -> Result<Series, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        let rows = data["result"]
            .as_array()
            .ok_or_else(|| format!("{expr}: no result vector: {data}"))?;
        rows.iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .ok_or_else(|| format!("{expr}: bad sample {r}"))?;
                Ok((labels, value))
            })
            .collect()
    }

    /// The one value of `expr`, `None` when it has no series.
    fn one(&self, expr: &str) -> Result<Option<f64>, String> {
        let rows = self.query(expr)?;
        match rows.as_slice() {
            [] => Ok(None),
            [(_, v)] => Ok(Some(*v)),
            _ => Err(format!("{expr}: {} series, expected one", rows.len())),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.0 GET (no chunked replies): status code and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:.200}")))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:.200}")))?;
    Ok((code, body.to_owned()))
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `coreblk -o json ARGS` against `daemon`: its output, parsed.
fn cli(daemon: &Daemon, args: &[&str]) -> Value {
    let out = Command::new(coreblk_tests::bin("coreblk"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("run coreblk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "coreblk {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("coreblk {args:?}: {e}: {stdout}"))
}

/// The single object of a `get` reply (`{"pools": [ ... ]}` and so on).
fn single(v: &Value, key: &str) -> Value {
    match v[key].as_array().map(Vec::as_slice) {
        Some([one]) => one.clone(),
        _ => panic!("expected one {key}: {v}"),
    }
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// The CLI's view of the pool and its objects: (what, PromQL, expected value).
fn expected(daemon: &Daemon) -> (Vec<(String, String, f64)>, BTreeSet<String>) {
    let pool = single(&cli(daemon, &["pool", "get", "default"]), "pools");
    let sel = "{job=\"coreblkd\",pool=\"default\"}";
    let mut want = vec![];
    for (metric, key) in [
        ("coreblk_pool_capacity_bytes", "capacity_bytes"),
        ("coreblk_pool_free_bytes", "free_bytes"),
        ("coreblk_pool_allocated_bytes", "allocated_bytes"),
        ("coreblk_pool_provisioned_bytes", "provisioned_bytes"),
        ("coreblk_pool_reserved_bytes", "reserved_bytes"),
        (
            "coreblk_pool_held_by_deleted_bytes",
            "held_by_deleted_bytes",
        ),
        ("coreblk_pool_volumes", "volume_count"),
        ("coreblk_pool_snapshots", "snapshot_count"),
        ("coreblk_pool_overcommit_limit_ratio", "overcommit_limit"),
    ] {
        want.push((key.to_owned(), format!("{metric}{sel}"), num(&pool, key)));
    }
    let capacity = num(&pool, "capacity_bytes");
    want.push((
        "used ratio (recording rule)".into(),
        format!("coreblk:pool_used:ratio{sel}"),
        (capacity - num(&pool, "free_bytes")) / capacity,
    ));
    want.push((
        "overcommit ratio (recording rule)".into(),
        format!("coreblk:pool_overcommit:ratio{sel}"),
        num(&pool, "provisioned_bytes") / capacity,
    ));
    let mut uuids = BTreeSet::new();
    for (list, get, key, kind) in [
        ("volume", "volume", "volumes", "volume"),
        ("snapshot", "snapshot", "snapshots", "snapshot"),
    ] {
        let listed = cli(daemon, &[list, "list", "--pool", "default"]);
        for o in listed[key].as_array().expect("a list") {
            let uuid = o["uuid"].as_str().expect("uuid").to_owned();
            let o = single(&cli(daemon, &[get, "get", &uuid]), key);
            let name = o["name"].as_str().expect("name");
            for (metric, field) in [
                ("coreblk_object_allocated_bytes", "allocated_bytes"),
                ("coreblk_object_unique_bytes", "unique_bytes"),
            ] {
                want.push((
                    format!("{kind} {name} {field}"),
                    format!("{metric}{{job=\"coreblkd\",uuid=\"{uuid}\",kind=\"{kind}\",pool=\"default\"}}"),
                    num(&o, field),
                ));
            }
            uuids.insert(uuid);
        }
    }
    (want, uuids)
}

/// Waits until Prometheus answers every figure of [`expected`] and holds series for
/// exactly the objects the CLI lists; panics with the differences at the deadline.
fn agree(prom: &Prometheus, daemon: &Daemon, step: &str) {
    let end = Instant::now() + AGREE_DEADLINE;
    loop {
        let (want, uuids) = expected(daemon);
        let mut diffs = vec![];
        for (what, expr, value) in &want {
            match prom.one(expr) {
                Ok(Some(got)) if (got - value).abs() <= 1e-9 * value.abs().max(1.0) => {}
                other => diffs.push(format!("{what}: prometheus {other:?}, coreblk {value}")),
            }
        }
        let series: Result<BTreeSet<String>, String> = prom
            .query("coreblk_object_allocated_bytes{job=\"coreblkd\"}")
            .map(|rows| rows.into_iter().map(|(l, _)| l["uuid"].clone()).collect());
        match series {
            Ok(s) if s == uuids => {}
            other => diffs.push(format!(
                "objects: prometheus has {other:?}, coreblk lists {uuids:?}"
            )),
        }
        if diffs.is_empty() {
            eprintln!(
                "{step}: prometheus agrees with coreblk on {} figures",
                want.len()
            );
            return;
        }
        assert!(
            Instant::now() < end,
            "{step}: prometheus and coreblk disagree after {AGREE_DEADLINE:?}:\n{}",
            diffs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Metric families on a page: name → type.
fn families(page: &str) -> HashMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// The `coreblk_*` metric names in `text` (recording rules, `coreblk:*`, are not
/// metrics the daemon exports).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("coreblk_") {
        let preceded = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded && !tail[len..].starts_with(':') {
            out.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    out
}

/// Names in `names` that are neither a family on the page nor a histogram's series.
fn unknown<'a>(names: &'a BTreeSet<String>, fams: &HashMap<String, String>) -> Vec<&'a str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            !fams.contains_key(*n)
                && !["_bucket", "_sum", "_count"].iter().any(|s| {
                    n.strip_suffix(s)
                        .is_some_and(|base| fams.get(base).is_some_and(|k| k == "histogram"))
                })
        })
        .collect()
}

fn promtool(bin: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(monitoring_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("feed promtool");
    }
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?}: {}\n{text}",
        out.status
    );
    text
}

/// Every PromQL expression of the dashboard (panel targets and variable queries), with
/// its panel's title; checks each panel names the `${datasource}` variable.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let ds_ok = |d: &Value| d["uid"] == "${datasource}" && d["type"] == "prometheus";
    let mut out = vec![];
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "the dashboard has no panels");
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        if p["type"] == "row" {
            continue;
        }
        assert!(
            ds_ok(&p["datasource"]),
            "panel {title}: datasource {}",
            p["datasource"]
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title} has no queries"));
        for t in targets {
            assert!(
                ds_ok(&t["datasource"]),
                "panel {title}: target datasource {}",
                t["datasource"]
            );
            let expr = t["expr"].as_str().filter(|e| !e.trim().is_empty());
            let expr = expr.unwrap_or_else(|| panic!("panel {title}: a target without expr"));
            // The node picker applies to every panel.
            assert!(
                expr.contains("instance=~\"$node\""),
                "panel {title}: {expr} does not filter by $node"
            );
            out.push((title.clone(), expr.to_owned()));
        }
    }
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    let ds = var("datasource");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    for name in ["node", "pool"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "variable {name}");
        assert!(
            ds_ok(&v["datasource"]),
            "variable {name}: datasource {}",
            v["datasource"]
        );
        let q = v["query"]["query"].as_str().expect("a variable query");
        // label_values(SELECTOR, LABEL): the selector must have data.
        let (selector, label) = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("variable {name}: {q} is not label_values(SELECTOR, LABEL)"));
        let want = if name == "node" { "instance" } else { "pool" };
        assert_eq!(label, want, "variable {name}: {q}");
        out.push((format!("variable {name}"), selector.to_owned()));
    }
    out
}

/// Grafana's variables as a test's Prometheus takes them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$node", ".*")
        .replace("$pool", ".*")
}

#[test]
#[allow(clippy::too_many_lines)]
fn prometheus_scrapes_coreblkd_and_the_rules_and_dashboard_use_what_it_exports() {
    let (Some(prometheus), Some(promtool_bin)) = (which("prometheus"), which("promtool")) else {
        assert!(
            std::env::var_os(REQUIRE_ENV).is_none(),
            "{REQUIRE_ENV} is set but prometheus/promtool are not on PATH: install Debian's \
             `prometheus` package (scripts/test part deps does)"
        );
        eprintln!(
            "SKIPPED: prometheus and promtool are not on PATH (install Debian's `prometheus` \
             package; set {REQUIRE_ENV}=1 to make this a failure)"
        );
        return;
    };
    let dir = workdir();
    let daemon = Daemon::start(dir.path());
    let metrics_addr = rt().block_on(async {
        pb::node_client::NodeClient::new(daemon.channel().await)
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .expect("node info")
            .into_inner()
            .metrics_address
    });
    let rules = monitoring_dir().join("coreblk-alerts.yaml");
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir(&prom_dir).expect("mkdir");
    let prom = Prometheus::start(&prometheus, &prom_dir, &metrics_addr, &rules);
    let up = wait_for(AGREE_DEADLINE, || {
        prom.one("up{job=\"coreblkd\"}") == Ok(Some(1.0))
    });
    assert!(
        up,
        "prometheus does not scrape {metrics_addr}:\n{}",
        prom.log_text()
    );
    assert_eq!(
        prom.one("coreblk_daemon_state{job=\"coreblkd\",state=\"serving\"}"),
        Ok(Some(1.0))
    );
    agree(&prom, &daemon, "start");

    // A volume with a PVC, and data through `coreblk image import`.
    cli(
        &daemon,
        &[
            "volume",
            "create",
            "pvc-vol",
            "--size",
            "8M",
            "--label",
            "csi.storage.k8s.io/pvc/name=data-0",
            "--label",
            "csi.storage.k8s.io/pvc/namespace=shop",
        ],
    );
    let image = dir.path().join("image.raw");
    let mut data = seeded(1 << 20, 1);
    data.resize(4 << 20, 0);
    data.extend(seeded(512 << 10, 2));
    std::fs::write(&image, &data).expect("write image");
    let image_s = image.to_str().expect("utf-8 path");
    cli(
        &daemon,
        &[
            "image",
            "import",
            "--name",
            "imported",
            "--label",
            "csi.storage.k8s.io/pvc/name=db",
            "--label",
            "csi.storage.k8s.io/pvc/namespace=shop",
            image_s,
        ],
    );
    agree(&prom, &daemon, "create and import");
    let pvc = prom
        .query("coreblk_object_allocated_bytes{kind=\"volume\"} * on(instance, uuid) group_left(pvc_namespace, pvc_name) coreblk_volume_info")
        .expect("join");
    let by_pvc: BTreeMap<String, f64> = pvc
        .iter()
        .map(|(l, v)| (format!("{}/{}", l["pvc_namespace"], l["pvc_name"]), *v))
        .collect();
    assert_eq!(
        by_pvc.get("shop/db"),
        Some(&f64::from((1u32 << 20) + (512 << 10))),
        "{by_pvc:?}"
    );

    // A snapshot, then an overwrite: the snapshot holds the old blocks alone.
    cli(&daemon, &["snapshot", "create", "imported", "imported-s1"]);
    let patch = dir.path().join("patch.raw");
    let mut over = data.clone();
    over[..256 << 10].copy_from_slice(&seeded(256 << 10, 3));
    std::fs::write(&patch, &over).expect("write patch");
    cli(
        &daemon,
        &[
            "image",
            "import",
            "--overwrite",
            "--name",
            "imported",
            patch.to_str().expect("utf-8"),
        ],
    );
    agree(&prom, &daemon, "snapshot and overwrite");
    let snap_unique = prom
        .one("coreblk_object_unique_bytes{kind=\"snapshot\"}")
        .expect("query")
        .expect("the snapshot's unique bytes");
    assert!(snap_unique >= f64::from(256u32 << 10), "{snap_unique}");

    // A volume with data, deleted: its series go, its space is recycled.
    let doomed_src = dir.path().join("doomed.raw");
    std::fs::write(&doomed_src, seeded(2 << 20, 4)).expect("write");
    let doomed = single(
        &cli(
            &daemon,
            &[
                "image",
                "import",
                "--name",
                "doomed",
                doomed_src.to_str().expect("utf-8"),
            ],
        ),
        "volumes",
    );
    let doomed_uuid = doomed["uuid"].as_str().expect("uuid").to_owned();
    agree(&prom, &daemon, "import doomed");
    cli(&daemon, &["volume", "delete", "doomed"]);
    agree(&prom, &daemon, "delete");
    assert_eq!(
        prom.query(&format!("{{job=\"coreblkd\",uuid=\"{doomed_uuid}\"}}")),
        Ok(vec![]),
        "the deleted volume's series are still there"
    );

    // The page itself, as promtool sees it.
    let page = scrape(&metrics_addr);
    promtool(&promtool_bin, &["check", "metrics"], Some(&page));
    let fams = families(&page);

    // The rules: valid, their unit tests pass, their metrics exist, Prometheus evaluated
    // every one of them without error, and none fires against this healthy daemon.
    let out = promtool(
        &promtool_bin,
        &["check", "rules", "coreblk-alerts.yaml"],
        None,
    );
    eprintln!("{}", out.trim());
    let out = promtool(
        &promtool_bin,
        &["test", "rules", "coreblk-alerts.test.yaml"],
        None,
    );
    eprintln!("{}", out.trim());
    let rules_text = std::fs::read_to_string(&rules).expect("read rules");
    let rule_metrics = metric_names(&rules_text);
    assert!(rule_metrics.len() >= 10, "{rule_metrics:?}");
    assert_eq!(
        unknown(&rule_metrics, &fams),
        Vec::<&str>::new(),
        "rules name metrics coreblkd does not export"
    );
    let evaluated = wait_for(AGREE_DEADLINE, || {
        prom.api("/api/v1/rules").is_ok_and(|d| {
            let rules: Vec<&Value> = d["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            !rules.is_empty()
                && rules.iter().all(|r| {
                    r["health"] == "ok" && r["lastError"].as_str().unwrap_or("").is_empty()
                })
        })
    });
    let groups = prom.api("/api/v1/rules").expect("rules");
    assert!(
        evaluated,
        "prometheus did not evaluate every rule cleanly: {groups}"
    );
    let loaded = groups["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["rules"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    assert_eq!(
        loaded,
        rules_text.matches("- alert:").count() + rules_text.matches("- record:").count()
    );
    assert_eq!(
        prom.query("ALERTS{alertstate=\"firing\"}"),
        Ok(vec![]),
        "alerts fire against a healthy daemon"
    );

    // The dashboard: every metric it names is on the page; every query runs; those that
    // must have data here (all but the IO of exports, which need ublk, and the trend) do.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("coreblk-dashboard.json"))
            .expect("read dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_queries(&dash);
    let mut dash_metrics = BTreeSet::new();
    for (_, q) in &queries {
        dash_metrics.extend(metric_names(q));
    }
    assert_eq!(
        unknown(&dash_metrics, &fams),
        Vec::<&str>::new(),
        "the dashboard names metrics coreblkd does not export"
    );
    for family in [
        "coreblk_pool_capacity_bytes",
        "coreblk_pool_free_bytes",
        "coreblk_pool_allocated_bytes",
        "coreblk_pool_provisioned_bytes",
        "coreblk_pool_held_by_deleted_bytes",
        "coreblk_object_allocated_bytes",
        "coreblk_object_unique_bytes",
        "coreblk_volume_info",
        "coreblk_volume_io_ops_total",
        "coreblk_volume_io_bytes_total",
        "coreblk_volume_io_errors_total",
        "coreblk_volume_io_latency_seconds_bucket",
        "coreblk_reactor_busy_seconds_total",
        "coreblk_journal_commit_seconds_bucket",
    ] {
        assert!(
            dash_metrics.contains(family),
            "the dashboard shows no {family}"
        );
    }
    let mut empty = vec![];
    for (title, q) in &queries {
        let rows = prom
            .query(&substitute(q))
            .unwrap_or_else(|e| panic!("panel {title}: the query fails: {e}"));
        if rows.is_empty() && !q.contains("coreblk_volume_io_") && !q.contains("deriv(") {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    eprintln!(
        "dashboard: {} queries over {} metrics ran; rules: {loaded} evaluated",
        queries.len(),
        dash_metrics.len()
    );
    drop(prom);
    assert!(daemon.stop_with(libc::SIGTERM).success());
}
