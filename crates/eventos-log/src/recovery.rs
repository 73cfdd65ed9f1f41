//! Opening a data directory: scan every segment, cut a torn or corrupt
//! tail, rebuild indexes and group state from the control records.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes};
use eventos_core::validate_name;

use crate::LogError;
use crate::group::{Group, GroupState};
use crate::record::{self, Control, Parsed, Record};
use crate::storage::{Storage, read_all};
use crate::sync::{lock, write};
use crate::topic::{INDEX_INTERVAL, Segment, TopicLog, parse_segment_name};
use crate::writer::{TopicWriter, load_groups};

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Topics found.
    pub topics: usize,
    /// Segments scanned.
    pub segments: usize,
    /// Valid records read (data and control).
    pub records: u64,
    /// Every cut made, in order.
    pub cuts: Vec<Cut>,
}

/// A cut of a torn or corrupt tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The segment cut.
    pub path: PathBuf,
    /// The byte position where its valid records end.
    pub at: u64,
    /// How many bytes were removed from it.
    pub bytes: u64,
    /// Later segments removed because they follow the cut.
    pub removed_segments: usize,
    /// Why: `torn record`, `checksum mismatch`, ….
    pub reason: String,
}

pub(crate) struct Recovered {
    pub(crate) topics: HashMap<String, Arc<TopicLog>>,
    pub(crate) writers: HashMap<Arc<str>, TopicWriter>,
    pub(crate) report: RecoveryReport,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Scans `data` (a whole segment), returning the valid length, the data
/// records' offsets, and why it stopped early, if it did. `base` is the
/// offset the first data record must carry.
pub(crate) struct Scan {
    pub(crate) valid_len: u64,
    pub(crate) next_offset: u64,
    pub(crate) last_time_ms: i64,
    pub(crate) index: Vec<(u64, u64)>,
    pub(crate) controls: Vec<Control>,
    pub(crate) records: u64,
    pub(crate) stop: Option<String>,
}

pub(crate) fn scan(data: Bytes, base: u64) -> Scan {
    let mut s = Scan {
        valid_len: 0,
        next_offset: base,
        last_time_ms: 0,
        index: Vec::new(),
        controls: Vec::new(),
        records: 0,
        stop: None,
    };
    let mut rest = data;
    let mut last_indexed: Option<u64> = None;
    while !rest.is_empty() {
        match record::parse(&rest) {
            Parsed::Record { record, len } => {
                match record {
                    Record::Data {
                        offset, time_ms, ..
                    } => {
                        if offset != s.next_offset {
                            s.stop = Some(format!(
                                "offset {offset} where {} was expected",
                                s.next_offset
                            ));
                            break;
                        }
                        if last_indexed.is_none_or(|l| s.valid_len >= l + INDEX_INTERVAL) {
                            s.index.push((offset, s.valid_len));
                            last_indexed = Some(s.valid_len);
                        }
                        s.next_offset += 1;
                        s.last_time_ms = time_ms;
                    }
                    Record::Control(c) => s.controls.push(c),
                }
                s.records += 1;
                s.valid_len += len as u64;
                rest.advance(len);
            }
            Parsed::Incomplete => {
                s.stop = Some("torn record at the end".into());
                break;
            }
            Parsed::Corrupt(why) => {
                s.stop = Some(why);
                break;
            }
        }
    }
    s
}

/// One group's control records, gathered across a topic's segments: what
/// recovery rebuilds the group from, and what `eventos log stat` shows
/// without opening the log (both replay through this, so they agree).
#[derive(Debug, Default)]
pub(crate) struct GroupReplay {
    settled: Vec<u64>,
    retries: HashMap<u64, (u32, i64)>,
    /// Acks replayed.
    pub(crate) acked: u64,
    /// Dead letters replayed.
    pub(crate) dead_lettered: u64,
}

impl GroupReplay {
    /// Takes in one control record of the group.
    pub(crate) fn apply(&mut self, control: &Control) {
        match *control {
            Control::Ack { offset, .. } => {
                self.acked += 1;
                self.settled.push(offset);
            }
            Control::DeadLetter { offset, .. } => {
                self.dead_lettered += 1;
                self.settled.push(offset);
            }
            Control::Retry {
                offset,
                attempt,
                due_ms,
                ..
            } => {
                self.retries.insert(offset, (attempt, due_ms));
            }
        }
    }

    /// The group's state: its cursor over what was settled, starting at
    /// `start` kept within what the topic retains, and the retries still
    /// pending.
    pub(crate) fn state(&mut self, start: u64, first_offset: u64, next_offset: u64) -> GroupState {
        let mut state = GroupState::at(start.max(first_offset).min(next_offset));
        self.settled.sort_unstable();
        for offset in self.settled.drain(..) {
            state.settle(offset);
        }
        self.retries.retain(|offset, _| !state.is_settled(*offset));
        state.recovered_retries = std::mem::take(&mut self.retries);
        state
    }
}

/// The group a control record is about.
pub(crate) fn group_of(control: &Control) -> u32 {
    match *control {
        Control::Ack { group, .. }
        | Control::Retry { group, .. }
        | Control::DeadLetter { group, .. } => group,
    }
}

pub(crate) fn recover(storage: &dyn Storage, topics_dir: &Path) -> Result<Recovered, LogError> {
    storage
        .create_dir_all(topics_dir)
        .map_err(io_err("create", topics_dir))?;
    let mut out = Recovered {
        topics: HashMap::new(),
        writers: HashMap::new(),
        report: RecoveryReport::default(),
    };
    for name in storage
        .list(topics_dir)
        .map_err(io_err("list", topics_dir))?
    {
        if validate_name("topic", &name).is_err() {
            tracing::warn!(entry = %name, "ignoring an entry that is not a topic directory");
            continue;
        }
        let dir = topics_dir.join(&name);
        let Ok(files) = storage.list(&dir) else {
            continue;
        };
        recover_topic(storage, &name, &dir, &files, &mut out)?;
        out.report.topics += 1;
    }
    Ok(out)
}

fn recover_topic(
    storage: &dyn Storage,
    name: &str,
    dir: &Path,
    files: &[String],
    out: &mut Recovered,
) -> Result<(), LogError> {
    let topic = Arc::new(TopicLog::new(name, dir));
    let mut bases: Vec<u64> = files.iter().filter_map(|f| parse_segment_name(f)).collect();
    bases.sort_unstable();
    let registry = load_groups(storage, dir).map_err(io_err("read the group registry of", dir))?;
    let mut replay: HashMap<u32, GroupReplay> = HashMap::new();
    let mut segments: Vec<Arc<Segment>> = Vec::new();
    let mut expected: Option<u64> = None;
    let mut i = 0;
    while i < bases.len() {
        let base = bases[i];
        let path = dir.join(crate::topic::segment_name(base));
        let file = storage.open(&path, false).map_err(io_err("open", &path))?;
        let data = read_all(file.as_ref()).map_err(io_err("read", &path))?;
        let total = data.len() as u64;
        let mut result = scan(Bytes::from(data), base);
        if let Some(exp) = expected
            && base != exp
        {
            result = Scan {
                valid_len: 0,
                next_offset: base,
                last_time_ms: 0,
                index: Vec::new(),
                controls: Vec::new(),
                records: 0,
                stop: Some(format!(
                    "segment starts at offset {base} where {exp} was expected"
                )),
            };
        }
        out.report.segments += 1;
        out.report.records += result.records;
        for c in &result.controls {
            replay.entry(group_of(c)).or_default().apply(c);
        }
        let segment = Segment::new(base, path.clone(), file.clone());
        segment
            .durable_len
            .store(result.valid_len, Ordering::Release);
        segment
            .end_offset
            .store(result.next_offset, Ordering::Release);
        segment
            .last_append_ms
            .store(result.last_time_ms, Ordering::Release);
        *lock(&segment.index) = result.index;
        let segment = Arc::new(segment);
        if let Some(reason) = result.stop {
            let later = &bases[i + 1..];
            tracing::warn!(
                segment = %path.display(),
                at = result.valid_len,
                bytes = total - result.valid_len,
                later_segments = later.len(),
                %reason,
                "cutting the log where its valid records end"
            );
            let cut = (|| {
                file.set_len(result.valid_len)?;
                file.sync_data()?;
                for &b in later {
                    storage.remove_file(&dir.join(crate::topic::segment_name(b)))?;
                }
                storage.sync_dir(dir)
            })();
            cut.map_err(io_err("cut the torn tail of", &path))?;
            out.report.cuts.push(Cut {
                path,
                at: result.valid_len,
                bytes: total - result.valid_len,
                removed_segments: later.len(),
                reason,
            });
            // A segment that lost even its first record is dropped, unless
            // it is the only one (it then carries the next offset).
            if result.valid_len == 0 && !segments.is_empty() {
                storage
                    .remove_file(&segment.path)
                    .and_then(|()| storage.sync_dir(dir))
                    .map_err(io_err("remove", &segment.path))?;
            } else {
                expected = Some(result.next_offset);
                segments.push(segment);
            }
            break;
        }
        expected = Some(result.next_offset);
        segments.push(segment);
        i += 1;
    }
    let next_offset = expected.unwrap_or(0);
    topic.durable_next.store(next_offset, Ordering::Release);
    *write(&topic.segments) = segments.clone();
    let first = topic.first_offset();

    {
        let mut groups = lock(&topic.groups);
        for entry in &registry {
            let state =
                replay
                    .remove(&entry.id)
                    .unwrap_or_default()
                    .state(entry.start, first, next_offset);
            groups.insert(
                entry.name.clone(),
                Arc::new(Group::new(entry.id, &entry.name, state)),
            );
        }
    }
    for id in replay.keys() {
        tracing::warn!(
            topic = name,
            group_id = id,
            "control records for an unregistered group; ignoring them"
        );
    }
    let writer = TopicWriter::new(
        topic.clone(),
        segments.last().cloned(),
        next_offset,
        registry,
        true,
    );
    out.writers.insert(topic.name.clone(), writer);
    out.topics.insert(name.to_owned(), topic);
    Ok(())
}
