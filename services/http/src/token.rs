//! The notifications token: who may read a student's notifications.
//!
//! The token is an HMAC-SHA256, under a key of the system's, of the
//! student's address as the forms normalize it. The service that accepts a
//! message or an enrollment hands it out in its `202`; the notifier checks
//! it by computing it again. Nothing is stored and no service is asked at
//! read time: every service holding the key can issue and check tokens, and
//! a guess without the key is a guess at 256 bits.
//!
//! The cost of that choice: a token is the same for every message of an
//! address and cannot be revoked alone — changing the key revokes them all.

use hmac::Mac as _;

use crate::EmailAddress;
use crate::key::{HmacSha256, KeyError, SecretKey};

/// The key of notifications tokens. Every service that issues or checks
/// tokens must hold the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationKey(SecretKey);

const WHAT: &str = "notifications token";

impl NotificationKey {
    /// A fresh random key: for tests, and for services that issue and check
    /// tokens in one process only.
    pub fn random() -> Self {
        Self(SecretKey::random())
    }

    /// A key from 64 hex digits (as given in the settings).
    ///
    /// # Errors
    ///
    /// [`KeyError::Malformed`].
    pub fn from_hex(hex_key: &str) -> Result<Self, KeyError> {
        SecretKey::from_hex(WHAT, hex_key).map(Self)
    }

    /// The key stored in `path`, generated there on first use, so tokens
    /// handed out stay valid across restarts.
    ///
    /// # Errors
    ///
    /// As [`SecretKey::load_or_create`].
    pub fn load_or_create(path: &std::path::Path) -> Result<Self, KeyError> {
        SecretKey::load_or_create(WHAT, path).map(Self)
    }

    fn mac(&self, email: &str) -> HmacSha256 {
        let mut mac = self.0.hmac();
        mac.update(b"notifications\0");
        // The notifier files notifications under the lower-cased address.
        mac.update(email.to_ascii_lowercase().as_bytes());
        mac
    }

    /// The token for `email`'s notifications.
    pub fn token(&self, email: &EmailAddress) -> String {
        hex::encode(self.mac(&email.to_string()).finalize().into_bytes())
    }

    /// Whether `token` is `email`'s, compared in constant time.
    pub fn verify(&self, email: &EmailAddress, token: &str) -> bool {
        hex::decode(token.trim())
            .is_ok_and(|bytes| self.mac(&email.to_string()).verify_slice(&bytes).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_belong_to_one_address_and_one_key() {
        let key = NotificationKey::random();
        let ana: EmailAddress = "Ana@Example.com".parse().unwrap();
        let rui: EmailAddress = "rui@example.com".parse().unwrap();
        let token = key.token(&ana);
        assert_eq!(token.len(), 64);
        assert!(key.verify(&ana, &token));
        assert!(key.verify(&"ana@example.com".parse().unwrap(), &token));
        assert!(!key.verify(&rui, &token));
        assert!(!NotificationKey::random().verify(&ana, &token));
        for bad in ["", "zz", &token[..63], &token[..62]] {
            assert!(!key.verify(&ana, bad), "{bad}");
        }
    }
}
