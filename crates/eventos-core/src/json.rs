//! Structured content mode: the CloudEvents JSON event format.
//!
//! The payload goes into `data` when it is JSON (embedded as-is, never
//! re-serialized) or text, and into `data_base64` otherwise, as the JSON
//! format specifies. Decoding names the attribute that is missing or wrong.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::error::EventError;
use crate::event::{Event, ExtensionValue, SPEC_VERSION, is_json_content_type};

/// The media type of a structured-mode JSON event.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The media type of a JSON batch of events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

impl Event {
    /// Encodes the event in the CloudEvents JSON format.
    pub fn to_json(&self) -> Vec<u8> {
        // Writing into a Vec cannot fail, and every field serializes.
        serde_json::to_vec(self).expect("an Event always serializes to JSON")
    }

    /// Decodes an event from the CloudEvents JSON format.
    ///
    /// # Errors
    ///
    /// [`EventError::Json`] if the input is not a JSON object;
    /// [`EventError::UnsupportedSpecVersion`] unless `specversion` is `1.0`;
    /// [`EventError::MissingAttribute`] / [`EventError::InvalidAttribute`]
    /// naming the first attribute that is absent or malformed.
    pub fn from_json(input: &[u8]) -> Result<Event, EventError> {
        let doc: BTreeMap<String, &RawValue> =
            serde_json::from_slice(input).map_err(EventError::Json)?;
        decode(&doc)
    }

    /// Encodes events as a JSON batch (an array of structured events).
    pub fn batch_to_json(events: &[Event]) -> Vec<u8> {
        serde_json::to_vec(events).expect("an Event always serializes to JSON")
    }

    /// Decodes a JSON batch.
    ///
    /// # Errors
    ///
    /// As [`Event::from_json`], for the first bad event.
    pub fn batch_from_json(input: &[u8]) -> Result<Vec<Event>, EventError> {
        let docs: Vec<BTreeMap<String, &RawValue>> =
            serde_json::from_slice(input).map_err(EventError::Json)?;
        docs.iter().map(decode).collect()
    }
}

fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", SPEC_VERSION)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("source", &self.source)?;
        map.serialize_entry("type", &self.ty)?;
        if let Some(subject) = &self.subject {
            map.serialize_entry("subject", subject)?;
        }
        if let Some(time) = &self.time {
            map.serialize_entry("time", &format_time(time))?;
        }
        if let Some(ct) = &self.datacontenttype {
            map.serialize_entry("datacontenttype", ct)?;
        }
        if let Some(schema) = &self.dataschema {
            map.serialize_entry("dataschema", schema)?;
        }
        for (name, value) in &self.extensions {
            match value {
                ExtensionValue::String(s) => map.serialize_entry(name, s)?,
                ExtensionValue::Integer(i) => map.serialize_entry(name, i)?,
                ExtensionValue::Boolean(b) => map.serialize_entry(name, b)?,
            }
        }
        if let Some(data) = &self.data {
            let text_ct = self
                .datacontenttype
                .as_deref()
                .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/"));
            if self.is_json() {
                match serde_json::from_slice::<&RawValue>(data) {
                    Ok(raw) => map.serialize_entry("data", raw)?,
                    // Declared JSON but is not: carry the bytes faithfully.
                    Err(_) => map.serialize_entry("data_base64", &BASE64.encode(data))?,
                }
            } else if let (true, Ok(text)) = (text_ct, std::str::from_utf8(data)) {
                map.serialize_entry("data", text)?;
            } else {
                map.serialize_entry("data_base64", &BASE64.encode(data))?;
            }
        }
        map.end()
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> EventError {
    EventError::InvalidAttribute {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

fn string_attr(
    doc: &BTreeMap<String, &RawValue>,
    name: &'static str,
) -> Result<Option<String>, EventError> {
    match doc.get(name) {
        None => Ok(None),
        Some(raw) if is_null(raw) => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map(Some)
            .map_err(|_| invalid(name, format!("expected a string, found {}", raw.get()))),
    }
}

fn required(doc: &BTreeMap<String, &RawValue>, name: &'static str) -> Result<String, EventError> {
    match string_attr(doc, name)? {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(invalid(name, "must not be empty")),
        None => Err(EventError::MissingAttribute(name)),
    }
}

pub(crate) fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, EventError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid(name, format!("not an RFC 3339 timestamp ({e})")))
}

fn decode(doc: &BTreeMap<String, &RawValue>) -> Result<Event, EventError> {
    let specversion = match string_attr(doc, "specversion")? {
        Some(v) => v,
        None => return Err(EventError::MissingAttribute("specversion")),
    };
    if specversion != SPEC_VERSION {
        return Err(EventError::UnsupportedSpecVersion(specversion));
    }
    let id = required(doc, "id")?;
    let source = required(doc, "source")?;
    let ty = required(doc, "type")?;
    let subject = string_attr(doc, "subject")?;
    let time = string_attr(doc, "time")?
        .map(|t| parse_time("time", &t))
        .transpose()?;
    let datacontenttype = string_attr(doc, "datacontenttype")?;
    let dataschema = string_attr(doc, "dataschema")?;

    let data = match (doc.get("data"), doc.get("data_base64")) {
        (Some(d), Some(b)) if !is_null(d) && !is_null(b) => {
            return Err(invalid("data", "`data` and `data_base64` are exclusive"));
        }
        (_, Some(b)) if !is_null(b) => {
            let text: String = serde_json::from_str(b.get())
                .map_err(|_| invalid("data_base64", "expected a base64 string"))?;
            Some(Bytes::from(BASE64.decode(text.trim())?))
        }
        (Some(d), _) if !is_null(d) => {
            let json_ct = datacontenttype.as_deref().is_none_or(is_json_content_type);
            if !json_ct && d.get().starts_with('"') {
                let text: String =
                    serde_json::from_str(d.get()).map_err(|e| invalid("data", e.to_string()))?;
                Some(Bytes::from(text))
            } else {
                Some(Bytes::copy_from_slice(d.get().as_bytes()))
            }
        }
        _ => None,
    };

    let mut extensions = BTreeMap::new();
    for (name, raw) in doc {
        if matches!(
            name.as_str(),
            "specversion"
                | "id"
                | "source"
                | "type"
                | "subject"
                | "time"
                | "datacontenttype"
                | "dataschema"
                | "data"
                | "data_base64"
        ) || is_null(raw)
        {
            continue;
        }
        crate::event::validate_extension_name(name)?;
        let value: serde_json::Value =
            serde_json::from_str(raw.get()).map_err(|e| invalid(name, e.to_string()))?;
        let value = match value {
            serde_json::Value::String(s) => ExtensionValue::String(s),
            serde_json::Value::Bool(b) => ExtensionValue::Boolean(b),
            serde_json::Value::Number(n) if n.is_i64() => {
                ExtensionValue::Integer(n.as_i64().unwrap_or_default())
            }
            other => {
                return Err(invalid(
                    name,
                    format!("extension values are strings, integers or booleans, found {other}"),
                ));
            }
        };
        extensions.insert(name.clone(), value);
    }

    Ok(Event {
        id,
        source,
        ty,
        subject,
        time,
        datacontenttype,
        dataschema,
        data,
        extensions,
    })
}
