//! Offline inspection of a data directory (`eventos log …`).
//!
//! [`DataDir`] reads what a log left on disk — or is writing right now —
//! without taking the directory lock and without writing a byte. Every file
//! is opened through a storage whose mutating operations fail, so the
//! promise holds by construction, not by care: inspection can run beside
//! the process that owns the directory, on a copy, or on a read-only mount.
//!
//! It applies recovery's own rules — the same scan of each segment, the
//! same check that segments follow one another, the same replay of control
//! records into group cursors — so what it reports is what the next open
//! would recover. A torn or corrupt tail is reported as the [`Cut`]
//! recovery would make; it is never cut here.
//!
//! While another process owns the directory, the figures are a snapshot
//! that may already be stale, and bytes at the end of the active segment
//! may be a write in progress rather than a torn one; [`DataDir::owner`]
//! tells which case applies.
//!
//! ```no_run
//! use eventos_log::inspect::DataDir;
//!
//! let dir = DataDir::open("eventos-data")?;
//! for topic in dir.topics()? {
//!     println!("{}: {} segments, {} bytes", topic.name, topic.segments, topic.bytes);
//! }
//! let stat = dir.stat("payments", |p| eprintln!("{}/{}", p.done, p.total))?;
//! println!("{} events, next offset {}", stat.events, stat.next_offset);
//! for stored in dir.events("payments", 0)?.take(10) {
//!     let stored = stored?;
//!     println!("{} {}", stored.offset, stored.event.id());
//! }
//! # Ok::<(), eventos_log::inspect::InspectError>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Buf as _, Bytes};
use chrono::{DateTime, Utc};
use eventos_core::{Event, validate_name};

use crate::record::{self, Parsed, Record};
use crate::recovery::{self, Cut};
use crate::recovery::{GroupReplay, group_of};
use crate::storage::{Storage, StorageFile, read_all};
use crate::topic::parse_segment_name;
use crate::writer::load_groups;

/// Why a data directory or topic could not be inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// The path is not a data directory.
    #[error(
        "no data directory at {dir} ({why}): pass --data-dir pointing at the directory given to `eventos up`"
    )]
    NoDataDir {
        /// The path given.
        dir: PathBuf,
        /// What is missing there.
        why: &'static str,
    },
    /// The data directory has no such topic.
    #[error("no topic `{topic}` in {dir}; {}", topic_list(.known))]
    UnknownTopic {
        /// The topic asked for.
        topic: String,
        /// The data directory.
        dir: PathBuf,
        /// The topics it has, sorted.
        known: Vec<String>,
    },
    /// A file could not be read.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A record is intact (its checksum matches) but its event does not
    /// decode: written by a newer version, or a bug. Iteration goes on past
    /// it.
    #[error(
        "the event at offset {offset} of topic `{topic}` does not decode ({reason}); it is skipped — a newer eventos may read it"
    )]
    Undecodable {
        /// The topic.
        topic: String,
        /// The event's offset.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

fn topic_list(known: &[String]) -> String {
    if known.is_empty() {
        "it has no topics yet".to_owned()
    } else {
        format!("topics: {}", known.join(", "))
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InspectError + 'a {
    move |source| InspectError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// How far a long scan has come, in bytes of segment files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read so far.
    pub done: u64,
    /// Bytes the scan will read in all.
    pub total: u64,
}

/// Who owns a data directory right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Nobody holds its lock: the files are at rest.
    Free,
    /// A process holds its lock and may be writing; the text is the lock
    /// file's (`process <pid> (<command line>)`).
    Held(String),
    /// This platform does not tell (the lock is checked without taking it,
    /// through `/proc/locks`).
    Unknown,
}

/// A topic as a directory listing shows it, without reading its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSummary {
    /// The topic's name.
    pub name: String,
    /// Segment files.
    pub segments: usize,
    /// Their total size.
    pub bytes: u64,
    /// The first retained offset, from the first segment's name.
    pub first_offset: u64,
    /// Registered consumer groups.
    pub groups: usize,
}

/// One consumer group's position, as replayed from the control records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStat {
    /// The group's name.
    pub name: String,
    /// Its id in control records.
    pub id: u32,
    /// The offset it started from when it was registered.
    pub start: u64,
    /// Every offset below this is settled.
    pub cursor: u64,
    /// Events from the cursor to the topic's end not yet settled (ready,
    /// leased or waiting for a retry).
    pub unsettled: u64,
    /// Unsettled events with a stored retry.
    pub pending_retries: usize,
    /// Ack records in the retained segments.
    pub acked: u64,
    /// Dead-letter records in the retained segments.
    pub dead_lettered: u64,
}

/// What a full scan of a topic found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStat {
    /// The topic's name.
    pub name: String,
    /// Segment files.
    pub segments: usize,
    /// Their total size on disk, a torn tail included.
    pub bytes: u64,
    /// The first retained offset.
    pub first_offset: u64,
    /// The offset the next event will get.
    pub next_offset: u64,
    /// Retained events (`next_offset - first_offset`).
    pub events: u64,
    /// Ack, retry and dead-letter records.
    pub control_records: u64,
    /// When the last event was appended, if any is retained.
    pub last_append: Option<DateTime<Utc>>,
    /// Registered groups, in registration order.
    pub groups: Vec<GroupStat>,
    /// The torn or corrupt tail the next open would cut, if any.
    pub tail: Option<Cut>,
}

/// An event as the log stores it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredEvent {
    /// Its offset in the topic.
    pub offset: u64,
    /// When the log appended it, in Unix milliseconds.
    pub appended_ms: i64,
    /// The event.
    pub event: Event,
}

impl StoredEvent {
    /// When the log appended it (`None` if the stored time is out of
    /// range).
    pub fn appended(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(self.appended_ms)
    }
}

/// A data directory opened for reading.
#[derive(Debug, Clone)]
pub struct DataDir {
    dir: PathBuf,
    topics_dir: PathBuf,
    storage: Arc<dyn Storage>,
}

/// A segment file as listed.
#[derive(Debug, Clone)]
struct SegmentFile {
    base: u64,
    path: PathBuf,
    len: u64,
}

impl DataDir {
    /// Opens `dir` for inspection. Takes no lock and creates nothing.
    ///
    /// # Errors
    ///
    /// [`InspectError::NoDataDir`] if `dir` or its `topics` directory is
    /// missing; [`InspectError::Io`] if it cannot be read.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, InspectError> {
        Self::with_storage(dir.into(), Arc::new(ReadOnlyFs))
    }

    pub(crate) fn with_storage(
        dir: PathBuf,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, InspectError> {
        let topics_dir = dir.join("topics");
        let no_data_dir = |why| InspectError::NoDataDir {
            dir: dir.clone(),
            why,
        };
        match storage.list(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(no_data_dir("it does not exist"));
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(no_data_dir("it is not a directory"));
            }
            Err(e) => return Err(io_err("list", &dir)(e)),
        }
        match storage.list(&topics_dir) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(no_data_dir("it has no `topics` directory"));
            }
            Err(e) => return Err(io_err("list", &topics_dir)(e)),
        }
        Ok(Self {
            dir,
            topics_dir,
            storage,
        })
    }

    /// The directory inspected.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether a process holds the directory's lock, found without taking
    /// it.
    #[must_use]
    pub fn owner(&self) -> Owner {
        lock_owner(&self.dir.join("LOCK"))
    }

    /// The topics' names, sorted.
    ///
    /// # Errors
    ///
    /// [`InspectError::Io`] if the directory cannot be listed.
    pub fn topic_names(&self) -> Result<Vec<String>, InspectError> {
        let mut names: Vec<String> = self
            .storage
            .list(&self.topics_dir)
            .map_err(io_err("list", &self.topics_dir))?
            .into_iter()
            // Recovery ignores what is not a topic name; so does this.
            .filter(|n| validate_name("topic", n).is_ok())
            .filter(|n| self.storage.list(&self.topics_dir.join(n)).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every topic with its segment count and size, from the listing
    /// alone (cheap: no segment is read).
    ///
    /// # Errors
    ///
    /// [`InspectError::Io`] if a directory or registry cannot be read.
    pub fn topics(&self) -> Result<Vec<TopicSummary>, InspectError> {
        self.topic_names()?
            .into_iter()
            .map(|name| {
                let dir = self.topics_dir.join(&name);
                let files = self.segment_files(&dir)?;
                let groups = load_groups(self.storage.as_ref(), &dir)
                    .map_err(io_err("read the group registry of", &dir))?;
                Ok(TopicSummary {
                    segments: files.len(),
                    bytes: files.iter().map(|f| f.len).sum(),
                    first_offset: files.first().map_or(0, |f| f.base),
                    groups: groups.len(),
                    name,
                })
            })
            .collect()
    }

    fn topic_dir(&self, topic: &str) -> Result<PathBuf, InspectError> {
        let names = self.topic_names()?;
        if names.iter().any(|n| n == topic) {
            Ok(self.topics_dir.join(topic))
        } else {
            Err(InspectError::UnknownTopic {
                topic: topic.to_owned(),
                dir: self.dir.clone(),
                known: names,
            })
        }
    }

    /// The topic's segment files by base offset, with their sizes.
    fn segment_files(&self, dir: &Path) -> Result<Vec<SegmentFile>, InspectError> {
        let mut files = Vec::new();
        for name in self.storage.list(dir).map_err(io_err("list", dir))? {
            let Some(base) = parse_segment_name(&name) else {
                continue;
            };
            let path = dir.join(&name);
            let len = match self.storage.open(&path, false).and_then(|f| f.len()) {
                Ok(len) => len,
                // Removed by retention since the listing: no longer part of
                // the topic.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            files.push(SegmentFile { base, path, len });
        }
        files.sort_unstable_by_key(|f| f.base);
        Ok(files)
    }

    /// Reads a segment whole; `None` if it vanished since it was listed.
    fn read_segment(&self, file: &SegmentFile) -> Result<Option<Bytes>, InspectError> {
        let read = self
            .storage
            .open(&file.path, false)
            .and_then(|f| read_all(f.as_ref()));
        match read {
            Ok(data) => Ok(Some(Bytes::from(data))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &file.path)(e)),
        }
    }

    /// Scans every segment of `topic` and replays its groups. `progress` is
    /// called after each segment.
    ///
    /// # Errors
    ///
    /// [`InspectError::UnknownTopic`] (naming the topics there are);
    /// [`InspectError::Io`] if a file cannot be read. Damage is not an
    /// error: it is reported in [`TopicStat::tail`].
    pub fn stat(
        &self,
        topic: &str,
        mut progress: impl FnMut(Progress),
    ) -> Result<TopicStat, InspectError> {
        let dir = self.topic_dir(topic)?;
        let registry = load_groups(self.storage.as_ref(), &dir)
            .map_err(io_err("read the group registry of", &dir))?;
        let files = self.segment_files(&dir)?;
        let mut p = Progress {
            done: 0,
            total: files.iter().map(|f| f.len).sum(),
        };
        progress(p);

        let mut replay: HashMap<u32, GroupReplay> = HashMap::new();
        let mut kept: Vec<u64> = Vec::new();
        let mut expected: Option<u64> = None;
        let mut control_records = 0u64;
        let mut last_time_ms = None;
        let mut tail = None;
        for (i, file) in files.iter().enumerate() {
            let Some(data) = self.read_segment(file)? else {
                continue;
            };
            let total = data.len() as u64;
            let mut scan = recovery::scan(data, file.base);
            if let Some(exp) = expected
                && file.base != exp
            {
                scan.valid_len = 0;
                scan.next_offset = file.base;
                scan.controls.clear();
                scan.stop = Some(format!(
                    "segment starts at offset {} where {exp} was expected",
                    file.base
                ));
            }
            p.done += file.len;
            progress(p);
            control_records += scan.controls.len() as u64;
            for control in &scan.controls {
                replay.entry(group_of(control)).or_default().apply(control);
            }
            if scan.next_offset > file.base {
                last_time_ms = Some(scan.last_time_ms);
            }
            // Recovery drops a segment that lost even its first record,
            // unless it is the only one.
            let keep = scan.stop.is_none() || scan.valid_len > 0 || kept.is_empty();
            if keep {
                kept.push(file.base);
                expected = Some(scan.next_offset);
            }
            if let Some(reason) = scan.stop {
                tail = Some(Cut {
                    path: file.path.clone(),
                    at: scan.valid_len,
                    bytes: total - scan.valid_len,
                    removed_segments: files.len() - i - 1,
                    reason,
                });
                break;
            }
        }
        let next_offset = expected.unwrap_or(0);
        let first_offset = kept.first().copied().unwrap_or(next_offset);
        let groups = registry
            .iter()
            .map(|entry| {
                let r = replay.remove(&entry.id).unwrap_or_default();
                stat(r, entry, first_offset, next_offset)
            })
            .collect();
        p.done = p.total;
        progress(p);
        Ok(TopicStat {
            name: topic.to_owned(),
            segments: files.len(),
            bytes: files.iter().map(|f| f.len).sum(),
            first_offset,
            next_offset,
            events: next_offset - first_offset,
            control_records,
            last_append: last_time_ms.and_then(DateTime::from_timestamp_millis),
            groups,
            tail,
        })
    }

    /// The events of `topic` at or after `from`, in offset order.
    ///
    /// Segments before the one holding `from` are skipped unread, so they
    /// are not validated; [`DataDir::stat`] validates everything.
    ///
    /// # Errors
    ///
    /// [`InspectError::UnknownTopic`]; [`InspectError::Io`] if the topic
    /// cannot be listed. Errors while iterating come as items.
    pub fn events(&self, topic: &str, from: u64) -> Result<Events, InspectError> {
        let dir = self.topic_dir(topic)?;
        let mut files = self.segment_files(&dir)?;
        let start = files.partition_point(|f| f.base <= from).saturating_sub(1);
        files.drain(..start);
        Ok(Events {
            dir: self.clone(),
            topic: topic.to_owned(),
            progress: Progress {
                done: 0,
                total: files.iter().map(|f| f.len).sum(),
            },
            files: files.into(),
            from,
            expected: None,
            current: None,
            tail: None,
            finished: false,
            finished_bytes: 0,
            reported_at: 0,
            on_progress: None,
        })
    }
}

/// The group's position, computed as recovery computes it.
fn stat(
    mut replay: GroupReplay,
    entry: &crate::writer::GroupEntry,
    first_offset: u64,
    next_offset: u64,
) -> GroupStat {
    let state = replay.state(entry.start, first_offset, next_offset);
    let settled_ahead = state.cursor.settled_ahead_below(next_offset) as u64;
    GroupStat {
        name: entry.name.clone(),
        id: entry.id,
        start: entry.start,
        cursor: state.cursor.position(),
        unsettled: next_offset
            .saturating_sub(state.cursor.position())
            .saturating_sub(settled_ahead),
        pending_retries: state.recovered_retries.len(),
        acked: replay.acked,
        dead_lettered: replay.dead_lettered,
    }
}

/// The valid records of the segment being read.
struct Current {
    rest: Bytes,
    /// Where `rest` starts in the file.
    pos: u64,
    /// The file's size as listed.
    len: u64,
}

/// Iterates a topic's events; see [`DataDir::events`].
///
/// Items are in offset order. An [`InspectError::Undecodable`] item is
/// followed by the next event; any other error ends the iteration. Where
/// the log is torn or corrupt, iteration ends and [`Events::tail`] says
/// where.
pub struct Events {
    dir: DataDir,
    topic: String,
    files: VecDeque<SegmentFile>,
    from: u64,
    expected: Option<u64>,
    current: Option<Current>,
    tail: Option<Cut>,
    finished: bool,
    progress: Progress,
    /// Bytes of the segments already finished.
    finished_bytes: u64,
    reported_at: u64,
    on_progress: Option<Box<dyn FnMut(Progress) + Send>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("topic", &self.topic)
            .field("from", &self.from)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

/// Progress is reported at most this often, in bytes.
const PROGRESS_STEP: u64 = 1 << 20;

impl Events {
    /// Calls `f` as the scan advances (about every MiB and at each
    /// segment's end).
    #[must_use]
    pub fn on_progress(mut self, f: impl FnMut(Progress) + Send + 'static) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }

    /// How far the scan has come.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The torn or corrupt tail where iteration stopped, if it stopped at
    /// one: what the next open would cut.
    pub fn tail(&self) -> Option<&Cut> {
        self.tail.as_ref()
    }

    fn report(&mut self, done: u64, force: bool) {
        self.progress.done = done.min(self.progress.total);
        if force || self.progress.done >= self.reported_at + PROGRESS_STEP {
            self.reported_at = self.progress.done;
            if let Some(f) = &mut self.on_progress {
                f(self.progress);
            }
        }
    }

    /// Opens the next segment; `Ok(false)` when there is none.
    fn open_next(&mut self) -> Result<bool, InspectError> {
        let Some(file) = self.files.pop_front() else {
            return Ok(false);
        };
        let Some(data) = self.dir.read_segment(&file)? else {
            // Removed by retention meanwhile.
            self.finished_bytes += file.len;
            self.report(self.finished_bytes, true);
            return Ok(true);
        };
        let total = data.len() as u64;
        let scan = recovery::scan(data.clone(), file.base);
        let cut = |at: u64, reason: String, files: &mut VecDeque<SegmentFile>| {
            let cut = Cut {
                path: file.path.clone(),
                at,
                bytes: total - at,
                removed_segments: files.len(),
                reason,
            };
            files.clear();
            cut
        };
        if let Some(exp) = self.expected
            && file.base != exp
        {
            let reason = format!(
                "segment starts at offset {} where {exp} was expected",
                file.base
            );
            self.tail = Some(cut(0, reason, &mut self.files));
            return Ok(false);
        }
        self.expected = Some(scan.next_offset);
        let start = match scan.index.partition_point(|&(o, _)| o <= self.from) {
            0 => 0,
            i => scan.index[i - 1].1,
        };
        if let Some(reason) = scan.stop {
            self.tail = Some(cut(scan.valid_len, reason, &mut self.files));
        }
        let valid = usize::try_from(scan.valid_len).unwrap_or(usize::MAX);
        let start_at = usize::try_from(start).unwrap_or(valid).min(valid);
        self.current = Some(Current {
            rest: data.slice(start_at..valid),
            pos: start,
            len: file.len,
        });
        self.report(self.finished_bytes + start, false);
        Ok(true)
    }
}

impl Iterator for Events {
    type Item = Result<StoredEvent, InspectError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.finished {
                return None;
            }
            let Some(current) = &mut self.current else {
                match self.open_next() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.finished = true;
                        let total = self.progress.total;
                        self.report(total, true);
                        return None;
                    }
                    Err(e) => {
                        self.finished = true;
                        return Some(Err(e));
                    }
                }
            };
            let mut found = None;
            while !current.rest.is_empty() {
                // `scan` validated this prefix: every parse yields a record.
                let Parsed::Record { record, len } = record::parse(&current.rest) else {
                    current.rest.clear();
                    break;
                };
                current.rest.advance(len);
                current.pos += len as u64;
                if let Record::Data {
                    offset,
                    time_ms,
                    event,
                } = record
                    && offset >= self.from
                {
                    found = Some((offset, time_ms, event));
                    break;
                }
            }
            let done = self.finished_bytes + current.pos;
            let len = current.len;
            match found {
                Some((offset, appended_ms, event)) => {
                    self.report(done, false);
                    return Some(match crate::codec::decode(event) {
                        Ok(event) => Ok(StoredEvent {
                            offset,
                            appended_ms,
                            event,
                        }),
                        Err(e) => Err(InspectError::Undecodable {
                            topic: self.topic.clone(),
                            offset,
                            reason: e.0,
                        }),
                    });
                }
                None => {
                    self.current = None;
                    self.finished_bytes += len;
                    self.report(self.finished_bytes, true);
                }
            }
        }
    }
}

/// Whether `lock` is locked, and by whom, read from `/proc/locks` without
/// taking the lock: even a moment's shared lock would make an opener that
/// starts at that moment fail.
fn lock_owner(lock: &Path) -> Owner {
    let meta = match std::fs::metadata(lock) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Owner::Free,
        Err(_) => return Owner::Unknown,
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Owner::Unknown;
    };
    let holder = locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 4242 08:01:131090 0 EOF`; waiters are
        // listed with `->` and hold nothing.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let pid = fields.get(4)?;
        let id = fields.get(5)?;
        lock_id_matches(id, &meta).then(|| (*pid).to_owned())
    });
    match holder {
        None => Owner::Free,
        Some(pid) => {
            let text = std::fs::read_to_string(lock).unwrap_or_default();
            let text = text.trim();
            Owner::Held(if text.is_empty() {
                format!("process {pid}")
            } else {
                text.to_owned()
            })
        }
    }
}

/// Whether a `/proc/locks` file id (`major:minor:inode`, numbers in hex,
/// hex, decimal) names the file with metadata `meta`.
fn lock_id_matches(id: &str, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let mut parts = id.split(':');
    let (Some(major), Some(minor), Some(ino), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(major), Ok(minor), Ok(ino)) = (
        u64::from_str_radix(major, 16),
        u64::from_str_radix(minor, 16),
        ino.parse::<u64>(),
    ) else {
        return false;
    };
    // glibc's `major()` / `minor()` of a `dev_t`.
    let dev = meta.dev();
    let dev_major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let dev_minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    ino == meta.ino() && major == dev_major && minor == dev_minor
}

/// The real file system, read-only: opens files for reading only, and
/// every mutating operation fails. Inspection goes through it so that it
/// cannot change a directory another process owns.
#[derive(Debug, Clone, Copy)]
struct ReadOnlyFs;

#[derive(Debug)]
struct ReadOnlyFile(File);

fn refuse() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "inspection never writes to a data directory",
    )
}

impl Storage for ReadOnlyFs {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Err(refuse())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        if create {
            return Err(refuse());
        }
        Ok(Arc::new(ReadOnlyFile(File::open(path)?)))
    }

    fn remove_file(&self, _path: &Path) -> io::Result<()> {
        Err(refuse())
    }

    fn rename(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Err(refuse())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Err(refuse())
    }
}

impl StorageFile for ReadOnlyFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(buf, pos)
    }

    fn append(&self, _data: &[u8]) -> io::Result<()> {
        Err(refuse())
    }

    fn sync_data(&self) -> io::Result<()> {
        Err(refuse())
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(refuse())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use eventos_core::{Delivery, DeliveryStream, Publisher, Subscriber, Subscription, Transport};
    use futures::StreamExt as _;

    use super::*;
    use crate::LogTransport;
    use crate::topic::segment_name;

    fn segment_path(dir: &Path, topic: &str, base: u64) -> PathBuf {
        dir.join("topics").join(topic).join(segment_name(base))
    }

    fn event(n: u32) -> Event {
        Event::builder("/test", "test.n.v1")
            .json(&n)
            .unwrap()
            .build()
            .unwrap()
    }

    async fn next(s: &mut DeliveryStream) -> Delivery {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a delivery in time")
            .expect("open stream")
            .expect("no error")
    }

    /// Publishes `n` events to `t`, then as group `g`: acks 0, 1 and 3,
    /// retries 2, dead-letters 4.
    async fn populate(dir: &Path, n: u32) {
        let log = LogTransport::open(dir).unwrap();
        let mut s = log.subscribe(Subscription::new("t", "g")).await.unwrap();
        log.publish("t", (0..n).map(event).collect()).await.unwrap();
        for i in 0..5 {
            let d = next(&mut s).await;
            match i {
                2 => d.retry_after(Duration::from_secs(3600)).await.unwrap(),
                4 => d.dead_letter("bad", None).await.unwrap(),
                _ => d.ack().await.unwrap(),
            }
        }
        drop(s);
        log.close().await.unwrap();
    }

    fn stat(dir: &Path) -> TopicStat {
        DataDir::open(dir).unwrap().stat("t", |_| {}).unwrap()
    }

    #[tokio::test]
    async fn groups_are_replayed_as_recovery_replays_them() {
        let dir = tempfile::tempdir().unwrap();
        populate(dir.path(), 6).await;
        let s = stat(dir.path());
        assert_eq!((s.first_offset, s.next_offset, s.events), (0, 6, 6));
        assert_eq!(s.control_records, 5);
        assert_eq!(s.tail, None);
        let g = &s.groups[0];
        assert_eq!(g.name, "g");
        // 0, 1 settled; 2 waits for its retry; 3, 4 settled ahead; 5 ready.
        assert_eq!((g.cursor, g.unsettled, g.pending_retries), (2, 2, 1));
        assert_eq!((g.acked, g.dead_lettered), (3, 1));
        let names = DataDir::open(dir.path()).unwrap().topic_names().unwrap();
        assert_eq!(names, ["t", "t.dlq"]);
    }

    #[tokio::test]
    async fn a_torn_tail_is_reported_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        populate(dir.path(), 6).await;
        let segment = segment_path(dir.path(), "t", 0);
        let clean_len = std::fs::metadata(&segment).unwrap().len();
        // A record header promising 100 bytes, and only 10 of them: what a
        // crash in the middle of a write leaves.
        let mut torn = Vec::new();
        torn.extend_from_slice(&100u32.to_le_bytes());
        torn.extend_from_slice(&0u32.to_le_bytes());
        torn.extend_from_slice(&[7; 10]);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap()
            .write_all(&torn)
            .unwrap();

        let s = stat(dir.path());
        let tail = s.tail.expect("the torn tail is reported");
        assert_eq!(tail.path, segment);
        assert_eq!((tail.at, tail.bytes), (clean_len, 18));
        assert_eq!(tail.reason, "torn record at the end");
        assert_eq!(s.events, 6, "every event before the tear counts");
        assert_eq!(s.groups[0].cursor, 2);

        let data = DataDir::open(dir.path()).unwrap();
        let mut events = data.events("t", 0).unwrap();
        let offsets: Vec<u64> = events.by_ref().map(|e| e.unwrap().offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
        assert_eq!(events.tail().map(|c| c.at), Some(clean_len));
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            clean_len + 18,
            "inspection never cuts"
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_ends_the_valid_log_where_recovery_would() {
        let dir = tempfile::tempdir().unwrap();
        populate(dir.path(), 6).await;
        let segment = segment_path(dir.path(), "t", 0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let len = bytes.len();
        // Inside the last record (a control record): its checksum fails.
        bytes[len - 3] ^= 0x40;
        std::fs::write(&segment, &bytes).unwrap();

        let s = stat(dir.path());
        let tail = s.tail.expect("the corruption is reported");
        assert_eq!(tail.reason, "checksum mismatch");
        assert!(tail.at < len as u64 && tail.at + tail.bytes == len as u64);
        assert_eq!(s.control_records, 4);

        // What recovery then does agrees with what was reported.
        let log = LogTransport::open(dir.path()).unwrap();
        assert_eq!(log.recovery_report().cuts, [tail]);
        log.close().await.unwrap();
    }

    #[tokio::test]
    async fn events_start_at_the_offset_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogTransport::open(dir.path()).unwrap();
        for chunk in 0..10 {
            log.publish("t", (chunk * 100..chunk * 100 + 100).map(event).collect())
                .await
                .unwrap();
        }
        log.close().await.unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        let events: Vec<StoredEvent> = data.events("t", 700).unwrap().map(Result::unwrap).collect();
        assert_eq!(events.len(), 300);
        assert_eq!(events[0].offset, 700);
        assert_eq!(events[0].event.decode_data::<u32>().unwrap(), 700);
        assert!(events[0].appended().is_some());
        assert_eq!(data.events("t", 5000).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_owner_is_seen_without_taking_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogTransport::open(dir.path()).unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        match data.owner() {
            Owner::Held(text) => {
                assert!(text.contains(&std::process::id().to_string()), "{text}");
            }
            Owner::Unknown => {}
            Owner::Free => panic!("the open log holds the lock"),
        }
        log.close().await.unwrap();
        assert!(matches!(data.owner(), Owner::Free | Owner::Unknown));
    }

    #[test]
    fn errors_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = DataDir::open(&missing).unwrap_err();
        assert!(matches!(err, InspectError::NoDataDir { .. }), "{err}");
        assert!(err.to_string().contains("pass --data-dir"), "{err}");

        std::fs::create_dir_all(dir.path().join("topics/a")).unwrap();
        std::fs::create_dir_all(dir.path().join("topics/b")).unwrap();
        let err = DataDir::open(dir.path())
            .unwrap()
            .stat("c", |_| {})
            .unwrap_err();
        assert!(
            err.to_string().ends_with("; topics: a, b"),
            "the error lists the topics: {err}"
        );
    }
}
