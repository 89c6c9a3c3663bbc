//! `coreblkd`: the node daemon. Starts one reactor per core and serves the configured
//! device — with none configured, a sparse file under `./var` — plus the gRPC API on a
//! unix socket and `/metrics`, until SIGTERM or SIGINT. `coreblkd devices ...` lists and
//! claims devices offline (no daemon needed); `coreblkd verify --device PATH`
//! checks a pool offline (`lvs::verify`).
//!
//! Start-up order: configuration (and a check that the API socket's directory is
//! usable), device, reactors, then the API socket (so bad input fails before anything is
//! bound), the metrics listener, the claimed devices (the default device among them,
//! claimed on the first start), the control plane, which then imports the pools (creating
//! the default pool on the default device the first time) while it already answers.
//! Stop order: the control plane (no new calls, in-flight calls finish, pools flushed,
//! socket removed), then the reactors, then the claims are let go.
//!
//! ublk exports: the kernel's offer is asked once before the control plane starts; at a
//! stop the control plane drains every export's queues before the pools stop, and the
//! devices stay for the next daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coreblk_daemon::bdev::sysfs::SysRoot;
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::config::{Config, DeviceSource};
use coreblk_daemon::control::claims::Claims;
use coreblk_daemon::control::exports::{self, Exports};
use coreblk_daemon::control::node::{self, NodeFacts};
use coreblk_daemon::control::server::{ControlPlane, ControlPlaneConfig, ReactorHandle, Shared};
use coreblk_daemon::control::socket::ApiSocket;
use coreblk_daemon::control::store::Store;
use coreblk_daemon::reactor::{Reactor, ReactorSet};

#[derive(Debug, Parser)]
#[command(
    name = "coreblkd",
    version,
    about = "coreblk node daemon: thin volumes on local NVMe, exported as ublk devices",
    long_about = "coreblk node daemon: thin volumes on local NVMe, exported as ublk devices.\n\n\
        With no subcommand, serves: reactors on --cores, the device (or the default sparse \
        file), the gRPC API on --socket and Prometheus metrics on --metrics-address, until \
        SIGTERM or SIGINT. Settings come from flags, then the --config TOML file, then the \
        defaults shown (daemon/coreblkd.example.toml documents every key). Drive the \
        running daemon with the `coreblk` CLI.",
    after_help = "Logs go to stderr; set COREBLK_LOG=debug (or any tracing filter) for more."
)]
struct Cli {
    #[command(flatten)]
    run: coreblk_daemon::config::RunArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List and claim devices (offline: talks to the kernel, not to a daemon).
    Devices {
        #[command(subcommand)]
        cmd: DevicesCmd,
    },
    /// Check a pool offline (fsck): every metadata structure and cross-reference. Reads
    /// only; run it while no daemon holds the device. Exit status: 0 clean (warnings
    /// allowed), 1 damaged, 2 could not check.
    Verify {
        /// The pool's device or file.
        #[arg(long)]
        device: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    /// List candidate devices and whether each can be claimed (and why not).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also consider these paths (files, or dm/loop/md devices, which are skipped
        /// unless named).
        paths: Vec<PathBuf>,
    },
    /// Claim a device (or file) for a new pool: refuses devices in use or holding data.
    Claim {
        /// The device or file.
        path: PathBuf,
        /// Overwrite a filesystem/RAID/LVM signature or another pool's label (never a
        /// mounted or held device).
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let res = match cli.cmd {
        Some(Cmd::Devices { cmd }) => devices(cmd),
        Some(Cmd::Verify { device, json }) => return verify(&device, json),
        None => serve(cli.run),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coreblkd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COREBLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: logs in files and journals stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn devices(cmd: DevicesCmd) -> anyhow::Result<()> {
    match cmd {
        DevicesCmd::List { json, paths } => coreblk_daemon::bdev::claim::cli_list(json, paths),
        DevicesCmd::Claim { path, force, json } => {
            coreblk_daemon::bdev::claim::cli_claim(&path, force, json)
        }
    }
}

/// `coreblkd verify`: exit 0 clean, 1 damaged, 2 could not check.
fn verify(device: &std::path::Path, json: bool) -> std::process::ExitCode {
    let report = match coreblk_daemon::lvs::verify::verify_offline(device) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coreblkd verify: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("coreblkd verify: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    } else {
        print!("{report}");
    }
    match (report.incomplete.is_some(), report.is_clean()) {
        (true, _) => std::process::ExitCode::from(2),
        (false, true) => std::process::ExitCode::SUCCESS,
        (false, false) => std::process::ExitCode::from(1),
    }
}

/// Enters the daemon's own mount namespace unless configured off (`sandbox`).
fn enter_mount_namespace(enabled: bool) -> anyhow::Result<()> {
    use coreblk_daemon::sandbox::{enter_own_mount_namespace, Isolation};
    if !enabled {
        tracing::warn!("mount_namespace is off: the daemon shares the caller's mount namespace");
        return Ok(());
    }
    match enter_own_mount_namespace().context(
        "entering the daemon's own mount namespace (mount_namespace = false turns this off)",
    )? {
        Isolation::Isolated { detached } => tracing::info!(
            detached = ?detached,
            "in a mount namespace of its own; inherited ublk mounts detached there"
        ),
        Isolation::NotPermitted => tracing::warn!(
            "no CAP_SYS_ADMIN: staying in the caller's mount namespace (ublk devices cannot \
             be created either)"
        ),
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in every thread started after) and
/// returns the set, to be waited for with `sigwait`.
fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: all three calls get a pointer to the live local `set`.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    anyhow::ensure!(rc == 0, "cannot block SIGTERM/SIGINT: errno {rc}");
    Ok(set)
}

fn wait_for_stop(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: `set` is an initialised signal set and `sig` a live local.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return sig;
        }
    }
}

fn serve(args: coreblk_daemon::config::RunArgs) -> anyhow::Result<()> {
    let start_time = SystemTime::now();
    let cfg = Config::from_args(args)?;
    // First, while this is the only thread: a mount namespace of its own (DESIGN §5).
    enter_mount_namespace(cfg.mount_namespace)?;
    // Fail early, before anything starts, when the API socket cannot be created at all.
    coreblk_daemon::control::socket::check_dir(&cfg.socket)?;
    let signals = block_stop_signals()?;
    let dev: Arc<dyn BlockDevice> = match &cfg.device {
        DeviceSource::Configured(path) => {
            tracing::info!(device = %path.display(), "serving configured device");
            Arc::new(
                UringDevice::open(path)
                    .with_context(|| format!("opening device {}", path.display()))?,
            )
        }
        DeviceSource::DefaultFile { path, size_bytes } => {
            let created = coreblk_daemon::config::ensure_sparse_file(path, *size_bytes)?;
            tracing::info!(
                file = %path.display(),
                size_bytes,
                created,
                "no device configured: using a sparse file as the default pool device (configure one with --device)"
            );
            Arc::new(
                UringDevice::open(path)
                    .with_context(|| format!("opening default device file {}", path.display()))?,
            )
        }
    };
    let mut reactors = ReactorSet::start(&cfg.cores, &cfg.reactor).context("starting reactors")?;
    tracing::info!(
        cores = %coreblk_daemon::reactor::format_cores(&cfg.cores),
        idle_threshold_us = cfg.reactor.idle_threshold_us,
        busy_poll_limit_us = cfg.reactor.busy_poll_limit_us,
        poll_max_gap_us = cfg.reactor.poll_max_gap_us,
        "reactors started"
    );
    // Every reactor opens its channel to the device now, so a broken device fails start-up.
    for r in reactors.remotes() {
        let d = Arc::clone(&dev);
        r.call(move |rx: &Reactor| d.open_channel(rx).map(|ch| ch.close(rx)))?
            .with_context(|| format!("reactor {} cannot open {}", r.id(), dev.name()))?;
    }

    let socket = ApiSocket::bind(&cfg.socket)?;
    if socket.replaced_stale() {
        tracing::warn!(socket = %cfg.socket.display(), "replaced a stale API socket left by a daemon that is gone");
    }
    let metrics = cfg
        .metrics_address
        .map(|addr| {
            std::net::TcpListener::bind(addr).with_context(|| {
                format!(
                    "cannot serve metrics on {addr} (in use? choose another --metrics-address, \
                     or \"off\")"
                )
            })
        })
        .transpose()?;
    let metrics_address = metrics
        .as_ref()
        .map(std::net::TcpListener::local_addr)
        .transpose()?;
    let claims = Arc::new(
        Claims::open(&cfg.var_dir, SysRoot::host()).context("taking back the claimed devices")?,
    );
    // The default pool's device is claimed like any other (its label finds it again after
    // a restart); claiming it again while held is a no-op.
    let default_path = std::path::absolute(cfg.device.path())
        .with_context(|| format!("resolving {}", cfg.device.path().display()))?;
    let default_claim = claims.claim(&default_path, false).with_context(|| {
        format!(
            "cannot claim {} for the default pool (`coreblkd devices list {}` says why;              claim it with `coreblkd devices claim --force`, or configure another --device)",
            default_path.display(),
            default_path.display()
        )
    })?;
    let store = Arc::new(
        Store::open(
            &cfg.var_dir,
            Arc::clone(&claims),
            reactors.remotes().to_vec(),
            Some(default_claim.device_uuid),
        )
        .context("reading the record of pools")?,
    );
    let handles: Vec<ReactorHandle> = cfg
        .cores
        .iter()
        .zip(reactors.stats())
        .enumerate()
        .map(|(id, (&core, stats))| ReactorHandle {
            id,
            core,
            stats: Arc::clone(stats),
        })
        .collect();
    let facts = NodeFacts {
        node_id: node::resolve_node_id(cfg.node_id.as_deref()),
        hostname: node::hostname(),
        version: env!("CARGO_PKG_VERSION"),
        kernel_release: node::kernel_release(),
        reactors: handles.iter().map(|h| (h.id, h.core)).collect(),
        reactors_pinned: cfg.reactor.pin,
        served_device: cfg.device.path().to_path_buf(),
        socket: cfg.socket.clone(),
        metrics_address,
        start_time,
        io_buffer_bytes_per_reactor: (cfg.reactor.buf_chunk_bytes * cfg.reactor.buf_count) as u64,
    };
    tracing::info!(node_id = %facts.node_id, "node identity");
    let kernel = exports::probe_kernel(cfg.export.path);
    match &kernel {
        Ok(k) => tracing::info!(
            features = %k.features.names().join(","),
            path = %k.choice.path,
            reason = %k.choice.reason,
            "ublk exports available"
        ),
        Err(why) => tracing::warn!(reason = %why, "ublk exports unavailable on this node"),
    }
    let exports = Arc::new(Exports::new(
        cfg.export.clone(),
        kernel,
        reactors.remotes().to_vec(),
        Arc::clone(&store),
    ));
    let shared = Arc::new(Shared::new(
        Arc::clone(&claims),
        store,
        facts,
        handles,
        exports,
    ));
    let control = ControlPlane::start(ControlPlaneConfig {
        socket,
        metrics,
        shared,
    })?;
    let geo = dev.geometry();
    tracing::info!(
        device = dev.name(),
        size_bytes = geo.size_bytes,
        logical_block_size = geo.logical_block_size,
        socket = %cfg.socket.display(),
        metrics = %metrics_address.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
        "serving; stop with SIGTERM"
    );
    let sig = wait_for_stop(&signals);
    tracing::info!(signal = sig, "stopping");
    control.stop();
    reactors.shutdown();
    drop(claims);
    tracing::info!("stopped");
    Ok(())
}
