//! What recording a ublk request in the per-export IO counters costs
//! (`coreblk_daemon::export::stats::Recorder`), measured on the host: the recording sits
//! in the ublk queue only, which `coreblk-bench` does not drive (no ublk here).
//!
//! Run: `cargo run --release -p coreblk-bench --example export_stats_cost`. Prints
//! nanoseconds per request for: an empty loop, the recorder (start + finish with the
//! reactor's loop-iteration time), the same with two fresh clock reads per request, and
//! the queue's older counters (three locked `fetch_add`s) for comparison.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use coreblk_daemon::export::stats::{Recorder, Registry};
use coreblk_daemon::export::{DescOp, Plan};

const N: u32 = 20_000_000;
const DEPTH: u16 = 128;
/// Requests per simulated loop iteration (the clock is read once per iteration).
const PER_ITERATION: u32 = 32;

fn per_request(label: &str, f: impl FnOnce() -> u64) {
    let t = Instant::now();
    let sink = f();
    let ns = t.elapsed().as_secs_f64() * 1e9 / f64::from(N);
    println!("{label:<48} {ns:6.2} ns/request  (sink {})", sink % 10);
}

fn request(i: u32) -> (u16, DescOp, Plan) {
    let tag = u16::try_from(i % u32::from(DEPTH)).expect("below the depth");
    let off = u64::from(i) * 4096;
    if i.is_multiple_of(3) {
        (
            tag,
            DescOp::Write,
            Plan::Write {
                offset: off,
                len: 4096,
                fua: false,
            },
        )
    } else {
        (
            tag,
            DescOp::Read,
            Plan::Read {
                offset: off,
                len: 4096,
            },
        )
    }
}

fn main() {
    for round in 0..3 {
        println!("round {round}");
        per_request("empty loop", || {
            let mut s = 0u64;
            for i in 0..N {
                let (tag, op, p) = black_box(request(i));
                s = s.wrapping_add(u64::from(tag) + u64::from(op == DescOp::Read));
                black_box(&p);
            }
            s
        });
        let reg = Registry::new();
        let rec = Recorder::with_registry(&reg, 1, DEPTH);
        per_request("recorder, loop-iteration clock", || {
            let mut now = Instant::now();
            for i in 0..N {
                if i.is_multiple_of(PER_ITERATION) {
                    now = Instant::now();
                }
                let (tag, op, p) = black_box(request(i));
                rec.start(tag, op, &p, now);
                // The previous request on this tag's slot finishes (one in flight per tag).
                rec.finish(tag, 4096, now);
            }
            reg.collect()[&1].ops.iter().sum()
        });
        let reg = Registry::new();
        let rec = Recorder::with_registry(&reg, 1, DEPTH);
        per_request("recorder, two clock reads per request", || {
            for i in 0..N {
                let (tag, op, p) = black_box(request(i));
                rec.start(tag, op, &p, Instant::now());
                rec.finish(tag, 4096, Instant::now());
            }
            reg.collect()[&1].ops.iter().sum()
        });
        let (ops, bytes, errors) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        per_request("three fetch_add (the queue's QueueStats)", || {
            for i in 0..N {
                let (tag, _, p) = black_box(request(i));
                black_box(&p);
                ops.fetch_add(1, Relaxed);
                if tag == u16::MAX {
                    errors.fetch_add(1, Relaxed);
                } else {
                    bytes.fetch_add(4096, Relaxed);
                }
            }
            ops.load(Relaxed) + bytes.load(Relaxed) + errors.load(Relaxed)
        });
    }
}
