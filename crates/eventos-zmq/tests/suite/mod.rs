//! The ZeroMQ harness of the conformance suite: every case gets a node of
//! its own, bound to a free port on 127.0.0.1 and consuming from itself
//! over real sockets, with the spool of the run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventos_conformance::{Harness, run};
use eventos_core::Transport;
use eventos_zmq::{Spool, Topology, ZmqOptions, ZmqTransport};
use futures::future::BoxFuture;

/// Which spool the run's nodes keep (each test target names one).
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub(crate) enum SpoolKind {
    Memory,
    Log,
    /// The memory spool, consumers binding: the node's publisher connects
    /// to its own hub.
    MemoryConsumersBind,
}

struct Zmq {
    spool: SpoolKind,
    root: Arc<tempfile::TempDir>,
    /// The log directory of each open node, by the node's identity, so
    /// `reopen` finds what the case closed.
    dirs: Arc<Mutex<HashMap<usize, PathBuf>>>,
}

fn options(spool: Spool, topology: Topology) -> ZmqOptions {
    ZmqOptions {
        spool,
        topology,
        // Short, so the cases that drop a member see its work come back
        // within their deadlines.
        heartbeat: Duration::from_millis(100),
        peer_timeout: Duration::from_secs(2),
        ..ZmqOptions::default()
    }
}

async fn open_at(spool: Spool, topology: Topology) -> Arc<dyn Transport> {
    let transport = ZmqTransport::open(options(spool, topology))
        .await
        .unwrap_or_else(|e| panic!("cannot open a ZeroMQ node on 127.0.0.1: {e}"));
    Arc::new(transport)
}

fn key(transport: &Arc<dyn Transport>) -> usize {
    Arc::as_ptr(transport).cast::<()>() as usize
}

impl Harness for Zmq {
    fn name(&self) -> &str {
        match self.spool {
            SpoolKind::Memory => "zmq",
            SpoolKind::Log => "zmq-log",
            SpoolKind::MemoryConsumersBind => "zmq-consumers-bind",
        }
    }

    fn open(&self) -> BoxFuture<'static, Arc<dyn Transport>> {
        let spool = self.spool;
        let dir = self
            .root
            .path()
            .join(uuid::Uuid::now_v7().simple().to_string());
        let dirs = self.dirs.clone();
        Box::pin(async move {
            match spool {
                SpoolKind::Memory => open_at(Spool::Memory, Topology::PublishersBind).await,
                SpoolKind::MemoryConsumersBind => {
                    open_at(Spool::Memory, Topology::ConsumersBind).await
                }
                SpoolKind::Log => {
                    let transport =
                        open_at(Spool::Log(dir.clone()), Topology::PublishersBind).await;
                    dirs.lock().unwrap().insert(key(&transport), dir);
                    transport
                }
            }
        })
    }

    fn reopen(&self, closed: &Arc<dyn Transport>) -> BoxFuture<'static, Arc<dyn Transport>> {
        let dir = self.dirs.lock().unwrap().get(&key(closed)).cloned();
        let dirs = self.dirs.clone();
        match dir {
            None => self.open(),
            Some(dir) => Box::pin(async move {
                let transport = open_at(Spool::Log(dir.clone()), Topology::PublishersBind).await;
                dirs.lock().unwrap().insert(key(&transport), dir);
                transport
            }),
        }
    }
}

/// Runs the suite with nodes spooling in `spool`.
pub(crate) fn main(spool: SpoolKind) -> ExitCode {
    let root = tempfile::tempdir().expect("a temporary directory for the spools");
    run(Zmq {
        spool,
        root: Arc::new(root),
        dirs: Arc::default(),
    })
}
