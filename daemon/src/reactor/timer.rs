//! Per-reactor timers: a min-heap of deadlines. Single-threaded (owned by one reactor), so
//! no locks. Cancelled timers are dropped lazily when they reach the top of the heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::time::Instant;

use super::Reactor;

/// Identifies a scheduled timer so it can be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

type TimerFn = Box<dyn FnOnce(&Reactor)>;

#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, TimerFn>,
    next_id: u64,
}

impl fmt::Debug for Timers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timers")
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Most timers fired per loop iteration, so a timer storm cannot starve IO.
const FIRE_BATCH: usize = 256;

impl Timers {
    pub(super) fn add(&mut self, deadline: Instant, f: TimerFn) -> TimerId {
        let id = self.next_id;
        self.next_id += 1;
        self.heap.push(Reverse((deadline, id)));
        self.pending.insert(id, f);
        TimerId(id)
    }

    pub(super) fn cancel(&mut self, id: TimerId) -> bool {
        self.pending.remove(&id.0).is_some()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Pops the due timers; the caller runs them after releasing its borrow, because
    /// callbacks may add timers.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<TimerFn> {
        let mut due = Vec::new();
        while due.len() < FIRE_BATCH {
            match self.heap.peek() {
                Some(Reverse((t, _))) if *t <= now => {}
                _ => break,
            }
            let Some(Reverse((_, id))) = self.heap.pop() else {
                break;
            };
            if let Some(f) = self.pending.remove(&id) {
                due.push(f);
            }
        }
        due
    }
}
