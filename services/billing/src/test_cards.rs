//! The card numbers the [`SimulatedGateway`](crate::SimulatedGateway)
//! answers in a known way.
//!
//! The gateway never sees a number: it decides by the BIN (first six
//! digits) and the last four, which is all a [`CardToken`] keeps. Every
//! number here passes the Luhn check, so the enrollment form accepts it.
//!
//! | number | BIN + last four | the gateway |
//! |---|---|---|
//! | [`APPROVED`] `4242 4242 4242 4242` | 424242 · 4242 | approves |
//! | [`DECLINED`] `4000 0000 0000 0002` | 400000 · 0002 | declines, `card_declined` |
//! | [`INSUFFICIENT_FUNDS`] `4000 0000 0000 9995` | 400000 · 9995 | declines, `insufficient_funds` |
//! | [`TIMEOUT_TWICE`] `4000 0000 0000 0119` | 400000 · 0119 | times out on the first two calls for an idempotency key, then approves |
//! | [`FRAUD_DENY_LISTED`] `4100 0000 0000 0019` | 410000 · 0019 | approves (the anti-fraud service denies it, so a charge made optimistically is refunded) |
//! | any other | | approves |
//!
//! [`CardToken`]: school_events::CardToken

/// Approved.
pub const APPROVED: &str = "4242424242424242";
/// Declined with code `card_declined`.
pub const DECLINED: &str = "4000000000000002";
/// Declined with code `insufficient_funds`.
pub const INSUFFICIENT_FUNDS: &str = "4000000000009995";
/// Times out on the first two charge calls for an idempotency key, then is
/// approved: it shows that retries with the same key work and charge once.
pub const TIMEOUT_TWICE: &str = "4000000000000119";
/// On the anti-fraud deny list; approved by the gateway if charged.
pub const FRAUD_DENY_LISTED: &str = "4100000000000019";

/// The BIN of a test number: its first six digits.
pub fn bin(number: &str) -> &str {
    number.get(..6).unwrap_or(number)
}

/// The last four digits of a test number.
pub fn last4(number: &str) -> &str {
    number
        .get(number.len().saturating_sub(4)..)
        .unwrap_or(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn luhn(number: &str) -> bool {
        let digits: Option<Vec<u32>> = number.chars().map(|c| c.to_digit(10)).collect();
        let Some(digits) = digits else { return false };
        let sum: u32 = digits
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &d)| match (i % 2 == 1, d * 2) {
                (true, doubled) if doubled > 9 => doubled - 9,
                (true, doubled) => doubled,
                (false, _) => d,
            })
            .sum();
        digits.len() >= 12 && sum.is_multiple_of(10)
    }

    #[test]
    fn every_test_card_passes_luhn() {
        for number in [
            APPROVED,
            DECLINED,
            INSUFFICIENT_FUNDS,
            TIMEOUT_TWICE,
            FRAUD_DENY_LISTED,
        ] {
            assert!(luhn(number), "{number}");
            assert_eq!(number.len(), 16, "{number}");
        }
        assert!(!luhn("4242424242424241"), "a changed digit fails");
        assert!(!luhn("4242x42424242424"));
    }

    #[test]
    fn bin_and_last4() {
        assert_eq!(bin(DECLINED), "400000");
        assert_eq!(last4(DECLINED), "0002");
        assert_eq!(last4("12"), "12");
    }
}
