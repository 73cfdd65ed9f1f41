//! One topic's log: its segments, the durable end, and reading.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Buf, Bytes};

use crate::group::Group;
use crate::position::ReadPos;
use crate::record::{self, HEADER_LEN, Parsed, Record};
use crate::storage::StorageFile;
use crate::sync::{lock, read};

/// A sparse index entry is kept every this many bytes of a segment.
pub(crate) const INDEX_INTERVAL: u64 = 4096;

/// How much a fetch reads at once.
const READ_CHUNK: usize = 256 * 1024;

/// The file name of the segment starting at `base`.
pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The base offset in a segment file name.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn StorageFile>,
    /// Bytes made durable (and so readable).
    pub(crate) durable_len: AtomicU64,
    /// One past the last durable data offset in this segment.
    pub(crate) end_offset: AtomicU64,
    /// Unix milliseconds of the last durable append, for retention by age.
    pub(crate) last_append_ms: AtomicI64,
    /// Sparse (offset, position) pairs, ascending.
    pub(crate) index: Mutex<Vec<(u64, u64)>>,
}

impl Segment {
    pub(crate) fn new(base: u64, path: PathBuf, file: Arc<dyn StorageFile>) -> Self {
        Self {
            base,
            path,
            file,
            durable_len: AtomicU64::new(0),
            end_offset: AtomicU64::new(base),
            last_append_ms: AtomicI64::new(0),
            index: Mutex::new(Vec::new()),
        }
    }

    /// The position to start scanning from to find `offset`.
    fn seek(&self, offset: u64) -> u64 {
        let index = lock(&self.index);
        match index.partition_point(|&(o, _)| o <= offset) {
            0 => 0,
            i => index[i - 1].1,
        }
    }
}

/// A topic: segments on disk plus the groups consuming it.
#[derive(Debug)]
pub(crate) struct TopicLog {
    pub(crate) name: Arc<str>,
    pub(crate) dir: PathBuf,
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
    /// Every data offset below this is durable and readable.
    pub(crate) durable_next: AtomicU64,
    pub(crate) groups: Mutex<HashMap<String, Arc<Group>>>,
}

/// One data record read back.
pub(crate) struct ReadRecord {
    pub(crate) offset: u64,
    pub(crate) event: Bytes,
}

impl TopicLog {
    pub(crate) fn new(name: &str, dir: &Path) -> Self {
        Self {
            name: name.into(),
            dir: dir.to_path_buf(),
            segments: RwLock::new(Vec::new()),
            durable_next: AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The first retained offset (the durable end if nothing is retained).
    pub(crate) fn first_offset(&self) -> u64 {
        read(&self.segments)
            .first()
            .map_or_else(|| self.durable_next.load(Ordering::Acquire), |s| s.base)
    }

    /// Wakes every group's waiting consumers.
    pub(crate) fn notify_groups(&self) {
        for group in lock(&self.groups).values() {
            group.notify.notify_waiters();
        }
    }

    /// Where to start reading to reach `offset`.
    pub(crate) fn seek(&self, offset: u64) -> Option<ReadPos> {
        let segments = read(&self.segments);
        let i = segments.partition_point(|s| s.base <= offset);
        let segment = if i == 0 {
            segments.first()?
        } else {
            &segments[i - 1]
        };
        Some(ReadPos {
            segment: segment.base,
            pos: segment.seek(offset),
        })
    }

    /// Reads the durable data records at or after `from`, up to about a
    /// chunk, returning them and where to continue. Control records are
    /// skipped: at run time the groups' memory is authoritative.
    ///
    /// # Errors
    ///
    /// I/O errors, and corruption below the durable end (which recovery
    /// should have cut: it means the disk changed under us).
    pub(crate) fn read(&self, from: ReadPos) -> io::Result<(Vec<ReadRecord>, ReadPos)> {
        let (segment, next_base) = {
            let segments = read(&self.segments);
            let i = segments.partition_point(|s| s.base <= from.segment);
            let Some(segment) = i.checked_sub(1).map(|i| segments[i].clone()) else {
                // Everything before the first segment was removed by
                // retention after every group had passed it.
                return Ok((
                    Vec::new(),
                    segments.first().map_or(from, |s| ReadPos {
                        segment: s.base,
                        pos: 0,
                    }),
                ));
            };
            (segment, segments.get(i).map(|s| s.base))
        };
        let mut pos = if segment.base == from.segment {
            from.pos
        } else {
            0
        };
        let durable = segment.durable_len.load(Ordering::Acquire);
        if pos >= durable {
            // At the end of a sealed segment: continue in the next one.
            // The writer publishes a segment's final length before it adds
            // the next segment, so a next segment means this one is sealed.
            return Ok(match next_base {
                Some(base) => (
                    Vec::new(),
                    ReadPos {
                        segment: base,
                        pos: 0,
                    },
                ),
                None => (
                    Vec::new(),
                    ReadPos {
                        segment: segment.base,
                        pos,
                    },
                ),
            });
        }
        let mut want = READ_CHUNK.min(usize::try_from(durable - pos).unwrap_or(READ_CHUNK));
        let mut records = Vec::new();
        loop {
            let mut buf = vec![0; want];
            let n = read_exact_at(segment.file.as_ref(), pos, &mut buf)?;
            buf.truncate(n);
            let mut rest = Bytes::from(buf);
            let mut consumed = 0u64;
            loop {
                match record::parse(&rest) {
                    Parsed::Record { record, len } => {
                        if let Record::Data { offset, event, .. } = record {
                            records.push(ReadRecord { offset, event });
                        }
                        rest.advance(len);
                        consumed += len as u64;
                    }
                    Parsed::Incomplete => break,
                    Parsed::Corrupt(why) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} is corrupt at byte {} below its durable end ({why}); stop the process and reopen the log so recovery can cut it",
                                segment.path.display(),
                                pos + consumed
                            ),
                        ));
                    }
                }
            }
            pos += consumed;
            if consumed > 0 || pos >= durable {
                break;
            }
            // One record larger than the chunk: read exactly it.
            let header_len = if rest.len() >= HEADER_LEN {
                u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize
            } else {
                0
            };
            want =
                (HEADER_LEN + header_len).min(usize::try_from(durable - pos).unwrap_or(usize::MAX));
            if want <= rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} has a truncated record at byte {pos}",
                        segment.path.display()
                    ),
                ));
            }
        }
        Ok((
            records,
            ReadPos {
                segment: segment.base,
                pos,
            },
        ))
    }
}

fn read_exact_at(file: &dyn StorageFile, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(pos + done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}
