//! The CloudEvents 1.0 envelope.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::EventError;

/// The only CloudEvents version eventos reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// Extension attribute names eventos itself sets.
///
/// They follow the CloudEvents naming rule (lower-case ASCII letters and
/// digits, at most 20 characters) so every binding can carry them.
pub mod ext {
    /// W3C trace context of the operation that produced the event.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state, carried alongside `traceparent` when present.
    pub const TRACESTATE: &str = "tracestate";
    /// Identifier shared by every event of one business operation.
    pub const CORRELATION_ID: &str = "correlationid";
    /// Identifier of the event whose handling produced this one.
    pub const CAUSATION_ID: &str = "causationid";
    /// Delivery attempt (1-based) of the consumer that received this copy.
    pub const ATTEMPT: &str = "attempt";
    /// Why an event was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "deadletterreason";
    /// How many deliveries were attempted before dead-lettering.
    pub const DEAD_LETTER_ATTEMPTS: &str = "deadletterattempts";
    /// The last handler error before dead-lettering.
    pub const DEAD_LETTER_ERROR: &str = "deadlettererror";
    /// The topic the event was dead-lettered from.
    pub const DEAD_LETTER_TOPIC: &str = "deadlettertopic";
    /// The consumer group that dead-lettered the event.
    pub const DEAD_LETTER_GROUP: &str = "deadlettergroup";
}

/// The value of a CloudEvents extension attribute.
///
/// The JSON format can carry strings, integers and booleans natively; the
/// binary bindings carry everything as strings, so a value read from headers
/// is always [`ExtensionValue::String`]. Use [`ExtensionValue::as_str`] /
/// [`ExtensionValue::as_i64`], which convert, rather than matching variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtensionValue {
    /// A string (also URIs, timestamps and binary, in their string forms).
    String(String),
    /// A signed 32-bit integer in the spec; we accept the full `i64` range.
    Integer(i64),
    /// A boolean.
    Boolean(bool),
}

impl ExtensionValue {
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ExtensionValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer, parsing the string form if needed.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            ExtensionValue::Integer(i) => Some(*i),
            ExtensionValue::String(s) => s.parse().ok(),
            ExtensionValue::Boolean(_) => None,
        }
    }
}

impl fmt::Display for ExtensionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtensionValue::String(s) => f.write_str(s),
            ExtensionValue::Integer(i) => write!(f, "{i}"),
            ExtensionValue::Boolean(b) => write!(f, "{b}"),
        }
    }
}

impl From<String> for ExtensionValue {
    fn from(v: String) -> Self {
        ExtensionValue::String(v)
    }
}
impl From<&str> for ExtensionValue {
    fn from(v: &str) -> Self {
        ExtensionValue::String(v.to_owned())
    }
}
impl From<i64> for ExtensionValue {
    fn from(v: i64) -> Self {
        ExtensionValue::Integer(v)
    }
}
impl From<u32> for ExtensionValue {
    fn from(v: u32) -> Self {
        ExtensionValue::Integer(i64::from(v))
    }
}
impl From<bool> for ExtensionValue {
    fn from(v: bool) -> Self {
        ExtensionValue::Boolean(v)
    }
}

/// A CloudEvents 1.0 event.
///
/// The payload is kept as raw bytes with its `datacontenttype`: transports
/// move it without parsing, and only the JSON format and typed decoding look
/// inside. Construct one with [`Event::builder`] or, for a typed payload, with
/// [`Event::from_typed`](crate::Event::from_typed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub(crate) id: String,
    pub(crate) source: String,
    pub(crate) ty: String,
    pub(crate) subject: Option<String>,
    pub(crate) time: Option<DateTime<Utc>>,
    pub(crate) datacontenttype: Option<String>,
    pub(crate) dataschema: Option<String>,
    pub(crate) data: Option<Bytes>,
    pub(crate) extensions: BTreeMap<String, ExtensionValue>,
}

impl Event {
    /// Starts an event with a fresh UUIDv7 `id` and the current `time`.
    pub fn builder(source: impl Into<String>, ty: impl Into<String>) -> EventBuilder {
        EventBuilder {
            event: Event {
                id: Uuid::now_v7().to_string(),
                source: source.into(),
                ty: ty.into(),
                subject: None,
                time: Some(Utc::now()),
                datacontenttype: None,
                dataschema: None,
                data: None,
                extensions: BTreeMap::new(),
            },
        }
    }

    /// Starts an event with a given `id` and no `time`: for decoders that
    /// rebuild a stored event attribute by attribute.
    pub fn builder_with_id(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            event: Event {
                id: id.into(),
                source: source.into(),
                ty: ty.into(),
                subject: None,
                time: None,
                datacontenttype: None,
                dataschema: None,
                data: None,
                extensions: BTreeMap::new(),
            },
        }
    }

    /// `id`: unique per `source`; eventos generates UUIDv7 (time-ordered).
    pub fn id(&self) -> &str {
        &self.id
    }
    /// `source`: URI-reference of the producer.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// `type`, e.g. `school.enrollment.payment_submitted.v1`.
    pub fn ty(&self) -> &str {
        &self.ty
    }
    /// `specversion`; always `1.0`.
    pub fn specversion(&self) -> &'static str {
        SPEC_VERSION
    }
    /// `subject`: the entity key; transports use it as the ordering key.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
    /// `time` the occurrence happened.
    pub fn time(&self) -> Option<DateTime<Utc>> {
        self.time
    }
    /// `datacontenttype` of [`Event::data`].
    pub fn datacontenttype(&self) -> Option<&str> {
        self.datacontenttype.as_deref()
    }
    /// `dataschema` URI.
    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }
    /// The payload, as bytes in `datacontenttype`.
    pub fn data(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }
    /// Every extension attribute, sorted by name.
    pub fn extensions(&self) -> &BTreeMap<String, ExtensionValue> {
        &self.extensions
    }
    /// One extension attribute.
    pub fn extension(&self, name: &str) -> Option<&ExtensionValue> {
        self.extensions.get(name)
    }
    /// A string extension attribute (any value, in its string form, would
    /// need [`Event::extension`]).
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).and_then(ExtensionValue::as_str)
    }

    /// Sets (or replaces) an extension attribute.
    ///
    /// # Errors
    ///
    /// [`EventError::InvalidExtensionName`] unless the name is 1–20 lower-case
    /// ASCII letters or digits and not a context attribute.
    pub fn set_extension(
        &mut self,
        name: &str,
        value: impl Into<ExtensionValue>,
    ) -> Result<(), EventError> {
        validate_extension_name(name)?;
        self.extensions.insert(name.to_owned(), value.into());
        Ok(())
    }

    /// Removes an extension attribute, returning it.
    pub fn remove_extension(&mut self, name: &str) -> Option<ExtensionValue> {
        self.extensions.remove(name)
    }

    /// Replaces the subject.
    pub fn set_subject(&mut self, subject: Option<String>) {
        self.subject = subject;
    }

    /// Whether `datacontenttype` says the payload is JSON. An absent content
    /// type counts as JSON, as the JSON format specifies.
    pub fn is_json(&self) -> bool {
        self.datacontenttype
            .as_deref()
            .is_none_or(is_json_content_type)
    }

    /// The payload size in bytes (0 when there is none).
    pub fn data_len(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len)
    }
}

/// Whether a media type is JSON (`application/json`, `text/json` or any
/// `+json` suffix), ignoring parameters such as `charset`.
pub fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

const CONTEXT_ATTRIBUTES: &[&str] = &[
    "id",
    "source",
    "specversion",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
];

pub(crate) fn validate_extension_name(name: &str) -> Result<(), EventError> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !CONTEXT_ATTRIBUTES.contains(&name);
    if ok {
        Ok(())
    } else {
        Err(EventError::InvalidExtensionName(name.to_owned()))
    }
}

/// Builds an [`Event`]; see [`Event::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    event: Event,
}

impl EventBuilder {
    /// Overrides the generated `id`.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = id.into();
        self
    }
    /// Sets the `subject` (the ordering key).
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.event.subject = Some(subject.into());
        self
    }
    /// Overrides `time` (`None` removes it).
    pub fn time(mut self, time: Option<DateTime<Utc>>) -> Self {
        self.event.time = time;
        self
    }
    /// Sets `dataschema`.
    pub fn dataschema(mut self, schema: impl Into<String>) -> Self {
        self.event.dataschema = Some(schema.into());
        self
    }
    /// Sets the payload and its content type.
    pub fn data(mut self, content_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        self.event.datacontenttype = Some(content_type.into());
        self.event.data = Some(data.into());
        self
    }
    /// Sets `datacontenttype` without a payload.
    pub fn datacontenttype(mut self, content_type: impl Into<String>) -> Self {
        self.event.datacontenttype = Some(content_type.into());
        self
    }
    /// Sets the payload, keeping the content type.
    pub fn data_bytes(mut self, data: impl Into<Bytes>) -> Self {
        self.event.data = Some(data.into());
        self
    }
    /// Serializes `value` as the JSON payload.
    ///
    /// # Errors
    ///
    /// [`EventError::Data`] if `value` cannot be serialized.
    pub fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Result<Self, EventError> {
        let bytes = serde_json::to_vec(value).map_err(EventError::Data)?;
        Ok(self.data("application/json", bytes))
    }
    /// Sets an extension attribute.
    ///
    /// # Errors
    ///
    /// [`EventError::InvalidExtensionName`], as [`Event::set_extension`].
    pub fn extension(
        mut self,
        name: &str,
        value: impl Into<ExtensionValue>,
    ) -> Result<Self, EventError> {
        self.event.set_extension(name, value)?;
        Ok(self)
    }
    /// Finishes the event.
    ///
    /// # Errors
    ///
    /// [`EventError::MissingAttribute`] if `id`, `source` or `type` is empty.
    pub fn build(self) -> Result<Event, EventError> {
        for (name, value) in [
            ("id", &self.event.id),
            ("source", &self.event.source),
            ("type", &self.event.ty),
        ] {
            if value.is_empty() {
                return Err(EventError::MissingAttribute(name));
            }
        }
        Ok(self.event)
    }
}
