//! CSI ephemeral inline volumes (CSIDriver `volumeLifecycleModes: [Persistent,
//! Ephemeral]`): what a pod's inline `csi:` volume asks for, checked, and how such a
//! volume is named and labelled in the daemon.
//!
//! NodePublishVolume with `csi.storage.k8s.io/ephemeral=true` in its volume context makes
//! a thin volume named after kubelet's volume ID ([`volume_name`]) from the attributes
//! ([`InlineAttrs`]), exports it, makes the filesystem and mounts it at the target in one
//! step; NodeUnpublishVolume unmounts, unexports and deletes it. Each such volume
//! carries the labels [`LABEL_EPHEMERAL`] (kubelet's volume ID) and [`LABEL_TARGET`] (the
//! target path), so the node plugin finds orphans — an ephemeral volume whose target is
//! not mounted from it any more (a node reboot, a plugin crash between create and mount,
//! an unpublish lost while the daemon was down) — and removes them (`node.rs`,
//! `Node::sweep_ephemeral`).
//!
//! Owns: [`InlineAttrs`], [`is_ephemeral`], [`volume_name`], [`parse_quantity`]. Must
//! never: call the daemon (pure checks, unit-tested here).

use std::collections::HashMap;

use crate::fsopts::{PARAM_ENCRYPTION, PARAM_MKFS_OPTIONS};
use crate::params::{DEFAULT_POOL, DEFAULT_SIZE_BYTES, FS_TYPES, K8S_PREFIX};

/// The volume-context key kubelet sets to `true` for an inline ephemeral volume.
pub const CONTEXT_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Volume label: kubelet's volume ID of an ephemeral volume.
pub const LABEL_EPHEMERAL: &str = "csi.coreblk.io/ephemeral";
/// Volume label: the target path an ephemeral volume is published at.
pub const LABEL_TARGET: &str = "csi.coreblk.io/ephemeral-target";
/// Attribute: the size (a Kubernetes quantity: `1Gi`, `500Mi`, `1G`, bytes).
pub const ATTR_SIZE: &str = "size";
/// Attribute: the pool (default: `default`).
pub const ATTR_POOL: &str = "pool";
/// Attribute: the filesystem, when the pod's `fsType` does not name it.
pub const ATTR_FSTYPE: &str = "fsType";
/// The prefix of daemon volume names of ephemeral volumes.
const NAME_PREFIX: &str = "eph-";
/// Largest ephemeral volume (1 TiB): an inline volume is scratch space.
pub const MAX_SIZE_BYTES: u64 = 1 << 40;

/// Whether a NodePublishVolume's volume context asks for an ephemeral volume.
pub fn is_ephemeral(context: &HashMap<String, String>) -> bool {
    context.get(CONTEXT_EPHEMERAL).map(String::as_str) == Some("true")
}

/// The daemon volume name of kubelet's ephemeral volume `volume_id` (`csi-<sha256>`).
///
/// # Errors
/// A sentence saying why the ID cannot name a volume.
pub fn volume_name(volume_id: &str) -> Result<String, String> {
    let ok = !volume_id.is_empty()
        && volume_id.len() + NAME_PREFIX.len() <= 128
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(format!("{NAME_PREFIX}{volume_id}"))
    } else {
        Err(format!(
            "volume_id {volume_id:?} of an ephemeral volume must be 1 to {} characters from \
             A-Z a-z 0-9 . _ - (kubelet's csi-<hash> IDs are)",
            128 - NAME_PREFIX.len()
        ))
    }
}

/// What an inline volume asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineAttrs {
    /// Bytes (before rounding up to the pool's clusters).
    pub size_bytes: u64,
    /// The pool's name or UUID.
    pub pool: String,
    /// The filesystem named by an attribute, if any.
    pub fs_type: Option<String>,
    /// Labels for the volume (mkfs options).
    pub labels: HashMap<String, String>,
}

impl InlineAttrs {
    /// Reads the volume attributes of an inline volume. Unknown keys are refused (a typo
    /// should not silently make a 1 GiB volume); `csi.storage.k8s.io/` keys are kubelet's.
    ///
    /// # Errors
    /// A sentence naming the attribute and the rule.
    pub fn parse(context: &HashMap<String, String>) -> Result<Self, String> {
        let mut a = Self {
            size_bytes: DEFAULT_SIZE_BYTES,
            pool: DEFAULT_POOL.to_owned(),
            fs_type: None,
            labels: HashMap::new(),
        };
        let mut keys: Vec<&String> = context.keys().collect();
        keys.sort();
        for key in keys {
            let value = &context[key];
            match key.as_str() {
                ATTR_SIZE => {
                    let n = parse_quantity(value)
                        .map_err(|e| format!("volume attribute {ATTR_SIZE}: {e}"))?;
                    if n == 0 || n > MAX_SIZE_BYTES {
                        return Err(format!(
                            "volume attribute {ATTR_SIZE} is {value:?}: give 1 byte to 1Ti"
                        ));
                    }
                    a.size_bytes = n;
                }
                ATTR_POOL => {
                    if value.is_empty() {
                        return Err(format!(
                            "volume attribute {ATTR_POOL} is empty: name a pool or leave it out"
                        ));
                    }
                    a.pool = value.clone();
                }
                ATTR_FSTYPE => {
                    let fs = value.to_ascii_lowercase();
                    if !FS_TYPES.contains(&fs.as_str()) {
                        return Err(format!(
                            "volume attribute {ATTR_FSTYPE} is {value:?}: use ext4 or xfs"
                        ));
                    }
                    a.fs_type = Some(fs);
                }
                PARAM_MKFS_OPTIONS => {
                    a.labels.insert(key.clone(), value.clone());
                }
                PARAM_ENCRYPTION => {
                    return Err(format!(
                        "volume attribute {PARAM_ENCRYPTION}: ephemeral inline volumes are not \
                         encrypted (they get no node-stage secret); use a generic ephemeral \
                         volume (ephemeral.volumeClaimTemplate) with an encrypted StorageClass"
                    ));
                }
                k if k.starts_with(K8S_PREFIX) => {}
                other => {
                    return Err(format!(
                        "unknown volume attribute {other:?}: an inline coreblk volume takes \
                         {ATTR_SIZE}, {ATTR_POOL}, {ATTR_FSTYPE} and {PARAM_MKFS_OPTIONS} (fix \
                         the pod's volumeAttributes)"
                    ))
                }
            }
        }
        Ok(a)
    }
}

/// A Kubernetes quantity in bytes: digits with an optional suffix `Ki Mi Gi Ti` (powers
/// of 1024) or `k M G T` (powers of 1000).
///
/// # Errors
/// A sentence naming the value.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let bad = || format!("{s:?} is not a size (write for example 1Gi, 512Mi or 1073741824)");
    if digits.is_empty() || digits.len() > 20 {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
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
    fn quantities() {
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("2G"), Ok(2_000_000_000));
        assert_eq!(parse_quantity("4096"), Ok(4096));
        for bad in [
            "",
            "Gi",
            "1.5Gi",
            "1gi",
            "-1",
            "1 Gi",
            "99999999999999999999Ti",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn attributes() {
        assert!(is_ephemeral(&m(&[(CONTEXT_EPHEMERAL, "true")])));
        assert!(!is_ephemeral(&m(&[(CONTEXT_EPHEMERAL, "false")])));
        assert!(!is_ephemeral(&m(&[])));
        let a = InlineAttrs::parse(&m(&[
            (CONTEXT_EPHEMERAL, "true"),
            ("csi.storage.k8s.io/pod.name", "p"),
            ("size", "64Mi"),
            ("fsType", "XFS"),
            ("pool", "fast"),
            ("csi.coreblk.io/mkfs-options", "-m crc=1"),
        ]))
        .expect("valid");
        assert_eq!(a.size_bytes, 64 << 20);
        assert_eq!(a.pool, "fast");
        assert_eq!(a.fs_type.as_deref(), Some("xfs"));
        assert_eq!(a.labels["csi.coreblk.io/mkfs-options"], "-m crc=1");
        let d = InlineAttrs::parse(&m(&[])).expect("defaults");
        assert_eq!(
            (d.size_bytes, d.pool.as_str()),
            (DEFAULT_SIZE_BYTES, "default")
        );
        for (bad, says) in [
            (m(&[("size", "lots")]), "not a size"),
            (m(&[("size", "0")]), "1Ti"),
            (m(&[("size", "2Ti")]), "1Ti"),
            (m(&[("pool", "")]), "empty"),
            (m(&[("fsType", "btrfs")]), "ext4 or xfs"),
            (m(&[("sise", "1Gi")]), "unknown volume attribute \"sise\""),
            (
                m(&[("csi.coreblk.io/encryption", "luks2")]),
                "not encrypted",
            ),
        ] {
            let e = InlineAttrs::parse(&bad).expect_err("refused");
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names() {
        let id = format!("csi-{}", "ab".repeat(32));
        assert_eq!(volume_name(&id), Ok(format!("eph-{id}")));
        assert!(volume_name("").is_err());
        assert!(volume_name("a/b").is_err());
        assert!(volume_name(&"x".repeat(125)).is_err());
    }
}
