//! Pools: laying a pool out on a claimed device, creating it, and importing it again
//! (superblock choice, journal replay into the volume table). FORMAT.md §1–§3.
//!
//! Create and import are control-path operations: they run on a non-reactor thread through
//! a [`BlockingDevice`] (each IO a message to a reactor), then hand the state to the pool's
//! owner reactor. The volume table changes through journal records ([`VolumeRecord`]), so
//! a volume exists after a crash exactly when its create record was acknowledged.
//!
//! Not yet: the cluster maps, allocation and checkpoints (the journal ring bounds a pool's
//! lifetime until checkpoints land: it fails commits with ENOSPC rather than lap).

use std::collections::BTreeMap;

use super::format::{self, DecodeError, Record, Superblock, BLOCK_BYTES, NO_CHECKPOINT};
use super::journal;
use super::map::{ClusterMap, Mapping};
use crate::bdev::blocking::{BlockingDevice, BlockingError};
use crate::bdev::label;

/// Default cluster size (FORMAT.md §1 says why).
pub const DEFAULT_CLUSTER_BYTES: u32 = 64 << 10;
/// Largest journal ring.
pub const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Most volumes (and, later, snapshots) a pool holds.
pub const MAX_VOLUMES: u32 = 4096;
/// Bytes a checkpoint needs per possible mapping (logical u64... packed: FORMAT.md §4).
const CKPT_BYTES_PER_CLUSTER: u64 = 12;
/// Bytes a checkpoint reserves per volume entry (name, labels, sizes).
const CKPT_BYTES_PER_VOLUME: u64 = 4096;
/// Longest volume name.
pub const MAX_NAME_BYTES: usize = 128;
/// Most labels per volume; keys and values are bounded so a create record fits a block.
pub const MAX_LABELS: usize = 16;
/// Longest label key or value.
pub const MAX_LABEL_BYTES: usize = 96;

/// Errors of pool creation and import; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The device cannot hold a pool.
    #[error("device of {device_bytes} bytes is too small for a pool with {cluster_bytes}-byte clusters (needs at least {min_bytes}); use a larger device")]
    TooSmall {
        /// Device size.
        device_bytes: u64,
        /// Cluster size asked for.
        cluster_bytes: u32,
        /// Minimum.
        min_bytes: u64,
    },
    /// Bad cluster size.
    #[error("cluster size {0} is not a power of two between 4 KiB and 4 MiB")]
    ClusterSize(u32),
    /// No superblock copy is valid.
    #[error("no valid pool superblock on {device}: copy 0: {copy0}; copy 1: {copy1} (not a coreblk pool, or damaged: run `coreblkd verify`)")]
    NoSuperblock {
        /// Device name.
        device: String,
        /// Why copy 0 was refused.
        copy0: DecodeError,
        /// Why copy 1 was refused.
        copy1: DecodeError,
    },
    /// The superblock belongs to another pool than the label says.
    #[error("superblock on {device} belongs to pool {found}, the label says {expected}; refusing to import")]
    WrongPool {
        /// Device name.
        device: String,
        /// Uuid in the superblock.
        found: label::Uuid,
        /// Uuid in the label.
        expected: label::Uuid,
    },
    /// A journal record did not make sense.
    #[error("journal record at block {seq} is invalid: {why}")]
    BadRecord {
        /// Block sequence.
        seq: u64,
        /// What is wrong.
        why: String,
    },
    /// IO failed.
    #[error(transparent)]
    Io(#[from] BlockingError),
}

/// Where everything lives: a superblock with generation 0, ready to be written.
pub fn layout(
    device_bytes: u64,
    cluster_bytes: u32,
    pool_uuid: [u8; 16],
    journal_tag: u64,
) -> Result<Superblock, PoolError> {
    if !cluster_bytes.is_power_of_two() || !(4096..=4 << 20).contains(&cluster_bytes) {
        return Err(PoolError::ClusterSize(cluster_bytes));
    }
    let region = label::data_region(device_bytes);
    let region_bytes = region.end - region.start;
    let cluster = u64::from(cluster_bytes);
    let blk = BLOCK_BYTES as u64;
    let align = |v: u64, a: u64| v.div_ceil(a) * a;
    // Journal: 1/64 of the pool, between 1 MiB and 64 MiB.
    let journal_bytes = align((region_bytes / 64).clamp(1 << 20, MAX_JOURNAL_BYTES), blk);
    // Checkpoint areas sized for every cluster the pool could have (an upper bound), so
    // metadata space never runs out before data space.
    let max_clusters = region_bytes / cluster;
    let ckpt_bytes = align(
        max_clusters * CKPT_BYTES_PER_CLUSTER + u64::from(MAX_VOLUMES) * CKPT_BYTES_PER_VOLUME,
        blk,
    );
    let ckpt_a = 1 << 20;
    let ckpt_b = ckpt_a + ckpt_bytes;
    let journal_offset = ckpt_b + ckpt_bytes;
    let data_offset = align(journal_offset + journal_bytes, cluster.max(blk));
    let clusters = region_bytes.saturating_sub(data_offset) / cluster;
    let min_bytes = data_offset + 16 * cluster + (2 << 20);
    // Maps store physical clusters as u32 + 1 (map.rs).
    if clusters >= u64::from(u32::MAX) {
        return Err(PoolError::BadRecord {
            seq: 0,
            why: format!("{clusters} clusters of {cluster_bytes} bytes is more than a pool addresses; choose a larger cluster size"),
        });
    }
    if clusters < 16 {
        return Err(PoolError::TooSmall {
            device_bytes,
            cluster_bytes,
            min_bytes,
        });
    }
    let sb = Superblock {
        pool_uuid,
        generation: 0,
        cluster_bytes,
        logical_block_bytes: 4096,
        region_start: region.start,
        region_bytes,
        ckpt_offsets: [ckpt_a, ckpt_b],
        ckpt_bytes,
        journal_offset,
        journal_bytes,
        data_offset,
        clusters,
        active_ckpt: NO_CHECKPOINT,
        ckpt_crc: 0,
        ckpt_len: 0,
        first_seq: 1,
        journal_tag,
        flags: 0,
    };
    sb.check().map_err(|e| PoolError::BadRecord {
        seq: 0,
        why: format!("layout: {e}"),
    })?;
    Ok(sb)
}

/// Writes superblock generation `sb.generation` to its slot with FUA.
pub fn write_superblock(dev: &BlockingDevice, sb: &Superblock) -> Result<(), PoolError> {
    dev.write(sb.slot_offset(sb.copy()), &sb.encode(), true)?;
    Ok(())
}

/// Formats a pool: zeroes the data area and flushes (free clusters are durably zero), then
/// writes both superblock copies (generations 1 and 2, so either alone is valid) and
/// flushes. The journal needs no initialisation: its tag is new, so blocks of any earlier
/// pool fail to decode.
pub fn create(
    dev: &BlockingDevice,
    cluster_bytes: u32,
    pool_uuid: [u8; 16],
) -> Result<Superblock, PoolError> {
    let size = dev.device().geometry().size_bytes;
    let tag = u64::from_le_bytes(
        label::Uuid::random()
            .map_err(|e| PoolError::BadRecord {
                seq: 0,
                why: format!("random tag: {e}"),
            })?
            .0[..8]
            .try_into()
            .expect("8 bytes"),
    );
    let mut sb = layout(size, cluster_bytes, pool_uuid, tag)?;
    sb.logical_block_bytes = dev.device().geometry().logical_block_size;
    // Free clusters must be durably zero (FORMAT.md §5): zero the data area first.
    let data_start = sb.region_start + sb.data_offset;
    let data_len = sb.clusters * u64::from(sb.cluster_bytes);
    let chunk = 1u64 << 30;
    let mut off = 0;
    while off < data_len {
        let len = chunk.min(data_len - off);
        dev.write_zeroes(data_start + off, len)?;
        off += len;
    }
    dev.flush()?;
    for generation in [1, 2] {
        sb.generation = generation;
        write_superblock(dev, &sb)?;
    }
    dev.flush()?;
    Ok(sb)
}

/// Reads both superblock copies and returns the valid one with the higher generation, and
/// the other copy's problem (if any) for the import report.
pub fn read_superblock(
    dev: &BlockingDevice,
) -> Result<(Superblock, Option<DecodeError>), PoolError> {
    let region = label::data_region(dev.device().geometry().size_bytes);
    let read = |copy: u32| -> Result<Result<Superblock, DecodeError>, PoolError> {
        let b = dev.read(
            region.start + u64::from(copy) * BLOCK_BYTES as u64,
            BLOCK_BYTES,
        )?;
        Ok(Superblock::decode(&b, copy))
    };
    match (read(0)?, read(1)?) {
        (Ok(a), Ok(b)) => Ok((if a.generation >= b.generation { a } else { b }, None)),
        (Ok(a), Err(e)) | (Err(e), Ok(a)) => Ok((a, Some(e))),
        (Err(copy0), Err(copy1)) => Err(PoolError::NoSuperblock {
            device: dev.device().name().to_string(),
            copy0,
            copy1,
        }),
    }
}

/// A volume as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Pool-local id (journal records use it).
    pub id: u32,
    /// Uuid.
    pub uuid: [u8; 16],
    /// Name, unique in the pool.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Full size reserved at creation (thick).
    pub thick: bool,
    /// Has ever been written.
    pub written: bool,
}

/// Volume-table changes as journal records (types 3–6, FORMAT.md §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeRecord {
    /// A volume was created.
    Create(VolumeMeta),
    /// A volume was deleted.
    Delete {
        /// Its id.
        id: u32,
    },
    /// A volume was resized.
    Resize {
        /// Its id.
        id: u32,
        /// New size.
        size_bytes: u64,
    },
    /// A volume was written for the first time.
    Written {
        /// Its id.
        id: u32,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("strings validated to fit a record");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err(format!("truncated: wanted {n} bytes, {} left", b.len()));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn take_u16(b: &mut &[u8]) -> Result<u16, String> {
    Ok(u16::from_le_bytes(take(b, 2)?.try_into().expect("2 bytes")))
}
fn take_u32(b: &mut &[u8]) -> Result<u32, String> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")))
}
fn take_u64(b: &mut &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(take(b, 8)?.try_into().expect("8 bytes")))
}
fn take_str(b: &mut &[u8]) -> Result<String, String> {
    let n = usize::from(take_u16(b)?);
    String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

/// Checks a volume's name and labels against the limits that keep its record in a block.
pub fn validate_meta(name: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "volume name must be 1..={MAX_NAME_BYTES} bytes, got {}",
            name.len()
        ));
    }
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels, got {}", labels.len()));
    }
    if let Some((k, v)) = labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
    {
        return Err(format!("label {k:?}={v:?}: keys must be 1..={MAX_LABEL_BYTES} bytes, values at most {MAX_LABEL_BYTES}"));
    }
    Ok(())
}

impl VolumeRecord {
    /// The journal record.
    pub fn encode(&self) -> Record {
        let mut body = Vec::new();
        let kind = match self {
            VolumeRecord::Create(m) => {
                body.extend_from_slice(&m.id.to_le_bytes());
                body.extend_from_slice(&m.uuid);
                body.extend_from_slice(&m.size_bytes.to_le_bytes());
                let flags = u32::from(m.thick) | (u32::from(m.written) << 1);
                body.extend_from_slice(&flags.to_le_bytes());
                put_str(&mut body, &m.name);
                let n = u16::try_from(m.labels.len()).expect("labels validated");
                body.extend_from_slice(&n.to_le_bytes());
                for (k, v) in &m.labels {
                    put_str(&mut body, k);
                    put_str(&mut body, v);
                }
                3
            }
            VolumeRecord::Delete { id } => {
                body.extend_from_slice(&id.to_le_bytes());
                4
            }
            VolumeRecord::Resize { id, size_bytes } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&size_bytes.to_le_bytes());
                5
            }
            VolumeRecord::Written { id } => {
                body.extend_from_slice(&id.to_le_bytes());
                6
            }
        };
        debug_assert!(body.len() <= format::MAX_RECORD_BODY);
        Record::Blob { kind, body }
    }

    /// Decodes a volume-table record; `Ok(None)` for records of other owners.
    pub fn decode(r: &Record) -> Result<Option<Self>, String> {
        let Record::Blob { kind, body } = r else {
            return Ok(None);
        };
        let mut b = body.as_slice();
        let v = match kind {
            3 => {
                let id = take_u32(&mut b)?;
                let uuid = take(&mut b, 16)?.try_into().expect("16 bytes");
                let size_bytes = take_u64(&mut b)?;
                let flags = take_u32(&mut b)?;
                let name = take_str(&mut b)?;
                let n = take_u16(&mut b)?;
                let mut labels = BTreeMap::new();
                for _ in 0..n {
                    let k = take_str(&mut b)?;
                    labels.insert(k, take_str(&mut b)?);
                }
                VolumeRecord::Create(VolumeMeta {
                    id,
                    uuid,
                    name,
                    size_bytes,
                    labels,
                    thick: flags & 1 != 0,
                    written: flags & 2 != 0,
                })
            }
            4 => VolumeRecord::Delete {
                id: take_u32(&mut b)?,
            },
            5 => VolumeRecord::Resize {
                id: take_u32(&mut b)?,
                size_bytes: take_u64(&mut b)?,
            },
            6 => VolumeRecord::Written {
                id: take_u32(&mut b)?,
            },
            _ => return Ok(None),
        };
        if !b.is_empty() {
            return Err(format!("{} trailing bytes", b.len()));
        }
        Ok(Some(v))
    }
}

/// The volume table: what replay of the journal yields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeTable {
    /// Volumes by id.
    pub volumes: BTreeMap<u32, VolumeMeta>,
}

impl VolumeTable {
    /// Applies one record; refuses records that contradict the table.
    pub fn apply(&mut self, r: &VolumeRecord) -> Result<(), String> {
        match r {
            VolumeRecord::Create(m) => {
                if self.volumes.contains_key(&m.id) {
                    return Err(format!("volume id {} created twice", m.id));
                }
                if self.volumes.values().any(|v| v.name == m.name) {
                    return Err(format!("volume name {:?} created twice", m.name));
                }
                self.volumes.insert(m.id, m.clone());
            }
            VolumeRecord::Delete { id } => {
                self.volumes
                    .remove(id)
                    .ok_or_else(|| format!("delete of unknown volume id {id}"))?;
            }
            VolumeRecord::Resize { id, size_bytes } => {
                let v = self
                    .volumes
                    .get_mut(id)
                    .ok_or_else(|| format!("resize of unknown volume id {id}"))?;
                if *size_bytes < v.size_bytes {
                    return Err(format!(
                        "volume id {id} shrinks from {} to {size_bytes}",
                        v.size_bytes
                    ));
                }
                v.size_bytes = *size_bytes;
            }
            VolumeRecord::Written { id } => {
                self.volumes
                    .get_mut(id)
                    .ok_or_else(|| format!("written flag of unknown volume id {id}"))?
                    .written = true;
            }
        }
        Ok(())
    }

    /// The smallest unused id.
    pub fn next_id(&self) -> u32 {
        (1..)
            .find(|id| !self.volumes.contains_key(id))
            .unwrap_or(u32::MAX)
    }
}

/// An imported pool, ready to hand to its owner reactor.
#[derive(Debug)]
pub struct Imported {
    /// The superblock in use.
    pub sb: Superblock,
    /// A superblock copy that was damaged (reported; rewritten at the next write).
    pub damaged_copy: Option<DecodeError>,
    /// Volumes.
    pub table: VolumeTable,
    /// Where the journal continues.
    pub next_seq: u64,
    /// Why replay stopped (the normal end of the journal, or damage).
    pub replay_stop: DecodeError,
    /// Each volume's cluster map.
    pub maps: BTreeMap<u32, std::sync::Arc<ClusterMap>>,
}

/// Logical clusters of a volume of `size_bytes`.
pub fn volume_clusters(size_bytes: u64, cluster_bytes: u32) -> u64 {
    size_bytes.div_ceil(u64::from(cluster_bytes))
}

/// Applies map records to `maps`, refusing what cannot be (unknown volume, past its size,
/// past the pool).
fn apply_map_record(
    sb: &Superblock,
    maps: &BTreeMap<u32, std::sync::Arc<ClusterMap>>,
    r: &Record,
) -> Result<(), String> {
    match *r {
        Record::Map { vol, lc, pc, epoch } => {
            let map = maps
                .get(&vol)
                .ok_or_else(|| format!("mapping for unknown volume id {vol}"))?;
            if lc >= map.len() {
                return Err(format!(
                    "volume id {vol}: logical cluster {lc} past its {} clusters",
                    map.len()
                ));
            }
            if u64::from(pc) >= sb.clusters {
                return Err(format!(
                    "volume id {vol}: physical cluster {pc} past the pool's {}",
                    sb.clusters
                ));
            }
            map.set(lc, Mapping { pc, epoch });
        }
        Record::Unmap { vol, lc } => {
            let map = maps
                .get(&vol)
                .ok_or_else(|| format!("unmap for unknown volume id {vol}"))?;
            map.clear(lc);
        }
        Record::Blob { .. } => {}
    }
    Ok(())
}

/// Imports a pool: superblock, then journal replay into the volume table.
pub fn import(dev: &BlockingDevice) -> Result<Imported, PoolError> {
    let (sb, damaged_copy) = read_superblock(dev)?;
    let replay = journal::replay(&sb, |off| dev.read(off, BLOCK_BYTES).ok());
    let mut table = VolumeTable::default();
    let mut maps = BTreeMap::new();
    for (seq, r) in &replay.records {
        let bad = |why| PoolError::BadRecord { seq: *seq, why };
        match VolumeRecord::decode(r) {
            Ok(Some(v)) => {
                table.apply(&v).map_err(bad)?;
                match &v {
                    VolumeRecord::Create(m) => {
                        maps.insert(
                            m.id,
                            std::sync::Arc::new(ClusterMap::new(volume_clusters(
                                m.size_bytes,
                                sb.cluster_bytes,
                            ))),
                        );
                    }
                    VolumeRecord::Delete { id } => {
                        maps.remove(id);
                    }
                    VolumeRecord::Resize { id, size_bytes } => {
                        if let Some(m) = maps.get(id) {
                            m.grow(volume_clusters(*size_bytes, sb.cluster_bytes));
                        }
                    }
                    VolumeRecord::Written { .. } => {}
                }
            }
            Ok(None) => apply_map_record(&sb, &maps, r).map_err(bad)?,
            Err(why) => return Err(bad(why)),
        }
    }
    Ok(Imported {
        sb,
        damaged_copy,
        table,
        next_seq: replay.next_seq,
        replay_stop: replay.stop,
        maps,
    })
}

#[cfg(test)]
mod tests;
