//! Thin volumes end to end on a malloc-backed pool: random IO against a byte model across
//! cluster boundaries, re-import after the runtime is dropped, accounting, and a full pool.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::bdev::blocking::BlockingDevice;
use crate::bdev::mem::MallocDevice;
use crate::bdev::record::{RecordOp, RecordingDevice, WriteLog};
use crate::lvs::alloc::AllocCounts;
use crate::lvs::pool::{self, DEFAULT_CLUSTER_BYTES};
use crate::reactor::{Errno, ReactorSet};
use crate::testing::{reactors, seed_or, Rng};

thread_local! {
    static RT: RefCell<Option<Rc<PoolRt>>> = const { RefCell::new(None) };
    static CHS: RefCell<HashMap<u32, Rc<dyn Channel>>> = RefCell::new(HashMap::new());
}

/// The owner reactor's channel of `vol`, opened once per runtime (on the owner only).
fn owner_channel(rx: &Reactor, vol: u32) -> Rc<dyn Channel> {
    CHS.with(|c| {
        c.borrow_mut()
            .entry(vol)
            .or_insert_with(|| {
                RT.with(|r| r.borrow().clone())
                    .expect("pool")
                    .open_volume(rx, vol)
                    .expect("open")
            })
            .clone()
    })
}

struct Harness {
    set: ReactorSet,
    dev: Arc<dyn BlockDevice>,
}

impl Harness {
    fn new(bytes: u64) -> Self {
        let dev = MallocDevice::new(bytes).expect("malloc");
        Self::on(Arc::new(dev), DEFAULT_CLUSTER_BYTES)
    }

    /// A pool with `cluster_bytes` clusters made on `dev`, started.
    fn on(dev: Arc<dyn BlockDevice>, cluster_bytes: u32) -> Self {
        let set = reactors(1, 8);
        let h = Self { set, dev };
        let c =
            BlockingDevice::new(Arc::clone(&h.dev), h.set.remotes()[0].clone()).expect("client");
        pool::create(&c, cluster_bytes, [3; 16]).expect("create");
        h.start();
        h
    }

    /// (Re)imports the pool from the device and starts its runtime on the reactor.
    fn start(&self) {
        let c = BlockingDevice::new(Arc::clone(&self.dev), self.set.remotes()[0].clone())
            .expect("client");
        let imp = pool::import(&c).expect("import");
        let dev = Arc::clone(&self.dev);
        self.set.remotes()[0]
            .call(move |rx: &Reactor| {
                let rt = PoolRt::start(rx, &dev, imp).expect("start");
                CHS.with(|c| c.borrow_mut().clear());
                RT.with(|r| *r.borrow_mut() = Some(rt));
            })
            .expect("call");
        // An import re-zeroes every unreferenced cluster before handing it out: wait for
        // the pipeline so tests start from a steady state.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counts().recycling > 0 {
            assert!(
                Instant::now() < deadline,
                "pipeline did not settle: {:?}",
                self.counts()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&self) {
        self.set.remotes()[0]
            .call(|_rx: &Reactor| {
                CHS.with(|c| c.borrow_mut().clear());
                RT.with(|r| r.borrow_mut().take());
            })
            .expect("call");
    }

    fn create(&self, name: &str, size: u64) -> u32 {
        let meta = VolumeMeta {
            id: 0,
            uuid: [1; 16],
            name: name.into(),
            size_bytes: size,
            labels: BTreeMap::new(),
            thick: false,
            written: false,
        };
        self.control(|rx, rt, reply| rt.create_volume(rx, meta, reply))
            .expect("create ok")
    }

    fn delete(&self, id: u32) {
        self.control(move |rx, rt, reply| rt.delete_volume(rx, id, reply))
            .expect("delete ok");
    }

    /// Runs a control operation of the pool runtime on its reactor and waits for its reply.
    fn control<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Reactor, Rc<PoolRt>, Reply<T>) + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx_done) = crossbeam::channel::bounded(1);
        self.set.remotes()[0]
            .call(move |rx: &Reactor| {
                let rt = RT.with(|r| r.borrow().clone()).expect("pool running");
                op(
                    rx,
                    rt,
                    Box::new(move |_rx, res| tx.send(res).expect("send")),
                );
            })
            .expect("call");
        rx_done
            .recv_timeout(Duration::from_secs(10))
            .expect("control operation answered")
    }

    fn io(&self, vol: u32, io: IoReq) -> Result<Vec<u8>, Errno> {
        let (tx, rx_done) = crossbeam::channel::bounded(1);
        self.set.remotes()[0]
            .call(move |rx: &Reactor| {
                let ch = owner_channel(rx, vol);
                let io = io.into_io();
                let tx2 = tx.clone();
                ch.submit(
                    rx,
                    io,
                    FnCompletion::boxed(move |_rx, res, buf| {
                        tx2.send(res.map(|_| buf.and_then(|b| b.to_vec()).unwrap_or_default()))
                            .expect("send")
                    }),
                    0,
                );
            })
            .expect("call");
        rx_done
            .recv_timeout(Duration::from_secs(20))
            .expect("io completed")
    }

    /// Waits until every dropped reference is applied (a flush covered its record).
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = self.set.remotes()[0]
                .call(|_rx: &Reactor| RT.with(|r| r.borrow().as_ref().expect("pool").settled()))
                .expect("call");
            if done {
                return;
            }
            assert!(Instant::now() < deadline, "references never settled");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn counts(&self) -> super::super::alloc::AllocCounts {
        self.set.remotes()[0]
            .call(|_rx: &Reactor| RT.with(|r| r.borrow().as_ref().expect("pool").alloc_counts()))
            .expect("call")
    }
}

#[derive(Clone, Debug)]
enum IoReq {
    Read(u64, usize),
    Write(u64, Vec<u8>, bool),
    Flush,
    Discard(u64, u64),
    Zero(u64, u64),
}

impl IoReq {
    /// The device request, with a new buffer.
    fn into_io(self) -> Io {
        match self {
            IoReq::Read(off, len) => Io::Read {
                offset: off,
                buf: IoBuf::alloc(len),
            },
            IoReq::Write(off, data, fua) => Io::Write {
                offset: off,
                buf: IoBuf::from_slice(&data),
                fua,
            },
            IoReq::Flush => Io::Flush,
            IoReq::Discard(off, len) => Io::Discard { offset: off, len },
            IoReq::Zero(off, len) => Io::WriteZeroes { offset: off, len },
        }
    }
}

#[test]
fn random_io_matches_a_byte_model_and_survives_reimport() {
    let seed = seed_or(0x70_1c);
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let h = Harness::new(96 << 20);
    let size: u64 = 2 << 20; // 32 clusters of 64 KiB
    let vols = [h.create("a", size), h.create("b", size)];
    let mut models = [vec![0u8; 2 << 20], vec![0u8; 2 << 20]];
    let idx = |v: u64| usize::try_from(v).expect("small");
    for step in 0..400 {
        let which = usize::try_from(rng.below(2)).expect("0..2");
        let (vol, model) = (vols[which], &mut models[which]);
        let off = rng.below(size / 4096) * 4096;
        let len = ((1 + rng.below(40)) * 4096).min(size - off);
        match rng.below(10) {
            0..=3 => {
                let b = rng.next_u64().to_le_bytes()[0] | 1;
                let data = vec![b; idx(len)];
                h.io(vol, IoReq::Write(off, data.clone(), rng.below(8) == 0))
                    .expect("write");
                model[idx(off)..idx(off + len)].copy_from_slice(&data);
            }
            4..=6 => {
                let got = h.io(vol, IoReq::Read(off, idx(len))).expect("read");
                assert!(
                    got == model[idx(off)..idx(off + len)],
                    "step {step}: read {off}+{len} of volume {vol} differs (seed {seed})"
                );
            }
            7 => {
                h.io(vol, IoReq::Zero(off, len)).expect("write-zeroes");
                model[idx(off)..idx(off + len)].fill(0);
            }
            8 => {
                // Discard promises nothing about content: only whole clusters go, and the
                // model says they read zeroes afterwards (they are unmapped).
                h.io(vol, IoReq::Discard(off, len)).expect("discard");
                let c = 65536;
                let first = off.div_ceil(c) * c;
                let end = (off + len) / c * c;
                if end > first {
                    model[idx(first)..idx(end)].fill(0);
                }
            }
            _ => {
                h.io(vol, IoReq::Flush).expect("flush");
            }
        }
        if step == 200 {
            h.stop();
            h.start();
        }
    }
    h.stop();
    h.start();
    for (i, &vol) in vols.iter().enumerate() {
        for off in (0..size).step_by(1 << 20) {
            let got = h.io(vol, IoReq::Read(off, 1 << 20)).expect("read");
            assert!(
                got == models[i][idx(off)..idx(off) + (1 << 20)],
                "volume {vol} differs from the model at {off} after re-import (seed {seed})"
            );
        }
    }
    let c = h.counts();
    let mapped: usize = models
        .iter()
        .map(|m| {
            m.chunks(65536)
                .filter(|c| c.iter().any(|&b| b != 0))
                .count()
        })
        .sum();
    assert!(
        c.in_use >= mapped as u64,
        "every non-zero cluster is allocated: {c:?} vs {mapped}"
    );
}

#[test]
fn a_full_pool_fails_allocating_writes_with_enospc_and_recovers_after_discard() {
    let h = Harness::new(56 << 20); // small pool: few data clusters
    let c = h.counts();
    let total = c.zeroed + c.clean;
    assert!(total >= 16, "{total} clusters");
    let size = (total + 8) * 65536;
    h.control(|rx, rt, reply| rt.set_overcommit(rx, 2000, reply))
        .expect("allow a volume larger than the pool");
    let vol = h.create("big", size);
    // Four clusters per write: one journal commit each (the ring, without checkpoints yet,
    // holds a bounded number of commits).
    let chunk = vec![7u8; 4 * 65536];
    let mut full_at = None;
    for i in 0..(total + 8).div_ceil(4) {
        if let Err(e) = h.io(vol, IoReq::Write(i * 4 * 65536, chunk.clone(), false)) {
            assert_eq!(e, Errno::ENOSPC);
            full_at = Some(i);
            break;
        }
    }
    assert!(full_at.is_some(), "the volume is larger than the pool");
    assert_eq!(
        h.counts().zeroed + h.counts().clean,
        0,
        "every cluster was usable: {:?}",
        h.counts()
    );
    assert_eq!(h.counts().in_use, total);
    // Overwrites and reads still work on a full pool.
    h.io(vol, IoReq::Write(0, vec![9u8; 4096], false))
        .expect("overwrite on a full pool");
    assert_eq!(
        h.io(vol, IoReq::Read(0, 4096)).expect("read"),
        vec![9u8; 4096]
    );
    // Free half, then writes work again once the pipeline recycled the clusters.
    h.io(vol, IoReq::Discard(0, (total / 2) * 65536))
        .expect("discard");
    let deadline = Instant::now() + Duration::from_secs(10);
    let usable = |c: AllocCounts| c.zeroed + c.clean;
    while usable(h.counts()) < total / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        usable(h.counts()) >= total / 2,
        "recycled: {:?}",
        h.counts()
    );
    h.io(vol, IoReq::Write(0, vec![1u8; 4096], false))
        .expect("space is back");
    let back = h.io(vol, IoReq::Read(0, 65536)).expect("read");
    assert!(
        back[..4096].iter().all(|&b| b == 1) && back[4096..].iter().all(|&b| b == 0),
        "a recycled cluster never shows old data"
    );
}

/// Durably zero free space is journaled (FORMAT.md §5): a restart zeroes the ready window
/// and what was freed since, not the whole free space; and every cluster handed out after
/// the restart, from the window or from the clean set, still reads zeroes where it was
/// not written (clusters that held another volume's data included).
#[test]
fn a_restart_zeroes_the_ready_window_not_all_free_space() {
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(512 << 20).expect("malloc"));
    let (rec, log) = RecordingDevice::new(malloc);
    let h = Harness::on(rec, DEFAULT_CLUSTER_BYTES);
    let zeroed_clusters = |log: &WriteLog| {
        log.records()
            .iter()
            .map(|r| match r.op {
                RecordOp::WriteZeroes { len, .. } => len,
                _ => 0,
            })
            .sum::<u64>()
            / 65536
    };
    let c = h.counts();
    let free = c.zeroed + c.clean;
    assert!(
        zeroed_clusters(&log) >= free,
        "a new pool zeroes its free space"
    );
    assert!(
        c.clean > 2 * c.zeroed,
        "past the ready window, zeroed clusters are clean: {c:?}"
    );
    let window = c.zeroed;
    // Use the window and part of the clean set for data, then free it all again.
    let junk = h.create("junk", (window + 300) * 65536);
    for lc in 0..window + 300 {
        h.io(
            junk,
            IoReq::Write(lc * 65536 + 8192, vec![0xEE; 4096], false),
        )
        .expect("write");
    }
    h.delete(junk);
    h.settle();
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.counts().recycling > 0 {
        assert!(Instant::now() < deadline, "recycled: {:?}", h.counts());
        std::thread::sleep(Duration::from_millis(5));
    }
    h.stop();
    log.clear();
    h.start();
    let again = zeroed_clusters(&log);
    assert!(
        again <= window + window / 2 && again < free / 3,
        "a restart zeroed {again} clusters of {free} free (window {window})"
    );
    let c2 = h.counts();
    assert_eq!(c2.zeroed + c2.clean, free, "no space lost: {c2:?}");
    // Allocate past the window (into the clean set): unwritten parts read zeroes.
    let v = h.create("new", (window + 600) * 65536);
    for lc in 0..window + 600 {
        h.io(v, IoReq::Write(lc * 65536, vec![0x11; 4096], false))
            .expect("write");
    }
    for lc in 0..window + 600 {
        let got = h.io(v, IoReq::Read(lc * 65536, 65536)).expect("read");
        assert!(
            got[..4096].iter().all(|&b| b == 0x11) && got[4096..].iter().all(|&b| b == 0),
            "logical cluster {lc}: a cluster handed out after the restart shows old data"
        );
    }
}

/// A request of several clusters moves as one device IO where its clusters sit in a row
/// on the device: first writes into consecutive new clusters, overwrites in place, and
/// reads; a write over snapshot-shared clusters still goes cluster by cluster. The data
/// reads back each time.
#[test]
fn multi_cluster_requests_are_one_device_io_where_the_clusters_are_consecutive() {
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(128 << 20).expect("malloc"));
    let (rec, log) = RecordingDevice::new(malloc);
    let h = Harness::on(rec, DEFAULT_CLUSTER_BYTES);
    let v = h.create("seq", 16 << 20);
    // Data writes are at least a cluster here; journal and superblock writes are 4 KiB.
    let data_writes = |log: &WriteLog| -> Vec<usize> {
        log.records()
            .iter()
            .filter_map(|r| match &r.op {
                RecordOp::Write { data, .. } if data.len() >= 32768 => Some(data.len()),
                _ => None,
            })
            .collect()
    };
    let pattern = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add(u8::try_from(i / 4096 % 256).expect("below 256")))
            .collect()
    };
    // First writes: four new clusters, handed out in a row by a fresh pool.
    log.clear();
    let a = pattern(1, 4 * 65536);
    h.io(v, IoReq::Write(0, a.clone(), false)).expect("write");
    assert_eq!(
        data_writes(&log),
        vec![4 * 65536],
        "first writes of 4 clusters"
    );
    assert_eq!(h.counts().in_use, 4);
    assert_eq!(h.io(v, IoReq::Read(0, 4 * 65536)).expect("read"), a);
    // Overwrite in place, starting and ending inside a cluster.
    log.clear();
    let b = pattern(50, 3 * 65536);
    h.io(v, IoReq::Write(32768, b.clone(), false))
        .expect("overwrite");
    assert_eq!(
        data_writes(&log),
        vec![3 * 65536],
        "overwrite across 4 clusters"
    );
    let mut want = a.clone();
    want[32768..32768 + b.len()].copy_from_slice(&b);
    assert_eq!(h.io(v, IoReq::Read(0, 4 * 65536)).expect("read"), want);
    // A request over mapped and unmapped clusters: the unmapped part reads zeroes.
    let got = h.io(v, IoReq::Read(3 * 65536, 2 * 65536)).expect("read");
    assert_eq!(&got[..65536], &want[3 * 65536..]);
    assert!(got[65536..].iter().all(|&x| x == 0));
    // Over a snapshot, every cluster is shared: each whole cluster gets a new one.
    let sm = VolumeMeta {
        name: "seq-snap".into(),
        uuid: [4; 16],
        ..VolumeMeta::default()
    };
    h.control(move |rx, rt, reply| rt.snapshot(rx, vec![(v, sm)], reply))
        .expect("snapshot");
    log.clear();
    let c = pattern(100, 2 * 65536);
    h.io(v, IoReq::Write(65536, c.clone(), true))
        .expect("write");
    let writes = data_writes(&log);
    assert_eq!(writes.iter().sum::<usize>(), 2 * 65536, "{writes:?}");
    want[65536..3 * 65536].copy_from_slice(&c);
    assert_eq!(h.io(v, IoReq::Read(0, 4 * 65536)).expect("read"), want);
}

#[test]
fn deleting_a_volume_returns_its_space_and_its_name() {
    let h = Harness::new(96 << 20);
    let before = h.counts();
    let v = h.create("gone", 1 << 20);
    for lc in 0..16u64 {
        h.io(v, IoReq::Write(lc * 65536, vec![3u8; 8192], false))
            .expect("write");
    }
    assert_eq!(h.counts().in_use, 16);
    h.delete(v);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ready or clean: both are durably zero free space.
    let usable = |c: AllocCounts| (c.zeroed + c.clean, c.in_use, c.recycling);
    while usable(h.counts()) != usable(before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(usable(h.counts()), usable(before), "all clusters recycled");
    let again = h.create("gone", 1 << 20);
    assert_eq!(
        h.io(again, IoReq::Read(0, 65536)).expect("read"),
        vec![0u8; 65536],
        "a new volume reads zeroes"
    );
    h.stop();
    h.start();
    let table = h.set.remotes()[0]
        .call(|_rx: &Reactor| RT.with(|r| r.borrow().as_ref().expect("pool").volumes()))
        .expect("call");
    assert_eq!(table.volumes.len(), 1);
    assert!(
        !table.volumes[&again].written,
        "never written after re-creation"
    );
}

/// Daemon-crash test: a concurrent workload of allocating writes and overwrites on a
/// recording device; at crash points through it, the device holds every completed write
/// plus any per-block subset of the ones in flight. After import, every block must read
/// the last write acknowledged before the crash or a write that was in flight — never an
/// older value, zeroes where acknowledged data was, or another block's data.
#[test]
fn acknowledged_writes_survive_a_daemon_crash_at_any_point() {
    let seed = seed_or(0xdead_c0de);
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    const DEV: u64 = 48 << 20;
    let set = reactors(1, 8);
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
    let (rec, log) = RecordingDevice::new(malloc);
    let rec: Arc<dyn BlockDevice> = rec;
    let client = BlockingDevice::new(Arc::clone(&rec), set.remotes()[0].clone()).expect("client");
    pool::create(&client, DEFAULT_CLUSTER_BYTES, [5; 16]).expect("create");
    let h = Harness {
        set,
        dev: Arc::clone(&rec),
    };
    h.start();
    let vol = h.create("crash", 4 << 20);
    // Acknowledged writes: (4 KiB block, value, device clock at the acknowledgement).
    let mut writes: Vec<(u64, u8, u64)> = Vec::new();
    let (tx, rx_done) = crossbeam::channel::unbounded::<(usize, u64)>();
    let mut issued = Vec::new();
    for _round in 0..30u64 {
        // A burst of concurrent writes, some to the same cluster, then wait for them.
        let mut batch = Vec::new();
        for _ in 0..8 {
            let block = rng.below(64) * 4; // within 4 MiB: blocks of 4 KiB, clusters of 16 blocks
            let value = u8::try_from(issued.len() % 250).expect("small") + 1;
            batch.push((block, value));
            issued.push((block, value));
        }
        let (clock, tx2) = (log.clone(), tx.clone());
        let base = issued.len() - batch.len();
        h.set.remotes()[0]
            .call(move |rx: &Reactor| {
                let ch = owner_channel(rx, vol);
                for (i, (block, value)) in batch.into_iter().enumerate() {
                    let (clock2, tx3) = (clock.clone(), tx2.clone());
                    let io = Io::Write {
                        offset: block * 4096,
                        buf: IoBuf::from_slice(&[value; 4096]),
                        fua: false,
                    };
                    ch.submit(
                        rx,
                        io,
                        FnCompletion::boxed(move |_rx, res, _| {
                            res.expect("write");
                            tx3.send((base + i, clock2.now())).expect("send");
                        }),
                        0,
                    );
                }
            })
            .expect("call");
        for _ in 0..8 {
            let (i, acked) = rx_done
                .recv_timeout(Duration::from_secs(10))
                .expect("acked");
            let (block, value) = issued[i];
            writes.push((block, value, acked));
        }
    }
    let records = log.records();
    let max_tick = records
        .iter()
        .filter_map(|r| r.complete_seq)
        .max()
        .expect("ticks");
    let first_tick = records.iter().find(|r| matches!(&r.op, RecordOp::Write { data, .. } if data.len() == 4096 && data[0] != 0 && data.iter().all(|&b| b == data[0]))).map_or(0, |r| r.submit_seq);
    h.stop();
    drop(h);
    // Crash points from just before the workload's first data write to its end.
    let replay_set = reactors(1, 8);
    let mut points = 0;
    let step = ((max_tick - first_tick) / 50).max(1);
    let mut c = first_tick;
    while c <= max_tick + 1 {
        let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(DEV).expect("malloc"));
        let img =
            BlockingDevice::new(Arc::clone(&dev), replay_set.remotes()[0].clone()).expect("img");
        for r in &records {
            let done = r.complete_seq.is_some_and(|t| t < c);
            let inflight = r.submit_seq < c && !done;
            if !done && !inflight {
                continue;
            }
            match &r.op {
                RecordOp::Write { offset, data, .. } => {
                    for (k, blk) in data.chunks(4096).enumerate() {
                        if done || rng.below(2) == 0 {
                            img.write(offset + (k * 4096) as u64, blk, false)
                                .expect("apply");
                        }
                    }
                }
                RecordOp::WriteZeroes { offset, len } | RecordOp::Discard { offset, len } => {
                    if done || rng.below(2) == 0 {
                        img.write_zeroes(*offset, *len).expect("apply");
                    }
                }
                RecordOp::Flush => {}
            }
        }
        let h2 = Harness {
            set: reactors(1, 8),
            dev: Arc::clone(&dev),
        };
        h2.start();
        for block in 0..64u64 {
            let block = block * 4;
            let got = h2.io(vol, IoReq::Read(block * 4096, 4096)).expect("read");
            assert!(
                got.iter().all(|&b| b == got[0]),
                "crash at {c}: block {block} is torn inside a 4 KiB write (seed {seed})"
            );
            let acked_before: Vec<u8> = writes
                .iter()
                .filter(|w| w.0 == block && w.2 <= c)
                .map(|w| w.1)
                .collect();
            let later: Vec<u8> = writes
                .iter()
                .filter(|w| w.0 == block && w.2 > c)
                .map(|w| w.1)
                .collect();
            let ok = match acked_before.last() {
                Some(&v) => got[0] == v || later.contains(&got[0]),
                None => got[0] == 0 || later.contains(&got[0]),
            };
            assert!(ok, "crash at {c}: block {block} reads {} but the last acknowledged write was {:?} (in flight: {later:?}) (seed {seed})", got[0], acked_before.last());
        }
        h2.stop();
        points += 1;
        c += step;
    }
    println!("volume daemon-crash points checked: {points}");
    assert!(points >= 50);
}

/// A cluster unmapped while an overwrite to it is still in flight is freed only when that
/// IO completes: it is never zeroed and handed out with the old IO still on its way.
#[test]
fn a_cluster_is_not_recycled_while_an_io_to_it_is_in_flight() {
    use crate::bdev::fault::{FaultAction, FaultDevice, FaultRule, OpMatch};
    let set = reactors(1, 8);
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(96 << 20).expect("malloc"));
    let (fdev, rules) = FaultDevice::new(malloc);
    let dev: Arc<dyn BlockDevice> = fdev;
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    pool::create(&client, DEFAULT_CLUSTER_BYTES, [6; 16]).expect("create");
    let h = Harness { set, dev };
    h.start();
    let vol = h.create("race", 1 << 20);
    h.io(vol, IoReq::Write(0, vec![1u8; 4096], false))
        .expect("allocating write");
    let in_use = h.counts().in_use;
    // Hold the next write (an overwrite of the mapped cluster) for 300 ms.
    rules.push(
        FaultRule::new(
            OpMatch::Write,
            FaultAction::Delay(Duration::from_millis(300)),
        )
        .times(1),
    );
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    h.set.remotes()[0]
        .call(move |rx: &Reactor| {
            let ch = owner_channel(rx, vol);
            let io = Io::Write {
                offset: 0,
                buf: IoBuf::from_slice(&[2u8; 4096]),
                fua: false,
            };
            ch.submit(
                rx,
                io,
                FnCompletion::boxed(move |_rx, res, _| tx.send(res).expect("send")),
                0,
            );
        })
        .expect("call");
    h.io(vol, IoReq::Discard(0, 65536))
        .expect("discard while the overwrite is in flight");
    std::thread::sleep(Duration::from_millis(100));
    let during = h.counts();
    assert_eq!(
        (during.in_use, during.recycling),
        (in_use, 0),
        "unmapped but held, never zeroed, while the overwrite is in flight: {during:?}"
    );
    rx_done
        .recv_timeout(Duration::from_secs(5))
        .expect("overwrite done")
        .expect("overwrite ok");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.counts().recycling > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        (h.counts().in_use, h.counts().recycling),
        (in_use - 1, 0),
        "freed and recycled after the IO finished"
    );
    assert_eq!(
        h.io(vol, IoReq::Read(0, 4096)).expect("read"),
        vec![0u8; 4096],
        "discarded cluster reads zeroes"
    );
}

/// A failed checkpoint, then a failed journal write, leave the pool served but degraded
/// (`health`, which the API reports as DEGRADED): reads of written data still work; a
/// checkpoint that succeeds again clears the checkpoint case.
#[test]
fn failed_metadata_writes_mark_the_pool_degraded() {
    use crate::bdev::fault::{FaultAction, FaultDevice, FaultRule, OpMatch};
    let set = reactors(1, 8);
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(96 << 20).expect("malloc"));
    let (fdev, rules) = FaultDevice::new(malloc);
    let dev: Arc<dyn BlockDevice> = fdev;
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    pool::create(&client, DEFAULT_CLUSTER_BYTES, [7; 16]).expect("create");
    let h = Harness { set, dev };
    h.start();
    let health = |h: &Harness| {
        h.set.remotes()[0]
            .call(|_rx: &Reactor| RT.with(|r| r.borrow().as_ref().expect("pool").health()))
            .expect("call")
    };
    let data_start = h.set.remotes()[0]
        .call(|_rx: &Reactor| {
            let sb = RT.with(|r| r.borrow().as_ref().expect("pool").superblock());
            sb.region_start + sb.data_offset
        })
        .expect("call");
    let vol = h.create("d", 1 << 20);
    h.io(vol, IoReq::Write(0, vec![5u8; 4096], false))
        .expect("write");
    assert_eq!(health(&h), None, "a healthy pool");
    // Every metadata write fails while the rule lasts: the checkpoint fails.
    rules.push(
        FaultRule::new(OpMatch::Write, FaultAction::Fail(Errno(libc::EIO)))
            .in_range(0, data_start)
            .times(1000),
    );
    h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
        .expect_err("checkpoint onto a failing device");
    assert_eq!(health(&h), Some(Degraded::CheckpointFailed));
    assert!(Degraded::CheckpointFailed.message().contains("checkpoint"));
    rules.clear();
    h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
        .expect("checkpoint once the device works");
    assert_eq!(health(&h), None, "a checkpoint that succeeds clears it");
    // A journal write fails: an allocating write fails and the pool stays degraded.
    rules.push(
        FaultRule::new(OpMatch::Write, FaultAction::Fail(Errno(libc::EIO)))
            .in_range(0, data_start)
            .times(1000),
    );
    assert!(h
        .io(vol, IoReq::Write(2 * 65536, vec![6u8; 4096], false))
        .is_err());
    rules.clear();
    assert_eq!(health(&h), Some(Degraded::JournalFailed));
    assert_eq!(
        h.io(vol, IoReq::Read(0, 4096)).expect("reads still work"),
        vec![5u8; 4096]
    );
}

mod crash;
mod qos;
mod remote;

/// Model-based test (issue 10): random sequences of create / write / read / FUA / discard /
/// write-zeroes / snapshot / group snapshot / clone / rollback / inflate / delete (incl.
/// with dependents) / resize / flush / checkpoint / reopen against a plain in-memory
/// model. Every read equals the model; diffs between objects equal the model's; the pool's
/// allocated clusters and each object's allocated and unique bytes equal what the model
/// implies; the written flag matches.
mod model {
    use super::*;
    use proptest::prelude::*;

    const CL: u64 = 65536;

    /// One object of the model: bytes, and per cluster a token naming the write that
    /// produced its contents (None = unmapped). Tokens are what the store's physical
    /// clusters correspond to: shared tokens ⇔ shared clusters.
    #[derive(Clone, Debug)]
    struct Obj {
        id: u32,
        data: Vec<u8>,
        tokens: Vec<Option<u64>>,
        snapshot: bool,
        source: Option<u32>,
        written: bool,
    }

    #[derive(Clone, Debug)]
    enum Op {
        Create(u8),
        Write {
            obj: u8,
            off: u16,
            len: u8,
            fua: bool,
        },
        Read {
            obj: u8,
            off: u16,
            len: u8,
        },
        Discard {
            obj: u8,
            off: u16,
            len: u8,
        },
        Zero {
            obj: u8,
            off: u16,
            len: u8,
        },
        Snapshot {
            a: u8,
            b: Option<u8>,
        },
        Clone {
            snap: u8,
            grow: u8,
        },
        Rollback {
            obj: u8,
            snap: u8,
        },
        Inflate(u8),
        Delete(u8),
        Resize {
            obj: u8,
            grow: u8,
        },
        Diff {
            a: u8,
            b: u8,
        },
        Flush,
        Checkpoint,
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => any::<u8>().prop_map(Op::Create),
            8 => (any::<u8>(), any::<u16>(), 1u8..40, prop::bool::weighted(0.1)).prop_map(|(obj, off, len, fua)| Op::Write { obj, off, len, fua }),
            5 => (any::<u8>(), any::<u16>(), 1u8..64).prop_map(|(obj, off, len)| Op::Read { obj, off, len }),
            1 => (any::<u8>(), any::<u16>(), 1u8..64).prop_map(|(obj, off, len)| Op::Discard { obj, off, len }),
            1 => (any::<u8>(), any::<u16>(), 1u8..64).prop_map(|(obj, off, len)| Op::Zero { obj, off, len }),
            2 => (any::<u8>(), prop::option::weighted(0.4, any::<u8>())).prop_map(|(a, b)| Op::Snapshot { a, b }),
            1 => (any::<u8>(), 0u8..3).prop_map(|(snap, grow)| Op::Clone { snap, grow }),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(obj, snap)| Op::Rollback { obj, snap }),
            1 => any::<u8>().prop_map(Op::Inflate),
            1 => any::<u8>().prop_map(Op::Delete),
            1 => (any::<u8>(), 1u8..3).prop_map(|(obj, grow)| Op::Resize { obj, grow }),
            2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Diff { a, b }),
            1 => Just(Op::Flush),
            1 => Just(Op::Checkpoint),
            1 => Just(Op::Reopen),
        ]
    }

    fn pick(objs: &BTreeMap<u32, Obj>, i: u8, f: impl Fn(&Obj) -> bool) -> Option<u32> {
        let ids: Vec<u32> = objs.values().filter(|o| f(o)).map(|o| o.id).collect();
        (!ids.is_empty()).then(|| ids[usize::from(i) % ids.len()])
    }

    fn idx(v: u64) -> usize {
        usize::try_from(v).expect("small")
    }

    /// Clamps a 4 KiB-block range into the object.
    fn range(o: &Obj, off: u16, len: u8) -> (u64, u64) {
        let blocks = o.data.len() as u64 / 4096;
        let off = u64::from(off) % blocks;
        let len = u64::from(len).min(blocks - off);
        (off * 4096, len * 4096)
    }

    fn meta(name: &str, size: u64) -> VolumeMeta {
        VolumeMeta {
            name: name.into(),
            uuid: [2; 16],
            size_bytes: size,
            ..VolumeMeta::default()
        }
    }

    fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let h = Harness::new(96 << 20);
        let mut objs: BTreeMap<u32, Obj> = BTreeMap::new();
        let mut token = 0u64;
        let mut names = 0u32;
        let mut next_name = || {
            names += 1;
            format!("o{names}")
        };
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Create(n) => {
                    let size = (16 + u64::from(n % 17)) * CL;
                    let id = h.create(&next_name(), size);
                    objs.insert(
                        id,
                        Obj {
                            id,
                            data: vec![0; idx(size)],
                            tokens: vec![None; idx(size / CL)],
                            snapshot: false,
                            source: None,
                            written: false,
                        },
                    );
                }
                Op::Write { obj, off, len, fua } => {
                    let Some(id) = pick(&objs, obj, |o| !o.snapshot) else {
                        continue;
                    };
                    let o = objs.get_mut(&id).expect("picked");
                    let (off, len) = range(o, off, len);
                    token += 1;
                    let fill = u8::try_from(token % 251).expect("small") + 1;
                    h.io(id, IoReq::Write(off, vec![fill; idx(len)], fua))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: write: {e}")))?;
                    o.data[idx(off)..idx(off + len)].fill(fill);
                    for c in off / CL..(off + len).div_ceil(CL) {
                        token += 1;
                        o.tokens[idx(c)] = Some(token);
                    }
                    o.written = true;
                }
                Op::Read { obj, off, len } => {
                    let Some(id) = pick(&objs, obj, |_| true) else {
                        continue;
                    };
                    let o = &objs[&id];
                    let (off, len) = range(o, off, len);
                    let got = h
                        .io(id, IoReq::Read(off, idx(len)))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: read: {e}")))?;
                    prop_assert!(
                        got == o.data[idx(off)..idx(off + len)],
                        "step {}: read {}+{} of id {} differs from the model",
                        step,
                        off,
                        len,
                        id
                    );
                }
                Op::Discard { obj, off, len } | Op::Zero { obj, off, len } => {
                    let zero = matches!(op, Op::Zero { .. });
                    let Some(id) = pick(&objs, obj, |o| !o.snapshot) else {
                        continue;
                    };
                    let o = objs.get_mut(&id).expect("picked");
                    let (off, len) = range(o, off, len);
                    let req = if zero {
                        IoReq::Zero(off, len)
                    } else {
                        IoReq::Discard(off, len)
                    };
                    h.io(id, req).map_err(|e| {
                        TestCaseError::fail(format!("step {step}: discard/zero: {e}"))
                    })?;
                    let (first, end) = (off.div_ceil(CL), (off + len) / CL);
                    for c in first..end.max(first) {
                        o.tokens[idx(c)] = None;
                        o.data[idx(c * CL)..idx((c + 1) * CL)].fill(0);
                    }
                    if zero {
                        o.data[idx(off)..idx(off + len)].fill(0);
                        // Partial clusters that were mapped got zeroes written (a new token).
                        for c in [off / CL, (off + len - 1) / CL] {
                            if (c < first || c >= end) && o.tokens[idx(c)].is_some() {
                                token += 1;
                                o.tokens[idx(c)] = Some(token);
                            }
                        }
                    }
                }
                Op::Snapshot { a, b } => {
                    let Some(x) = pick(&objs, a, |o| !o.snapshot) else {
                        continue;
                    };
                    let mut srcs = vec![x];
                    if let Some(y) = b.and_then(|b| pick(&objs, b, |o| !o.snapshot)) {
                        if y != x {
                            srcs.push(y);
                        }
                    }
                    let group: Vec<(u32, VolumeMeta)> =
                        srcs.iter().map(|&s| (s, meta(&next_name(), 0))).collect();
                    let ids = h
                        .control(move |rx, rt, reply| rt.snapshot(rx, group, reply))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: snapshot: {e}")))?;
                    for (s, id) in srcs.iter().zip(ids) {
                        let mut o = objs[s].clone();
                        o.id = id;
                        o.snapshot = true;
                        o.source = Some(*s);
                        objs.insert(id, o);
                    }
                }
                Op::Clone { snap, grow } => {
                    let Some(s) = pick(&objs, snap, |o| o.snapshot) else {
                        continue;
                    };
                    let mut o = objs[&s].clone();
                    let size = o.data.len() as u64 + u64::from(grow) * CL;
                    let m = meta(&next_name(), size);
                    let id = h
                        .control(move |rx, rt, reply| rt.clone_volume(rx, s, m, reply))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: clone: {e}")))?;
                    o.id = id;
                    o.snapshot = false;
                    o.source = Some(s);
                    o.data.resize(idx(size), 0);
                    o.tokens.resize(idx(size / CL), None);
                    objs.insert(id, o);
                }
                Op::Rollback { obj, snap } => {
                    let Some(v) = pick(&objs, obj, |o| !o.snapshot) else {
                        continue;
                    };
                    let Some(s) = pick(&objs, snap, |o| o.snapshot && o.source == Some(v)) else {
                        continue;
                    };
                    h.control(move |rx, rt, reply| rt.rollback(rx, v, s, reply))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: rollback: {e}")))?;
                    let snap_o = objs[&s].clone();
                    let o = objs.get_mut(&v).expect("picked");
                    o.data.fill(0);
                    o.data[..snap_o.data.len()].copy_from_slice(&snap_o.data);
                    o.tokens.fill(None);
                    o.tokens[..snap_o.tokens.len()].copy_from_slice(&snap_o.tokens);
                    o.written |= snap_o.written;
                }
                Op::Inflate(obj) => {
                    let Some(v) = pick(&objs, obj, |o| !o.snapshot) else {
                        continue;
                    };
                    h.control(move |rx, rt, reply| rt.inflate(rx, v, reply))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: inflate: {e}")))?;
                    // Every cluster another object shares gets a copy of its own.
                    let others: std::collections::HashSet<u64> = objs
                        .values()
                        .filter(|o| o.id != v)
                        .flat_map(|o| o.tokens.iter().flatten().copied())
                        .collect();
                    let o = objs.get_mut(&v).expect("picked");
                    for t in o.tokens.iter_mut().flatten() {
                        if others.contains(t) {
                            token += 1;
                            *t = token;
                        }
                    }
                }
                Op::Delete(obj) => {
                    let Some(id) = pick(&objs, obj, |_| true) else {
                        continue;
                    };
                    h.delete(id);
                    objs.remove(&id);
                }
                Op::Resize { obj, grow } => {
                    let Some(id) = pick(&objs, obj, |o| !o.snapshot) else {
                        continue;
                    };
                    let o = objs.get_mut(&id).expect("picked");
                    let size = o.data.len() as u64 + u64::from(grow) * CL;
                    h.control(move |rx, rt, reply| rt.resize(rx, id, size, reply))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: resize: {e}")))?;
                    o.data.resize(idx(size), 0);
                    o.tokens.resize(idx(size / CL), None);
                }
                Op::Diff { a, b } => {
                    let (Some(x), Some(y)) = (pick(&objs, a, |_| true), pick(&objs, b, |_| true))
                    else {
                        continue;
                    };
                    let got = h
                        .control(move |_rx, rt, reply| reply(_rx, rt.diff(Some(x), y)))
                        .map_err(|e| TestCaseError::fail(format!("step {step}: diff: {e}")))?;
                    let (ox, oy) = (&objs[&x], &objs[&y]);
                    let mut want: Vec<(u64, u64)> = Vec::new();
                    let n = ox.tokens.len().max(oy.tokens.len());
                    for c in 0..n {
                        let tx = ox.tokens.get(c).copied().flatten();
                        let ty = oy.tokens.get(c).copied().flatten();
                        if tx != ty && (c as u64) * CL < oy.data.len() as u64 {
                            let off = c as u64 * CL;
                            match want.last_mut() {
                                Some((o, l)) if *o + *l == off => *l += CL,
                                _ => want.push((off, CL)),
                            }
                        }
                    }
                    prop_assert_eq!(got, want, "step {}: diff {} -> {}", step, x, y);
                }
                Op::Flush => {
                    if let Some(id) = pick(&objs, 0, |_| true) {
                        h.io(id, IoReq::Flush)
                            .map_err(|e| TestCaseError::fail(format!("step {step}: flush: {e}")))?;
                    }
                }
                Op::Checkpoint => {
                    h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
                        .map_err(|e| {
                            TestCaseError::fail(format!("step {step}: checkpoint: {e}"))
                        })?;
                }
                Op::Reopen => {
                    h.stop();
                    h.start();
                }
            }
            // Invariants after every step, once dropped references are applied.
            h.settle();
            let (usage, per, table) = h.set.remotes()[0]
                .call(move |_rx: &Reactor| {
                    RT.with(|r| {
                        let rt = r.borrow().clone().expect("pool");
                        let t = rt.volumes();
                        let per: BTreeMap<u32, ObjectUsage> = t
                            .volumes
                            .keys()
                            .chain(t.snapshots.keys())
                            .map(|&id| (id, rt.object_usage(id).expect("usage")))
                            .collect();
                        (rt.alloc_counts(), per, t)
                    })
                })
                .expect("call");
            let mut all: BTreeMap<u64, usize> = BTreeMap::new();
            for o in objs.values() {
                for t in o.tokens.iter().flatten() {
                    *all.entry(*t).or_default() += 1;
                }
            }
            prop_assert_eq!(
                usage.in_use,
                all.len() as u64,
                "step {}: allocated clusters",
                step
            );
            prop_assert_eq!(per.len(), objs.len(), "step {}: objects", step);
            for o in objs.values() {
                let u = per[&o.id];
                let mapped = o.tokens.iter().flatten().count() as u64;
                let unique = o
                    .tokens
                    .iter()
                    .flatten()
                    .filter(|t| {
                        all[t] == 1 && o.tokens.iter().flatten().filter(|u| u == t).count() == 1
                    })
                    .count() as u64;
                prop_assert_eq!(
                    u.allocated_bytes,
                    mapped * CL,
                    "step {}: id {} allocated",
                    step,
                    o.id
                );
                prop_assert_eq!(
                    u.unique_bytes,
                    unique * CL,
                    "step {}: id {} unique",
                    step,
                    o.id
                );
                let m = table.get(o.id).expect("in the table");
                prop_assert_eq!(
                    m.written,
                    o.written,
                    "step {}: id {} written flag",
                    step,
                    o.id
                );
                prop_assert_eq!(table.is_snapshot(o.id), o.snapshot);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn the_store_behaves_like_the_model(ops in prop::collection::vec(op(), 1..70)) {
            run(ops)?;
        }
    }
}

/// Requests that complete without device IO (reads of unmapped clusters, discards of
/// nothing) complete from the reactor loop, never inside `submit`: a caller that resubmits
/// from its completion (every benchmark and the ublk queue do) must not recurse.
#[test]
fn completions_without_device_io_never_run_inside_submit() {
    struct Again {
        ch: Rc<dyn Channel>,
        left: Cell<u32>,
        depth: Cell<u32>,
        max_depth: Cell<u32>,
        done: RefCell<Option<crossbeam::channel::Sender<u32>>>,
    }
    impl Completion for Again {
        fn complete(&self, rx: &Reactor, _tag: u64, res: IoResult, buf: Option<IoBuf>) {
            res.expect("read");
            self.depth.set(self.depth.get() + 1);
            self.max_depth
                .set(self.max_depth.get().max(self.depth.get()));
            if self.left.get() == 0 {
                if let Some(tx) = self.done.borrow_mut().take() {
                    tx.send(self.max_depth.get()).expect("send");
                }
            } else {
                self.left.set(self.left.get() - 1);
                let me: Rc<dyn Completion> = AGAIN.with(|a| a.borrow().clone()).expect("set");
                let io = Io::Read {
                    offset: 4096 * u64::from(self.left.get() & 1),
                    buf: buf.expect("buffer back"),
                };
                self.ch.submit(rx, io, me, 0);
            }
            self.depth.set(self.depth.get() - 1);
        }
    }
    thread_local! {
        static AGAIN: RefCell<Option<Rc<dyn Completion>>> = const { RefCell::new(None) };
    }
    let h = Harness::new(96 << 20);
    let vol = h.create("inline", 1 << 20);
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    h.set.remotes()[0]
        .call(move |rx: &Reactor| {
            let rt = RT.with(|r| r.borrow().clone()).expect("pool");
            let ch = rt.open_volume(rx, vol).expect("open");
            let again = Rc::new(Again {
                ch: Rc::clone(&ch),
                left: Cell::new(100_000),
                depth: Cell::new(0),
                max_depth: Cell::new(0),
                done: RefCell::new(Some(tx)),
            });
            let cb: Rc<dyn Completion> = again;
            AGAIN.with(|a| *a.borrow_mut() = Some(Rc::clone(&cb)));
            ch.submit(
                rx,
                Io::Read {
                    offset: 0,
                    buf: IoBuf::alloc(4096),
                },
                cb,
                0,
            );
        })
        .expect("call");
    let depth = rx_done
        .recv_timeout(Duration::from_secs(60))
        .expect("100k resubmissions completed");
    assert_eq!(depth, 1, "a completion never runs inside another's submit");
    h.set.remotes()[0]
        .call(|_rx: &Reactor| AGAIN.with(|a| drop(a.borrow_mut().take())))
        .expect("call");
}

/// Checkpoints keep a pool going past its journal ring: thousands of metadata commits on a
/// pool whose ring holds a few hundred blocks never fail, checkpoints are written, and the
/// pool re-imports with every mapping.
#[test]
fn checkpoints_let_a_pool_commit_far_more_than_its_journal_ring_holds() {
    let h = Harness::new(64 << 20); // 1 MiB journal: 256 blocks
    let sb = h
        .control(|_rx, rt, reply| reply(_rx, Ok(rt.superblock())))
        .expect("sb");
    let ring = sb.journal_blocks();
    let vol = h.create("churn", 4 << 20);
    let mut model = [0u8; 64];
    let commits = ring * 6;
    for i in 0..commits {
        let lc = i % 64;
        let v = u8::try_from(i % 251).expect("small") + 1;
        if i % 3 == 2 {
            // Unmap: one more commit, and the cluster goes back through the pipeline.
            h.io(vol, IoReq::Discard(lc * 65536, 65536))
                .expect("discard");
            model[usize::try_from(lc).expect("small")] = 0;
        } else {
            h.io(vol, IoReq::Write(lc * 65536, vec![v; 4096], false))
                .unwrap_or_else(|e| panic!("commit {i} of {commits} (ring {ring} blocks): {e}"));
            model[usize::try_from(lc).expect("small")] = v;
        }
    }
    let (stats, js) = h
        .control(|_rx, rt, reply| reply(_rx, Ok((rt.stats(), rt.journal_stats()))))
        .expect("stats");
    assert!(js.blocks > ring * 2, "{js:?} vs ring {ring}");
    assert!(stats.checkpoints >= 2, "{stats:?}");
    h.stop();
    h.start();
    for (lc, &v) in model.iter().enumerate() {
        let got = h
            .io(vol, IoReq::Read(lc as u64 * 65536, 4096))
            .expect("read");
        assert!(got.iter().all(|&b| b == v), "cluster {lc} after re-import");
    }
}

/// A torn multi-block journal write can leave valid blocks past the point where replay
/// stops. The next start fences them off (zeroes and flushes what one journal write could
/// have reached) before writing, so a later crash never replays those stale records.
#[test]
fn stale_journal_blocks_past_a_torn_write_are_never_replayed() {
    use crate::lvs::format::{encode_journal_blocks, Record};
    let h = Harness::new(96 << 20);
    let vol = h.create("torn", 1 << 20);
    let sb = h
        .control(|_rx, rt, reply| reply(_rx, Ok(rt.superblock())))
        .expect("sb");
    h.stop();
    let client =
        BlockingDevice::new(Arc::clone(&h.dev), h.set.remotes()[0].clone()).expect("client");
    let next = pool::import(&client).expect("import").next_seq;
    // A valid block one past the end, as a torn two-block write would leave it: it maps
    // logical cluster 5 of the volume, a write that was never acknowledged.
    let stale = encode_journal_blocks(
        sb.journal_tag,
        next + 1,
        &[Record::Map {
            vol,
            lc: 5,
            pc: 7,
            epoch: 0,
        }],
    );
    client
        .write(sb.journal_block_offset(next + 1), &stale, false)
        .expect("plant");
    h.start();
    // One commit lands at `next`, right before the stale block.
    h.io(vol, IoReq::Write(0, vec![1u8; 4096], false))
        .expect("write");
    h.stop();
    h.start();
    let usage = h
        .control(move |_rx, rt, reply| reply(_rx, Ok(rt.object_usage(vol))))
        .expect("usage")
        .expect("volume");
    assert_eq!(
        usage.allocated_bytes, 65536,
        "only the acknowledged write is mapped; the stale record was fenced off"
    );
}

/// Thick volumes reserve their size: a thin volume filling the pool gets ENOSPC while the
/// thick one — even after a snapshot made all its clusters shared — can still be written
/// whole; reservations count as used and survive a re-import; the overcommit limit bounds
/// what can be provisioned, atomically on the owner.
#[test]
fn thick_volumes_can_always_be_written_whole_and_overcommit_is_enforced() {
    let h = Harness::new(96 << 20);
    let cl = 65536u64;
    let usage = || {
        h.control(|_rx, rt, reply| reply(_rx, Ok(rt.usage())))
            .expect("usage")
    };
    let cap = usage().capacity_bytes;
    // Overcommit: the default limit 1.0 refuses provisioning past the capacity.
    let meta = |name: &str, size: u64, thick: bool| VolumeMeta {
        name: name.into(),
        size_bytes: size,
        thick,
        ..VolumeMeta::default()
    };
    let too_big = meta("big", cap + cl, false);
    let e = h
        .control(move |rx, rt, reply| rt.create_volume(rx, too_big, reply))
        .expect_err("past the overcommit limit");
    assert!(e.contains("overcommit"), "{e}");
    h.control(|rx, rt, reply| rt.set_overcommit(rx, 3000, reply))
        .expect("raise the limit");
    let t_size = 20 * cl;
    let t_meta = meta("thick", t_size, true);
    let t = h
        .control(move |rx, rt, reply| rt.create_volume(rx, t_meta, reply))
        .expect("thick");
    assert_eq!(
        usage().reserved_bytes,
        t_size,
        "a new thick volume reserves its size"
    );
    for c in 0..20 {
        h.io(t, IoReq::Write(c * cl, vec![1u8; 65536], false))
            .expect("write thick whole");
    }
    assert_eq!(
        usage().reserved_bytes,
        0,
        "written whole: nothing left to reserve"
    );
    let sm = meta("thick-snap", 0, false);
    h.control(move |rx, rt, reply| rt.snapshot(rx, vec![(t, sm)], reply))
        .expect("snapshot of thick");
    assert_eq!(
        usage().reserved_bytes,
        t_size,
        "after a snapshot every cluster is shared: reserved again"
    );
    // A thin volume takes everything else.
    let b_meta = meta("thin", 2 * cap, false);
    let b = h
        .control(move |rx, rt, reply| rt.create_volume(rx, b_meta, reply))
        .expect("thin, overcommitted");
    let mut lc = 0;
    loop {
        match h.io(b, IoReq::Write(lc * cl, vec![2u8; 4096], false)) {
            Ok(_) => lc += 1,
            Err(e) => {
                assert_eq!(e, Errno::ENOSPC);
                break;
            }
        }
    }
    let u = usage();
    assert_eq!(u.free_bytes, 0, "{u:?}");
    assert!(
        u.allocated_bytes + u.reserved_bytes <= u.capacity_bytes,
        "{u:?}"
    );
    // The thick volume is still writable whole (copy-on-write of every cluster).
    for c in 0..20 {
        // Partial writes: each copies its shared cluster up first.
        h.io(t, IoReq::Write(c * cl + 4096, vec![3u8; 4096], false))
            .expect("thick volume written whole on a full pool");
    }
    let more = meta("thick2", cl, true);
    let e = h
        .control(move |rx, rt, reply| rt.create_volume(rx, more, reply))
        .expect_err("no space to reserve");
    assert!(e.contains("no space"), "{e}");
    // Re-import: the reserve is recomputed from the maps (the volume holds all it needs).
    h.stop();
    h.start();
    assert_eq!(usage().reserved_bytes, 0);
    assert_eq!(usage().overcommit_milli, 3000, "the limit is persistent");
}

/// A FUA overwrite of a cluster whose map record is not flushed yet flushes the journal
/// before it is acknowledged (else power loss unmaps the cluster under a FUA write); once
/// the record is flushed, FUA overwrites cost no journal flush.
#[test]
fn a_fua_overwrite_makes_its_clusters_mapping_durable_first() {
    let h = Harness::new(96 << 20);
    let flushes = || {
        h.control(|_rx, rt, reply| reply(_rx, Ok(rt.journal_stats().flushes)))
            .expect("stats")
    };
    let vol = h.create("fua", 1 << 20);
    h.io(vol, IoReq::Write(0, vec![1u8; 4096], false))
        .expect("allocating write");
    let before = flushes();
    h.io(vol, IoReq::Write(8192, vec![2u8; 4096], true))
        .expect("FUA overwrite");
    assert_eq!(flushes(), before + 1, "the mapping was flushed first");
    h.io(vol, IoReq::Write(16384, vec![3u8; 4096], true))
        .expect("FUA overwrite");
    assert_eq!(flushes(), before + 1, "nothing left to flush");
}

/// The journal never runs more than one write's reach (64 blocks) past the last flush:
/// after a power loss any of those blocks may be missing, and import tells a torn tail
/// from a damaged journal by that distance. With nobody flushing, it flushes by itself.
#[test]
fn the_journal_flushes_by_itself_before_running_a_write_reach_ahead() {
    let h = Harness::new(96 << 20);
    let vol = h.create("ahead", 32 << 20);
    let stats = || {
        h.control(|_rx, rt, reply| reply(_rx, Ok(rt.journal_stats())))
            .expect("stats")
    };
    let before = stats();
    for i in 0..300u64 {
        // One allocating write at a time: one commit, one journal block each.
        let lc = i;
        h.io(vol, IoReq::Write(lc * 65536, vec![1u8; 4096], false))
            .expect("write");
    }
    let after = stats();
    let blocks = after.blocks - before.blocks;
    assert!(blocks >= 300, "{blocks} journal blocks");
    assert!(
        after.flushes - before.flushes >= blocks / 64,
        "{} flushes for {blocks} blocks written with nobody asking",
        after.flushes - before.flushes
    );
}

/// Control operations on one pool run one at a time on its owner: two creates of one name
/// or two deletes of one volume issued together never both reach the journal (replay would
/// refuse the pool), and the pool re-imports.
#[test]
fn concurrent_control_operations_never_journal_contradictions() {
    let h = Harness::new(96 << 20);
    let v = h.create("twice", 1 << 20);
    let (tx, rx_done) = crossbeam::channel::unbounded::<(u8, Result<u32, String>)>();
    h.set.remotes()[0]
        .call(move |rx: &Reactor| {
            let rt = RT.with(|r| r.borrow().clone()).expect("pool");
            for k in 0..2u8 {
                let tx2 = tx.clone();
                rt.delete_volume(
                    rx,
                    v,
                    Box::new(move |_rx, r| tx2.send((k, r.map(|()| 0))).expect("send")),
                );
                let tx3 = tx.clone();
                let meta = VolumeMeta {
                    name: "same".into(),
                    size_bytes: 1 << 20,
                    ..VolumeMeta::default()
                };
                rt.create_volume(
                    rx,
                    meta,
                    Box::new(move |_rx, r| tx3.send((10 + k, r)).expect("send")),
                );
            }
        })
        .expect("call");
    let mut answers: Vec<(u8, Result<u32, String>)> = (0..4)
        .map(|_| {
            rx_done
                .recv_timeout(Duration::from_secs(10))
                .expect("answer")
        })
        .collect();
    answers.sort_by_key(|a| a.0);
    let oks = |lo: u8| {
        answers
            .iter()
            .filter(|a| a.0 / 10 == lo && a.1.is_ok())
            .count()
    };
    assert_eq!(oks(0), 1, "one delete succeeds: {answers:?}");
    assert_eq!(oks(1), 1, "one create succeeds: {answers:?}");
    h.stop();
    h.start();
    let t = h
        .control(|_rx, rt, reply| reply(_rx, Ok(rt.volumes())))
        .expect("table");
    assert_eq!(t.volumes.len(), 1, "{t:?}");
}

/// Export records (journal record type 8) survive a restart through the journal and
/// through a checkpoint, die with their object, and `verify` accepts them (and the pool
/// settings record) in a checkpoint.
#[test]
fn control_records_survive_restarts_and_checkpoints_and_die_with_their_object() {
    let h = Harness::new(64 << 20);
    let vol = h.create("exported", 4 << 20);
    let snaps = h
        .control(move |rx, rt, reply| {
            let meta = VolumeMeta {
                name: "exported-snap".into(),
                uuid: [2; 16],
                ..VolumeMeta::default()
            };
            rt.snapshot(rx, vec![(vol, meta)], reply);
        })
        .expect("snapshot");
    let snap = snaps[0];
    for (id, data) in [
        (vol, b"vol-record".to_vec()),
        (snap, b"snap-record".to_vec()),
    ] {
        h.control(move |rx, rt, reply| rt.set_control(rx, id, data, reply))
            .expect("set control");
    }
    let err = h
        .control(|rx, rt, reply| rt.set_control(rx, 999, b"x".to_vec(), reply))
        .expect_err("unknown id");
    assert!(err.contains("unknown id 999"), "{err}");
    h.control(|rx, rt, reply| rt.set_overcommit(rx, 1500, reply))
        .expect("overcommit");
    let table = |h: &Harness| {
        h.control(|rx, rt, reply| reply(rx, Ok(rt.volumes())))
            .expect("table")
    };
    // Through the journal.
    h.stop();
    h.start();
    let t = table(&h);
    assert_eq!(t.control[&vol], b"vol-record");
    assert_eq!(t.control[&snap], b"snap-record");
    // Through a checkpoint.
    h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
        .expect("checkpoint");
    h.stop();
    let c = BlockingDevice::new(Arc::clone(&h.dev), h.set.remotes()[0].clone()).expect("client");
    let report = crate::lvs::verify::verify(&c);
    assert!(report.is_clean(), "{report:?}");
    drop(c);
    h.start();
    let t = table(&h);
    assert_eq!(t.control.len(), 2, "{:?}", t.control);
    assert_eq!(t.overcommit(), 1500);
    // Cleared, and deleted with the object.
    h.control(move |rx, rt, reply| rt.set_control(rx, vol, Vec::new(), reply))
        .expect("clear");
    h.control(move |rx, rt, reply| rt.delete_volume(rx, snap, reply))
        .expect("delete snapshot");
    h.stop();
    h.start();
    assert!(table(&h).control.is_empty());
}

#[test]
fn segments_cover_a_request_once_cluster_by_cluster_and_know_their_count() {
    let mut rng = Rng::new(seed_or(7));
    for _ in 0..2000 {
        let cluster = 4096u64 << rng.below(5);
        let offset = rng.below(1 << 22) / 512 * 512;
        let len = (rng.below(1 << 20) / 512 + 1) * 512;
        let segs = segments(offset, len, cluster);
        let n = segs.len();
        let v: Vec<Seg> = segs.collect();
        assert_eq!(v.len(), n, "len() at {offset}+{len}, cluster {cluster}");
        let mut at = offset;
        for s in &v {
            assert_eq!(s.lc * cluster + s.in_cluster, at);
            assert_eq!(s.buf_off as u64, at - offset);
            assert!(
                s.in_cluster + s.len as u64 <= cluster,
                "a piece crosses a cluster"
            );
            at += s.len as u64;
        }
        assert_eq!(at, offset + len, "the pieces cover the request exactly");
    }
    assert_eq!(segments(0, 0, 4096).len(), 0);
}

#[test]
fn the_int_hasher_keeps_cluster_keys_apart() {
    let mut m: IntMap<(u32, u64), u32> = IntMap::default();
    for pc in 0..5000u32 {
        m.insert((pc, u64::from(pc) << 20), pc);
    }
    for pc in 0..5000u32 {
        assert_eq!(m.get(&(pc, u64::from(pc) << 20)), Some(&pc));
    }
    assert_eq!(m.len(), 5000);
}

/// A device whose largest transfer is smaller than a cluster and than the store's own
/// metadata writes (NVMe controllers often take 128-512 KiB per command): copy-ups,
/// journal writes and checkpoints go in pieces it takes, and the data survives a re-import.
#[test]
fn a_device_with_a_small_largest_transfer_takes_copy_ups_journal_and_checkpoints() {
    let piece = 8192u32;
    let dev = MallocDevice::new(64 << 20)
        .expect("malloc")
        .with_max_transfer(piece);
    let h = Harness::on(Arc::new(dev), 1 << 20);
    let vol = h.create("big-clusters", 8 << 20);
    let pattern = |c: u64, off: u64| u8::try_from((c * 7 + off / 4096) % 251).expect("small") + 1;
    for c in 0..8u64 {
        for off in (0..1u64 << 20).step_by(piece as usize) {
            h.io(
                vol,
                IoReq::Write(c << 20 | off, vec![pattern(c, off); piece as usize], false),
            )
            .unwrap_or_else(|e| panic!("write cluster {c} at {off}: {e}"));
        }
    }
    // A snapshot, then one small overwrite per cluster: each copies its 1 MiB cluster up.
    let meta = VolumeMeta {
        name: "snap".into(),
        uuid: [2; 16],
        ..VolumeMeta::default()
    };
    let snap = h
        .control(move |rx, rt, reply| rt.snapshot(rx, vec![(vol, meta)], reply))
        .expect("snapshot");
    assert_eq!(snap.len(), 1);
    for c in 0..8u64 {
        h.io(vol, IoReq::Write(c << 20 | 12288, vec![0xEE; 4096], true))
            .unwrap_or_else(|e| panic!("copy-up of cluster {c}: {e}"));
    }
    // Enough objects that the checkpoint takes several writes.
    for i in 0..40u8 {
        let meta = VolumeMeta {
            name: format!("labelled-{i}"),
            uuid: [i + 10; 16],
            size_bytes: 256 << 10,
            labels: (0..8)
                .map(|k| (format!("key-{k}"), "v".repeat(90)))
                .collect(),
            ..VolumeMeta::default()
        };
        h.control(move |rx, rt, reply| rt.create_volume(rx, meta, reply))
            .unwrap_or_else(|e| panic!("create: {e}"));
    }
    let n = h
        .control(|rx, rt, reply| reply(rx, Ok(rt.volumes().volumes.len())))
        .expect("volumes");
    assert_eq!(n, 41, "volumes in the table");
    h.control(|rx, rt, reply| rt.checkpoint(rx, reply))
        .expect("checkpoint");
    let (stats, sb) = h
        .control(|rx, rt, reply| reply(rx, Ok((rt.stats(), rt.superblock()))))
        .expect("stats");
    assert_eq!(stats.copy_ups, 8, "{stats:?}");
    assert!(
        sb.ckpt_len > u64::from(piece),
        "the checkpoint ({} bytes) should need several writes of {piece}",
        sb.ckpt_len
    );
    // More journal after the checkpoint, then a crash: import reads both back.
    h.io(vol, IoReq::Write(7 << 20 | 16384, vec![0xDD; 4096], false))
        .expect("write after the checkpoint");
    h.stop();
    h.start();
    for c in 0..8u64 {
        for off in (0..1u64 << 20).step_by(4096) {
            let got = h.io(vol, IoReq::Read(c << 20 | off, 4096)).expect("read");
            let want = match (c, off) {
                (_, 12288) => 0xEE,
                (7, 16384) => 0xDD,
                _ => pattern(c, off - off % u64::from(piece)),
            };
            assert!(
                got.iter().all(|&b| b == want),
                "cluster {c} at {off}: {} not {want}",
                got[0]
            );
        }
    }
}
