//! End-to-end checks against the real ublk driver. They need `/dev/ublk-control` (the VM
//! harness: `scripts/vm/run --kernel lts|latest -- <this test binary> --test-threads 1`)
//! and return early, passing, where it is missing (the host kernel has no ublk).
//!
//! `control_round_trip`: features, ADD, SET/GET_PARAMS, GET_DEV_INFO, DEL.
//! `serve_*`: a minimal single-threaded server (own io_uring, one queue, a file on
//! /tmp as backing) on the data path `choose` picks: START, `dd` write/read through
//! `/dev/ublkbN`, FLUSH, DISCARD, WRITE_ZEROES, resize and try-stop where offered, user
//! recovery (server exits or is quiesced; a new one takes over, data intact), STOP, DEL.
//! `partition_scan_suppressed_without_cap_sys_admin`: DESIGN §5's claim, on this kernel.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use coreblk_ublk::{
    auto_buf_reg_addr, block_path, char_path, choose, io_cmd_sqe, user_copy_offset, AddDev, Choice,
    Control, DataPath, DevState, Discard, Error, IoCmd, IoDescs, IoOp, Params, PathPref,
    IO_RES_ABORT, IO_RES_OK,
};
use io_uring::{opcode, types, IoUring};

const DEPTH: u16 = 16;
const MAX_IO_BYTES: u32 = 512 << 10;
const DEV_BYTES: u64 = 64 << 20;

fn control() -> Option<Control> {
    match Control::open() {
        Ok(c) => Some(c),
        Err(Error::NoControl) => {
            eprintln!("skipped: no /dev/ublk-control (run in the VM harness)");
            None
        }
        Err(e) => panic!("open /dev/ublk-control: {e}"),
    }
}

fn params() -> Params {
    Params {
        dev_sectors: DEV_BYTES >> 9,
        logical_bs_shift: 9,
        physical_bs_shift: 12,
        io_min_shift: 12,
        io_opt_shift: 16,
        max_sectors: MAX_IO_BYTES >> 9,
        volatile_cache: true,
        fua: true,
        read_only: false,
        rotational: false,
        discard: Some(Discard {
            alignment: 0,
            granularity: 4096,
            max_discard_sectors: 1 << 16,
            max_write_zeroes_sectors: 1 << 16,
            max_discard_segments: 1,
        }),
        dma_align_mask: 0,
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn control_round_trip() {
    let Some(ctrl) = control() else { return };
    let kernel = ctrl.features().expect("GET_FEATURES");
    eprintln!("VMCHECK kernel {} ublk features {kernel}", uname());
    let choice = choose(kernel, PathPref::Auto).expect("choose");
    eprintln!("VMCHECK choice: {}", choice.reason);

    let info = ctrl
        .add(&AddDev {
            dev_id: None,
            nr_hw_queues: 1,
            queue_depth: DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            flags: choice.flags,
        })
        .expect("ADD_DEV");
    let id = info.dev_id;
    eprintln!("VMCHECK added {info:?} flags {}", info.features());
    assert_eq!((info.nr_hw_queues, info.queue_depth), (1, DEPTH));
    assert_eq!(info.state, DevState::Dead);
    assert_eq!(
        info.flags & choice.flags,
        choice.flags,
        "kernel dropped requested flags"
    );
    assert!(Control::list().expect("list").contains(&id));
    assert!(char_path(id).exists());

    let p = params();
    ctrl.set_params(id, &p).expect("SET_PARAMS");
    let back = ctrl.get_params(id).expect("GET_PARAMS");
    assert_eq!(back, p);

    // A max IO size above the device's is explained, not a bare EINVAL.
    let mut too_big = p.clone();
    too_big.max_sectors = (MAX_IO_BYTES >> 9) * 2;
    let err = ctrl
        .set_params(id, &too_big)
        .expect_err("max_sectors above max_io_buf_bytes");
    eprintln!("VMCHECK refused as expected: {err}");
    assert!(matches!(err, Error::InvalidParams(_)), "{err}");

    let again = ctrl.info(id).expect("GET_DEV_INFO");
    assert_eq!(again.dev_id, id);
    assert_eq!(again.flags, info.flags);
    assert_eq!(again.state, DevState::Dead);

    // The id is taken: a second ADD with it is refused.
    let dup = ctrl.add(&AddDev {
        dev_id: Some(id),
        nr_hw_queues: 1,
        queue_depth: DEPTH,
        max_io_buf_bytes: MAX_IO_BYTES,
        flags: choice.flags,
    });
    let err = dup.expect_err("duplicate id");
    eprintln!("VMCHECK duplicate ADD: {err}");
    assert_eq!(err.errno(), Some(libc::EEXIST));

    // Stopping a device that never started is a no-op, whichever way.
    ctrl.stop(id).expect("STOP_DEV of a dead device");
    if choice.try_stop {
        ctrl.try_stop(id).expect("TRY_STOP_DEV of a dead device");
    }
    assert_eq!(ctrl.info(id).expect("info").state, DevState::Dead);

    ctrl.delete(id).expect("DEL_DEV");
    assert!(matches!(ctrl.info(id), Err(Error::NotFound(d)) if d == id));
    assert!(!Control::list().expect("list").contains(&id));
    // DEL_DEV_ASYNC returns while /dev/ublkcN is held; the device goes when it closes.
    let info = ctrl
        .add(&AddDev {
            dev_id: None,
            nr_hw_queues: 1,
            queue_depth: DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            flags: choice.flags,
        })
        .expect("ADD_DEV");
    let held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(char_path(info.dev_id))
        .expect("open /dev/ublkcN");
    ctrl.delete_async(info.dev_id).expect("DEL_DEV_ASYNC");
    drop(held);
    wait_for(
        "the async-deleted device to go",
        Duration::from_secs(10),
        || !Control::list().expect("list").contains(&info.dev_id),
    );

    match ctrl.try_stop(id) {
        Err(Error::Unsupported { .. }) => assert!(!choice.try_stop),
        Err(Error::NotFound(_)) => assert!(choice.try_stop),
        other => panic!("TRY_STOP of a deleted device: {other:?}"),
    }
}

#[test]
fn serve_auto() {
    serve(PathPref::Auto);
}

#[test]
fn serve_copy() {
    serve(PathPref::Copy);
}

/// A disk image with an MBR partition table must not show partitions when the queue's
/// server lacks CAP_SYS_ADMIN at FETCH, even after BLKRRPART; with the capability the
/// same image shows `ublkbNp1` (so the image is valid).
#[test]
fn partition_scan_suppressed_without_cap_sys_admin() {
    let Some(ctrl) = control() else { return };
    let ctrl = Arc::new(ctrl);
    let kernel = ctrl.features().expect("GET_FEATURES");
    let choice = choose(kernel, PathPref::Auto).expect("choose");
    for drop_cap in [false, true] {
        let info = ctrl
            .add(&AddDev {
                dev_id: None,
                nr_hw_queues: 1,
                queue_depth: DEPTH,
                max_io_buf_bytes: MAX_IO_BYTES,
                flags: choice.flags,
            })
            .expect("ADD_DEV");
        let id = info.dev_id;
        ctrl.set_params(id, &params()).expect("SET_PARAMS");
        let path = std::env::temp_dir().join(format!("ublk-mbr-{id}-{drop_cap}"));
        let backing = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .expect("backing"),
        );
        backing.set_len(DEV_BYTES).expect("size");
        backing.write_all_at(&mbr(2048, 8192), 0).expect("mbr");
        let pid = i32::try_from(std::process::id()).expect("pid");
        let srv = Server::spawn(id, choice.clone(), backing.clone(), drop_cap);
        while_serving("START_DEV", &srv, &ctrl, move |c| c.start(id, pid));
        let part = PathBuf::from(format!("/sys/block/ublkb{id}/ublkb{id}p1"));
        let dev = block_path(id).display().to_string();
        if drop_cap {
            let rr = Command::new("blockdev")
                .args(["--rereadpt", &dev])
                .output()
                .expect("blockdev");
            eprintln!(
                "VMCHECK {} without CAP_SYS_ADMIN at FETCH: p1 {}, blockdev --rereadpt {} {}",
                uname(),
                if part.exists() { "present" } else { "absent" },
                if rr.status.success() {
                    "succeeded"
                } else {
                    "failed:"
                },
                String::from_utf8_lossy(&rr.stderr).trim()
            );
            assert!(
                !rr.status.success(),
                "BLKRRPART allowed on a suppressed disk"
            );
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                !part.exists(),
                "partition scanned although the server lacked CAP_SYS_ADMIN"
            );
        } else {
            wait_for("p1 of a privileged server", Duration::from_secs(10), || {
                part.exists()
            });
            eprintln!(
                "VMCHECK {} with CAP_SYS_ADMIN at FETCH: p1 present",
                uname()
            );
        }
        ctrl.stop(id).expect("STOP_DEV");
        srv.stop_and_join();
        ctrl.delete(id).expect("DEL_DEV");
        std::fs::remove_file(&path).ok();
    }
}

/// `coreblk export cleanup`'s case: the server is gone for good while a reader waits
/// on the quiesced device. STOP and DEL still work without a server, and the waiting
/// reader gets an error instead of hanging.
#[test]
fn orphan_cleanup_without_server() {
    let Some(ctrl) = control() else { return };
    let ctrl = Arc::new(ctrl);
    let kernel = ctrl.features().expect("GET_FEATURES");
    let choice = choose(kernel, PathPref::Auto).expect("choose");
    let info = ctrl
        .add(&AddDev {
            dev_id: None,
            nr_hw_queues: 1,
            queue_depth: DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            flags: choice.flags,
        })
        .expect("ADD_DEV");
    let id = info.dev_id;
    ctrl.set_params(id, &params()).expect("SET_PARAMS");
    let path = std::env::temp_dir().join(format!("ublk-orphan-{id}"));
    let backing = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("backing"),
    );
    backing.set_len(DEV_BYTES).expect("size");
    let pid = i32::try_from(std::process::id()).expect("pid");
    let srv = Server::spawn(id, choice.clone(), backing.clone(), true);
    while_serving("START_DEV", &srv, &ctrl, move |c| c.start(id, pid));
    srv.stop_and_join();
    wait_for("QUIESCED", Duration::from_secs(30), || {
        ctrl.info(id).expect("info").state == DevState::Quiesced
    });
    let dev = block_path(id).display().to_string();
    let mut reader = Command::new("dd")
        .args([
            &format!("if={dev}"),
            "of=/dev/null",
            "bs=4k",
            "count=1",
            "skip=100",
            "iflag=direct",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dd");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        reader.try_wait().expect("try_wait").is_none(),
        "a read completed without a server"
    );

    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = ctrl.clone();
    std::thread::spawn(move || tx.send(c.stop(id).and_then(|()| c.delete(id))));
    let res = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("STOP+DEL without a server hung");
    res.expect("STOP+DEL without a server");
    let mut status = None;
    wait_for(
        "the waiting reader to finish",
        Duration::from_secs(30),
        || {
            status = reader.try_wait().expect("try_wait");
            status.is_some()
        },
    );
    let status = status.expect("finished");
    eprintln!(
        "VMCHECK {} orphan cleanup: STOP+DEL in {:?}, waiting reader exited {status} ({})",
        uname(),
        t.elapsed(),
        reader
            .stderr
            .take()
            .map(|mut e| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).ok();
                s.lines().next().unwrap_or_default().to_string()
            })
            .unwrap_or_default()
    );
    assert!(
        !status.success(),
        "the read of a torn-down device succeeded"
    );
    assert!(!Control::list().expect("list").contains(&id));
    std::fs::remove_file(&path).ok();
}

/// A one-partition MBR (type 0x83) at `start_lba` for `sectors`.
fn mbr(start_lba: u32, sectors: u32) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let e = &mut b[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&start_lba.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn serve(pref: PathPref) {
    let Some(ctrl) = control() else { return };
    let ctrl = Arc::new(ctrl);
    let kernel = ctrl.features().expect("GET_FEATURES");
    let choice = choose(kernel, pref).expect("choose");
    if pref == PathPref::Copy
        && choose(kernel, PathPref::Auto).expect("auto").path == DataPath::UserCopy
    {
        eprintln!("skipped: the auto path is already user copy on this kernel");
        return;
    }
    eprintln!("VMCHECK {} serve {pref:?}: {}", uname(), choice.reason);
    let t0 = Instant::now();

    let info = ctrl
        .add(&AddDev {
            dev_id: None,
            nr_hw_queues: 1,
            queue_depth: DEPTH,
            max_io_buf_bytes: MAX_IO_BYTES,
            flags: choice.flags,
        })
        .expect("ADD_DEV");
    let id = info.dev_id;
    ctrl.set_params(id, &params()).expect("SET_PARAMS");

    let backing_path =
        std::env::temp_dir().join(format!("ublk-backing-{id}-{}", std::process::id()));
    let backing = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&backing_path)
            .expect("backing file"),
    );
    backing.set_len(DEV_BYTES).expect("size backing");

    let pid = i32::try_from(std::process::id()).expect("pid fits");
    let srv = Server::spawn(id, choice.clone(), backing.clone(), false);
    while_serving("START_DEV", &srv, &ctrl, move |c| c.start(id, pid));
    let live = ctrl.info(id).expect("info");
    assert_eq!(live.state, DevState::Live);
    assert_eq!(live.ublksrv_pid, pid);
    let bdev = block_path(id);
    assert!(bdev.exists(), "{} missing after START", bdev.display());
    eprintln!("VMCHECK started {} in {:?}", bdev.display(), t0.elapsed());

    let pattern = pattern(1 << 20, u64::from(id) + 1);
    let pat_path = std::env::temp_dir().join(format!("ublk-pattern-{id}"));
    std::fs::write(&pat_path, &pattern).expect("pattern");
    io_checks(&bdev, &pat_path, &pattern, &backing);

    if choice.update_size {
        ctrl.update_size(id, (DEV_BYTES * 2) >> 9)
            .expect("UPDATE_SIZE");
        let size = sysfs_sectors(id);
        eprintln!("VMCHECK UPDATE_SIZE: /sys/block/ublkb{id}/size = {size}");
        assert_eq!(size, (DEV_BYTES * 2) >> 9);
        // Back to the backing size before more IO.
        ctrl.update_size(id, DEV_BYTES >> 9)
            .expect("UPDATE_SIZE back");
        assert_eq!(sysfs_sectors(id), DEV_BYTES >> 9);
    } else {
        let err = ctrl.update_size(id, 1).expect_err("not offered");
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }

    if choice.try_stop {
        let held = File::open(&bdev).expect("open block device");
        let err = ctrl.try_stop(id).expect_err("open device");
        eprintln!("VMCHECK TRY_STOP while open: {err}");
        assert!(matches!(err, Error::Busy));
        drop(held);
    }

    // User recovery: the server goes away without STOP (quiesced where offered,
    // otherwise it just exits), the device waits QUIESCED, a new server takes over.
    let t_rec = Instant::now();
    let stats = if choice.quiesce {
        ctrl.quiesce(id, 5000).expect("QUIESCE_DEV");
        let stats = srv.join();
        eprintln!("VMCHECK QUIESCE_DEV: server saw {stats:?}");
        assert_eq!(stats.aborts, u32::from(DEPTH), "every fetch aborted");
        stats
    } else {
        let stats = srv.stop_and_join();
        eprintln!("VMCHECK server exited: {stats:?}");
        stats
    };
    assert!(stats.writes >= 32 && stats.reads >= 16, "{stats:?}");
    assert!(stats.flushes > 0, "conv=fsync sent no FLUSH: {stats:?}");
    assert!(stats.discards > 0 && stats.write_zeroes > 0, "{stats:?}");
    wait_for("QUIESCED", Duration::from_secs(30), || {
        ctrl.info(id).expect("info").state == DevState::Quiesced
    });
    ctrl.start_user_recovery(id).expect("START_USER_RECOVERY");
    let srv = Server::spawn(id, choice.clone(), backing.clone(), false);
    while_serving("END_USER_RECOVERY", &srv, &ctrl, move |c| {
        c.end_user_recovery(id, pid)
    });
    assert_eq!(ctrl.info(id).expect("info").state, DevState::Live);
    eprintln!("VMCHECK user recovery took {:?}", t_rec.elapsed());
    // Data written by the first server reads back through the second.
    let out = std::env::temp_dir().join(format!("ublk-readback2-{id}"));
    dd(&[
        &format!("if={}", bdev.display()),
        &format!("of={}", out.display()),
        "bs=64k",
        "skip=32",
        "count=16",
        "iflag=direct",
    ]);
    let back = std::fs::read(&out).expect("readback");
    assert_eq!(&back[..], &pattern[..], "data after recovery");

    if choice.try_stop {
        ctrl.try_stop(id).expect("TRY_STOP_DEV of a closed device");
    } else {
        ctrl.stop(id).expect("STOP_DEV");
    }
    let stats = srv.stop_and_join();
    eprintln!("VMCHECK second server: {stats:?}");
    assert!(stats.reads > 0);
    ctrl.delete(id).expect("DEL_DEV");
    assert!(!Control::list().expect("list").contains(&id));
    std::fs::remove_file(&backing_path).ok();
    eprintln!(
        "VMCHECK {} serve {pref:?} passed in {:?}",
        uname(),
        t0.elapsed()
    );
}

/// Runs a control command that waits for the queue (START, END_USER_RECOVERY) on its own
/// thread, and fails fast if the server dies meanwhile (the command would wait forever).
fn while_serving(
    what: &str,
    srv: &Server,
    ctrl: &Arc<Control>,
    cmd: impl FnOnce(&Control) -> Result<(), Error> + Send + 'static,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let c = ctrl.clone();
    std::thread::spawn(move || tx.send(cmd(&c)));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(res) => return res.unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(
            !srv.handle.is_finished(),
            "{what}: the server thread ended first (see its panic)"
        );
        assert!(Instant::now() < deadline, "{what}: no answer in 120 s");
    }
}

fn sysfs_sectors(id: u32) -> u64 {
    std::fs::read_to_string(format!("/sys/block/ublkb{id}/size"))
        .expect("sysfs size")
        .trim()
        .parse()
        .expect("number")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn dd(args: &[&str]) {
    let out = Command::new("dd")
        .args(args)
        .arg("status=none")
        .output()
        .expect("run dd");
    assert!(
        out.status.success(),
        "dd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the pattern at 2 MiB with O_DIRECT and fsync (FLUSH), reads it back, checks
/// the backing file, then zeroes and discards parts of it.
fn io_checks(bdev: &Path, pat: &Path, pattern: &[u8], backing: &File) {
    let dev = bdev.display().to_string();
    let t = Instant::now();
    dd(&[
        &format!("if={}", pat.display()),
        &format!("of={dev}"),
        "bs=64k",
        "seek=32",
        "oflag=direct",
        "conv=fsync",
    ]);
    let out = std::env::temp_dir().join("ublk-readback");
    dd(&[
        &format!("if={dev}"),
        &format!("of={}", out.display()),
        "bs=64k",
        "skip=32",
        "count=16",
        "iflag=direct",
    ]);
    let back = std::fs::read(&out).expect("readback");
    assert_eq!(back.len(), pattern.len());
    assert!(back == pattern, "read back differs from what was written");
    let mut stored = vec![0u8; pattern.len()];
    backing
        .read_exact_at(&mut stored, 2 << 20)
        .expect("read backing");
    assert!(
        stored == pattern,
        "backing file differs: data did not go through the server"
    );
    eprintln!(
        "VMCHECK dd 1 MiB write+fsync, read back, backing identical in {:?}",
        t.elapsed()
    );

    // WRITE_ZEROES (BLKZEROOUT) on the first 64 KiB, DISCARD on the next 64 KiB.
    run(
        "blkdiscard",
        &["-z", "-o", &(2u64 << 20).to_string(), "-l", "65536", &dev],
    );
    run(
        "blkdiscard",
        &[
            "-o",
            &((2u64 << 20) + 65536).to_string(),
            "-l",
            "65536",
            &dev,
        ],
    );
    let mut stored = vec![0u8; 128 << 10];
    backing
        .read_exact_at(&mut stored, 2 << 20)
        .expect("read backing");
    assert!(
        stored.iter().all(|b| *b == 0),
        "zeroed/discarded range not zero in backing"
    );
    // Put the pattern back for the recovery check.
    dd(&[
        &format!("if={}", pat.display()),
        &format!("of={dev}"),
        "bs=64k",
        "seek=32",
        "oflag=direct",
        "conv=fsync",
    ]);
}

#[derive(Debug, Default, Clone)]
struct Stats {
    reads: u32,
    writes: u32,
    flushes: u32,
    discards: u32,
    write_zeroes: u32,
    fua_writes: u32,
    other: u32,
    aborts: u32,
}

struct Server {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Stats>,
}

impl Server {
    /// `drop_sys_admin`: the thread drops CAP_SYS_ADMIN from its effective set before
    /// FETCH, as the daemon's reactors do (DESIGN §5: the driver then suppresses
    /// partition scans).
    fn spawn(dev_id: u32, choice: Choice, backing: Arc<File>, drop_sys_admin: bool) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            if drop_sys_admin {
                drop_effective_cap(CAP_SYS_ADMIN);
            }
            serve_queue(dev_id, &choice, &backing, &flag)
        });
        Server { stop, handle }
    }

    fn join(self) -> Stats {
        self.handle.join().expect("server thread panicked")
    }

    fn stop_and_join(self) -> Stats {
        self.stop.store(true, Ordering::Release);
        self.join()
    }
}

const KIND_BACKING: u64 = 1 << 16;

/// Queue 0 of `dev_id`, single-threaded, until every tag is aborted or `stop` is set.
fn serve_queue(dev_id: u32, choice: &Choice, backing: &File, stop: &AtomicBool) -> Stats {
    let char_dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(char_path(dev_id))
        .expect("open /dev/ublkcN");
    let descs = IoDescs::map(char_dev.as_raw_fd(), 0, DEPTH).expect("map descriptors");
    let mut ring: IoUring = IoUring::new(u32::from(DEPTH) * 2).expect("ring");
    let zero_copy = choice.path == DataPath::ZeroCopy;
    if zero_copy {
        ring.submitter()
            .register_buffers_sparse(u32::from(DEPTH))
            .expect("sparse buffer table");
    }
    let fd = types::Fd(char_dev.as_raw_fd());
    let enc = choice.ioctl_encode();
    let sqe_addr = |tag: u16| {
        if zero_copy {
            auto_buf_reg_addr(tag, 0)
        } else {
            0
        }
    };
    for tag in 0..DEPTH {
        let sqe =
            io_cmd_sqe(fd, IoCmd::Fetch, 0, tag, 0, sqe_addr(tag), enc).user_data(u64::from(tag));
        // SAFETY: FETCH carries no buffer of ours (user copy or kernel-registered pages).
        unsafe { ring.submission().push(&sqe) }.expect("room for FETCH");
    }
    let mut stats = Stats::default();
    let mut buf = vec![0u8; MAX_IO_BYTES as usize];
    let mut aborted = 0u16;
    let mut done = vec![];
    let timeout = types::Timespec::new().nsec(100_000_000);
    loop {
        if stop.load(Ordering::Acquire) || aborted == DEPTH {
            break;
        }
        match ring
            .submitter()
            .submit_with_args(1, &types::SubmitArgs::new().timespec(&timeout))
        {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &done {
            let tag = u16::try_from(user_data & 0xffff).expect("tag");
            let result = if user_data & KIND_BACKING != 0 {
                // A zero-copy backing IO finished: commit its request.
                let d = descs.get(tag);
                let full = u64::try_from(res).is_ok_and(|n| n == d.len_bytes());
                if res < 0 || full {
                    res
                } else {
                    -libc::EIO
                }
            } else if res == IO_RES_ABORT {
                aborted += 1;
                stats.aborts += 1;
                continue;
            } else {
                assert_eq!(res, IO_RES_OK, "fetch of tag {tag} failed");
                let d = descs.get(tag);
                let len = usize::try_from(d.len_bytes()).expect("fits");
                match d.op {
                    IoOp::Read | IoOp::Write => {
                        if d.op == IoOp::Read {
                            stats.reads += 1;
                        } else {
                            stats.writes += 1;
                            stats.fua_writes += u32::from(d.fua());
                        }
                        if zero_copy {
                            let file = types::Fd(backing.as_raw_fd());
                            let len32 = u32::try_from(len).expect("fits");
                            // Kernel-registered request pages: the buffer address is an
                            // offset into them, 0 = the start.
                            let sqe = if d.op == IoOp::Read {
                                opcode::ReadFixed::new(file, std::ptr::null_mut(), len32, tag)
                                    .offset(d.offset_bytes())
                                    .build()
                            } else {
                                opcode::WriteFixed::new(file, std::ptr::null(), len32, tag)
                                    .offset(d.offset_bytes())
                                    .build()
                            };
                            let sqe = sqe.user_data(KIND_BACKING | u64::from(tag));
                            // The IO targets the buffer the kernel registered at index
                            // `tag` for this request; it stays registered until this
                            // tag's COMMIT, which waits for this completion.
                            // SAFETY: the registered buffer outlives the IO (above).
                            unsafe { ring.submission().push(&sqe) }.expect("room");
                            continue;
                        }
                        let b = &mut buf[..len];
                        let at = user_copy_offset(0, tag, 0);
                        if d.op == IoOp::Read {
                            backing
                                .read_exact_at(b, d.offset_bytes())
                                .expect("backing read");
                            char_dev.write_all_at(b, at).expect("user copy to request");
                        } else {
                            char_dev
                                .read_exact_at(b, at)
                                .expect("user copy from request");
                            backing
                                .write_all_at(b, d.offset_bytes())
                                .expect("backing write");
                        }
                        i32::try_from(len).expect("fits")
                    }
                    IoOp::Flush => {
                        stats.flushes += 1;
                        backing.sync_data().expect("fdatasync");
                        0
                    }
                    IoOp::Discard | IoOp::WriteZeroes => {
                        if d.op == IoOp::Discard {
                            stats.discards += 1;
                        } else {
                            stats.write_zeroes += 1;
                        }
                        punch(backing, d.offset_bytes(), d.len_bytes());
                        0
                    }
                    IoOp::Other(_) => {
                        stats.other += 1;
                        -libc::EOPNOTSUPP
                    }
                }
            };
            let sqe = io_cmd_sqe(
                fd,
                IoCmd::CommitAndFetch,
                0,
                tag,
                result,
                sqe_addr(tag),
                enc,
            )
            .user_data(u64::from(tag));
            // SAFETY: as for FETCH: no buffer of ours is referenced.
            unsafe { ring.submission().push(&sqe) }.expect("room for COMMIT_AND_FETCH");
        }
    }
    drop(ring);
    drop(descs);
    drop(char_dev);
    stats
}

const CAP_SYS_ADMIN: u32 = 21;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears `cap` from the calling thread's effective set (capabilities are per thread).
fn drop_effective_cap(cap: u32) {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // capget writes two `CapData` (version 3) into `data`, which has room for exactly
    // two, and reads the header.
    // SAFETY: both pointers are valid for what capget reads and writes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    // SAFETY: as above; capset reads the header and two `CapData`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

fn punch(f: &File, offset: u64, len: u64) {
    let off = libc::off_t::try_from(offset).expect("fits");
    let len = libc::off_t::try_from(len).expect("fits");
    // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
}
