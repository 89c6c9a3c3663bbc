//! The CSI Node service: NodeGetInfo and NodeGetCapabilities; NodeStageVolume (export the
//! volume through the daemon as `/dev/ublkbN`, make a filesystem only on a volume the
//! store reports never written and not a clone, mount it at the staging path; block mode
//! mounts nothing), NodePublishVolume (a bind mount of the staging path, or of the device
//! node onto a file in block mode; read-only when asked), NodeUnpublish / NodeUnstage
//! (unmount; unstage also unexports once nothing uses the device), NodeExpandVolume (grow
//! the volume through the daemon, then the filesystem online) and NodeGetVolumeStats.
//!
//! State: none of its own. What is staged or published is the mount table
//! (`/proc/self/mountinfo`, read at each call) and the daemon's exports; so a restart of
//! the plugin, or of `coreblkd` (whose exports outlive it), re-stages nothing twice and
//! loses no mount.
//!
//! Owns: [`Node`]. Must never: mount, unmount or create anything outside the kubelet
//! directory (`paths.rs` checks every path first); make a filesystem on a volume the
//! store does not report never written; read a tenant's bytes to decide anything.
//!
//! Start reading at `node_stage_volume`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coreblk_proto::csi::v1 as csi;
use coreblk_proto::v1 as pb;
use csi::node_service_capability::rpc::Type as Cap;
use tonic::{Code, Request, Response, Status};

use crate::busy::Busy;
use crate::crypt;
use crate::daemon::Daemon;
use crate::ephemeral::{self, InlineAttrs};
use crate::error::Error;
use crate::fsopts;
use crate::ids::{CsiId, Kind};
use crate::mounts::{self, MountInfo};
use crate::params::{check_capabilities, node_topology};
use crate::paths::check_under;

/// Deadline of a mount or umount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of mkfs (a large volume under a slow CPU).
const MKFS_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of resize2fs / xfs_growfs.
const GROW_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the device node of a new export to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// The filesystem of a mount capability that names none.
const DEFAULT_FS: &str = "ext4";
/// Most mounts stacked on one path that an unmount takes off.
const MAX_STACKED_MOUNTS: usize = 8;

/// The node plugin's Node service.
#[derive(Debug, Clone)]
pub struct Node {
    daemon: Daemon,
    node_id: String,
    /// The kubelet's directory: every staging and target path must lie under it.
    kubelet_dir: PathBuf,
    /// Volume IDs with a call in progress (a second call for one answers ABORTED),
    /// shared with the Controller's CreateSnapshot.
    busy: Busy,
}

/// How a capability wants the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    /// The raw device.
    Block,
    /// A filesystem, with its mount flags.
    Mount { fs: String, flags: Vec<String> },
}

/// The access type of `cap`, checked as the controller checks it (block, or mount with
/// ext4/xfs; a single-node mode).
fn access(rpc: &'static str, cap: Option<&csi::VolumeCapability>) -> Result<Access, Error> {
    let cap = cap.ok_or(Error::Missing {
        rpc,
        field: "volume_capability",
    })?;
    let fs = check_capabilities(std::slice::from_ref(cap))
        .map_err(|reason| Error::Invalid { rpc, reason })?;
    Ok(match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            for f in &m.mount_flags {
                if f.is_empty() || f.contains(',') || f.chars().any(char::is_whitespace) {
                    return Err(Error::Invalid {
                        rpc,
                        reason: format!(
                            "mount flag {f:?}: give one option per entry, without commas or spaces"
                        ),
                    });
                }
            }
            Access::Mount {
                fs: if fs.is_empty() {
                    DEFAULT_FS.to_owned()
                } else {
                    fs
                },
                flags: m.mount_flags.clone(),
            }
        }
        _ => Access::Block,
    })
}

/// `ublkb3` of `/dev/ublkb3`.
fn device_name(device_path: &str) -> &str {
    device_path.rsplit('/').next().unwrap_or(device_path)
}

/// The device a volume's data is reached through on this node: the ublk device, or for
/// a LUKS2-encrypted volume its open mapping (`/dev/dm-N`, on that ublk device); empty
/// when there is none.
fn top_device(v: &pb::Volume) -> String {
    if !crypt::encrypted(&v.labels) || v.device_path.is_empty() {
        return v.device_path.clone();
    }
    match crypt::mapped(&crypt::mapping_name(&v.uuid)) {
        Some(dm) if crypt::maps_onto(&dm, device_name(&v.device_path)) => format!("/dev/{dm}"),
        _ => String::new(),
    }
}

fn node_err(rpc: &'static str, what: String) -> impl FnOnce(mounts::RunError) -> Error {
    move |e| Error::Node {
        rpc,
        reason: format!("{what}: {e}"),
    }
}

/// ALREADY_EXISTS: `target` is a mount point (`m`, from `what`), not `volume_id` as asked.
fn occupied(
    rpc: &'static str,
    target: &Path,
    m: &MountInfo,
    what: &dyn std::fmt::Display,
    volume_id: &str,
) -> Error {
    Error::Conflict {
        rpc,
        reason: format!(
            "{} is already a mount point ({} {what}{}), not volume {volume_id} as asked",
            target.display(),
            m.fs_type,
            if m.read_only() { ", read-only" } else { "" },
        ),
    }
}

fn io_err(rpc: &'static str, what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Node {
        rpc,
        reason: format!("{what}: {e}"),
    }
}

fn table(rpc: &'static str) -> Result<Vec<MountInfo>, Error> {
    mounts::mount_table().map_err(io_err(rpc, "reading /proc/self/mountinfo".to_owned()))
}

/// Unmounts everything mounted at `path` (nothing mounted: nothing to do).
async fn unmount_all(rpc: &'static str, path: &Path) -> Result<(), Error> {
    for _ in 0..MAX_STACKED_MOUNTS {
        if mounts::mounted_at(&table(rpc)?, path).is_none() {
            return Ok(());
        }
        let p = path.to_string_lossy();
        if let Err(e) = mounts::run("umount", &[&p], MOUNT_TIMEOUT).await {
            // Gone meanwhile (another unmount): fine; otherwise the tool's reason.
            if mounts::mounted_at(&table(rpc)?, path).is_some() {
                return Err(node_err(rpc, format!("unmounting {p}"))(e));
            }
        }
    }
    Err(Error::Node {
        rpc,
        reason: format!(
            "{} still has mounts after {MAX_STACKED_MOUNTS} unmounts; unmount it by hand",
            path.display()
        ),
    })
}

/// A bind mount of `from` at `to`, read-only when asked (a bind ignores `ro` at first, so
/// a remount follows; if that fails, the bind is taken back rather than left writable).
async fn bind(rpc: &'static str, from: &Path, to: &Path, read_only: bool) -> Result<(), Error> {
    let (f, t) = (from.to_string_lossy(), to.to_string_lossy());
    mounts::run("mount", &["--bind", &f, &t], MOUNT_TIMEOUT)
        .await
        .map_err(node_err(rpc, format!("bind-mounting {f} at {t}")))?;
    if read_only {
        if let Err(e) = mounts::run("mount", &["-o", "remount,bind,ro", &t], MOUNT_TIMEOUT).await {
            let _ = mounts::run("umount", &[&t], MOUNT_TIMEOUT).await;
            return Err(node_err(
                rpc,
                format!("making the bind mount at {t} read-only"),
            )(e));
        }
    }
    Ok(())
}

impl Node {
    /// The Node service of node `node_id`; `busy` is shared with the Controller (a
    /// snapshot that freezes a volume's filesystem holds the volume).
    pub fn new(daemon: Daemon, node_id: &str, kubelet_dir: PathBuf, busy: Busy) -> Self {
        Self {
            daemon,
            node_id: node_id.to_owned(),
            kubelet_dir,
            busy,
        }
    }

    fn err(&self, rpc: &'static str, status: Status) -> Error {
        Error::Daemon {
            rpc,
            socket: self.daemon.socket().to_path_buf(),
            status,
        }
    }

    /// The daemon UUID of `volume_id`, which must name a volume of this node.
    fn volume_here(&self, rpc: &'static str, volume_id: &str) -> Result<String, Error> {
        if volume_id.is_empty() {
            return Err(Error::Missing {
                rpc,
                field: "volume_id",
            });
        }
        match CsiId::parse(Kind::Volume, volume_id) {
            None => Err(Error::NotFound {
                rpc,
                what: format!("volume {volume_id:?} (not an ID of this driver)"),
            }),
            Some(id) if id.node_id == self.node_id => Ok(id.uuid),
            Some(id) => Err(Error::NotHere {
                rpc,
                id,
                here: self.node_id.clone(),
            }),
        }
    }

    /// A path field of a request, checked against the kubelet directory.
    fn path(&self, rpc: &'static str, field: &'static str, value: &str) -> Result<PathBuf, Error> {
        if value.is_empty() {
            return Err(Error::Missing { rpc, field });
        }
        check_under(field, value, &self.kubelet_dir).map_err(|e| Error::Invalid {
            rpc,
            reason: e.to_string(),
        })
    }

    /// The daemon's volume `uuid` (NOT_FOUND from the daemon keeps its code).
    async fn volume(&self, rpc: &'static str, uuid: &str) -> Result<pb::Volume, Error> {
        self.daemon
            .volumes()
            .get_volume(pb::GetVolumeRequest {
                volume: uuid.to_owned(),
            })
            .await
            .map(Response::into_inner)
            .map_err(|s| self.err(rpc, s))
    }

    /// The device path of volume `uuid`'s export on this node, `None` when it is not
    /// exported.
    async fn exported(&self, rpc: &'static str, uuid: &str) -> Result<Option<String>, Error> {
        self.daemon
            .export_device(uuid)
            .await
            .map_err(|s| self.err(rpc, s))
    }

    /// The daemon's volume `uuid` with `device_path` set from its export (empty: none).
    async fn volume_and_export(&self, rpc: &'static str, uuid: &str) -> Result<pb::Volume, Error> {
        let mut v = self.volume(rpc, uuid).await?;
        v.device_path = self.exported(rpc, uuid).await?.unwrap_or_default();
        Ok(v)
    }

    /// Exports `uuid` (idempotent in the daemon) and waits for its device node.
    async fn export(&self, rpc: &'static str, uuid: &str) -> Result<String, Error> {
        let e = self
            .daemon
            .exports()
            .export_volume(pb::ExportVolumeRequest {
                volume: uuid.to_owned(),
                persistent: false,
                read_only: false,
            })
            .await
            .map_err(|s| self.err(rpc, s))?
            .into_inner();
        let end = Instant::now() + DEVICE_WAIT;
        loop {
            if mounts::device_numbers(device_name(&e.device_path)).is_ok()
                && Path::new(&e.device_path).exists()
            {
                return Ok(e.device_path);
            }
            if Instant::now() >= end {
                return Err(Error::Node {
                    rpc,
                    reason: format!(
                        "coreblkd exported the volume as {} but the device node did not appear \
                         within {} s (is /dev shared with the host, and is udev running?)",
                        e.device_path,
                        DEVICE_WAIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens volume `v`'s LUKS2 mapping on its ublk device `device` (already open on it:
    /// nothing to do), formatting LUKS2 first only on a volume the store reports never
    /// written and without a content source. Returns the mapping's device (`/dev/dm-N`).
    async fn open_crypt(
        &self,
        rpc: &'static str,
        volume_id: &str,
        v: &pb::Volume,
        device: &str,
        pass: &crypt::Passphrase,
    ) -> Result<String, Error> {
        let name = crypt::mapping_name(&v.uuid);
        let node = |what: &str, e: crypt::CryptError| Error::Node {
            rpc,
            reason: format!("{what} of volume {volume_id}: {e}"),
        };
        if let Some(dm) = crypt::mapped(&name) {
            if crypt::maps_onto(&dm, device_name(device)) {
                return Ok(format!("/dev/{dm}"));
            }
            // Left over from an earlier export of the volume (another device).
            crypt::close(&name)
                .await
                .map_err(|e| node("closing a stale LUKS2 mapping", e))?;
        }
        let blank =
            v.never_written && v.source_snapshot_uuid.is_empty() && v.source_volume_uuid.is_empty();
        if blank {
            crypt::format(device, pass)
                .await
                .map_err(|e| node("formatting LUKS2 on the never-written volume", e))?;
            tracing::info!(volume = %volume_id, %device, "LUKS2 header made");
        }
        match crypt::open(device, &name, pass).await {
            Ok(()) => {}
            Err(crypt::CryptError::WrongPassphrase) => {
                return Err(Error::Denied {
                    rpc,
                    reason: format!(
                        "volume {volume_id} is LUKS2-encrypted and the passphrase of the \
                         node-stage secret (key {:?}) does not open it; nothing was changed. \
                         Give the Secret the passphrase the volume (or the source it was \
                         cloned or restored from) was made with",
                        crypt::SECRET_KEY
                    ),
                });
            }
            Err(e) => return Err(node("opening the LUKS2 mapping", e)),
        }
        let dm = crypt::mapped(&name).ok_or_else(|| Error::Node {
            rpc,
            reason: format!("cryptsetup opened {name} but /sys/block shows no such mapping"),
        })?;
        let path = format!("/dev/{dm}");
        let end = Instant::now() + DEVICE_WAIT;
        while !Path::new(&path).exists() {
            if Instant::now() >= end {
                return Err(Error::Node {
                    rpc,
                    reason: format!(
                        "the LUKS2 mapping {name} of volume {volume_id} is open as {dm} but \
                         {path} did not appear within {} s (is /dev a devtmpfs shared with \
                         the host?)",
                        DEVICE_WAIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(volume = %volume_id, mapping = %name, device = %path, "LUKS2 mapping open");
        Ok(path)
    }

    async fn stage(&self, r: csi::NodeStageVolumeRequest) -> Result<(), Error> {
        let rpc = "NodeStageVolume";
        let uuid = self.volume_here(rpc, &r.volume_id)?;
        let staging = self.path(rpc, "staging_target_path", &r.staging_target_path)?;
        let access = access(rpc, r.volume_capability.as_ref())?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        let v = self.volume_and_export(rpc, &uuid).await?;
        if v.state() == pb::VolumeState::Importing {
            return Err(Error::Precondition {
                rpc,
                reason: format!(
                    "volume {} is being filled by an image import; resume the import or \
                     delete the volume",
                    r.volume_id
                ),
            });
        }
        // An encrypted volume opens only with its passphrase: checked before anything is
        // exported or made.
        let passphrase = if crypt::encrypted(&v.labels) {
            Some(
                crypt::passphrase(&r.secrets).map_err(|reason| Error::Invalid {
                    rpc,
                    reason: format!("volume {}: {reason}", r.volume_id),
                })?,
            )
        } else {
            None
        };
        let Access::Mount { fs, flags } = access else {
            // Block mode: the export (and its LUKS2 mapping) is the whole of staging;
            // publish binds the device.
            let device = self.export(rpc, &uuid).await?;
            if let Some(pass) = &passphrase {
                self.open_crypt(rpc, &r.volume_id, &v, &device, pass)
                    .await?;
            }
            return Ok(());
        };
        // The class's mkfs options, checked again for the filesystem asked now (the
        // label is the daemon's copy; nothing is run that the allow-list does not know).
        let mkfs_args = fsopts::mkfs_args(
            &fs,
            v.labels
                .get(fsopts::PARAM_MKFS_OPTIONS)
                .map_or("", String::as_str),
        )
        .map_err(|reason| Error::Invalid {
            rpc,
            reason: format!("volume {}: {reason}", r.volume_id),
        })?;
        // A mount already there must be this volume's, as asked: checked before the
        // export so a conflict changes nothing.
        if let Some(m) = mounts::mounted_at(&table(rpc)?, &staging) {
            let top = top_device(&v);
            let mine = !top.is_empty()
                && mounts::device_numbers(device_name(&top)).is_ok_and(|n| n == m.dev);
            if !mine {
                return Err(Error::Conflict {
                    rpc,
                    reason: format!(
                        "{} is already mounted there ({} {}), not volume {}; unstage that \
                         first",
                        staging.display(),
                        m.fs_type,
                        m.source,
                        r.volume_id
                    ),
                });
            }
            if m.fs_type != fs {
                return Err(Error::Conflict {
                    rpc,
                    reason: format!(
                        "volume {} is staged at {} as {}, not {fs}",
                        r.volume_id,
                        staging.display(),
                        m.fs_type
                    ),
                });
            }
            return Ok(());
        }
        let mut device = self.export(rpc, &uuid).await?;
        if let Some(pass) = &passphrase {
            device = self
                .open_crypt(rpc, &r.volume_id, &v, &device, pass)
                .await?;
        }
        std::fs::create_dir_all(&staging)
            .map_err(io_err(rpc, format!("creating {}", staging.display())))?;
        // Blank by the store's word, never by probing the bytes: never written since it
        // was made and not a clone (a clone shares its source's filesystem).
        let blank =
            v.never_written && v.source_snapshot_uuid.is_empty() && v.source_volume_uuid.is_empty();
        if blank {
            let tool = if fs == "xfs" { "mkfs.xfs" } else { "mkfs.ext4" };
            let mut a: Vec<&str> = mkfs_args.iter().map(String::as_str).collect();
            a.push(&device);
            mounts::run(tool, &a, MKFS_TIMEOUT).await.map_err(node_err(
                rpc,
                format!("making {fs} on the never-written volume {}", r.volume_id),
            ))?;
            tracing::info!(volume = %r.volume_id, %device, %fs, "filesystem made");
        }
        let mut opts = flags;
        // An xfs filesystem that this call did not make may be a copy of another one on
        // this node (a clone, or a clone since inflated) with the same UUID, which xfs
        // refuses to mount twice.
        if fs == "xfs" && !blank && !opts.iter().any(|o| o == "nouuid") {
            opts.push("nouuid".to_owned());
        }
        let target = staging.to_string_lossy();
        let mut args = vec!["-t", fs.as_str()];
        let joined = opts.join(",");
        if !joined.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        args.extend([device.as_str(), &target]);
        mounts::run("mount", &args, MOUNT_TIMEOUT)
            .await
            .map_err(|e| {
                let hint = if blank {
                    String::new()
                } else {
                    format!(
                        " (the volume was written before, so no filesystem was made: if it holds \
                     no {fs} filesystem, it was used as a raw block device or with another \
                     filesystem)"
                    )
                };
                Error::Node {
                    rpc,
                    reason: format!("mounting {device} ({fs}) at {target}: {e}{hint}"),
                }
            })?;
        tracing::info!(volume = %r.volume_id, %device, staging = %target, "staged");
        Ok(())
    }

    async fn unstage(&self, r: csi::NodeUnstageVolumeRequest) -> Result<(), Error> {
        let rpc = "NodeUnstageVolume";
        let uuid = self.volume_here(rpc, &r.volume_id)?;
        let staging = self.path(rpc, "staging_target_path", &r.staging_target_path)?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        let v = match self.volume_and_export(rpc, &uuid).await {
            Ok(v) => v,
            // Deleted meanwhile: nothing left to unexport.
            Err(Error::Daemon { status, .. }) if status.code() == Code::NotFound => {
                return unmount_all(rpc, &staging).await;
            }
            Err(e) => return Err(e),
        };
        // Publishes first (kubelet's order): while one remains, nothing is unmounted or
        // unexported, so a retry after the unpublish finds the volume as it was.
        let top = top_device(&v);
        for dev in [&v.device_path, &top] {
            let name = device_name(dev);
            let (false, Ok(numbers)) = (dev.is_empty(), mounts::device_numbers(name)) else {
                continue;
            };
            let real = staging.canonicalize().unwrap_or_else(|_| staging.clone());
            let users: Vec<String> = mounts::users_of(&table(rpc)?, name, &numbers)
                .into_iter()
                .filter(|p| *p != staging && *p != real)
                .map(|p| p.display().to_string())
                .collect();
            if !users.is_empty() {
                return Err(Error::Precondition {
                    rpc,
                    reason: format!(
                        "{dev} of volume {} is still mounted at {}; unpublish it there first",
                        r.volume_id,
                        users.join(", ")
                    ),
                });
            }
        }
        unmount_all(rpc, &staging).await?;
        if crypt::encrypted(&v.labels) {
            let name = crypt::mapping_name(&uuid);
            crypt::close(&name).await.map_err(|e| Error::Node {
                rpc,
                reason: format!("closing the LUKS2 mapping of volume {}: {e}", r.volume_id),
            })?;
        }
        if v.device_path.is_empty() {
            return Ok(());
        }
        match self
            .daemon
            .exports()
            .unexport_volume(pb::UnexportVolumeRequest {
                volume: uuid,
                force: false,
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(self.err(rpc, s)),
        }
        tracing::info!(volume = %r.volume_id, device = %v.device_path, "unstaged");
        Ok(())
    }

    async fn publish(&self, r: csi::NodePublishVolumeRequest) -> Result<(), Error> {
        let rpc = "NodePublishVolume";
        if ephemeral::is_ephemeral(&r.volume_context) {
            return self.publish_ephemeral(r).await;
        }
        let uuid = self.volume_here(rpc, &r.volume_id)?;
        let target = self.path(rpc, "target_path", &r.target_path)?;
        let staging = self.path(rpc, "staging_target_path", &r.staging_target_path)?;
        let access = access(rpc, r.volume_capability.as_ref())?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        let mut v = self.volume_and_export(rpc, &uuid).await?;
        let exported = !v.device_path.is_empty();
        // An encrypted volume is published from its open mapping.
        v.device_path = top_device(&v);
        let not_staged = |why: String| Error::Precondition {
            rpc,
            reason: format!(
                "volume {} is not staged on this node ({why}); call NodeStageVolume first",
                r.volume_id
            ),
        };
        if v.device_path.is_empty() {
            return Err(not_staged(if exported {
                "its LUKS2 mapping is not open".to_owned()
            } else {
                "coreblkd has not exported it".to_owned()
            }));
        }
        let name = device_name(&v.device_path);
        let numbers = mounts::device_numbers(name)
            .map_err(|_| not_staged(format!("{} does not exist", v.device_path)))?;
        let t = table(rpc)?;
        let same_mode = |m: &MountInfo| m.read_only() == r.readonly;
        match access {
            Access::Block => {
                if let Some(m) = mounts::mounted_at(&t, &target) {
                    if mounts::is_device_node(&target, &numbers) && same_mode(m) {
                        return Ok(());
                    }
                    return Err(occupied(rpc, &target, m, &m.root.display(), &r.volume_id));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(io_err(rpc, format!("creating {}", parent.display())))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(io_err(
                        rpc,
                        format!("creating the file {}", target.display()),
                    ))?;
                bind(rpc, Path::new(&v.device_path), &target, r.readonly).await?;
            }
            Access::Mount { .. } => {
                let staged = mounts::mounted_at(&t, &staging)
                    .filter(|m| m.dev == numbers)
                    .ok_or_else(|| {
                        not_staged(format!(
                            "{} is not mounted at {}",
                            v.device_path,
                            staging.display()
                        ))
                    })?;
                if let Some(m) = mounts::mounted_at(&t, &target) {
                    if m.dev == staged.dev && same_mode(m) {
                        return Ok(());
                    }
                    return Err(occupied(rpc, &target, m, &m.source, &r.volume_id));
                }
                std::fs::create_dir_all(&target)
                    .map_err(io_err(rpc, format!("creating {}", target.display())))?;
                bind(rpc, &staging, &target, r.readonly).await?;
            }
        }
        tracing::info!(volume = %r.volume_id, target = %target.display(), read_only = r.readonly, "published");
        Ok(())
    }

    async fn unpublish(&self, r: csi::NodeUnpublishVolumeRequest) -> Result<(), Error> {
        let rpc = "NodeUnpublishVolume";
        // Not an ID of this driver but a name kubelet gives an inline volume: ephemeral.
        if CsiId::parse(Kind::Volume, &r.volume_id).is_none()
            && ephemeral::volume_name(&r.volume_id).is_ok()
        {
            return self.unpublish_ephemeral(r).await;
        }
        self.volume_here(rpc, &r.volume_id)?;
        let target = self.path(rpc, "target_path", &r.target_path)?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        unmount_all(rpc, &target).await?;
        // The spec asks the plugin to remove what it made at the target path.
        match std::fs::symlink_metadata(&target) {
            Err(_) => {}
            Ok(m) if m.is_dir() => {
                if let Err(e) = std::fs::remove_dir(&target) {
                    tracing::warn!(target = %target.display(), error = %e, "target directory left in place");
                }
            }
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(&target) {
                    tracing::warn!(target = %target.display(), error = %e, "target file left in place");
                }
            }
        }
        tracing::info!(volume = %r.volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    async fn expand(
        &self,
        r: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, Error> {
        let rpc = "NodeExpandVolume";
        let uuid = self.volume_here(rpc, &r.volume_id)?;
        if r.volume_path.is_empty() {
            return Err(Error::Missing {
                rpc,
                field: "volume_path",
            });
        }
        let block = match r.volume_capability.as_ref() {
            Some(_) => access(rpc, r.volume_capability.as_ref())? == Access::Block,
            None => {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(&r.volume_path).is_ok_and(|m| m.file_type().is_block_device())
            }
        };
        // Block mode touches no path (the device follows the volume); a filesystem is
        // grown through its mount, which must be the kubelet's.
        let path = if block {
            PathBuf::from(&r.volume_path)
        } else {
            self.path(rpc, "volume_path", &r.volume_path)?
        };
        if !r.staging_target_path.is_empty() {
            self.path(rpc, "staging_target_path", &r.staging_target_path)?;
        }
        let (required, limit) = r
            .capacity_range
            .as_ref()
            .map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
        let bad = |what: &str, n: i64| Error::Invalid {
            rpc,
            reason: format!("capacity_range.{what} is negative ({n})"),
        };
        let required = u64::try_from(required).map_err(|_| bad("required_bytes", required))?;
        let limit = u64::try_from(limit).map_err(|_| bad("limit_bytes", limit))?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        let mut v = self.volume_and_export(rpc, &uuid).await?;
        if crypt::encrypted(&v.labels) {
            return Err(Error::Invalid {
                rpc,
                reason: format!(
                    "volume {} is LUKS2-encrypted; coreblk does not expand encrypted volumes \
                     yet (restore a snapshot into a larger volume instead)",
                    r.volume_id
                ),
            });
        }
        if required > v.size_bytes {
            // The central resizer has no way to reach this node's daemon: the volume
            // grows here (csi/README.md, Routing). Whole clusters, as CreateVolume makes.
            let pool = self
                .daemon
                .pools()
                .get_pool(pb::GetPoolRequest {
                    pool: v.pool_uuid.clone(),
                })
                .await
                .map_err(|s| self.err(rpc, s))?
                .into_inner();
            let cluster = pool.cluster_size_bytes.max(4096);
            let mut size = required.div_ceil(cluster).saturating_mul(cluster);
            if limit > 0 && size > limit {
                size = required.div_ceil(4096) * 4096;
            }
            v = self
                .daemon
                .volumes()
                .resize_volume(pb::ResizeVolumeRequest {
                    volume: uuid.clone(),
                    size_bytes: size,
                })
                .await
                .map_err(|s| self.err(rpc, s))?
                .into_inner();
            v.device_path = self.exported(rpc, &uuid).await?.unwrap_or_default();
            tracing::info!(volume = %r.volume_id, size_bytes = v.size_bytes, "volume grown");
        }
        if v.device_path.is_empty() {
            return Err(Error::Precondition {
                rpc,
                reason: format!(
                    "volume {} is not staged on this node (coreblkd has not exported it); it \
                     has {} bytes and its filesystem grows when it is staged and expanded",
                    r.volume_id, v.size_bytes
                ),
            });
        }
        let name = device_name(&v.device_path);
        let device_bytes = mounts::device_bytes(name).map_err(io_err(
            rpc,
            format!("reading the size of {}", v.device_path),
        ))?;
        if device_bytes < v.size_bytes {
            return Err(Error::Precondition {
                rpc,
                reason: format!(
                    "volume {} has grown to {} bytes but its device {} is still {device_bytes} \
                     bytes: this kernel cannot resize a ublk device online (UPDATE_SIZE, Linux \
                     >= 6.16). The expansion takes effect after the volume is unstaged and \
                     staged again (stop the pods that use it; Kubernetes then finishes the \
                     resize at the next stage)",
                    r.volume_id, v.size_bytes, v.device_path
                ),
            });
        }
        let capacity_bytes = i64::try_from(device_bytes).unwrap_or(i64::MAX);
        if block {
            return Ok(csi::NodeExpandVolumeResponse { capacity_bytes });
        }
        let t = table(rpc)?;
        let numbers = mounts::device_numbers(name).map_err(io_err(
            rpc,
            format!("reading the numbers of {}", v.device_path),
        ))?;
        let m = mounts::mounted_at(&t, &path)
            .filter(|m| m.dev == numbers)
            .ok_or_else(|| Error::Precondition {
                rpc,
                reason: format!(
                    "{} is not a mount of volume {} ({}); expand a staged or published volume",
                    path.display(),
                    r.volume_id,
                    v.device_path
                ),
            })?;
        let mount_point = m.mount_point.to_string_lossy().into_owned();
        let (tool, arg) = match m.fs_type.as_str() {
            "ext4" => ("resize2fs", v.device_path.as_str()),
            "xfs" => ("xfs_growfs", mount_point.as_str()),
            other => {
                return Err(Error::Invalid {
                    rpc,
                    reason: format!(
                        "{} holds {other}; coreblk grows ext4 and xfs",
                        path.display()
                    ),
                })
            }
        };
        mounts::run(tool, &[arg], GROW_TIMEOUT)
            .await
            .map_err(node_err(
                rpc,
                format!("growing the filesystem of volume {}", r.volume_id),
            ))?;
        tracing::info!(volume = %r.volume_id, capacity_bytes, "filesystem grown");
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes })
    }

    async fn stats(
        &self,
        r: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, Error> {
        use csi::volume_usage::Unit;
        use std::os::unix::fs::FileTypeExt;
        let rpc = "NodeGetVolumeStats";
        // kubelet asks about inline ephemeral volumes by its own ID.
        let inline = CsiId::parse(Kind::Volume, &r.volume_id).is_none()
            && ephemeral::volume_name(&r.volume_id).is_ok();
        let uuid = if inline {
            let name = ephemeral::volume_name(&r.volume_id)
                .map_err(|reason| Error::Invalid { rpc, reason })?;
            self.volume_named(rpc, &name)
                .await?
                .filter(|v| v.labels.get(ephemeral::LABEL_EPHEMERAL) == Some(&r.volume_id))
                .ok_or_else(|| Error::NotFound {
                    rpc,
                    what: format!("ephemeral volume {}", r.volume_id),
                })?
                .uuid
        } else {
            self.volume_here(rpc, &r.volume_id)?
        };
        let path = self.path(rpc, "volume_path", &r.volume_path)?;
        if !r.staging_target_path.is_empty() {
            self.path(rpc, "staging_target_path", &r.staging_target_path)?;
        }
        let meta = std::fs::metadata(&path).map_err(|_| Error::NotFound {
            rpc,
            what: format!("volume path {}", path.display()),
        })?;
        let mut v = self.volume_and_export(rpc, &uuid).await?;
        v.device_path = top_device(&v);
        let mut abnormal = Vec::new();
        match v.state() {
            pb::VolumeState::Ready => {}
            pb::VolumeState::Importing => {
                abnormal.push("the volume is being filled by an image import".to_owned());
            }
            pb::VolumeState::Unspecified => {
                abnormal.push("coreblkd reports no state for the volume".to_owned());
            }
        }
        let numbers = if v.device_path.is_empty() {
            abnormal.push("coreblkd does not export the volume on this node".to_owned());
            None
        } else {
            mounts::device_numbers(device_name(&v.device_path)).ok()
        };
        let t = table(rpc)?;
        let mounted = mounts::mounted_at(&t, &path);
        let mut usage = Vec::new();
        if meta.file_type().is_block_device() {
            let ok = numbers
                .as_deref()
                .is_some_and(|n| mounts::is_device_node(&path, n));
            if !ok {
                abnormal.push(format!(
                    "{} is not the device node of {}",
                    path.display(),
                    v.device_path
                ));
            }
            if let Ok(total) = mounts::device_bytes(device_name(&v.device_path)) {
                usage.push(csi::VolumeUsage {
                    total: i64::try_from(total).unwrap_or(i64::MAX),
                    unit: Unit::Bytes.into(),
                    ..Default::default()
                });
            }
        } else {
            match mounted {
                None => abnormal.push(format!("{} is not mounted", path.display())),
                Some(m) if numbers.as_deref() != Some(m.dev.as_str()) => abnormal.push(format!(
                    "{} is mounted from {}, not from the volume's device {}",
                    path.display(),
                    m.source,
                    v.device_path
                )),
                Some(_) => {
                    let s = rustix::fs::statvfs(&path).map_err(|e| {
                        io_err(rpc, format!("statvfs {}", path.display()))(e.into())
                    })?;
                    let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
                    let frsize = s.f_frsize;
                    usage.push(csi::VolumeUsage {
                        available: n(s.f_bavail.saturating_mul(frsize)),
                        total: n(s.f_blocks.saturating_mul(frsize)),
                        used: n(s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(frsize)),
                        unit: Unit::Bytes.into(),
                    });
                    usage.push(csi::VolumeUsage {
                        available: n(s.f_favail),
                        total: n(s.f_files),
                        used: n(s.f_files.saturating_sub(s.f_ffree)),
                        unit: Unit::Inodes.into(),
                    });
                }
            }
        }
        let volume_condition = Some(if abnormal.is_empty() {
            csi::VolumeCondition {
                abnormal: false,
                message: "volume is exported and mounted".to_owned(),
            }
        } else {
            csi::VolumeCondition {
                abnormal: true,
                message: abnormal.join("; "),
            }
        });
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        })
    }
}

/// How often the plugin looks for orphaned ephemeral volumes.
const SWEEP_PERIOD: Duration = Duration::from_secs(300);
/// How soon it looks again when the daemon did not answer (starting, restarting).
const SWEEP_RETRY: Duration = Duration::from_secs(5);
/// The youngest ephemeral volume a periodic sweep removes: a publish of another plugin
/// instance on the node (an upgrade's overlap) may be between its create and its mount.
/// The first sweep, at start-up, takes every orphan.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(600);

/// Ephemeral inline volumes (`ephemeral.rs`): publish makes, unpublish deletes, the sweep
/// removes orphans.
impl Node {
    /// The daemon's volume named `name`, `None` when it has none.
    async fn volume_named(
        &self,
        rpc: &'static str,
        name: &str,
    ) -> Result<Option<pb::Volume>, Error> {
        match self
            .daemon
            .volumes()
            .get_volume(pb::GetVolumeRequest {
                volume: name.to_owned(),
            })
            .await
        {
            Ok(v) => Ok(Some(v.into_inner()).filter(|v| v.name == name)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(self.err(rpc, s)),
        }
    }

    /// NodePublishVolume of an inline ephemeral volume: create (idempotent by name),
    /// export, make the filesystem on the never-written volume and mount it at the
    /// target, in one step. A failure after the create removes the volume again.
    async fn publish_ephemeral(&self, r: csi::NodePublishVolumeRequest) -> Result<(), Error> {
        let rpc = "NodePublishVolume";
        let invalid = |reason: String| Error::Invalid { rpc, reason };
        let name = ephemeral::volume_name(&r.volume_id).map_err(invalid)?;
        let target = self.path(rpc, "target_path", &r.target_path)?;
        let access = access(rpc, r.volume_capability.as_ref())?;
        let attrs = InlineAttrs::parse(&r.volume_context).map_err(invalid)?;
        let Access::Mount { fs: cap_fs, flags } = access else {
            return Err(invalid(
                "an ephemeral inline volume is a filesystem; for a raw block device use a \
                 generic ephemeral volume (ephemeral.volumeClaimTemplate) with volumeMode: Block"
                    .to_owned(),
            ));
        };
        let named = match &r
            .volume_capability
            .as_ref()
            .and_then(|c| c.access_type.clone())
        {
            Some(csi::volume_capability::AccessType::Mount(m)) if !m.fs_type.is_empty() => {
                Some(cap_fs)
            }
            _ => None,
        };
        let fs = match (named, attrs.fs_type.clone()) {
            (Some(c), Some(a)) if c != a => {
                return Err(invalid(format!(
                    "the pod's fsType is {c} but volume attribute {} is {a}; give one",
                    ephemeral::ATTR_FSTYPE
                )))
            }
            (Some(f), _) | (None, Some(f)) => f,
            (None, None) => DEFAULT_FS.to_owned(),
        };
        let mkfs = fsopts::mkfs_args(
            &fs,
            attrs
                .labels
                .get(fsopts::PARAM_MKFS_OPTIONS)
                .map_or("", String::as_str),
        )
        .map_err(invalid)?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        let existing = self.volume_named(rpc, &name).await?;
        if let Some(v) = &existing {
            if v.labels.get(ephemeral::LABEL_EPHEMERAL) != Some(&r.volume_id) {
                return Err(Error::Conflict {
                    rpc,
                    reason: format!(
                        "coreblkd already has a volume {name} that is not ephemeral volume {}; \
                         rename or delete it",
                        r.volume_id
                    ),
                });
            }
        }
        if let Some(m) = mounts::mounted_at(&table(rpc)?, &target) {
            if let Some(v) = &existing {
                let mut v = v.clone();
                v.device_path = self.exported(rpc, &v.uuid).await?.unwrap_or_default();
                let top = top_device(&v);
                let mine = !top.is_empty()
                    && mounts::device_numbers(device_name(&top)).is_ok_and(|n| n == m.dev);
                if mine && m.read_only() == r.readonly {
                    return Ok(());
                }
            }
            return Err(occupied(rpc, &target, m, &m.source, &r.volume_id));
        }
        let v = match existing {
            Some(v) => v,
            None => {
                let pool = self
                    .daemon
                    .pools()
                    .get_pool(pb::GetPoolRequest {
                        pool: attrs.pool.clone(),
                    })
                    .await
                    .map_err(|s| {
                        if s.code() == Code::NotFound {
                            invalid(format!(
                                "volume attribute {} names {:?}, which this node does not \
                                 have: create the pool or fix the pod's volumeAttributes",
                                ephemeral::ATTR_POOL,
                                attrs.pool
                            ))
                        } else {
                            self.err(rpc, s)
                        }
                    })?
                    .into_inner();
                let cluster = pool.cluster_size_bytes.max(4096);
                let size_bytes = attrs.size_bytes.div_ceil(cluster).saturating_mul(cluster);
                let mut labels = attrs.labels.clone();
                labels.insert(ephemeral::LABEL_EPHEMERAL.to_owned(), r.volume_id.clone());
                labels.insert(
                    ephemeral::LABEL_TARGET.to_owned(),
                    target.to_string_lossy().into_owned(),
                );
                for (k, l) in [
                    ("csi.storage.k8s.io/pod.name", "csi.storage.k8s.io/pod/name"),
                    (
                        "csi.storage.k8s.io/pod.namespace",
                        "csi.storage.k8s.io/pod/namespace",
                    ),
                ] {
                    if let Some(val) = r.volume_context.get(k) {
                        labels.insert(l.to_owned(), val.clone());
                    }
                }
                let v = self
                    .daemon
                    .volumes()
                    .create_volume(pb::CreateVolumeRequest {
                        // Inline volumes take no QoS keys (their attributes refuse them).
                        qos: None,
                        pool: pool.uuid,
                        name: name.clone(),
                        size_bytes,
                        thick: false,
                        labels,
                        source: None,
                    })
                    .await
                    .map_err(|s| self.err(rpc, s))?
                    .into_inner();
                tracing::info!(volume = %v.uuid, ephemeral = %r.volume_id, size_bytes, "ephemeral volume created");
                v
            }
        };
        let made = self
            .mount_ephemeral(rpc, &r, &v, &target, &fs, flags, &mkfs)
            .await;
        if let Err(e) = made {
            // Nothing is left behind: kubelet retries the publish from the start.
            let _ = unmount_all(rpc, &target).await;
            if let Err(clean) = self.remove_ephemeral(rpc, &v.uuid).await {
                tracing::warn!(volume = %v.uuid, error = %Status::from(clean).message(), "ephemeral volume left for the sweep");
            }
            return Err(e);
        }
        tracing::info!(volume = %v.uuid, ephemeral = %r.volume_id, target = %target.display(), "ephemeral volume published");
        Ok(())
    }

    /// Export, filesystem (only on a never-written volume), mount at `target`.
    #[allow(clippy::too_many_arguments)]
    async fn mount_ephemeral(
        &self,
        rpc: &'static str,
        r: &csi::NodePublishVolumeRequest,
        v: &pb::Volume,
        target: &Path,
        fs: &str,
        flags: Vec<String>,
        mkfs: &[String],
    ) -> Result<(), Error> {
        let device = self.export(rpc, &v.uuid).await?;
        if v.never_written {
            let tool = if fs == "xfs" { "mkfs.xfs" } else { "mkfs.ext4" };
            let mut a: Vec<&str> = mkfs.iter().map(String::as_str).collect();
            a.push(&device);
            mounts::run(tool, &a, MKFS_TIMEOUT).await.map_err(node_err(
                rpc,
                format!("making {fs} on ephemeral volume {}", r.volume_id),
            ))?;
        }
        std::fs::create_dir_all(target)
            .map_err(io_err(rpc, format!("creating {}", target.display())))?;
        let mut opts = flags;
        if r.readonly {
            opts.push("ro".to_owned());
        }
        let t = target.to_string_lossy();
        let mut args = vec!["-t", fs];
        let joined = opts.join(",");
        if !joined.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        args.extend([device.as_str(), &t]);
        mounts::run("mount", &args, MOUNT_TIMEOUT)
            .await
            .map_err(node_err(rpc, format!("mounting {device} ({fs}) at {t}")))?;
        Ok(())
    }

    /// Unexports and deletes volume `uuid` (each gone already: fine).
    async fn remove_ephemeral(&self, rpc: &'static str, uuid: &str) -> Result<(), Error> {
        // An unexport that fails (the device still open, or a node whose daemon cannot
        // export at all) is reported only if the delete then fails too: the daemon
        // refuses to delete a volume that is really exported.
        let mut unexport_failed = None;
        if matches!(self.exported(rpc, uuid).await, Ok(Some(_))) {
            match self
                .daemon
                .exports()
                .unexport_volume(pb::UnexportVolumeRequest {
                    volume: uuid.to_owned(),
                    force: false,
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => unexport_failed = Some(s),
            }
        }
        match self
            .daemon
            .volumes()
            .delete_volume(pb::DeleteVolumeRequest {
                volume: uuid.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.err(rpc, unexport_failed.unwrap_or(s))),
        }
    }

    /// NodeUnpublishVolume of an inline ephemeral volume: unmount, then unexport and
    /// delete it (its space returns to the pool). Idempotent: a volume already gone is
    /// fine; an unpublish that fails after the unmount (the daemon down) deletes it at
    /// kubelet's retry, or the sweep does.
    async fn unpublish_ephemeral(&self, r: csi::NodeUnpublishVolumeRequest) -> Result<(), Error> {
        let rpc = "NodeUnpublishVolume";
        let target = self.path(rpc, "target_path", &r.target_path)?;
        let name = ephemeral::volume_name(&r.volume_id)
            .map_err(|reason| Error::Invalid { rpc, reason })?;
        let _op = self.busy.begin(rpc, &r.volume_id)?;
        unmount_all(rpc, &target).await?;
        if let Err(e) = std::fs::remove_dir(&target) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(target = %target.display(), error = %e, "target directory left in place");
            }
        }
        let Some(v) = self.volume_named(rpc, &name).await? else {
            return Ok(());
        };
        if v.labels.get(ephemeral::LABEL_EPHEMERAL) != Some(&r.volume_id) {
            // Not an ephemeral volume of this ID: not ours to delete.
            return Ok(());
        }
        self.remove_ephemeral(rpc, &v.uuid).await?;
        tracing::info!(volume = %v.uuid, ephemeral = %r.volume_id, "ephemeral volume deleted");
        Ok(())
    }

    /// Removes orphaned ephemeral volumes: labelled ephemeral, not mounted at their target
    /// from their device, no call in progress for them, and (when `min_age` is given)
    /// created at least that long ago. Returns how many were removed.
    ///
    /// # Errors
    /// The daemon's answer when it cannot list volumes.
    pub async fn sweep_ephemeral(&self, min_age: Option<Duration>) -> Result<usize, Error> {
        let rpc = "sweep of ephemeral volumes";
        let mut found = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .daemon
                .volumes()
                .list_volumes(pb::ListVolumesRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .map_err(|s| self.err(rpc, s))?
                .into_inner();
            found.extend(
                page.volumes
                    .into_iter()
                    .filter(|v| v.labels.contains_key(ephemeral::LABEL_EPHEMERAL)),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for v in found {
            let id = v.labels[ephemeral::LABEL_EPHEMERAL].clone();
            if let (Some(age), Some(t)) = (min_age, v.create_time) {
                let made = std::time::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(t.seconds).unwrap_or(0));
                if now.duration_since(made).unwrap_or_default() < age {
                    continue;
                }
            }
            let Ok(_op) = self.busy.begin(rpc, &id) else {
                continue;
            };
            let mut v = v;
            v.device_path = self.exported(rpc, &v.uuid).await?.unwrap_or_default();
            let top = top_device(&v);
            let target = v
                .labels
                .get(ephemeral::LABEL_TARGET)
                .map(PathBuf::from)
                .unwrap_or_default();
            let in_use = !top.is_empty()
                && mounts::device_numbers(device_name(&top)).is_ok_and(|n| {
                    mounts::mounted_at(&table(rpc).unwrap_or_default(), &target)
                        .is_some_and(|m| m.dev == n)
                });
            if in_use {
                continue;
            }
            match self.remove_ephemeral(rpc, &v.uuid).await {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(volume = %v.uuid, ephemeral = %id, target = %target.display(), "orphaned ephemeral volume removed");
                }
                Err(e) => {
                    tracing::warn!(volume = %v.uuid, ephemeral = %id, error = %Status::from(e).message(), "orphaned ephemeral volume not removed; retried at the next sweep");
                }
            }
        }
        Ok(removed)
    }

    /// Sweeps at start-up (every orphan, as soon as the daemon answers), then every
    /// [`SWEEP_PERIOD`] (orphans older than [`SWEEP_MIN_AGE`]). Runs until the process
    /// ends.
    pub async fn sweep_loop(self) {
        let mut first = true;
        loop {
            let min_age = (!first).then_some(SWEEP_MIN_AGE);
            match self.sweep_ephemeral(min_age).await {
                Ok(n) => {
                    if first || n > 0 {
                        tracing::info!(removed = n, "ephemeral volume sweep done");
                    }
                    first = false;
                    tokio::time::sleep(SWEEP_PERIOD).await;
                }
                Err(e) => {
                    tracing::debug!(error = %Status::from(e).message(), "ephemeral volume sweep: daemon not ready");
                    tokio::time::sleep(SWEEP_RETRY).await;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        self.stage(r.into_inner()).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        self.unstage(r.into_inner()).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        self.publish(r.into_inner()).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(r.into_inner()).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Ok(Response::new(self.stats(r.into_inner()).await?))
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(r.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let cap = |t: Cap| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t.into() },
            )),
        };
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(Cap::StageUnstageVolume),
                cap(Cap::GetVolumeStats),
                cap(Cap::ExpandVolume),
                cap(Cap::VolumeCondition),
                cap(Cap::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let info = self
            .daemon
            .node()
            .get_node_info(pb::GetNodeInfoRequest {})
            .await
            .map_err(|status| Error::Daemon {
                rpc: "NodeGetInfo",
                socket: self.daemon.socket().to_path_buf(),
                status,
            })?
            .into_inner();
        let max_exports = info.ublk.as_ref().map_or(0, |u| u.max_exports);
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: i64::from(max_exports),
            accessible_topology: Some(node_topology(&self.node_id)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: AccessType) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(AccessMode { mode: mode.into() }),
        }
    }

    fn mount(fs: &str, flags: &[&str]) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            mount_flags: flags.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn capabilities_become_an_access() {
        let rpc = "NodeStageVolume";
        assert_eq!(
            access(rpc, Some(&cap(Mode::SingleNodeWriter, mount("", &[])))).ok(),
            Some(Access::Mount {
                fs: "ext4".to_owned(),
                flags: vec![]
            })
        );
        assert_eq!(
            access(
                rpc,
                Some(&cap(
                    Mode::SingleNodeSingleWriter,
                    mount("XFS", &["noatime"])
                ))
            )
            .ok(),
            Some(Access::Mount {
                fs: "xfs".to_owned(),
                flags: vec!["noatime".to_owned()]
            })
        );
        assert_eq!(
            access(
                rpc,
                Some(&cap(
                    Mode::SingleNodeReaderOnly,
                    AccessType::Block(BlockVolume {})
                ))
            )
            .ok(),
            Some(Access::Block)
        );
        for bad in [
            None,
            Some(cap(Mode::MultiNodeMultiWriter, mount("ext4", &[]))),
            Some(cap(Mode::SingleNodeWriter, mount("btrfs", &[]))),
            Some(cap(Mode::SingleNodeWriter, mount("ext4", &["a,b"]))),
            Some(cap(Mode::SingleNodeWriter, mount("ext4", &["a b"]))),
        ] {
            let e = access(rpc, bad.as_ref()).expect_err("refused");
            assert_eq!(Status::from(e).code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn device_names() {
        assert_eq!(device_name("/dev/ublkb3"), "ublkb3");
        assert_eq!(device_name("ublkb3"), "ublkb3");
    }
}
