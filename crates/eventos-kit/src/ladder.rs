//! The retry delay ladder, for brokers that delay with fixed queues.

use std::time::Duration;

/// The retry delays a broker-side delay queue exists for, in milliseconds.
///
/// A retry waits in the smallest bucket that is at least the delay asked
/// for, so it never comes back sooner; the steps grow by at most 5/3, so it
/// comes back at most ~1.7 times later (plus the broker's own latency).
/// Delays over the last bucket wait there repeatedly until they are due.
pub const DELAY_LADDER_MS: &[u64] = &[
    50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000,
    20_000, 30_000, 45_000, 60_000, 90_000, 120_000, 180_000, 300_000, 450_000, 600_000, 900_000,
    1_200_000, 1_800_000, 2_700_000, 3_600_000, 5_400_000, 7_200_000, 10_800_000, 14_400_000,
    21_600_000, 28_800_000, 43_200_000, 64_800_000, 86_400_000,
];

/// The bucket a retry after `after` waits in: the smallest of
/// [`DELAY_LADDER_MS`] that is at least `after`, or the largest one for
/// longer delays (which then wait there again until due).
pub fn delay_bucket(after: Duration) -> Duration {
    let ms = after.as_millis();
    let bucket = DELAY_LADDER_MS
        .iter()
        .copied()
        .find(|&b| u128::from(b) >= ms)
        .unwrap_or(DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1]);
    Duration::from_millis(bucket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_is_increasing_with_bounded_steps() {
        for pair in DELAY_LADDER_MS.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[1] * 3 <= pair[0] * 5, "{pair:?}");
        }
    }

    #[test]
    fn a_retry_never_waits_in_a_shorter_bucket() {
        assert_eq!(delay_bucket(Duration::ZERO), Duration::from_millis(50));
        assert_eq!(
            delay_bucket(Duration::from_millis(101)),
            Duration::from_millis(150)
        );
        assert_eq!(
            delay_bucket(Duration::from_millis(150)),
            Duration::from_millis(150)
        );
        assert_eq!(
            delay_bucket(Duration::from_secs(86_400 * 9)),
            Duration::from_secs(86_400)
        );
    }
}
