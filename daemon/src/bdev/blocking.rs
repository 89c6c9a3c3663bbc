//! A blocking client of a block device for non-reactor threads (control paths, tests): each
//! call sends the request to a reactor as a message and waits for its completion. The
//! reactor-side channel is opened once per client and kept in that reactor's thread-local
//! table, so repeated calls cost a message each, not a channel setup.
//!
//! Never use this on a reactor thread: it blocks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{BlockDevice, Channel, Io};
use crate::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, Remote};

thread_local! {
    static CHANNELS: RefCell<HashMap<u64, Rc<dyn Channel>>> = RefCell::new(HashMap::new());
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Errors of the blocking client.
#[derive(Debug, thiserror::Error)]
pub enum BlockingError {
    /// The reactor is gone.
    #[error(transparent)]
    Reactor(#[from] crate::reactor::SendError),
    /// Opening the reactor's channel failed.
    #[error("opening a channel to {device}: {source}")]
    Channel {
        /// Device name.
        device: String,
        /// Why.
        source: std::io::Error,
    },
    /// A read that returned fewer bytes than asked (past the end of the device).
    #[error("read of {len} bytes at offset {offset} of {device} returned {got} bytes")]
    ShortRead {
        /// Device name.
        device: String,
        /// Byte offset.
        offset: u64,
        /// Bytes asked.
        len: usize,
        /// Bytes read.
        got: usize,
    },
    /// The IO failed.
    #[error("{op} on {device} failed: {errno}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Device name.
        device: String,
        /// The error.
        errno: Errno,
    },
}

/// Synchronous access to a device through one reactor.
#[derive(Debug)]
pub struct BlockingDevice {
    dev: Arc<dyn BlockDevice>,
    remote: Remote,
    id: u64,
}

/// One IO as it crosses to the reactor (the reactor makes the buffers).
enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

struct Reply {
    tx: crossbeam::channel::Sender<(IoResult, Option<Vec<u8>>)>,
    reads: bool,
}

impl Completion for Reply {
    fn complete(&self, _rx: &Reactor, _tag: u64, res: IoResult, buf: Option<IoBuf>) {
        // Only the bytes a read filled: its buffer was not zeroed first.
        let data = match (self.reads, res, buf) {
            (true, Ok(n), Some(b)) => b.as_slice().map(|s| s[..s.len().min(n as usize)].to_vec()),
            _ => None,
        };
        let _ = self.tx.send((res, data));
    }
}

impl BlockingDevice {
    /// Opens a channel to `dev` on the reactor behind `remote`.
    pub fn new(dev: Arc<dyn BlockDevice>, remote: Remote) -> Result<Self, BlockingError> {
        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let dev2 = Arc::clone(&dev);
        remote
            .call(move |rx: &Reactor| -> std::io::Result<()> {
                let ch = dev2.open_channel(rx)?;
                CHANNELS.with(|c| c.borrow_mut().insert(id, ch));
                Ok(())
            })?
            .map_err(|source| BlockingError::Channel {
                device: dev.name().to_string(),
                source,
            })?;
        Ok(Self { dev, remote, id })
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Runs one IO and returns its result and, for a read, the bytes it filled (IO errors
    /// are returned in the result, not converted).
    fn call(&self, op: Op) -> Result<(IoResult, Option<Vec<u8>>), BlockingError> {
        let (tx, rx_reply) = crossbeam::channel::bounded(1);
        let id = self.id;
        self.remote.send(Box::new(move |rx: &Reactor| {
            let io = match op {
                Op::Read { offset, len } => Io::Read {
                    offset,
                    buf: IoBuf::alloc_for_read(len),
                },
                Op::Write { offset, data, fua } => Io::Write {
                    offset,
                    buf: IoBuf::from_slice(&data),
                    fua,
                },
                Op::Flush => Io::Flush,
                Op::Discard { offset, len } => Io::Discard { offset, len },
                Op::WriteZeroes { offset, len } => Io::WriteZeroes { offset, len },
            };
            let reads = matches!(io, Io::Read { .. });
            let reply: Rc<dyn Completion> = Rc::new(Reply { tx, reads });
            match CHANNELS.with(|c| c.borrow().get(&id).cloned()) {
                Some(ch) => ch.submit(rx, io, reply, 0),
                None => reply.complete(rx, 0, Err(Errno::EIO), io.into_buf()),
            }
        }))?;
        let (res, buf) = rx_reply
            .recv()
            .map_err(|_| crate::reactor::SendError::Stopped(self.remote.id()))?;
        Ok((res, buf))
    }

    fn check(&self, op: &'static str, res: IoResult) -> Result<u32, BlockingError> {
        res.map_err(|errno| BlockingError::Io {
            op,
            device: self.dev.name().to_string(),
            errno,
        })
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockingError> {
        let (res, buf) = self.call(Op::Read { offset, len })?;
        let n = self.check("read", res)?;
        let buf = buf.unwrap_or_default();
        if n as usize != len || buf.len() != len {
            return Err(BlockingError::ShortRead {
                device: self.dev.name().to_string(),
                offset,
                len,
                got: buf.len(),
            });
        }
        Ok(buf)
    }

    /// Writes `data` at `offset` (FUA when asked).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockingError> {
        let (res, _) = self.call(Op::Write {
            offset,
            data: data.to_vec(),
            fua,
        })?;
        self.check("write", res).map(drop)
    }

    /// Flushes the device.
    pub fn flush(&self) -> Result<(), BlockingError> {
        let (res, _) = self.call(Op::Flush)?;
        self.check("flush", res).map(drop)
    }

    /// Discards a range.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockingError> {
        let (res, _) = self.call(Op::Discard { offset, len })?;
        self.check("discard", res).map(drop)
    }

    /// Zeroes a range.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockingError> {
        let (res, _) = self.call(Op::WriteZeroes { offset, len })?;
        self.check("write-zeroes", res).map(drop)
    }
}

impl Drop for BlockingDevice {
    fn drop(&mut self) {
        let id = self.id;
        let _ = self.remote.send(Box::new(move |rx: &Reactor| {
            if let Some(ch) = CHANNELS.with(|c| c.borrow_mut().remove(&id)) {
                ch.close(rx);
            }
        }));
    }
}
