//! Serving volumes from reactors other than the pool's owner: reads on the serving
//! reactor, everything else forwarded to the owner; random IO from both reactors against a
//! byte model (with snapshots read remotely); and the grace period that keeps a cluster a
//! remote read found from being zeroed and reused under it.

use super::*;
use crate::bdev::fault::{FaultAction, FaultDevice, FaultRule, OpMatch};

thread_local! {
    /// The remote channels of reactor 1, by volume id.
    static REMOTE: RefCell<HashMap<u32, Rc<dyn Channel>>> = RefCell::new(HashMap::new());
}

/// Opens (once) the channel of `vol` on reactor 1 through a handle made on the owner.
fn remote_io(h: &Harness, vol: u32, io: IoReq) -> Result<Vec<u8>, Errno> {
    let open = !h.set.remotes()[1]
        .call(move |_rx: &Reactor| REMOTE.with(|r| r.borrow().contains_key(&vol)))
        .expect("call");
    if open {
        let handle = h
            .control(move |rx, rt, reply| reply(rx, rt.volume_handle(rx, vol)))
            .expect("handle");
        h.set.remotes()[1]
            .call(move |rx: &Reactor| {
                let ch = handle.open(rx).expect("open remotely");
                REMOTE.with(|r| r.borrow_mut().insert(vol, ch));
            })
            .expect("call");
    }
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    h.set.remotes()[1]
        .call(move |rx: &Reactor| {
            let ch = REMOTE
                .with(|r| r.borrow().get(&vol).cloned())
                .expect("open");
            let io = io.into_io();
            ch.submit(
                rx,
                io,
                FnCompletion::boxed(move |_rx, res, buf| {
                    tx.send(res.map(|_| buf.and_then(|b| b.to_vec()).unwrap_or_default()))
                        .expect("send");
                }),
                0,
            );
        })
        .expect("call");
    rx_done
        .recv_timeout(Duration::from_secs(20))
        .expect("remote io completed")
}

fn two_reactor_harness(dev: Arc<dyn BlockDevice>) -> Harness {
    let set = reactors(2, 8);
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone()).expect("client");
    pool::create(&client, DEFAULT_CLUSTER_BYTES, [11; 16]).expect("create");
    let h = Harness { set, dev };
    h.start();
    h
}

fn drop_remote(h: &Harness) {
    h.set.remotes()[1]
        .call(|_rx: &Reactor| REMOTE.with(|r| r.borrow_mut().clear()))
        .expect("call");
}

#[test]
fn io_from_two_reactors_matches_a_byte_model() {
    let seed = seed_or(0x2eac_7025);
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(96 << 20).expect("malloc"));
    let h = two_reactor_harness(dev);
    let size: u64 = 2 << 20;
    let vol = h.create("shared", size);
    let mut model = vec![0u8; 2 << 20];
    let mut snaps: Vec<(u32, Vec<u8>)> = Vec::new();
    let idx = |v: u64| usize::try_from(v).expect("small");
    for step in 0..400 {
        let remote = rng.below(2) == 1;
        let io = |req: IoReq| {
            if remote {
                remote_io(&h, vol, req)
            } else {
                h.io(vol, req)
            }
        };
        let off = rng.below(size / 4096) * 4096;
        let len = ((1 + rng.below(40)) * 4096).min(size - off);
        match rng.below(12) {
            0..=3 => {
                let b = u8::try_from(step % 250).expect("small") + 1;
                io(IoReq::Write(off, vec![b; idx(len)], rng.below(8) == 0)).expect("write");
                model[idx(off)..idx(off + len)].fill(b);
            }
            4..=6 => {
                let got = io(IoReq::Read(off, idx(len))).expect("read");
                assert!(
                    got == model[idx(off)..idx(off + len)],
                    "step {step}: read {off}+{len} on reactor {} differs (seed {seed})",
                    u8::from(remote)
                );
            }
            7 => {
                io(IoReq::Zero(off, len)).expect("write-zeroes");
                model[idx(off)..idx(off + len)].fill(0);
            }
            8 => {
                io(IoReq::Discard(off, len)).expect("discard");
                let c = 65536;
                let (first, end) = (off.div_ceil(c) * c, (off + len) / c * c);
                if end > first {
                    model[idx(first)..idx(end)].fill(0);
                }
            }
            9 => {
                io(IoReq::Flush).expect("flush");
            }
            10 => {
                let m = VolumeMeta {
                    name: format!("snap{step}"),
                    ..VolumeMeta::default()
                };
                let ids = h
                    .control(move |rx, rt, reply| rt.snapshot(rx, vec![(vol, m)], reply))
                    .expect("snapshot");
                snaps.push((ids[0], model.clone()));
            }
            _ => {
                // Read a snapshot on the other reactor; sometimes delete the oldest.
                if let Some((sid, data)) = snaps.first().cloned() {
                    let got =
                        remote_io(&h, sid, IoReq::Read(off, idx(len))).expect("read snapshot");
                    assert!(
                        got == data[idx(off)..idx(off + len)],
                        "step {step}: snapshot {sid} read remotely differs (seed {seed})"
                    );
                    if rng.below(3) == 0 {
                        h.delete(sid);
                        snaps.remove(0);
                        assert_eq!(
                            remote_io(&h, sid, IoReq::Read(0, 4096)),
                            Err(Errno(libc::ENODEV)),
                            "a deleted snapshot's remote channel refuses IO"
                        );
                    }
                }
            }
        }
    }
    drop_remote(&h);
}

/// A read on another reactor found cluster P through the map and is slow to reach the
/// device; meanwhile the owner unmaps P and the pool runs short of space, so P would be
/// zeroed and handed to another volume at once. The grace period holds P back until that
/// read finished: it returns the data it looked up, never the other volume's.
#[test]
fn a_remote_read_never_sees_a_cluster_reused_under_it() {
    let malloc: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(64 << 20).expect("malloc"));
    let (fdev, rules) = FaultDevice::new(malloc);
    let h = two_reactor_harness(fdev);
    let total = h.counts().zeroed + h.counts().clean;
    let a = h.create("a", 1 << 20);
    h.control(|rx, rt, reply| rt.set_overcommit(rx, 2000, reply))
        .expect("overcommit");
    let b = h.create("b", (total + 16) * 65536);
    h.io(a, IoReq::Write(0, vec![0xAA; 65536], false))
        .expect("write a");
    // Open the remote channel first, then hold the next read 300 ms before the device.
    remote_io(&h, a, IoReq::Read(65536, 4096)).expect("open and read unmapped");
    rules.push(
        FaultRule::new(
            OpMatch::Read,
            FaultAction::Delay(Duration::from_millis(300)),
        )
        .times(1),
    );
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    h.set.remotes()[1]
        .call(move |rx: &Reactor| {
            let ch = REMOTE.with(|r| r.borrow().get(&a).cloned()).expect("open");
            ch.submit(
                rx,
                Io::Read {
                    offset: 0,
                    buf: IoBuf::alloc(4096),
                },
                FnCompletion::boxed(move |_rx, res, buf| {
                    tx.send(res.map(|_| buf.and_then(|b| b.to_vec()).unwrap_or_default()))
                        .expect("send");
                }),
                0,
            );
        })
        .expect("call");
    std::thread::sleep(Duration::from_millis(20));
    h.io(a, IoReq::Discard(0, 65536)).expect("discard");
    // Fill the pool through b: every cluster that becomes ready is taken.
    let start = Instant::now();
    let mut lc = 0;
    while start.elapsed() < Duration::from_millis(250) {
        match h.io(b, IoReq::Write(lc * 65536, vec![0xBB; 4096], false)) {
            Ok(_) => lc += 1,
            Err(e) => {
                assert_eq!(e, Errno::ENOSPC);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    let got = rx_done
        .recv_timeout(Duration::from_secs(5))
        .expect("delayed read done")
        .expect("read ok");
    assert!(
        got.iter().all(|&x| x == 0xAA),
        "the remote read returned {:#x}.., not the data it looked up ({} clusters of b written)",
        got[0],
        lc
    );
    // Once the read is done, the held cluster goes back through the pipeline (to the
    // ready queue, or to a write of b that was waiting for space).
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.counts().recycling > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = h.counts();
    assert_eq!(
        (c.recycling, c.zeroed + c.clean + c.in_use),
        (0, total),
        "the held cluster was recycled after the read finished: {c:?}"
    );
    drop_remote(&h);
}

/// Concurrency: reactor 1 keeps 8 writes in flight to a volume (each block gets unique
/// stamps) while the owner takes snapshots and deletes older ones. Every snapshot holds,
/// for every block, the last write acknowledged before it was asked for, or a write that
/// was in flight meanwhile — never one submitted after it completed; and the volume reads
/// its last acknowledged writes at the end.
#[test]
fn snapshots_and_deletes_while_another_reactor_writes_keep_point_in_time_contents() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    /// (block, value, submit tick, ack tick) of every write.
    type WriteLog4 = Arc<Mutex<Vec<(u64, u64, u64, u64)>>>;
    let dev: Arc<dyn BlockDevice> = Arc::new(MallocDevice::new(96 << 20).expect("malloc"));
    let h = two_reactor_harness(dev);
    let blocks = 128u64; // 8 clusters
    let vol = h.create("busy", blocks * 4096);
    remote_io(&h, vol, IoReq::Read(0, 4096)).expect("open remotely");
    // Writes: (block, value, submit tick, ack tick); ticks from one shared clock.
    let clock = Arc::new(AtomicU64::new(1));
    let log: WriteLog4 = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    struct Writer {
        ch: Rc<dyn Channel>,
        clock: Arc<AtomicU64>,
        log: WriteLog4,
        stop: Arc<AtomicBool>,
        next: Cell<u64>,
        live: Cell<u32>,
        done: RefCell<Option<crossbeam::channel::Sender<()>>>,
    }
    impl Writer {
        fn issue(self: &Rc<Self>, rx: &Reactor) {
            let v = self.next.get();
            self.next.set(v + 1);
            let block = (v * 7919) % 128;
            let submit = self.clock.fetch_add(1, Ordering::SeqCst);
            let me = Rc::clone(self);
            self.live.set(self.live.get() + 1);
            self.ch.submit(
                rx,
                Io::Write {
                    offset: block * 4096,
                    buf: IoBuf::from_slice(&v.to_le_bytes().repeat(512)),
                    fua: false,
                },
                FnCompletion::boxed(move |rx, res, _| {
                    res.expect("write");
                    let ack = me.clock.fetch_add(1, Ordering::SeqCst);
                    me.log.lock().expect("log").push((block, v, submit, ack));
                    me.live.set(me.live.get() - 1);
                    if !me.stop.load(Ordering::SeqCst) {
                        me.issue(rx);
                    } else if me.live.get() == 0 {
                        if let Some(tx) = me.done.borrow_mut().take() {
                            tx.send(()).expect("send");
                        }
                    }
                }),
                0,
            );
        }
    }
    let (tx, rx_done) = crossbeam::channel::bounded(1);
    {
        let (clock, log, stop) = (Arc::clone(&clock), Arc::clone(&log), Arc::clone(&stop));
        h.set.remotes()[1]
            .call(move |rx: &Reactor| {
                let ch = REMOTE
                    .with(|r| r.borrow().get(&vol).cloned())
                    .expect("open");
                let w = Rc::new(Writer {
                    ch,
                    clock,
                    log,
                    stop,
                    next: Cell::new(1),
                    live: Cell::new(0),
                    done: RefCell::new(Some(tx)),
                });
                for _ in 0..8 {
                    w.issue(rx);
                }
            })
            .expect("call");
    }
    // Snapshots with their (asked, done) ticks; delete every other one as we go.
    let mut snaps: Vec<(u32, u64, u64)> = Vec::new();
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(15));
        let asked = clock.fetch_add(1, Ordering::SeqCst);
        let m = VolumeMeta {
            name: format!("busy-{i}"),
            ..VolumeMeta::default()
        };
        let id = h
            .control(move |rx, rt, reply| rt.snapshot(rx, vec![(vol, m)], reply))
            .expect("snapshot")[0];
        let done = clock.fetch_add(1, Ordering::SeqCst);
        if i % 2 == 1 {
            let (old, _, _) = snaps.pop().expect("previous");
            h.delete(old);
        }
        snaps.push((id, asked, done));
    }
    stop.store(true, Ordering::SeqCst);
    rx_done
        .recv_timeout(Duration::from_secs(20))
        .expect("writer drained");
    let log = log.lock().expect("log").clone();
    assert!(log.len() > 100, "{} writes", log.len());
    for (sid, asked, done) in &snaps {
        for b in 0..blocks {
            let got = remote_io(&h, *sid, IoReq::Read(b * 4096, 4096)).expect("read snapshot");
            let v = u64::from_le_bytes(got[..8].try_into().expect("8"));
            let w: Vec<_> = log.iter().filter(|w| w.0 == b).collect();
            let base = w
                .iter()
                .filter(|w| w.3 < *asked)
                .max_by_key(|w| w.3)
                .map_or(0, |w| w.1);
            let racing: Vec<u64> = w
                .iter()
                .filter(|w| w.3 >= *asked && w.2 <= *done)
                .map(|w| w.1)
                .collect();
            assert!(
                v == base || racing.contains(&v),
                "snapshot {sid} block {b} reads {v}: last acknowledged before it {base}, in flight meanwhile {racing:?}"
            );
        }
    }
    for b in 0..blocks {
        let got = remote_io(&h, vol, IoReq::Read(b * 4096, 4096)).expect("read");
        let v = u64::from_le_bytes(got[..8].try_into().expect("8"));
        let last = log
            .iter()
            .filter(|w| w.0 == b)
            .max_by_key(|w| w.3)
            .map_or(0, |w| w.1);
        assert_eq!(v, last, "block {b} of the volume");
    }
    drop_remote(&h);
}
