//! The per-queue IO side: the mapped descriptor array of a queue, the FETCH /
//! COMMIT_AND_FETCH commands, and the address encodings of the two data paths.
//!
//! Used on reactor threads: nothing here blocks or allocates per IO. A queue's commands
//! are plain `IORING_OP_URING_CMD` SQEs (64 bytes) the caller pushes to its own ring;
//! the completion of a FETCH means "a request is in descriptor `tag`", read it with
//! [`IoDescs::get`], serve it, and answer with COMMIT_AND_FETCH carrying the result.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use memmap2::{Mmap, MmapOptions};

use crate::sys;
use crate::Error;

/// FETCH/COMMIT_AND_FETCH completed with a request in the descriptor.
pub const IO_RES_OK: i32 = sys::UBLK_IO_RES_OK;
/// NEED_GET_DATA mode only: issue [`IoCmd::NeedGetData`] for this write.
pub const IO_RES_NEED_GET_DATA: i32 = sys::UBLK_IO_RES_NEED_GET_DATA;
/// The device is stopping or quiescing: this tag is done, do not fetch it again.
pub const IO_RES_ABORT: i32 = sys::UBLK_IO_RES_ABORT;

/// The operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Anything else (zoned ops, WRITE_SAME): answer `-EOPNOTSUPP`.
    Other(u8),
}

impl IoOp {
    pub fn from_raw(op: u8) -> Self {
        match op {
            sys::UBLK_IO_OP_READ => IoOp::Read,
            sys::UBLK_IO_OP_WRITE => IoOp::Write,
            sys::UBLK_IO_OP_FLUSH => IoOp::Flush,
            sys::UBLK_IO_OP_DISCARD => IoOp::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => IoOp::WriteZeroes,
            other => IoOp::Other(other),
        }
    }
}

/// One request, copied out of the descriptor array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub op: IoOp,
    /// `UBLK_IO_F_*` bits in their `op_flags` positions (the op byte masked off), so
    /// `flags & sys::UBLK_IO_F_FUA` works as in C.
    pub flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    /// Copy mode without USER_COPY only: the server buffer the kernel copied to/from.
    pub addr: u64,
}

impl IoDesc {
    pub fn decode(d: &sys::ublksrv_io_desc) -> Self {
        #[allow(clippy::cast_possible_truncation)] // the op is the low byte by definition
        let op = (d.op_flags & 0xff) as u8;
        IoDesc {
            op: IoOp::from_raw(op),
            flags: d.op_flags & !0xff,
            nr_sectors: d.nr_sectors,
            start_sector: d.start_sector,
            addr: d.addr,
        }
    }

    /// Force unit access: the write is durable when it completes.
    pub fn fua(&self) -> bool {
        self.flags & sys::UBLK_IO_F_FUA != 0
    }

    /// WRITE_ZEROES must not deallocate (keep the blocks provisioned).
    pub fn nounmap(&self) -> bool {
        self.flags & sys::UBLK_IO_F_NOUNMAP != 0
    }

    /// AUTO_BUF_REG with FALLBACK: the kernel did not register the buffer.
    pub fn need_reg_buf(&self) -> bool {
        self.flags & sys::UBLK_IO_F_NEED_REG_BUF != 0
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.nr_sectors) << 9
    }

    /// Byte offset on the device.
    pub fn offset_bytes(&self) -> u64 {
        self.start_sector << 9
    }
}

/// A queue's descriptor array in `/dev/ublkcN`, mapped read-only.
#[derive(Debug)]
pub struct IoDescs {
    map: Mmap,
    queue_depth: u16,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// Bytes of the mapping for a queue of `depth` tags (what the kernel checks).
fn descs_len(depth: u16, page: usize) -> usize {
    (usize::from(depth) * std::mem::size_of::<sys::ublksrv_io_desc>()).div_ceil(page) * page
}

/// File offset of queue `q_id`'s array: queues are spaced by the largest array.
fn descs_offset(q_id: u16, page: usize) -> u64 {
    let stride = descs_len(sys::UBLK_MAX_QUEUE_DEPTH, page) as u64;
    sys::UBLKSRV_CMD_BUF_OFFSET + u64::from(q_id) * stride
}

impl IoDescs {
    /// Maps queue `q_id`'s descriptors. `queue_depth` is the device's (from ADD/info).
    /// The kernel binds a device to the first process that maps it.
    pub fn map(char_fd: RawFd, q_id: u16, queue_depth: u16) -> Result<Self, Error> {
        let err = |source| Error::MapDescs {
            q_id,
            queue_depth,
            source,
        };
        if queue_depth == 0 || queue_depth > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let page = page_size();
        // A shared read-only mapping of the kernel's descriptor array. The kernel rewrites
        // descriptors while it is mapped, so its bytes are never borrowed as `&[u8]`:
        // they are only read through `get` with volatile reads of whole descriptors.
        // SAFETY: read-only, never borrowed as a slice, and it lives as long as `self`.
        let map = unsafe {
            MmapOptions::new()
                .offset(descs_offset(q_id, page))
                .len(descs_len(queue_depth, page))
                .map(char_fd)
        }
        .map_err(err)?;
        Ok(IoDescs { map, queue_depth })
    }

    pub fn queue_depth(&self) -> u16 {
        self.queue_depth
    }

    /// The descriptor of `tag`, read once. Valid after that tag's FETCH (or
    /// COMMIT_AND_FETCH) completed with [`IO_RES_OK`] and until its next commit.
    pub fn get(&self, tag: u16) -> IoDesc {
        assert!(
            tag < self.queue_depth,
            "tag {tag} beyond queue depth {}",
            self.queue_depth
        );
        let base = self.map.as_ptr().cast::<sys::ublksrv_io_desc>();
        // `tag < queue_depth`, and the mapping holds `queue_depth` descriptors (its length
        // was rounded up from `queue_depth * 24`); the base is page aligned and 24-byte
        // strides keep 8-byte alignment. Volatile, because the kernel writes the array
        // behind the compiler's back.
        // SAFETY: in bounds and aligned (above).
        let raw = unsafe { std::ptr::read_volatile(base.add(usize::from(tag))) };
        IoDesc::decode(&raw)
    }
}

/// A queue IO command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCmd {
    /// Hand a tag to the kernel the first time (and after recovery).
    Fetch,
    /// Answer the request held in a tag and hand the tag back.
    CommitAndFetch,
    /// NEED_GET_DATA mode only (coreblk does not use it).
    NeedGetData,
}

impl IoCmd {
    /// The `cmd_op`: ioctl-encoded (`UBLK_U_IO_*`), or the legacy number.
    pub fn cmd_op(self, ioctl_encode: bool) -> u32 {
        match (self, ioctl_encode) {
            (IoCmd::Fetch, true) => sys::UBLK_U_IO_FETCH_REQ,
            (IoCmd::CommitAndFetch, true) => sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
            (IoCmd::NeedGetData, true) => sys::UBLK_U_IO_NEED_GET_DATA,
            (IoCmd::Fetch, false) => u32::from(sys::UBLK_IO_FETCH_REQ),
            (IoCmd::CommitAndFetch, false) => u32::from(sys::UBLK_IO_COMMIT_AND_FETCH_REQ),
            (IoCmd::NeedGetData, false) => u32::from(sys::UBLK_IO_NEED_GET_DATA),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for io_uring::types::Fixed {}
    impl Sealed for io_uring::types::Fd {}
}

/// Where an IO command goes: `/dev/ublkcN` as a registered file (`types::Fixed`) or a
/// plain descriptor (`types::Fd`).
pub trait CmdTarget: sealed::Sealed {
    #[doc(hidden)]
    fn uring_cmd16(self, cmd_op: u32) -> opcode::UringCmd16;
}

impl CmdTarget for types::Fixed {
    fn uring_cmd16(self, cmd_op: u32) -> opcode::UringCmd16 {
        opcode::UringCmd16::new(self, cmd_op)
    }
}

impl CmdTarget for types::Fd {
    fn uring_cmd16(self, cmd_op: u32) -> opcode::UringCmd16 {
        opcode::UringCmd16::new(self, cmd_op)
    }
}

fn io_cmd_bytes(c: &sys::ublksrv_io_cmd) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&c.q_id.to_ne_bytes());
    b[2..4].copy_from_slice(&c.tag.to_ne_bytes());
    b[4..8].copy_from_slice(&c.result.to_ne_bytes());
    b[8..16].copy_from_slice(&c.addr.to_ne_bytes());
    b
}

/// The SQE of an IO command for tag `tag` of queue `q_id`; set its `user_data` before
/// pushing it.
///
/// `result` (COMMIT_AND_FETCH): bytes done for READ/WRITE, 0 for other ops, or a
/// negative errno. `addr`: for FETCH/COMMIT_AND_FETCH it is the SQE's `addr` word —
/// [`auto_buf_reg_addr`] on AUTO_BUF_REG devices, 0 on USER_COPY devices; the command's
/// own `addr` is then 0, which both data paths require (kernels >= 6.15 refuse anything
/// else). For [`IoCmd::NeedGetData`] it is the server buffer, in the command.
/// `ioctl_encode`: [`crate::Choice::ioctl_encode`].
pub fn io_cmd_sqe(
    target: impl CmdTarget,
    cmd: IoCmd,
    q_id: u16,
    tag: u16,
    result: i32,
    addr: u64,
    ioctl_encode: bool,
) -> squeue::Entry {
    let (cmd_addr, sqe_addr) = match cmd {
        IoCmd::Fetch | IoCmd::CommitAndFetch => (0, addr),
        IoCmd::NeedGetData => (addr, 0),
    };
    let payload = sys::ublksrv_io_cmd {
        q_id,
        tag,
        result,
        addr: cmd_addr,
    };
    target
        .uring_cmd16(cmd.cmd_op(ioctl_encode))
        .cmd(io_cmd_bytes(&payload))
        .addr(Some(sqe_addr))
        .build()
}

/// The `pread`/`pwrite` offset on `/dev/ublkcN` for byte `byte_offset` of the request in
/// tag `tag` of queue `q_id` (USER_COPY).
pub fn user_copy_offset(q_id: u16, tag: u16, byte_offset: u32) -> u64 {
    debug_assert!(
        u32::from(q_id) < sys::UBLK_MAX_NR_QUEUES,
        "queue {q_id} out of range"
    );
    debug_assert!(
        u64::from(byte_offset) <= sys::UBLK_IO_BUF_BITS_MASK,
        "offset {byte_offset} beyond 32 MiB"
    );
    sys::UBLKSRV_IO_BUF_OFFSET
        + ((u64::from(q_id) & sys::UBLK_QID_BITS_MASK) << sys::UBLK_QID_OFF)
        + (u64::from(tag) << sys::UBLK_TAG_OFF)
        + (u64::from(byte_offset) & sys::UBLK_IO_BUF_BITS_MASK)
}

/// The SQE `addr` word of FETCH/COMMIT_AND_FETCH on an AUTO_BUF_REG device: register the
/// request's pages at fixed-buffer `index` of the issuing ring. `flags`:
/// [`sys::UBLK_AUTO_BUF_REG_FALLBACK`] or 0.
pub fn auto_buf_reg_addr(index: u16, flags: u8) -> u64 {
    debug_assert!(
        flags & !sys::UBLK_AUTO_BUF_REG_F_MASK == 0,
        "unknown auto-buf-reg flags {flags:#x}"
    );
    u64::from(index) | (u64::from(flags) << 16)
}

/// The [`sys::ublk_auto_buf_reg`] a kernel reads from an SQE `addr` word.
pub fn auto_buf_reg_decode(addr: u64) -> sys::ublk_auto_buf_reg {
    #[allow(clippy::cast_possible_truncation)] // fields are bit ranges of the word
    sys::ublk_auto_buf_reg {
        index: addr as u16,
        flags: (addr >> 16) as u8,
        reserved0: (addr >> 24) as u8,
        reserved1: (addr >> 32) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desc_decoding() {
        let raw = sys::ublksrv_io_desc {
            op_flags: u32::from(sys::UBLK_IO_OP_WRITE) | sys::UBLK_IO_F_FUA,
            nr_sectors: 8,
            start_sector: 100,
            addr: 0,
        };
        let d = IoDesc::decode(&raw);
        assert_eq!(d.op, IoOp::Write);
        assert!(d.fua() && !d.nounmap() && !d.need_reg_buf());
        assert_eq!(d.flags, sys::UBLK_IO_F_FUA);
        assert_eq!((d.len_bytes(), d.offset_bytes()), (4096, 51200));

        let raw = sys::ublksrv_io_desc {
            op_flags: u32::from(sys::UBLK_IO_OP_WRITE_ZEROES)
                | sys::UBLK_IO_F_NOUNMAP
                | sys::UBLK_IO_F_NEED_REG_BUF,
            ..Default::default()
        };
        let d = IoDesc::decode(&raw);
        assert_eq!(d.op, IoOp::WriteZeroes);
        assert!(d.nounmap() && d.need_reg_buf() && !d.fua());

        for (raw, op) in [
            (0, IoOp::Read),
            (1, IoOp::Write),
            (2, IoOp::Flush),
            (3, IoOp::Discard),
            (4, IoOp::Other(4)),
            (5, IoOp::WriteZeroes),
            (13, IoOp::Other(13)),
            (255, IoOp::Other(255)),
        ] {
            assert_eq!(IoOp::from_raw(raw), op);
        }
        // The op byte never leaks into flags, flags never into the op.
        let d = IoDesc::decode(&sys::ublksrv_io_desc {
            op_flags: 0xffff_ff02,
            ..Default::default()
        });
        assert_eq!(d.op, IoOp::Flush);
        assert_eq!(d.flags, 0xffff_ff00);
    }

    #[test]
    fn user_copy_offsets() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 0), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0, 0), 0x8000_0000 + (1 << 41));
        assert_eq!(user_copy_offset(0, 0, 4096), 0x8000_0000 + 4096);
        assert_eq!(
            user_copy_offset(4095, 65535, (1 << 25) - 1),
            0x8000_0000 + (4095 << 41) + (65535 << 25) + ((1 << 25) - 1)
        );
        // The kernel's decoding gives the fields back, and the offset fits an off_t.
        let off = user_copy_offset(3, 77, 12345);
        let rel = off - sys::UBLKSRV_IO_BUF_OFFSET;
        assert_eq!((rel >> sys::UBLK_QID_OFF) & sys::UBLK_QID_BITS_MASK, 3);
        assert_eq!((rel >> sys::UBLK_TAG_OFF) & sys::UBLK_TAG_BITS_MASK, 77);
        assert_eq!(rel & sys::UBLK_IO_BUF_BITS_MASK, 12345);
        assert!(i64::try_from(user_copy_offset(4095, 65535, (1 << 25) - 1)).is_ok());
    }

    #[test]
    fn auto_buf_reg_packing() {
        assert_eq!(auto_buf_reg_addr(0, 0), 0);
        assert_eq!(auto_buf_reg_addr(5, 0), 5);
        assert_eq!(
            auto_buf_reg_addr(0xabcd, sys::UBLK_AUTO_BUF_REG_FALLBACK),
            0x1_abcd
        );
        let r = auto_buf_reg_decode(auto_buf_reg_addr(300, sys::UBLK_AUTO_BUF_REG_FALLBACK));
        assert_eq!(
            r,
            sys::ublk_auto_buf_reg {
                index: 300,
                flags: 1,
                reserved0: 0,
                reserved1: 0
            }
        );
    }

    /// The SQE bytes: opcode URING_CMD, fd, cmd_op at offset 8 (the `off` union), the
    /// 16-byte command at offset 48, addr at offset 16.
    fn sqe_bytes(e: &squeue::Entry) -> [u8; 64] {
        const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
        // Test only: `squeue::Entry` is a `repr(C)` wrapper of the 64-byte SQE, built
        // from a zeroed SQE, so every byte is initialised.
        // SAFETY: same size (asserted above) and every byte initialised.
        unsafe { std::mem::transmute_copy(e) }
    }

    #[test]
    fn io_cmd_sqe_layout() {
        let e = io_cmd_sqe(
            types::Fd(9),
            IoCmd::CommitAndFetch,
            2,
            17,
            4096,
            auto_buf_reg_addr(17, 1),
            true,
        );
        let b = sqe_bytes(&e);
        assert_eq!(u32::from(b[0]), io_uring::opcode::UringCmd16::CODE as u32);
        assert_eq!(i32::from_ne_bytes(b[4..8].try_into().expect("4")), 9);
        assert_eq!(
            u32::from_ne_bytes(b[8..12].try_into().expect("4")),
            sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ
        );
        assert_eq!(
            u64::from_ne_bytes(b[16..24].try_into().expect("8")),
            0x1_0011
        );
        let cmd = &b[48..64];
        assert_eq!(u16::from_ne_bytes(cmd[0..2].try_into().expect("2")), 2);
        assert_eq!(u16::from_ne_bytes(cmd[2..4].try_into().expect("2")), 17);
        assert_eq!(i32::from_ne_bytes(cmd[4..8].try_into().expect("4")), 4096);
        assert_eq!(u64::from_ne_bytes(cmd[8..16].try_into().expect("8")), 0);

        let e = io_cmd_sqe(types::Fixed(0), IoCmd::Fetch, 0, 3, 0, 0, false);
        let b = sqe_bytes(&e);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().expect("4")), 0x20);
        assert_ne!(b[1] & (1 << 0), 0, "IOSQE_FIXED_FILE");
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().expect("8")), 0);

        let e = io_cmd_sqe(types::Fd(9), IoCmd::NeedGetData, 0, 1, 0, 0xdead_0000, true);
        let b = sqe_bytes(&e);
        assert_eq!(u64::from_ne_bytes(b[16..24].try_into().expect("8")), 0);
        assert_eq!(
            u64::from_ne_bytes(b[56..64].try_into().expect("8")),
            0xdead_0000
        );
    }

    #[test]
    fn descs_geometry() {
        assert_eq!(descs_len(128, 4096), 4096);
        assert_eq!(descs_len(170, 4096), 4096);
        assert_eq!(descs_len(171, 4096), 8192);
        assert_eq!(descs_len(4096, 4096), 98304);
        assert_eq!(descs_offset(0, 4096), 0);
        assert_eq!(descs_offset(3, 4096), 3 * 98304);
    }
}
