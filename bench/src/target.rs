//! `--target` specs: parsing `null`, `malloc:SIZE`, `uring:PATH`, `nvme:DEVICE`,
//! `lvol:PATH[,cluster=SIZE]` and `lvol:malloc:SIZE[,cluster=SIZE]` into a [`TargetSpec`],
//! and opening the raw (non-lvol) ones. Parsing never touches a device, so every error a
//! spec can have is reported before anything is opened or formatted.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use coreblk_daemon::bdev::mem::{MallocDevice, NullDevice};
use coreblk_daemon::bdev::nvme::{NvmeDevice, NvmeOptions};
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::config::parse_size;
use coreblk_daemon::lvs::pool::DEFAULT_CLUSTER_BYTES;

/// Size of a `malloc` target (raw or under a pool) when the spec names none.
const DEFAULT_MALLOC_BYTES: u64 = 1 << 30;
/// Size of the `null` target.
const NULL_BYTES: u64 = 1 << 40;

/// What a `lvol:` pool lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LvolBacking {
    /// A fresh `MallocDevice` of this many bytes.
    Malloc {
        /// Device size.
        size_bytes: u64,
    },
    /// A file or block device, opened through io_uring with O_DIRECT and reformatted.
    Path(PathBuf),
}

/// A parsed `--target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// `null`.
    Null,
    /// `malloc[:SIZE]`.
    Malloc {
        /// Device size.
        size_bytes: u64,
    },
    /// `uring:PATH`.
    Uring(PathBuf),
    /// `nvme:DEVICE`.
    Nvme(PathBuf),
    /// `lvol:PATH[,cluster=SIZE]` or `lvol:malloc[:SIZE][,cluster=SIZE]`: a pool formatted on
    /// the backing device and one thin volume on it.
    Lvol {
        /// The pool's device.
        backing: LvolBacking,
        /// Cluster size of the new pool.
        cluster_bytes: u32,
    },
}

impl TargetSpec {
    /// Parses a `--target` value.
    pub fn parse(target: &str) -> anyhow::Result<Self> {
        let (kind, arg) = target.split_once(':').unwrap_or((target, ""));
        Ok(match kind {
            "null" => Self::Null,
            "malloc" => Self::Malloc {
                size_bytes: malloc_size(arg)?,
            },
            "uring" => {
                if arg.is_empty() {
                    bail!("--target uring needs a path: uring:/path/to/file-or-device");
                }
                Self::Uring(PathBuf::from(arg))
            }
            "nvme" => {
                if arg.is_empty() {
                    bail!("--target nvme needs a namespace: nvme:/dev/nvme0n1");
                }
                Self::Nvme(PathBuf::from(arg))
            }
            "lvol" => parse_lvol(arg)?,
            other => bail!(
                "unknown target {other:?}: use null, malloc:SIZE, uring:PATH, nvme:DEVICE, \
                 lvol:PATH[,cluster=SIZE] or lvol:malloc:SIZE[,cluster=SIZE]"
            ),
        })
    }

    /// Whether this is a thin volume on a pool.
    pub fn is_lvol(&self) -> bool {
        matches!(self, Self::Lvol { .. })
    }

    /// Opens a raw target (everything but `lvol`, which [`crate::lvol`] sets up).
    pub fn open_raw(&self, passthrough: bool) -> anyhow::Result<Arc<dyn BlockDevice>> {
        if passthrough && !matches!(self, Self::Nvme(_)) {
            bail!("--passthrough needs an nvme:/dev/nvmeXnY target");
        }
        Ok(match self {
            Self::Null => Arc::new(NullDevice::new(NULL_BYTES)),
            Self::Malloc { size_bytes } => {
                Arc::new(MallocDevice::new(*size_bytes).context("allocating the malloc target")?)
            }
            Self::Uring(path) => Arc::new(UringDevice::open(path)?),
            Self::Nvme(path) => Arc::new(NvmeDevice::open_with(path, NvmeOptions { passthrough })?),
            Self::Lvol { .. } => bail!("lvol targets are set up by the pool, not opened raw"),
        })
    }
}

fn malloc_size(arg: &str) -> anyhow::Result<u64> {
    if arg.is_empty() {
        Ok(DEFAULT_MALLOC_BYTES)
    } else {
        parse_size(arg)
    }
}

/// `PATH[,cluster=SIZE]` or `malloc[:SIZE][,cluster=SIZE]`. Options follow the first comma,
/// so a path cannot contain one.
fn parse_lvol(arg: &str) -> anyhow::Result<TargetSpec> {
    let mut parts = arg.split(',');
    let location = parts.next().unwrap_or_default();
    let mut cluster_bytes = DEFAULT_CLUSTER_BYTES;
    for opt in parts {
        match opt.split_once('=') {
            Some(("cluster", v)) => {
                let bytes = parse_size(v).with_context(|| format!("lvol option cluster={v}"))?;
                cluster_bytes = u32::try_from(bytes)
                    .ok()
                    .filter(|b| b.is_power_of_two() && (4096..=4 << 20).contains(b))
                    .with_context(|| {
                        format!(
                            "lvol option cluster={v}: the cluster size must be a power of two \
                             between 4k and 4M"
                        )
                    })?;
            }
            _ => bail!("unknown lvol option {opt:?}: the only option is cluster=SIZE"),
        }
    }
    let backing = match location.split_once(':') {
        Some(("malloc", size)) => LvolBacking::Malloc {
            size_bytes: malloc_size(size)?,
        },
        None if location == "malloc" => LvolBacking::Malloc {
            size_bytes: DEFAULT_MALLOC_BYTES,
        },
        _ if location.is_empty() => bail!(
            "--target lvol needs a path or malloc: lvol:/path/to/file-or-device[,cluster=SIZE] \
             or lvol:malloc:SIZE[,cluster=SIZE]"
        ),
        _ => LvolBacking::Path(PathBuf::from(location)),
    };
    Ok(TargetSpec::Lvol {
        backing,
        cluster_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lvol(backing: LvolBacking, cluster_bytes: u32) -> TargetSpec {
        TargetSpec::Lvol {
            backing,
            cluster_bytes,
        }
    }

    #[test]
    fn parses_every_kind() {
        let cases = [
            ("null", TargetSpec::Null),
            (
                "malloc",
                TargetSpec::Malloc {
                    size_bytes: 1 << 30,
                },
            ),
            (
                "malloc:64M",
                TargetSpec::Malloc {
                    size_bytes: 64 << 20,
                },
            ),
            ("uring:/tmp/x", TargetSpec::Uring("/tmp/x".into())),
            ("nvme:/dev/nvme0n1", TargetSpec::Nvme("/dev/nvme0n1".into())),
            (
                "lvol:/var/tmp/f.img",
                lvol(LvolBacking::Path("/var/tmp/f.img".into()), 64 << 10),
            ),
            (
                "lvol:/dev/nvme0n1,cluster=1M",
                lvol(LvolBacking::Path("/dev/nvme0n1".into()), 1 << 20),
            ),
            (
                "lvol:malloc:64M",
                lvol(
                    LvolBacking::Malloc {
                        size_bytes: 64 << 20,
                    },
                    64 << 10,
                ),
            ),
            (
                "lvol:malloc:2G,cluster=4k",
                lvol(
                    LvolBacking::Malloc {
                        size_bytes: 2 << 30,
                    },
                    4096,
                ),
            ),
            (
                "lvol:malloc",
                lvol(
                    LvolBacking::Malloc {
                        size_bytes: 1 << 30,
                    },
                    64 << 10,
                ),
            ),
            (
                "lvol:malloc,cluster=4M",
                lvol(
                    LvolBacking::Malloc {
                        size_bytes: 1 << 30,
                    },
                    4 << 20,
                ),
            ),
        ];
        for (s, want) in cases {
            let got = TargetSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
            assert_eq!(got, want, "{s}");
            assert_eq!(got.is_lvol(), s.starts_with("lvol"), "{s}");
        }
    }

    #[test]
    fn refuses_bad_specs_with_a_reason() {
        for (s, needle) in [
            ("lvol:", "needs a path or malloc"),
            ("lvol", "needs a path or malloc"),
            ("lvol:,cluster=64k", "needs a path or malloc"),
            ("lvol:/f,cluster=3k", "power of two"),
            ("lvol:/f,cluster=2k", "power of two"),
            ("lvol:/f,cluster=8M", "power of two"),
            ("lvol:/f,cluster=huge", "invalid size"),
            ("lvol:/f,cluster=", "invalid size"),
            ("lvol:malloc:64M,cluster=100000", "power of two"),
            ("lvol:/f,clutser=64k", "unknown lvol option"),
            ("lvol:/f,64k", "unknown lvol option"),
            ("lvol:malloc:lots", "invalid size"),
            ("uring:", "needs a path"),
            ("nvme:", "needs a namespace"),
            ("bogus:x", "unknown target"),
        ] {
            match TargetSpec::parse(s) {
                Ok(t) => panic!("{s}: accepted as {t:?}"),
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(msg.contains(needle), "{s}: expected {needle:?} in {msg}");
                }
            }
        }
    }
}
