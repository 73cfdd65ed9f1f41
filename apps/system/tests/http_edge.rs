//! The HTTP edge against hostile clients, on real sockets: idle sockets
//! beyond the connection cap, slow headers, announced and stalled bodies,
//! too many requests, abandoned and excess event streams, and shutdown
//! with streams and stuck requests open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use school_system::{HttpSettings, System, SystemConfig, start};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// Longer than anything here should take; a test waits for a condition
/// until it holds or this passes.
const PATIENCE: Duration = Duration::from_secs(10);

/// The notifications token key of every system here, so a test can hand
/// out Ana's token as the contact form would.
const TOKEN_KEY: &str = "0707070707070707070707070707070707070707070707070707070707070707";

/// The request that opens Ana's notification stream, with her token.
fn stream_request() -> Vec<u8> {
    let key = school_http::NotificationKey::from_hex(TOKEN_KEY).unwrap();
    let token = key.token(&"ana@example.com".parse().unwrap());
    format!(
        "GET /notifications/stream?email=ana@example.com&token={token} HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    .into_bytes()
}

async fn system(dir: &tempfile::TempDir, http: HttpSettings) -> System {
    let mut config = SystemConfig::new(dir.path());
    config.notifications_key = Some(TOKEN_KEY.to_owned());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.http = http;
    config.shutdown_timeout = Duration::from_secs(5);
    start(config).await.unwrap()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// A connection from another loopback address, for per-client limits.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads up to the end of the response head, and what came after it;
/// `None` if the connection closed first.
async fn read_head_and_rest(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = bytes.split_off(end + 4);
                return Some((String::from_utf8_lossy(&bytes).into_owned(), rest));
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("no answer and no close in time")
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    read_head_and_rest(stream).await.map(|(head, _)| head)
}

/// A whole answer: status, head, body (by its content-length).
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let (head, mut body) = read_head_and_rest(stream)
        .await
        .expect("closed before answering");
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut buf = [0u8; 4096];
    while body.len() < length {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed in the middle of the body");
        body.extend_from_slice(&buf[..n]);
    }
    (status, head, String::from_utf8(body).unwrap())
}

/// Waits until the server closes `stream` (EOF or reset), returning how
/// long that took.
async fn closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server did not close the connection");
    started.elapsed()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = connect(addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(&mut s).await
}

async fn sse_streams(addr: SocketAddr) -> usize {
    let (status, _, text) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix("school_sse_streams "))
        .expect("no school_sse_streams in /metrics")
        .parse()
        .unwrap()
}

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    school_testkit::eventually(what, PATIENCE, check).await;
}

/// Opens a notification stream and reads its answer's head.
async fn open_stream(stream: &mut TcpStream) -> String {
    stream.write_all(&stream_request()).await.unwrap();
    read_head(stream).await.expect("closed before answering")
}

#[tokio::test]
async fn idle_sockets_beyond_the_cap_are_refused_and_the_held_ones_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            max_connections: 20,
            header_timeout_ms: 2_000,
            ..HttpSettings::default()
        },
    )
    .await;
    let addr = system.addr();
    let mut sockets = Vec::new();
    for _ in 0..50 {
        sockets.push(connect(addr).await);
    }
    // With the cap taken by idle sockets, a health check is refused, not
    // left waiting.
    let (status, head, body) = get(addr, "/healthz").await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("20 connections"), "{body}");

    let outcomes = futures::future::join_all(sockets.iter_mut().map(|s| async move {
        let mut first = [0u8; 12];
        match s.read(&mut first).await {
            Ok(n) if n > 0 => {
                assert_eq!(&first[..n.min(12)], &b"HTTP/1.1 503"[..n.min(12)]);
                closed(s).await;
                "refused"
            }
            _ => "held, then closed",
        }
    }))
    .await;
    let refused = outcomes.iter().filter(|o| **o == "refused").count();
    assert_eq!((refused, outcomes.len() - refused), (30, 20));
    drop(sockets);
    eventually(
        "/healthz answers once the idle sockets are closed",
        || async { get(addr, "/healthz").await.0 == 200 },
    )
    .await;
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_slowloris_is_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            header_timeout_ms: 500,
            ..HttpSettings::default()
        },
    )
    .await;
    let (mut reader, mut writer) = connect(system.addr()).await.into_split();
    writer
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let drip = tokio::spawn(async move {
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer
                .write_all(format!("x-slow-{i}: a\r\n").as_bytes())
                .await
                .is_err()
            {
                return i;
            }
        }
        100
    });
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(PATIENCE, reader.read(&mut buf))
        .await
        .expect("the slow headers were never cut off")
        .unwrap_or(0);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert!(
        n == 0 || !String::from_utf8_lossy(&buf[..n]).contains("200"),
        "answered a request whose headers never ended"
    );
    assert!(drip.await.unwrap() < 100);
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            header_timeout_ms: 300,
            ..HttpSettings::default()
        },
    )
    .await;
    let mut s = connect(system.addr()).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let idle = closed(&mut s).await;
    assert!(idle < Duration::from_secs(3), "{idle:?}");
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_announced_oversize_body_is_refused_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(&dir, HttpSettings::default()).await;
    for path in ["/contact", "/enrollments", "/no/such/path"] {
        let mut s = connect(system.addr()).await;
        s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 52428800\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let (status, head, body) = read_response(&mut s).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(status, 413, "{path}: {head}");
        assert!(head.contains("application/problem+json"), "{head}");
        assert!(body.contains("65536 bytes; send less"), "{body}");
    }
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_body_is_answered_408() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            body_timeout_ms: 300,
            ..HttpSettings::default()
        },
    )
    .await;
    let mut s = connect(system.addr()).await;
    s.write_all(
        b"POST /contact HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"name\":",
    )
    .await
    .unwrap();
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 408, "{head}");
    assert!(body.contains("send it without pauses"), "{body}");
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_beyond_the_concurrency_cap_get_503() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            max_requests: 2,
            ..HttpSettings::default()
        },
    )
    .await;
    let addr = system.addr();
    // Two requests in flight: their handlers wait for bodies that are
    // still coming.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = connect(addr).await;
        s.write_all(
            b"POST /contact HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
        slow.push(s);
    }
    eventually("a third request is refused", || async {
        let (status, head, body) = get(addr, "/healthz").await;
        status == 503
            && head.contains("retry-after: 1")
            && body.contains("limit of 2 requests at once")
    })
    .await;
    drop(slow);
    eventually("requests are answered again", || async {
        get(addr, "/healthz").await.0 == 200
    })
    .await;
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn abandoned_event_streams_end_at_the_next_ping_and_leave_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            sse_per_client: 200,
            sse_max_streams: 200,
            sse_keep_alive_ms: 100,
            ..HttpSettings::default()
        },
    )
    .await;
    let addr = system.addr();
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut s = connect(addr).await;
        let head = open_stream(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        streams.push(s);
    }
    assert_eq!(sse_streams(addr).await, 200);
    let during = tasks();
    // A task per connection (the system's own tasks come and go a little).
    assert!(during >= before + 190, "{before} → {during}");
    drop(streams);
    eventually("every abandoned stream has ended", || async {
        sse_streams(addr).await == 0
    })
    .await;
    eventually("no task is left behind", || async { tasks() <= before }).await;
    eprintln!(
        "200 abandoned streams: tasks {before} before, {during} while open, {} after",
        tasks()
    );
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn event_streams_are_capped_per_client_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(
        &dir,
        HttpSettings {
            sse_per_client: 2,
            sse_max_streams: 3,
            ..HttpSettings::default()
        },
    )
    .await;
    let addr = system.addr();
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from([127, 0, 0, 1], addr).await;
        assert!(open_stream(&mut s).await.starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    let mut third = connect_from([127, 0, 0, 1], addr).await;
    third.write_all(&stream_request()).await.unwrap();
    let (status, head, body) = read_response(&mut third).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after: 5"), "{head}");
    assert!(body.contains("close one before opening another"), "{body}");

    let mut other = connect_from([127, 0, 0, 2], addr).await;
    assert!(open_stream(&mut other).await.starts_with("HTTP/1.1 200"));
    open.push(other);
    // The enrollment stream counts against the same total.
    let mut fourth = connect_from([127, 0, 0, 3], addr).await;
    fourth
        .write_all(
            b"GET /enrollments/0190c3f4-6f1e-7a5b-9c2d-3e4f5a6b7c8d/events HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut fourth).await;
    assert_eq!(status, 503, "{head}");
    assert!(body.contains("all 3 event streams are taken"), "{body}");
    assert_eq!(sse_streams(addr).await, 3);
    system.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_event_streams_and_idle_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(&dir, HttpSettings::default()).await;
    let addr = system.addr();
    let mut stream = connect(addr).await;
    assert!(open_stream(&mut stream).await.starts_with("HTTP/1.1 200"));
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(connect(addr).await);
    }
    // Connections accepted before the shutdown, not merely queued.
    eventually("the stream is counted", || async {
        sse_streams(addr).await == 1
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), system.shutdown())
        .await
        .expect("shutdown waited for the stream")
        .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    closed(&mut stream).await;
    for s in &mut idle {
        closed(s).await;
    }
}

#[tokio::test]
async fn shutdown_drops_a_stuck_request_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SystemConfig::new(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.transport = "memory".to_owned();
    config.http = HttpSettings {
        body_timeout_ms: 60_000,
        request_timeout_ms: 60_000,
        ..HttpSettings::default()
    };
    config.shutdown_timeout = Duration::from_secs(1);
    let system = start(config).await.unwrap();
    let mut stuck = connect(system.addr()).await;
    stuck
        .write_all(
            b"POST /contact HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    // The request is in its handler, waiting for the rest of the body.
    let addr = system.addr();
    eventually("the server answers others", || async {
        get(addr, "/healthz").await.0 == 200
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), system.shutdown())
        .await
        .expect("shutdown waited past its deadline")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    closed(&mut stuck).await;
}

/// A client that vanishes without closing sends nothing more: the server
/// finds out through TCP keepalive probes on every accepted connection
/// (and a limit on unacknowledged data), not only when the kernel gives
/// up after many minutes. `ss` shows the keepalive timer on the server's
/// side of the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_probe_for_vanished_clients() {
    let dir = tempfile::tempdir().unwrap();
    let system = system(&dir, HttpSettings::default()).await;
    let port = system.addr().port();
    let _client = connect(system.addr()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("ss")
            .args(["-Htno", "state", "established"])
            .arg(format!("( sport = :{port} )"))
            .output()
            .expect("run ss");
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("keepalive") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no keepalive timer on the server side: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    system.shutdown().await.unwrap();
}
