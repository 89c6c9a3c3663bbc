//! Crash tests of the whole store (issue 10): a mixed workload — concurrent writes (some
//! FUA) across volumes, discards, write-zeroes, flushes, snapshots, group snapshots,
//! clones, rollbacks, deletes of objects with dependents, resizes and checkpoints — runs on
//! the recording device. Then, at **every tick** of the device clock (so at every journal,
//! checkpoint, superblock and data write boundary), an image of the device is built for
//! both failure models and imported:
//!
//! - *daemon crash*: every completed write is there, plus any per-4 KiB-block subset of
//!   the writes in flight;
//! - *power loss*: every write that completed before the submission of a FLUSH that
//!   completed, every completed FUA write, then any per-block subset of the rest.
//!
//! After each, the recovered pool must import, its maps must be sane, and the contract
//! must hold against the model: an object exists when its creation is guaranteed and its
//! deletion is not possible yet; every block of every object reads a value it may read —
//! the newest value guaranteed (acknowledged for a daemon crash; flushed or FUA for power
//! loss) or a later write — never zeroes where guaranteed data was, never another
//! object's data, never garbage (blocks carry unique 8-byte stamps).

use std::collections::HashSet;

use super::*;
use crate::bdev::record::{Record as LogRecord, RecordOp, RecordingDevice, WriteLog};
use crate::lvs::pool::MetaSource;

use crate::testing::crash_model::{check_maps, stamp, MObj, BLK, BLK_USIZE};
const VOL_BYTES: u64 = 2 << 20;

/// A sparse device image: 4 KiB blocks by offset; absent blocks read zeroes.
type Image = HashMap<u64, Rc<[u8]>>;

struct ImageSource<'a> {
    image: &'a Image,
    bytes: u64,
}

impl MetaSource for ImageSource<'_> {
    fn device_bytes(&self) -> u64 {
        self.bytes
    }
    fn source_name(&self) -> String {
        "crash image".into()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, pool::PoolError> {
        let mut out = vec![0u8; len];
        for (k, chunk) in out.chunks_mut(BLK_USIZE).enumerate() {
            if let Some(b) = self.image.get(&(offset + k as u64 * BLK)) {
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
        }
        Ok(out)
    }
}

/// A step of the workload, with its device-clock ticks.
#[derive(Clone, Debug)]
struct StepTicks {
    submit: u64,
    ack: u64,
    flush: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    DaemonCrash,
    PowerLoss,
}

/// Submits `ios` concurrently on the pool's reactor; returns when all completed, each
/// result with the device-clock tick of its acknowledgement.
fn batch(h: &Harness, log: &WriteLog, ios: Vec<(u32, IoReq)>) -> Vec<Result<(), Errno>> {
    let n = ios.len();
    let (tx, rx_done) = crossbeam::channel::unbounded();
    let log = log.clone();
    h.set.remotes()[0]
        .call(move |rx: &Reactor| {
            for (i, (vol, io)) in ios.into_iter().enumerate() {
                let ch = owner_channel(rx, vol);
                let io = io.into_io();
                let (tx2, _log2) = (tx.clone(), log.clone());
                ch.submit(
                    rx,
                    io,
                    FnCompletion::boxed(move |_rx, res, _| {
                        tx2.send((i, res.map(drop))).expect("send");
                    }),
                    0,
                );
            }
        })
        .expect("call");
    let mut out = vec![Ok(()); n];
    for _ in 0..n {
        let (i, r) = rx_done
            .recv_timeout(Duration::from_secs(20))
            .expect("io completed");
        out[i] = r;
    }
    out
}

struct Workload {
    objs: Vec<MObj>,
    steps: Vec<StepTicks>,
    cluster: u64,
}

fn vol_meta(name: &str) -> VolumeMeta {
    VolumeMeta {
        name: name.into(),
        uuid: [4; 16],
        size_bytes: VOL_BYTES,
        ..VolumeMeta::default()
    }
}

/// Runs the workload; step 0 is the state when logging began.
fn run_workload(h: &Harness, log: &WriteLog, rng: &mut Rng, steps: usize) -> Workload {
    let cluster = 65536;
    let blocks = usize::try_from(VOL_BYTES / BLK).expect("small");
    let mut objs: Vec<MObj> = Vec::new();
    let mut ticks: Vec<StepTicks> = vec![StepTicks {
        submit: 0,
        ack: 0,
        flush: true,
    }];
    let mut value = 1u64;
    let mut names = 0;
    for i in 1..=steps {
        let submit = log.now();
        let live = |objs: &[MObj], snap: bool| -> Vec<usize> {
            (0..objs.len())
                .filter(|&k| objs[k].deleted.is_none() && objs[k].snapshot == snap)
                .collect()
        };
        let vols = live(&objs, false);
        let snaps = live(&objs, true);
        let mut flush = false;
        let what = if vols.is_empty() { 0 } else { rng.below(20) };
        names += 1;
        match what {
            0 => {
                let id = h.create(&format!("v{names}"), VOL_BYTES);
                objs.push(MObj::new(id, format!("v{names}"), i, blocks));
            }
            1..=9 => {
                // Concurrent writes, some overlapping, some FUA, some spanning clusters.
                let mut ios = Vec::new();
                let mut touched = Vec::new();
                for _ in 0..(2 + rng.below(7)) {
                    let k = vols[usize::try_from(rng.below(vols.len() as u64)).expect("small")];
                    let o = &objs[k];
                    let size = o.hist.len() as u64;
                    let n = [1, 1, 2, 16, 20][usize::try_from(rng.below(5)).expect("small")];
                    let b = rng.below(size - n + 1);
                    let fua = rng.below(6) == 0;
                    let mut data = Vec::new();
                    for j in 0..n {
                        data.extend(stamp(value));
                        touched.push((k, usize::try_from(b + j).expect("small"), value, fua));
                        value += 1;
                    }
                    ios.push((o.id, IoReq::Write(b * BLK, data, fua)));
                }
                for r in batch(h, log, ios) {
                    r.expect("write");
                }
                for (k, b, v, fua) in touched {
                    objs[k].hist[b].push((i, v));
                    if fua {
                        objs[k].fua[b].push(i);
                    }
                }
            }
            10 | 11 => {
                // Discards and write-zeroes, aligned or not.
                let mut ios = Vec::new();
                let mut effects = Vec::new();
                for _ in 0..(1 + rng.below(3)) {
                    let k = vols[usize::try_from(rng.below(vols.len() as u64)).expect("small")];
                    let o = &objs[k];
                    let size = o.hist.len() as u64;
                    let b = rng.below(size);
                    let n = (1 + rng.below(40)).min(size - b);
                    let zero = rng.below(2) == 0;
                    let (off, len) = (b * BLK, n * BLK);
                    ios.push((
                        o.id,
                        if zero {
                            IoReq::Zero(off, len)
                        } else {
                            IoReq::Discard(off, len)
                        },
                    ));
                    let (first, end) = (off.div_ceil(cluster), (off + len) / cluster);
                    for blk in b..b + n {
                        let c = blk * BLK / cluster;
                        if zero || (c >= first && c < end) {
                            effects.push((k, usize::try_from(blk).expect("small")));
                        }
                    }
                }
                for r in batch(h, log, ios) {
                    r.expect("discard/zero");
                }
                for (k, b) in effects {
                    objs[k].hist[b].push((i, 0));
                }
            }
            12 | 13 => {
                let k = vols[0];
                batch(h, log, vec![(objs[k].id, IoReq::Flush)])[0].expect("flush");
                flush = true;
            }
            14 => {
                // Snapshot of one or two volumes at one instant.
                let mut srcs =
                    vec![vols[usize::try_from(rng.below(vols.len() as u64)).expect("small")]];
                if vols.len() > 1 && rng.below(2) == 0 {
                    let other = vols.iter().copied().find(|&k| k != srcs[0]).expect("two");
                    srcs.push(other);
                }
                let group: Vec<(u32, VolumeMeta)> = srcs
                    .iter()
                    .enumerate()
                    .map(|(j, &k)| (objs[k].id, vol_meta(&format!("s{names}-{j}"))))
                    .collect();
                let ids = h
                    .control(move |rx, rt, reply| rt.snapshot(rx, group, reply))
                    .expect("snapshot");
                for (&k, id) in srcs.iter().zip(ids) {
                    let s = objs[k].derive(id, format!("s{names}"), i, true);
                    objs.push(s);
                }
            }
            15 if !snaps.is_empty() => {
                let k = snaps[usize::try_from(rng.below(snaps.len() as u64)).expect("small")];
                let src = objs[k].id;
                let m = VolumeMeta {
                    size_bytes: 0,
                    ..vol_meta(&format!("c{names}"))
                };
                let id = h
                    .control(move |rx, rt, reply| rt.clone_volume(rx, src, m, reply))
                    .expect("clone");
                let c = objs[k].derive(id, format!("c{names}"), i, false);
                objs.push(c);
            }
            16 => {
                // Rollback to a snapshot of the volume, if it has one.
                let pairs: Vec<(usize, usize)> = snaps
                    .iter()
                    .filter_map(|&s| {
                        let src = h
                            .control(|_rx, rt, reply| reply(_rx, Ok(rt.volumes())))
                            .expect("table")
                            .lineage
                            .get(&objs[s].id)
                            .map(|l| l.source)?;
                        let v = vols.iter().copied().find(|&v| objs[v].id == src)?;
                        Some((v, s))
                    })
                    .collect();
                if let Some(&(v, s)) = pairs.first() {
                    let (vid, sid) = (objs[v].id, objs[s].id);
                    h.control(move |rx, rt, reply| rt.rollback(rx, vid, sid, reply))
                        .expect("rollback");
                    let snap_hist = objs[s].hist.clone();
                    let o = &mut objs[v];
                    for (b, h) in o.hist.iter_mut().enumerate() {
                        match snap_hist.get(b) {
                            Some(sh) => {
                                let top = sh.iter().map(|(s, _)| *s).max().unwrap_or(0);
                                for (s, val) in sh {
                                    if *s == top {
                                        h.push((i, *val));
                                    }
                                }
                            }
                            None => h.push((i, 0)),
                        }
                    }
                }
            }
            17 => {
                // Delete anything but the last volume (objects with dependents included).
                let all: Vec<usize> = (0..objs.len())
                    .filter(|&k| objs[k].deleted.is_none())
                    .filter(|&k| objs[k].snapshot || vols.len() > 1)
                    .collect();
                if let Some(&k) =
                    all.get(usize::try_from(rng.below(all.len().max(1) as u64)).expect("small"))
                {
                    h.delete(objs[k].id);
                    objs[k].deleted = Some(i);
                }
            }
            18 => {
                h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
                    .expect("checkpoint");
            }
            _ => {
                let k = vols[usize::try_from(rng.below(vols.len() as u64)).expect("small")];
                let o = &mut objs[k];
                let new_blocks = o.hist.len() + 16;
                let (id, size) = (o.id, new_blocks as u64 * BLK);
                h.control(move |rx, rt, reply| rt.resize(rx, id, size, reply))
                    .expect("resize");
                o.hist.resize(new_blocks, vec![(i, 0)]);
                o.fua.resize(new_blocks, Vec::new());
            }
        }
        ticks.push(StepTicks {
            submit,
            ack: log.now(),
            flush,
        });
    }
    Workload {
        objs,
        steps: ticks,
        cluster,
    }
}

/// Builds the image of crash point `c` under `model`.
fn crash_image(
    base: &Image,
    log: &[LogRecord],
    c: u64,
    model: Model,
    rng: &mut Rng,
) -> (Image, Vec<u8>) {
    let mut image = base.clone();
    let covered_before = match model {
        Model::DaemonCrash => c,
        Model::PowerLoss => log
            .iter()
            .filter(|r| matches!(r.op, RecordOp::Flush) && r.complete_seq.is_some_and(|t| t < c))
            .map(|r| r.submit_seq)
            .max()
            .unwrap_or(0),
    };
    let mut order: Vec<&LogRecord> = log.iter().filter(|r| r.submit_seq < c).collect();
    // Completed requests land in completion order; those in flight after them.
    order.sort_by_key(|r| match r.complete_seq {
        Some(t) if t < c => (0, t),
        _ => (1, r.submit_seq),
    });
    let mut choices = Vec::new();
    for r in order {
        if matches!(r.result, Some(Err(_))) {
            continue;
        }
        let done = r.complete_seq.is_some_and(|t| t < c);
        let must = match (&r.op, model) {
            (_, Model::DaemonCrash) => done,
            (RecordOp::Write { fua: true, .. }, Model::PowerLoss) => done,
            (_, Model::PowerLoss) => r.complete_seq.is_some_and(|t| t < covered_before),
        };
        let (offset, len, data) = match &r.op {
            RecordOp::Write { offset, data, .. } => (*offset, data.len() as u64, Some(data)),
            RecordOp::WriteZeroes { offset, len } | RecordOp::Discard { offset, len } => {
                (*offset, *len, None)
            }
            RecordOp::Flush => continue,
        };
        for k in 0..len / BLK {
            let apply = must || rng.below(2) == 0;
            choices.push(u8::from(apply));
            if !apply {
                continue;
            }
            let at = offset + k * BLK;
            match data {
                Some(d) => {
                    let blk = &d[usize::try_from(k * BLK).expect("small")
                        ..usize::try_from((k + 1) * BLK).expect("small")];
                    if blk.iter().all(|&x| x == 0) {
                        image.remove(&at);
                    } else {
                        image.insert(at, Rc::from(blk));
                    }
                }
                None => {
                    image.remove(&at);
                }
            }
        }
    }
    (image, choices)
}

/// Checks crash point `c` of `model`; panics with the reason on a violation.
/// Checks one crash point; returns how many clusters the recovered pool holds as clean
/// (recorded durably zero), each checked to read zeroes and to be unmapped.
fn check_point(
    w: &Workload,
    image: &Image,
    dev_bytes: u64,
    c: u64,
    model: Model,
    what: &str,
) -> u64 {
    let src = ImageSource {
        image,
        bytes: dev_bytes,
    };
    let imp = pool::import(&src).unwrap_or_else(|e| panic!("{what}: import failed: {e}"));
    let sb = &imp.sb;
    check_maps(&imp).unwrap_or_else(|e| panic!("{what}: {e}"));
    // What is guaranteed and what may have happened.
    let acked = w.steps.iter().rposition(|s| s.ack <= c).expect("step 0");
    let last = if w.steps.get(acked + 1).is_some_and(|s| s.submit < c) {
        acked + 1
    } else {
        acked
    };
    let floor = match model {
        Model::DaemonCrash => acked,
        Model::PowerLoss => w.steps[..=acked]
            .iter()
            .rposition(|s| s.flush)
            .expect("step 0"),
    };
    let t = &imp.table;
    // A clean cluster is handed out as zero after recovery: it must be zero and unmapped.
    let mut mapped = HashSet::new();
    for m in imp.maps.values() {
        m.for_each(|_, x| {
            mapped.insert(x.pc);
        });
    }
    for (first, n) in t.zeroed.runs() {
        for pc in first..first + n {
            assert!(
                !mapped.contains(&pc),
                "{what}: cluster {pc} recorded zero but mapped"
            );
            let base = sb.region_start + sb.data_offset + u64::from(pc) * w.cluster;
            for k in 0..w.cluster / BLK {
                assert!(
                    image
                        .get(&(base + k * BLK))
                        .is_none_or(|b| b.iter().all(|&x| x == 0)),
                    "{what}: cluster {pc} recorded zero holds data at block {k}"
                );
            }
        }
    }
    let known: HashSet<u32> = w.objs.iter().map(|o| o.id).collect();
    for id in t.volumes.keys().chain(t.snapshots.keys()) {
        assert!(known.contains(id), "{what}: unknown id {id} after recovery");
    }
    for o in &w.objs {
        let required = o.created <= floor && o.deleted.is_none_or(|d| d > last);
        let possible = o.created <= last && o.deleted.is_none_or(|d| d > floor);
        let present = t.get(o.id);
        if required {
            assert!(
                present.is_some(),
                "{what}: id {} (created at step {}, guaranteed) is missing",
                o.id,
                o.created
            );
        }
        let Some(meta) = present else { continue };
        assert!(possible, "{what}: id {} exists but its creation (step {}) / deletion ({:?}) says it cannot (floor {floor}, last {last})", o.id, o.created, o.deleted);
        assert_eq!(t.is_snapshot(o.id), o.snapshot, "{what}: id {} kind", o.id);
        let blocks = usize::try_from(meta.size_bytes / BLK).expect("small");
        let map = &imp.maps[&o.id];
        for b in 0..blocks.min(o.hist.len()) {
            let off = b as u64 * BLK;
            let lc = off / w.cluster;
            let got = match map.get(lc) {
                None => vec![0u8; BLK_USIZE],
                Some(x) => {
                    let at = sb.region_start
                        + sb.data_offset
                        + u64::from(x.pc) * w.cluster
                        + off % w.cluster;
                    image
                        .get(&at)
                        .map_or_else(|| vec![0u8; BLK_USIZE], |b| b.to_vec())
                }
            };
            let v = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
            assert!(
                got == stamp(v),
                "{what}: id {} block {b} is torn or garbage",
                o.id
            );
            let allowed = o.allowed(b, floor, acked, last);
            assert!(
                allowed.contains(&v),
                "{what}: id {} block {b} reads {v}, allowed {allowed:?} (floor step {floor}, last {last}, history {:?})",
                o.id,
                o.hist[b]
            );
        }
    }
    t.zeroed.clusters()
}

#[test]
fn every_crash_point_of_a_mixed_workload_keeps_the_contract_in_both_models() {
    let seed = seed_or(0x5eed_c4a5);
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    const DEV: u64 = 56 << 20;
    let set = reactors(1, 8);
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
    let (rec, log) = RecordingDevice::new(malloc);
    let rec: Arc<dyn BlockDevice> = rec;
    let client = BlockingDevice::new(Arc::clone(&rec), set.remotes()[0].clone()).expect("client");
    pool::create(&client, DEFAULT_CLUSTER_BYTES, [8; 16]).expect("create");
    let h = Harness {
        set,
        dev: Arc::clone(&rec),
    };
    h.start();
    // The base image: the device when logging starts (a created, imported, quiet pool).
    let mut base = Image::new();
    let chunk = 1u64 << 20;
    for off in (0..DEV).step_by(usize::try_from(chunk).expect("small")) {
        let b = client
            .read(off, usize::try_from(chunk).expect("small"))
            .expect("read");
        for (k, blk) in b.chunks(BLK_USIZE).enumerate() {
            if blk.iter().any(|&x| x != 0) {
                base.insert(off + k as u64 * BLK, Rc::from(blk));
            }
        }
    }
    log.clear();
    let w = run_workload(&h, &log, &mut rng, 60);
    h.stop();
    let records = log.records();
    let max_tick = records
        .iter()
        .filter_map(|r| r.complete_seq)
        .max()
        .unwrap_or(0)
        + 1;
    let (mut points, mut distinct, mut clean_checked) = (0usize, HashSet::new(), 0u64);
    for model in [Model::DaemonCrash, Model::PowerLoss] {
        for c in 0..=max_tick {
            for sample in 0..2 {
                let (image, choices) = crash_image(&base, &records, c, model, &mut rng);
                let what = format!("{model:?} crash at tick {c} sample {sample} (seed {seed})");
                clean_checked += check_point(&w, &image, DEV, c, model, &what);
                points += 1;
                distinct.insert((model == Model::PowerLoss, c, choices));
            }
        }
    }
    let snaps = w.objs.iter().filter(|o| o.snapshot).count();
    println!(
        "store crash points (seed {seed}): {points} run, {} distinct, over {max_tick} ticks of {} device requests; {} steps, {} objects ({snaps} snapshots); {clean_checked} recorded-zero clusters checked",
        distinct.len(),
        records.len(),
        w.steps.len() - 1,
        w.objs.len()
    );
    assert!(points >= 1000, "{points} crash points");
    assert!(
        clean_checked > 0,
        "no crash point recovered clusters recorded zero"
    );
}
