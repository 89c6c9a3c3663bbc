//! Control commands on `/dev/ublk-control`: feature query, add, parameters, start, stop,
//! delete, user recovery, quiesce, resize.
//!
//! Every call blocks until the kernel answers (START and END_USER_RECOVERY until every
//! queue has FETCHed every tag), so `Control` belongs on the control plane's blocking
//! threads and in the CLI — never on a reactor. Commands travel as `IORING_OP_URING_CMD`
//! on 128-byte SQEs of small private rings (one per concurrent caller, kept for reuse),
//! always ioctl-encoded (`UBLK_U_CMD_*`), which 6.12 and 7.x both accept whatever
//! `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES` says.
//!
//! Start reading at [`Control::open`], then `Control::run`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::params::params_len;
use crate::sys;
use crate::{Error, Features, Params};

const CONTROL_PATH: &str = "/dev/ublk-control";
/// Rings kept for reuse; more concurrent callers get a ring of their own for one call.
const MAX_IDLE_RINGS: usize = 4;

/// Device state as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevState {
    /// Added, not started (or stopped).
    Dead,
    /// Started, serving IO.
    Live,
    /// Its server exited (or QUIESCE_DEV): IO waits for the next server.
    Quiesced,
    /// Its server exited and the device fails IO (FAIL_IO recovery).
    FailIo,
    Unknown(u16),
}

impl DevState {
    pub fn from_raw(state: u16) -> Self {
        match state {
            sys::UBLK_S_DEV_DEAD => DevState::Dead,
            sys::UBLK_S_DEV_LIVE => DevState::Live,
            sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
            other => DevState::Unknown(other),
        }
    }
}

/// A device as GET_DEV_INFO / ADD_DEV describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevInfo {
    pub dev_id: u32,
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: DevState,
    pub max_io_buf_bytes: u32,
    /// The flags the device was created with, as the kernel settled them (it adds some,
    /// e.g. CMD_IOCTL_ENCODE, and drops those it does not know).
    pub flags: u64,
    /// The server's pid from START/END_USER_RECOVERY; -1 or 0 when none.
    pub ublksrv_pid: i32,
    pub owner_uid: u32,
    pub owner_gid: u32,
}

impl DevInfo {
    fn decode(d: &sys::ublksrv_ctrl_dev_info) -> Self {
        DevInfo {
            dev_id: d.dev_id,
            nr_hw_queues: d.nr_hw_queues,
            queue_depth: d.queue_depth,
            state: DevState::from_raw(d.state),
            max_io_buf_bytes: d.max_io_buf_bytes,
            flags: d.flags,
            ublksrv_pid: d.ublksrv_pid,
            owner_uid: d.owner_uid,
            owner_gid: d.owner_gid,
        }
    }

    /// The device flags as a feature word (for display).
    pub fn features(&self) -> Features {
        Features(self.flags)
    }
}

/// An ADD_DEV request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddDev {
    /// `None`: the kernel picks the lowest free id.
    pub dev_id: Option<u32>,
    /// The kernel lowers it to the number of CPUs.
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    /// Largest request in bytes; the kernel rounds it down to a page.
    pub max_io_buf_bytes: u32,
    /// Device flags, normally [`crate::Choice::flags`].
    pub flags: u64,
}

impl AddDev {
    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidArg(m));
        if let Some(id) = self.dev_id {
            if id >= sys::UBLK_MAX_UBLKS {
                return bad(format!(
                    "device id {id}: must be below {}",
                    sys::UBLK_MAX_UBLKS
                ));
            }
        }
        if self.nr_hw_queues == 0 || u32::from(self.nr_hw_queues) > sys::UBLK_MAX_NR_QUEUES {
            return bad(format!(
                "{} hardware queues: must be 1..={}",
                self.nr_hw_queues,
                sys::UBLK_MAX_NR_QUEUES
            ));
        }
        if self.queue_depth == 0 || self.queue_depth > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!(
                "queue depth {}: must be 1..={}",
                self.queue_depth,
                sys::UBLK_MAX_QUEUE_DEPTH
            ));
        }
        let max_buf = 1u32 << sys::UBLK_IO_BUF_BITS;
        if self.max_io_buf_bytes < 4096 || self.max_io_buf_bytes > max_buf {
            return bad(format!(
                "max IO size {} bytes: must be 4 KiB..=32 MiB",
                self.max_io_buf_bytes
            ));
        }
        if self.flags & sys::UBLK_F_UNPRIVILEGED_DEV != 0 {
            return bad("UNPRIVILEGED_DEV: coreblk never creates unprivileged devices".into());
        }
        Ok(())
    }
}

/// `/dev/ublkcN`: the server's end of device N.
pub fn char_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{dev_id}"))
}

/// `/dev/ublkbN`: the block device pods see.
pub fn block_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// The buffer a command points the kernel at. Heap-allocated and 8-byte aligned so it
/// can be leaked if a command is still in flight when its caller has to give up.
#[repr(C, align(8))]
struct Payload([u8; 256]);

const _: () = assert!(std::mem::size_of::<Payload>() >= std::mem::size_of::<sys::ublk_params>());
const _: () =
    assert!(std::mem::size_of::<Payload>() >= std::mem::size_of::<sys::ublksrv_ctrl_dev_info>());

impl Payload {
    fn new() -> Box<Self> {
        Box::new(Payload([0; 256]))
    }

    /// Copies a plain `repr(C)` value in.
    fn put<T: Plain>(&mut self, v: &T) {
        let n = std::mem::size_of::<T>();
        // `T: Plain` is a `repr(C)` struct of integers without padding bytes (checked by
        // the layout asserts in `sys`); `n <= 256` by the asserts above.
        // SAFETY: `v` is valid for `n` bytes and all of them are initialised (no padding).
        let bytes = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), n) };
        self.0[..n].copy_from_slice(bytes);
    }

    /// Reads a plain `repr(C)` value out.
    fn get<T: Plain>(&self) -> T {
        // The buffer is at least `size_of::<T>()` bytes (asserts above) and 8-byte aligned
        // (as `T` needs at most).
        // SAFETY: the read is in bounds and aligned; every bit pattern is a valid `T: Plain`.
        unsafe { std::ptr::read(self.0.as_ptr().cast::<T>()) }
    }

    fn addr(&mut self) -> u64 {
        self.0.as_mut_ptr() as u64
    }
}

/// Marker for the `sys` structs that are integers only: any bytes are a valid value.
trait Plain: Copy {}
impl Plain for sys::ublksrv_ctrl_dev_info {}
impl Plain for sys::ublk_params {}
impl Plain for u64 {}

/// One command to send.
struct Cmd {
    op: &'static str,
    cmd_op: u32,
    dev_id: u32,
    data: u64,
    /// Bytes of the payload the kernel may read or write; 0 = no buffer.
    len: u16,
}

fn ctrl_cmd_bytes(c: &sys::ublksrv_ctrl_cmd) -> [u8; 80] {
    let mut b = [0u8; 80];
    b[0..4].copy_from_slice(&c.dev_id.to_ne_bytes());
    b[4..6].copy_from_slice(&c.queue_id.to_ne_bytes());
    b[6..8].copy_from_slice(&c.len.to_ne_bytes());
    b[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    b[16..24].copy_from_slice(&c.data[0].to_ne_bytes());
    b[24..26].copy_from_slice(&c.dev_path_len.to_ne_bytes());
    b[26..28].copy_from_slice(&c.pad.to_ne_bytes());
    b[28..32].copy_from_slice(&c.reserved.to_ne_bytes());
    b
}

/// The ublk control device and the rings that carry its commands.
pub struct Control {
    file: File,
    rings: Mutex<Vec<Ring>>,
    features: OnceLock<Features>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("fd", &self.file.as_raw_fd())
            .field("features", &self.features.get())
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Opens `/dev/ublk-control`.
    pub fn open() -> Result<Self, Error> {
        let path = Path::new(CONTROL_PATH);
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NoControl),
            Err(source) => {
                return Err(Error::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let control = Control {
            file,
            rings: Mutex::new(Vec::new()),
            features: OnceLock::new(),
        };
        // Fail here, not on the first command, when io_uring is unavailable.
        let ring = control.take_ring()?;
        control.give_ring(ring);
        Ok(control)
    }

    fn take_ring(&self) -> Result<Ring, Error> {
        let idle = self.rings.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(r) => Ok(r),
            None => IoUring::builder().build(4).map_err(Error::Ring),
        }
    }

    fn give_ring(&self, ring: Ring) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        if rings.len() < MAX_IDLE_RINGS {
            rings.push(ring);
        }
    }

    /// Sends one command and waits for its answer. Returns the non-negative result.
    fn run(&self, cmd: &Cmd, payload: &mut Box<Payload>) -> Result<i32, Error> {
        let header = sys::ublksrv_ctrl_cmd {
            dev_id: cmd.dev_id,
            queue_id: u16::MAX,
            len: cmd.len,
            addr: if cmd.len > 0 { payload.addr() } else { 0 },
            data: [cmd.data],
            ..Default::default()
        };
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd.cmd_op)
            .cmd(ctrl_cmd_bytes(&header))
            .build()
            .user_data(1);
        let mut ring = self.take_ring()?;
        // The SQE points the kernel at `payload` (when len > 0), a heap buffer that
        // outlives the command: either we reap the completion below before returning, or,
        // when we must give up with the command possibly in flight, the buffer is leaked
        // and never freed.
        // SAFETY: the SQE's buffer outlives the command (above).
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            return Err(Error::Ring(std::io::Error::other("control ring full")));
        }
        let res = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {
                    if let Some(cqe) = ring.completion().next() {
                        break cqe.result();
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    if ring.submission().is_empty() {
                        // Consumed by the kernel: it may still write the buffer.
                        let leaked = std::mem::replace(payload, Payload::new());
                        Box::leak(leaked);
                    }
                    // The ring is dropped, not reused: its state is unknown.
                    return Err(Error::Ring(e));
                }
            }
        };
        self.give_ring(ring);
        tracing::debug!(
            op = cmd.op,
            dev_id = cmd.dev_id,
            res,
            "ublk control command"
        );
        if res < 0 {
            let errno = -res;
            return Err(match errno {
                libc::ENODEV if cmd.cmd_op != sys::UBLK_U_CMD_ADD_DEV && cmd.dev_id != u32::MAX => {
                    Error::NotFound(cmd.dev_id)
                }
                _ => Error::Io {
                    op: cmd.op,
                    dev_id: cmd.dev_id,
                    errno,
                },
            });
        }
        Ok(res)
    }

    fn simple(&self, op: &'static str, cmd_op: u32, dev_id: u32, data: u64) -> Result<(), Error> {
        let mut payload = Payload::new();
        self.run(
            &Cmd {
                op,
                cmd_op,
                dev_id,
                data,
                len: 0,
            },
            &mut payload,
        )
        .map(|_| ())
    }

    /// GET_FEATURES: what the running kernel offers (asked once, then remembered).
    pub fn features(&self) -> Result<Features, Error> {
        if let Some(f) = self.features.get() {
            return Ok(*f);
        }
        let mut payload = Payload::new();
        self.run(
            &Cmd {
                op: "GET_FEATURES",
                cmd_op: sys::UBLK_U_CMD_GET_FEATURES,
                dev_id: u32::MAX,
                data: 0,
                len: sys::UBLK_FEATURES_LEN,
            },
            &mut payload,
        )?;
        let f = Features(payload.get::<u64>());
        Ok(*self.features.get_or_init(|| f))
    }

    fn require(&self, feature: Features, what: &'static str) -> Result<(), Error> {
        let kernel = self.features()?;
        if kernel.contains(feature) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                what,
                kernel_features: kernel,
            })
        }
    }

    /// ADD_DEV: creates `/dev/ublkcN` (the block device appears at START).
    pub fn add(&self, req: &AddDev) -> Result<DevInfo, Error> {
        req.validate()?;
        let dev_id = req.dev_id.unwrap_or(u32::MAX);
        let info = sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: req.nr_hw_queues,
            queue_depth: req.queue_depth,
            max_io_buf_bytes: req.max_io_buf_bytes,
            dev_id,
            flags: req.flags,
            ..Default::default()
        };
        let mut payload = Payload::new();
        payload.put(&info);
        self.run(
            &Cmd {
                op: "ADD_DEV",
                cmd_op: sys::UBLK_U_CMD_ADD_DEV,
                dev_id,
                data: 0,
                len: dev_info_len(),
            },
            &mut payload,
        )?;
        let info = DevInfo::decode(&payload.get());
        tracing::info!(
            dev_id = info.dev_id,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            flags = %info.features(),
            "ublk device added"
        );
        Ok(info)
    }

    /// SET_PARAMS (only before START, or between START_USER_RECOVERY and its end).
    pub fn set_params(&self, dev_id: u32, p: &Params) -> Result<(), Error> {
        p.validate()?;
        let mut payload = Payload::new();
        payload.put(&p.encode());
        let res = self.run(
            &Cmd {
                op: "SET_PARAMS",
                cmd_op: sys::UBLK_U_CMD_SET_PARAMS,
                dev_id,
                data: 0,
                len: params_len_u16(),
            },
            &mut payload,
        );
        match res {
            Err(Error::Io {
                errno: libc::EINVAL,
                ..
            }) => {
                // Say which limit it was when we can tell.
                let info = self.info(dev_id)?;
                if u64::from(p.max_sectors) << 9 > u64::from(info.max_io_buf_bytes) {
                    return Err(Error::InvalidParams(format!(
                        "max_sectors {} ({} bytes) exceeds device {dev_id}'s max IO size of {} bytes set at ADD",
                        p.max_sectors,
                        u64::from(p.max_sectors) << 9,
                        info.max_io_buf_bytes
                    )));
                }
                res.map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    /// GET_PARAMS.
    pub fn get_params(&self, dev_id: u32) -> Result<Params, Error> {
        let mut payload = Payload::new();
        payload.put(&sys::ublk_params {
            len: params_len(),
            ..Default::default()
        });
        self.run(
            &Cmd {
                op: "GET_PARAMS",
                cmd_op: sys::UBLK_U_CMD_GET_PARAMS,
                dev_id,
                data: 0,
                len: params_len_u16(),
            },
            &mut payload,
        )?;
        let raw: sys::ublk_params = payload.get();
        if raw.types & sys::UBLK_PARAM_TYPE_BASIC == 0 {
            return Err(Error::InvalidParams(format!(
                "device {dev_id} has no parameters yet (SET_PARAMS was not done)"
            )));
        }
        Ok(Params::decode(&raw))
    }

    /// GET_DEV_INFO (GET_DEV_INFO2 exists for unprivileged devices, which coreblk never
    /// creates; it would need the char device path in the buffer).
    pub fn info(&self, dev_id: u32) -> Result<DevInfo, Error> {
        let mut payload = Payload::new();
        self.run(
            &Cmd {
                op: "GET_DEV_INFO",
                cmd_op: sys::UBLK_U_CMD_GET_DEV_INFO,
                dev_id,
                data: 0,
                len: dev_info_len(),
            },
            &mut payload,
        )?;
        Ok(DevInfo::decode(&payload.get()))
    }

    /// START_DEV: blocks until every queue has FETCHed every tag, then adds the block
    /// device. `daemon_pid` is the pid (tgid) of the process whose threads issue FETCH.
    /// The queues must be served while this waits: the kernel reads the new disk (e.g.
    /// a partition scan) before it answers.
    pub fn start(&self, dev_id: u32, daemon_pid: i32) -> Result<(), Error> {
        let pid = pid_arg(daemon_pid)?;
        self.simple("START_DEV", sys::UBLK_U_CMD_START_DEV, dev_id, pid)
    }

    /// STOP_DEV: removes the block device; pending FETCHes complete with
    /// [`crate::IO_RES_ABORT`]. Requests in flight are still served until then.
    pub fn stop(&self, dev_id: u32) -> Result<(), Error> {
        self.simple("STOP_DEV", sys::UBLK_U_CMD_STOP_DEV, dev_id, 0)
    }

    /// TRY_STOP_DEV (SAFE_STOP_DEV, Linux >= 7.0): stops only if nobody has the block
    /// device open; [`Error::Busy`] otherwise. A device that is not started is left as
    /// it is (Ok), as STOP_DEV does.
    pub fn try_stop(&self, dev_id: u32) -> Result<(), Error> {
        self.require(
            Features::SAFE_STOP_DEV,
            "TRY_STOP_DEV (SAFE_STOP_DEV, Linux >= 7.0)",
        )?;
        match self.simple("TRY_STOP_DEV", sys::UBLK_U_CMD_TRY_STOP_DEV, dev_id, 0) {
            Err(Error::Io {
                errno: libc::EBUSY, ..
            }) => Err(Error::Busy),
            // ENODEV also means "no disk": the device exists but was never started (or
            // is stopped), so there is nothing to stop — as STOP_DEV answers.
            Err(Error::NotFound(_)) => self.info(dev_id).map(|_| ()),
            other => other,
        }
    }

    /// DEL_DEV: removes the device. Blocks until every holder of `/dev/ublkcN` has
    /// closed it: close the queues' char device fds first.
    pub fn delete(&self, dev_id: u32) -> Result<(), Error> {
        self.simple("DEL_DEV", sys::UBLK_U_CMD_DEL_DEV, dev_id, 0)
    }

    /// DEL_DEV_ASYNC: removes the device without waiting for the holders of
    /// `/dev/ublkcN`; its id is free once the last one closes it. For tearing down a
    /// device whose server may still hold it (`coreblk export cleanup`).
    pub fn delete_async(&self, dev_id: u32) -> Result<(), Error> {
        self.simple("DEL_DEV_ASYNC", sys::UBLK_U_CMD_DEL_DEV_ASYNC, dev_id, 0)
    }

    /// START_USER_RECOVERY: after the previous server died (device QUIESCED), prepares
    /// the device for a new server, which then opens `/dev/ublkcN` and FETCHes.
    pub fn start_user_recovery(&self, dev_id: u32) -> Result<(), Error> {
        self.simple(
            "START_USER_RECOVERY",
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            dev_id,
            0,
        )
    }

    /// END_USER_RECOVERY: blocks until every queue has FETCHed again, then resumes IO.
    pub fn end_user_recovery(&self, dev_id: u32, daemon_pid: i32) -> Result<(), Error> {
        let pid = pid_arg(daemon_pid)?;
        self.simple(
            "END_USER_RECOVERY",
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            dev_id,
            pid,
        )
    }

    /// QUIESCE_DEV (Linux >= 6.16, device created with QUIESCE): pending FETCHes complete
    /// with [`crate::IO_RES_ABORT`]; the server finishes what it holds and exits without
    /// deleting the device, which waits QUIESCED for the next server.
    pub fn quiesce(&self, dev_id: u32, timeout_ms: u32) -> Result<(), Error> {
        self.require(Features::QUIESCE, "QUIESCE_DEV (Linux >= 6.16)")?;
        self.simple(
            "QUIESCE_DEV",
            sys::UBLK_U_CMD_QUIESCE_DEV,
            dev_id,
            u64::from(timeout_ms),
        )
    }

    /// UPDATE_SIZE (Linux >= 6.16): new capacity in sectors, on a started, live device.
    pub fn update_size(&self, dev_id: u32, sectors: u64) -> Result<(), Error> {
        self.require(Features::UPDATE_SIZE, "UPDATE_SIZE (Linux >= 6.16)")?;
        if sectors == 0 {
            return Err(Error::InvalidArg("new size 0 sectors".into()));
        }
        self.simple("UPDATE_SIZE", sys::UBLK_U_CMD_UPDATE_SIZE, dev_id, sectors)
    }

    /// Ids of the ublk devices present, from `/sys/class/ublk-char` (or `/dev/ublkc*`
    /// where sysfs is not mounted). Opens nothing. Empty when the driver is not loaded.
    pub fn list() -> Result<Vec<u32>, Error> {
        let mut ids = ids_in(Path::new("/sys/class/ublk-char"), "ublkc");
        if ids.is_empty() {
            ids = ids_in(Path::new("/dev"), "ublkc");
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }
}

fn ids_in(dir: &Path, prefix: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let rest = name.to_str()?.strip_prefix(prefix)?;
            // Digits only: "ublkc3", not "ublkc3p1" or "ublk-control".
            if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            rest.parse().ok()
        })
        .collect()
}

fn pid_arg(pid: i32) -> Result<u64, Error> {
    u64::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::InvalidArg(format!("daemon pid {pid}: must be positive")))
}

fn dev_info_len() -> u16 {
    const LEN: usize = std::mem::size_of::<sys::ublksrv_ctrl_dev_info>();
    const _: () = assert!(LEN <= u16::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // asserted above
    let len = LEN as u16;
    len
}

fn params_len_u16() -> u16 {
    const LEN: usize = std::mem::size_of::<sys::ublk_params>();
    const _: () = assert!(LEN <= u16::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // asserted above
    let len = LEN as u16;
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_cmd_bytes_match_layout() {
        let c = sys::ublksrv_ctrl_cmd {
            dev_id: 0x0403_0201,
            queue_id: 0x0605,
            len: 0x0807,
            addr: 0x100f_0e0d_0c0b_0a09,
            data: [0x1817_1615_1413_1211],
            dev_path_len: 0x1a19,
            pad: 0x1c1b,
            reserved: 0x201f_1e1d,
        };
        let b = ctrl_cmd_bytes(&c);
        let want: Vec<u8> = (1..=32).collect();
        assert_eq!(&b[..32], &want[..]);
        assert!(b[32..].iter().all(|x| *x == 0));
        // The same bytes as the struct in memory.
        let mut p = Payload([0; 256]);
        // SAFETY: test only: `ublksrv_ctrl_cmd` is 32 bytes of integers, no padding.
        let raw = unsafe {
            std::slice::from_raw_parts((&c as *const sys::ublksrv_ctrl_cmd).cast::<u8>(), 32)
        };
        p.0[..32].copy_from_slice(raw);
        assert_eq!(&p.0[..32], &b[..32]);
    }

    #[test]
    fn payload_round_trip() {
        let mut p = Payload::new();
        let info = sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: 2,
            queue_depth: 128,
            state: sys::UBLK_S_DEV_LIVE,
            max_io_buf_bytes: 1 << 20,
            dev_id: 7,
            ublksrv_pid: 42,
            flags: 0x1fe,
            owner_uid: 1,
            owner_gid: 2,
            ..Default::default()
        };
        p.put(&info);
        assert_eq!(p.get::<sys::ublksrv_ctrl_dev_info>(), info);
        let d = DevInfo::decode(&info);
        assert_eq!(d.state, DevState::Live);
        assert_eq!(
            (d.dev_id, d.nr_hw_queues, d.queue_depth, d.ublksrv_pid),
            (7, 2, 128, 42)
        );
        assert_eq!(DevState::from_raw(9), DevState::Unknown(9));
    }

    #[test]
    fn add_dev_validation() {
        let ok = AddDev {
            dev_id: None,
            nr_hw_queues: 1,
            queue_depth: 128,
            max_io_buf_bytes: 1 << 20,
            flags: sys::UBLK_F_USER_COPY,
        };
        ok.validate().expect("valid");
        type Case = (fn(&mut AddDev), &'static str);
        let bad: Vec<Case> = vec![
            (|a| a.dev_id = Some(1 << 20), "device id"),
            (|a| a.nr_hw_queues = 0, "queues"),
            (|a| a.nr_hw_queues = 4097, "queues"),
            (|a| a.queue_depth = 0, "depth"),
            (|a| a.queue_depth = 4097, "depth"),
            (|a| a.max_io_buf_bytes = 512, "max IO size"),
            (|a| a.max_io_buf_bytes = (32 << 20) + 1, "max IO size"),
            (|a| a.flags |= sys::UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED"),
        ];
        for (f, needle) in bad {
            let mut a = ok.clone();
            f(&mut a);
            let err = a.validate().expect_err(needle);
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn paths_and_listing() {
        assert_eq!(char_path(3), PathBuf::from("/dev/ublkc3"));
        assert_eq!(block_path(12), PathBuf::from("/dev/ublkb12"));
        let dir = std::env::temp_dir().join(format!("coreblk-ublk-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for name in [
            "ublkc3",
            "ublkc10",
            "ublkc",
            "ublkc2p1",
            "ublk-control",
            "ublkb3",
        ] {
            std::fs::write(dir.join(name), b"").expect("touch");
        }
        let mut ids = ids_in(&dir, "ublkc");
        ids.sort_unstable();
        assert_eq!(ids, [3, 10]);
        std::fs::remove_dir_all(&dir).expect("rm");
        assert!(ids_in(Path::new("/nonexistent-coreblk"), "ublkc").is_empty());
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let e = Error::Io {
            op: "SET_PARAMS",
            dev_id: 3,
            errno: libc::EACCES,
        };
        let s = e.to_string();
        assert!(s.contains("SET_PARAMS of device 3"), "{s}");
        assert!(s.contains("before START"), "{s}");
        assert!(s.contains("Permission denied (errno 13)"), "{s}");
        assert!(!s.contains("os error"), "{s}");
        assert!(Error::NoControl.to_string().contains("modprobe ublk_drv"));
        assert!(pid_arg(0).is_err());
        assert!(pid_arg(-5).is_err());
        assert_eq!(pid_arg(77).expect("positive"), 77);
    }
}
