//! `coreblk-powerloss`: the end-to-end power-loss test on the real `uring` backend (issue
//! 10), a test tool (feature `testing`, never in release builds). `scripts/vm/guest/
//! devices-test` runs `workload` in the VM on a dm-log-writes target and `extract`s the log;
//! `scripts/test` then runs `check` on the host, which replays the log and checks the store's
//! power-loss contract at every FLUSH, FUA and mark.
//!
//! - `workload.rs`: the guest side (pool on the device, seeded workload, model, marks);
//! - `lwlog.rs`: the dm-log-writes log format;
//! - `check.rs`: replay and the checks (those of `daemon/src/lvs/volume/tests/crash.rs`);
//! - `model.rs`: what the two sides share.

mod check;
mod lwlog;
mod model;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "coreblk power-loss test on dm-log-writes (test tool)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Formats a pool on DEVICE and runs the seeded workload (destroys DEVICE's contents).
    Workload {
        /// Block device to format (the dm-log-writes target).
        #[arg(long)]
        device: PathBuf,
        /// Directory for model.json and steps.jsonl.
        #[arg(long)]
        out: PathBuf,
        /// Workload seed (default: $COREBLK_SEED, else a fixed one).
        #[arg(long)]
        seed: Option<u64>,
        /// Number of workload steps.
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// dm-log-writes target (dm name) to put a mark into after every step.
        #[arg(long)]
        mark: Option<String>,
    },
    /// Copies the used part of a dm-log-writes log device into FILE (sparse).
    Extract {
        /// The log device.
        #[arg(long)]
        log_device: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Puts mark NAME into the dm-log-writes target TARGET and waits until the log on
    /// LOG_DEVICE holds it (drains the target's logging queue before it is removed).
    Settle {
        /// dm-log-writes target (dm name).
        #[arg(long)]
        target: String,
        /// Its log device.
        #[arg(long)]
        log_device: PathBuf,
        /// Mark to put and wait for.
        #[arg(long, default_value = check::SETTLED)]
        mark: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Replays LOG and checks every FLUSH, FUA and mark point against MODEL.
    Check {
        /// The log (a log device or an extracted copy).
        #[arg(long)]
        log: PathBuf,
        /// model.json written by `workload`.
        #[arg(long)]
        model: PathBuf,
        /// Fail unless at least this many points were checked.
        #[arg(long, default_value_t = 1)]
        min_points: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Workload {
            device,
            out,
            seed,
            steps,
            mark,
        } => {
            let args = workload::Args {
                device,
                out,
                seed: seed.unwrap_or_else(|| coreblk_daemon::testing::seed_or(0x1093_c4a5)),
                steps,
                mark_target: mark,
            };
            workload::validate(&args).and_then(|()| workload::run(&args))
        }
        Cmd::Extract { log_device, out } => lwlog::extract(&log_device, &out).map(|log| {
            println!(
                "extracted {} entries ({} KiB) of {} to {}",
                log.entries.len(),
                log.end >> 10,
                log_device.display(),
                out.display()
            );
        }),
        Cmd::Settle {
            target,
            log_device,
            mark,
            timeout,
        } => workload::mark(&target, &mark)
            .and_then(|()| {
                lwlog::settle(&log_device, &mark, std::time::Duration::from_secs(timeout))
            })
            .map(|log| {
                println!(
                    "dm-log-writes target {target}: the log on {} holds mark {mark} ({} entries)",
                    log_device.display(),
                    log.entries.len()
                );
            }),
        Cmd::Check {
            log,
            model,
            min_points,
        } => check::run(&log, &model).and_then(|points| {
            anyhow::ensure!(
                points >= min_points,
                "only {points} replay points (expected at least {min_points})"
            );
            Ok(())
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coreblk-powerloss: FAIL: {e:#}");
            ExitCode::FAILURE
        }
    }
}
