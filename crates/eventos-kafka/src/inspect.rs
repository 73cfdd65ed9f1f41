//! Inspection: what a group holds, from the broker's offsets and records
//! and from what this process's own members hold.
//!
//! Kafka knows a group's committed offsets and each partition's end, not
//! which records a member has in hand. So, per partition of the topic and
//! of the group's retry topic:
//!
//! - **ready** is what lies past the group's position and has not been
//!   read yet; **in flight** is what was read and is not settled. For a
//!   partition a member in *this process* holds, its own cursor says
//!   which is which; for a partition a member elsewhere holds, Kafka
//!   cannot tell, so everything past the committed offset counts as ready
//!   (in flight included, and settled events too for up to a commit
//!   interval, a second).
//! - **retrying** and the **next retry** come from reading the retry
//!   topic past the group's position: a copy whose due time is ahead is
//!   retrying. At most [`SCAN_LIMIT`] records are read per partition;
//!   beyond that, copies count as retrying without a due time.
//! - **dead-lettered** counts the records on `<topic>.dlq` that this
//!   group put there (their `deadlettergroup`), also read, at most
//!   [`SCAN_LIMIT`] per partition. Dead letters are kept as long as the
//!   topic's retention keeps them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventos_core::{
    Event, GroupCounts, TransportError, TransportErrorKind, dead_letter_topic, ext,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::codec::{self, Stamp};
use crate::consumer::{Held, retry_topics};
use crate::{Shared, kafka_error};

/// The most records read from one partition for one answer.
pub(crate) const SCAN_LIMIT: u64 = 10_000;

/// How long one answer may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer that reads and asks, never joining or committing: its group
/// id is the group asked about (for its committed offsets), or a throwaway.
fn reader(shared: &Shared, group_id: &str) -> Result<BaseConsumer, TransportError> {
    let mut config = shared.base.clone();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    config.create().map_err(|e| crate::refused(&e))
}

/// The partitions of `topic`, or `None` if it does not exist.
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Option<i32>, TransportError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| kafka_error(&format!("reading the metadata of {topic:?}"), &e))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
}

/// Each partition's (low, high) watermarks. A topic created a moment ago
/// is in the metadata before its leader knows it leads: its answer,
/// "not the leader", is asked again until [`TIMEOUT`].
fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
) -> Result<Vec<(i64, i64)>, TransportError> {
    let deadline = Instant::now() + TIMEOUT;
    (0..partitions)
        .map(|p| {
            loop {
                match consumer.fetch_watermarks(topic, p, TIMEOUT) {
                    Err(e) if crate::leader_moving(&e) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    answer => {
                        break answer.map_err(|e| {
                            kafka_error(&format!("reading the end of {topic:?}"), &e)
                        });
                    }
                }
            }
        })
        .collect()
}

/// The group's committed offset per partition of each topic.
fn committed(
    consumer: &BaseConsumer,
    topics: &[(&str, i32)],
) -> Result<HashMap<(String, i32), i64>, TransportError> {
    let mut list = TopicPartitionList::new();
    for &(topic, partitions) in topics {
        for p in 0..partitions {
            list.add_partition(topic, p);
        }
    }
    let committed = consumer
        .committed_offsets(list, TIMEOUT)
        .map_err(|e| kafka_error("reading the group's committed offsets", &e))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
            _ => None,
        })
        .collect())
}

/// Reads `[from, to)` of each listed partition (at most [`SCAN_LIMIT`]
/// records of each), handing every record to `each`.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), TransportError> {
    let limit = i64::try_from(SCAN_LIMIT).unwrap_or(i64::MAX);
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for &(p, from, to) in ranges {
        let to = to.min(from.saturating_add(limit));
        if from < to {
            list.add_partition_offset(topic, p, Offset::Offset(from))
                .map_err(|e| kafka_error("listing partitions to read", &e))?;
            ends.insert(p, to);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&list)
        .map_err(|e| kafka_error(&format!("reading {topic:?}"), &e))?;
    let deadline = Instant::now() + TIMEOUT;
    while !ends.is_empty() {
        if Instant::now() >= deadline {
            return Err(TransportError::new(
                TransportErrorKind::Unavailable,
                format!("reading {topic:?} took longer than {TIMEOUT:?}"),
            ));
        }
        let Some(record) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let record = record.map_err(|e| kafka_error(&format!("reading {topic:?}"), &e))?;
        let p = record.partition();
        let Some(&end) = ends.get(&p) else { continue };
        if record.offset() < end {
            each(&record);
        }
        if record.offset() + 1 >= end {
            ends.remove(&p);
        }
    }
    Ok(())
}

/// Whether the broker knows `group_id` with members (a group elsewhere
/// that has not committed yet).
fn has_members(consumer: &BaseConsumer, group_id: &str) -> Result<bool, TransportError> {
    let groups = consumer
        .fetch_group_list(Some(group_id), TIMEOUT)
        .map_err(|e| kafka_error(&format!("describing group {group_id:?}"), &e))?;
    Ok(groups
        .groups()
        .iter()
        .any(|g| g.name() == group_id && !g.members().is_empty()))
}

/// A partition's position for the group: where this process's member
/// stands, else the committed offset, else the start (new groups read from
/// the earliest record).
fn position(held: Option<&Held>, committed: Option<i64>, low: i64) -> i64 {
    held.map_or_else(
        || committed.unwrap_or(low).max(low),
        |h| i64::try_from(h.position).unwrap_or(i64::MAX),
    )
}

pub(crate) async fn group_counts(
    shared: &Arc<Shared>,
    topic: &str,
    group: &str,
) -> Result<Option<GroupCounts>, TransportError> {
    let physical = shared.physical(topic);
    let retry = retry_topics(&physical, group);
    let group_id = format!("{group}@{physical}");
    let local = shared.members.knows(&group_id);
    let held = shared.members.held(&group_id);
    let consumer = reader(shared, &group_id)?;
    let dead = dead_letters_of(shared, &physical, Some(group)).await?;
    let counts = blocking(move || {
        let Some(main_partitions) = partitions(&consumer, &physical)? else {
            return Ok(None);
        };
        let mut tiers = Vec::with_capacity(retry.len());
        for topic in &retry {
            tiers.push((topic.as_str(), partitions(&consumer, topic)?.unwrap_or(0)));
        }
        let mut all = vec![(physical.as_str(), main_partitions)];
        all.extend(tiers.iter().copied());
        let committed = committed(&consumer, &all)?;
        if !local && committed.is_empty() && !has_members(&consumer, &group_id)? {
            return Ok(None);
        }
        let mut counts = GroupCounts::default();
        for (p, (low, high)) in (0..).zip(watermarks(&consumer, &physical, main_partitions)?) {
            let key = (physical.clone(), p);
            let mine = held.get(&key);
            let from = position(mine, committed.get(&key).copied(), low);
            let read = mine.map_or(from, |h| i64::try_from(h.next).unwrap_or(i64::MAX));
            let settled = mine.map_or(0, |h| h.settled.len());
            let taken = u64::try_from(read - from).unwrap_or(0);
            counts.in_flight += taken.saturating_sub(settled as u64);
            counts.ready += u64::try_from(high - read.max(from)).unwrap_or(0);
        }
        let now_ms = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        )
        .unwrap_or(i64::MAX);
        let mut next_due: Option<i64> = None;
        for &(retry, retry_partitions) in &tiers {
            let mut ranges = Vec::new();
            for (p, (low, high)) in (0..).zip(watermarks(&consumer, retry, retry_partitions)?) {
                let key = (retry.to_owned(), p);
                let from = position(held.get(&key), committed.get(&key).copied(), low);
                let beyond = high - from - i64::try_from(SCAN_LIMIT).unwrap_or(i64::MAX);
                counts.retrying += u64::try_from(beyond).unwrap_or(0);
                ranges.push((p, from, high));
            }
            scan(&consumer, retry, &ranges, |record| {
                let mine = held.get(&(retry.to_owned(), record.partition()));
                let offset = u64::try_from(record.offset()).unwrap_or(0);
                if mine.is_some_and(|h| h.settled.contains(&offset)) {
                    return;
                }
                match Stamp::read(record.headers()).due_ms {
                    Some(due) if due > now_ms => {
                        counts.retrying += 1;
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    }
                    _ if mine.is_some_and(|h| offset < h.next) => counts.in_flight += 1,
                    _ => counts.ready += 1,
                }
            })?;
        }
        counts.next_retry = next_due
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        Ok(Some(counts))
    })
    .await?;
    let Some(mut counts) = counts else {
        return Ok(None);
    };
    counts.dead_lettered = dead.len() as u64;
    Ok(Some(counts))
}

/// The dead letters of `physical` (oldest first), of `group` only if one is
/// given.
async fn dead_letters_of(
    shared: &Arc<Shared>,
    physical: &str,
    group: Option<&str>,
) -> Result<Vec<Event>, TransportError> {
    let dlq = dead_letter_topic(physical);
    let consumer = reader(shared, &format!("eventos-inspect-{}", uuid::Uuid::now_v7()))?;
    let group = group.map(str::to_owned);
    blocking(move || {
        let Some(count) = partitions(&consumer, &dlq)? else {
            return Ok(Vec::new());
        };
        let ranges: Vec<_> = (0..)
            .zip(watermarks(&consumer, &dlq, count)?)
            .map(|(p, (low, high))| (p, low, high))
            .collect();
        let mut found = Vec::new();
        scan(&consumer, &dlq, &ranges, |record| {
            let Ok(event) = codec::decode(record.headers(), record.payload()) else {
                return;
            };
            let ours = group
                .as_deref()
                .is_none_or(|g| event.extension_str(ext::DEAD_LETTER_GROUP) == Some(g));
            if ours {
                let at = record.timestamp().to_millis().unwrap_or(0);
                found.push((at, record.partition(), record.offset(), event));
            }
        })?;
        found.sort_by_key(|(at, p, o, _)| (*at, *p, *o));
        Ok(found.into_iter().map(|(.., e)| e).collect())
    })
    .await
}

pub(crate) async fn dead_letters(
    shared: &Arc<Shared>,
    topic: &str,
    limit: usize,
) -> Result<Vec<Event>, TransportError> {
    let mut all = dead_letters_of(shared, &shared.physical(topic), None).await?;
    all.truncate(limit);
    Ok(all)
}

pub(crate) async fn dead_letter(
    shared: &Arc<Shared>,
    topic: &str,
    id: &str,
) -> Result<Option<Event>, TransportError> {
    let all = dead_letters_of(shared, &shared.physical(topic), None).await?;
    Ok(all.into_iter().find(|e| e.id() == id))
}

/// Runs librdkafka's blocking calls off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TransportError> + Send + 'static,
) -> Result<T, TransportError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        TransportError::new(
            TransportErrorKind::Other,
            format!("an inspection task failed: {e}"),
        )
    })?
}
