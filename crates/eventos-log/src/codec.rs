//! The on-disk encoding of an event: compact, versioned, zero-copy for the
//! payload.
//!
//! JSON would do, but every event is encoded once and decoded once per
//! group, and a length-prefixed binary form is several times cheaper both
//! ways and lets the payload be a slice of the read buffer.

use bytes::{Buf, BufMut, Bytes};
use chrono::DateTime;
use eventos_core::{Event, ExtensionValue};

const VERSION: u8 = 1;

const EXT_STRING: u8 = 0;
const EXT_INTEGER: u8 = 1;
const EXT_BOOLEAN: u8 = 2;

/// Why bytes on disk did not decode as an event.
#[derive(Debug, thiserror::Error)]
#[error("undecodable event: {0}")]
pub(crate) struct DecodeError(pub(crate) String);

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_varint(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
        None => buf.push(0),
    }
}

/// Appends the encoding of `event` to `buf`.
pub(crate) fn encode(event: &Event, buf: &mut Vec<u8>) {
    buf.push(VERSION);
    put_str(buf, event.id());
    put_str(buf, event.source());
    put_str(buf, event.ty());
    put_opt_str(buf, event.subject());
    match event.time() {
        Some(t) => {
            buf.push(1);
            buf.put_i64_le(t.timestamp());
            buf.put_u32_le(t.timestamp_subsec_nanos());
        }
        None => buf.push(0),
    }
    put_opt_str(buf, event.datacontenttype());
    put_opt_str(buf, event.dataschema());
    put_varint(buf, event.extensions().len() as u64);
    for (name, value) in event.extensions() {
        put_str(buf, name);
        match value {
            ExtensionValue::String(s) => {
                buf.push(EXT_STRING);
                put_str(buf, s);
            }
            ExtensionValue::Integer(i) => {
                buf.push(EXT_INTEGER);
                buf.put_i64_le(*i);
            }
            ExtensionValue::Boolean(b) => {
                buf.push(EXT_BOOLEAN);
                buf.push(u8::from(*b));
            }
        }
    }
    match event.data() {
        Some(data) => {
            buf.push(1);
            put_varint(buf, data.len() as u64);
            buf.extend_from_slice(data);
        }
        None => buf.push(0),
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn err(what: &str) -> DecodeError {
        DecodeError(format!("truncated or malformed {what}"))
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        if self.buf.remaining() < 1 {
            return Err(Self::err(what));
        }
        Ok(self.buf.get_u8())
    }

    fn varint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Self::err(what))
    }

    fn bytes(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let len = usize::try_from(self.varint(what)?).map_err(|_| Self::err(what))?;
        if self.buf.remaining() < len {
            return Err(Self::err(what));
        }
        Ok(self.buf.split_to(len))
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError(format!("{what} is not UTF-8")))
    }

    fn opt_string(&mut self, what: &str) -> Result<Option<String>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => self.string(what).map(Some),
            _ => Err(Self::err(what)),
        }
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        if self.buf.remaining() < 8 {
            return Err(Self::err(what));
        }
        Ok(self.buf.get_i64_le())
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        if self.buf.remaining() < 4 {
            return Err(Self::err(what));
        }
        Ok(self.buf.get_u32_le())
    }
}

/// Decodes an event; the payload shares `buf`'s memory.
pub(crate) fn decode(buf: Bytes) -> Result<Event, DecodeError> {
    let mut r = Reader { buf };
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(DecodeError(format!(
            "unknown event encoding version {version}"
        )));
    }
    let id = r.string("id")?;
    let source = r.string("source")?;
    let ty = r.string("type")?;
    let mut b = Event::builder_with_id(id, source, ty);
    if let Some(subject) = r.opt_string("subject")? {
        b = b.subject(subject);
    }
    match r.u8("time")? {
        0 => {}
        1 => {
            let secs = r.i64("time")?;
            let nanos = r.u32("time")?;
            let t = DateTime::from_timestamp(secs, nanos)
                .ok_or_else(|| DecodeError("time out of range".into()))?;
            b = b.time(Some(t));
        }
        _ => return Err(Reader::err("time")),
    }
    if let Some(ct) = r.opt_string("datacontenttype")? {
        b = b.datacontenttype(ct);
    }
    if let Some(schema) = r.opt_string("dataschema")? {
        b = b.dataschema(schema);
    }
    let exts = r.varint("extensions")?;
    for _ in 0..exts {
        let name = r.string("extension name")?;
        let value = match r.u8("extension")? {
            EXT_STRING => ExtensionValue::String(r.string("extension")?),
            EXT_INTEGER => ExtensionValue::Integer(r.i64("extension")?),
            EXT_BOOLEAN => ExtensionValue::Boolean(r.u8("extension")? != 0),
            _ => return Err(Reader::err("extension")),
        };
        b = b
            .extension(&name, value)
            .map_err(|e| DecodeError(e.to_string()))?;
    }
    match r.u8("data")? {
        0 => {}
        1 => b = b.data_bytes(r.bytes("data")?),
        _ => return Err(Reader::err("data")),
    }
    if r.buf.has_remaining() {
        return Err(DecodeError("trailing bytes after the event".into()));
    }
    b.build().map_err(|e| DecodeError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_attribute() {
        let ev = Event::builder("/s", "t")
            .subject("k")
            .dataschema("https://example.com/schema")
            .data("application/octet-stream", vec![0u8, 159, 146, 150])
            .extension("attempt", 3i64)
            .unwrap()
            .extension("flag", true)
            .unwrap()
            .extension("correlationid", "c")
            .unwrap()
            .build()
            .unwrap();
        let mut buf = Vec::new();
        encode(&ev, &mut buf);
        assert_eq!(decode(Bytes::from(buf)).unwrap(), ev);
    }

    #[test]
    fn truncations_are_errors_not_panics() {
        let ev = Event::builder("/s", "t")
            .json(&[1, 2, 3])
            .unwrap()
            .build()
            .unwrap();
        let mut buf = Vec::new();
        encode(&ev, &mut buf);
        for cut in 0..buf.len() {
            assert!(
                decode(Bytes::copy_from_slice(&buf[..cut])).is_err(),
                "cut at {cut}"
            );
        }
    }
}
