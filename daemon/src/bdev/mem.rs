//! In-memory backends: `malloc` (a RAM disk) and `null` (discards writes, reads leave the
//! buffer untouched). Both complete through the reactor's software completion path — the
//! same slot table and dispatch as ring completions — so they measure the per-IO software
//! cost of everything above the kernel.
//!
//! `malloc` memory is shared by every reactor; it is stored as `AtomicU64` words copied with
//! relaxed loads and stores, so overlapping IO from two reactors is a race in block-device
//! terms (as on real hardware) but never undefined behaviour in Rust terms.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{complete_soft, fail_request, BlockDevice, Channel, Geometry, Io};
use crate::reactor::{Completion, Errno, Reactor};

/// Largest transfer for memory devices.
const MEM_MAX_TRANSFER: u32 = 1 << 20;

fn mem_geometry(size_bytes: u64, discard_zeroes: bool) -> Geometry {
    Geometry {
        logical_block_size: 512,
        physical_block_size: 4096,
        size_bytes,
        max_transfer_bytes: MEM_MAX_TRANSFER,
        atomic_write_bytes: 4096,
        discard_supported: true,
        discard_zeroes,
        write_zeroes_supported: true,
        volatile_cache: false,
    }
}

/// The `null` device: every IO succeeds without touching data.
#[derive(Debug)]
pub struct NullDevice {
    geo: Geometry,
}

impl NullDevice {
    /// A null device of `size_bytes` (rounded down to 4 KiB).
    pub fn new(size_bytes: u64) -> Self {
        Self {
            geo: mem_geometry(size_bytes & !4095, false),
        }
    }
}

impl BlockDevice for NullDevice {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn name(&self) -> &str {
        "null"
    }
    fn open_channel(&self, _rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        Ok(Rc::new(NullChannel {
            geo: self.geo.clone(),
        }))
    }
}

#[derive(Debug)]
struct NullChannel {
    geo: Geometry,
}

impl Channel for NullChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(&self.geo) {
            return fail_request(rx, cb, tag, e, io.into_buf());
        }
        let len = match &io {
            Io::Read { buf, .. } | Io::Write { buf, .. } => buf.len(),
            _ => 0,
        };
        let res = Ok(u32::try_from(len).expect("validated: len ≤ max_transfer_bytes"));
        complete_soft(rx, cb, tag, res, io.into_buf());
    }

    fn takes_kernel_bufs(&self, _write: bool) -> bool {
        // It never touches the bytes.
        true
    }
}

/// The `malloc` device: a RAM disk shared by every reactor.
#[derive(Debug)]
pub struct MallocDevice {
    geo: Geometry,
    words: Arc<[AtomicU64]>,
}

impl MallocDevice {
    /// A zeroed RAM disk of `size_bytes` (rounded down to 4 KiB).
    pub fn new(size_bytes: u64) -> std::io::Result<Self> {
        let size_bytes = size_bytes & !4095;
        let words = usize::try_from(size_bytes / 8)
            .map_err(|_| std::io::Error::other("malloc device larger than the address space"))?;
        let mut v = Vec::new();
        v.try_reserve_exact(words).map_err(|_| {
            std::io::Error::other(format!("cannot allocate a {size_bytes}-byte malloc device"))
        })?;
        v.resize_with(words, || AtomicU64::new(0));
        Ok(Self {
            geo: mem_geometry(size_bytes, true),
            words: v.into(),
        })
    }
}

impl MallocDevice {
    /// This device with a smaller largest transfer, as many NVMe controllers have (MDTS):
    /// requests above it fail with EINVAL, so users must split.
    #[must_use]
    pub fn with_max_transfer(mut self, bytes: u32) -> Self {
        self.geo.max_transfer_bytes = bytes;
        self
    }
}

impl BlockDevice for MallocDevice {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn name(&self) -> &str {
        "malloc"
    }
    fn open_channel(&self, _rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        Ok(Rc::new(MallocChannel {
            geo: self.geo.clone(),
            words: Arc::clone(&self.words),
        }))
    }
}

#[derive(Debug)]
struct MallocChannel {
    geo: Geometry,
    words: Arc<[AtomicU64]>,
}

impl MallocChannel {
    /// Word range of a validated byte range (offsets are ≥ 512-byte aligned).
    fn words(&self, offset: u64, len: u64) -> &[AtomicU64] {
        let start = usize::try_from(offset / 8).expect("validated offset fits memory");
        let n = usize::try_from(len / 8).expect("validated length fits memory");
        &self.words[start..start + n]
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) {
        let words = self.words(offset, buf.len() as u64);
        for (chunk, w) in buf.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
    }

    fn write_from(&self, offset: u64, buf: &[u8]) {
        let words = self.words(offset, buf.len() as u64);
        for (chunk, w) in buf.chunks_exact(8).zip(words) {
            let v = u64::from_ne_bytes(chunk.try_into().expect("chunks_exact yields 8 bytes"));
            w.store(v, Ordering::Relaxed);
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        for w in self.words(offset, len) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

impl Channel for MallocChannel {
    fn geometry(&self) -> &Geometry {
        &self.geo
    }
    fn submit(&self, rx: &Reactor, mut io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(&self.geo) {
            return fail_request(rx, cb, tag, e, io.into_buf());
        }
        let mut done = 0usize;
        match &mut io {
            // The RAM disk copies bytes, so it needs host memory (and says no to kernel
            // buffers: `takes_kernel_bufs`).
            Io::Read { buf, .. } | Io::Write { buf, .. } if buf.is_kernel() => {
                return fail_request(rx, cb, tag, Errno(libc::EFAULT), io.into_buf());
            }
            Io::Read { offset, buf } => {
                done = buf.len();
                self.read_into(*offset, buf.as_mut_slice().expect("host memory"));
            }
            Io::Write { offset, buf, .. } => {
                done = buf.len();
                self.write_from(*offset, buf.as_slice().expect("host memory"));
            }
            Io::Flush => {}
            Io::Discard { offset, len } | Io::WriteZeroes { offset, len } => {
                self.zero(*offset, *len)
            }
        }
        let res = Ok(u32::try_from(done).expect("validated: len ≤ max_transfer_bytes"));
        complete_soft(rx, cb, tag, res, io.into_buf());
    }
}
