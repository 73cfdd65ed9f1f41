//! What every interop test sends the client that is not eventos, and how
//! it checks what came back, so each transport's test holds the same
//! attributes to the same account.

use eventos_core::Event;
use serde_json::Value;

/// The events sent to the other side: JSON data with a `correlationid`
/// extension, and text; both with `subject`.
///
/// # Panics
///
/// Never: the events are valid.
pub fn sample_events(subject: &str) -> (Event, Event) {
    let json = Event::builder(
        "/school/enrollment",
        "school.enrollment.payment_submitted.v1",
    )
    .subject(subject)
    .json(&serde_json::json!({"enrollment_id": "enr-1", "amount_cents": 49900}))
    .unwrap()
    .extension("correlationid", "corr-1")
    .unwrap()
    .build()
    .unwrap();
    let text = Event::builder("/school/contact", "school.contact.note.v1")
        .subject("enr-1")
        .data("text/plain", "olá, mundo")
        .build()
        .unwrap();
    (json, text)
}

/// Checks the two lines the other side printed for [`sample_events`]: the
/// attributes its CloudEvents SDK parsed and the data it decoded.
///
/// # Panics
///
/// When an attribute, the time (to the microsecond) or the data differs.
pub fn check_read(read: &[Value], json: &Event, text: &Event) {
    assert_eq!(read.len(), 2, "{read:?}");
    let (a, b) = (&read[0], &read[1]);
    assert_eq!(a["attributes"]["id"], json.id());
    assert_eq!(a["attributes"]["specversion"], "1.0");
    assert_eq!(a["attributes"]["source"], "/school/enrollment");
    assert_eq!(
        a["attributes"]["type"],
        "school.enrollment.payment_submitted.v1"
    );
    assert_eq!(a["attributes"]["subject"], json.subject().unwrap());
    assert_eq!(a["attributes"]["correlationid"], "corr-1");
    assert_eq!(a["attributes"]["datacontenttype"], "application/json");
    let sent = json.time().unwrap();
    let got = eventos_core::chrono::DateTime::parse_from_rfc3339(
        a["attributes"]["time"].as_str().unwrap(),
    )
    .unwrap()
    .to_utc();
    // Python's datetime keeps microseconds.
    assert!(
        (sent - got).num_microseconds().unwrap().abs() < 1,
        "{sent} vs {got}"
    );
    assert_eq!(a["data"]["amount_cents"], 49900);
    assert_eq!(b["attributes"]["id"], text.id());
    assert_eq!(b["attributes"]["datacontenttype"], "text/plain");
    assert_eq!(b["data"], "olá, mundo");
}

/// Checks an event eventos read against the line the other side printed
/// for the event it wrote (`school.python.note.v1` from `/python`).
///
/// # Panics
///
/// When an attribute, the time or the data differs; `context` is in the
/// message.
pub fn check_written(event: &Event, written: &Value, context: &str) {
    let attributes = &written["attributes"];
    assert_eq!(event.id(), attributes["id"].as_str().unwrap(), "{context}");
    assert_eq!(event.source(), "/python");
    assert_eq!(event.ty(), "school.python.note.v1");
    assert_eq!(event.subject(), Some("python-1"));
    assert_eq!(event.extension_str("correlationid"), Some("corr-py"));
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data: Value = serde_json::from_slice(event.data().unwrap()).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"from": "python", "n": 7}),
        "{context}"
    );
    let sent =
        eventos_core::chrono::DateTime::parse_from_rfc3339(attributes["time"].as_str().unwrap())
            .unwrap()
            .to_utc();
    assert_eq!(event.time(), Some(sent), "{context}");
}
