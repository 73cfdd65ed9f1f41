//! The embedded durable log: eventos' default transport.
//!
//! `eventos up` runs the whole system on one machine with nothing
//! installed, and loses nothing it acknowledged. This crate is how: a
//! single-node, append-only log per topic in a data directory, with queue
//! semantics for consumer groups on top.
//!
//! # The decisions that shaped it
//!
//! * **Group commit from the start.** One writer thread owns every file. It
//!   takes all waiting requests as one round, writes each touched segment
//!   once and `fdatasync`s it once, then answers them all. A publish returns
//!   only after the sync that covers it; under load one sync covers
//!   thousands of events.
//! * **Group state lives in the topic's log.** Acks, retries and dead
//!   letters are small control records appended to the same segment as the
//!   events, so a settlement costs no extra file and no extra sync, and
//!   recovery rebuilds every group by reading the log once. (A separate
//!   state file per group would double the syncs of every round.)
//! * **Records are framed with length + CRC32C.** Recovery scans the tail,
//!   cuts a torn or corrupt record and everything after it, and says what
//!   it cut ([`RecoveryReport`]); a corrupt record is never handed out.
//! * **Queue semantics on a log.** Each group sees every event; inside a
//!   group deliveries are leased with a visibility timeout, acked one by
//!   one, and the group's cursor advances over the settled prefix.
//!   Retries are stored with their due time, so they survive a restart.
//! * **One owner per directory.** An exclusive lock on `LOCK`; a second
//!   opener is told who holds it.
//! * **I/O behind a trait** ([`storage::Storage`]) so tests crash the log
//!   at any chosen sync and check what survives.
//!
//! # Layout
//!
//! ```text
//! <data-dir>/LOCK                           pid of the owner
//! <data-dir>/topics/<topic>/<offset>.log    segments, named by first offset
//! <data-dir>/topics/<topic>/groups          registered groups: id start name
//! ```
//!
//! No feature flags.

mod codec;
mod config;
mod consumer;
mod engine;
mod group;
pub mod inspect;
mod position;
mod record;
mod recovery;
mod stats;
pub mod storage;
mod sync;
mod topic;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use eventos_core::{
    Capabilities, DeliveryStream, Event, GroupCounts, Publisher, Subscriber, Subscription,
    Transport, TransportError, TransportErrorKind, dead_letter_topic, ext,
};
use eventos_kit::{Lifecycle, Prefetch, pull_stream};
use futures::future::BoxFuture;
use tokio::sync::oneshot;

pub use config::{LogConfig, Retention};
pub use engine::LogEngine;
pub use recovery::{Cut, RecoveryReport};
pub use stats::{GroupStats, LogStats, StatsSnapshot};

use crate::consumer::Consumer;
use crate::group::{Group, GroupState};
use crate::storage::{FsStorage, Storage};
use crate::sync::lock;
use crate::topic::TopicLog;
use crate::writer::{Op, Request, Writer};

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Another process owns the directory.
    #[error(
        "data directory {dir} is in use by {holder}; stop that process or choose another data directory"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },
    /// A file operation failed.
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
}

struct Shared {
    topics_dir: PathBuf,
    topics: Arc<Mutex<HashMap<String, Arc<TopicLog>>>>,
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    lifecycle: Lifecycle,
    stats: Arc<LogStats>,
    lock_file: Mutex<Option<File>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    visibility: Duration,
    max_payload_bytes: usize,
    report: RecoveryReport,
}

/// The embedded durable log transport. Cloning shares it.
#[derive(Clone)]
pub struct LogTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogTransport")
            .field("topics_dir", &self.shared.topics_dir)
            .finish_non_exhaustive()
    }
}

fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join("LOCK");
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(|source| LogError::Io {
        action: "open",
        path: path.clone(),
        source,
    })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(LogError::Io {
                action: "lock",
                path,
                source,
            });
        }
    }
    let me = format!(
        "process {} ({})",
        std::process::id(),
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.as_bytes()));
    written.map_err(|source| LogError::Io {
        action: "write",
        path,
        source,
    })?;
    Ok(file)
}

impl LogTransport {
    /// Opens (or creates) the log in `dir` with the defaults.
    ///
    /// # Errors
    ///
    /// As [`LogConfig::open`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LogError> {
        LogConfig::new(dir).open()
    }

    fn open_with(config: LogConfig) -> Result<Self, LogError> {
        let (storage, lock_file) = match config.storage {
            Some(storage) => (storage, None),
            None => {
                storage::create_private_dir(&config.dir).map_err(|source| LogError::Io {
                    action: "create",
                    path: config.dir.clone(),
                    source,
                })?;
                let lock = lock_dir(&config.dir)?;
                (Arc::new(FsStorage) as Arc<dyn Storage>, Some(lock))
            }
        };
        let topics_dir = config.dir.join("topics");
        let recovered = recovery::recover(storage.as_ref(), &topics_dir)?;
        let topics = Arc::new(Mutex::new(recovered.topics));
        let stats = Arc::new(LogStats::default());
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            storage: storage.clone(),
            topics_dir: topics_dir.clone(),
            rx,
            topics: recovered.writers,
            segment_bytes: config.segment_bytes,
            retention: config.retention,
            stats: stats.clone(),
            failed: None,
            all_topics: topics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("eventos-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| LogError::Io {
                action: "start the writer thread for",
                path: config.dir.clone(),
                source,
            })?;
        Ok(Self {
            shared: Arc::new(Shared {
                topics_dir,
                topics,
                tx: Mutex::new(Some(tx)),
                lifecycle: Lifecycle::new(),
                stats,
                lock_file: Mutex::new(lock_file),
                thread: Mutex::new(Some(thread)),
                visibility: config.visibility_timeout,
                max_payload_bytes: config.max_payload_bytes,
                report: recovered.report,
            }),
        })
    }

    /// What recovery found and cut when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.shared.report
    }

    /// Counters of the log's work so far.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            syncs: s.syncs.load(Ordering::Relaxed),
            events_appended: s.events_appended.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
            redeliveries: s.redeliveries.load(Ordering::Relaxed),
            failed_rounds: s.failed_rounds.load(Ordering::Relaxed),
        }
    }

    /// Queue counts of a group, or `None` if it is not registered.
    pub fn group_stats(&self, topic: &str, group: &str) -> Option<GroupStats> {
        let topic = lock(&self.shared.topics).get(topic).cloned()?;
        let group = lock(&topic.groups).get(group).cloned()?;
        let st = lock(&group.state);
        let (ready, delayed, in_flight) = st.counts();
        Some(GroupStats {
            cursor: st.cursor.position(),
            end: topic.durable_next.load(Ordering::Acquire),
            ready,
            delayed,
            in_flight,
        })
    }
}

impl Shared {
    fn topic(&self, name: &str) -> Arc<TopicLog> {
        lock(&self.topics)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(TopicLog::new(name, &self.topics_dir.join(name))))
            .clone()
    }

    fn send(&self, request: Request) -> Result<(), TransportError> {
        lock(&self.tx)
            .as_ref()
            .ok_or_else(TransportError::closed)?
            .send(request)
            .map_err(|_| TransportError::closed())
    }

    async fn write(&self, ops: Vec<Op>) -> Result<(), TransportError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write { ops, reply })?;
        answer.await.map_err(|_| TransportError::closed())?
    }

    fn notify_all(&self) {
        for topic in lock(&self.topics).values() {
            topic.notify_groups();
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let tx = lock(&self.tx).take();
        if let Some(tx) = tx {
            let (reply, _answer) = oneshot::channel();
            let _ = tx.send(Request::Shutdown { reply });
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn encode(event: &Event) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + event.data_len());
    codec::encode(event, &mut buf);
    buf
}

impl Publisher for LogTransport {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        events: Vec<Event>,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let max = self.shared.max_payload_bytes;
            self.shared
                .lifecycle
                .check_publish("log", topic, &events, max)?;
            if events.is_empty() {
                return Ok(());
            }
            let encoded = events.iter().map(encode).collect();
            let topic = self.shared.topic(topic);
            self.shared
                .write(vec![Op::Append {
                    topic,
                    events: encoded,
                }])
                .await
        })
    }
}

impl Subscriber for LogTransport {
    fn subscribe(
        &self,
        subscription: Subscription,
    ) -> BoxFuture<'_, Result<DeliveryStream, TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.check_subscribe(&subscription)?;
            let topic = self.shared.topic(&subscription.topic);
            let existing = lock(&topic.groups).get(&subscription.group).cloned();
            let group = match existing {
                Some(group) => group,
                None => {
                    let (reply, answer) = oneshot::channel();
                    self.shared.send(Request::CreateGroup {
                        topic: topic.clone(),
                        name: subscription.group.clone(),
                        start: subscription.start,
                        reply,
                    })?;
                    let (id, start) = answer.await.map_err(|_| TransportError::closed())??;
                    lock(&topic.groups)
                        .entry(subscription.group.clone())
                        .or_insert_with(|| {
                            Arc::new(Group::new(id, &subscription.group, GroupState::at(start)))
                        })
                        .clone()
                }
            };
            let prefetch = Prefetch::new(subscription.prefetch, group.notify.clone());
            Ok(pull_stream(Consumer {
                shared: self.shared.clone(),
                topic,
                group,
                prefetch,
            }))
        })
    }
}

impl LogTransport {
    /// Reads `<topic>.dlq` on a blocking thread, collecting what `keep`
    /// pushes while it says go on.
    fn scan_dead_letters<'a>(
        &'a self,
        topic: &'a str,
        mut keep: impl FnMut(&mut Vec<Event>, Event) -> bool + Send + 'static,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        Box::pin(async move {
            let Some(dlq) = lock(&self.shared.topics)
                .get(&dead_letter_topic(topic))
                .cloned()
            else {
                return Ok(Vec::new());
            };
            tokio::task::spawn_blocking(move || {
                let mut found = Vec::new();
                consumer::scan(&dlq, |e| keep(&mut found, e)).map(|()| found)
            })
            .await
            .map_err(|e| TransportError::new(TransportErrorKind::Other, e.to_string()))?
        })
    }
}

impl Transport for LogTransport {
    fn name(&self) -> &'static str {
        "log"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable_publish: true,
            persistent: true,
            consumer_groups: true,
            buffers_idle_groups: true,
            per_key_ordering: false,
            delayed_retry: true,
            replay: true,
            survives_broker_restart: false,
            max_payload_bytes: self.shared.max_payload_bytes,
            inspection: true,
        }
    }

    fn close(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.shared.lifecycle.close();
            self.shared.notify_all();
            let tx = lock(&self.shared.tx).take();
            if let Some(tx) = tx {
                let (reply, answer) = oneshot::channel();
                if tx.send(Request::Shutdown { reply }).is_ok() {
                    let _ = answer.await;
                }
            }
            let thread = lock(&self.shared.thread).take();
            if let Some(thread) = thread {
                // The writer has answered the shutdown; it is returning.
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            drop(lock(&self.shared.lock_file).take());
            Ok(())
        })
    }

    fn group_counts<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Option<GroupCounts>, TransportError>> {
        Box::pin(async move {
            let Some(log) = lock(&self.shared.topics).get(topic).cloned() else {
                return Ok(None);
            };
            let Some(g) = lock(&log.groups).get(group).cloned() else {
                return Ok(None);
            };
            let mut counts = GroupCounts::default();
            {
                let st = lock(&g.state);
                let end = log.durable_next.load(Ordering::Acquire);
                let unread = end.saturating_sub(st.next_read);
                let recovered = st
                    .recovered_retries
                    .keys()
                    .filter(|&&o| o >= st.next_read)
                    .count() as u64;
                let (ready, delayed, in_flight) = st.counts();
                counts.ready = ready as u64 + unread.saturating_sub(recovered);
                counts.in_flight = in_flight as u64;
                counts.retrying = delayed as u64 + recovered;
                let now_ms = writer::now_ms();
                let recovered_due = st
                    .recovered_retries
                    .values()
                    .map(|&(_, due_ms)| due_ms)
                    .min()
                    .map(|due_ms| {
                        let wait = u64::try_from(due_ms - now_ms).unwrap_or(0);
                        SystemTime::now() + Duration::from_millis(wait)
                    });
                let delayed_due = st.next_retry_due().map(|at| {
                    let now = tokio::time::Instant::now();
                    SystemTime::now() + at.saturating_duration_since(now)
                });
                counts.next_retry = match (delayed_due, recovered_due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let dlq = lock(&self.shared.topics)
                .get(&dead_letter_topic(topic))
                .cloned();
            if let Some(dlq) = dlq {
                let group = group.to_owned();
                counts.dead_lettered = tokio::task::spawn_blocking(move || {
                    let mut n = 0;
                    consumer::scan(&dlq, |e| {
                        if e.extension_str(ext::DEAD_LETTER_GROUP) == Some(group.as_str()) {
                            n += 1;
                        }
                        true
                    })
                    .map(|()| n)
                })
                .await
                .map_err(|e| TransportError::new(TransportErrorKind::Other, e.to_string()))??;
            }
            Ok(Some(counts))
        })
    }

    fn dead_letters<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, TransportError>> {
        self.scan_dead_letters(topic, move |found: &mut Vec<Event>, e| {
            found.push(e);
            found.len() < limit
        })
    }

    fn dead_letter<'a>(
        &'a self,
        topic: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Event>, TransportError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let found = self
                .scan_dead_letters(topic, move |found: &mut Vec<Event>, e| {
                    if e.id() == id {
                        found.push(e);
                        return false;
                    }
                    true
                })
                .await?;
            Ok(found.into_iter().next())
        })
    }
}

/// Entry points for the fuzz targets in `fuzz/`. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::position::ReadPos;
    use crate::storage::{SimStorage, Storage};

    /// Treats `data` as a segment file: scans it, decodes every event the
    /// scan accepts, then runs full recovery on it and reads the recovered
    /// topic back to the end. Must never panic, hang or hand out a record
    /// the scan rejected.
    ///
    /// # Panics
    ///
    /// Only on a bug: that is what the fuzzer looks for.
    pub fn segment(data: &[u8]) {
        let scan = crate::recovery::scan(Bytes::copy_from_slice(data), 0);
        assert!(scan.valid_len as usize <= data.len());

        let storage = SimStorage::default();
        let dir = Path::new("/fuzz/topics/t");
        storage.create_dir_all(dir).expect("simulated disk");
        let file = storage
            .open(&dir.join(crate::topic::segment_name(0)), true)
            .expect("simulated disk");
        file.append(data).expect("simulated disk");
        let storage: Arc<dyn Storage> = Arc::new(storage);
        let recovered = crate::recovery::recover(storage.as_ref(), Path::new("/fuzz/topics"))
            .expect("recovery of a simulated disk cannot fail on I/O");
        let topic = &recovered.topics["t"];
        assert_eq!(
            topic
                .durable_next
                .load(std::sync::atomic::Ordering::Acquire),
            scan.next_offset,
            "recovery and the scan agree on the end"
        );
        let mut pos = ReadPos { segment: 0, pos: 0 };
        let mut expected = 0;
        loop {
            let (records, next) = topic.read(pos).expect("recovered segments read back");
            for r in records {
                assert_eq!(r.offset, expected, "offsets read back in order");
                expected += 1;
                let _ = crate::codec::decode(r.event);
            }
            if next == pos {
                break;
            }
            pos = next;
        }
        assert_eq!(
            expected, scan.next_offset,
            "every accepted record reads back"
        );
    }
}
