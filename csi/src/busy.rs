//! The volumes with a CSI call in progress on this plugin, shared by the Node service and
//! the Controller's CreateSnapshot: a second call for a volume while one runs answers
//! ABORTED (the spec's "operation pending"), so a volume is never unstaged, unpublished
//! or staged while a snapshot holds its filesystem frozen, and never frozen twice.
//!
//! Owns: [`Busy`], [`InProgress`]. Must never: outlive the process (it is memory only; a
//! restarted plugin starts with nothing in progress, and thaws what a crashed one left
//! frozen, `freeze.rs`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// The CSI volume IDs with a call in progress.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<Mutex<HashSet<String>>>);

/// Removes its volume from [`Busy`] when dropped (the call ended).
#[derive(Debug)]
pub struct InProgress {
    busy: Busy,
    volume_id: String,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut b) = self.busy.0.lock() {
            b.remove(&self.volume_id);
        }
    }
}

impl Busy {
    /// Marks `volume_id` busy until the returned value is dropped; ABORTED while another
    /// call holds it.
    ///
    /// # Errors
    /// [`Error::Pending`] while another call holds the volume; [`Error::Node`] when the
    /// table is poisoned (a call panicked while holding its lock).
    pub fn begin(&self, rpc: &'static str, volume_id: &str) -> Result<InProgress, Error> {
        let mut b = self.0.lock().map_err(|_| Error::Node {
            rpc,
            reason: "the plugin's in-progress table is poisoned (a call panicked); restart \
                     the plugin"
                .to_owned(),
        })?;
        if !b.insert(volume_id.to_owned()) {
            return Err(Error::Pending {
                rpc,
                volume_id: volume_id.to_owned(),
            });
        }
        Ok(InProgress {
            busy: self.clone(),
            volume_id: volume_id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_per_volume() {
        let busy = Busy::default();
        let a = busy.begin("CreateSnapshot", "vol:n:1").expect("free");
        let e = busy
            .begin("NodeUnstageVolume", "vol:n:1")
            .expect_err("held");
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Aborted);
        let _b = busy
            .begin("NodeStageVolume", "vol:n:2")
            .expect("another volume");
        drop(a);
        busy.begin("NodeUnstageVolume", "vol:n:1")
            .expect("free again once the first call ended");
    }
}
