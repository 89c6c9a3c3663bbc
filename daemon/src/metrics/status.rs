//! The status page served at `/` of the metrics address: this node's capacity picture
//! in one self-contained HTML document (inline style and script, no external asset, so
//! it works offline and behind any proxy), drawn from the same [`Snapshot`] as
//! `/metrics`, so the page and the scrape never disagree.
//!
//! Owns: [`render`]. Must never: put a user-provided string (names, labels, paths) on
//! the page unescaped ([`esc`] is the only way text reaches it), or load anything from
//! elsewhere.
//!
//! Layout: a bar per pool (allocated, reserved, free; provisioned and overcommit beside
//! it), then the volumes sorted by size (largest first), each followed by its
//! snapshots, with PVC, export and labels. Every figure is also in a `data-*` attribute
//! in bytes, for scripts and tests. A small inline script fetches the page again every
//! [`REFRESH_SECONDS`] and swaps the `<main>` element (no flicker, no reload); without
//! script a `<noscript>` meta refresh does the same.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use crate::bdev::claim::human_size;

use super::{DaemonStateSample, ObjectKind, ObjectSample, PoolSample, PoolStateSample, Snapshot};

/// How often the page refreshes itself.
pub const REFRESH_SECONDS: u32 = 10;

/// `s` escaped for HTML text and (double- or single-quoted) attribute values.
#[must_use]
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
#[must_use]
pub fn utc_text(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `part / whole` in percent (0 for an empty whole), for widths and labels.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let p = part as f64 * 100.0 / whole as f64;
    p
}

fn state_class(s: PoolStateSample) -> &'static str {
    match s {
        PoolStateSample::Online => "ok",
        PoolStateSample::Importing => "warn",
        PoolStateSample::Failed | PoolStateSample::Degraded => "bad",
    }
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:12px 20px}\
header h1{font-size:18px;margin:0}header p{margin:4px 0 0;color:#c5cad3;font-size:12px}\
main{padding:12px 20px}h2{font-size:15px;margin:18px 0 8px}\
.pool{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;margin-bottom:10px}\
.pool h3{font-size:14px;margin:0 0 6px}\
.state{font-size:11px;padding:1px 6px;border-radius:8px;margin-left:6px;vertical-align:middle}\
.ok{background:#d8f3df;color:#1b6b34}.warn{background:#fff1c9;color:#7a5a00}.bad{background:#fbd9d9;color:#9b1c1c}\
.bar{display:flex;height:18px;border-radius:4px;overflow:hidden;background:#e4e7ec;position:relative}\
.bar span{display:block;height:100%}\
.alloc{background:#3b6fd8}.resv{background:#8c5bd6}\
.legend{font-size:12px;margin-top:6px;color:#4a5261}.legend b{color:#1d2330}\
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 3px 0 10px;vertical-align:-1px}\
.sw.free{background:#e4e7ec;border:1px solid #c9ced6}\
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7}\
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0f3;font-size:13px;vertical-align:top}\
th{background:#eef0f3;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td.pvc{white-space:nowrap}\
tr.snapshot td{color:#4a5261;font-size:12px}tr.snapshot td.name{padding-left:26px}\
.labels{font-family:ui-monospace,monospace;font-size:11px;color:#4a5261;word-break:break-all;max-width:480px}\
.muted{color:#8a91a0}";

const SCRIPT: &str = "\
(function(){var s=document.currentScript;var every=+s.dataset.refresh*1000;\
function tick(){fetch(location.pathname,{cache:'no-store'}).then(function(r){\
if(!r.ok)throw new Error(r.status);return r.text();}).then(function(t){\
var d=new DOMParser().parseFromString(t,'text/html');var m=d.querySelector('main');\
var old=document.querySelector('main');if(m&&old){old.replaceWith(document.importNode(m,true));}\
var u=document.getElementById('updated');if(u)u.textContent=new Date().toLocaleTimeString();\
}).catch(function(e){var u=document.getElementById('updated');\
if(u)u.textContent='refresh failed ('+e.message+'), retrying';}).finally(function(){\
setTimeout(tick,every);});}setTimeout(tick,every);})();";

/// The status page for `s`.
#[must_use]
pub fn render(s: &Snapshot) -> String {
    let mut h = String::with_capacity(16 << 10);
    let since = s
        .start_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>coreblk · {node}</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"></noscript>\
         <style>{STYLE}</style></head><body>\
         <header><h1>coreblk on {node}<span class=\"state {dcls}\" id=\"daemon-state\">{dstate}</span></h1>\
         <p>coreblkd {version} · started \
         <span class=\"ts\" data-unix=\"{since}\">{started}</span> · \
         refreshes every {REFRESH_SECONDS} s · updated <span id=\"updated\">now</span> · \
         <a href=\"/metrics\" style=\"color:#c5cad3\">/metrics</a></p></header>\n<main>",
        node = esc(&s.node_id),
        version = esc(s.version),
        started = utc_text(i64::try_from(since).unwrap_or(i64::MAX)),
        dstate = s.state.as_str(),
        dcls = match s.state {
            DaemonStateSample::Serving => "ok",
            DaemonStateSample::Starting | DaemonStateSample::Stopping => "warn",
        },
    );
    h.push_str("<h2>Pools</h2>\n");
    if s.pools.is_empty() {
        h.push_str("<p class=\"muted\" id=\"no-pools\">No pool on this node yet.</p>\n");
    }
    for p in &s.pools {
        pool(&mut h, p);
    }
    volumes(&mut h, &s.objects);
    let _ = write!(
        h,
        "</main>\n<script data-refresh=\"{REFRESH_SECONDS}\">{SCRIPT}</script></body></html>\n"
    );
    h
}

fn pool(h: &mut String, p: &PoolSample) {
    let name = esc(&p.name);
    let state = p.state.as_str();
    let _ = write!(
        h,
        "<div class=\"pool\" data-pool=\"{name}\" data-uuid=\"{uuid}\" data-state=\"{state}\" \
         data-capacity-bytes=\"{cap}\"",
        uuid = esc(&p.uuid),
        cap = p.capacity_bytes,
    );
    let Some(f) = &p.figures else {
        let _ = writeln!(
            h,
            "><h3>{name}<span class=\"state {cls}\">{state}</span></h3>\
             <p class=\"muted\">No figures: the pool is {state}. {hint}</p></div>",
            cls = state_class(p.state),
            hint = match p.state {
                PoolStateSample::Importing => "It is being imported; figures follow.",
                _ => "See `coreblk pool get` and the daemon log.",
            },
        );
        return;
    };
    let cap = p.capacity_bytes;
    let overcommit = if cap == 0 {
        0.0
    } else {
        #[allow(clippy::cast_precision_loss)]
        let r = f.provisioned_bytes as f64 / cap as f64;
        r
    };
    let _ = writeln!(
        h,
        " data-allocated-bytes=\"{a}\" data-free-bytes=\"{fr}\" data-provisioned-bytes=\"{pr}\" \
         data-reserved-bytes=\"{r}\" data-held-by-deleted-bytes=\"{hd}\" data-volumes=\"{nv}\" \
         data-snapshots=\"{ns}\">\
         <h3>{name}<span class=\"state {cls}\">{state}</span></h3>\
         <div class=\"bar\" title=\"allocated {ap:.1}%, reserved {rp:.1}%, free {fp:.1}%\">\
         <span class=\"alloc\" style=\"width:{ap:.3}%\"></span>\
         <span class=\"resv\" style=\"width:{rp:.3}%\"></span></div>\
         <div class=\"legend\"><span class=\"sw alloc\"></span>allocated <b>{ah}</b> ({ap:.1}%)\
         <span class=\"sw resv\"></span>reserved <b>{rh}</b>\
         <span class=\"sw free\"></span>free <b>{fh}</b> of <b>{ch}</b> \
          · held by deleted objects <b>{hh}</b> (part of free, being recycled)<br>\
         provisioned <b>{ph}</b> · overcommit <b>{overcommit:.2}×</b> (limit {limit:.2}×) · \
         {nv} volume(s), {ns} snapshot(s)</div></div>",
        a = f.allocated_bytes,
        fr = f.free_bytes,
        pr = f.provisioned_bytes,
        r = f.reserved_bytes,
        hd = f.held_by_deleted_bytes,
        nv = f.volumes,
        ns = f.snapshots,
        cls = state_class(p.state),
        ap = percent(f.allocated_bytes, cap),
        rp = percent(f.reserved_bytes, cap),
        fp = percent(f.free_bytes, cap),
        ah = human_size(f.allocated_bytes),
        rh = human_size(f.reserved_bytes),
        fh = human_size(f.free_bytes),
        ch = human_size(cap),
        hh = human_size(f.held_by_deleted_bytes),
        ph = human_size(f.provisioned_bytes),
        limit = p.overcommit_limit,
    );
}

fn opt_bytes(v: Option<u64>) -> (String, String) {
    match v {
        Some(b) => (b.to_string(), human_size(b)),
        None => (String::new(), "…".to_owned()),
    }
}

fn labels_cell(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "<span class=\"muted\">-</span>".to_owned();
    }
    l.iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join("<br>")
}

fn row(h: &mut String, o: &ObjectSample, extra_class: &str, note: &str) {
    let (ab, ah) = opt_bytes(o.allocated_bytes);
    let (ub, uh) = opt_bytes(o.unique_bytes);
    let pvc = if o.pvc_name.is_empty() {
        "<span class=\"muted\">-</span>".to_owned()
    } else {
        format!("{}/{}", esc(&o.pvc_namespace), esc(&o.pvc_name))
    };
    let export = match &o.export {
        Some(x) => format!(
            "{}<span class=\"muted\"> {}{}{}</span>",
            esc(&x.device),
            x.data_path,
            if x.read_only { ", read-only" } else { "" },
            if x.persistent { ", persistent" } else { "" },
        ),
        None => "<span class=\"muted\">-</span>".to_owned(),
    };
    let _ = writeln!(
        h,
        "<tr class=\"{kind}{extra_class}\" data-uuid=\"{uuid}\" data-name=\"{name}\" \
         data-pool=\"{pool}\" data-size-bytes=\"{size}\" data-allocated-bytes=\"{ab}\" \
         data-unique-bytes=\"{ub}\"><td class=\"name\">{name}{note}</td><td class=\"pvc\">{pvc}</td>\
         <td>{pool}</td><td class=\"num\">{sh}</td><td class=\"num\">{ah}</td>\
         <td class=\"num\">{uh}</td><td>{export}</td><td class=\"labels\">{labels}</td></tr>",
        kind = o.kind.as_str(),
        uuid = esc(&o.uuid),
        name = esc(&o.name),
        pool = esc(&o.pool),
        size = o.size_bytes,
        sh = human_size(o.size_bytes),
        labels = labels_cell(&o.labels),
    );
}

fn volumes(h: &mut String, objects: &[ObjectSample]) {
    let mut vols: Vec<&ObjectSample> = objects
        .iter()
        .filter(|o| o.kind == ObjectKind::Volume)
        .collect();
    // Largest first; ties by pool and name so the order is stable between refreshes.
    vols.sort_by(|a, b| {
        b.size_bytes
            .cmp(&a.size_bytes)
            .then_with(|| a.pool.cmp(&b.pool))
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut snaps: BTreeMap<(&str, &str), Vec<&ObjectSample>> = BTreeMap::new();
    for o in objects.iter().filter(|o| o.kind == ObjectKind::Snapshot) {
        snaps
            .entry((o.pool.as_str(), o.volume_uuid.as_str()))
            .or_default()
            .push(o);
    }
    for list in snaps.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let _ = writeln!(h, "<h2>Volumes ({})</h2>", vols.len());
    if vols.is_empty() && snaps.is_empty() {
        h.push_str("<p class=\"muted\" id=\"no-volumes\">No volume yet.</p>\n");
        return;
    }
    h.push_str(
        "<table id=\"volumes\"><thead><tr><th>Volume / snapshot</th><th>PVC</th><th>Pool</th>\
         <th class=\"num\">Size</th><th class=\"num\">Allocated</th>\
         <th class=\"num\">Unique</th><th>Export</th><th>Labels</th></tr></thead><tbody>\n",
    );
    for v in &vols {
        row(h, v, "", "");
        if let Some(list) = snaps.remove(&(v.pool.as_str(), v.uuid.as_str())) {
            for s in list {
                row(h, s, "", "");
            }
        }
    }
    // Snapshots whose volume was deleted (they stay whole; DESIGN §4).
    for list in snaps.into_values() {
        for s in list {
            row(
                h,
                s,
                " orphan",
                " <span class=\"muted\">(volume deleted)</span>",
            );
        }
    }
    h.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ExportSample, PoolFiguresSample};
    use std::time::Duration;

    fn obj(name: &str, kind: ObjectKind, uuid: &str, size: u64, volume: &str) -> ObjectSample {
        ObjectSample {
            pool: "default".into(),
            uuid: uuid.into(),
            name: name.into(),
            kind,
            volume_uuid: volume.into(),
            pvc_namespace: String::new(),
            pvc_name: String::new(),
            size_bytes: size,
            labels: BTreeMap::new(),
            allocated_bytes: Some(4096),
            unique_bytes: None,
            export: None,
            qos: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut big = obj("big", ObjectKind::Volume, "u-big", 10 << 30, "");
        big.pvc_namespace = "prod".into();
        big.pvc_name = "db-0".into();
        big.labels =
            BTreeMap::from([("note".to_owned(), "<script>alert('x')</script>".to_owned())]);
        big.export = Some(ExportSample {
            device: "/dev/ublkb0".into(),
            data_path: "copy",
            read_only: false,
            persistent: true,
            io: crate::export::stats::IoCounts::default(),
        });
        Snapshot {
            version: "0.1.0",
            node_id: "node<1>".into(),
            state: DaemonStateSample::Serving,
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            reactors: Vec::new(),
            devices: Vec::new(),
            pools: vec![
                PoolSample {
                    name: "default".into(),
                    uuid: "p1".into(),
                    state: PoolStateSample::Online,
                    capacity_bytes: 100 << 30,
                    overcommit_limit: 1.0,
                    figures: Some(PoolFiguresSample {
                        allocated_bytes: 25 << 30,
                        free_bytes: 75 << 30,
                        provisioned_bytes: 11 << 30,
                        volumes: 2,
                        snapshots: 2,
                        ..PoolFiguresSample::default()
                    }),
                },
                PoolSample {
                    name: "spare".into(),
                    uuid: "p2".into(),
                    state: PoolStateSample::Importing,
                    capacity_bytes: 0,
                    overcommit_limit: 1.0,
                    figures: None,
                },
            ],
            objects: vec![
                obj("small", ObjectKind::Volume, "u-small", 1 << 30, ""),
                obj("snap-b", ObjectKind::Snapshot, "u-sb", 10 << 30, "u-big"),
                big,
                obj("snap-a", ObjectKind::Snapshot, "u-sa", 10 << 30, "u-big"),
                obj("left", ObjectKind::Snapshot, "u-left", 2 << 30, "u-gone"),
            ],
            object_scans: 0,
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn escaping_covers_every_special_character() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("plain"), "plain");
    }

    #[test]
    fn the_page_shows_pools_volumes_in_size_order_with_their_snapshots() {
        let page = render(&snapshot());
        assert!(page.starts_with("<!DOCTYPE html>"));
        // Self-contained: nothing loaded from elsewhere.
        for needle in ["src=", "http://", "https://", "<link", "@import"] {
            assert!(!page.contains(needle), "{needle} in\n{page}");
        }
        assert!(page.contains("data-pool=\"default\""));
        assert!(page.contains("data-allocated-bytes=\"26843545600\""));
        assert!(page.contains("width:25.000%"), "{page}");
        assert!(page.contains("overcommit <b>0.11×</b>"), "{page}");
        assert!(page.contains("the pool is importing"), "{page}");
        // Largest volume first, its snapshots (by name) right after it, then the
        // smaller volume, then the snapshot whose volume is gone.
        let at = |s: &str| {
            page.find(s)
                .unwrap_or_else(|| panic!("{s} missing\n{page}"))
        };
        let order = [
            "data-uuid=\"u-big\"",
            "data-uuid=\"u-sa\"",
            "data-uuid=\"u-sb\"",
            "data-uuid=\"u-small\"",
            "data-uuid=\"u-left\"",
        ];
        for w in order.windows(2) {
            assert!(at(w[0]) < at(w[1]), "{} before {}\n{page}", w[0], w[1]);
        }
        assert!(page.contains("(volume deleted)"));
        assert!(page.contains("prod/db-0"));
        assert!(page.contains("/dev/ublkb0"));
        // An unscanned figure is shown as pending, not as zero.
        assert!(page.contains("data-unique-bytes=\"\""));
    }

    #[test]
    fn user_provided_text_is_escaped() {
        let page = render(&snapshot());
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("note=&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(page.contains("coreblk on node&lt;1&gt;"));
        assert!(page.contains("id=\"daemon-state\">serving<"), "{page}");
        // The page's own script is the only one.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
    }

    #[test]
    fn an_empty_node_says_so() {
        let mut s = snapshot();
        s.pools.clear();
        s.objects.clear();
        let page = render(&s);
        assert!(page.contains("id=\"no-pools\""));
        assert!(page.contains("id=\"no-volumes\""));
    }
}
