//! Broker object names and the retry delay ladder.

use std::time::Duration;

/// The longest name RabbitMQ accepts for a queue or exchange (an AMQP
/// short string).
const MAX_NAME: usize = 255;
/// Room a group queue's name leaves for the suffix of its delay queues
/// (`~86400000ms` at most).
const DELAY_SUFFIX: usize = 12;

/// The group whose queue keeps every dead letter of a topic, on the topic's
/// dead-letter topic: subscribe to `<topic>.dlq` as this group to drain what
/// was parked there.
///
/// The transport declares that queue before it publishes the first dead
/// letter of a topic, so a dead letter is never published to a topic with no
/// queue (which RabbitMQ would drop).
pub const PARKED_GROUP: &str = "parked";

/// The retry delay ladder lives in the kit; re-exported, as it is part of
/// what this transport declares.
pub use eventos_kit::{DELAY_LADDER_MS, delay_bucket};

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
    /// unambiguous. Names too long for RabbitMQ (with room left for a delay
    /// queue's suffix) keep a readable prefix and end in a hash of the
    /// whole.
    pub(crate) fn queue(&self, topic: &str, group: &str) -> String {
        let full = format!("{}/{topic}/{group}", self.namespace);
        let max = MAX_NAME - DELAY_SUFFIX;
        if full.len() <= max {
            return full;
        }
        let hash = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, full.as_bytes()).simple();
        let keep = max - 1 - 32;
        // Every part is ASCII, so any byte index is a character boundary.
        format!("{}~{hash}", &full[..keep])
    }

    /// The delay queue of one group queue for one bucket of the ladder.
    ///
    /// Per group rather than shared, so that what a group has waiting for a
    /// retry is the sum of its own delay queues' depths, which an operator
    /// can be shown.
    pub(crate) fn delay(queue: &str, bucket: Duration) -> String {
        format!("{queue}~{}ms", bucket.as_millis())
    }

    /// A management API regex matching `queue` and its delay queues, and
    /// nothing else.
    pub(crate) fn group_pattern(queue: &str) -> String {
        let mut pattern = String::from("^");
        for c in queue.chars() {
            if !c.is_ascii_alphanumeric() {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("(~[0-9]+ms)?$");
        pattern
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
        assert_eq!(a.len(), MAX_NAME - DELAY_SUFFIX);
        assert_ne!(a, b);
        assert_eq!(names.queue("a.b", "c"), "eventos/a.b/c");
        let last = Duration::from_millis(*DELAY_LADDER_MS.last().expect("a ladder"));
        assert!(Names::delay(&a, last).len() <= MAX_NAME);
    }

    #[test]
    fn a_group_pattern_escapes_the_queue_name() {
        let queue = "eventos/a.b/c";
        let bucket = Duration::from_millis(1500);
        let delay = Names::delay(queue, bucket);
        assert_eq!(delay, "eventos/a.b/c~1500ms");
        assert_eq!(
            Names::group_pattern(queue),
            r"^eventos\/a\.b\/c(~[0-9]+ms)?$"
        );
    }
}
