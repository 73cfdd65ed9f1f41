//! The state machine: what a verdict does to an enrollment, what each
//! status tells the student, and the mail it sends.

use super::*;

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
pub fn transition(mode: AcceptanceMode, status: &str, verdict: Verdict) -> Option<&'static str> {
    match (mode, status, verdict) {
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::Captured) => Some("active"),
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::FraudFailed) => {
            Some("rejected")
        }
        (AcceptanceMode::AwaitPayment, "payment_processing", Verdict::Declined) => {
            Some("payment_failed")
        }
        (AcceptanceMode::Optimistic, "active", Verdict::FraudFailed | Verdict::Declined) => {
            Some("suspended")
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

pub(crate) fn message_for(status: &str) -> &'static str {
    match status {
        "payment_processing" => "your payment is being processed; we will e-mail you the outcome",
        "active" => "you are enrolled; we will e-mail you the details",
        "rejected" => "the payment was refused by our fraud checks",
        "payment_failed" => "the payment could not be taken",
        "suspended" => "the enrollment is suspended: the payment could not be confirmed",
        _ => "",
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
    status: &str,
    course: &str,
    reason: Option<&str>,
) -> (&'static str, String, String) {
    let why = reason
        .map(|r| format!("\n\nReason: {r}"))
        .unwrap_or_default();
    match status {
        "active" => (
            "welcome",
            format!("Welcome to {course}"),
            format!("You are enrolled in {course}. See you in class!"),
        ),
        "rejected" => (
            "rejected",
            format!("Your enrollment in {course} was not accepted"),
            format!(
                "We could not accept your enrollment in {course}: the payment did not pass our checks. No money was taken.{why}"
            ),
        ),
        "payment_failed" => (
            "payment-failed",
            format!("Your payment for {course} did not go through"),
            format!(
                "We could not take the payment for {course}, so you are not enrolled yet. Please try again with another card.{why}"
            ),
        ),
        _ => (
            "suspended",
            format!("Your enrollment in {course} is suspended"),
            format!(
                "Your enrollment in {course} is suspended because the payment could not be confirmed. Any money taken is refunded.{why}"
            ),
        ),
    }
}
