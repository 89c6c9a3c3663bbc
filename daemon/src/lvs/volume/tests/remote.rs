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
            let io = match io {
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
            };
            ch.submit(
                rx,
                io,
                FnCompletion::boxed(move |_rx, res, buf| {
                    tx.send(res.map(|_| buf.map(|b| b.to_vec()).unwrap_or_default()))
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
    let total = h.counts().zeroed;
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
                    tx.send(res.map(|_| buf.map(|b| b.to_vec()).unwrap_or_default()))
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
        (c.recycling, c.zeroed + c.in_use),
        (0, total),
        "the held cluster was recycled after the read finished: {c:?}"
    );
    drop_remote(&h);
}
