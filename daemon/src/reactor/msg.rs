//! Messages into a reactor: a bounded lock-free queue (crossbeam `ArrayQueue`) plus an
//! eventfd doorbell rung only when the reactor is asleep, and a small oneshot so a
//! non-reactor thread (the control plane) can await a reactor's answer.
//!
//! Never drops a message: a full queue makes the sender wait (back-pressure). Reactors must
//! use [`Remote::try_send`] towards each other so that one reactor never blocks on another.

use std::fmt;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crossbeam::queue::ArrayQueue;

use super::Reactor;

/// Work sent to a reactor: runs on the reactor's thread with access to the reactor.
pub type Message = Box<dyn FnOnce(&Reactor) + Send>;

/// The receiving side shared between a reactor and its remotes.
pub(crate) struct Inbox {
    pub(crate) queue: ArrayQueue<Message>,
    /// Set by the reactor just before it sleeps in the kernel; senders ring the doorbell
    /// only while it is set, so a busy reactor pays no syscall per message.
    pub(crate) sleeping: AtomicBool,
    /// Set when the reactor has exited; sends then fail instead of waiting forever.
    pub(crate) closed: AtomicBool,
    pub(crate) doorbell: OwnedFd,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> std::io::Result<Self> {
        // The returned descriptor is checked below and then owned by exactly one OwnedFd.
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
        let doorbell = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            queue: ArrayQueue::new(capacity.max(1)),
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            doorbell,
        })
    }

    /// Wakes the reactor if it sleeps. Pairs with the SeqCst store + re-check in the loop.
    pub(crate) fn ring_if_sleeping(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.ring();
        }
    }

    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // EAGAIN (counter saturated) still leaves the eventfd readable, which is all a
        // doorbell needs.
        // SAFETY: writes 8 bytes from a live local u64 to our own eventfd.
        let _ = unsafe {
            libc::write(
                self.doorbell.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Why a message could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The reactor stopped; nothing will run the message.
    #[error("reactor {0} has stopped")]
    Stopped(usize),
}

/// A handle for sending work to one reactor from any thread.
#[derive(Clone)]
pub struct Remote {
    pub(crate) id: usize,
    pub(crate) inbox: Arc<Inbox>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote").field("reactor", &self.id).finish()
    }
}

impl Remote {
    /// The reactor's index in its set.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Queues `msg` unless the queue is full; a full queue returns the message so the caller
    /// can retry later (reactor to reactor). Never drops.
    pub fn try_send(&self, msg: Message) -> Result<(), (Message, Option<SendError>)> {
        if self.inbox.closed.load(Ordering::Acquire) {
            return Err((msg, Some(SendError::Stopped(self.id))));
        }
        match self.inbox.queue.push(msg) {
            Ok(()) => {
                self.inbox.ring_if_sleeping();
                Ok(())
            }
            Err(msg) => Err((msg, None)),
        }
    }

    /// Queues `msg`, waiting while the queue is full (back-pressure). For non-reactor threads.
    pub fn send(&self, mut msg: Message) -> Result<(), SendError> {
        let backoff = crossbeam::utils::Backoff::new();
        loop {
            match self.try_send(msg) {
                Ok(()) => return Ok(()),
                Err((_, Some(err))) => return Err(err),
                Err((back, None)) => {
                    msg = back;
                    // Make sure a sleeping reactor drains its queue, then wait a little.
                    self.inbox.ring();
                    if backoff.is_completed() {
                        std::thread::sleep(Duration::from_micros(50));
                    } else {
                        backoff.snooze();
                    }
                }
            }
        }
    }

    /// Runs `f` on the reactor and blocks the calling (non-reactor) thread for its answer.
    pub fn call<R, F>(&self, f: F) -> Result<R, SendError>
    where
        R: Send + 'static,
        F: FnOnce(&Reactor) -> R + Send + 'static,
    {
        let (tx, rx) = crossbeam::channel::bounded(1);
        self.send(Box::new(move |r: &Reactor| {
            let _ = tx.send(f(r));
        }))?;
        rx.recv().map_err(|_| SendError::Stopped(self.id))
    }

    /// Runs `f` on the reactor; the returned future resolves to its answer (for async
    /// callers such as the tokio control plane). Back-pressure: waits while the queue is full.
    pub fn call_async<R, F>(&self, f: F) -> Result<Answer<R>, SendError>
    where
        R: Send + 'static,
        F: FnOnce(&Reactor) -> R + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(AnswerSlot {
            value: None,
            waker: None,
            dropped: false,
        }));
        let sender = Arc::clone(&slot);
        let guard = DropNotify(Some(sender));
        self.send(Box::new(move |r: &Reactor| {
            let mut guard = guard;
            let value = f(r);
            if let Some(slot) = guard.0.take() {
                let mut s = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.value = Some(value);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        }))?;
        Ok(Answer { slot, id: self.id })
    }
}

struct AnswerSlot<R> {
    value: Option<R>,
    waker: Option<Waker>,
    dropped: bool,
}

/// Marks the answer as never coming if the message is dropped unrun (reactor stopped).
struct DropNotify<R>(Option<Arc<Mutex<AnswerSlot<R>>>>);

impl<R> Drop for DropNotify<R> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            let mut s = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.dropped = true;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }
}

/// The future answer of [`Remote::call_async`].
pub struct Answer<R> {
    slot: Arc<Mutex<AnswerSlot<R>>>,
    id: usize,
}

impl<R> fmt::Debug for Answer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer").field("reactor", &self.id).finish()
    }
}

impl<R> Future for Answer<R> {
    type Output = Result<R, SendError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = s.value.take() {
            return Poll::Ready(Ok(v));
        }
        if s.dropped {
            return Poll::Ready(Err(SendError::Stopped(self.id)));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
