//! Turning an `EmailRequested` into an RFC 5322 message.

use lettre::Address;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use school_events::EmailRequested;
use school_http::EmailAddress;

use crate::MailerError;

/// The longest mail id accepted: it becomes a `Message-ID` and a file name.
const MAX_MAIL_ID: usize = 200;

/// Checks that `mail_id` can be a `Message-ID` local part (a dot-atom) and
/// a file name: ASCII letters, digits, `-`, `_`, `+`, `=` and single inner
/// dots, at most 200 characters. UUIDs and ULIDs qualify.
///
/// # Errors
///
/// [`MailerError::InvalidMail`] saying what is wrong.
pub(crate) fn check_mail_id(mail_id: &str) -> Result<(), MailerError> {
    let invalid = |reason: &str| MailerError::InvalidMail {
        mail_id: mail_id.to_owned(),
        reason: format!(
            "the mail id {reason}; use letters, digits, '-', '_', '+', '=' and inner dots"
        ),
    };
    if mail_id.is_empty() {
        return Err(invalid("is empty"));
    }
    if mail_id.len() > MAX_MAIL_ID {
        return Err(invalid("is longer than 200 characters"));
    }
    if let Some(c) = mail_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '=' | '.')))
    {
        return Err(invalid(&format!("contains {c:?}")));
    }
    if mail_id.starts_with('.') || mail_id.ends_with('.') || mail_id.contains("..") {
        return Err(invalid("has a leading, trailing or doubled dot"));
    }
    Ok(())
}

/// Parses the configured `From`.
pub(crate) fn parse_from(from: &str) -> Result<Mailbox, MailerError> {
    from.parse().map_err(|e| {
        MailerError::Config(format!(
            "`from` {from:?} is not a mailbox ({e}); write it as \"Name <address@domain>\""
        ))
    })
}

/// `text` made safe for a header: every control character (not only CR
/// and LF: a vertical tab, a form feed or a NEL is a line break to some
/// readers, and a NUL ends the header for others) and the Unicode line and
/// paragraph separators become a space, so the value stays one unstructured
/// field whatever the request says.
pub(crate) fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `text` without the control characters a plain-text body has no use for
/// (NUL, escape, form feed…): line breaks and tabs stay.
fn body_text(text: &str) -> String {
    text.chars()
        .filter(|&c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'))
        .collect()
}

/// The message for `request`, from `from`: `From`, `To`, `Reply-To` when
/// given, `Subject`, `Message-ID: <mail_id@eventos>`, `Date`, and the body
/// as `text/plain; charset=utf-8`.
///
/// Addresses are parsed with [`EmailAddress`], the parser the forms use:
/// a bare `local@domain` only, so what a form accepted is what is sent to,
/// and a display name or a list smuggled into an address is refused here
/// too. The domain goes out in punycode, so no mail needs SMTPUTF8.
///
/// # Errors
///
/// [`MailerError::InvalidMail`] (permanent) for a bad mail id or address.
pub(crate) fn compose(request: &EmailRequested, from: &Mailbox) -> Result<Message, MailerError> {
    check_mail_id(&request.mail_id)?;
    let mailbox = |what: &str, value: &str| -> Result<Mailbox, MailerError> {
        let invalid = |e: &dyn std::fmt::Display| MailerError::InvalidMail {
            mail_id: request.mail_id.clone(),
            reason: format!("the {what} {value:?} is not an e-mail address: {e}"),
        };
        let parsed = EmailAddress::parse(value).map_err(|e| invalid(&e))?;
        let address = Address::new(parsed.local(), parsed.domain()).map_err(|e| invalid(&e))?;
        Ok(Mailbox::new(None, address))
    };
    let mut builder = Message::builder()
        .from(from.clone())
        .to(mailbox("recipient", &request.to)?)
        .message_id(Some(format!("<{}@eventos>", request.mail_id)))
        .date_now()
        .subject(header_text(&request.subject))
        .header(ContentType::TEXT_PLAIN);
    if let Some(reply_to) = &request.reply_to {
        builder = builder.reply_to(mailbox("reply-to address", reply_to)?);
    }
    builder
        .body(body_text(&request.body))
        .map_err(|e| MailerError::InvalidMail {
            mail_id: request.mail_id.clone(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use school_events::MailPurpose;

    use super::*;

    fn request() -> EmailRequested {
        EmailRequested {
            mail_id: "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d".into(),
            purpose: MailPurpose::ContactMessage,
            about: "contact-1".into(),
            to: "office@school.example".into(),
            reply_to: Some("ana@example.org".into()),
            requester_email: "ana@example.org".into(),
            subject: "Question\r\nBcc: evil@example.org".into(),
            body: "Hello,\nwhen does the term start?".into(),
        }
    }

    #[test]
    fn mail_ids_that_are_not_dot_atoms_are_refused() {
        for good in ["a", "0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d", "x.y_z+1=2"] {
            assert!(check_mail_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a/b",
            "a b",
            "a@b",
            "../etc",
            &"x".repeat(201),
        ] {
            let e = check_mail_id(bad).unwrap_err();
            assert!(!e.is_transient(), "{bad}");
        }
    }

    #[test]
    fn message_has_the_headers_and_a_one_line_subject() {
        let from = parse_from(crate::DEFAULT_FROM).unwrap();
        let text = String::from_utf8(compose(&request(), &from).unwrap().formatted()).unwrap();
        let (head, _body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("From: \"Eventos School\" <no-reply@school.example>\r\n"),
            "{head}"
        );
        assert!(head.contains("To: office@school.example\r\n"), "{head}");
        assert!(head.contains("Reply-To: ana@example.org\r\n"), "{head}");
        assert!(
            head.contains("Message-ID: <0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d@eventos>\r\n"),
            "{head}"
        );
        assert!(head.contains("Date: "), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(!head.lines().any(|l| l.starts_with("Bcc:")), "{head}");
    }

    #[test]
    fn no_control_character_reaches_a_header() {
        let from = parse_from(crate::DEFAULT_FROM).unwrap();
        for sep in [
            "\r\n", "\n", "\r", "\u{b}", "\u{c}", "\0", "\u{1b}", "\u{7f}", "\u{85}", "\u{2028}",
        ] {
            let mut req = request();
            req.subject = format!("Question{sep}Bcc: evil@example.org");
            let text = String::from_utf8(compose(&req, &from).unwrap().formatted()).unwrap();
            let (head, _body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                !head.lines().any(|l| l.starts_with("Bcc:")),
                "{sep:?}: {head}"
            );
            // Folding may add CRLF + space; nothing else below 0x20 or DEL.
            assert!(
                !head
                    .chars()
                    .any(|c| c.is_control() && !matches!(c, '\r' | '\n')),
                "{sep:?}: {head:?}"
            );
            assert!(
                head.contains("Bcc: evil@example.org"),
                "{sep:?}: one subject {head}"
            );
        }
    }

    #[test]
    fn the_body_keeps_lines_and_tabs_and_loses_nul() {
        let from = parse_from(crate::DEFAULT_FROM).unwrap();
        let mut req = request();
        req.body = "a\0b\n\tc\u{c}".into();
        let message = compose(&req, &from).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();
        let (_head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(!body.contains('\0') && !body.contains('\u{c}'), "{body:?}");
        assert!(body.contains("ab\r\n\tc"), "{body:?}");
    }

    #[test]
    fn addresses_are_parsed_as_the_forms_parse_them() {
        let from = parse_from(crate::DEFAULT_FROM).unwrap();
        let mut req = request();
        req.to = "office@Exämple.de".into();
        let message = compose(&req, &from).unwrap();
        let to: Vec<String> = message
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(to, ["office@xn--exmple-cua.de"]);
        // Whatever the forms accept, the mailer sends: the edges of the syntax.
        let longest = format!("{}@{}.example", "l".repeat(64), "d".repeat(63));
        for good in [
            "a!#$%&'*+-/=?^_`{|}~@example.com",
            "o'brien@sub.example.co",
            "first.last@x-y.example",
            longest.as_str(),
        ] {
            assert!(school_http::EmailAddress::parse(good).is_ok(), "{good}");
            let mut req = request();
            req.to = good.into();
            req.reply_to = Some(good.into());
            compose(&req, &from).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "x<evil@attacker.example>",
            "Office <office@school.example>",
            "\"a,b\"@school.example",
            "a(comment)@school.example",
            "a@school.example, b@attacker.example",
            "ü@exämple.de",
        ] {
            let mut req = request();
            req.to = bad.into();
            let e = compose(&req, &from).unwrap_err();
            assert!(matches!(e, MailerError::InvalidMail { .. }), "{bad}: {e}");
            assert!(!e.is_transient(), "{bad}");
        }
    }

    #[test]
    fn bad_addresses_are_permanent() {
        let from = parse_from(crate::DEFAULT_FROM).unwrap();
        let mut bad_to = request();
        bad_to.to = "not an address".into();
        let mut bad_reply = request();
        bad_reply.reply_to = Some("nope@".into());
        for req in [bad_to, bad_reply] {
            let e = compose(&req, &from).unwrap_err();
            assert!(matches!(e, MailerError::InvalidMail { .. }), "{e}");
            assert!(!e.is_transient());
        }
        assert!(matches!(parse_from("nobody"), Err(MailerError::Config(_))));
    }
}
