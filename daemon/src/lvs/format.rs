//! On-disk encodings of the pool format (see `FORMAT.md` beside this file): the superblock,
//! journal blocks and journal records. Pure functions from structs to 4 KiB blocks and
//! back; every decode checks magic, version and crc32c and says precisely what is wrong.
//!
//! Must never: do IO, or accept a block whose checksum fails.

/// Every metadata structure is made of these.
pub const BLOCK_BYTES: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 16] = *b"COREBLK\0POOL\0\0v1";
/// Superblock format version new pools get. Version 2 adds the journal reach (offset 164);
/// a version 1 superblock has none and its reach is [`V1_JOURNAL_REACH`].
pub const FORMAT_VERSION: u32 = 2;
/// Oldest superblock format version this code reads (and keeps writing for such a pool).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Journal and checkpoint block format version (unchanged by superblock version 2).
pub const BLOCK_FORMAT_VERSION: u32 = 1;
/// The journal reach of a version 1 pool (FORMAT.md §3).
pub const V1_JOURNAL_REACH: u32 = 64;
/// Smallest journal reach: one journal write's largest size in blocks.
pub const MIN_JOURNAL_REACH: u32 = 64;
/// Journal block magic ("CBLJ").
pub const JOURNAL_MAGIC: u32 = 0x4A4C_4243;
/// Journal block header size; records follow.
pub const JOURNAL_HEADER_BYTES: usize = 32;
/// Payload bytes per journal block.
pub const JOURNAL_PAYLOAD_BYTES: usize = BLOCK_BYTES - JOURNAL_HEADER_BYTES;
/// Record header: type u8 + length u16.
pub const RECORD_HEADER_BYTES: usize = 3;
/// Largest record body (one record never spans blocks).
pub const MAX_RECORD_BODY: usize = JOURNAL_PAYLOAD_BYTES - RECORD_HEADER_BYTES;
/// "No checkpoint yet" in the superblock.
pub const NO_CHECKPOINT: u32 = u32::MAX;

/// What is wrong with a block that failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not ours (or not written yet).
    #[error("bad magic")]
    BadMagic,
    /// Written by a format we do not know.
    #[error("unsupported format version {0} (this coreblkd reads superblock versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION} and journal/checkpoint block version {BLOCK_FORMAT_VERSION}; a newer coreblkd may have written it)")]
    Version(u32),
    /// Checksum mismatch: torn or corrupted.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored crc.
        stored: u32,
        /// Computed crc.
        computed: u32,
    },
    /// A field is out of range.
    #[error("invalid field {field}: {why}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The pool superblock (FORMAT.md §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Pool uuid.
    pub pool_uuid: [u8; 16],
    /// Bumped on every write; copy = generation % 2.
    pub generation: u64,
    /// Cluster size in bytes.
    pub cluster_bytes: u32,
    /// Device logical block size at creation.
    pub logical_block_bytes: u32,
    /// Byte offset of the pool on the device.
    pub region_start: u64,
    /// Pool bytes.
    pub region_bytes: u64,
    /// Checkpoint areas (offsets from region start).
    pub ckpt_offsets: [u64; 2],
    /// Checkpoint area size.
    pub ckpt_bytes: u64,
    /// Journal ring offset.
    pub journal_offset: u64,
    /// Journal ring size.
    pub journal_bytes: u64,
    /// Data area offset.
    pub data_offset: u64,
    /// Number of data clusters.
    pub clusters: u64,
    /// Active checkpoint (0, 1 or [`NO_CHECKPOINT`]).
    pub active_ckpt: u32,
    /// crc32c of the active checkpoint.
    pub ckpt_crc: u32,
    /// Length of the active checkpoint.
    pub ckpt_len: u64,
    /// First journal sequence to replay.
    pub first_seq: u64,
    /// Tag every journal block of this pool carries.
    pub journal_tag: u64,
    /// Flags (bit 0: clean shutdown).
    pub flags: u32,
    /// Superblock format version ([`MIN_FORMAT_VERSION`]..=[`FORMAT_VERSION`]); a pool
    /// keeps the version it was created with.
    pub version: u32,
    /// Journal reach in blocks (FORMAT.md §3): how far the journal writer may run past
    /// the last completed flush, so how far past a gap import accepts valid blocks as a
    /// torn tail and how many positions the start-up fence zeroes. Version 1: 64.
    pub journal_reach: u32,
}

impl Superblock {
    /// The journal reach in blocks (see the field).
    pub fn journal_reach_blocks(&self) -> u64 {
        u64::from(self.journal_reach)
    }

    /// Encodes copy `generation % 2`.
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..16].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 16, self.version);
        put_u32(&mut b, 20, self.copy());
        b[24..40].copy_from_slice(&self.pool_uuid);
        put_u64(&mut b, 40, self.generation);
        put_u32(&mut b, 48, self.cluster_bytes);
        put_u32(&mut b, 52, self.logical_block_bytes);
        put_u64(&mut b, 56, self.region_start);
        put_u64(&mut b, 64, self.region_bytes);
        put_u64(&mut b, 72, self.ckpt_offsets[0]);
        put_u64(&mut b, 80, self.ckpt_offsets[1]);
        put_u64(&mut b, 88, self.ckpt_bytes);
        put_u64(&mut b, 96, self.journal_offset);
        put_u64(&mut b, 104, self.journal_bytes);
        put_u64(&mut b, 112, self.data_offset);
        put_u64(&mut b, 120, self.clusters);
        put_u32(&mut b, 128, self.active_ckpt);
        put_u32(&mut b, 132, self.ckpt_crc);
        put_u64(&mut b, 136, self.ckpt_len);
        put_u64(&mut b, 144, self.first_seq);
        put_u64(&mut b, 152, self.journal_tag);
        put_u32(&mut b, 160, self.flags);
        if self.version >= 2 {
            put_u32(&mut b, 164, self.journal_reach);
        }
        let crc = crc32c::crc32c(&b[..BLOCK_BYTES - 4]);
        put_u32(&mut b, BLOCK_BYTES - 4, crc);
        b
    }

    /// The copy slot this generation is written to.
    pub fn copy(&self) -> u32 {
        u32::from(self.generation % 2 == 1)
    }

    /// Decodes the copy read from slot `copy`.
    pub fn decode(b: &[u8], copy: u32) -> Result<Self, DecodeError> {
        if b.len() < BLOCK_BYTES || b[0..16] != SB_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let stored = get_u32(b, BLOCK_BYTES - 4);
        let computed = crc32c::crc32c(&b[..BLOCK_BYTES - 4]);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        let version = get_u32(b, 16);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(DecodeError::Version(version));
        }
        if get_u32(b, 20) != copy {
            return Err(DecodeError::Field {
                field: "copy",
                why: format!("copy {} found in slot {copy}", get_u32(b, 20)),
            });
        }
        let sb = Self {
            pool_uuid: b[24..40].try_into().expect("16 bytes"),
            generation: get_u64(b, 40),
            cluster_bytes: get_u32(b, 48),
            logical_block_bytes: get_u32(b, 52),
            region_start: get_u64(b, 56),
            region_bytes: get_u64(b, 64),
            ckpt_offsets: [get_u64(b, 72), get_u64(b, 80)],
            ckpt_bytes: get_u64(b, 88),
            journal_offset: get_u64(b, 96),
            journal_bytes: get_u64(b, 104),
            data_offset: get_u64(b, 112),
            clusters: get_u64(b, 120),
            active_ckpt: get_u32(b, 128),
            ckpt_crc: get_u32(b, 132),
            ckpt_len: get_u64(b, 136),
            first_seq: get_u64(b, 144),
            journal_tag: get_u64(b, 152),
            flags: get_u32(b, 160),
            version,
            journal_reach: if version >= 2 {
                get_u32(b, 164)
            } else {
                V1_JOURNAL_REACH
            },
        };
        sb.check()?;
        Ok(sb)
    }

    /// Structural checks: sizes are sane and the areas do not overlap.
    pub fn check(&self) -> Result<(), DecodeError> {
        let bad = |field, why: String| Err(DecodeError::Field { field, why });
        if !self.cluster_bytes.is_power_of_two() || !(4096..=4 << 20).contains(&self.cluster_bytes)
        {
            return bad(
                "cluster_bytes",
                format!(
                    "{} is not a power of two in 4 KiB..=4 MiB",
                    self.cluster_bytes
                ),
            );
        }
        if self.journal_bytes < BLOCK_BYTES as u64 * 4
            || !self.journal_bytes.is_multiple_of(BLOCK_BYTES as u64)
        {
            return bad(
                "journal_bytes",
                format!("{} is not a multiple of 4 KiB ≥ 16 KiB", self.journal_bytes),
            );
        }
        let ring = self.journal_bytes / BLOCK_BYTES as u64;
        if self.journal_reach < MIN_JOURNAL_REACH || u64::from(self.journal_reach) > ring / 2 {
            return bad(
                "journal_reach",
                format!(
                    "{} blocks: not within {MIN_JOURNAL_REACH}..=half the journal ring ({} blocks)",
                    self.journal_reach,
                    ring / 2
                ),
            );
        }
        if self.active_ckpt > 1 && self.active_ckpt != NO_CHECKPOINT {
            return bad("active_ckpt", format!("{}", self.active_ckpt));
        }
        let areas = [
            (self.ckpt_offsets[0], self.ckpt_bytes),
            (self.ckpt_offsets[1], self.ckpt_bytes),
            (self.journal_offset, self.journal_bytes),
            (
                self.data_offset,
                self.clusters.saturating_mul(u64::from(self.cluster_bytes)),
            ),
        ];
        let mut end = 2 * BLOCK_BYTES as u64;
        for (off, len) in areas {
            if off < end {
                return bad(
                    "layout",
                    format!("area at {off} overlaps the previous one (ends at {end})"),
                );
            }
            end = off.checked_add(len).ok_or(DecodeError::Field {
                field: "layout",
                why: "area end overflows".into(),
            })?;
        }
        if end > self.region_bytes {
            return bad(
                "layout",
                format!(
                    "areas end at {end}, past the pool's {} bytes",
                    self.region_bytes
                ),
            );
        }
        Ok(())
    }

    /// Number of blocks in the journal ring.
    pub fn journal_blocks(&self) -> u64 {
        self.journal_bytes / BLOCK_BYTES as u64
    }

    /// Device byte offset of journal block `seq`.
    pub fn journal_block_offset(&self, seq: u64) -> u64 {
        self.region_start + self.journal_offset + (seq % self.journal_blocks()) * BLOCK_BYTES as u64
    }

    /// Device byte offset of superblock slot `copy`.
    pub fn slot_offset(&self, copy: u32) -> u64 {
        self.region_start + u64::from(copy) * BLOCK_BYTES as u64
    }
}

/// One journal record (FORMAT.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Volume `vol`'s logical cluster now lives in physical cluster `pc`.
    Map {
        /// Volume id.
        vol: u32,
        /// Logical cluster.
        lc: u64,
        /// Physical cluster.
        pc: u32,
        /// Snapshot epoch the mapping was born in.
        epoch: u32,
    },
    /// Volume `vol`'s logical cluster is unmapped (discard).
    Unmap {
        /// Volume id.
        vol: u32,
        /// Logical cluster.
        lc: u64,
    },
    /// Opaque bytes (volume table changes, control-plane records); decoded by their owner.
    Blob {
        /// Record type (3..=17).
        kind: u8,
        /// Body.
        body: Vec<u8>,
    },
}

impl Record {
    /// Encoded size including the record header.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES
            + match self {
                Record::Map { .. } => 20,
                Record::Unmap { .. } => 12,
                Record::Blob { body, .. } => body.len(),
            }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, body) = match self {
            Record::Map { vol, lc, pc, epoch } => {
                let mut b = Vec::with_capacity(20);
                b.extend_from_slice(&vol.to_le_bytes());
                b.extend_from_slice(&lc.to_le_bytes());
                b.extend_from_slice(&pc.to_le_bytes());
                b.extend_from_slice(&epoch.to_le_bytes());
                (1u8, b)
            }
            Record::Unmap { vol, lc } => {
                let mut b = Vec::with_capacity(12);
                b.extend_from_slice(&vol.to_le_bytes());
                b.extend_from_slice(&lc.to_le_bytes());
                (2u8, b)
            }
            Record::Blob { kind, body } => (*kind, body.clone()),
        };
        out.push(kind);
        let len = u16::try_from(body.len()).expect("record body checked against MAX_RECORD_BODY");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
    }

    fn decode(kind: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let bad_len = |want: usize| DecodeError::Field {
            field: "record length",
            why: format!("type {kind} needs {want} bytes, has {}", body.len()),
        };
        match kind {
            1 => {
                if body.len() != 20 {
                    return Err(bad_len(20));
                }
                Ok(Record::Map {
                    vol: get_u32(body, 0),
                    lc: get_u64(body, 4),
                    pc: get_u32(body, 12),
                    epoch: get_u32(body, 16),
                })
            }
            2 => {
                if body.len() != 12 {
                    return Err(bad_len(12));
                }
                Ok(Record::Unmap {
                    vol: get_u32(body, 0),
                    lc: get_u64(body, 4),
                })
            }
            3..=17 => Ok(Record::Blob {
                kind,
                body: body.to_vec(),
            }),
            other => Err(DecodeError::Field {
                field: "record type",
                why: format!("unknown type {other}"),
            }),
        }
    }
}

/// Packs records into journal blocks starting at sequence `first_seq`; each block holds as
/// many whole records as fit. Returns the blocks (4 KiB each, concatenated).
pub fn encode_journal_blocks(tag: u64, first_seq: u64, records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    let mut payload = Vec::with_capacity(JOURNAL_PAYLOAD_BYTES);
    let mut count: u16 = 0;
    let flush = |out: &mut Vec<u8>, payload: &mut Vec<u8>, count: &mut u16, seq: &mut u64| {
        let mut b = [0u8; BLOCK_BYTES];
        put_u32(&mut b, 0, JOURNAL_MAGIC);
        put_u32(&mut b, 4, BLOCK_FORMAT_VERSION);
        put_u64(&mut b, 8, tag);
        put_u64(&mut b, 16, *seq);
        b[24..26].copy_from_slice(&count.to_le_bytes());
        let used = u16::try_from(payload.len()).expect("payload fits a block");
        b[26..28].copy_from_slice(&used.to_le_bytes());
        b[JOURNAL_HEADER_BYTES..JOURNAL_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        let crc = journal_crc(&b);
        put_u32(&mut b, 28, crc);
        out.extend_from_slice(&b);
        payload.clear();
        *count = 0;
        *seq += 1;
    };
    for r in records {
        assert!(
            r.encoded_len() <= JOURNAL_PAYLOAD_BYTES,
            "record larger than a journal block: {r:?}"
        );
        if payload.len() + r.encoded_len() > JOURNAL_PAYLOAD_BYTES {
            flush(&mut out, &mut payload, &mut count, &mut seq);
        }
        r.encode_into(&mut payload);
        count += 1;
    }
    if count > 0 || out.is_empty() {
        flush(&mut out, &mut payload, &mut count, &mut seq);
    }
    out
}

/// Blocks [`encode_journal_blocks`] will produce for `records`.
pub fn journal_blocks_needed(records: &[Record]) -> u64 {
    let mut blocks = 1u64;
    let mut used = 0usize;
    for r in records {
        if used + r.encoded_len() > JOURNAL_PAYLOAD_BYTES {
            blocks += 1;
            used = 0;
        }
        used += r.encoded_len();
    }
    blocks
}

fn journal_crc(b: &[u8]) -> u32 {
    let used = usize::from(get_u16(b, 26)).min(JOURNAL_PAYLOAD_BYTES);
    let head = crc32c::crc32c(&b[..28]);
    crc32c::crc32c_append(head, &b[JOURNAL_HEADER_BYTES..JOURNAL_HEADER_BYTES + used])
}

/// Decodes journal block `b`, which must carry `tag` and sequence `seq`.
pub fn decode_journal_block(b: &[u8], tag: u64, seq: u64) -> Result<Vec<Record>, DecodeError> {
    if b.len() < BLOCK_BYTES || get_u32(b, 0) != JOURNAL_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = get_u32(b, 4);
    if version != BLOCK_FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    let stored = get_u32(b, 28);
    let computed = journal_crc(b);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    if get_u64(b, 8) != tag {
        return Err(DecodeError::Field {
            field: "journal tag",
            why: "block belongs to another pool or an earlier format".into(),
        });
    }
    if get_u64(b, 16) != seq {
        return Err(DecodeError::Field {
            field: "sequence",
            why: format!("expected {seq}, found {}", get_u64(b, 16)),
        });
    }
    let count = get_u16(b, 24);
    let used = usize::from(get_u16(b, 26));
    if used > JOURNAL_PAYLOAD_BYTES {
        return Err(DecodeError::Field {
            field: "payload length",
            why: format!("{used} > {JOURNAL_PAYLOAD_BYTES}"),
        });
    }
    let payload = &b[JOURNAL_HEADER_BYTES..JOURNAL_HEADER_BYTES + used];
    let mut records = Vec::with_capacity(usize::from(count));
    let mut pos = 0;
    for _ in 0..count {
        if pos + RECORD_HEADER_BYTES > payload.len() {
            return Err(DecodeError::Field {
                field: "records",
                why: "record header past the payload".into(),
            });
        }
        let kind = payload[pos];
        let len = usize::from(get_u16(payload, pos + 1));
        let start = pos + RECORD_HEADER_BYTES;
        let body = payload.get(start..start + len).ok_or(DecodeError::Field {
            field: "records",
            why: "record body past the payload".into(),
        })?;
        records.push(Record::decode(kind, body)?);
        pos = start + len;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_sb() -> Superblock {
        Superblock {
            pool_uuid: [7; 16],
            generation: 3,
            cluster_bytes: 65536,
            logical_block_bytes: 512,
            region_start: 1 << 20,
            region_bytes: 1 << 30,
            ckpt_offsets: [1 << 20, 2 << 20],
            ckpt_bytes: 1 << 20,
            journal_offset: 3 << 20,
            journal_bytes: 4 << 20,
            data_offset: 8 << 20,
            clusters: 1000,
            active_ckpt: NO_CHECKPOINT,
            ckpt_crc: 0,
            ckpt_len: 0,
            first_seq: 1,
            journal_tag: 0xfeed,
            flags: 0,
            version: FORMAT_VERSION,
            journal_reach: 256,
        }
    }

    #[test]
    fn version_2_carries_the_journal_reach_and_version_1_reads_as_64() {
        let sb = sample_sb();
        let b = sb.encode();
        assert_eq!(get_u32(&b, 16), 2);
        assert_eq!(get_u32(&b, 164), 256);
        assert_eq!(
            Superblock::decode(&b, 1)
                .expect("v2")
                .journal_reach_blocks(),
            256
        );
        // A version 1 superblock (what an older coreblkd wrote: zero at 164) reads with a
        // reach of 64 and is written back as version 1, still zero at 164.
        let mut v1 = b;
        put_u32(&mut v1, 16, 1);
        put_u32(&mut v1, 164, 0);
        let crc = crc32c::crc32c(&v1[..BLOCK_BYTES - 4]);
        put_u32(&mut v1, BLOCK_BYTES - 4, crc);
        let old = Superblock::decode(&v1, 1).expect("v1");
        assert_eq!((old.version, old.journal_reach_blocks()), (1, 64));
        let again = old.encode();
        assert_eq!((get_u32(&again, 16), get_u32(&again, 164)), (1, 0));
        assert_eq!(again, v1);
    }

    #[test]
    fn unknown_versions_and_bad_reaches_are_refused_with_the_reason() {
        let mut newer = sample_sb();
        newer.version = FORMAT_VERSION + 1;
        let err = Superblock::decode(&newer.encode(), 1).expect_err("version 3");
        assert_eq!(err, DecodeError::Version(3));
        assert!(
            err.to_string().contains("reads superblock versions 1 to 2"),
            "{err}"
        );
        for reach in [0, 63, 513] {
            let mut sb = sample_sb();
            sb.journal_reach = reach; // the ring has 1024 blocks: at most 512
            assert!(
                matches!(
                    Superblock::decode(&sb.encode(), 1),
                    Err(DecodeError::Field {
                        field: "journal_reach",
                        ..
                    })
                ),
                "reach {reach}"
            );
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = sample_sb();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b, 1).expect("decode"), sb);
        assert!(matches!(
            Superblock::decode(&b, 0),
            Err(DecodeError::Field { field: "copy", .. })
        ));
        let mut torn = b;
        torn[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&torn, 1),
            Err(DecodeError::Checksum { .. })
        ));
        assert_eq!(
            Superblock::decode(&[0u8; BLOCK_BYTES], 0),
            Err(DecodeError::BadMagic)
        );
        let mut overlapping = sb.clone();
        overlapping.journal_offset = overlapping.ckpt_offsets[1];
        assert!(overlapping.check().is_err());
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (any::<u32>(), any::<u64>(), any::<u32>(), any::<u32>())
                .prop_map(|(vol, lc, pc, epoch)| Record::Map { vol, lc, pc, epoch }),
            (any::<u32>(), any::<u64>()).prop_map(|(vol, lc)| Record::Unmap { vol, lc }),
            (3u8..=8, prop::collection::vec(any::<u8>(), 0..600))
                .prop_map(|(kind, body)| Record::Blob { kind, body }),
        ]
    }

    proptest! {
        #[test]
        fn journal_blocks_round_trip(records in prop::collection::vec(record(), 0..400), seq in 1u64..1_000_000) {
            let bytes = encode_journal_blocks(9, seq, &records);
            prop_assert_eq!(bytes.len() as u64, journal_blocks_needed(&records) * BLOCK_BYTES as u64);
            let mut back = Vec::new();
            for (i, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
                back.extend(decode_journal_block(b, 9, seq + i as u64).expect("decode"));
            }
            prop_assert_eq!(back, records);
        }

        #[test]
        fn any_flipped_bit_in_a_journal_block_is_detected(records in prop::collection::vec(record(), 1..40), bit in 0usize..(BLOCK_BYTES * 8)) {
            let mut bytes = encode_journal_blocks(9, 5, &records);
            let used = JOURNAL_HEADER_BYTES + usize::from(get_u16(&bytes, 26));
            // Bits past the used payload are not covered (and not read).
            prop_assume!(bit / 8 < used);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_journal_block(&bytes[..BLOCK_BYTES], 9, 5).is_err());
        }
    }

    #[test]
    fn wrong_tag_or_sequence_is_refused() {
        let b = encode_journal_blocks(9, 5, &[Record::Unmap { vol: 1, lc: 2 }]);
        assert!(decode_journal_block(&b, 9, 5).is_ok());
        assert!(matches!(
            decode_journal_block(&b, 8, 5),
            Err(DecodeError::Field {
                field: "journal tag",
                ..
            })
        ));
        assert!(matches!(
            decode_journal_block(&b, 9, 6),
            Err(DecodeError::Field {
                field: "sequence",
                ..
            })
        ));
    }
}
