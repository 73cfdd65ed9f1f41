//! Kafka's entry in a transport registry: `kafka://host:port[,host:port]`
//! URLs, options in the settings' `[kafka]` section.

use std::collections::BTreeMap;

use eventos_core::ErrorChain;
use eventos_kit::{Engine, OpenError, Opened, Target};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{ContentMode, KafkaOptions, KafkaTransport, bootstrap_servers};

/// The `[kafka]` settings section. Unknown keys are errors that name the
/// key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSection {
    /// Partitions of the topics eventos creates: how many members of a
    /// group can share one topic.
    pub partitions: i32,
    /// Replication factor of the topics eventos creates: 1 for one broker,
    /// 3 for a production cluster.
    pub replication_factor: i32,
    /// How events are published, `binary` or `structured` (both are read).
    pub content_mode: ContentMode,
    /// librdkafka settings passed through as they are
    /// (`security.protocol = "SSL"`, `linger.ms = "5"`, …).
    pub client: BTreeMap<String, String>,
    /// A prefix for every topic and consumer group, so several systems can
    /// share a cluster; empty: the topics' own names.
    pub namespace: String,
}

impl Default for KafkaSection {
    fn default() -> Self {
        let options = KafkaOptions::default();
        Self {
            partitions: options.partitions,
            replication_factor: options.replication_factor,
            content_mode: options.mode,
            client: BTreeMap::new(),
            namespace: options.namespace,
        }
    }
}

impl KafkaSection {
    /// The transport's options these settings describe.
    pub fn options(self) -> KafkaOptions {
        KafkaOptions {
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            mode: self.content_mode,
            client: self.client,
            namespace: self.namespace,
            ..KafkaOptions::default()
        }
    }

    fn from_value(options: Option<&serde_json::Value>) -> Result<Self, String> {
        let section = match options {
            None => Self::default(),
            Some(value) => Self::deserialize(value).map_err(|e| format!("[kafka]: {e}"))?,
        };
        let ns = &section.namespace;
        if !ns.is_empty()
            && (ns.len() > 64
                || !ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        {
            return Err(format!(
                "[kafka]: namespace {ns:?}: use at most 64 ASCII letters, digits, '.', '_' or '-'"
            ));
        }
        if section.partitions < 1 || section.replication_factor < 1 {
            return Err("[kafka]: partitions and replication_factor must be at least 1".into());
        }
        Ok(section)
    }
}

/// Opens a Kafka transport for the URL, with the `[kafka]` section's
/// options.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaEngine;

impl Engine for KafkaEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["kafka"]
    }

    fn example(&self) -> &'static str {
        "kafka://127.0.0.1:9092"
    }

    fn section(&self) -> Option<&'static str> {
        Some("kafka")
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<(), String> {
        KafkaSection::from_value(Some(options)).map(drop)
    }

    fn check_url(&self, url: &str) -> Result<(), String> {
        bootstrap_servers(url).map(drop).map_err(|e| e.to_string())
    }

    fn process_local(&self) -> bool {
        false
    }

    fn describe(&self, target: &Target<'_>) -> String {
        match bootstrap_servers(target.url) {
            Ok(servers) => format!("Kafka {servers}"),
            Err(_) => format!("Kafka {}", target.url),
        }
    }

    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            let options = KafkaSection::from_value(target.options).map_err(OpenError)?;
            let transport = KafkaTransport::connect(target.url, options.options())
                .map_err(|e| OpenError(format!("{}", ErrorChain(&e))))?;
            Ok(Opened {
                transport: std::sync::Arc::new(transport),
                metrics: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_or_a_zero_is_named() {
        let engine = KafkaEngine;
        let err = engine
            .check_options(&serde_json::json!({"partition": 3}))
            .unwrap_err();
        assert!(err.contains("unknown field `partition`"), "{err}");
        let err = engine
            .check_options(&serde_json::json!({"partitions": 0}))
            .unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
        let err = engine
            .check_options(&serde_json::json!({"namespace": "a/b"}))
            .unwrap_err();
        assert!(err.contains("namespace \"a/b\""), "{err}");
        let ok =
            serde_json::json!({"partitions": 3, "namespace": "t-1", "client": {"linger.ms": "5"}});
        assert_eq!(engine.check_options(&ok), Ok(()));
    }
}
