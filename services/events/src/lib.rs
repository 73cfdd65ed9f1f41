//! The events of the reference system and the topics they travel on.
//!
//! Every service depends on this crate and on no other service: the events
//! are the only coupling between them, so they are declared once, here,
//! each with its CloudEvents `type` (versioned: a breaking change is a new
//! `…v2` type, never an edit of `v1`). Card numbers never appear in any of
//! them: enrollment tokenizes at the edge (last four digits and a keyed
//! fingerprint).

use eventos_core::TypedEvent;
use serde::{Deserialize, Serialize};

/// Topic names. One topic per stream of facts; consumers choose their
/// group.
pub mod topics {
    /// Mail to send: [`EmailRequested`](super::EmailRequested).
    pub const MAIL_REQUESTS: &str = "school.mail.requests";
    /// Mail that finally could not be sent: [`EmailFailed`](super::EmailFailed).
    pub const MAIL_FAILURES: &str = "school.mail.failures";
    /// Mail that was sent: [`EmailSent`](super::EmailSent).
    pub const MAIL_SENT: &str = "school.mail.sent";
    /// A mail attempt that failed and will be retried:
    /// [`EmailDeferred`](super::EmailDeferred).
    pub const MAIL_DEFERRED: &str = "school.mail.deferred";
    /// A contact message still not sent after the first window:
    /// [`ContactMessageDelayed`](super::ContactMessageDelayed).
    pub const CONTACT_DELAYED: &str = "school.contact.delayed";

    /// A student asked to enroll and pay:
    /// [`PaymentSubmitted`](super::PaymentSubmitted).
    pub const PAYMENT_SUBMITTED: &str = "school.enrollment.payment_submitted";
    /// The student is enrolled: [`EnrollmentActivated`](super::EnrollmentActivated).
    pub const ENROLLMENT_ACTIVATED: &str = "school.enrollment.activated";
    /// The enrollment was refused or suspended:
    /// [`EnrollmentRejected`](super::EnrollmentRejected).
    pub const ENROLLMENT_REJECTED: &str = "school.enrollment.rejected";
    /// The fraud check passed: [`FraudCheckPassed`](super::FraudCheckPassed).
    pub const FRAUD_PASSED: &str = "school.antifraud.passed";
    /// The fraud check failed: [`FraudCheckFailed`](super::FraudCheckFailed).
    pub const FRAUD_FAILED: &str = "school.antifraud.failed";
    /// Money was taken: [`PaymentCaptured`](super::PaymentCaptured).
    pub const PAYMENT_CAPTURED: &str = "school.billing.captured";
    /// The charge was refused: [`PaymentDeclined`](super::PaymentDeclined).
    pub const PAYMENT_DECLINED: &str = "school.billing.declined";
    /// A capture was given back: [`PaymentRefunded`](super::PaymentRefunded).
    pub const PAYMENT_REFUNDED: &str = "school.billing.refunded";
}

/// Why a mail is sent; decides what the notifier does if it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailPurpose {
    /// A contact-form message, to the school.
    ContactMessage,
    /// A notice to a student (activation, rejection, payment failure, a
    /// failed contact message). Its own failure is recorded, not retold.
    StudentNotice,
}

/// A mail to send. The mailer sends it (retrying transient failures) or
/// dead-letters it and emits [`EmailFailed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailRequested {
    /// Idempotency key of the mail (the mailer sends each at most once it
    /// knows of); also the `Message-ID` local part.
    pub mail_id: String,
    /// What it is for.
    pub purpose: MailPurpose,
    /// The entity it is about (contact message id, enrollment id).
    pub about: String,
    /// Recipient address.
    pub to: String,
    /// Address replies go to, if not the sender.
    pub reply_to: Option<String>,
    /// The person the mail concerns, who is told if it cannot be sent.
    pub requester_email: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

impl TypedEvent for EmailRequested {
    const TYPE: &'static str = "school.mail.email_requested.v1";
    fn subject(&self) -> Option<String> {
        Some(self.about.clone())
    }
}

/// A mail went out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSent {
    /// The mail.
    pub mail_id: String,
    /// The entity it is about.
    pub about: String,
    /// Which attempt sent it.
    pub attempt: u32,
}

impl TypedEvent for EmailSent {
    const TYPE: &'static str = "school.mail.email_sent.v1";
    fn subject(&self) -> Option<String> {
        Some(self.about.clone())
    }
}

/// A mail finally could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailFailed {
    /// The mail.
    pub mail_id: String,
    /// What it was for.
    pub purpose: MailPurpose,
    /// The entity it was about.
    pub about: String,
    /// The person to tell.
    pub requester_email: String,
    /// The subject of the mail that failed.
    pub subject: String,
    /// Why it was given up.
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
}

impl TypedEvent for EmailFailed {
    const TYPE: &'static str = "school.mail.email_failed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.about.clone())
    }
}

/// A mail attempt failed transiently; the mailer will try again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailDeferred {
    /// The mail.
    pub mail_id: String,
    /// The entity it is about.
    pub about: String,
    /// The attempt that failed.
    pub attempt: u32,
    /// Why it failed (the server's answer or the connection error).
    pub error: String,
    /// The next attempt comes within this many milliseconds (the retry
    /// policy's ceiling for this attempt; the actual pause is jittered
    /// below it). It grows with each attempt, up to the policy's cap.
    pub retry_within_ms: u64,
}

impl TypedEvent for EmailDeferred {
    const TYPE: &'static str = "school.mail.email_deferred.v1";
    fn subject(&self) -> Option<String> {
        Some(self.about.clone())
    }
}

/// A contact message has not reached the school within the first window
/// and is still being tried: the sender can be told, honestly, that it is
/// late and not lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactMessageDelayed {
    /// The message.
    pub message_id: String,
    /// Who sent it.
    pub email: String,
    /// Its subject.
    pub subject: String,
    /// How long it has been waiting, ms.
    pub waiting_ms: u64,
}

impl TypedEvent for ContactMessageDelayed {
    const TYPE: &'static str = "school.contact.message_delayed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.message_id.clone())
    }
}

/// How the school answers an enrollment request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptanceMode {
    /// "Your payment is being processed": active only once the fraud check
    /// passed and the charge was captured (billing charges after the check).
    #[default]
    AwaitPayment,
    /// Enrolled at once; the fraud check and the charge run behind the
    /// scenes (billing charges at once), and a later failure suspends the
    /// enrollment.
    Optimistic,
}

/// A card as the system knows it after tokenization at the edge: never the
/// number, never the CVV.
///
/// The first six digits (the BIN, which names the issuer) and the last four
/// are what PCI DSS allows to be kept in the clear; with six digits unknown
/// and the fingerprint keyed, the number cannot be rebuilt from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardToken {
    /// Issuer identification number: the first six digits.
    pub bin: String,
    /// The last four digits.
    pub last4: String,
    /// HMAC-SHA256 of the number under the school's fingerprint key, hex:
    /// the same card always gives the same fingerprint, and without the key
    /// it says nothing about the number.
    pub fingerprint: String,
    /// Card brand guessed from the BIN (`visa`, `mastercard`, `amex`, …).
    pub brand: String,
    /// Expiry month, 1–12.
    pub expiry_month: u8,
    /// Expiry year, four digits.
    pub expiry_year: u16,
}

/// What is to be charged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentDetails {
    /// The amount in the currency's minor unit (cents).
    pub amount_cents: u64,
    /// ISO 4217 code, upper case.
    pub currency: String,
    /// The card holder's name as written on the card.
    pub holder: String,
    /// The tokenized card.
    pub card: CardToken,
}

/// The student, as they gave themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Student {
    /// Full name.
    pub name: String,
    /// E-mail address (trimmed, as given).
    pub email: String,
}

/// A student asked to enroll in a course and pay for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSubmitted {
    /// The enrollment (also the charge's idempotency key).
    pub enrollment_id: String,
    /// Who.
    pub student: Student,
    /// Which course.
    pub course_id: String,
    /// What to charge.
    pub payment: PaymentDetails,
    /// How the enrollment was accepted; billing charges at once when
    /// optimistic, after the fraud check otherwise.
    pub mode: AcceptanceMode,
    /// When the request was accepted, ms since the Unix epoch.
    pub submitted_at_ms: i64,
}

impl TypedEvent for PaymentSubmitted {
    const TYPE: &'static str = "school.enrollment.payment_submitted.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The fraud check found nothing worrying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudCheckPassed {
    /// The enrollment.
    pub enrollment_id: String,
    /// The risk score, 0 (none) to 100 and more.
    pub score: u32,
    /// The rules that added to the score, if any.
    pub reasons: Vec<String>,
    /// The payment that was checked, so billing can charge it.
    pub payment: PaymentDetails,
    /// As submitted.
    pub mode: AcceptanceMode,
}

impl TypedEvent for FraudCheckPassed {
    const TYPE: &'static str = "school.antifraud.fraud_check_passed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The fraud check refused the payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FraudCheckFailed {
    /// The enrollment.
    pub enrollment_id: String,
    /// The risk score (at or above the threshold).
    pub score: u32,
    /// Why, one line per rule that fired.
    pub reasons: Vec<String>,
    /// As submitted.
    pub mode: AcceptanceMode,
}

impl TypedEvent for FraudCheckFailed {
    const TYPE: &'static str = "school.antifraud.fraud_check_failed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The gateway captured the charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentCaptured {
    /// The enrollment.
    pub enrollment_id: String,
    /// The gateway's id of the charge.
    pub charge_id: String,
    /// Amount captured, minor units.
    pub amount_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Which delivery attempt of billing captured it.
    pub attempt: u32,
}

impl TypedEvent for PaymentCaptured {
    const TYPE: &'static str = "school.billing.payment_captured.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The gateway refused the charge (or could not be reached in time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentDeclined {
    /// The enrollment.
    pub enrollment_id: String,
    /// A stable code: `card_declined`, `insufficient_funds`,
    /// `gateway_unavailable`, ….
    pub code: String,
    /// What to tell the student.
    pub reason: String,
    /// Amount that was asked, minor units.
    pub amount_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Which delivery attempt of billing gave up.
    pub attempt: u32,
}

impl TypedEvent for PaymentDeclined {
    const TYPE: &'static str = "school.billing.payment_declined.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// A captured charge was given back (compensation for a late fraud signal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRefunded {
    /// The enrollment.
    pub enrollment_id: String,
    /// The charge refunded.
    pub charge_id: String,
    /// Amount refunded, minor units.
    pub amount_cents: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Why.
    pub reason: String,
}

impl TypedEvent for PaymentRefunded {
    const TYPE: &'static str = "school.billing.payment_refunded.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The student is enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentActivated {
    /// The enrollment.
    pub enrollment_id: String,
    /// Which course.
    pub course_id: String,
    /// How it was accepted.
    pub mode: AcceptanceMode,
    /// When it was requested, ms since the Unix epoch.
    pub submitted_at_ms: i64,
    /// When it became active.
    pub activated_at_ms: i64,
}

impl TypedEvent for EnrollmentActivated {
    const TYPE: &'static str = "school.enrollment.enrollment_activated.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

/// The enrollment was refused (`rejected`, `payment_failed`) or, after
/// optimistic acceptance, `suspended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRejected {
    /// The enrollment.
    pub enrollment_id: String,
    /// The status it ended in.
    pub status: String,
    /// Why.
    pub reason: String,
}

impl TypedEvent for EnrollmentRejected {
    const TYPE: &'static str = "school.enrollment.enrollment_rejected.v1";
    fn subject(&self) -> Option<String> {
        Some(self.enrollment_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_versioned_and_unique() {
        let types = [
            EmailRequested::TYPE,
            EmailSent::TYPE,
            EmailFailed::TYPE,
            EmailDeferred::TYPE,
            PaymentSubmitted::TYPE,
            FraudCheckPassed::TYPE,
            FraudCheckFailed::TYPE,
            PaymentCaptured::TYPE,
            PaymentDeclined::TYPE,
            PaymentRefunded::TYPE,
            EnrollmentActivated::TYPE,
            EnrollmentRejected::TYPE,
        ];
        for t in types {
            assert!(t.starts_with("school.") && t.ends_with(".v1"), "{t}");
        }
        let unique: std::collections::HashSet<_> = types.iter().collect();
        assert_eq!(unique.len(), types.len());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"mail_id":"m","purpose":"contact_message","about":"c","to":"a@b.c","reply_to":null,"requester_email":"s@b.c","subject":"s","body":"b","card":"4111"}"#;
        assert!(serde_json::from_str::<EmailRequested>(json).is_err());
    }
}
