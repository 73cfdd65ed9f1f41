//! `eventos bench accept`: how fast a running system answers "accepted",
//! against what its HTTP edge can do at all.
//!
//! Each case keeps a fixed number of clients busy over loopback, one
//! keep-alive HTTP/1.1 connection each, sending the next request as soon
//! as the last is answered. `GET /healthz` goes first: it touches no
//! database, so its numbers are the edge's and the machine's, measured in
//! the same run; POST /contact and POST /enrollments are reported next to
//! it. The syncs each accepted message cost come from the system's own
//! counters on `/metrics` (the stores' commits and checkpoints, the log's
//! fdatasyncs, the mail files' syncs), read before and after the case.
//!
//! The `pipeline` case sends contact messages the same way and follows
//! them to the end: each is done when its `email_sent` has come back to
//! the contact service (the system's own delivery counter). Once a second
//! it prints what was accepted, what was done and the backlog between
//! them, so a backlog that grows shows; after the load it waits for the
//! backlog to drain, and its syncs per message cover the whole pipeline.
//!
//! The last line is one `key=value` summary for scripts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

/// Options of `eventos bench accept`.
#[derive(Debug, clap::Args)]
pub(crate) struct AcceptBenchArgs {
    /// The running system (`eventos up`), as host:port or http://host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Clients sending at once, each on its own connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    clients: u64,
    /// Seconds each case runs (`pipeline`: the seconds of load, then the
    /// drain).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// The cases to run, in order; `healthz` is the baseline the others are
    /// compared with; `pipeline` follows contact messages until their
    /// mail is sent (not run by default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "healthz,contact,enrollments"
    )]
    cases: Vec<Target>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    /// GET /healthz: the edge alone.
    Healthz,
    /// POST /contact: a contact message stored and its mail queued.
    Contact,
    /// POST /enrollments: an enrollment stored and its payment submitted.
    Enrollments,
    /// POST /contact, followed until each message's mail is sent and back
    /// on its timeline.
    Pipeline,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Self::Healthz => "GET /healthz",
            Self::Contact => "POST /contact",
            Self::Enrollments => "POST /enrollments",
            Self::Pipeline => "contact pipeline",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Healthz => "healthz",
            Self::Contact => "contact",
            Self::Enrollments => "enrollments",
            Self::Pipeline => "pipeline",
        }
    }

    /// The `n`th request of client `client`; every body differs, as real
    /// traffic does (and as the anti-fraud history needs).
    fn request(self, authority: &str, client: u64, n: u64) -> hyper::Request<Full<Bytes>> {
        let builder = hyper::Request::builder().header(hyper::header::HOST, authority);
        let (builder, body) = match self {
            Self::Healthz => (builder.method("GET").uri("/healthz"), String::new()),
            Self::Contact | Self::Pipeline => (
                builder.method("POST").uri("/contact"),
                serde_json::json!({
                    "name": "Ana Lima",
                    "email": format!("ana.{client}.{n}@example.com"),
                    "subject": format!("Question {n}"),
                    "message": "Is there a Rust course on Friday evenings?",
                })
                .to_string(),
            ),
            Self::Enrollments => (
                builder
                    .method("POST")
                    .uri("/enrollments")
                    .header("idempotency-key", format!("bench-{}-{client}-{n}", std::process::id())),
                serde_json::json!({
                    "student": {"name": "Bruno Costa", "email": format!("bruno.{client}.{n}@example.com")},
                    "course_id": "rust-101",
                    "payment": {
                        "card_number": "4242 4242 4242 4242", "expiry": "12/30", "cvv": "123",
                        "holder": "Bruno Costa", "amount_cents": 49_900, "currency": "EUR"
                    }
                })
                .to_string(),
            ),
        };
        let builder = if body.is_empty() {
            builder
        } else {
            builder.header(hyper::header::CONTENT_TYPE, "application/json")
        };
        builder
            .body(Full::new(Bytes::from(body)))
            .expect("a request built from constants")
    }
}

/// What one case measured.
struct Measured {
    target: Target,
    ok: u64,
    refused: u64,
    elapsed: Duration,
    /// Microseconds per answered request, sorted.
    latencies: Vec<u32>,
    /// Syncs during the case (stores' commits, two per checkpoint, log
    /// syncs); `None` when the system does not report them.
    syncs: Option<u64>,
}

impl Measured {
    #[allow(clippy::cast_precision_loss)]
    fn per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        Duration::from_micros(u64::from(self.latencies[i]))
    }

    #[allow(clippy::cast_precision_loss)]
    fn syncs_per_message(&self) -> Option<f64> {
        let syncs = self.syncs?;
        (self.ok > 0).then(|| syncs as f64 / self.ok as f64)
    }
}

pub(crate) async fn run(args: AcceptBenchArgs) -> anyhow::Result<()> {
    let authority = args
        .target
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let addr = tokio::net::lookup_host(&authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| {
            format!("cannot resolve {authority}: pass --target host:port of a running `eventos up`")
        })?;
    // One request first, so a wrong address fails in one line, not in
    // sixteen clients' errors.
    let mut probe = Client::connect(addr, &authority).await.with_context(|| {
        format!("nothing answers on {authority}: start the system (`eventos up`) or pass --target")
    })?;
    let status = probe
        .send(Target::Healthz.request(&authority, 0, 0))
        .await
        .with_context(|| format!("{authority} does not answer GET /healthz"))?;
    anyhow::ensure!(
        status.is_success(),
        "{authority} answers GET /healthz with {status}: is it an eventos system?"
    );
    let duration = Duration::from_secs(args.seconds);
    println!(
        "bench accept: {} clients, {} s per case, against http://{authority}",
        args.clients, args.seconds
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>12} {:>11}",
        "case", "req/s", "p50", "p99", "p99/healthz", "syncs/msg"
    );
    let mut results: Vec<Measured> = Vec::new();
    let mut followed = None;
    drop(probe);
    for &target in &args.cases {
        let before = syncs(addr, &authority).await;
        let accepted = Arc::new(AtomicU64::new(0));
        let follow = (target == Target::Pipeline).then(|| {
            tokio::spawn(follow(
                addr,
                authority.clone(),
                Arc::clone(&accepted),
                duration,
            ))
        });
        let mut m = load(addr, &authority, target, args.clients, duration, &accepted).await?;
        if let Some(follow) = follow {
            followed = Some(follow.await.context("the pipeline follower panicked")??);
        }
        let after = syncs(addr, &authority).await;
        m.syncs = before.zip(after).map(|(b, a)| a.saturating_sub(b));
        let baseline = results
            .iter()
            .find(|r| r.target == Target::Healthz)
            .map(|h| h.quantile(0.99));
        print_row(&m, baseline);
        if m.refused > 0 {
            println!("{:<20} {} requests were not answered 2xx", "", m.refused);
        }
        results.push(m);
    }
    let mut summary = format!("clients={} seconds={}", args.clients, args.seconds);
    for m in &results {
        let key = m.target.key();
        summary.push_str(&format!(
            " {key}_per_s={:.0} {key}_p50_ms={:.3} {key}_p99_ms={:.3}",
            m.per_s(),
            m.quantile(0.5).as_secs_f64() * 1e3,
            m.quantile(0.99).as_secs_f64() * 1e3,
        ));
        if m.target != Target::Healthz
            && let Some(s) = m.syncs_per_message()
        {
            summary.push_str(&format!(" {key}_syncs_per_msg={s:.3}"));
        }
    }
    if let Some(f) = &followed {
        summary.push_str(&format!(
            " pipeline_done_per_s={:.0} pipeline_backlog_end={} pipeline_backlog_max={} pipeline_drain_s={:.1}",
            f.done_per_s, f.backlog_end, f.backlog_max, f.drain.as_secs_f64()
        ));
    }
    println!("{summary}");
    Ok(())
}

fn print_row(m: &Measured, healthz_p99: Option<Duration>) {
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let ratio = match healthz_p99 {
        Some(h) if m.target != Target::Healthz && !h.is_zero() => {
            format!("{:.2}x", m.quantile(0.99).as_secs_f64() / h.as_secs_f64())
        }
        _ => "-".into(),
    };
    let syncs = match (m.target, m.syncs_per_message()) {
        (Target::Healthz, _) | (_, None) => "-".into(),
        (_, Some(s)) => format!("{s:.3}"),
    };
    println!(
        "{:<20} {:>10.0} {:>10} {:>10} {:>12} {:>11}",
        m.target.label(),
        m.per_s(),
        ms(m.quantile(0.5)),
        ms(m.quantile(0.99)),
        ratio,
        syncs
    );
}

/// Runs `clients` clients against `target` for `duration`.
async fn load(
    addr: std::net::SocketAddr,
    authority: &str,
    target: Target,
    clients: u64,
    duration: Duration,
    accepted: &Arc<AtomicU64>,
) -> anyhow::Result<Measured> {
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let authority = authority.to_owned();
        let refused = Arc::clone(&refused);
        let accepted = Arc::clone(accepted);
        tasks.spawn(async move {
            let mut conn = Client::connect(addr, &authority).await?;
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut n = 0;
            while Instant::now() < deadline {
                let request = target.request(&authority, client, n);
                n += 1;
                let sent = Instant::now();
                let status = conn.send(request).await?;
                let took = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                if status.is_success() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    latencies.push(took);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.context("a client panicked")??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Measured {
        target,
        ok: latencies.len() as u64,
        refused: refused.load(Ordering::Relaxed),
        elapsed,
        latencies,
        syncs: None,
    })
}

/// How the pipeline kept up with what was accepted.
struct Followed {
    /// Messages done per second of load.
    done_per_s: f64,
    /// Accepted but not done when the load stopped.
    backlog_end: u64,
    /// The largest backlog seen at a once-a-second look.
    backlog_max: u64,
    /// From the end of the load until every accepted message was done.
    drain: Duration,
}

/// How long the pipeline may take to finish what was accepted before the
/// bench gives up on it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

/// Watches the pipeline while `accepted` grows for `duration`, then until
/// it has done every accepted message; prints a line a second.
async fn follow(
    addr: std::net::SocketAddr,
    authority: String,
    accepted: Arc<AtomicU64>,
    duration: Duration,
) -> anyhow::Result<Followed> {
    let mut client = Client::connect(addr, &authority).await?;
    let base = contact_done(&mut client).await.context(
        "the system does not report contact mail coming back on /metrics; is it an eventos system?",
    )?;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let (mut last_accepted, mut last_done) = (0, 0);
    let mut backlog_max = 0;
    let mut backlog_end = None;
    let mut done_at_end = 0;
    println!(
        "{:>6} {:>12} {:>12} {:>10}",
        "t", "accepted/s", "done/s", "backlog"
    );
    loop {
        ticks.tick().await;
        let now = accepted.load(Ordering::Relaxed);
        let done = contact_done(&mut client)
            .await
            .context("lost /metrics while following the pipeline")?
            .saturating_sub(base);
        let backlog = now.saturating_sub(done);
        let t = started.elapsed();
        let loading = t <= duration + Duration::from_millis(500);
        if loading {
            backlog_max = backlog_max.max(backlog);
        } else if backlog_end.is_none() {
            backlog_end = Some(backlog);
            done_at_end = done;
        }
        println!(
            "{:>5.0}s {:>12} {:>12} {:>10}",
            t.as_secs_f64(),
            now - last_accepted,
            done.saturating_sub(last_done),
            backlog
        );
        (last_accepted, last_done) = (now, done);
        if !loading && backlog == 0 {
            #[allow(clippy::cast_precision_loss)]
            return Ok(Followed {
                done_per_s: done_at_end as f64 / duration.as_secs_f64(),
                backlog_end: backlog_end.unwrap_or(0),
                backlog_max,
                drain: t.saturating_sub(duration),
            });
        }
        anyhow::ensure!(
            t < duration + DRAIN_DEADLINE,
            "the pipeline still had {backlog} messages to do {} s after the load stopped",
            DRAIN_DEADLINE.as_secs()
        );
    }
}

/// Mail outcomes the contact service has taken in: one per contact
/// message whose mail was sent.
async fn contact_done(client: &mut Client) -> Option<u64> {
    let text = client.get("bench", "/metrics").await.ok()?;
    if !text.contains("eventos_store_commits_total") {
        return None;
    }
    // No line yet: nothing has come back since the system started.
    Some(
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name.starts_with("eventos_deliveries_total{")
                    && name.contains(r#"topic="school.mail.sent""#)
                    && name.contains(r#"group="contact""#)
                    && name.contains(r#"outcome="ack""#))
                .then(|| value.parse().ok())
                .flatten()
            })
            .unwrap_or(0),
    )
}

/// One keep-alive HTTP/1.1 connection.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, authority: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    /// Sends `request` and reads the whole answer; its status.
    async fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> anyhow::Result<hyper::StatusCode> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }

    async fn get(&mut self, authority: &str, path: &str) -> anyhow::Result<String> {
        let request = hyper::Request::builder()
            .uri(path)
            .header(hyper::header::HOST, authority)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// The syncs the system has made so far, from its `/metrics`: every
/// store's commits and (two syncs each) checkpoints, the log's
/// fdatasyncs, and the syncs of mail written to files. `None` if the system does not report them.
///
/// A connection of its own each time: one kept between cases would have
/// been closed by the server as idle.
async fn syncs(addr: std::net::SocketAddr, authority: &str) -> Option<u64> {
    let mut client = Client::connect(addr, authority).await.ok()?;
    let text = client.get(authority, "/metrics").await.ok()?;
    let mut total = None;
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let weight = match name.split('{').next() {
            Some(
                "eventos_store_commits_total"
                | "eventos_log_syncs_total"
                | "school_mail_file_syncs_total",
            ) => 1,
            Some("eventos_store_checkpoints_total") => 2,
            _ => continue,
        };
        if let Ok(v) = value.parse::<u64>() {
            *total.get_or_insert(0) += weight * v;
        }
    }
    total
}
