//! The volume table: volumes, snapshots and clones of a pool, and the journal records that
//! change it (FORMAT.md §3, types 3–11 and 15).
//!
//! A snapshot is a read-only volume whose map shares every leaf of its source's map at the
//! instant it was taken (`map.rs`); a clone is a writable volume made the same way from a
//! snapshot (or from a volume, at an instant). Both carry a [`Lineage`]: the source's id
//! and the creation time. Deleting a source never touches what was made from it: the maps
//! are independent, the shared clusters are reference-counted.
//!
//! A group snapshot is one commit: a `Derive` record per snapshot marked *grouped*, then a
//! `Group` record naming them all. Grouped entries stay pending until the `Group` record
//! is applied; replay drops pending entries left at the end (the commit was torn), so the
//! group appears whole or not at all.
//!
//! Must never: reuse the id of an object something still refers to (ids only grow past
//! every id and source seen), or accept a record that contradicts the table.

use std::collections::BTreeMap;

use super::alloc::ZeroRuns;
use super::format::{self, Record};
use super::pool::{MAX_LABELS, MAX_LABEL_BYTES, MAX_NAME_BYTES};

/// A volume or snapshot as the table holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Pool-local id (journal records use it).
    pub id: u32,
    /// Uuid.
    pub uuid: [u8; 16],
    /// Name, unique among the pool's volumes (or among its snapshots).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Full size reserved at creation (thick).
    pub thick: bool,
    /// Has ever been written (for a snapshot or clone: its source had been).
    pub written: bool,
}

/// Where a snapshot or clone came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Id of the volume a snapshot was taken of, or of the snapshot (or volume) a clone
    /// was made from. The source may have been deleted since.
    pub source: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// Volume-table changes as journal records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeRecord {
    /// A volume was created (type 3).
    Create(VolumeMeta),
    /// A volume or snapshot was deleted (type 4).
    Delete {
        /// Its id.
        id: u32,
    },
    /// A volume was resized (type 5).
    Resize {
        /// Its id.
        id: u32,
        /// New size.
        size_bytes: u64,
    },
    /// A volume was written for the first time (type 6).
    Written {
        /// Its id.
        id: u32,
    },
    /// The grouped snapshots `ids` exist from now on, together (type 7).
    Group {
        /// Snapshot ids, each created by a grouped `Derive` earlier in the same commit.
        ids: Vec<u32>,
    },
    /// A snapshot or clone was made from `lineage.source` (type 9): its map shares the
    /// source's leaves as of this record.
    Derive {
        /// The new object.
        meta: VolumeMeta,
        /// Its source and creation time.
        lineage: Lineage,
        /// Read-only snapshot (else a writable clone).
        snapshot: bool,
        /// Part of a group snapshot: pending until the `Group` record.
        grouped: bool,
    },
    /// Volume `id` now has the contents of snapshot `snap` (type 10).
    Rollback {
        /// The volume.
        id: u32,
        /// The snapshot.
        snap: u32,
    },
    /// A volume's or snapshot's labels were replaced (type 11).
    Labels {
        /// Its id.
        id: u32,
        /// The new labels.
        labels: BTreeMap<String, String>,
    },
    /// The control plane's record for volume or snapshot `id` (type 8): opaque bytes
    /// (an export record), replaced whole; empty clears it. Deleting the object drops it.
    Control {
        /// The volume or snapshot.
        id: u32,
        /// At most [`MAX_CONTROL_BYTES`]; empty = none.
        data: Vec<u8>,
    },
    /// Pool settings (type 15): the overcommit limit, in thousandths (provisioned bytes
    /// ≤ limit × capacity).
    Settings {
        /// Overcommit limit × 1000.
        overcommit_milli: u32,
    },
    /// Clusters that are durably zero and not handed out (type 16, FORMAT.md §5): runs
    /// `(first, count)`; an import need not zero them again.
    Zeroed {
        /// The runs.
        runs: Vec<(u32, u32)>,
    },
    /// Clusters leaving the zeroed set: they may be handed out once this record is
    /// durable (type 17).
    Withdrawn {
        /// The runs.
        runs: Vec<(u32, u32)>,
    },
}

/// Runs per zeroed or withdrawn record (8 bytes each: one fills a journal block).
pub const RUNS_PER_RECORD: usize = format::MAX_RECORD_BODY / 8;

impl VolumeRecord {
    /// Zeroed (`zeroed`) or withdrawn records for `runs`, as many as they need.
    pub fn for_runs(runs: &[(u32, u32)], zeroed: bool) -> Vec<Record> {
        runs.chunks(RUNS_PER_RECORD)
            .map(|c| {
                let runs = c.to_vec();
                if zeroed {
                    VolumeRecord::Zeroed { runs }
                } else {
                    VolumeRecord::Withdrawn { runs }
                }
                .encode()
            })
            .collect()
    }
}

fn put_runs(out: &mut Vec<u8>, runs: &[(u32, u32)]) {
    for (first, n) in runs {
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn take_runs(b: &mut &[u8]) -> Result<Vec<(u32, u32)>, String> {
    let mut runs = Vec::with_capacity(b.len() / 8);
    while !b.is_empty() {
        runs.push((take_u32(b)?, take_u32(b)?));
    }
    Ok(runs)
}

/// The largest control record a volume can carry (it always fits one journal record).
pub const MAX_CONTROL_BYTES: usize = 1024;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("strings validated to fit a record");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_labels(out: &mut Vec<u8>, labels: &BTreeMap<String, String>) {
    let n = u16::try_from(labels.len()).expect("labels validated");
    out.extend_from_slice(&n.to_le_bytes());
    for (k, v) in labels {
        put_str(out, k);
        put_str(out, v);
    }
}

pub(crate) fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err(format!("truncated: wanted {n} bytes, {} left", b.len()));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

pub(crate) fn take_u16(b: &mut &[u8]) -> Result<u16, String> {
    Ok(u16::from_le_bytes(take(b, 2)?.try_into().expect("2 bytes")))
}
pub(crate) fn take_u32(b: &mut &[u8]) -> Result<u32, String> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")))
}
pub(crate) fn take_u64(b: &mut &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(take(b, 8)?.try_into().expect("8 bytes")))
}
fn take_str(b: &mut &[u8]) -> Result<String, String> {
    let n = usize::from(take_u16(b)?);
    String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
}
fn take_labels(b: &mut &[u8]) -> Result<BTreeMap<String, String>, String> {
    let n = take_u16(b)?;
    let mut labels = BTreeMap::new();
    for _ in 0..n {
        let k = take_str(b)?;
        labels.insert(k, take_str(b)?);
    }
    Ok(labels)
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

fn put_meta(body: &mut Vec<u8>, m: &VolumeMeta, extra_flags: u32) {
    body.extend_from_slice(&m.id.to_le_bytes());
    body.extend_from_slice(&m.uuid);
    body.extend_from_slice(&m.size_bytes.to_le_bytes());
    let flags = u32::from(m.thick) | (u32::from(m.written) << 1) | extra_flags;
    body.extend_from_slice(&flags.to_le_bytes());
    put_str(body, &m.name);
    put_labels(body, &m.labels);
}

fn take_meta(b: &mut &[u8]) -> Result<(VolumeMeta, u32), String> {
    let id = take_u32(b)?;
    let uuid = take(b, 16)?.try_into().expect("16 bytes");
    let size_bytes = take_u64(b)?;
    let flags = take_u32(b)?;
    let name = take_str(b)?;
    let labels = take_labels(b)?;
    Ok((
        VolumeMeta {
            id,
            uuid,
            name,
            size_bytes,
            labels,
            thick: flags & 1 != 0,
            written: flags & 2 != 0,
        },
        flags,
    ))
}

const FLAG_SNAPSHOT: u32 = 4;
const FLAG_GROUPED: u32 = 8;

impl VolumeRecord {
    /// The journal record.
    pub fn encode(&self) -> Record {
        let mut body = Vec::new();
        let kind = match self {
            VolumeRecord::Create(m) => {
                put_meta(&mut body, m, 0);
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
            VolumeRecord::Group { ids } => {
                for id in ids {
                    body.extend_from_slice(&id.to_le_bytes());
                }
                7
            }
            VolumeRecord::Derive {
                meta,
                lineage,
                snapshot,
                grouped,
            } => {
                let flags = if *snapshot { FLAG_SNAPSHOT } else { 0 }
                    | if *grouped { FLAG_GROUPED } else { 0 };
                put_meta(&mut body, meta, flags);
                body.extend_from_slice(&lineage.source.to_le_bytes());
                body.extend_from_slice(&lineage.created_unix.to_le_bytes());
                9
            }
            VolumeRecord::Rollback { id, snap } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&snap.to_le_bytes());
                10
            }
            VolumeRecord::Labels { id, labels } => {
                body.extend_from_slice(&id.to_le_bytes());
                put_labels(&mut body, labels);
                11
            }
            VolumeRecord::Control { id, data } => {
                body.extend_from_slice(&id.to_le_bytes());
                let len = u16::try_from(data.len()).expect("control record validated");
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(data);
                8
            }
            VolumeRecord::Settings { overcommit_milli } => {
                body.extend_from_slice(&overcommit_milli.to_le_bytes());
                15
            }
            VolumeRecord::Zeroed { runs } => {
                put_runs(&mut body, runs);
                16
            }
            VolumeRecord::Withdrawn { runs } => {
                put_runs(&mut body, runs);
                17
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
            3 => VolumeRecord::Create(take_meta(&mut b)?.0),
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
            7 => {
                let mut ids = Vec::new();
                while !b.is_empty() {
                    ids.push(take_u32(&mut b)?);
                }
                VolumeRecord::Group { ids }
            }
            9 => {
                let (meta, flags) = take_meta(&mut b)?;
                let source = take_u32(&mut b)?;
                let created_unix = take_u64(&mut b)?;
                VolumeRecord::Derive {
                    meta,
                    lineage: Lineage {
                        source,
                        created_unix,
                    },
                    snapshot: flags & FLAG_SNAPSHOT != 0,
                    grouped: flags & FLAG_GROUPED != 0,
                }
            }
            10 => VolumeRecord::Rollback {
                id: take_u32(&mut b)?,
                snap: take_u32(&mut b)?,
            },
            11 => VolumeRecord::Labels {
                id: take_u32(&mut b)?,
                labels: take_labels(&mut b)?,
            },
            8 => {
                let id = take_u32(&mut b)?;
                let len = usize::from(take_u16(&mut b)?);
                if len > MAX_CONTROL_BYTES {
                    return Err(format!(
                        "control record of {len} bytes (at most {MAX_CONTROL_BYTES})"
                    ));
                }
                VolumeRecord::Control {
                    id,
                    data: take(&mut b, len)?.to_vec(),
                }
            }
            15 => VolumeRecord::Settings {
                overcommit_milli: take_u32(&mut b)?,
            },
            16 => VolumeRecord::Zeroed {
                runs: take_runs(&mut b)?,
            },
            17 => VolumeRecord::Withdrawn {
                runs: take_runs(&mut b)?,
            },
            _ => return Ok(None),
        };
        if !b.is_empty() {
            return Err(format!("{} trailing bytes", b.len()));
        }
        Ok(Some(v))
    }
}

/// A grouped snapshot waiting for its `Group` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// The snapshot.
    pub meta: VolumeMeta,
    /// Its source.
    pub lineage: Lineage,
}

/// The volume table: what replay of the journal (after the checkpoint) yields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeTable {
    /// Writable volumes (including clones) by id.
    pub volumes: BTreeMap<u32, VolumeMeta>,
    /// Read-only snapshots by id.
    pub snapshots: BTreeMap<u32, VolumeMeta>,
    /// Source and creation time of snapshots and clones.
    pub lineage: BTreeMap<u32, Lineage>,
    /// Grouped snapshots whose `Group` record has not been applied yet.
    pub pending: BTreeMap<u32, Pending>,
    /// Every id below this has been used (ids are never reused: a snapshot's lineage may
    /// name a deleted volume).
    pub id_floor: u32,
    /// Overcommit limit × 1000 as set (0 = never set: the default, 1.0).
    pub overcommit_milli: u32,
    /// The control plane's record of each volume or snapshot that has one (exports).
    pub control: BTreeMap<u32, Vec<u8>>,
    /// Clusters recorded durably zero and not handed out since (types 16 and 17), as an
    /// import replays them; a running pool's allocator owns the live set.
    pub zeroed: ZeroRuns,
}

impl VolumeTable {
    /// The volume or snapshot `id`.
    pub fn get(&self, id: u32) -> Option<&VolumeMeta> {
        self.volumes.get(&id).or_else(|| self.snapshots.get(&id))
    }

    /// Whether `id` is a snapshot.
    pub fn is_snapshot(&self, id: u32) -> bool {
        self.snapshots.contains_key(&id)
    }

    /// The volume (not snapshot) named `name`.
    pub fn volume_named(&self, name: &str) -> Option<&VolumeMeta> {
        self.volumes.values().find(|v| v.name == name)
    }

    /// The snapshot named `name`.
    pub fn snapshot_named(&self, name: &str) -> Option<&VolumeMeta> {
        self.snapshots.values().find(|v| v.name == name)
    }

    fn check_new(&self, m: &VolumeMeta, snapshot: bool) -> Result<(), String> {
        if self.get(m.id).is_some() || self.pending.contains_key(&m.id) {
            return Err(format!("id {} created twice", m.id));
        }
        let clash = if snapshot {
            self.snapshot_named(&m.name).is_some()
                || self.pending.values().any(|p| p.meta.name == m.name)
        } else {
            self.volume_named(&m.name).is_some()
        };
        if clash {
            return Err(format!("name {:?} created twice", m.name));
        }
        Ok(())
    }

    fn bump(&mut self, id: u32) {
        self.id_floor = self.id_floor.max(id.saturating_add(1));
    }

    /// Applies one record; refuses records that contradict the table.
    pub fn apply(&mut self, r: &VolumeRecord) -> Result<(), String> {
        match r {
            VolumeRecord::Create(m) => {
                self.check_new(m, false)?;
                self.bump(m.id);
                self.volumes.insert(m.id, m.clone());
            }
            VolumeRecord::Delete { id } => {
                if self.volumes.remove(id).is_none() && self.snapshots.remove(id).is_none() {
                    return Err(format!("delete of unknown id {id}"));
                }
                self.lineage.remove(id);
                self.control.remove(id);
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
            VolumeRecord::Derive {
                meta,
                lineage,
                snapshot,
                grouped,
            } => {
                let src = self.get(lineage.source).ok_or_else(|| {
                    format!("id {} derived from unknown id {}", meta.id, lineage.source)
                })?;
                if meta.size_bytes < src.size_bytes {
                    return Err(format!(
                        "id {} ({} bytes) smaller than its source id {} ({} bytes)",
                        meta.id, meta.size_bytes, lineage.source, src.size_bytes
                    ));
                }
                self.check_new(meta, *snapshot)?;
                if *grouped && !*snapshot {
                    return Err(format!("id {}: only snapshots are grouped", meta.id));
                }
                self.bump(meta.id);
                if *grouped {
                    self.pending.insert(
                        meta.id,
                        Pending {
                            meta: meta.clone(),
                            lineage: *lineage,
                        },
                    );
                } else {
                    self.lineage.insert(meta.id, *lineage);
                    let into = if *snapshot {
                        &mut self.snapshots
                    } else {
                        &mut self.volumes
                    };
                    into.insert(meta.id, meta.clone());
                }
            }
            VolumeRecord::Group { ids } => {
                if let Some(id) = ids.iter().find(|id| !self.pending.contains_key(id)) {
                    return Err(format!(
                        "group names id {id}, which is not a pending snapshot"
                    ));
                }
                for id in ids {
                    let p = self.pending.remove(id).expect("checked above");
                    self.lineage.insert(*id, p.lineage);
                    self.snapshots.insert(*id, p.meta);
                }
            }
            VolumeRecord::Rollback { id, snap } => {
                let s = self
                    .snapshots
                    .get(snap)
                    .ok_or_else(|| format!("rollback to unknown snapshot id {snap}"))?;
                let s_written = s.written;
                let v = self
                    .volumes
                    .get_mut(id)
                    .ok_or_else(|| format!("rollback of unknown volume id {id}"))?;
                v.written |= s_written;
            }
            VolumeRecord::Zeroed { runs } => {
                for &(first, n) in runs {
                    self.zeroed.add(first, n);
                }
            }
            VolumeRecord::Withdrawn { runs } => {
                for &(first, n) in runs {
                    self.zeroed.remove(first, n);
                }
            }
            VolumeRecord::Settings { overcommit_milli } => {
                if *overcommit_milli < 1000 {
                    return Err(format!(
                        "overcommit limit {overcommit_milli}/1000 is below 1.0"
                    ));
                }
                self.overcommit_milli = *overcommit_milli;
            }
            VolumeRecord::Labels { id, labels } => {
                let v = self
                    .volumes
                    .get_mut(id)
                    .or_else(|| self.snapshots.get_mut(id))
                    .ok_or_else(|| format!("labels of unknown id {id}"))?;
                v.labels = labels.clone();
            }
            VolumeRecord::Control { id, data } => {
                if self.get(*id).is_none() {
                    return Err(format!("control record of unknown id {id}"));
                }
                if data.len() > MAX_CONTROL_BYTES {
                    return Err(format!(
                        "control record of {} bytes for id {id} (at most {MAX_CONTROL_BYTES})",
                        data.len()
                    ));
                }
                if data.is_empty() {
                    self.control.remove(id);
                } else {
                    self.control.insert(*id, data.clone());
                }
            }
        }
        Ok(())
    }

    /// The overcommit limit × 1000 (default 1000: provisioned ≤ capacity, so only
    /// snapshots can fill a pool).
    pub fn overcommit(&self) -> u32 {
        if self.overcommit_milli == 0 {
            1000
        } else {
            self.overcommit_milli
        }
    }

    /// The next unused id.
    pub fn next_id(&self) -> u32 {
        let max_seen = self
            .lineage
            .values()
            .map(|l| l.source)
            .chain(self.volumes.keys().copied())
            .chain(self.snapshots.keys().copied())
            .chain(self.pending.keys().copied())
            .max()
            .unwrap_or(0);
        self.id_floor.max(max_seen.saturating_add(1)).max(1)
    }

    /// Number of objects (volumes, snapshots, pending snapshots).
    pub fn len(&self) -> usize {
        self.volumes.len() + self.snapshots.len() + self.pending.len()
    }

    /// Whether the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_records_round_trip_and_die_with_their_object() {
        let mut t = VolumeTable::default();
        let m = VolumeMeta {
            id: 1,
            name: "v".into(),
            size_bytes: 1 << 20,
            ..VolumeMeta::default()
        };
        t.apply(&VolumeRecord::Create(m)).expect("create");
        let rec = VolumeRecord::Control {
            id: 1,
            data: b"{\"dev_id\":3}".to_vec(),
        };
        let decoded = VolumeRecord::decode(&rec.encode())
            .expect("decode")
            .expect("a table record");
        assert_eq!(decoded, rec);
        t.apply(&decoded).expect("apply");
        assert_eq!(t.control[&1], b"{\"dev_id\":3}");
        // Unknown objects and oversized records are refused; empty clears.
        let unknown = VolumeRecord::Control {
            id: 9,
            data: vec![1],
        };
        assert!(t
            .apply(&unknown)
            .expect_err("unknown")
            .contains("unknown id 9"));
        let big = VolumeRecord::Control {
            id: 1,
            data: vec![0; MAX_CONTROL_BYTES + 1],
        };
        assert!(t.apply(&big).expect_err("too big").contains("at most"));
        t.apply(&VolumeRecord::Control {
            id: 1,
            data: Vec::new(),
        })
        .expect("clear");
        assert!(t.control.is_empty());
        t.apply(&rec).expect("set again");
        t.apply(&VolumeRecord::Delete { id: 1 }).expect("delete");
        assert!(t.control.is_empty(), "a deleted volume keeps no record");
    }
}
