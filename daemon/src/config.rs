//! Daemon configuration: what `coreblkd` serves and how its reactors run, from the command
//! line (a config file comes with later issues). Validates everything up front so bad input
//! is a clear error at start-up, never a panic later. Never opens devices itself, except to
//! create the default sparse file.

use std::path::{Path, PathBuf};

use crate::reactor::{parse_core_list, ReactorConfig};

/// Command-line arguments of `coreblkd` (serve mode).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Cores to run reactors on, e.g. "0", "0-3", "0,2". Default: core 0.
    #[arg(long, default_value = "0")]
    pub cores: String,
    /// Device or file to serve. Default: a sparse file under --var-dir.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// State directory (default device file, later: metadata and sockets).
    #[arg(long, default_value = "./var")]
    pub var_dir: PathBuf,
    /// Size of the default sparse device file, e.g. 4G, 512M.
    #[arg(long, default_value = "4G")]
    pub default_size: String,
    /// Microseconds a reactor polls without work before it sleeps.
    #[arg(long, default_value_t = ReactorConfig::default().idle_threshold_us)]
    pub idle_threshold_us: u64,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    pub no_pin: bool,
}

/// Where the daemon's device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSource {
    /// Named with `--device`.
    Configured(PathBuf),
    /// Nothing configured: a sparse file, created if missing.
    DefaultFile {
        /// Its path.
        path: PathBuf,
        /// Its size when created.
        size_bytes: u64,
    },
}

/// Validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Reactor cores.
    pub cores: Vec<usize>,
    /// Reactor settings.
    pub reactor: ReactorConfig,
    /// The device to serve.
    pub device: DeviceSource,
}

/// Name of the default device file inside the state directory.
pub const DEFAULT_DEVICE_FILE: &str = "default-pool.img";

impl Config {
    /// Validates `args`.
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let cores = parse_core_list(&args.cores)?;
        let device = match args.device {
            Some(p) => DeviceSource::Configured(p),
            None => DeviceSource::DefaultFile {
                path: args.var_dir.join(DEFAULT_DEVICE_FILE),
                size_bytes: parse_size(&args.default_size)?,
            },
        };
        Ok(Self {
            cores,
            reactor: ReactorConfig {
                idle_threshold_us: args.idle_threshold_us,
                pin: !args.no_pin,
                ..ReactorConfig::default()
            },
            device,
        })
    }
}

/// Parses a size like `4G`, `512M`, `64k` or `1048576` (binary units).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => anyhow::bail!("invalid size {s:?}: unknown unit {c:?} (use k, M, G or T)"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!(
            "invalid size {s:?}: expected a number with an optional k/M/G/T suffix, e.g. 4G"
        )
    })?;
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("invalid size {s:?}: too large"))
}

/// Creates `path` as a sparse file of `size_bytes` if it does not exist; returns whether it
/// was created. An existing file is left as it is (it may hold a pool).
pub fn ensure_sparse_file(path: &Path, size_bytes: u64) -> anyhow::Result<bool> {
    use anyhow::Context;
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating default device file {}", path.display()))?;
    f.set_len(size_bytes).with_context(|| {
        format!(
            "sizing default device file {} to {size_bytes} bytes",
            path.display()
        )
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_size("4G").expect("ok"), 4 << 30);
        assert_eq!(parse_size("512m").expect("ok"), 512 << 20);
        assert_eq!(parse_size("4096").expect("ok"), 4096);
        for bad in ["", "G", "4X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_file_is_created_sparse_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("var").join(DEFAULT_DEVICE_FILE);
        assert!(ensure_sparse_file(&p, 1 << 30).expect("create"));
        assert!(!ensure_sparse_file(&p, 1 << 20).expect("exists"));
        let meta = std::fs::metadata(&p).expect("meta");
        assert_eq!(meta.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) < 64, "sparse");
    }
}
