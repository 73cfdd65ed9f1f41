//! Exponential backoff with full jitter, capped.

use std::time::Duration;

use rand::Rng;

/// How long to wait before each retry, and how many attempts to make.
///
/// The delay before attempt `n + 1` is drawn uniformly from
/// `[0, min(cap, base · 2ⁿ⁻¹)]` ("full jitter"): spreading retries over the
/// whole window is what keeps a fleet of consumers from retrying in lockstep
/// against a dependency that just recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay exceeds this.
    pub cap: Duration,
    /// Total attempts, the first delivery included (at least 1).
    pub max_attempts: u32,
}

impl Default for Backoff {
    /// 5 attempts, delays up to 200 ms, 400 ms, 800 ms, 1.6 s; capped at 30 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl Backoff {
    /// A policy with the given base, cap and attempts.
    pub fn new(base: Duration, cap: Duration, max_attempts: u32) -> Self {
        Self {
            base,
            cap,
            max_attempts: max_attempts.max(1),
        }
    }

    /// How many attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The upper bound of the delay after failed attempt `attempt`
    /// (1-based): `min(cap, base · 2^(attempt-1))`, without overflow.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(63);
        let factor = 1u128 << exp;
        let nanos = self.base.as_nanos().saturating_mul(factor);
        let cap = self.cap.as_nanos();
        let nanos = nanos.min(cap);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// A delay after failed attempt `attempt`, or `None` once `attempt`
    /// reaches `max_attempts`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(rng.random_range(0..=nanos)))
    }
}
