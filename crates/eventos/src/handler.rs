//! Turning functions into handler services.

use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use eventos_core::TypedEvent;
use futures::future::BoxFuture;
use tower::Service;

use crate::{HandlerError, Message};

/// A handler from an async function of a [`Message`].
///
/// ```
/// use eventos::{handler_fn, HandlerError, Message};
/// let handler = handler_fn(|msg: Message| async move {
///     println!("{} (attempt {})", msg.event().ty(), msg.attempt());
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> tower::util::ServiceFn<F>
where
    F: FnMut(Message) -> Fut,
    Fut: Future<Output = Result<(), HandlerError>>,
{
    tower::service_fn(f)
}

/// A handler from an async function of a typed payload and its message.
/// A payload that does not decode as `T` is a permanent failure: the event
/// is dead-lettered at once, since no retry will change its bytes.
///
/// ```
/// use eventos::{typed, HandlerError, Message, TypedEvent};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Ping { n: u32 }
/// impl TypedEvent for Ping { const TYPE: &'static str = "example.ping.v1"; }
///
/// let handler = typed(|ping: Ping, _msg: Message| async move {
///     assert!(ping.n < 10);
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = handler;
/// ```
pub fn typed<T, F, Fut>(f: F) -> Typed<T, F>
where
    T: TypedEvent,
    F: Fn(T, Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Typed {
        f,
        _payload: PhantomData,
    }
}

/// [`typed`], with state: `f` gets a clone of `state` with each event —
/// the service a handler belongs to, usually — so the handler is a plain
/// method call instead of a closure that clones its captures twice.
///
/// ```
/// use eventos::{typed_with, HandlerError, Message, TypedEvent};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Ping { n: u32 }
/// impl TypedEvent for Ping { const TYPE: &'static str = "example.ping.v1"; }
///
/// #[derive(Clone)]
/// struct Counter { seen: std::sync::Arc<std::sync::atomic::AtomicU32> }
/// impl Counter {
///     async fn on_ping(&self, ping: Ping) -> Result<(), HandlerError> {
///         self.seen.fetch_add(ping.n, std::sync::atomic::Ordering::Relaxed);
///         Ok(())
///     }
/// }
///
/// let counter = Counter { seen: Default::default() };
/// let handler = typed_with(counter, |c: Counter, ping: Ping, _msg: Message| async move {
///     c.on_ping(ping).await
/// });
/// # let _ = handler;
/// ```
pub fn typed_with<S, T, F, Fut>(
    state: S,
    f: F,
) -> Typed<T, impl Fn(T, Message) -> Fut + Clone + Send + Sync + 'static>
where
    S: Clone + Send + Sync + 'static,
    T: TypedEvent,
    F: Fn(S, T, Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    typed(move |payload: T, msg: Message| f(state.clone(), payload, msg))
}

/// The service of [`typed`].
pub struct Typed<T, F> {
    f: F,
    _payload: PhantomData<fn() -> T>,
}

impl<T, F: Clone> Clone for Typed<T, F> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T, F> std::fmt::Debug for Typed<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("payload", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, F, Fut> Service<Message> for Typed<T, F>
where
    T: TypedEvent,
    F: Fn(T, Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        match msg.decode::<T>() {
            Ok(payload) => Box::pin((self.f)(payload, msg)),
            Err(e) => Box::pin(std::future::ready(Err(HandlerError::from(e)))),
        }
    }
}
