//! QoS parameters (issue 15): the StorageClass parameters and the VolumeAttributesClass
//! (`mutable_parameters`) keys that set a volume's limits, and the limits they make for a
//! volume of a given size.
//!
//! Keys (values are whole numbers; 0 or absent = unlimited):
//! - `maxIops`, `maxReadIops`, `maxWriteIops`: requests per second;
//! - `maxMBps`, `maxReadMBps`, `maxWriteMBps`: MiB per second (2^20 bytes, like every
//!   size coreblk takes);
//! - `iopsPerGiB`, `mbpsPerGiB`: a total limit that scales with the volume's size (size in
//!   GiB rounded up × the value), capped by `maxIops` / `maxMBps` when those are given too;
//! - `burstMs`: the burst allowance, milliseconds of each limit's rate a volume may save
//!   while idle and spend at once (default 100).
//!
//! Every key is mutable: the same keys in a VolumeAttributesClass change a volume's limits
//! online (ControllerModifyVolume, served by the node plugin on the owning node); a
//! modify replaces every limit (keys not given are unlimited), as a class describes the
//! whole of a volume's attributes. Must never: call the daemon (pure, unit-tested here).

use std::collections::HashMap;

use coreblk_proto::v1 as pb;

/// The QoS keys, in the order messages list them.
pub const QOS_KEYS: [&str; 9] = [
    "maxIops",
    "maxReadIops",
    "maxWriteIops",
    "maxMBps",
    "maxReadMBps",
    "maxWriteMBps",
    "iopsPerGiB",
    "mbpsPerGiB",
    "burstMs",
];

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// QoS asked for by parameters, before the volume's size is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosParams {
    /// `maxIops`, `maxReadIops`, `maxWriteIops`, `maxMBps`, `maxReadMBps`, `maxWriteMBps`,
    /// `iopsPerGiB`, `mbpsPerGiB`, `burstMs` (`None`: not given).
    vals: [Option<u64>; 9],
}

/// Whether `key` is a QoS parameter.
#[must_use]
pub fn is_qos_key(key: &str) -> bool {
    QOS_KEYS.contains(&key)
}

impl QosParams {
    /// Reads the QoS keys of `parameters` (other keys are the caller's business).
    ///
    /// # Errors
    /// A sentence naming the parameter, its value and the rule.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, String> {
        let mut p = Self::default();
        for (i, key) in QOS_KEYS.iter().enumerate() {
            let Some(v) = parameters.get(*key) else {
                continue;
            };
            let n: u64 = v.trim().parse().map_err(|_| {
                format!("parameter {key} is {v:?}: write a whole number (0 for unlimited)")
            })?;
            p.vals[i] = Some(n);
        }
        // Checks the limits the most a size could make (per-GiB values overflow early).
        for (i, key) in [(6, "iopsPerGiB"), (7, "mbpsPerGiB")] {
            if let Some(v) = p.vals[i].filter(|v| *v > 1_000_000) {
                return Err(format!(
                    "parameter {key} is {v}: at most 1000000 per GiB (0 for none)"
                ));
            }
        }
        p.limits(GIB)?;
        Ok(p)
    }

    /// Refuses keys of `parameters` that are not QoS keys (a VolumeAttributesClass may
    /// carry only these).
    ///
    /// # Errors
    /// A sentence naming the unknown key and the keys accepted.
    pub fn only_qos_keys(parameters: &HashMap<String, String>) -> Result<(), String> {
        let mut unknown: Vec<&String> = parameters.keys().filter(|k| !is_qos_key(k)).collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(k) => Err(format!(
                "mutable_parameters: {k:?} cannot be changed on a volume; the mutable parameters are {} (fix the VolumeAttributesClass)",
                QOS_KEYS.join(", ")
            )),
        }
    }

    /// `self` with the keys `other` gives replacing these.
    #[must_use]
    pub fn overlay(&self, other: &QosParams) -> QosParams {
        let mut out = *self;
        for (o, v) in out.vals.iter_mut().zip(other.vals) {
            if v.is_some() {
                *o = v;
            }
        }
        out
    }

    /// Whether no limit is asked for (no key, or only zeroes).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.vals.iter().all(|v| v.unwrap_or(0) == 0)
    }

    /// The limits for a volume of `size_bytes`, as the daemon's API takes them (`None`:
    /// unlimited).
    ///
    /// # Errors
    /// A limit too large to mean anything (the daemon's bounds, named with the key).
    pub fn limits(&self, size_bytes: u64) -> Result<Option<pb::VolumeQos>, String> {
        if self.is_empty() {
            return Ok(None);
        }
        let [max_iops, read_iops, write_iops, mbps, read_mbps, write_mbps, iops_gib, mbps_gib, burst] =
            self.vals.map(|v| v.unwrap_or(0));
        let gib = size_bytes.div_ceil(GIB).max(1);
        let scaled = |per: u64, max: u64| -> u64 {
            if per == 0 {
                return max;
            }
            let s = per.saturating_mul(gib);
            if max == 0 {
                s
            } else {
                s.min(max)
            }
        };
        let bytes = |key: &str, mib: u64| -> Result<u64, String> {
            mib.checked_mul(MIB)
                .filter(|b| *b <= coreblk_daemon_limits::MAX_BYTES_PER_SEC)
                .ok_or_else(|| {
                    format!(
                        "parameter {key} is {mib} MiB/s: at most {} (0 for unlimited)",
                        coreblk_daemon_limits::MAX_BYTES_PER_SEC / MIB
                    )
                })
        };
        for (key, v) in [
            ("maxIops", scaled(iops_gib, max_iops)),
            ("maxReadIops", read_iops),
            ("maxWriteIops", write_iops),
        ] {
            if v > coreblk_daemon_limits::MAX_IOPS {
                return Err(format!(
                    "parameter {key} makes {v} IOPS: at most {} (0 for unlimited)",
                    coreblk_daemon_limits::MAX_IOPS
                ));
            }
        }
        let burst_ms = u32::try_from(burst)
            .ok()
            .filter(|b| *b <= coreblk_daemon_limits::MAX_BURST_MS)
            .ok_or_else(|| {
                format!(
                    "parameter burstMs is {burst}: at most {} ms (0 for the default, 100)",
                    coreblk_daemon_limits::MAX_BURST_MS
                )
            })?;
        Ok(Some(pb::VolumeQos {
            max_iops: scaled(iops_gib, max_iops),
            max_read_iops: read_iops,
            max_write_iops: write_iops,
            max_bytes_per_sec: bytes("maxMBps", scaled(mbps_gib, mbps))?,
            max_read_bytes_per_sec: bytes("maxReadMBps", read_mbps)?,
            max_write_bytes_per_sec: bytes("maxWriteMBps", write_mbps)?,
            burst_ms,
        }))
    }
}

/// The daemon's bounds (`coreblk_daemon::lvs::qos`), repeated here because the plugin is a
/// client of the API only; the daemon checks them again.
mod coreblk_daemon_limits {
    pub const MAX_IOPS: u64 = 100_000_000;
    pub const MAX_BYTES_PER_SEC: u64 = 1 << 50;
    pub const MAX_BURST_MS: u32 = 60_000;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn qos_parameters_make_limits_that_scale_with_size() {
        let p = QosParams::parse(&m(&[
            ("maxIops", "5000"),
            ("iopsPerGiB", "100"),
            ("maxWriteMBps", "50"),
            ("burstMs", "250"),
            ("pool", "x"),
        ]))
        .expect("valid");
        // 10 GiB: 1000 IOPS by size; 100 GiB: capped at maxIops.
        let l = p.limits(10 * GIB).expect("ok").expect("limited");
        assert_eq!(l.max_iops, 1000);
        assert_eq!(l.max_write_bytes_per_sec, 50 * MIB);
        assert_eq!(l.burst_ms, 250);
        assert_eq!(
            p.limits(100 * GIB).expect("ok").expect("limited").max_iops,
            5000
        );
        // Sizes round up to whole GiB.
        assert_eq!(
            p.limits(GIB + 1).expect("ok").expect("limited").max_iops,
            200
        );
        // Per-GiB alone.
        let p = QosParams::parse(&m(&[("mbpsPerGiB", "2")])).expect("valid");
        assert_eq!(
            p.limits(3 * GIB)
                .expect("ok")
                .expect("limited")
                .max_bytes_per_sec,
            6 * MIB
        );
        assert_eq!(
            QosParams::parse(&m(&[])).expect("none").limits(GIB),
            Ok(None)
        );
        // A VolumeAttributesClass over a StorageClass: its keys win.
        let base = QosParams::parse(&m(&[("maxIops", "100"), ("maxMBps", "10")])).expect("ok");
        let over = QosParams::parse(&m(&[("maxIops", "200")])).expect("ok");
        let l = base
            .overlay(&over)
            .limits(GIB)
            .expect("ok")
            .expect("limited");
        assert_eq!((l.max_iops, l.max_bytes_per_sec), (200, 10 * MIB));
    }

    #[test]
    fn bad_qos_parameters_are_refused_with_the_rule() {
        for (kv, why) in [
            (("maxIops", "fast"), "whole number"),
            (("maxIops", "-5"), "whole number"),
            (("maxIops", "999999999999"), "at most"),
            (("maxMBps", "99999999999999"), "at most"),
            (("iopsPerGiB", "2000000"), "per GiB"),
            (("burstMs", "70000"), "burstMs"),
        ] {
            let e = QosParams::parse(&m(&[kv])).expect_err(kv.0);
            assert!(e.contains(kv.0) && e.contains(why), "{kv:?}: {e}");
        }
        QosParams::only_qos_keys(&m(&[("maxIops", "1"), ("burstMs", "5")])).expect("all mutable");
        let e =
            QosParams::only_qos_keys(&m(&[("maxIops", "1"), ("pool", "fast")])).expect_err("pool");
        assert!(e.contains("\"pool\"") && e.contains("maxIops"), "{e}");
    }
}
