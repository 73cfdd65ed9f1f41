//! The HTTP conventions every service of the reference system follows.
//!
//! Every failure a client can cause is an RFC 9457 `application/problem+json`
//! answer with a 4xx status that says what is wrong and how to fix it —
//! never a 500, never a panic. [`Problem`] is that answer; [`StrictJson`] is
//! the body extractor whose every rejection (wrong content type, malformed
//! JSON, wrong types, unknown or missing fields, oversize body) becomes one.
//! [`EmailAddress`] is the one address syntax every service parses with,
//! [`has_control`] the one check of text fields for control characters,
//! and [`PathId`] the one extractor of ids from paths. [`holds_card_number`]
//! and [`mask_card_numbers`] find card numbers typed where no card belongs.
//! [`NotificationKey`] issues and checks the token that lets a student read
//! their notifications. [`refuse_oversize_body`] answers 413 from
//! `Content-Length` alone, and [`SseStreams`] bounds and ends the
//! server-sent event streams.
//!
//! No rejection echoes a value from the body: serde's messages quote the
//! value of a field of the wrong type (`invalid type: integer `123``), and
//! the field may be a CVV. The field's name and the expected type are kept,
//! the value is cut, and any long digit run left is redacted.

mod cards;
mod email;
mod key;
mod sse;
mod token;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use cards::{MAX_GAP, card_numbers, holds_card_number, mask_card_numbers, redact_digits};
pub use email::{EmailAddress, EmailError, MAX_EMAIL_LEN};
pub use key::{HmacSha256, KeyError, SecretKey};
pub use sse::{ClientIp, SseLimits, SsePermit, SseStreams};
pub use token::NotificationKey;

/// The largest request body any service accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The media type of problem details.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// An RFC 9457 problem-details answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short, stable summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What is wrong in this request, and how to fix it.
    pub detail: String,
    /// For validation problems: each invalid field and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Seconds after which retrying may succeed, sent as `Retry-After`
    /// (for 429 and 503).
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON pointer to the field, e.g. `/payment/card_number`.
    pub pointer: String,
    /// What is wrong with it.
    pub detail: String,
}

impl Problem {
    /// A problem of `status`, with a kind slug (e.g. `invalid-body`) and the
    /// detail.
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after: None,
        }
    }

    /// The same problem, telling the client to retry after `secs` seconds.
    #[must_use]
    pub fn retry_after(self, secs: u32) -> Self {
        Self {
            retry_after: Some(secs),
            ..self
        }
    }

    /// 413 for a body over [`MAX_BODY_BYTES`].
    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Body too large",
            format!("the body exceeds {MAX_BODY_BYTES} bytes; send less"),
        )
    }

    /// 422: the body is well-formed but its values are invalid.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.pointer, e.detail))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Invalid request",
                detail,
            )
        }
    }

    /// 404 for a resource that does not exist. `what` names the kind of
    /// resource, never the id asked for: the id is the caller's input, and
    /// echoing it back makes the problem a reflector for whatever was sent.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("{what} does not exist; check the id in the URL"),
        )
    }

    /// 503: the service cannot take the request right now; retry later
    /// (`Retry-After: 2`). What makes a service unavailable here (a full
    /// disk, a database busy, a dependency down) passes in seconds or is
    /// fixed by an operator; a client that waits a little and sends the
    /// same request again (with its Idempotency-Key) loses nothing.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
        .retry_after(2)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body, parsed strictly; every rejection is a [`Problem`].
///
/// Unknown fields are refused by the target type
/// (`#[serde(deny_unknown_fields)]`); the body limit is set by the router
/// (`DefaultBodyLimit::max(MAX_BODY_BYTES)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                let mut problem = problem_for(&rejection);
                problem.detail = redact_digits(&without_values(&problem.detail));
                Err(problem)
            }
        }
    }
}

/// serde's "invalid type: integer `123`, expected a string" without the
/// value: "invalid type: integer, expected a string". The value is what
/// was sent in a field of the wrong type, and that field may be a CVV or a
/// card number, in any type.
fn without_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let marker = ["invalid type: ", "invalid value: "]
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, m.len())))
            .min();
        let Some((at, len)) = marker else {
            out.push_str(rest);
            return out;
        };
        let start = at + len;
        out.push_str(&rest[..start]);
        // The value ends where serde's "expected" begins; the last one,
        // because a quoted string may itself contain ", expected".
        let Some(end) = rest[start..].rfind(", expected").map(|e| start + e) else {
            // No "expected" to keep: drop everything after the marker.
            out.push_str("a value of the wrong type");
            return out;
        };
        let unexpected = &rest[start..end];
        let kind = unexpected
            .split(['`', '"'])
            .next()
            .unwrap_or_default()
            .trim_end();
        out.push_str(kind);
        rest = &rest[end..];
    }
}

fn problem_for(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(e) => Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "Malformed JSON",
            format!("the body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            "Invalid request body",
            // serde's message names the field and the expected type.
            e.body_text(),
        ),
        JsonRejection::BytesRejection(e) => {
            let text = e.body_text();
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE || text.contains("length limit") {
                Problem::body_too_large()
            } else if text.contains("timeout") || text.contains("timed out") {
                // The edge's body-read timeout (a pause longer than it
                // between two pieces of the body) surfaces as a body error.
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body-timeout",
                    "Body too slow",
                    "the body stopped arriving before it was complete; send it without pauses",
                )
            } else {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable-body",
                    "Unreadable body",
                    format!("the body could not be read: {text}"),
                )
            }
        }
        other => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "Invalid request body",
            other.body_text(),
        ),
    }
}

/// Whether `text` holds a control character (NUL, DEL, C0 and C1, and the
/// Unicode line and paragraph separators) a text field must not contain.
/// With `multiline`, `\n` and `\t` are allowed, as in a message body; a
/// lone `\r` never is (write line breaks as `\n`).
pub fn has_control(text: &str, multiline: bool) -> bool {
    text.chars().any(|c| {
        let allowed = multiline && matches!(c, '\n' | '\t');
        !allowed && (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    })
}

/// The detail of a field error for a control character.
pub const CONTROL_DETAIL: &str =
    "remove control characters (such as NUL, tab or line breaks) from this field";

/// An id taken from the request path: a UUID, in its hyphenated form
/// (`0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d`), lower-cased.
///
/// Every id the services hand out is one, so anything else cannot name a
/// resource: it is answered with a 404 problem at once — without a
/// database lookup, and without echoing the id, whatever its length or
/// content. `what` of the 404 is "resource"; a handler that knows better
/// answers its own 404 for a well-formed id that is not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathId(pub String);

/// The length of a hyphenated UUID.
const UUID_LEN: usize = 36;

impl PathId {
    /// Checks `raw` as an id (see [`PathId`]).
    ///
    /// # Errors
    ///
    /// The 404 [`Problem`] for anything but a hyphenated UUID.
    pub fn parse(raw: &str) -> Result<Self, Problem> {
        let hyphens_at = [8, 13, 18, 23];
        let ok = raw.len() == UUID_LEN
            && raw.bytes().enumerate().all(|(i, b)| {
                if hyphens_at.contains(&i) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        if ok {
            Ok(Self(raw.to_ascii_lowercase()))
        } else {
            Err(Problem::not_found("resource"))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // A path that is not even valid percent-encoded UTF-8 names nothing
        // either.
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| Problem::not_found("resource"))?;
        Self::parse(&raw)
    }
}

/// One entry of a timeline (`GET /contact/{id}`, `GET /enrollments/{id}`):
/// an event that touched the entity, as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TimelineEntry {
    /// The CloudEvents type of the event (or `received`).
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339 time it was recorded.
    pub time: String,
    /// The service that produced it.
    pub service: String,
    /// The delivery attempt it came from.
    pub attempt: u32,
    /// More about it (a score, a reason, an error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Milliseconds since the Unix epoch: how the services store times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A stored time as the API shows it: RFC 3339, milliseconds, UTC.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Refuses a request whose `Content-Length` is over [`MAX_BODY_BYTES`]
/// with a 413 before any of the body is read: the body limit alone acts
/// only on bytes received, so a client announcing a large body and sending
/// nothing would otherwise be waited for. Install it with
/// `axum::middleware::from_fn`.
pub async fn refuse_oversize_body(request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > MAX_BODY_BYTES as u64 => Problem::body_too_large().into_response(),
        _ => next.run(request).await,
    }
}

/// The fallback for unknown paths: a 404 problem instead of an empty body.
pub async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no-route",
        "No such endpoint",
        "no endpoint at this path; see the README for the API",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_found_and_body_whitespace_is_not() {
        for bad in [
            "a\0b",
            "a\u{b}",
            "a\u{c}",
            "a\r",
            "\u{7f}",
            "\u{85}",
            "a\u{2028}b",
        ] {
            assert!(has_control(bad, false), "{bad:?}");
            assert!(has_control(bad, true), "{bad:?}");
        }
        for multi_only in ["a\nb", "a\tb"] {
            assert!(has_control(multi_only, false), "{multi_only:?}");
            assert!(!has_control(multi_only, true), "{multi_only:?}");
        }
        assert!(!has_control("Olá — ünïcode 😀", false));
    }

    #[test]
    fn path_ids_are_uuids_and_never_echoed() {
        let id = "0190C3F4-6f1e-7a5b-9c2d-3e4f5a6b7c8d";
        assert_eq!(PathId::parse(id).unwrap().0, id.to_ascii_lowercase());
        let long = "x".repeat(10 * 1024);
        for bad in [
            "",
            "nope",
            "0190c3f46f1e7a5b9c2d3e4f5a6b7c8d",
            "{0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d}",
            "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d0",
            "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8g",
            "0190c3f4-6f1e-7a5b-9c2d+3e4f5a6b7c8d",
            &long,
        ] {
            let p = PathId::parse(bad).unwrap_err();
            assert_eq!(p.status, 404, "{bad}");
            assert!(bad.is_empty() || !p.detail.contains(bad), "{}", p.detail);
        }
    }

    #[test]
    fn values_of_the_wrong_type_are_never_echoed() {
        for (text, shown) in [
            (
                "payment.cvv: invalid type: integer `123`, expected a string at line 1 column 9",
                "payment.cvv: invalid type: integer, expected a string at line 1 column 9",
            ),
            (
                "x: invalid type: floating point `12.5`, expected a string",
                "x: invalid type: floating point, expected a string",
            ),
            (
                "x: invalid type: boolean `true`, expected a string",
                "x: invalid type: boolean, expected a string",
            ),
            (
                "x: invalid type: string \"987, expected u64\", expected u64 at line 1",
                "x: invalid type: string, expected u64 at line 1",
            ),
            (
                "x: invalid value: integer `-987`, expected u64",
                "x: invalid value: integer, expected u64",
            ),
            ("missing field `cvv`", "missing field `cvv`"),
            (
                "x: invalid type: string \"987\"",
                "x: invalid type: a value of the wrong type",
            ),
        ] {
            assert_eq!(without_values(text), shown, "{text}");
        }
    }

    #[test]
    fn problems_serialize_per_rfc_9457() {
        let p = Problem::validation(vec![FieldError {
            pointer: "/email".into(),
            detail: "not an e-mail address".into(),
        }]);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["status"], 422);
        assert_eq!(json["type"], "/problems/validation");
        assert_eq!(json["errors"][0]["pointer"], "/email");
        let response = p.into_response();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            PROBLEM_CONTENT_TYPE
        );
    }
}
