//! What the tests that run the `eventos` binary share.

#![allow(dead_code)] // Each test binary uses its own part.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

/// A port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `eventos` process, killed if the test ends (or panics)
/// without stopping it, so no process outlives its test and keeps
/// consuming from a shared broker.
pub(crate) struct Serving(Option<Child>);

impl Serving {
    /// SIGKILL, and wait for it to be gone.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Ctrl-C; it must drain and exit cleanly.
    pub(crate) fn interrupt(mut self) {
        let mut child = self.0.take().unwrap();
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "exit {status}");
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Spawns `command` (an `eventos up` or `serve`) with its stdout piped and
/// returns once it prints that it serves. Its stdout keeps being read, so
/// its shutdown lines have a reader.
pub(crate) fn spawn_serving(command: &mut Command, what: &str) -> Serving {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("Ctrl-C") {
            std::thread::spawn(move || lines.for_each(drop));
            return Serving(Some(child));
        }
    }
    let status = child.wait().unwrap();
    panic!("{what} exited before serving ({status})");
}

/// `GET url` as JSON.
pub(crate) async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls the resource at `url` until its `status` is `want`, and returns
/// it; fails, showing the last view, once `deadline` has passed.
pub(crate) async fn status_becomes(
    http: &reqwest::Client,
    url: &str,
    want: &str,
    deadline: std::time::Instant,
) -> serde_json::Value {
    loop {
        let view = get_json(http, url).await;
        if view["status"] == want {
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} never became {want}: {view:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `eventos up` on `dir` and `127.0.0.1:port` with the settings file
/// `config`, its stderr appended to `log`; add to it, then
/// [`spawn_serving`].
pub(crate) fn eventos_up(
    dir: &std::path::Path,
    port: u16,
    config: &std::path::Path,
    log: &std::path::Path,
) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventos"));
    command
        .args(["up", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(config)
        .stderr(log);
    command
}

/// The RabbitMQ every broker test talks to.
pub(crate) const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `eventos serve --services <services>` over [`AMQP`] with the settings
/// file `config`, its data in `dir` and its log in `dir/eventos.log`;
/// returns once it serves.
pub(crate) fn serve_amqp(
    dir: &std::path::Path,
    config: &std::path::Path,
    services: &str,
    port: u16,
) -> Serving {
    serve(dir, config, services, port, AMQP)
}

/// [`serve_amqp`] over the transport `transport`.
pub(crate) fn serve(
    dir: &std::path::Path,
    config: &std::path::Path,
    services: &str,
    port: u16,
    transport: &str,
) -> Serving {
    std::fs::create_dir_all(dir).unwrap();
    // Appended to: a worker started again keeps its first life's log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("eventos.log"))
        .unwrap();
    spawn_serving(
        Command::new(env!("CARGO_BIN_EXE_eventos"))
            .args(["serve", "--transport", transport, "--services", services])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir)
            .arg("--config")
            .arg(config)
            .stderr(log),
        &format!("eventos serve {services}"),
    )
}

/// Deletes what a test's namespace left on the shared RabbitMQ: its group
/// queues, its delay-bucket queues and their exchanges, and its exchange.
/// Group queues would expire by themselves; delay buckets would not, and a
/// broker that keeps every run's quorum queues restarts slower each time.
pub(crate) async fn delete_namespace(url: &str, namespace: &str) {
    let listed = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{namespace}/")) || l.starts_with(&format!("{namespace}.delay."))
        })
        .map(str::to_owned)
        .collect();
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for name in &names {
        channel
            .queue_delete(
                name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .unwrap();
        if name.starts_with(&format!("{namespace}.delay.")) {
            channel
                .exchange_delete(
                    name.as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await
                .unwrap();
        }
    }
    channel
        .exchange_delete(
            namespace.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "clean-up done".into()).await;
}

/// Runs `eventos bench <args>` to its end and returns what it printed,
/// after checking that it succeeded, that its last line is the summary
/// `<name> publish_ratio=… consume_ratio=… e2e_events_per_s=…` with
/// positive numbers, and that every one of `cases` was reported.
pub(crate) fn bench_summary(args: &[&str], name: &str, cases: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields.len(), 4, "{last}");
    assert_eq!(fields[0], name, "{last}");
    for (field, key) in
        fields[1..]
            .iter()
            .zip(["publish_ratio", "consume_ratio", "e2e_events_per_s"])
    {
        let (name, value) = field.split_once('=').unwrap_or_default();
        assert_eq!(name, key, "{last}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{last}"));
        assert!(value > 0.0, "{last}");
    }
    for case in cases {
        assert!(stdout.contains(case), "{case} missing: {stdout}");
    }
    stdout
}

/// Runs `eventos bench <args>`, which must fail, and returns its one
/// `error` line (and all of stderr, for the assertion's message).
pub(crate) fn bench_error(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eventos"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("{stderr}"))
        .to_owned();
    (error, stderr)
}
