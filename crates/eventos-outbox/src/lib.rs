//! The transactional outbox and inbox: how a service changes its state
//! and emits the events that change causes, without ever doing one and
//! losing the other.
//!
//! # The decisions that shaped it
//!
//! * **One transaction, two effects.** A service writes its state change
//!   and the events it causes into its own database in one transaction
//!   ([`enqueue`] takes the open transaction). Either both commit or
//!   neither does; there is no moment where the state changed but the event
//!   is lost, nor an event about a change that never happened.
//! * **A relay does the publishing.** [`Relay`] reads unsent rows in commit
//!   order, publishes them (a publish returns only once the transport holds
//!   them durably), then marks them sent. A crash between the two republishes
//!   them: delivery is at-least-once.
//! * **The inbox makes consumers effectively-once.** A handler records the
//!   event id with [`first_delivery`] in the same transaction as its own
//!   state change; a redelivered event finds its id there and changes
//!   nothing twice.
//! * **SQLite, durable.** Each service owns a database file in WAL mode
//!   with `synchronous = FULL`, so a committed transaction survives power
//!   loss, and nothing needs installing.
//! * **Group commit.** Every write goes through the store's one writer
//!   ([`Store::write`]): writes that wait together commit together, each
//!   under its own savepoint, for one sync. A store's throughput is then
//!   the disk's sync rate times the writes per round, not the sync rate;
//!   reads go to a pool of their own and never wait for the writer; WAL
//!   checkpoints run in the background, never inside a commit. The
//!   relay's "sent" marks go through [`Store::write_unsynced`]: losing one
//!   to a power cut only publishes its row again, so a round of marks
//!   alone pays no sync.
//!
//! No feature flags.

mod locks;
mod writer;

/// The SQLite driver writes run on ([`Store::write`] hands them a
/// [`rusqlite::Connection`]); reads go through [`Store::pool`].
pub use rusqlite;

pub use locks::{KeyGuard, KeyLocks};
pub use writer::StoreStats;

use std::path::Path;
use std::str::FromStr as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventos_core::{Event, EventError, Publisher, TransportError};
use rusqlite::Connection;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::Notify;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A statement of a write failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The schema could not be brought up to date.
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored event does not decode (the row was written by something
    /// else, or the file is damaged).
    #[error("outbox row {seq} holds an undecodable event: {source}")]
    Corrupt {
        /// The row.
        seq: i64,
        /// Why.
        source: EventError,
    },
    /// The transport did not take the events; they stay unsent.
    #[error("publishing outbox events failed: {0}")]
    Publish(#[from] TransportError),
    /// The write itself succeeded but its round could not commit (a full
    /// disk, an I/O error): nothing of it was kept.
    #[error("the write could not be committed: {0}")]
    Commit(Arc<rusqlite::Error>),
    /// The write panicked; it was rolled back alone.
    #[error("the write panicked and was rolled back")]
    WritePanicked,
    /// The store's writer has stopped (the process is shutting down).
    #[error("the store's writer has stopped")]
    WriterGone,
}

impl From<OutboxError> for eventos::HandlerError {
    /// A handler's write that failed is retried: the database was busy,
    /// full or unreachable, which passes. Only a row that does not decode
    /// will fail the same way every time.
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Corrupt { .. } | OutboxError::Migrate(_) => Self::permanent(e),
            _ => Self::transient(e),
        }
    }
}

/// Makes the SQLite database at `path` (created empty if missing) and its
/// `-wal` and `-shm`, if any, readable by the owner only; call it before
/// opening a database of your own ([`Store::open`] does). SQLite creates
/// the `-wal` and `-shm` with the database file's mode, so a file created
/// 0600 here keeps all three private; an older 0644 file is tightened.
///
/// # Errors
///
/// If the file cannot be created or its mode changed.
pub fn owner_only_database(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.as_os_str().to_owned();
            file.push(suffix);
            match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS eventos_outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        topic      TEXT    NOT NULL,
        event_id   TEXT    NOT NULL,
        event      BLOB    NOT NULL,
        created_ms INTEGER NOT NULL,
        sent_ms    INTEGER
    )",
    "CREATE INDEX IF NOT EXISTS eventos_outbox_unsent ON eventos_outbox (seq) WHERE sent_ms IS NULL",
    "CREATE TABLE IF NOT EXISTS eventos_inbox (
        consumer   TEXT    NOT NULL,
        event_id   TEXT    NOT NULL,
        handled_ms INTEGER NOT NULL,
        PRIMARY KEY (consumer, event_id)
    )",
];

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A service's database, with the outbox and inbox tables.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    pool: SqlitePool,
    writer: writer::Writer,
    wake: Arc<Notify>,
    counters: Arc<writer::Counters>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, in WAL mode with
    /// full synchronous commits, creates the outbox and inbox tables, and
    /// starts the store's writer and its background checkpoints.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`] if the file cannot be opened or written.
    pub async fn open(path: &Path) -> Result<Self, OutboxError> {
        owner_only_database(path).map_err(sqlx::Error::Io)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // Checkpoints are the background task's; a commit that ran one
            // would make its callers wait for it.
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A ping before every read is a round trip to the driver's
            // thread for nothing: a local file does not hang up.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let name = path
            .file_stem()
            .map_or_else(|| "db".into(), |s| s.to_string_lossy().into_owned());
        let counters = Arc::new(writer::Counters::default());
        let wake = Arc::new(Notify::new());
        let writer = writer::Writer::start(
            name.clone(),
            path.to_owned(),
            Arc::clone(&counters),
            Arc::clone(&wake),
        )
        .await?;
        let store = Self {
            inner: Arc::new(Inner {
                name,
                pool,
                writer,
                wake,
                counters,
            }),
        };
        tokio::spawn(checkpoints(Arc::downgrade(&store.inner)));
        Ok(store)
    }

    /// Runs a service's own migrations (`sqlx::migrate!("./migrations")`).
    ///
    /// # Errors
    ///
    /// [`OutboxError::Migrate`] if a migration fails or was altered.
    pub async fn migrate(&self, migrator: &sqlx::migrate::Migrator) -> Result<(), OutboxError> {
        migrator.run(&self.inner.pool).await?;
        Ok(())
    }

    /// The pool for reads. Writes go through [`Store::write`]: one written
    /// here would wait for the writer's lock and pay a sync of its own.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// Runs `f` inside a transaction and returns its result once that
    /// transaction is durable; wakes the relay, so the events it enqueued
    /// leave at once.
    ///
    /// `f` runs on the store's writer together with the other writes that
    /// waited with it, each under its own savepoint: if `f` fails, its
    /// changes alone are rolled back and its error comes back; if the
    /// round cannot commit, every write of it fails
    /// ([`OutboxError::Commit`]) and nothing of them is kept. `f` is
    /// synchronous and does database work only: whatever it waited for,
    /// every other writer would wait for too. It must not end the
    /// transaction it is given.
    ///
    /// # Errors
    ///
    /// `f`'s own error, or [`OutboxError`] (converted) if the round failed.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.inner.writer.write(f).await
    }

    /// Handles the event `event_id` once for `consumer`: runs `f` in the
    /// next round together with the consumer's inbox record, so the
    /// effects, the events `f` enqueues and "handled" commit as one —
    /// "handle this event once, and emit what it causes". A redelivered
    /// event finds its record and `f` does not run: `Ok(None)`.
    ///
    /// The inbox insert is the write's first statement, so whatever `f`
    /// reads sees every write committed before, and no other write runs
    /// until this one is done.
    ///
    /// # Errors
    ///
    /// As [`Store::write`].
    pub async fn once<T, E, F>(
        &self,
        consumer: impl Into<String>,
        event_id: impl Into<String>,
        f: F,
    ) -> Result<Option<T>, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        let (consumer, event_id) = (consumer.into(), event_id.into());
        self.write(move |tx: &Connection| {
            if !first_delivery(tx, &consumer, &event_id)? {
                return Ok(None);
            }
            f(tx).map(Some)
        })
        .await
    }

    /// Runs `f` like [`Store::write`], for a write whose loss in a power
    /// cut costs only work done again — the relay's "sent" marks (a row
    /// left unmarked is published again, and consumers drop the
    /// duplicate). It shares the next round; a round of such writes
    /// alone commits without a sync, and the next synced round makes it
    /// durable. A process killed after it returns loses nothing: the
    /// operating system has the write.
    ///
    /// # Errors
    ///
    /// As [`Store::write`].
    pub async fn write_unsynced<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.inner.writer.write_unsynced(f).await
    }

    /// Runs the read `f` on the store's writer, between two rounds and
    /// outside any transaction, and returns its result: it sees every
    /// write that committed before it was asked for. For a read that
    /// follows the writes closely and runs often (the relay's): it costs
    /// no trip to a pooled connection's thread, but waits for the round
    /// in progress. Requests read through [`Store::pool`].
    ///
    /// # Errors
    ///
    /// `f`'s own error, or [`OutboxError::WriterGone`] (converted).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.inner.writer.read(f).await
    }

    /// Closes the database: the writes already queued finish, later ones
    /// fail with [`OutboxError::WriterGone`], and the read pool closes.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.pool.close().await;
    }

    /// The database's name: its file name without the extension.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What the store's writer has done since it opened.
    pub fn stats(&self) -> StoreStats {
        self.inner.counters.snapshot()
    }

    /// How many enqueued events are not yet published.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Database`].
    pub async fn unsent(&self) -> Result<u64, OutboxError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM eventos_outbox WHERE sent_ms IS NULL")
                .fetch_one(&self.inner.pool)
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Checkpoints the write-ahead log into the database while commits go on,
/// for as long as the store is open. PASSIVE never blocks the writer (a
/// FULL or RESTART would hold every commit while it waits for readers);
/// the writer itself completes one now and then, between two rounds, so
/// the log starts over instead of growing.
async fn checkpoints(store: Weak<Inner>) {
    let mut seen = u64::MAX;
    loop {
        tokio::time::sleep(writer::CHECKPOINT_EVERY).await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let stats = inner.counters.snapshot();
        let commits = stats.commits + stats.unsynced_commits;
        if commits == seen {
            continue;
        }
        let passive: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&inner.pool)
            .await;
        match passive {
            Ok(_) => {
                seen = commits;
                inner
                    .counters
                    .checkpoints
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "background checkpoint failed; retried shortly"),
        }
    }
}

/// Adds `event` for `topic` to the outbox, inside the caller's transaction.
///
/// # Errors
///
/// [`OutboxError::Sqlite`]; the caller's write should then fail.
pub fn enqueue(tx: &Connection, topic: &str, event: &Event) -> Result<(), OutboxError> {
    tx.prepare_cached(
        "INSERT INTO eventos_outbox (topic, event_id, event, created_ms) VALUES (?, ?, ?, ?)",
    )?
    .execute(rusqlite::params![
        topic,
        event.id(),
        event.to_json(),
        now_ms()
    ])?;
    Ok(())
}

/// Records that `consumer` handles `event_id`, inside the caller's
/// transaction. Returns `false` if it was already recorded — the event is a
/// redelivery and its effects are already committed.
///
/// # Errors
///
/// [`OutboxError::Sqlite`].
pub fn first_delivery(
    tx: &Connection,
    consumer: &str,
    event_id: &str,
) -> Result<bool, OutboxError> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO eventos_inbox (consumer, event_id, handled_ms) VALUES (?, ?, ?)
             ON CONFLICT (consumer, event_id) DO NOTHING",
        )?
        .execute(rusqlite::params![consumer, event_id, now_ms()])?;
    Ok(inserted == 1)
}

/// Sent rows removed per write by [`Relay::purge_sent`].
const PURGE_SLICE: i64 = 2000;

/// Publishes outbox rows in commit order and marks them sent.
#[derive(Clone)]
pub struct Relay {
    store: Store,
    publisher: Arc<dyn Publisher>,
    batch: u32,
    poll: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("batch", &self.batch)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay from `store` to `publisher`: 256 rows a batch, polling every
    /// second besides being woken by [`Store::commit`].
    pub fn new(store: Store, publisher: Arc<dyn Publisher>) -> Self {
        Self {
            store,
            publisher,
            batch: 256,
            poll: Duration::from_secs(1),
        }
    }

    /// Publishes one batch of unsent rows, in order within each topic;
    /// returns how many were sent. Each topic's rows go out as one publish,
    /// the topics' publishes at once.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Publish`] if the transport refuses (the rows from the
    /// failed one on stay unsent, so order is kept); database errors.
    pub async fn relay_once(&self) -> Result<usize, OutboxError> {
        // On the writer's connection: the relay reads after every commit,
        // and a pooled read would cost a trip to the driver's thread per
        // row.
        let batch = self.batch;
        let rows = self
            .store
            .read(move |c: &Connection| {
                let rows = c
                    .prepare_cached(
                        "SELECT seq, topic, event FROM eventos_outbox WHERE sent_ms IS NULL ORDER BY seq LIMIT ?",
                    )?
                    .query_map([batch], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, OutboxError>(rows)
            })
            .await?;
        // One publish per topic, all at once: rows of different topics
        // interleave (an enrollment's events go to several), and a publish
        // per run of one topic paid a sync of the transport each. Order
        // holds where it is promised, within a topic.
        let mut topics: Vec<(String, Vec<i64>, Vec<Event>)> = Vec::new();
        for (seq, topic, bytes) in rows {
            let event =
                Event::from_json(&bytes).map_err(|source| OutboxError::Corrupt { seq, source })?;
            match topics.iter_mut().find(|(t, _, _)| *t == topic) {
                Some((_, seqs, events)) => {
                    seqs.push(seq);
                    events.push(event);
                }
                None => topics.push((topic, vec![seq], vec![event])),
            }
        }
        let publishes = topics.into_iter().map(|(topic, seqs, events)| async move {
            let count = events.len();
            let published = self.publisher.publish(&topic, events).await;
            if published.is_ok() {
                metrics::counter!("eventos_outbox_published_total", "topic" => topic)
                    .increment(count as u64);
            }
            (seqs, published)
        });
        let mut done = Vec::new();
        let mut failed = None;
        for (seqs, published) in futures::future::join_all(publishes).await {
            match published {
                Ok(()) => done.extend(seqs),
                // That topic's rows stay unsent, in order, for the next
                // pass; the other topics' are marked.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let sent = done.len();
        // All marks in one write, riding the round of the service's other
        // writes, and syncing none of their own: a mark lost in a power
        // cut only publishes its row again.
        if !done.is_empty() {
            let at = now_ms();
            self.store
                .write_unsynced(move |c: &Connection| {
                    let mut mark = c.prepare_cached(
                        "UPDATE eventos_outbox SET sent_ms = ? WHERE seq = ? AND sent_ms IS NULL",
                    )?;
                    for seq in done {
                        mark.execute(rusqlite::params![at, seq])?;
                    }
                    Ok::<_, OutboxError>(())
                })
                .await?;
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(sent)
    }

    /// Removes rows sent more than `age` ago; returns how many.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Sqlite`].
    pub async fn purge_sent(&self, age: Duration) -> Result<u64, OutboxError> {
        let cutoff = now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        // In slices, each its own write: one DELETE of an hour of traffic
        // would hold the writer, and every caller behind it, for as long.
        let mut purged = 0;
        loop {
            let done = self
                .store
                .write_unsynced(move |c: &Connection| {
                    let done = c
                        .prepare_cached(
                            "DELETE FROM eventos_outbox WHERE seq IN \
                             (SELECT seq FROM eventos_outbox WHERE sent_ms IS NOT NULL AND sent_ms < ? LIMIT ?)",
                        )?
                        .execute(rusqlite::params![cutoff, PURGE_SLICE])?;
                    Ok::<_, OutboxError>(done as u64)
                })
                .await?;
            purged += done;
            if done < PURGE_SLICE.unsigned_abs() {
                return Ok(purged);
            }
        }
    }

    /// Relays until `shutdown` completes: publishes whatever is unsent,
    /// then waits for a commit or the poll interval. A failure is logged and
    /// retried with a growing pause (up to 30 s); nothing is dropped.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut pause = Duration::from_millis(100);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            let wait = match self.relay_once().await {
                Ok(n) if n as u32 >= self.batch => Duration::ZERO,
                Ok(_) => {
                    pause = Duration::from_millis(100);
                    self.poll
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "outbox relay failed; the events stay queued");
                    let p = pause;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    p
                }
            };
            if last_purge.elapsed() > Duration::from_secs(60) {
                if let Err(e) = self.purge_sent(Duration::from_secs(3600)).await {
                    tracing::warn!(error = %e, "cannot purge sent outbox rows");
                }
                last_purge = tokio::time::Instant::now();
            }
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.store.inner.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
