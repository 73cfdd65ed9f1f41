//! What the log counts: its own work, and each group's queue.

use super::*;

/// Counters of the log's work.
#[derive(Debug, Default)]
pub struct LogStats {
    pub(crate) syncs: AtomicU64,
    pub(crate) events_appended: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) redeliveries: AtomicU64,
    pub(crate) failed_rounds: AtomicU64,
}

/// A snapshot of [`LogStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// `fdatasync`s of segments, registries and directories.
    pub syncs: u64,
    /// Events made durable.
    pub events_appended: u64,
    /// Bytes written (events and control records).
    pub bytes_written: u64,
    /// Deliveries handed out again because their lease expired.
    pub redeliveries: u64,
    /// Write rounds that failed (a full disk, an I/O error): their
    /// requests were refused and the log rewound.
    pub failed_rounds: u64,
}

/// Queue counts of one group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Every offset below this is settled.
    pub cursor: u64,
    /// Events published so far (the topic's next offset).
    pub end: u64,
    /// Read and waiting for a consumer.
    pub ready: usize,
    /// Waiting for a retry delay.
    pub delayed: usize,
    /// Leased to a consumer, unsettled.
    pub in_flight: usize,
}
