//! The state machine: what a verdict does to an enrollment, what each
//! status tells the student, and the mail it sends.

use super::*;

/// Where an enrollment stands. Stored and shown as its snake-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted; waiting for the fraud check and the charge
    /// (`await_payment`).
    PaymentProcessing,
    /// Enrolled.
    Active,
    /// Refused by the fraud check.
    Rejected,
    /// The charge was declined.
    PaymentFailed,
    /// Enrolled at once (`optimistic`), then the fraud check or the charge
    /// failed.
    Suspended,
}

impl Status {
    /// Every status, in the order an enrollment can reach them.
    pub const ALL: [Status; 5] = [
        Status::PaymentProcessing,
        Status::Active,
        Status::Rejected,
        Status::PaymentFailed,
        Status::Suspended,
    ];

    /// Its name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::PaymentProcessing => "payment_processing",
            Status::Active => "active",
            Status::Rejected => "rejected",
            Status::PaymentFailed => "payment_failed",
            Status::Suspended => "suspended",
        }
    }

    /// The status named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// What the student is told about it.
    pub fn message(self) -> &'static str {
        match self {
            Status::PaymentProcessing => {
                "your payment is being processed; we will e-mail you the outcome"
            }
            Status::Active => "you are enrolled; we will e-mail you the details",
            Status::Rejected => "the payment was refused by our fraud checks",
            Status::PaymentFailed => "the payment could not be taken",
            Status::Suspended => "the enrollment is suspended: the payment could not be confirmed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl rusqlite::types::FromSql for Status {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let name = value.as_str()?;
        Status::parse(name).ok_or_else(|| {
            rusqlite::types::FromSqlError::Other(
                format!("unknown enrollment status {name:?}").into(),
            )
        })
    }
}

impl rusqlite::types::ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

/// What a verdict does to an enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The fraud check passed.
    FraudPassed,
    /// The fraud check failed.
    FraudFailed,
    /// The charge was captured.
    Captured,
    /// The charge was declined.
    Declined,
    /// A capture was refunded.
    Refunded,
}

/// The status an enrollment moves to, if any: the whole state machine.
///
/// `await_payment`: `payment_processing` → `active` on capture, `rejected`
/// on a failed fraud check, `payment_failed` on a decline. `optimistic`:
/// `active` → `suspended` on a failed fraud check or a decline. Anything
/// else (a pass, a refund, a verdict after a final state) changes no status.
pub fn transition(mode: AcceptanceMode, status: Status, verdict: Verdict) -> Option<Status> {
    use AcceptanceMode::{AwaitPayment, Optimistic};
    match (mode, status, verdict) {
        (AwaitPayment, Status::PaymentProcessing, Verdict::Captured) => Some(Status::Active),
        (AwaitPayment, Status::PaymentProcessing, Verdict::FraudFailed) => Some(Status::Rejected),
        (AwaitPayment, Status::PaymentProcessing, Verdict::Declined) => Some(Status::PaymentFailed),
        (Optimistic, Status::Active, Verdict::FraudFailed | Verdict::Declined) => {
            Some(Status::Suspended)
        }
        _ => None,
    }
}

pub(crate) fn mode_name(mode: AcceptanceMode) -> &'static str {
    match mode {
        AcceptanceMode::AwaitPayment => "await_payment",
        AcceptanceMode::Optimistic => "optimistic",
    }
}

pub(crate) fn parse_mode(s: &str) -> AcceptanceMode {
    if s == "optimistic" {
        AcceptanceMode::Optimistic
    } else {
        AcceptanceMode::AwaitPayment
    }
}

/// Whether `mail_id` is one of this service's mails to the student about
/// enrollment `about` ([`notice`]'s slugs). Most mail is about other
/// things (contact messages): telling them apart by name costs no read and
/// no write.
pub(crate) fn is_enrollment_mail(mail_id: &str, about: &str) -> bool {
    mail_id
        .strip_suffix(about)
        .and_then(|slug| slug.strip_suffix('-'))
        .is_some_and(|slug| NOTICE_SLUGS.contains(&slug))
}

/// The first part of the id of every mail [`notice`] writes.
pub(crate) const NOTICE_SLUGS: [&str; 4] = ["welcome", "rejected", "payment-failed", "suspended"];

/// What a mail to the student says, per status reached.
pub(crate) fn notice(
    status: Status,
    course: &str,
    reason: Option<&str>,
) -> (&'static str, String, String) {
    let why = reason
        .map(|r| format!("\n\nReason: {r}"))
        .unwrap_or_default();
    match status {
        // Not a status mail is sent for; answered like the others, so
        // there is no panic path.
        Status::Active | Status::PaymentProcessing => (
            "welcome",
            format!("Welcome to {course}"),
            format!("You are enrolled in {course}. See you in class!"),
        ),
        Status::Rejected => (
            "rejected",
            format!("Your enrollment in {course} was not accepted"),
            format!(
                "We could not accept your enrollment in {course}: the payment did not pass our checks. No money was taken.{why}"
            ),
        ),
        Status::PaymentFailed => (
            "payment-failed",
            format!("Your payment for {course} did not go through"),
            format!(
                "We could not take the payment for {course}, so you are not enrolled yet. Please try again with another card.{why}"
            ),
        ),
        Status::Suspended => (
            "suspended",
            format!("Your enrollment in {course} is suspended"),
            format!(
                "Your enrollment in {course} is suspended because the payment could not be confirmed. Any money taken is refunded.{why}"
            ),
        ),
    }
}
