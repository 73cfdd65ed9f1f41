//! Checking a request before anything is stored: the body, field by
//! field, and the idempotency key.

use super::*;

#[derive(Clone)]
pub(crate) struct Checked {
    pub(crate) student: Student,
    pub(crate) course_id: String,
    pub(crate) payment: PaymentDetails,
}

pub(crate) fn validate(req: &NewEnrollment, key: &FingerprintKey) -> Result<Checked, Problem> {
    let mut errors = Vec::new();
    let mut fail = |pointer: &str, detail: &str| {
        // One error per field: the first thing wrong with it.
        if !errors.iter().any(|e: &FieldError| e.pointer == pointer) {
            errors.push(FieldError {
                pointer: pointer.into(),
                detail: detail.into(),
            });
        }
    };
    let p = &req.payment;
    for (pointer, text) in [
        ("/student/name", &req.student.name),
        ("/student/email", &req.student.email),
        ("/course_id", &req.course_id),
        ("/payment/card_number", &p.card_number),
        ("/payment/expiry", &p.expiry),
        ("/payment/cvv", &p.cvv),
        ("/payment/holder", &p.holder),
        ("/payment/currency", &p.currency),
    ] {
        if has_control(text, false) {
            fail(pointer, CONTROL_DETAIL);
        }
    }
    // A card number typed into a text field would be stored, logged,
    // published and mailed with it; the card goes in its own field only.
    for (pointer, text) in [
        ("/student/name", &req.student.name),
        ("/student/email", &req.student.email),
        ("/course_id", &req.course_id),
        ("/payment/expiry", &p.expiry),
        ("/payment/holder", &p.holder),
        ("/payment/currency", &p.currency),
    ] {
        if holds_card_number(text) {
            fail(pointer, CARD_IN_TEXT_DETAIL);
        }
    }
    let len = |s: &str| s.trim().chars().count();
    if !(1..=200).contains(&len(&req.student.name)) {
        fail("/student/name", "give a name of 1 to 200 characters");
    }
    let email = EmailAddress::parse(req.student.email.trim());
    if let Err(e) = &email {
        fail("/student/email", &e.to_string());
    }
    let course = req.course_id.trim();
    if course.is_empty()
        || course.len() > 64
        || !course
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        fail(
            "/course_id",
            "give a course id of 1 to 64 letters, digits, '-' or '_', like rust-101",
        );
    }
    let digits = match card::digits(&p.card_number) {
        Some(d) if card::luhn(&d) => Some(d),
        Some(_) => {
            fail(
                "/payment/card_number",
                "the card number fails its check digit (Luhn); check for a typo",
            );
            None
        }
        None => {
            fail(
                "/payment/card_number",
                "give the card number as 12 to 19 digits (spaces or dashes allowed)",
            );
            None
        }
    };
    let expiry = match card::expiry(&p.expiry) {
        Some((m, y)) if card::expired(m, y, chrono::Utc::now()) => {
            fail(
                "/payment/expiry",
                "the card has expired; use a card valid this month or later",
            );
            None
        }
        Some(e) => Some(e),
        None => {
            fail("/payment/expiry", "give the expiry as MM/YY, like 12/30");
            None
        }
    };
    if !card::cvv_ok(&p.cvv) {
        fail("/payment/cvv", "give the 3 or 4 digits on the card");
    }
    if !(1..=200).contains(&len(&p.holder)) {
        fail("/payment/holder", "give the name on the card");
    }
    if !(1..=MAX_AMOUNT_CENTS).contains(&p.amount_cents) {
        fail(
            "/payment/amount_cents",
            &format!(
                "give an amount of 1 to {MAX_AMOUNT_CENTS} minor units (cents), like 49900 for 499.00"
            ),
        );
    }
    if !currency::is_iso_4217(&p.currency) {
        fail(
            "/payment/currency",
            "give an ISO 4217 currency code in capitals, like EUR or USD",
        );
    }
    match (errors.is_empty(), digits, expiry, email) {
        (true, Some(digits), Some((month, year)), Ok(email)) => Ok(Checked {
            student: Student {
                name: req.student.name.trim().to_owned(),
                email: email.to_string(),
            },
            course_id: course.to_owned(),
            payment: PaymentDetails {
                amount_cents: p.amount_cents,
                currency: p.currency.clone(),
                holder: p.holder.trim().to_owned(),
                card: card::tokenize(key, &digits, month, year),
            },
        }),
        _ => Err(Problem::validation(errors)),
    }
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    // Which of two keys was meant is a guess, and a wrong guess replays
    // another request's enrollment or makes a second one.
    if values.next().is_some() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "duplicate-idempotency-key",
            "Duplicate Idempotency-Key",
            "send the Idempotency-Key header once, with one key",
        ));
    }
    match value.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters, e.g. a UUID",
        )),
    }
}

pub(crate) fn key_conflict() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "this Idempotency-Key was already used with a different request; use a new key for a new enrollment",
    )
}
