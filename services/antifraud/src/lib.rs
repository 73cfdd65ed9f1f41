//! Anti-fraud: deterministic rules and a risk score for each submitted payment.
//!
//! The service consumes [`PaymentSubmitted`] and answers each with exactly
//! one verdict: [`FraudCheckPassed`] (carrying the payment, so billing can
//! charge it) or [`FraudCheckFailed`] (carrying the reasons). Nothing else
//! in the system waits on it synchronously; enrollment has already answered
//! the student.
//!
//! # The decisions that shaped it
//!
//! * **Deterministic rules, a summed score, one threshold.** Each rule in
//!   [`assess`] adds points and one human-readable line; a payment whose
//!   score reaches [`AntifraudConfig::score_threshold`] fails. The same
//!   payment with the same history always gets the same verdict, so a
//!   verdict can be explained to the student and to support, and every rule
//!   is unit-tested at its boundaries. No model, no randomness in the
//!   decision.
//! * **No card number, ever.** Enrollment tokenizes at the edge: this
//!   service sees the BIN, the last four digits and a keyed fingerprint.
//!   The BIN is enough for the deny list, the fingerprint for velocity
//!   ("the same card, again and again") without knowing which card it is.
//! * **Velocity is counted in the service's own database.** Each check
//!   records the card fingerprint and the lower-cased e-mail at the
//!   payment's submission time. The window is measured on submission times,
//!   not on when the check happens to run, so a backlog does not stretch or
//!   shrink it. It reaches both ways from the payment being checked: checks
//!   run concurrently and may finish out of submission order, and a burst
//!   must still be caught by whichever of its checks runs last. The payment
//!   being checked is never counted against itself.
//! * **Once per event.** The inbox entry ([`Store::once`]), the history
//!   row with the verdict, and the verdict event in the outbox are written
//!   in one transaction: a redelivered payment changes nothing and is acked.
//! * **Latency is simulated.** A real risk check calls a third party and
//!   takes seconds; [`AntifraudConfig::latency_ms`] makes this one just as
//!   slow, so the rest of the system (the `202 Accepted`, the optimistic
//!   mode, the relays) is exercised against a slow consumer. The pause
//!   happens before the transaction, so a slow check holds no database lock,
//!   and the route handles many deliveries at once, so the pauses overlap
//!   instead of queueing.
//!
//! No feature flags.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use eventos::{Context, HandlerError, Message, ResultExt as _, Route, typed_with};
use eventos_outbox::rusqlite::{self, Connection, params};
use eventos_outbox::{OutboxError, Store, enqueue};
use rand::Rng as _;
use school_events::{FraudCheckFailed, FraudCheckPassed, PaymentSubmitted, topics};
use school_http::{EmailAddress, now_ms};
use serde::{Deserialize, Serialize};

/// The migrations of the anti-fraud database.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The CloudEvents `source` of events this service emits.
pub const SOURCE: &str = "/school/antifraud";

/// The consumer group of this service.
pub const GROUP: &str = "antifraud";

/// How many deliveries are checked at once. Checks spend nearly all their
/// time in the simulated latency, not in the database: at 2 000 payments/s
/// and 1–2 s per check, 3 000 are in flight (Little's law), and the
/// pipeline must overlap them rather than queue behind them.
const CONCURRENCY: usize = 4096;

const BIN_DENIED: u32 = 100;
const CARD_VELOCITY: u32 = 40;
const EMAIL_VELOCITY: u32 = 30;
const AMOUNT_REVIEW: u32 = 30;
const AMOUNT_BLOCK: u32 = 70;
const DISPOSABLE_EMAIL: u32 = 40;
const UNPARSABLE_EMAIL: u32 = 100;
const HOLDER_MISMATCH: u32 = 20;
const HOLDER_DIGITS: u32 = 25;

/// Settings of the anti-fraud service: the `[antifraud]` section of the
/// configuration file. Every field has a default; unknown fields are an
/// error, so a misspelt setting is not silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AntifraudConfig {
    /// Minimum and maximum of the simulated latency, in milliseconds; each
    /// check pauses for a uniformly random time in that range. `[0, 0]`
    /// means no pause. Default `[1000, 2000]`.
    pub latency_ms: [u64; 2],
    /// A payment whose score is at or above this fails. Default 70.
    pub score_threshold: u32,
    /// Card BINs (first six digits) that are refused outright. Default
    /// `["410000"]`.
    pub bin_deny_list: Vec<String>,
    /// The velocity window, in seconds. Default 600.
    pub velocity_window_secs: u64,
    /// Payments allowed per card fingerprint in the window, this one
    /// included; more adds to the score. Default 3.
    pub max_per_card: u32,
    /// Payments allowed per e-mail address in the window, this one
    /// included; more adds to the score. Default 5.
    pub max_per_email: u32,
    /// An amount (minor units) at or above this adds to the score. Default
    /// 200 000.
    pub amount_review_cents: u64,
    /// An amount (minor units) at or above this adds more to the score.
    /// Default 1 000 000.
    pub amount_block_cents: u64,
    /// E-mail domains of throwaway-address services (their subdomains
    /// match too).
    pub disposable_domains: Vec<String>,
}

impl Default for AntifraudConfig {
    fn default() -> Self {
        Self {
            latency_ms: [1000, 2000],
            score_threshold: 70,
            bin_deny_list: vec!["410000".into()],
            velocity_window_secs: 600,
            max_per_card: 3,
            max_per_email: 5,
            amount_review_cents: 200_000,
            amount_block_cents: 1_000_000,
            disposable_domains: vec![
                "mailinator.com".into(),
                "tempmail.dev".into(),
                "10minutemail.com".into(),
                "guerrillamail.com".into(),
                "yopmail.com".into(),
            ],
        }
    }
}

impl AntifraudConfig {
    /// A pause drawn uniformly from [`latency_ms`](Self::latency_ms) (the
    /// bounds may be given in either order).
    pub fn sample_latency(&self) -> Duration {
        let [a, b] = self.latency_ms;
        let (lo, hi) = (a.min(b), a.max(b));
        let ms = if lo == hi {
            lo
        } else {
            rand::rng().random_range(lo..=hi)
        };
        Duration::from_millis(ms)
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.velocity_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// What the service remembers of other payments submitted within the
/// velocity window of the one being checked (which is not included),
/// counted up to one past each limit: beyond that the rules need no more,
/// and a card seen thousands of times is not counted thousands of times
/// per check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Other payments with the same card fingerprint.
    pub card_count: u32,
    /// Other payments from the same e-mail address.
    pub email_count: u32,
}

/// What a velocity rule counts uses of.
#[derive(Clone, Copy)]
enum Key {
    Card,
    Email,
}

/// Checks of `value` (a card fingerprint or an e-mail address) submitted
/// within `window`, counted up to one past `max` (see [`History`]).
fn uses(
    tx: &Connection,
    key: Key,
    value: &str,
    (since_ms, until_ms): (i64, i64),
    max: u32,
) -> rusqlite::Result<u32> {
    let sql = match key {
        Key::Card => {
            "SELECT COUNT(*) FROM (SELECT 1 FROM antifraud_checks \
             WHERE fingerprint = ? AND at_ms > ? AND at_ms < ? LIMIT ?)"
        }
        Key::Email => {
            "SELECT COUNT(*) FROM (SELECT 1 FROM antifraud_checks \
             WHERE email = ? AND at_ms > ? AND at_ms < ? LIMIT ?)"
        }
    };
    tx.prepare_cached(sql)?.query_row(
        params![value, since_ms, until_ms, max.saturating_add(1)],
        |r| r.get(0),
    )
}

/// "N times" for a use count that includes this payment; "at least N
/// times" once [`History`]'s count was cut off past `max`.
fn times(others: u32, max: u32) -> String {
    let total = u64::from(others) + 1;
    if others > max {
        format!("at least {total} times")
    } else {
        format!("{total} times")
    }
}

/// The result of the rules: a score and one line per rule that fired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    /// The sum of the points of the rules that fired.
    pub score: u32,
    /// Why, one line per rule that fired, in rule order.
    pub reasons: Vec<String>,
}

impl Assessment {
    /// Whether the payment passes under `threshold` (a score at or above it
    /// fails).
    pub fn passes(&self, threshold: u32) -> bool {
        self.score < threshold
    }

    fn add(&mut self, points: u32, reason: String) {
        self.score = self.score.saturating_add(points);
        self.reasons.push(reason);
    }
}

/// Scores a payment. Pure: the same payment, history and configuration
/// always give the same assessment.
///
/// | rule | points |
/// |---|---|
/// | the card's BIN is on [`bin_deny_list`](AntifraudConfig::bin_deny_list) | 100 |
/// | more than [`max_per_card`](AntifraudConfig::max_per_card) payments with the card in the window | 40 |
/// | more than [`max_per_email`](AntifraudConfig::max_per_email) payments from the e-mail in the window | 30 |
/// | amount at or above [`amount_block_cents`](AntifraudConfig::amount_block_cents) | 70 |
/// | otherwise, amount at or above [`amount_review_cents`](AntifraudConfig::amount_review_cents) | 30 |
/// | e-mail domain is a [disposable one](AntifraudConfig::disposable_domains) | 40 |
/// | the e-mail is not a plain `local@domain` address ([`EmailAddress`]) | 100 |
/// | the holder's name shares no word with the student's name nor with the e-mail's local part | 20 |
/// | the holder's name contains digits | 25 |
///
/// The address is read with [`EmailAddress`], the parser enrollment
/// validated it with, so the domain checked is the domain mail goes to
/// (lower case, punycode). One that does not parse was not validated by
/// this system's enrollment: it is refused rather than scored on a domain
/// guessed from it (`x<evil@mailinator.com>` once scored 0 for a
/// disposable domain).
///
/// Names are compared word by word, ignoring case and common Latin
/// accents; words of one letter (initials) are ignored. A holder word of
/// three letters or more also matches when the e-mail's local part
/// contains it (`Smith` and `jsmith@…`). Amounts are compared in minor
/// units whatever the currency: the school charges in one currency.
pub fn assess(p: &PaymentSubmitted, history: &History, config: &AntifraudConfig) -> Assessment {
    let mut a = Assessment::default();
    let card = &p.payment.card;
    let window = window_text(config.velocity_window_secs);
    let email = email_key(&p.student.email);
    let parsed = EmailAddress::parse(p.student.email.trim()).ok();
    let local = parsed
        .as_ref()
        .map(|a| a.local().to_lowercase())
        .unwrap_or_default();
    let domain = parsed.as_ref().map_or("", EmailAddress::domain);

    if config
        .bin_deny_list
        .iter()
        .any(|bin| bin.trim() == card.bin.trim())
    {
        a.add(
            BIN_DENIED,
            format!("card BIN {} is on the deny list", card.bin),
        );
    }

    let card_total = u64::from(history.card_count) + 1;
    if card_total > u64::from(config.max_per_card) {
        a.add(
            CARD_VELOCITY,
            format!(
                "card ending {} used {} in {window} (this payment included), more than the {} allowed",
                card.last4,
                times(history.card_count, config.max_per_card),
                config.max_per_card
            ),
        );
    }

    let email_total = u64::from(history.email_count) + 1;
    if email_total > u64::from(config.max_per_email) {
        a.add(
            EMAIL_VELOCITY,
            format!(
                "e-mail {email} used {} in {window} (this payment included), more than the {} allowed",
                times(history.email_count, config.max_per_email),
                config.max_per_email
            ),
        );
    }

    let amount = p.payment.amount_cents;
    let currency = &p.payment.currency;
    if amount >= config.amount_block_cents {
        a.add(
            AMOUNT_BLOCK,
            format!(
                "amount of {amount} cents ({currency}) is at or above the block threshold of {} cents",
                config.amount_block_cents
            ),
        );
    } else if amount >= config.amount_review_cents {
        a.add(
            AMOUNT_REVIEW,
            format!(
                "amount of {amount} cents ({currency}) is at or above the review threshold of {} cents",
                config.amount_review_cents
            ),
        );
    }

    if parsed.is_none() {
        a.add(
            UNPARSABLE_EMAIL,
            format!("e-mail {email:?} is not a plain local@domain address"),
        );
    } else if is_disposable(domain, &config.disposable_domains) {
        a.add(
            DISPOSABLE_EMAIL,
            format!("e-mail domain {domain} is a disposable-address service"),
        );
    }

    let holder = p.payment.holder.trim();
    if !holder_matches(holder, &p.student.name, &local) {
        a.add(
            HOLDER_MISMATCH,
            format!(
                "card holder \"{holder}\" shares no name with the student \"{}\" nor with the e-mail address",
                p.student.name.trim()
            ),
        );
    }
    if holder.chars().any(char::is_numeric) {
        a.add(
            HOLDER_DIGITS,
            format!("card holder name \"{holder}\" contains digits"),
        );
    }
    a
}

/// The e-mail as velocity counts it: the normalized address, lower-cased
/// (the local part too: `Ana@` and `ana@` are one person to a fraudster's
/// advantage otherwise); the raw text, trimmed and lower-cased, if it does
/// not parse.
fn email_key(raw: &str) -> String {
    let raw = raw.trim();
    EmailAddress::parse(raw)
        .map_or_else(|_| raw.to_owned(), |a| a.to_string())
        .to_lowercase()
}

fn window_text(secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

fn is_disposable(domain: &str, disposable: &[String]) -> bool {
    disposable.iter().any(|d| {
        let d = d.trim().trim_start_matches('@');
        // A listed domain is read as an address's domain is, so one written
        // in Unicode matches its punycode form.
        let d = EmailAddress::parse(&format!("x@{d}"))
            .map_or_else(|_| d.to_lowercase(), |a| a.domain().to_owned());
        !d.is_empty()
            && (domain == d
                || domain
                    .strip_suffix(d.as_str())
                    .is_some_and(|rest| rest.ends_with('.')))
    })
}

fn holder_matches(holder: &str, student: &str, email_local: &str) -> bool {
    let known: HashSet<String> = words(student)
        .into_iter()
        .chain(words(email_local))
        .collect();
    let local = fold(email_local);
    words(holder)
        .iter()
        .any(|w| known.contains(w) || (w.chars().count() >= 3 && local.contains(w.as_str())))
}

/// The words of a name, folded, without initials.
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .map(fold)
        .filter(|w| w.chars().count() >= 2)
        .collect()
}

fn fold(s: &str) -> String {
    s.chars()
        .flat_map(char::to_lowercase)
        .map(unaccent)
        .collect()
}

fn unaccent(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'č' => 'c',
        'ď' => 'd',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' => 'i',
        'ł' => 'l',
        'ñ' | 'ń' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => 'o',
        'ř' => 'r',
        'ś' | 'š' | 'ş' => 's',
        'ť' | 'ţ' => 't',
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => 'u',
        'ý' | 'ÿ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        other => other,
    }
}

/// The anti-fraud service.
#[derive(Debug, Clone)]
pub struct Antifraud {
    store: Store,
    config: Arc<AntifraudConfig>,
}

impl Antifraud {
    /// The service on `store` (its migrations are run).
    ///
    /// # Errors
    ///
    /// If the migrations fail.
    pub async fn new(store: Store, config: AntifraudConfig) -> Result<Self, OutboxError> {
        store.migrate(&MIGRATOR).await?;
        Ok(Self {
            store,
            config: Arc::new(config),
        })
    }

    /// The service's database.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings in force.
    pub fn config(&self) -> &AntifraudConfig {
        &self.config
    }

    /// The event route: check every submitted payment.
    pub fn routes(&self) -> Vec<Route> {
        let this = self.clone();
        let [a, b] = self.config.latency_ms;
        // Generous enough for the longest pause plus a database that is
        // busy for a while; past it the attempt is retried, not lost.
        let timeout = Duration::from_millis(a.max(b)) + Duration::from_secs(30);
        vec![
            Route::new(
                topics::PAYMENT_SUBMITTED,
                GROUP,
                typed_with(
                    this,
                    move |this, p: PaymentSubmitted, msg: Message| async move {
                        this.on_submitted(p, msg).await
                    },
                ),
            )
            .concurrency(CONCURRENCY)
            .timeout(timeout),
        ]
    }

    async fn on_submitted(&self, p: PaymentSubmitted, msg: Message) -> Result<(), HandlerError> {
        let pause = self.config.sample_latency();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }

        let config = Arc::clone(&self.config);
        let event_id = msg.event().id().to_owned();
        let checked = event_id.clone();
        // The inbox insert is the write's first statement: the counts below
        // see every check committed before, and the writer runs no other
        // write until this one is done.
        let verdict = self
            .store
            .once(GROUP, checked, move |tx: &Connection| {
                let fingerprint = p.payment.card.fingerprint.trim().to_owned();
                let email = email_key(&p.student.email);
                let at_ms = p.submitted_at_ms;
                let window_ms = config.window_ms();
                let (since_ms, until_ms) = (
                    at_ms.saturating_sub(window_ms),
                    at_ms.saturating_add(window_ms),
                );
                let card_count =
                    uses(tx, Key::Card, &fingerprint, (since_ms, until_ms), config.max_per_card)
                        .transient()?;
                let email_count =
                    uses(tx, Key::Email, &email, (since_ms, until_ms), config.max_per_email)
                        .transient()?;
                let history = History {
                    card_count,
                    email_count,
                };

                let assessment = assess(&p, &history, &config);
                let passed = assessment.passes(config.score_threshold);
                let reasons = serde_json::to_string(&assessment.reasons).permanent()?;
                tx.prepare_cached(
                    "INSERT INTO antifraud_checks (event_id, enrollment_id, fingerprint, email, at_ms, score, passed, reasons, checked_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        event_id,
                        p.enrollment_id,
                        fingerprint,
                        email,
                        at_ms,
                        i64::from(assessment.score),
                        i64::from(passed),
                        reasons,
                        now_ms()
                    ])
                })
                .transient()?;

                let enrollment_id = p.enrollment_id.clone();
                let score = assessment.score;
                let (topic, event) = if passed {
                    let verdict = FraudCheckPassed {
                        enrollment_id: p.enrollment_id,
                        score,
                        reasons: assessment.reasons,
                        payment: p.payment,
                        mode: p.mode,
                    };
                    (topics::FRAUD_PASSED, Context::new_event(SOURCE, &verdict)?)
                } else {
                    let verdict = FraudCheckFailed {
                        enrollment_id: p.enrollment_id,
                        score,
                        reasons: assessment.reasons,
                        mode: p.mode,
                    };
                    (topics::FRAUD_FAILED, Context::new_event(SOURCE, &verdict)?)
                };
                enqueue(tx, topic, &event)?;
                Ok::<_, HandlerError>(Some((enrollment_id, score, passed)))
            })
            .await?
            .flatten();
        let Some((enrollment_id, score, passed)) = verdict else {
            return Ok(());
        };
        tracing::info!(%enrollment_id, score, passed, "fraud check done");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use school_events::{AcceptanceMode, CardToken, PaymentDetails, Student};

    fn payment() -> PaymentSubmitted {
        PaymentSubmitted {
            enrollment_id: "e-1".into(),
            student: Student {
                name: "Ana Souza".into(),
                email: "ana.souza@example.com".into(),
            },
            course_id: "rust-101".into(),
            payment: PaymentDetails {
                amount_cents: 49_900,
                currency: "EUR".into(),
                holder: "ANA SOUZA".into(),
                card: CardToken {
                    bin: "424242".into(),
                    last4: "4242".into(),
                    fingerprint: "f".repeat(64),
                    brand: "visa".into(),
                    expiry_month: 12,
                    expiry_year: 2030,
                },
            },
            mode: AcceptanceMode::AwaitPayment,
            submitted_at_ms: 1_700_000_000_000,
        }
    }

    fn check(p: &PaymentSubmitted, history: History) -> Assessment {
        assess(p, &history, &AntifraudConfig::default())
    }

    fn none() -> History {
        History::default()
    }

    #[test]
    fn a_clean_payment_scores_zero() {
        let a = check(&payment(), none());
        assert_eq!(a, Assessment::default());
        assert!(a.passes(70));
    }

    #[test]
    fn the_threshold_is_inclusive() {
        let a = Assessment {
            score: 70,
            reasons: vec![],
        };
        assert!(!a.passes(70));
        assert!(a.passes(71));
        assert!(Assessment::default().passes(1));
        assert!(!Assessment::default().passes(0), "threshold 0 fails all");
    }

    #[test]
    fn a_denied_bin_fails_alone() {
        let mut p = payment();
        p.payment.card.bin = "410000".into();
        let a = check(&p, none());
        assert_eq!(a.score, 100);
        assert_eq!(a.reasons, vec!["card BIN 410000 is on the deny list"]);
        assert!(!a.passes(70));
        p.payment.card.bin = "410001".into();
        assert_eq!(check(&p, none()).score, 0);
    }

    #[test]
    fn card_velocity_fires_only_past_the_limit() {
        let p = payment();
        let history = |card_count| History {
            card_count,
            email_count: 0,
        };
        // Two earlier payments plus this one: three, the limit.
        assert_eq!(check(&p, history(2)).score, 0);
        let a = check(&p, history(3));
        assert_eq!(a.score, 40);
        assert_eq!(
            a.reasons,
            vec![
                "card ending 4242 used 4 times in 10 min (this payment included), more than the 3 allowed"
            ]
        );
        // Alone it does not fail under the default threshold.
        assert!(a.passes(70));
    }

    #[test]
    fn email_velocity_fires_only_past_the_limit() {
        let p = payment();
        let history = |email_count| History {
            card_count: 0,
            email_count,
        };
        assert_eq!(check(&p, history(4)).score, 0);
        let a = check(&p, history(5));
        assert_eq!(a.score, 30);
        assert_eq!(
            a.reasons,
            vec![
                "e-mail ana.souza@example.com used 6 times in 10 min (this payment included), more than the 5 allowed"
            ]
        );
        // Both velocities together reach the threshold.
        let both = check(
            &p,
            History {
                card_count: 3,
                email_count: 5,
            },
        );
        assert_eq!(both.score, 70);
        assert!(!both.passes(70));
    }

    #[test]
    fn a_count_cut_off_past_the_limit_says_at_least() {
        let config = AntifraudConfig::default();
        let h = History {
            card_count: config.max_per_card + 1,
            email_count: 0,
        };
        let reasons = assess(&payment(), &h, &config).reasons;
        assert!(
            reasons[0].contains(&format!("used at least {} times", config.max_per_card + 2)),
            "{reasons:?}"
        );
    }

    #[test]
    fn velocity_names_the_window_in_its_unit() {
        let mut config = AntifraudConfig {
            velocity_window_secs: 90,
            ..AntifraudConfig::default()
        };
        let h = History {
            card_count: 9,
            email_count: 0,
        };
        assert!(assess(&payment(), &h, &config).reasons[0].contains("in 90 s"));
        config.velocity_window_secs = 7200;
        assert!(assess(&payment(), &h, &config).reasons[0].contains("in 2 h"));
    }

    #[test]
    fn amounts_at_each_threshold() {
        let cases = [
            (199_999, 0),
            (200_000, 30),
            (999_999, 30),
            (1_000_000, 70),
            (5_000_000, 70),
        ];
        for (amount, score) in cases {
            let mut p = payment();
            p.payment.amount_cents = amount;
            let a = check(&p, none());
            assert_eq!(a.score, score, "{amount}: {a:?}");
            assert_eq!(a.reasons.len(), usize::from(score > 0), "{amount}");
        }
        let mut p = payment();
        p.payment.amount_cents = 1_000_000;
        assert_eq!(
            check(&p, none()).reasons,
            vec![
                "amount of 1000000 cents (EUR) is at or above the block threshold of 1000000 cents"
            ]
        );
    }

    #[test]
    fn disposable_domains_and_their_subdomains() {
        let cases = [
            ("ana@mailinator.com", true),
            ("ana@MAILINATOR.com", true),
            ("ana@eu.mailinator.com", true),
            ("ana@notmailinator.com", false),
            ("ana@mailinator.com.example", false),
            ("ana@tempmail.dev", true),
            ("ana@10minutemail.com", true),
            ("ana@example.com", false),
        ];
        for (email, disposable) in cases {
            let mut p = payment();
            p.student.email = email.into();
            let a = check(&p, none());
            assert_eq!(a.score == 40, disposable, "{email}: {a:?}");
        }
        let mut p = payment();
        p.student.email = "ana@mailinator.com".into();
        assert_eq!(
            check(&p, none()).reasons,
            vec!["e-mail domain mailinator.com is a disposable-address service"]
        );
    }

    /// Regression: `x<evil@mailinator.com>` was read as the domain
    /// `mailinator.com>`, which is on no list, and scored 0.
    #[test]
    fn an_address_that_is_not_plain_is_refused_not_guessed_at() {
        for email in [
            "x<evil@mailinator.com>",
            "x<evil@attacker.example>",
            "\"a,b\"@example.com",
            "a(comment)@example.com",
            "ana@example.com, ana@mailinator.com",
            "ü@exämple.de",
            "not-an-address",
        ] {
            let mut p = payment();
            p.student.email = email.into();
            let a = check(&p, none());
            assert_eq!(a.score, 100, "{email}: {a:?}");
            assert!(
                !a.passes(AntifraudConfig::default().score_threshold),
                "{email}"
            );
            assert_eq!(
                a.reasons,
                vec![format!(
                    "e-mail {:?} is not a plain local@domain address",
                    email.to_lowercase()
                )],
                "{email}"
            );
        }
    }

    #[test]
    fn an_internationalized_disposable_domain_is_caught_in_punycode() {
        let config = AntifraudConfig {
            disposable_domains: vec!["wegwerf-mäil.de".into()],
            ..AntifraudConfig::default()
        };
        let punycode = EmailAddress::parse("ana@wegwerf-mäil.de")
            .unwrap()
            .to_string();
        assert!(punycode.contains("@xn--"), "{punycode}");
        for email in ["ana@WEGWERF-MÄIL.de", "ana@eu.wegwerf-mäil.de", &punycode] {
            let mut p = payment();
            p.student.email = email.to_owned();
            let a = assess(&p, &none(), &config);
            assert_eq!(a.score, 40, "{email}: {a:?}");
        }
    }

    #[test]
    fn holder_must_share_a_word_with_the_student_or_the_email() {
        let cases = [
            // (holder, student, e-mail, mismatch)
            ("ANA SOUZA", "Ana Souza", "x@example.com", false),
            ("Ana P Lima", "Ana Souza", "x@example.com", false),
            ("Paulo Lima", "Ana Souza", "paulo.lima@example.com", false),
            ("John Smith", "Ana Souza", "jsmith@example.com", false),
            ("José Álvarez", "Jose Alvarez", "x@example.com", false),
            ("JOSE ALVAREZ", "José Álvarez", "x@example.com", false),
            ("Paulo Lima", "Ana Souza", "ana@example.com", true),
            // Initials alone are not a shared name.
            ("A S", "Ana Souza", "as@example.com", true),
            ("", "Ana Souza", "ana@example.com", true),
        ];
        for (holder, student, email, mismatch) in cases {
            let mut p = payment();
            p.payment.holder = holder.into();
            p.student.name = student.into();
            p.student.email = email.into();
            let a = check(&p, none());
            assert_eq!(
                a.score == 20,
                mismatch,
                "{holder} / {student} / {email}: {a:?}"
            );
        }
        let mut p = payment();
        p.payment.holder = "Paulo Lima".into();
        p.student.email = "ana@example.com".into();
        assert_eq!(
            check(&p, none()).reasons,
            vec![
                "card holder \"Paulo Lima\" shares no name with the student \"Ana Souza\" nor with the e-mail address"
            ]
        );
    }

    #[test]
    fn holder_with_digits() {
        let mut p = payment();
        p.payment.holder = "Ana Souza 2".into();
        let a = check(&p, none());
        assert_eq!(a.score, 25);
        assert_eq!(
            a.reasons,
            vec!["card holder name \"Ana Souza 2\" contains digits"]
        );
        // A mangled name that matches nothing adds both.
        p.payment.holder = "4N4 S0UZ4".into();
        assert_eq!(check(&p, none()).score, 45);
    }

    #[test]
    fn rules_add_up_in_order() {
        let mut p = payment();
        p.payment.card.bin = "410000".into();
        p.payment.amount_cents = 250_000;
        p.student.email = "x@tempmail.dev".into();
        let a = check(
            &p,
            History {
                card_count: 3,
                email_count: 5,
            },
        );
        assert_eq!(a.score, 100 + 40 + 30 + 30 + 40);
        let starts: Vec<_> = a
            .reasons
            .iter()
            .map(|r| r.split(' ').next().unwrap())
            .collect();
        assert_eq!(starts, vec!["card", "card", "e-mail", "amount", "e-mail"]);
    }

    #[test]
    fn config_defaults_and_strictness() {
        let config: AntifraudConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, AntifraudConfig::default());
        assert_eq!(config.latency_ms, [1000, 2000]);
        assert_eq!(config.score_threshold, 70);
        let partial: AntifraudConfig =
            serde_json::from_str(r#"{"latency_ms":[0,0],"max_per_card":5}"#).unwrap();
        assert_eq!(partial.latency_ms, [0, 0]);
        assert_eq!(partial.max_per_card, 5);
        assert_eq!(partial.max_per_email, 5);
        let err = serde_json::from_str::<AntifraudConfig>(r#"{"max_per_cards":5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn latency_is_drawn_within_its_bounds() {
        let mut config = AntifraudConfig {
            latency_ms: [0, 0],
            ..AntifraudConfig::default()
        };
        assert_eq!(config.sample_latency(), Duration::ZERO);
        config.latency_ms = [10, 20];
        for _ in 0..200 {
            let d = config.sample_latency();
            assert!((10..=20).contains(&d.as_millis()), "{d:?}");
        }
        config.latency_ms = [20, 10];
        let d = config.sample_latency();
        assert!((10..=20).contains(&d.as_millis()), "{d:?}");
        config.latency_ms = [7, 7];
        assert_eq!(config.sample_latency(), Duration::from_millis(7));
    }
}
