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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_versioned_and_unique() {
        let types = [EmailRequested::TYPE, EmailSent::TYPE, EmailFailed::TYPE];
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
