//! An offset that advances only over a settled prefix.

use std::collections::BTreeSet;

/// A consumer group's position in a log: every offset below
/// [`SettledCursor::position`] is settled, and offsets settled out of order
/// above it wait in a set until the gap below them closes. What a log
/// commits as its group offset (the embedded log's control records, a
/// Kafka consumer's commit) is this position, so a restart redelivers
/// exactly what was not settled — never skips an event still being
/// handled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettledCursor {
    position: u64,
    ahead: BTreeSet<u64>,
}

impl SettledCursor {
    /// A cursor at `position`: everything below it counts as settled.
    pub fn at(position: u64) -> Self {
        Self {
            position,
            ahead: BTreeSet::new(),
        }
    }

    /// The first offset not known to be settled.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Records `offset` as settled; returns whether the position moved.
    pub fn settle(&mut self, offset: u64) -> bool {
        if offset != self.position {
            // Below: settled already. Above: the position stays.
            if offset > self.position {
                self.ahead.insert(offset);
            }
            return false;
        }
        // The common case, settlements in order, touches no set.
        self.position += 1;
        while self.ahead.first() == Some(&self.position) {
            self.ahead.pop_first();
            self.position += 1;
        }
        true
    }

    /// Whether `offset` is settled.
    pub fn is_settled(&self, offset: u64) -> bool {
        offset < self.position || self.ahead.contains(&offset)
    }

    /// How many offsets below `end` are settled above the position (done,
    /// but not yet committable).
    pub fn settled_ahead_below(&self, end: u64) -> usize {
        self.ahead.range(..end).count()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the order of settlements, the position is the
        /// smallest offset not settled.
        #[test]
        fn position_is_the_first_unsettled(
            start in 0u64..5,
            offsets in proptest::collection::vec(0u64..40, 0..60),
        ) {
            let mut cursor = SettledCursor::at(start);
            let mut settled: BTreeSet<u64> = (0..start).collect();
            for offset in offsets {
                let before = cursor.position();
                let moved = cursor.settle(offset);
                settled.insert(offset);
                let first_gap = (0..).find(|o| !settled.contains(o)).unwrap();
                prop_assert_eq!(cursor.position(), first_gap);
                prop_assert_eq!(moved, cursor.position() != before);
                for o in 0..45 {
                    prop_assert_eq!(cursor.is_settled(o), settled.contains(&o));
                }
            }
        }
    }
}
