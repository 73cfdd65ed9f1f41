//! Metrics through the `metrics` facade: the application picks the
//! exporter (Prometheus, StatsD, …); without one these are no-ops.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `eventos_deliveries_total` | counter | `topic`, `group`, `outcome` (`ack`, `retry`, `dead_letter`) |
//! | `eventos_handler_duration_seconds` | histogram | `topic`, `group` |
//! | `eventos_in_flight` | gauge | `topic`, `group` |

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::middleware::Decided;
use crate::{HandlerError, Message};

/// Records deliveries by outcome, handling latency and in-flight count.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer;

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Metrics { inner }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
}

impl<S> Service<Message> for Metrics<S>
where
    S: Service<Message, Response = Decided, Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = Decided;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Decided, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let labels = [
            ("topic", msg.topic().to_owned()),
            ("group", msg.group().to_owned()),
        ];
        let in_flight = InFlight::enter(metrics::gauge!("eventos_in_flight", &labels));
        let started = Instant::now();
        let fut = self.inner.call(msg);
        Box::pin(async move {
            let decided = fut.await?;
            drop(in_flight);
            metrics::histogram!("eventos_handler_duration_seconds", &labels)
                .record(started.elapsed().as_secs_f64());
            let [(_, topic), (_, group)] = labels;
            metrics::counter!(
                "eventos_deliveries_total",
                "topic" => topic,
                "group" => group,
                "outcome" => decided.outcome().label(),
            )
            .increment(1);
            Ok(decided)
        })
    }
}

/// Decrements the in-flight gauge however the attempt ends, aborted
/// included.
struct InFlight(metrics::Gauge);

impl InFlight {
    fn enter(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
