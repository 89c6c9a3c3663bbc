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

use super::format::{DecodeError, Record, Superblock, BLOCK_BYTES, NO_CHECKPOINT};
use super::map::{ClusterMap, Mapping};
pub use super::table::{validate_meta, Lineage, VolumeMeta, VolumeRecord, VolumeTable};
use super::{format, journal};
use crate::bdev::blocking::{BlockingDevice, BlockingError};
use crate::bdev::label;

/// Default cluster size (FORMAT.md §1 says why).
pub const DEFAULT_CLUSTER_BYTES: u32 = 64 << 10;
/// Largest journal ring.
pub const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Most logical clusters a volume addresses (256 TiB at 64 KiB clusters); bounds the
/// memory an import allocates for a map named by a record.
pub const MAX_VOLUME_CLUSTERS: u64 = 1 << 32;
/// Most volumes and snapshots a pool holds.
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
    /// The checkpoint the superblock names is damaged.
    #[error("checkpoint area {area} is damaged: {why} (the pool cannot be imported; run `coreblkd verify` and restore from a backup)")]
    BadCheckpoint {
        /// Area index (0 = A, 1 = B).
        area: u32,
        /// What is wrong.
        why: String,
    },
    /// Replay stopped at a damaged block with valid blocks long after it.
    #[error("journal damaged at block {stop}: {reason}; {later} valid blocks follow up to {last}, so acknowledged records after the damage would be lost — refusing to import (run `coreblkd verify`, restore from a backup)")]
    JournalHole {
        /// Where replay stopped.
        stop: u64,
        /// Why.
        reason: DecodeError,
        /// Valid blocks past it.
        later: usize,
        /// The last of them.
        last: u64,
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
        version: format::FORMAT_VERSION,
        journal_reach: journal_reach_for(journal_bytes),
    };
    sb.check().map_err(|e| PoolError::BadRecord {
        seq: 0,
        why: format!("layout: {e}"),
    })?;
    Ok(sb)
}

/// Journal reach of new pools, in blocks (4 MiB): how far the journal writer runs past
/// the last device flush before it flushes. Each flush costs allocating writes a device
/// flush's latency; at 64 blocks (format version 1) random first writes in the VM spent
/// most of their time waiting on flushes (FORMAT.md §3). Bounded to a quarter of the ring.
pub const DEFAULT_JOURNAL_REACH: u32 = 1024;

/// The journal reach a new pool with a ring of `journal_bytes` gets.
fn journal_reach_for(journal_bytes: u64) -> u32 {
    let quarter = journal_bytes / format::BLOCK_BYTES as u64 / 4;
    u32::try_from(quarter)
        .unwrap_or(u32::MAX)
        .clamp(format::MIN_JOURNAL_REACH, DEFAULT_JOURNAL_REACH)
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

/// Where import reads a pool's metadata from: the device, or (crash tests, offline
/// tools) an image of it.
pub trait MetaSource {
    /// Size of the device in bytes.
    fn device_bytes(&self) -> u64;
    /// A name for errors.
    fn source_name(&self) -> String;
    /// Reads `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, PoolError>;
}

impl MetaSource for BlockingDevice {
    fn device_bytes(&self) -> u64 {
        self.device().geometry().size_bytes
    }
    fn source_name(&self) -> String {
        self.device().name().to_string()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, PoolError> {
        // In pieces the device takes in one request (dm targets often take less than 1 MiB).
        let geo = self.device().geometry();
        let most = usize::try_from(geo.max_transfer_bytes)
            .unwrap_or(usize::MAX)
            .clamp(BLOCK_BYTES, 1 << 20);
        let most = most - most % BLOCK_BYTES;
        if len <= most {
            return Ok(self.read(offset, len)?);
        }
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = most.min(len - out.len());
            out.extend(self.read(offset + out.len() as u64, n)?);
        }
        Ok(out)
    }
}

/// Reads both superblock copies and returns the valid one with the higher generation, and
/// the other copy's problem (if any) for the import report.
pub fn read_superblock(
    dev: &impl MetaSource,
) -> Result<(Superblock, Option<DecodeError>), PoolError> {
    let region = label::data_region(dev.device_bytes());
    let read = |copy: u32| -> Result<Result<Superblock, DecodeError>, PoolError> {
        let b = dev.read_at(
            region.start + u64::from(copy) * BLOCK_BYTES as u64,
            BLOCK_BYTES,
        )?;
        Ok(Superblock::decode(&b, copy))
    };
    match (read(0)?, read(1)?) {
        (Ok(a), Ok(b)) => Ok((if a.generation >= b.generation { a } else { b }, None)),
        (Ok(a), Err(e)) | (Err(e), Ok(a)) => Ok((a, Some(e))),
        (Err(copy0), Err(copy1)) => Err(PoolError::NoSuperblock {
            device: dev.source_name(),
            copy0,
            copy1,
        }),
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
    /// Each volume's and snapshot's cluster map.
    pub maps: Maps,
    /// Grouped snapshots dropped because their group record was lost (a torn commit).
    pub dropped_pending: Vec<u32>,
    /// Sequences of the valid journal blocks found past where replay stopped (a torn tail
    /// after a power loss, within the journal reach), sorted. The writer's start-up fence
    /// zeroes exactly these before it writes, so they can never be replayed later.
    pub torn_tail: Vec<u64>,
    /// How long each step of the import took (logged at start-up).
    pub timings: ImportTimings,
}

/// How long each step of [`import`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportTimings {
    /// Superblock and checkpoint: read and decode.
    pub checkpoint: std::time::Duration,
    /// Reading the journal: replay and the check for a damaged block in its middle.
    pub journal: std::time::Duration,
    /// Applying the replayed records.
    pub apply: std::time::Duration,
    /// Journal blocks replayed.
    pub replayed_blocks: u64,
}

/// Logical clusters of a volume of `size_bytes`.
pub fn volume_clusters(size_bytes: u64, cluster_bytes: u32) -> u64 {
    size_bytes.div_ceil(u64::from(cluster_bytes))
}

/// The maps of a pool's volumes and snapshots by id.
pub type Maps = BTreeMap<u32, std::sync::Arc<ClusterMap>>;

/// Applies one journal record to the table and the maps, refusing what cannot be (unknown
/// volume, past its size, past the pool). Map changes here keep no reference counts: the
/// allocator counts references from the final maps (`Allocator::from_in_use`).
pub fn apply_record(
    sb: &Superblock,
    table: &mut VolumeTable,
    maps: &mut Maps,
    r: &Record,
) -> Result<(), String> {
    match VolumeRecord::decode(r)? {
        Some(v) => {
            if let VolumeRecord::Create(VolumeMeta { size_bytes, .. })
            | VolumeRecord::Derive {
                meta: VolumeMeta { size_bytes, .. },
                ..
            }
            | VolumeRecord::Resize { size_bytes, .. } = &v
            {
                check_volume_size(*size_bytes, sb.cluster_bytes)?;
            }
            if let VolumeRecord::Zeroed { runs } | VolumeRecord::Withdrawn { runs } = &v {
                check_runs(runs, sb.clusters)?;
            }
            table.apply(&v)?;
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
                    if let Some(m) = maps.remove(id) {
                        m.release(&mut |_| {});
                    }
                }
                VolumeRecord::Resize { id, size_bytes } => {
                    if let Some(m) = maps.get(id) {
                        m.grow(volume_clusters(*size_bytes, sb.cluster_bytes));
                    }
                }
                VolumeRecord::Derive { meta, lineage, .. } => {
                    let src = maps
                        .get(&lineage.source)
                        .ok_or_else(|| format!("id {} has no map", lineage.source))?;
                    let m = src.share();
                    m.grow(volume_clusters(meta.size_bytes, sb.cluster_bytes));
                    maps.insert(meta.id, std::sync::Arc::new(m));
                }
                VolumeRecord::Rollback { id, snap } => {
                    let (Some(dst), Some(src)) = (maps.get(id), maps.get(snap)) else {
                        return Err(format!("rollback of id {id} to {snap}: no map"));
                    };
                    dst.replace_with(src, &mut |_| {});
                }
                VolumeRecord::Written { .. }
                | VolumeRecord::Zeroed { .. }
                | VolumeRecord::Withdrawn { .. }
                | VolumeRecord::Group { .. }
                | VolumeRecord::Labels { .. }
                | VolumeRecord::Control { .. }
                | VolumeRecord::Settings { .. } => {}
            }
            Ok(())
        }
        None => apply_map_record(sb, maps, r),
    }
}

/// Refuses a size no volume can have (a damaged record must not make import allocate
/// an absurd map).
pub fn check_volume_size(size_bytes: u64, cluster_bytes: u32) -> Result<(), String> {
    if volume_clusters(size_bytes, cluster_bytes) > MAX_VOLUME_CLUSTERS {
        return Err(format!(
            "size {size_bytes} is more than a volume can address ({MAX_VOLUME_CLUSTERS} clusters)"
        ));
    }
    Ok(())
}

/// Refuses zeroed or withdrawn runs outside the pool's `clusters` (damage).
pub fn check_runs(runs: &[(u32, u32)], clusters: u64) -> Result<(), String> {
    for &(first, n) in runs {
        let end = u64::from(first) + u64::from(n);
        if n == 0 || end > clusters {
            return Err(format!(
                "zeroed clusters {first}..{end} outside the pool's {clusters}"
            ));
        }
    }
    Ok(())
}

/// Drops grouped snapshots whose group record never came (a torn commit): the group
/// appears whole or not at all. Returns their ids.
pub fn drop_pending(table: &mut VolumeTable, maps: &mut Maps) -> Vec<u32> {
    let ids: Vec<u32> = table.pending.keys().copied().collect();
    for id in &ids {
        table.pending.remove(id);
        if let Some(m) = maps.remove(id) {
            m.release(&mut |_| {});
        }
    }
    ids
}

fn apply_map_record(sb: &Superblock, maps: &Maps, r: &Record) -> Result<(), String> {
    match *r {
        // The birth epoch is reserved (written 0, ignored).
        Record::Map { vol, lc, pc, .. } => {
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
            map.set(lc, Mapping { pc }, &mut |_| {});
        }
        Record::Unmap { vol, lc } => {
            let map = maps
                .get(&vol)
                .ok_or_else(|| format!("unmap for unknown volume id {vol}"))?;
            if lc < map.len() {
                map.clear(lc, &mut |_| {});
            }
        }
        Record::Blob { kind, .. } => {
            return Err(format!("record type {kind} does not belong in the journal"));
        }
    }
    Ok(())
}

/// Journal blocks an import reads at once (1 MiB: what `read_at` asks in one piece).
const RING_READ_BLOCKS: u64 = (1 << 20) / BLOCK_BYTES as u64;

/// Imports a pool: superblock, the checkpoint it names, then journal replay.
pub fn import(dev: &impl MetaSource) -> Result<Imported, PoolError> {
    let mut timings = ImportTimings::default();
    let t = std::time::Instant::now();
    let (sb, damaged_copy) = read_superblock(dev)?;
    let (mut table, mut maps) = super::checkpoint::load(dev, &sb)?;
    timings.checkpoint = t.elapsed();
    let t = std::time::Instant::now();
    // One pass over the ring, a chunk at a time, from the block holding `first_seq`:
    // replay, then the hole check on the blocks past where replay stopped.
    let base = sb.region_start + sb.journal_offset;
    let mut scan = journal::RingScan::new(&sb);
    while scan.remaining() > 0 {
        let pos = scan.next_pos();
        let n = scan
            .remaining()
            .min(sb.journal_blocks() - pos)
            .min(RING_READ_BLOCKS);
        let bytes = dev.read_at(
            base + pos * BLOCK_BYTES as u64,
            usize::try_from(n).expect("chunk") * BLOCK_BYTES,
        )?;
        for b in bytes.chunks(BLOCK_BYTES) {
            scan.feed(b);
        }
    }
    let (replay, past) = scan.finish();
    // A damaged block in the middle would silently drop every acknowledged record after
    // it: valid blocks farther past the stop than the journal reach mean that.
    if let Some(&last) = past.last() {
        if last - replay.next_seq >= sb.journal_reach_blocks() {
            return Err(PoolError::JournalHole {
                stop: replay.next_seq,
                reason: replay.stop,
                later: past.len(),
                last,
            });
        }
    }
    timings.journal = t.elapsed();
    timings.replayed_blocks = replay.next_seq - sb.first_seq;
    let t = std::time::Instant::now();
    for (seq, r) in &replay.records {
        apply_record(&sb, &mut table, &mut maps, r)
            .map_err(|why| PoolError::BadRecord { seq: *seq, why })?;
    }
    let dropped_pending = drop_pending(&mut table, &mut maps);
    timings.apply = t.elapsed();
    Ok(Imported {
        sb,
        damaged_copy,
        table,
        next_seq: replay.next_seq,
        replay_stop: replay.stop,
        maps,
        dropped_pending,
        torn_tail: past,
        timings,
    })
}

#[cfg(test)]
mod tests;
