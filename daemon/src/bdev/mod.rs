//! Block devices: one trait for every backend and wrapper (DESIGN §3).
//!
//! A [`BlockDevice`] is shared by all reactors (`Arc`); each reactor opens its own
//! [`Channel`] on it (SPDK's io_channel): per-reactor state such as the registered file
//! index lives there, so the IO path takes no lock. A request is an [`Io`] plus a
//! [`Completion`] and a tag; its completion is always delivered on the submitting reactor,
//! from the reactor loop (never inline in `submit`), with the buffer handed back.
//!
//! Backends: [`uring`] (O_DIRECT file or block device), [`nvme`] (a namespace found through
//! sysfs, IO through its block device), [`mem`] (`malloc` and `null`). Wrappers stack on any
//! device: [`record`] (a log of every write, flush, discard and write-zeroes) and [`fault`]
//! (fail, delay or tear chosen IOs); both are test tools behind the `testing` feature.
//! Discovery and claiming live in [`discover`], [`claim`] and [`label`].
//!
//! Must never: block a reactor (discard and write-zeroes go through io_uring, never a
//! blocking ioctl), or accept unaligned / out-of-range IO (EINVAL).

pub mod blocking;
pub mod claim;
pub mod discover;
#[cfg(feature = "testing")]
pub mod fault;
pub mod label;
pub mod mem;
pub mod nvme;
#[cfg(feature = "testing")]
pub mod record;
pub mod sysfs;
pub mod uring;

use std::fmt;
use std::rc::Rc;

use crate::reactor::{Completion, Errno, IoBuf, IoResult, OpKind, Reactor};

/// Shape and abilities of a block device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    /// Smallest addressable unit; every offset and length is a multiple of it.
    pub logical_block_size: u32,
    /// Unit the media writes internally (≥ logical).
    pub physical_block_size: u32,
    /// Device size in bytes (a multiple of the logical block size).
    pub size_bytes: u64,
    /// Largest single transfer.
    pub max_transfer_bytes: u32,
    /// Largest write the device writes atomically (never torn by power loss).
    pub atomic_write_bytes: u32,
    /// Discard is supported.
    pub discard_supported: bool,
    /// Discarded ranges read back as zeroes.
    pub discard_zeroes: bool,
    /// Write-zeroes is supported natively (otherwise it may be slow but still works).
    pub write_zeroes_supported: bool,
    /// The device has a volatile write cache: completed writes need a flush (or FUA) to be
    /// durable against power loss.
    pub volatile_cache: bool,
}

impl Geometry {
    /// Checks that `[offset, offset + len)` is aligned, non-empty and inside the device.
    pub fn check_range(&self, offset: u64, len: u64, is_data: bool) -> Result<(), Errno> {
        let lbs = u64::from(self.logical_block_size);
        let end = offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if len == 0
            || !offset.is_multiple_of(lbs)
            || !len.is_multiple_of(lbs)
            || end > self.size_bytes
        {
            return Err(Errno::EINVAL);
        }
        if is_data && len > u64::from(self.max_transfer_bytes) {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }
}

/// One request to a block device.
#[derive(Debug)]
pub enum Io {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Byte offset, logical-block aligned.
        offset: u64,
        /// Destination, handed back with the completion.
        buf: IoBuf,
    },
    /// Write `buf` at `offset`; `fua` makes it durable before it completes.
    Write {
        /// Byte offset, logical-block aligned.
        offset: u64,
        /// Source, handed back with the completion.
        buf: IoBuf,
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Hint that a range is unused (may or may not read back zeroes: see geometry).
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Make a range read back zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

impl Io {
    /// Short operation name for logs, errors and records.
    pub fn op_name(&self) -> &'static str {
        match self {
            Io::Read { .. } => "read",
            Io::Write { .. } => "write",
            Io::Flush => "flush",
            Io::Discard { .. } => "discard",
            Io::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Takes the buffer out of a read or write.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            Io::Read { buf, .. } | Io::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// Validates the request against `geo`: alignment, bounds and support.
    pub fn validate(&self, geo: &Geometry) -> Result<(), Errno> {
        match self {
            Io::Read { offset, buf } | Io::Write { offset, buf, .. } => {
                geo.check_range(*offset, buf.len() as u64, true)
            }
            Io::Flush => Ok(()),
            Io::Discard { offset, len } => {
                if !geo.discard_supported {
                    return Err(Errno::EOPNOTSUPP);
                }
                geo.check_range(*offset, *len, false)
            }
            Io::WriteZeroes { offset, len } => geo.check_range(*offset, *len, false),
        }
    }
}

/// A block device shared by every reactor.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The device's shape.
    fn geometry(&self) -> &Geometry;

    /// A short human name (path or kind) for logs and errors.
    fn name(&self) -> &str;

    /// Opens this reactor's channel to the device. Called on the reactor's thread.
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>>;
}

/// One reactor's access to a device.
pub trait Channel: fmt::Debug {
    /// The device's shape.
    fn geometry(&self) -> &Geometry;

    /// Submits `io`; `cb.complete(rx, tag, ..)` runs later on this reactor with the result
    /// and the buffer. Invalid requests complete with EINVAL; a full request table completes
    /// with EAGAIN — never a panic, never a lost buffer.
    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64);

    /// Whether reads (`write` false) or writes of this channel take a kernel buffer
    /// ([`IoBuf::kernel`]: a ublk request's pages, with no memory here) and never need its
    /// bytes. Callers holding a kernel buffer check this first and otherwise bring the
    /// bytes into host memory (the ublk copy path). A channel that says no and gets one
    /// anyway fails the request (EFAULT) without touching it.
    fn takes_kernel_bufs(&self, _write: bool) -> bool {
        false
    }

    /// Releases per-reactor resources (registered files). Called on the reactor's thread.
    fn close(&self, _rx: &Reactor) {}
}

/// Fills `buf` with zeroes and completes `cb(tag)` with its length (and the buffer): in
/// place for host memory; for a kernel buffer by a `READ_FIXED` from `/dev/zero` into it,
/// the one way to write bytes we cannot address.
pub fn zero_fill(rx: &Reactor, mut buf: IoBuf, cb: Rc<dyn Completion>, tag: u64) {
    let n = u32::try_from(buf.len()).expect("an IO buffer fits u32");
    if let Some(b) = buf.as_mut_slice() {
        b.fill(0);
        return complete_soft(rx, cb, tag, Ok(n), Some(buf));
    }
    let (Some(index), addr) = buf.sqe_addr() else {
        unreachable!("a buffer without memory is a fixed kernel buffer")
    };
    let sqe = io_uring::opcode::ReadFixed::new(
        io_uring::types::Fd(rx.dev_zero_fd()),
        addr as *mut u8,
        n,
        index,
    )
    .build();
    // the SQE names the kernel buffer at `index` by an offset the kernel resolves
    // and bounds-checks there; `buf` moves into the request slot, so its owner keeps the
    // registration alive until the completion; `/dev/zero` is held open by the reactor.
    // SAFETY: the reasons above hold for this call.
    let r = unsafe { rx.submit(sqe, OpKind::Fast, Rc::clone(&cb), tag, Some(buf)) };
    if let Err((_full, buf)) = r {
        // The request table is full: the caller retries (as for any channel).
        complete_soft(rx, cb, tag, Err(Errno::EAGAIN), buf);
    }
}

/// Completes a request in software: through the reactor's software completion path, so
/// the caller sees it from the loop like any ring completion. If even that has no free slot
/// the request completes inline with EAGAIN — the only case where `submit` calls back
/// before returning (back-pressure: the caller retries later).
pub fn complete_soft(
    rx: &Reactor,
    cb: Rc<dyn Completion>,
    tag: u64,
    res: IoResult,
    buf: Option<IoBuf>,
) {
    if let Err((_, buf)) = rx.complete_soft(Rc::clone(&cb), tag, res, buf) {
        cb.complete(rx, tag, Err(Errno::EAGAIN), buf);
    }
}

/// Completes a request that failed before reaching the device (validation, full table).
pub fn fail_request(
    rx: &Reactor,
    cb: Rc<dyn Completion>,
    tag: u64,
    err: Errno,
    buf: Option<IoBuf>,
) {
    complete_soft(rx, cb, tag, Err(err), buf);
}

/// A caller's completion and tag, parked while a wrapper's own request is in flight.
pub type Parked = (Rc<dyn Completion>, u64);

/// A small slot table for wrappers that must map their own tags back to the caller's
/// request: insert on submit, take on completion. Grows to the peak queue depth, then
/// reuses slots (no allocation in steady state).
#[derive(Debug)]
pub struct ReqTable<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for ReqTable<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> ReqTable<T> {
    /// Stores `v`; returns its slot, usable as a tag.
    pub fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(v);
                i
            }
            None => {
                self.slots.push(Some(v));
                self.slots.len() - 1
            }
        }
    }

    /// What slot `i` holds.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.slots.get(i)?.as_ref()
    }

    /// What slot `i` holds, mutably.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.slots.get_mut(i)?.as_mut()
    }

    /// Removes and returns what slot `i` holds.
    pub fn take(&mut self, i: usize) -> Option<T> {
        let v = self.slots.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
}

#[cfg(test)]
mod kernel_buf_tests {
    //! Kernel buffers (ublk zero copy) on the host: which channels take them, and that the
    //! ones that do not fail them without touching them. The host has no ublk, so a kernel
    //! buffer here names an empty slot of the ring's table: the kernel answers EFAULT,
    //! which shows the SQE named the slot (not an address).
    use super::*;
    use crate::reactor::{ReactorConfig, ReactorSet};

    type Seen = (IoResult, Option<bool>, Option<Vec<u8>>);

    /// Sends (result, whether the buffer came back as a kernel buffer, its bytes).
    struct Tx(crossbeam::channel::Sender<Seen>);
    impl Completion for Tx {
        fn complete(&self, _rx: &Reactor, _tag: u64, res: IoResult, buf: Option<IoBuf>) {
            let k = buf.as_ref().map(IoBuf::is_kernel);
            let bytes = buf.and_then(|b| b.to_vec());
            let _ = self.0.send((res, k, bytes));
        }
    }

    fn reactor() -> ReactorSet {
        let cfg = ReactorConfig {
            pin: false,
            buf_count: 4,
            kernel_buf_slots: 8,
            ..ReactorConfig::default()
        };
        ReactorSet::start(&[0], &cfg).expect("reactor")
    }

    #[test]
    fn only_channels_that_never_touch_bytes_take_kernel_buffers() {
        let set = reactor();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0x5a; 1 << 20]).expect("file");
        let uring = uring::UringDevice::open(&path).expect("uring device");
        let (tx, rx_done) = crossbeam::channel::unbounded();
        set.remotes()[0]
            .call(move |rx: &Reactor| {
                let m = mem::MallocDevice::new(1 << 20)
                    .expect("malloc")
                    .open_channel(rx)
                    .expect("channel");
                let n = mem::NullDevice::new(1 << 20)
                    .open_channel(rx)
                    .expect("channel");
                let u = uring.open_channel(rx).expect("channel");
                assert!(!m.takes_kernel_bufs(false) && !m.takes_kernel_bufs(true));
                assert!(n.takes_kernel_bufs(false) && n.takes_kernel_bufs(true));
                assert!(u.takes_kernel_bufs(false) && u.takes_kernel_bufs(true));
                let cb = || Rc::new(Tx(tx.clone())) as Rc<dyn Completion>;
                // 1. The RAM disk refuses one, hands it back, touches nothing.
                m.submit(
                    rx,
                    Io::Write {
                        offset: 0,
                        buf: IoBuf::kernel(1, 0, 4096),
                        fua: false,
                    },
                    cb(),
                    0,
                );
                // 2. READ_FIXED / WRITE_FIXED name the (empty) slot: EFAULT from the kernel.
                u.submit(
                    rx,
                    Io::Read {
                        offset: 0,
                        buf: IoBuf::kernel(1, 0, 4096),
                    },
                    cb(),
                    0,
                );
                // 3. Zero fill: in place for memory, READ_FIXED from /dev/zero for a slot.
                zero_fill(rx, IoBuf::from_slice(&[7u8; 4096]), cb(), 0);
                zero_fill(rx, IoBuf::kernel(2, 4096, 4096), cb(), 0);
                // 4. Pooled memory still goes through index 0 and reads the file.
                let b = rx.bufs().take(4096).expect("pooled");
                u.submit(rx, Io::Read { offset: 0, buf: b }, cb(), 0);
            })
            .expect("call");
        let mut got: Vec<Seen> = (0..5)
            .map(|_| {
                rx_done
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("completion")
            })
            .collect();
        // Software completions (malloc, host zero fill) come in submission order, ring
        // completions in any: sort the three kinds apart.
        got.sort_by_key(|(res, k, b)| (res.is_ok(), *k, b.as_ref().map(|b| b[0])));
        let efault = Err(Errno(libc::EFAULT));
        assert_eq!(
            got.iter().filter(|(r, k, _)| *r == efault && *k == Some(true)).count(),
            3,
            "malloc, READ_FIXED and the /dev/zero fill of empty slots: EFAULT, buffer back: {got:?}"
        );
        assert!(
            got.iter().any(|(r, _, b)| *r == Ok(4096)
                && b.as_deref().is_some_and(|b| b.iter().all(|&x| x == 0))),
            "host memory zero-filled in place: {got:?}"
        );
        assert!(
            got.iter().any(|(r, _, b)| *r == Ok(4096)
                && b.as_deref().is_some_and(|b| b.iter().all(|&x| x == 0x5a))),
            "a pooled read through index 0 reads the file: {got:?}"
        );
    }
}
