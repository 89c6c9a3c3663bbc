//! The guest side: formats a pool on a block device (through the `uring` backend, as the
//! daemon does), imports it, starts its runtime on a reactor and runs a seeded mixed
//! workload on thin volumes — concurrent writes (some FUA, some overlapping), discards,
//! write-zeroes, flushes, snapshots, clones, rollbacks, deletes, resizes and checkpoints —
//! recording the model of what every block may read. After each step it puts a mark
//! `s<step>` into the dm-log-writes log (`dmsetup message <target> 0 mark`), so the host
//! knows which steps were acknowledged at each point of the log.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use coreblk_daemon::bdev::blocking::BlockingDevice;
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::{BlockDevice, Channel, Io};
use coreblk_daemon::lvs::pool::{self, VolumeMeta, DEFAULT_CLUSTER_BYTES};
use coreblk_daemon::lvs::volume::{PoolRt, Reply};
use coreblk_daemon::reactor::{Completion, Errno, IoBuf, IoResult, Reactor, ReactorSet};
use coreblk_daemon::testing::{reactors, Rng};

use crate::model::{stamp, MObj, Model, Step, BLK};

/// Size of every volume the workload creates (32 clusters of 64 KiB).
const VOL_BYTES: u64 = 2 << 20;
/// How long one batch or control operation may take (TCG is slow).
const OP_TIMEOUT: Duration = Duration::from_secs(120);

thread_local! {
    static RT: RefCell<Option<Rc<PoolRt>>> = const { RefCell::new(None) };
    static CHS: RefCell<HashMap<u32, Rc<dyn Channel>>> = RefCell::new(HashMap::new());
}

/// What the workload is told.
#[derive(Debug)]
pub struct Args {
    /// The block device (or file) to format.
    pub device: PathBuf,
    /// Where `model.json` and `steps.jsonl` go.
    pub out: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// Number of steps.
    pub steps: usize,
    /// The dm-log-writes target to mark, if any.
    pub mark_target: Option<String>,
}

/// A request as the workload describes it (sent to the reactor, where it becomes an `Io`).
#[derive(Clone, Debug)]
enum Req {
    Write(u64, Vec<u8>, bool),
    Flush,
    Discard(u64, u64),
    Zero(u64, u64),
}

/// Completions of one batch, reported by tag (the request's index).
struct BatchDone(crossbeam::channel::Sender<(usize, Result<(), Errno>)>);

impl Completion for BatchDone {
    fn complete(&self, _rx: &Reactor, tag: u64, res: IoResult, _buf: Option<IoBuf>) {
        let i = usize::try_from(tag).unwrap_or(usize::MAX);
        // The waiter gave up (timeout) if this fails; it reports that itself.
        let _ = self.0.send((i, res.map(drop)));
    }
}

struct Driver {
    set: ReactorSet,
    mark_target: Option<String>,
    t0: Instant,
}

impl Driver {
    fn us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Puts mark `name` into the dm-log-writes log.
    fn mark(&self, name: &str) -> Result<()> {
        match &self.mark_target {
            Some(t) => mark(t, name),
            None => Ok(()),
        }
    }

    /// Runs a control operation of the pool runtime on its reactor and waits for its reply.
    fn control<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Reactor, Rc<PoolRt>, Reply<T>) + Send + 'static,
    ) -> Result<T> {
        let (tx, rx_done) = crossbeam::channel::bounded(1);
        self.set.remotes()[0]
            .call(move |rx: &Reactor| match RT.with(|r| r.borrow().clone()) {
                Some(rt) => op(
                    rx,
                    rt,
                    Box::new(move |_rx, res| {
                        let _ = tx.send(res);
                    }),
                ),
                None => {
                    let _ = tx.send(Err("pool not running".into()));
                }
            })
            .map_err(|e| anyhow!("reactor call: {e:?}"))?;
        rx_done
            .recv_timeout(OP_TIMEOUT)
            .context("control operation not answered")?
            .map_err(|e| anyhow!(e))
    }

    /// Submits `ios` concurrently on the pool's reactor; returns when all completed.
    fn batch(&self, ios: Vec<(u32, Req)>) -> Result<()> {
        let n = ios.len();
        let (tx, rx_done) = crossbeam::channel::unbounded();
        self.set.remotes()[0]
            .call(move |rx: &Reactor| {
                let done: Rc<dyn Completion> = Rc::new(BatchDone(tx.clone()));
                for (i, (vol, req)) in ios.into_iter().enumerate() {
                    let ch = CHS.with(|c| -> Result<Rc<dyn Channel>, String> {
                        if let Some(ch) = c.borrow().get(&vol) {
                            return Ok(Rc::clone(ch));
                        }
                        let rt = RT.with(|r| r.borrow().clone()).ok_or("pool not running")?;
                        let ch = rt.open_volume(rx, vol)?;
                        c.borrow_mut().insert(vol, Rc::clone(&ch));
                        Ok(ch)
                    });
                    let ch = match ch {
                        Ok(ch) => ch,
                        Err(e) => {
                            eprintln!("open volume {vol}: {e}");
                            let _ = tx.send((i, Err(Errno(libc::ENODEV))));
                            continue;
                        }
                    };
                    let io = match req {
                        Req::Write(off, data, fua) => Io::Write {
                            offset: off,
                            buf: IoBuf::from_slice(&data),
                            fua,
                        },
                        Req::Discard(off, len) => Io::Discard { offset: off, len },
                        Req::Zero(off, len) => Io::WriteZeroes { offset: off, len },
                        Req::Flush => Io::Flush,
                    };
                    let tag = u64::try_from(i).unwrap_or(u64::MAX);
                    ch.submit(rx, io, Rc::clone(&done), tag);
                }
            })
            .map_err(|e| anyhow!("reactor call: {e:?}"))?;
        for _ in 0..n {
            let (i, r) = rx_done
                .recv_timeout(OP_TIMEOUT)
                .context("IO not completed")?;
            r.map_err(|e| anyhow!("request {i} of the batch failed: {e:?}"))?;
        }
        Ok(())
    }

    fn recycling(&self) -> Result<u64> {
        self.set.remotes()[0]
            .call(|_rx: &Reactor| {
                RT.with(|r| r.borrow().as_ref().map(|rt| rt.alloc_counts().recycling))
            })
            .map_err(|e| anyhow!("reactor call: {e:?}"))?
            .ok_or_else(|| anyhow!("pool not running"))
    }
}

fn meta(name: &str, uuid_byte: u8, size_bytes: u64) -> VolumeMeta {
    VolumeMeta {
        id: 0,
        uuid: [uuid_byte; 16],
        name: name.into(),
        size_bytes,
        labels: BTreeMap::new(),
        thick: false,
        written: false,
    }
}

fn pick(rng: &mut Rng, from: &[usize]) -> usize {
    from[usize::try_from(rng.below(from.len() as u64)).unwrap_or(0)]
}

fn small(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Runs the workload and writes `model.json` and `steps.jsonl` under `args.out`.
pub fn run(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let dev = UringDevice::open(&args.device)
        .with_context(|| format!("opening {}", args.device.display()))?;
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let device_bytes = dev.geometry().size_bytes;
    let set = reactors(1, 8);
    let client = BlockingDevice::new(Arc::clone(&dev), set.remotes()[0].clone())
        .map_err(|e| anyhow!("client: {e}"))?;
    let sb = pool::create(&client, DEFAULT_CLUSTER_BYTES, [0x1c; 16])
        .map_err(|e| anyhow!("pool create: {e}"))?;
    let imp = pool::import(&client).map_err(|e| anyhow!("pool import: {e}"))?;
    let start_dev = Arc::clone(&dev);
    set.remotes()[0]
        .call(move |rx: &Reactor| {
            PoolRt::start(rx, &start_dev, imp).map(|rt| RT.with(|r| *r.borrow_mut() = Some(rt)))
        })
        .map_err(|e| anyhow!("reactor call: {e:?}"))?
        .map_err(|e| anyhow!("pool start: {e}"))?;
    let d = Driver {
        set,
        mark_target: args.mark_target.clone(),
        t0,
    };
    // An import re-zeroes every unreferenced cluster: wait for it, then flush, so step 0
    // (the mark `s0`) is a durable, quiet pool.
    let deadline = Instant::now() + OP_TIMEOUT;
    while d.recycling()? > 0 {
        ensure!(
            Instant::now() < deadline,
            "free-cluster pipeline did not settle"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    client.flush().map_err(|e| anyhow!("flush: {e}"))?;
    let setup_us = d.us();
    let run_id = run_id();
    d.mark(&format!("run-{run_id:016x}"))?;
    d.mark("s0")?;
    let mut jl =
        BufWriter::new(File::create(args.out.join("steps.jsonl")).context("creating steps.jsonl")?);
    let mut model = Model {
        seed: args.seed,
        run_id,
        device_bytes,
        cluster_bytes: u64::from(sb.cluster_bytes),
        steps: vec![Step {
            index: 0,
            op: "start".into(),
            ios: 0,
            flush: true,
            submit_us: 0,
            ack_us: setup_us,
        }],
        objs: Vec::new(),
    };
    let mut rng = Rng::new(args.seed);
    for i in 1..=args.steps {
        let submit_us = d.us();
        let (op, ios, flush) = step(&d, &mut rng, &mut model.objs, i)
            .with_context(|| format!("step {i} (seed {})", args.seed))?;
        let s = Step {
            index: i,
            op: op.into(),
            ios,
            flush,
            submit_us,
            ack_us: d.us(),
        };
        writeln!(jl, "{}", serde_json::to_string(&s)?)?;
        model.steps.push(s);
        d.mark(&format!("s{i}"))?;
    }
    jl.flush()?;
    // Leave what is not flushed unflushed: the end of the log is a power loss too.
    d.set.remotes()[0]
        .call(|_rx: &Reactor| {
            CHS.with(|c| c.borrow_mut().clear());
            RT.with(|r| r.borrow_mut().take());
        })
        .map_err(|e| anyhow!("reactor call: {e:?}"))?;
    let f = File::create(args.out.join("model.json")).context("creating model.json")?;
    serde_json::to_writer(BufWriter::new(f), &model)?;
    let snaps = model.objs.iter().filter(|o| o.snapshot).count();
    println!(
        "powerloss workload (seed {}): {} steps, {} IOs/operations, {} objects ({snaps} snapshots) on {} ({} MiB) in {} ms (setup {} ms)",
        args.seed,
        args.steps,
        model.steps.iter().map(|s| s.ios).sum::<usize>(),
        model.objs.len(),
        args.device.display(),
        device_bytes >> 20,
        d.us() / 1000,
        setup_us / 1000
    );
    Ok(())
}

/// Puts mark `name` into the log of dm-log-writes target `target`.
pub fn mark(target: &str, name: &str) -> Result<()> {
    let st = Command::new("dmsetup")
        .args(["message", target, "0", "mark", name])
        .status()
        .context("running dmsetup message")?;
    ensure!(st.success(), "dmsetup message {target} 0 mark {name}: {st}");
    Ok(())
}

/// A run identity that differs between runs of the same seed (time and process id).
fn run_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() & u128::from(u64::MAX));
    let mixed = u64::try_from(nanos).unwrap_or(0)
        ^ (u64::from(std::process::id()) << 40)
        ^ 0x9e37_79b9_7f4a_7c15;
    Rng::new(mixed).next_u64().max(1)
}

/// Runs step `i`; returns its name, how many requests it made and whether it was a flush.
fn step(
    d: &Driver,
    rng: &mut Rng,
    objs: &mut Vec<MObj>,
    i: usize,
) -> Result<(&'static str, usize, bool)> {
    let live = |objs: &[MObj], snap: bool| -> Vec<usize> {
        (0..objs.len())
            .filter(|&k| objs[k].deleted.is_none() && objs[k].snapshot == snap)
            .collect()
    };
    let vols = live(objs, false);
    let snaps = live(objs, true);
    // Values are unique across the run: the step in the high bits, a counter below.
    let mut value = (u64::try_from(i)? << 32) | 1;
    let uuid = u8::try_from(i % 251)?;
    let what = if vols.len() < 2 && i < 4 {
        0
    } else {
        rng.below(20)
    };
    match what {
        0 => {
            let name = format!("v{i}");
            let m = meta(&name, uuid, VOL_BYTES);
            let id = d.control(move |rx, rt, reply| rt.create_volume(rx, m, reply))?;
            objs.push(MObj::new(id, name, i, small(VOL_BYTES / BLK)));
            Ok(("create", 1, false))
        }
        1..=9 => {
            // Concurrent writes, some overlapping, some FUA, some spanning clusters.
            let mut ios = Vec::new();
            let mut touched = Vec::new();
            for _ in 0..(2 + rng.below(7)) {
                let k = pick(rng, &vols);
                let o = &objs[k];
                let size = o.hist.len() as u64;
                let n = [1, 1, 2, 16, 20][small(rng.below(5))];
                let b = rng.below(size - n + 1);
                let fua = rng.below(6) == 0;
                let mut data = Vec::new();
                for j in 0..n {
                    data.extend(stamp(value));
                    touched.push((k, small(b + j), value, fua));
                    value += 1;
                }
                ios.push((o.id, Req::Write(b * BLK, data, fua)));
            }
            let n = ios.len();
            d.batch(ios)?;
            for (k, b, v, fua) in touched {
                objs[k].hist[b].push((i, v));
                if fua {
                    objs[k].fua[b].push(i);
                }
            }
            Ok(("write", n, false))
        }
        10 | 11 => {
            // Discards and write-zeroes, aligned or not.
            let cluster = u64::from(DEFAULT_CLUSTER_BYTES);
            let mut ios = Vec::new();
            let mut effects = Vec::new();
            for _ in 0..(1 + rng.below(3)) {
                let k = pick(rng, &vols);
                let o = &objs[k];
                let size = o.hist.len() as u64;
                let b = rng.below(size);
                let n = (1 + rng.below(40)).min(size - b);
                let zero = rng.below(2) == 0;
                let (off, len) = (b * BLK, n * BLK);
                ios.push((
                    o.id,
                    if zero {
                        Req::Zero(off, len)
                    } else {
                        Req::Discard(off, len)
                    },
                ));
                let (first, end) = (off.div_ceil(cluster), (off + len) / cluster);
                for blk in b..b + n {
                    let c = blk * BLK / cluster;
                    if zero || (c >= first && c < end) {
                        effects.push((k, small(blk)));
                    }
                }
            }
            let n = ios.len();
            d.batch(ios)?;
            for (k, b) in effects {
                objs[k].hist[b].push((i, 0));
            }
            Ok(("discard/zero", n, false))
        }
        12 | 13 => {
            d.batch(vec![(objs[vols[0]].id, Req::Flush)])?;
            Ok(("flush", 1, true))
        }
        14 => {
            // Snapshot of one or two volumes at one instant.
            let mut srcs = vec![pick(rng, &vols)];
            if vols.len() > 1 && rng.below(2) == 0 {
                if let Some(other) = vols.iter().copied().find(|&k| k != srcs[0]) {
                    srcs.push(other);
                }
            }
            let names: Vec<String> = (0..srcs.len()).map(|j| format!("s{i}-{j}")).collect();
            let group: Vec<(u32, VolumeMeta)> = srcs
                .iter()
                .zip(&names)
                .map(|(&k, name)| (objs[k].id, meta(name, uuid, VOL_BYTES)))
                .collect();
            let ids = d.control(move |rx, rt, reply| rt.snapshot(rx, group, reply))?;
            ensure!(
                ids.len() == srcs.len(),
                "snapshot returned {} ids",
                ids.len()
            );
            for ((&k, id), name) in srcs.iter().zip(ids).zip(names) {
                let s = objs[k].derive(id, name, i, true);
                objs.push(s);
            }
            Ok(("snapshot", srcs.len(), false))
        }
        15 if !snaps.is_empty() => {
            let k = pick(rng, &snaps);
            let src = objs[k].id;
            let name = format!("c{i}");
            let m = meta(&name, uuid, 0);
            let id = d.control(move |rx, rt, reply| rt.clone_volume(rx, src, m, reply))?;
            let c = objs[k].derive(id, name, i, false);
            objs.push(c);
            Ok(("clone", 1, false))
        }
        16 => {
            // Rollback of a volume to one of its snapshots, if one has any.
            let table = d.control(|rx, rt, reply| reply(rx, Ok(rt.volumes())))?;
            let pair = snaps.iter().find_map(|&s| {
                let src = table.lineage.get(&objs[s].id).map(|l| l.source)?;
                let v = vols.iter().copied().find(|&v| objs[v].id == src)?;
                Some((v, s))
            });
            let Some((v, s)) = pair else {
                return Ok(("rollback (none)", 0, false));
            };
            let (vid, sid) = (objs[v].id, objs[s].id);
            d.control(move |rx, rt, reply| rt.rollback(rx, vid, sid, reply))?;
            let snap_hist = objs[s].hist.clone();
            for (b, h) in objs[v].hist.iter_mut().enumerate() {
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
            Ok(("rollback", 1, false))
        }
        17 => {
            // Delete anything but the last volume (objects with dependents included).
            let all: Vec<usize> = (0..objs.len())
                .filter(|&k| objs[k].deleted.is_none())
                .filter(|&k| objs[k].snapshot || vols.len() > 1)
                .collect();
            if all.is_empty() {
                return Ok(("delete (none)", 0, false));
            }
            let k = pick(rng, &all);
            let id = objs[k].id;
            d.control(move |rx, rt, reply| rt.delete_volume(rx, id, reply))?;
            objs[k].deleted = Some(i);
            Ok(("delete", 1, false))
        }
        18 => {
            d.control(|rx, rt, reply| rt.checkpoint(rx, reply))?;
            Ok(("checkpoint", 1, false))
        }
        _ => {
            let k = pick(rng, &vols);
            let o = &mut objs[k];
            let new_blocks = o.hist.len() + 16;
            let (id, size) = (o.id, new_blocks as u64 * BLK);
            d.control(move |rx, rt, reply| rt.resize(rx, id, size, reply))?;
            o.hist.resize(new_blocks, vec![(i, 0)]);
            o.fua.resize(new_blocks, Vec::new());
            Ok(("resize", 1, false))
        }
    }
}

/// Checks the workload's arguments.
pub fn validate(args: &Args) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !Path::new(&args.device).exists() {
        bail!("{} does not exist", args.device.display());
    }
    Ok(())
}
