//! What a handler returns when it fails.

use std::fmt;
use std::time::Duration;

/// A boxed error, the currency of handler failures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A timeout, a conflict, a refusal for now: retry with backoff.
    Transient,
    /// A dependency every delivery needs is down (connection refused, no
    /// route, the service says it is unavailable): transient, and what a
    /// [`CircuitBreakerLayer`](crate::middleware::CircuitBreakerLayer)
    /// counts. The failure is the dependency's, not the message's.
    Unavailable,
    /// Bad input, a broken invariant: retrying cannot help; dead-letter now.
    Permanent,
}

/// A handler failure, with what the middleware decided about it.
///
/// Handlers create one with [`HandlerError::transient`] or
/// [`HandlerError::permanent`] (or [`ResultExt`]); the retry layer fills in
/// [`HandlerError::retry_after`], and the router turns the final error into
/// an [`Outcome`](eventos_core::Outcome).
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    source: BoxError,
    retry_after: Option<Duration>,
    reason: Option<String>,
}

impl HandlerError {
    /// A failure that may go away if retried.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transient, source)
    }

    /// A failure because a dependency every delivery needs is down: retried
    /// like [`HandlerError::transient`], and counted by the circuit breaker.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Unavailable, source)
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Permanent, source)
    }

    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
            retry_after: None,
            reason: None,
        }
    }

    /// Transient, unavailable or permanent.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying may help: transient and unavailable failures.
    pub fn is_transient(&self) -> bool {
        self.kind != ErrorKind::Permanent
    }

    /// Whether a dependency every delivery needs is down.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The underlying error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The delay the retry policy chose, if the delivery is to be retried.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Schedules a retry after `delay`: the retry layer's decision, so no
    /// handler can bypass the route's policy.
    pub(crate) fn set_retry_after(&mut self, delay: Option<Duration>) {
        self.retry_after = delay;
    }

    /// Why the delivery is being given up, if decided.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// Records why the delivery is being given up (the retry layer's).
    pub(crate) fn set_reason(&mut self, reason: impl Into<String>) {
        self.reason = Some(reason.into());
    }
}

/// Transparent: it says what the handler's error says, and its causes
/// are that error's, so a chain printer says each once.
impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<eventos_core::EventError> for HandlerError {
    /// An event that cannot be decoded will not decode on retry.
    fn from(e: eventos_core::EventError) -> Self {
        HandlerError::permanent(e)
    }
}

impl From<eventos_core::TransportError> for HandlerError {
    /// Publishing from a handler failed; transient unless the transport says
    /// otherwise.
    fn from(e: eventos_core::TransportError) -> Self {
        let kind = if e.is_transient() {
            ErrorKind::Transient
        } else {
            ErrorKind::Permanent
        };
        HandlerError::new(kind, e)
    }
}

/// Classifies the error of a `Result` for a handler.
///
/// ```
/// use eventos::ResultExt;
/// fn parse(s: &str) -> Result<u32, eventos::HandlerError> {
///     s.parse::<u32>().permanent()
/// }
/// assert!(!parse("x").unwrap_err().is_transient());
/// ```
pub trait ResultExt<T> {
    /// Maps the error to a transient [`HandlerError`].
    ///
    /// # Errors
    ///
    /// The original error, classified as transient.
    fn transient(self) -> Result<T, HandlerError>;
    /// Maps the error to a permanent [`HandlerError`].
    ///
    /// # Errors
    ///
    /// The original error, classified as permanent.
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_error_is_transparent_so_each_cause_is_said_once() {
        let transport = eventos_core::TransportError::new(
            eventos_core::TransportErrorKind::Unavailable,
            "broker unreachable",
        )
        .with_source(std::io::Error::other("connection refused"));
        let e = HandlerError::from(transport);
        assert_eq!(e.to_string(), "broker unreachable");
        let chain = eventos_core::ErrorChain(&e).to_string();
        assert_eq!(chain, "broker unreachable: connection refused");
    }
}
