//! The one e-mail address syntax of the reference system.
//!
//! The contact form, the enrollment form, the notifier's lookup, the
//! anti-fraud domain rules and the mailer all parse addresses here, so an
//! address one of them accepts is an address every other one reads the same
//! way. Before this, a form accepted `x<evil@attacker.example>` that the
//! mailer then read as a display name and a different recipient.

use std::fmt;
use std::str::FromStr;

/// The longest address accepted, in octets: what fits in an SMTP path
/// (RFC 5321 §4.5.3.1.3, 256 octets with the angle brackets).
pub const MAX_EMAIL_LEN: usize = 254;

/// The longest local part, in octets (RFC 5321 §4.5.3.1.1).
const MAX_LOCAL_LEN: usize = 64;

/// The longest domain label, in octets (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// A plain `local@domain` address, checked and normalized.
///
/// Build one with [`EmailAddress::parse`] (or `str::parse`); its
/// [`Display`](fmt::Display) form is the normalized address, the form to
/// store, compare and send to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EmailAddress {
    local: String,
    domain: String,
}

/// Why a string is not an address this system accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmailError {
    /// Nothing was given.
    Empty,
    /// Longer than [`MAX_EMAIL_LEN`] octets.
    TooLong,
    /// A space, tab, NUL or other control character.
    SpaceOrControl,
    /// No `@`, or more than one.
    NotOneAt,
    /// A display name, comment, quoted local part, list or route
    /// (`<`, `>`, `(`, `)`, `"`, `,`, `;`, `:`, `[`, `]`, `\`).
    NotPlain,
    /// The local part is empty, too long, or not a dot-atom.
    BadLocal,
    /// The local part is not ASCII (it would need SMTPUTF8).
    NonAsciiLocal,
    /// The domain is not a valid (internationalized) host name.
    BadDomain,
}

impl fmt::Display for EmailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EmailError::Empty => "the address is empty; give one like ana@example.com",
            EmailError::TooLong => "the address is longer than 254 characters; give a shorter one",
            EmailError::SpaceOrControl => {
                "the address contains a space or a control character; remove it"
            }
            EmailError::NotOneAt => "an address has exactly one '@'; give one like ana@example.com",
            EmailError::NotPlain => {
                "give the bare address, like ana@example.com, without a name, comment, quotes or list"
            }
            EmailError::BadLocal => {
                "the part before '@' must be 1 to 64 letters, digits or !#$%&'*+-/=?^_`{|}~ with single inner dots"
            }
            EmailError::NonAsciiLocal => {
                "the part before '@' must be ASCII, many mail servers refuse other characters; use an ASCII address"
            }
            EmailError::BadDomain => {
                "the part after '@' is not a valid domain name; give one like example.com"
            }
        })
    }
}

impl std::error::Error for EmailError {}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

fn is_dot_atom(s: &str, is_char: impl Fn(u8) -> bool) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|part| !part.is_empty() && part.bytes().all(&is_char))
}

impl EmailAddress {
    /// Parses a plain `local@domain` address.
    ///
    /// Accepted: a dot-atom local part of ASCII letters, digits and
    /// ``!#$%&'*+-/=?^_`{|}~`` (RFC 5322 `atext`) with single inner dots, at
    /// most 64 octets; `@`; a domain of at least two labels. Refused: display
    /// names (`Ana <ana@example.com>`), comments (`a(x)@example.com`), quoted
    /// local parts (`"a,b"@example.com`), lists, address literals
    /// (`a@[192.0.2.1]`), spaces and every control character. The input is
    /// not trimmed: trim it first if surrounding spaces are allowed.
    ///
    /// **Internationalized domains are accepted and converted to punycode**
    /// (UTS 46, the mapping browsers use; `ana@exämple.de` becomes
    /// `ana@xn--exmple-cua.de`), and the domain is lower-cased: an ASCII
    /// domain is understood by every mail server, so nothing the system
    /// sends needs SMTPUTF8. A non-ASCII *local part* cannot be converted
    /// that way and is refused ([`EmailError::NonAsciiLocal`]) rather than
    /// accepted and then bounced by servers without SMTPUTF8. The local part
    /// keeps its case: only its owner's server may fold it.
    ///
    /// # Errors
    ///
    /// An [`EmailError`] saying what is wrong; its message says what to do.
    pub fn parse(s: &str) -> Result<Self, EmailError> {
        if s.is_empty() {
            return Err(EmailError::Empty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(EmailError::SpaceOrControl);
        }
        if s.contains(['<', '>', '(', ')', '"', ',', ';', ':', '[', ']', '\\']) {
            return Err(EmailError::NotPlain);
        }
        let (local, domain) = match s.split_once('@') {
            Some((local, domain)) if !domain.contains('@') => (local, domain),
            _ => return Err(EmailError::NotOneAt),
        };
        if !local.is_ascii() {
            return Err(EmailError::NonAsciiLocal);
        }
        if local.len() > MAX_LOCAL_LEN || !is_dot_atom(local, is_atext) {
            return Err(EmailError::BadLocal);
        }
        let domain = idna::domain_to_ascii_cow(domain.as_bytes(), idna::AsciiDenyList::STD3)
            .map_err(|_| EmailError::BadDomain)?;
        let labels: Vec<&str> = domain.split('.').collect();
        let label_ok = |l: &&str| {
            (1..=MAX_LABEL_LEN).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        let tld_ok = labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()));
        if labels.len() < 2 || !labels.iter().all(label_ok) || !tld_ok {
            return Err(EmailError::BadDomain);
        }
        if local.len() + 1 + domain.len() > MAX_EMAIL_LEN {
            return Err(EmailError::TooLong);
        }
        Ok(Self {
            local: local.to_owned(),
            domain: domain.into_owned(),
        })
    }

    /// The part before `@`, as given.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The part after `@`: ASCII, lower case, punycode for an
    /// internationalized domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl FromStr for EmailAddress {
    type Err = EmailError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses_are_accepted_and_normalized() {
        let cases = [
            ("a@b.co", "a@b.co"),
            (
                "first.last+tag@school.example",
                "first.last+tag@school.example",
            ),
            ("o'brien@Example.COM", "o'brien@example.com"),
            ("Ana@exämple.de", "Ana@xn--exmple-cua.de"),
            ("ana@xn--exmple-cua.de", "ana@xn--exmple-cua.de"),
            ("a@sub-domain.example", "a@sub-domain.example"),
        ];
        for (input, normalized) in cases {
            let parsed = EmailAddress::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.to_string(), normalized, "{input}");
        }
        let a: EmailAddress = "ana@exämple.de".parse().unwrap();
        assert_eq!((a.local(), a.domain()), ("ana", "xn--exmple-cua.de"));
    }

    #[test]
    fn anything_but_a_plain_address_is_refused_with_its_reason() {
        use EmailError::*;
        let long_local = format!("{}@example.com", "a".repeat(65));
        let long = format!("{}@{}.example", "a".repeat(64), "b".repeat(63));
        let too_long = format!("a@{}.com", vec!["b".repeat(63); 4].join("."));
        let cases: Vec<(&str, EmailError)> = vec![
            ("", Empty),
            ("a", NotOneAt),
            ("a@b", BadDomain),
            ("@b.co", BadLocal),
            ("a@.co", BadDomain),
            ("a@b.co.", BadDomain),
            ("a b@c.de", SpaceOrControl),
            ("a@@b.co", NotOneAt),
            ("a@b@c.co", NotOneAt),
            ("a@b..co", BadDomain),
            ("a..b@c.co", BadLocal),
            (".a@c.co", BadLocal),
            ("a.@c.co", BadLocal),
            // What a hostile tester sent.
            ("x<evil@attacker.example>", NotPlain),
            ("Ana <ana@example.com>", SpaceOrControl),
            ("Ana<ana@example.com>", NotPlain),
            ("\"a,b\"@example.com", NotPlain),
            ("a(comment)@example.com", NotPlain),
            ("a@example.com,b@example.com", NotPlain),
            ("a@[192.0.2.1]", NotPlain),
            ("a\\b@example.com", NotPlain),
            ("a\0@example.com", SpaceOrControl),
            ("a@example.com\r\nBcc: x@y.z", SpaceOrControl),
            ("a\u{b}@example.com", SpaceOrControl),
            ("a\u{85}@example.com", SpaceOrControl),
            ("ü@exämple.de", NonAsciiLocal),
            ("a@exa_mple.com", BadDomain),
            ("a@-example.com", BadDomain),
            ("a@example-.com", BadDomain),
            ("a@192.0.2.1", BadDomain),
            ("a@xn--a.com", BadDomain),
            ("a@ex\u{ff20}mple.com", BadDomain),
            (&long_local, BadLocal),
            (&too_long, TooLong),
        ];
        for (input, expected) in cases {
            assert_eq!(EmailAddress::parse(input), Err(expected), "{input:?}");
        }
        assert!(EmailAddress::parse(&long).is_ok(), "{long}");
    }

    #[test]
    fn messages_say_what_to_do() {
        for e in [
            EmailError::Empty,
            EmailError::TooLong,
            EmailError::SpaceOrControl,
            EmailError::NotOneAt,
            EmailError::NotPlain,
            EmailError::BadLocal,
            EmailError::NonAsciiLocal,
            EmailError::BadDomain,
        ] {
            let text = e.to_string();
            assert!(text.starts_with(char::is_lowercase), "{text}");
            assert!(!text.ends_with('.'), "{text}");
        }
    }
}
