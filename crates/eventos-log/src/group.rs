//! A consumer group on a topic: queue semantics on a log.
//!
//! The group's cursor is the kit's [`SettledCursor`]: the first offset not
//! yet settled, with settlements above it kept until the gap closes.
//! Retries wait in the kit's [`RetrySchedule`]. Deliveries are leased:
//! an unsettled lease is redelivered when it expires, or at once when its
//! acker is dropped. Everything here is
//! memory; what must survive a restart (acks, retries, dead letters) is a
//! control record in the topic's log, written before memory changes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::position::ReadPos;
use eventos_core::Event;
use eventos_kit::{RetrySchedule, SettledCursor, lock};
use tokio::sync::Notify;
use tokio::time::Instant;

/// An event the group has read and not settled.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) offset: u64,
    pub(crate) event: Arc<Event>,
    pub(crate) attempt: u32,
}

#[derive(Debug)]
pub(crate) struct Leased {
    pub(crate) lease: u64,
    pub(crate) entry: Entry,
}

#[derive(Debug, Default)]
pub(crate) struct GroupState {
    pub(crate) cursor: SettledCursor,
    /// The next offset to read from the log.
    pub(crate) next_read: u64,
    pub(crate) read_pos: Option<ReadPos>,
    pub(crate) fetching: bool,
    pub(crate) ready: VecDeque<Entry>,
    pub(crate) in_flight: HashMap<u64, Leased>,
    leases: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    next_lease: u64,
    delayed: RetrySchedule<Entry>,
    /// Retries read back at recovery, applied when their offset is read.
    pub(crate) recovered_retries: HashMap<u64, (u32, i64)>,
}

impl GroupState {
    /// A group whose cursor is at `start`.
    pub(crate) fn at(start: u64) -> Self {
        Self {
            cursor: SettledCursor::at(start),
            next_read: start,
            ..Self::default()
        }
    }

    /// Records that `offset` is settled for good.
    pub(crate) fn settle(&mut self, offset: u64) {
        self.cursor.settle(offset);
    }

    pub(crate) fn is_settled(&self, offset: u64) -> bool {
        self.cursor.is_settled(offset)
    }

    /// Hands out the next ready entry under a new lease.
    pub(crate) fn take(
        &mut self,
        now: Instant,
        visibility: std::time::Duration,
    ) -> Option<(Entry, u64)> {
        let entry = loop {
            let entry = self.ready.pop_front()?;
            // A copy requeued by an expired lease may have been acked since.
            if !self.is_settled(entry.offset) {
                break entry;
            }
        };
        self.next_lease += 1;
        let lease = self.next_lease;
        self.leases
            .push(Reverse((now + visibility, entry.offset, lease)));
        self.in_flight.insert(
            entry.offset,
            Leased {
                lease,
                entry: entry.clone(),
            },
        );
        Some((entry, lease))
    }

    /// Whether `lease` still holds `offset`.
    pub(crate) fn holds(&self, offset: u64, lease: u64) -> bool {
        self.in_flight
            .get(&offset)
            .is_some_and(|l| l.lease == lease)
    }

    /// Ends a lease, returning its entry if it was still current.
    pub(crate) fn release(&mut self, offset: u64, lease: u64) -> Option<Entry> {
        if self.holds(offset, lease) {
            self.in_flight.remove(&offset).map(|l| l.entry)
        } else {
            None
        }
    }

    /// Puts an entry back at the front, as its next attempt.
    pub(crate) fn requeue(&mut self, mut entry: Entry) {
        entry.attempt += 1;
        self.ready.push_front(entry);
    }

    /// Schedules `entry` (already at its next attempt) for `due`.
    pub(crate) fn delay(&mut self, entry: Entry, due: Instant) {
        self.delayed.push(due, entry);
    }

    /// Moves due retries to the ready queue and expired leases back to it.
    /// Returns how many leases expired.
    pub(crate) fn tick(&mut self, now: Instant) -> usize {
        while let Some(entry) = self.delayed.pop_due(now) {
            self.ready.push_back(entry);
        }
        let mut expired = 0;
        while let Some(Reverse((deadline, offset, lease))) = self.leases.peek().copied() {
            if deadline > now {
                break;
            }
            self.leases.pop();
            if let Some(entry) = self.release(offset, lease) {
                expired += 1;
                self.requeue(entry);
            }
        }
        expired
    }

    /// The next moment something is due: a retry or a lease expiry.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        // Drop heap entries for leases that already ended, so a settled
        // delivery does not wake consumers at its old deadline.
        while let Some(Reverse((_, offset, lease))) = self.leases.peek().copied() {
            if self.holds(offset, lease) {
                break;
            }
            self.leases.pop();
        }
        let lease = self.leases.peek().map(|Reverse((d, _, _))| *d);
        let retry = self.delayed.next_due();
        match (lease, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the earliest scheduled retry is due.
    pub(crate) fn next_retry_due(&self) -> Option<Instant> {
        self.delayed.next_due()
    }

    /// Counts for stats.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        (self.ready.len(), self.delayed.len(), self.in_flight.len())
    }
}

/// A group: its state, and the consumers waiting on it.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) id: u32,
    pub(crate) name: Arc<str>,
    pub(crate) state: Mutex<GroupState>,
    pub(crate) notify: Arc<Notify>,
}

impl Group {
    pub(crate) fn new(id: u32, name: &str, state: GroupState) -> Self {
        Self {
            id,
            name: name.into(),
            state: Mutex::new(state),
            notify: Arc::new(Notify::new()),
        }
    }

    /// The group's cursor: every offset below it is settled.
    pub(crate) fn cursor(&self) -> u64 {
        lock(&self.state).cursor.position()
    }
}
