//! Record framing: `[len: u32][crc32c(body): u32][body]`, little-endian.
//!
//! A body starts with a kind byte. Data records carry the topic offset, the
//! append time and the encoded event; control records carry one group's
//! settlement of one offset, so a topic's group state commits in the same
//! file, and the same `fdatasync`, as its events.

use bytes::{Buf, BufMut, Bytes};

/// Bytes before a record's body.
pub(crate) const HEADER_LEN: usize = 8;

/// The largest body accepted; anything claiming more is corruption.
pub(crate) const MAX_BODY_LEN: usize = 32 * 1024 * 1024;

const KIND_DATA: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_RETRY: u8 = 3;
const KIND_DEAD_LETTER: u8 = 4;

/// A group's settlement of one offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Settled for good.
    Ack { group: u32, offset: u64 },
    /// Redeliver as `attempt` no sooner than `due_ms` (Unix milliseconds,
    /// so the schedule survives a restart).
    Retry {
        group: u32,
        offset: u64,
        attempt: u32,
        due_ms: i64,
    },
    /// Moved to the dead-letter topic; settled for good.
    DeadLetter { group: u32, offset: u64 },
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// An event at `offset`.
    Data {
        offset: u64,
        time_ms: i64,
        event: Bytes,
    },
    /// A settlement.
    Control(Control),
}

/// Appends one framed record whose body `write_body` produces.
fn frame(buf: &mut Vec<u8>, write_body: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    write_body(buf);
    let body = &buf[start + HEADER_LEN..];
    let len = u32::try_from(body.len()).expect("record bodies are far below 4 GiB");
    let crc = crc32c::crc32c(body);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a data record.
pub(crate) fn put_data(buf: &mut Vec<u8>, offset: u64, time_ms: i64, event: &[u8]) {
    frame(buf, |b| {
        b.push(KIND_DATA);
        b.put_u64_le(offset);
        b.put_i64_le(time_ms);
        b.extend_from_slice(event);
    });
}

/// Appends a control record.
pub(crate) fn put_control(buf: &mut Vec<u8>, control: Control) {
    frame(buf, |b| match control {
        Control::Ack { group, offset } => {
            b.push(KIND_ACK);
            b.put_u32_le(group);
            b.put_u64_le(offset);
        }
        Control::Retry {
            group,
            offset,
            attempt,
            due_ms,
        } => {
            b.push(KIND_RETRY);
            b.put_u32_le(group);
            b.put_u64_le(offset);
            b.put_u32_le(attempt);
            b.put_i64_le(due_ms);
        }
        Control::DeadLetter { group, offset } => {
            b.push(KIND_DEAD_LETTER);
            b.put_u32_le(group);
            b.put_u64_le(offset);
        }
    });
}

/// The result of parsing at one position.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A valid record spanning `len` bytes.
    Record { record: Record, len: usize },
    /// The buffer ends inside a record: read more, or, at the end of the
    /// file, a torn write.
    Incomplete,
    /// Not a valid record: the log ends here.
    Corrupt(String),
}

/// Parses the record at the start of `buf`. Never panics, whatever `buf`
/// holds.
pub(crate) fn parse(buf: &Bytes) -> Parsed {
    if buf.len() < HEADER_LEN {
        return Parsed::Incomplete;
    }
    let mut header = &buf[..HEADER_LEN];
    let len = header.get_u32_le() as usize;
    let crc = header.get_u32_le();
    if len == 0 || len > MAX_BODY_LEN {
        return Parsed::Corrupt(format!("implausible record length {len}"));
    }
    if buf.len() < HEADER_LEN + len {
        return Parsed::Incomplete;
    }
    let body = buf.slice(HEADER_LEN..HEADER_LEN + len);
    if crc32c::crc32c(&body) != crc {
        return Parsed::Corrupt("checksum mismatch".into());
    }
    match decode_body(body) {
        Some(record) => Parsed::Record {
            record,
            len: HEADER_LEN + len,
        },
        None => Parsed::Corrupt("malformed record body".into()),
    }
}

fn decode_body(mut body: Bytes) -> Option<Record> {
    let need = |b: &Bytes, n: usize| (b.remaining() >= n).then_some(());
    need(&body, 1)?;
    let kind = body.get_u8();
    let record = match kind {
        KIND_DATA => {
            need(&body, 16)?;
            let offset = body.get_u64_le();
            let time_ms = body.get_i64_le();
            return Some(Record::Data {
                offset,
                time_ms,
                event: body,
            });
        }
        KIND_ACK | KIND_DEAD_LETTER => {
            need(&body, 12)?;
            let group = body.get_u32_le();
            let offset = body.get_u64_le();
            if kind == KIND_ACK {
                Control::Ack { group, offset }
            } else {
                Control::DeadLetter { group, offset }
            }
        }
        KIND_RETRY => {
            need(&body, 24)?;
            Control::Retry {
                group: body.get_u32_le(),
                offset: body.get_u64_le(),
                attempt: body.get_u32_le(),
                due_ms: body.get_i64_le(),
            }
        }
        _ => return None,
    };
    body.is_empty().then_some(Record::Control(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let controls = [
            Control::Ack {
                group: 1,
                offset: 2,
            },
            Control::Retry {
                group: 3,
                offset: 4,
                attempt: 5,
                due_ms: -6,
            },
            Control::DeadLetter {
                group: 7,
                offset: 8,
            },
        ];
        let mut buf = Vec::new();
        put_data(&mut buf, 42, 1_700_000_000_000, b"event bytes");
        for c in controls {
            put_control(&mut buf, c);
        }
        let mut rest = Bytes::from(buf);
        let mut got = Vec::new();
        while !rest.is_empty() {
            match parse(&rest) {
                Parsed::Record { record, len } => {
                    got.push(record);
                    rest.advance(len);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            got[0],
            Record::Data {
                offset: 42,
                time_ms: 1_700_000_000_000,
                event: Bytes::from_static(b"event bytes")
            }
        );
        assert_eq!(&got[1..], &controls.map(Record::Control));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let mut buf = Vec::new();
        put_data(&mut buf, 1, 2, b"some payload bytes");
        for i in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                !matches!(parse(&Bytes::from(bad)), Parsed::Record { .. }),
                "bit {i} flipped went unnoticed"
            );
        }
    }
}
