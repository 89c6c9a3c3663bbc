//! `coreblk`: the command-line client of coreblkd's gRPC API (`coreblk.v1`, DESIGN §6).
//!
//! Owns: the command tree (clap), argument parsing (sizes such as `10GiB`, `512M` or
//! bytes; `key=value` labels), the calls, and their output — human tables with binary
//! units by default, `-o json` for scripts. Errors print the server's message and exit 1.
//!
//! Must never: touch devices, pools or kernel state itself; everything is an API call on
//! the daemon's socket (`--socket`, `COREBLK_SOCKET`). The one planned exception is
//! `export cleanup` (tearing down ublk devices left without a daemon), wired by the ublk
//! issue.
//!
//! Start reading at [`run`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use coreblk_daemon::bdev::claim::human_size;
use coreblk_daemon::config::{parse_size, DEFAULT_SOCKET};
use coreblk_daemon::control::client::{connect, DEFAULT_SOCKET_ENV};
use coreblk_daemon::control::MAX_IMAGE_MESSAGE_BYTES;
use coreblk_proto::v1 as pb;
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(
    name = "coreblk",
    version,
    about = "Drive coreblkd, the coreblk node daemon, through its API",
    after_help = "Sizes accept binary units: 4096, 64k, 512M, 10G, 10GiB (1G = 2^30 bytes).\n\
                  Objects are named by name or UUID. Exit status: 0 ok, 1 the call failed \
                  (the daemon's message is printed), 2 bad usage."
)]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = DEFAULT_SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Block devices: discover, claim, release.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Pools on claimed devices.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Thin volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Snapshots of volumes.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Create a volume as a clone of a snapshot (or, with --from-volume, of a volume).
    Clone {
        /// The snapshot to clone (or the volume, with --from-volume).
        source: String,
        /// The new volume's name.
        name: String,
        /// SOURCE is a volume, not a snapshot.
        #[arg(long)]
        from_volume: bool,
        /// Size of the clone (default: the source's size).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Labels, key=value (repeatable).
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Volume content as a byte stream: import from a file, export to a file.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Export a volume as a ublk block device (or list / clean up exports).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Export {
        #[command(subcommand)]
        cmd: Option<ExportCmd>,
        /// The volume to export.
        #[arg(required = true)]
        volume: Option<String>,
        /// Re-create the export after a node reboot.
        #[arg(long)]
        persistent: bool,
        /// Export read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Tear down a volume's export (refused while the device is open, unless --force).
    Unexport {
        /// The volume.
        volume: String,
        /// Tear it down even while mounted or held: its users' IO fails.
        #[arg(long)]
        force: bool,
    },
    /// This node: identity, reactors, devices.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// This node at a glance: a capacity bar per pool, the volumes by size with their
    /// snapshots, and the reactors (the terminal twin of the status page at `/` of the
    /// metrics address).
    Status,
    /// Print a shell completion script (e.g. `coreblk completions bash > /etc/bash_completion.d/coreblk`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// List candidate devices and whether each can be claimed (and why not).
    List {
        /// Also examine these paths (files; dm/loop/md devices, which the scan skips).
        paths: Vec<PathBuf>,
    },
    /// Claim a device (or file) for this daemon; it stays held until released.
    Claim {
        /// The device or file.
        path: PathBuf,
        /// Overwrite a filesystem/RAID/LVM signature, a partition table or another pool's
        /// label (never a mounted or held device).
        #[arg(long)]
        force: bool,
    },
    /// Release a claimed device.
    Release {
        /// Its path, or its device UUID.
        device: String,
        /// Also erase its coreblk label.
        #[arg(long)]
        wipe_label: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCmd {
    /// Create a pool on claimed devices.
    Create {
        /// The pool's name.
        name: String,
        /// A claimed device (path or device UUID); repeatable.
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
        /// Cluster size, a power of two from 4K to 4M (default 64K).
        #[arg(long, value_parser = size_arg)]
        cluster_size: Option<u64>,
        /// Overcommit limit: provisioned <= LIMIT x capacity (default 1.0).
        #[arg(long)]
        overcommit: Option<f64>,
        /// Labels, key=value (repeatable).
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// List pools.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one pool.
    Get {
        /// Name or UUID.
        pool: String,
    },
    /// Destroy a pool.
    Destroy {
        /// Name or UUID.
        pool: String,
        /// Destroy it with its volumes and snapshots.
        #[arg(long)]
        force: bool,
        /// Erase the devices' labels too.
        #[arg(long)]
        release_devices: bool,
    },
    /// Check a pool's metadata while it serves (exit status 1 when damaged).
    Verify {
        /// Name or UUID.
        pool: String,
        /// Also check data (refused: the store keeps no data checksums yet).
        #[arg(long)]
        check_data: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct PageArgs {
    /// Entries per page (0: the server's default).
    #[arg(long, default_value_t = 0)]
    page_size: u32,
    /// Continue from this page token (printed after a partial list).
    #[arg(long, default_value = "")]
    page_token: String,
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume, empty or (with --from) as a clone of a snapshot or volume.
    Create {
        /// The volume's name.
        name: String,
        /// The pool (name or UUID); a clone lives in its source's pool.
        #[arg(long)]
        pool: Option<String>,
        /// Size, e.g. 10GiB (a clone: default the source's size).
        #[arg(long, value_parser = size_arg, required_unless_present = "from")]
        size: Option<u64>,
        /// Clone this snapshot (or, if no snapshot has that name or UUID, this volume).
        #[arg(long, value_name = "SNAPSHOT|VOLUME")]
        from: Option<String>,
        /// Reserve the whole size now.
        #[arg(long)]
        thick: bool,
        /// Labels, key=value (repeatable).
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// List volumes.
    List {
        /// Only this pool's volumes.
        #[arg(long)]
        pool: Option<String>,
        /// Only volumes with this label, key=value (repeatable: all must match).
        #[arg(long = "selector", short = 'l', value_parser = label_arg)]
        selector: Vec<(String, String)>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one volume.
    Get {
        /// Name or UUID.
        volume: String,
    },
    /// Delete a volume (its snapshots and clones stay).
    Delete {
        /// Name or UUID.
        volume: String,
    },
    /// Grow a volume.
    Resize {
        /// Name or UUID.
        volume: String,
        /// The new size.
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// Set or remove a volume's labels.
    Label {
        /// Name or UUID.
        volume: String,
        /// Labels to set, key=value.
        #[arg(value_parser = label_arg)]
        set: Vec<(String, String)>,
        /// Label keys to remove (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Return a volume to the content of one of its snapshots.
    Rollback {
        /// Name or UUID.
        volume: String,
        /// The snapshot (name or UUID).
        snapshot: String,
    },
    /// Copy what a clone shares with its origin so it stands alone.
    Inflate {
        /// Name or UUID.
        volume: String,
    },
    /// Change a volume's QoS limits, online (exported or not): the limits given replace
    /// those of the same name, the others stay (with --clear: the others are removed).
    /// 0 is unlimited.
    SetQos {
        /// Name or UUID.
        volume: String,
        #[command(flatten)]
        qos: QosArgs,
        /// Remove every limit not given here.
        #[arg(long)]
        clear: bool,
    },
}

/// QoS limits on the command line (0: unlimited).
#[derive(Debug, Clone, Default, clap::Args)]
struct QosArgs {
    /// Reads + writes per second.
    #[arg(long, value_name = "IOPS")]
    max_iops: Option<u64>,
    /// Reads per second.
    #[arg(long, value_name = "IOPS")]
    max_read_iops: Option<u64>,
    /// Writes (and discards) per second.
    #[arg(long, value_name = "IOPS")]
    max_write_iops: Option<u64>,
    /// Bytes read + written per second, e.g. 100MiB.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_bw: Option<u64>,
    /// Bytes read per second.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_read_bw: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    max_write_bw: Option<u64>,
    /// Burst allowance: milliseconds of each limit's rate saved while idle (0: 100 ms).
    #[arg(long, value_name = "MS")]
    burst_ms: Option<u32>,
}

impl QosArgs {
    fn is_empty(&self) -> bool {
        self.max_iops.is_none()
            && self.max_read_iops.is_none()
            && self.max_write_iops.is_none()
            && self.max_bw.is_none()
            && self.max_read_bw.is_none()
            && self.max_write_bw.is_none()
            && self.burst_ms.is_none()
    }

    /// `base` with the limits given here replaced.
    fn apply(&self, base: pb::VolumeQos) -> pb::VolumeQos {
        pb::VolumeQos {
            max_iops: self.max_iops.unwrap_or(base.max_iops),
            max_read_iops: self.max_read_iops.unwrap_or(base.max_read_iops),
            max_write_iops: self.max_write_iops.unwrap_or(base.max_write_iops),
            max_bytes_per_sec: self.max_bw.unwrap_or(base.max_bytes_per_sec),
            max_read_bytes_per_sec: self.max_read_bw.unwrap_or(base.max_read_bytes_per_sec),
            max_write_bytes_per_sec: self.max_write_bw.unwrap_or(base.max_write_bytes_per_sec),
            burst_ms: self.burst_ms.unwrap_or(base.burst_ms),
        }
    }
}

/// A volume's QoS limits for people: `unlimited`, or the limits set.
fn qos_text(q: Option<&pb::VolumeQos>) -> String {
    let Some(q) = q else {
        return "unlimited".to_owned();
    };
    let mut parts = Vec::new();
    for (name, v) in [
        ("iops", q.max_iops),
        ("read iops", q.max_read_iops),
        ("write iops", q.max_write_iops),
    ] {
        if v > 0 {
            parts.push(format!("{name} {v}/s"));
        }
    }
    for (name, v) in [
        ("bw", q.max_bytes_per_sec),
        ("read bw", q.max_read_bytes_per_sec),
        ("write bw", q.max_write_bytes_per_sec),
    ] {
        if v > 0 {
            parts.push(format!("{name} {}/s", human_size(v)));
        }
    }
    if parts.is_empty() {
        return "unlimited".to_owned();
    }
    let burst = if q.burst_ms == 0 { 100 } else { q.burst_ms };
    parts.push(format!("burst {burst} ms"));
    parts.join(", ")
}

fn qos_json(q: Option<&pb::VolumeQos>) -> serde_json::Value {
    match q {
        None => serde_json::Value::Null,
        Some(q) => json!({
            "max_iops": q.max_iops, "max_read_iops": q.max_read_iops,
            "max_write_iops": q.max_write_iops, "max_bytes_per_sec": q.max_bytes_per_sec,
            "max_read_bytes_per_sec": q.max_read_bytes_per_sec,
            "max_write_bytes_per_sec": q.max_write_bytes_per_sec, "burst_ms": q.burst_ms,
        }),
    }
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Snapshot a volume; with --also, several volumes at the same instant.
    Create {
        /// The volume (name or UUID).
        volume: String,
        /// The snapshot's name.
        name: String,
        /// Another VOLUME=NAME to snapshot atomically with the first (repeatable).
        #[arg(long, value_parser = label_arg)]
        also: Vec<(String, String)>,
        /// Labels, key=value (repeatable).
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// List snapshots.
    List {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only this pool's snapshots.
        #[arg(long)]
        pool: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one snapshot.
    Get {
        /// Name or UUID.
        snapshot: String,
    },
    /// Delete a snapshot (volumes restored from it stay).
    Delete {
        /// Name or UUID.
        snapshot: String,
    },
    /// The byte ranges that differ between two snapshots.
    Diff {
        /// The older snapshot.
        base: String,
        /// The newer snapshot.
        target: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Create a volume from a raw image file ("-": standard input). Zero blocks are not sent.
    Import {
        /// The image file.
        file: PathBuf,
        /// The pool.
        #[arg(long, default_value = "default")]
        pool: String,
        /// The new volume's name.
        #[arg(long, visible_alias = "volume")]
        name: String,
        /// The volume's size (default: the file's size, rounded up to 4 KiB).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
        /// Continue an interrupted import of this volume.
        #[arg(long, conflicts_with = "overwrite")]
        resume: bool,
        /// Write the image over the existing volume NAME (zero blocks zero it too).
        #[arg(long)]
        overwrite: bool,
        /// Labels, key=value (repeatable).
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Write a volume's or snapshot's content to a (sparse) file.
    Export {
        /// The output file.
        file: PathBuf,
        /// Export this volume.
        #[arg(
            long,
            conflicts_with = "snapshot",
            required_unless_present = "snapshot"
        )]
        volume: Option<String>,
        /// Export this snapshot.
        #[arg(long)]
        snapshot: Option<String>,
        /// Only what changed since this older snapshot (applied onto FILE's content).
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ExportCmd {
    /// List exports.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Tear down ublk devices left behind without a daemon (works with no daemon).
    Cleanup,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Node id, version, kernel, reactors, claimed devices.
    Info,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn label_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn labels(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// The daemon answered with an error.
    Status(tonic::Status),
    /// Anything else (connection, files).
    Other(anyhow::Error),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::Other(e.into())
    }
}

type CmdResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "coreblk",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coreblk: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Status(s)) => {
            eprintln!("coreblk: {} ({})", s.message(), code_name(s.code()));
            ExitCode::FAILURE
        }
        Err(Failure::Other(e)) => {
            eprintln!("coreblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    // "Unimplemented" → "UNIMPLEMENTED", "NotFound" → "NOT_FOUND": the names users search for.
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Runs one command against the daemon.
async fn run(cli: Cli) -> CmdResult {
    let out = cli.output;
    if let Cmd::Export {
        cmd: Some(ExportCmd::Cleanup),
        ..
    } = cli.cmd
    {
        return export_cleanup(&cli.socket, out).await;
    }
    let channel = connect(&cli.socket)
        .await
        .map_err(|e| Failure::Other(e.into()))?;
    match cli.cmd {
        Cmd::Device { cmd } => device(channel, out, cmd).await,
        Cmd::Pool { cmd } => pool(channel, out, cmd).await,
        Cmd::Volume { cmd } => volume(channel, out, cmd).await,
        Cmd::Snapshot { cmd } => snapshot(channel, out, cmd).await,
        Cmd::Clone {
            source,
            name,
            from_volume,
            size,
            labels: l,
        } => {
            let source = if from_volume {
                pb::create_volume_request::Source::SourceVolume(source)
            } else {
                pb::create_volume_request::Source::SourceSnapshot(source)
            };
            let v = pb::volumes_client::VolumesClient::new(channel)
                .create_volume(pb::CreateVolumeRequest {
                    qos: None,
                    pool: String::new(),
                    name,
                    size_bytes: size.unwrap_or(0),
                    thick: false,
                    labels: labels(l),
                    source: Some(source),
                })
                .await?
                .into_inner();
            print_volumes(out, &[v], "");
            Ok(())
        }
        Cmd::Image { cmd } => image(channel, out, cmd).await,
        Cmd::Export {
            cmd,
            volume,
            persistent,
            read_only,
        } => {
            let mut c = pb::exports_client::ExportsClient::new(channel);
            match (cmd, volume) {
                (Some(ExportCmd::List { page }), _) => {
                    let r = c
                        .list_exports(pb::ListExportsRequest {
                            page_size: page.page_size,
                            page_token: page.page_token,
                        })
                        .await?
                        .into_inner();
                    print_exports(out, &r.exports, &r.next_page_token);
                }
                (Some(ExportCmd::Cleanup), _) => unreachable!("handled before connecting"),
                (None, Some(volume)) => {
                    let e = c
                        .export_volume(pb::ExportVolumeRequest {
                            volume,
                            persistent,
                            read_only,
                        })
                        .await?
                        .into_inner();
                    // The device path alone, so scripts can use it; -o json: the Export.
                    match out {
                        Output::Table => println!("{}", e.device_path),
                        Output::Json => print_json(&export_json(&e)),
                    }
                }
                (None, None) => {
                    return Err(anyhow::anyhow!("name the volume to export").into());
                }
            }
            Ok(())
        }
        Cmd::Unexport { volume, force } => {
            pb::exports_client::ExportsClient::new(channel)
                .unexport_volume(pb::UnexportVolumeRequest {
                    volume: volume.clone(),
                    force,
                })
                .await?;
            done(out, &format!("unexported {volume}"));
            Ok(())
        }
        Cmd::Node { cmd: NodeCmd::Info } => {
            let info = pb::node_client::NodeClient::new(channel)
                .get_node_info(pb::GetNodeInfoRequest {})
                .await?
                .into_inner();
            print_node_info(out, &info);
            Ok(())
        }
        Cmd::Status => status(channel, out).await,
        Cmd::Completions { .. } => Ok(()),
    }
}

fn done(out: Output, message: &str) {
    match out {
        Output::Table => println!("{message}"),
        Output::Json => println!("{}", json!({ "ok": true, "message": message })),
    }
}

/// Makes a path from the command line absolute (the daemon runs elsewhere).
fn absolute(p: &Path) -> Result<String, Failure> {
    let abs = std::path::absolute(p)
        .map_err(|e| anyhow::anyhow!("cannot make {} absolute: {e}", p.display()))?;
    Ok(abs.display().to_string())
}

async fn device(channel: Channel, out: Output, cmd: DeviceCmd) -> CmdResult {
    let mut c = pb::devices_client::DevicesClient::new(channel);
    match cmd {
        DeviceCmd::List { paths } => {
            let paths = paths
                .iter()
                .map(|p| absolute(p))
                .collect::<Result<Vec<_>, _>>()?;
            let r = c
                .list_devices(pb::ListDevicesRequest { paths })
                .await?
                .into_inner();
            match out {
                Output::Json => {
                    print_json(&Value::Array(r.devices.iter().map(device_json).collect()))
                }
                Output::Table => {
                    let mut t =
                        Table::new(&["PATH", "SIZE", "MODEL", "SERIAL", "CLAIMABLE", "REASON"]);
                    for d in &r.devices {
                        let claimable = if d.claimed {
                            "claimed"
                        } else if d.claimable {
                            "yes"
                        } else if d.force_allowed {
                            "force"
                        } else {
                            "no"
                        };
                        let reason = if d.claimed {
                            format!("held by this daemon (pool {})", d.label_pool_uuid)
                        } else {
                            join_or_dash(d.reasons.iter().map(|r| r.message.clone()))
                        };
                        t.row(vec![
                            d.path.clone(),
                            human_size(d.size_bytes),
                            or_dash(&d.model),
                            or_dash(&d.serial),
                            claimable.to_owned(),
                            reason,
                        ]);
                    }
                    print!("{}", t.render());
                }
            }
        }
        DeviceCmd::Claim { path, force } => {
            let path = absolute(&path)?;
            let d = c
                .claim_device(pb::ClaimDeviceRequest { path, force })
                .await?
                .into_inner();
            match out {
                Output::Json => print_json(&claimed_json(&d)),
                Output::Table => {
                    println!(
                        "claimed {} ({}) for pool {}: device {}{}",
                        d.path,
                        human_size(d.size_bytes),
                        d.pool_uuid,
                        d.device_uuid,
                        if d.newly_labelled {
                            ""
                        } else {
                            " (already ours)"
                        }
                    );
                    for r in &d.overridden {
                        println!("  overridden with --force: {}", r.message);
                    }
                    for s in &d.residual_signatures {
                        println!("  warning: libblkid still finds a {} signature", s.kind);
                    }
                }
            }
        }
        DeviceCmd::Release { device, wipe_label } => {
            let device = if device.contains('/') {
                absolute(Path::new(&device))?
            } else {
                device
            };
            let r = c
                .release_device(pb::ReleaseDeviceRequest { device, wipe_label })
                .await?
                .into_inner();
            let d = r.device.unwrap_or_default();
            match out {
                Output::Json => print_json(&claimed_json(&d)),
                Output::Table => println!(
                    "released {} (device {}){}",
                    d.path,
                    d.device_uuid,
                    if wipe_label { ", label erased" } else { "" }
                ),
            }
        }
    }
    Ok(())
}

async fn pool(channel: Channel, out: Output, cmd: PoolCmd) -> CmdResult {
    let mut c = pb::pools_client::PoolsClient::new(channel);
    match cmd {
        PoolCmd::Create {
            name,
            devices,
            cluster_size,
            overcommit,
            labels: l,
        } => {
            let p = c
                .create_pool(pb::CreatePoolRequest {
                    name,
                    devices,
                    cluster_size_bytes: cluster_size.unwrap_or(0),
                    overcommit_limit: overcommit,
                    labels: labels(l),
                })
                .await?
                .into_inner();
            print_pools(out, &[p], "");
        }
        PoolCmd::List { page } => {
            let r = c
                .list_pools(pb::ListPoolsRequest {
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await?
                .into_inner();
            print_pools(out, &r.pools, &r.next_page_token);
        }
        PoolCmd::Get { pool } => {
            let p = c.get_pool(pb::GetPoolRequest { pool }).await?.into_inner();
            match out {
                Output::Json => print_pools(out, &[p], ""),
                Output::Table => print_fields(&pool_fields(&p)),
            }
        }
        PoolCmd::Destroy {
            pool,
            force,
            release_devices,
        } => {
            c.destroy_pool(pb::DestroyPoolRequest {
                pool: pool.clone(),
                force,
                release_devices,
            })
            .await?;
            done(out, &format!("destroyed pool {pool}"));
        }
        PoolCmd::Verify { pool, check_data } => {
            let r = c
                .verify_pool(pb::VerifyPoolRequest { pool, check_data })
                .await?
                .into_inner();
            match out {
                Output::Json => print_json(&json!({
                    "ok": r.ok, "problems": r.problems, "checked_bytes": r.checked_bytes,
                })),
                Output::Table => {
                    println!(
                        "{} ({} checked)",
                        if r.ok { "ok" } else { "PROBLEMS FOUND" },
                        human_size(r.checked_bytes)
                    );
                    for p in &r.problems {
                        println!("  {p}");
                    }
                }
            }
            if !r.ok {
                return Err(anyhow::anyhow!("the pool has {} problem(s)", r.problems.len()).into());
            }
        }
    }
    Ok(())
}

/// What `--from NAME` names: a snapshot if one has that name or UUID, else a volume.
async fn clone_source(
    channel: Channel,
    from: String,
) -> Result<pb::create_volume_request::Source, Failure> {
    let found = pb::snapshots_client::SnapshotsClient::new(channel)
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot: from.clone(),
        })
        .await;
    match found {
        Ok(_) => Ok(pb::create_volume_request::Source::SourceSnapshot(from)),
        Err(s) if s.code() == tonic::Code::NotFound => {
            Ok(pb::create_volume_request::Source::SourceVolume(from))
        }
        Err(s) => Err(s.into()),
    }
}

async fn volume(channel: Channel, out: Output, cmd: VolumeCmd) -> CmdResult {
    let mut c = pb::volumes_client::VolumesClient::new(channel.clone());
    let v = match cmd {
        VolumeCmd::Create {
            name,
            pool,
            size,
            from,
            thick,
            labels: l,
            qos,
        } => {
            let source = match from {
                None => None,
                Some(from) => Some(clone_source(channel.clone(), from).await?),
            };
            let pool = match (pool, &source) {
                (Some(p), _) => p,
                (None, Some(_)) => String::new(),
                (None, None) => "default".to_owned(),
            };
            c.create_volume(pb::CreateVolumeRequest {
                qos: (!qos.is_empty()).then(|| qos.apply(pb::VolumeQos::default())),
                pool,
                name,
                size_bytes: size.unwrap_or(0),
                thick,
                labels: labels(l),
                source,
            })
            .await?
            .into_inner()
        }
        VolumeCmd::List {
            pool,
            selector,
            page,
        } => {
            let r = c
                .list_volumes(pb::ListVolumesRequest {
                    pool: pool.unwrap_or_default(),
                    label_selector: labels(selector),
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await?
                .into_inner();
            print_volumes(out, &r.volumes, &r.next_page_token);
            return Ok(());
        }
        VolumeCmd::Get { volume } => {
            let v = c
                .get_volume(pb::GetVolumeRequest { volume })
                .await?
                .into_inner();
            match out {
                Output::Json => print_volumes(out, &[v], ""),
                Output::Table => print_fields(&volume_fields(&v)),
            }
            return Ok(());
        }
        VolumeCmd::Delete { volume } => {
            c.delete_volume(pb::DeleteVolumeRequest {
                volume: volume.clone(),
            })
            .await?;
            done(out, &format!("deleted volume {volume}"));
            return Ok(());
        }
        VolumeCmd::Resize { volume, size } => {
            let r = c
                .resize_volume(pb::ResizeVolumeRequest {
                    volume,
                    size_bytes: size,
                })
                .await?;
            // An exported volume whose device could not grow with it says why.
            if let Some(note) = r.metadata().get("coreblk-note") {
                eprintln!("note: {}", note.to_str().unwrap_or("(unreadable)"));
            }
            r.into_inner()
        }
        VolumeCmd::Label {
            volume,
            set,
            remove,
        } => c
            .set_volume_labels(pb::SetVolumeLabelsRequest {
                volume,
                set: labels(set),
                remove,
            })
            .await?
            .into_inner(),
        VolumeCmd::Rollback { volume, snapshot } => c
            .rollback_volume(pb::RollbackVolumeRequest { volume, snapshot })
            .await?
            .into_inner(),
        VolumeCmd::Inflate { volume } => c
            .inflate_volume(pb::InflateVolumeRequest { volume })
            .await?
            .into_inner(),
        VolumeCmd::SetQos { volume, qos, clear } => {
            if qos.is_empty() && !clear {
                return Err(anyhow::anyhow!(
                    "give at least one limit (--max-iops, --max-read-iops, --max-write-iops, --max-bw, --max-read-bw, --max-write-bw, --burst-ms; 0 = unlimited) or --clear"
                )
                .into());
            }
            let base = if clear {
                pb::VolumeQos::default()
            } else {
                c.get_volume(pb::GetVolumeRequest {
                    volume: volume.clone(),
                })
                .await?
                .into_inner()
                .qos
                .unwrap_or_default()
            };
            c.set_volume_qos(pb::SetVolumeQosRequest {
                volume,
                qos: Some(qos.apply(base)),
            })
            .await?
            .into_inner()
        }
    };
    print_volumes(out, &[v], "");
    Ok(())
}

async fn snapshot(channel: Channel, out: Output, cmd: SnapshotCmd) -> CmdResult {
    let mut c = pb::snapshots_client::SnapshotsClient::new(channel);
    match cmd {
        SnapshotCmd::Create {
            volume,
            name,
            also,
            labels: l,
        } => {
            if also.is_empty() {
                let s = c
                    .create_snapshot(pb::CreateSnapshotRequest {
                        volume,
                        name,
                        labels: labels(l),
                    })
                    .await?
                    .into_inner();
                print_snapshots(out, &[s], "");
            } else {
                let members = std::iter::once((volume, name))
                    .chain(also)
                    .map(|(volume, name)| pb::create_snapshot_group_request::Member {
                        volume,
                        name,
                    })
                    .collect();
                let r = c
                    .create_snapshot_group(pb::CreateSnapshotGroupRequest {
                        members,
                        labels: labels(l),
                    })
                    .await?
                    .into_inner();
                print_snapshots(out, &r.snapshots, "");
            }
        }
        SnapshotCmd::List { volume, pool, page } => {
            let r = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    volume: volume.unwrap_or_default(),
                    pool: pool.unwrap_or_default(),
                    page_size: page.page_size,
                    page_token: page.page_token,
                })
                .await?
                .into_inner();
            print_snapshots(out, &r.snapshots, &r.next_page_token);
        }
        SnapshotCmd::Get { snapshot } => {
            let s = c
                .get_snapshot(pb::GetSnapshotRequest { snapshot })
                .await?
                .into_inner();
            match out {
                Output::Json => print_snapshots(out, &[s], ""),
                Output::Table => print_fields(&snapshot_fields(&s)),
            }
        }
        SnapshotCmd::Delete { snapshot } => {
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot: snapshot.clone(),
            })
            .await?;
            done(out, &format!("deleted snapshot {snapshot}"));
        }
        SnapshotCmd::Diff { base, target } => {
            let mut stream = c
                .diff_snapshots(pb::DiffSnapshotsRequest { base, target })
                .await?
                .into_inner();
            let mut ranges = Vec::new();
            while let Some(batch) = stream.message().await? {
                ranges.extend(batch.changed);
            }
            let total: u64 = ranges.iter().map(|r| r.length_bytes).sum();
            match out {
                Output::Json => print_json(&json!({
                    "changed_bytes": total,
                    "ranges": ranges.iter().map(|r| json!({
                        "offset_bytes": r.offset_bytes, "length_bytes": r.length_bytes,
                    })).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    let mut t = Table::new(&["OFFSET", "LENGTH"]);
                    for r in &ranges {
                        t.row(vec![r.offset_bytes.to_string(), human_size(r.length_bytes)]);
                    }
                    print!("{}", t.render());
                    println!("{} changed in {} ranges", human_size(total), ranges.len());
                }
            }
        }
    }
    Ok(())
}

/// Largest data chunk an import sends.
const IMPORT_CHUNK_BYTES: usize = 1 << 20;
/// Import block granularity: holes are detected per block.
const IMPORT_BLOCK_BYTES: u64 = 4096;

async fn image(channel: Channel, out: Output, cmd: ImageCmd) -> CmdResult {
    let mut c = pb::images_client::ImagesClient::new(channel)
        .max_decoding_message_size(MAX_IMAGE_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_IMAGE_MESSAGE_BYTES);
    match cmd {
        ImageCmd::Import {
            file,
            pool,
            name,
            size,
            resume,
            overwrite,
            labels: l,
        } => {
            let (mut reader, file_len): (Box<dyn Read + Send>, Option<u64>) =
                if file == Path::new("-") {
                    (Box::new(std::io::stdin()), None)
                } else {
                    let f = std::fs::File::open(&file)
                        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
                    let len = f.metadata()?.len();
                    (Box::new(f), Some(len))
                };
            let size_bytes = match (size, file_len) {
                (Some(s), _) => s,
                (None, Some(len)) => len.div_ceil(IMPORT_BLOCK_BYTES) * IMPORT_BLOCK_BYTES,
                (None, None) if overwrite => 0,
                (None, None) => {
                    return Err(
                        anyhow::anyhow!("reading standard input: give the volume's --size").into(),
                    )
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ImportImageRequest>(4);
            let start = pb::ImportImageRequest {
                msg: Some(pb::import_image_request::Msg::Start(pb::ImportStart {
                    pool,
                    volume_name: name,
                    size_bytes,
                    labels: labels(l),
                    resume,
                    overwrite,
                })),
            };
            tx.send(start)
                .await
                .map_err(|_| anyhow::anyhow!("the import stream closed"))?;
            let mut responses = c
                .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let resume_offset = match responses.message().await?.and_then(|m| m.msg) {
                Some(pb::import_image_response::Msg::Started(s)) => s.resume_offset_bytes,
                _ => return Err(anyhow::anyhow!("the daemon did not start the import").into()),
            };
            // Skip what is already durable, then send the non-zero blocks, coalesced.
            std::io::copy(&mut (&mut reader).take(resume_offset), &mut std::io::sink())?;
            let sender = async move {
                let mut offset = resume_offset;
                let mut buf = vec![0u8; IMPORT_CHUNK_BYTES];
                loop {
                    let n = read_full(&mut reader, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    // Over an existing volume, zero blocks must zero what is there.
                    let mut chunks = Vec::new();
                    let mut at = 0usize;
                    let at_u64 = |i: usize| offset + u64::try_from(i).unwrap_or(u64::MAX);
                    for (start, end) in data_runs(&buf[..n], IMPORT_BLOCK_BYTES) {
                        if overwrite && start > at {
                            chunks.push(zero_chunk(at_u64(at), at_u64(start) - at_u64(at)));
                        }
                        chunks.push(pb::ImageChunk {
                            offset_bytes: at_u64(start),
                            data: buf[start..end].to_vec(),
                            zero: false,
                            length_bytes: 0,
                        });
                        at = end;
                    }
                    // A short last block stays a data block: zero chunks are whole blocks.
                    let whole = n / 4096 * 4096;
                    if overwrite && at < whole {
                        chunks.push(zero_chunk(at_u64(at), at_u64(whole) - at_u64(at)));
                    }
                    for chunk in chunks {
                        tx.send(pb::ImportImageRequest {
                            msg: Some(pb::import_image_request::Msg::Chunk(chunk)),
                        })
                        .await
                        .map_err(|_| anyhow::anyhow!("the daemon ended the import"))?;
                    }
                    offset += u64::try_from(n).unwrap_or(u64::MAX);
                }
                tx.send(pb::ImportImageRequest {
                    msg: Some(pb::import_image_request::Msg::Finish(pb::ImportFinish {
                        expected_size_bytes: offset,
                    })),
                })
                .await
                .map_err(|_| anyhow::anyhow!("the daemon ended the import"))?;
                Ok::<(), anyhow::Error>(())
            };
            let receiver = async {
                let mut durable = resume_offset;
                let mut progress = Progress::new("import", file_len, resume_offset);
                while let Some(m) = responses.message().await? {
                    match m.msg {
                        Some(pb::import_image_response::Msg::Ack(a)) => {
                            durable = a.durable_offset_bytes;
                            progress.update(durable);
                        }
                        Some(pb::import_image_response::Msg::Finished(v)) => {
                            progress.finish(durable);
                            return Ok((v, durable));
                        }
                        _ => {}
                    }
                }
                Err(Failure::Other(anyhow::anyhow!(
                    "the import ended without finishing; resume it with --resume (durable up to byte {durable})"
                )))
            };
            let (sent, received) = tokio::join!(sender, receiver);
            let (v, _) = received?;
            sent?;
            print_volumes(out, &[v], "");
        }
        ImageCmd::Export {
            file,
            volume,
            snapshot,
            since,
        } => {
            let source = match (volume, snapshot) {
                (Some(v), _) => pb::export_image_request::Source::Volume(v),
                (None, Some(s)) => pb::export_image_request::Source::Snapshot(s),
                (None, None) => return Err(anyhow::anyhow!("name --volume or --snapshot").into()),
            };
            let incremental = since.is_some();
            let mut stream = c
                .export_image(pb::ExportImageRequest {
                    source: Some(source),
                    since_snapshot: since.unwrap_or_default(),
                    max_chunk_bytes: 0,
                })
                .await?
                .into_inner();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(!incremental)
                .open(&file)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
            let mut data_bytes = 0u64;
            // Progress by position in the volume: holes are skipped, not sent.
            let mut progress = Progress::new("export", None, 0);
            let mut at = 0u64;
            while let Some(m) = stream.message().await? {
                match m.msg {
                    Some(pb::export_image_response::Msg::Header(h)) => {
                        f.set_len(h.size_bytes)?;
                        progress.set_total(h.size_bytes);
                    }
                    Some(pb::export_image_response::Msg::Chunk(ch)) => {
                        write_chunk(&f, &ch)?;
                        let len = u64::try_from(ch.data.len()).unwrap_or(u64::MAX);
                        data_bytes += len;
                        at = ch.offset_bytes + if ch.zero { ch.length_bytes } else { len };
                        progress.update(at);
                    }
                    Some(pb::export_image_response::Msg::Trailer(_)) | None => {}
                }
            }
            f.sync_all()?;
            progress.finish(progress.total.unwrap_or(at));
            done(
                out,
                &format!(
                    "wrote {} of data to {}",
                    human_size(data_bytes),
                    file.display()
                ),
            );
        }
    }
    Ok(())
}

/// Progress of a long transfer, drawn on standard error when it is a terminal (or when
/// `COREBLK_PROGRESS=1`): bytes done, of how many, rate and time left, redrawn at most
/// five times a second and ended with a newline. Scripts (no terminal) see nothing.
struct Progress {
    what: &'static str,
    total: Option<u64>,
    /// Bytes done before this run (a resumed import): not counted in the rate.
    base: u64,
    start: std::time::Instant,
    last_draw: Option<std::time::Instant>,
    enabled: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>, base: u64) -> Self {
        use std::io::IsTerminal;
        let forced = std::env::var("COREBLK_PROGRESS").is_ok_and(|v| v == "1");
        Self {
            what,
            total,
            base,
            start: std::time::Instant::now(),
            last_draw: None,
            enabled: forced || std::io::stderr().is_terminal(),
        }
    }

    fn set_total(&mut self, total: u64) {
        self.total = Some(total);
    }

    /// `done` bytes of the whole (absolute, `base` included).
    fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let now = std::time::Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_millis(200))
        {
            return;
        }
        self.last_draw = Some(now);
        let line = progress_line(
            self.what,
            done,
            self.total,
            done.saturating_sub(self.base),
            now.duration_since(self.start),
        );
        eprint!("\r{line}\x1b[K");
    }

    fn finish(&mut self, done: u64) {
        if self.enabled {
            self.last_draw = None;
            self.update(done);
            eprintln!();
        }
    }
}

/// One progress line: `import 1.5 GiB / 4.0 GiB (37%), 120.3 MiB/s, 21s left`.
fn progress_line(
    what: &str,
    done: u64,
    total: Option<u64>,
    moved: u64,
    elapsed: std::time::Duration,
) -> String {
    let mut line = format!("{what} {}", human_size(done));
    if let Some(t) = total.filter(|t| *t > 0) {
        let pct = u128::from(done.min(t)) * 100 / u128::from(t);
        let _ = write!(line, " / {} ({pct}%)", human_size(t));
    }
    let secs = elapsed.as_secs_f64();
    if secs >= 0.05 {
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rate = (moved as f64 / secs) as u64;
        let _ = write!(line, ", {}/s", human_size(rate));
        if let Some(t) = total {
            if rate > 0 && done < t {
                let left = (t - done) / rate;
                let _ = write!(line, ", {} left", short_duration(left));
            }
        }
    }
    line
}

fn short_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The byte ranges of `buf` made of blocks that are not all zero, adjacent blocks
/// coalesced.
fn data_runs(buf: &[u8], block_bytes: u64) -> Vec<(usize, usize)> {
    let block = usize::try_from(block_bytes).unwrap_or(4096).max(1);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        if b.iter().all(|x| *x == 0) {
            continue;
        }
        let (start, end) = (i * block, i * block + b.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn zero_chunk(offset_bytes: u64, length_bytes: u64) -> pb::ImageChunk {
    pb::ImageChunk {
        offset_bytes,
        data: Vec::new(),
        zero: true,
        length_bytes,
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn write_chunk(f: &std::fs::File, ch: &pb::ImageChunk) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if ch.zero {
        // A zero range: punch it out by writing zeroes only where the file has data would
        // need fallocate; a plain zero write is simple and correct.
        let zeros = vec![0u8; 1 << 16];
        let mut done = 0u64;
        while done < ch.length_bytes {
            let n = (ch.length_bytes - done).min(zeros.len() as u64);
            let n_usize = usize::try_from(n).unwrap_or(zeros.len());
            f.write_all_at(&zeros[..n_usize], ch.offset_bytes + done)?;
            done += n;
        }
        return Ok(());
    }
    f.write_all_at(&ch.data, ch.offset_bytes)
}

async fn status(channel: Channel, out: Output) -> CmdResult {
    let mut node = pb::node_client::NodeClient::new(channel.clone());
    let info = node
        .get_node_info(pb::GetNodeInfoRequest {})
        .await?
        .into_inner();
    let stats = node.get_stats(pb::GetStatsRequest {}).await?.into_inner();
    let (pools, volumes, snapshots) = all_objects(channel).await?;
    match out {
        Output::Json => print_json(&json!({
            "node": node_info_json(&info),
            "stats": stats_json(&stats),
            "pools": pools.iter().map(|p| json!({
                "name": p.name, "uuid": p.uuid,
                "state": enum_name(p.state().as_str_name(), "POOL_STATE_"),
                "capacity_bytes": p.capacity_bytes, "allocated_bytes": p.allocated_bytes,
                "reserved_bytes": p.reserved_bytes, "free_bytes": p.free_bytes,
                "provisioned_bytes": p.provisioned_bytes,
                "held_by_deleted_bytes": p.held_by_deleted_bytes,
                "overcommit_ratio": ratio(p.provisioned_bytes, p.capacity_bytes),
                "overcommit_limit": p.overcommit_limit,
            })).collect::<Vec<_>>(),
            "volumes": volumes.iter().map(|v| json!({
                "name": v.name, "uuid": v.uuid, "pool_name": v.pool_name,
                "size_bytes": v.size_bytes, "allocated_bytes": v.allocated_bytes,
                "unique_bytes": v.unique_bytes, "device_path": v.device_path,
                "pvc": pvc_of(&v.labels),
                "snapshots": snapshots.iter().filter(|s| s.volume_uuid == v.uuid)
                    .map(|s| s.name.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!(
                "coreblkd {} on {} ({}): {}, up {}s, {} claimed device(s)",
                info.version,
                info.node_id,
                info.hostname,
                enum_name(info.state().as_str_name(), "DAEMON_STATE_"),
                stats.uptime_seconds,
                info.devices.len()
            );
            println!();
            if pools.is_empty() {
                println!("no pool yet (coreblk pool create)");
            }
            for p in &pools {
                print!("{}", pool_summary(p, BAR_WIDTH));
            }
            println!();
            print!("{}", volume_tree(&pools, &volumes, &snapshots).render());
            println!();
            print!("{}", stats_table(&stats).render());
        }
    }
    Ok(())
}

/// Characters of a pool's capacity bar in `coreblk status`.
const BAR_WIDTH: usize = 50;

/// Every pool, volume (largest first) and snapshot, all pages.
async fn all_objects(
    channel: Channel,
) -> Result<(Vec<pb::Pool>, Vec<pb::Volume>, Vec<pb::Snapshot>), Failure> {
    let mut pc = pb::pools_client::PoolsClient::new(channel.clone());
    let mut vc = pb::volumes_client::VolumesClient::new(channel.clone());
    let mut sc = pb::snapshots_client::SnapshotsClient::new(channel);
    let (mut pools, mut volumes, mut snapshots) = (Vec::new(), Vec::new(), Vec::new());
    let mut token = String::new();
    loop {
        let r = pc
            .list_pools(pb::ListPoolsRequest {
                page_size: 0,
                page_token: token,
            })
            .await?
            .into_inner();
        pools.extend(r.pools);
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    loop {
        let r = vc
            .list_volumes(pb::ListVolumesRequest {
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        volumes.extend(r.volumes);
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    loop {
        let r = sc
            .list_snapshots(pb::ListSnapshotsRequest {
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        snapshots.extend(r.snapshots);
        token = r.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    volumes.sort_by(|a, b| {
        b.size_bytes
            .cmp(&a.size_bytes)
            .then_with(|| a.pool_name.cmp(&b.pool_name))
            .then_with(|| a.name.cmp(&b.name))
    });
    snapshots.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((pools, volumes, snapshots))
}

/// `part / whole` (0 for an empty whole).
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let r = part as f64 / whole as f64;
    r
}

/// `namespace/name` of the PVC a volume was provisioned for, or empty.
fn pvc_of(labels: &HashMap<String, String>) -> String {
    match (
        labels.get("csi.storage.k8s.io/pvc/namespace"),
        labels.get("csi.storage.k8s.io/pvc/name"),
    ) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => String::new(),
    }
}

/// A text bar of `width` characters: `#` allocated, `=` reserved, `.` free, each
/// rounded to whole characters (allocated rounds up, so any use shows).
fn capacity_bar(allocated: u64, reserved: u64, capacity: u64, width: usize) -> String {
    let cells = |bytes: u64, up: bool| -> usize {
        if capacity == 0 {
            return 0;
        }
        let w = width as u128;
        let (b, c) = (u128::from(bytes.min(capacity)), u128::from(capacity));
        let n = if up { (b * w).div_ceil(c) } else { b * w / c };
        usize::try_from(n).unwrap_or(width)
    };
    let a = cells(allocated, true).min(width);
    let r = cells(reserved, false).min(width - a);
    format!(
        "[{}{}{}]",
        "#".repeat(a),
        "=".repeat(r),
        ".".repeat(width - a - r)
    )
}

/// One pool in `coreblk status`: name, state, bar, then its figures.
fn pool_summary(p: &pb::Pool, width: usize) -> String {
    let state = enum_name(p.state().as_str_name(), "POOL_STATE_");
    let mut s = format!(
        "pool {}  {state}  {} {:.1}% allocated\n",
        p.name,
        capacity_bar(p.allocated_bytes, p.reserved_bytes, p.capacity_bytes, width),
        ratio(p.allocated_bytes, p.capacity_bytes) * 100.0,
    );
    let _ = writeln!(
        s,
        "  capacity {} · allocated {} · reserved {} · free {} · held by deleted objects {}",
        human_size(p.capacity_bytes),
        human_size(p.allocated_bytes),
        human_size(p.reserved_bytes),
        human_size(p.free_bytes),
        human_size(p.held_by_deleted_bytes),
    );
    let _ = writeln!(
        s,
        "  provisioned {} · overcommit {:.2}x (limit {:.2}x) · {} volume(s), {} snapshot(s)",
        human_size(p.provisioned_bytes),
        ratio(p.provisioned_bytes, p.capacity_bytes),
        p.overcommit_limit,
        p.volume_count,
        p.snapshot_count,
    );
    if !p.state_message.is_empty() {
        let _ = writeln!(s, "  {}", p.state_message);
    }
    s
}

/// Volumes (in the given order), each followed by its snapshots indented; snapshots
/// whose volume is gone at the end.
fn volume_tree(pools: &[pb::Pool], volumes: &[pb::Volume], snapshots: &[pb::Snapshot]) -> Table {
    let mut t = Table::new(&[
        "VOLUME",
        "PVC",
        "POOL",
        "SIZE",
        "ALLOCATED",
        "UNIQUE",
        "DEVICE",
    ]);
    let pool_of: HashMap<&str, &str> = pools
        .iter()
        .map(|p| (p.uuid.as_str(), p.name.as_str()))
        .collect();
    let snap_row = |t: &mut Table, s: &pb::Snapshot, note: &str| {
        t.row(vec![
            format!("  @{}{note}", s.name),
            "-".to_owned(),
            or_dash(pool_of.get(s.pool_uuid.as_str()).copied().unwrap_or("")),
            human_size(s.size_bytes),
            human_size(s.allocated_bytes),
            human_size(s.unique_bytes),
            "-".to_owned(),
        ]);
    };
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            or_dash(&pvc_of(&v.labels)),
            or_dash(&v.pool_name),
            human_size(v.size_bytes),
            human_size(v.allocated_bytes),
            human_size(v.unique_bytes),
            or_dash(&v.device_path),
        ]);
        for s in snapshots.iter().filter(|s| s.volume_uuid == v.uuid) {
            snap_row(&mut t, s, "");
        }
    }
    for s in snapshots
        .iter()
        .filter(|s| !volumes.iter().any(|v| v.uuid == s.volume_uuid))
    {
        snap_row(&mut t, s, " (volume deleted)");
    }
    t
}

// ---- output -------------------------------------------------------------------------

fn print_json(v: &Value) {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    text.push('\n');
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// "DEVICE_KIND_NVME" → "nvme".
fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn join_or_dash(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join("; ")
    }
}

fn labels_text(l: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    join_or_dash(v.into_iter())
}

fn sorted_labels(l: &HashMap<String, String>) -> Value {
    let m: std::collections::BTreeMap<&String, &String> = l.iter().collect();
    json!(m)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return String::new();
    };
    coreblk_daemon::metrics::status::utc_text(ts.seconds)
}

fn reason_json(r: &pb::RefuseReason) -> Value {
    json!({
        "code": r.code, "message": r.message, "remedy": r.remedy,
        "force_overrides": r.force_overrides,
    })
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "path": d.path,
        "kind": enum_name(d.kind().as_str_name(), "DEVICE_KIND_"),
        "kernel_name": d.kernel_name,
        "size_bytes": d.size_bytes,
        "logical_block_size_bytes": d.logical_block_size_bytes,
        "physical_block_size_bytes": d.physical_block_size_bytes,
        "model": d.model,
        "serial": d.serial,
        "nsid": d.nsid,
        "claimable": d.claimable,
        "force_allowed": d.force_allowed,
        "claimed": d.claimed,
        "reasons": d.reasons.iter().map(reason_json).collect::<Vec<_>>(),
        "label_pool_uuid": d.label_pool_uuid,
        "label_device_uuid": d.label_device_uuid,
        "signatures": d.signatures.iter().map(|s| json!({"kind": s.kind, "usage": s.usage})).collect::<Vec<_>>(),
    })
}

fn claimed_json(d: &pb::ClaimedDevice) -> Value {
    json!({
        "path": d.path,
        "kind": enum_name(d.kind().as_str_name(), "DEVICE_KIND_"),
        "pool_uuid": d.pool_uuid,
        "device_uuid": d.device_uuid,
        "size_bytes": d.size_bytes,
        "logical_block_size_bytes": d.logical_block_size_bytes,
        "physical_block_size_bytes": d.physical_block_size_bytes,
        "direct_io": d.direct_io,
        "newly_labelled": d.newly_labelled,
        "present": d.present,
        "overridden": d.overridden.iter().map(reason_json).collect::<Vec<_>>(),
        "residual_signatures": d.residual_signatures.iter().map(|s| json!({"kind": s.kind, "usage": s.usage})).collect::<Vec<_>>(),
    })
}

fn node_info_json(i: &pb::NodeInfo) -> Value {
    json!({
        "node_id": i.node_id,
        "hostname": i.hostname,
        "version": i.version,
        "kernel_release": i.kernel_release,
        "state": enum_name(i.state().as_str_name(), "DAEMON_STATE_"),
        "start_time": rfc3339(i.start_time.as_ref()),
        "reactors": i.reactors.iter().map(|r| json!({"id": r.id, "core": r.core})).collect::<Vec<_>>(),
        "reactors_pinned": i.reactors_pinned,
        "devices": i.devices.iter().map(claimed_json).collect::<Vec<_>>(),
        "served_device_path": i.served_device_path,
        "metrics_address": i.metrics_address,
        "socket_path": i.socket_path,
        "ublk": i.ublk.as_ref().map(|u| json!({
            "available": u.available, "unavailable_reason": u.unavailable_reason,
            "features": u.features, "feature_names": u.feature_names,
            "data_path": u.data_path, "reason": u.reason,
            "max_exports": u.max_exports, "exports": u.exports,
            "io_buffer_bytes_per_reactor": u.io_buffer_bytes_per_reactor,
            "queue_depth": u.queue_depth, "max_io_bytes": u.max_io_bytes,
        })),
    })
}

/// The `node info` rows about ublk exports.
fn ublk_rows(u: Option<&pb::UblkInfo>) -> Vec<(&'static str, String)> {
    match u {
        None => vec![("exports", "-".to_owned())],
        Some(u) if !u.available => {
            vec![("exports", format!("unavailable: {}", u.unavailable_reason))]
        }
        Some(u) => vec![
            (
                "exports",
                format!("{} of at most {}", u.exports, u.max_exports),
            ),
            ("ublk data path", format!("{} ({})", u.data_path, u.reason)),
            (
                "ublk queues",
                format!(
                    "depth {}, requests up to {}",
                    u.queue_depth,
                    human_size(u64::from(u.max_io_bytes))
                ),
            ),
            (
                "IO buffers",
                format!(
                    "{} per reactor (shared by every export)",
                    human_size(u.io_buffer_bytes_per_reactor)
                ),
            ),
        ],
    }
}

fn stats_json(s: &pb::NodeStats) -> Value {
    json!({
        "uptime_seconds": s.uptime_seconds,
        "reactors": s.reactors.iter().map(|r| json!({
            "id": r.id, "core": r.core, "busy_ns": r.busy_ns, "sleep_ns": r.sleep_ns,
            "sleeps": r.sleeps, "enters": r.enters, "completions": r.completions,
        })).collect::<Vec<_>>(),
    })
}

fn stats_table(s: &pb::NodeStats) -> Table {
    let mut t = Table::new(&["REACTOR", "CORE", "BUSY", "ASLEEP", "SLEEPS", "COMPLETIONS"]);
    for r in &s.reactors {
        t.row(vec![
            r.id.to_string(),
            r.core.to_string(),
            format!(
                "{:.3}s",
                std::time::Duration::from_nanos(r.busy_ns).as_secs_f64()
            ),
            format!(
                "{:.3}s",
                std::time::Duration::from_nanos(r.sleep_ns).as_secs_f64()
            ),
            r.sleeps.to_string(),
            r.completions.to_string(),
        ]);
    }
    t
}

fn print_node_info(out: Output, i: &pb::NodeInfo) {
    if out == Output::Json {
        print_json(&node_info_json(i));
        return;
    }
    let cores: Vec<String> = i.reactors.iter().map(|r| r.core.to_string()).collect();
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("node id", i.node_id.clone()),
        ("hostname", i.hostname.clone()),
        ("version", i.version.clone()),
        ("kernel", i.kernel_release.clone()),
        ("state", enum_name(i.state().as_str_name(), "DAEMON_STATE_")),
        ("started", rfc3339(i.start_time.as_ref())),
        (
            "reactors",
            format!(
                "{} on cores {}{}",
                i.reactors.len(),
                cores.join(","),
                if i.reactors_pinned {
                    " (pinned)"
                } else {
                    " (not pinned)"
                }
            ),
        ),
        ("served device", or_dash(&i.served_device_path)),
        ("socket", i.socket_path.clone()),
        ("metrics", or_dash(&i.metrics_address)),
        ("claimed devices", i.devices.len().to_string()),
    ]
    .into_iter()
    .chain(ublk_rows(i.ublk.as_ref()))
    {
        t.row(vec![k.to_owned(), v]);
    }
    print!("{}", t.render());
    if !i.devices.is_empty() {
        println!();
        let mut d = Table::new(&["PATH", "SIZE", "POOL", "DEVICE", "PRESENT"]);
        for c in &i.devices {
            d.row(vec![
                c.path.clone(),
                human_size(c.size_bytes),
                c.pool_uuid.clone(),
                c.device_uuid.clone(),
                if c.present { "yes" } else { "no" }.to_owned(),
            ]);
        }
        print!("{}", d.render());
    }
}

/// One object's figures as a FIELD / VALUE table (what `get` prints).
fn print_fields(rows: &[(&str, String)]) {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in rows {
        t.row(vec![(*k).to_owned(), v.clone()]);
    }
    print!("{}", t.render());
}

/// Every figure of a pool (`pool get`): the space, where it went, and its settings.
fn pool_fields(p: &pb::Pool) -> Vec<(&'static str, String)> {
    vec![
        ("name", p.name.clone()),
        ("uuid", p.uuid.clone()),
        (
            "state",
            enum_name(p.state().as_str_name(), "POOL_STATE_")
                + &if p.state_message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", p.state_message)
                },
        ),
        ("devices", join_or_dash(p.device_paths.iter().cloned())),
        ("cluster size", human_size(p.cluster_size_bytes)),
        ("capacity", human_size(p.capacity_bytes)),
        ("free", human_size(p.free_bytes)),
        ("allocated", human_size(p.allocated_bytes)),
        ("reserved (thick)", human_size(p.reserved_bytes)),
        ("held by deleted", human_size(p.held_by_deleted_bytes)),
        ("provisioned", human_size(p.provisioned_bytes)),
        ("overcommit limit", format!("{:.2}", p.overcommit_limit)),
        ("volumes", p.volume_count.to_string()),
        ("snapshots", p.snapshot_count.to_string()),
        ("labels", labels_text(&p.labels)),
    ]
}

/// Every figure of a volume (`volume get`).
fn volume_fields(v: &pb::Volume) -> Vec<(&'static str, String)> {
    vec![
        ("name", v.name.clone()),
        ("uuid", v.uuid.clone()),
        ("pool", or_dash(&v.pool_name)),
        ("state", enum_name(v.state().as_str_name(), "VOLUME_STATE_")),
        ("size", human_size(v.size_bytes)),
        ("allocated", human_size(v.allocated_bytes)),
        ("unique", human_size(v.unique_bytes)),
        (
            "provisioning",
            if v.thick { "thick" } else { "thin" }.to_owned(),
        ),
        (
            "never written",
            if v.never_written { "yes" } else { "no" }.to_owned(),
        ),
        ("source snapshot", or_dash(&v.source_snapshot_uuid)),
        ("source volume", or_dash(&v.source_volume_uuid)),
        ("device", or_dash(&v.device_path)),
        ("created", or_dash(&rfc3339(v.create_time.as_ref()))),
        ("labels", labels_text(&v.labels)),
        ("qos", qos_text(v.qos.as_ref())),
    ]
}

/// Every figure of a snapshot (`snapshot get`).
fn snapshot_fields(s: &pb::Snapshot) -> Vec<(&'static str, String)> {
    vec![
        ("name", s.name.clone()),
        ("uuid", s.uuid.clone()),
        ("volume", or_dash(&s.volume_name)),
        ("volume uuid", or_dash(&s.volume_uuid)),
        ("size", human_size(s.size_bytes)),
        ("allocated", human_size(s.allocated_bytes)),
        ("unique", human_size(s.unique_bytes)),
        ("group", or_dash(&s.group_uuid)),
        ("created", or_dash(&rfc3339(s.create_time.as_ref()))),
        ("labels", labels_text(&s.labels)),
    ]
}

fn next_page(token: &str) {
    if !token.is_empty() {
        println!("(more: --page-token {token})");
    }
}

fn print_pools(out: Output, pools: &[pb::Pool], next: &str) {
    if out == Output::Json {
        print_json(&json!({
            "pools": pools.iter().map(|p| json!({
                "uuid": p.uuid, "name": p.name, "device_paths": p.device_paths,
                "cluster_size_bytes": p.cluster_size_bytes, "capacity_bytes": p.capacity_bytes,
                "free_bytes": p.free_bytes, "allocated_bytes": p.allocated_bytes,
                "provisioned_bytes": p.provisioned_bytes, "reserved_bytes": p.reserved_bytes,
                "held_by_deleted_bytes": p.held_by_deleted_bytes,
                "overcommit_limit": p.overcommit_limit, "volume_count": p.volume_count,
                "snapshot_count": p.snapshot_count,
                "state": enum_name(p.state().as_str_name(), "POOL_STATE_"),
                "state_message": p.state_message, "labels": sorted_labels(&p.labels),
            })).collect::<Vec<_>>(),
            "next_page_token": next,
        }));
        return;
    }
    let mut t = Table::new(&[
        "NAME",
        "UUID",
        "STATE",
        "CAPACITY",
        "FREE",
        "ALLOCATED",
        "PROVISIONED",
        "OVERCOMMIT",
        "VOLUMES",
    ]);
    for p in pools {
        t.row(vec![
            p.name.clone(),
            p.uuid.clone(),
            enum_name(p.state().as_str_name(), "POOL_STATE_"),
            human_size(p.capacity_bytes),
            human_size(p.free_bytes),
            human_size(p.allocated_bytes),
            human_size(p.provisioned_bytes),
            format!("{:.2}", p.overcommit_limit),
            p.volume_count.to_string(),
        ]);
    }
    print!("{}", t.render());
    next_page(next);
}

fn print_volumes(out: Output, volumes: &[pb::Volume], next: &str) {
    if out == Output::Json {
        print_json(&json!({
            "volumes": volumes.iter().map(|v| json!({
                "uuid": v.uuid, "name": v.name, "pool_uuid": v.pool_uuid, "pool_name": v.pool_name,
                "size_bytes": v.size_bytes, "allocated_bytes": v.allocated_bytes,
                "unique_bytes": v.unique_bytes, "thick": v.thick,
                "state": enum_name(v.state().as_str_name(), "VOLUME_STATE_"),
                "never_written": v.never_written,
                "source_snapshot_uuid": v.source_snapshot_uuid,
                "source_volume_uuid": v.source_volume_uuid, "device_path": v.device_path,
                "create_time": rfc3339(v.create_time.as_ref()), "labels": sorted_labels(&v.labels),
                "qos": qos_json(v.qos.as_ref()),
            })).collect::<Vec<_>>(),
            "next_page_token": next,
        }));
        return;
    }
    let mut t = Table::new(&[
        "NAME",
        "UUID",
        "POOL",
        "SIZE",
        "ALLOCATED",
        "STATE",
        "DEVICE",
        "LABELS",
    ]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            v.uuid.clone(),
            or_dash(&v.pool_name),
            human_size(v.size_bytes),
            human_size(v.allocated_bytes),
            enum_name(v.state().as_str_name(), "VOLUME_STATE_"),
            or_dash(&v.device_path),
            labels_text(&v.labels),
        ]);
    }
    print!("{}", t.render());
    next_page(next);
}

fn print_snapshots(out: Output, snaps: &[pb::Snapshot], next: &str) {
    if out == Output::Json {
        print_json(&json!({
            "snapshots": snaps.iter().map(|s| json!({
                "uuid": s.uuid, "name": s.name, "volume_uuid": s.volume_uuid,
                "volume_name": s.volume_name, "pool_uuid": s.pool_uuid, "size_bytes": s.size_bytes,
                "allocated_bytes": s.allocated_bytes, "unique_bytes": s.unique_bytes,
                "group_uuid": s.group_uuid, "create_time": rfc3339(s.create_time.as_ref()),
                "labels": sorted_labels(&s.labels),
            })).collect::<Vec<_>>(),
            "next_page_token": next,
        }));
        return;
    }
    let mut t = Table::new(&["NAME", "UUID", "VOLUME", "SIZE", "UNIQUE", "CREATED"]);
    for s in snaps {
        t.row(vec![
            s.name.clone(),
            s.uuid.clone(),
            or_dash(&s.volume_name),
            human_size(s.size_bytes),
            human_size(s.unique_bytes),
            rfc3339(s.create_time.as_ref()),
        ]);
    }
    print!("{}", t.render());
    next_page(next);
}

/// `coreblk export cleanup`: with no daemon serving, stops and deletes the ublk devices
/// whose server process is gone. The one command that talks to the kernel instead of the
/// API. Devices whose server is alive are left alone.
async fn export_cleanup(socket: &Path, out: Output) -> CmdResult {
    use coreblk_ublk as ublk;
    if let Ok(ch) = connect(socket).await {
        if pb::node_client::NodeClient::new(ch)
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .is_ok()
        {
            return Err(anyhow::anyhow!(
                "a coreblkd serves on {}: it owns its exports (use `coreblk unexport`); cleanup is for devices left without a daemon",
                socket.display()
            )
            .into());
        }
    }
    let ids = ublk::Control::list().map_err(anyhow::Error::from)?;
    let c = ublk::Control::open().map_err(anyhow::Error::from)?;
    let mut removed = Vec::new();
    for id in ids {
        let info = match c.info(id) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("ublk device {id}: {e}; skipped");
                continue;
            }
        };
        let pid = info.ublksrv_pid;
        let comm = (pid > 0)
            .then(|| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
            .flatten();
        if let Some(comm) = comm.as_deref().map(str::trim) {
            eprintln!(
                "{}: its server {comm} (pid {pid}) is alive; left alone",
                ublk::block_path(id).display()
            );
            continue;
        }
        if let Err(e) = c.stop(id) {
            eprintln!("{}: stop: {e}", ublk::block_path(id).display());
        }
        match c.delete(id) {
            Ok(()) => removed.push(ublk::block_path(id).display().to_string()),
            Err(e) => eprintln!("{}: delete: {e}", ublk::block_path(id).display()),
        }
    }
    match out {
        Output::Json => print_json(&json!({ "removed": removed })),
        Output::Table => {
            for r in &removed {
                println!("removed {r}");
            }
            if removed.is_empty() {
                println!("no orphaned ublk devices");
            }
        }
    }
    Ok(())
}

fn export_json(e: &pb::Export) -> serde_json::Value {
    json!({
        "volume_uuid": e.volume_uuid, "volume_name": e.volume_name,
        "device_path": e.device_path, "ublk_id": e.ublk_id, "persistent": e.persistent,
        "read_only": e.read_only, "reactors": e.reactors, "data_path": e.data_path,
    })
}

fn print_exports(out: Output, exports: &[pb::Export], next: &str) {
    if out == Output::Json {
        print_json(&json!({
            "exports": exports.iter().map(export_json).collect::<Vec<_>>(),
            "next_page_token": next,
        }));
        return;
    }
    let mut t = Table::new(&["VOLUME", "DEVICE", "PERSISTENT", "READ-ONLY", "DATA-PATH"]);
    for e in exports {
        t.row(vec![
            e.volume_name.clone(),
            e.device_path.clone(),
            if e.persistent { "yes" } else { "no" }.to_owned(),
            if e.read_only { "yes" } else { "no" }.to_owned(),
            e.data_path.clone(),
        ]);
    }
    print!("{}", t.render());
    next_page(next);
}

/// A left-aligned text table; the last column is not padded.
#[derive(Debug)]
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.rows[0].len());
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let cols = self.rows[0].len();
        let mut widths = vec![0usize; cols];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == cols {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn capacity_bars_show_allocated_reserved_and_free() {
        assert_eq!(capacity_bar(0, 0, 100, 10), "[..........]");
        assert_eq!(capacity_bar(50, 20, 100, 10), "[#####==...]");
        // Any allocation shows; a full pool is all #.
        assert_eq!(capacity_bar(1, 0, 1 << 40, 10), "[#.........]");
        assert_eq!(capacity_bar(100, 0, 100, 10), "[##########]");
        // Never wider than asked, whatever the figures say.
        assert_eq!(capacity_bar(90, 90, 100, 10), "[#########=]");
        assert_eq!(capacity_bar(5, 5, 0, 4), "[....]");
    }

    #[test]
    fn the_status_summary_has_a_bar_and_the_figures_per_pool() {
        let p = pb::Pool {
            name: "default".into(),
            uuid: "p1".into(),
            capacity_bytes: 100 << 30,
            allocated_bytes: 25 << 30,
            free_bytes: 75 << 30,
            provisioned_bytes: 150 << 30,
            overcommit_limit: 2.0,
            volume_count: 3,
            state: pb::PoolState::Online as i32,
            ..Default::default()
        };
        let text = pool_summary(&p, 20);
        assert!(
            text.starts_with("pool default  online  [#####...............] 25.0% allocated\n"),
            "{text}"
        );
        assert!(text.contains("capacity 100.0 GiB"), "{text}");
        assert!(text.contains("overcommit 1.50x (limit 2.00x)"), "{text}");
        let v = |name: &str, uuid: &str, size: u64| pb::Volume {
            name: name.into(),
            uuid: uuid.into(),
            pool_uuid: "p1".into(),
            pool_name: "default".into(),
            size_bytes: size,
            labels: HashMap::from([
                (
                    "csi.storage.k8s.io/pvc/namespace".to_owned(),
                    "ns".to_owned(),
                ),
                ("csi.storage.k8s.io/pvc/name".to_owned(), name.to_owned()),
            ]),
            ..Default::default()
        };
        let s = |name: &str, volume: &str| pb::Snapshot {
            name: name.into(),
            volume_uuid: volume.into(),
            pool_uuid: "p1".into(),
            ..Default::default()
        };
        let table = volume_tree(
            &[p],
            &[v("big", "u1", 2 << 30), v("small", "u2", 1 << 30)],
            &[s("a", "u1"), s("b", "u9")],
        )
        .render();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("big ") && lines[1].contains("ns/big"),
            "{table}"
        );
        assert!(lines[2].starts_with("  @a "), "{table}");
        assert!(lines[3].starts_with("small "), "{table}");
        assert!(
            lines[4].starts_with("  @b (volume deleted)") && lines[4].contains("default"),
            "{table}"
        );
    }

    #[test]
    fn progress_lines_say_done_total_rate_and_time_left() {
        let s = std::time::Duration::from_secs;
        assert_eq!(
            progress_line("import", 1 << 30, Some(4 << 30), 1 << 30, s(10)),
            "import 1.0 GiB / 4.0 GiB (25%), 102.3 MiB/s, 30s left"
        );
        // A resumed import: the rate counts only what moved in this run.
        assert_eq!(
            progress_line("import", 3 << 30, Some(4 << 30), 1 << 30, s(100)),
            "import 3.0 GiB / 4.0 GiB (75%), 10.2 MiB/s, 1m40s left"
        );
        // Standard input: no total, no time left.
        assert_eq!(
            progress_line("import", 5 << 20, None, 5 << 20, s(5)),
            "import 5.0 MiB, 1.0 MiB/s"
        );
        assert_eq!(
            progress_line("export", 8 << 30, Some(8 << 30), 8 << 30, s(4000)),
            "export 8.0 GiB / 8.0 GiB (100%), 2.0 MiB/s"
        );
        assert_eq!(short_duration(7322), "2h02m");
    }

    #[test]
    fn arguments_parse() {
        assert_eq!(size_arg("10GiB"), Ok(10 << 30));
        assert!(size_arg("ten").is_err());
        assert_eq!(label_arg("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(label_arg("=x").is_err());
        assert_eq!(code_name(tonic::Code::Unimplemented), "UNIMPLEMENTED");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        let ts = prost_types::Timestamp {
            seconds: 1_795_616_459,
            nanos: 0,
        };
        assert_eq!(rfc3339(Some(&ts)), "2026-11-25T14:20:59Z");
        let ts = prost_types::Timestamp {
            seconds: 951_782_400,
            nanos: 0,
        };
        let mut buf = vec![0u8; 5 * 4096 + 10];
        buf[4096] = 1;
        buf[2 * 4096 + 5] = 1;
        buf[5 * 4096 + 1] = 1;
        assert_eq!(
            data_runs(&buf, 4096),
            [(4096, 3 * 4096), (5 * 4096, 5 * 4096 + 10)]
        );
        assert_eq!(rfc3339(Some(&ts)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn export_takes_a_volume_or_a_subcommand() {
        let cli =
            Cli::try_parse_from(["coreblk", "export", "vol1", "--persistent"]).expect("parse");
        assert!(
            matches!(cli.cmd, Cmd::Export { volume: Some(ref v), persistent: true, .. } if v == "vol1")
        );
        let cli = Cli::try_parse_from(["coreblk", "export", "cleanup"]).expect("parse");
        assert!(matches!(
            cli.cmd,
            Cmd::Export {
                cmd: Some(ExportCmd::Cleanup),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["coreblk", "export"]).is_err());
    }
}
