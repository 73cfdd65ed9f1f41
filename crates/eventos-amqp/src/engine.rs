//! RabbitMQ's entry in a transport registry: `amqp://` and `amqps://`
//! URLs, options in the settings' `[amqp]` section.

use std::time::Duration;

use eventos_core::{ErrorChain, redact_url};
use eventos_kit::{Engine, OpenError, Opened, Target};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{AmqpOptions, AmqpTransport, ContentMode, QueueType};

/// The `[amqp]` settings section: what an operator sets about the
/// transport. Unknown keys are errors that name the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSection {
    /// Prefix of every exchange and queue eventos declares, so several
    /// systems can share one broker.
    pub namespace: String,
    /// The kind of queue per (topic, group): `quorum` or `classic`.
    pub queue_type: QueueType,
    /// How events are published, `binary` or `structured` (both are read).
    pub content_mode: ContentMode,
    /// If set, RabbitMQ deletes a group's queue unused (no consumer) for
    /// this many seconds, events and all: for disposable systems such as
    /// tests, never for one whose queued work matters.
    pub queue_expires_secs: Option<u64>,
    /// The management API that inspection (`eventos` counts and dead
    /// letters) reads, `http://user:password@host:15672`; by default port
    /// 15672 of the AMQP host with the AMQP credentials.
    pub management_url: Option<String>,
}

impl Default for AmqpSection {
    fn default() -> Self {
        let options = AmqpOptions::default();
        Self {
            namespace: options.namespace,
            queue_type: options.queue_type,
            content_mode: options.mode,
            queue_expires_secs: None,
            management_url: None,
        }
    }
}

impl AmqpSection {
    /// The transport's options these settings describe.
    pub fn options(self) -> AmqpOptions {
        AmqpOptions {
            namespace: self.namespace,
            queue_type: self.queue_type,
            mode: self.content_mode,
            queue_expires: self.queue_expires_secs.map(Duration::from_secs),
            management_url: self.management_url,
            ..AmqpOptions::default()
        }
    }

    fn from_value(options: Option<&serde_json::Value>) -> Result<Self, String> {
        match options {
            None => Ok(Self::default()),
            Some(value) => Self::deserialize(value).map_err(|e| format!("[amqp]: {e}")),
        }
    }
}

/// Connects to RabbitMQ at the URL, with the `[amqp]` section's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct AmqpEngine;

impl Engine for AmqpEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["amqp", "amqps"]
    }

    fn example(&self) -> &'static str {
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    }

    fn section(&self) -> Option<&'static str> {
        Some("amqp")
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<(), String> {
        AmqpSection::from_value(Some(options)).map(drop)
    }

    fn process_local(&self) -> bool {
        false
    }

    fn describe(&self, target: &Target<'_>) -> String {
        format!("RabbitMQ {}", redact_url(target.url))
    }

    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            let options = AmqpSection::from_value(target.options).map_err(OpenError)?;
            let transport = AmqpTransport::connect(target.url, options.options())
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
