//! The event every bench publishes, shared by the log and RabbitMQ
//! benches.

use eventos_core::{Bytes, Event};

/// A fixed payload, a fresh id.
pub(crate) fn bench_event(payload: &Bytes) -> Event {
    Event::builder("/eventos/bench", "bench.event.v1")
        .data("application/json", payload.clone())
        .build()
        .expect("the bench event is valid")
}
