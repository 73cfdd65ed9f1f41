//! Publishing from application code and handlers.

use std::sync::Arc;

use eventos_core::{Event, EventError, Publisher, TransportError, TypedEvent};

use crate::context::Context;

/// Why a typed publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The payload could not be encoded.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The transport did not accept the event.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl From<PublishError> for crate::HandlerError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Event(e) => e.into(),
            PublishError::Transport(e) => e.into(),
        }
    }
}

/// Publishes events stamped with the current [`Context`]: inside a handler,
/// every event carries the handled event's correlation id, its id as
/// causation id, and a child `traceparent`; outside one, a fresh operation
/// starts.
#[derive(Clone)]
pub struct Bus {
    publisher: Arc<dyn Publisher>,
    source: Arc<str>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus publishing through `publisher`, with `source` as the CloudEvents
    /// source of typed events (e.g. `/school/enrollment`).
    pub fn new(publisher: Arc<dyn Publisher>, source: impl Into<String>) -> Self {
        Self {
            publisher,
            source: source.into().into(),
        }
    }

    /// The CloudEvents `source` of events this bus creates.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Builds the event for a typed payload, stamped with the current context.
    ///
    /// # Errors
    ///
    /// [`EventError::Data`] if the payload cannot be serialized.
    pub fn event<T: TypedEvent>(&self, payload: &T) -> Result<Event, EventError> {
        Context::new_event(&self.source, payload)
    }

    /// Publishes a typed payload to `topic`.
    ///
    /// # Errors
    ///
    /// [`PublishError`] if it cannot be encoded or the transport refuses it.
    pub async fn emit<T: TypedEvent>(&self, topic: &str, payload: &T) -> Result<(), PublishError> {
        let event = self.event(payload)?;
        self.publisher.publish(topic, vec![event]).await?;
        Ok(())
    }

    /// Publishes events to `topic` in order, stamping the current context on
    /// each.
    ///
    /// # Errors
    ///
    /// The transport's error.
    pub async fn publish(&self, topic: &str, mut events: Vec<Event>) -> Result<(), TransportError> {
        // One root per call: a batch published outside a handler is one
        // operation.
        let ctx = Context::current().unwrap_or_else(Context::root);
        for event in &mut events {
            ctx.apply(event);
        }
        self.publisher.publish(topic, events).await
    }
}
