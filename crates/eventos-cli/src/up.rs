//! `eventos up`: the whole reference system in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use school_system::{SystemConfig, TransportKind};

/// Which transport `eventos up` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TransportArg {
    /// The embedded durable log in <data-dir>/log: nothing accepted is lost.
    Log,
    /// In memory: the fastest queue, but work still queued is lost if the
    /// process dies.
    Memory,
}

/// Options of `eventos up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Where the databases, the log and the mail files live.
    #[arg(long, env = "EVENTOS_DATA_DIR", default_value = "eventos-data")]
    data_dir: PathBuf,
    /// The HTTP address to listen on.
    #[arg(long, env = "EVENTOS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// SMTP server for outgoing mail, e.g. smtp://127.0.0.1:2525. Without
    /// one, mail is written as .eml files into <data-dir>/mail/.
    #[arg(long, env = "EVENTOS_SMTP", value_parser = parse_smtp)]
    smtp: Option<String>,
    /// The transport: `log` (default, durable) or `memory` (the fastest
    /// queue; it loses queued work if the process dies).
    #[arg(long, env = "EVENTOS_TRANSPORT", value_enum, default_value_t = TransportArg::Log)]
    transport: TransportArg,
    /// Where contact-form messages are mailed.
    #[arg(
        long,
        env = "EVENTOS_SCHOOL_INBOX",
        default_value = "admissions@school.example"
    )]
    school_inbox: String,
    /// How long in-flight work may take to finish after Ctrl-C.
    #[arg(long, env = "EVENTOS_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = crate::demo::parse_duration)]
    shutdown_timeout: Duration,
}

fn parse_smtp(url: &str) -> Result<String, String> {
    if url.starts_with("smtp://") || url.starts_with("smtps://") {
        Ok(url.to_owned())
    } else {
        Err(format!(
            "{url:?} is not an SMTP URL: use smtp://host:port or smtps://host:port"
        ))
    }
}

pub(crate) async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = SystemConfig::new(&args.data_dir);
    config.listen = args.listen;
    config.smtp = args.smtp.clone();
    config.school_inbox = args.school_inbox;
    config.shutdown_timeout = args.shutdown_timeout;
    config.transport = match args.transport {
        TransportArg::Log => TransportKind::Log,
        TransportArg::Memory => TransportKind::Memory,
    };
    let system = school_system::start(config)
        .await
        .with_context(|| format!("cannot start the system in {}", args.data_dir.display()))?;
    let base = format!("http://{}", system.addr());
    println!("eventos up: the school is running");
    println!(
        "  transport  {}",
        match args.transport {
            TransportArg::Log =>
                format!("log (durable) in {}", args.data_dir.join("log").display()),
            TransportArg::Memory => "memory (queued work is lost if the process dies)".into(),
        }
    );
    println!(
        "  mail       {}",
        args.smtp.as_deref().map_or_else(
            || format!(".eml files in {}", args.data_dir.join("mail").display()),
            |url| format!("SMTP {url}")
        )
    );
    println!("  contact        POST {base}/contact");
    println!("  notifications  GET  {base}/notifications?email=…");
    println!("  health         GET  {base}/healthz   {base}/readyz");
    println!("  metrics        GET  {base}/metrics");
    println!("Ctrl-C drains in-flight work and stops.");
    eventos::shutdown_signal().await;
    println!("shutting down: draining in-flight work");
    system.shutdown().await?;
    println!("stopped");
    Ok(())
}
