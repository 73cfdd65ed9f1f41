//! ZeroMQ's entry in a transport registry: `zmq://HOST:PORT` is the
//! address this node binds and publishes from, the `[zmq]` section names
//! the publishers it consumes from and where it spools.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use eventos_kit::{Engine, OpenError, Opened, Target};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{Spool, Topology, ZmqOptions, ZmqTransport};

/// Which spool `[zmq] spool` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolKind {
    /// In memory.
    #[default]
    Memory,
    /// The embedded log, in `spool_dir`.
    Log,
}

/// The `[zmq]` settings section. Unknown keys are errors that name the
/// key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZmqSection {
    /// `publishers_bind` (the URL's address is where this node publishes
    /// from; `peers` are the publishers it consumes from) or
    /// `consumers_bind` (the URL's address is this node's hub, where its
    /// subscriptions consume; `peers` are the hubs it publishes to).
    pub topology: Topology,
    /// The publishers this node's subscriptions connect to, or the hubs
    /// its publisher connects to (`tcp://HOST:PORT`); empty: its own
    /// address only.
    pub peers: Vec<String>,
    /// Where unacked events wait: `memory` or `log`.
    pub spool: SpoolKind,
    /// The log spool's directory; by default `zmq-spool` in the data
    /// directory.
    pub spool_dir: Option<PathBuf>,
    /// Milliseconds between a consumer's pings.
    pub heartbeat_ms: u64,
    /// Milliseconds of silence after which a peer counts as gone.
    pub peer_timeout_ms: u64,
    /// Seconds a delivery may stay unsettled before it goes back.
    pub ack_timeout_secs: u64,
    /// Milliseconds a subscription waits for each publisher's welcome.
    pub join_timeout_ms: u64,
}

impl Default for ZmqSection {
    fn default() -> Self {
        let options = ZmqOptions::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            topology: Topology::PublishersBind,
            peers: Vec::new(),
            spool: SpoolKind::Memory,
            spool_dir: None,
            heartbeat_ms: ms(options.heartbeat),
            peer_timeout_ms: ms(options.peer_timeout),
            ack_timeout_secs: options.ack_timeout.as_secs(),
            join_timeout_ms: ms(options.join_timeout),
        }
    }
}

impl ZmqSection {
    fn from_value(options: Option<&serde_json::Value>) -> Result<Self, String> {
        let section = match options {
            None => Self::default(),
            Some(value) => Self::deserialize(value).map_err(|e| format!("[zmq]: {e}"))?,
        };
        if let Some(bad) = section
            .peers
            .iter()
            .find(|p| !p.starts_with("tcp://") && !p.starts_with("ipc://"))
        {
            return Err(format!(
                "[zmq] peers: {bad:?} is not a ZeroMQ endpoint: write \"tcp://HOST:PORT\""
            ));
        }
        Ok(section)
    }

    /// The transport's options for a node binding `bind`, keeping a log
    /// spool under `data_dir` unless `spool_dir` says where.
    pub fn options(self, bind: Option<String>, data_dir: &std::path::Path) -> ZmqOptions {
        ZmqOptions {
            topology: self.topology,
            bind,
            peers: self.peers,
            spool: match self.spool {
                SpoolKind::Memory => Spool::Memory,
                SpoolKind::Log => {
                    Spool::Log(self.spool_dir.unwrap_or_else(|| data_dir.join("zmq-spool")))
                }
            },
            heartbeat: Duration::from_millis(self.heartbeat_ms.max(10)),
            peer_timeout: Duration::from_millis(self.peer_timeout_ms),
            ack_timeout: Duration::from_secs(self.ack_timeout_secs.max(1)),
            join_timeout: Duration::from_millis(self.join_timeout_ms),
        }
    }
}

/// What `zmq://…` binds: `zmq://HOST:PORT` binds `tcp://HOST:PORT`; a bare
/// `zmq://` binds nothing (a node that only consumes).
fn bind_of(url: &str) -> Result<Option<String>, String> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{url:?} is not zmq://HOST:PORT"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Ok(None);
    }
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(format!(
            "{url:?} names no HOST:PORT to bind: write zmq://127.0.0.1:5560 (or zmq:// for a node that only consumes, with [zmq] peers)"
        ));
    }
    Ok(Some(format!("tcp://{rest}")))
}

/// Opens a ZeroMQ node: binds the URL's address, consumes from `[zmq]
/// peers`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZmqEngine;

impl Engine for ZmqEngine {
    fn schemes(&self) -> &'static [&'static str] {
        &["zmq"]
    }

    fn example(&self) -> &'static str {
        "zmq://127.0.0.1:5560"
    }

    fn section(&self) -> Option<&'static str> {
        Some("zmq")
    }

    fn check_options(&self, options: &serde_json::Value) -> Result<(), String> {
        ZmqSection::from_value(Some(options)).map(drop)
    }

    fn check_url(&self, url: &str) -> Result<(), String> {
        bind_of(url).map(drop)
    }

    fn process_local(&self) -> bool {
        false
    }

    fn describe(&self, target: &Target<'_>) -> String {
        match bind_of(target.url) {
            Ok(Some(bind)) => match ZmqSection::from_value(target.options).map(|s| s.topology) {
                Ok(Topology::ConsumersBind) => {
                    format!("ZeroMQ node consuming through its hub at {bind}")
                }
                _ => format!("ZeroMQ node publishing from {bind}"),
            },
            _ => "ZeroMQ node (consuming only)".to_owned(),
        }
    }

    fn open<'a>(&'a self, target: Target<'a>) -> BoxFuture<'a, Result<Opened, OpenError>> {
        Box::pin(async move {
            let section = ZmqSection::from_value(target.options).map_err(OpenError)?;
            let bind = bind_of(target.url).map_err(OpenError)?;
            let options = section.options(bind, target.data_dir);
            let transport = ZmqTransport::open(options)
                .await
                .map_err(|e| OpenError(e.to_string()))?;
            Ok(Opened {
                transport: Arc::new(transport),
                metrics: None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_what_to_bind() {
        assert_eq!(
            bind_of("zmq://127.0.0.1:5560").unwrap().as_deref(),
            Some("tcp://127.0.0.1:5560")
        );
        assert_eq!(bind_of("zmq://").unwrap(), None);
        let err = bind_of("zmq://localhost").unwrap_err();
        assert!(err.contains("zmq://127.0.0.1:5560"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_peers_are_named() {
        let err = ZmqEngine
            .check_options(&serde_json::json!({ "peer": ["tcp://a:1"] }))
            .unwrap_err();
        assert!(err.contains("peer"), "{err}");
        let err = ZmqEngine
            .check_options(&serde_json::json!({ "peers": ["127.0.0.1:1"] }))
            .unwrap_err();
        assert!(err.contains("tcp://HOST:PORT"), "{err}");
        ZmqEngine
            .check_options(
                &serde_json::json!({ "peers": ["tcp://127.0.0.1:5561"], "spool": "log" }),
            )
            .unwrap();
    }
}
