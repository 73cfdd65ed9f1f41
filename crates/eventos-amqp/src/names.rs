//! Broker object names and the retry delay ladder.

use std::time::Duration;

/// The longest name RabbitMQ accepts for a queue or exchange (an AMQP
/// short string).
const MAX_NAME: usize = 255;

/// The group whose queue keeps every dead letter of a topic, on the topic's
/// dead-letter topic: subscribe to `<topic>.dlq` as this group to drain what
/// was parked there.
///
/// The transport declares that queue before it publishes the first dead
/// letter of a topic, so a dead letter is never published to a topic with no
/// queue (which RabbitMQ would drop).
pub const PARKED_GROUP: &str = "parked";

/// The retry delays the transport has a delay queue for, in milliseconds.
///
/// A retry waits in the smallest bucket that is at least the delay asked
/// for, so it never comes back sooner; the steps grow by at most 5/3, so it
/// comes back at most ~1.7 times later (plus the broker's own latency).
/// Delays over the last bucket wait there repeatedly until they are due.
pub const DELAY_LADDER_MS: &[u64] = &[
    50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000,
    20_000, 30_000, 45_000, 60_000, 90_000, 120_000, 180_000, 300_000, 450_000, 600_000, 900_000,
    1_200_000, 1_800_000, 2_700_000, 3_600_000, 5_400_000, 7_200_000, 10_800_000, 14_400_000,
    21_600_000, 28_800_000, 43_200_000, 64_800_000, 86_400_000,
];

/// The delay queue a retry after `after` waits in: the smallest bucket of
/// [`DELAY_LADDER_MS`] that is at least `after`, or the largest one for
/// longer delays (which then wait there again until due).
pub fn delay_bucket(after: Duration) -> Duration {
    let ms = after.as_millis();
    let bucket = DELAY_LADDER_MS
        .iter()
        .copied()
        .find(|&b| u128::from(b) >= ms)
        .unwrap_or(DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1]);
    Duration::from_millis(bucket)
}

/// Names of everything the transport declares, under one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    namespace: String,
}

impl Names {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    /// The direct exchange every topic is published to, with the topic as
    /// the routing key.
    pub(crate) fn exchange(&self) -> &str {
        &self.namespace
    }

    /// The durable queue of `group` on `topic`.
    ///
    /// `/` cannot occur in a topic, group or namespace, so the name is
    /// unambiguous and cannot collide with the delay queues. Names too long
    /// for RabbitMQ keep a readable prefix and end in a hash of the whole.
    pub(crate) fn queue(&self, topic: &str, group: &str) -> String {
        let full = format!("{}/{topic}/{group}", self.namespace);
        if full.len() <= MAX_NAME {
            return full;
        }
        let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, full.as_bytes()).simple();
        let keep = MAX_NAME - 1 - 32;
        // Every part is ASCII, so any byte index is a character boundary.
        format!("{}~{hash}", &full[..keep])
    }

    /// The fanout exchange and the queue of one delay bucket (same name).
    pub(crate) fn delay(&self, bucket: Duration) -> String {
        format!("{}.delay.{}ms", self.namespace, bucket.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_hashed_within_the_limit() {
        let names = Names::new("eventos");
        let topic = "t".repeat(200);
        let a = names.queue(&topic, &"g".repeat(200));
        let b = names.queue(&topic, &format!("{}h", "g".repeat(199)));
        assert_eq!(a.len(), MAX_NAME);
        assert_ne!(a, b);
        assert_eq!(names.queue("a.b", "c"), "eventos/a.b/c");
    }

    #[test]
    fn the_ladder_is_increasing_with_bounded_steps() {
        for pair in DELAY_LADDER_MS.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[1] * 3 <= pair[0] * 5, "{pair:?}");
        }
    }
}
