//! NATS's entry in a transport registry: `nats://` URLs, options in the
//! settings' `[nats]` section.

use std::time::Duration;

use eventos_core::{ErrorChain, redact_url};
use eventos_kit::{Engine, OpenError, Opened, Target};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{ContentMode, NatsOptions, NatsTransport};

/// The `[nats]` settings section. Unknown keys are errors that name the
/// key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSection {
    /// First token of every subject and prefix of every stream.
    pub namespace: String,
    /// How events are published, `binary` or `structured` (both are read).
    pub content_mode: ContentMode,
    /// Seconds JetStream waits for a settlement before handing a delivery
    /// out again.
    pub ack_wait_secs: u64,
    /// Seconds a topic's stream keeps an event.
    pub max_age_secs: u64,
    /// Replicas of the streams the transport creates.
    pub replicas: usize,
}

impl Default for NatsSection {
    fn default() -> Self {
        let options = NatsOptions::default();
        Self {
            namespace: options.namespace,
            content_mode: options.mode,
            ack_wait_secs: options.ack_wait.as_secs(),
            max_age_secs: options.max_age.as_secs(),
            replicas: options.replicas,
        }
    }
}

impl NatsSection {
    /// The transport's options these settings describe.
    pub fn options(self) -> NatsOptions {
        NatsOptions {
            mode: self.content_mode,
            namespace: self.namespace,
            ack_wait: Duration::from_secs(self.ack_wait_secs.max(1)),
            max_age: Duration::from_secs(self.max_age_secs),
            replicas: self.replicas.max(1),
            ..NatsOptions::default()
        }
    }

    fn from_value(options: Option<&serde_json::Value>) -> Result<Self, String> {
        match options {
            None => Ok(Self::default()),
            Some(value) => Self::deserialize(value).map_err(|e| format!("[nats]: {e}")),
        }
    }
}

/// Connects to NATS at the URL, with the `[nats]` section's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct NatsEngine;

impl Engine for NatsEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["nats"]
    }

    fn example(&self) -> &'static str {
        "nats://127.0.0.1:4222"
    }

    fn section(&self) -> Option<&'static str> {
        Some("nats")
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<(), String> {
        NatsSection::from_value(Some(options)).map(drop)
    }

    fn process_local(&self) -> bool {
        false
    }

    fn describe(&self, target: &Target<'_>) -> String {
        format!("NATS JetStream {}", redact_url(target.url))
    }

    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            let options = NatsSection::from_value(target.options).map_err(OpenError)?;
            let transport = NatsTransport::connect(target.url, options.options())
                .await
                .map_err(|e| {
                    let url = redact_url(target.url);
                    OpenError(format!("connecting to {url}: {}", ErrorChain(&e)))
                })?;
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
    fn unknown_keys_are_named() {
        let err = NatsEngine
            .check_options(&serde_json::json!({ "ack_wait": 3 }))
            .unwrap_err();
        assert!(err.contains("ack_wait"), "{err}");
        NatsEngine
            .check_options(&serde_json::json!({ "content_mode": "structured", "replicas": 3 }))
            .unwrap();
    }
}
