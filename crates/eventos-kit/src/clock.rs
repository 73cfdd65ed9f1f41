//! The wall clock that retry due times are stamped with. Wall-clock, not
//! monotonic: a stamp outlives the process (in a log segment, a broker
//! header) and is read by another one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, rounded down: a retry stamped by
/// [`due_ms`] is due once this reaches its stamp.
pub fn now_ms() -> i64 {
    to_ms(since_epoch(), false)
}

/// The stamp of a retry due `after` from now. Both are rounded up to the
/// millisecond: [`now_ms`] rounds down, so rounding either down here would
/// hand a retry out up to two milliseconds before its delay had passed.
pub fn due_ms(after: Duration) -> i64 {
    due_at(since_epoch(), after)
}

fn due_at(now: Duration, after: Duration) -> i64 {
    to_ms(now, true).saturating_add(to_ms(after, true))
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn to_ms(d: Duration, up: bool) -> i64 {
    let ms = d.as_millis() + u128::from(up && !d.subsec_nanos().is_multiple_of(1_000_000));
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_stamp_is_never_before_the_delay_has_passed() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        // Sent at 1000.9 ms for 2 s: due at 3001, not 3000, which the
        // clock reads at 3000.0, 1.9991 s later.
        assert_eq!(due_at(us(1_000_900), ms(2000)), 3001);
        assert_eq!(due_at(ms(1000), ms(2000)), 3000);
        assert_eq!(due_at(ms(1000), us(1500)), 1002);
        assert_eq!(due_at(Duration::MAX, ms(1)), i64::MAX);
        for sent in (0..5_000).map(|n| us(n * 7 + 1_000_000)) {
            for after in [Duration::ZERO, us(1), us(999), ms(1), us(1001), ms(2000)] {
                let due = ms(u64::try_from(due_at(sent, after)).expect("positive"));
                assert!(due >= sent + after, "{sent:?} + {after:?} due at {due:?}");
            }
        }
    }

    #[test]
    fn now_is_due_for_what_was_due_now() {
        let stamp = due_ms(Duration::ZERO);
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while now_ms() < stamp {
            assert!(std::time::Instant::now() < deadline, "the clock moves");
            std::hint::spin_loop();
        }
    }
}
