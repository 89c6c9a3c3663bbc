//! The ublk user ABI (`include/uapi/linux/ublk_cmd.h`) as Rust: `#[repr(C)]` structs,
//! the `UBLK_*` constants coreblk uses and the ioctl-encoded command numbers.
//!
//! Owns: bit-exact layouts only. It never talks to the kernel. Layouts are the union of
//! what 6.12 and 7.x define; where 7.x appended fields (`ublk_params` grew `dma`, `seg`
//! and `integrity`), the kernel clamps `len` to its own size, so the newest layout is sent
//! to both. Every size and offset is checked at compile time below against the header.
#![allow(non_camel_case_types)]

use std::mem::{offset_of, size_of};

// ---- ioctl encoding (asm-generic/ioctl.h, as on x86_64 and arm64) ----

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS));
    #[allow(clippy::cast_possible_truncation)] // asserted above
    let size = size as u32;
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
}

/// `_IOR(type, nr, T)`.
pub const fn ior<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}

/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

/// `_IOC_NR(op)`: the legacy command number inside an ioctl-encoded one.
pub const fn ioc_nr(op: u32) -> u8 {
    #[allow(clippy::cast_possible_truncation)] // masked to 8 bits
    let nr = ((op >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)) as u8;
    nr
}

/// `_IOC_TYPE(op)`.
pub const fn ioc_type(op: u32) -> u8 {
    #[allow(clippy::cast_possible_truncation)] // masked to 8 bits
    let ty = ((op >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)) as u8;
    ty
}

const U: u8 = b'u';

// ---- control commands (on /dev/ublk-control, 128-byte SQEs) ----

pub const UBLK_CMD_GET_QUEUE_AFFINITY: u8 = 0x01;
pub const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
pub const UBLK_CMD_ADD_DEV: u8 = 0x04;
pub const UBLK_CMD_DEL_DEV: u8 = 0x05;
pub const UBLK_CMD_START_DEV: u8 = 0x06;
pub const UBLK_CMD_STOP_DEV: u8 = 0x07;
pub const UBLK_CMD_SET_PARAMS: u8 = 0x08;
pub const UBLK_CMD_GET_PARAMS: u8 = 0x09;
pub const UBLK_CMD_START_USER_RECOVERY: u8 = 0x10;
pub const UBLK_CMD_END_USER_RECOVERY: u8 = 0x11;
pub const UBLK_CMD_GET_DEV_INFO2: u8 = 0x12;
pub const UBLK_CMD_GET_FEATURES: u8 = 0x13;
pub const UBLK_CMD_DEL_DEV_ASYNC: u8 = 0x14;
pub const UBLK_CMD_UPDATE_SIZE: u8 = 0x15;
pub const UBLK_CMD_QUIESCE_DEV: u8 = 0x16;
pub const UBLK_CMD_TRY_STOP_DEV: u8 = 0x17;

pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 =
    ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_GET_QUEUE_AFFINITY);
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_GET_DEV_INFO);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_ADD_DEV);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_DEL_DEV);
pub const UBLK_U_CMD_START_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_START_DEV);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_STOP_DEV);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_SET_PARAMS);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_GET_PARAMS);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 =
    iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_START_USER_RECOVERY);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 =
    iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_END_USER_RECOVERY);
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_GET_DEV_INFO2);
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_GET_FEATURES);
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior::<ublksrv_ctrl_cmd>(U, UBLK_CMD_DEL_DEV_ASYNC);
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_UPDATE_SIZE);
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_QUIESCE_DEV);
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(U, UBLK_CMD_TRY_STOP_DEV);

/// `GET_FEATURES` answers in a buffer of exactly this many bytes.
pub const UBLK_FEATURES_LEN: u16 = 8;

// ---- IO commands (on /dev/ublkcN, normal 64-byte SQEs) ----

pub const UBLK_IO_FETCH_REQ: u8 = 0x20;
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;
pub const UBLK_IO_NEED_GET_DATA: u8 = 0x22;

pub const UBLK_U_IO_FETCH_REQ: u32 = iowr::<ublksrv_io_cmd>(U, UBLK_IO_FETCH_REQ);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 =
    iowr::<ublksrv_io_cmd>(U, UBLK_IO_COMMIT_AND_FETCH_REQ);
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr::<ublksrv_io_cmd>(U, UBLK_IO_NEED_GET_DATA);
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr::<ublksrv_io_cmd>(U, 0x23);
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr::<ublksrv_io_cmd>(U, 0x24);

/// Result of a FETCH/COMMIT_AND_FETCH completion: a request is in the descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// Result with NEED_GET_DATA: issue `UBLK_IO_NEED_GET_DATA` for this write.
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
/// The command was aborted (device stopping or quiescing): do not fetch again.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;

pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;

pub const UBLK_IO_BUF_OFF: u32 = 0;
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_IO_BUF_BITS_MASK: u64 = (1 << UBLK_IO_BUF_BITS) - 1;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_TAG_BITS_MASK: u64 = (1 << UBLK_TAG_BITS) - 1;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;
pub const UBLK_QID_BITS: u32 = 12;
pub const UBLK_QID_BITS_MASK: u64 = (1 << UBLK_QID_BITS) - 1;
pub const UBLK_MAX_NR_QUEUES: u32 = 1 << UBLK_QID_BITS;
pub const UBLKSRV_IO_BUF_TOTAL_BITS: u32 = UBLK_QID_OFF + UBLK_QID_BITS;

/// Device ids are minors of the ublk char/block majors (`UBLK_MINORS`, MINORBITS = 20).
pub const UBLK_MAX_UBLKS: u32 = 1 << 20;

// ---- feature / device flags ----

pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
pub const UBLK_F_ZONED: u64 = 1 << 8;
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;

// ---- device states (ublksrv_ctrl_dev_info.state) ----

pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ---- IO descriptor ops and flags (ublksrv_io_desc.op_flags) ----

pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
pub const UBLK_IO_OP_ZONE_OPEN: u8 = 10;
pub const UBLK_IO_OP_ZONE_CLOSE: u8 = 11;
pub const UBLK_IO_OP_ZONE_FINISH: u8 = 12;
pub const UBLK_IO_OP_ZONE_APPEND: u8 = 13;
pub const UBLK_IO_OP_ZONE_RESET_ALL: u8 = 14;
pub const UBLK_IO_OP_ZONE_RESET: u8 = 15;
pub const UBLK_IO_OP_REPORT_ZONES: u8 = 18;

/// Flag bits, in `op_flags` positions (bits 8..31; the op is bits 0..7).
pub const UBLK_IO_F_FAILFAST_DEV: u32 = 1 << 8;
pub const UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 1 << 9;
pub const UBLK_IO_F_FAILFAST_DRIVER: u32 = 1 << 10;
pub const UBLK_IO_F_META: u32 = 1 << 11;
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
pub const UBLK_IO_F_SWAP: u32 = 1 << 16;
/// AUTO_BUF_REG with FALLBACK only: the kernel could not register the buffer; the server
/// must register it itself (or fail the request).
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;
pub const UBLK_IO_F_INTEGRITY: u32 = 1 << 18;
pub const UBLK_IO_F_SHMEM_ZC: u32 = 1 << 19;

// ---- auto buffer registration (sqe->addr payload) ----

pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1 << 0;
pub const UBLK_AUTO_BUF_REG_F_MASK: u8 = UBLK_AUTO_BUF_REG_FALLBACK;

// ---- parameters ----

pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;
pub const UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 1 << 4;
pub const UBLK_PARAM_TYPE_SEGMENT: u32 = 1 << 5;
pub const UBLK_PARAM_TYPE_INTEGRITY: u32 = 1 << 6;

pub const UBLK_MIN_SEGMENT_SIZE: u32 = 4096;

// ---- structs ----

/// The control command, carried in the cmd area of a 128-byte SQE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_cmd {
    /// Target device; `u32::MAX` in ADD lets the kernel pick.
    pub dev_id: u32,
    /// Must be `u16::MAX` when the command is not for one queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    pub addr: u64,
    /// Inline argument (pid, size in sectors, timeout in ms).
    pub data: [u64; 1],
    /// Unprivileged devices and GET_DEV_INFO2 only.
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_ctrl_dev_info {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// For the server's own use; the driver never reads it.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// One request as the kernel describes it, in the mmapped array, indexed by tag.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_io_desc {
    /// op: bits 0-7, flags: bits 8-31.
    pub op_flags: u32,
    /// `nr_zones` for REPORT_ZONES.
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// The IO command, carried in the 16-byte cmd area of a normal SQE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublksrv_io_cmd {
    pub q_id: u16,
    pub tag: u16,
    /// COMMIT only: bytes done, or a negative errno.
    pub result: i32,
    /// Server buffer (copy mode without USER_COPY) or zone-append LBA; 0 otherwise.
    pub addr: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_auto_buf_reg {
    pub index: u16,
    pub flags: u8,
    pub reserved0: u8,
    pub reserved1: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_basic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_discard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// Read-only: filled by GET_PARAMS; SET_PARAMS with this type is refused.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_devt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_zoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// 6.14 and later; older kernels drop the type.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_dma_align {
    pub alignment: u32,
    pub pad: [u8; 4],
}

/// 6.14 and later.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_segment {
    pub seg_boundary_mask: u64,
    pub max_segment_size: u32,
    pub max_segments: u16,
    pub pad: [u8; 2],
}

/// 7.0 and later (needs UBLK_F_INTEGRITY).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_param_integrity {
    pub flags: u32,
    pub max_integrity_segments: u16,
    pub interval_exp: u8,
    pub metadata_size: u8,
    pub pi_offset: u8,
    pub csum_type: u8,
    pub tag_size: u8,
    pub pad: [u8; 5],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ublk_params {
    /// Bytes of this struct the caller passes; the kernel clamps it to its own size.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` bits: which sections are meaningful.
    pub types: u32,
    pub basic: ublk_param_basic,
    pub discard: ublk_param_discard,
    pub devt: ublk_param_devt,
    pub zoned: ublk_param_zoned,
    pub dma: ublk_param_dma_align,
    pub seg: ublk_param_segment,
    pub integrity: ublk_param_integrity,
}

/// `sizeof(struct ublk_params)` on 6.12 (basic, discard, devt, zoned).
pub const UBLK_PARAMS_LEN_6_12: usize = 112;

// ---- layout checks against the header ----

const _: () = {
    assert!(size_of::<ublksrv_ctrl_cmd>() == 32);
    assert!(offset_of!(ublksrv_ctrl_cmd, dev_id) == 0);
    assert!(offset_of!(ublksrv_ctrl_cmd, queue_id) == 4);
    assert!(offset_of!(ublksrv_ctrl_cmd, len) == 6);
    assert!(offset_of!(ublksrv_ctrl_cmd, addr) == 8);
    assert!(offset_of!(ublksrv_ctrl_cmd, data) == 16);
    assert!(offset_of!(ublksrv_ctrl_cmd, dev_path_len) == 24);
    assert!(offset_of!(ublksrv_ctrl_cmd, reserved) == 28);

    assert!(size_of::<ublksrv_ctrl_dev_info>() == 64);
    assert!(offset_of!(ublksrv_ctrl_dev_info, state) == 4);
    assert!(offset_of!(ublksrv_ctrl_dev_info, max_io_buf_bytes) == 8);
    assert!(offset_of!(ublksrv_ctrl_dev_info, dev_id) == 12);
    assert!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_pid) == 16);
    assert!(offset_of!(ublksrv_ctrl_dev_info, flags) == 24);
    assert!(offset_of!(ublksrv_ctrl_dev_info, ublksrv_flags) == 32);
    assert!(offset_of!(ublksrv_ctrl_dev_info, owner_uid) == 40);
    assert!(offset_of!(ublksrv_ctrl_dev_info, owner_gid) == 44);
    assert!(offset_of!(ublksrv_ctrl_dev_info, reserved2) == 56);

    assert!(size_of::<ublksrv_io_desc>() == 24);
    assert!(offset_of!(ublksrv_io_desc, nr_sectors) == 4);
    assert!(offset_of!(ublksrv_io_desc, start_sector) == 8);
    assert!(offset_of!(ublksrv_io_desc, addr) == 16);

    assert!(size_of::<ublksrv_io_cmd>() == 16);
    assert!(offset_of!(ublksrv_io_cmd, tag) == 2);
    assert!(offset_of!(ublksrv_io_cmd, result) == 4);
    assert!(offset_of!(ublksrv_io_cmd, addr) == 8);

    assert!(size_of::<ublk_auto_buf_reg>() == 8);
    assert!(offset_of!(ublk_auto_buf_reg, flags) == 2);
    assert!(offset_of!(ublk_auto_buf_reg, reserved1) == 4);

    assert!(size_of::<ublk_param_basic>() == 32);
    assert!(offset_of!(ublk_param_basic, logical_bs_shift) == 4);
    assert!(offset_of!(ublk_param_basic, physical_bs_shift) == 5);
    assert!(offset_of!(ublk_param_basic, io_opt_shift) == 6);
    assert!(offset_of!(ublk_param_basic, io_min_shift) == 7);
    assert!(offset_of!(ublk_param_basic, max_sectors) == 8);
    assert!(offset_of!(ublk_param_basic, chunk_sectors) == 12);
    assert!(offset_of!(ublk_param_basic, dev_sectors) == 16);
    assert!(offset_of!(ublk_param_basic, virt_boundary_mask) == 24);
    assert!(size_of::<ublk_param_discard>() == 20);
    assert!(offset_of!(ublk_param_discard, max_discard_segments) == 16);
    assert!(size_of::<ublk_param_devt>() == 16);
    assert!(size_of::<ublk_param_zoned>() == 32);
    assert!(size_of::<ublk_param_dma_align>() == 8);
    assert!(size_of::<ublk_param_segment>() == 16);
    assert!(size_of::<ublk_param_integrity>() == 16);

    assert!(offset_of!(ublk_params, basic) == 8);
    assert!(offset_of!(ublk_params, discard) == 40);
    assert!(offset_of!(ublk_params, devt) == 60);
    assert!(offset_of!(ublk_params, zoned) == 76);
    assert!(offset_of!(ublk_params, dma) == 108);
    assert!(offset_of!(ublk_params, seg) == 120);
    assert!(offset_of!(ublk_params, integrity) == 136);
    assert!(size_of::<ublk_params>() == 152);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers as the C preprocessor computes them (`_IOR`/`_IOWR` of `<linux/ioctl.h>`
    /// on the header's structs, printed with gcc on x86_64).
    #[test]
    fn ioctl_numbers() {
        assert_eq!(UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512);
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514);
        assert_eq!(UBLK_U_CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(UBLK_U_CMD_TRY_STOP_DEV, 0xc020_7517);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(UBLK_U_IO_NEED_GET_DATA, 0xc010_7522);
        assert_eq!(UBLK_U_IO_REGISTER_IO_BUF, 0xc010_7523);
        assert_eq!(UBLK_U_IO_UNREGISTER_IO_BUF, 0xc010_7524);
    }

    #[test]
    fn ioctl_fields_round_trip() {
        for op in [
            UBLK_U_CMD_ADD_DEV,
            UBLK_U_CMD_GET_FEATURES,
            UBLK_U_IO_COMMIT_AND_FETCH_REQ,
        ] {
            assert_eq!(ioc_type(op), b'u');
        }
        assert_eq!(ioc_nr(UBLK_U_CMD_ADD_DEV), UBLK_CMD_ADD_DEV);
        assert_eq!(ioc_nr(UBLK_U_IO_FETCH_REQ), UBLK_IO_FETCH_REQ);
        assert_eq!(UBLK_IO_RES_ABORT, -19);
    }

    #[test]
    fn io_buf_layout() {
        assert_eq!(UBLK_QID_OFF, 41);
        assert_eq!(UBLKSRV_IO_BUF_TOTAL_BITS, 53);
        assert_eq!(UBLK_MAX_NR_QUEUES, 4096);
    }
}
