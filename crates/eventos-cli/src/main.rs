//! The `eventos` command.
//!
//! `eventos up` runs the reference system in one process, on the embedded
//! durable log by default. `eventos demo` runs the framework's own
//! demonstration flow — payments submitted, checked by a flaky anti-fraud
//! handler with stored retries and a dead-letter reaction, counted by a
//! metrics handler — so the pipeline (envelope, transport, router,
//! middleware, graceful shutdown) can be watched working. Binaries use
//! `anyhow`; every error the user can fix is one line saying what and how.
//!
//! `eventos log topics|stat|dump` inspects an embedded log's data directory
//! without opening it (safe beside the process that owns it), and
//! `eventos bench log` measures the log's durable throughput as a ratio of
//! the disk's own bound.

mod bench;
mod bench_accept;
mod bench_amqp;
mod bench_event;
#[cfg(feature = "kafka")]
mod bench_kafka;
mod bench_nats;
mod bench_transport;
mod bench_zmq;
mod demo;
mod log;
mod progress;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Every message allocates on one thread and frees on another (the HTTP
// worker, a store's writer, the log's writer); glibc's allocator spent a
// tenth of the system's CPU consolidating and unlinking those chunks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Asynchronous events for microservices.
#[derive(Debug, Parser)]
#[command(name = "eventos", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole school in one process until Ctrl-C: enrollment,
    /// anti-fraud, billing, payment metrics, contact form, mailer and
    /// notifications, over the embedded durable log.
    Up(up::UpArgs),
    /// Run some of the school's services in this process, e.g. the HTTP
    /// services here and the workers in other processes over RabbitMQ:
    /// `eventos serve --transport amqp://… --services enrollment,contact`.
    Serve(up::ServeArgs),
    /// Watch the framework work: publish payments through a flaky handler
    /// with retries and dead letters, until Ctrl-C or `--events` settle.
    Demo(demo::DemoArgs),
    /// Inspect an embedded log's data directory (read-only, takes no lock).
    Log(log::LogArgs),
    /// Measure throughput against a bound taken in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EVENTOS_LOG")
                // Per-delivery retry and dead-letter lines are normal
                // traffic; EVENTOS_LOG=info shows them.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,eventos::middleware::trace=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::up(args).await,
            Command::Serve(args) => up::serve(args).await,
            Command::Demo(args) => demo::run(args).await,
            // Plain file reads; the runtime is not needed.
            Command::Log(args) => log::run(args),
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
