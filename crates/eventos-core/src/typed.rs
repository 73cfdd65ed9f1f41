//! Typed events: a payload type declares its CloudEvents `type` once.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::EventError;
use crate::event::Event;

/// A payload type with a fixed CloudEvents `type`.
///
/// ```
/// use eventos_core::{Event, TypedEvent};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct PaymentSubmitted { enrollment_id: String, amount_cents: u64 }
///
/// impl TypedEvent for PaymentSubmitted {
///     const TYPE: &'static str = "school.enrollment.payment_submitted.v1";
///     fn subject(&self) -> Option<String> { Some(self.enrollment_id.clone()) }
/// }
///
/// let ev = Event::from_typed("/enrollment", &PaymentSubmitted {
///     enrollment_id: "e-1".into(), amount_cents: 1000,
/// }).unwrap();
/// assert_eq!(ev.ty(), PaymentSubmitted::TYPE);
/// assert_eq!(ev.subject(), Some("e-1"));
/// let back: PaymentSubmitted = ev.decode().unwrap();
/// assert_eq!(back.amount_cents, 1000);
/// ```
pub trait TypedEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`; by convention `<org>.<service>.<event>.v<N>`.
    const TYPE: &'static str;

    /// The `subject` (entity key, ordering key) of this occurrence.
    fn subject(&self) -> Option<String> {
        None
    }
}

impl Event {
    /// Wraps a typed payload in a new event (JSON data, fresh id and time).
    ///
    /// # Errors
    ///
    /// [`EventError::Data`] if the payload cannot be serialized.
    pub fn from_typed<T: TypedEvent>(
        source: impl Into<String>,
        payload: &T,
    ) -> Result<Event, EventError> {
        let mut builder = Event::builder(source, T::TYPE).json(payload)?;
        if let Some(subject) = payload.subject() {
            builder = builder.subject(subject);
        }
        builder.build()
    }

    /// Decodes the payload as `T`, checking the event's `type` first.
    ///
    /// # Errors
    ///
    /// [`EventError::TypeMismatch`] if the event is of another type;
    /// [`EventError::Data`] if the payload does not fit `T`.
    pub fn decode<T: TypedEvent>(&self) -> Result<T, EventError> {
        if self.ty != T::TYPE {
            return Err(EventError::TypeMismatch {
                expected: T::TYPE,
                found: self.ty.clone(),
            });
        }
        self.decode_data()
    }

    /// Decodes the JSON payload as any deserializable type, whatever the
    /// event's `type`. An absent payload decodes as JSON `null`.
    ///
    /// # Errors
    ///
    /// [`EventError::Data`] if the payload is not JSON of that shape.
    pub fn decode_data<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        let data = self.data.as_deref().unwrap_or(b"null");
        serde_json::from_slice(data).map_err(EventError::Data)
    }
}
