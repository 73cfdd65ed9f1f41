//! Retries waiting for their time.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use tokio::time::Instant;

/// Items due at given instants, taken out in due order (and, for equal
/// instants, in the order they were scheduled). A retry is stored here,
/// not slept on: nothing waits but the subscriber, until the earliest due.
#[derive(Debug)]
pub struct RetrySchedule<T> {
    heap: BinaryHeap<Reverse<Due<T>>>,
    scheduled: u64,
}

impl<T> Default for RetrySchedule<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            scheduled: 0,
        }
    }
}

#[derive(Debug)]
struct Due<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Due<T> {}
impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Due<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> RetrySchedule<T> {
    /// Schedules `item` for `at`.
    pub fn push(&mut self, at: Instant, item: T) {
        self.scheduled += 1;
        self.heap.push(Reverse(Due {
            at,
            seq: self.scheduled,
            item,
        }));
    }

    /// The earliest item due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.heap.peek()?.0.at > now {
            return None;
        }
        self.heap.pop().map(|Reverse(due)| due.item)
    }

    /// When the earliest item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(due)| due.at)
    }

    /// Items scheduled.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_order_then_scheduling_order() {
        let now = Instant::now();
        let mut s = RetrySchedule::default();
        s.push(now + Duration::from_secs(2), "late");
        s.push(now + Duration::from_secs(1), "first");
        s.push(now + Duration::from_secs(1), "second");
        assert_eq!(s.next_due(), Some(now + Duration::from_secs(1)));
        assert_eq!(s.pop_due(now), None, "nothing is due yet");
        let at = now + Duration::from_secs(1);
        assert_eq!(s.pop_due(at), Some("first"));
        assert_eq!(s.pop_due(at), Some("second"));
        assert_eq!(s.pop_due(at), None);
        assert_eq!(s.len(), 1);
        assert_eq!(s.pop_due(now + Duration::from_secs(9)), Some("late"));
        assert!(s.is_empty());
    }
}
