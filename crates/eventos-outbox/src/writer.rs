//! Group commit for a SQLite store: one writer per database runs every
//! write, gathering those that wait into one transaction and one sync.
//!
//! SQLite has one writer at a time anyway; with a pool of writers each
//! transaction waits for the lock and then pays its own `fsync`, so a
//! store's throughput is the disk's sync rate whatever the concurrency.
//! Here a round starts as soon as one write waits and takes every write
//! queued meanwhile: `BEGIN IMMEDIATE`, each write under its own
//! savepoint (a failing write rolls back alone and gets its own error),
//! one `COMMIT`, then every caller hears back. Under load a round carries
//! hundreds of writes for one sync; at rest a lone write costs what it
//! did before.
//!
//! The writer is a thread that owns its connection and runs the writes'
//! statements itself, synchronously. An async driver would send each
//! statement to a thread of its own and wait for the answer: two context
//! switches per statement, which cost more than SQLite's work and, at a
//! few statements per write and hundreds of writes per round, made the
//! writer the bottleneck. A write is therefore a plain closure over the
//! connection; it cannot await, which is the rule anyway (whatever it
//! waited for, every other writer would wait for too).

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::{Notify, oneshot};

use crate::OutboxError;

/// Writes one round takes at most; the rest wait for the next round, so
/// one round's callers do not wait for an unbounded queue to run.
const ROUND_MAX: usize = 1024;

/// Prepared statements the writer keeps: every statement a service's
/// writes use, so none is parsed twice.
const STATEMENT_CACHE: usize = 256;

/// A write, type-erased: runs on the writer's connection inside the
/// round's transaction, or is refused unrun when the round failed first.
trait Job: Send {
    fn run(self: Box<Self>, conn: &Connection) -> Ran;
    fn refuse(self: Box<Self>, error: OutboxError);
}

/// A write that ran; `finish` answers its caller once the round's fate is
/// known.
struct Ran {
    ok: bool,
    finish: Box<dyn FnOnce(Result<(), Arc<rusqlite::Error>>) + Send>,
}

struct Write<F, T, E> {
    f: F,
    answer: oneshot::Sender<Result<T, E>>,
    /// The caller's causal context and span, made current again on the
    /// writer's thread: events a write creates carry the correlation of
    /// the request or delivery that caused them, and its logs its span.
    context: Option<eventos::Context>,
    span: tracing::Span,
}

impl<F, T, E> Job for Write<F, T, E>
where
    F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<OutboxError> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> Ran {
        let Write {
            f,
            answer,
            context,
            span,
        } = *self;
        let _entered = span.enter();
        // A panic inside a write is that write's failure, not the
        // writer's.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match context {
            Some(context) => context.sync_scope(|| f(conn)),
            None => f(conn),
        }));
        match outcome {
            Ok(Ok(value)) => Ran {
                ok: true,
                finish: Box::new(move |round| {
                    let _ = answer.send(match round {
                        Ok(()) => Ok(value),
                        Err(e) => Err(OutboxError::Commit(e).into()),
                    });
                }),
            },
            Ok(Err(e)) => Ran {
                ok: false,
                finish: Box::new(move |_| {
                    let _ = answer.send(Err(e));
                }),
            },
            Err(_) => Ran {
                ok: false,
                finish: Box::new(move |_| {
                    let _ = answer.send(Err(OutboxError::WritePanicked.into()));
                }),
            },
        }
    }

    fn refuse(self: Box<Self>, error: OutboxError) {
        let _ = self.answer.send(Err(error.into()));
    }
}

/// What a store's writer has done since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Writes that committed.
    pub writes: u64,
    /// Writes that failed (their own error, or their round's).
    pub failed_writes: u64,
    /// Rounds committed; each is one sync of the write-ahead log.
    pub commits: u64,
    /// Rounds of [`crate::Store::write_unsynced`] writes alone, committed
    /// without a sync of their own: the next synced round (or checkpoint)
    /// makes them durable.
    pub unsynced_commits: u64,
    /// Rounds whose transaction could not begin or commit.
    pub failed_rounds: u64,
    /// Background checkpoints run (each syncs the log and the database).
    pub checkpoints: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    writes: AtomicU64,
    failed_writes: AtomicU64,
    commits: AtomicU64,
    unsynced_commits: AtomicU64,
    failed_rounds: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> StoreStats {
        StoreStats {
            writes: self.writes.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            unsynced_commits: self.unsynced_commits.load(Ordering::Relaxed),
            failed_rounds: self.failed_rounds.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
        }
    }
}

/// What the writer is asked to do.
enum Request {
    Write(Box<dyn Job>),
    /// A write whose loss in a power cut costs nothing but repeated work:
    /// it rides the next round, and a round of these alone is not synced.
    Unsynced(Box<dyn Job>),
    /// Runs outside any transaction, before the writes queued with it.
    Read(Box<dyn Job>),
    /// Close the connection and refuse every later write.
    Close(oneshot::Sender<()>),
}

/// The sending half: what a [`crate::Store`] holds.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<Request>,
}

/// Opens the writer's connection the way every store's is: full
/// synchronous commits in WAL mode, and no automatic checkpoints (the
/// background task's, so no commit pays for one).
fn connect(path: &std::path::Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;",
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl Writer {
    /// Opens the writer's own connection and starts its thread.
    pub(crate) async fn start(
        name: String,
        path: PathBuf,
        counters: Arc<Counters>,
        committed: Arc<Notify>,
    ) -> Result<Self, OutboxError> {
        let (jobs, queue) = mpsc::channel();
        let (opened, ready) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("store-{name}"))
            .spawn(move || {
                let conn = match connect(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = opened.send(Err(OutboxError::Sqlite(e)));
                        return;
                    }
                };
                let _ = opened.send(Ok(()));
                Round {
                    conn: Some(conn),
                    caught_up: Instant::now(),
                    path,
                    counters,
                    committed,
                }
                .serve(&queue);
            })
            .map_err(|e| OutboxError::Database(sqlx::Error::Io(e)))?;
        ready.await.map_err(|_| OutboxError::WriterGone)??;
        Ok(Self { jobs })
    }

    /// Closes the writer's connection once the writes queued before this
    /// are done; every later write fails with [`OutboxError::WriterGone`].
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.jobs.send(Request::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }

    /// Runs `f` in the next round; returns once that round committed (its
    /// result) or failed (the round's error).
    pub(crate) async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.send(f, Request::Write).await
    }

    /// Like [`Writer::write`], but the round it lands in syncs only if a
    /// durable write shares it.
    pub(crate) async fn write_unsynced<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.send(f, Request::Unsynced).await
    }

    /// Runs `f` on the writer's connection between two rounds, outside
    /// any transaction: it sees every write committed before it was
    /// asked for.
    pub(crate) async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        self.send(f, Request::Read).await
    }

    async fn send<T, E, F>(&self, f: F, request: fn(Box<dyn Job>) -> Request) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<OutboxError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T, E>>();
        let job: Box<dyn Job> = Box::new(Write {
            f,
            answer,
            context: eventos::Context::current(),
            span: tracing::Span::current(),
        });
        self.jobs
            .send(request(job))
            .map_err(|_| E::from(OutboxError::WriterGone))?;
        answered
            .await
            .unwrap_or_else(|_| Err(OutboxError::WriterGone.into()))
    }
}

struct Round {
    /// `None` after the connection had to be dropped; reopened at the
    /// next round.
    conn: Option<Connection>,
    /// When the writer last finished a checkpoint itself.
    caught_up: Instant,
    path: PathBuf,
    counters: Arc<Counters>,
    committed: Arc<Notify>,
}

impl Round {
    fn serve(mut self, queue: &mpsc::Receiver<Request>) {
        let mut jobs = Vec::with_capacity(ROUND_MAX);
        // Whether a write of the round being gathered must be durable.
        let mut durable = false;
        let mut closed = false;
        // Blocks for the first request of a round, then takes whatever
        // else is already queued.
        while let Ok(first) = queue.recv() {
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    Request::Write(job) | Request::Unsynced(job) | Request::Read(job) if closed => {
                        job.refuse(OutboxError::WriterGone);
                    }
                    Request::Write(job) => {
                        durable = true;
                        jobs.push(job);
                    }
                    Request::Unsynced(job) => jobs.push(job),
                    Request::Read(job) => self.read(job),
                    Request::Close(done) => {
                        // What was queued before the close still runs.
                        if !jobs.is_empty() {
                            // Closing: whatever was asked is made durable.
                            self.run(&mut jobs, true);
                        }
                        self.conn = None;
                        closed = true;
                        let _ = done.send(());
                    }
                }
                if jobs.len() < ROUND_MAX {
                    next = queue.try_recv().ok();
                }
            }
            if !jobs.is_empty() {
                self.run(&mut jobs, std::mem::take(&mut durable));
            }
        }
    }

    /// Runs a read at once, outside the round being gathered.
    fn read(&mut self, job: Box<dyn Job>) {
        if self.conn.is_none() {
            match connect(&self.path) {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => return job.refuse(OutboxError::Sqlite(e)),
            }
        }
        let done = job.run(self.conn.as_ref().expect("opened above"));
        (done.finish)(Ok(()));
    }

    fn run(&mut self, jobs: &mut Vec<Box<dyn Job>>, durable: bool) {
        self.round(jobs, durable);
        if durable {
            return;
        }
        // Every path out of a round leaves the connection outside a
        // transaction, or drops it (a new one opens FULL).
        if let Some(conn) = self.conn.as_ref()
            && conn.execute_batch("PRAGMA synchronous = FULL").is_err()
        {
            tracing::warn!(
                "the store's writer could not restore synchronous commits; reconnecting"
            );
            self.conn = None;
        }
    }

    fn round(&mut self, jobs: &mut Vec<Box<dyn Job>>, durable: bool) {
        let started = Instant::now();
        let count = jobs.len();
        if self.conn.is_none() {
            match connect(&self.path) {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => return self.fail_round(e, Vec::new(), jobs),
            }
        }
        let conn = self.conn.take().expect("opened above");
        // NORMAL, in WAL mode, commits without a sync and stays
        // consistent through a power cut (the log's frames are
        // checksummed; a torn tail is ignored). The next FULL commit's
        // sync covers these frames too, since the log is written in order.
        if !durable && let Err(e) = conn.execute_batch("PRAGMA synchronous = NORMAL") {
            self.conn = Some(conn);
            return self.fail_round(e, Vec::new(), jobs);
        }
        // A lone write needs no savepoint: its failure rolls back the
        // round.
        let single = count == 1;
        let opening = if single {
            "BEGIN IMMEDIATE"
        } else {
            "BEGIN IMMEDIATE; SAVEPOINT w"
        };
        if let Err(e) = conn.execute_batch(opening) {
            self.conn = Some(conn);
            self.abandon();
            return self.fail_round(e, Vec::new(), jobs);
        }
        let mut ran = Vec::with_capacity(count);
        let mut queued = jobs.drain(..).peekable();
        let mut settled = Ok(());
        while let Some(job) = queued.next() {
            let done = job.run(&conn);
            let last = queued.peek().is_none();
            let step = match (single, done.ok, last) {
                (true, true, _) => "COMMIT",
                (true, false, _) => "ROLLBACK",
                (false, true, false) => "RELEASE w; SAVEPOINT w",
                (false, true, true) => "RELEASE w; COMMIT",
                (false, false, false) => "ROLLBACK TO w; RELEASE w; SAVEPOINT w",
                (false, false, true) => "ROLLBACK TO w; RELEASE w; COMMIT",
            };
            ran.push(done);
            if let Err(e) = conn.execute_batch(step) {
                settled = Err(e);
                break;
            }
        }
        let mut unrun: Vec<Box<dyn Job>> = queued.collect();
        self.conn = Some(conn);
        if let Err(e) = settled {
            self.abandon();
            return self.fail_round(e, ran, &mut unrun);
        }
        // Counted before anyone hears back, so a caller that reads the
        // stats after its write sees the round in them.
        let wrote = ran.iter().filter(|done| done.ok).count() as u64;
        self.counters.writes.fetch_add(wrote, Ordering::Relaxed);
        self.counters
            .failed_writes
            .fetch_add(count as u64 - wrote, Ordering::Relaxed);
        // A lone write that failed was rolled back: no commit, no sync.
        if wrote > 0 || !single {
            if durable {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters
                    .unsynced_commits
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        for done in ran {
            (done.finish)(Ok(()));
        }
        if wrote > 0 {
            self.committed.notify_one();
        }
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!("eventos_store_round_writes").record(count as f64);
        metrics::histogram!("eventos_store_round_seconds").record(started.elapsed().as_secs_f64());
        if wrote > 0 && self.caught_up.elapsed() >= CATCH_UP_EVERY {
            self.catch_up();
        }
    }

    /// Finishes the checkpoint the background has nearly done, between two
    /// rounds, twice a second. The background's checkpoints cannot
    /// complete under load (a commit always lands while one runs), and the
    /// log only starts over from its beginning after a complete one: left
    /// alone it grew by hundreds of megabytes, and every read and commit
    /// slowed with it. Here no commit can land meanwhile, and what is left
    /// to copy is what committed since the background's last pass.
    fn catch_up(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let checkpoint = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match checkpoint {
            // Complete: the next round starts the log over.
            Ok((0, log, copied)) if copied >= log => {
                self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
                self.caught_up = Instant::now();
            }
            // The background's checkpoint was running, or a reader still
            // needs the log: tried again after the next round.
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "the writer's checkpoint failed; retried later");
                self.caught_up = Instant::now();
            }
        }
    }

    /// Rolls back what is left of a failed round. A COMMIT that failed
    /// (a full disk) leaves the transaction open; SQLite rolls some back
    /// itself (on some I/O errors). A connection that cannot even roll
    /// back is dropped and reopened next round, so no later round nests
    /// inside a transaction that never ends.
    fn abandon(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        if conn.is_autocommit() {
            return;
        }
        if conn.execute_batch("ROLLBACK").is_err() || !conn.is_autocommit() {
            tracing::warn!("the store's writer could not roll back a failed round; reconnecting");
            self.conn = None;
        }
    }

    /// Answers every write of a failed round: those whose own closure
    /// failed with their own error, the others with the round's.
    fn fail_round(&self, error: rusqlite::Error, ran: Vec<Ran>, unrun: &mut Vec<Box<dyn Job>>) {
        let writes = ran.len() + unrun.len();
        tracing::warn!(error = %error, writes, "a store round failed; its writes are refused");
        let error = Arc::new(error);
        self.counters.failed_rounds.fetch_add(1, Ordering::Relaxed);
        self.counters
            .failed_writes
            .fetch_add(writes as u64, Ordering::Relaxed);
        for done in ran {
            (done.finish)(Err(Arc::clone(&error)));
        }
        for job in unrun.drain(..) {
            job.refuse(OutboxError::Commit(Arc::clone(&error)));
        }
    }
}

/// How often the background checkpointer looks at the write-ahead log.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// How often, at most, the writer finishes a checkpoint itself.
const CATCH_UP_EVERY: Duration = Duration::from_millis(500);
