//! Card data at the edge: checked, then reduced to a token before anything
//! is stored, logged or emitted.

use std::path::Path;

use hmac::Mac as _;
use school_events::CardToken;
pub use school_http::KeyError;
use school_http::SecretKey;

/// The key of card fingerprints (HMAC-SHA256). Without it a fingerprint
/// says nothing about the number; with it, the same card always gives the
/// same fingerprint, which is what velocity rules need.
#[derive(Debug, Clone)]
pub struct FingerprintKey(SecretKey);

const WHAT: &str = "card fingerprint";

impl FingerprintKey {
    /// A key from 64 hex digits (as given in the config file).
    ///
    /// # Errors
    ///
    /// [`KeyError::Malformed`].
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        SecretKey::from_hex(WHAT, hex_key).map(Self)
    }

    /// The key stored in `path`, generated there (owner-only) on first
    /// use, so fingerprints stay stable across restarts.
    ///
    /// # Errors
    ///
    /// As [`SecretKey::load_or_create`].
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        SecretKey::load_or_create(WHAT, path).map(Self)
    }

    fn fingerprint(&self, digits: &str) -> String {
        let mut mac = self.0.hmac();
        mac.update(digits.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// A keyed digest of arbitrary bytes (for request fingerprints that must
    /// not be reversible by guessing the card number in them).
    pub fn digest(&self, bytes: &[u8]) -> String {
        let mut mac = self.0.hmac();
        mac.update(b"request\0");
        mac.update(bytes);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The digits of a card number, with spaces and dashes removed, if it has
/// 12 to 19 of them and nothing else.
pub(crate) fn digits(number: &str) -> Option<String> {
    let digits: String = number.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    ((12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
        .then_some(digits)
}

/// The Luhn (mod 10) check every card number carries.
pub fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, b) in digits.bytes().rev().enumerate() {
        if !b.is_ascii_digit() {
            return false;
        }
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum % 10 == 0
}

/// `MM/YY` or `MM/YYYY` as (month, four-digit year).
pub(crate) fn expiry(text: &str) -> Option<(u8, u16)> {
    let (m, y) = text.trim().split_once('/')?;
    let month: u8 = m.trim().parse().ok()?;
    let y = y.trim();
    let year: u16 = match y.len() {
        2 => 2000 + y.parse::<u16>().ok()?,
        4 => y.parse().ok()?,
        _ => return None,
    };
    (1..=12).contains(&month).then_some((month, year))
}

/// A card is valid through the last day of its expiry month.
pub(crate) fn expired(month: u8, year: u16, now: chrono::DateTime<chrono::Utc>) -> bool {
    use chrono::Datelike as _;
    let now_year = u16::try_from(now.year()).unwrap_or(u16::MAX);
    let now_month = u8::try_from(now.month()).unwrap_or(12);
    (year, month) < (now_year, now_month)
}

/// A CVV is three digits, or four (American Express).
pub(crate) fn cvv_ok(cvv: &str) -> bool {
    (3..=4).contains(&cvv.len()) && cvv.bytes().all(|b| b.is_ascii_digit())
}

fn brand(digits: &str) -> &'static str {
    let prefix = |n: usize| digits.get(..n).and_then(|p| p.parse::<u32>().ok());
    match (prefix(1), prefix(2), prefix(4)) {
        (Some(4), _, _) => "visa",
        (_, Some(34 | 37), _) => "amex",
        (_, Some(51..=55), _) | (_, _, Some(2221..=2720)) => "mastercard",
        (_, _, Some(6011)) | (_, Some(65), _) => "discover",
        (_, _, Some(3528..=3589)) => "jcb",
        _ => "other",
    }
}

/// Reduces a checked card to what the system may keep: BIN, last four,
/// keyed fingerprint, brand and expiry.
pub(crate) fn tokenize(key: &FingerprintKey, digits: &str, month: u8, year: u16) -> CardToken {
    CardToken {
        bin: digits[..6].to_owned(),
        last4: digits[digits.len() - 4..].to_owned(),
        fingerprint: key.fingerprint(digits),
        brand: brand(digits).to_owned(),
        expiry_month: month,
        expiry_year: year,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_valid_numbers_and_refuses_one_digit_off() {
        for ok in [
            "4242424242424242",
            "4000000000000002",
            "5555555555554444",
            "378282246310005",
        ] {
            assert!(luhn(ok), "{ok}");
        }
        for bad in ["4242424242424241", "1234567812345678", ""] {
            assert!(!luhn(bad), "{bad}");
        }
    }

    #[test]
    fn digits_strip_separators_only() {
        assert_eq!(
            digits("4242 4242-4242 4242").as_deref(),
            Some("4242424242424242")
        );
        assert_eq!(digits("4242x4242424242424"), None);
        assert_eq!(digits("42424242424"), None);
    }

    #[test]
    fn expiry_forms_and_the_last_valid_month() {
        assert_eq!(expiry("12/30"), Some((12, 2030)));
        assert_eq!(expiry("01/2031"), Some((1, 2031)));
        assert_eq!(expiry("13/30"), None);
        assert_eq!(expiry("1230"), None);
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
            .unwrap()
            .to_utc();
        assert!(!expired(11, 2026, now));
        assert!(expired(10, 2026, now));
        assert!(expired(12, 2025, now));
    }

    #[test]
    fn tokens_keep_no_number_and_depend_on_the_key() {
        let a = FingerprintKey::from_hex(&"01".repeat(32)).unwrap();
        let b = FingerprintKey::from_hex(&"02".repeat(32)).unwrap();
        let t = tokenize(&a, "4242424242424242", 12, 2030);
        assert_eq!(
            (t.bin.as_str(), t.last4.as_str(), t.brand.as_str()),
            ("424242", "4242", "visa")
        );
        assert!(
            !serde_json::to_string(&t)
                .unwrap()
                .contains("4242424242424242")
        );
        assert_eq!(
            t.fingerprint,
            tokenize(&a, "4242424242424242", 1, 2031).fingerprint
        );
        assert_ne!(
            t.fingerprint,
            tokenize(&b, "4242424242424242", 12, 2030).fingerprint
        );
    }

    #[test]
    fn keys_are_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.key");
        let k1 = FingerprintKey::load_or_create(&path).unwrap();
        let k2 = FingerprintKey::load_or_create(&path).unwrap();
        assert_eq!(k1.0, k2.0);
        assert!(FingerprintKey::from_hex("abc").is_err());
    }
}
