//! The recording wrapper (test tool, `testing` feature): stacks on any device and logs every
//! write (with its data and FUA flag), flush, discard and write-zeroes in submission order,
//! and notes the order in which each completed. Crash tests replay prefixes of the log onto
//! an image to reproduce what the device could hold after a power loss (dm-log-writes'
//! idea, in process).
//!
//! The log is one `Mutex` shared by all reactors: acceptable for a test tool, never built
//! into release binaries. Reads pass through unrecorded.

use std::cell::RefCell;
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{BlockDevice, Channel, Geometry, Io, Parked, ReqTable};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor};

/// What a logged request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordOp {
    /// A write of `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
    },
    /// A flush.
    Flush,
    /// A discard.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// A write-zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

/// One logged request. `submit_seq` and `complete_seq` are ticks of one clock that counts
/// both submissions and completions, so "completed before that was submitted" is a
/// comparison (what crash tests need to decide which writes a FLUSH covers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Tick at submission (increasing in submission order).
    pub submit_seq: u64,
    /// Tick at completion, once completed (increasing in completion order).
    pub complete_seq: Option<u64>,
    /// Outcome, once completed.
    pub result: Option<IoResult>,
    /// The request.
    pub op: RecordOp,
}

#[derive(Debug, Default)]
struct LogInner {
    records: Vec<Record>,
    /// The clock: ticks on every submission and completion.
    clock: u64,
}

/// The shared log of a [`RecordingDevice`].
#[derive(Clone, Debug, Default)]
pub struct WriteLog {
    inner: Arc<Mutex<LogInner>>,
}

impl WriteLog {
    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of every record, in submission order.
    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }

    /// The clock now: how many submissions and completions have happened. Tests note it
    /// when something is acknowledged, to line acknowledgements up with the device's log.
    pub fn now(&self) -> u64 {
        self.lock().clock
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    /// Forgets every record (e.g. after formatting, before the interesting part).
    pub fn clear(&self) {
        let mut l = self.lock();
        l.records.clear();
        l.clock = 0;
    }

    /// Applies `records` to `image` in the given order; failed requests are skipped.
    /// `discard_zeroes` says whether a discard makes the range read back zeroes.
    pub fn replay<'a>(
        records: impl IntoIterator<Item = &'a Record>,
        image: &mut [u8],
        discard_zeroes: bool,
    ) {
        for r in records {
            if matches!(r.result, Some(Err(_))) {
                continue;
            }
            apply(&r.op, image, discard_zeroes);
        }
    }

    /// Records that completed successfully, in completion order.
    pub fn completed_in_order(&self) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .lock()
            .records
            .iter()
            .filter(|r| matches!(r.result, Some(Ok(_))))
            .cloned()
            .collect();
        v.sort_by_key(|r| r.complete_seq);
        v
    }
}

fn range(image: &mut [u8], offset: u64, len: u64) -> &mut [u8] {
    let start = usize::try_from(offset).expect("replay offset fits memory");
    let end = usize::try_from(offset + len).expect("replay end fits memory");
    &mut image[start..end]
}

/// Applies one operation to an in-memory image.
pub fn apply(op: &RecordOp, image: &mut [u8], discard_zeroes: bool) {
    match op {
        RecordOp::Write { offset, data, .. } => {
            range(image, *offset, data.len() as u64).copy_from_slice(data);
        }
        RecordOp::Flush => {}
        RecordOp::Discard { offset, len } => {
            if discard_zeroes {
                range(image, *offset, *len).fill(0);
            }
        }
        RecordOp::WriteZeroes { offset, len } => range(image, *offset, *len).fill(0),
    }
}

/// A device that logs what passes through it to `inner`.
#[derive(Debug)]
pub struct RecordingDevice {
    inner: Arc<dyn BlockDevice>,
    log: WriteLog,
    name: String,
}

impl RecordingDevice {
    /// Wraps `inner`; the returned log fills as IO passes.
    pub fn new(inner: Arc<dyn BlockDevice>) -> (Arc<Self>, WriteLog) {
        let log = WriteLog::default();
        let name = format!("record({})", inner.name());
        (
            Arc::new(Self {
                inner,
                log: log.clone(),
                name,
            }),
            log,
        )
    }
}

impl BlockDevice for RecordingDevice {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        let inner = self.inner.open_channel(rx)?;
        let log = self.log.clone();
        Ok(Rc::new_cyclic(|me| RecordingChannel {
            inner,
            log,
            me: me.clone(),
            pending: RefCell::new(ReqTable::default()),
        }))
    }
}

struct RecordingChannel {
    inner: Rc<dyn Channel>,
    log: WriteLog,
    me: Weak<RecordingChannel>,
    /// Outstanding requests: the caller's completion and tag, and the record index.
    pending: RefCell<ReqTable<(Parked, Option<usize>)>>,
}

impl fmt::Debug for RecordingChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingChannel")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Channel for RecordingChannel {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }

    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        let op = match &io {
            Io::Read { .. } => None,
            Io::Write { offset, buf, fua } => {
                // It says no to kernel buffers (the log needs the bytes), so it gets none.
                let Some(data) = buf.to_vec() else {
                    return super::fail_request(rx, cb, tag, Errno(libc::EFAULT), io.into_buf());
                };
                Some(RecordOp::Write {
                    offset: *offset,
                    data,
                    fua: *fua,
                })
            }
            Io::Flush => Some(RecordOp::Flush),
            Io::Discard { offset, len } => Some(RecordOp::Discard {
                offset: *offset,
                len: *len,
            }),
            Io::WriteZeroes { offset, len } => Some(RecordOp::WriteZeroes {
                offset: *offset,
                len: *len,
            }),
        };
        let rec_idx = op.map(|op| {
            let mut l = self.log.lock();
            let seq = l.clock;
            l.clock += 1;
            l.records.push(Record {
                submit_seq: seq,
                complete_seq: None,
                result: None,
                op,
            });
            l.records.len() - 1
        });
        let slot = self.pending.borrow_mut().insert(((cb, tag), rec_idx));
        let me: Rc<dyn Completion> = self.me.upgrade().expect("channel alive while submitting");
        self.inner.submit(rx, io, me, slot as u64);
    }

    fn close(&self, rx: &Reactor) {
        self.inner.close(rx);
    }
}

impl Completion for RecordingChannel {
    fn complete(&self, rx: &Reactor, tag: u64, res: IoResult, buf: Option<IoBuf>) {
        let slot = usize::try_from(tag).expect("our tags are slot indices");
        let Some(((cb, user_tag), rec_idx)) = self.pending.borrow_mut().take(slot) else {
            panic!("recording channel: completion for unknown request {slot}");
        };
        if let Some(i) = rec_idx {
            let mut l = self.log.lock();
            let seq = l.clock;
            l.clock += 1;
            // A cleared log no longer holds the record.
            if let Some(r) = l.records.get_mut(i) {
                r.complete_seq = Some(seq);
                r.result = Some(res);
            }
        }
        cb.complete(rx, user_tag, res, buf);
    }
}
