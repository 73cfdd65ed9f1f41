//! What `POST /enrollments` takes and what the endpoints answer.

use super::*;

/// The body of `POST /enrollments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollment {
    /// Who enrolls.
    pub student: NewStudent,
    /// In which course.
    pub course_id: String,
    /// How they pay.
    pub payment: NewPayment,
}

/// The student part of the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStudent {
    /// Full name.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

/// The payment part of the request. It holds the card: it lives only for
/// the request and is dropped once tokenized.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    /// The card number (spaces and dashes allowed).
    pub card_number: String,
    /// `MM/YY` or `MM/YYYY`.
    pub expiry: String,
    /// Three or four digits.
    pub cvv: String,
    /// The name on the card.
    pub holder: String,
    /// Amount in the currency's minor unit, 1 to [`MAX_AMOUNT_CENTS`].
    pub amount_cents: u64,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
}

impl std::fmt::Debug for NewPayment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPayment")
            .field("holder", &self.holder)
            .field("amount_cents", &self.amount_cents)
            .field("currency", &self.currency)
            .finish_non_exhaustive()
    }
}

/// The answer to `POST /enrollments`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Accepted {
    /// The enrollment's id.
    pub id: String,
    /// `payment_processing` (await_payment) or `active` (optimistic), or the
    /// current status when an idempotent request is replayed.
    pub status: String,
    /// What to tell the student.
    pub message: String,
    /// What reads the student's notifications
    /// (`GET /notifications?email=…&token=…`).
    pub notifications_token: String,
}

/// The payment as `GET /enrollments/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PaymentView {
    /// Minor units.
    pub amount_cents: u64,
    /// ISO 4217.
    pub currency: String,
    /// Card brand.
    pub card_brand: String,
    /// The last four digits.
    pub card_last4: String,
    /// `pending`, `captured`, `declined`, `refunded`.
    pub status: String,
}

/// The answer to `GET /enrollments/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollmentView {
    /// The id.
    pub id: String,
    /// `payment_processing`, `active`, `rejected`, `payment_failed` or
    /// `suspended`.
    pub status: String,
    /// How it was accepted.
    pub mode: AcceptanceMode,
    /// The course.
    pub course_id: String,
    /// The student.
    pub student: Student,
    /// The payment.
    pub payment: PaymentView,
    /// Why it was rejected or suspended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// What happened, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// A change streamed by `GET /enrollments/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Change {
    /// The enrollment.
    pub id: String,
    /// Its status after the change.
    pub status: String,
    /// What happened.
    pub entry: TimelineEntry,
}
