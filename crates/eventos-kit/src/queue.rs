//! A consumer group's queue, in memory: ready, delayed, and per-key order.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use eventos_core::Event;
use tokio::time::Instant;

use crate::schedule::RetrySchedule;

/// What orders a queue's items: items with the same key are handed out one
/// at a time, in the order they were pushed.
pub trait Keyed {
    /// The ordering key, if the item has one.
    fn key(&self) -> Option<&str>;
}

/// Events are ordered by their `subject`, as the contract's
/// `per_key_ordering` says.
impl Keyed for Arc<Event> {
    fn key(&self) -> Option<&str> {
        self.subject()
    }
}

/// An item taken from a [`GroupQueue`], to be given back to it once: acked,
/// retried, or put back.
#[derive(Debug)]
pub struct Queued<T> {
    /// The item.
    pub item: T,
    /// 1 on first delivery; each retry or put-back adds one.
    pub attempt: u32,
    /// Whether this item holds its key's lock.
    holds_key: bool,
}

/// Counts of a [`GroupQueue`], for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    /// Deliverable now.
    pub ready: usize,
    /// Waiting for a retry delay.
    pub delayed: usize,
    /// Waiting behind an in-flight item with the same key.
    pub blocked: usize,
    /// Handed out and not given back.
    pub in_flight: usize,
    /// When the earliest delayed item is due.
    pub next_due: Option<Instant>,
}

/// One group's queue: what the memory transport is, and what any engine
/// that only moves bytes (ZeroMQ) needs to give queue semantics.
///
/// A taken item holds its key's lock until it is acked: later items with
/// the same key wait behind it — also while it waits for a retry, so a key
/// is never overtaken by its own successor. An item put back (its acker
/// dropped) goes to the front, lock kept.
#[derive(Debug)]
pub struct GroupQueue<T> {
    ready: VecDeque<Queued<T>>,
    delayed: RetrySchedule<Queued<T>>,
    /// Items waiting for their key's lock, per key, in order.
    blocked: HashMap<String, VecDeque<Queued<T>>>,
    keys_in_flight: HashSet<String>,
    in_flight: usize,
}

impl<T> Default for GroupQueue<T> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            delayed: RetrySchedule::default(),
            blocked: HashMap::new(),
            keys_in_flight: HashSet::new(),
            in_flight: 0,
        }
    }
}

impl<T: Keyed> GroupQueue<T> {
    /// Queues `item` for its first delivery.
    pub fn push(&mut self, item: T) {
        self.ready.push_back(Queued {
            item,
            attempt: 1,
            holds_key: false,
        });
    }

    /// The next item deliverable at `now`, taking its key's lock.
    pub fn take(&mut self, now: Instant) -> Option<Queued<T>> {
        while let Some(due) = self.delayed.pop_due(now) {
            self.ready.push_back(due);
        }
        while let Some(mut queued) = self.ready.pop_front() {
            if !queued.holds_key
                && let Some(key) = queued.item.key()
            {
                if self.keys_in_flight.contains(key) {
                    let key = key.to_owned();
                    self.blocked.entry(key).or_default().push_back(queued);
                    continue;
                }
                self.keys_in_flight.insert(key.to_owned());
                queued.holds_key = true;
            }
            self.in_flight += 1;
            return Some(queued);
        }
        None
    }

    /// Done with `queued` for good: its key goes to the next item waiting
    /// for it.
    pub fn ack(&mut self, queued: Queued<T>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        // Taken by value: an item is given back once, and an acked one is
        // gone.
        let Queued {
            item, holds_key, ..
        } = queued;
        if !holds_key {
            return;
        }
        let Some(key) = item.key() else {
            return;
        };
        match self.blocked.entry(key.to_owned()) {
            Entry::Occupied(mut waiting) => {
                if let Some(mut next) = waiting.get_mut().pop_front() {
                    next.holds_key = true;
                    self.ready.push_front(next);
                }
                if waiting.get().is_empty() {
                    waiting.remove();
                }
            }
            Entry::Vacant(_) => {
                self.keys_in_flight.remove(key);
            }
        }
    }

    /// Delivers `queued` again at `at`, as its next attempt, keeping its
    /// key's lock meanwhile.
    pub fn retry(&mut self, mut queued: Queued<T>, at: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        queued.attempt += 1;
        self.delayed.push(at, queued);
    }

    /// Delivers `queued` again first, as its next attempt (it was handed
    /// out and never settled).
    pub fn put_back(&mut self, mut queued: Queued<T>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        queued.attempt += 1;
        self.ready.push_front(queued);
    }

    /// When the earliest delayed item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.next_due()
    }

    /// What the queue holds.
    pub fn counts(&self) -> QueueCounts {
        QueueCounts {
            ready: self.ready.len(),
            delayed: self.delayed.len(),
            blocked: self.blocked.values().map(VecDeque::len).sum(),
            in_flight: self.in_flight,
            next_due: self.delayed.next_due(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    /// An item: (key, number pushed within its key).
    #[derive(Debug, Clone)]
    struct Item(Option<String>, u32);

    impl Keyed for Item {
        fn key(&self) -> Option<&str> {
            self.0.as_deref()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(Option<u8>),
        Take,
        /// Settle the in-flight item at this index (modulo): 0 ack,
        /// 1 retry, 2 put back.
        Settle(usize, u8),
        Advance,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => proptest::option::of(0u8..3).prop_map(Op::Push),
            3 => Just(Op::Take),
            3 => (any::<usize>(), 0u8..3).prop_map(|(i, how)| Op::Settle(i, how)),
            1 => Just(Op::Advance),
        ]
    }

    proptest! {
        /// One item per key in flight at a time; a key's items are acked
        /// in push order; nothing is lost or duplicated.
        #[test]
        fn per_key_order_and_nothing_lost(ops in proptest::collection::vec(op(), 1..200)) {
            let start = Instant::now();
            let mut now = start;
            let mut q = GroupQueue::default();
            let mut pushed: HashMap<Option<String>, u32> = HashMap::new();
            let mut acked: HashMap<Option<String>, Vec<u32>> = HashMap::new();
            let mut in_flight: Vec<Queued<Item>> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(key) => {
                        let key = key.map(|k| k.to_string());
                        let n = pushed.entry(key.clone()).or_default();
                        q.push(Item(key, *n));
                        *n += 1;
                    }
                    Op::Take => {
                        if let Some(taken) = q.take(now) {
                            if let Some(key) = taken.item.key() {
                                prop_assert!(
                                    !in_flight.iter().any(|f| f.item.key() == Some(key)),
                                    "two items of key {key} in flight"
                                );
                            }
                            in_flight.push(taken);
                        }
                    }
                    Op::Settle(i, how) if !in_flight.is_empty() => {
                        let taken = in_flight.remove(i % in_flight.len());
                        match how {
                            0 => {
                                acked.entry(taken.item.0.clone()).or_default().push(taken.item.1);
                                q.ack(taken);
                            }
                            1 => q.retry(taken, now + Duration::from_millis(5)),
                            _ => q.put_back(taken),
                        }
                    }
                    Op::Settle(..) => {}
                    Op::Advance => now += Duration::from_millis(10),
                }
            }
            // Drain: everything pushed comes out, once.
            now += Duration::from_secs(1);
            for taken in in_flight.drain(..) {
                q.put_back(taken);
            }
            while let Some(taken) = q.take(now) {
                acked.entry(taken.item.0.clone()).or_default().push(taken.item.1);
                q.ack(taken);
            }
            prop_assert_eq!(q.counts(), QueueCounts::default());
            for (key, n) in pushed {
                let got = acked.remove(&key).unwrap_or_default();
                if key.is_some() {
                    prop_assert_eq!(got, (0..n).collect::<Vec<_>>(), "key {:?}", key);
                } else {
                    let mut got = got;
                    got.sort_unstable();
                    prop_assert_eq!(got, (0..n).collect::<Vec<_>>());
                }
            }
        }
    }
}
