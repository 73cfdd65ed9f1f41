//! Waiting for a condition, with a deadline: how a test waits for what
//! happens asynchronously, instead of sleeping and hoping.

use std::future::Future;
use std::time::Duration;

/// Asks `check` until it says yes, every 10 ms; panics naming `what` if it
/// has not said yes within `within`.
///
/// # Panics
///
/// When the deadline passes first.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let asked = AtomicU32::new(0);
        eventually("the third ask", Duration::from_secs(5), || async {
            asked.fetch_add(1, Ordering::Relaxed) >= 2
        })
        .await;
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for never")]
    async fn panics_at_the_deadline() {
        eventually("never", Duration::from_millis(30), || async { false }).await;
    }
}
