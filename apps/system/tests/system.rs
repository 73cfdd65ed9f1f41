//! The wired system over real HTTP on the embedded log.

use std::time::Duration;

use school_system::{SystemConfig, start};

#[tokio::test]
async fn contact_round_trip_over_http_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = SystemConfig::new(dir.path());
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.transport = "log".to_owned();
        c
    };
    let system = start(config()).await.unwrap();
    let base = format!("http://{}", system.addr());
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = http
        .post(format!("{base}/contact"))
        .json(&serde_json::json!({"name": "Ana", "email": "ana@example.com", "subject": "Visit", "message": "Friday?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "queued");

    let view: serde_json::Value = http
        .get(format!("{base}{location}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["timeline"][0]["type"], "received");

    let missing = http
        .get(format!("{base}/no/such/path"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );

    // The relay publishes the mail request, and /metrics shows it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("eventos_outbox_published_total{topic=\"school.mail.requests\"}") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never reported publishing: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    system.shutdown().await.unwrap();

    // Everything is where it was after a restart on the same directory.
    let system = start(config()).await.unwrap();
    let base = format!("http://{}", system.addr());
    let view: serde_json::Value = http
        .get(format!("{base}{location}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["timeline"][0]["type"], "received");
    // Without SMTP the mail is written as an .eml file, and the message
    // becomes `sent`, whichever run of the system got there.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view: serde_json::Value = http
            .get(format!("{base}{location}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["status"] == "sent" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never sent: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let eml = std::fs::read_dir(dir.path().join("mail"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "eml")
        })
        .count();
    assert_eq!(eml, 1, "one mail, however many restarts");
    system.shutdown().await.unwrap();
}

/// The memory transport runs the same system: an approved enrollment ends
/// active and its welcome mail is written as an `.eml` file.
#[tokio::test]
async fn enrollment_works_on_the_memory_transport_with_eml_mail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.antifraud.latency_ms = [0, 0];
    config.billing.gateway_latency_ms = [0, 0];
    let system = start(config).await.unwrap();
    let base = format!("http://{}", system.addr());
    let http = reqwest::Client::new();
    let accepted: serde_json::Value = http
        .post(format!("{base}/enrollments"))
        .json(&serde_json::json!({
            "student": {"name": "Ana Lima", "email": "ana@example.com"},
            "course_id": "rust-101",
            "payment": {"card_number": "4242424242424242", "expiry": "12/30", "cvv": "123",
                        "holder": "Ana Lima", "amount_cents": 100, "currency": "EUR"}
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let welcome = dir.path().join("mail").join(format!("welcome-{id}.eml"));
    loop {
        let view: serde_json::Value = http
            .get(format!("{base}/enrollments/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["status"] == "active" && welcome.exists() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mail = std::fs::read_to_string(&welcome).unwrap();
    assert!(mail.contains("Subject: Welcome to rust-101"), "{mail}");
    // Regression: data files were 0644 and directories 0755.
    #[cfg(unix)]
    {
        let open = not_owner_only(dir.path());
        assert!(open.is_empty(), "readable by others: {open:#?}");
    }
    system.shutdown().await.unwrap();
}

/// Every file under `dir` not 0600 and every directory not 0700.
#[cfg(unix)]
fn not_owner_only(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut found = Vec::new();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    if mode != 0o700 {
        found.push(format!("{} is {mode:o}", dir.display()));
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(not_owner_only(&path));
        } else if let Ok(meta) = std::fs::metadata(&path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode != 0o600 {
                found.push(format!("{} is {mode:o}", path.display()));
            }
        }
    }
    found
}

/// Regression: `--transport memory` took no lock on the data directory, so
/// two processes shared its databases.
#[tokio::test]
async fn a_data_directory_has_one_system_whatever_the_transport() {
    let dir = tempfile::tempdir().unwrap();
    let config = |transport: String| {
        let mut config = SystemConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.transport = transport;
        config
    };
    let first = start(config("memory".to_owned())).await.unwrap();
    for transport in ["memory".to_owned(), "log".to_owned()] {
        let e = start(config(transport.clone())).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("is in use by process")
                && text.contains("choose another with --data-dir")
                && !text.contains('\n'),
            "{transport:?}: {text}"
        );
    }
    first.shutdown().await.unwrap();
    let again = start(config("memory".to_owned())).await.unwrap();
    again.shutdown().await.unwrap();
}

/// A process runs only the services it is given: their endpoints and their
/// databases, nothing of the others.
#[tokio::test]
async fn a_process_runs_only_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.services = "contact,antifraud".parse().unwrap();
    let system = start(config).await.unwrap();
    let base = format!("http://{}", system.addr());
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    assert_eq!(get("/contact/nope").await.unwrap().status(), 404);
    let missing = get("/enrollments/nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    let problem: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(problem["type"], "/problems/no-route", "{problem}");
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    system.shutdown().await.unwrap();
    let mut dbs: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".db"))
        .collect();
    dbs.sort();
    assert_eq!(dbs, vec!["antifraud.db", "contact.db"]);
}

/// The mailer sends to bare addresses only; a school inbox it would refuse
/// stops the start instead of dead-lettering every contact message.
#[tokio::test]
async fn a_school_inbox_with_a_display_name_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.services = "contact".parse().unwrap();
    config.school_inbox = "Admissions <admissions@school.example>".into();
    let Err(e) = start(config).await else {
        panic!("started with an unusable school inbox");
    };
    let text = format!("{e:#}");
    assert!(text.contains("mail.school_inbox"), "{text}");
}

/// Once shutdown starts, `/readyz` answers 503 while HTTP is still served
/// for the grace, so a load balancer stops routing here before
/// connections are refused; then the system stops.
#[tokio::test]
async fn readyz_answers_503_during_the_shutdown_grace() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.shutdown_grace = Duration::from_secs(30);
    let system = start(config).await.unwrap();
    let base = format!("http://{}", system.addr());
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(status("/readyz").await.unwrap(), 200);
    let stopping = tokio::spawn(system.shutdown());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if status("/readyz").await.unwrap() == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still answers 200 after shutdown began"
        );
        tokio::task::yield_now().await;
    }
    // Not ready, but serving: the grace has not run out.
    assert_eq!(status("/healthz").await.unwrap(), 200);
    assert!(!stopping.is_finished());
    stopping.abort();
}
