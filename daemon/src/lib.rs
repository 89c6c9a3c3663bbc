//! `coreblk-daemon`: the node daemon's library. Layers, bottom to top (DESIGN §2):
//! [`reactor`] (threads, rings, polling, messages), [`bdev`] (block device trait, backends,
//! wrappers, discovery and claiming), `lvs`, [`export`], `control`. Each layer uses only the
//! layers below it; news travels up as completions and messages, never as calls.
//!
//! Start reading at [`reactor`], then [`bdev`].

pub mod bdev;
pub mod config;
pub mod control;
pub mod export;
pub mod lvs;
pub mod metrics;
pub mod reactor;
pub mod sandbox;
#[cfg(feature = "testing")]
pub mod testing;
