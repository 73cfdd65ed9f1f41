//! How a log is opened: its directory, segment size, visibility timeout,
//! retention, payload limit and storage.

use super::*;

/// When consumed segments are removed.
///
/// A sealed segment is removed once every group has settled all of it
/// **and** either it is older than `max_age` or the topic is larger than
/// `max_bytes`. With neither set, consumed segments are kept forever (for
/// replay by new groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Remove consumed segments whose last append is older than this.
    pub max_age: Option<Duration>,
    /// Remove consumed segments while the topic is larger than this.
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    /// Consumed segments are kept a day, or until the topic passes 1 GiB.
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(24 * 3600)),
            max_bytes: Some(1 << 30),
        }
    }
}

/// How to open a log. [`LogConfig::new`] has the defaults.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub(crate) dir: PathBuf,
    pub(crate) segment_bytes: u64,
    pub(crate) visibility_timeout: Duration,
    pub(crate) retention: Retention,
    pub(crate) max_payload_bytes: usize,
    pub(crate) storage: Option<Arc<dyn Storage>>,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, a 30 s visibility timeout, 16 MiB
    /// payloads, [`Retention::default`], the real file system.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 * 1024 * 1024,
            visibility_timeout: Duration::from_secs(30),
            retention: Retention::default(),
            max_payload_bytes: 16 * 1024 * 1024,
            storage: None,
        }
    }

    /// Segment size at which a new segment starts (at least 4 KiB).
    #[must_use]
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(4096);
        self
    }

    /// How long a delivery may stay unsettled before it is redelivered.
    #[must_use]
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout;
        self
    }

    /// When consumed segments are removed.
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// The largest payload accepted.
    #[must_use]
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes.min(record::MAX_BODY_LEN / 2);
        self
    }

    /// Uses another storage (tests: [`storage::SimStorage`]). No directory
    /// lock is taken then: the storage is the test's own.
    #[must_use]
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Opens (or creates) the log, recovering what is on disk.
    ///
    /// # Errors
    ///
    /// [`LogError::Locked`] if another process owns the directory;
    /// [`LogError::Io`] if it cannot be read or repaired.
    pub fn open(self) -> Result<LogTransport, LogError> {
        LogTransport::open_with(self)
    }
}
