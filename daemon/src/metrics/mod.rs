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
//! `_seconds`), `_total` for counters. Pool, volume and IO metrics arrive with the volume
//! store and the exports. Start reading at [`render`].

pub mod http;
pub mod text;

use std::time::{Duration, SystemTime};

use text::{Exposition, Kind};

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

/// Everything `/metrics` shows, gathered at scrape time.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The daemon's version.
    pub version: &'static str,
    /// When the daemon started.
    pub start_time: SystemTime,
    /// Per-reactor counters.
    pub reactors: Vec<ReactorSample>,
    /// Claimed devices (present or recorded).
    pub devices: Vec<DeviceSample>,
}

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

    let reactor_families: [ReactorFamily; 4] = [
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
    e.finish()
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

    fn sample() -> Snapshot {
        Snapshot {
            version: "0.1.0",
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            reactors: vec![
                ReactorSample {
                    id: 0,
                    core: 2,
                    busy_ns: 1_500_000_000,
                    sleep_ns: 3_000_000_000,
                    sleeps: 7,
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
        assert_eq!(value("coreblk_build_info", &[("version", "0.1.0")]), 1.0);
        assert_eq!(value("coreblk_start_time_seconds", &[]), 1_700_000_000.0);
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
        assert!(page.contains("# TYPE coreblk_reactor_busy_seconds_total counter\n"));
        assert!(page.ends_with('\n'));
    }
}
