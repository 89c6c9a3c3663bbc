//! The dm-log-writes log format (kernel `Documentation/admin-guide/device-mapper/
//! log-writes.rst`), read-only: a super at byte 0 (magic, version, number of entries,
//! sector size), then per entry one sector holding the entry header (target sector,
//! sector count, flags, data length; a MARK's name follows the header in that sector),
//! followed by the written data unless the entry is a DISCARD. Sectors are the target's
//! logical block size. Writes appear once the target knows them durable: FUA writes when
//! they complete, others just before the FLUSH that covered them, in completion order.
//! Also `extract`: copies the used part of a log device into a (sparse) file.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// `WRITE_LOG_MAGIC`.
const MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
const VERSION: u64 = 1;
/// The entry covers a FLUSH (the writes it made durable are logged just before it).
pub const FLAG_FLUSH: u64 = 1 << 0;
/// A FUA write.
pub const FLAG_FUA: u64 = 1 << 1;
/// A discard: no data follows.
pub const FLAG_DISCARD: u64 = 1 << 2;
/// A mark (`dmsetup message <dev> 0 mark <name>`).
pub const FLAG_MARK: u64 = 1 << 3;
/// Size of `struct log_write_entry`.
const ENTRY_HEADER_BYTES: usize = 32;
/// Zero runs of this size are left as holes by `extract`.
const HOLE_BYTES: usize = 64 << 10;
/// Most entries a log may claim (a bound, so a corrupt super cannot make us spin).
const MAX_ENTRIES: u64 = 1 << 24;

/// One log entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Target byte offset written.
    pub offset: u64,
    /// Bytes written (or discarded).
    pub len: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// Byte offset of the data in the log (writes only).
    pub data_at: u64,
    /// A mark's name.
    pub mark: Option<String>,
}

impl Entry {
    /// Whether the entry carries data to replay.
    pub fn has_data(&self) -> bool {
        self.flags & (FLAG_DISCARD | FLAG_MARK) == 0 && self.len > 0
    }
}

/// A parsed log: its sector size, entries, and the byte length it occupies.
#[derive(Debug)]
pub struct Log {
    /// The target's logical block size.
    pub sector_bytes: u64,
    /// In log order.
    pub entries: Vec<Entry>,
    /// End of the last entry's data.
    pub end: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn read_exact_at(f: &File, what: &str, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at)
        .with_context(|| format!("reading {len} bytes at {at} of {what}"))?;
    Ok(buf)
}

/// Parses the log in `f` (a log device or a copy of it).
pub fn parse(f: &File, what: &str) -> Result<Log> {
    let sup = read_exact_at(f, what, 0, 512)?;
    let magic = le64(&sup, 0);
    ensure!(
        magic == MAGIC,
        "{what}: no dm-log-writes super (magic {magic:#x})"
    );
    let version = le64(&sup, 8);
    ensure!(version == VERSION, "{what}: log version {version}");
    let nr_entries = le64(&sup, 16);
    ensure!(nr_entries <= MAX_ENTRIES, "{what}: {nr_entries} entries");
    let sector_bytes = u64::from(u32::from_le_bytes([sup[24], sup[25], sup[26], sup[27]]));
    ensure!(
        sector_bytes.is_power_of_two() && (512..=4096).contains(&sector_bytes),
        "{what}: sector size {sector_bytes}"
    );
    let ss = usize::try_from(sector_bytes)?;
    let mut at = sector_bytes;
    let mut entries = Vec::with_capacity(usize::try_from(nr_entries)?);
    for k in 0..nr_entries {
        let sec = read_exact_at(f, what, at, ss)?;
        let (sector, nr, flags, data_len) =
            (le64(&sec, 0), le64(&sec, 8), le64(&sec, 16), le64(&sec, 24));
        let mark = if flags & FLAG_MARK != 0 {
            let n = usize::try_from(data_len)?;
            ensure!(
                n <= ss - ENTRY_HEADER_BYTES,
                "{what}: entry {k}: mark of {n} bytes"
            );
            Some(
                String::from_utf8_lossy(&sec[ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + n])
                    .into_owned(),
            )
        } else {
            None
        };
        let (Some(offset), Some(len)) = (
            sector.checked_mul(sector_bytes),
            nr.checked_mul(sector_bytes),
        ) else {
            bail!("{what}: entry {k} at {at}: sector {sector} count {nr} overflow");
        };
        let e = Entry {
            offset,
            len,
            flags,
            data_at: at + sector_bytes,
            mark,
        };
        at += sector_bytes;
        if flags & FLAG_DISCARD == 0 {
            at += len;
        }
        entries.push(e);
    }
    Ok(Log {
        sector_bytes,
        entries,
        end: at,
    })
}

/// Copies the used part of the log on `dev` to `out`, leaving all-zero runs as holes (the
/// pool's zeroing writes make up most of a log).
pub fn extract(dev: &Path, out: &Path) -> Result<Log> {
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let log = parse(&f, &dev.display().to_string())?;
    let mut o = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at < log.end {
        let n = usize::try_from(chunk.min(log.end - at))?;
        let buf = read_exact_at(&f, "log device", at, n)?;
        for piece in buf.chunks(HOLE_BYTES) {
            if piece.iter().all(|&b| b == 0) {
                o.seek(SeekFrom::Current(i64::try_from(piece.len())?))?;
            } else {
                o.write_all(piece)?;
            }
        }
        at += u64::try_from(n)?;
    }
    o.set_len(log.end)?;
    o.sync_all()?;
    Ok(log)
}

/// Waits until the log on `dev` (a live dm-log-writes log device) holds the mark `name`,
/// re-reading it from the device each time.
///
/// dm-log-writes logs from a queue that a kernel thread drains, and under TCG that thread
/// can lag far behind the workload. When the target is removed, its destructor puts the
/// writes no FLUSH covered at the *head* of that queue (`list_splice_init`), so they land
/// in the log before entries that were queued long before them — a log that contradicts
/// the workload (CI once saw step 36's writes logged after mark `s18`). Putting a mark
/// once the workload is done and waiting for it to reach the log drains the queue, so the
/// destructor's writes go to the end where they belong.
pub fn settle(dev: &Path, name: &str, timeout: std::time::Duration) -> Result<Log> {
    use std::os::fd::AsRawFd;
    let f = File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    let what = dev.display().to_string();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // The log's writes bypass the page cache of `dev`: drop what an earlier pass
        // read, so this one sees the device.
        // posix_fadvise only reads its integer arguments, and `f` lives until the end of
        // this function.
        // SAFETY: a plain syscall on a descriptor that is open for the call's duration.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise on {what}: error {rc}");
        let log = parse(&f, &what)?;
        if log.entries.iter().any(|e| e.mark.as_deref() == Some(name)) {
            return Ok(log);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: mark {name:?} not in the log after {timeout:?} ({} entries, last {:?})",
            log.entries.len(),
            log.entries.last()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
