//! Card numbers in free text: found, masked or redacted.
//!
//! The card fields are checked where they are meant to be (the enrollment's
//! `payment.card_number`); this module is for everywhere else a person can
//! type — names, a card holder, a course id, a contact message — and for
//! error texts that may quote what was sent. One finder serves them all,
//! so what one form refuses the other masks, and neither misses a number
//! the other would see.
//!
//! A number is a run of digits with separators between them: any Unicode
//! space (NBSP, thin spaces, tabs, line breaks), dashes (ASCII and
//! Unicode), dots, slashes, underscores and invisible joiners, at most
//! [`MAX_GAP`] of them in a row. Full-width digits count as digits. A run
//! holds a card number when some 13 to 19 consecutive digits of it pass the
//! Luhn check: a number with an expiry or a CVV typed right after it, or a
//! stray digit before it, is still found.

use std::borrow::Cow;
use std::ops::Range;

/// The most separator characters accepted between two digits of one
/// number: `4242 - 4242` has three.
pub const MAX_GAP: usize = 4;

/// The shortest and longest card numbers (ISO/IEC 7812).
const CARD_LEN: Range<usize> = 13..20;

/// The run length from which [`redact_digits`] hides digits: a mistyped
/// card number fails Luhn but is still a card number.
const REDACT_FROM: usize = 12;

fn digit(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        // Full-width digits, as an East Asian keyboard types them.
        '\u{ff10}'..='\u{ff19}' => u8::try_from(u32::from(c) - 0xff10).ok(),
        _ => None,
    }
}

fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '.'
                | '/'
                | '_'
                | '\u{00ad}'            // soft hyphen
                | '\u{2010}'..='\u{2015}' // hyphens and dashes
                | '\u{2212}'            // minus sign
                | '\u{2024}'            // one dot leader
                | '\u{2027}'            // hyphenation point
                | '\u{200b}'..='\u{200d}' // zero-width space and joiners
                | '\u{2060}'            // word joiner
                | '\u{feff}'            // zero-width no-break space
                | '\u{fe58}'
                | '\u{fe63}'
                | '\u{ff0d}'
                | '\u{ff0e}'
                | '\u{ff0f}'
                | '\u{ff3f}'
        )
}

/// A run of digits: its byte range in the text (first digit to last), the
/// digits, and where each group of digits without separators starts.
struct Run {
    range: Range<usize>,
    digits: Vec<u8>,
    groups: Vec<usize>,
}

fn runs(text: &str) -> Vec<Run> {
    let mut out = Vec::new();
    let mut current: Option<Run> = None;
    let mut gap = 0;
    for (i, c) in text.char_indices() {
        if let Some(d) = digit(c) {
            let run = current.get_or_insert_with(|| Run {
                range: i..i,
                digits: Vec::new(),
                groups: Vec::new(),
            });
            if gap > 0 || run.digits.is_empty() {
                run.groups.push(run.digits.len());
            }
            run.digits.push(d);
            run.range.end = i + c.len_utf8();
            gap = 0;
        } else if current.is_some() && is_separator(c) && gap < MAX_GAP {
            gap += 1;
        } else if let Some(run) = current.take() {
            out.push(run);
            gap = 0;
        }
    }
    out.extend(current);
    out
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 { d - 9 } else { d }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether some whole groups of the run, side by side, make 13 to 19
/// digits that pass Luhn; or, in a group of more than 19 digits (a number
/// glued to another), any 13 to 19 of them. Only whole groups elsewhere:
/// `4242 4242 4242 4241` is a mistyped card, and each of its shorter
/// stretches passing Luhn by chance is not a card number.
fn holds_card(run: &Run) -> bool {
    let digits = &run.digits;
    let mut ends: Vec<usize> = run.groups.iter().skip(1).copied().collect();
    ends.push(digits.len());
    let aligned = run.groups.iter().any(|&start| {
        ends.iter().any(|&end| {
            end > start && CARD_LEN.contains(&(end - start)) && luhn(&digits[start..end])
        })
    });
    aligned
        || run.groups.iter().zip(&ends).any(|(&start, &end)| {
            end - start >= CARD_LEN.end
                && CARD_LEN
                    .clone()
                    .any(|len| digits[start..end].windows(len).any(luhn))
        })
}

/// The byte ranges of `text` (first digit to last) that hold a card
/// number, in order.
pub fn card_numbers(text: &str) -> Vec<Range<usize>> {
    runs(text)
        .into_iter()
        .filter(holds_card)
        .map(|r| r.range)
        .collect()
}

/// Whether `text` holds a card number anywhere.
pub fn holds_card_number(text: &str) -> bool {
    !card_numbers(text).is_empty()
}

/// `text` with every card number replaced by `•••• •••• •••• 4242` (its
/// last four digits kept, as on a receipt); unchanged when it holds none.
pub fn mask_card_numbers(text: &str) -> Cow<'_, str> {
    let found: Vec<Run> = runs(text).into_iter().filter(holds_card).collect();
    if found.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for run in found {
        out.push_str(&text[at..run.range.start]);
        out.push_str("•••• •••• •••• ");
        for d in &run.digits[run.digits.len() - 4..] {
            out.push(char::from(b'0' + d));
        }
        at = run.range.end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// `text` with every run of 12 or more digits replaced by `[redacted]`,
/// Luhn or not: for error texts that may quote what was sent, where a
/// mistyped card number must not travel back out either.
pub fn redact_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for run in runs(text) {
        if run.digits.len() >= REDACT_FROM {
            out.push_str(&text[at..run.range.start]);
            out.push_str("[redacted]");
            at = run.range.end;
        }
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The separator forms a hostile sender tried, and some more.
    const FORMS: &[&str] = &[
        "4242424242424242",
        "4242 4242 4242 4242",
        "4242-4242-4242-4242",
        "4242.4242.4242.4242",
        "4242\u{a0}4242\u{a0}4242\u{a0}4242",
        "4242\u{202f}4242\u{2009}4242\u{3000}4242",
        "4242\t4242\t4242\t4242",
        "4242/4242/4242/4242",
        "4242 - 4242 - 4242 - 4242",
        "4242\u{2013}4242\u{2014}4242\u{2212}4242",
        "4242\u{200b}4242\u{2060}4242\u{feff}4242",
        "4242\n4242\r\n4242 4242",
        "4242_4242_4242_4242",
        "４２４２ ４２４２ ４２４２ ４２４２",
        "4-2-4-2-4-2-4-2-4-2-4-2-4-2-4-2",
        "378282246310005",
        "6011 0009 9013 9424",
        "4222222222222",
        "4242424242424242123400000",
    ];

    #[test]
    fn every_separator_form_is_found() {
        for form in FORMS {
            for text in [
                (*form).to_owned(),
                format!("my card is {form}, thanks"),
                format!("Ana{form}Lima"),
                format!("card {form} exp 12/30 cvv 123"),
                format!("{form} 12/30 123"),
                format!("ref 7 {form}"),
            ] {
                assert!(holds_card_number(&text), "{text:?}");
                let masked = mask_card_numbers(&text);
                assert!(!holds_card_number(&masked), "{masked:?}");
                assert!(masked.contains("•••• •••• •••• "), "{masked:?}");
                assert!(!redact_digits(&text).contains("4242 4242"), "{text:?}");
            }
        }
    }

    #[test]
    fn masking_keeps_the_last_four_and_the_rest_of_the_text() {
        assert_eq!(
            mask_card_numbers("pay with 4242.4242.4242.4242 please"),
            "pay with •••• •••• •••• 4242 please"
        );
        assert_eq!(
            mask_card_numbers("a 4000 0000 0000 0002 b 5555-5555-5555-4444"),
            "a •••• •••• •••• 0002 b •••• •••• •••• 4444"
        );
        assert!(matches!(
            mask_card_numbers("Can I visit on Friday?"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn ordinary_numbers_are_not_cards() {
        for text in [
            "Room 12, 2nd floor",
            "call +351 912 345 678",
            "on 12/03/2024 at 10.30",
            "4242 4242 4242 4241",
            "1234567812345678",
            "order 42424242424",
            "4242 4242      4242 4242",
            "4242424242424241",
            "",
        ] {
            assert!(!holds_card_number(text), "{text:?}");
        }
    }

    #[test]
    fn redaction_hides_long_digit_runs_only() {
        assert_eq!(
            redact_digits("invalid type: integer `4242424242424242`, expected a string at line 1"),
            "invalid type: integer `[redacted]`, expected a string at line 1"
        );
        assert_eq!(
            redact_digits("card 4242 4242 4242 4242!"),
            "card [redacted]!"
        );
        assert_eq!(
            redact_digits("card 4242\u{a0}4242.4242\t4242!"),
            "card [redacted]!"
        );
        assert_eq!(redact_digits("line 1 column 12345"), "line 1 column 12345");
    }
}
