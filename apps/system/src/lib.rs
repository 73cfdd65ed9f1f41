//! The reference system, wired: every service of the school in one process
//! over one transport, behind one HTTP listener — enrollment, anti-fraud,
//! billing (with its simulated gateway), payment metrics, contact form,
//! mailer and notifier.
//!
//! This is the one place that names the concrete transports (invariant
//! 7), each in one line of [`transports`], the registry the settings'
//! `transport` URL is looked up in: the embedded durable log by default.
//! Each
//! service keeps its own SQLite database in the data directory and its own
//! outbox relay; the router runs every service's routes; axum serves every
//! service's endpoints plus `/healthz`, `/readyz` and `/metrics` (the
//! process's own metrics followed by the payment metrics, which the metrics
//! service keeps in its database so they survive restarts).
//!
//! [`Settings`] is the settings file (`eventos.toml`) with its
//! `EVENTOS_*` overrides.
//!
//! HTTP is served by the edge (`edge.rs`): header, body and request
//! timeouts, caps on connections, requests and event streams, each refusal
//! a problem answer.
//!
//! Shutdown runs in dependency order: stop accepting HTTP connections; then,
//! within one `shutdown_timeout`, close the HTTP connections (event streams
//! end, idle connections close, the rest after their answer, whatever is
//! left at the deadline is dropped) and drain the router (in-flight
//! deliveries finish and settle); stop the relays, close the transport.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod edge;
mod services;
mod settings;

pub use services::{Service, Services};
pub use settings::{HttpSettings, MailSettings, NotificationSettings, Settings, SettingsError};

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::routing::get;
use eventos::{Route, Router, Transport};
use eventos_kit::{Registry, Target};
use eventos_outbox::{Relay, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use school_antifraud::{Antifraud, AntifraudConfig};
use school_billing::{Billing, BillingConfig, SimulatedGateway};
use school_contact::{Contact, ContactConfig};
use school_enrollment::{Enrollment, EnrollmentConfig, FingerprintKey};
use school_http::Problem;
use school_metrics::Metrics;
use school_notifier::Notifier;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Every transport the system can run on, by URL scheme: one line each.
/// `log` (or a directory path) is the default.
pub fn transports() -> Registry {
    let registry = Registry::new()
        .with(eventos_log::LogEngine)
        .with(eventos_memory::MemoryEngine)
        .with(eventos_amqp::AmqpEngine)
        .with(eventos_nats::NatsEngine)
        .with(eventos_zmq::ZmqEngine);
    #[cfg(feature = "kafka")]
    let registry = registry.with(eventos_kafka::KafkaEngine);
    registry
}

/// How to run the system.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Where every database, the log and the mail files live.
    pub data_dir: PathBuf,
    /// The HTTP address.
    pub listen: SocketAddr,
    /// The transport, as [`transports`] knows it: `log`, `log:<dir>`, a
    /// directory path, `memory`, `amqp://user:pass@host:5672/%2f`.
    pub transport: String,
    /// Which services this process runs (all of them by default).
    pub services: Services,
    /// The transports' settings sections by name (`amqp`), each read by
    /// the transport it belongs to.
    pub transport_options: BTreeMap<String, serde_json::Value>,
    /// Where contact messages are mailed: a bare `local@domain` (no display
    /// name), as `school_http::EmailAddress` parses it.
    pub school_inbox: String,
    /// How long in-flight work may take to finish on shutdown: HTTP
    /// connections and deliveries each drain within it, side by side.
    pub shutdown_timeout: Duration,
    /// How long, once shutdown starts, the system keeps serving while
    /// `/readyz` answers 503, so a load balancer stops sending it requests
    /// before connections are refused. Zero (the default) stops at once.
    pub shutdown_grace: Duration,
    /// The HTTP edge's timeouts and limits.
    pub http: HttpSettings,
    /// The SMTP server (`smtp://host:port`); without one, mail is written
    /// as `.eml` files into `<data-dir>/mail/`.
    pub smtp: Option<String>,
    /// The mailer's retry policy.
    pub mail_retry: eventos::Backoff,
    /// When the mailer pauses for an unreachable SMTP server, and how often
    /// it checks whether it is back.
    pub mail_breaker: eventos::middleware::Breaker,
    /// How long after a contact message is accepted its sender is told it
    /// has not gone out yet.
    pub still_trying_after: Duration,
    /// The key of notifications tokens, 64 hex digits; without one, the
    /// key in `<data-dir>/notifications.key` (generated on first run).
    pub notifications_key: Option<String>,
    /// The enrollment service.
    pub enrollment: EnrollmentConfig,
    /// The anti-fraud service.
    pub antifraud: AntifraudConfig,
    /// The billing service and its simulated gateway.
    pub billing: BillingConfig,
}

impl SystemConfig {
    /// Defaults: the log transport, `127.0.0.1:8080`, a 10 s drain.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            transport: "log".into(),
            services: Services::all(),
            transport_options: BTreeMap::new(),
            school_inbox: ContactConfig::default().school_inbox,
            shutdown_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::ZERO,
            http: HttpSettings::default(),
            smtp: None,
            mail_retry: school_mailer::default_backoff(),
            mail_breaker: school_mailer::default_breaker(),
            still_trying_after: ContactConfig::default().still_trying_after,
            notifications_key: None,
            enrollment: EnrollmentConfig::default(),
            antifraud: AntifraudConfig::default(),
            billing: BillingConfig::default(),
        }
    }
}

/// The system running in the background.
#[derive(Debug)]
pub struct System {
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl System {
    /// The address HTTP is served on (with the real port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it in order and waits until everything is closed.
    ///
    /// # Errors
    ///
    /// What went wrong while running or draining.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("the system task failed")?
    }
}

/// What the stores' writers and the log have synced, in the Prometheus
/// text format: `eventos bench accept` divides these by the messages
/// accepted to report the syncs each one cost.
fn durability_metrics(stores: &[Store]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(text, "{name}{labels} {value}");
        }
    };
    let per_store = |value: fn(&eventos_outbox::StoreStats) -> u64| -> Vec<(String, u64)> {
        stores
            .iter()
            .map(|s| (format!("{{store=\"{}\"}}", s.name()), value(&s.stats())))
            .collect()
    };
    counter(
        "eventos_store_commits_total",
        "Rounds the store's writer committed, one sync of its write-ahead log each.",
        &per_store(|s| s.commits),
    );
    counter(
        "eventos_store_unsynced_commits_total",
        "Rounds of writes that need no sync of their own (the relay's marks), committed without one.",
        &per_store(|s| s.unsynced_commits),
    );
    counter(
        "eventos_store_writes_total",
        "Writes committed (many per round under load).",
        &per_store(|s| s.writes),
    );
    counter(
        "eventos_store_failed_writes_total",
        "Writes refused, by their own error or their round's.",
        &per_store(|s| s.failed_writes),
    );
    counter(
        "eventos_store_checkpoints_total",
        "Background checkpoints of the write-ahead log.",
        &per_store(|s| s.checkpoints),
    );
    text
}

/// The process-wide Prometheus recorder (a recorder can be installed once).
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only its own registry"
            );
        }
        handle
    })
}

/// Opens everything, starts the router, the relays and HTTP, and returns
/// once the system accepts requests.
///
/// # Errors
///
/// If the data directory, a database, the transport or the listen address
/// cannot be opened — each with what to do about it.
pub async fn start(config: SystemConfig) -> anyhow::Result<System> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}; choose another with --data-dir",
            config.data_dir.display()
        )
    })?;
    owner_only_dir(&config.data_dir)?;
    // Held until the system task ends: one process per data directory,
    // whatever the transport (the log locks its own directory too, but
    // the databases beside it are shared by every transport).
    let dir_lock = lock_data_dir(&config.data_dir)?;
    let metrics = prometheus().clone();
    let limits = edge::Limits::new(&config.http)?;
    // One count for every streaming endpoint, so the limits hold across them.
    let sse = school_http::SseStreams::new(config.http.sse_limits());
    let registry = transports();
    let engine = registry
        .lookup(&config.transport)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = Target {
        url: &config.transport,
        data_dir: &config.data_dir,
        options: engine
            .section()
            .and_then(|section| config.transport_options.get(section)),
    };
    let opened = engine
        .open(target)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let transport: Arc<dyn Transport> = opened.transport;
    // The engine's own counters (the log's syncs), beside the stores' on
    // /metrics.
    let transport_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>> =
        opened.metrics.map(Arc::from);
    let open = |name: &str| config.data_dir.join(format!("{name}.db"));
    let store = |name: &'static str| {
        let path = open(name);
        async move {
            Store::open(&path)
                .await
                .with_context(|| format!("opening the {name} database {}", path.display()))
        }
    };
    // Each service keeps its state in this process's data directory; a
    // service it does not run leaves no database behind.
    let mut stores: Vec<Store> = Vec::new();
    let mut routes: Vec<Route> = Vec::new();
    let mut http = axum::Router::new();
    let mut payment_metrics: Option<Metrics> = None;
    let mut delay_notices: Option<school_contact::Contact> = None;
    // One key for the services that issue notifications tokens (contact,
    // enrollment) and the one that checks them (the notifier), so the
    // notifier never asks another service whether a token is good.
    let notifications_key = match &config.notifications_key {
        Some(hex) => school_http::NotificationKey::from_hex(hex)
            .context("the [notifications] token_key setting")?,
        None => school_http::NotificationKey::load_or_create(
            &config.data_dir.join("notifications.key"),
        )?,
    };
    for service in config.services.iter() {
        match service {
            Service::Enrollment => {
                let key = match &config.enrollment.card_fingerprint_key {
                    Some(hex) => FingerprintKey::from_hex(hex)
                        .context("the [enrollment] card_fingerprint_key setting")?,
                    None => FingerprintKey::load_or_create(
                        &config.data_dir.join("card-fingerprint.key"),
                    )?,
                };
                let enrollment =
                    Enrollment::new(store("enrollment").await?, key, config.enrollment.mode)
                        .await
                        .context("migrating the enrollment database")?
                        .with_sse(sse.clone())
                        .with_notifications_key(notifications_key.clone());
                stores.push(enrollment.store().clone());
                routes.extend(enrollment.routes());
                http = http.merge(enrollment.http());
            }
            Service::Antifraud => {
                let antifraud = Antifraud::new(store("antifraud").await?, config.antifraud.clone())
                    .await
                    .context("migrating the antifraud database")?;
                stores.push(antifraud.store().clone());
                routes.extend(antifraud.routes());
            }
            Service::Billing => {
                let ledger = config
                    .billing
                    .gateway_ledger
                    .clone()
                    .unwrap_or_else(|| open("gateway"));
                let gateway = SimulatedGateway::open(&ledger, config.billing.gateway_latency_ms)
                    .await
                    .with_context(|| {
                        format!(
                            "opening the simulated payment gateway's ledger {}",
                            ledger.display()
                        )
                    })?;
                let billing = Billing::new(
                    store("billing").await?,
                    Arc::new(gateway),
                    config.billing.clone(),
                )
                .await
                .context("migrating the billing database")?;
                stores.push(billing.store().clone());
                routes.extend(billing.routes());
            }
            Service::Metrics => {
                let metrics = Metrics::new(store("metrics").await?)
                    .await
                    .context("migrating the metrics database")?;
                stores.push(metrics.store().clone());
                routes.extend(metrics.routes());
                payment_metrics = Some(metrics);
            }
            Service::Contact => {
                // Checked here, not at the first message: the mailer would
                // refuse every mail to it, one dead letter at a time.
                let school_inbox = school_http::EmailAddress::parse(config.school_inbox.trim())
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "the school inbox {:?} is not usable: {e}; set mail.school_inbox",
                            config.school_inbox
                        )
                    })?;
                let contact = Contact::new(
                    store("contact").await?,
                    ContactConfig {
                        school_inbox: school_inbox.to_string(),
                        still_trying_after: config.still_trying_after,
                        notifications_key: notifications_key.clone(),
                    },
                )
                .await
                .context("migrating the contact database")?;
                stores.push(contact.store().clone());
                delay_notices = Some(contact.clone());
                routes.extend(contact.routes());
                http = http.merge(contact.http());
            }
            Service::Mailer => {
                let mut mail_config = school_mailer::MailerConfig::new(&config.data_dir)
                    .circuit_breaker(config.mail_breaker.clone());
                if let Some(url) = &config.smtp {
                    mail_config = mail_config.smtp_url(url.clone());
                }
                let mailer = school_mailer::Mailer::open(
                    mail_config,
                    eventos::Bus::new(transport.clone(), school_mailer::SOURCE),
                )
                .await
                .context("starting the mailer")?;
                stores.push(mailer.store().clone());
                routes.push(school_mailer::route(mailer, config.mail_retry));
            }
            Service::Notifier => {
                let notifier = Notifier::new(store("notifier").await?, notifications_key.clone())
                    .await
                    .context("migrating the notifier database")?
                    .with_sse(sse.clone());
                stores.push(notifier.store().clone());
                routes.extend(notifier.routes());
                http = http.merge(notifier.http());
            }
        }
    }
    let router = routes
        .into_iter()
        .fold(Router::new(transport.clone()), Router::route)
        .shutdown_timeout(config.shutdown_timeout);
    let running = router.start().await.context("subscribing the services")?;

    let stop = CancellationToken::new();
    let mut relays = JoinSet::new();
    let store_stats = stores.clone();
    for store in stores {
        let relay = Relay::new(store, transport.clone());
        let stop = stop.clone();
        relays.spawn(async move { relay.run(stop.cancelled_owned()).await });
    }
    if let Some(contact) = delay_notices {
        let stop = stop.clone();
        relays.spawn(async move { contact.run_delay_notices(stop.cancelled_owned()).await });
    }

    let ready = Arc::new(AtomicBool::new(true));
    let writable = Arc::new(WriteProbe::new(config.data_dir.clone()));
    let streams = sse.clone();
    let app = http
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get({
                let ready = ready.clone();
                move || async move {
                    if !ready.load(Ordering::Acquire) {
                        return Err(Problem::unavailable("the service is shutting down"));
                    }
                    writable.check().await?;
                    Ok((StatusCode::OK, "ready\n"))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                let payment_metrics = payment_metrics.clone();
                let streams = streams.live();
                let mut durability = durability_metrics(&store_stats);
                if let Some(engine) = &transport_metrics {
                    durability.push_str(&engine());
                }
                async move {
                    let mut text = metrics.render();
                    text.push_str(&durability);
                    // Counted per system, not through the process-wide
                    // recorder, so that each system shows its own.
                    text.push_str(&format!(
                        "# HELP school_sse_streams Event streams open now.\n# TYPE school_sse_streams gauge\nschool_sse_streams {streams}\n"
                    ));
                    if let Some(payments) = payment_metrics {
                        match payments.render().await {
                            Ok(payments) => text.push_str(&payments),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the payment metrics");
                            }
                        }
                    }
                    text
                }
            }),
        )
        .fallback(school_http::not_found)
        .layer(axum::middleware::from_fn(school_http::refuse_oversize_body));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; is another process using it? choose another with --listen",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let http_stop = CancellationToken::new();
    let begun = stop.clone();
    let shutdown_timeout = config.shutdown_timeout;
    let shutdown_grace = config.shutdown_grace;
    let task = tokio::spawn(async move {
        // HTTP and the router drain side by side, so one deadline bounds
        // both: requests commit to the outbox and never wait on a delivery.
        let ((), drained) = tokio::join!(
            edge::serve(
                listener,
                app,
                limits,
                sse,
                http_stop.clone(),
                shutdown_timeout
            ),
            async {
                begun.cancelled().await;
                // Not ready first, while still serving: whoever routes
                // requests here sees the 503 and stops before connections
                // are refused.
                ready.store(false, Ordering::Release);
                tokio::time::sleep(shutdown_grace).await;
                http_stop.cancel();
                running.shutdown().await
            }
        );
        while relays.join_next().await.is_some() {}
        transport.close().await.context("closing the transport")?;
        drained.context("draining the router")?;
        drop(dir_lock);
        Ok(())
    });
    Ok(System { addr, stop, task })
}

/// Whether the data directory takes writes, checked by writing: 64 KiB,
/// synced, then removed. Every database, the log and the mail files live
/// there, so a full or failing disk shows here first; `/readyz` answers
/// 503 while it does. One check at a time, and its answer is kept for
/// half a second, so a busy health checker costs one sync a second at most.
struct WriteProbe {
    dir: PathBuf,
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl WriteProbe {
    const FRESH: Duration = Duration::from_millis(500);

    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn check(&self) -> Result<(), Problem> {
        let mut last = self.last.lock().await;
        let result = match &*last {
            Some((at, result)) if at.elapsed() < Self::FRESH => result.clone(),
            _ => {
                let dir = self.dir.clone();
                let result = tokio::task::spawn_blocking(move || probe_write(&dir))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "the data directory does not take writes; not ready");
                }
                *last = Some((tokio::time::Instant::now(), result.clone()));
                result
            }
        };
        result.map_err(|_| {
            Problem::unavailable(
                "the service cannot store anything right now (its disk is full or failing); free space and it recovers by itself",
            )
        })
    }
}

fn probe_write(dir: &Path) -> Result<(), String> {
    use std::io::Write as _;
    let path = dir.join(".write-probe");
    let written = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&[0u8; 64 * 1024])?;
        file.sync_data()
    })();
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("cannot write to {}: {e}", dir.display()))
}

/// Makes the data directory owner-only (0700): it holds every database,
/// the log, the mail and the keys.
fn owner_only_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
            || {
                format!(
                    "cannot make the data directory {} private; check that you own it",
                    dir.display()
                )
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Takes `<data-dir>/LOCK` (an advisory lock the OS drops when the process
/// dies) and writes who holds it, for the next one's error.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("LOCK");
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process",
                h => h,
            };
            anyhow::bail!(
                "the data directory {} is in use by {holder}; stop it or choose another with --data-dir",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let me = format!("process {}", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(me.as_bytes()))
        .with_context(|| format!("cannot write the lock file {}", path.display()))?;
    Ok(file)
}

/// Runs the system until `shutdown` completes, then stops it in order.
///
/// # Errors
///
/// As [`start`] and [`System::shutdown`].
pub async fn run(
    config: SystemConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let system = start(config).await?;
    shutdown.await;
    system.shutdown().await
}
