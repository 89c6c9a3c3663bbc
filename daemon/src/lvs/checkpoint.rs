//! Checkpoints (FORMAT.md §4): the whole metadata of a pool at one journal sequence, so
//! replay after a crash reads one checkpoint plus at most a ring of journal blocks, and the
//! ring's blocks can be reused.
//!
//! A checkpoint is a stream of records in journal-block framing (magic, tag, sequence from
//! 1, crc32c per block) under the checkpoint tag `journal tag ^ CKPT_TAG_XOR`, so neither
//! can be mistaken for the other:
//! - type 14, the table's id floor;
//! - a `Create` (type 3) per plain volume and a `Derive` (type 9) per snapshot or clone —
//!   loaded into the table directly (the source may be long deleted);
//! - type 12, leaf contents: leaf id u32, first slot u16, then one u32 per consecutive slot
//!   (physical cluster + 1, 0 = unmapped) — a leaf shared by several maps is stored once;
//! - type 13, a map's leaves: map id u32, then (leaf index u32, leaf id u32) pairs;
//! - type 16, runs of clusters that are durably zero and not handed out, last and only as
//!   many as fit the area (a run left out is zeroed again after an import: safe).
//!
//! The writer ([`encode`]) runs on the owner reactor at a point where the in-memory state
//! equals every record up to a journal sequence `S` and none after; the pool writes the
//! bytes to the inactive area, flushes, then writes a superblock (FUA) naming the area,
//! its length and crc, and first sequence `S + 1`. Only then may the journal reuse blocks
//! up to `S`. A crash at any point leaves the previous superblock, checkpoint and journal
//! intact.
//!
//! Must never: be read without checking its crc against the superblock, or name leaf ids
//! that do not exist.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::alloc::ZeroRuns;
use super::format::{self, Record, Superblock, BLOCK_BYTES, NO_CHECKPOINT};
use super::map::{ClusterMap, Mapping, LEAF_ENTRIES};
use super::pool::{check_runs, check_volume_size, volume_clusters, Maps, MetaSource, PoolError};
use super::table::{take_u16, take_u32, VolumeMeta, VolumeRecord, VolumeTable, RUNS_PER_RECORD};

/// Distinguishes checkpoint blocks from journal blocks of the same pool.
pub const CKPT_TAG_XOR: u64 = 0x434B_5054_434B_5054;

const KIND_LEAF: u8 = 12;
const KIND_TOP: u8 = 13;
const KIND_FLOOR: u8 = 14;

/// Slots per leaf record (body: 6 bytes of header + 4 per slot).
const SLOTS_PER_RECORD: usize = (format::MAX_RECORD_BODY - 6) / 4;
/// Leaf pairs per top record.
const PAIRS_PER_RECORD: usize = (format::MAX_RECORD_BODY - 4) / 8;

/// Encodes the table, the maps and the clean set `zeroed` as checkpoint blocks (FORMAT.md
/// §4); clean runs that would not fit the area are left out.
pub fn encode(sb: &Superblock, table: &VolumeTable, maps: &Maps, zeroed: &ZeroRuns) -> Vec<u8> {
    let mut recs = vec![Record::Blob {
        kind: KIND_FLOOR,
        body: table.next_id().to_le_bytes().to_vec(),
    }];
    if table.overcommit_milli != 0 {
        recs.push(
            VolumeRecord::Settings {
                overcommit_milli: table.overcommit_milli,
            }
            .encode(),
        );
    }
    for (id, m) in table.volumes.iter().chain(table.snapshots.iter()) {
        let r = match table.lineage.get(id) {
            Some(l) => VolumeRecord::Derive {
                meta: m.clone(),
                lineage: *l,
                snapshot: table.snapshots.contains_key(id),
                grouped: false,
            },
            None => VolumeRecord::Create(m.clone()),
        };
        recs.push(r.encode());
    }
    for (id, data) in &table.control {
        recs.push(
            VolumeRecord::Control {
                id: *id,
                data: data.clone(),
            }
            .encode(),
        );
    }
    let mut leaf_ids: HashMap<usize, u32> = HashMap::new();
    for (id, map) in maps {
        let mut pairs = Vec::new();
        for (index, key) in map.leaf_ids() {
            let entries = map.leaf_entries(index);
            if entries.is_empty() {
                // Every entry was unmapped since the leaf was made: nothing to store.
                continue;
            }
            let next = u32::try_from(leaf_ids.len() + 1).expect("leaves fit u32");
            let leaf_id = *leaf_ids.entry(key).or_insert_with(|| {
                encode_leaf(&entries, next, &mut recs);
                next
            });
            pairs.push((u32::try_from(index).expect("leaf index fits u32"), leaf_id));
        }
        for chunk in pairs.chunks(PAIRS_PER_RECORD) {
            let mut body = id.to_le_bytes().to_vec();
            for (index, leaf) in chunk {
                body.extend_from_slice(&index.to_le_bytes());
                body.extend_from_slice(&leaf.to_le_bytes());
            }
            recs.push(Record::Blob {
                kind: KIND_TOP,
                body,
            });
        }
    }
    // A full zeroed record fills one block; one block more for the last partial one.
    let area_blocks = sb.ckpt_bytes / BLOCK_BYTES as u64;
    let room = area_blocks.saturating_sub(format::journal_blocks_needed(&recs) + 1);
    let runs: Vec<(u32, u32)> = zeroed.runs().collect();
    let fit = usize::try_from(room)
        .unwrap_or(usize::MAX)
        .saturating_mul(RUNS_PER_RECORD);
    recs.extend(VolumeRecord::for_runs(&runs[..fit.min(runs.len())], true));
    format::encode_journal_blocks(sb.journal_tag ^ CKPT_TAG_XOR, 1, &recs)
}

fn encode_leaf(entries: &[(usize, Mapping)], leaf_id: u32, out: &mut Vec<Record>) {
    let mut slots = vec![0u32; LEAF_ENTRIES];
    for (i, m) in entries {
        slots[*i] = m.pc + 1;
    }
    let mut i = 0;
    while i < LEAF_ENTRIES {
        if slots[i] == 0 {
            i += 1;
            continue;
        }
        // A run of slots, zeroes inside allowed, ending at the last mapped one in reach.
        let end = (i + SLOTS_PER_RECORD).min(LEAF_ENTRIES);
        let last = (i..end).rev().find(|&j| slots[j] != 0).unwrap_or(i);
        let mut body = leaf_id.to_le_bytes().to_vec();
        body.extend_from_slice(&u16::try_from(i).expect("slot fits u16").to_le_bytes());
        for v in &slots[i..=last] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        out.push(Record::Blob {
            kind: KIND_LEAF,
            body,
        });
        i = last + 1;
    }
}

/// Loads the checkpoint the superblock names (an empty table without one).
pub fn load(dev: &impl MetaSource, sb: &Superblock) -> Result<(VolumeTable, Maps), PoolError> {
    if sb.active_ckpt == NO_CHECKPOINT {
        return Ok((VolumeTable::default(), BTreeMap::new()));
    }
    let bad = |why: String| PoolError::BadCheckpoint {
        area: sb.active_ckpt,
        why,
    };
    let area = usize::try_from(sb.active_ckpt)
        .ok()
        .and_then(|a| sb.ckpt_offsets.get(a))
        .ok_or_else(|| bad("the superblock names no such area".into()))?;
    if sb.ckpt_len > sb.ckpt_bytes || !sb.ckpt_len.is_multiple_of(BLOCK_BYTES as u64) {
        return Err(bad(format!(
            "length {} does not fit the {}-byte area in whole blocks",
            sb.ckpt_len, sb.ckpt_bytes
        )));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(sb.ckpt_len).unwrap_or(0));
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < sb.ckpt_len {
        let n = chunk.min(sb.ckpt_len - off);
        let b = dev.read_at(
            sb.region_start + area + off,
            usize::try_from(n).expect("chunk fits usize"),
        )?;
        bytes.extend_from_slice(&b);
        off += n;
    }
    decode(sb, &bytes).map_err(bad)
}

/// Decodes checkpoint bytes (checked against the superblock's crc) into a table and maps.
pub fn decode(sb: &Superblock, bytes: &[u8]) -> Result<(VolumeTable, Maps), String> {
    let crc = crc32c::crc32c(bytes);
    if crc != sb.ckpt_crc {
        return Err(format!(
            "crc32c {crc:#010x} does not match the superblock's {:#010x}",
            sb.ckpt_crc
        ));
    }
    let tag = sb.journal_tag ^ CKPT_TAG_XOR;
    let mut table = VolumeTable::default();
    let mut maps: Maps = BTreeMap::new();
    // Leaves are built in a scratch map per leaf id, then adopted by the maps using them.
    let mut leaves: HashMap<u32, ClusterMap> = HashMap::new();
    for (i, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
        let seq = i as u64 + 1;
        let recs =
            format::decode_journal_block(b, tag, seq).map_err(|e| format!("block {seq}: {e}"))?;
        for r in recs {
            let Record::Blob { kind, body } = &r else {
                return Err(format!("block {seq}: map record in a checkpoint"));
            };
            let mut b = body.as_slice();
            match *kind {
                KIND_FLOOR => table.id_floor = take_u32(&mut b)?,
                KIND_LEAF => {
                    let id = take_u32(&mut b)?;
                    let first = usize::from(take_u16(&mut b)?);
                    let leaf = leaves
                        .entry(id)
                        .or_insert_with(|| ClusterMap::new(LEAF_ENTRIES as u64));
                    let mut slot = first;
                    while !b.is_empty() {
                        let v = take_u32(&mut b)?;
                        if slot >= LEAF_ENTRIES {
                            return Err(format!(
                                "block {seq}: leaf {id} slot {slot} past the leaf"
                            ));
                        }
                        if v != 0 {
                            if u64::from(v - 1) >= sb.clusters {
                                return Err(format!(
                                    "block {seq}: leaf {id} maps physical cluster {} past the pool's {}",
                                    v - 1,
                                    sb.clusters
                                ));
                            }
                            leaf.set(slot as u64, Mapping { pc: v - 1 }, &mut |_| {});
                        }
                        slot += 1;
                    }
                }
                KIND_TOP => {
                    let id = take_u32(&mut b)?;
                    let size = table
                        .get(id)
                        .map(|m| m.size_bytes)
                        .ok_or_else(|| format!("block {seq}: leaves for unknown id {id}"))?;
                    let map = maps.entry(id).or_insert_with(|| {
                        Arc::new(ClusterMap::new(volume_clusters(size, sb.cluster_bytes)))
                    });
                    while !b.is_empty() {
                        let index = usize::try_from(take_u32(&mut b)?).unwrap_or(usize::MAX);
                        let leaf_id = take_u32(&mut b)?;
                        let leaf = leaves.get(&leaf_id).ok_or_else(|| {
                            format!("block {seq}: id {id} uses unknown leaf {leaf_id}")
                        })?;
                        if (index as u64) * LEAF_ENTRIES as u64 >= map.len() {
                            return Err(format!("block {seq}: id {id} leaf {index} past its size"));
                        }
                        if map.has_leaf(index) {
                            return Err(format!("block {seq}: id {id} names leaf {index} twice"));
                        }
                        map.adopt_leaf(leaf, 0, index);
                    }
                }
                3 | 9 => match VolumeRecord::decode(&r)? {
                    Some(
                        VolumeRecord::Create(VolumeMeta { size_bytes, id, .. })
                        | VolumeRecord::Derive {
                            meta: VolumeMeta { size_bytes, id, .. },
                            ..
                        },
                    ) if check_volume_size(size_bytes, sb.cluster_bytes).is_err()
                        || table.get(id).is_some() =>
                    {
                        return Err(format!(
                            "block {seq}: id {id} is listed twice or has an impossible size {size_bytes}"
                        ));
                    }
                    Some(VolumeRecord::Create(m)) => {
                        table.volumes.insert(m.id, m);
                    }
                    Some(VolumeRecord::Derive {
                        meta,
                        lineage,
                        snapshot,
                        ..
                    }) => {
                        table.lineage.insert(meta.id, lineage);
                        if snapshot {
                            table.snapshots.insert(meta.id, meta);
                        } else {
                            table.volumes.insert(meta.id, meta);
                        }
                    }
                    _ => return Err(format!("block {seq}: unexpected record type {kind}")),
                },
                16 => {
                    let v = VolumeRecord::decode(&r)?;
                    if let Some(VolumeRecord::Zeroed { runs }) = &v {
                        check_runs(runs, sb.clusters).map_err(|e| format!("block {seq}: {e}"))?;
                    }
                    if let Some(v) = v {
                        table.apply(&v).map_err(|e| format!("block {seq}: {e}"))?;
                    }
                }
                // Settings, and control records (after the objects they belong to).
                8 | 15 => {
                    if let Some(v) = VolumeRecord::decode(&r)? {
                        table.apply(&v).map_err(|e| format!("block {seq}: {e}"))?;
                    }
                }
                other => return Err(format!("block {seq}: record type {other} in a checkpoint")),
            }
        }
    }
    // Volumes with nothing mapped have no top records.
    for (id, m) in table.volumes.iter().chain(table.snapshots.iter()) {
        maps.entry(*id).or_insert_with(|| {
            Arc::new(ClusterMap::new(volume_clusters(
                m.size_bytes,
                sb.cluster_bytes,
            )))
        });
    }
    // The scratch leaves drop their reference here; the maps keep theirs.
    drop(leaves);
    Ok((table, maps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvs::pool::layout;
    use crate::lvs::table::{Lineage, VolumeMeta};

    fn meta(id: u32, name: &str, size: u64) -> VolumeMeta {
        VolumeMeta {
            id,
            uuid: [7; 16],
            name: name.into(),
            size_bytes: size,
            ..VolumeMeta::default()
        }
    }

    #[test]
    fn round_trips_shared_leaves_once() {
        let mut sb = layout(1 << 30, 64 << 10, [1; 16], 77).expect("layout");
        let mut table = VolumeTable::default();
        let mut maps: Maps = BTreeMap::new();
        let size = 200 << 20; // 3200 clusters: 4 leaves
        table
            .apply(&VolumeRecord::Create(meta(1, "a", size)))
            .expect("create");
        let a = Arc::new(ClusterMap::new(volume_clusters(size, sb.cluster_bytes)));
        for lc in (0..3200).step_by(3) {
            a.set(
                lc,
                Mapping {
                    pc: u32::try_from(lc).expect("small"),
                },
                &mut |_| {},
            );
        }
        maps.insert(1, Arc::clone(&a));
        let snap = VolumeRecord::Derive {
            meta: meta(2, "a-snap", size),
            lineage: Lineage {
                source: 1,
                created_unix: 99,
            },
            snapshot: true,
            grouped: false,
        };
        table.apply(&snap).expect("snapshot");
        maps.insert(2, Arc::new(a.share()));
        a.set(5, Mapping { pc: 9000 }, &mut |_| {});
        table
            .apply(&VolumeRecord::Delete { id: 1 })
            .expect("delete source");
        maps.remove(&1);
        table
            .apply(&VolumeRecord::Create(meta(3, "b", 4096)))
            .expect("create");
        maps.insert(3, Arc::new(ClusterMap::new(1)));
        // A leaf whose every entry was unmapped again stays allocated: nothing to store.
        let emptied = Arc::new(ClusterMap::new(1));
        emptied.set(0, Mapping { pc: 3 }, &mut |_| {});
        emptied.clear(0, &mut |_| {});
        table
            .apply(&VolumeRecord::Create(meta(4, "emptied", 4096)))
            .expect("create");
        maps.insert(4, emptied);
        for (id, data) in [(2, b"snap export".to_vec()), (3, vec![0xab; 1024])] {
            table
                .apply(&VolumeRecord::Control { id, data })
                .expect("control record");
        }

        let mut zeroed = ZeroRuns::default();
        zeroed.add(10_000, 500);
        zeroed.add(12_000, 1);
        let bytes = encode(&sb, &table, &maps, &zeroed);
        sb.ckpt_crc = crc32c::crc32c(&bytes);
        sb.ckpt_len = bytes.len() as u64;
        let (t2, m2) = decode(&sb, &bytes).expect("decode");
        assert_eq!(t2.zeroed, zeroed);
        assert_eq!(t2.volumes, table.volumes);
        assert_eq!(t2.snapshots, table.snapshots);
        assert_eq!(t2.lineage, table.lineage);
        assert_eq!(t2.control, table.control);
        assert_eq!(t2.control.len(), 2);
        assert!(t2.next_id() >= 4, "ids are not reused: {}", t2.next_id());
        for (id, m) in &maps {
            let mut want = Vec::new();
            m.for_each(|lc, x| want.push((lc, x.pc)));
            let mut got = Vec::new();
            m2[id].for_each(|lc, x| got.push((lc, x.pc)));
            assert_eq!(got, want, "map {id}");
        }
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert!(decode(&sb, &bad).expect_err("crc").contains("crc32c"));

        // Zeroed runs that do not fit the area are left out, lowest first kept.
        let base = encode(&sb, &table, &maps, &ZeroRuns::default()).len() as u64;
        sb.ckpt_bytes = base + 3 * BLOCK_BYTES as u64;
        let mut many = ZeroRuns::default();
        for i in 0..3000 {
            many.add(2 * i, 1);
        }
        let bytes = encode(&sb, &table, &maps, &many);
        assert!(bytes.len() as u64 <= sb.ckpt_bytes, "{} bytes", bytes.len());
        sb.ckpt_crc = crc32c::crc32c(&bytes);
        sb.ckpt_len = bytes.len() as u64;
        let (t3, _) = decode(&sb, &bytes).expect("decode");
        let kept: Vec<(u32, u32)> = t3.zeroed.runs().collect();
        assert!(
            kept.len() >= RUNS_PER_RECORD && kept.len() < 3000,
            "{} runs kept",
            kept.len()
        );
        assert_eq!(kept, many.runs().take(kept.len()).collect::<Vec<_>>());

        // A zeroed run past the pool is damage.
        let mut past = ZeroRuns::default();
        past.add(u32::try_from(sb.clusters).expect("small") - 1, 2);
        sb.ckpt_bytes = 1 << 24;
        let bytes = encode(&sb, &table, &maps, &past);
        sb.ckpt_crc = crc32c::crc32c(&bytes);
        sb.ckpt_len = bytes.len() as u64;
        let e = decode(&sb, &bytes).expect_err("past the pool");
        assert!(e.contains("outside the pool"), "{e}");
    }
}
