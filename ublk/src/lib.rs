//! `coreblk-ublk`: the Linux ublk protocol (issue 12, DESIGN §5).
//!
//! Owns: control commands on `/dev/ublk-control` ([`Control`]: feature query, add,
//! parameters, start, stop, delete, user recovery, quiesce, resize), feature negotiation
//! ([`choose`]), device parameters ([`Params`]), and the per-queue IO side ([`IoDescs`],
//! [`io_cmd_sqe`], the user-copy and auto-buffer-registration encodings). The raw ABI is
//! in [`sys`].
//!
//! Never: knows about volumes, threads or reactors (the daemon's `export` layer binds
//! queues to reactors), or blocks on the IO side. `Control` blocks and belongs on
//! control-plane threads. All `unsafe` lives here, in thin wrappers.
//!
//! Kernels: 6.12 (features 0x1fe) and 7.x (every bit up to 1 << 20) are both supported;
//! [`choose`] picks zero copy (AUTO_BUF_REG) where offered and USER_COPY otherwise.
//! Start reading at [`choose`], then [`Control`], then [`io_cmd_sqe`].

mod ctrl;
mod error;
mod features;
mod io;
mod params;
pub mod sys;

pub use ctrl::{block_path, char_path, AddDev, Control, DevInfo, DevState};
pub use error::Error;
pub use features::{choose, Choice, DataPath, Features, PathPref};
pub use io::{
    auto_buf_reg_addr, auto_buf_reg_decode, io_cmd_sqe, user_copy_offset, CmdTarget, IoCmd, IoDesc,
    IoDescs, IoOp, IO_RES_ABORT, IO_RES_NEED_GET_DATA, IO_RES_OK,
};
pub use params::{Discard, Params};
