//! What a handler receives.

use std::sync::Arc;

use eventos_core::{DeliveryInfo, Event, EventError, TypedEvent};

/// One delivered event and where it came from. Handlers receive this; they
/// never see the transport's acknowledgement machinery.
#[derive(Debug, Clone)]
pub struct Message {
    event: Arc<Event>,
    info: DeliveryInfo,
}

impl Message {
    /// A message for `event` as delivered per `info`.
    pub fn new(event: Arc<Event>, info: DeliveryInfo) -> Self {
        Self { event, info }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The shared event, to keep without copying.
    pub fn event_arc(&self) -> &Arc<Event> {
        &self.event
    }

    /// Topic, group and attempt.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// 1 on first delivery; grows with each retry.
    pub fn attempt(&self) -> u32 {
        self.info.attempt
    }

    /// The topic it was consumed from.
    pub fn topic(&self) -> &str {
        &self.info.topic
    }

    /// The group that consumed it.
    pub fn group(&self) -> &str {
        &self.info.group
    }

    /// Decodes the payload as `T`.
    ///
    /// # Errors
    ///
    /// As [`Event::decode`]; converts into a permanent
    /// [`HandlerError`](crate::HandlerError) with `?`.
    pub fn decode<T: TypedEvent>(&self) -> Result<T, EventError> {
        self.event.decode()
    }
}
