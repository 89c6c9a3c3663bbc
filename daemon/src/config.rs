//! Daemon configuration: what `coreblkd` serves, where it listens and how its reactors run,
//! from an optional TOML file (`--config`) and the command line; a flag given on the
//! command line wins over the file, the file over the built-in default. Every key, with
//! its default, is documented in `daemon/coreblkd.example.toml` (keep the two in step:
//! a test parses the example).
//!
//! Validates everything up front so bad input is a clear error at start-up, never a panic
//! later. Never opens devices itself, except to create the default sparse file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::reactor::{parse_core_list, ReactorConfig};

/// Where the API socket lives unless configured.
pub const DEFAULT_SOCKET: &str = "/run/coreblk/coreblkd.sock";
/// Where `/metrics` is served unless configured.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9544";
/// The state directory unless configured.
pub const DEFAULT_VAR_DIR: &str = "./var";
/// The default sparse device file's size unless configured.
pub const DEFAULT_DEVICE_SIZE: &str = "4G";
/// Reactor cores unless configured.
pub const DEFAULT_CORES: &str = "0";

/// Command-line arguments of `coreblkd` (serve mode). Options left out fall back to the
/// config file, then to the defaults named in their help.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML configuration file (every key: daemon/coreblkd.example.toml); flags win over it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Cores to run reactors on, e.g. "0", "0-3", "0,2" [default: 0].
    #[arg(long)]
    pub cores: Option<String>,
    /// Device or file of the default pool, claimed at start (the pool `default` is created
    /// on it the first time) [default: a sparse file under --var-dir].
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// State directory: the default device file and the records of claimed devices and
    /// pools [default: ./var].
    #[arg(long)]
    pub var_dir: Option<PathBuf>,
    /// Size of the default sparse device file, e.g. 4G, 512M [default: 4G].
    #[arg(long)]
    pub default_size: Option<String>,
    /// Microseconds a reactor polls without work before it sleeps [default: 200].
    #[arg(long)]
    pub idle_threshold_us: Option<u64>,
    /// Microseconds a reactor polls for the completion of fast IO (reads, writes) in flight
    /// before it sleeps anyway; 0: it sleeps whenever it finds no work [default: 2000].
    #[arg(long)]
    pub busy_poll_limit_us: Option<u64>,
    /// Hybrid polling: poll for work only while it has lately come within this many
    /// microseconds; longer waits sleep in the kernel at once; 0: always poll
    /// [default: 30].
    #[arg(long)]
    pub poll_max_gap_us: Option<u64>,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Unix socket of the gRPC API (created mode 0600) [default: /run/coreblk/coreblkd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint, host:port (port 0: any free port;
    /// "off": none) [default: 127.0.0.1:9544].
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,
    /// This node's id in the API [default: /etc/machine-id, else the host name].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Stay in the caller's mount namespace (tests only: by default the daemon enters its
    /// own and detaches inherited ublk mounts there, DESIGN §5).
    #[arg(long)]
    pub no_mount_namespace: bool,
}

/// The config file: the same settings as the flags, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--cores`.
    pub cores: Option<String>,
    /// `--device`.
    pub device: Option<PathBuf>,
    /// `--var-dir`.
    pub var_dir: Option<PathBuf>,
    /// `--default-size`.
    pub default_size: Option<String>,
    /// `--idle-threshold-us`.
    pub idle_threshold_us: Option<u64>,
    /// `--busy-poll-limit-us`.
    pub busy_poll_limit_us: Option<u64>,
    /// `--poll-max-gap-us`.
    pub poll_max_gap_us: Option<u64>,
    /// The opposite of `--no-pin`.
    pub pin: Option<bool>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--metrics-address`.
    pub metrics_address: Option<String>,
    /// `--node-id`.
    pub node_id: Option<String>,
    /// `[export]`: ublk exports.
    pub export: Option<ExportFileConfig>,
    /// The opposite of `--no-mount-namespace`.
    pub mount_namespace: Option<bool>,
}

/// The `[export]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFileConfig {
    /// Data path: `auto`, `zero-copy` or `copy`.
    pub path: Option<String>,
    /// Tags per ublk queue.
    pub queue_depth: Option<u32>,
    /// Largest request the kernel sends, e.g. "512k".
    pub max_io_bytes: Option<String>,
    /// Most exports this node serves at once (reported for CSI's max_volumes_per_node).
    pub max_exports: Option<u32>,
}

/// Validated export settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSettings {
    /// Data path preference.
    pub path: coreblk_ublk::PathPref,
    /// Tags per queue (1..=4096).
    pub queue_depth: u16,
    /// Largest request (4 KiB..=1 MiB, whole 4 KiB pages).
    pub max_io_bytes: u32,
    /// Most exports at once (1..=[`MAX_EXPORTS_LIMIT`]).
    pub max_exports: u32,
}

/// Default of `export.max_exports`. What an export costs does not grow with its IO: the
/// copy path's IO buffers are a fixed pool per reactor shared by every export (reported by
/// `node info`), and zero copy uses the request's own pages; per export there is only
/// per-tag state and the kernel's request table (queue depth x queues). 256 leaves the
/// kernel's ublk device ids and a node's file descriptors plenty of room.
pub const DEFAULT_MAX_EXPORTS: u32 = 256;
/// Largest `export.max_exports`.
pub const MAX_EXPORTS_LIMIT: u32 = 4096;

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            path: coreblk_ublk::PathPref::Auto,
            queue_depth: crate::export::DEFAULT_QUEUE_DEPTH,
            max_io_bytes: crate::export::DEFAULT_MAX_IO_BYTES,
            max_exports: DEFAULT_MAX_EXPORTS,
        }
    }
}

impl ExportSettings {
    /// Validates the `[export]` table.
    ///
    /// # Errors
    /// A value is out of range (the message gives the range).
    pub fn from_file(f: Option<ExportFileConfig>) -> anyhow::Result<Self> {
        let mut s = Self::default();
        let Some(f) = f else { return Ok(s) };
        if let Some(p) = f.path {
            s.path = match p.as_str() {
                "auto" => coreblk_ublk::PathPref::Auto,
                "zero-copy" => coreblk_ublk::PathPref::ZeroCopy,
                "copy" => coreblk_ublk::PathPref::Copy,
                other => anyhow::bail!(
                    "invalid export.path {other:?}: expected \"auto\", \"zero-copy\" or \"copy\""
                ),
            };
        }
        if let Some(d) = f.queue_depth {
            s.queue_depth = u16::try_from(d)
                .ok()
                .filter(|d| (1..=4096).contains(d))
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid export.queue_depth {d}: expected 1 to 4096")
                })?;
        }
        if let Some(m) = f.max_io_bytes {
            let n = parse_size(&m)?;
            s.max_io_bytes = u32::try_from(n)
                .ok()
                .filter(|n| (4096..=1 << 20).contains(n) && n % 4096 == 0)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "invalid export.max_io_bytes {m:?}: expected whole 4 KiB pages from 4k to 1M"
                    )
                })?;
        }
        if let Some(n) = f.max_exports {
            if !(1..=MAX_EXPORTS_LIMIT).contains(&n) {
                anyhow::bail!("invalid export.max_exports {n}: expected 1 to {MAX_EXPORTS_LIMIT}");
            }
            s.max_exports = n;
        }
        Ok(s)
    }
}

impl FileConfig {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not valid TOML with known keys.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| {
            format!(
                "config file {} (every key is documented in coreblkd.example.toml)",
                path.display()
            )
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// Invalid TOML, an unknown key or a value of the wrong type.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }
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

impl DeviceSource {
    /// The path served.
    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            Self::Configured(p) | Self::DefaultFile { path: p, .. } => p,
        }
    }
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
    /// State directory.
    pub var_dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// The metrics endpoint; `None`: disabled.
    pub metrics_address: Option<SocketAddr>,
    /// Configured node id (`None`: derive one).
    pub node_id: Option<String>,
    /// ublk exports.
    pub export: ExportSettings,
    /// Enter a mount namespace of its own at start (`crate::sandbox`).
    pub mount_namespace: bool,
}

/// Name of the default device file inside the state directory.
pub const DEFAULT_DEVICE_FILE: &str = "default-pool.img";

impl Config {
    /// Validates `args`, reading the config file they name first.
    ///
    /// # Errors
    /// The config file is unreadable or invalid, or a value is.
    pub fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Flags over file over defaults.
    ///
    /// # Errors
    /// A value is invalid.
    pub fn merge(args: RunArgs, file: FileConfig) -> anyhow::Result<Self> {
        let cores_text = args
            .cores
            .or(file.cores)
            .unwrap_or_else(|| DEFAULT_CORES.to_owned());
        let cores = parse_core_list(&cores_text)?;
        let var_dir = args
            .var_dir
            .or(file.var_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_VAR_DIR));
        let device = match args.device.or(file.device) {
            Some(p) => DeviceSource::Configured(p),
            None => {
                let size = args
                    .default_size
                    .or(file.default_size)
                    .unwrap_or_else(|| DEFAULT_DEVICE_SIZE.to_owned());
                DeviceSource::DefaultFile {
                    path: var_dir.join(DEFAULT_DEVICE_FILE),
                    size_bytes: parse_size(&size)?,
                }
            }
        };
        let defaults = ReactorConfig::default();
        let pin = !args.no_pin && file.pin.unwrap_or(defaults.pin);
        let socket = args
            .socket
            .or(file.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        anyhow::ensure!(
            !socket.as_os_str().is_empty(),
            "invalid --socket: the path is empty"
        );
        let metrics_text = args
            .metrics_address
            .or(file.metrics_address)
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.to_owned());
        let metrics_address = parse_metrics_address(&metrics_text)?;
        let export = ExportSettings::from_file(file.export)?;
        let node_id = args.node_id.or(file.node_id);
        if let Some(id) = &node_id {
            validate_node_id(id)?;
        }
        Ok(Self {
            cores,
            reactor: ReactorConfig {
                idle_threshold_us: args
                    .idle_threshold_us
                    .or(file.idle_threshold_us)
                    .unwrap_or(defaults.idle_threshold_us),
                busy_poll_limit_us: args
                    .busy_poll_limit_us
                    .or(file.busy_poll_limit_us)
                    .unwrap_or(defaults.busy_poll_limit_us),
                poll_max_gap_us: args
                    .poll_max_gap_us
                    .or(file.poll_max_gap_us)
                    .unwrap_or(defaults.poll_max_gap_us),
                pin,
                // One fixed-buffer slot per tag of every export a reactor may serve (zero
                // copy); bounded by io_uring's table limit in the reactor.
                kernel_buf_slots: export
                    .max_exports
                    .saturating_mul(u32::from(export.queue_depth)),
                ..defaults
            },
            device,
            var_dir,
            socket,
            metrics_address,
            node_id,
            export,
            mount_namespace: !args.no_mount_namespace && file.mount_namespace.unwrap_or(true),
        })
    }
}

/// `host:port`, or `off`/empty for no metrics endpoint.
fn parse_metrics_address(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| {
        anyhow::anyhow!(
            "invalid --metrics-address {text:?}: expected an IP address and port such as \
             127.0.0.1:9544 or [::1]:9544 (port 0: any free port), or \"off\""
        )
    })
}

/// Node ids: what Kubernetes accepts as a topology label value (≤ 63 characters of
/// `A-Z a-z 0-9 . _ -`, alphanumeric at both ends).
fn validate_node_id(id: &str) -> anyhow::Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let ok_ends = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    anyhow::ensure!(
        !id.is_empty() && id.len() <= 63 && ok_chars && ok_ends,
        "invalid --node-id {id:?}: a node id is 1 to 63 characters from A-Z a-z 0-9 . _ - \
         starting and ending with a letter or digit (it becomes a Kubernetes topology label)"
    );
    Ok(())
}

/// Parses a size in bytes: a whole number with an optional binary unit — `k`/`K`/`Ki`/
/// `KiB`, `M`/`Mi`/`MiB`, `G`/`Gi`/`GiB`, `T`/`Ti`/`TiB`, `P`/`Pi`/`PiB`, or `B` — e.g.
/// `4G`, `512M`, `10GiB`, `64k`, `1048576`. Decimal units (`GB`) are refused as
/// ambiguous.
///
/// # Errors
/// Not a number, an unknown or ambiguous unit, or more than `u64::MAX` bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim_start());
    if num.is_empty() {
        anyhow::bail!("invalid size {s:?}: expected a whole number with an optional unit, e.g. 4G, 512MiB or 1048576");
    }
    let shift: u32 = match unit {
        "" | "B" | "b" => 0,
        "k" | "K" | "Ki" | "KiB" => 10,
        "m" | "M" | "Mi" | "MiB" => 20,
        "g" | "G" | "Gi" | "GiB" => 30,
        "t" | "T" | "Ti" | "TiB" => 40,
        "p" | "P" | "Pi" | "PiB" => 50,
        "kB" | "KB" | "MB" | "GB" | "TB" | "PB" => anyhow::bail!(
            "invalid size {s:?}: {unit} is ambiguous (decimal or binary?); use {}iB, binary units \
             (1 GiB = 2^30 bytes)",
            &unit[..1].to_ascii_uppercase()
        ),
        other => anyhow::bail!(
            "invalid size {s:?}: unknown unit {other:?} (use k, M, G, T or P, binary: 1G = 2^30 bytes)"
        ),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid size {s:?}: too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow::anyhow!("invalid size {s:?}: too large"))
}

/// Creates `path` as a sparse file of `size_bytes` if it does not exist; returns whether it
/// was created. An existing file is left as it is (it may hold a pool).
///
/// # Errors
/// The directory or the file cannot be created or sized.
pub fn ensure_sparse_file(path: &Path, size_bytes: u64) -> anyhow::Result<bool> {
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
        assert_eq!(parse_size("10GiB").expect("ok"), 10 << 30);
        assert_eq!(parse_size("10 GiB").expect("ok"), 10 << 30);
        assert_eq!(parse_size("512Mi").expect("ok"), 512 << 20);
        assert_eq!(parse_size("64k").expect("ok"), 64 << 10);
        assert_eq!(parse_size("4096B").expect("ok"), 4096);
        assert_eq!(parse_size("1T").expect("ok"), 1 << 40);
        for bad in [
            "",
            "G",
            "4X",
            "-1",
            "99999999999T",
            "1.5G",
            "99999999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let e = parse_size("10GB").expect_err("ambiguous").to_string();
        assert!(e.contains("use GiB"), "{e}");
    }

    #[test]
    fn export_settings_validate() {
        let d = Config::merge(RunArgs::default(), FileConfig::default()).expect("ok");
        assert_eq!(d.export, ExportSettings::default());
        assert_eq!(d.export.queue_depth, 128);
        assert_eq!(d.export.max_io_bytes, 512 << 10);
        let f = FileConfig::parse(
            "[export]\npath = \"copy\"\nqueue_depth = 64\nmax_io_bytes = \"256k\"\nmax_exports = 40\n",
        )
        .expect("parse");
        let s = ExportSettings::from_file(f.export).expect("valid");
        assert_eq!(s.path, coreblk_ublk::PathPref::Copy);
        assert_eq!((s.queue_depth, s.max_io_bytes), (64, 256 << 10));
        assert_eq!(s.max_exports, 40);
        assert_eq!(d.export.max_exports, DEFAULT_MAX_EXPORTS);
        for bad in [
            "path = \"fast\"",
            "queue_depth = 0",
            "queue_depth = 5000",
            "max_io_bytes = \"2M\"",
            "max_io_bytes = \"6000\"",
            "max_exports = 0",
            "max_exports = 5000",
        ] {
            let f = FileConfig::parse(&format!("[export]\n{bad}\n")).expect("parse");
            let e = ExportSettings::from_file(f.export)
                .expect_err(bad)
                .to_string();
            assert!(e.contains("export."), "{bad}: {e}");
        }
        assert!(FileConfig::parse("[export]\nspeed = 1\n").is_err());
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

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let cfg = Config::merge(RunArgs::default(), FileConfig::default()).expect("ok");
        assert_eq!(cfg.cores, [0]);
        assert_eq!(cfg.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(
            cfg.metrics_address,
            Some(DEFAULT_METRICS_ADDRESS.parse().expect("addr"))
        );
        assert_eq!(
            cfg.device,
            DeviceSource::DefaultFile {
                path: Path::new(DEFAULT_VAR_DIR).join(DEFAULT_DEVICE_FILE),
                size_bytes: 4 << 30
            }
        );
        assert!(cfg.reactor.pin);
        assert_eq!(
            cfg.reactor.idle_threshold_us,
            ReactorConfig::default().idle_threshold_us
        );
        assert_eq!(cfg.node_id, None);
        assert!(cfg.mount_namespace);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = FileConfig::parse(
            r#"
            cores = "0"
            var_dir = "/srv/coreblk"
            default_size = "1G"
            socket = "/tmp/file.sock"
            metrics_address = "off"
            pin = false
            idle_threshold_us = 7
            busy_poll_limit_us = 5
            poll_max_gap_us = 11
            node_id = "node-a"
            mount_namespace = false
            "#,
        )
        .expect("parse");
        let args = RunArgs {
            socket: Some("/tmp/flag.sock".into()),
            idle_threshold_us: Some(9),
            ..RunArgs::default()
        };
        let cfg = Config::merge(args, file).expect("ok");
        assert_eq!(cfg.socket, Path::new("/tmp/flag.sock"));
        assert_eq!(cfg.reactor.idle_threshold_us, 9);
        assert_eq!(cfg.reactor.busy_poll_limit_us, 5);
        assert_eq!(cfg.reactor.poll_max_gap_us, 11);
        assert_eq!(cfg.metrics_address, None);
        assert!(!cfg.reactor.pin);
        assert_eq!(cfg.node_id.as_deref(), Some("node-a"));
        assert!(!cfg.mount_namespace);
        assert_eq!(
            cfg.device,
            DeviceSource::DefaultFile {
                path: Path::new("/srv/coreblk").join(DEFAULT_DEVICE_FILE),
                size_bytes: 1 << 30
            }
        );
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let e = FileConfig::parse("sockett = \"/x\"").expect_err("unknown key");
        assert!(format!("{e:#}").contains("sockett"), "{e:#}");
        let e = FileConfig::parse("cores = 3").expect_err("wrong type");
        assert!(format!("{e:#}").contains("cores"), "{e:#}");
        let bad_addr = RunArgs {
            metrics_address: Some("localhost".into()),
            ..RunArgs::default()
        };
        let e = Config::merge(bad_addr, FileConfig::default()).expect_err("addr");
        assert!(e.to_string().contains("--metrics-address"), "{e}");
        let bad_node = RunArgs {
            node_id: Some("a b".into()),
            ..RunArgs::default()
        };
        let e = Config::merge(bad_node, FileConfig::default()).expect_err("node");
        assert!(e.to_string().contains("--node-id"), "{e}");
    }

    #[test]
    fn the_example_file_parses_and_names_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("coreblkd.example.toml");
        let text = std::fs::read_to_string(&path).expect("example config");
        // Every key appears commented out with its default; uncommented, it must parse.
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                // Table headers (`[export]`) too: the keys after them belong to them.
                (l.starts_with('[') && l.ends_with(']'))
                    || l.split_once(" = ").is_some_and(|(key, _)| {
                        !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let file = FileConfig::parse(&uncommented).expect("example keys parse");
        let cfg = Config::merge(RunArgs::default(), file).expect("example values are valid");
        let defaults = Config::merge(RunArgs::default(), FileConfig::default()).expect("ok");
        assert_eq!(cfg.socket, defaults.socket);
        assert_eq!(cfg.metrics_address, defaults.metrics_address);
        assert_eq!(cfg.cores, defaults.cores);
        assert_eq!(cfg.reactor.pin, defaults.reactor.pin);
        assert_eq!(
            cfg.reactor.idle_threshold_us,
            defaults.reactor.idle_threshold_us
        );
        assert_eq!(
            cfg.reactor.busy_poll_limit_us,
            defaults.reactor.busy_poll_limit_us
        );
        for key in [
            "cores",
            "device",
            "var_dir",
            "default_size",
            "idle_threshold_us",
            "busy_poll_limit_us",
            "pin",
            "socket",
            "metrics_address",
            "node_id",
            "mount_namespace",
        ] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} is not documented"
            );
        }
    }
}
