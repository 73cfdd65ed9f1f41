//! The test SMTP server against a real client (lettre): accepts, refuses
//! with `451` and `550` on demand, and comes back on its port after a stop.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::Error as SmtpError;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use school_testkit::{Mode, SmtpServer};

const WAIT: Duration = Duration::from_secs(5);

fn client(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port())
        .timeout(Some(Duration::from_secs(5)))
        .build()
}

fn message(subject: &str) -> Message {
    Message::builder()
        .from("School <school@example.org>".parse().unwrap())
        .to("Ana <ana@example.org>".parse().unwrap())
        .reply_to("office@example.org".parse().unwrap())
        .message_id(Some("<m-1@eventos>".to_owned()))
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body("Olá, Ana.\nSee you on Monday.".to_owned())
        .unwrap()
}

async fn send(server: &SmtpServer, subject: &str) -> Result<(), SmtpError> {
    client(server).send(message(subject)).await.map(|_| ())
}

#[tokio::test]
async fn accepted_message_is_kept_with_headers_body_and_envelope() {
    let server = SmtpServer::start();
    assert!(server.url().starts_with("smtp://127.0.0.1:"));
    send(&server, "Inscrição confirmada").await.unwrap();

    let mails = server.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.subject.as_deref(), Some("Inscrição confirmada"));
    assert_eq!(mail.message_id.as_deref(), Some("m-1@eventos"));
    assert_eq!(mail.from_addresses(), ["school@example.org"]);
    assert_eq!(mail.to_addresses(), ["ana@example.org"]);
    assert_eq!(mail.to[0].name.as_deref(), Some("Ana"));
    assert_eq!(mail.reply_to_addresses(), ["office@example.org"]);
    assert_eq!(mail.body, "Olá, Ana.\nSee you on Monday.");
    assert!(mail.header("Date").is_some());
    let envelope = mail.envelope.as_ref().unwrap();
    assert_eq!(envelope.mail_from, "school@example.org");
    assert_eq!(envelope.rcpt_tos, ["ana@example.org"]);
    assert!(server.rejected().is_empty());
}

#[tokio::test]
async fn tempfail_answers_451_until_switched_back() {
    let server = SmtpServer::start();
    server.set_mode(Mode::TempFail);
    let error = send(&server, "first").await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert_eq!(
        error.status().map(|c| c.to_string()).as_deref(),
        Some("451")
    );
    assert_eq!(server.rejected().len(), 1);
    assert!(server.messages().is_empty());

    server.set_mode(Mode::Accept);
    send(&server, "second").await.unwrap();
    let mails = server.wait_for(1, WAIT).await;
    assert_eq!(mails[0].subject.as_deref(), Some("second"));
}

#[tokio::test]
async fn permfail_answers_550() {
    let server = SmtpServer::start();
    server.set_mode(Mode::PermFail);
    let error = send(&server, "refused").await.unwrap_err();
    assert!(error.is_permanent(), "{error}");
    assert_eq!(
        error.status().map(|c| c.to_string()).as_deref(),
        Some("550")
    );
    let rejected = server.wait_for_rejected(1, WAIT).await;
    assert_eq!(rejected[0].subject.as_deref(), Some("refused"));
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn stopped_server_refuses_connections_and_restarts_on_the_same_port() {
    let mut server = SmtpServer::start();
    let port = server.port();
    send(&server, "before").await.unwrap();

    server.stop();
    assert!(!server.is_running());
    let error = send(&server, "while down").await.unwrap_err();
    // A refused connection is neither a 4xx nor a 5xx answer.
    assert!(!error.is_transient() && !error.is_permanent(), "{error}");

    server.set_mode(Mode::Accept);
    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    send(&server, "after").await.unwrap();
    let mails = server.wait_for(2, WAIT).await;
    let subjects: Vec<_> = mails.iter().filter_map(|m| m.subject.as_deref()).collect();
    assert_eq!(subjects, ["before", "after"]);
}

#[tokio::test]
async fn wait_for_panics_with_the_count_when_too_few_arrive() {
    let server = SmtpServer::start();
    let waited = tokio::spawn(async move {
        server.wait_for(1, Duration::from_millis(100)).await;
    })
    .await;
    let panic = waited.unwrap_err().into_panic();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("accepted 0 messages"), "{message}");
}

#[test]
fn drop_kills_the_server() {
    let server = SmtpServer::start();
    let port = server.port();
    drop(server);
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(refused.is_err(), "something still listens on {port}");
}
