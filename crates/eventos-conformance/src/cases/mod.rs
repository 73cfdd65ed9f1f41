//! The cases, by area, and the capability each one needs.
//!
//! Adding a case: write an `async fn name(ctx: Ctx) -> CaseResult` in the
//! module of its area and list it in [`CASES`] with the claims it tests.
//! A case that only *adapts* to a capability (runs a weaker variant without
//! it) needs nothing and says so in a comment.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::Profile;
use crate::support::{CaseResult, Ctx};

mod delivery;
mod envelope;
mod groups;
mod inspect;
mod lifecycle;
mod limits;
mod load;
mod settle;

/// A claim a case depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    ConsumerGroups,
    BuffersIdleGroups,
    PerKeyOrdering,
    DelayedRetry,
    Replay,
    Persistent,
    SurvivesBrokerRestart,
    /// The harness, not the transport: [`crate::Harness::restart_broker`].
    HarnessRestartsBroker,
    /// `max_payload_bytes + 1` bytes can be allocated for the oversize case.
    TestableMaxPayload,
    Inspection,
}

/// The largest `max_payload_bytes` the oversize case will try to exceed.
pub(crate) const MAX_TESTABLE_PAYLOAD: usize = 64 * 1024 * 1024;

impl Need {
    /// The capability flag (or harness ability) as it reads in a trial kind.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Need::ConsumerGroups => "consumer_groups",
            Need::BuffersIdleGroups => "buffers_idle_groups",
            Need::PerKeyOrdering => "per_key_ordering",
            Need::DelayedRetry => "delayed_retry",
            Need::Replay => "replay",
            Need::Persistent => "persistent",
            Need::SurvivesBrokerRestart => "survives_broker_restart",
            Need::HarnessRestartsBroker => "restart_broker",
            Need::TestableMaxPayload => "max_payload_bytes <= 64 MiB",
            Need::Inspection => "inspection",
        }
    }

    /// Why a case needing this is not run, when [`Need::met`] is false.
    pub(crate) fn reason(self, profile: &Profile) -> String {
        match self {
            Need::HarnessRestartsBroker => format!(
                "the {:?} harness cannot restart the broker (Harness::restart_broker is None)",
                profile.harness
            ),
            Need::TestableMaxPayload => format!(
                "max_payload_bytes is {}, more than the {MAX_TESTABLE_PAYLOAD} bytes the suite \
                 will allocate to exceed it",
                profile.capabilities.max_payload_bytes
            ),
            _ => format!(
                "transport {:?} does not claim {}",
                profile.transport,
                self.label()
            ),
        }
    }

    pub(crate) fn met(self, profile: &Profile) -> bool {
        let caps = &profile.capabilities;
        match self {
            Need::ConsumerGroups => caps.consumer_groups,
            Need::BuffersIdleGroups => caps.buffers_idle_groups,
            Need::PerKeyOrdering => caps.per_key_ordering,
            Need::DelayedRetry => caps.delayed_retry,
            Need::Replay => caps.replay,
            Need::Persistent => caps.persistent,
            Need::SurvivesBrokerRestart => caps.survives_broker_restart,
            Need::HarnessRestartsBroker => profile.can_restart_broker,
            Need::TestableMaxPayload => caps.max_payload_bytes <= MAX_TESTABLE_PAYLOAD,
            Need::Inspection => caps.inspection,
        }
    }
}

/// One case of the suite.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) needs: &'static [Need],
    pub(crate) run: fn(Ctx) -> BoxFuture<'static, CaseResult>,
}

impl Case {
    /// How long the case may take in all: `usual`, and a case that restarts
    /// the broker as long again as the restart itself may take.
    pub(crate) fn time_limit(&self, usual: Duration) -> Duration {
        if self.needs.contains(&Need::HarnessRestartsBroker) {
            usual + lifecycle::BROKER_RESTART_LIMIT
        } else {
            usual
        }
    }
}

macro_rules! case {
    ($module:ident :: $name:ident $(, $need:ident)*) => {
        Case {
            name: stringify!($name),
            needs: &[$(Need::$need),*],
            run: |ctx| Box::pin($module::$name(ctx)),
        }
    };
}

/// Every case, in the order they are listed.
pub(crate) static CASES: &[Case] = &[
    // The envelope and the delivery record.
    case!(envelope::roundtrip_every_attribute),
    case!(envelope::stream_delivers_the_attempt_and_topic),
    case!(envelope::one_mib_payload),
    // Publishing and receiving.
    case!(delivery::publish_batch_preserves_order),
    case!(delivery::topics_are_isolated),
    case!(delivery::empty_batch_is_ok),
    case!(delivery::new_group_starts_at_latest),
    case!(delivery::new_group_replays_from_earliest, Replay),
    case!(delivery::prefetch_limits_unsettled_deliveries),
    case!(delivery::cancelled_next_loses_nothing),
    // Consumer groups.
    case!(groups::every_group_sees_every_event, ConsumerGroups),
    case!(groups::group_members_compete, ConsumerGroups),
    case!(groups::per_key_ordering, ConsumerGroups, PerKeyOrdering),
    case!(groups::dropping_stream_cancels_subscription, ConsumerGroups),
    case!(
        groups::nothing_lost_after_subscriber_closes,
        BuffersIdleGroups
    ),
    // Settling: ack, retry, dead letter, and not settling at all.
    case!(settle::ack_is_final),
    case!(settle::retry_increments_attempt),
    case!(
        settle::retry_after_redelivers_no_earlier_than_asked,
        DelayedRetry
    ),
    case!(settle::retry_stays_in_its_group, ConsumerGroups),
    case!(settle::dead_letter_lands_with_reason),
    case!(settle::dropped_settlement_is_redelivered),
    case!(settle::unsettled_delivery_is_redelivered, ConsumerGroups),
    // Limits and validation.
    case!(limits::oversize_payload_is_rejected, TestableMaxPayload),
    case!(limits::invalid_names_are_rejected),
    // Load.
    case!(load::concurrent_publishers),
    case!(load::burst_10k_no_loss),
    // Inspection: counts and kept dead letters.
    case!(inspect::counts_match_what_was_done, Inspection),
    case!(
        inspect::dead_letters_are_kept_without_a_subscriber,
        Inspection
    ),
    // Lifecycle: close, reopen, broker restarts.
    case!(lifecycle::close_ends_streams),
    case!(lifecycle::survives_reopen, Persistent),
    case!(
        lifecycle::reconnect_after_broker_restart,
        SurvivesBrokerRestart,
        HarnessRestartsBroker
    ),
];

#[cfg(test)]
mod tests {
    use super::CASES;

    #[test]
    fn the_suite_has_at_least_fifteen_uniquely_named_cases() {
        assert!(CASES.len() >= 15, "{} cases", CASES.len());
        let names: std::collections::HashSet<_> = CASES.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), CASES.len(), "case names are unique");
    }
}
