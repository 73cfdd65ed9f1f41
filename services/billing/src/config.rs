//! How billing is configured.

use std::time::Duration;

use eventos::Backoff;
use serde::{Deserialize, Serialize};

/// Billing's settings: the `[billing]` section of the system's TOML file.
/// Every field has a default, and an unknown field is an error (a typo
/// must not silently fall back to a default).
///
/// ```
/// let config: school_billing::BillingConfig =
///     toml::from_str("max_attempts = 3\ngateway_latency_ms = [0, 0]").unwrap();
/// assert_eq!(config.max_attempts, 3);
/// assert_eq!(config.retry_base_ms, 500);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    /// The ceiling of the first retry delay, ms (default 500).
    pub retry_base_ms: u64,
    /// No retry delay exceeds this, ms (default 10 000).
    pub retry_cap_ms: u64,
    /// Attempts at a charge before it is given up as
    /// `gateway_unavailable`, the first included (default 8).
    pub max_attempts: u32,
    /// The limit of one attempt, gateway call included, ms (default
    /// 10 000). A timed-out attempt is retried with the same idempotency
    /// key, so it cannot charge twice.
    pub attempt_timeout_ms: u64,
    /// The simulated gateway's latency, drawn uniformly from this range,
    /// ms (default `[100, 300]`).
    pub gateway_latency_ms: [u64; 2],
    /// Where the simulated gateway keeps its ledger. Unset: `gateway.db` in
    /// the data directory. Billing workers in several processes share one
    /// file, as they would share one real gateway: its idempotency keys
    /// are what keeps a charge single across them.
    pub gateway_ledger: Option<std::path::PathBuf>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            retry_base_ms: 500,
            retry_cap_ms: 10_000,
            max_attempts: 8,
            attempt_timeout_ms: 10_000,
            gateway_latency_ms: [100, 300],
            gateway_ledger: None,
        }
    }
}

impl BillingConfig {
    /// The retry policy of billing's routes.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_millis(self.retry_base_ms),
            Duration::from_millis(self.retry_cap_ms),
            self.max_attempts,
        )
    }

    /// The limit of one attempt.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_fields_are_refused() {
        let config = BillingConfig::default();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<BillingConfig>(&text).unwrap(), config);
        assert_eq!(toml::from_str::<BillingConfig>("").unwrap(), config);
        let err = toml::from_str::<BillingConfig>("max_attemps = 3").unwrap_err();
        assert!(err.to_string().contains("max_attemps"), "{err}");
        assert_eq!(config.backoff().max_attempts, 8);
        assert_eq!(config.attempt_timeout(), Duration::from_secs(10));
    }
}
