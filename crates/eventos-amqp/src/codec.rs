//! Events on the wire: the CloudEvents AMQP binding in both content modes,
//! plus the few headers of the transport's own.

use eventos_core::chrono::{DateTime, SecondsFormat};
use eventos_core::{Binding, Bytes, CONTENT_TYPE, Event, TransportError, TransportErrorKind};
use lapin::BasicProperties;
#[cfg(test)]
use lapin::types::LongString;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::ContentMode;

/// The attempt this copy will be delivered as (absent means 1).
pub(crate) const ATTEMPT_HEADER: &str = "x-eventos-attempt";
/// When a retried copy is due, in milliseconds since the Unix epoch.
pub(crate) const DUE_HEADER: &str = "x-eventos-due";
/// How many times a quorum queue handed this copy out before (RabbitMQ's).
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// AMQP's "persistent" delivery mode.
const PERSISTENT: u8 = 2;

/// What the transport adds to an event on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stamp {
    /// The attempt the copy will be delivered as.
    pub(crate) attempt: u32,
    /// When a retry is due, epoch milliseconds.
    pub(crate) due_ms: Option<i64>,
}

/// An encoded message: body and properties.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub(crate) body: Vec<u8>,
    pub(crate) properties: BasicProperties,
}

fn short(what: &str, value: &str) -> Result<ShortString, TransportError> {
    ShortString::try_new(value).map_err(|_| {
        TransportError::new(
            TransportErrorKind::Rejected,
            format!(
                "{what} is {} bytes long; AMQP carries at most 255 bytes there",
                value.len()
            ),
        )
    })
}

/// Encodes `event` in `mode`.
///
/// # Errors
///
/// [`TransportErrorKind::Rejected`] if the content type does not fit AMQP's
/// `content_type` property (255 bytes).
pub(crate) fn encode(
    event: &Event,
    mode: ContentMode,
    stamp: Stamp,
) -> Result<Encoded, TransportError> {
    let mut headers = FieldTable::default();
    let (body, content_type) = match mode {
        ContentMode::Binary => {
            let parts = event.to_binary(Binding::AMQP);
            for (name, value) in parts.headers {
                headers.insert(name.into(), AMQPValue::LongString(value.into()));
            }
            let body = parts.data.map(|d| d.to_vec()).unwrap_or_default();
            (body, parts.content_type)
        }
        ContentMode::Structured => (event.to_json(), Some(CONTENT_TYPE.to_owned())),
    };
    if stamp.attempt > 1 {
        headers.insert(
            ATTEMPT_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(stamp.attempt)),
        );
    }
    if let Some(due) = stamp.due_ms {
        headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(due));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(ct) = content_type {
        properties = properties.with_content_type(short("the event's datacontenttype", &ct)?);
    }
    // Lets broker tools show the event id; optional, so a long id is skipped.
    if let Ok(id) = ShortString::try_new(event.id()) {
        properties = properties.with_message_id(id);
    }
    Ok(Encoded { body, properties })
}

/// Whether a content type announces a structured-mode CloudEvent, as the
/// AMQP binding decides the mode (`application/cloudevents` and any suffix
/// or parameters).
fn is_structured(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/cloudevents")
}

/// Decodes a message in either content mode, choosing by its content type.
///
/// # Errors
///
/// A message saying why the message is not a CloudEvent.
pub(crate) fn decode(properties: &BasicProperties, body: Vec<u8>) -> Result<Event, String> {
    let content_type = properties.content_type().as_ref().map(ShortString::as_str);
    if content_type.is_some_and(is_structured) {
        return Event::from_json(&body).map_err(|e| format!("structured-mode body: {e}"));
    }
    let mut pairs = Vec::new();
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            if let Some(text) = header_text(value) {
                pairs.push((name.as_str().to_owned(), text));
            }
        }
    }
    let data = (!body.is_empty()).then(|| Bytes::from(body));
    Event::from_binary(Binding::AMQP, pairs, content_type, data)
        .map_err(|e| format!("binary-mode headers: {e}"))
}

/// A header value as the string the binary mapping reads. Other producers
/// may send typed values (the AMQP binding allows `int`, `boolean` and
/// `timestamp`); they are read in their string form.
fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::Timestamp(t) => DateTime::from_timestamp(i64::try_from(*t).ok()?, 0)?
            .to_rfc3339_opts(SecondsFormat::Secs, true),
        _ => return None,
    })
}

fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// What the transport reads back from a delivery's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    /// The 1-based attempt, counting retries and redeliveries.
    pub(crate) attempt: u32,
    /// Retry attempts stamped on the copy, without broker redeliveries.
    pub(crate) stamped: u32,
    /// When a retried copy is due.
    pub(crate) due_ms: Option<i64>,
}

/// Reads the attempt and due time. A quorum queue counts redeliveries in
/// `x-delivery-count`; a classic queue only flags them, which counts one.
pub(crate) fn received(properties: &BasicProperties, redelivered: bool) -> Received {
    let stamped = header_int(properties, ATTEMPT_HEADER)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(1)
        .max(1);
    let redeliveries = match header_int(properties, DELIVERY_COUNT_HEADER) {
        Some(n) => u32::try_from(n).unwrap_or(0),
        None => u32::from(redelivered),
    };
    Received {
        attempt: stamped.saturating_add(redeliveries),
        stamped,
        due_ms: header_int(properties, DUE_HEADER),
    }
}

/// `properties` without the headers RabbitMQ adds on redelivery and
/// dead-lettering, for a copy published again.
pub(crate) fn without_broker_headers(properties: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = properties.headers() {
        for (name, value) in old.inner() {
            let n = name.as_str();
            if n != DELIVERY_COUNT_HEADER
                && n != "x-death"
                && !n.starts_with("x-first-death-")
                && !n.starts_with("x-last-death-")
            {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    properties.clone().with_headers(headers)
}

/// A long string header value, for tests and raw tools.
#[cfg(test)]
fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event::builder("urn:test", "t.v1")
            .subject("s")
            .data("text/plain", "hello")
            .extension("traceparent", "00-abc-def-01")
            .unwrap()
            .build()
            .unwrap()
    }

    #[test]
    fn both_modes_round_trip() {
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let event = sample();
            let enc = encode(&event, mode, Stamp::default()).unwrap();
            assert_eq!(
                decode(&enc.properties, enc.body).unwrap(),
                event,
                "{mode:?}"
            );
        }
    }

    #[test]
    fn typed_headers_of_other_producers_are_read() {
        let mut headers = FieldTable::default();
        headers.insert("cloudEvents:specversion".into(), long("1.0"));
        headers.insert("cloudEvents:id".into(), long("1"));
        headers.insert("cloudEvents:source".into(), long("urn:x"));
        headers.insert("cloudEvents:type".into(), long("t"));
        headers.insert("cloudEvents:count".into(), AMQPValue::LongInt(3));
        headers.insert(
            "cloudEvents:time".into(),
            AMQPValue::Timestamp(1_700_000_000),
        );
        let props = BasicProperties::default().with_headers(headers);
        let event = decode(&props, Vec::new()).unwrap();
        assert_eq!(event.extension("count").and_then(|v| v.as_i64()), Some(3));
        assert_eq!(event.time().unwrap().timestamp(), 1_700_000_000);
        assert_eq!(event.data(), None);
    }

    #[test]
    fn attempts_count_stamps_and_redeliveries() {
        let stamped = encode(
            &sample(),
            ContentMode::Binary,
            Stamp {
                attempt: 3,
                due_ms: Some(5),
            },
        )
        .unwrap()
        .properties;
        assert_eq!(
            received(&stamped, false),
            Received {
                attempt: 3,
                stamped: 3,
                due_ms: Some(5)
            }
        );
        assert_eq!(received(&stamped, true).attempt, 4);
        let mut headers = stamped.headers().clone().unwrap();
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(2));
        let counted = stamped.clone().with_headers(headers);
        assert_eq!(received(&counted, true).attempt, 5);
    }
}
