//! Typed errors: one for the envelope, one for transports.

use std::fmt;

/// Why an event could not be built, encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// A required attribute is absent (or empty).
    #[error("missing required attribute `{0}`")]
    MissingAttribute(&'static str),
    /// An attribute has the wrong JSON type or an unparseable value.
    #[error("attribute `{name}` is invalid: {reason}")]
    InvalidAttribute {
        /// The attribute's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `specversion` is not `1.0`.
    #[error("unsupported specversion `{0}`: eventos reads CloudEvents 1.0")]
    UnsupportedSpecVersion(String),
    /// An extension name breaks the CloudEvents naming rule.
    #[error(
        "invalid extension name `{0}`: use 1-20 lower-case ASCII letters or digits, not a context attribute name"
    )]
    InvalidExtensionName(String),
    /// The structured-mode document is not a JSON object.
    #[error("not a CloudEvents JSON document: {0}")]
    Json(#[source] serde_json::Error),
    /// The payload could not be (de)serialized as the expected type.
    #[error("event data does not match the expected shape: {0}")]
    Data(#[source] serde_json::Error),
    /// `data_base64` is not valid base64.
    #[error("attribute `data_base64` is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// A typed decode met an event of another type.
    #[error("event type is `{found}`, expected `{expected}`")]
    TypeMismatch {
        /// The type the caller asked for.
        expected: &'static str,
        /// The event's `type`.
        found: String,
    },
}

/// What kind of failure a [`TransportError`] is; decides whether retrying can
/// help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The transport (or this subscription) was closed; nothing more will
    /// succeed on it.
    Closed,
    /// The broker or storage is unreachable right now; retry later.
    Unavailable,
    /// A topic or group name breaks the naming rule.
    InvalidName,
    /// The transport refused the event (too large, unencodable); retrying
    /// the same event will not help.
    Rejected,
    /// Local I/O failed.
    Io,
    /// The delivery was already settled, or its lease expired.
    Settled,
    /// The transport cannot do this at all (see its [`Capabilities`](crate::Capabilities)).
    Unsupported,
    /// Anything else.
    Other,
}

impl TransportErrorKind {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Io | Self::Other)
    }
}

/// A failure of a transport operation, with a [`kind`](Self::kind) that says
/// whether retrying can help.
#[derive(Debug)]
pub struct TransportError {
    kind: TransportErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl TransportError {
    /// A new error of `kind`.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The transport was closed.
    pub fn closed() -> Self {
        Self::new(TransportErrorKind::Closed, "transport is closed")
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }

    /// Whether retrying the operation later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// The message only: the cause is [`source`](std::error::Error::source)'s
/// to give, so a chain printer (`{:#}` of anyhow, [`ErrorChain`]) says it
/// once.
impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Shows an error and every cause it does not already say, as one line
/// (`error: cause: cause`), for log fields and messages.
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !said.contains(&text) {
                write!(f, ": {text}")?;
                said.push_str(&text);
            }
            source = cause.source();
        }
        Ok(())
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for TransportError {
    fn from(e: std::io::Error) -> Self {
        TransportError::new(TransportErrorKind::Io, "i/o error").with_source(e)
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[test]
    fn a_cause_is_said_once() {
        let e = TransportError::new(TransportErrorKind::Io, "cannot read topic `t`")
            .with_source(std::io::Error::other("disk on fire"));
        assert_eq!(e.to_string(), "cannot read topic `t`");
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot read topic `t`: disk on fire"
        );
        // A message that already says its cause is not repeated.
        let said = TransportError::new(TransportErrorKind::Io, "i/o: disk on fire")
            .with_source(std::io::Error::other("disk on fire"));
        assert_eq!(ErrorChain(&said).to_string(), "i/o: disk on fire");
    }
}
