//! QoS flags of multi-volume runs: `--qos VOL:SPEC` sets volume VOL's limits before the
//! run, `--qos-change SECS:VOL:SPEC` replaces them SECS into the measured window. SPEC is
//! `none` (unlimited) or a comma list of `iops=N`, `read-iops=N`, `write-iops=N`,
//! `bw=SIZE`, `read-bw=SIZE`, `write-bw=SIZE` (bytes per second, binary units: `100M`),
//! `burst-ms=N`.

use anyhow::{bail, Context};
use coreblk_daemon::config::parse_size;
use coreblk_daemon::lvs::qos::QosLimits;

/// `--qos VOL:SPEC`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QosSet {
    /// Volume index (0-based, in `--volumes`).
    pub volume: usize,
    /// Its limits.
    pub limits: QosLimits,
}

/// `--qos-change SECS:VOL:SPEC`.
#[derive(Clone, Debug, PartialEq)]
pub struct QosChange {
    /// Seconds into the measured window.
    pub at_s: f64,
    /// Volume index and its new limits.
    pub set: QosSet,
}

/// Parses SPEC.
pub fn parse_spec(spec: &str) -> anyhow::Result<QosLimits> {
    let mut l = QosLimits::default();
    if spec == "none" || spec == "unlimited" {
        return Ok(l);
    }
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("QoS spec {spec:?}: {kv:?} is not KEY=VALUE"))?;
        let num = || {
            v.parse::<u64>()
                .with_context(|| format!("QoS spec {spec:?}: {k}={v:?} is not a whole number"))
        };
        match k {
            "iops" => l.iops = num()?,
            "read-iops" => l.read_iops = num()?,
            "write-iops" => l.write_iops = num()?,
            "bw" => l.bytes_per_sec = parse_size(v)?,
            "read-bw" => l.read_bytes_per_sec = parse_size(v)?,
            "write-bw" => l.write_bytes_per_sec = parse_size(v)?,
            "burst-ms" => {
                l.burst_ms = u32::try_from(num()?)
                    .with_context(|| format!("QoS spec {spec:?}: burst-ms={v} is too large"))?;
            }
            other => bail!(
                "QoS spec {spec:?}: unknown key {other:?} (use iops, read-iops, write-iops, bw, read-bw, write-bw, burst-ms, or none)"
            ),
        }
    }
    l.validate()
        .map_err(|e| anyhow::anyhow!("QoS spec {spec:?}: {e}"))?;
    Ok(l)
}

/// Parses `VOL:SPEC`.
pub fn parse_set(s: &str) -> anyhow::Result<QosSet> {
    let (vol, spec) = s
        .split_once(':')
        .with_context(|| format!("--qos {s:?}: expected VOL:SPEC, e.g. 0:iops=5000"))?;
    let volume = vol
        .parse()
        .with_context(|| format!("--qos {s:?}: {vol:?} is not a volume index"))?;
    Ok(QosSet {
        volume,
        limits: parse_spec(spec)?,
    })
}

/// Parses `SECS:VOL:SPEC`.
pub fn parse_change(s: &str) -> anyhow::Result<QosChange> {
    let (at, rest) = s.split_once(':').with_context(|| {
        format!("--qos-change {s:?}: expected SECS:VOL:SPEC, e.g. 5:0:iops=10000")
    })?;
    let at_s: f64 = at
        .parse()
        .ok()
        .filter(|t: &f64| t.is_finite() && *t >= 0.0)
        .with_context(|| format!("--qos-change {s:?}: {at:?} is not a time in seconds"))?;
    Ok(QosChange {
        at_s,
        set: parse_set(rest)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qos_flags_and_refuses_bad_ones() {
        let s = parse_set("1:iops=5000,write-bw=100M,burst-ms=50").expect("valid");
        assert_eq!(s.volume, 1);
        assert_eq!(
            s.limits,
            QosLimits {
                iops: 5000,
                write_bytes_per_sec: 100 << 20,
                burst_ms: 50,
                ..QosLimits::default()
            }
        );
        assert_eq!(
            parse_set("0:none").expect("none").limits,
            QosLimits::default()
        );
        let c = parse_change("5.5:0:read-iops=7").expect("valid change");
        assert!((c.at_s - 5.5).abs() < 1e-9);
        assert_eq!(c.set.limits.read_iops, 7);
        for (bad, why) in [
            ("iops=5", "VOL:SPEC"),
            ("x:iops=5", "volume index"),
            ("0:iops", "KEY=VALUE"),
            ("0:speed=5", "unknown key"),
            ("0:iops=-1", "whole number"),
            ("0:iops=999999999999", "largest accepted"),
        ] {
            let e = parse_set(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(parse_change("-1:0:iops=5").is_err());
    }
}
