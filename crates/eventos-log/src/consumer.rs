//! A subscriber of a group, and the settlement of what it hands out: the
//! kit's pull loop and settle-once acker over the log's leases and control
//! records.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventos_core::{
    Delivery, DeliveryInfo, Event, Outcome, TransportError, TransportErrorKind, dead_letter_event,
    dead_letter_topic,
};
use eventos_kit::{Gate, OnceAcker, Prefetch, Pull, Settle, Step, lock};
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::group::{Entry, Group};
use crate::position::ReadPos;
use crate::record::Control;
use crate::topic::{ReadRecord, TopicLog};
use crate::writer::{self, Op};
use crate::{Shared, codec, encode};

/// Events read back, by offset; `None` where an event did not decode.
type Decoded = Vec<(u64, Option<Event>)>;

pub(crate) struct Consumer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) topic: Arc<TopicLog>,
    pub(crate) group: Arc<Group>,
    pub(crate) prefetch: Prefetch,
}

impl Pull for Consumer {
    fn gate(&self) -> Gate<'_> {
        Gate::new(&self.shared.lifecycle, &self.prefetch)
    }

    fn step(&self) -> Step {
        let fetch = {
            let mut st = lock(&self.group.state);
            let now = Instant::now();
            let expired = st.tick(now);
            if expired > 0 {
                self.shared
                    .stats
                    .redeliveries
                    .fetch_add(expired as u64, Ordering::Relaxed);
            }
            if let Some((entry, lease)) = st.take(now, self.shared.visibility) {
                drop(st);
                return Step::Deliver(self.delivery(entry, lease));
            }
            if st.fetching || st.next_read >= self.topic.durable_next.load(Ordering::Acquire) {
                return Step::Wait(st.next_deadline());
            }
            match st.read_pos.or_else(|| self.topic.seek(st.next_read)) {
                Some(pos) => {
                    // One reader at a time per group; the others wait for
                    // the chunk it reads.
                    st.fetching = true;
                    pos
                }
                None => return Step::Wait(st.next_deadline()),
            }
        };
        match self.fetch(fetch) {
            Ok(()) => Step::Again,
            Err(e) => Step::Fail(e),
        }
    }
}

impl Consumer {
    /// Reads the next chunk of the log into the group's ready queue.
    fn fetch(&self, pos: ReadPos) -> Result<(), TransportError> {
        let read = self.topic.read(pos);
        let decoded: io::Result<(Decoded, ReadPos)> = read.map(|(records, next)| {
            let events = records
                .into_iter()
                .map(|ReadRecord { offset, event }| match codec::decode(event) {
                    Ok(event) => (offset, Some(event)),
                    Err(e) => {
                        tracing::error!(topic = %self.topic.name, offset, error = %e, "skipping an undecodable event");
                        (offset, None)
                    }
                })
                .collect();
            (events, next)
        });
        let mut st = lock(&self.group.state);
        st.fetching = false;
        let (records, next) = decoded.map_err(|e| {
            TransportError::new(
                TransportErrorKind::Io,
                format!("cannot read topic `{}`", self.topic.name),
            )
            .with_source(e)
        })?;
        st.read_pos = Some(next);
        let now_ms = writer::now_ms();
        let now = Instant::now();
        for (offset, event) in records {
            if offset < st.next_read {
                continue;
            }
            st.next_read = offset + 1;
            if st.is_settled(offset) {
                continue;
            }
            let Some(event) = event else {
                st.settle(offset);
                continue;
            };
            let event = Arc::new(event);
            match st.recovered_retries.remove(&offset) {
                Some((attempt, due_ms)) => {
                    let wait = u64::try_from(due_ms - now_ms).unwrap_or(0);
                    st.delay(
                        Entry {
                            offset,
                            event,
                            attempt,
                        },
                        now + Duration::from_millis(wait),
                    );
                }
                None => st.ready.push_back(Entry {
                    offset,
                    event,
                    attempt: 1,
                }),
            }
        }
        drop(st);
        // Other consumers of the group may be waiting for this chunk.
        self.group.notify.notify_waiters();
        Ok(())
    }

    fn delivery(&self, entry: Entry, lease: u64) -> Delivery {
        let info = DeliveryInfo {
            topic: self.topic.name.clone(),
            group: self.group.name.clone(),
            attempt: entry.attempt,
        };
        let settle = LogSettle {
            shared: self.shared.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            offset: entry.offset,
            lease,
        };
        let acker = OnceAcker::with_permit(settle, self.prefetch.acquire());
        Delivery::new(entry.event, info, Box::new(acker))
    }
}

/// One leased offset of a group: settled by a control record in the
/// topic's log, written before the group's memory changes.
struct LogSettle {
    shared: Arc<Shared>,
    topic: Arc<TopicLog>,
    group: Arc<Group>,
    offset: u64,
    lease: u64,
}

impl Settle for LogSettle {
    fn settle(
        self,
        event: &Event,
        info: &DeliveryInfo,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let dead_letter = match &outcome {
            Outcome::DeadLetter(dl) => Some(encode(&dead_letter_event(event, info, dl))),
            _ => None,
        };
        let attempt = info.attempt;
        Box::pin(async move {
            let LogSettle {
                shared,
                topic,
                group,
                offset,
                lease,
            } = self;
            if !lock(&group.state).holds(offset, lease) {
                return Err(TransportError::new(
                    TransportErrorKind::Settled,
                    "the delivery's lease expired and the event was redelivered; settle within the visibility timeout",
                ));
            }
            let control = |control| Op::Control {
                topic: topic.clone(),
                control,
            };
            let group_id = group.id;
            let ops = match &outcome {
                Outcome::Ack => vec![control(Control::Ack {
                    group: group_id,
                    offset,
                })],
                Outcome::Retry { after } => {
                    vec![control(Control::Retry {
                        group: group_id,
                        offset,
                        attempt: attempt + 1,
                        due_ms: eventos_kit::clock::due_ms(*after),
                    })]
                }
                // The dead letter and the settlement in one round: never
                // one without the other.
                Outcome::DeadLetter(_) => vec![
                    Op::Append {
                        topic: shared.topic(&dead_letter_topic(&topic.name)),
                        events: dead_letter.into_iter().collect(),
                    },
                    control(Control::DeadLetter {
                        group: group_id,
                        offset,
                    }),
                ],
            };
            // Durable first; memory changes only once the log has it.
            shared.write(ops).await?;
            let mut st = lock(&group.state);
            match outcome {
                Outcome::Retry { after } => {
                    if let Some(mut entry) = st.release(offset, lease) {
                        entry.attempt = attempt + 1;
                        st.delay(entry, Instant::now() + after);
                    }
                }
                Outcome::Ack | Outcome::DeadLetter(_) => {
                    st.release(offset, lease);
                    st.settle(offset);
                }
            }
            drop(st);
            group.notify.notify_waiters();
            Ok(())
        })
    }

    fn unsettled(self) {
        let mut st = lock(&self.group.state);
        if let Some(entry) = st.release(self.offset, self.lease) {
            st.requeue(entry);
        }
        drop(st);
        self.group.notify.notify_waiters();
    }
}

/// Every durable event of `topic`, oldest first, while `keep` says go on:
/// what inspection reads of a dead-letter topic.
pub(crate) fn scan(
    topic: &TopicLog,
    mut keep: impl FnMut(Event) -> bool,
) -> Result<(), TransportError> {
    let end = topic.durable_next.load(Ordering::Acquire);
    let Some(mut pos) = topic.seek(topic.first_offset()) else {
        return Ok(());
    };
    loop {
        let (records, next) = topic.read(pos).map_err(|e| {
            TransportError::new(
                TransportErrorKind::Io,
                format!("cannot read topic `{}`", topic.name),
            )
            .with_source(e)
        })?;
        let mut last = None;
        for ReadRecord { offset, event } in records {
            last = Some(offset);
            if offset >= end {
                return Ok(());
            }
            // An undecodable record is skipped here as the consumers do.
            if let Ok(event) = codec::decode(event)
                && !keep(event)
            {
                return Ok(());
            }
        }
        if next == pos || last.is_some_and(|o| o + 1 >= end) {
            return Ok(());
        }
        pos = next;
    }
}
