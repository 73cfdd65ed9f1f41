//! `eventos up`: the whole reference system in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use school_system::{Service, Services, Settings};

/// Which way enrollments are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ModeArg {
    /// "Your payment is being processed": active only once the fraud check
    /// passed and the charge was captured.
    AwaitPayment,
    /// Enrolled at once; suspended if the fraud check or the charge fails
    /// later.
    Optimistic,
}

/// Options of `eventos up`. Each flag overrides its environment variable,
/// which overrides the config file, which overrides the default.
#[derive(Debug, clap::Args)]
#[command(after_long_help = CONFIG_HELP)]
pub(crate) struct UpArgs {
    /// A TOML settings file with every knob (see below).
    #[arg(long, env = "EVENTOS_CONFIG")]
    config: Option<PathBuf>,
    /// Where the databases, the log and the mail files live
    /// [default: eventos-data].
    #[arg(long, env = "EVENTOS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The HTTP address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "EVENTOS_LISTEN")]
    listen: Option<SocketAddr>,
    /// SMTP server for outgoing mail, e.g. smtp://127.0.0.1:2525. Without
    /// one, mail is written as .eml files into <data-dir>/mail/.
    #[arg(long, env = "EVENTOS_SMTP", value_parser = parse_smtp)]
    smtp: Option<String>,
    /// The transport: `log` (default: the embedded durable log, one
    /// process; `log:<dir>` or a directory path to keep it elsewhere),
    /// `memory` (the fastest queue; it loses queued work if the process
    /// dies), a broker URL — amqp://guest:guest@127.0.0.1:5672/%2f,
    /// kafka://127.0.0.1:9092, nats://127.0.0.1:4222 — or
    /// zmq://127.0.0.1:5560, brokerless, the address this process
    /// publishes from (its peers in [zmq]). Services may then run in
    /// several processes: see `eventos serve`.
    #[arg(long, env = "EVENTOS_TRANSPORT", value_parser = parse_transport)]
    transport: Option<String>,
    /// How enrollments are answered [default: await-payment].
    #[arg(long, env = "EVENTOS_MODE", value_enum)]
    mode: Option<ModeArg>,
    /// Where contact-form messages are mailed
    /// [default: admissions@school.example].
    #[arg(long, env = "EVENTOS_SCHOOL_INBOX")]
    school_inbox: Option<String>,
    /// How long in-flight work may take to finish after Ctrl-C: HTTP
    /// connections still open then are dropped [default: 10s].
    #[arg(long, env = "EVENTOS_SHUTDOWN_TIMEOUT", value_parser = crate::demo::parse_duration)]
    shutdown_timeout: Option<Duration>,
}

const CONFIG_HELP: &str = "\
Settings file (--config eventos.toml), every key optional, defaults shown:

  data_dir = \"eventos-data\"
  listen = \"127.0.0.1:8080\"
  transport = \"log\"                 # or \"memory\", \"amqp://user:pass@host:5672/%2f\",
                                    # \"kafka://127.0.0.1:9092\",
                                    # \"nats://127.0.0.1:4222\",
                                    # \"zmq://127.0.0.1:5560\"
  # smtp = \"smtp://127.0.0.1:2525\"  # unset: .eml files in <data_dir>/mail
  shutdown_timeout_secs = 10        # HTTP connections and in-flight events
  shutdown_grace_ms = 0             # /readyz answers 503 this long before
                                    # HTTP stops: the load balancer's check
                                    # interval

  [http]                            # the HTTP edge; each refusal is a problem
  header_timeout_ms = 10000         # headers must arrive within it of the
                                    # connection's opening or last answer:
                                    # also the idle (keep-alive) timeout
  body_timeout_ms = 10000           # longest pause inside a body (408)
  request_timeout_ms = 30000        # headers to answer, body included (503)
  max_connections = 512             # more are answered 503 and closed; keep
                                    # it well under `ulimit -n`
  max_requests = 256                # answered at once; more get 503
  sse_per_client = 8                # event streams per client IP (429)
  sse_max_streams = 256             # event streams in all (503)
  sse_keep_alive_ms = 15000         # ping interval; finds clients gone

  [amqp]                            # when transport is an amqp:// URL
  namespace = \"eventos\"             # prefix of every exchange and queue
  queue_type = \"quorum\"             # or \"classic\"
  content_mode = \"binary\"           # or \"structured\" (both are read)
  # queue_expires_secs = 3600       # unset: never; if set, an unused queue
                                    # is deleted with its events (tests only)
  # management_url = \"http://guest:guest@127.0.0.1:15672\"
                                    # for counts and dead letters; unset:
                                    # port 15672 of the AMQP host

  [kafka]                           # when transport is a kafka:// URL
  partitions = 6                    # of the topics eventos creates
  replication_factor = 1            # 3 on a production cluster
  content_mode = \"binary\"           # or \"structured\" (both are read)
  # client = { \"linger.ms\" = \"5\" }  # librdkafka settings, passed through
  # namespace = \"staging\"           # prefix of every topic and group;
                                    # unset: the topics' own names

  [zmq]                             # when transport is zmq://HOST:PORT: the
                                    # address this process binds
  topology = \"publishers_bind\"     # it publishes from that address; or
                                    # \"consumers_bind\": its consumers' hub
  peers = []                        # the publishers it consumes from (or the
                                    # hubs it publishes to), e.g.
                                    # [\"tcp://10.0.0.2:5560\"]; empty: itself
  spool = \"memory\"                  # or \"log\": unacked events on disk,
                                    # kept across a restart
  # spool_dir = \"/var/lib/eventos/zmq\"  # unset: <data_dir>/zmq-spool
  heartbeat_ms = 500                # a consumer's pings to its publishers
  peer_timeout_ms = 5000            # silence after which a peer is gone:
                                    # what a consumer held goes back
  ack_timeout_secs = 300            # unsettled longer: back to the group
  join_timeout_ms = 5000            # a subscription waits this long for a
                                    # publisher's welcome, then goes on

  [mail]
  school_inbox = \"admissions@school.example\"
  retry_base_ms = 1000              # retries: exponential, full jitter;
  retry_cap_ms = 7200000            # a mail refused every time is given
  max_attempts = 40                 # up about a day after its first try
  breaker_failures = 5              # unreachable tries in a row that pause
  breaker_first_pause_ms = 1000     # the mailer; it then checks the server
  breaker_max_pause_ms = 60000      # (no mail tried) until it answers
  still_trying_after_ms = 3600000   # the sender of a contact message still
                                    # not sent is told once it is late

  [notifications]
  # token_key = \"<64 hex digits>\"  # unset: generated once, kept in
                                    # <data_dir>/notifications.key; processes
                                    # that run contact or enrollment apart
                                    # from the notifier need the same one

  [enrollment]
  mode = \"await_payment\"            # or \"optimistic\"
  # card_fingerprint_key = \"<64 hex digits>\"  # unset: generated once, kept
                                    # in <data_dir>/card-fingerprint.key

  [antifraud]
  latency_ms = [1000, 2000]         # simulated, uniformly random
  score_threshold = 70              # a score at or above it fails
  bin_deny_list = [\"410000\"]
  velocity_window_secs = 600
  max_per_card = 3                  # submissions per card in the window
  max_per_email = 5
  amount_review_cents = 200000
  amount_block_cents = 1000000
  disposable_domains = [\"mailinator.com\", ...]

  [billing]
  retry_base_ms = 500
  retry_cap_ms = 10000
  max_attempts = 8
  attempt_timeout_ms = 10000
  gateway_latency_ms = [100, 300]   # the simulated gateway
  # gateway_ledger = \"/shared/gateway.db\"  # unset: <data_dir>/gateway.db;
                                    # workers in several processes share one

Environment: a top-level key is EVENTOS_<KEY> (EVENTOS_DATA_DIR, ...); a key
in a section is EVENTOS_<SECTION>__<KEY>, e.g. EVENTOS_ANTIFRAUD__SCORE_THRESHOLD=80.

Test cards of the simulated gateway (any future expiry, any CVV):
  4242 4242 4242 4242  approved
  4000 0000 0000 0002  declined
  4000 0000 0000 9995  insufficient funds
  4000 0000 0000 0119  gateway timeout twice, then approved
  4100 0000 0000 0019  refused by anti-fraud (BIN on the deny list)";

fn parse_smtp(url: &str) -> Result<String, String> {
    if url.starts_with("smtp://") || url.starts_with("smtps://") {
        Ok(url.to_owned())
    } else {
        Err(format!(
            "{url:?} is not an SMTP URL: use smtp://host:port or smtps://host:port"
        ))
    }
}

/// The settings: defaults, the file, `EVENTOS_<SECTION>__<KEY>`, then the
/// flags (clap has already put their environment variables in them).
fn settings(args: UpArgs) -> anyhow::Result<Settings> {
    let mut s = Settings::load(args.config.as_deref(), std::env::vars())?;
    if let Some(v) = args.data_dir {
        s.data_dir = v;
    }
    if let Some(v) = args.listen {
        s.listen = v;
    }
    if let Some(v) = args.smtp {
        s.smtp = Some(v);
    }
    if let Some(v) = args.transport {
        s.transport = v;
    }
    if let Some(v) = args.mode {
        s.enrollment.mode = match v {
            ModeArg::AwaitPayment => school_events::AcceptanceMode::AwaitPayment,
            ModeArg::Optimistic => school_events::AcceptanceMode::Optimistic,
        };
    }
    if let Some(v) = args.school_inbox {
        s.mail.school_inbox = v;
    }
    if let Some(v) = args.shutdown_timeout {
        s.shutdown_timeout_secs = v.as_secs().max(1);
    }
    Ok(s)
}

/// Prints a status line. A closed stdout (the reader went away) must not
/// stop the system, least of all in the middle of a drain, so write errors
/// are ignored where `println!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Options of `eventos serve`: those of `up`, and which services to run.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The services this process runs, comma-separated: enrollment,
    /// antifraud, billing, metrics, contact, mailer, notifier (or all).
    /// Over RabbitMQ, processes running the same service share its work.
    #[arg(long, env = "EVENTOS_SERVICES")]
    services: Services,
    #[command(flatten)]
    up: UpArgs,
}

pub(crate) async fn up(args: UpArgs) -> anyhow::Result<()> {
    run("eventos up: the school is running", args, Services::all()).await
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    run(
        &format!("eventos serve: running {}", args.services),
        args.up,
        args.services,
    )
    .await
}

async fn run(title: &str, args: UpArgs, services: Services) -> anyhow::Result<()> {
    let settings = settings(args)?;
    let data_dir = settings.data_dir.clone();
    let smtp = settings.smtp.clone();
    let transport = settings.transport.clone();
    let mode = settings.enrollment.mode;
    let mut config = settings.into_config();
    config.services = services.clone();
    let system = school_system::start(config)
        .await
        .with_context(|| format!("cannot start the system in {}", data_dir.display()))?;
    let base = format!("http://{}", system.addr());
    say!("{title}");
    say!(
        "  transport  {}",
        school_system::transports()
            .lookup(&transport)
            .map(|engine| engine.describe(&eventos_kit::Target {
                url: &transport,
                data_dir: &data_dir,
                options: None,
            }))
            .unwrap_or_else(|e| e.to_string())
    );
    if services.contains(Service::Mailer) {
        say!(
            "  mail       {}",
            smtp.as_deref().map_or_else(
                || format!(".eml files in {}", data_dir.join("mail").display()),
                |url| format!("SMTP {url}")
            )
        );
    }
    if services.contains(Service::Enrollment) {
        say!(
            "  mode       {}",
            match mode {
                school_events::AcceptanceMode::AwaitPayment =>
                    "await_payment (active once the payment is captured)",
                school_events::AcceptanceMode::Optimistic =>
                    "optimistic (enrolled at once, suspended if the payment fails)",
            }
        );
        say!("  enrollments    POST {base}/enrollments   GET {base}/enrollments/{{id}}");
    }
    if services.contains(Service::Contact) {
        say!("  contact        POST {base}/contact");
    }
    if services.contains(Service::Notifier) {
        say!(
            "  notifications  GET  {base}/notifications?email=…&token=… (the token is in the answer to POST /contact or /enrollments)"
        );
    }
    say!("  health         GET  {base}/healthz   {base}/readyz");
    say!("  metrics        GET  {base}/metrics");
    say!("Ctrl-C drains in-flight work and stops.");
    eventos::shutdown_signal().await;
    say!("shutting down: draining in-flight work");
    system.shutdown().await?;
    say!("stopped");
    Ok(())
}

/// A transport the system knows; otherwise the known ones, in one line.
fn parse_transport(s: &str) -> Result<String, String> {
    let transports = school_system::transports();
    let engine = transports.lookup(s).map_err(|e| e.to_string())?;
    engine.check_url(s)?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings shown in `--help` are the real defaults: the example
    /// block parses as a settings file and changes nothing. (It shows
    /// `[kafka]`, which only a build with Kafka reads.)
    #[cfg(feature = "kafka")]
    #[test]
    fn the_help_shows_the_defaults() {
        let block: String = CONFIG_HELP
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("data_dir"))
            .take_while(|l| !l.starts_with("Environment"))
            .filter(|l| !l.contains("..."))
            .map(|l| format!("{}\n", l.split(" #").next().unwrap_or_default()))
            .collect();
        let dir = std::env::temp_dir().join(format!("eventos-help-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("eventos.toml");
        std::fs::write(&file, &block).unwrap();
        let mut shown = Settings::load(Some(&file), []).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // The transports' sections are their own, with their own defaults.
        let amqp = shown
            .transports
            .remove("amqp")
            .expect("the help shows [amqp]");
        let amqp_default = eventos_amqp::AmqpSection::default();
        assert_eq!(
            serde_json::from_value::<eventos_amqp::AmqpSection>(amqp).unwrap(),
            amqp_default,
            "{block}"
        );
        let kafka = shown
            .transports
            .remove("kafka")
            .expect("the help shows [kafka]");
        let engine = school_system::transports();
        let engine = engine.by_section("kafka").expect("a kafka engine");
        assert_eq!(engine.check_options(&kafka), Ok(()), "{block}");
        let zmq = shown
            .transports
            .remove("zmq")
            .expect("the help shows [zmq]");
        let registry = school_system::transports();
        let zmq_engine = registry.by_section("zmq").expect("a zmq engine");
        assert_eq!(zmq_engine.check_options(&zmq), Ok(()), "{block}");
        for key in serde_json::to_value(eventos_zmq::ZmqSection::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(
                CONFIG_HELP.contains(&format!("{key} =")),
                "[zmq] {key} is not in the help"
            );
        }
        for key in [
            "partitions",
            "replication_factor",
            "content_mode",
            "client",
            "namespace",
        ] {
            assert!(
                CONFIG_HELP.contains(&format!("{key} =")),
                "{key} is not in the help"
            );
        }
        assert_eq!(shown, Settings::default(), "{block}");
        assert!(block.contains("[antifraud]") && block.contains("gateway_latency_ms"));
        // Every key of every section is listed, set or commented out.
        let mut defaults = serde_json::to_value(Settings::default()).unwrap();
        defaults
            .as_object_mut()
            .unwrap()
            .insert("amqp".into(), serde_json::to_value(amqp_default).unwrap());
        for (key, value) in defaults.as_object().unwrap() {
            let keys: Vec<String> = match value.as_object() {
                Some(section) => {
                    assert!(
                        CONFIG_HELP.contains(&format!("[{key}]")),
                        "[{key}] is not in the help"
                    );
                    section.keys().cloned().collect()
                }
                None => vec![key.clone()],
            };
            for key in keys {
                assert!(
                    CONFIG_HELP.contains(&format!("{key} =")),
                    "{key} is not in the help"
                );
            }
        }
    }
}
