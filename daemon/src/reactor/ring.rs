//! The reactor's io_uring in one of two shapes: standard 64-byte SQEs / 16-byte CQEs, or
//! 128-byte SQEs / 32-byte CQEs (`SQE128 | CQE32`), which NVMe passthrough commands need.
//! The big shape is chosen per reactor at start (`ReactorConfig::big_sqe`) because it makes
//! every SQE twice as large; everything else about the two is the same.
//!
//! Must never: be used from another thread (the ring is `SINGLE_ISSUER`).

use io_uring::{cqueue, squeue, IoUring, Submitter};

pub(super) enum Ring {
    Std(IoUring),
    Big(IoUring<squeue::Entry128, cqueue::Entry32>),
}

/// The ring has no room (SQ full) or cannot take this entry shape.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PushError {
    Full,
    NeedsBigSqe,
}

fn builder<S: squeue::EntryMarker, C: cqueue::EntryMarker>(
    cq: u32,
    flags: u8,
) -> io_uring::Builder<S, C> {
    let mut b = IoUring::<S, C>::builder();
    b.setup_cqsize(cq);
    match flags {
        // Best: completions are processed only when this thread enters (no IPIs).
        0 => {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_submit_all();
        }
        // Older kernels: cooperative task running.
        1 => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        _ => {}
    }
    b
}

impl Ring {
    /// Builds a ring, trying the most efficient setup flags first.
    pub(super) fn new(sq: u32, cq: u32, big: bool) -> std::io::Result<Self> {
        let mut last = None;
        for flags in 0..3u8 {
            let r = if big {
                builder::<squeue::Entry128, cqueue::Entry32>(cq, flags)
                    .build(sq)
                    .map(Ring::Big)
            } else {
                builder::<squeue::Entry, cqueue::Entry>(cq, flags)
                    .build(sq)
                    .map(Ring::Std)
            };
            match r {
                Ok(r) => return Ok(r),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("io_uring setup failed")))
    }

    pub(super) fn submitter(&self) -> Submitter<'_> {
        match self {
            Ring::Std(r) => r.submitter(),
            Ring::Big(r) => r.submitter(),
        }
    }

    pub(super) fn is_big(&self) -> bool {
        matches!(self, Ring::Big(_))
    }

    /// # Safety
    /// The SQE's pointers must stay valid until its completion is reaped.
    pub(super) unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<(), PushError> {
        // SAFETY: forwarded from the caller's contract.
        let r = unsafe {
            match self {
                Ring::Std(r) => r.submission().push(sqe),
                Ring::Big(r) => r.submission().push(&squeue::Entry128::from(sqe.clone())),
            }
        };
        r.map_err(|_| PushError::Full)
    }

    /// # Safety
    /// The SQE's pointers must stay valid until its completion is reaped.
    pub(super) unsafe fn push128(&mut self, sqe: &squeue::Entry128) -> Result<(), PushError> {
        match self {
            Ring::Std(_) => Err(PushError::NeedsBigSqe),
            // SAFETY: forwarded from the caller's contract.
            Ring::Big(r) => unsafe { r.submission().push(sqe) }.map_err(|_| PushError::Full),
        }
    }

    /// Whether the kernel has completion work waiting for us to enter, or CQEs overflowed.
    pub(super) fn needs_enter(&mut self) -> bool {
        match self {
            Ring::Std(r) => {
                let sq = r.submission();
                sq.taskrun() || sq.cq_overflow()
            }
            Ring::Big(r) => {
                let sq = r.submission();
                sq.taskrun() || sq.cq_overflow()
            }
        }
    }

    /// Copies up to `out.len()` completions as (user_data, result); returns how many.
    pub(super) fn reap(&mut self, out: &mut [(u64, i32)]) -> usize {
        let mut n = 0;
        match self {
            Ring::Std(r) => {
                for cqe in r.completion() {
                    out[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                    if n == out.len() {
                        break;
                    }
                }
            }
            Ring::Big(r) => {
                for cqe in r.completion() {
                    out[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                    if n == out.len() {
                        break;
                    }
                }
            }
        }
        n
    }
}
