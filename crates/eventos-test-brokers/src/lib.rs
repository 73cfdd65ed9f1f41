//! The brokers the eventos tests talk to — RabbitMQ, NATS with JetStream
//! and a single-node Apache Kafka — as `scripts/test-deps` leaves them
//! running on 127.0.0.1; [`TinyFs`], a small real filesystem the
//! disk-full tests fill up; and [`interop`], the events every interop test
//! sends a client that is not eventos and the checks of what comes back.
//!
//! The decision that shaped it: tests never start a broker themselves and
//! never skip when one is down. `scripts/services` owns every broker
//! process (each in its own process group, its pid recorded), for people
//! and tests alike, so what CI tested is what a person runs by hand.
//! [`Broker::require`] turns a missing broker into a failed test whose
//! message is the one command that fixes it; [`Broker::restart`] bounces a
//! broker through the same script, for the tests of what survives a
//! restart.
//!
//! Each address can be pointed elsewhere with an environment variable
//! ([`Broker::env_var`]); the default is the local broker the scripts run.
//!
//! ```no_run
//! use eventos_test_brokers::Broker;
//!
//! let bootstrap = Broker::Kafka.require();
//! // ... talk to Kafka at `bootstrap` ...
//! Broker::Kafka.restart();
//! ```

mod fs;
pub mod interop;

pub use fs::TinyFs;

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// A broker `scripts/services` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// RabbitMQ on 127.0.0.1:5672 (guest/guest, vhost `/`).
    RabbitMq,
    /// `nats-server` with JetStream on 127.0.0.1:4222.
    Nats,
    /// Apache Kafka, KRaft, one node, on 127.0.0.1:9092.
    Kafka,
}

impl Broker {
    /// Every broker, in the order `scripts/services start all` starts them.
    pub const ALL: [Broker; 3] = [Broker::RabbitMq, Broker::Nats, Broker::Kafka];

    /// The name `scripts/services` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Broker::RabbitMq => "rabbitmq",
            Broker::Nats => "nats",
            Broker::Kafka => "kafka",
        }
    }

    /// The environment variable that overrides [`Broker::url`].
    pub fn env_var(self) -> &'static str {
        match self {
            Broker::RabbitMq => "EVENTOS_AMQP_URL",
            Broker::Nats => "EVENTOS_NATS_URL",
            Broker::Kafka => "EVENTOS_KAFKA_BOOTSTRAP",
        }
    }

    /// Where the broker is, in the form its client takes: an AMQP URL, a
    /// NATS URL, or Kafka's `host:port` bootstrap list.
    pub fn url(self) -> String {
        std::env::var(self.env_var()).unwrap_or_else(|_| {
            match self {
                Broker::RabbitMq => "amqp://guest:guest@127.0.0.1:5672/%2f",
                Broker::Nats => "nats://127.0.0.1:4222",
                Broker::Kafka => "127.0.0.1:9092",
            }
            .to_owned()
        })
    }

    /// The broker's address, once it accepts a TCP connection.
    ///
    /// # Panics
    ///
    /// When the broker cannot be reached within five seconds, with a
    /// message naming the command that starts it. A broker test that
    /// quietly did not run would be a lie about what was tested.
    pub fn require(self) -> String {
        let url = self.url();
        let target = first_host_port(&url);
        let reachable = target.to_socket_addrs().ok().and_then(|mut addrs| {
            addrs.find_map(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        });
        assert!(
            reachable.is_some(),
            "{} is not reachable at {target} ({}={}): start it with scripts/test-deps \
             (or scripts/services start {})",
            self.name(),
            self.env_var(),
            url,
            self.name(),
        );
        url
    }

    /// Restarts the broker with `scripts/services restart <name>` and
    /// returns once it is ready again. Its data survives: queues, streams
    /// and topics are still there.
    ///
    /// # Panics
    ///
    /// When the script fails, with everything it printed.
    pub fn restart(self) {
        self.services("restart");
    }

    /// Stops the broker with `scripts/services stop <name>`.
    ///
    /// # Panics
    ///
    /// When the script fails, with everything it printed.
    pub fn stop(self) {
        self.services("stop");
    }

    /// Starts the broker with `scripts/services start <name>` and returns
    /// once it is ready.
    ///
    /// # Panics
    ///
    /// When the script fails, with everything it printed.
    pub fn start(self) {
        self.services("start");
    }

    fn services(self, action: &str) {
        let script = workspace_root().join("scripts/services");
        let out = Command::new(&script)
            .args([action, self.name()])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/services {action} {} failed ({}):\n{}{}",
            self.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
}

/// The checkout's top directory, where `scripts/` lives.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/interop/<script>` with `args` on the interop venv's
/// Python (the CloudEvents SDK and the broker clients `scripts/test-deps`
/// installs in `target/interop-venv`) and returns the JSON lines it
/// printed. Blocks: call it from `spawn_blocking` in async tests.
///
/// # Panics
///
/// When the venv is missing (naming the command that sets it up), when
/// the script fails (with what it wrote to stderr), or when a line is not
/// JSON.
pub fn run_interop(script: &str, args: &[String]) -> Vec<serde_json::Value> {
    let root = workspace_root();
    let python = root.join("target/interop-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test-deps first (it installs the broker clients and the CloudEvents SDK)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("scripts/interop").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "the Python side ({script}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script} printed {l:?}: {e}")))
        .collect()
}

/// The first `host:port` of a broker URL or bootstrap list: scheme, user
/// info and path left out.
fn first_host_port(url: &str) -> &str {
    let first = url.split(',').next().unwrap_or(url);
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::first_host_port;

    #[test]
    fn first_host_port_reads_every_url_form() {
        for (url, want) in [
            ("amqp://guest:guest@127.0.0.1:5672/%2f", "127.0.0.1:5672"),
            ("amqp://127.0.0.1:5673", "127.0.0.1:5673"),
            ("nats://127.0.0.1:4222", "127.0.0.1:4222"),
            ("nats://a:4222,nats://b:4223", "a:4222"),
            ("127.0.0.1:9092", "127.0.0.1:9092"),
            ("127.0.0.1:9092,127.0.0.1:9094", "127.0.0.1:9092"),
        ] {
            assert_eq!(first_host_port(url), want, "{url}");
        }
    }
}
