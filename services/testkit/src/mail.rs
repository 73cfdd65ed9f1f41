//! Parsing a received message into what tests assert on.

use std::fmt;

/// A mailbox of an address header: `"Name" <address>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The display name, decoded, if there is one.
    pub name: Option<String>,
    /// The address.
    pub address: String,
}

/// What the SMTP client said in `MAIL FROM` and `RCPT TO`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Envelope {
    /// The reverse path (`MAIL FROM`).
    pub mail_from: String,
    /// The recipients (`RCPT TO`).
    pub rcpt_tos: Vec<String>,
}

/// One message, raw and parsed.
///
/// Header values in [`headers`](Self::headers) are as written (unfolded,
/// not decoded); [`subject`](Self::subject), the mailboxes and
/// [`body`](Self::body) are decoded (RFC 2047 words, quoted-printable,
/// base64), so a test compares them with the text that was sent.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// The message as received: RFC 5322 text.
    pub raw: String,
    /// Every header field in order: name as written, value unfolded and
    /// trimmed.
    pub headers: Vec<(String, String)>,
    /// The decoded `Subject`.
    pub subject: Option<String>,
    /// The `Message-ID`, without its angle brackets.
    pub message_id: Option<String>,
    /// The `From` mailboxes.
    pub from: Vec<Mailbox>,
    /// The `To` mailboxes.
    pub to: Vec<Mailbox>,
    /// The `Reply-To` mailboxes.
    pub reply_to: Vec<Mailbox>,
    /// The first text body, decoded, with LF line endings and without the
    /// line break that ends the message (SMTP and `.eml` writers add one).
    pub body: String,
    /// The SMTP envelope, for messages an [`SmtpServer`](crate::SmtpServer)
    /// received; `None` for a message parsed from text.
    pub envelope: Option<Envelope>,
}

/// A text that is not an RFC 5322 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailParseError {
    reason: &'static str,
}

impl fmt::Display for MailParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an RFC 5322 message: {}", self.reason)
    }
}

impl std::error::Error for MailParseError {}

impl ReceivedMail {
    /// Parses an RFC 5322 message (CRLF or LF line endings).
    ///
    /// # Errors
    ///
    /// [`MailParseError`] if there is no header section or the parser
    /// rejects the text.
    pub fn parse(raw: &str) -> Result<Self, MailParseError> {
        let headers = raw_headers(raw).ok_or(MailParseError {
            reason: "no header section ending in an empty line",
        })?;
        let message = mail_parser::MessageParser::default()
            .parse(raw.as_bytes())
            .ok_or(MailParseError {
                reason: "the parser found no message",
            })?;
        let mailboxes = |address: Option<&mail_parser::Address<'_>>| -> Vec<Mailbox> {
            address
                .map(|a| {
                    a.iter()
                        .filter_map(|addr| {
                            Some(Mailbox {
                                name: addr.name().map(str::to_owned),
                                address: addr.address()?.to_owned(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Self {
            raw: raw.to_owned(),
            subject: message.subject().map(str::to_owned),
            message_id: message.message_id().map(str::to_owned),
            from: mailboxes(message.from()),
            to: mailboxes(message.to()),
            reply_to: mailboxes(message.reply_to()),
            body: message
                .body_text(0)
                .map(|b| normalize(&b))
                .unwrap_or_default(),
            headers,
            envelope: None,
        })
    }

    /// The value of the first header field called `name` (any case), as
    /// written.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The addresses of the `From` mailboxes.
    pub fn from_addresses(&self) -> Vec<&str> {
        self.from.iter().map(|m| m.address.as_str()).collect()
    }

    /// The addresses of the `To` mailboxes.
    pub fn to_addresses(&self) -> Vec<&str> {
        self.to.iter().map(|m| m.address.as_str()).collect()
    }

    /// The addresses of the `Reply-To` mailboxes.
    pub fn reply_to_addresses(&self) -> Vec<&str> {
        self.reply_to.iter().map(|m| m.address.as_str()).collect()
    }
}

/// LF line endings, and no final line break.
fn normalize(body: &str) -> String {
    let body = body.replace("\r\n", "\n");
    body.strip_suffix('\n').unwrap_or(&body).to_owned()
}

/// The header section as (name, unfolded value) pairs, or `None` if the
/// text has no empty line ending a header section.
fn raw_headers(raw: &str) -> Option<Vec<(String, String)>> {
    let end = raw
        .find("\r\n\r\n")
        .or_else(|| raw.find("\n\n"))
        .or_else(|| (raw.starts_with("\r\n") || raw.starts_with('\n')).then_some(0))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in raw[..end].lines() {
        if line.starts_with([' ', '\t']) {
            // A folded continuation of the previous field (RFC 5322 §2.2.3).
            if let Some((_, value)) = headers.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_folded_and_encoded_headers() {
        let raw = "From: \"Eventos School\" <no-reply@school.example>\r\n\
                   To: ana@example.org\r\n\
                   Subject: =?utf-8?b?T2zDoQ==?=\r\n  again\r\n\
                   Message-ID: <m-1@eventos>\r\n\
                   Content-Type: text/plain; charset=utf-8\r\n\
                   Content-Transfer-Encoding: quoted-printable\r\n\
                   \r\n\
                   Ol=C3=A1, mundo\r\n";
        let mail = ReceivedMail::parse(raw).unwrap();
        assert_eq!(mail.header("subject"), Some("=?utf-8?b?T2zDoQ==?= again"));
        assert_eq!(mail.subject.as_deref(), Some("Olá again"));
        assert_eq!(mail.message_id.as_deref(), Some("m-1@eventos"));
        assert_eq!(mail.from_addresses(), ["no-reply@school.example"]);
        assert_eq!(mail.from[0].name.as_deref(), Some("Eventos School"));
        assert_eq!(mail.to_addresses(), ["ana@example.org"]);
        assert!(mail.reply_to.is_empty());
        assert_eq!(mail.body, "Olá, mundo");
    }

    #[test]
    fn text_without_a_header_section_is_refused() {
        assert!(ReceivedMail::parse("just some words").is_err());
    }
}
