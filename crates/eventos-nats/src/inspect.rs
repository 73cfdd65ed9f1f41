//! Inspection: what a group holds, from the server, in any process.
//!
//! JetStream counts a consumer's undelivered messages (`num_pending`) and
//! those handed out and not acked (`num_ack_pending`), but a message NAKed
//! with a delay is only one more of the latter: the server does not say
//! which wait for a retry, nor until when. So each retry leaves a marker in
//! one stream of the namespace, `<namespace>_retries`, on the subject
//! `<namespace>._retries.<stream>.<consumer>.<sequence>.<due ms>`, written
//! before the NAK and purged when the event is delivered again. One stream
//! info request filtered on a group's subjects then counts its retries and
//! finds the earliest due, from any process. A marker whose NAK never
//! reached the server (a crash in between) is past due and purged with
//! the next delivery of its event; past due, it counts as ready.
//!
//! Dead letters are read from `<topic>.dlq`'s stream, oldest first, one
//! request per message: inspection is for operators, not the hot path.

use std::time::{Duration, UNIX_EPOCH};

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use eventos_core::{Event, GroupCounts, TransportError, dead_letter_topic, ext};
use futures::TryStreamExt as _;

use crate::{Shared, codec, safe_name, unavailable};

/// The most dead letters read to count a group's.
const COUNT_SCAN_LIMIT: usize = 10_000;

impl Shared {
    fn retries_stream(&self) -> String {
        format!("{}_retries", self.options.namespace)
    }

    fn retries_prefix(&self, stream: &str, consumer: &str) -> String {
        format!("{}._retries.{stream}.{consumer}", self.options.namespace)
    }

    /// Creates the namespace's retry-marker stream once.
    async fn ensure_retries(&self) -> Result<stream::Stream<()>, TransportError> {
        let name = self.retries_stream();
        if !eventos_kit::lock(&self.streams).contains(&name) {
            let config = stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}._retries.>", self.options.namespace)],
                storage: stream::StorageType::File,
                num_replicas: self.options.replicas,
                ..Default::default()
            };
            self.js
                .get_or_create_stream(config)
                .await
                .map_err(|e| unavailable(&format!("creating the retry stream {name:?}"), &e))?;
            eventos_kit::lock(&self.streams).insert(name.clone());
        }
        self.js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| unavailable(&format!("opening the retry stream {name:?}"), &e))
    }

    /// Marks the message `sequence` of `stream` as waiting for a retry of
    /// `consumer` until `due_ms`.
    pub(crate) async fn mark_retry(
        &self,
        stream: &str,
        consumer: &str,
        sequence: u64,
        due_ms: i64,
    ) -> Result<(), TransportError> {
        self.ensure_retries().await?;
        let subject = format!(
            "{}.{sequence}.{due_ms}",
            self.retries_prefix(stream, consumer)
        );
        let what = format!("marking a retry on {subject:?}");
        self.js
            .publish(subject, bytes::Bytes::new())
            .await
            .map_err(|e| unavailable(&what, &e))?
            .await
            .map_err(|e| unavailable(&what, &e))?;
        Ok(())
    }

    /// Purges the retry marker of message `sequence`, if there is one.
    pub(crate) async fn unmark_retry(
        &self,
        stream: &str,
        consumer: &str,
        sequence: u64,
    ) -> Result<(), TransportError> {
        let retries = self.ensure_retries().await?;
        let filter = format!("{}.{sequence}.*", self.retries_prefix(stream, consumer));
        retries
            .purge()
            .filter(filter.clone())
            .await
            .map_err(|e| unavailable(&format!("purging {filter:?}"), &e))?;
        Ok(())
    }

    /// The due times of the retries `consumer` of `stream` has waiting,
    /// epoch milliseconds.
    async fn retries_due(&self, stream: &str, consumer: &str) -> Result<Vec<i64>, TransportError> {
        let retries = self.ensure_retries().await?;
        let prefix = self.retries_prefix(stream, consumer);
        let what = format!("counting the retries on {prefix:?}");
        let mut subjects = retries
            .info_with_subjects(format!("{prefix}.>"))
            .await
            .map_err(|e| unavailable(&what, &e))?;
        let mut due = Vec::new();
        while let Some((subject, count)) = subjects
            .try_next()
            .await
            .map_err(|e| unavailable(&what, &e))?
        {
            if count == 0 {
                continue;
            }
            if let Some(ms) = subject.rsplit('.').next().and_then(|t| t.parse().ok()) {
                due.push(ms);
            }
        }
        Ok(due)
    }
}

/// Counts what `group` holds on `topic`; `None` if no such group.
pub(crate) async fn group_counts(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<Option<GroupCounts>, TransportError> {
    let stream_name = shared.stream_name(topic);
    let consumer = safe_name(group);
    let what = format!("reading group {group:?} of topic {topic:?}");
    let stream = shared
        .js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|e| unavailable(&what, &e))?;
    let info = match stream.consumer_info(&consumer).await {
        Ok(info) => info,
        Err(e)
            if matches!(
                e.kind(),
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(unavailable(&what, &e)),
    };
    let now_ms = eventos_kit::clock::now_ms();
    let due = shared.retries_due(&stream_name, &consumer).await?;
    let waiting: Vec<i64> = due.iter().copied().filter(|&d| d > now_ms).collect();
    let past_due = (due.len() - waiting.len()) as u64;
    let ack_pending = info.num_ack_pending as u64;
    let next_retry = waiting
        .iter()
        .min()
        .map(|&ms| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    let dead_lettered = dead_lettered_by(shared, topic, group).await?;
    let mut counts = GroupCounts::default();
    counts.ready = info.num_pending + past_due.min(ack_pending);
    counts.in_flight = ack_pending.saturating_sub(due.len() as u64);
    counts.retrying = waiting.len() as u64;
    counts.next_retry = next_retry;
    counts.dead_lettered = dead_lettered;
    Ok(Some(counts))
}

/// Reads `topic`'s dead letters oldest first, handing each to `keep`
/// until it says stop; a topic without dead letters reads none.
async fn scan_dead_letters(
    shared: &Shared,
    topic: &str,
    mut keep: impl FnMut(Event) -> bool,
) -> Result<(), TransportError> {
    let dlq = dead_letter_topic(topic);
    let name = shared.stream_name(&dlq);
    let what = format!("reading the dead letters of {topic:?}");
    let mut stream = match shared.js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e) if is_stream_not_found(&e) => return Ok(()),
        Err(e) => return Err(unavailable(&what, &e)),
    };
    let state = stream
        .info()
        .await
        .map_err(|e| unavailable(&what, &e))?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(());
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => continue,
            Err(e) => return Err(unavailable(&what, &e)),
        };
        match codec::decode(Some(&message.headers), &message.payload) {
            Ok(event) => {
                if !keep(event) {
                    break;
                }
            }
            Err(reason) => {
                tracing::warn!(stream = %name, sequence, %reason, "a dead letter that is not a CloudEvent");
            }
        }
    }
    Ok(())
}

fn is_stream_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

async fn dead_lettered_by(
    shared: &Shared,
    topic: &str,
    group: &str,
) -> Result<u64, TransportError> {
    let mut count = 0;
    let mut read = 0;
    scan_dead_letters(shared, topic, |event| {
        read += 1;
        if event.extension_str(ext::DEAD_LETTER_GROUP) == Some(group) {
            count += 1;
        }
        read < COUNT_SCAN_LIMIT
    })
    .await?;
    Ok(count)
}

/// `topic`'s dead letters, oldest first, at most `limit`.
pub(crate) async fn dead_letters(
    shared: &Shared,
    topic: &str,
    limit: usize,
) -> Result<Vec<Event>, TransportError> {
    let mut events = Vec::new();
    if limit == 0 {
        return Ok(events);
    }
    scan_dead_letters(shared, topic, |event| {
        events.push(event);
        events.len() < limit
    })
    .await?;
    Ok(events)
}

/// The dead letter of `topic` with id `id`.
pub(crate) async fn dead_letter(
    shared: &Shared,
    topic: &str,
    id: &str,
) -> Result<Option<Event>, TransportError> {
    let mut found = None;
    scan_dead_letters(shared, topic, |event| {
        if event.id() == id {
            found = Some(event);
            false
        } else {
            true
        }
    })
    .await?;
    Ok(found)
}
