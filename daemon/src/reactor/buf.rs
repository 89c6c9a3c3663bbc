//! IO buffers: page-aligned memory owned by one reactor, pooled, and registered with that
//! reactor's io_uring as one fixed buffer so backends can use `READ_FIXED`/`WRITE_FIXED`;
//! and *kernel buffers*: a ublk request's own pages, registered by the kernel in a slot
//! of the reactor's fixed-buffer table (AUTO_BUF_REG), which have no address in this
//! process at all.
//!
//! The bytes of an [`IoBuf`] are reached only through [`IoBuf::as_slice`] /
//! [`IoBuf::as_mut_slice`], which answer `None` for a kernel buffer: code that must read
//! or write data (a memory device, a copy, a zero fill) has to say what it does when there
//! is no memory, instead of touching it by accident. Backends that only hand the buffer to
//! the kernel use [`IoBuf::fixed`] (`READ_FIXED`/`WRITE_FIXED`, NVMe `uring_cmd` with a
//! fixed buffer) or [`IoBuf::mem_ptr`] (plain reads/writes of host memory).
//!
//! An [`IoBuf`] is moved into a request when the request is submitted and handed back with
//! its completion, so the type system — not a comment — guarantees that nobody touches the
//! memory while the kernel may be reading or writing it. Pool memory is allocated once, at
//! reactor start; taking and returning a buffer costs a push/pop on a free list.

use std::cell::RefCell;
use std::fmt;
use std::ptr::NonNull;
use std::rc::Rc;

/// Alignment of every buffer: satisfies O_DIRECT on any logical block size up to 4 KiB.
pub const BUF_ALIGN: usize = 4096;

struct PoolInner {
    /// The pool's memory; kept alive (and never moved) for the pool's lifetime.
    map: memmap2::MmapMut,
    chunk_bytes: usize,
    free: RefCell<Vec<u32>>,
}

/// A per-reactor pool of equally sized, page-aligned chunks in one registered region.
#[derive(Clone)]
pub struct BufPool {
    inner: Rc<PoolInner>,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("chunk_bytes", &self.inner.chunk_bytes)
            .field("chunks", &self.capacity())
            .field("free", &self.available())
            .finish()
    }
}

impl BufPool {
    /// Allocates `count` chunks of `chunk_bytes` (rounded up to [`BUF_ALIGN`]).
    pub fn new(chunk_bytes: usize, count: usize) -> std::io::Result<Self> {
        let chunk_bytes = chunk_bytes.max(BUF_ALIGN).next_multiple_of(BUF_ALIGN);
        let total = chunk_bytes
            .checked_mul(count.max(1))
            .ok_or_else(|| std::io::Error::other("buffer pool size overflows"))?;
        let map = memmap2::MmapMut::map_anon(total)?;
        let count_u32 = u32::try_from(count.max(1))
            .map_err(|_| std::io::Error::other("too many buffer chunks"))?;
        let free = (0..count_u32).rev().collect();
        Ok(Self {
            inner: Rc::new(PoolInner {
                map,
                chunk_bytes,
                free: RefCell::new(free),
            }),
        })
    }

    /// Size of one chunk: the largest buffer this pool hands out.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes
    }

    /// Number of chunks in the pool.
    pub fn capacity(&self) -> usize {
        self.inner.map.len() / self.inner.chunk_bytes
    }

    /// Chunks not handed out right now.
    pub fn available(&self) -> usize {
        self.inner.free.borrow().len()
    }

    /// The whole region, for registration with io_uring: (address, length).
    pub fn region(&self) -> (*const u8, usize) {
        (self.inner.map.as_ptr(), self.inner.map.len())
    }

    /// Takes a buffer of `len` bytes (≤ [`Self::chunk_bytes`]); `None` when the pool is empty
    /// or `len` is too large — callers queue and retry on a completion (back-pressure).
    pub fn take(&self, len: usize) -> Option<IoBuf> {
        if len > self.inner.chunk_bytes {
            return None;
        }
        let idx = self.inner.free.borrow_mut().pop()?;
        let offset = idx as usize * self.inner.chunk_bytes;
        // The chunk lies inside the map, so the pointer is in bounds and non-null.
        let ptr = NonNull::new(self.inner.map.as_ptr().wrapping_add(offset).cast_mut())?;
        Some(IoBuf {
            addr: Addr::Mem(ptr),
            len,
            backing: Backing::Pool {
                pool: Rc::clone(&self.inner),
                idx,
            },
        })
    }
}

enum Backing {
    Pool {
        pool: Rc<PoolInner>,
        idx: u32,
    },
    Heap {
        layout: std::alloc::Layout,
    },
    /// Part of another buffer, kept alive by this reference (see [`IoBuf::piece`]).
    Piece {
        whole: Rc<IoBuf>,
    },
    /// A kernel-registered buffer: nothing of ours to free (the kernel unregisters it when
    /// the ublk request is committed, which its owner does only after this buffer is back).
    Kernel,
}

/// Where the bytes are.
#[derive(Clone, Copy)]
enum Addr {
    /// Host memory we own while we hold the buffer.
    Mem(NonNull<u8>),
    /// Bytes `[offset, offset + len)` of the buffer at fixed-buffer `index` of this
    /// reactor's ring, registered by the kernel; no address in this process.
    Kernel { index: u16, offset: u32 },
}

/// An aligned buffer for one IO. Owned by whoever holds it; moved into a request while the
/// kernel (or a backend) uses it and handed back with the completion.
pub struct IoBuf {
    addr: Addr,
    len: usize,
    backing: Backing,
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("pooled", &matches!(self.backing, Backing::Pool { .. }))
            .field("kernel", &self.is_kernel())
            .finish()
    }
}

impl IoBuf {
    /// A zeroed, [`BUF_ALIGN`]-aligned buffer from the heap, outside any pool (pieces of
    /// requests, control paths, tests). Not registered with a ring, so backends use plain
    /// reads/writes for it. Freed buffers are kept per thread for reuse ([`HEAP_CACHE`]).
    pub fn alloc(len: usize) -> Self {
        let (mut buf, fresh) = Self::heap(len);
        if !fresh {
            buf.host_mut().fill(0);
        }
        buf
    }

    /// A buffer to read into: [`Self::alloc`] without zeroing a reused buffer again (it
    /// keeps this thread's bytes of its last use). Only for reads whose user hands on no
    /// more than the bytes the read filled.
    pub fn alloc_for_read(len: usize) -> Self {
        Self::heap(len).0
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let (mut buf, _) = Self::heap(data.len());
        buf.host_mut().copy_from_slice(data);
        buf
    }

    /// Bytes `[offset, offset + len)` of the kernel-registered buffer at fixed-buffer
    /// `index` of this reactor's ring (a ublk request's pages, AUTO_BUF_REG). It has no memory here:
    /// [`Self::as_slice`] answers `None`; backends use [`Self::fixed`]. The kernel checks
    /// every use against the registered buffer's bounds and direction, so a wrong index or
    /// length fails the IO (EFAULT) rather than touching our memory.
    ///
    /// Whoever makes one keeps the registration alive (does not commit the ublk request)
    /// until the buffer, and every piece of it, is back.
    pub fn kernel(index: u16, offset: u32, len: usize) -> Self {
        assert!(
            u32::try_from(len)
                .ok()
                .and_then(|l| l.checked_add(offset))
                .is_some(),
            "a kernel buffer of {offset}+{len} bytes is beyond any ublk request"
        );
        Self {
            addr: Addr::Kernel { index, offset },
            len,
            backing: Backing::Kernel,
        }
    }

    /// Whether this buffer (or the whole it is a piece of) is kernel-registered memory
    /// with no address here.
    pub fn is_kernel(&self) -> bool {
        matches!(self.addr, Addr::Kernel { .. })
    }

    /// The bytes, for code that reads them; `None` for a kernel buffer.
    pub fn as_slice(&self) -> Option<&[u8]> {
        let Addr::Mem(ptr) = self.addr else {
            return None;
        };
        // - `ptr` points to `len` bytes we own exclusively (a pool chunk taken off the free
        //   list, our own heap allocation, or a piece's disjoint range of one) that stay
        //   allocated while `self` lives;
        // - nobody else (kernel included) accesses it while we hold `&self`: requests take
        //   the buffer by value and give it back only after the completion is reaped.
        // SAFETY: both points above make the slice valid for reads while `&self` lives.
        Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) })
    }

    /// The bytes, for code that writes them; `None` for a kernel buffer.
    pub fn as_mut_slice(&mut self) -> Option<&mut [u8]> {
        let Addr::Mem(ptr) = self.addr else {
            return None;
        };
        // SAFETY: as in `as_slice`; `&mut self` additionally makes this the only reference.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len) })
    }

    /// A copy of the bytes; `None` for a kernel buffer.
    pub fn to_vec(&self) -> Option<Vec<u8>> {
        self.as_slice().map(<[u8]>::to_vec)
    }

    /// The bytes of a buffer made here from host memory (never a kernel buffer).
    fn host_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
            .expect("heap buffers are host memory by construction")
    }

    /// A heap buffer of `len` bytes with unspecified (but initialised) content: a recycled
    /// one of the same size from this thread's cache, else a new zeroed allocation
    /// (`true`: fresh, so all zero).
    fn heap(len: usize) -> (Self, bool) {
        let layout = std::alloc::Layout::from_size_align(len.max(1), BUF_ALIGN)
            .expect("IO buffer length below isize::MAX");
        let (ptr, fresh) = match HEAP_CACHE.with(|c| c.borrow_mut().take(layout)) {
            Some(p) => (Some(p), false),
            // Zeroed, so that every byte is initialised.
            None => (
                // SAFETY: `layout` has a non-zero size (len.max(1)), power-of-two alignment.
                NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }),
                true,
            ),
        };
        let Some(ptr) = ptr else {
            std::alloc::handle_alloc_error(layout)
        };
        let buf = Self {
            addr: Addr::Mem(ptr),
            len,
            backing: Backing::Heap { layout },
        };
        (buf, fresh)
    }

    /// A buffer over bytes `[off, off + len)` of `whole`: a request's buffer lent out in
    /// pieces, one per device IO, with no copy. `whole` comes back (`Rc::try_unwrap`) once
    /// every piece is dropped. A piece of a kernel buffer is the same registered buffer at
    /// `offset + off`.
    ///
    /// # Safety
    /// While the piece lives, no other live piece of `whole` overlaps it and nobody reads
    /// or writes `whole`'s bytes through `whole` itself (each piece hands out `&mut` to
    /// its own range).
    ///
    /// # Panics
    /// When the range is not inside `whole`.
    pub unsafe fn piece(whole: &Rc<IoBuf>, off: usize, len: usize) -> IoBuf {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= whole.len),
            "piece {off}+{len} outside a buffer of {}",
            whole.len
        );
        let addr = match whole.addr {
            // The range is inside `whole`'s allocation, so the pointer is in bounds,
            // non-null.
            Addr::Mem(p) => Addr::Mem(NonNull::new(p.as_ptr().wrapping_add(off)).unwrap_or(p)),
            Addr::Kernel { index, offset } => Addr::Kernel {
                index,
                // `off < whole.len`, which fits u32 (see `kernel`).
                offset: offset + u32::try_from(off).expect("inside a kernel buffer"),
            },
        };
        IoBuf {
            addr,
            len,
            backing: Backing::Piece {
                whole: Rc::clone(whole),
            },
        }
    }

    /// Whether this buffer is a piece of another ([`Self::piece`]).
    pub fn is_piece(&self) -> bool {
        matches!(self.backing, Backing::Piece { .. })
    }

    /// Length of the IO this buffer carries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ring's fixed buffer holding these bytes, for `READ_FIXED`/`WRITE_FIXED` (or a
    /// `uring_cmd` with a fixed buffer): `(buf_index, addr)`, where `addr` is what the SQE
    /// carries — the address for pooled memory (index 0, the pool region), the offset
    /// inside the registered buffer for a kernel buffer (a kernel-registered buffer
    /// starts at address 0). `None` for heap memory, which is not registered.
    pub fn fixed(&self) -> Option<(u16, u64)> {
        match (self.addr, &self.backing) {
            (Addr::Kernel { index, offset }, _) => Some((index, u64::from(offset))),
            (Addr::Mem(p), Backing::Pool { .. }) => Some((0, p.as_ptr() as u64)),
            (Addr::Mem(p), Backing::Piece { whole }) => {
                whole.fixed().map(|(i, _)| (i, p.as_ptr() as u64))
            }
            (Addr::Mem(_), Backing::Heap { .. } | Backing::Kernel) => None,
        }
    }

    /// What an SQE carries for this buffer: `(Some(buf_index), addr)` for a fixed buffer
    /// (see [`Self::fixed`]), `(None, address)` for heap memory. Valid for `len()` bytes
    /// while `self` is alive.
    pub fn sqe_addr(&mut self) -> (Option<u16>, u64) {
        if let Some((index, addr)) = self.fixed() {
            return (Some(index), addr);
        }
        match self.addr {
            Addr::Mem(p) => (None, p.as_ptr() as u64),
            Addr::Kernel { .. } => unreachable!("a kernel buffer is always fixed"),
        }
    }

    /// Raw pointer to the bytes for building an SQE (valid for `len()` bytes while `self`
    /// is alive); `None` for a kernel buffer.
    pub fn mem_ptr(&mut self) -> Option<*mut u8> {
        match self.addr {
            Addr::Mem(p) => Some(p.as_ptr()),
            Addr::Kernel { .. } => None,
        }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Pool { pool, idx } => pool.free.borrow_mut().push(*idx),
            // The whole buffer goes with its last reference; the kernel's with its commit.
            Backing::Piece { .. } | Backing::Kernel => {}
            Backing::Heap { layout } => {
                let Addr::Mem(ptr) = self.addr else {
                    unreachable!("heap buffers are host memory")
                };
                let layout = *layout;
                // During thread exit the cache may be gone: free directly then.
                let kept = HEAP_CACHE
                    .try_with(|c| c.borrow_mut().put(ptr, layout))
                    .unwrap_or(Some(ptr));
                if let Some(ptr) = kept {
                    // `ptr` came from `alloc_zeroed(layout)` in `IoBuf::heap`; this buffer
                    // owned it and the cache refused it.
                    // SAFETY: so it is live, of `layout`, and freed exactly once, here.
                    unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) }
                }
            }
        }
    }
}

/// Most bytes of freed heap buffers a thread keeps for reuse.
const HEAP_CACHE_BYTES: usize = 32 << 20;
/// Largest heap buffer kept for reuse.
const HEAP_CACHE_MAX_BUF: usize = 4 << 20;

thread_local! {
    /// Freed heap buffers of this thread, by size: the IO path allocates the same few
    /// sizes (a cluster's piece of a request) over and over, and handing each back to the
    /// allocator made it trim and fault the pages in again (a 128 KiB sequential write at
    /// QD 32 over 64 KiB clusters ran at a fifth of the QD 16 rate).
    static HEAP_CACHE: RefCell<HeapCache> = RefCell::new(HeapCache::default());
}

/// See [`HEAP_CACHE`]. Owns the memory it holds (allocated with `alloc_zeroed(layout)`).
#[derive(Default)]
struct HeapCache {
    /// (layout, buffers of that layout).
    free: Vec<(std::alloc::Layout, Vec<NonNull<u8>>)>,
    bytes: usize,
}

impl HeapCache {
    fn take(&mut self, layout: std::alloc::Layout) -> Option<NonNull<u8>> {
        let (_, list) = self.free.iter_mut().find(|(l, _)| *l == layout)?;
        let p = list.pop()?;
        self.bytes -= layout.size();
        Some(p)
    }

    /// Keeps `p` (allocated with `layout`, no longer used by anyone); gives it back when
    /// the cache is full.
    fn put(&mut self, p: NonNull<u8>, layout: std::alloc::Layout) -> Option<NonNull<u8>> {
        if layout.size() > HEAP_CACHE_MAX_BUF || self.bytes + layout.size() > HEAP_CACHE_BYTES {
            return Some(p);
        }
        self.bytes += layout.size();
        match self.free.iter_mut().find(|(l, _)| *l == layout) {
            Some((_, list)) => list.push(p),
            None => self.free.push((layout, vec![p])),
        }
        None
    }
}

impl Drop for HeapCache {
    fn drop(&mut self) {
        for (layout, list) in self.free.drain(..) {
            for p in list {
                // The cache owns `p`, allocated with `layout` (see `put`).
                // SAFETY: so it is live, of `layout`, and freed once, here.
                unsafe { std::alloc::dealloc(p.as_ptr(), layout) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(b: &mut IoBuf) -> usize {
        b.mem_ptr().expect("host memory") as usize
    }

    #[test]
    fn pool_hands_out_aligned_chunks_and_takes_them_back() {
        let pool = BufPool::new(4096, 3).expect("pool");
        let mut a = pool.take(4096).expect("a");
        let b = pool.take(512).expect("b");
        assert_eq!(addr(&mut a) % BUF_ALIGN, 0);
        assert_eq!(
            a.fixed(),
            Some((0, addr(&mut a) as u64)),
            "pool memory is index 0"
        );
        assert_eq!(b.len(), 512);
        assert_eq!(pool.available(), 1);
        assert!(pool.take(8192).is_none(), "larger than a chunk");
        drop(a);
        assert_eq!(pool.available(), 2);
        let _c = pool.take(4096).expect("c");
        let _d = pool.take(4096).expect("d");
        assert!(pool.take(4096).is_none(), "pool exhausted");
    }

    #[test]
    fn heap_buffers_are_reused_zeroed_again_and_the_cache_is_bounded() {
        let mut a = IoBuf::alloc(65536);
        a.as_mut_slice().expect("memory").fill(0xab);
        let pa = addr(&mut a);
        drop(a);
        let mut b = IoBuf::alloc(65536);
        assert_eq!(
            addr(&mut b),
            pa,
            "a freed buffer of the same size is reused"
        );
        assert!(
            b.as_slice().expect("memory").iter().all(|&x| x == 0),
            "alloc zeroes a reused buffer"
        );
        drop(b);
        let c = IoBuf::from_slice(&[7u8; 65536]);
        assert!(c.as_slice().expect("memory").iter().all(|&x| x == 7));
        drop(c);
        let many: Vec<IoBuf> = (0..HEAP_CACHE_BYTES / 65536 + 8)
            .map(|_| IoBuf::alloc(65536))
            .collect();
        drop(many);
        let cached = HEAP_CACHE.with(|c| c.borrow().bytes);
        assert!(cached <= HEAP_CACHE_BYTES, "cache holds {cached} bytes");
        drop(IoBuf::alloc(HEAP_CACHE_MAX_BUF + BUF_ALIGN));
        assert_eq!(
            HEAP_CACHE.with(|c| c.borrow().bytes),
            cached,
            "large buffers are not kept"
        );
    }

    #[test]
    fn pieces_write_into_the_whole_without_a_copy() {
        let mut whole = IoBuf::alloc(8192);
        let base = addr(&mut whole);
        let whole = Rc::new(whole);
        // SAFETY: the two pieces are disjoint and `whole` is not read while they live.
        let (mut a, mut b) = unsafe {
            (
                IoBuf::piece(&whole, 0, 4096),
                IoBuf::piece(&whole, 4096, 4096),
            )
        };
        assert!(a.is_piece() && !whole.is_piece());
        assert_eq!(addr(&mut b) - base, 4096);
        a.as_mut_slice().expect("memory").fill(1);
        b.as_mut_slice().expect("memory").fill(2);
        assert_eq!(b.fixed(), None, "heap memory is not registered");
        drop((a, b));
        let whole = Rc::try_unwrap(whole).expect("no piece left");
        let bytes = whole.as_slice().expect("memory");
        assert!(bytes[..4096].iter().all(|&x| x == 1) && bytes[4096..].iter().all(|&x| x == 2));
    }

    #[test]
    fn pieces_of_pooled_memory_keep_the_pool_index() {
        let pool = BufPool::new(8192, 1).expect("pool");
        let whole = Rc::new(pool.take(8192).expect("chunk"));
        // SAFETY: one piece, `whole` untouched while it lives.
        let mut p = unsafe { IoBuf::piece(&whole, 4096, 4096) };
        let at = addr(&mut p) as u64;
        assert_eq!(p.fixed(), Some((0, at)));
        drop(p);
        drop(Rc::try_unwrap(whole).expect("no piece left"));
        assert_eq!(pool.available(), 1);
    }

    #[test]
    fn kernel_buffers_have_no_bytes_and_their_pieces_are_offsets() {
        let mut k = IoBuf::kernel(17, 0, 3 * 4096);
        assert!(k.is_kernel());
        assert_eq!(k.len(), 3 * 4096);
        assert!(k.as_slice().is_none(), "no bytes to read");
        assert!(k.as_mut_slice().is_none(), "no bytes to write");
        assert!(k.to_vec().is_none());
        assert!(k.mem_ptr().is_none(), "no address for a plain read/write");
        assert_eq!(
            k.fixed(),
            Some((17, 0)),
            "a kernel buffer starts at address 0"
        );
        let whole = Rc::new(k);
        // SAFETY: disjoint pieces; a kernel buffer has no bytes here to alias anyway.
        let (a, b) = unsafe {
            (
                IoBuf::piece(&whole, 0, 4096),
                IoBuf::piece(&whole, 4096, 8192),
            )
        };
        assert!(a.is_kernel() && b.is_kernel() && b.is_piece());
        assert_eq!(a.fixed(), Some((17, 0)));
        assert_eq!(b.fixed(), Some((17, 4096)));
        assert!(b.as_slice().is_none());
        let whole2 = Rc::new(b);
        // SAFETY: one piece of a piece.
        let c = unsafe { IoBuf::piece(&whole2, 4096, 4096) };
        assert_eq!(c.fixed(), Some((17, 8192)), "offsets add up through pieces");
        drop((a, c));
        drop(whole2);
        assert!(Rc::try_unwrap(whole).is_ok(), "no piece left");
        assert_eq!(IoBuf::kernel(3, 8192, 4096).fixed(), Some((3, 8192)));
    }

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        let mut buf = IoBuf::alloc(8192);
        assert_eq!(addr(&mut buf) % BUF_ALIGN, 0);
        assert!(buf.as_slice().expect("memory").iter().all(|&b| b == 0));
        buf.as_mut_slice().expect("memory")[0] = 7;
        assert_eq!(
            IoBuf::from_slice(buf.as_slice().expect("memory"))
                .as_slice()
                .expect("memory")[0],
            7
        );
        assert_eq!(buf.fixed(), None);
        assert!(!buf.is_kernel());
    }
}
