//! What a group holds, read from RabbitMQ: depths from the management API,
//! the heads of delay queues and the parked dead letters by peeking.
//!
//! AMQP 0-9-1 tells a passive declare only how many messages are ready;
//! how many are unacknowledged is known to the management API alone, so
//! inspection needs the `rabbitmq_management` plugin. Its figures are the
//! broker's statistics, refreshed every few seconds (RabbitMQ's
//! `collect_statistics_interval`, 5 s by default), not a live count.
//!
//! Nothing in AMQP reads a message without taking it, so a peek takes
//! messages with `basic.get` and hands them all back at once with one
//! `basic.nack` (requeue). While a peek holds them, a consumer of that queue
//! does not see them; a quorum queue counts the peek as a delivery in
//! `x-delivery-count`.

use std::time::{Duration, UNIX_EPOCH};

use eventos_core::{
    Event, GroupCounts, TransportError, TransportErrorKind, dead_letter_topic, ext,
};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, ErrorKind};
use serde::Deserialize;

use crate::codec;
use crate::link::{Failure, Shared, failure};
use crate::names::Names;

/// The most messages one peek takes, so that listing a huge dead-letter
/// queue is bounded: counting dead letters and finding one by id look at
/// no more than this many.
pub(crate) const MAX_PEEK: usize = 10_000;

/// The management API's port when none is given.
const MANAGEMENT_PORT: u16 = 15672;

/// Where the management API is and how to log in to it.
pub(crate) struct Management {
    client: reqwest::Client,
    /// `http://host:port`, no trailing slash, no credentials.
    base: String,
    user: String,
    password: String,
    vhost: String,
}

impl Management {
    /// The API for the broker at `amqp_url`: `management_url` when given
    /// (credentials in it, or the AMQP URL's), else port 15672 of the
    /// AMQP host with the AMQP credentials.
    pub(crate) fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, String> {
        let amqp: AMQPUri = amqp_url
            .parse()
            .map_err(|e| format!("invalid AMQP URL: {e}"))?;
        let mut user = amqp.authority.userinfo.username.clone();
        let mut password = amqp.authority.userinfo.password.clone();
        let base = match management_url {
            None => format!("http://{}:{MANAGEMENT_PORT}", amqp.authority.host),
            Some(url) => {
                let parsed = reqwest::Url::parse(url).map_err(|e| {
                    format!(
                        "invalid management_url {:?}: {e}",
                        eventos_core::redact_url(url)
                    )
                })?;
                if parsed.scheme() != "http" {
                    return Err(format!(
                        "management_url must be an http:// URL, not {}://",
                        parsed.scheme()
                    ));
                }
                if !parsed.username().is_empty() {
                    user = parsed.username().to_owned();
                    password = parsed.password().unwrap_or_default().to_owned();
                }
                let host = parsed.host_str().unwrap_or("127.0.0.1");
                let port = parsed.port().unwrap_or(MANAGEMENT_PORT);
                format!("http://{host}:{port}")
            }
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            client,
            base,
            user,
            password,
            vhost: amqp.vhost,
        })
    }

    /// Every queue whose name matches the regex `pattern` (at most 500),
    /// asking again with `backoff` while the API cannot answer (a broker
    /// restarting).
    async fn queues(
        &self,
        pattern: &str,
        backoff: impl Iterator<Item = Duration>,
    ) -> Result<Vec<QueueInfo>, TransportError> {
        let mut backoff = backoff;
        loop {
            match self.queues_once(pattern).await {
                Err((e, true)) => match backoff.next() {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => return Err(e),
                },
                other => return other.map_err(|(e, _)| e),
            }
        }
    }

    /// One request; an error says whether asking again may help.
    async fn queues_once(&self, pattern: &str) -> Result<Vec<QueueInfo>, (TransportError, bool)> {
        let url = format!("{}/api/queues/{}", self.base, encode(&self.vhost));
        let unavailable = |detail: String| {
            TransportError::new(
                TransportErrorKind::Unavailable,
                format!(
                    "the RabbitMQ management API at {} {detail}; inspection needs it: \
                     rabbitmq-plugins enable rabbitmq_management, or set [amqp] management_url",
                    self.base
                ),
            )
        };
        let response = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .query(&[
                ("page", "1"),
                ("page_size", "500"),
                ("use_regex", "true"),
                ("name", pattern),
                (
                    "columns",
                    "name,messages,messages_ready,messages_unacknowledged",
                ),
            ])
            .send()
            .await
            .map_err(|e| {
                let e = e.without_url();
                (unavailable(format!("does not answer ({e})")), true)
            })?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let refused = TransportError::new(
                TransportErrorKind::Other,
                format!(
                    "the RabbitMQ management API at {} refused user {:?}: give it the \
                     monitoring tag (rabbitmqctl set_user_tags) or set [amqp] management_url",
                    self.base, self.user
                ),
            );
            return Err((refused, false));
        }
        if !status.is_success() {
            let again = status.is_server_error();
            return Err((
                unavailable(format!("answered {status} for the vhost's queues")),
                again,
            ));
        }
        let page: QueuePage = response.json().await.map_err(|e| {
            let e = e.without_url();
            (
                unavailable(format!("answered something unreadable ({e})")),
                false,
            )
        })?;
        Ok(page.items)
    }
}

/// Percent-encodes a path segment (the vhost `/` is `%2F`).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
struct QueuePage {
    items: Vec<QueueInfo>,
}

/// One queue's figures; a queue RabbitMQ has no statistics for yet lacks
/// them, which counts as empty.
#[derive(Deserialize)]
struct QueueInfo {
    name: String,
    #[serde(default)]
    messages: u64,
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
}

/// One message taken by a peek.
struct Peeked {
    properties: BasicProperties,
    data: Vec<u8>,
}

fn not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Takes up to `max` messages from the head of `queue` and hands them
/// back; a queue that does not exist holds nothing.
async fn peek(shared: &Shared, queue: &str, max: usize) -> Result<Vec<Peeked>, TransportError> {
    shared
        .retrying(|link| async move {
            let what = format!("peeking into {queue:?}");
            let channel = link
                .connection
                .create_channel()
                .await
                .map_err(|e| failure(&what, e))?;
            let mut taken = Vec::new();
            let mut last = None;
            while taken.len() < max {
                let got = match channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await
                {
                    Ok(got) => got,
                    Err(e) if not_found(&e) => return Ok(Vec::new()),
                    Err(e) => return Err(failure(&what, e)),
                };
                let Some(got) = got else { break };
                let delivery = got.delivery;
                taken.push(Peeked {
                    properties: delivery.properties,
                    data: delivery.data,
                });
                last = Some(delivery.acker);
            }
            if let Some(acker) = last {
                acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await
                    .map_err(|e| failure(&what, e))?;
            }
            let _ = channel.close(200, "peeked".into()).await;
            Ok::<_, Failure>(taken)
        })
        .await
}

fn decoded(peeked: Vec<Peeked>) -> impl Iterator<Item = Event> {
    peeked
        .into_iter()
        .filter_map(|p| codec::decode(&p.properties, p.data).ok())
}

fn management(shared: &Shared) -> Result<&Management, TransportError> {
    shared.management.as_ref().map_err(|reason| {
        TransportError::new(
            TransportErrorKind::Other,
            format!("cannot inspect RabbitMQ: {reason}"),
        )
    })
}

/// What `group` holds on `topic`.
pub(crate) async fn group_counts(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<Option<GroupCounts>, TransportError> {
    let queue = shared.names.queue(topic, group);
    let queues = management(shared)?
        .queues(&Names::group_pattern(&queue), shared.backoff())
        .await?;
    let Some(own) = queues.iter().find(|q| q.name == queue) else {
        return Ok(None);
    };
    let mut counts = GroupCounts::default();
    counts.ready = own.messages_ready;
    counts.in_flight = own.messages_unacknowledged;
    for delay in queues.iter().filter(|q| q.name != queue) {
        // Counted by peeking, not from the statistics: RabbitMQ leaves a
        // message out of them while a peek holds it, so two inspections at
        // once would each see the other's peek as an empty queue.
        let waiting = peek(shared, &delay.name, MAX_PEEK).await?;
        let peeked = u64::try_from(waiting.len()).unwrap_or(u64::MAX);
        counts.retrying += if waiting.len() < MAX_PEEK {
            peeked
        } else {
            peeked.max(delay.messages)
        };
        let due = waiting
            .iter()
            .filter_map(|p| codec::received(&p.properties, false).due_ms)
            .min()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        counts.next_retry = match (counts.next_retry, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let dead = parked(shared, topic, MAX_PEEK)
        .await?
        .filter(|e| e.extension_str(ext::DEAD_LETTER_GROUP) == Some(group))
        .count();
    counts.dead_lettered = u64::try_from(dead).unwrap_or(u64::MAX);
    Ok(Some(counts))
}

/// The dead letters parked for `topic`, oldest first, at most `max`.
async fn parked(
    shared: &Shared,
    topic: &str,
    max: usize,
) -> Result<impl Iterator<Item = Event>, TransportError> {
    let queue = shared
        .names
        .queue(&dead_letter_topic(topic), crate::PARKED_GROUP);
    Ok(decoded(peek(shared, &queue, max).await?))
}

pub(crate) async fn dead_letters(
    shared: &Shared,
    topic: &str,
    limit: usize,
) -> Result<Vec<Event>, TransportError> {
    Ok(parked(shared, topic, limit.min(MAX_PEEK)).await?.collect())
}

pub(crate) async fn dead_letter(
    shared: &Shared,
    topic: &str,
    id: &str,
) -> Result<Option<Event>, TransportError> {
    Ok(parked(shared, topic, MAX_PEEK)
        .await?
        .find(|e| e.id() == id))
}
