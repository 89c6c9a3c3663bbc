//! The coreblk device label: the on-disk record that says "this device belongs to pool
//! P", so a restarted daemon finds its devices again.
//!
//! Owns: the label's byte layout, its checksum, where its two copies live, and the
//! aligned IO that reads, writes and erases them.
//!
//! Must never: decide whether a device may be claimed (that is [`super::claim`]), touch
//! bytes outside the reserved head and tail regions, or trust a copy whose checksum fails.
//!
//! # Layout
//!
//! Two identical 4 KiB copies (except for the `copy` field): the *primary* at byte 0 and
//! the *backup* in the last 4 KiB-aligned block of the device ([`backup_offset`]). Every
//! integer is little-endian; offsets are explicit (no struct transmutes):
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |   16 | magic `b"COREBLK\0LABEL\0v1"`                           |
//! |     16 |    4 | format version (`1`)                                    |
//! |     20 |    4 | copy: `0` primary, `1` backup                           |
//! |     24 |    4 | label block size in bytes (`4096`)                      |
//! |     28 |    4 | flags (`0`, reserved)                                   |
//! |     32 |   16 | pool uuid                                               |
//! |     48 |   16 | device uuid                                             |
//! |     64 |    8 | device size in bytes when claimed                       |
//! |     72 |    8 | generation (starts at 1; bumped on every rewrite)       |
//! |     80 |    8 | creation time, seconds since the Unix epoch             |
//! |     88 | 4004 | zero (reserved)                                         |
//! |   4092 |    4 | crc32c of bytes `0..4092`                               |
//!
//! A copy is valid when the magic matches, the crc matches, the version is known and
//! the copy field matches its position. Reading tolerates one bad copy; two bad copies
//! that still carry our magic read as [`LabelStatus::Damaged`] ("unknown data": refuse
//! without `--force`). libblkid does not know this label, so callers check for it before
//! asking libblkid about other signatures.
//!
//! coreblk reserves the first and the last MiB of a claimed device ([`data_region`]):
//! the labels live there, and a forced claim zeroes both regions so no stale
//! filesystem, RAID or partition-table signature survives next to the label.
//!
//! Start reading at [`Label`], then [`read_from`] and [`write_to`].

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut, Range};
use std::os::unix::fs::FileExt;
use std::str::FromStr;

use memmap2::MmapMut;
use serde::{Serialize, Serializer};

/// Magic bytes at offset 0 of each copy.
pub const LABEL_MAGIC: [u8; 16] = *b"COREBLK\0LABEL\0v1";
/// The one format version this code reads and writes.
pub const LABEL_VERSION: u32 = 1;
/// Size of one label copy; also the IO alignment the label code needs.
pub const LABEL_BYTES: u64 = 4096;
/// Bytes at the start of a device that coreblk keeps for itself (primary label).
pub const RESERVED_HEAD_BYTES: u64 = 1 << 20;
/// Bytes at the end of a device that coreblk keeps for itself (backup label).
pub const RESERVED_TAIL_BYTES: u64 = 1 << 20;

const LABEL_LEN: usize = 4096;
const CRC_OFFSET: usize = LABEL_LEN - 4;
/// Largest device logical block size the label IO supports (one label copy).
pub const MAX_LOGICAL_BLOCK_BYTES: u32 = 4096;

/// A 128-bit identifier (pool or device), printed in the usual 8-4-4-4-12 hex form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random version-4 uuid from the kernel's CSPRNG (`/dev/urandom`).
    ///
    /// # Errors
    /// `/dev/urandom` cannot be read.
    pub fn random() -> io::Result<Self> {
        let mut bytes = [0u8; 16];
        io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Ok(Self(bytes))
    }

    /// The all-zero uuid; never a valid pool or device id.
    #[must_use]
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

/// A string that is not a uuid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a uuid (expected 32 hex digits, dashes optional)")]
pub struct ParseUuidError(String);

impl FromStr for Uuid {
    type Err = ParseUuidError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseUuidError(text.to_owned());
        let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return Err(err());
        }
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| err())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Self(bytes))
    }
}

impl Serialize for Uuid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Which of the two label copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelCopy {
    /// At byte 0.
    Primary,
    /// In the last 4 KiB-aligned block.
    Backup,
}

impl LabelCopy {
    fn code(self) -> u32 {
        match self {
            Self::Primary => 0,
            Self::Backup => 1,
        }
    }
}

/// The decoded contents of a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Label {
    /// The pool this device belongs to.
    pub pool_uuid: Uuid,
    /// This device's own id inside the pool.
    pub device_uuid: Uuid,
    /// Device size when it was claimed (a grown device keeps its old backup position
    /// until it is relabelled).
    pub device_size_bytes: u64,
    /// Starts at 1; every rewrite of the label increments it, and the higher generation
    /// wins when the two copies disagree.
    pub generation: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
}

impl Label {
    /// A first-generation label stamped with the current time.
    #[must_use]
    pub fn new(pool_uuid: Uuid, device_uuid: Uuid, device_size_bytes: u64) -> Self {
        let created_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            pool_uuid,
            device_uuid,
            device_size_bytes,
            generation: 1,
            created_unix_s,
        }
    }

    /// The 4 KiB on-disk form of one copy (see the module docs for the layout).
    #[must_use]
    pub fn encode(&self, copy: LabelCopy) -> [u8; LABEL_LEN] {
        let mut buf = [0u8; LABEL_LEN];
        buf[0..16].copy_from_slice(&LABEL_MAGIC);
        buf[16..20].copy_from_slice(&LABEL_VERSION.to_le_bytes());
        buf[20..24].copy_from_slice(&copy.code().to_le_bytes());
        let label_len = u32::try_from(LABEL_LEN).expect("4096 fits in u32");
        buf[24..28].copy_from_slice(&label_len.to_le_bytes());
        // 28..32: flags, zero.
        buf[32..48].copy_from_slice(&self.pool_uuid.0);
        buf[48..64].copy_from_slice(&self.device_uuid.0);
        buf[64..72].copy_from_slice(&self.device_size_bytes.to_le_bytes());
        buf[72..80].copy_from_slice(&self.generation.to_le_bytes());
        buf[80..88].copy_from_slice(&self.created_unix_s.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
        buf[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes one copy that was read from the `copy` position.
    ///
    /// # Errors
    /// The bytes are not a valid label copy for that position; see [`DecodeError`].
    pub fn decode(buf: &[u8], copy: LabelCopy) -> Result<Self, DecodeError> {
        let buf: &[u8; LABEL_LEN] = buf
            .get(..LABEL_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(DecodeError::NoMagic)?;
        if buf[0..16] != LABEL_MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let stored_crc = le_u32(buf, CRC_OFFSET);
        let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
        if stored_crc != crc {
            return Err(DecodeError::BadChecksum {
                stored: stored_crc,
                computed: crc,
            });
        }
        let version = le_u32(buf, 16);
        if version != LABEL_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if le_u32(buf, 20) != copy.code() {
            return Err(DecodeError::WrongCopy);
        }
        Ok(Self {
            pool_uuid: Uuid(le_array(buf, 32)),
            device_uuid: Uuid(le_array(buf, 48)),
            device_size_bytes: le_u64(buf, 64),
            generation: le_u64(buf, 72),
            created_unix_s: le_u64(buf, 80),
        })
    }
}

fn le_array(buf: &[u8; LABEL_LEN], at: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&buf[at..at + 16]);
    out
}

fn le_u32(buf: &[u8; LABEL_LEN], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(out)
}

fn le_u64(buf: &[u8; LABEL_LEN], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(out)
}

/// Why one copy did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a coreblk label at all.
    #[error("no coreblk label magic")]
    NoMagic,
    /// Our magic, but the checksum does not match: torn or corrupted.
    #[error("coreblk label checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// The crc found on disk.
        stored: u32,
        /// The crc of the bytes found on disk.
        computed: u32,
    },
    /// A label from a newer coreblk.
    #[error("coreblk label format version {0} is not supported (this coreblkd reads version 1)")]
    UnsupportedVersion(u32),
    /// A copy found at the other copy's position (a stale or moved copy).
    #[error("coreblk label copy found at the wrong position")]
    WrongCopy,
}

/// What a device's label area holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelStatus {
    /// Neither copy carries our magic.
    Absent,
    /// At least one copy is valid; `damaged` names the other when it is not.
    Valid {
        /// The label (from the higher-generation copy when both are valid).
        label: Label,
        /// The copy that failed to decode, if any.
        damaged: Option<LabelCopy>,
    },
    /// Our magic is there but no copy is valid: unknown data.
    Damaged,
}

/// Offset of the backup copy: the last 4 KiB-aligned block. `None` when the device
/// cannot hold two separate copies.
#[must_use]
pub fn backup_offset(device_size_bytes: u64) -> Option<u64> {
    let end = device_size_bytes - device_size_bytes % LABEL_BYTES;
    let offset = end.checked_sub(LABEL_BYTES)?;
    (offset >= LABEL_BYTES).then_some(offset)
}

/// The byte range a pool may use: everything between the reserved head and tail MiB
/// (the end is rounded down to a MiB). Empty when the device is too small.
#[must_use]
pub fn data_region(device_size_bytes: u64) -> Range<u64> {
    let end = (device_size_bytes - device_size_bytes % RESERVED_TAIL_BYTES)
        .saturating_sub(RESERVED_TAIL_BYTES);
    RESERVED_HEAD_BYTES..end.max(RESERVED_HEAD_BYTES)
}

/// A zeroed, page-aligned buffer (anonymous mapping), so `O_DIRECT` IO accepts it.
#[derive(Debug)]
pub struct AlignedBuf(MmapMut);

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes, aligned to the page size (≥ 4 KiB).
    ///
    /// # Errors
    /// The mapping fails (out of memory or address space).
    pub fn zeroed(len: usize) -> io::Result<Self> {
        assert!(len > 0, "an aligned buffer must not be empty");
        let map = MmapMut::map_anon(len)?;
        debug_assert_eq!(map.as_ptr().align_offset(LABEL_LEN), 0);
        Ok(Self(map))
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// Reads both copies from an open device or file of `device_size_bytes`.
///
/// # Errors
/// A read fails.
pub fn read_from(file: &File, device_size_bytes: u64) -> io::Result<LabelStatus> {
    if device_size_bytes < LABEL_BYTES {
        return Ok(LabelStatus::Absent);
    }
    let mut buf = AlignedBuf::zeroed(LABEL_LEN)?;
    file.read_exact_at(&mut buf, 0)?;
    let primary = Label::decode(&buf, LabelCopy::Primary);
    let backup = match backup_offset(device_size_bytes) {
        Some(offset) => {
            file.read_exact_at(&mut buf, offset)?;
            Label::decode(&buf, LabelCopy::Backup)
        }
        None => Err(DecodeError::NoMagic),
    };
    Ok(resolve(primary, backup))
}

/// Combines the two copies' decode results.
#[must_use]
pub fn resolve(
    primary: Result<Label, DecodeError>,
    backup: Result<Label, DecodeError>,
) -> LabelStatus {
    match (primary, backup) {
        (Ok(p), Ok(b)) => LabelStatus::Valid {
            label: if b.generation > p.generation { b } else { p },
            damaged: None,
        },
        (Ok(label), Err(_)) => LabelStatus::Valid {
            label,
            damaged: Some(LabelCopy::Backup),
        },
        (Err(_), Ok(label)) => LabelStatus::Valid {
            label,
            damaged: Some(LabelCopy::Primary),
        },
        (Err(DecodeError::NoMagic), Err(DecodeError::NoMagic)) => LabelStatus::Absent,
        (Err(_), Err(_)) => LabelStatus::Damaged,
    }
}

/// Writes both copies, makes them durable, and reads them back.
///
/// # Errors
/// The device cannot hold two copies ([`io::ErrorKind::InvalidInput`]), an IO fails, or
/// the read-back does not decode ([`io::ErrorKind::InvalidData`]).
pub fn write_to(file: &File, device_size_bytes: u64, label: &Label) -> io::Result<()> {
    let backup = backup_offset(device_size_bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "device too small for two label copies",
        )
    })?;
    let mut buf = AlignedBuf::zeroed(LABEL_LEN)?;
    for (copy, offset) in [(LabelCopy::Primary, 0), (LabelCopy::Backup, backup)] {
        buf.copy_from_slice(&label.encode(copy));
        file.write_all_at(&buf, offset)?;
    }
    file.sync_data()?;
    match read_from(file, device_size_bytes)? {
        LabelStatus::Valid {
            label: back,
            damaged: None,
        } if back == *label => Ok(()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("label read back as {other:?} after writing it"),
        )),
    }
}

/// Zeroes both copies and makes that durable.
///
/// # Errors
/// An IO fails.
pub fn erase(file: &File, device_size_bytes: u64) -> io::Result<()> {
    let buf = AlignedBuf::zeroed(LABEL_LEN)?;
    file.write_all_at(&buf, 0)?;
    if let Some(offset) = backup_offset(device_size_bytes) {
        file.write_all_at(&buf, offset)?;
    }
    file.sync_data()
}

/// Zeroes the reserved head and tail regions (both MiB, clipped to the device), wiping
/// whatever signatures other software left there. Not made durable: the label write
/// that follows syncs.
///
/// # Errors
/// An IO fails.
pub fn zero_reserved_regions(file: &File, device_size_bytes: u64) -> io::Result<()> {
    let region_len = usize::try_from(RESERVED_HEAD_BYTES).expect("1 MiB fits in usize");
    let buf = AlignedBuf::zeroed(region_len)?;
    let head = device_size_bytes.min(RESERVED_HEAD_BYTES);
    let head_len = usize::try_from(head).expect("at most 1 MiB");
    // Only regular files have sizes that are not a multiple of 4 KiB; rounding both ends
    // down keeps every write 4 KiB-aligned for O_DIRECT (a sub-4 KiB tail is left alone).
    let aligned = |n: u64| n - n % LABEL_BYTES;
    file.write_all_at(&buf[..head_len - head_len % LABEL_LEN], 0)?;
    let tail_start = aligned(
        device_size_bytes
            .saturating_sub(RESERVED_TAIL_BYTES)
            .max(head),
    );
    let tail_end = aligned(device_size_bytes);
    if tail_end > tail_start {
        let tail_len = usize::try_from(tail_end - tail_start).expect("at most 1 MiB");
        file.write_all_at(&buf[..tail_len], tail_start)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Label {
        Label {
            pool_uuid: Uuid([1; 16]),
            device_uuid: Uuid([2; 16]),
            device_size_bytes: 64 << 20,
            generation: 1,
            created_unix_s: 1_700_000_000,
        }
    }

    fn blank_file(size: u64) -> File {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(size).expect("set_len");
        file
    }

    #[test]
    fn uuid_text_round_trip() {
        let uuid: Uuid = "0123abcd-4567-89ef-0123-456789abcdef"
            .parse()
            .expect("parse");
        assert_eq!(uuid.to_string(), "0123abcd-4567-89ef-0123-456789abcdef");
        assert!("xyz".parse::<Uuid>().is_err());
        let random = Uuid::random().expect("urandom");
        assert_eq!(random.0[6] >> 4, 4, "version 4");
        assert!(!random.is_nil());
    }

    #[test]
    fn layout_is_at_documented_offsets() {
        let buf = sample().encode(LabelCopy::Backup);
        assert_eq!(&buf[0..16], b"COREBLK\0LABEL\0v1");
        assert_eq!(buf[16..20], 1u32.to_le_bytes());
        assert_eq!(buf[20..24], 1u32.to_le_bytes());
        assert_eq!(buf[24..28], 4096u32.to_le_bytes());
        assert_eq!(buf[32..48], [1; 16]);
        assert_eq!(buf[48..64], [2; 16]);
        assert_eq!(buf[64..72], (64u64 << 20).to_le_bytes());
        assert!(buf[88..4092].iter().all(|b| *b == 0));
        assert_eq!(buf[4092..], crc32c::crc32c(&buf[..4092]).to_le_bytes());
    }

    #[test]
    fn decode_rejects_wrong_position_and_version() {
        let label = sample();
        let buf = label.encode(LabelCopy::Primary);
        assert_eq!(Label::decode(&buf, LabelCopy::Primary), Ok(label));
        assert_eq!(
            Label::decode(&buf, LabelCopy::Backup),
            Err(DecodeError::WrongCopy)
        );
        let mut newer = buf;
        newer[16] = 2;
        let crc = crc32c::crc32c(&newer[..4092]);
        newer[4092..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Label::decode(&newer, LabelCopy::Primary),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            Label::decode(&[0; 4096], LabelCopy::Primary),
            Err(DecodeError::NoMagic)
        );
        assert_eq!(
            Label::decode(&[0; 10], LabelCopy::Primary),
            Err(DecodeError::NoMagic)
        );
    }

    #[test]
    fn file_round_trip_tolerates_one_bad_copy_and_detects_two() {
        let size = 64 << 20;
        let file = blank_file(size);
        assert_eq!(read_from(&file, size).expect("read"), LabelStatus::Absent);
        let label = sample();
        write_to(&file, size, &label).expect("write");
        let backup = backup_offset(size).expect("backup");
        assert_eq!(backup, size - 4096);

        file.write_all_at(&[0xff], 100).expect("corrupt primary");
        assert_eq!(
            read_from(&file, size).expect("read"),
            LabelStatus::Valid {
                label,
                damaged: Some(LabelCopy::Primary)
            }
        );
        file.write_all_at(&[0xff], backup + 100)
            .expect("corrupt backup");
        assert_eq!(read_from(&file, size).expect("read"), LabelStatus::Damaged);

        erase(&file, size).expect("erase");
        assert_eq!(read_from(&file, size).expect("read"), LabelStatus::Absent);
    }

    #[test]
    fn higher_generation_wins() {
        let old = sample();
        let new = Label {
            generation: 2,
            ..old
        };
        assert_eq!(
            resolve(Ok(old), Ok(new)),
            LabelStatus::Valid {
                label: new,
                damaged: None
            }
        );
    }

    #[test]
    fn regions() {
        let size: u64 = 64 << 20;
        assert_eq!(data_region(size), (1 << 20)..(63 << 20));
        assert_eq!(data_region(size + 4096), (1 << 20)..(63 << 20));
        assert!(data_region(1 << 20).is_empty());
        assert_eq!(backup_offset(8192), Some(4096));
        assert_eq!(backup_offset(8191), None);
        assert_eq!(backup_offset(12_000), Some(4096));
    }

    #[test]
    fn zeroing_reserved_regions_spares_the_middle() {
        let size: u64 = 8 << 20;
        let file = blank_file(size);
        let ones = vec![0xa5u8; usize::try_from(size).expect("small")];
        file.write_all_at(&ones, 0).expect("fill");
        zero_reserved_regions(&file, size).expect("zero");
        let mut byte = [0u8; 1];
        for (offset, expect) in [
            (0, 0),
            ((1 << 20) - 1, 0),
            (1 << 20, 0xa5),
            (size - (1 << 20) - 1, 0xa5),
            (size - (1 << 20), 0),
            (size - 1, 0),
        ] {
            file.read_exact_at(&mut byte, offset).expect("read");
            assert_eq!(byte[0], expect, "byte at {offset}");
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            pool in any::<[u8; 16]>(),
            dev in any::<[u8; 16]>(),
            size in any::<u64>(),
            generation in any::<u64>(),
            created in any::<u64>(),
        ) {
            let label = Label {
                pool_uuid: Uuid(pool),
                device_uuid: Uuid(dev),
                device_size_bytes: size,
                generation,
                created_unix_s: created,
            };
            for copy in [LabelCopy::Primary, LabelCopy::Backup] {
                prop_assert_eq!(Label::decode(&label.encode(copy), copy), Ok(label));
            }
        }

        #[test]
        fn any_single_bit_flip_is_detected(at in 16usize..4096, bit in 0u8..8) {
            let mut buf = sample().encode(LabelCopy::Primary);
            buf[at] ^= 1 << bit;
            let decoded = Label::decode(&buf, LabelCopy::Primary);
            let bad_checksum = matches!(decoded, Err(DecodeError::BadChecksum { .. }));
            prop_assert!(bad_checksum, "decoded as {:?}", decoded);
        }
    }
}
