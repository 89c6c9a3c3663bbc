//! The offline pool checker (`coreblkd verify --device PATH`, issue 10 item 9): reads every
//! metadata structure of a pool and every cross-reference between them, and reports each
//! problem precisely (which copy, block, record, volume or cluster, and what is wrong).
//!
//! What it checks, in order: the coreblk label at the device's start and end; both
//! superblock copies (magic, version, copy index, crc, generation, geometry: areas inside
//! the pool region, non-overlapping, aligned, the data area inside the device); the active
//! checkpoint (its crc against the superblock, the block framing, every record, leaf ids
//! defined before use, leaf indexes inside the volume, physical clusters inside the pool);
//! journal replay from the superblock's first sequence (every record decodes and applies,
//! where replay stopped, and whether valid blocks with higher sequences lie past the stop:
//! a hole in the middle rather than the normal end); the volume table (unique names per
//! kind, sizes in whole logical blocks, lineage); the maps (lengths, physical clusters in
//! the pool) and the physical clusters' reference counts (the distinct leaves holding
//! each, as `PoolRt::start` counts them; a cluster found at two logical positions is
//! cross-linked).
//!
//! It reuses the import's own code (`pool::read_superblock`, `checkpoint::decode`,
//! `journal::replay`, `pool::apply_record`, `pool::drop_pending`) so that "verifies clean"
//! means "imports to this state", and adds its own passes where the import stops at the
//! first problem or would not notice one.
//!
//! Must never: write to the device, or panic on anything it reads. Start reading at
//! [`verify`]; [`verify_offline`] opens a device read-only for the command line;
//! [`verify_live`] checks a pool its daemon is serving (`coreblk pool verify`).
//!
//! # Checking a running pool
//!
//! A served pool keeps writing while the checker reads, so the checker's reads are not
//! one instant of the device. The crash-consistency contract (FORMAT.md §3, §4) says the
//! metadata at any valid journal prefix is a consistent pool, and the checker reads only
//! metadata (never data or free clusters, whose contents a running pool changes at will).
//! What it reads stays such a prefix as long as no superblock write lands during the
//! check: the active checkpoint area is rewritten only by the checkpoint after next, and a
//! journal block from the superblock's first sequence on is overwritten only once a newer
//! checkpoint's superblock is written; journal blocks themselves only ever extend the
//! journal (replay stops wherever the writer was, which is a valid prefix). So the live
//! mode changes exactly the checks a running pool can legitimately violate:
//!
//! - valid journal blocks past the end of replay are the journal growing while it was
//!   read, not a hole — unless block `stop` still does not read back once blocks a whole
//!   journal write past it are on the device (writes are ≤
//!   [`journal::MAX_BLOCKS_PER_WRITE`] blocks, one in flight at a time, so the write
//!   holding `stop` had completed): that
//!   is a hole, as offline; the in-flight write's torn tail is no warning;
//! - a superblock write landing during the check (a checkpoint) can make earlier reads
//!   stale: when the generation moved and anything was reported, the check runs again
//!   (at most [`LIVE_ATTEMPTS`] times), and when it never settles the report says so
//!   rather than claim damage. A clean check after a move stands: it checked a
//!   consistent, slightly older pool.
//!
//! Taking a checkpoint first through the store was the other way; it would not help: the
//! pool keeps journalling (and may checkpoint again) while the check runs, so these two
//! rules are needed anyway, and a checkpoint costs the pool a metadata write per verify.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::checkpoint::{self, CKPT_TAG_XOR};
use super::format::{self, DecodeError, Record, Superblock, BLOCK_BYTES, NO_CHECKPOINT};
use super::journal;
use super::map::LEAF_ENTRIES;
use super::pool::{self, volume_clusters, Maps, VolumeRecord, VolumeTable};
use super::table::{take_u16, take_u32};
use crate::bdev::blocking::BlockingDevice;
use crate::bdev::label::{self, Label, LabelCopy};

/// Problems reported per part before the rest are only counted.
const MAX_PROBLEMS_PER_PART: usize = 64;
/// Largest read issued at once.
const READ_CHUNK_BYTES: u64 = 1 << 20;
/// A volume with more logical clusters than this is not plausible (its map's top array
/// alone would take 32 MiB): refused before a map is built for it.
const MAX_PLAUSIBLE_CLUSTERS: u64 = 1 << 32;
/// Most times [`verify_live`] checks a pool whose superblock moved during the check.
pub const LIVE_ATTEMPTS: u32 = 4;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Redundancy lost or something unexpected, but the pool imports and nothing is lost.
    Warning,
    /// The pool does not import, or imports with data or metadata lost or inconsistent.
    Damaged,
}

/// Which structure a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The device itself (size, reads).
    Device,
    /// The coreblk label copies.
    Label,
    /// The superblock copies.
    Superblock,
    /// The active checkpoint.
    Checkpoint,
    /// The journal.
    Journal,
    /// The volume table.
    Table,
    /// A volume's or snapshot's cluster map.
    Map,
    /// Physical clusters and their reference counts.
    Clusters,
}

/// One problem: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// How bad.
    pub severity: Severity,
    /// Which structure.
    pub part: Part,
    /// The object precisely ("superblock copy 1", "journal block 17", "volume 3 \"a\"").
    pub object: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Damaged => "damaged",
        };
        write!(f, "{sev}: {}: {}", self.object, self.message)
    }
}

/// What the pool holds, as far as the checker got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Pool uuid (from the superblock in use).
    pub pool_uuid: Option<String>,
    /// Superblock copy in use (the valid one with the higher generation).
    pub superblock_copy: Option<u32>,
    /// Its generation.
    pub generation: u64,
    /// Its format version (1 or 2).
    pub format_version: u32,
    /// The pool's journal reach in blocks (FORMAT.md §3).
    pub journal_reach: u64,
    /// Cluster size.
    pub cluster_bytes: u32,
    /// Data clusters in the pool.
    pub clusters: u64,
    /// Active checkpoint area ("A", "B") or none.
    pub checkpoint_area: Option<String>,
    /// Journal sequence the checkpoint covers (its first sequence − 1).
    pub checkpoint_seq: u64,
    /// Checkpoint bytes.
    pub checkpoint_bytes: u64,
    /// First journal sequence replayed.
    pub journal_first_seq: u64,
    /// Journal blocks replayed.
    pub journal_blocks_replayed: u64,
    /// Journal records replayed (applied, up to the first that failed).
    pub journal_records: u64,
    /// Where the journal continues (the first sequence that did not decode).
    pub journal_next_seq: u64,
    /// Why replay stopped.
    pub journal_stop: String,
    /// Valid journal blocks with sequences past the stop.
    pub journal_blocks_past_stop: u64,
    /// Grouped snapshots dropped because their group record was lost (a torn commit).
    pub dropped_pending: Vec<u32>,
    /// Writable volumes (clones included).
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
    /// Mappings over all maps (a cluster shared by N maps counts N times).
    pub mapped_clusters: u64,
    /// Distinct physical clusters in use.
    pub clusters_in_use: u64,
    /// Free clusters recorded durably zero (an import does not zero them again).
    pub zeroed_clusters: u64,
    /// The label's pool uuid, when a label is present.
    pub label_pool_uuid: Option<String>,
}

/// The result of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The device checked.
    pub device: String,
    /// Its size.
    pub device_bytes: u64,
    /// Set when the check could not run to the end (the device could not be read): the
    /// problems found so far are listed, the rest is unknown.
    pub incomplete: Option<String>,
    /// What the pool holds.
    pub summary: Summary,
    /// Every problem found.
    pub problems: Vec<Problem>,
    /// Problems counted but not listed (more than `MAX_PROBLEMS_PER_PART` in one part).
    pub unlisted_problems: u64,
    /// Bytes read from the device (every attempt of a live check).
    pub checked_bytes: u64,
}

impl Report {
    /// No damage found, and the check ran to the end (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.incomplete.is_none() && self.damaged().next().is_none()
    }

    /// The problems that are damage.
    pub fn damaged(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Damaged)
    }

    /// The warnings.
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    /// The problems in `part`.
    pub fn in_part(&self, part: Part) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.part == part)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        let state = if self.incomplete.is_some() {
            "NOT CHECKED TO THE END"
        } else if self.is_clean() {
            "clean"
        } else {
            "DAMAGED"
        };
        writeln!(
            f,
            "pool {} on {} ({} bytes): {state} ({} damaged, {} warnings)",
            s.pool_uuid.as_deref().unwrap_or("?"),
            self.device,
            self.device_bytes,
            self.damaged().count(),
            self.warnings().count()
        )?;
        if let Some(why) = &self.incomplete {
            writeln!(f, "  stopped: {why}")?;
        }
        if let Some(copy) = s.superblock_copy {
            writeln!(
                f,
                "  superblock: copy {copy}, generation {}, format version {}, {} clusters of {} bytes, journal reach {} blocks",
                s.generation, s.format_version, s.clusters, s.cluster_bytes, s.journal_reach
            )?;
            match &s.checkpoint_area {
                Some(a) => writeln!(
                    f,
                    "  checkpoint: area {a}, journal sequence {}, {} bytes",
                    s.checkpoint_seq, s.checkpoint_bytes
                )?,
                None => writeln!(f, "  checkpoint: none yet")?,
            }
            writeln!(
                f,
                "  journal: {} blocks ({} records) replayed from sequence {}; stopped at {}: {}",
                s.journal_blocks_replayed,
                s.journal_records,
                s.journal_first_seq,
                s.journal_next_seq,
                s.journal_stop
            )?;
            writeln!(
                f,
                "  {} volumes, {} snapshots, {} mapped clusters, {} of {} clusters in use",
                s.volumes, s.snapshots, s.mapped_clusters, s.clusters_in_use, s.clusters
            )?;
        }
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        if self.unlisted_problems > 0 {
            writeln!(f, "  … and {} more problems", self.unlisted_problems)?;
        }
        Ok(())
    }
}

/// Why the check could not read something: it stops there.
struct Unreadable(String);

struct Checker<'a> {
    dev: &'a BlockingDevice,
    /// The pool may be running (see the module's "Checking a running pool").
    live: bool,
    report: Report,
    per_part: HashMap<Part, usize>,
    read_bytes: std::cell::Cell<u64>,
}

fn area_name(area: u32) -> String {
    match area {
        0 => "A".into(),
        1 => "B".into(),
        other => format!("#{other}"),
    }
}

impl<'a> Checker<'a> {
    fn problem(&mut self, severity: Severity, part: Part, object: String, message: String) {
        let n = self.per_part.entry(part).or_insert(0);
        *n += 1;
        if *n > MAX_PROBLEMS_PER_PART {
            self.report.unlisted_problems += 1;
            return;
        }
        self.report.problems.push(Problem {
            severity,
            part,
            object,
            message,
        });
    }

    fn damaged(&mut self, part: Part, object: impl Into<String>, message: impl Into<String>) {
        self.problem(Severity::Damaged, part, object.into(), message.into());
    }

    fn warning(&mut self, part: Part, object: impl Into<String>, message: impl Into<String>) {
        self.problem(Severity::Warning, part, object.into(), message.into());
    }

    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, Unreadable> {
        let max = u64::from(self.dev.device().geometry().max_transfer_bytes)
            .clamp(BLOCK_BYTES as u64, READ_CHUNK_BYTES);
        let mut out = Vec::new();
        let mut off = 0;
        while off < len {
            let n = max.min(len - off);
            let b = self
                .dev
                .read(offset + off, usize::try_from(n).unwrap_or(BLOCK_BYTES))
                .map_err(|e| {
                    Unreadable(format!(
                        "reading {n} bytes at byte {} of {}: {e}",
                        offset + off,
                        self.dev.device().name()
                    ))
                })?;
            self.read_bytes.set(self.read_bytes.get() + n);
            out.extend_from_slice(&b);
            off += n;
        }
        Ok(out)
    }

    fn run(&mut self) -> Result<(), Unreadable> {
        let size = self.report.device_bytes;
        let region = label::data_region(size);
        if region.is_empty() {
            self.damaged(
                Part::Device,
                "device",
                format!(
                    "{size} bytes leave no room for a pool between the reserved head and tail MiB"
                ),
            );
            return Ok(());
        }
        let label = self.check_label(size)?;
        let Some(sb) = self.check_superblocks(size)? else {
            return Ok(());
        };
        if let Some(l) = label {
            if l.pool_uuid.0 != sb.pool_uuid {
                self.damaged(
                    Part::Label,
                    "label",
                    format!(
                        "names pool {}, the superblock pool {} (the device was relabelled, or the superblock is another pool's)",
                        l.pool_uuid,
                        label::Uuid(sb.pool_uuid)
                    ),
                );
            }
        }
        let loaded = self.check_checkpoint(&sb)?;
        let Some((mut table, mut maps)) = loaded else {
            // Without the checkpoint the journal's records have nothing to apply to; its
            // framing is still worth checking.
            self.check_journal_framing(&sb)?;
            return Ok(());
        };
        self.check_journal(&sb, &mut table, &mut maps)?;
        self.check_table(&sb, &table, &maps);
        self.check_clusters(&sb, &table, &maps);
        Ok(())
    }

    // ---- label ----

    fn check_label(&mut self, size: u64) -> Result<Option<Label>, Unreadable> {
        let primary = self.read(0, label::LABEL_BYTES)?;
        let p = Label::decode(&primary, LabelCopy::Primary);
        // A grown device keeps its backup where the label's size puts it.
        let label_size = p.as_ref().map_or(size, |l| l.device_size_bytes);
        let backup_at =
            label::backup_offset(label_size).filter(|&o| o + label::LABEL_BYTES <= size);
        let b = match backup_at {
            Some(off) => Label::decode(&self.read(off, label::LABEL_BYTES)?, LabelCopy::Backup),
            None => Err(label::DecodeError::NoMagic),
        };
        use label::DecodeError::NoMagic;
        if matches!((&p, &b), (Err(NoMagic), Err(NoMagic))) {
            return Ok(None);
        }
        let valid = [&p, &b].iter().filter(|r| r.is_ok()).count();
        for (copy, r) in [
            ("label primary copy (byte 0)", &p),
            ("label backup copy", &b),
        ] {
            let Err(e) = r else { continue };
            let where_ = if copy.ends_with("backup copy") && backup_at.is_none() {
                " (the device has no room for it)"
            } else {
                ""
            };
            if valid > 0 {
                self.warning(
                    Part::Label,
                    copy,
                    format!("{e}{where_} (the other copy is valid: rewrite the label)"),
                );
            } else {
                self.damaged(Part::Label, copy, format!("{e}{where_} (no valid copy)"));
            }
        }
        let l = match (p, b) {
            (Ok(p), Ok(b)) => {
                if (p.pool_uuid, p.device_uuid) != (b.pool_uuid, b.device_uuid) {
                    self.warning(
                        Part::Label,
                        "label",
                        format!(
                            "the copies disagree: primary says pool {} device {}, backup pool {} device {}",
                            p.pool_uuid, p.device_uuid, b.pool_uuid, b.device_uuid
                        ),
                    );
                }
                if b.generation > p.generation {
                    b
                } else {
                    p
                }
            }
            (Ok(l), Err(_)) | (Err(_), Ok(l)) => l,
            (Err(_), Err(_)) => return Ok(None),
        };
        self.label_size(&l, size);
        self.report.summary.label_pool_uuid = Some(l.pool_uuid.to_string());
        Ok(Some(l))
    }

    fn label_size(&mut self, l: &Label, size: u64) {
        if l.device_size_bytes > size {
            self.damaged(
                Part::Label,
                "label",
                format!(
                    "claimed a {}-byte device, the device now has {size} bytes (shrunk?)",
                    l.device_size_bytes
                ),
            );
        }
    }

    // ---- superblocks ----

    fn check_superblocks(&mut self, size: u64) -> Result<Option<Superblock>, Unreadable> {
        let region = label::data_region(size);
        let mut copies = Vec::new();
        for copy in 0..2u32 {
            let b = self.read(
                region.start + u64::from(copy) * BLOCK_BYTES as u64,
                BLOCK_BYTES as u64,
            )?;
            let object = format!("superblock copy {copy}");
            match Superblock::decode(&b, copy) {
                Ok(sb) => {
                    let errs = sb_geometry_problems(&sb, size);
                    let bad = !errs.is_empty();
                    for e in errs {
                        self.damaged(Part::Superblock, object.clone(), e);
                    }
                    if sb.copy() != copy {
                        self.damaged(
                            Part::Superblock,
                            object.clone(),
                            format!("generation {} belongs in copy {}", sb.generation, sb.copy()),
                        );
                    }
                    for w in sb_layout_warnings(&sb) {
                        self.warning(Part::Superblock, object.clone(), w);
                    }
                    copies.push((copy, Ok(sb), bad));
                }
                Err(e) => copies.push((copy, Err(e), true)),
            }
        }
        // The copy import uses: the same rule, through the same code.
        let chosen = match pool::read_superblock(self.dev) {
            Ok((sb, _)) => Some(sb),
            Err(pool::PoolError::Io(e)) => return Err(Unreadable(e.to_string())),
            Err(_) => None,
        };
        let valid: Vec<&Superblock> = copies
            .iter()
            .filter_map(|(_, r, _)| r.as_ref().ok())
            .collect();
        let no_magic = copies
            .iter()
            .all(|(_, r, _)| matches!(r, Err(DecodeError::BadMagic)));
        for (copy, r, _) in &copies {
            if let Err(e) = r {
                let sev = if valid.is_empty() {
                    Severity::Damaged
                } else {
                    Severity::Warning
                };
                let extra = if valid.is_empty() {
                    ""
                } else {
                    " (the other copy is valid; this one is rewritten at the next superblock write)"
                };
                self.problem(
                    sev,
                    Part::Superblock,
                    format!("superblock copy {copy}"),
                    format!("{e}{extra}"),
                );
            }
        }
        if let [a, b] = valid.as_slice() {
            let immutable = |s: &Superblock| {
                let mut s = s.clone();
                s.generation = 0;
                s.active_ckpt = 0;
                s.ckpt_crc = 0;
                s.ckpt_len = 0;
                s.first_seq = 0;
                s.flags = 0;
                s
            };
            if immutable(a) != immutable(b) {
                self.damaged(
                    Part::Superblock,
                    "superblock copies",
                    "both are valid but disagree on the pool's uuid, layout or journal tag",
                );
            }
            if a.generation.abs_diff(b.generation) != 1 {
                self.warning(
                    Part::Superblock,
                    "superblock copies",
                    format!(
                        "generations {} and {} are not consecutive (writes alternate copies)",
                        a.generation, b.generation
                    ),
                );
            }
        }
        let Some(sb) = chosen else {
            if no_magic {
                self.report.problems.retain(|p| p.part != Part::Superblock);
                self.damaged(
                    Part::Superblock,
                    "superblock",
                    "no pool here: neither copy carries the pool magic",
                );
            }
            return Ok(None);
        };
        let copy = sb.copy();
        let s = &mut self.report.summary;
        s.pool_uuid = Some(label::Uuid(sb.pool_uuid).to_string());
        s.superblock_copy = Some(copy);
        s.generation = sb.generation;
        s.format_version = sb.version;
        s.journal_reach = sb.journal_reach_blocks();
        s.cluster_bytes = sb.cluster_bytes;
        s.clusters = sb.clusters;
        // Geometry problems of the copy in use make every offset suspect: stop here.
        if copies.iter().any(|(c, _, bad)| *c == copy && *bad) {
            return Ok(None);
        }
        Ok(Some(sb))
    }

    // ---- checkpoint ----

    fn check_checkpoint(
        &mut self,
        sb: &Superblock,
    ) -> Result<Option<(VolumeTable, Maps)>, Unreadable> {
        let s = &mut self.report.summary;
        s.checkpoint_seq = sb.first_seq.saturating_sub(1);
        s.checkpoint_bytes = sb.ckpt_len;
        if sb.active_ckpt == NO_CHECKPOINT {
            if sb.ckpt_len != 0 || sb.ckpt_crc != 0 {
                self.warning(
                    Part::Superblock,
                    format!("superblock copy {}", sb.copy()),
                    format!(
                        "names no checkpoint but a length of {} and crc {:#010x}",
                        sb.ckpt_len, sb.ckpt_crc
                    ),
                );
            }
            return Ok(Some((VolumeTable::default(), Maps::new())));
        }
        let object = format!("checkpoint area {}", area_name(sb.active_ckpt));
        s.checkpoint_area = Some(area_name(sb.active_ckpt));
        let Some(&area) = usize::try_from(sb.active_ckpt)
            .ok()
            .and_then(|a| sb.ckpt_offsets.get(a))
        else {
            self.damaged(
                Part::Checkpoint,
                object,
                "the superblock names no such area",
            );
            return Ok(None);
        };
        if sb.ckpt_len == 0
            || sb.ckpt_len > sb.ckpt_bytes
            || !sb.ckpt_len.is_multiple_of(BLOCK_BYTES as u64)
        {
            self.damaged(
                Part::Checkpoint,
                object,
                format!(
                    "length {} is not a whole number of blocks within the {}-byte area",
                    sb.ckpt_len, sb.ckpt_bytes
                ),
            );
            return Ok(None);
        }
        let bytes = self.read(sb.region_start + area, sb.ckpt_len)?;
        let crc = crc32c::crc32c(&bytes);
        let mut ok = true;
        if crc != sb.ckpt_crc {
            self.damaged(
                Part::Checkpoint,
                object.clone(),
                format!(
                    "crc32c {crc:#010x} does not match the superblock's {:#010x} (the import refuses the pool)",
                    sb.ckpt_crc
                ),
            );
            ok = false;
        }
        if !self.checkpoint_records(sb, &object, &bytes) {
            ok = false;
        }
        if !ok {
            return Ok(None);
        }
        // The import's own decoder. The pass above found nothing it would trip on; a panic
        // here is still caught, because a checker must report rather than crash.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            checkpoint::decode(sb, &bytes)
        }));
        match decoded {
            Ok(Ok(tm)) => Ok(Some(tm)),
            Ok(Err(why)) => {
                self.damaged(
                    Part::Checkpoint,
                    object,
                    format!("{why} (the import refuses the pool)"),
                );
                Ok(None)
            }
            Err(_) => {
                self.damaged(
                    Part::Checkpoint,
                    object,
                    "the import's decoder panicked on it (a bug: report it with this device image)",
                );
                Ok(None)
            }
        }
    }

    /// Walks the checkpoint's blocks and records, reporting every problem (the decoder
    /// stops at the first). Returns whether the checkpoint is fit for the decoder.
    fn checkpoint_records(&mut self, sb: &Superblock, object: &str, bytes: &[u8]) -> bool {
        let tag = sb.journal_tag ^ CKPT_TAG_XOR;
        let mut ok = true;
        // Id → size of every object defined so far.
        let mut sizes: HashMap<u32, u64> = HashMap::new();
        let mut names: HashMap<(bool, String), u32> = HashMap::new();
        // Leaf id → whether a map uses it yet.
        let mut leaves: HashMap<u32, bool> = HashMap::new();
        let mut slots_used: HashSet<(u32, u32)> = HashSet::new();
        for (i, b) in bytes.chunks(BLOCK_BYTES).enumerate() {
            let seq = i as u64 + 1;
            let at = format!("{object} block {seq}");
            let recs = match format::decode_journal_block(b, tag, seq) {
                Ok(r) => r,
                Err(e) => {
                    self.damaged(Part::Checkpoint, at, e.to_string());
                    ok = false;
                    continue;
                }
            };
            for (n, r) in recs.iter().enumerate() {
                let at = format!("{at} record {n}");
                match checkpoint_record(sb, r, &mut sizes, &mut names, &mut leaves, &mut slots_used)
                {
                    Ok(()) => {}
                    Err((sev, why)) => {
                        if sev == Severity::Damaged {
                            ok = false;
                        }
                        self.problem(sev, Part::Checkpoint, at, why);
                    }
                }
            }
        }
        let unused = leaves.values().filter(|used| !**used).count();
        if unused > 0 {
            self.warning(
                Part::Checkpoint,
                object.to_string(),
                format!("{unused} leaves are defined but no map uses them"),
            );
        }
        ok
    }
}

/// Checks one checkpoint record against what came before it.
fn checkpoint_record(
    sb: &Superblock,
    r: &Record,
    sizes: &mut HashMap<u32, u64>,
    names: &mut HashMap<(bool, String), u32>,
    leaves: &mut HashMap<u32, bool>,
    slots_used: &mut HashSet<(u32, u32)>,
) -> Result<(), (Severity, String)> {
    let dmg = |s: String| (Severity::Damaged, s);
    let Record::Blob { kind, body } = r else {
        return Err(dmg(
            "a map or unmap record does not belong in a checkpoint".into()
        ));
    };
    let mut b = body.as_slice();
    match *kind {
        14 => {
            take_u32(&mut b).map_err(dmg)?;
        }
        3 | 9 => {
            let v = VolumeRecord::decode(r).map_err(dmg)?;
            let (meta, snapshot, grouped) = match v {
                Some(VolumeRecord::Create(m)) => (m, false, false),
                Some(VolumeRecord::Derive {
                    meta,
                    snapshot,
                    grouped,
                    ..
                }) => (meta, snapshot, grouped),
                _ => return Err(dmg(format!("record type {kind} did not decode"))),
            };
            if grouped {
                return Err((
                    Severity::Warning,
                    format!("id {} is marked as part of an unfinished group", meta.id),
                ));
            }
            if volume_clusters(meta.size_bytes, sb.cluster_bytes) > MAX_PLAUSIBLE_CLUSTERS {
                return Err(dmg(format!(
                    "id {} has an implausible size of {} bytes",
                    meta.id, meta.size_bytes
                )));
            }
            if sizes.insert(meta.id, meta.size_bytes).is_some() {
                return Err(dmg(format!(
                    "id {} is defined twice (the import keeps the last)",
                    meta.id
                )));
            }
            if let Some(other) = names.insert((snapshot, meta.name.clone()), meta.id) {
                return Err(dmg(format!(
                    "{} name {:?} of id {} is also id {other}'s",
                    if snapshot { "snapshot" } else { "volume" },
                    meta.name,
                    meta.id
                )));
            }
        }
        12 => {
            let id = take_u32(&mut b).map_err(dmg)?;
            let first = take_u16(&mut b).map_err(dmg)?;
            if leaves.get(&id) == Some(&true) {
                return Err(dmg(format!(
                    "leaf {id} gets contents after a map used it (the import would lose them)"
                )));
            }
            leaves.insert(id, false);
            let mut slot = usize::from(first);
            while !b.is_empty() {
                let v = take_u32(&mut b).map_err(dmg)?;
                if slot >= LEAF_ENTRIES {
                    return Err(dmg(format!("leaf {id}: slot {slot} is past the leaf")));
                }
                if v != 0 && u64::from(v - 1) >= sb.clusters {
                    return Err(dmg(format!(
                            "leaf {id} slot {slot} maps physical cluster {}, past the pool's {} clusters",
                            v - 1,
                            sb.clusters
                        )));
                }
                slot += 1;
            }
        }
        13 => {
            let id = take_u32(&mut b).map_err(dmg)?;
            let size = *sizes
                .get(&id)
                .ok_or_else(|| dmg(format!("leaves for id {id}, which is not defined before")))?;
            let len = volume_clusters(size, sb.cluster_bytes);
            while !b.is_empty() {
                let index = take_u32(&mut b).map_err(dmg)?;
                let leaf = take_u32(&mut b).map_err(dmg)?;
                match leaves.get_mut(&leaf) {
                    Some(used) => *used = true,
                    None => {
                        return Err(dmg(format!(
                        "id {id} leaf index {index} uses leaf {leaf}, which is not defined before"
                    )))
                    }
                }
                if u64::from(index) * LEAF_ENTRIES as u64 >= len {
                    return Err(dmg(format!(
                        "id {id} leaf index {index} is past its {len} clusters"
                    )));
                }
                if !slots_used.insert((id, index)) {
                    return Err(dmg(format!(
                        "id {id} leaf index {index} is given a leaf twice"
                    )));
                }
            }
        }
        15 => match VolumeRecord::decode(r).map_err(dmg)? {
            Some(VolumeRecord::Settings { overcommit_milli }) if overcommit_milli >= 1000 => {}
            _ => return Err(dmg("pool settings record is invalid".into())),
        },
        8 => match VolumeRecord::decode(r).map_err(dmg)? {
            Some(VolumeRecord::Control { id, .. }) if sizes.contains_key(&id) => {}
            Some(VolumeRecord::Control { id, .. }) => {
                return Err(dmg(format!(
                    "control (export) record of id {id}, which is not defined before"
                )))
            }
            _ => return Err(dmg("control record did not decode".into())),
        },
        16 => match VolumeRecord::decode(r).map_err(dmg)? {
            Some(VolumeRecord::Zeroed { runs }) => {
                super::pool::check_runs(&runs, sb.clusters).map_err(dmg)?;
            }
            _ => return Err(dmg("zeroed-clusters record did not decode".into())),
        },
        other => {
            return Err(dmg(format!(
                "record type {other} does not belong in a checkpoint"
            )))
        }
    }
    Ok(())
}

impl Checker<'_> {
    // ---- journal ----

    fn check_journal(
        &mut self,
        sb: &Superblock,
        table: &mut VolumeTable,
        maps: &mut Maps,
    ) -> Result<(), Unreadable> {
        let replay = self.replay(sb)?;
        let mut applied = 0u64;
        let mut in_block = (0u64, 0usize);
        for (seq, r) in &replay.records {
            in_block = if in_block.0 == *seq {
                (*seq, in_block.1 + 1)
            } else {
                (*seq, 0)
            };
            if let Some(why) = implausible(sb, r) {
                self.damaged(
                    Part::Journal,
                    format!("journal block {seq}"),
                    format!("{why} (not applied; the import would build a map for it)"),
                );
                break;
            }
            if let Err(why) = pool::apply_record(sb, table, maps, r) {
                self.damaged(
                    Part::Journal,
                    format!("journal block {seq} record {}", in_block.1),
                    format!(
                        "{why} (the import refuses the pool; records after it were not checked)"
                    ),
                );
                break;
            }
            applied += 1;
        }
        self.report.summary.journal_records = applied;
        self.report.summary.dropped_pending = pool::drop_pending(table, maps);
        self.past_stop(sb, &replay)
    }

    fn check_journal_framing(&mut self, sb: &Superblock) -> Result<(), Unreadable> {
        let replay = self.replay(sb)?;
        self.past_stop(sb, &replay)
    }

    fn replay(&mut self, sb: &Superblock) -> Result<journal::Replay, Unreadable> {
        let mut io_error = None;
        let replay = journal::replay(sb, |off| match self.dev.read(off, BLOCK_BYTES) {
            Ok(b) => {
                self.read_bytes
                    .set(self.read_bytes.get() + BLOCK_BYTES as u64);
                Some(b)
            }
            Err(e) => {
                io_error = Some(format!("reading journal block at byte {off}: {e}"));
                None
            }
        });
        if let Some(e) = io_error {
            return Err(Unreadable(e));
        }
        let s = &mut self.report.summary;
        s.journal_first_seq = sb.first_seq;
        s.journal_blocks_replayed = replay.next_seq - sb.first_seq;
        s.journal_next_seq = replay.next_seq;
        s.journal_stop = replay.stop.to_string();
        Ok(replay)
    }

    /// Valid blocks with sequences past the end of replay: the torn tail of the last write
    /// when close to it, otherwise a damaged block in the middle of the journal (everything
    /// after it — acknowledged records — is lost to the import).
    fn past_stop(&mut self, sb: &Superblock, replay: &journal::Replay) -> Result<(), Unreadable> {
        let stop = replay.next_seq;
        let bytes = self.read(sb.region_start + sb.journal_offset, sb.journal_bytes)?;
        let past = journal::valid_blocks_past(sb, stop, &bytes);
        self.report.summary.journal_blocks_past_stop = past.len() as u64;
        let (Some(&first), Some(&last)) = (past.first(), past.last()) else {
            return Ok(());
        };
        let what = format!(
            "replay stops at block {stop} ({}), but {} valid blocks with higher sequences follow ({first}..={last})",
            replay.stop,
            past.len()
        );
        if self.live {
            // The journal grew while it was read: block `stop` reads back now. Or the
            // write in flight (at most one, of at most MAX_BLOCKS_PER_WRITE blocks) holds it.
            let b = self.read(sb.journal_block_offset(stop), BLOCK_BYTES as u64)?;
            if format::decode_journal_block(&b, sb.journal_tag, stop).is_ok()
                || last - stop < journal::MAX_BLOCKS_PER_WRITE
            {
                return Ok(());
            }
        }
        // Offline, a power loss may have left any of the blocks written since the last
        // flush missing: valid blocks within the pool's journal reach past the gap are
        // that torn tail. Live, only the write in flight can be missing (checked above).
        if !self.live && last - stop < sb.journal_reach_blocks() {
            self.warning(
                Part::Journal,
                format!("journal block {stop}"),
                format!(
                    "{what}: the torn tail of the journal writes after the last flush (never flushed), or a damaged block whose successors are lost; the next import can replay them once the writer reaches them again"
                ),
            );
        } else {
            self.damaged(
                Part::Journal,
                format!("journal block {stop}"),
                format!(
                    "{what}: a hole in the middle of the journal — the import ignores every record after it"
                ),
            );
        }
        Ok(())
    }

    // ---- table and maps ----

    fn check_table(&mut self, sb: &Superblock, table: &VolumeTable, maps: &Maps) {
        let lbs = u64::from(sb.logical_block_bytes.max(1));
        let s = &mut self.report.summary;
        s.volumes = table.volumes.len() as u64;
        s.snapshots = table.snapshots.len() as u64;
        let next = table.next_id();
        for (snapshot, objs) in [(false, &table.volumes), (true, &table.snapshots)] {
            let kind = if snapshot { "snapshot" } else { "volume" };
            let mut names: BTreeMap<&str, u32> = BTreeMap::new();
            for (id, m) in objs {
                let object = format!("{kind} {id} {:?}", m.name);
                if m.id != *id {
                    self.damaged(Part::Table, object.clone(), format!("records id {}", m.id));
                }
                if let Some(other) = names.insert(m.name.as_str(), *id) {
                    self.damaged(
                        Part::Table,
                        object.clone(),
                        format!("{kind} {other} has the same name"),
                    );
                }
                if m.size_bytes == 0 || !m.size_bytes.is_multiple_of(lbs) {
                    self.damaged(
                        Part::Table,
                        object.clone(),
                        format!(
                            "size {} is not a positive multiple of the {lbs}-byte logical block",
                            m.size_bytes
                        ),
                    );
                }
                if let Err(e) = pool::validate_meta(&m.name, &m.labels) {
                    self.warning(Part::Table, object.clone(), e);
                }
                match (table.lineage.get(id), snapshot) {
                    (None, true) => self.damaged(
                        Part::Table,
                        object.clone(),
                        "a snapshot without a source (lineage)",
                    ),
                    (Some(l), _) if l.source == *id || l.source >= next => self.damaged(
                        Part::Table,
                        object.clone(),
                        format!("source id {} is itself or was never allocated", l.source),
                    ),
                    // The source may be deleted: its clusters are shared, not borrowed.
                    _ => {}
                }
                match maps.get(id) {
                    None => self.damaged(Part::Map, object, "has no cluster map"),
                    Some(map) => {
                        let want = volume_clusters(m.size_bytes, sb.cluster_bytes);
                        if map.len() != want {
                            self.damaged(
                                Part::Map,
                                object,
                                format!(
                                    "map has {} clusters, its size of {} bytes needs {want}",
                                    map.len(),
                                    m.size_bytes
                                ),
                            );
                        }
                    }
                }
            }
        }
        for id in table.lineage.keys() {
            if table.get(*id).is_none() {
                self.warning(
                    Part::Table,
                    format!("lineage of id {id}"),
                    "names an object that does not exist",
                );
            }
        }
        for id in table.pending.keys() {
            self.damaged(
                Part::Table,
                format!("snapshot {id}"),
                "still pending after replay dropped unfinished groups",
            );
        }
        for id in maps.keys() {
            if table.get(*id).is_none() {
                self.damaged(
                    Part::Map,
                    format!("map {id}"),
                    "belongs to no volume or snapshot (the pool runtime refuses to start)",
                );
            }
        }
    }

    fn check_clusters(&mut self, sb: &Superblock, table: &VolumeTable, maps: &Maps) {
        let name = |id: u32| {
            table.get(id).map_or_else(
                || format!("map {id}"),
                |m| {
                    let kind = if table.is_snapshot(id) {
                        "snapshot"
                    } else {
                        "volume"
                    };
                    format!("{kind} {id} {:?}", m.name)
                },
            )
        };
        let mut mapped = 0u64;
        // Physical cluster → (first holder: map id and logical cluster, distinct leaves).
        let mut holders: HashMap<u32, (u32, u64, u32)> = HashMap::new();
        let mut seen_leaves = HashSet::new();
        let mut in_use = Vec::new();
        for (id, m) in maps {
            let mut past_pool = Vec::new();
            m.for_each(|lc, x| {
                mapped += 1;
                if u64::from(x.pc) >= sb.clusters {
                    past_pool.push((lc, x.pc));
                }
            });
            for (lc, pc) in past_pool {
                self.damaged(
                    Part::Map,
                    format!("{} logical cluster {lc}", name(*id)),
                    format!(
                        "maps physical cluster {pc}, past the pool's {} clusters",
                        sb.clusters
                    ),
                );
            }
            // References are counted per distinct leaf, as `PoolRt::start` counts them.
            for (index, key) in m.leaf_ids() {
                if !seen_leaves.insert(key) {
                    continue;
                }
                let base = (index * LEAF_ENTRIES) as u64;
                for lc in base..(base + LEAF_ENTRIES as u64).min(m.len()) {
                    let Some(x) = m.get(lc) else { continue };
                    if u64::from(x.pc) >= sb.clusters {
                        continue;
                    }
                    in_use.push(x.pc);
                    match holders.get_mut(&x.pc) {
                        None => {
                            holders.insert(x.pc, (*id, lc, 1));
                        }
                        Some((first_id, first_lc, leaves)) => {
                            *leaves = leaves.saturating_add(1);
                            if *first_lc != lc {
                                let (fid, flc) = (*first_id, *first_lc);
                                self.damaged(
                                    Part::Clusters,
                                    format!("physical cluster {}", x.pc),
                                    format!(
                                        "cross-linked: {} logical cluster {lc} and {} logical cluster {flc} (a cluster only ever moves between maps at the same position)",
                                        name(*id),
                                        name(fid)
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        // A cluster recorded zero must be free: an import would hand it out as zero.
        let mut zeroed_mapped = 0u64;
        for (first, n) in table.zeroed.runs() {
            for pc in first..first.saturating_add(n) {
                if let Some((id, lc, _)) = holders.get(&pc) {
                    zeroed_mapped += 1;
                    if zeroed_mapped <= 16 {
                        self.damaged(
                            Part::Clusters,
                            format!("physical cluster {pc}"),
                            format!(
                                "recorded free and zeroed, but {} logical cluster {lc} maps it",
                                name(*id)
                            ),
                        );
                    }
                }
            }
        }
        if zeroed_mapped > 16 {
            self.damaged(
                Part::Clusters,
                "zeroed clusters",
                format!("{zeroed_mapped} clusters recorded free and zeroed are mapped (16 listed)"),
            );
        }
        for (pc, (_, _, leaves)) in &holders {
            if *leaves > u32::from(u16::MAX) {
                self.damaged(
                    Part::Clusters,
                    format!("physical cluster {pc}"),
                    format!("held by {leaves} leaves, more than a reference count holds"),
                );
            }
        }
        match u32::try_from(sb.clusters) {
            Ok(n) => {
                if let Err(e) = super::alloc::Allocator::from_in_use(n, in_use) {
                    self.damaged(
                        Part::Clusters,
                        "allocator",
                        format!("the pool runtime would refuse to start: {e}"),
                    );
                }
            }
            Err(_) => self.damaged(
                Part::Superblock,
                "superblock",
                format!("{} clusters do not fit a u32", sb.clusters),
            ),
        }
        let s = &mut self.report.summary;
        s.mapped_clusters = mapped;
        s.clusters_in_use = holders.len() as u64;
        s.zeroed_clusters = table.zeroed.clusters();
    }
}

/// A journal record the import would act on at great cost (a map for an absurd size).
fn implausible(sb: &Superblock, r: &Record) -> Option<String> {
    let size = match VolumeRecord::decode(r).ok().flatten()? {
        VolumeRecord::Create(m) | VolumeRecord::Derive { meta: m, .. } => m.size_bytes,
        VolumeRecord::Resize { size_bytes, .. } => size_bytes,
        _ => return None,
    };
    (volume_clusters(size, sb.cluster_bytes) > MAX_PLAUSIBLE_CLUSTERS)
        .then(|| format!("a volume of {size} bytes is not plausible"))
}

/// Geometry problems `Superblock::check` does not catch.
fn sb_geometry_problems(sb: &Superblock, device_bytes: u64) -> Vec<String> {
    let mut out = Vec::new();
    let region = label::data_region(device_bytes);
    let blk = BLOCK_BYTES as u64;
    if sb.region_start != region.start {
        out.push(format!(
            "pool region starts at byte {}, pools start at {}",
            sb.region_start, region.start
        ));
    }
    match sb.region_start.checked_add(sb.region_bytes) {
        Some(end) if end <= region.end => {}
        _ => out.push(format!(
            "pool region of {} bytes at {} runs past the device's usable end at {} (device shrunk?)",
            sb.region_bytes, sb.region_start, region.end
        )),
    }
    for (what, off) in [
        ("checkpoint area A", sb.ckpt_offsets[0]),
        ("checkpoint area B", sb.ckpt_offsets[1]),
        ("journal", sb.journal_offset),
        ("data area", sb.data_offset),
    ] {
        if !off.is_multiple_of(blk) {
            out.push(format!("{what} offset {off} is not 4 KiB aligned"));
        }
    }
    if !sb.ckpt_bytes.is_multiple_of(blk) || sb.ckpt_bytes == 0 {
        out.push(format!(
            "checkpoint area size {} is not a positive multiple of 4 KiB",
            sb.ckpt_bytes
        ));
    }
    if !sb.data_offset.is_multiple_of(u64::from(sb.cluster_bytes)) {
        out.push(format!(
            "data area offset {} is not a multiple of the {}-byte cluster",
            sb.data_offset, sb.cluster_bytes
        ));
    }
    if sb.clusters == 0 || sb.clusters >= u64::from(u32::MAX) {
        out.push(format!(
            "{} data clusters (a pool has 1..{})",
            sb.clusters,
            u32::MAX
        ));
    }
    let lbs = sb.logical_block_bytes;
    if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
        out.push(format!(
            "logical block size {lbs} is not a power of two in 512..=4096"
        ));
    }
    if sb.first_seq == 0 {
        out.push("first journal sequence 0 (sequences start at 1)".into());
    }
    if sb.active_ckpt != NO_CHECKPOINT
        && (sb.ckpt_len > sb.ckpt_bytes || !sb.ckpt_len.is_multiple_of(blk) || sb.ckpt_len == 0)
    {
        out.push(format!(
            "active checkpoint length {} does not fit its {}-byte area in whole blocks",
            sb.ckpt_len, sb.ckpt_bytes
        ));
    }
    out
}

/// Differences from the layout `pool::create` computes for this region: not fatal (the
/// superblock describes the layout), but unexpected.
fn sb_layout_warnings(sb: &Superblock) -> Vec<String> {
    let mut out = Vec::new();
    if sb.flags & !1 != 0 {
        out.push(format!("unknown flag bits {:#x}", sb.flags & !1));
    }
    let device_bytes = sb
        .region_start
        .saturating_add(sb.region_bytes)
        .saturating_add(label::RESERVED_TAIL_BYTES);
    if let Ok(want) = pool::layout(device_bytes, sb.cluster_bytes, sb.pool_uuid, sb.journal_tag) {
        let got = (
            sb.ckpt_offsets,
            sb.ckpt_bytes,
            sb.journal_offset,
            sb.journal_bytes,
            sb.data_offset,
            sb.clusters,
        );
        let exp = (
            want.ckpt_offsets,
            want.ckpt_bytes,
            want.journal_offset,
            want.journal_bytes,
            want.data_offset,
            want.clusters,
        );
        if got != exp {
            out.push(format!(
                "layout (checkpoints at {:?} of {} bytes, journal at {} of {} bytes, data at {}, {} clusters) differs from what pool creation lays out for this region ({:?} of {}, {} of {}, {}, {})",
                got.0, got.1, got.2, got.3, got.4, got.5, exp.0, exp.1, exp.2, exp.3, exp.4, exp.5
            ));
        }
    }
    out
}

/// Checks the pool on `dev`, which nothing writes meanwhile, and reports every problem
/// found. Reads only.
pub fn verify(dev: &BlockingDevice) -> Report {
    check(dev, false)
}

fn check(dev: &BlockingDevice, live: bool) -> Report {
    let mut c = Checker {
        dev,
        live,
        report: Report {
            device: dev.device().name().to_string(),
            device_bytes: dev.device().geometry().size_bytes,
            ..Report::default()
        },
        per_part: HashMap::new(),
        read_bytes: std::cell::Cell::new(0),
    };
    if let Err(Unreadable(why)) = c.run() {
        c.report.incomplete = Some(why);
    }
    c.report.checked_bytes = c.read_bytes.get();
    c.report
}

/// Checks the pool on `dev` while its daemon may be serving it (through another, read-only
/// handle): the rules of the module's "Checking a running pool". Reads only.
pub fn verify_live(dev: &BlockingDevice) -> Report {
    let mut checked_bytes = 0;
    let mut moved = 0;
    for _ in 0..LIVE_ATTEMPTS {
        let mut r = check(dev, true);
        checked_bytes += r.checked_bytes;
        r.checked_bytes = checked_bytes;
        if r.problems.is_empty() && r.incomplete.is_none() {
            return r;
        }
        let Some(_) = r.summary.superblock_copy else {
            // No usable superblock: nothing this daemon writes explains that.
            return r;
        };
        match pool::read_superblock(dev) {
            Ok((sb, _)) if sb.generation == r.summary.generation => return r,
            Ok(_) => moved += 1,
            Err(pool::PoolError::Io(e)) => {
                r.incomplete = Some(format!("re-reading the superblock: {e}"));
                return r;
            }
            Err(_) => return r,
        }
    }
    Report {
        device: dev.device().name().to_string(),
        device_bytes: dev.device().geometry().size_bytes,
        incomplete: Some(format!(
            "the pool wrote its superblock (a checkpoint) during each of {moved} checks, so what \
             they read may mix two states; run the check again when the pool is less busy"
        )),
        checked_bytes,
        ..Report::default()
    }
}

/// Why an offline check could not start.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Neither a file nor a block device.
    #[error("{path} is not a file or a block device")]
    NotBlockOrFile {
        /// The path.
        path: String,
    },
    /// Another process holds the block device exclusively.
    #[error("{path} is in use (mounted, or held by a running coreblkd): stop the daemon or release the device first; verify checks a pool offline")]
    InUse {
        /// The path.
        path: String,
    },
    /// Opening or starting failed.
    #[error("{what} {path}: {why}")]
    Open {
        /// What failed.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
}

/// Opens `path` (a file or block device) read-only and checks the pool on it, through one
/// unpinned reactor of its own. A block device is opened exclusively (`O_EXCL`), so a
/// device a running daemon holds is refused; a file has no such guard (the daemon's claim
/// is an OFD lock): do not verify a file a daemon serves (a daemon verifies its own pools
/// with [`verify_file`]).
pub fn verify_offline(path: &Path) -> Result<Report, VerifyError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let shown = path.display().to_string();
    let open_err = |what, why: String| VerifyError::Open {
        what,
        path: shown.clone(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| open_err("cannot stat", e.to_string()))?;
    let block = meta.file_type().is_block_device();
    if !block && !meta.file_type().is_file() {
        return Err(VerifyError::NotBlockOrFile { path: shown });
    }
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if block {
        flags |= libc::O_EXCL;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                VerifyError::InUse {
                    path: shown.clone(),
                }
            } else {
                open_err("cannot open", e.to_string())
            }
        })?;
    verify_file(path, file, false)
}

/// Checks the pool on `file` (opened read-only with `O_DIRECT`; `path` names it in the
/// report) through one unpinned reactor of its own, [`verify_live`] when `live`. Blocking:
/// run it on a thread that may block.
///
/// # Errors
/// The file is not a usable device, or the reactor cannot start.
pub fn verify_file(path: &Path, file: std::fs::File, live: bool) -> Result<Report, VerifyError> {
    let shown = path.display().to_string();
    let open_err = |what, why: String| VerifyError::Open {
        what,
        path: shown.clone(),
        why,
    };
    let dev: Arc<dyn crate::bdev::BlockDevice> = Arc::new(
        crate::bdev::uring::UringDevice::from_file(path, file)
            .map_err(|e| open_err("cannot use", e.to_string()))?,
    );
    let cfg = crate::reactor::ReactorConfig {
        pin: false,
        buf_count: 8,
        ..crate::reactor::ReactorConfig::default()
    };
    let mut set = crate::reactor::ReactorSet::start(&[0], &cfg)
        .map_err(|e| open_err("cannot start a reactor for", e.to_string()))?;
    let remote = set.remotes()[0].clone();
    let report = BlockingDevice::new(dev, remote)
        .map(|bd| if live { verify_live(&bd) } else { verify(&bd) })
        .map_err(|e| open_err("cannot open a channel to", e.to_string()));
    set.shutdown();
    report
}

#[cfg(test)]
mod tests;
