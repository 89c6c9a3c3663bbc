//! One ublk hardware queue on its reactor: every tag's FETCH / COMMIT_AND_FETCH command is
//! a standing command in the reactor's ring; a FETCH that completes carries a kernel
//! request, which is served against the volume's channel on this reactor and answered
//! with COMMIT_AND_FETCH (which waits for the tag's next request).
//!
//! Copy path (USER_COPY): a WRITE reads the request's bytes from `/dev/ublkcN` at the
//! tag's user-copy offset into a pooled buffer, then writes them to the volume; a READ
//! reads the volume into a pooled buffer, then writes the bytes to `/dev/ublkcN`. Requests
//! larger than a buffer go in buffer-sized pieces, one after another (one buffer per
//! request at a time). When the pool is empty the tag waits in this queue's line and the
//! reactor wakes the queue when a buffer comes back (no spinning).
//!
//! Zero copy (AUTO_BUF_REG, Linux >= 6.16): the queue holds one slot of the reactor's
//! fixed-buffer table per tag ([`Reactor::alloc_kernel_slots`]) and every FETCH /
//! COMMIT_AND_FETCH names the tag's slot, so the kernel registers the request's pages
//! there before the FETCH completes (and unregisters them at the commit). A READ or WRITE
//! then goes to the volume as a kernel buffer ([`IoBuf::kernel`], no memory here) at that
//! slot, in pieces of at most one volume transfer, and the device reads or writes the
//! pages directly (`READ_FIXED`/`WRITE_FIXED`). A request falls back to the copy path
//! when the volume channel cannot take kernel buffers for it
//! ([`crate::bdev::Channel::takes_kernel_bufs`]: a write through another reactor's
//! channel travels as bytes), when the kernel could not register the pages (FALLBACK:
//! `UBLK_IO_F_NEED_REG_BUF`), or when the queue got no slots (the table is full): such
//! devices are added with USER_COPY too, so the copy path works on them unchanged.
//!
//! Per-tag state is preallocated at start; the IO path allocates nothing.
//!
//! Must never: leave a fetched request without a COMMIT while the queue runs (every path
//! ends in [`Queue::commit`], errors included), or block.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use coreblk_ublk as ublk;
use io_uring::types;

use super::{commit_errno, piece_bytes, piece_len, plan, serve_zero_copy, DescOp, Plan};
use crate::bdev::{Channel, Io};
use crate::reactor::{BufWaiter, Completion, Errno, IoBuf, IoResult, Reactor};

/// Phases of a tag's request (bits 32.. of a completion tag; 0 = the standing command).
const PH_FETCH: u64 = 0;
const PH_COPY_IN: u64 = 1;
const PH_VOL: u64 = 2;
const PH_COPY_OUT: u64 = 3;

/// Called once a queue is quiet (drained, or stopped).
type OnQuiet = Box<dyn FnOnce(&Reactor)>;

/// Retry delay after a full request table (EAGAIN).
const RETRY_AFTER: Duration = Duration::from_micros(50);

/// What a queue is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// Serving requests.
    Running,
    /// Finishing in-flight requests; new ones are held, unanswered, for the next daemon
    /// (the kernel reissues them once this ring is gone: USER_RECOVERY_REISSUE).
    Draining,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tag {
    /// The kernel holds a FETCH / COMMIT_AND_FETCH of this tag.
    fetching: bool,
    /// A request is being served (between its FETCH completion and its COMMIT).
    busy: bool,
    /// The kernel answered the tag's command with ABORT or an error: it is done.
    dead: bool,
    plan: Option<Plan>,
    /// Bytes of a read/write finished.
    done: u64,
    /// Length of the piece in flight.
    piece: u64,
    /// This request is served zero copy (its pages registered at the tag's slot).
    zc: bool,
}

/// Everything a reactor needs to serve one queue of a device: `Send`, built by the
/// control plane.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// The device id.
    pub dev_id: u32,
    /// This queue's id (= its index among the serving reactors).
    pub q_id: u16,
    /// Tags.
    pub depth: u16,
    /// `/dev/ublkcN`, opened once by the control plane (the driver allows one open).
    pub char_dev: Arc<File>,
    /// Commands use the ioctl encoding.
    pub ioctl_encode: bool,
    /// Writes are refused.
    pub read_only: bool,
    /// The device was added with AUTO_BUF_REG (and USER_COPY): serve zero copy.
    pub zero_copy: bool,
}

/// One queue on its reactor.
pub struct Queue {
    me: Weak<Queue>,
    spec: QueueSpec,
    vol: Rc<dyn Channel>,
    descs: ublk::IoDescs,
    standing_id: Cell<u32>,
    piece_bytes: u64,
    /// Zero copy: the first of `depth` fixed-buffer slots (tag `t` uses `first + t`).
    kslots: Option<u16>,
    /// The fixed-buffer index each FETCH names: `kslots`, or (an AUTO_BUF_REG device
    /// without slots) an index beyond the table, so every request falls back.
    kslot_base: u16,
    /// Largest zero-copy piece: one volume transfer.
    zc_piece_bytes: u64,
    /// Reads and writes served zero copy / through the copy path (logged at close).
    served_zc: Cell<u64>,
    served_copy: Cell<u64>,
    tags: RefCell<Vec<Tag>>,
    /// Tags waiting for a pooled buffer, in arrival order (capacity: depth).
    waiting: RefCell<VecDeque<u16>>,
    /// Fetched requests held while draining.
    held: Cell<u32>,
    state: Cell<QueueState>,
    /// Called once no request is being served (draining) / every tag is dead (stopped).
    on_quiet: RefCell<Option<OnQuiet>>,
    /// Per-volume IO counters (`/metrics`).
    io: super::stats::Recorder,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("dev_id", &self.spec.dev_id)
            .field("q_id", &self.spec.q_id)
            .field("state", &self.state.get())
            .finish()
    }
}

impl Queue {
    /// Sets a queue up on `rx` over the volume channel `vol` (opened on `rx`) and sends
    /// every tag's FETCH. The reactor thread drops `CAP_SYS_ADMIN` from its effective set
    /// first, so the driver suppresses partition scans of the device.
    ///
    /// # Errors
    /// The descriptor array cannot be mapped, the char device cannot be registered, or
    /// the capability cannot be dropped (the message says which).
    pub fn start(rx: &Reactor, spec: QueueSpec, vol: Rc<dyn Channel>) -> Result<Rc<Queue>, String> {
        crate::reactor::caps::drop_sys_admin_effective().map_err(|e| {
            format!(
                "reactor {}: cannot drop CAP_SYS_ADMIN before serving ublk (partition scans would not be suppressed): {e}",
                rx.id()
            )
        })?;
        let descs =
            ublk::IoDescs::map(spec.char_dev.as_raw_fd(), spec.q_id, spec.depth).map_err(|e| {
                format!(
                    "mapping the IO descriptors of ublk queue {}: {e}",
                    spec.q_id
                )
            })?;
        let geo = vol.geometry();
        let lbs = u64::from(geo.logical_block_size);
        let piece = piece_bytes(
            rx.bufs().chunk_bytes() as u64,
            u64::from(geo.max_transfer_bytes),
            lbs,
        );
        let zc_piece = piece_bytes(
            u64::from(geo.max_transfer_bytes),
            u64::from(geo.max_transfer_bytes),
            lbs,
        );
        let depth = usize::from(spec.depth);
        let kslots = if spec.zero_copy {
            let s = rx.alloc_kernel_slots(spec.depth);
            if s.is_none() {
                tracing::warn!(
                    dev_id = spec.dev_id,
                    q = spec.q_id,
                    reactor = rx.id(),
                    depth = spec.depth,
                    "no free run of fixed-buffer slots for zero copy on this reactor (raise kernel_buf_slots); this queue serves through the copy path"
                );
            }
            s
        } else {
            None
        };
        let kslot_base = kslots.unwrap_or_else(|| rx.no_kernel_slot());
        let io = super::stats::Recorder::new(spec.dev_id, spec.depth);
        let q = Rc::new_cyclic(|me| Queue {
            me: me.clone(),
            spec,
            vol,
            descs,
            standing_id: Cell::new(u32::MAX),
            piece_bytes: piece,
            kslots,
            kslot_base,
            zc_piece_bytes: zc_piece,
            served_zc: Cell::new(0),
            served_copy: Cell::new(0),
            tags: RefCell::new(vec![Tag::default(); depth]),
            waiting: RefCell::new(VecDeque::with_capacity(depth)),
            held: Cell::new(0),
            state: Cell::new(QueueState::Running),
            on_quiet: RefCell::new(None),
            io,
        });
        let id = match rx.add_standing(Rc::clone(&q) as Rc<dyn Completion>) {
            Ok(id) => id,
            Err(e) => {
                if let Some(first) = q.kslots {
                    rx.free_kernel_slots(first, q.spec.depth);
                }
                return Err(e.to_string());
            }
        };
        q.standing_id.set(id);
        for tag in 0..q.spec.depth {
            q.send_cmd(rx, ublk::IoCmd::Fetch, tag, 0);
        }
        Ok(q)
    }

    fn rc(&self) -> Rc<Queue> {
        self.me
            .upgrade()
            .expect("a queue is alive while its reactor delivers to it")
    }

    /// Stops serving new requests (they are held for the next daemon) and calls `done`
    /// once no request is being served.
    pub fn drain(&self, rx: &Reactor, done: OnQuiet) {
        self.state.set(QueueState::Draining);
        *self.on_quiet.borrow_mut() = Some(done);
        self.check_quiet(rx);
    }

    /// Calls `done` once every tag's command has come back from the kernel (after the
    /// device was stopped: each FETCH answers ABORT) and nothing is being served.
    pub fn when_stopped(&self, rx: &Reactor, done: OnQuiet) {
        *self.on_quiet.borrow_mut() = Some(done);
        self.check_quiet(rx);
    }

    /// Requests being served.
    fn busy(&self) -> usize {
        self.tags.borrow().iter().filter(|t| t.busy).count()
    }

    fn all_dead(&self) -> bool {
        self.tags.borrow().iter().all(|t| t.dead && !t.busy)
    }

    fn check_quiet(&self, rx: &Reactor) {
        if self.on_quiet.borrow().is_none() {
            return;
        }
        let quiet = match self.state.get() {
            QueueState::Draining => self.busy() == 0,
            QueueState::Running => self.all_dead(),
        };
        if quiet {
            if let Some(f) = self.on_quiet.borrow_mut().take() {
                f(rx);
            }
        }
    }

    /// Releases the queue's hold on the reactor (its handler) and the volume channel.
    /// Call once its tags are dead or the reactor is going away.
    pub fn close(&self, rx: &Reactor) {
        rx.remove_standing(self.standing_id.get());
        self.vol.close(rx);
        if let Some(first) = self.kslots {
            rx.free_kernel_slots(first, self.spec.depth);
        }
        tracing::info!(
            dev_id = self.spec.dev_id,
            q = self.spec.q_id,
            zero_copy = self.spec.zero_copy,
            zero_copy_requests = self.served_zc.get(),
            copied_requests = self.served_copy.get(),
            "ublk queue closed"
        );
    }

    /// Whether this queue serves zero copy (it holds fixed-buffer slots).
    pub fn zero_copy(&self) -> bool {
        self.kslots.is_some()
    }

    /// The char device, by plain fd. Not a fixed file: on 6.12 a fixed file removed from
    /// the table is released only once every request issued before the removal is done,
    /// and the standing FETCHes of the other devices on this reactor never are: the char
    /// device stayed open and DEL_DEV waited forever.
    fn char_fd(&self) -> types::Fd {
        types::Fd(self.spec.char_dev.as_raw_fd())
    }

    fn send_cmd(&self, rx: &Reactor, cmd: ublk::IoCmd, tag: u16, result: i32) {
        // AUTO_BUF_REG: where the kernel registers the tag's next request. FALLBACK: if it
        // cannot (an index beyond the table: no slots), the request still comes, flagged
        // NEED_REG_BUF, and is served through the copy path.
        let addr = if self.spec.zero_copy {
            ublk::auto_buf_reg_addr(
                self.kslot_base
                    .saturating_add(if self.kslots.is_some() { tag } else { 0 }),
                ublk::sys::UBLK_AUTO_BUF_REG_FALLBACK,
            )
        } else {
            0
        };
        let sqe = ublk::io_cmd_sqe(
            self.char_fd(),
            cmd,
            self.spec.q_id,
            tag,
            result,
            addr,
            self.spec.ioctl_encode,
        );
        self.tags.borrow_mut()[usize::from(tag)].fetching = true;
        // the command carries no pointer (`addr` is 0, or a fixed-buffer index and
        // flags the kernel registers the request's pages at, in this ring's own table); the
        // fd is the char device this queue holds open (`spec.char_dev`) for as long as it
        // lives.
        // SAFETY: the reasons above hold for this call.
        unsafe { rx.submit_standing(sqe, self.standing_id.get(), u32::from(tag)) };
    }

    fn commit(&self, rx: &Reactor, tag: u16, result: i32) {
        {
            let mut tags = self.tags.borrow_mut();
            let t = &mut tags[usize::from(tag)];
            t.busy = false;
            t.plan = None;
        }
        self.io.finish(tag, result, rx.now());
        self.send_cmd(rx, ublk::IoCmd::CommitAndFetch, tag, result);
        self.check_quiet(rx);
    }

    fn on_fetch(&self, rx: &Reactor, tag: u16, res: IoResult) {
        {
            let mut tags = self.tags.borrow_mut();
            tags[usize::from(tag)].fetching = false;
        }
        match res {
            // UBLK_IO_RES_OK.
            Ok(0) => {}
            Ok(r) => {
                // NEED_GET_DATA is never asked for; answer so the request is not lost.
                tracing::warn!(
                    dev_id = self.spec.dev_id,
                    tag,
                    r,
                    "unexpected ublk fetch result; failing the request"
                );
                self.tags.borrow_mut()[usize::from(tag)].busy = true;
                return self.commit(rx, tag, -libc::EIO);
            }
            Err(e) => {
                // ABORT (ENODEV): the device stops or the queue is cancelled.
                if e.0 != libc::ENODEV {
                    tracing::warn!(dev_id = self.spec.dev_id, q = self.spec.q_id, tag, error = %e, "ublk command failed; the tag stops");
                }
                self.tags.borrow_mut()[usize::from(tag)].dead = true;
                return self.check_quiet(rx);
            }
        }
        if self.state.get() == QueueState::Draining {
            // Held unanswered: the next daemon gets it again (reissue).
            self.held.set(self.held.get() + 1);
            return;
        }
        let d = self.descs.get(tag);
        let op = match d.op {
            ublk::IoOp::Read => DescOp::Read,
            ublk::IoOp::Write => DescOp::Write,
            ublk::IoOp::Flush => DescOp::Flush,
            ublk::IoOp::Discard => DescOp::Discard,
            ublk::IoOp::WriteZeroes => DescOp::WriteZeroes,
            ublk::IoOp::Other(_) => DescOp::Other,
        };
        let p = plan(
            op,
            d.start_sector,
            d.nr_sectors,
            d.fua(),
            self.spec.read_only,
        );
        self.io.start(tag, op, &p, rx.now());
        let zc = serve_zero_copy(&p, self.kslots.is_some(), d.need_reg_buf(), |w| {
            self.vol.takes_kernel_bufs(w)
        });
        if matches!(p, Plan::Read { .. } | Plan::Write { .. }) {
            let c = if zc {
                &self.served_zc
            } else {
                &self.served_copy
            };
            c.set(c.get() + 1);
        }
        {
            let mut tags = self.tags.borrow_mut();
            let t = &mut tags[usize::from(tag)];
            t.busy = true;
            t.plan = Some(p);
            t.done = 0;
            t.piece = 0;
            t.zc = zc;
        }
        self.serve(rx, tag, p);
    }

    fn serve(&self, rx: &Reactor, tag: u16, p: Plan) {
        let ctag = tag_with(tag, PH_VOL);
        match p {
            Plan::Refuse(r) => self.commit(rx, tag, r),
            Plan::Read { .. } | Plan::Write { .. } => self.next_piece(rx, tag),
            Plan::Flush => self.vol.submit(rx, Io::Flush, self.rc(), ctag),
            Plan::Discard { offset, len } => {
                self.vol
                    .submit(rx, Io::Discard { offset, len }, self.rc(), ctag);
            }
            Plan::WriteZeroes { offset, len } => {
                self.vol
                    .submit(rx, Io::WriteZeroes { offset, len }, self.rc(), ctag);
            }
        }
    }

    /// Starts the next piece of a read or write (or queues the tag for a buffer).
    fn next_piece(&self, rx: &Reactor, tag: u16) {
        if self.tags.borrow()[usize::from(tag)].zc {
            return self.zc_piece(rx, tag);
        }
        if !self.waiting.borrow().is_empty() {
            // Others wait already: keep the order.
            self.waiting.borrow_mut().push_back(tag);
            return;
        }
        if !self.try_piece(rx, tag) {
            self.waiting.borrow_mut().push_back(tag);
            let w: Rc<dyn BufWaiter> = self.rc();
            rx.wait_for_buf(&w);
        }
    }

    /// Zero copy: the next piece of the request goes to the volume as the kernel buffer at
    /// the tag's slot (its bytes `[done, done + len)`); no pooled buffer, no copy.
    fn zc_piece(&self, rx: &Reactor, tag: u16) {
        let (p, done) = {
            let tags = self.tags.borrow();
            let t = &tags[usize::from(tag)];
            (t.plan, t.done)
        };
        let Some(first) = self.kslots else {
            unreachable!("zero-copy requests only on a queue with slots")
        };
        let (offset, total) = match p {
            Some(Plan::Read { offset, len } | Plan::Write { offset, len, .. }) => (offset, len),
            _ => unreachable!("pieces only of reads and writes"),
        };
        let len = piece_len(total, done, self.zc_piece_bytes);
        self.tags.borrow_mut()[usize::from(tag)].piece = len;
        let buf = IoBuf::kernel(
            first + tag,
            u32::try_from(done).expect("a request is at most max_io_bytes"),
            usize::try_from(len).expect("a piece fits memory"),
        );
        let io = match p {
            Some(Plan::Write { fua, .. }) => Io::Write {
                offset: offset + done,
                buf,
                fua,
            },
            _ => Io::Read {
                offset: offset + done,
                buf,
            },
        };
        self.vol.submit(rx, io, self.rc(), tag_with(tag, PH_VOL));
    }

    /// Takes a buffer and issues the piece's first step; false when the pool is empty.
    fn try_piece(&self, rx: &Reactor, tag: u16) -> bool {
        let (p, done) = {
            let tags = self.tags.borrow();
            let t = &tags[usize::from(tag)];
            (t.plan, t.done)
        };
        let (offset, total, write) = match p {
            Some(Plan::Read { offset, len }) => (offset, len, false),
            Some(Plan::Write { offset, len, .. }) => (offset, len, true),
            _ => unreachable!("pieces only of reads and writes"),
        };
        let len = piece_len(total, done, self.piece_bytes);
        let len_usize = usize::try_from(len).expect("a piece is at most a pool chunk");
        let Some(buf) = rx.bufs().take(len_usize) else {
            return false;
        };
        self.tags.borrow_mut()[usize::from(tag)].piece = len;
        if write {
            self.copy(rx, tag, buf, false);
        } else {
            self.vol.submit(
                rx,
                Io::Read {
                    offset: offset + done,
                    buf,
                },
                self.rc(),
                tag_with(tag, PH_VOL),
            );
        }
        true
    }

    /// Moves a piece's bytes between `buf` and the request: in (a write's data into
    /// `buf`) or out (a read's data to the request), then goes on as its completion would.
    ///
    /// A plain `pread`/`pwrite` on `/dev/ublkcN`, here on the reactor, not an io_uring
    /// READ/WRITE: the char device does not offer non-blocking IO (its open sets no
    /// FMODE_NOWAIT), so io_uring punts every such SQE to an io-wq worker thread, a thread
    /// hop and two wake-ups per piece (measured on 6.12: QD1 p50 40 -> 28 µs). The driver's user copy is a memcpy between this
    /// buffer and the request's pages, which are already in memory: it never waits.
    fn copy(&self, rx: &Reactor, tag: u16, mut buf: IoBuf, out: bool) {
        let done = self.tags.borrow()[usize::from(tag)].done;
        let off = ublk::user_copy_offset(
            self.spec.q_id,
            tag,
            u32::try_from(done).expect("a request is at most max_io_bytes"),
        );
        let file: &File = &self.spec.char_dev;
        let res = loop {
            let r = if out {
                let Some(bytes) = buf.as_slice() else {
                    unreachable!("the copy path copies from pooled buffers, never kernel ones")
                };
                file.write_at(bytes, off)
            } else {
                let Some(bytes) = buf.as_mut_slice() else {
                    unreachable!("the copy path copies into pooled buffers, never kernel ones")
                };
                file.read_at(bytes, off)
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(n) => break Ok(u32::try_from(n).unwrap_or(u32::MAX)),
                Err(e) => break Err(Errno(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        };
        let ph = if out { PH_COPY_OUT } else { PH_COPY_IN };
        self.on_io(rx, tag, ph, res, Some(buf));
    }

    fn on_io(&self, rx: &Reactor, tag: u16, phase: u64, res: IoResult, buf: Option<IoBuf>) {
        let (p, done, piece, zc) = {
            let tags = self.tags.borrow();
            let t = &tags[usize::from(tag)];
            (t.plan, t.done, t.piece, t.zc)
        };
        let Some(p) = p else {
            tracing::error!(
                dev_id = self.spec.dev_id,
                tag,
                "completion for an idle ublk tag"
            );
            return;
        };
        if res == Err(Errno::EAGAIN) && phase == PH_VOL {
            // The volume's request table was full: resubmit the same step shortly.
            let me = self.rc();
            rx.add_timer(
                RETRY_AFTER,
                Box::new(move |rx: &Reactor| me.retry_vol(rx, tag, p, buf)),
            );
            return;
        }
        let res = match res {
            Ok(n) => n,
            Err(e) => {
                if e != Errno::ENOSPC {
                    tracing::debug!(dev_id = self.spec.dev_id, tag, phase, error = %e, "ublk request failed");
                }
                drop(buf);
                return self.commit(rx, tag, commit_errno(e));
            }
        };
        match (p, phase) {
            (Plan::Write { offset, fua, .. }, PH_COPY_IN) => {
                let Some(buf) = buf.filter(|_| u64::from(res) == piece) else {
                    return self.commit(rx, tag, -libc::EIO);
                };
                self.vol.submit(
                    rx,
                    Io::Write {
                        offset: offset + done,
                        buf,
                        fua,
                    },
                    self.rc(),
                    tag_with(tag, PH_VOL),
                );
            }
            (Plan::Read { .. }, PH_VOL) if !zc => {
                let Some(buf) = buf else {
                    return self.commit(rx, tag, -libc::EIO);
                };
                self.copy(rx, tag, buf, true);
            }
            (Plan::Write { len, .. } | Plan::Read { len, .. }, PH_VOL)
            | (Plan::Read { len, .. }, PH_COPY_OUT) => {
                if phase == PH_COPY_OUT && u64::from(res) != piece {
                    return self.commit(rx, tag, -libc::EIO);
                }
                // Zero copy: the buffer names the request's own pages; it must be back
                // (dropped) before the commit unregisters them.
                drop(buf);
                let done = done + piece;
                self.tags.borrow_mut()[usize::from(tag)].done = done;
                if done < len {
                    self.next_piece(rx, tag);
                } else {
                    let n = i32::try_from(len).unwrap_or(i32::MAX);
                    self.commit(rx, tag, n);
                }
            }
            (Plan::Flush | Plan::Discard { .. } | Plan::WriteZeroes { .. }, PH_VOL) => {
                self.commit(rx, tag, 0);
            }
            _ => {
                tracing::error!(
                    dev_id = self.spec.dev_id,
                    tag,
                    phase,
                    ?p,
                    "ublk request in an impossible phase"
                );
                self.commit(rx, tag, -libc::EIO);
            }
        }
    }

    fn retry_vol(&self, rx: &Reactor, tag: u16, p: Plan, buf: Option<IoBuf>) {
        let done = self.tags.borrow()[usize::from(tag)].done;
        let ctag = tag_with(tag, PH_VOL);
        match (p, buf) {
            (Plan::Read { offset, .. }, Some(buf)) => self.vol.submit(
                rx,
                Io::Read {
                    offset: offset + done,
                    buf,
                },
                self.rc(),
                ctag,
            ),
            (Plan::Write { offset, fua, .. }, Some(buf)) => self.vol.submit(
                rx,
                Io::Write {
                    offset: offset + done,
                    buf,
                    fua,
                },
                self.rc(),
                ctag,
            ),
            (p @ (Plan::Flush | Plan::Discard { .. } | Plan::WriteZeroes { .. }), _) => {
                self.serve(rx, tag, p);
            }
            _ => self.commit(rx, tag, -libc::EIO),
        }
    }
}

fn tag_with(tag: u16, phase: u64) -> u64 {
    u64::from(tag) | (phase << 32)
}

impl Completion for Queue {
    fn complete(&self, rx: &Reactor, ctag: u64, res: IoResult, buf: Option<IoBuf>) {
        let tag = u16::try_from(ctag & 0xffff).expect("masked to 16 bits");
        let phase = ctag >> 32;
        if usize::from(tag) >= usize::from(self.spec.depth) {
            tracing::error!(
                dev_id = self.spec.dev_id,
                tag,
                "ublk completion for an unknown tag"
            );
            return;
        }
        if phase == PH_FETCH {
            self.on_fetch(rx, tag, res);
        } else {
            self.on_io(rx, tag, phase, res, buf);
        }
    }
}

impl BufWaiter for Queue {
    fn buf_ready(&self, rx: &Reactor) {
        loop {
            let Some(tag) = self.waiting.borrow_mut().pop_front() else {
                return;
            };
            if !self.try_piece(rx, tag) {
                self.waiting.borrow_mut().push_front(tag);
                let w: Rc<dyn BufWaiter> = self.rc();
                rx.wait_for_buf(&w);
                return;
            }
        }
    }
}
