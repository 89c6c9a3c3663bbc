//! Slots of a reactor's fixed-buffer table lent to ublk queues for zero copy
//! (AUTO_BUF_REG): the kernel registers each request's pages at its tag's slot of the ring
//! that fetched it, and unregisters them at the commit.
//!
//! The table is sparse: index 0 is the reactor's buffer pool ([`super::BufPool`]); indices
//! `1..=capacity` are kernel-buffer slots, handed out as one contiguous run per queue (one
//! slot per tag) when the queue starts and given back when it stops. A queue that finds
//! no run free serves through the copy path instead (it asks the kernel to register at an
//! index beyond the table, with FALLBACK, so every request falls back): a full table
//! costs speed, never correctness.
//!
//! Pure bookkeeping: the ring calls (clearing a run that comes back) are the reactor's.

/// Largest fixed-buffer table io_uring accepts (`IORING_MAX_REG_BUFFERS`), index 0 included.
pub const MAX_TABLE: u32 = 1 << 14;

/// First-fit allocator of contiguous runs of kernel-buffer slots.
#[derive(Debug)]
pub struct KernelSlots {
    /// `used[i]`: slot `i + 1` is lent.
    used: Vec<bool>,
}

impl KernelSlots {
    /// `capacity` slots (indices `1..=capacity`), bounded so the table (with index 0) fits
    /// io_uring's limit.
    pub fn new(capacity: u32) -> Self {
        let capacity = capacity.min(MAX_TABLE - 1) as usize;
        Self {
            used: vec![false; capacity],
        }
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.used.len()
    }

    /// Slots not lent.
    pub fn available(&self) -> usize {
        self.used.iter().filter(|u| !**u).count()
    }

    /// Size of the whole table to register: the pool's index 0 and every slot.
    pub fn table_len(&self) -> u32 {
        u32::try_from(self.used.len() + 1).expect("bounded by MAX_TABLE")
    }

    /// Lends `n` contiguous slots; returns the first index (≥ 1). `None` when no run of
    /// `n` is free (or `n` is 0).
    pub fn alloc(&mut self, n: u16) -> Option<u16> {
        let n = usize::from(n);
        if n == 0 || n > self.used.len() {
            return None;
        }
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == n {
                let start = i + 1 - n;
                self.used[start..=i].iter_mut().for_each(|u| *u = true);
                return Some(u16::try_from(start + 1).expect("bounded by MAX_TABLE"));
            }
        }
        None
    }

    /// Takes back `n` slots from `first` (as [`Self::alloc`] lent them).
    ///
    /// # Panics
    /// When the run was not lent: a double free would lend one slot to two queues.
    pub fn free(&mut self, first: u16, n: u16) {
        let start = usize::from(first)
            .checked_sub(1)
            .expect("slot 0 is the pool's");
        let run = &mut self.used[start..start + usize::from(n)];
        assert!(
            run.iter().all(|u| *u),
            "freeing kernel-buffer slots {first}+{n} not lent"
        );
        run.iter_mut().for_each(|u| *u = false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_disjoint_and_reused() {
        let mut s = KernelSlots::new(10);
        assert_eq!(s.table_len(), 11);
        let a = s.alloc(4).expect("a");
        let b = s.alloc(4).expect("b");
        assert_eq!((a, b), (1, 5), "index 0 is never lent");
        assert_eq!(s.alloc(4), None, "2 left, not 4");
        let c = s.alloc(2).expect("c");
        assert_eq!(c, 9);
        assert_eq!(s.available(), 0);
        s.free(a, 4);
        assert_eq!(s.available(), 4);
        assert_eq!(s.alloc(3), Some(1), "first fit");
        assert_eq!(s.alloc(0), None);
        assert_eq!(s.alloc(11), None);
    }

    #[test]
    fn capacity_is_bounded_by_io_uring() {
        let s = KernelSlots::new(u32::MAX);
        assert_eq!(s.table_len(), MAX_TABLE);
        assert_eq!(s.capacity(), (MAX_TABLE - 1) as usize);
    }

    #[test]
    #[should_panic(expected = "not lent")]
    fn double_free_is_caught() {
        let mut s = KernelSlots::new(4);
        let a = s.alloc(2).expect("a");
        s.free(a, 2);
        s.free(a, 2);
    }
}
