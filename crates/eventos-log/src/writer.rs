//! The writer thread: every append, every settlement and every group
//! registration of a data directory goes through it, and it makes them
//! durable in rounds.
//!
//! A round takes every request waiting in the queue, writes each touched
//! segment with one `write`, and `fdatasync`s each once; then it answers
//! them all. Under load a single sync covers thousands of events (group
//! commit); with one lonely publisher it costs one sync per publish, which
//! is the least durability allows.
//!
//! A round that fails (a full disk, an I/O error) answers all its requests
//! with the error — none of them is acknowledged — and rewinds every topic
//! to what the last successful round made durable: buffered records are
//! dropped and a partly written tail is cut off the active segment, so the
//! next round writes after the last durable record as if the failed one
//! never happened. The log recovers by itself when the disk does; until
//! the rewind itself succeeds, every request fails.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_core::{StartFrom, TransportError, TransportErrorKind};
use tokio::sync::oneshot;

use crate::record::{self, Control};
use crate::storage::{Storage, read_all};
use crate::sync::{lock, read, write};
use crate::topic::{INDEX_INTERVAL, Segment, TopicLog, segment_name};
use crate::{LogStats, Retention};

/// The file that registers a topic's groups: `id start_offset name` lines.
pub(crate) const GROUPS_FILE: &str = "groups";

/// One change to make durable.
pub(crate) enum Op {
    /// Append encoded events.
    Append {
        topic: Arc<TopicLog>,
        events: Vec<Vec<u8>>,
    },
    /// Append a settlement.
    Control {
        topic: Arc<TopicLog>,
        control: Control,
    },
}

pub(crate) enum Request {
    /// Make `ops` durable, atomically with respect to the answer.
    Write {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
    /// Register a group (idempotent); answers its id and start offset.
    CreateGroup {
        topic: Arc<TopicLog>,
        name: String,
        start: StartFrom,
        reply: oneshot::Sender<Result<(u32, u64), TransportError>>,
    },
    /// Finish the queued work and stop.
    Shutdown { reply: oneshot::Sender<()> },
}

/// A registered group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub(crate) id: u32,
    pub(crate) start: u64,
    pub(crate) name: String,
}

/// The writer's view of one topic.
pub(crate) struct TopicWriter {
    pub(crate) topic: Arc<TopicLog>,
    pub(crate) active: Option<Arc<Segment>>,
    /// Bytes in the active segment, buffered ones included.
    pub(crate) len: u64,
    pub(crate) next_offset: u64,
    pub(crate) groups: Vec<GroupEntry>,
    /// Whether the topic directory exists durably.
    pub(crate) dir_exists: bool,
    buf: Vec<u8>,
    new_index: Vec<(u64, u64)>,
    last_indexed: Option<u64>,
    appended_events: bool,
}

impl TopicWriter {
    pub(crate) fn new(
        topic: Arc<TopicLog>,
        active: Option<Arc<Segment>>,
        next_offset: u64,
        groups: Vec<GroupEntry>,
        dir_exists: bool,
    ) -> Self {
        let len = active
            .as_ref()
            .map_or(0, |s| s.durable_len.load(Ordering::Acquire));
        let last_indexed = active
            .as_ref()
            .and_then(|s| lock(&s.index).last().map(|&(_, pos)| pos));
        Self {
            topic,
            active,
            len,
            next_offset,
            groups,
            dir_exists,
            buf: Vec::new(),
            new_index: Vec::new(),
            last_indexed,
            appended_events: false,
        }
    }
}

pub(crate) struct Writer {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) topics_dir: PathBuf,
    pub(crate) rx: Receiver<Request>,
    pub(crate) topics: HashMap<Arc<str>, TopicWriter>,
    pub(crate) segment_bytes: u64,
    pub(crate) retention: Retention,
    pub(crate) stats: Arc<LogStats>,
    /// Set by a failed round until [`Writer::rewind`] succeeds: what the
    /// files hold past the durable ends is unknown until then.
    pub(crate) failed: Option<String>,
    /// Every topic the transport knows, for retention.
    pub(crate) all_topics: Arc<Mutex<HashMap<String, Arc<TopicLog>>>>,
}

enum Pending {
    Write(oneshot::Sender<Result<(), TransportError>>),
    Group(
        oneshot::Sender<Result<(u32, u64), TransportError>>,
        Result<(u32, u64), String>,
    ),
}

/// Append times and retry due times must survive a restart, so they are
/// wall-clock, on the one clock every transport stamps retries with.
pub(crate) use eventos_kit::clock::now_ms;

fn io_failure(message: &str) -> TransportError {
    TransportError::new(TransportErrorKind::Io, message.to_owned())
}

/// The most requests one round takes, so answers never wait on an
/// unbounded queue.
const MAX_ROUND: usize = 16_384;

/// How long a round may wait for more requests when writers are concurrent:
/// small against a sync (~1.5 ms here), long enough for answered writers to
/// come back.
const LINGER: Duration = Duration::from_micros(300);

/// A round stops lingering once no request arrives for this long.
const LINGER_STEP: Duration = Duration::from_micros(60);

impl Writer {
    pub(crate) fn run(mut self) {
        let mut last_retention = std::time::Instant::now();
        let mut last_round = 0usize;
        loop {
            let first = match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    self.retain();
                    last_retention = std::time::Instant::now();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_ROUND {
                match self.rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            // With several writers active, those answered by the last round
            // come back within microseconds; lingering briefly lets them join
            // this round instead of forming a second cohort that waits a
            // whole sync. A lone writer never waits.
            if last_round > 1 {
                let until = std::time::Instant::now() + LINGER;
                while batch.len() < MAX_ROUND {
                    let now = std::time::Instant::now();
                    if now >= until {
                        break;
                    }
                    match self.rx.recv_timeout((until - now).min(LINGER_STEP)) {
                        Ok(request) => batch.push(request),
                        Err(_) => break,
                    }
                }
            }
            last_round = batch.len();
            let shutdown = self.round(batch);
            if last_retention.elapsed() >= Duration::from_secs(1) {
                self.retain();
                last_retention = std::time::Instant::now();
            }
            if let Some(reply) = shutdown {
                let _ = reply.send(());
                return;
            }
        }
    }

    /// Runs one round; returns the shutdown reply if one was asked for.
    fn round(&mut self, batch: Vec<Request>) -> Option<oneshot::Sender<()>> {
        let mut pending = Vec::with_capacity(batch.len());
        let mut shutdown = None;
        if self.failed.is_some() {
            self.rewind();
        }
        let mut error: Option<String> = self.failed.clone();
        for request in batch {
            match request {
                Request::Write { ops, reply } => {
                    if error.is_none() {
                        for op in ops {
                            if let Err(e) = self.apply(op) {
                                error = Some(e);
                                break;
                            }
                        }
                    }
                    pending.push(Pending::Write(reply));
                }
                Request::CreateGroup {
                    topic,
                    name,
                    start,
                    reply,
                } => {
                    let result = match &error {
                        Some(e) => Err(e.clone()),
                        None => self.create_group(&topic, &name, start).map_err(|e| {
                            let msg = e;
                            error = Some(msg.clone());
                            msg
                        }),
                    };
                    pending.push(Pending::Group(reply, result));
                }
                Request::Shutdown { reply } => shutdown = Some(reply),
            }
        }
        if error.is_none()
            && let Err(e) = self.flush()
        {
            error = Some(e);
        }
        if let Some(e) = &error {
            if self.failed.is_none() {
                tracing::error!(error = %e, "a log write failed; its requests are refused and the log rewinds to its last durable state");
            }
            self.failed = Some(e.clone());
            self.stats.failed_rounds.fetch_add(1, Ordering::Relaxed);
            self.rewind();
        }
        for p in pending {
            match p {
                Pending::Write(reply) => {
                    let _ = reply.send(match &error {
                        None => Ok(()),
                        Some(e) => Err(io_failure(e)),
                    });
                }
                Pending::Group(reply, result) => {
                    let _ = reply.send(match (&error, result) {
                        (None, Ok(v)) => Ok(v),
                        (Some(e), _) => Err(io_failure(e)),
                        (None, Err(e)) => Err(io_failure(&e)),
                    });
                }
            }
        }
        shutdown
    }

    /// Brings every topic back to its durable state after a failed round:
    /// drops what is buffered and cuts the active segment back to its
    /// durable length. Clears [`Writer::failed`] when every cut succeeds.
    fn rewind(&mut self) {
        let mut cut_failed = None;
        for tw in self.topics.values_mut() {
            tw.buf.clear();
            tw.new_index.clear();
            tw.appended_events = false;
            let Some(active) = tw.active.clone() else {
                continue;
            };
            let durable = active.durable_len.load(Ordering::Acquire);
            let cut = match active.file.len() {
                Ok(len) if len == durable => Ok(()),
                Ok(_) => active.file.set_len(durable),
                Err(e) => Err(e),
            };
            if let Err(e) = cut {
                cut_failed = Some(format!(
                    "cannot cut topic `{}` back to its durable end: {e}",
                    tw.topic.name
                ));
                continue;
            }
            tw.len = durable;
            tw.next_offset = active.end_offset.load(Ordering::Acquire);
            tw.last_indexed = lock(&active.index).last().map(|&(_, pos)| pos);
        }
        match cut_failed {
            None => {
                if self.failed.take().is_some() {
                    tracing::info!(
                        "the log rewound to its last durable state and accepts writes again"
                    );
                }
            }
            Some(e) => {
                tracing::warn!(error = %e, "the log cannot rewind yet; writes are refused until it can");
                self.failed = Some(e);
            }
        }
    }

    fn writer_for(&mut self, topic: &Arc<TopicLog>) -> &mut TopicWriter {
        self.topics
            .entry(topic.name.clone())
            .or_insert_with(|| TopicWriter::new(topic.clone(), None, 0, Vec::new(), false))
    }

    fn apply(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Append { topic, events } => {
                let time_ms = now_ms();
                for event in events {
                    let need = (record::HEADER_LEN + 17 + event.len()) as u64;
                    self.ensure_room(&topic, need)?;
                    let tw = self.writer_for(&topic);
                    let pos = tw.len;
                    if tw
                        .last_indexed
                        .is_none_or(|last| pos >= last + INDEX_INTERVAL)
                    {
                        tw.new_index.push((tw.next_offset, pos));
                        tw.last_indexed = Some(pos);
                    }
                    let before = tw.buf.len();
                    record::put_data(&mut tw.buf, tw.next_offset, time_ms, &event);
                    tw.len += (tw.buf.len() - before) as u64;
                    tw.next_offset += 1;
                    tw.appended_events = true;
                }
            }
            Op::Control { topic, control } => {
                self.ensure_room(&topic, 40)?;
                let tw = self.writer_for(&topic);
                let before = tw.buf.len();
                record::put_control(&mut tw.buf, control);
                tw.len += (tw.buf.len() - before) as u64;
            }
        }
        Ok(())
    }

    /// Makes sure the topic has an active segment with room for `need`
    /// more bytes, rolling to a new segment if not.
    fn ensure_room(&mut self, topic: &Arc<TopicLog>, need: u64) -> Result<(), String> {
        let segment_bytes = self.segment_bytes;
        let tw = self.writer_for(topic);
        let full = tw.active.is_none() || (tw.len > 0 && tw.len + need > segment_bytes);
        if full {
            self.roll(topic).map_err(|e| {
                format!("cannot start a new segment for topic `{}`: {e}", topic.name)
            })?;
        }
        Ok(())
    }

    fn ensure_dir(&mut self, topic: &Arc<TopicLog>) -> io::Result<()> {
        let storage = self.storage.clone();
        let topics_dir = self.topics_dir.clone();
        let tw = self.writer_for(topic);
        if !tw.dir_exists {
            storage.create_dir_all(&topic.dir)?;
            storage.sync_dir(&topics_dir)?;
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.writer_for(topic).dir_exists = true;
        }
        Ok(())
    }

    /// Seals the active segment (writes and syncs what is buffered) and
    /// starts a new one at the next offset.
    fn roll(&mut self, topic: &Arc<TopicLog>) -> io::Result<()> {
        self.ensure_dir(topic)?;
        let stats = self.stats.clone();
        let storage = self.storage.clone();
        let tw = self.writer_for(topic);
        if tw.active.is_some() {
            flush_topic(tw, &stats)?;
        }
        let base = tw.next_offset;
        let path = topic.dir.join(segment_name(base));
        let file = storage.open(&path, true)?;
        storage.sync_dir(&topic.dir)?;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        let segment = Arc::new(Segment::new(base, path, file));
        write(&topic.segments).push(segment.clone());
        tw.active = Some(segment);
        tw.len = 0;
        tw.last_indexed = None;
        Ok(())
    }

    /// Writes and syncs every topic with buffered records, then publishes
    /// the new durable ends.
    fn flush(&mut self) -> Result<(), String> {
        let stats = self.stats.clone();
        for tw in self.topics.values_mut() {
            if tw.buf.is_empty() {
                continue;
            }
            let name = tw.topic.name.clone();
            flush_topic(tw, &stats).map_err(|e| format!("cannot write topic `{name}`: {e}"))?;
        }
        Ok(())
    }

    fn create_group(
        &mut self,
        topic: &Arc<TopicLog>,
        name: &str,
        start: StartFrom,
    ) -> Result<(u32, u64), String> {
        let tw = self.writer_for(topic);
        if let Some(g) = tw.groups.iter().find(|g| g.name == name) {
            return Ok((g.id, g.start));
        }
        let id = tw.groups.iter().map(|g| g.id + 1).max().unwrap_or(1);
        let start = match start {
            StartFrom::Latest => tw.next_offset,
            StartFrom::Earliest => tw.topic.first_offset().min(tw.next_offset),
        };
        let mut groups = tw.groups.clone();
        groups.push(GroupEntry {
            id,
            start,
            name: name.to_owned(),
        });
        self.ensure_dir(topic)
            .and_then(|()| self.write_groups(topic, &groups))
            .map_err(|e| {
                format!(
                    "cannot register group `{name}` on topic `{}`: {e}",
                    topic.name
                )
            })?;
        self.writer_for(topic).groups = groups;
        Ok((id, start))
    }

    /// Replaces the group registry atomically: write a temporary file, sync
    /// it, rename it over the old one, sync the directory.
    fn write_groups(&self, topic: &TopicLog, groups: &[GroupEntry]) -> io::Result<()> {
        let text: String = groups
            .iter()
            .map(|g| format!("{} {} {}\n", g.id, g.start, g.name))
            .collect();
        let tmp = topic.dir.join(format!("{GROUPS_FILE}.tmp"));
        let path = topic.dir.join(GROUPS_FILE);
        let file = self.storage.open(&tmp, true)?;
        file.set_len(0)?;
        file.append(text.as_bytes())?;
        file.sync_data()?;
        self.storage.rename(&tmp, &path)?;
        self.storage.sync_dir(&topic.dir)?;
        self.stats.syncs.fetch_add(2, Ordering::Relaxed);
        Ok(())
    }

    /// Removes sealed segments every group has consumed, oldest first, as
    /// far as the retention policy allows.
    fn retain(&mut self) {
        if self.failed.is_some() {
            self.rewind();
        }
        if self.failed.is_some() {
            return;
        }
        let topics: Vec<Arc<TopicLog>> = lock(&self.all_topics).values().cloned().collect();
        let now = now_ms();
        for topic in topics {
            let min_cursor = lock(&topic.groups)
                .values()
                .map(|g| g.cursor())
                .min()
                .unwrap_or(u64::MAX);
            loop {
                let (candidate, total) = {
                    let segments = read(&topic.segments);
                    let total: u64 = segments
                        .iter()
                        .map(|s| s.durable_len.load(Ordering::Acquire))
                        .sum();
                    // Never the last segment: it is active, and its name
                    // carries the next offset across restarts.
                    match segments.split_last() {
                        Some((_, sealed)) if !sealed.is_empty() => (sealed[0].clone(), total),
                        _ => break,
                    }
                };
                let consumed = candidate.end_offset.load(Ordering::Acquire) <= min_cursor;
                let age_ms = now - candidate.last_append_ms.load(Ordering::Acquire);
                let allowed = self.retention.max_age.is_some_and(|max| {
                    age_ms >= i64::try_from(max.as_millis()).unwrap_or(i64::MAX)
                }) || self.retention.max_bytes.is_some_and(|max| total > max);
                if !(consumed && allowed) {
                    break;
                }
                write(&topic.segments).retain(|s| !Arc::ptr_eq(s, &candidate));
                let removed = self
                    .storage
                    .remove_file(&candidate.path)
                    .and_then(|()| self.storage.sync_dir(&topic.dir));
                match removed {
                    Ok(()) => {
                        tracing::info!(topic = %topic.name, segment = %candidate.path.display(), "removed a consumed segment");
                    }
                    Err(e) => {
                        tracing::warn!(topic = %topic.name, segment = %candidate.path.display(), error = %e, "cannot remove a consumed segment; will retry");
                        break;
                    }
                }
            }
        }
    }
}

/// Writes a topic's buffer, syncs the segment, and publishes the durable
/// end to readers.
fn flush_topic(tw: &mut TopicWriter, stats: &LogStats) -> io::Result<()> {
    let Some(active) = tw.active.clone() else {
        return Ok(());
    };
    if !tw.buf.is_empty() {
        active.file.append(&tw.buf)?;
        stats
            .bytes_written
            .fetch_add(tw.buf.len() as u64, Ordering::Relaxed);
        tw.buf.clear();
    }
    active.file.sync_data()?;
    stats.syncs.fetch_add(1, Ordering::Relaxed);
    lock(&active.index).append(&mut tw.new_index);
    if tw.appended_events {
        active.last_append_ms.store(now_ms(), Ordering::Release);
    }
    active.end_offset.store(tw.next_offset, Ordering::Release);
    // Bytes first, then the offset: a reader that sees the offset sees the
    // bytes that hold it.
    active.durable_len.store(tw.len, Ordering::Release);
    let appended = tw.topic.durable_next.swap(tw.next_offset, Ordering::AcqRel);
    stats
        .events_appended
        .fetch_add(tw.next_offset.saturating_sub(appended), Ordering::Relaxed);
    tw.appended_events = false;
    tw.topic.notify_groups();
    Ok(())
}

/// Reads a topic's group registry.
pub(crate) fn load_groups(
    storage: &dyn Storage,
    topic_dir: &std::path::Path,
) -> io::Result<Vec<GroupEntry>> {
    let path = topic_dir.join(GROUPS_FILE);
    let file = match storage.open(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let text = String::from_utf8(read_all(file.as_ref())?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "group registry is not UTF-8"))?;
    let mut groups = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut parts = line.splitn(3, ' ');
        let parsed = (|| {
            let id = parts.next()?.parse().ok()?;
            let start = parts.next()?.parse().ok()?;
            let name = parts.next()?.to_owned();
            Some(GroupEntry { id, start, name })
        })();
        match parsed {
            Some(g) => groups.push(g),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {} is malformed: {line:?}", path.display(), n + 1),
                ));
            }
        }
    }
    Ok(groups)
}
