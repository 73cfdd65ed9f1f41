//! Public futures and handles are `Send` (and `Sync` where shared), so they
//! can be spawned on a multi-threaded runtime. A regression here breaks
//! users at compile time, far from the cause; this catches it here.

use std::sync::Arc;

use eventos::{Bus, Event, Route, Router, RunningRouter, Transport, TypedEvent, handler_fn};
use eventos_memory::MemoryTransport;

fn require_send<T: Send>(_: &T) {}
fn require_sync<T: Sync>() {}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping;
impl TypedEvent for Ping {
    const TYPE: &'static str = "test.ping.v1";
}

#[test]
fn handles_are_send_and_sync() {
    require_sync::<Bus>();
    require_sync::<Arc<dyn Transport>>();
    require_sync::<MemoryTransport>();
    require_sync::<RunningRouter>();
    require_sync::<Event>();
}

#[test]
fn public_futures_are_send() {
    let transport = Arc::new(MemoryTransport::new());
    let bus = Bus::new(transport.clone(), "/t");
    require_send(&bus.emit("t", &Ping));
    require_send(&bus.publish("t", Vec::new()));
    let router = Router::new(transport.clone()).route(Route::new(
        "t",
        "g",
        handler_fn(|_m| async { Ok::<(), eventos::HandlerError>(()) }),
    ));
    require_send(&router.run(async {}));
    let router = Router::new(transport.clone());
    require_send(&router.start());
    require_send(&eventos::shutdown_signal());
    require_send(&transport.close());
}
