//! Filesystem freezes around snapshots (issue 13, DESIGN §7): a snapshot of a mounted
//! volume is taken while its filesystem is frozen (FIFREEZE through util-linux
//! `fsfreeze -f`, so no unsafe code here), which makes it filesystem-consistent — the
//! clone mounts without journal recovery. The frozen window has a hard deadline
//! ([`FROZEN_WINDOW_MAX`]) and the thaw always runs: after the operation, after its error,
//! after the deadline, after a failed freeze (except one refused because another process
//! holds the freeze), and — from a drop guard — when the future is dropped or unwinds.
//! At start-up the node plugin thaws every ublk filesystem a crashed plugin may have left
//! frozen ([`thaw_left_frozen`]): a freeze that never ends hangs every writer.
//!
//! Owns: [`with_frozen`], [`Freezer`] and its real implementation [`Fsfreeze`],
//! [`freeze_candidates`], [`thaw_left_frozen`]. Must never: freeze without a deadline,
//! leave a window it opened frozen, or thaw a filesystem that another process froze
//! (a freeze refused with EBUSY is left alone).
//!
//! Start reading at [`with_frozen`]; the caller is the Controller's `create_snapshot`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::mounts::{self, MountInfo, RunError};

/// Longest a filesystem stays frozen for a snapshot, from the start of the freeze to the
/// start of the thaw. A snapshot that has not completed by then is given up (the
/// filesystem is thawed first) and the call answers DEADLINE_EXCEEDED.
pub const FROZEN_WINDOW_MAX: Duration = Duration::from_secs(10);
/// Deadline of one `fsfreeze -u`.
pub const THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Thaw attempts before the call reports that the filesystem is still frozen.
pub const THAW_TRIES: u32 = 3;
/// Deadline of the `sync -f` that writes the dirty data back before the freeze, outside
/// the frozen window, so the freeze itself has little left to flush.
pub const PRESYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, after the window closed without a result, the operation's late result is
/// still awaited (so a snapshot taken after the thaw can be deleted, not handed out).
pub const LATE_RESULT_WAIT: Duration = Duration::from_secs(30);
/// TEST ONLY: milliseconds the plugin waits inside each frozen window, before the
/// snapshot call, so a test can act while a filesystem is frozen (write to it, kill the
/// plugin). The wait counts against [`FROZEN_WINDOW_MAX`]. Never set it in production.
pub const TEST_HOLD_ENV: &str = "COREBLK_CSI_TEST_FREEZE_HOLD_MS";

/// The test-only hold of [`TEST_HOLD_ENV`] (zero when unset or not a number).
pub fn test_hold() -> Duration {
    let ms = std::env::var(TEST_HOLD_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if ms > 0 {
        tracing::warn!(
            hold_ms = ms,
            "{TEST_HOLD_ENV} is set: every snapshot of a mounted volume holds the freeze of \
             its filesystem that much longer (a test hook; unset it in production)"
        );
    }
    Duration::from_millis(ms)
}

/// Why `fsfreeze` failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The freeze was refused because the filesystem is frozen already (EBUSY):
    /// another process holds that freeze.
    #[error("{0} (the filesystem is frozen already)")]
    AlreadyFrozen(RunError),
    /// The thaw found nothing frozen (EINVAL): nothing to undo.
    #[error("{0} (the filesystem was not frozen)")]
    NotFrozen(RunError),
    /// Anything else: not started, timed out, another error.
    #[error(transparent)]
    Other(RunError),
}

/// What freezes and thaws a filesystem through one of its mount points; [`Fsfreeze`] in
/// production, a recording fake in the unit tests.
pub trait Freezer: Send + Sync {
    /// Freezes the filesystem mounted at `point`. When it returns, no freeze started by
    /// this call is still under way (a timed-out tool has been killed and has exited, or
    /// the wait for its exit has run out).
    fn freeze(
        &self,
        point: &Path,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ToolError>> + Send;
    /// Thaws the filesystem mounted at `point`.
    fn thaw(
        &self,
        point: &Path,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ToolError>> + Send;
    /// Thaws without an async runtime: from a drop guard (a dropped future, a panic, the
    /// runtime shutting down). Best effort; logs what happened.
    fn thaw_blocking(&self, point: &Path);
}

/// The util-linux `fsfreeze` tool (FIFREEZE / FITHAW), run with `LC_ALL=C` so its error
/// text can be told apart (EBUSY, EINVAL).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fsfreeze;

/// EBUSY / EINVAL in a tool's output, with the C locale's strerror text.
fn classify(e: RunError) -> ToolError {
    match &e {
        RunError::Failed { output, .. } if output.contains("Device or resource busy") => {
            ToolError::AlreadyFrozen(e)
        }
        RunError::Failed { output, .. } if output.contains("Invalid argument") => {
            ToolError::NotFrozen(e)
        }
        _ => ToolError::Other(e),
    }
}

impl Freezer for Fsfreeze {
    async fn freeze(&self, point: &Path, timeout: Duration) -> Result<(), ToolError> {
        let p = point.to_string_lossy();
        mounts::run("fsfreeze", &["-f", &p], timeout)
            .await
            .map(drop)
            .map_err(classify)
    }

    async fn thaw(&self, point: &Path, timeout: Duration) -> Result<(), ToolError> {
        let p = point.to_string_lossy();
        mounts::run("fsfreeze", &["-u", &p], timeout)
            .await
            .map(drop)
            .map_err(classify)
    }

    fn thaw_blocking(&self, point: &Path) {
        let child = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(point)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(mount_point = %point.display(), error = %e, "cannot run fsfreeze -u: the filesystem may stay frozen; run fsfreeze -u on the node");
                return;
            }
        };
        let end = Instant::now() + THAW_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(mount_point = %point.display(), %status, "thawed from a drop guard (the freezing call ended early)");
                    return;
                }
                Ok(None) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!(mount_point = %point.display(), "fsfreeze -u did not finish: the filesystem may stay frozen; run fsfreeze -u on the node");
                    return;
                }
            }
        }
    }
}

/// Writes the filesystem's dirty data back (`sync -f`, syncfs) before a freeze, so the
/// frozen window is short. Best effort: a failure is logged and the freeze goes on.
pub async fn presync(point: &Path) {
    let p = point.to_string_lossy();
    if let Err(e) = mounts::run("sync", &["-f", &p], PRESYNC_TIMEOUT).await {
        tracing::warn!(mount_point = %p, error = %e, "sync before the freeze failed; freezing anyway");
    }
}

/// One frozen window: what to freeze, for whom, for how long at most.
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    /// The volume (for the logs).
    pub volume: &'a str,
    /// A mount point of the filesystem (bind mounts share the superblock, hence the
    /// freeze).
    pub point: &'a Path,
    /// The deadline of the whole window, freeze included ([`FROZEN_WINDOW_MAX`]).
    pub max: Duration,
    /// How long a late result is still awaited after the window closed
    /// ([`LATE_RESULT_WAIT`]).
    pub late_wait: Duration,
    /// TEST ONLY: a wait inside the window before the operation ([`TEST_HOLD_ENV`]).
    pub hold: Duration,
}

/// How the operation inside a window ended (the filesystem has been thawed either way).
#[derive(Debug, PartialEq, Eq)]
pub enum Frozen<T> {
    /// It finished inside the window.
    InTime(T),
    /// The window closed first; its result, if it came within the late wait (taken after
    /// the thaw, or not: the caller must not hand it out as consistent).
    TooLate(Option<T>),
}

/// Why a window could not be held or closed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// Another process holds a freeze of the filesystem: nothing was done, and that
    /// freeze is left to its owner.
    #[error("the filesystem at {} is frozen already, by another process (an fsfreeze -f, a backup tool?): {source}; thaw it (fsfreeze -u) or wait, then retry", point.display())]
    AlreadyFrozen {
        /// The mount point.
        point: PathBuf,
        /// The tool's answer.
        source: ToolError,
    },
    /// The freeze failed (it was thawed again, in case it took effect).
    #[error("freezing the filesystem at {} failed: {source}", point.display())]
    Freeze {
        /// The mount point.
        point: PathBuf,
        /// Why.
        source: ToolError,
    },
    /// Every thaw failed: the filesystem is still frozen and its writers wait.
    #[error("thawing the filesystem at {} failed {tries} times ({source}): it is STILL FROZEN and its writers wait; run `fsfreeze -u {}` on the node (a restart of coreblk-csi also thaws it)", point.display(), point.display())]
    Thaw {
        /// The mount point.
        point: PathBuf,
        /// Attempts made.
        tries: u32,
        /// The last failure.
        source: ToolError,
    },
}

/// Thaws `point` when dropped while armed: the `finally` of [`with_frozen`] for a future
/// that is dropped (the caller went away, the runtime stops) or unwinds.
struct ThawGuard<'a, F: Freezer> {
    freezer: &'a F,
    point: &'a Path,
    armed: bool,
}

impl<F: Freezer> Drop for ThawGuard<'_, F> {
    fn drop(&mut self) {
        if self.armed {
            self.freezer.thaw_blocking(self.point);
        }
    }
}

/// Thaws `point`, up to [`THAW_TRIES`] times; "not frozen" counts as thawed.
async fn thaw_retrying<F: Freezer>(freezer: &F, point: &Path) -> Result<(), FreezeError> {
    let mut last = None;
    for attempt in 1..=THAW_TRIES {
        match freezer.thaw(point, THAW_TIMEOUT).await {
            Ok(()) | Err(ToolError::NotFrozen(_)) => return Ok(()),
            Err(e) => {
                tracing::warn!(mount_point = %point.display(), attempt, error = %e, "thaw failed");
                last = Some(e);
                if attempt < THAW_TRIES {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Err(FreezeError::Thaw {
        point: point.to_path_buf(),
        tries: THAW_TRIES,
        source: last.unwrap_or_else(|| {
            ToolError::Other(RunError::Timeout {
                cmd: "fsfreeze -u".to_owned(),
                timeout_s: THAW_TIMEOUT.as_secs(),
            })
        }),
    })
}

/// Runs `op` with the filesystem at `w.point` frozen, for at most `w.max` from the start
/// of the freeze; thaws it afterwards whatever happened, and logs how long it was frozen.
///
/// # Errors
/// [`FreezeError`]: frozen by another process (nothing done, `op` not run), the freeze
/// failed (`op` not run; thawed in case it took effect), or every thaw failed (the
/// filesystem is still frozen: the message says how to thaw it).
pub async fn with_frozen<F: Freezer, T>(
    freezer: &F,
    w: &Window<'_>,
    op: impl Future<Output = T>,
) -> Result<Frozen<T>, FreezeError> {
    let start = Instant::now();
    let point = w.point;
    // Armed before the freeze: a drop while `fsfreeze -f` runs may leave it frozen.
    let mut guard = ThawGuard {
        freezer,
        point,
        armed: true,
    };
    match freezer.freeze(point, w.max).await {
        Ok(()) => {}
        Err(source @ ToolError::AlreadyFrozen(_)) => {
            guard.armed = false;
            return Err(FreezeError::AlreadyFrozen {
                point: point.to_path_buf(),
                source,
            });
        }
        Err(source) => {
            // It may have frozen before failing (a timeout): thaw, EINVAL is fine.
            let thawed = thaw_retrying(freezer, point).await;
            guard.armed = false;
            thawed?;
            return Err(FreezeError::Freeze {
                point: point.to_path_buf(),
                source,
            });
        }
    }
    tracing::info!(volume = %w.volume, mount_point = %point.display(), freeze_ms = start.elapsed().as_millis(), "filesystem frozen");
    let hold = w.hold;
    let held = async move {
        if !hold.is_zero() {
            tracing::warn!(volume = %w.volume, hold_ms = hold.as_millis(), "holding the freeze ({TEST_HOLD_ENV}, a test hook)");
            tokio::time::sleep(hold).await;
        }
        op.await
    };
    tokio::pin!(held);
    let in_time = tokio::time::timeout(w.max.saturating_sub(start.elapsed()), &mut held)
        .await
        .ok();
    let thawed = thaw_retrying(freezer, point).await;
    guard.armed = false;
    let frozen_ms = start.elapsed().as_millis();
    match &thawed {
        Ok(()) => {
            tracing::info!(volume = %w.volume, mount_point = %point.display(), frozen_ms, "filesystem thawed");
        }
        Err(e) => {
            tracing::error!(volume = %w.volume, mount_point = %point.display(), frozen_ms, error = %e, "filesystem left frozen");
        }
    }
    thawed?;
    match in_time {
        Some(t) => Ok(Frozen::InTime(t)),
        None => {
            tracing::warn!(volume = %w.volume, mount_point = %point.display(), window_ms = w.max.as_millis(), "the operation did not finish inside the frozen window; thawed");
            Ok(Frozen::TooLate(
                tokio::time::timeout(w.late_wait, held).await.ok(),
            ))
        }
    }
}

/// The mount points through which the filesystem on device `numbers` (`major:minor`) can
/// be frozen, best first: whole-filesystem mounts (root `/`, the staging mount) before
/// bind mounts of a subdirectory, each in mount order. Device-node binds (block mode)
/// have another device and are not among them.
pub fn freeze_candidates(table: &[MountInfo], numbers: &str) -> Vec<PathBuf> {
    let of_device = table.iter().filter(|m| m.dev == numbers);
    let (whole, part): (Vec<&MountInfo>, Vec<&MountInfo>) =
        of_device.partition(|m| m.root == Path::new("/"));
    whole
        .into_iter()
        .chain(part)
        .map(|m| m.mount_point.clone())
        .collect()
}

/// Whether `point` resolves to the filesystem of device `numbers` (a mount point can be
/// hidden under a later mount: freezing through it would freeze another filesystem).
pub fn resolves_to(point: &Path, numbers: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(point).is_ok_and(|m| mounts::dev_t_numbers(m.dev()) == numbers)
}

/// The first of `candidates` that resolves to device `numbers`.
pub fn reachable_point(candidates: &[PathBuf], numbers: &str) -> Option<PathBuf> {
    candidates.iter().find(|p| resolves_to(p, numbers)).cloned()
}

/// Whether a mount source is a ublk block device (`/dev/ublkb3`).
fn is_ublk_source(source: &str) -> bool {
    source
        .strip_prefix("/dev/ublkb")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Each filesystem on a ublk device in the table, once: (its `major:minor`, its source,
/// the mount points to reach it, as [`freeze_candidates`] orders them).
pub fn ublk_filesystems(table: &[MountInfo]) -> Vec<(String, String, Vec<PathBuf>)> {
    let mut out: Vec<(String, String, Vec<PathBuf>)> = Vec::new();
    for m in table.iter().filter(|m| is_ublk_source(&m.source)) {
        if out.iter().any(|(dev, _, _)| *dev == m.dev) {
            continue;
        }
        out.push((
            m.dev.clone(),
            m.source.clone(),
            freeze_candidates(table, &m.dev),
        ));
    }
    out
}

/// Thaws every filesystem on a ublk device that a crashed plugin may have left frozen
/// (there is no way to ask whether one is frozen: each is thawed, and "not frozen" is the
/// usual answer). `reachable` picks the mount point to use (see [`reachable_point`]).
/// Returns the mount points that were frozen and are thawed now.
pub async fn thaw_left_frozen<F: Freezer>(
    freezer: &F,
    table: &[MountInfo],
    reachable: impl Fn(&[PathBuf], &str) -> Option<PathBuf>,
) -> Vec<PathBuf> {
    let mut thawed = Vec::new();
    for (dev, source, candidates) in ublk_filesystems(table) {
        let Some(point) = reachable(&candidates, &dev) else {
            tracing::warn!(%source, "no reachable mount point of this ublk filesystem; not thawed (if it is frozen, run fsfreeze -u on one of its mount points)");
            continue;
        };
        match freezer.thaw(&point, THAW_TIMEOUT).await {
            Ok(()) => {
                tracing::warn!(%source, mount_point = %point.display(), "thawed a filesystem left frozen (by a plugin that stopped inside a snapshot's frozen window)");
                thawed.push(point);
            }
            Err(ToolError::NotFrozen(_)) => {
                tracing::debug!(%source, mount_point = %point.display(), "not frozen");
            }
            Err(e) => {
                tracing::error!(%source, mount_point = %point.display(), error = %e, "cannot thaw at start-up: if it is frozen its writers wait; run fsfreeze -u on the node");
            }
        }
    }
    thawed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// Records freezes and thaws; answers from scripted results (default: success).
    #[derive(Default, Clone)]
    struct Fake {
        events: Arc<Mutex<Vec<String>>>,
        freeze_results: Arc<Mutex<VecDeque<Result<(), ToolError>>>>,
        thaw_results: Arc<Mutex<VecDeque<Result<(), ToolError>>>>,
    }

    fn failed(output: &str) -> RunError {
        RunError::Failed {
            cmd: "fsfreeze".to_owned(),
            status: "exit status: 1".to_owned(),
            code: Some(1),
            output: output.to_owned(),
        }
    }

    impl Fake {
        fn events(&self) -> Vec<String> {
            self.events.lock().expect("lock").clone()
        }
        fn push_freeze(&self, r: Result<(), ToolError>) {
            self.freeze_results.lock().expect("lock").push_back(r);
        }
        fn push_thaw(&self, r: Result<(), ToolError>) {
            self.thaw_results.lock().expect("lock").push_back(r);
        }
    }

    impl Freezer for Fake {
        async fn freeze(&self, point: &Path, _t: Duration) -> Result<(), ToolError> {
            self.events
                .lock()
                .expect("lock")
                .push(format!("freeze {}", point.display()));
            self.freeze_results
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(()))
        }
        async fn thaw(&self, point: &Path, _t: Duration) -> Result<(), ToolError> {
            self.events
                .lock()
                .expect("lock")
                .push(format!("thaw {}", point.display()));
            self.thaw_results
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(()))
        }
        fn thaw_blocking(&self, point: &Path) {
            self.events
                .lock()
                .expect("lock")
                .push(format!("thaw_blocking {}", point.display()));
        }
    }

    fn window(max_ms: u64) -> Window<'static> {
        Window {
            volume: "vol:n:1",
            point: Path::new("/k/globalmount"),
            max: Duration::from_millis(max_ms),
            late_wait: Duration::from_millis(1000),
            hold: Duration::ZERO,
        }
    }

    const FROZEN: &str = "freeze /k/globalmount";
    const THAWED: &str = "thaw /k/globalmount";

    #[tokio::test]
    async fn thaws_after_the_operation_succeeds_or_fails() {
        let f = Fake::default();
        let r = with_frozen(&f, &window(5_000), async {
            // The operation runs between freeze and thaw.
            assert_eq!(f.events(), [FROZEN]);
            7
        })
        .await
        .expect("window");
        assert_eq!(r, Frozen::InTime(7));
        assert_eq!(f.events(), [FROZEN, THAWED]);

        let f = Fake::default();
        let r = with_frozen(&f, &window(5_000), async { Err::<(), _>("daemon said no") })
            .await
            .expect("window");
        assert_eq!(r, Frozen::InTime(Err("daemon said no")));
        assert_eq!(f.events(), [FROZEN, THAWED]);
    }

    #[tokio::test]
    async fn the_deadline_thaws_first_then_waits_for_a_late_result() {
        let f = Fake::default();
        let start = Instant::now();
        let r = with_frozen(&f, &window(50), std::future::pending::<()>())
            .await
            .expect("window");
        assert_eq!(r, Frozen::TooLate(None));
        assert_eq!(f.events(), [FROZEN, THAWED]);
        assert!(start.elapsed() < Duration::from_secs(2));

        // A result that comes after the thaw is handed back as late (the caller deletes
        // such a snapshot); the thaw came before it.
        let f = Fake::default();
        let events = f.events.clone();
        let r = with_frozen(&f, &window(50), async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            events.lock().expect("lock").push("late result".to_owned());
            1
        })
        .await
        .expect("window");
        assert_eq!(r, Frozen::TooLate(Some(1)));
        assert_eq!(f.events(), [FROZEN, THAWED, "late result"]);

        // The test hold counts against the window.
        let f = Fake::default();
        let mut w = window(50);
        w.hold = Duration::from_millis(100);
        let r = with_frozen(&f, &w, async { 1 }).await.expect("window");
        assert_eq!(r, Frozen::TooLate(Some(1)));
        assert_eq!(f.events(), [FROZEN, THAWED]);
    }

    #[tokio::test]
    async fn a_failed_freeze_is_thawed_unless_another_process_holds_it() {
        let f = Fake::default();
        f.push_freeze(Err(ToolError::Other(RunError::Timeout {
            cmd: "fsfreeze -f".to_owned(),
            timeout_s: 10,
        })));
        f.push_thaw(Err(ToolError::NotFrozen(failed("Invalid argument"))));
        let ran = std::sync::atomic::AtomicBool::new(false);
        let e = with_frozen(&f, &window(5_000), async {
            ran.store(true, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .expect_err("freeze failed");
        assert!(matches!(e, FreezeError::Freeze { .. }), "{e}");
        assert!(!ran.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(f.events(), [FROZEN, THAWED]);

        let f = Fake::default();
        f.push_freeze(Err(classify(failed(
            "fsfreeze: /k/globalmount: freeze failed: Device or resource busy",
        ))));
        let e = with_frozen(&f, &window(5_000), async {})
            .await
            .expect_err("busy");
        assert!(matches!(e, FreezeError::AlreadyFrozen { .. }), "{e}");
        assert_eq!(f.events(), [FROZEN], "someone else's freeze is not thawed");
    }

    #[tokio::test]
    async fn thaw_is_retried_and_a_lasting_failure_says_how_to_thaw() {
        let f = Fake::default();
        f.push_thaw(Err(ToolError::Other(failed("transient"))));
        let r = with_frozen(&f, &window(5_000), async { 1 })
            .await
            .expect("second thaw worked");
        assert_eq!(r, Frozen::InTime(1));
        assert_eq!(f.events(), [FROZEN, THAWED, THAWED]);

        let f = Fake::default();
        for _ in 0..THAW_TRIES {
            f.push_thaw(Err(ToolError::Other(failed("stuck"))));
        }
        let e = with_frozen(&f, &window(5_000), async { 1 })
            .await
            .expect_err("still frozen");
        assert!(e.to_string().contains("fsfreeze -u /k/globalmount"), "{e}");
        assert_eq!(f.events().len(), 1 + THAW_TRIES as usize);
    }

    #[tokio::test]
    async fn a_dropped_or_panicking_window_thaws_from_its_guard() {
        // Dropped mid-window (the caller went away): the guard thaws.
        let f = Fake::default();
        let w = window(5_000);
        let fut = with_frozen(&f, &w, std::future::pending::<()>());
        assert!(tokio::time::timeout(Duration::from_millis(50), fut)
            .await
            .is_err());
        assert_eq!(f.events(), [FROZEN, "thaw_blocking /k/globalmount"]);

        // A panic inside the operation unwinds through the guard.
        let f = Fake::default();
        let g = f.clone();
        let task = tokio::spawn(async move {
            let _ = with_frozen(&g, &window(5_000), async { panic!("operation panicked") }).await;
        });
        assert!(task.await.expect_err("panicked").is_panic());
        assert_eq!(f.events(), [FROZEN, "thaw_blocking /k/globalmount"]);
    }

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
100 22 259:3 /sub /k/pods/p0/sub rw,relatime shared:49 - ext4 /dev/ublkb3 rw
101 22 259:3 / /k/plugins/csi.coreblk.io/abc/globalmount rw,relatime shared:50 - ext4 /dev/ublkb3 rw
102 22 259:3 / /k/pods/p1/volumes/kubernetes.io~csi/pv1/mount ro,relatime shared:50 - ext4 /dev/ublkb3 rw
103 22 0:5 /ublkb4 /k/plugins/kubernetes.io~csi/volumeDevices/publish/pv2/p2 rw,nosuid shared:2 - devtmpfs udev rw
104 22 259:5 / /k/plugins/csi.coreblk.io/def/globalmount rw,relatime shared:51 - xfs /dev/ublkb5 rw
105 22 259:7 / /mnt/other rw,relatime shared:52 - ext4 /dev/nvme0n1 rw
";

    #[test]
    fn the_staging_mount_is_frozen_first() {
        let t = mounts::parse_mountinfo(TABLE);
        assert_eq!(
            freeze_candidates(&t, "259:3"),
            [
                PathBuf::from("/k/plugins/csi.coreblk.io/abc/globalmount"),
                PathBuf::from("/k/pods/p1/volumes/kubernetes.io~csi/pv1/mount"),
                PathBuf::from("/k/pods/p0/sub"),
            ]
        );
        // A block-mode volume (only its device node is bound) has no filesystem here.
        assert!(freeze_candidates(&t, "259:4").is_empty());
        assert!(freeze_candidates(&t, "259:9").is_empty());
    }

    #[tokio::test]
    async fn start_up_thaws_each_ublk_filesystem_once() {
        let t = mounts::parse_mountinfo(TABLE);
        let fs = ublk_filesystems(&t);
        assert_eq!(
            fs.iter()
                .map(|(d, s, _)| (d.as_str(), s.as_str()))
                .collect::<Vec<_>>(),
            [("259:3", "/dev/ublkb3"), ("259:5", "/dev/ublkb5")],
            "one entry per ublk filesystem; not the nvme one, not a device-node bind"
        );
        let f = Fake::default();
        // ublkb3 was frozen, ublkb5 was not (EINVAL).
        f.push_thaw(Ok(()));
        f.push_thaw(Err(classify(failed(
            "fsfreeze: /k: thaw failed: Invalid argument",
        ))));
        let thawed = thaw_left_frozen(&f, &t, |c, _| c.first().cloned()).await;
        assert_eq!(
            thawed,
            [PathBuf::from("/k/plugins/csi.coreblk.io/abc/globalmount")]
        );
        assert_eq!(
            f.events(),
            [
                "thaw /k/plugins/csi.coreblk.io/abc/globalmount",
                "thaw /k/plugins/csi.coreblk.io/def/globalmount"
            ]
        );
        // A mount point hidden under another mount is not used.
        let f = Fake::default();
        assert!(thaw_left_frozen(&f, &t, |_, _| None).await.is_empty());
        assert!(f.events().is_empty());
    }

    #[test]
    fn tool_errors_are_classified() {
        assert!(matches!(
            classify(failed(
                "fsfreeze: /x: freeze failed: Device or resource busy"
            )),
            ToolError::AlreadyFrozen(_)
        ));
        assert!(matches!(
            classify(failed("fsfreeze: /x: thaw failed: Invalid argument")),
            ToolError::NotFrozen(_)
        ));
        assert!(matches!(
            classify(failed(
                "fsfreeze: /x: freeze failed: Operation not permitted"
            )),
            ToolError::Other(_)
        ));
        assert!(is_ublk_source("/dev/ublkb12"));
        assert!(!is_ublk_source("/dev/ublkb"));
        assert!(!is_ublk_source("/dev/ublkc1"));
        assert!(!is_ublk_source("udev"));
    }

    #[tokio::test]
    async fn the_real_tool_reports_deadlines_after_the_child_exited() {
        let start = Instant::now();
        let e = mounts::run("sleep", &["5"], Duration::from_millis(100))
            .await
            .expect_err("times out");
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(4));
        let e = mounts::run(
            "sh",
            &["-c", "echo 'x: Invalid argument' >&2; exit 1"],
            Duration::from_secs(10),
        )
        .await
        .expect_err("fails");
        assert!(matches!(classify(e), ToolError::NotFrozen(_)));
        assert_eq!(
            mounts::run("sh", &["-c", "echo ok"], Duration::from_secs(10))
                .await
                .ok()
                .as_deref(),
            Some("ok")
        );
    }
}
