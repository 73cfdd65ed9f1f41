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

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::EmailAddress;

type HmacSha256 = Hmac<Sha256>;

/// The key of notifications tokens. Every service that issues or checks
/// tokens must hold the same one.
#[derive(Clone, PartialEq, Eq)]
pub struct NotificationKey([u8; 32]);

impl std::fmt::Debug for NotificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotificationKey(…)")
    }
}

/// Why a notifications key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum NotificationKeyError {
    /// The configured key is not 64 hex digits.
    #[error(
        "the notifications token key must be 64 hexadecimal digits (32 bytes); generate one with `openssl rand -hex 32`"
    )]
    Malformed,
    /// The key file could not be read or written.
    #[error("cannot use the notifications key file {path}: {source}; check its permissions")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl NotificationKey {
    /// A fresh random key: for tests, and for services that issue and check
    /// tokens in one process only.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// A key from 64 hex digits (as given in the settings).
    ///
    /// # Errors
    ///
    /// [`NotificationKeyError::Malformed`].
    pub fn from_hex(hex_key: &str) -> Result<Self, NotificationKeyError> {
        let bytes = hex::decode(hex_key.trim()).map_err(|_| NotificationKeyError::Malformed)?;
        Ok(Self(
            bytes
                .try_into()
                .map_err(|_| NotificationKeyError::Malformed)?,
        ))
    }

    /// The key stored in `path`, generated and written there (owner-only,
    /// through a renamed temporary file) on first use, so tokens handed out
    /// stay valid across restarts.
    ///
    /// # Errors
    ///
    /// [`NotificationKeyError::File`] if it cannot be read or created;
    /// [`NotificationKeyError::Malformed`] if the file holds something else.
    pub fn load_or_create(path: &Path) -> Result<Self, NotificationKeyError> {
        let file_error = |source| NotificationKeyError::File {
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => return Self::from_hex(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(e)),
        }
        let key = Self::random();
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(file_error)?;
        file.write_all(hex::encode(key.0).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(file_error)?;
        std::fs::rename(&tmp, path).map_err(file_error)?;
        Ok(key)
    }

    fn mac(&self, email: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
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

    #[test]
    fn keys_are_created_once_owner_only_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notifications.key");
        let k1 = NotificationKey::load_or_create(&path).unwrap();
        let k2 = NotificationKey::load_or_create(&path).unwrap();
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(NotificationKey::from_hex("abc").is_err());
    }
}
