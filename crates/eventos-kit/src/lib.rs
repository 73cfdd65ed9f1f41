//! The pieces every eventos transport needs, written and tested once.
//!
//! A transport maps the contract of `eventos-core` onto an engine. The
//! engine-specific part — a file format, a broker protocol — is its own;
//! what surrounds it is the same everywhere, and was written three times
//! before this crate existed, each copy with its own bugs: refusing work
//! after `close`, settling a delivery at most once and putting it back when
//! its acker is dropped, holding no more unsettled deliveries than the
//! prefetch, queueing a group's events in memory with delayed retries and
//! per-key order, stamping a retry's due time so that it is never handed
//! out early, advancing an offset only over a settled prefix, choosing
//! a broker delay queue for a retry. And the [`Registry`]: transports by
//! URL scheme, each crate describing its own [`Engine`] (schemes, settings
//! section, how to open), so the composition root names no transport type
//! but in one registration line each.
//!
//! # The decisions that shaped it
//!
//! * **A crate below the transports, not a module of `eventos-core`.** The
//!   contract stays free of a runtime; these pieces need tokio's `Notify`,
//!   clocks and `watch`. A transport depends on both; the router and the
//!   services on neither of these pieces.
//! * **Small pieces, each usable alone.** A transport takes what fits its
//!   engine: the log uses the cursor and the pull loop but keeps its own
//!   leases; RabbitMQ keeps ordering and prefetch in the broker and uses
//!   the acker and the ladder. Nothing here is a framework to inherit
//!   from.
//! * **Plain data under the transport's lock.** [`GroupQueue`],
//!   [`RetrySchedule`] and [`SettledCursor`] are synchronous structures
//!   with no locks of their own: a transport keeps them behind one mutex
//!   per group, so a group's state changes in one step.
//!
//! No feature flags.

mod acker;
pub mod clock;
mod cursor;
mod ladder;
mod lifecycle;
mod pull;
mod queue;
mod registry;
mod schedule;

pub use acker::{OnceAcker, Settle, already_settled};
pub use cursor::SettledCursor;
pub use ladder::{DELAY_LADDER_MS, delay_bucket};
pub use lifecycle::Lifecycle;
pub use pull::{Gate, Permit, Prefetch, Pull, Step, pull, pull_stream};
pub use queue::{GroupQueue, Keyed, QueueCounts, Queued};
pub use registry::{Engine, OpenError, Opened, Registry, Target, UnknownTransport, directory};
pub use schedule::RetrySchedule;

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poison: the structures transports keep behind their
/// locks change in steps that leave them consistent, so a panic elsewhere
/// must not take the transport down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
