//! Events on the wire: the CloudEvents Kafka protocol binding in both
//! content modes.
//!
//! Binary mode puts every attribute in a `ce_` header (core's
//! [`Binding::KAFKA`] mapping), `datacontenttype` in `content-type` and the
//! payload as the value; structured mode sends the JSON event format as
//! `application/cloudevents+json`. In both the key is the event's
//! `subject`, so one subject's events share a partition and its order
//! (the binding's "partitioning" extension is not used: the subject is
//! what eventos orders by everywhere).

use eventos_core::{Binding, Bytes, CONTENT_TYPE, Event};
use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::ContentMode;

/// The binding's header for the content type.
const CONTENT_TYPE_HEADER: &str = "content-type";
/// The attempt a retried copy is delivered as (absent means 1).
const ATTEMPT_HEADER: &str = "eventos_attempt";
/// When a retried copy is due, in milliseconds since the Unix epoch.
const DUE_HEADER: &str = "eventos_due";

/// What the transport adds to a retried copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The attempt the copy will be delivered as.
    pub(crate) attempt: u32,
    /// When it is due, epoch milliseconds.
    pub(crate) due_ms: Option<i64>,
}

impl Stamp {
    /// Reads the stamp of a record; a record without one is a first
    /// attempt, due at once.
    pub(crate) fn read<H: Headers>(headers: Option<&H>) -> Self {
        let mut stamp = Stamp {
            attempt: 1,
            due_ms: None,
        };
        for header in headers.into_iter().flat_map(Headers::iter) {
            let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
            match header.key {
                ATTEMPT_HEADER => {
                    stamp.attempt = value.and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
                }
                DUE_HEADER => stamp.due_ms = value.and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        stamp
    }
}

/// An event as a Kafka record: key, headers, value.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub(crate) key: Option<String>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) value: Vec<u8>,
}

impl Encoded {
    pub(crate) fn owned_headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers
    }
}

/// Encodes `event` in `mode`, with `stamp` for a retried copy.
pub(crate) fn encode(event: &Event, mode: ContentMode, stamp: Stamp) -> Encoded {
    let mut encoded = encode_event(event, mode);
    if stamp.attempt > 1 {
        encoded.headers.push((
            ATTEMPT_HEADER.to_owned(),
            stamp.attempt.to_string().into_bytes(),
        ));
    }
    if let Some(due) = stamp.due_ms {
        encoded
            .headers
            .push((DUE_HEADER.to_owned(), due.to_string().into_bytes()));
    }
    encoded
}

fn encode_event(event: &Event, mode: ContentMode) -> Encoded {
    let key = event.subject().map(str::to_owned);
    match mode {
        ContentMode::Binary => {
            let parts = event.to_binary(Binding::KAFKA);
            let mut headers: Vec<(String, Vec<u8>)> = parts
                .headers
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            if let Some(ct) = parts.content_type {
                headers.push((CONTENT_TYPE_HEADER.to_owned(), ct.into_bytes()));
            }
            let value = parts.data.map(|d| d.to_vec()).unwrap_or_default();
            Encoded {
                key,
                headers,
                value,
            }
        }
        ContentMode::Structured => Encoded {
            key,
            headers: vec![(
                CONTENT_TYPE_HEADER.to_owned(),
                CONTENT_TYPE.as_bytes().to_vec(),
            )],
            value: event.to_json(),
        },
    }
}

/// Whether a content type announces a structured-mode CloudEvent
/// (`application/cloudevents` with any suffix or parameters).
fn is_structured(content_type: &str) -> bool {
    content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/cloudevents")
}

/// Decodes a record in either content mode, choosing by its content type
/// as the binding says.
///
/// # Errors
///
/// A message saying why the record is not a CloudEvent.
pub(crate) fn decode<H: Headers>(
    headers: Option<&H>,
    value: Option<&[u8]>,
) -> Result<Event, String> {
    // On the stack: a binary-mode event has a handful of headers, and this
    // runs once per record consumed.
    let mut pairs: smallvec::SmallVec<[(&str, &str); 12]> = smallvec::SmallVec::new();
    let mut content_type = None;
    if let Some(headers) = headers {
        for header in headers.iter() {
            let Some(raw) = header.value else { continue };
            let Ok(text) = std::str::from_utf8(raw) else {
                continue;
            };
            if header.key == ATTEMPT_HEADER || header.key == DUE_HEADER {
                continue;
            }
            if header.key.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
                content_type = Some(text);
            } else {
                pairs.push((header.key, text));
            }
        }
    }
    if content_type.is_some_and(is_structured) {
        return Event::from_json(value.unwrap_or_default())
            .map_err(|e| format!("structured-mode value: {e}"));
    }
    let data = value.filter(|v| !v.is_empty()).map(Bytes::copy_from_slice);
    Event::from_binary(Binding::KAFKA, pairs, content_type, data)
        .map_err(|e| format!("binary-mode headers: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventos_core::ext;

    fn event() -> Event {
        Event::builder("urn:eventos:test", "eventos.test.wire.v1")
            .subject("students/42")
            .data("application/json", r#"{"n":1}"#)
            .extension(ext::CORRELATION_ID, "corr-1")
            .and_then(|b| b.build())
            .unwrap()
    }

    #[test]
    fn both_modes_round_trip_with_the_subject_as_key() {
        let sent = event();
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = encode(&sent, mode, Stamp::default());
            assert_eq!(encoded.key.as_deref(), Some("students/42"));
            let headers = encoded.owned_headers();
            let back = decode(Some(&headers), Some(&encoded.value)).unwrap();
            assert_eq!(back, sent, "{mode:?}");
        }
    }

    #[test]
    fn binary_mode_uses_ce_headers_and_the_payload_as_value() {
        let encoded = encode(&event(), ContentMode::Binary, Stamp::default());
        let names: Vec<_> = encoded.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            names.contains(&"ce_id") && names.contains(&"ce_correlationid"),
            "{names:?}"
        );
        assert!(names.contains(&"content-type"), "{names:?}");
        assert_eq!(encoded.value, br#"{"n":1}"#);
    }

    #[test]
    fn a_stamp_survives_the_wire_and_stays_out_of_the_event() {
        let sent = event();
        let stamp = Stamp {
            attempt: 3,
            due_ms: Some(1_700_000_000_000),
        };
        let encoded = encode(&sent, ContentMode::Binary, stamp);
        let headers = encoded.owned_headers();
        assert_eq!(Stamp::read(Some(&headers)), stamp);
        assert_eq!(decode(Some(&headers), Some(&encoded.value)).unwrap(), sent);
        assert_eq!(Stamp::read::<OwnedHeaders>(None).attempt, 1);
    }

    #[test]
    fn a_record_that_is_no_cloud_event_is_named() {
        let err = decode::<OwnedHeaders>(None, Some(b"hello")).unwrap_err();
        assert!(err.starts_with("binary-mode headers:"), "{err}");
    }
}
