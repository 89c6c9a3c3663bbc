//! Helpers shared by the daemon's tests (feature `testing`, never in release builds): a
//! seeded pseudo-random stream whose seed tests print so failures replay, and small
//! unpinned reactor sets, and the crash contract as a model ([`crash_model`]).

pub mod crash_model;

use crate::reactor::{ReactorConfig, ReactorSet};

/// xorshift64: deterministic, so a printed seed replays a failure exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed` (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The seed from `COREBLK_SEED`, else `default`.
pub fn seed_or(default: u64) -> u64 {
    std::env::var("COREBLK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `n` unpinned reactors (cores 0..n) with `buf_count` pooled buffers each.
pub fn reactors(n: usize, buf_count: usize) -> ReactorSet {
    let cfg = ReactorConfig {
        pin: false,
        buf_count,
        ..ReactorConfig::default()
    };
    ReactorSet::start(&(0..n).collect::<Vec<_>>(), &cfg).expect("test reactors start")
}
