//! The node's mount table and the external tools the Node service runs: `mount`,
//! `umount`, `mkfs.ext4`/`mkfs.xfs`, `resize2fs`, `xfs_growfs`, `cryptsetup`, each with a
//! deadline.
//!
//! What is staged and published is read back from `/proc/self/mountinfo` at each call, so
//! the plugin keeps no state files and a restart of the plugin (or of coreblkd, whose
//! exports outlive it) loses nothing: a mount is there or it is not.
//!
//! Owns: [`MountInfo`], [`mount_table`], [`run`], [`device_numbers`]. Must never: read a
//! tenant's bytes (no blkid, no probing: whether to make a filesystem is the store's
//! never-written flag, decided by the caller).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted file system's device (for a bind mount of a device
    /// node: the file system holding the node, e.g. devtmpfs).
    pub dev: String,
    /// The directory or file inside that file system that is mounted (`/` for a whole
    /// file system; `/ublkb3` for a bind of a device node from devtmpfs).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    /// The file system type (`ext4`, `xfs`, `devtmpfs`).
    pub fs_type: String,
    /// The mount source (`/dev/ublkb3`).
    pub source: String,
}

impl MountInfo {
    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &field[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountInfo {
                dev: l[2].to_owned(),
                root: PathBuf::from(unescape(l[3])),
                mount_point: PathBuf::from(unescape(l[4])),
                mount_options: l[5].split(',').map(str::to_owned).collect(),
                fs_type: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
///
/// # Errors
/// Reading `/proc/self/mountinfo` failed.
pub fn mount_table() -> std::io::Result<Vec<MountInfo>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The topmost mount at `path` (the last one mounted there), if any. The table holds
/// resolved paths, so `path` also matches once its symlinks are resolved (a kubelet
/// directory that is a link).
pub fn mounted_at<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let real = path.canonicalize().ok();
    table
        .iter()
        .rev()
        .find(|m| m.mount_point == path || real.as_deref() == Some(m.mount_point.as_path()))
}

/// `major:minor` of block device `name` (`ublkb3`) from sysfs.
///
/// # Errors
/// The device does not exist.
pub fn device_numbers(name: &str) -> std::io::Result<String> {
    Ok(
        std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))?
            .trim()
            .to_owned(),
    )
}

/// The size of block device `name` in bytes, from sysfs.
///
/// # Errors
/// The device does not exist.
pub fn device_bytes(name: &str) -> std::io::Result<u64> {
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(sectors * 512)
}

/// `major:minor` of a device number (`st_rdev`), as Linux encodes it.
pub fn dev_t_numbers(rdev: u64) -> String {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    format!("{major}:{minor}")
}

/// Whether `path` is a block device node of device `numbers` (`major:minor`).
pub fn is_device_node(path: &Path, numbers: &str) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_block_device() && dev_t_numbers(m.rdev()) == numbers)
}

/// The mount points that use block device `name` (`ublkb3`, numbers `numbers`): file
/// systems on it, and bind mounts of its device node (block-mode publishes).
pub fn users_of(table: &[MountInfo], name: &str, numbers: &str) -> Vec<PathBuf> {
    table
        .iter()
        .filter(|m| {
            m.dev == numbers
                || (m.root.file_name().is_some_and(|n| n == name)
                    && is_device_node(&m.mount_point, numbers))
        })
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Why an external tool failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It could not be started.
    #[error("cannot run {cmd}: {source} (is it installed in the plugin's image?)")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("{cmd} did not finish within {timeout_s} s and was killed")]
    Timeout {
        /// The command line.
        cmd: String,
        /// The deadline.
        timeout_s: u64,
    },
    /// It exited with an error.
    #[error("{cmd} failed ({status}): {output}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its exit code (none when a signal ended it).
        code: Option<i32>,
        /// Its stderr and stdout, trimmed.
        output: String,
    },
}

/// Longest wait for a killed tool to exit (FIFREEZE flushes data, mkfs writes, and
/// neither may be interruptible): until it has, what it does could land after the answer
/// (a freeze after its thaw, a filesystem after the error).
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Runs `program args` with stdin closed, the C locale (error text can be told apart) and a
/// deadline; a tool past its deadline is killed and waited for (up to [`KILL_WAIT`])
/// before this returns. Its stdout, trimmed, on success.
///
/// # Errors
/// [`RunError`]: not started, timed out (killed), or a non-zero exit with its output.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, RunError> {
    run_with_input(program, args, None, timeout).await
}

/// [`run`], with `input` written to the tool's stdin and then closed (a secret, such as a
/// LUKS passphrase: never on the command line, which other processes can read, and never
/// in an error or a log: only the command line and the tool's output are).
///
/// # Errors
/// As [`run`].
pub async fn run_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, RunError> {
    let cmd = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%cmd, "running");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    let (stdout, stderr, stdin) = (child.stdout.take(), child.stderr.take(), child.stdin.take());
    let waited = tokio::time::timeout(timeout, async {
        let feed = async {
            use tokio::io::AsyncWriteExt;
            if let (Some(mut pipe), Some(bytes)) = (stdin, input) {
                // A tool that exits without reading all of it: its own error says why.
                let _ = pipe.write_all(bytes).await;
                let _ = pipe.shutdown().await;
            }
        };
        let ((), out, err) = tokio::join!(feed, read_all(stdout), read_all(stderr));
        (child.wait().await, out, err)
    })
    .await;
    let (status, out, err) = match waited {
        Ok((Ok(status), out, err)) => (status, out, err),
        Ok((Err(source), _, _)) => return Err(RunError::Spawn { cmd, source }),
        Err(_) => {
            let _ = child.start_kill();
            if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                tracing::error!(%cmd, wait_s = KILL_WAIT.as_secs(), "a killed tool has not exited");
            }
            return Err(RunError::Timeout {
                cmd,
                timeout_s: timeout.as_secs(),
            });
        }
    };
    if status.success() {
        return Ok(out);
    }
    let output = [err, out]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(RunError::Failed {
        cmd,
        status: status.to_string(),
        code: status.code(),
        output,
    })
}

/// All of a child's pipe, as trimmed text.
async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut buf).await;
    }
    String::from_utf8_lossy(&buf).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=100k
101 22 259:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.coreblk.io/abc/globalmount rw,relatime shared:50 - ext4 /dev/ublkb3 rw
102 22 259:3 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pv1/mount ro,relatime shared:50 - ext4 /dev/ublkb3 rw
103 22 0:5 /ublkb4 /var/lib/kubelet/plugins/kubernetes.io~csi/volumeDevices/publish/pv2/p2 rw,nosuid shared:2 - devtmpfs udev rw
104 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw
garbage line
";

    #[test]
    fn mountinfo_parses() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 6);
        assert_eq!(t[2].dev, "259:3");
        assert_eq!(t[2].fs_type, "ext4");
        assert_eq!(t[2].source, "/dev/ublkb3");
        assert!(!t[2].read_only());
        assert!(t[3].read_only());
        assert_eq!(t[4].root, PathBuf::from("/ublkb4"));
        assert_eq!(t[5].mount_point, PathBuf::from("/mnt/with space"));
        let at = mounted_at(
            &t,
            Path::new("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pv1/mount"),
        )
        .expect("mounted");
        assert_eq!(at.dev, "259:3");
        assert_eq!(users_of(&t, "ublkb3", "259:3").len(), 2);
        // A device-node bind counts only when the mount point is that device's node.
        assert!(users_of(&t, "ublkb4", "259:4").is_empty());
    }

    #[test]
    fn device_numbers_decode() {
        // makedev(259, 3) and a large minor.
        assert_eq!(dev_t_numbers((259 << 8) | 3), "259:3");
        let rdev = ((259u64 & 0xfff) << 8) | (300 & 0xff) | ((300u64 & !0xff) << 12);
        assert_eq!(dev_t_numbers(rdev), "259:300");
    }

    #[tokio::test]
    async fn tools_report_failures_and_deadlines() {
        assert_eq!(
            run("sh", &["-c", "echo hi"], Duration::from_secs(10))
                .await
                .ok()
                .as_deref(),
            Some("hi")
        );
        let e = run(
            "sh",
            &["-c", "echo bad >&2; exit 3"],
            Duration::from_secs(10),
        )
        .await
        .expect_err("fails");
        assert!(e.to_string().contains("bad"), "{e}");
        assert!(matches!(e, RunError::Failed { code: Some(3), .. }), "{e}");
        // Input reaches stdin, and is not in the error.
        assert_eq!(
            run_with_input("cat", &[], Some(b"secret-in"), Duration::from_secs(10))
                .await
                .ok()
                .as_deref(),
            Some("secret-in")
        );
        let e = run_with_input(
            "sh",
            &["-c", "read x; exit 2"],
            Some(b"secret-in\n"),
            Duration::from_secs(10),
        )
        .await
        .expect_err("fails");
        assert!(!e.to_string().contains("secret-in"), "{e}");
        let e = run("sleep", &["5"], Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
        let e = run("/nonexistent/tool", &[], Duration::from_secs(1))
            .await
            .expect_err("no such tool");
        assert!(matches!(e, RunError::Spawn { .. }), "{e}");
    }
}
