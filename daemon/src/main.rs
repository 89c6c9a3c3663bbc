//! `coreblkd`: the node daemon. Starts one reactor per core and serves the configured
//! device — with none configured, a sparse file under `./var` — until SIGTERM or SIGINT.
//! `coreblkd devices ...` lists and claims devices offline (no daemon needed).
//!
//! Later issues add the pool, the gRPC API and the exports on top of what starts here.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::config::{Config, DeviceSource};
use coreblk_daemon::reactor::{Reactor, ReactorSet};

#[derive(Debug, Parser)]
#[command(
    name = "coreblkd",
    version,
    about = "coreblk node daemon: thin volumes on local NVMe, exported as ublk devices"
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
    let cfg = Config::from_args(args)?;
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
        "reactors started"
    );
    // Every reactor opens its channel to the device now, so a broken device fails start-up.
    for r in reactors.remotes() {
        let d = Arc::clone(&dev);
        r.call(move |rx: &Reactor| d.open_channel(rx).map(|ch| ch.close(rx)))?
            .with_context(|| format!("reactor {} cannot open {}", r.id(), dev.name()))?;
    }
    let geo = dev.geometry();
    tracing::info!(
        device = dev.name(),
        size_bytes = geo.size_bytes,
        logical_block_size = geo.logical_block_size,
        "serving; stop with SIGTERM"
    );
    let sig = wait_for_stop(&signals);
    tracing::info!(signal = sig, "stopping");
    reactors.shutdown();
    tracing::info!("stopped");
    Ok(())
}
