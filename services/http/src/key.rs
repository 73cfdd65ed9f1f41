//! A secret key that must outlive the process: given in the settings as
//! 64 hex digits, or generated once into a file of the data directory.
//! The card fingerprints and the notifications tokens are both HMACs
//! under such a key; losing it would change every fingerprint and revoke
//! every token, so it is written whole or not at all.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// HMAC-SHA256, what every key here signs with.
pub type HmacSha256 = Hmac<Sha256>;

/// 32 secret bytes. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

/// Why a key could not be had; `what` names the key, e.g. `card
/// fingerprint`.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured key is not 64 hex digits.
    #[error(
        "the {what} key must be 64 hexadecimal digits (32 bytes); generate one with `openssl rand -hex 32`"
    )]
    Malformed {
        /// Which key.
        what: &'static str,
    },
    /// The key file could not be read or written.
    #[error("cannot use the {what} key file {path}: {source}; check its permissions")]
    File {
        /// Which key.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl SecretKey {
    /// A fresh random key.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The `what` key from 64 hex digits (as given in the settings).
    ///
    /// # Errors
    ///
    /// [`KeyError::Malformed`].
    pub fn from_hex(what: &'static str, hex_key: &str) -> Result<Self, KeyError> {
        let malformed = || KeyError::Malformed { what };
        let bytes = hex::decode(hex_key.trim()).map_err(|_| malformed())?;
        Ok(Self(bytes.try_into().map_err(|_| malformed())?))
    }

    /// The `what` key stored in `path`, generated and written there on
    /// first use: owner-only (0600), through a temporary file renamed over
    /// it, so a crash leaves no key or the whole key, never half of one.
    ///
    /// # Errors
    ///
    /// [`KeyError::File`] if it cannot be read or created;
    /// [`KeyError::Malformed`] if the file holds something else.
    pub fn load_or_create(what: &'static str, path: &Path) -> Result<Self, KeyError> {
        let file_error = |source| KeyError::File {
            what,
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => return Self::from_hex(what, &text),
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

    /// An HMAC under this key, to feed and finish.
    pub fn hmac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; 32 bytes is always fine.
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_owner_only_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("some.key");
        let k1 = SecretKey::load_or_create("test", &path).unwrap();
        let k2 = SecretKey::load_or_create("test", &path).unwrap();
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = SecretKey::from_hex("card fingerprint", "abc").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the card fingerprint key must be 64"),
            "{err}"
        );
        assert!(!format!("{k1:?}").contains(&hex::encode(k1.0)));
    }
}
