//! The frames a consumer and a publisher exchange over a DEALER–ROUTER
//! pair.
//!
//! Every message is multipart. A delivery starts with its topic frame and
//! carries the event as CloudEvents JSON in the second, so any ZeroMQ
//! client reads it; the tag and attempt follow. Everything else starts
//! with a `$` verb, which no topic can (topic names are letters, digits,
//! `.`, `_` and `-`). Numbers are decimal ASCII, so a client in any
//! language needs no byte-order code.
//!
//! Consumer → publisher:
//!
//! | frames | meaning |
//! |---|---|
//! | `$hello` `1` topic group `earliest`\|`latest` prefetch | join `group` on `topic`, at most `prefetch` unsettled |
//! | `$ping` | I am alive (also keeps the session) |
//! | `$settle` tag `ack` | done |
//! | `$acks` tag… | done, for each of them |
//! | `$settle` tag `retry` delay-ms | deliver again, no sooner |
//! | `$settle` tag `dead` reason [error] | dead-letter it |
//! | `$release` tag | put it back now (its handler was dropped) |
//! | `$stop` | send no more; I settle what I hold |
//! | `$sync` | answer `$synced` once what I sent before is carried out |
//! | `$bye` | the session is over; what I hold goes back |
//!
//! Publisher → consumer: `$welcome`, `$refused` message, `$pong`, `$synced`, `$gone`
//! (no session: say hello again), `$settled` tag [error] (the answer to
//! every retry and dead letter, and to an ack only when it failed: a
//! consumer need not wait for its acks), and deliveries `topic`
//! `event-json` tag attempt.

use std::time::Duration;

use bytes::Bytes;
use eventos_core::{DeadLetter, Outcome, StartFrom};
use zeromq::ZmqMessage;

/// The protocol version a `$hello` names.
pub(crate) const VERSION: &str = "1";

/// A message from a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToPublisher {
    Hello {
        version: String,
        topic: String,
        group: String,
        start: StartFrom,
        prefetch: usize,
    },
    Ping,
    Settle {
        tag: u64,
        outcome: Outcome,
    },
    Acks {
        tags: Vec<u64>,
    },
    Release {
        tag: u64,
    },
    Stop,
    Sync,
    Bye,
}

/// A message from a publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToConsumer {
    Welcome,
    Refused(String),
    Pong,
    Synced,
    Gone,
    Settled {
        tag: u64,
        error: Option<String>,
    },
    Delivery {
        topic: Bytes,
        event: Bytes,
        tag: u64,
        attempt: u32,
    },
}

fn message(frames: Vec<Bytes>) -> ZmqMessage {
    // Never empty: every message below has at least its verb.
    ZmqMessage::try_from(frames).unwrap_or_else(|_| ZmqMessage::from(Bytes::new()))
}

fn text(s: impl Into<String>) -> Bytes {
    Bytes::from(s.into())
}

impl ToPublisher {
    pub(crate) fn encode(&self) -> ZmqMessage {
        let frames = match self {
            ToPublisher::Hello {
                version,
                topic,
                group,
                start,
                prefetch,
            } => vec![
                text("$hello"),
                text(version.clone()),
                text(topic.clone()),
                text(group.clone()),
                text(match start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                }),
                text(prefetch.to_string()),
            ],
            ToPublisher::Ping => vec![text("$ping")],
            ToPublisher::Settle { tag, outcome } => {
                let mut frames = vec![text("$settle"), text(tag.to_string())];
                match outcome {
                    Outcome::Ack => frames.push(text("ack")),
                    Outcome::Retry { after } => {
                        frames.push(text("retry"));
                        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
                        frames.push(text(ms.to_string()));
                    }
                    Outcome::DeadLetter(dead) => {
                        frames.push(text("dead"));
                        frames.push(text(dead.reason.clone()));
                        if let Some(error) = &dead.error {
                            frames.push(text(error.clone()));
                        }
                    }
                }
                frames
            }
            ToPublisher::Acks { tags } => std::iter::once(text("$acks"))
                .chain(tags.iter().map(|tag| text(tag.to_string())))
                .collect(),
            ToPublisher::Release { tag } => vec![text("$release"), text(tag.to_string())],
            ToPublisher::Stop => vec![text("$stop")],
            ToPublisher::Sync => vec![text("$sync")],
            ToPublisher::Bye => vec![text("$bye")],
        };
        message(frames)
    }

    /// Reads the frames after the ROUTER's identity frame.
    pub(crate) fn decode(frames: &[Bytes]) -> Result<Self, String> {
        let verb = utf8(frames.first(), "verb")?;
        let arg = |i: usize, what: &str| utf8(frames.get(i), what);
        Ok(match verb {
            "$hello" => ToPublisher::Hello {
                version: arg(1, "version")?.to_owned(),
                topic: arg(2, "topic")?.to_owned(),
                group: arg(3, "group")?.to_owned(),
                start: match arg(4, "start")? {
                    "earliest" => StartFrom::Earliest,
                    "latest" => StartFrom::Latest,
                    other => {
                        return Err(format!(
                            "start {other:?} is neither \"earliest\" nor \"latest\""
                        ));
                    }
                },
                prefetch: number(arg(5, "prefetch")?, "prefetch")?,
            },
            "$ping" => ToPublisher::Ping,
            "$settle" => {
                let tag = number(arg(1, "tag")?, "tag")?;
                let outcome = match arg(2, "outcome")? {
                    "ack" => Outcome::Ack,
                    "retry" => Outcome::Retry {
                        after: Duration::from_millis(number(arg(3, "delay")?, "delay")?),
                    },
                    "dead" => Outcome::DeadLetter(DeadLetter {
                        reason: arg(3, "reason")?.to_owned(),
                        error: frames
                            .get(4)
                            .map(|_| arg(4, "error"))
                            .transpose()?
                            .map(str::to_owned),
                    }),
                    other => {
                        return Err(format!(
                            "outcome {other:?} is none of \"ack\", \"retry\", \"dead\""
                        ));
                    }
                };
                ToPublisher::Settle { tag, outcome }
            }
            "$acks" => ToPublisher::Acks {
                tags: (1..frames.len())
                    .map(|i| number(arg(i, "tag")?, "tag"))
                    .collect::<Result<_, _>>()?,
            },
            "$release" => ToPublisher::Release {
                tag: number(arg(1, "tag")?, "tag")?,
            },
            "$stop" => ToPublisher::Stop,
            "$sync" => ToPublisher::Sync,
            "$bye" => ToPublisher::Bye,
            other => return Err(format!("unknown verb {other:?}")),
        })
    }
}

impl ToConsumer {
    pub(crate) fn encode(&self) -> ZmqMessage {
        let frames = match self {
            ToConsumer::Welcome => vec![text("$welcome")],
            ToConsumer::Refused(why) => vec![text("$refused"), text(why.clone())],
            ToConsumer::Pong => vec![text("$pong")],
            ToConsumer::Synced => vec![text("$synced")],
            ToConsumer::Gone => vec![text("$gone")],
            ToConsumer::Settled { tag, error } => {
                let mut frames = vec![text("$settled"), text(tag.to_string())];
                frames.extend(error.iter().map(|e| text(e.clone())));
                frames
            }
            ToConsumer::Delivery {
                topic,
                event,
                tag,
                attempt,
            } => vec![
                topic.clone(),
                event.clone(),
                text(tag.to_string()),
                text(attempt.to_string()),
            ],
        };
        message(frames)
    }

    pub(crate) fn decode(frames: &[Bytes]) -> Result<Self, String> {
        let first = utf8(frames.first(), "first frame")?;
        let arg = |i: usize, what: &str| utf8(frames.get(i), what);
        Ok(match first {
            "$welcome" => ToConsumer::Welcome,
            "$refused" => ToConsumer::Refused(arg(1, "reason")?.to_owned()),
            "$pong" => ToConsumer::Pong,
            "$synced" => ToConsumer::Synced,
            "$gone" => ToConsumer::Gone,
            "$settled" => ToConsumer::Settled {
                tag: number(arg(1, "tag")?, "tag")?,
                error: frames
                    .get(2)
                    .map(|_| arg(2, "error"))
                    .transpose()?
                    .map(str::to_owned),
            },
            verb if verb.starts_with('$') => return Err(format!("unknown verb {verb:?}")),
            _ => ToConsumer::Delivery {
                topic: frames[0].clone(),
                event: frames
                    .get(1)
                    .cloned()
                    .ok_or("a delivery without its event frame")?,
                tag: number(arg(2, "tag")?, "tag")?,
                attempt: number(arg(3, "attempt")?, "attempt")?,
            },
        })
    }
}

fn utf8<'a>(frame: Option<&'a Bytes>, what: &str) -> Result<&'a str, String> {
    let frame = frame.ok_or_else(|| format!("the {what} frame is missing"))?;
    std::str::from_utf8(frame).map_err(|_| format!("the {what} frame is not UTF-8"))
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a decimal number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_publisher(m: &ToPublisher) {
        let frames = m.encode().into_vec();
        assert_eq!(&ToPublisher::decode(&frames).unwrap(), m);
    }

    fn round_trip_consumer(m: &ToConsumer) {
        let frames = m.encode().into_vec();
        assert_eq!(&ToConsumer::decode(&frames).unwrap(), m);
    }

    #[test]
    fn every_message_reads_back() {
        round_trip_publisher(&ToPublisher::Hello {
            version: VERSION.into(),
            topic: "school.contact".into(),
            group: "mailer".into(),
            start: StartFrom::Latest,
            prefetch: 16,
        });
        round_trip_publisher(&ToPublisher::Ping);
        round_trip_publisher(&ToPublisher::Settle {
            tag: 7,
            outcome: Outcome::Ack,
        });
        round_trip_publisher(&ToPublisher::Settle {
            tag: 8,
            outcome: Outcome::Retry {
                after: Duration::from_millis(1500),
            },
        });
        for error in [None, Some("smtp 451".to_owned())] {
            round_trip_publisher(&ToPublisher::Settle {
                tag: u64::MAX,
                outcome: Outcome::DeadLetter(DeadLetter {
                    reason: "retries exhausted".into(),
                    error,
                }),
            });
        }
        round_trip_publisher(&ToPublisher::Acks {
            tags: vec![4, 5, 6],
        });
        round_trip_publisher(&ToPublisher::Release { tag: 3 });
        round_trip_publisher(&ToPublisher::Stop);
        round_trip_publisher(&ToPublisher::Sync);
        round_trip_publisher(&ToPublisher::Bye);
        round_trip_consumer(&ToConsumer::Welcome);
        round_trip_consumer(&ToConsumer::Refused("bad group".into()));
        round_trip_consumer(&ToConsumer::Pong);
        round_trip_consumer(&ToConsumer::Synced);
        round_trip_consumer(&ToConsumer::Gone);
        round_trip_consumer(&ToConsumer::Settled {
            tag: 1,
            error: None,
        });
        round_trip_consumer(&ToConsumer::Settled {
            tag: 2,
            error: Some("not held".into()),
        });
        round_trip_consumer(&ToConsumer::Delivery {
            topic: Bytes::from_static(b"school.contact"),
            event: Bytes::from_static(b"{\"specversion\":\"1.0\"}"),
            tag: 9,
            attempt: 2,
        });
    }

    #[test]
    fn garbage_is_named() {
        let err = ToPublisher::decode(&[Bytes::from_static(b"$dance")]).unwrap_err();
        assert!(err.contains("$dance"), "{err}");
        let err = ToPublisher::decode(&[Bytes::from_static(b"$settle"), Bytes::from_static(b"x1")])
            .unwrap_err();
        assert!(err.contains("tag"), "{err}");
        let err = ToPublisher::decode(&[]).unwrap_err();
        assert!(err.contains("verb"), "{err}");
        let err = ToConsumer::decode(&[Bytes::from_static(b"topic")]).unwrap_err();
        assert!(err.contains("event frame"), "{err}");
    }
}
