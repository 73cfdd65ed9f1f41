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
}
