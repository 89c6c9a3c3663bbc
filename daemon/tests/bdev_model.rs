//! Model-based property test of the block device contract: random operations — valid and
//! invalid — against `malloc` and `uring` (a file) and against a plain byte-vector model.
//! Valid writes, discards and write-zeroes change the model; invalid requests (unaligned,
//! out of range, empty) must fail with EINVAL and change nothing; every read must match.

use std::sync::Arc;

use coreblk_daemon::bdev::blocking::{BlockingDevice, BlockingError};
use coreblk_daemon::bdev::mem::MallocDevice;
use coreblk_daemon::bdev::uring::UringDevice;
use coreblk_daemon::bdev::BlockDevice;
use coreblk_daemon::reactor::Errno;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const SIZE: u64 = 2 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        byte: u8,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Flush,
}

/// Offsets and lengths in 512-byte units, sometimes nudged off alignment or past the end.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (
        0u64..(SIZE / 512 + 8),
        0u64..64,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(b, n, skew_off, skew_len)| {
            let off = b * 512 + if skew_off { 1 } else { 0 };
            let len = n * 512 + if skew_len { 3 } else { 0 };
            (off, len)
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((off, len), byte, fua)| Op::Write { off, len, byte, fua }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => Just(Op::Flush),
    ]
}

fn valid(off: u64, len: u64, lbs: u64) -> bool {
    len > 0 && off.is_multiple_of(lbs) && len.is_multiple_of(lbs) && off + len <= SIZE
}

fn expect_einval(r: Result<impl std::fmt::Debug, BlockingError>) -> Result<(), TestCaseError> {
    match r {
        Err(BlockingError::Io { errno, .. }) if errno == Errno::EINVAL => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "expected EINVAL, got {other:?}"
        ))),
    }
}

fn run_model(dev: &BlockingDevice, ops: &[Op]) -> Result<(), TestCaseError> {
    let geo = dev.device().geometry().clone();
    let lbs = u64::from(geo.logical_block_size);
    let mut model = vec![0u8; usize::try_from(SIZE).expect("small")];
    dev.write_zeroes(0, SIZE)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let idx = |v: u64| usize::try_from(v).expect("small");
    for op in ops {
        match *op {
            Op::Write {
                off,
                len,
                byte,
                fua,
            } => {
                let data = vec![byte; idx(len)];
                if valid(off, len, lbs) {
                    dev.write(off, &data, fua)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    model[idx(off)..idx(off + len)].fill(byte);
                } else {
                    expect_einval(dev.write(off, &data, fua))?;
                }
            }
            Op::Read { off, len } => {
                if valid(off, len, lbs) {
                    let got = dev
                        .read(off, idx(len))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(
                        got == model[idx(off)..idx(off + len)],
                        "read {off}+{len} differs from the model"
                    );
                } else {
                    expect_einval(dev.read(off, idx(len)))?;
                }
            }
            Op::Discard { off, len } | Op::Zero { off, len } => {
                let zero = matches!(op, Op::Zero { .. });
                let r = if zero {
                    dev.write_zeroes(off, len)
                } else {
                    dev.discard(off, len)
                };
                if valid(off, len, lbs) {
                    r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if zero || geo.discard_zeroes {
                        model[idx(off)..idx(off + len)].fill(0);
                    }
                } else {
                    expect_einval(r)?;
                }
            }
            Op::Flush => dev
                .flush()
                .map_err(|e| TestCaseError::fail(e.to_string()))?,
        }
    }
    for off in (0..SIZE).step_by(1 << 19) {
        let got = dev
            .read(off, 1 << 19)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            got == model[idx(off)..idx(off) + (1 << 19)],
            "final image differs from the model at {off}"
        );
    }
    Ok(())
}

fn check(dev: Arc<dyn BlockDevice>) {
    let set = coreblk_daemon::testing::reactors(1, 4);
    let client = BlockingDevice::new(dev, set.remotes()[0].clone()).expect("channel");
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(op(), 1..60), |ops| {
            run_model(&client, &ops)
        })
        .expect("block device matches its model");
}

#[test]
fn malloc_matches_the_model() {
    check(Arc::new(MallocDevice::new(SIZE).expect("malloc")));
}

#[test]
fn uring_file_matches_the_model() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp");
    let path = dir.path().join("model.img");
    std::fs::File::create(&path)
        .expect("create")
        .set_len(SIZE)
        .expect("size");
    check(Arc::new(UringDevice::open(&path).expect("open")));
}
