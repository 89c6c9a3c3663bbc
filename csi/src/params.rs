//! What a CSI request asks for, checked: StorageClass parameters, volume capabilities,
//! capacity ranges and topology, each refused with a message that names the field, the
//! rule and the fix.
//!
//! Owns: [`VolumeParams`], [`check_capabilities`], [`volume_size`], the parameter names and
//! [`TOPOLOGY_KEY`]. Must never: call the daemon (pure checks, unit-tested here).

use std::collections::HashMap;

use coreblk_proto::csi::v1 as csi;

use crate::qos::{is_qos_key, QosParams, QOS_KEYS};
use csi::volume_capability::access_mode::Mode;

/// The topology segment key: the node a volume lives on.
pub const TOPOLOGY_KEY: &str = "topology.coreblk.io/node";
/// Parameter: the pool (name or UUID) volumes of the class go to.
pub const PARAM_POOL: &str = "pool";
/// Parameter: `true` reserves the whole size at creation (thick), `false` (default) thin.
pub const PARAM_THICK: &str = "thick";
/// Parameter: extra volume labels, `key=value,key=value`.
pub const PARAM_LABELS: &str = "labels";
/// Parameter: the filesystem (the provisioner passes it in the capability; older classes
/// name it here).
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// The legacy spelling of [`PARAM_FSTYPE`].
pub const PARAM_FSTYPE_LEGACY: &str = "fsType";
/// The prefix of the parameters Kubernetes sidecars add (`--extra-create-metadata`).
pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";
/// The sidecar parameters kept as labels of the volume or snapshot, under the same key.
pub const KEPT_AS_LABELS: [&str; 6] = [
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
    "csi.storage.k8s.io/volumesnapshot/name",
    "csi.storage.k8s.io/volumesnapshot/namespace",
    "csi.storage.k8s.io/volumesnapshotcontent/name",
];
/// The pool used when a class names none.
pub const DEFAULT_POOL: &str = "default";
/// Size of a volume whose request gives no capacity.
pub const DEFAULT_SIZE_BYTES: u64 = 1 << 30;
/// Filesystems the node plugin makes and mounts.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];

/// The parameters of a CreateVolume or GetCapacity request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeParams {
    /// The pool named, if any.
    pub pool: Option<String>,
    /// Reserve the whole size up front.
    pub thick: bool,
    /// The filesystem named by a parameter, if any.
    pub fs_type: Option<String>,
    /// Labels for the volume: `labels` and the kept sidecar parameters.
    pub labels: HashMap<String, String>,
    /// QoS limits asked for (`crate::qos`).
    pub qos: QosParams,
}

impl VolumeParams {
    /// Reads `parameters`. Unknown keys are refused (a typo in a StorageClass should not
    /// silently make a thin volume in the default pool); other `csi.storage.k8s.io/` keys
    /// are the sidecars' and ignored.
    ///
    /// # Errors
    /// A sentence naming the parameter and the rule.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, String> {
        let mut p = Self::default();
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort();
        for key in keys {
            let value = &parameters[key];
            // Filesystem and encryption parameters (fsopts.rs): kept as labels for the node.
            if let Some(checked) = crate::fsopts::check_class_param(key, value) {
                checked?;
                p.labels.insert(key.clone(), value.clone());
                continue;
            }
            match key.as_str() {
                PARAM_POOL => {
                    if value.is_empty() {
                        return Err("parameter pool is empty: name a pool or leave it out (the pool \"default\")".to_owned());
                    }
                    p.pool = Some(value.clone());
                }
                PARAM_THICK => {
                    p.thick = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(format!(
                                "parameter thick is {value:?}: write \"true\" (reserve the whole size now) or \"false\" (thin)"
                            ))
                        }
                    }
                }
                PARAM_LABELS => {
                    for pair in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let Some((k, v)) = pair.split_once('=') else {
                            return Err(format!(
                                "parameter labels: {pair:?} is not key=value (write labels: \"team=db,tier=gold\")"
                            ));
                        };
                        if k.trim().is_empty() {
                            return Err(format!("parameter labels: {pair:?} has an empty key"));
                        }
                        if k.trim().starts_with(crate::fsopts::COREBLK_PREFIX) {
                            return Err(format!(
                                "parameter labels: key {:?} is reserved for the driver; give it \
                                 as a parameter of its own",
                                k.trim()
                            ));
                        }
                        p.labels.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                }
                PARAM_FSTYPE | PARAM_FSTYPE_LEGACY => {
                    let fs = check_fs_type(value)?;
                    if p.fs_type.as_ref().is_some_and(|have| *have != fs) {
                        return Err(format!(
                            "parameters {PARAM_FSTYPE} and {PARAM_FSTYPE_LEGACY} disagree; give one"
                        ));
                    }
                    if !fs.is_empty() {
                        p.fs_type = Some(fs);
                    }
                }
                k if is_qos_key(k) => {}
                k if KEPT_AS_LABELS.contains(&k) => {
                    p.labels.insert(k.to_owned(), value.clone());
                }
                k if k.starts_with(K8S_PREFIX) => {}
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: coreblk takes {PARAM_POOL}, {PARAM_THICK}, \
                         {PARAM_LABELS}, {PARAM_FSTYPE}, {}, {} and the QoS keys {} (fix the StorageClass)",
                        crate::fsopts::PARAM_MKFS_OPTIONS,
                        crate::fsopts::PARAM_ENCRYPTION,
                        QOS_KEYS.join(", ")
                    ))
                }
            }
        }
        p.qos = QosParams::parse(parameters)?;
        Ok(p)
    }
}

fn check_fs_type(fs: &str) -> Result<String, String> {
    let fs = fs.to_ascii_lowercase();
    if fs.is_empty() || FS_TYPES.contains(&fs.as_str()) {
        Ok(fs)
    } else {
        Err(format!(
            "filesystem {fs:?} is not supported: use ext4 or xfs, or block mode"
        ))
    }
}

/// Whether an access mode is one this node-local driver serves (one node at a time).
pub fn single_node(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Checks capabilities: each has an access type (block, or mount with ext4, xfs or the
/// default) and a single-node access mode. Returns the filesystem the mount capabilities
/// ask for (empty: none named).
///
/// # Errors
/// A sentence naming the capability and why it is not supported.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<String, String> {
    let mut fs = String::new();
    for (i, c) in caps.iter().enumerate() {
        match &c.access_type {
            None => {
                return Err(format!(
                    "volume_capabilities[{i}] has no access type: give block or mount"
                ))
            }
            Some(csi::volume_capability::AccessType::Block(_)) => {}
            Some(csi::volume_capability::AccessType::Mount(m)) => {
                let f = check_fs_type(&m.fs_type)
                    .map_err(|e| format!("volume_capabilities[{i}]: {e}"))?;
                if !f.is_empty() {
                    if !fs.is_empty() && fs != f {
                        return Err(format!(
                            "volume_capabilities ask for two filesystems, {fs} and {f}; give one"
                        ));
                    }
                    fs = f;
                }
            }
        }
        let mode = c
            .access_mode
            .as_ref()
            .map_or(Mode::Unknown, csi::volume_capability::AccessMode::mode);
        if !single_node(mode) {
            return Err(format!(
                "volume_capabilities[{i}]: access mode {} is not supported: coreblk volumes are \
                 local to one node (use ReadWriteOnce, ReadWriteOncePod or ReadOnlyMany on one node)",
                mode.as_str_name()
            ));
        }
    }
    Ok(fs)
}

/// Why a capacity range cannot be met; CSI answers OUT_OF_RANGE (or INVALID_ARGUMENT for a
/// negative figure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// A negative figure.
    Negative(String),
    /// No size in the range is possible.
    OutOfRange(String),
}

/// The size of a new volume: the required bytes (else the clone source's size, else
/// [`DEFAULT_SIZE_BYTES`], else the limit when that is smaller), at least the source's
/// size, rounded up to a multiple of the pool's cluster size, and not above the limit.
///
/// # Errors
/// [`SizeError`] saying which figure is wrong.
pub fn volume_size(
    range: Option<&csi::CapacityRange>,
    source_bytes: Option<u64>,
    cluster_bytes: u64,
) -> Result<u64, SizeError> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let required = u64::try_from(required).map_err(|_| {
        SizeError::Negative(format!(
            "capacity_range.required_bytes is negative ({required})"
        ))
    })?;
    let limit = u64::try_from(limit).map_err(|_| {
        SizeError::Negative(format!("capacity_range.limit_bytes is negative ({limit})"))
    })?;
    if limit > 0 && required > limit {
        return Err(SizeError::OutOfRange(format!(
            "capacity_range.required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let cluster = cluster_bytes.max(4096);
    let mut want = if required > 0 {
        required
    } else if let Some(s) = source_bytes {
        s
    } else if limit > 0 {
        DEFAULT_SIZE_BYTES
            .min(limit / cluster * cluster)
            .max(cluster.min(limit))
    } else {
        DEFAULT_SIZE_BYTES
    };
    if let Some(s) = source_bytes {
        want = want.max(s);
    }
    let size = want
        .checked_next_multiple_of(cluster)
        .ok_or_else(|| SizeError::OutOfRange(format!("{want} bytes is too large")))?;
    if limit > 0 && size > limit {
        return Err(SizeError::OutOfRange(format!(
            "the volume needs {size} bytes ({} rounded up to the pool's {cluster}-byte \
             clusters) but limit_bytes is {limit}: raise the limit",
            match source_bytes {
                Some(s) if s >= required => format!("the {s}-byte source"),
                _ => format!("{want} bytes"),
            }
        )));
    }
    Ok(size)
}

/// Whether a requisite topology list lets the volume live on `node_id` (an empty list
/// does).
pub fn topology_allows(req: Option<&csi::TopologyRequirement>, node_id: &str) -> bool {
    let Some(req) = req else { return true };
    req.requisite.is_empty()
        || req
            .requisite
            .iter()
            .any(|t| t.segments.get(TOPOLOGY_KEY).is_some_and(|n| n == node_id))
}

/// The one topology segment of this node.
pub fn node_topology(node_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node_id.to_owned())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i128, limit: i128) -> csi::CapacityRange {
        csi::CapacityRange {
            required_bytes: i64::try_from(required).expect("fits"),
            limit_bytes: i64::try_from(limit).expect("fits"),
        }
    }

    #[test]
    fn sizes_round_up_to_clusters_and_respect_the_limit() {
        let c: u64 = 64 << 10;
        let ci = i128::from(c);
        assert_eq!(volume_size(None, None, c), Ok(DEFAULT_SIZE_BYTES));
        assert_eq!(volume_size(Some(&range(1, 0)), None, c), Ok(c));
        assert_eq!(volume_size(Some(&range(ci + 1, 0)), None, c), Ok(2 * c));
        assert_eq!(volume_size(Some(&range(0, 3 * ci)), None, c), Ok(3 * c));
        assert!(matches!(
            volume_size(Some(&range(ci + 1, ci + 100)), None, c),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            volume_size(Some(&range(10, 5)), None, c),
            Err(SizeError::OutOfRange(_))
        ));
        assert!(matches!(
            volume_size(Some(&range(-1, 0)), None, c),
            Err(SizeError::Negative(_))
        ));
        // A clone: at least its source.
        assert_eq!(volume_size(None, Some(5 * c), c), Ok(5 * c));
        assert_eq!(volume_size(Some(&range(ci, 0)), Some(5 * c), c), Ok(5 * c));
        assert!(matches!(
            volume_size(Some(&range(ci, 2 * ci)), Some(5 * c), c),
            Err(SizeError::OutOfRange(_))
        ));
    }

    #[test]
    fn parameters() {
        let m = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let p = VolumeParams::parse(&m(&[
            ("pool", "fast"),
            ("thick", "true"),
            ("labels", "a=1, b=2"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/provisioner-secret-name", "x"),
            ("fsType", "XFS"),
        ]))
        .expect("valid");
        assert_eq!(p.pool.as_deref(), Some("fast"));
        assert!(p.thick);
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.labels.len(), 3);
        assert_eq!(p.labels["csi.storage.k8s.io/pvc/name"], "data");
        let p = VolumeParams::parse(&m(&[
            ("csi.coreblk.io/encryption", "luks2"),
            ("csi.coreblk.io/mkfs-options", "-m 0"),
        ]))
        .expect("valid");
        assert_eq!(p.labels["csi.coreblk.io/encryption"], "luks2");
        assert_eq!(p.labels["csi.coreblk.io/mkfs-options"], "-m 0");
        for bad in [
            m(&[("pol", "x")]),
            m(&[("thick", "yes")]),
            m(&[("labels", "novalue")]),
            m(&[("fsType", "btrfs")]),
            m(&[("fsType", "ext4"), ("csi.storage.k8s.io/fstype", "xfs")]),
            m(&[("csi.coreblk.io/encryption", "yes")]),
            m(&[("csi.coreblk.io/other", "1")]),
            m(&[("labels", "csi.coreblk.io/encryption=luks2")]),
        ] {
            assert!(VolumeParams::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn capabilities() {
        let cap = |mode: Mode, fs: Option<&str>| csi::VolumeCapability {
            access_type: Some(match fs {
                None => csi::volume_capability::AccessType::Block(
                    csi::volume_capability::BlockVolume {},
                ),
                Some(f) => {
                    csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
                        fs_type: f.to_owned(),
                        ..Default::default()
                    })
                }
            }),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode.into() }),
        };
        assert_eq!(
            check_capabilities(&[cap(Mode::SingleNodeSingleWriter, Some("ext4"))]),
            Ok("ext4".to_owned())
        );
        assert_eq!(
            check_capabilities(&[cap(Mode::SingleNodeWriter, None)]),
            Ok(String::new())
        );
        assert!(check_capabilities(&[cap(Mode::MultiNodeMultiWriter, None)]).is_err());
        assert!(check_capabilities(&[cap(Mode::Unknown, None)]).is_err());
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, Some("zfs"))]).is_err());
    }

    #[test]
    fn topology() {
        let t = |n: &str| csi::TopologyRequirement {
            requisite: vec![node_topology(n)],
            preferred: vec![],
        };
        assert!(topology_allows(None, "a"));
        assert!(topology_allows(Some(&t("a")), "a"));
        assert!(!topology_allows(Some(&t("b")), "a"));
    }
}
