//! The causal context carried from a consumed event into the events
//! published while handling it.
//!
//! The trace layer sets it for the duration of a handler (a tokio
//! task-local); [`Bus`](crate::Bus) stamps it onto every event it publishes.
//! Work spawned onto another task does not inherit it: capture it with
//! [`Context::current`] and re-enter with [`Context::scope`].

use std::future::Future;

use eventos_core::{Event, EventError, TypedEvent, ext};
use rand::Rng;

tokio::task_local! {
    static CURRENT: Context;
}

/// Correlation, causation and W3C trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Shared by every event of one business operation.
    pub correlation_id: String,
    /// The id of the event being handled.
    pub causation_id: Option<String>,
    /// W3C trace id (32 hex digits).
    pub trace_id: String,
    /// W3C span id of this handling (16 hex digits).
    pub span_id: String,
    /// W3C `tracestate`, passed through untouched.
    pub tracestate: Option<String>,
}

/// A random id of `bytes` bytes (8 or 16) as lower-case hex. One draw and
/// one formatting per id: this runs for every delivery.
fn hex_id(bytes: usize) -> String {
    let mut rng = rand::rng();
    loop {
        let v: u128 = rng.random();
        // All-zero ids are invalid in W3C trace context.
        if bytes == 8 {
            let v = v as u64;
            if v != 0 {
                return format!("{v:016x}");
            }
        } else if v != 0 {
            return format!("{v:032x}");
        }
    }
}

/// Parses `00-<trace-id>-<parent-id>-<flags>`, returning the trace id.
fn trace_id_of(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2)
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace != "0".repeat(32))
    .then(|| trace.to_ascii_lowercase())
}

impl Context {
    /// A new operation: fresh correlation id and trace.
    pub fn root() -> Self {
        let trace_id = hex_id(16);
        Self {
            correlation_id: uuid_like(&trace_id),
            causation_id: None,
            trace_id,
            span_id: hex_id(8),
            tracestate: None,
        }
    }

    /// The context for handling `event`: its correlation id (or its id when
    /// it starts an operation), its id as causation, and a child span of its
    /// trace (or a new trace).
    pub fn from_event(event: &Event) -> Self {
        let trace_id = event
            .extension_str(ext::TRACEPARENT)
            .and_then(trace_id_of)
            .unwrap_or_else(|| hex_id(16));
        Self {
            correlation_id: event
                .extension_str(ext::CORRELATION_ID)
                .unwrap_or(event.id())
                .to_owned(),
            causation_id: Some(event.id().to_owned()),
            trace_id,
            span_id: hex_id(8),
            tracestate: event.extension_str(ext::TRACESTATE).map(str::to_owned),
        }
    }

    /// The context of the handler running on this task, if any.
    pub fn current() -> Option<Context> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `fut` with this context current.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// Runs `f` with this context current, for work done synchronously on
    /// another thread on behalf of a handler (a store's writer).
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// A new event for a typed payload from `source`, stamped with the
    /// current context — or, outside any handler, a new operation's. For
    /// events that leave through an outbox rather than a [`Bus`](crate::Bus).
    ///
    /// # Errors
    ///
    /// [`EventError::Data`] if the payload cannot be serialized.
    pub fn new_event<T: TypedEvent>(source: &str, payload: &T) -> Result<Event, EventError> {
        let mut event = Event::from_typed(source, payload)?;
        Context::current()
            .unwrap_or_else(Context::root)
            .apply(&mut event);
        Ok(event)
    }

    /// The W3C `traceparent` for events published in this context.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    /// Stamps the context onto `event`, keeping any value already set.
    pub fn apply(&self, event: &mut Event) {
        let mut set = |name: &str, value: &str| {
            if event.extension(name).is_none() {
                // The names are constants that pass validation.
                let _ = event.set_extension(name, value);
            }
        };
        set(ext::CORRELATION_ID, &self.correlation_id);
        if let Some(causation) = &self.causation_id {
            set(ext::CAUSATION_ID, causation);
        }
        set(ext::TRACEPARENT, &self.traceparent());
        if let Some(state) = &self.tracestate {
            set(ext::TRACESTATE, state);
        }
    }
}

/// Formats a 32-hex-digit id as a UUID string, so a root correlation id
/// reads like every other id in the system.
fn uuid_like(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_keeps_trace_and_correlation() {
        let root = Context::root();
        let mut first = Event::builder("/s", "t").build().unwrap();
        root.apply(&mut first);
        let child = Context::from_event(&first);
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(child.correlation_id, root.correlation_id);
        assert_eq!(child.causation_id.as_deref(), Some(first.id()));
    }

    #[test]
    fn malformed_traceparent_starts_a_new_trace() {
        for bad in [
            "",
            "00-xyz-1-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        assert!(trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }
}
