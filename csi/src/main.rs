//! `coreblk-csi`: flags, logging, then the CSI server (`coreblk_csi::server::serve`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use coreblk_csi::identity::VERSION;
use coreblk_csi::ids::validate_node_id;
use coreblk_csi::server::{self, Config, Mode};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    /// One per node beside coreblkd: Identity, Controller and Node over the local daemon.
    Node,
    /// The stateless central instance for csi-resizer: Identity and controller
    /// capabilities only (no EXPAND_VOLUME), no daemon.
    Controller,
}

/// The coreblk CSI driver (csi.coreblk.io).
#[derive(Debug, Parser)]
#[command(name = "coreblk-csi", version = VERSION)]
struct Args {
    /// The CSI socket to serve: unix:///path or a path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// The coreblkd API socket.
    #[arg(
        long,
        env = "COREBLK_SOCKET",
        default_value = "/run/coreblk/coreblkd.sock"
    )]
    daemon_socket: PathBuf,
    /// This node's id and topology value (the Kubernetes node name; required in node mode).
    #[arg(long, env = "NODE_NAME")]
    node_id: Option<String>,
    /// Which services this instance serves.
    #[arg(long, value_enum, default_value = "node")]
    mode: ModeArg,
    /// The kubelet's directory: the node service mounts only under it.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Memory (KiB) of the argon2id key derivation when a LUKS2 volume is formatted
    /// (cryptsetup --pbkdf-memory); unset: cryptsetup's default (up to 1 GiB). Lower
    /// values make opening cheaper for an attacker too: only for slow test machines.
    #[arg(long, env = "COREBLK_CSI_LUKS_PBKDF_MEMORY_KIB", value_parser = clap::value_parser!(u32).range(32..=4_194_304))]
    luks_pbkdf_memory_kib: Option<u32>,
    /// Target time (ms) of the key derivation when a LUKS2 volume is formatted
    /// (cryptsetup --iter-time); unset: cryptsetup's default (2000).
    #[arg(long, env = "COREBLK_CSI_LUKS_ITER_TIME_MS", value_parser = clap::value_parser!(u32).range(1..=60_000))]
    luks_iter_time_ms: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COREBLK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mode = match args.mode {
        ModeArg::Node => Mode::Node,
        ModeArg::Controller => Mode::Controller,
    };
    let node_id = match (&args.node_id, mode) {
        (Some(id), _) => {
            validate_node_id(id).map_err(anyhow::Error::msg)?;
            id.clone()
        }
        (None, Mode::Node) => anyhow::bail!(
            "--node-id is required in node mode: give the Kubernetes node name (in a pod, \
             NODE_NAME from the downward API spec.nodeName)"
        ),
        (None, Mode::Controller) => String::new(),
    };
    anyhow::ensure!(
        args.kubelet_dir.is_absolute(),
        "--kubelet-dir {} is not an absolute path",
        args.kubelet_dir.display()
    );
    coreblk_csi::crypt::configure(coreblk_csi::crypt::Settings {
        pbkdf_memory_kib: args.luks_pbkdf_memory_kib,
        iter_time_ms: args.luks_iter_time_ms,
    });
    let config = Config {
        endpoint: server::socket_path(&args.endpoint)?,
        daemon_socket: args.daemon_socket,
        node_id,
        mode,
        kubelet_dir: args.kubelet_dir,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(server::serve(config))?;
    Ok(())
}
