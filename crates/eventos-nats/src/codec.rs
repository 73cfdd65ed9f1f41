//! Events on the wire: the CloudEvents NATS protocol binding in both
//! content modes.
//!
//! Binary mode puts every attribute in a `ce-` header (core's
//! [`Binding::HTTP`] mapping, percent-encoded where a NATS header could
//! not carry the bytes), `datacontenttype` in `content-type` and the
//! payload as the body; structured mode sends the JSON event format as
//! `application/cloudevents+json`. A consumer reads both, choosing by the
//! content type as the binding says.

use async_nats::HeaderMap;
use bytes::Bytes;
use eventos_core::{Binding, CONTENT_TYPE, Event};

use crate::ContentMode;

/// The binding's header for the content type.
const CONTENT_TYPE_HEADER: &str = "content-type";

/// An event as a NATS message: headers and body.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Encodes `event` in `mode`.
pub(crate) fn encode(event: &Event, mode: ContentMode) -> Encoded {
    let mut headers = HeaderMap::new();
    match mode {
        ContentMode::Binary => {
            let parts = event.to_binary(Binding::HTTP);
            for (name, value) in parts.headers {
                headers.insert(name.as_str(), value);
            }
            if let Some(ct) = parts.content_type {
                headers.insert(CONTENT_TYPE_HEADER, ct);
            }
            Encoded {
                headers,
                body: parts.data.unwrap_or_default(),
            }
        }
        ContentMode::Structured => {
            headers.insert(CONTENT_TYPE_HEADER, CONTENT_TYPE);
            Encoded {
                headers,
                body: Bytes::from(event.to_json()),
            }
        }
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

/// Decodes a message in either content mode.
///
/// # Errors
///
/// A message saying why it is not a CloudEvent.
pub(crate) fn decode(headers: Option<&HeaderMap>, body: &Bytes) -> Result<Event, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    let mut content_type = None;
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.last() else { continue };
            if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
                content_type = Some(value.as_str());
            } else {
                pairs.push((name, value.as_str()));
            }
        }
    }
    if content_type.is_some_and(is_structured) {
        return Event::from_json(body).map_err(|e| format!("structured-mode body: {e}"));
    }
    let data = (!body.is_empty()).then(|| body.clone());
    Event::from_binary(Binding::HTTP, pairs, content_type, data)
        .map_err(|e| format!("binary-mode headers: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventos_core::ext;

    fn event() -> Event {
        Event::builder("urn:eventos:test", "eventos.test.wire.v1")
            .subject("students/42 ü")
            .data("application/json", r#"{"n":1}"#)
            .extension(ext::CORRELATION_ID, "corr-1")
            .and_then(|b| b.build())
            .unwrap()
    }

    #[test]
    fn both_modes_round_trip() {
        let sent = event();
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let encoded = encode(&sent, mode);
            let back = decode(Some(&encoded.headers), &encoded.body).unwrap();
            assert_eq!(back, sent, "{mode:?}");
        }
    }

    #[test]
    fn binary_mode_uses_percent_encoded_ce_headers_and_the_payload_as_body() {
        let encoded = encode(&event(), ContentMode::Binary);
        assert_eq!(
            encoded.headers.get("ce-subject").map(|v| v.as_str()),
            Some("students/42%20%C3%BC")
        );
        assert_eq!(
            encoded.headers.get("content-type").map(|v| v.as_str()),
            Some("application/json")
        );
        assert!(encoded.headers.get("ce-correlationid").is_some());
        assert_eq!(&encoded.body[..], br#"{"n":1}"#);
    }

    #[test]
    fn a_message_that_is_no_cloud_event_is_named() {
        let err = decode(None, &Bytes::from_static(b"hello")).unwrap_err();
        assert!(err.starts_with("binary-mode headers:"), "{err}");
    }
}
