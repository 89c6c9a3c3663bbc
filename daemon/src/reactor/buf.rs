//! IO buffers: page-aligned memory owned by one reactor, pooled, and registered with that
//! reactor's io_uring as one fixed buffer so backends can use `READ_FIXED`/`WRITE_FIXED`.
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
            ptr,
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
}

/// An aligned buffer for one IO. Owned by whoever holds it; moved into a request while the
/// kernel (or a backend) uses it and handed back with the completion.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("pooled", &matches!(self.backing, Backing::Pool { .. }))
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
            buf.fill(0);
        }
        buf
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let (mut buf, _) = Self::heap(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// A heap buffer of `len` bytes with unspecified (but initialised) content: a recycled
    /// one of the same size from this thread's cache, else a new zeroed allocation
    /// (`true`: fresh, so all zero).
    fn heap(len: usize) -> (Self, bool) {
        let layout = std::alloc::Layout::from_size_align(len.max(1), BUF_ALIGN)
            .expect("IO buffer length below isize::MAX");
        let (ptr, fresh) = match HEAP_CACHE.with(|c| c.borrow_mut().take(layout)) {
            Some(p) => (Some(p), false),
            // SAFETY: `layout` has a non-zero size (len.max(1)) and a power-of-two
            // alignment. Zeroed, so that every byte is initialised.
            None => (
                NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }),
                true,
            ),
        };
        let Some(ptr) = ptr else {
            std::alloc::handle_alloc_error(layout)
        };
        let buf = Self {
            ptr,
            len,
            backing: Backing::Heap { layout },
        };
        (buf, fresh)
    }

    /// A buffer over bytes `[off, off + len)` of `whole`: a request's buffer lent out in
    /// pieces, one per device IO, with no copy. `whole` comes back (`Rc::try_unwrap`) once
    /// every piece is dropped.
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
        // The range is inside `whole`'s allocation, so the pointer is in bounds, non-null.
        let ptr = NonNull::new(whole.ptr.as_ptr().wrapping_add(off)).unwrap_or(whole.ptr);
        IoBuf {
            ptr,
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

    /// Index of the ring's fixed buffer that holds this memory, if it is pooled memory.
    pub fn fixed_index(&self) -> Option<u16> {
        match &self.backing {
            Backing::Pool { .. } => Some(0),
            Backing::Heap { .. } => None,
            Backing::Piece { whole } => whole.fixed_index(),
        }
    }

    /// Raw pointer for building an SQE; valid for `len()` bytes while `self` is alive.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw const pointer for building an SQE; valid for `len()` bytes while `self` is alive.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY:
        // - `ptr` points to `len` bytes we own exclusively (a pool chunk taken off the free
        //   list, or our own heap allocation) that stay allocated while `self` lives;
        // - nobody else (kernel included) accesses it while we hold `&self`: requests take
        //   the buffer by value and give it back only after the completion is reaped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` additionally makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Pool { pool, idx } => pool.free.borrow_mut().push(*idx),
            // The whole buffer goes with its last reference.
            Backing::Piece { .. } => {}
            Backing::Heap { layout } => {
                let (ptr, layout) = (self.ptr, *layout);
                // During thread exit the cache may be gone: free directly then.
                let kept = HEAP_CACHE
                    .try_with(|c| c.borrow_mut().put(ptr, layout))
                    .unwrap_or(Some(ptr));
                if let Some(ptr) = kept {
                    // SAFETY: `ptr` came from `alloc_zeroed(layout)` in `IoBuf::heap` and
                    // is freed exactly once: this buffer owned it and the cache refused it.
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
                // SAFETY: the cache owns `p`, allocated with `layout` (see `put`); it is
                // freed once, here.
                unsafe { std::alloc::dealloc(p.as_ptr(), layout) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_aligned_chunks_and_takes_them_back() {
        let pool = BufPool::new(4096, 3).expect("pool");
        let a = pool.take(4096).expect("a");
        let b = pool.take(512).expect("b");
        assert_eq!(a.as_ptr() as usize % BUF_ALIGN, 0);
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
        a.fill(0xab);
        let pa = a.as_ptr();
        drop(a);
        let b = IoBuf::alloc(65536);
        assert_eq!(b.as_ptr(), pa, "a freed buffer of the same size is reused");
        assert!(b.iter().all(|&x| x == 0), "alloc zeroes a reused buffer");
        drop(b);
        let c = IoBuf::from_slice(&[7u8; 65536]);
        assert!(c.iter().all(|&x| x == 7));
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
        let whole = Rc::new(IoBuf::alloc(8192));
        // SAFETY: the two pieces are disjoint and `whole` is not read while they live.
        let (mut a, mut b) = unsafe {
            (
                IoBuf::piece(&whole, 0, 4096),
                IoBuf::piece(&whole, 4096, 4096),
            )
        };
        assert!(a.is_piece() && !whole.is_piece());
        assert_eq!(b.as_ptr() as usize - whole.as_ptr() as usize, 4096);
        a.fill(1);
        b.fill(2);
        assert_eq!(b.fixed_index(), None);
        drop((a, b));
        let whole = Rc::try_unwrap(whole).expect("no piece left");
        assert!(whole[..4096].iter().all(|&x| x == 1) && whole[4096..].iter().all(|&x| x == 2));
    }

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        let mut buf = IoBuf::alloc(8192);
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf[0] = 7;
        assert_eq!(IoBuf::from_slice(&buf)[0], 7);
        assert_eq!(buf.fixed_index(), None);
    }
}
