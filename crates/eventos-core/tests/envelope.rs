//! The envelope: JSON format, binary mode, typed events.

use eventos_core::{Binding, Bytes, Event, EventError, ExtensionValue, TypedEvent};
use proptest::prelude::*;

/// The example from the CloudEvents JSON format specification (section 3.1).
const SPEC_EXAMPLE: &str = r#"{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "subject": null,
    "id" : "C234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/json",
    "data" : {
        "appinfoA" : "abc",
        "appinfoB" : 123,
        "appinfoC" : true
    }
}"#;

/// The binary-data example from the same section.
const SPEC_BINARY_EXAMPLE: &str = r#"{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "id" : "A234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/vnd.apache.thrift.binary",
    "data_base64" : "... base64 encoded string ..."
}"#;

#[test]
fn spec_example_decodes() {
    let ev = Event::from_json(SPEC_EXAMPLE.as_bytes()).unwrap();
    assert_eq!(ev.id(), "C234-1234-1234");
    assert_eq!(ev.source(), "/mycontext");
    assert_eq!(ev.ty(), "com.example.someevent");
    assert_eq!(ev.subject(), None);
    assert_eq!(ev.time().unwrap().to_rfc3339(), "2018-04-05T17:31:00+00:00");
    assert_eq!(ev.extension_str("comexampleextension1"), Some("value"));
    assert_eq!(
        ev.extension("comexampleothervalue"),
        Some(&ExtensionValue::Integer(5))
    );
    let data: serde_json::Value = ev.decode_data().unwrap();
    assert_eq!(data["appinfoB"], 123);
    assert_eq!(data["appinfoC"], true);
}

#[test]
fn spec_binary_example_is_rejected_for_its_placeholder_base64() {
    // The spec's placeholder is not base64; the error names the attribute.
    let err = Event::from_json(SPEC_BINARY_EXAMPLE.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("data_base64"), "{err}");
}

#[test]
fn encoder_writes_required_attributes_and_specversion() {
    let ev = Event::builder("/enrollment", "school.test.v1")
        .json(&serde_json::json!({"a": 1}))
        .unwrap()
        .build()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
    assert_eq!(doc["specversion"], "1.0");
    for attr in ["id", "source", "type", "time", "datacontenttype"] {
        assert!(doc[attr].is_string(), "{attr} missing in {doc}");
    }
    assert_eq!(doc["data"], serde_json::json!({"a": 1}));
    // UUIDv7: version nibble is 7.
    let id = uuid::Uuid::parse_str(doc["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
}

/// Data-driven: each malformed document and the attribute its error names.
#[test]
fn decoding_names_the_bad_attribute() {
    let cases: &[(&str, &str)] = &[
        (r#"{"id":"1","source":"/s","type":"t"}"#, "specversion"),
        (
            r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
            "0.3",
        ),
        (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "`id`"),
        (r#"{"specversion":"1.0","id":"1","type":"t"}"#, "`source`"),
        (r#"{"specversion":"1.0","id":"1","source":"/s"}"#, "`type`"),
        (
            r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
            "`id`",
        ),
        (
            r#"{"specversion":"1.0","id":7,"source":"/s","type":"t"}"#,
            "`id`",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
            "`time`",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad_Name":"x"}"#,
            "Bad_Name",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","ext":1.5}"#,
            "`ext`",
        ),
        (
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
            "`data`",
        ),
        ("[1, 2]", "not a CloudEvents JSON document"),
    ];
    for (doc, expect) in cases {
        let err = Event::from_json(doc.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains(expect),
            "{doc}: error {err:?} should mention {expect}"
        );
    }
    assert!(matches!(
        Event::from_json(br#"{"specversion":"1.0","source":"/s","type":"t"}"#),
        Err(EventError::MissingAttribute("id"))
    ));
}

#[test]
fn text_payload_is_written_as_a_string() {
    let ev = Event::builder("/s", "t")
        .data("text/plain; charset=utf-8", "héllo")
        .build()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
    assert_eq!(doc["data"], "héllo");
    assert_eq!(Event::from_json(&ev.to_json()).unwrap(), ev);
}

#[test]
fn binary_payload_is_written_as_base64() {
    let ev = Event::builder("/s", "t")
        .data("application/octet-stream", vec![0u8, 255, 1])
        .build()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
    assert_eq!(doc["data_base64"], "AP8B");
    assert_eq!(Event::from_json(&ev.to_json()).unwrap(), ev);
}

#[test]
fn batch_round_trips() {
    let events: Vec<Event> = (0..3)
        .map(|i| Event::builder("/s", "t").json(&i).unwrap().build().unwrap())
        .collect();
    let back = Event::batch_from_json(&Event::batch_to_json(&events)).unwrap();
    assert_eq!(back, events);
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Ping {
    n: u32,
}
impl TypedEvent for Ping {
    const TYPE: &'static str = "test.ping.v1";
    fn subject(&self) -> Option<String> {
        Some(format!("ping-{}", self.n))
    }
}

#[test]
fn typed_decode_checks_the_type() {
    let ev = Event::from_typed("/s", &Ping { n: 3 }).unwrap();
    assert_eq!(ev.subject(), Some("ping-3"));
    assert_eq!(ev.decode::<Ping>().unwrap(), Ping { n: 3 });
    let other = Event::builder("/s", "other.v1")
        .json(&Ping { n: 1 })
        .unwrap()
        .build()
        .unwrap();
    assert!(matches!(
        other.decode::<Ping>(),
        Err(EventError::TypeMismatch { .. })
    ));
}

#[test]
fn binary_mode_maps_attributes_to_prefixed_headers() {
    let ev = Event::builder("/s", "t")
        .subject("k")
        .data("application/json", r#"{"x":1}"#)
        .extension("correlationid", "c-1")
        .unwrap()
        .extension("attempt", 2u32)
        .unwrap()
        .build()
        .unwrap();
    let parts = ev.to_binary(Binding::KAFKA);
    assert!(
        parts
            .headers
            .contains(&("ce_specversion".into(), "1.0".into()))
    );
    assert!(
        parts
            .headers
            .contains(&("ce_correlationid".into(), "c-1".into()))
    );
    assert_eq!(parts.content_type.as_deref(), Some("application/json"));
    // AMQP spells the prefix in mixed case; matching is case-insensitive.
    let amqp = ev.to_binary(Binding::AMQP);
    assert!(amqp.headers[0].0.starts_with("cloudEvents:"));
    let back = Event::from_binary(
        Binding::AMQP,
        amqp.headers
            .iter()
            .map(|(k, v)| (k.to_uppercase(), v.clone())),
        amqp.content_type.as_deref(),
        amqp.data.clone(),
    )
    .unwrap();
    assert_eq!(
        back.extension("attempt").and_then(ExtensionValue::as_i64),
        Some(2)
    );
    assert_eq!(back.id(), ev.id());
    assert_eq!(back.data(), ev.data());
}

#[test]
fn http_binding_percent_encodes_values() {
    let ev = Event::builder("/s", "t")
        .subject("hello, wörld ☃; a=\"b\" 100%")
        .build()
        .unwrap();
    let parts = ev.to_binary(Binding::HTTP);
    let subject = &parts
        .headers
        .iter()
        .find(|(k, _)| k == "ce-subject")
        .unwrap()
        .1;
    assert_eq!(
        subject,
        "hello,%20w%C3%B6rld%20%E2%98%83;%20a=%22b%22%20100%25"
    );
    assert!(
        parts
            .headers
            .iter()
            .all(|(_, v)| v.bytes().all(|b| (0x21..=0x7e).contains(&b)))
    );
    let back = Event::from_binary(Binding::HTTP, parts.headers, None, None).unwrap();
    assert_eq!(back.subject(), ev.subject());
    // Kafka keeps UTF-8 as is.
    let kafka = ev.to_binary(Binding::KAFKA);
    assert!(kafka.headers.iter().any(|(_, v)| v.contains('☃')));
    // A malformed escape names the attribute.
    let err = Event::from_binary(
        Binding::HTTP,
        [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-subject", "%G1"),
        ],
        None,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`subject`"), "{err}");
}

#[test]
fn binary_mode_requires_specversion() {
    let err = Event::from_binary(
        Binding::KAFKA,
        [("ce_id", "1"), ("ce_source", "/s"), ("ce_type", "t")],
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, EventError::MissingAttribute("specversion")));
}

#[test]
fn binary_headers_match_without_case_and_the_last_copy_wins() {
    let ev = Event::from_binary(
        Binding::KAFKA,
        [
            ("CE_SpecVersion", "1.0"),
            ("ce_id", "first"),
            ("Ce_Id", "second"),
            ("ce_source", "/s"),
            ("ce_type", "t"),
            ("CE_TraceParent", "00-x"),
            ("ce_", "not an attribute"),
            ("content-type", "ignored without a prefix"),
        ],
        None,
        None,
    )
    .unwrap();
    assert_eq!(ev.id(), "second");
    assert_eq!(
        ev.extensions()
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["traceparent"]
    );
    let err = Event::from_binary(
        Binding::KAFKA,
        [
            ("ce_specversion", "1.0"),
            ("ce_id", "1"),
            ("ce_source", "/s"),
            ("ce_type", "t"),
            ("ce_bad-name", "x"),
        ],
        None,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bad-name"), "{err}");
}

fn arb_event() -> impl Strategy<Value = Event> {
    let name = "[a-z][a-z0-9]{0,19}".prop_filter("not a context attribute", |n| {
        ![
            "id",
            "source",
            "specversion",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "dataschema",
            "data",
        ]
        .contains(&n.as_str())
    });
    let ext_value = prop_oneof![
        any::<String>().prop_map(ExtensionValue::String),
        any::<i64>().prop_map(ExtensionValue::Integer),
        any::<bool>().prop_map(ExtensionValue::Boolean),
    ];
    (
        ".+",
        ".+",
        ".+",
        proptest::option::of(any::<String>()),
        proptest::option::of(0i64..4_102_444_800_000_000_000),
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::btree_map(name, ext_value, 0..6),
    )
        .prop_map(|(id, source, ty, subject, nanos, data, exts)| {
            let mut b = Event::builder(source, ty)
                .id(id)
                .time(nanos.map(chrono::DateTime::from_timestamp_nanos))
                .data("application/octet-stream", Bytes::from(data));
            if let Some(s) = subject {
                b = b.subject(s);
            }
            for (k, v) in exts {
                b = b.extension(&k, v).unwrap();
            }
            b.build().unwrap()
        })
}

proptest! {
    #[test]
    fn json_round_trips_arbitrary_events(ev in arb_event()) {
        let back = Event::from_json(&ev.to_json()).unwrap();
        prop_assert_eq!(back, ev);
    }

    #[test]
    fn binary_mode_round_trips_all_but_extension_types(ev in arb_event()) {
        let parts = ev.to_binary(Binding::HTTP);
        let back = Event::from_binary(
            Binding::HTTP, parts.headers, parts.content_type.as_deref(), parts.data,
        ).unwrap();
        prop_assert_eq!(back.id(), ev.id());
        prop_assert_eq!(back.subject(), ev.subject());
        prop_assert_eq!(back.time(), ev.time());
        prop_assert_eq!(back.data(), ev.data());
        for (k, v) in ev.extensions() {
            prop_assert_eq!(back.extension(k).map(ToString::to_string), Some(v.to_string()));
        }
    }

    #[test]
    fn json_payloads_round_trip_by_value(v in proptest::collection::btree_map(".*", any::<i64>(), 0..8)) {
        let ev = Event::builder("/s", "t").json(&v).unwrap().build().unwrap();
        let back = Event::from_json(&ev.to_json()).unwrap();
        let decoded: std::collections::BTreeMap<String, i64> = back.decode_data().unwrap();
        prop_assert_eq!(decoded, v);
    }
}
