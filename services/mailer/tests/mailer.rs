//! The mailer end to end: a real SMTP server (aiosmtpd, through the
//! testkit), the embedded log as transport, the router, and the outbox
//! relay publishing what the mailer records.
//!
//! Time is real here — the SMTP server is another process — so backoffs
//! are short (base 50 ms, cap 400 ms).

use std::sync::Arc;
use std::time::Duration;

use eventos::middleware::DeadLettered;
use eventos::{
    Backoff, Bus, DeliveryInfo, Event, Router, RunningRouter, Subscriber as _, Subscription,
    Transport as _, TypedEvent, dead_letter_topic, ext,
};
use eventos_log::LogTransport;
use futures::StreamExt as _;
use school_events::{EmailFailed, EmailRequested, EmailSent, MailPurpose, topics};
use school_mailer::{
    Delivered, Mailer, MailerConfig, MailerError, Reported, default_backoff, route,
};
use school_testkit::{Mode, ReceivedMail, SmtpServer};
use tokio::sync::oneshot;

/// Long enough for a loaded machine; a passing test never waits this long.
const WAIT: Duration = Duration::from_secs(10);

fn fast_backoff(max_attempts: u32) -> Backoff {
    Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(400),
        max_attempts,
    )
}

fn request(mail_id: &str) -> EmailRequested {
    EmailRequested {
        mail_id: mail_id.to_owned(),
        purpose: MailPurpose::ContactMessage,
        about: format!("contact-{mail_id}"),
        to: "office@school.example".to_owned(),
        reply_to: Some("ana@example.org".to_owned()),
        requester_email: "ana@example.org".to_owned(),
        subject: "Matrícula — dúvida".to_owned(),
        body: "Olá,\nquando começam as aulas?\n\nAna".to_owned(),
    }
}

/// A mailer consuming from a fresh log, with its relay running and
/// observers on the topics it emits to.
struct Harness {
    dir: tempfile::TempDir,
    transport: Arc<LogTransport>,
    mailer: Mailer,
    /// Publishes as the service asking for mail would.
    client: Bus,
    router: Option<RunningRouter>,
    stop_relay: Option<oneshot::Sender<()>>,
    relay: Option<tokio::task::JoinHandle<()>>,
    sent: eventos::core::DeliveryStream,
    failed: eventos::core::DeliveryStream,
    dead: eventos::core::DeliveryStream,
}

impl Harness {
    async fn start(smtp: Option<&SmtpServer>, policy: Backoff) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let transport = Arc::new(LogTransport::open(dir.path().join("log")).unwrap());
        let mut config = MailerConfig::new(dir.path().join("mailer"));
        if let Some(server) = smtp {
            config = config
                .smtp_url(server.url())
                .smtp_timeout(Duration::from_secs(2));
        }
        let mailer = Mailer::open(config, Bus::new(transport.clone(), school_mailer::SOURCE))
            .await
            .unwrap();
        let observe = |topic: String| {
            let transport = transport.clone();
            async move {
                transport
                    .subscribe(Subscription::new(topic, "test"))
                    .await
                    .unwrap()
            }
        };
        let sent = observe(topics::MAIL_SENT.to_owned()).await;
        let failed = observe(topics::MAIL_FAILURES.to_owned()).await;
        let dead = observe(dead_letter_topic(topics::MAIL_REQUESTS)).await;

        let (stop_relay, stopped) = oneshot::channel::<()>();
        let relay = tokio::spawn(mailer.relay(transport.clone()).run(async {
            stopped.await.ok();
        }));
        let router = Router::new(transport.clone())
            .shutdown_timeout(Duration::from_secs(5))
            .route(route(mailer.clone(), policy))
            .start()
            .await
            .unwrap();
        Self {
            client: Bus::new(transport.clone(), "/test/contact"),
            dir,
            transport,
            mailer,
            router: Some(router),
            stop_relay: Some(stop_relay),
            relay: Some(relay),
            sent,
            failed,
            dead,
        }
    }

    /// Publishes `request`; returns the id of its event.
    async fn request(&self, request: &EmailRequested) -> String {
        let event = self.client.event(request).unwrap();
        let id = event.id().to_owned();
        self.client
            .publish(topics::MAIL_REQUESTS, vec![event])
            .await
            .unwrap();
        id
    }

    fn router(&self) -> &RunningRouter {
        self.router.as_ref().unwrap()
    }

    async fn finish(mut self) {
        self.router.take().unwrap().shutdown().await.unwrap();
        self.stop_relay.take().unwrap().send(()).ok();
        self.relay.take().unwrap().await.unwrap();
        self.transport.close().await.unwrap();
    }
}

/// The next event on `stream` (acked), decoded as `T`.
async fn next<T: TypedEvent>(stream: &mut eventos::core::DeliveryStream) -> (T, Arc<Event>) {
    let delivery = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {} within {WAIT:?}", T::TYPE))
        .unwrap()
        .unwrap();
    let event = delivery.event().clone();
    delivery.ack().await.unwrap();
    (event.decode().unwrap(), event)
}

/// Whether another event arrives on `stream` within `within`.
async fn nothing_more(stream: &mut eventos::core::DeliveryStream, within: Duration) -> bool {
    tokio::time::timeout(within, stream.next()).await.is_err()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    school_testkit::eventually(what, WAIT, || std::future::ready(done())).await;
}

fn assert_is_the_request(mail: &ReceivedMail, req: &EmailRequested) {
    assert_eq!(mail.from_addresses(), ["no-reply@school.example"]);
    assert_eq!(mail.from[0].name.as_deref(), Some("Eventos School"));
    assert_eq!(mail.to_addresses(), ["office@school.example"]);
    assert_eq!(mail.reply_to_addresses(), ["ana@example.org"]);
    assert_eq!(mail.subject.as_deref(), Some(req.subject.as_str()));
    assert_eq!(
        mail.message_id.as_deref(),
        Some(format!("{}@eventos", req.mail_id).as_str())
    );
    assert!(mail.header("Date").is_some(), "no Date: {}", mail.raw);
    assert!(
        mail.header("Content-Type")
            .is_some_and(|v| v.starts_with("text/plain") && v.contains("utf-8")),
        "{}",
        mail.raw
    );
    assert_eq!(mail.body, req.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_mail_reaches_the_server_and_email_sent_is_published() {
    let server = SmtpServer::start();
    let mut h = Harness::start(Some(&server), fast_backoff(5)).await;
    let req = request("accepted-1");
    let requested = h.request(&req).await;

    let mails = server.wait_for(1, WAIT).await;
    assert_is_the_request(&mails[0], &req);
    let envelope = mails[0].envelope.as_ref().unwrap();
    assert_eq!(envelope.mail_from, "no-reply@school.example");
    assert_eq!(envelope.rcpt_tos, ["office@school.example"]);

    let (sent, event): (EmailSent, _) = next(&mut h.sent).await;
    assert_eq!(
        sent,
        EmailSent {
            mail_id: req.mail_id.clone(),
            about: req.about.clone(),
            attempt: 1
        }
    );
    assert_eq!(event.source(), school_mailer::SOURCE);
    assert_eq!(
        event.extension_str(ext::CAUSATION_ID),
        Some(requested.as_str()),
        "EmailSent is caused by the request"
    );
    assert!(h.mailer.is_sent(&req.mail_id).await.unwrap());
    h.finish().await;
}

/// Regression: a vertical tab or a form feed in a subject went out raw and
/// the receiving side read what followed as headers of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_never_reach_the_server_as_headers() {
    let server = SmtpServer::start();
    let h = Harness::start(Some(&server), fast_backoff(5)).await;
    let mut req = request("controls-1");
    req.to = "office@Exämple.de".to_owned();
    req.subject = "Visit\u{b}Bcc: evil@attacker.example\u{c}X-Injected: 1\0".to_owned();
    req.body = "Hello\0,\n\tbye".to_owned();
    h.request(&req).await;

    let mails = server.wait_for(1, WAIT).await;
    let mail = &mails[0];
    assert!(mail.header("Bcc").is_none(), "{}", mail.raw);
    assert!(mail.header("X-Injected").is_none(), "{}", mail.raw);
    assert_eq!(
        mail.subject.as_deref(),
        Some("Visit Bcc: evil@attacker.example X-Injected: 1")
    );
    let (head, _) = mail.raw.split_once("\r\n\r\n").unwrap();
    assert!(
        !head
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\r' | '\n')),
        "{head:?}"
    );
    assert!(!mail.raw.contains('\0'), "{:?}", mail.raw);
    assert_eq!(mail.body, "Hello,\n\tbye");
    let envelope = mail.envelope.as_ref().unwrap();
    assert_eq!(envelope.rcpt_tos, ["office@xn--exmple-cua.de"]);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answering_451_is_retried_until_it_accepts() {
    let server = SmtpServer::start();
    server.set_mode(Mode::TempFail);
    let mut h = Harness::start(Some(&server), fast_backoff(30)).await;
    let req = request("tempfail-1");
    h.request(&req).await;

    server.wait_for_rejected(2, WAIT).await;
    server.set_mode(Mode::Accept);
    let mails = server.wait_for(1, WAIT).await;
    assert_is_the_request(&mails[0], &req);

    let (sent, _): (EmailSent, _) = next(&mut h.sent).await;
    let refused = u32::try_from(server.rejected().len()).unwrap();
    assert!(refused >= 2);
    assert_eq!(sent.attempt, refused + 1, "every refusal was one attempt");
    assert!(nothing_more(&mut h.failed, Duration::from_millis(100)).await);
    h.finish().await;
}

/// A refusal of the mail's form is final whatever its code: a 4xx naming
/// SMTPUTF8 would refuse the same mail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_refusing_the_form_dead_letters_on_the_first_attempt() {
    let server = SmtpServer::start();
    server.set_mode(Mode::NeedsSmtpUtf8);
    let mut h = Harness::start(Some(&server), fast_backoff(5)).await;
    let req = request("smtputf8-1");
    h.request(&req).await;
    let (dead, event): (EmailRequested, _) = next(&mut h.dead).await;
    assert_eq!(dead, req);
    assert_eq!(
        event.extension_str(ext::DEAD_LETTER_REASON),
        Some("permanent error on attempt 1")
    );
    let (failed, _): (EmailFailed, _) = next(&mut h.failed).await;
    assert_eq!(failed.attempts, 1);
    assert_eq!(server.rejected().len(), 1, "the refusal is not retried");
    assert!(nothing_more(&mut h.sent, Duration::from_millis(100)).await);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answering_550_dead_letters_on_the_first_attempt() {
    let server = SmtpServer::start();
    server.set_mode(Mode::PermFail);
    let mut h = Harness::start(Some(&server), fast_backoff(5)).await;
    let req = request("permfail-1");
    h.request(&req).await;

    let (dead, event): (EmailRequested, _) = next(&mut h.dead).await;
    assert_eq!(dead, req);
    assert_eq!(
        event.extension_str(ext::DEAD_LETTER_REASON),
        Some("permanent error on attempt 1")
    );
    assert_eq!(
        event
            .extension(ext::DEAD_LETTER_ATTEMPTS)
            .and_then(|v| v.as_i64()),
        Some(1)
    );
    assert!(
        event
            .extension_str(ext::DEAD_LETTER_ERROR)
            .is_some_and(|e| e.contains("550")),
        "{event:?}"
    );

    let (failed, _): (EmailFailed, _) = next(&mut h.failed).await;
    assert_eq!(failed.mail_id, req.mail_id);
    assert_eq!(failed.purpose, req.purpose);
    assert_eq!(failed.about, req.about);
    assert_eq!(failed.requester_email, req.requester_email);
    assert_eq!(failed.subject, req.subject);
    assert_eq!(failed.attempts, 1);
    // The student reads the reason: a plain sentence, no server answer.
    assert_eq!(
        failed.reason,
        "the mail server refused the message; given up after 1 attempt"
    );
    assert_eq!(server.rejected().len(), 1, "a 5xx answer is not retried");
    assert!(server.messages().is_empty());
    assert!(nothing_more(&mut h.sent, Duration::from_millis(100)).await);
    h.finish().await;
}

/// That the delays grow is `Backoff`'s own property (tested in eventos);
/// here: a refused connection is retried, again and again, and the mail
/// goes out once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_is_retried_until_it_is_back() {
    let mut server = SmtpServer::start();
    server.stop();
    let mut h = Harness::start(Some(&server), fast_backoff(40)).await;
    let req = request("down-then-up-1");
    h.request(&req).await;

    let stats = h.router().stats().clone();
    wait_until("three retries were scheduled", || {
        stats.snapshot().retried >= 3
    })
    .await;
    server.restart();

    let mails = server.wait_for(1, WAIT).await;
    assert_is_the_request(&mails[0], &req);
    let (sent, _): (EmailSent, _) = next(&mut h.sent).await;
    assert!(sent.attempt >= 4, "sent on attempt {}", sent.attempt);
    assert_eq!(stats.snapshot().dead_lettered, 0);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_for_every_attempt_ends_in_email_failed() {
    let mut server = SmtpServer::start();
    server.stop();
    let mut h = Harness::start(Some(&server), fast_backoff(4)).await;
    let req = request("down-for-good-1");
    h.request(&req).await;

    let (failed, _): (EmailFailed, _) = next(&mut h.failed).await;
    assert_eq!(failed.mail_id, req.mail_id);
    assert_eq!(failed.attempts, 4);
    // Regression: the reason named the server's address.
    assert_eq!(
        failed.reason,
        "the school's mail server did not answer; given up after 4 attempts"
    );
    assert!(!failed.reason.contains("127.0.0.1"), "{}", failed.reason);
    let (dead, _): (EmailRequested, _) = next(&mut h.dead).await;
    assert_eq!(dead.mail_id, req.mail_id);
    assert_eq!(h.router().stats().snapshot().retried, 3);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_smtp_mail_is_written_as_an_eml_file() {
    let mut h = Harness::start(None, fast_backoff(5)).await;
    let req = request("file-1");
    h.request(&req).await;

    let (sent, _): (EmailSent, _) = next(&mut h.sent).await;
    assert_eq!(sent.attempt, 1);
    let mail_dir = h.dir.path().join("mailer").join("mail");
    assert_eq!(h.mailer.config().mail_dir(), Some(mail_dir.clone()));
    let text = std::fs::read_to_string(mail_dir.join("file-1.eml")).unwrap();
    let mail = ReceivedMail::parse(&text).unwrap();
    assert_is_the_request(&mail, &req);
    let names: Vec<String> = std::fs::read_dir(&mail_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["file-1.eml"], "no temporary file is left behind");
    // Regression: mail files were world-readable.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&mail_dir.join("file-1.eml")), 0o600);
        assert_eq!(mode(&mail_dir), 0o700);
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_mail_requested_twice_is_sent_once() {
    let server = SmtpServer::start();
    let mut h = Harness::start(Some(&server), fast_backoff(5)).await;
    let req = request("twice-1");
    // Two events (two ids) for one mail: the inbox is keyed by mail id.
    let first = h.request(&req).await;
    let second = h.request(&req).await;
    assert_ne!(first, second);

    let stats = h.router().stats().clone();
    wait_until("both requests were handled", || stats.snapshot().acked >= 2).await;
    let (sent, _): (EmailSent, _) = next(&mut h.sent).await;
    assert_eq!(sent.mail_id, req.mail_id);
    wait_until_relayed(&h.mailer).await;
    assert!(
        nothing_more(&mut h.sent, Duration::from_millis(300)).await,
        "EmailSent published once"
    );
    assert_eq!(server.messages().len(), 1);
    h.finish().await;
}

async fn wait_until_relayed(mailer: &Mailer) {
    school_testkit::eventually("the outbox relayed", WAIT, || async {
        mailer.store().unsent().await.unwrap() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsendable_request_is_dead_lettered_at_once() {
    let mut h = Harness::start(None, fast_backoff(5)).await;
    let mut req = request("bad-address-1");
    req.to = "not an address".to_owned();
    h.request(&req).await;

    let (failed, _): (EmailFailed, _) = next(&mut h.failed).await;
    assert_eq!(failed.attempts, 1);
    assert_eq!(
        failed.reason,
        "the message cannot be sent to this address; given up after 1 attempt"
    );
    let mail_dir = h.mailer.config().mail_dir().unwrap();
    assert_eq!(std::fs::read_dir(mail_dir).unwrap().count(), 0);
    h.finish().await;
}

/// Without the router: concurrent deliveries of one mail take turns, and
/// the second finds the first recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_of_one_mail_send_it_once() {
    let server = SmtpServer::start();
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(eventos_memory::MemoryTransport::new());
    let mailer = Mailer::open(
        MailerConfig::new(dir.path()).smtp_url(server.url()),
        Bus::new(transport, school_mailer::SOURCE),
    )
    .await
    .unwrap();
    let req = request("concurrent-1");
    let (a, b) = tokio::join!(mailer.deliver(&req, 1), mailer.deliver(&req, 1));
    let mut outcomes = [a.unwrap(), b.unwrap()];
    outcomes.sort_by_key(|d| *d == Delivered::AlreadySent);
    assert_eq!(outcomes, [Delivered::Sent, Delivered::AlreadySent]);
    assert_eq!(
        mailer.deliver(&req, 2).await.unwrap(),
        Delivered::AlreadySent
    );
    assert_eq!(server.wait_for(1, WAIT).await.len(), 1);
    assert_eq!(mailer.store().unsent().await.unwrap(), 1, "one EmailSent");
}

/// Without the router: a failure is reported once, and a database failure
/// is an error (transient), so the router retries the reaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_reaction_is_reported_once_and_fails_loudly_without_its_database() {
    let dir = tempfile::tempdir().unwrap();
    let mailer = Mailer::open(
        MailerConfig::new(dir.path()),
        Bus::new(Arc::new(eventos_memory::MemoryTransport::new()), "/test"),
    )
    .await
    .unwrap();
    let req = request("reported-1");
    let failed = DeadLettered {
        event: Arc::new(Event::from_typed("/test/contact", &req).unwrap()),
        info: DeliveryInfo {
            topic: topics::MAIL_REQUESTS.into(),
            group: school_mailer::GROUP.into(),
            attempt: 6,
        },
        reason: "retries exhausted after 6 attempts".to_owned(),
        error: "cannot send mail reported-1".to_owned(),
    };
    assert_eq!(
        mailer.on_dead_letter(&failed).await.unwrap(),
        Reported::Failed
    );
    assert_eq!(
        mailer.on_dead_letter(&failed).await.unwrap(),
        Reported::AlreadyReported
    );
    assert_eq!(mailer.store().unsent().await.unwrap(), 1, "one EmailFailed");

    let mut undecodable = failed.clone();
    undecodable.event = Arc::new(
        Event::builder("/test", EmailRequested::TYPE)
            .build()
            .unwrap(),
    );
    assert_eq!(
        mailer.on_dead_letter(&undecodable).await.unwrap(),
        Reported::Undecodable
    );

    mailer.store().close().await;
    let mut other = failed.clone();
    other.event = Arc::new(Event::from_typed("/test/contact", &request("reported-2")).unwrap());
    let error = mailer.on_dead_letter(&other).await.unwrap_err();
    assert!(matches!(error, MailerError::Store(_)), "{error}");
    assert!(error.is_transient());
    let error = mailer
        .deliver(&request("after-close"), 1)
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
}

#[test]
fn default_backoff_outlasts_a_day_of_refusals_on_average() {
    let policy = default_backoff();
    let ceilings: Vec<Duration> = (1..40).map(|a| policy.ceiling(a)).collect();
    assert_eq!(ceilings[..4], [1, 2, 4, 8].map(Duration::from_secs));
    assert_eq!(
        ceilings[39 - 1],
        Duration::from_secs(2 * 3600),
        "capped at 2 h"
    );
    // Full jitter draws each pause uniformly below its ceiling.
    let most: Duration = ceilings.iter().sum();
    let mean = most / 2;
    assert!(most > Duration::from_secs(54 * 3600), "{most:?}");
    assert!(mean > Duration::from_secs(26 * 3600), "{mean:?}");
    assert_eq!(
        policy.delay(40, &mut rand::rng()),
        None,
        "40 attempts in all"
    );
}
