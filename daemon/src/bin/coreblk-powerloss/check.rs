//! The host side: replays a dm-log-writes log onto an in-memory image of the device and,
//! at every FLUSH, every FUA write and every mark, imports the image as the pool would be
//! found after a power loss at that instant and checks the contract against the model.
//!
//! What a point guarantees follows from the marks: the workload puts mark `s<i>` into the
//! log once step `i` was acknowledged, and dm-log-writes logs a write only once it is
//! durable (FUA writes when they complete, other writes just before the FLUSH that made
//! them durable), so at a point after mark `s<m>` steps up to `m` are acknowledged, steps
//! up to `m + 1` may have happened, and every step up to the newest flush step `<= m` is
//! guaranteed (DESIGN §4: a write that completed before a FLUSH that completed, or a FUA
//! write that completed). The checks are those of the in-process crash test: the pool
//! imports, its maps are sane, objects whose creation is guaranteed exist, none exists that
//! cannot, and every block reads its guaranteed value or a later one — never zeroes where
//! data was guaranteed, never another object's data, never garbage.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use coreblk_daemon::lvs::pool::{self, MetaSource, PoolError};

use coreblk_daemon::testing::Rng;

use crate::lwlog::{self, FLAG_FLUSH, FLAG_FUA, FLAG_MARK};
use crate::model::{stamp, Model, BLK, BLK_USIZE};

/// One 4 KiB block of the replayed device: what it may hold (`None` = zeroes; the first
/// is the log's order, the others possible because the log cannot order them, see
/// [`apply`]), and the log index of the FUA write that last wrote it.
#[derive(Clone, Debug)]
struct Blk {
    cands: Vec<Option<Box<[u8]>>>,
    fua_at: Option<usize>,
}

/// A sparse device image by 4 KiB block index; absent blocks read zeroes.
type Image = HashMap<u64, Blk>;

struct ImageSource<'a> {
    image: &'a Image,
    bytes: u64,
}

impl MetaSource for ImageSource<'_> {
    fn device_bytes(&self) -> u64 {
        self.bytes
    }
    fn source_name(&self) -> String {
        "replayed dm-log-writes image".into()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, PoolError> {
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let in_blk = usize::try_from(at % BLK).unwrap_or(0);
            let n = (BLK_USIZE - in_blk).min(len - done);
            if let Some(Some(b)) = self.image.get(&(at / BLK)).map(|b| &b.cands[0]) {
                out[done..done + n].copy_from_slice(&b[in_blk..in_blk + n]);
            }
            done += n;
        }
        Ok(out)
    }
}

/// How a log entry is applied.
#[derive(Clone, Copy, Debug)]
struct How {
    /// Its index in the log.
    at: usize,
    /// A FUA write.
    fua: bool,
    /// Index of the FLUSH entry two before it (or 0).
    older_flush: usize,
}

/// Writes `data` (or zeroes) at byte `offset` of the image.
///
/// dm-log-writes logs a FUA write when it completes but an ordinary write only at the next
/// FLUSH, so an ordinary write that completed *before* an overlapping FUA write can appear
/// after it in the log, and replaying in log order would resurrect the older data. The log
/// cannot tell which completed first when the FUA write is recent (logged after the FLUSH
/// before the previous one), so there both contents stay possible.
fn apply(image: &mut Image, offset: u64, len: u64, data: Option<&[u8]>, how: How) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        let at = offset + done;
        let (blk, in_blk) = (at / BLK, usize::try_from(at % BLK)?);
        let n = (BLK_USIZE - in_blk).min(usize::try_from(len - done)?);
        let src = data.map(|d| &d[usize::try_from(done).unwrap_or(0)..][..n]);
        let old = image.remove(&blk).unwrap_or(Blk {
            cands: vec![None],
            fua_at: None,
        });
        let write = |c: &Option<Box<[u8]>>| -> Option<Box<[u8]>> {
            let mut b = c
                .clone()
                .unwrap_or_else(|| vec![0u8; BLK_USIZE].into_boxed_slice());
            match src {
                Some(s) => b[in_blk..in_blk + n].copy_from_slice(s),
                None => b[in_blk..in_blk + n].fill(0),
            }
            b.iter().any(|&x| x != 0).then_some(b)
        };
        let new = write(&old.cands[0]);
        let ambiguous = !how.fua && old.fua_at.is_some_and(|u| u > how.older_flush);
        let b = if how.fua {
            Blk {
                cands: vec![new],
                fua_at: Some(how.at),
            }
        } else if ambiguous {
            let mut cands = vec![new];
            cands.extend(old.cands.iter().cloned());
            cands.dedup();
            Blk {
                cands,
                fua_at: old.fua_at,
            }
        } else {
            Blk {
                cands: vec![new],
                fua_at: None,
            }
        };
        if b.cands.len() > 1 || b.cands[0].is_some() || b.fua_at.is_some() {
            image.insert(blk, b);
        }
        done += n as u64;
    }
    Ok(())
}

/// What a replay point may see: steps up to `floor` guaranteed, up to `acked`
/// acknowledged, up to `last` possibly begun.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Bounds {
    floor: usize,
    acked: usize,
    last: usize,
}

/// Checks one replayed image; the error says what broke.
fn check_point(m: &Model, image: &Image, b: Bounds, what: &str) -> Result<()> {
    let src = ImageSource {
        image,
        bytes: m.device_bytes,
    };
    let imp = pool::import(&src).map_err(|e| anyhow!("{what}: import failed: {e}"))?;
    let sb = &imp.sb;
    coreblk_daemon::testing::crash_model::check_maps(&imp).map_err(|e| anyhow!("{what}: {e}"))?;
    let Bounds { floor, acked, last } = b;
    let t = &imp.table;
    let known: HashSet<u32> = m.objs.iter().map(|o| o.id).collect();
    for id in t.volumes.keys().chain(t.snapshots.keys()) {
        ensure!(known.contains(id), "{what}: unknown id {id} after recovery");
    }
    for o in &m.objs {
        let required = o.created <= floor && o.deleted.is_none_or(|d| d > last);
        let possible = o.created <= last && o.deleted.is_none_or(|d| d > floor);
        let present = t.get(o.id);
        ensure!(
            !required || present.is_some(),
            "{what}: {} (id {}, created at step {}, guaranteed) is missing",
            o.name,
            o.id,
            o.created
        );
        let Some(meta) = present else { continue };
        ensure!(
            possible,
            "{what}: {} (id {}) exists but its creation (step {}) / deletion ({:?}) says it cannot",
            o.name,
            o.id,
            o.created,
            o.deleted
        );
        ensure!(
            t.is_snapshot(o.id) == o.snapshot,
            "{what}: {} (id {}) has the wrong kind",
            o.name,
            o.id
        );
        let blocks = usize::try_from(meta.size_bytes / BLK)?;
        let map = imp
            .maps
            .get(&o.id)
            .ok_or_else(|| anyhow!("{what}: {} has no map", o.name))?;
        for blk in 0..blocks.min(o.hist.len()) {
            let off = blk as u64 * BLK;
            let mapping = map.get(off / m.cluster_bytes);
            let cands: Vec<Vec<u8>> = match mapping {
                None => vec![vec![0u8; BLK_USIZE]],
                Some(x) => {
                    let at = sb.region_start
                        + sb.data_offset
                        + u64::from(x.pc) * m.cluster_bytes
                        + off % m.cluster_bytes;
                    image.get(&(at / BLK)).map_or_else(
                        || vec![vec![0u8; BLK_USIZE]],
                        |b| {
                            b.cands
                                .iter()
                                .map(|c| {
                                    c.as_ref()
                                        .map_or_else(|| vec![0u8; BLK_USIZE], |c| c.to_vec())
                                })
                                .collect()
                        },
                    )
                }
            };
            let allowed = o.allowed(blk, floor, acked, last);
            let ok = |got: &Vec<u8>| -> Result<u64, String> {
                let v = u64::from_le_bytes(got[..8].try_into().map_err(|_| "short block")?);
                if *got != stamp(v) {
                    return Err("is torn or garbage".into());
                }
                if !allowed.contains(&v) {
                    return Err(format!("reads {v:#x}"));
                }
                Ok(v)
            };
            if !cands.iter().any(|c| ok(c).is_ok()) {
                let why = ok(&cands[0]).err().unwrap_or_default();
                bail!(
                    "{what}: {} (id {}) block {blk} {why}, allowed {allowed:x?} (floor step {floor}, acked {acked}, last {last}, history {:x?}, {}{})",
                    o.name,
                    o.id,
                    o.hist[blk],
                    mapping.map_or_else(|| "unmapped".to_string(), |x| format!("physical cluster {}", x.pc)),
                    if cands.len() > 1 { ", unordered alternatives also wrong" } else { "" }
                );
            }
        }
    }
    Ok(())
}

/// The log must not contradict the workload: data the workload wrote in step `S` (its
/// stamp carries `S` in the high half) exists only once step `S` began, i.e. after mark
/// `s<S-1>`. A block that breaks this is not something the store can cause; the log itself
/// is wrong (an extraction or parse error, or a log of another run), so the check refuses
/// it instead of blaming the store. `last` is the newest step that may have begun at this
/// point of the log; `at` the entry's device offset.
fn check_causality(k: usize, at: u64, data: &[u8], last: usize, nsteps: usize) -> Result<()> {
    let skip = usize::try_from((BLK - at % BLK) % BLK)?;
    for (j, blk) in data
        .get(skip..)
        .unwrap_or(&[])
        .chunks_exact(BLK_USIZE)
        .enumerate()
    {
        let v = u64::from_le_bytes(blk[..8].try_into()?);
        let step = usize::try_from(v >> 32)?;
        if step == 0 || step > nsteps || step <= last || *blk != stamp(v)[..] {
            continue;
        }
        bail!(
            "the log contradicts the workload: entry {k} carries step {step}'s data ({v:#x}) at device offset {}, where at most step {last} can have begun — the log is not this run's or was misread (not a store failure)",
            at + (skip + j * BLK_USIZE) as u64
        );
    }
    Ok(())
}

/// The mark `settle` puts once the workload is done (no step: it only drains the queue).
pub const SETTLED: &str = "settled";

/// The step a mark named `s<i>` stands for.
fn mark_step(name: &str) -> Option<usize> {
    name.strip_prefix('s')?.parse().ok()
}

/// Random per-block subsets of each FLUSH's writes checked before it completed.
const SUBSETS_PER_FLUSH: usize = 16;

/// A checked point's identity: data entries applied (or a subset's number), bounds.
type PointKey = (usize, usize, Bounds);

struct Replay<'a> {
    m: &'a Model,
    rng: Rng,
    points: usize,
    distinct: HashSet<PointKey>,
    last_key: Option<PointKey>,
}

impl Replay<'_> {
    /// Checks `image` at `key` unless it is the point just checked.
    fn point(&mut self, image: &Image, key: PointKey, what: &dyn Fn() -> String) -> Result<()> {
        self.points += 1;
        if self.last_key == Some(key) {
            return Ok(());
        }
        check_point(self.m, image, key.2, &what())?;
        self.distinct.insert(key);
        self.last_key = Some(key);
        Ok(())
    }
}

/// The newest step that may have begun at a point of the log after mark `s<mark>`.
fn begun(mark: Option<usize>, ended: bool, nsteps: usize) -> usize {
    match mark {
        _ if ended => nsteps,
        None => 0,
        Some(ms) => (ms + 1).min(nsteps),
    }
}

/// The bounds after mark `s<ms>` (or after the target's end mark).
fn bounds(m: &Model, ms: usize, ended: bool) -> Bounds {
    let nsteps = m.steps.len() - 1;
    let acked = if ended { nsteps } else { ms };
    Bounds {
        floor: m.floor(acked),
        acked,
        last: begun(Some(ms), ended, nsteps),
    }
}

/// Replays `log_path` and checks, against the model in `model_path`, every FLUSH, FUA and
/// mark point, and random subsets of the writes each FLUSH made durable as they may have
/// been found had the power failed before it completed. Returns the number of points.
pub fn run(log_path: &Path, model_path: &Path) -> Result<usize> {
    let m: Model = serde_json::from_reader(std::io::BufReader::new(
        File::open(model_path).with_context(|| format!("opening {}", model_path.display()))?,
    ))
    .with_context(|| format!("parsing {}", model_path.display()))?;
    ensure!(
        m.cluster_bytes > 0 && m.device_bytes > 0 && !m.steps.is_empty(),
        "{}: bad model",
        model_path.display()
    );
    let f = File::open(log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let log = lwlog::parse(&f, &log_path.display().to_string())?;
    let nsteps = m.steps.len() - 1;
    let mut r = Replay {
        m: &m,
        rng: Rng::new(m.seed ^ 0x5eed),
        points: 0,
        distinct: HashSet::new(),
        last_key: None,
    };
    let mut image = Image::new();
    let mut mark: Option<usize> = None;
    let mut ended = false;
    let mut flushes_since_mark = 0usize;
    let mut run_seen: Option<u64> = None;
    let (mut data_entries, mut flush_entries, mut fua_entries) = (0usize, 0usize, 0usize);
    let mut subsets = 0usize;
    // Log indices of the last two FLUSH entries.
    let mut flush_at = [0usize; 2];
    // Ordinary writes and discards since the last other entry: a FLUSH's group (logged
    // just before it), or at the end the writes never flushed.
    let mut group: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
    for (k, e) in log.entries.iter().enumerate() {
        let is_group = e.flags & (FLAG_FUA | FLAG_FLUSH | FLAG_MARK) == 0
            && (e.has_data() || e.flags & lwlog::FLAG_DISCARD != 0);
        if is_group {
            ensure!(
                e.offset + e.len <= m.device_bytes,
                "entry {k} writes past the device"
            );
            let data = if e.has_data() {
                let mut d = vec![0u8; usize::try_from(e.len)?];
                f.read_exact_at(&mut d, e.data_at)
                    .with_context(|| format!("reading entry {k}'s data"))?;
                check_causality(k, e.offset, &d, begun(mark, ended, nsteps), nsteps)?;
                Some(d)
            } else {
                None
            };
            group.push((k, data));
            if k + 1 < log.entries.len() {
                continue;
            }
        }
        // Before a FLUSH completed, any per-block subset of its group may be on the media.
        if e.flags & FLAG_FLUSH != 0 && !group.is_empty() {
            if let Some(ms) = mark {
                let b = bounds(&m, ms, ended);
                for n in 0..SUBSETS_PER_FLUSH {
                    let mut img = image.clone();
                    for (gk, data) in &group {
                        let ge = &log.entries[*gk];
                        for blk in 0..ge.len.div_ceil(BLK) {
                            if r.rng.below(2) == 0 {
                                continue;
                            }
                            let off = blk * BLK;
                            let n = (ge.len - off).min(BLK);
                            let how = How {
                                at: *gk,
                                fua: false,
                                older_flush: flush_at[0],
                            };
                            let (from, to) = (usize::try_from(off)?, usize::try_from(off + n)?);
                            let d = data.as_ref().map(|d| &d[from..to]);
                            apply(&mut img, ge.offset + off, n, d, how)?;
                        }
                    }
                    let key = (k, usize::MAX - n, b);
                    r.point(&img, key, &|| {
                        format!(
                            "power loss before the FLUSH at log entry {k} completed, subset {n} of its {} writes (after mark s{ms}; seed {})",
                            group.len(),
                            m.seed
                        )
                    })?;
                    subsets += 1;
                }
            }
        }
        for (gk, data) in group.drain(..) {
            let ge = &log.entries[gk];
            let how = How {
                at: gk,
                fua: false,
                older_flush: flush_at[0],
            };
            apply(&mut image, ge.offset, ge.len, data.as_deref(), how)?;
            data_entries += 1;
        }
        if !is_group && e.has_data() {
            ensure!(
                e.offset + e.len <= m.device_bytes,
                "entry {k} writes past the device"
            );
            let mut d = vec![0u8; usize::try_from(e.len)?];
            f.read_exact_at(&mut d, e.data_at)
                .with_context(|| format!("reading entry {k}'s data"))?;
            check_causality(k, e.offset, &d, begun(mark, ended, nsteps), nsteps)?;
            let how = How {
                at: k,
                fua: e.flags & FLAG_FUA != 0,
                older_flush: flush_at[0],
            };
            apply(&mut image, e.offset, e.len, Some(&d), how)?;
            data_entries += 1;
        }
        if e.flags & FLAG_FLUSH != 0 {
            flush_entries += 1;
            flushes_since_mark += 1;
            flush_at = [flush_at[1], k];
        }
        if e.flags & FLAG_FUA != 0 {
            fua_entries += 1;
        }
        if let Some(name) = &e.mark {
            if name == "dm-log-writes-end" {
                ended = true;
            } else if name == SETTLED {
                ensure!(
                    mark == Some(nsteps),
                    "entry {k}: mark {name} before the workload's last step"
                );
            } else if let Some(id) = name.strip_prefix("run-") {
                let id = u64::from_str_radix(id, 16)
                    .map_err(|_| anyhow!("entry {k}: bad run mark {name:?}"))?;
                ensure!(
                    mark.is_none() && run_seen.is_none(),
                    "entry {k}: run mark {name} after the workload began"
                );
                ensure!(
                    m.run_id == 0 || id == m.run_id,
                    "entry {k}: the log is of run {id:016x}, the model of run {:016x}: they do not belong together",
                    m.run_id
                );
                run_seen = Some(id);
            } else {
                let s =
                    mark_step(name).ok_or_else(|| anyhow!("entry {k}: unknown mark {name:?}"))?;
                ensure!(
                    s == mark.map_or(0, |p| p + 1),
                    "entry {k}: mark {name} after mark s{mark:?}"
                );
                ensure!(
                    s <= nsteps,
                    "entry {k}: mark {name} past the model's {nsteps} steps"
                );
                // A flush step's FLUSH must be in the log before its mark: otherwise the
                // device (or the stack) dropped it and the floors below do not hold.
                ensure!(
                    !m.steps[s].flush || s == 0 || flushes_since_mark > 0,
                    "flush step {s} left no FLUSH in the log (a write-through device?)"
                );
                mark = Some(s);
            }
            flushes_since_mark = 0;
        }
        let Some(ms) = mark else {
            continue; // pool creation: not part of the contract
        };
        let b = bounds(&m, ms, ended);
        r.point(&image, (data_entries, 0, b), &|| {
            format!(
                "power loss at log entry {k} of {} (after mark s{ms}; seed {})",
                log.entries.len(),
                m.seed
            )
        })?;
    }
    ensure!(
        mark == Some(nsteps),
        "the log ends at mark {mark:?}, the workload ran {nsteps} steps"
    );
    ensure!(
        m.run_id == 0 || run_seen.is_some(),
        "the log has no run mark, the model is of run {:016x}",
        m.run_id
    );
    println!(
        "powerloss replay (seed {}): {} points checked ({} distinct, {subsets} of them subsets of a FLUSH's writes) over {} log entries ({data_entries} writes/discards, {flush_entries} FLUSH, {fua_entries} FUA), {nsteps} steps, {} objects, log {} MiB in {}-byte sectors",
        m.seed,
        r.points,
        r.distinct.len(),
        log.entries.len(),
        m.objs.len(),
        log.end >> 20,
        log.sector_bytes
    );
    Ok(r.points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causality_refuses_data_of_a_step_that_cannot_have_begun() {
        let mut data = stamp(0x13_0000_0001);
        data.extend(stamp(0x24_0000_0018));
        // Step 19's data after mark s18 is fine; step 36's is not.
        let err = check_causality(7, 8192, &data, 19, 40)
            .expect_err("step 36 must be refused")
            .to_string();
        assert!(err.contains("entry 7 carries step 36"), "{err}");
        assert!(err.contains("offset 12288"), "{err}");
        check_causality(7, 8192, &data, 36, 40).expect("must pass");
    }

    #[test]
    fn causality_ignores_what_is_not_a_workload_stamp() {
        // Zeroes, metadata (a step beyond the run) and a block that is not a whole stamp.
        let mut data = vec![0u8; BLK_USIZE];
        data.extend(stamp(0x99_0000_0001));
        let mut torn = stamp(0x24_0000_0001);
        torn[100] ^= 1;
        data.extend(torn);
        check_causality(0, 0, &data, 1, 40).expect("must pass");
    }

    #[test]
    fn causality_reads_blocks_at_device_block_boundaries() {
        // An entry starting 512 bytes before a block boundary: its first 512 bytes belong
        // to the previous block; the stamp after them is checked.
        let mut data = vec![0u8; 512];
        data.extend(stamp(0x24_0000_0001));
        assert!(check_causality(0, BLK - 512, &data, 10, 40).is_err());
        check_causality(0, BLK - 512, &data, 36, 40).expect("must pass");
    }
}
