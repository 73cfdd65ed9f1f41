//! The smallest, most stable part of eventos: the CloudEvents envelope and
//! the transport contract. Every transport crate depends on this crate and on
//! nothing else of eventos; services and the router build on top.
//!
//! # The decisions that shaped it
//!
//! * **CloudEvents 1.0 is the envelope, not an adapter.** [`Event`] *is* a
//!   CloudEvent: structured JSON ([`Event::to_json`]) and binary mode
//!   ([`Event::to_binary`], one mapping for every protocol binding) are
//!   written here once, so any official CloudEvents SDK reads what any
//!   eventos transport writes.
//! * **The payload stays bytes.** Transports move [`bytes::Bytes`] without
//!   parsing; only typed decoding ([`Event::decode`]) looks inside.
//! * **Handlers never ack.** A [`Delivery`] is settled exactly once, by the
//!   router, with an [`Outcome`]: ack, retry after a delay, or dead-letter
//!   with a reason. Retries are the transport's job ("stored, not slept"),
//!   so a retry survives a restart where the transport is persistent.
//! * **Capabilities are claims that are tested.** A transport states what it
//!   promises in [`Capabilities`]; the conformance suite runs exactly the
//!   cases those flags allow.
//! * **Object-safe traits.** [`Publisher`], [`Subscriber`] and [`Transport`]
//!   return boxed futures so an application holds an `Arc<dyn Transport>`
//!   and names the concrete transport only where it is wired.
//!
//! This crate knows no broker, no HTTP and no database, and has no feature
//! flags.

mod binary;
mod error;
mod event;
mod json;
mod transport;
mod typed;
mod url;

pub use binary::{BinaryParts, Binding};
pub use error::{ErrorChain, EventError, TransportError, TransportErrorKind};
pub use event::{Event, EventBuilder, ExtensionValue, SPEC_VERSION, ext, is_json_content_type};
pub use json::{BATCH_CONTENT_TYPE, CONTENT_TYPE};
pub use transport::{
    Acker, Capabilities, DeadLetter, Delivery, DeliveryInfo, DeliveryStream, GroupCounts, Outcome,
    Publisher, Settlement, StartFrom, Subscriber, Subscription, Transport, check_payloads,
    dead_letter_event, dead_letter_topic, validate_name,
};
pub use typed::TypedEvent;
pub use url::redact_url;

/// Re-exported so implementors and callers agree on the versions.
pub use bytes::Bytes;
/// Re-exported for the timestamp type of [`Event::time`].
pub use chrono;
