//! The fault-injecting wrapper (test tool, `testing` feature): stacks on any device and, by
//! rule, fails, delays or tears chosen IOs — how tests make storage fail the way real
//! storage does (TigerBeetle's simulated storage, dm-flakey's idea, in process).
//!
//! Rules are matched in order; the first rule that matches an IO acts on it and uses up one
//! of its `times`. Delays wait on the reactor's timers (never a sleep). A torn write writes
//! only its first `keep_blocks` logical blocks and then fails with EIO, as a power cut in the
//! middle of a multi-block write can leave it. Rules live behind one `Mutex` shared by all
//! reactors: fine for a test tool, never built into release binaries.

use std::cell::RefCell;
use std::fmt;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{BlockDevice, Channel, Geometry, Io, Parked, ReqTable};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor};

/// Which operations a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpMatch {
    /// Any operation.
    Any,
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Discard,
    /// Write-zeroes.
    WriteZeroes,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete with this errno without touching the device.
    Fail(Errno),
    /// Pass the IO to the device after this delay.
    Delay(Duration),
    /// Writes only: write the first `keep_blocks` logical blocks, then fail with EIO.
    Tear {
        /// Blocks that reach the device.
        keep_blocks: u32,
    },
}

/// One fault rule.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// Operations it applies to.
    pub op: OpMatch,
    /// Only IOs overlapping `[start, end)` bytes (None: anywhere).
    pub range: Option<(u64, u64)>,
    /// Skip this many matching IOs before acting.
    pub skip: u64,
    /// Act on this many IOs, then stop matching (None: forever).
    pub times: Option<u64>,
    /// What to do.
    pub action: FaultAction,
}

impl FaultRule {
    /// A rule acting on every matching IO.
    pub fn new(op: OpMatch, action: FaultAction) -> Self {
        Self {
            op,
            range: None,
            skip: 0,
            times: None,
            action,
        }
    }

    /// Restricts the rule to IOs overlapping a byte range.
    pub fn in_range(mut self, start: u64, end: u64) -> Self {
        self.range = Some((start, end));
        self
    }

    /// Lets the first `n` matching IOs through.
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Acts `n` times only.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, io: &Io) -> bool {
        let (op, span) = match io {
            Io::Read { offset, buf } => (OpMatch::Read, Some((*offset, buf.len() as u64))),
            Io::Write { offset, buf, .. } => (OpMatch::Write, Some((*offset, buf.len() as u64))),
            Io::Flush => (OpMatch::Flush, None),
            Io::Discard { offset, len } => (OpMatch::Discard, Some((*offset, *len))),
            Io::WriteZeroes { offset, len } => (OpMatch::WriteZeroes, Some((*offset, *len))),
        };
        if self.op != OpMatch::Any && self.op != op {
            return false;
        }
        match (self.range, span) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((start, end)), Some((off, len))) => off < end && off + len > start,
        }
    }
}

/// The rules of a [`FaultDevice`]; tests change them while IO runs.
#[derive(Clone, Debug, Default)]
pub struct FaultRules {
    inner: Arc<Mutex<Vec<FaultRule>>>,
}

impl FaultRules {
    fn lock(&self) -> MutexGuard<'_, Vec<FaultRule>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a rule after the existing ones.
    pub fn push(&self, rule: FaultRule) {
        self.lock().push(rule);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Finds the action for `io`, consuming one use of the matching rule.
    fn decide(&self, io: &Io) -> Option<FaultAction> {
        let mut rules = self.lock();
        let idx = rules
            .iter()
            .position(|r| r.times != Some(0) && r.matches(io))?;
        let rule = &mut rules[idx];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        if let Some(t) = rule.times.as_mut() {
            *t -= 1;
        }
        Some(rule.action)
    }
}

/// A device that injects faults into IO to `inner`.
#[derive(Debug)]
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    rules: FaultRules,
    name: String,
}

impl FaultDevice {
    /// Wraps `inner`; add rules through the returned handle.
    pub fn new(inner: Arc<dyn BlockDevice>) -> (Arc<Self>, FaultRules) {
        let rules = FaultRules::default();
        let name = format!("fault({})", inner.name());
        (
            Arc::new(Self {
                inner,
                rules: rules.clone(),
                name,
            }),
            rules,
        )
    }
}

impl BlockDevice for FaultDevice {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn open_channel(&self, rx: &Reactor) -> std::io::Result<Rc<dyn Channel>> {
        let inner = self.inner.open_channel(rx)?;
        Ok(Rc::new_cyclic(|me| FaultChannel {
            inner,
            rules: self.rules.clone(),
            me: me.clone(),
            torn: RefCell::new(ReqTable::default()),
        }))
    }
}

struct FaultChannel {
    inner: Rc<dyn Channel>,
    rules: FaultRules,
    me: Weak<FaultChannel>,
    /// Torn writes in flight: the caller's completion, tag and original buffer.
    torn: RefCell<ReqTable<(Parked, IoBuf)>>,
}

impl fmt::Debug for FaultChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultChannel")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Channel for FaultChannel {
    fn geometry(&self) -> &Geometry {
        self.inner.geometry()
    }

    fn submit(&self, rx: &Reactor, io: Io, cb: Rc<dyn Completion>, tag: u64) {
        if let Err(e) = io.validate(self.geometry()) {
            return super::fail_request(rx, cb, tag, e, io.into_buf());
        }
        match self.rules.decide(&io) {
            None => self.inner.submit(rx, io, cb, tag),
            Some(FaultAction::Fail(errno)) => {
                super::fail_request(rx, cb, tag, errno, io.into_buf())
            }
            Some(FaultAction::Delay(d)) => {
                let inner = Rc::clone(&self.inner);
                rx.add_timer(
                    d,
                    Box::new(move |rx: &Reactor| inner.submit(rx, io, cb, tag)),
                );
            }
            Some(FaultAction::Tear { keep_blocks }) => match io {
                Io::Write { offset, buf, fua } => {
                    self.tear(rx, offset, buf, fua, keep_blocks, cb, tag)
                }
                // Tearing only means something for writes; anything else passes through.
                other => self.inner.submit(rx, other, cb, tag),
            },
        }
    }

    fn close(&self, rx: &Reactor) {
        self.inner.close(rx);
    }
}

impl FaultChannel {
    #[allow(clippy::too_many_arguments)]
    fn tear(
        &self,
        rx: &Reactor,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        keep_blocks: u32,
        cb: Rc<dyn Completion>,
        tag: u64,
    ) {
        let lbs = self.geometry().logical_block_size as usize;
        let keep = (keep_blocks as usize * lbs).min(buf.len());
        if keep == 0 {
            return super::fail_request(rx, cb, tag, Errno::EIO, Some(buf));
        }
        // A kernel buffer has no bytes to tear off: the write just fails (this device is
        // for tests and says no to kernel buffers, so it does not get one).
        let Some(bytes) = buf.as_slice() else {
            return super::fail_request(rx, cb, tag, Errno::EIO, Some(buf));
        };
        let part = IoBuf::from_slice(&bytes[..keep]);
        let slot = self.torn.borrow_mut().insert(((cb, tag), buf));
        let me: Rc<dyn Completion> = self.me.upgrade().expect("channel alive while submitting");
        self.inner.submit(
            rx,
            Io::Write {
                offset,
                buf: part,
                fua,
            },
            me,
            slot as u64,
        );
    }
}

impl Completion for FaultChannel {
    fn complete(&self, rx: &Reactor, tag: u64, _res: IoResult, _buf: Option<IoBuf>) {
        let slot = usize::try_from(tag).expect("our tags are slot indices");
        let Some(((cb, user_tag), buf)) = self.torn.borrow_mut().take(slot) else {
            panic!("fault channel: completion for unknown torn write {slot}");
        };
        // Whatever the partial write did, the caller sees the write fail.
        cb.complete(rx, user_tag, Err(Errno::EIO), Some(buf));
    }
}
