//! Binary content mode: attributes in transport headers, payload as the body.
//!
//! Every protocol binding does the same thing with a different prefix
//! (`ce_` on Kafka, `cloudEvents:` on AMQP, `ce-` on HTTP) and keeps
//! `datacontenttype` in the protocol's own content-type field. This module
//! does the mapping once; a transport only moves the header pairs.
//!
//! The HTTP binding percent-encodes values outside printable ASCII (and
//! `"`, `%`); Kafka and AMQP carry UTF-8 as is.
//!
//! Headers carry strings, so extension values come back as
//! [`ExtensionValue::String`](crate::ExtensionValue::String); typed accessors
//! such as [`ExtensionValue::as_i64`](crate::ExtensionValue::as_i64) convert.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::SecondsFormat;

use crate::error::EventError;
use crate::event::{Event, ExtensionValue, SPEC_VERSION, validate_extension_name};
use crate::json::parse_time;

/// How one protocol binding names CloudEvents attributes in its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Prefix of every attribute header.
    pub prefix: &'static str,
    /// Whether header values are percent-encoded, as the HTTP binding
    /// requires for bytes outside printable ASCII and for `"` and `%`
    /// (header protocols such as HTTP and NATS cannot carry them raw).
    pub percent_encode: bool,
}

impl Binding {
    /// The Kafka protocol binding: `ce_` headers, raw UTF-8 values.
    pub const KAFKA: Binding = Binding {
        prefix: "ce_",
        percent_encode: false,
    };
    /// The AMQP protocol binding: `cloudEvents:` application properties,
    /// raw UTF-8 values.
    pub const AMQP: Binding = Binding {
        prefix: "cloudEvents:",
        percent_encode: false,
    };
    /// The HTTP binding's `ce-` headers with percent-encoded values; NATS
    /// headers use it too.
    pub const HTTP: Binding = Binding {
        prefix: "ce-",
        percent_encode: true,
    };

    fn encode(self, value: String) -> String {
        if !self.percent_encode {
            return value;
        }
        let plain = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
        if value.bytes().all(plain) {
            return value;
        }
        let mut out = String::with_capacity(value.len() + 8);
        for b in value.bytes() {
            if plain(b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    fn decode(self, name: &str, value: &str) -> Result<String, EventError> {
        if !self.percent_encode || !value.contains('%') {
            return Ok(value.to_owned());
        }
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(b) = hex else {
                    return Err(EventError::InvalidAttribute {
                        name: name.to_owned(),
                        reason: "malformed percent-encoding".into(),
                    });
                };
                out.push(b);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).map_err(|_| EventError::InvalidAttribute {
            name: name.to_owned(),
            reason: "percent-encoded bytes are not UTF-8".into(),
        })
    }
}

/// An event split for binary mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryParts {
    /// Attribute headers, prefixed, in a stable order.
    pub headers: Vec<(String, String)>,
    /// `datacontenttype`, for the protocol's own content-type field.
    pub content_type: Option<String>,
    /// The payload, untouched.
    pub data: Option<Bytes>,
}

impl Event {
    /// Splits the event into binary-mode headers, content type and body.
    pub fn to_binary(&self, binding: Binding) -> BinaryParts {
        let p = binding.prefix;
        let mut headers: Vec<(String, String)> = Vec::with_capacity(6 + self.extensions.len());
        headers.push((format!("{p}specversion"), SPEC_VERSION.to_owned()));
        headers.push((format!("{p}id"), self.id.clone()));
        headers.push((format!("{p}source"), self.source.clone()));
        headers.push((format!("{p}type"), self.ty.clone()));
        if let Some(subject) = &self.subject {
            headers.push((format!("{p}subject"), subject.clone()));
        }
        if let Some(time) = &self.time {
            headers.push((
                format!("{p}time"),
                time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            ));
        }
        if let Some(schema) = &self.dataschema {
            headers.push((format!("{p}dataschema"), schema.clone()));
        }
        for (name, value) in &self.extensions {
            headers.push((format!("{p}{name}"), value.to_string()));
        }
        let headers = headers
            .into_iter()
            .map(|(k, v)| (k, binding.encode(v)))
            .collect();
        BinaryParts {
            headers,
            content_type: self.datacontenttype.clone(),
            data: self.data.clone(),
        }
    }

    /// Rebuilds an event from binary-mode headers. Header names match the
    /// prefix case-insensitively; headers without the prefix are ignored.
    ///
    /// # Errors
    ///
    /// [`EventError::MissingAttribute`] / [`EventError::InvalidAttribute`] /
    /// [`EventError::UnsupportedSpecVersion`], as [`Event::from_json`].
    pub fn from_binary<K, V>(
        binding: Binding,
        headers: impl IntoIterator<Item = (K, V)>,
        content_type: Option<&str>,
        data: Option<Bytes>,
    ) -> Result<Event, EventError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        // Attributes are matched in place, without a map of them all: this
        // runs once per event consumed. A repeated header counts as its
        // last copy.
        let prefix = binding.prefix;
        let mut specversion = None;
        let (mut id, mut source, mut ty) = (None, None, None);
        let (mut subject, mut time, mut dataschema, mut header_ct) = (None, None, None, None);
        let mut extensions = BTreeMap::new();
        for (k, v) in headers {
            let k = k.as_ref();
            let Some(name) = k
                .get(..prefix.len())
                .filter(|p| k.len() > prefix.len() && p.eq_ignore_ascii_case(prefix))
                .and_then(|_| k.get(prefix.len()..))
            else {
                continue;
            };
            let value = binding.decode(name, v.as_ref())?;
            let slot = match () {
                () if name.eq_ignore_ascii_case("specversion") => &mut specversion,
                () if name.eq_ignore_ascii_case("id") => &mut id,
                () if name.eq_ignore_ascii_case("source") => &mut source,
                () if name.eq_ignore_ascii_case("type") => &mut ty,
                () if name.eq_ignore_ascii_case("subject") => &mut subject,
                () if name.eq_ignore_ascii_case("time") => &mut time,
                () if name.eq_ignore_ascii_case("dataschema") => &mut dataschema,
                // Some bindings also mirror the content type as an
                // attribute header.
                () if name.eq_ignore_ascii_case("datacontenttype") => &mut header_ct,
                () => {
                    extensions.insert(name.to_ascii_lowercase(), value);
                    continue;
                }
            };
            *slot = Some(value);
        }
        match specversion {
            None => return Err(EventError::MissingAttribute("specversion")),
            Some(v) if v != SPEC_VERSION => return Err(EventError::UnsupportedSpecVersion(v)),
            Some(_) => {}
        }
        let required = |name: &'static str, value: Option<String>| match value {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(EventError::MissingAttribute(name)),
        };
        let id = required("id", id)?;
        let source = required("source", source)?;
        let ty = required("type", ty)?;
        let time = time.map(|t| parse_time("time", &t)).transpose()?;
        let extensions = extensions
            .into_iter()
            .map(|(name, value)| {
                validate_extension_name(&name)?;
                Ok((name, ExtensionValue::String(value)))
            })
            .collect::<Result<BTreeMap<_, _>, EventError>>()?;
        Ok(Event {
            id,
            source,
            ty,
            subject,
            time,
            datacontenttype: content_type.map(str::to_owned).or(header_ct),
            dataschema,
            data,
            extensions,
        })
    }
}
