//! Journal tests: group commit and flush behaviour, and crash tests on the recording device
//! in both failure models (DESIGN §4): at every submission and completion boundary of the
//! journal's writes and flushes, with random torn subsets of the writes in flight, replay
//! must yield a prefix of the appended records that contains every acknowledged commit
//! (daemon crash) or every commit acknowledged before a completed FLUSH was submitted
//! (power loss).

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::bdev::mem::MallocDevice;
use crate::bdev::record::{RecordOp, RecordingDevice};
use crate::bdev::BlockDevice;
use crate::testing::Rng;

const DEV_BYTES: u64 = 8 << 20;

fn superblock(journal_blocks: u64) -> Superblock {
    Superblock {
        pool_uuid: [1; 16],
        generation: 1,
        cluster_bytes: 65536,
        logical_block_bytes: 512,
        region_start: 0,
        region_bytes: DEV_BYTES,
        ckpt_offsets: [64 << 10, 128 << 10],
        ckpt_bytes: 64 << 10,
        journal_offset: 256 << 10,
        journal_bytes: journal_blocks * BLOCK_BYTES as u64,
        data_offset: 6 << 20,
        clusters: 2,
        active_ckpt: format::NO_CHECKPOINT,
        ckpt_crc: 0,
        ckpt_len: 0,
        first_seq: 1,
        journal_tag: 0x1234_5678_9abc_def0,
        flags: 0,
        version: format::FORMAT_VERSION,
        journal_reach: format::MIN_JOURNAL_REACH,
    }
}

fn seed() -> u64 {
    crate::testing::seed_or(0xC0FF_EE11)
}

/// What the workload did, as seen on the reactor.
#[derive(Debug, Default)]
struct Outcome {
    /// Commits in the order they were appended: (records, last block seq once acked).
    commits: Vec<(Vec<Record>, Option<u64>)>,
    /// Device-log clock when each commit's acknowledgement ran.
    ack_clock: Vec<Option<u64>>,
    flushes_ok: usize,
    /// Per FLUSH request: records acknowledged when it was called (index into the appended
    /// sequence) and, once it completed, the ordinal (1-based) of the device flush that did.
    flush_calls: Vec<(usize, Option<u64>)>,
    /// Records appended so far, and the end of the acknowledged prefix.
    appended: usize,
    acked_end: usize,
    stats: JournalStats,
}

/// Runs `n` commits of random map records at random small delays, with flushes mixed in.
fn run_workload(
    n: usize,
    seed: u64,
    journal_blocks: u64,
    spread_us: u64,
) -> (Outcome, Vec<crate::bdev::record::Record>, Superblock) {
    let set = crate::testing::reactors(1, 4);
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV_BYTES).expect("malloc"));
    let (rec, log) = RecordingDevice::new(malloc);
    let rec: Arc<dyn BlockDevice> = rec;
    let sb = superblock(journal_blocks);
    let (tx, rx_out) = crossbeam::channel::bounded(1);
    let sb2 = sb.clone();
    let clock = log.clone();
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            let ch = rec.open_channel(rx).expect("channel");
            let j = Journal::new(ch, sb2, 1);
            let out = Rc::new(RefCell::new(Outcome::default()));
            let remaining = Rc::new(Cell::new(n));
            let mut rng = Rng::new(seed);
            for i in 0..n {
                let nrec = 1 + rng.below(40);
                let records: Vec<Record> = (0..nrec)
                    .map(|k| Record::Map {
                        vol: u32::try_from(i).unwrap_or(0),
                        lc: k,
                        pc: u32::try_from(rng.below(1 << 20)).unwrap_or(0),
                        epoch: 0,
                    })
                    .collect();
                let delay = Duration::from_micros(rng.below(spread_us));
                let flush_too = rng.below(6) == 0;
                let (j, out, remaining, tx) = (
                    Rc::clone(&j),
                    Rc::clone(&out),
                    Rc::clone(&remaining),
                    tx.clone(),
                );
                let clock = clock.clone();
                rx.add_timer(
                    delay,
                    Box::new(move |rx: &Reactor| {
                        let (idx, end) = {
                            let mut o = out.borrow_mut();
                            o.commits.push((records.clone(), None));
                            o.ack_clock.push(None);
                            o.appended += records.len();
                            (o.commits.len() - 1, o.appended)
                        };
                        let finish = {
                            let (j, out, remaining, tx) = (
                                Rc::clone(&j),
                                Rc::clone(&out),
                                Rc::clone(&remaining),
                                tx.clone(),
                            );
                            move || {
                                remaining.set(remaining.get() - 1);
                                if remaining.get() == 0 {
                                    let mut o = std::mem::take(&mut *out.borrow_mut());
                                    o.stats = j.stats();
                                    let _ = tx.send(o);
                                    // Flushes still in flight finish in the background.
                                }
                            }
                        };
                        let out2 = Rc::clone(&out);
                        let clock2 = clock.clone();
                        j.append(
                            rx,
                            records,
                            Box::new(move |_rx: &Reactor, res: Result<u64, Errno>| {
                                let mut o = out2.borrow_mut();
                                o.commits[idx].1 = res.ok();
                                o.ack_clock[idx] = Some(clock2.now());
                                if res.is_ok() {
                                    o.acked_end = o.acked_end.max(end);
                                }
                                drop(o);
                                finish();
                            }),
                        );
                        if flush_too {
                            let out3 = Rc::clone(&out);
                            let call = {
                                let mut o = out.borrow_mut();
                                let acked = o.acked_end;
                                o.flush_calls.push((acked, None));
                                o.flush_calls.len() - 1
                            };
                            let clock3 = clock.clone();
                            j.flush(
                                rx,
                                Box::new(move |_rx: &Reactor, res: Result<u64, Errno>| {
                                    if res.is_ok() {
                                        let mut o = out3.borrow_mut();
                                        o.flushes_ok += 1;
                                        o.flush_calls[call].1 = Some(clock3.now());
                                    }
                                }),
                            );
                        }
                    }),
                );
            }
        })
        .expect("call");
    let out = rx_out
        .recv_timeout(Duration::from_secs(60))
        .expect("workload finished");
    // Let trailing flushes complete before reading the log.
    std::thread::sleep(Duration::from_millis(50));
    drop(set);
    (out, log.records(), sb)
}

/// A sparse device image: 4 KiB blocks by offset; absent blocks read as zeroes.
type Image = std::collections::HashMap<u64, Vec<u8>>;

fn put(image: &mut Image, offset: u64, data: &[u8]) {
    for (k, blk) in data.chunks(BLOCK_BYTES).enumerate() {
        image.insert(offset + (k * BLOCK_BYTES) as u64, blk.to_vec());
    }
}

fn replay_image(sb: &Superblock, image: &Image) -> Vec<Record> {
    let r = replay(sb, |off| {
        Some(
            image
                .get(&off)
                .cloned()
                .unwrap_or_else(|| vec![0u8; BLOCK_BYTES]),
        )
    });
    r.records.into_iter().map(|(_, r)| r).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Model {
    DaemonCrash,
    PowerLoss,
}

/// Checks every crash point; returns (points run, distinct images).
fn check_crash_points(
    out: &Outcome,
    log: &[crate::bdev::record::Record],
    sb: &Superblock,
    model: Model,
    seed: u64,
) -> (usize, usize) {
    let expected: Vec<Record> = out
        .commits
        .iter()
        .flat_map(|(r, _)| r.iter().cloned())
        .collect();
    // Index just past each commit's last record in `expected`.
    let mut ends = Vec::new();
    let mut acc = 0;
    for (r, _) in &out.commits {
        acc += r.len();
        ends.push(acc);
    }
    let writes: Vec<&crate::bdev::record::Record> = log
        .iter()
        .filter(|r| matches!(r.op, RecordOp::Write { .. }))
        .collect();
    let flushes: Vec<&crate::bdev::record::Record> = log
        .iter()
        .filter(|r| matches!(r.op, RecordOp::Flush))
        .collect();
    // (end of the commit in `expected`, device clock when its acknowledgement ran)
    let acked: Vec<(usize, u64)> = out
        .commits
        .iter()
        .enumerate()
        .filter_map(|(i, (_, s))| s.and(out.ack_clock[i]).map(|t| (ends[i], t)))
        .collect();
    let max_tick = log.iter().filter_map(|r| r.complete_seq).max().unwrap_or(0) + 1;
    let mut rng = Rng::new(seed ^ 0x9E37_79B9);
    let mut distinct = HashSet::new();
    let mut points = 0;
    for c in 0..=max_tick {
        for _sample in 0..4 {
            let mut image = Image::new();
            // Crash point c: the events with ticks below c happened. Must-have writes, then
            // maybe-writes (torn per 4 KiB block), in tick order.
            let covered_before = match model {
                Model::DaemonCrash => c,
                // Writes completed before the submission of a flush that completed.
                Model::PowerLoss => flushes
                    .iter()
                    .filter(|f| f.complete_seq.is_some_and(|t| t < c))
                    .map(|f| f.submit_seq)
                    .max()
                    .unwrap_or(0),
            };
            let mut applied_any = Vec::new();
            for w in &writes {
                let RecordOp::Write { offset, data, .. } = &w.op else {
                    continue;
                };
                let done = w.complete_seq.is_some_and(|t| t < covered_before);
                let submitted = w.submit_seq < c;
                if done {
                    put(&mut image, *offset, data);
                    applied_any.push(1u8);
                } else if submitted {
                    for (k, blk) in data.chunks(BLOCK_BYTES).enumerate() {
                        if rng.below(2) == 0 {
                            put(&mut image, *offset + (k * BLOCK_BYTES) as u64, blk);
                            applied_any.push(2);
                        } else {
                            applied_any.push(0);
                        }
                    }
                }
            }
            points += 1;
            distinct.insert((c, applied_any));
            let got = replay_image(sb, &image);
            assert!(got.len() <= expected.len() && got[..] == expected[..got.len()], "{model:?} crash at tick {c} (seed {seed}): replay is not a prefix of the appended records");
            let must = match model {
                // Every acknowledgement that ran before the crash.
                Model::DaemonCrash => acked.iter().filter(|(_, t)| *t <= c).map(|(e, _)| *e).max(),
                // The user-visible promise: a FLUSH that completed by tick c makes every
                // commit acknowledged before that FLUSH was called durable.
                Model::PowerLoss => out
                    .flush_calls
                    .iter()
                    .filter_map(|(acked, done_clock)| {
                        (done_clock.is_some_and(|t| t <= c)).then_some(*acked)
                    })
                    .max(),
            };
            if let Some(m) = must {
                assert!(got.len() >= m, "{model:?} crash at tick {c} (seed {seed}): {} records recovered, {m} were guaranteed", got.len());
            }
        }
    }
    (points, distinct.len())
}

#[test]
fn group_commit_batches_concurrent_commits_and_replay_returns_them_in_order() {
    let (out, log, sb) = run_workload(200, seed(), 1024, 3000);
    assert!(
        out.commits.iter().all(|(_, s)| s.is_some()),
        "every commit acknowledged"
    );
    let st = out.stats;
    println!("journal stats: {st:?}, flushes ok {}", out.flushes_ok);
    assert_eq!(st.commits, 200);
    assert!(
        st.writes < 200,
        "group commit: {} writes for 200 commits",
        st.writes
    );
    assert!(st.flushes >= 1 && out.flushes_ok > 0);
    let mut image = Image::new();
    for r in log.iter() {
        if let RecordOp::Write { offset, data, .. } = &r.op {
            put(&mut image, *offset, data);
        }
    }
    let expected: Vec<Record> = out
        .commits
        .iter()
        .flat_map(|(r, _)| r.iter().cloned())
        .collect();
    assert_eq!(replay_image(&sb, &image), expected);
    // Writes never overlap in time: each starts after the previous completed.
    let mut ws: Vec<_> = log
        .iter()
        .filter(|r| matches!(r.op, RecordOp::Write { .. }))
        .collect();
    ws.sort_by_key(|r| r.submit_seq);
    for pair in ws.windows(2) {
        assert!(
            pair[0].complete_seq.expect("done") < pair[1].submit_seq,
            "journal writes overlapped"
        );
    }
}

#[test]
fn crash_at_every_journal_boundary_keeps_what_was_promised() {
    let s = seed();
    let (out, log, sb) = run_workload(300, s, 1024, 60_000);
    let (p1, d1) = check_crash_points(&out, &log, &sb, Model::DaemonCrash, s);
    let (p2, d2) = check_crash_points(&out, &log, &sb, Model::PowerLoss, s);
    println!("journal crash points (seed {s}): daemon crash {p1} run / {d1} distinct; power loss {p2} run / {d2} distinct");
    assert!(p1 + p2 > 1000);
}

#[test]
fn a_full_ring_fails_commits_with_enospc_instead_of_overwriting() {
    let (out, _log, _sb) = run_workload(60, seed(), 4, 3000);
    let failed = out.commits.iter().filter(|(_, s)| s.is_none()).count();
    assert!(failed > 0, "a 4-block ring cannot hold 60 commits");
    assert!(
        out.stats.blocks <= 4,
        "never more blocks than the ring holds: {}",
        out.stats.blocks
    );
}

/// A ring image of `blocks` blocks starting at `first_seq`: `written` consecutive valid
/// blocks, then per block one of: damaged (garbage), zeroes, a block of an older lap, or
/// left as written — and valid blocks of later sequences scattered past the end.
fn random_ring(rng: &mut Rng, sb: &Superblock) -> Vec<u8> {
    let blocks = sb.journal_blocks();
    let mut ring = vec![0u8; usize::try_from(blocks).expect("small ring") * BLOCK_BYTES];
    let put_seq = |ring: &mut Vec<u8>, seq: u64| {
        let rec = Record::Map {
            vol: 1,
            lc: seq,
            pc: 7,
            epoch: 0,
        };
        let b = format::encode_journal_blocks(sb.journal_tag, seq, &[rec]);
        let at = usize::try_from(seq % blocks).expect("small ring") * BLOCK_BYTES;
        ring[at..at + BLOCK_BYTES].copy_from_slice(&b[..BLOCK_BYTES]);
    };
    // Older laps first, then the live part over them.
    if rng.below(2) == 0 && sb.first_seq > blocks {
        for s in (sb.first_seq - blocks)..sb.first_seq {
            put_seq(&mut ring, s);
        }
    }
    let written = rng.below(blocks + 1);
    for s in sb.first_seq..sb.first_seq + written {
        put_seq(&mut ring, s);
    }
    for _ in 0..rng.below(4) {
        let s = sb.first_seq + rng.below(blocks);
        let at = usize::try_from(s % blocks).expect("small ring") * BLOCK_BYTES;
        match rng.below(3) {
            0 => ring[at + 100] ^= 0x5a,
            1 => ring[at..at + BLOCK_BYTES].fill(0),
            _ => put_seq(&mut ring, s),
        }
    }
    ring
}

#[test]
fn a_ring_scan_finds_what_replay_and_the_hole_check_find() {
    let mut rng = Rng::new(seed());
    for round in 0..400 {
        let blocks = 4 + rng.below(60);
        let mut sb = superblock(blocks);
        sb.first_seq = 1 + rng.below(4 * blocks);
        let ring = random_ring(&mut rng, &sb);
        let base = sb.region_start + sb.journal_offset;
        let want = replay(&sb, |at| {
            let i = usize::try_from(at - base).ok()?;
            ring.get(i..i + BLOCK_BYTES).map(<[u8]>::to_vec)
        });
        let want_past = valid_blocks_past(&sb, want.next_seq, &ring);
        let mut scan = RingScan::new(&sb);
        while scan.remaining() > 0 {
            let at = usize::try_from(scan.next_pos()).expect("small ring") * BLOCK_BYTES;
            scan.feed(&ring[at..at + BLOCK_BYTES]);
        }
        let (got, past) = scan.finish();
        assert_eq!(got, want, "round {round}: replay differs");
        assert_eq!(
            past, want_past,
            "round {round}: blocks past the stop differ"
        );
    }
}
