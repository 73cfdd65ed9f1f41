//! One piece of work at a time per key, inside this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// Locks keyed by an entity's id (a mail, an enrollment). Two deliveries
/// about one entity — a duplicate, or two events racing — take turns, so
/// the second finds what the first recorded instead of acting on stale
/// state; the inbox then makes the repeat harmless. Across processes the
/// inbox and idempotency keys do that work alone. Entries are removed when
/// nobody holds or waits for them.
#[derive(Debug, Default)]
pub struct KeyLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while the work on a key runs; dropping it lets the next one in.
#[derive(Debug)]
pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        // The map stays consistent even if a holder panicked: every
        // operation on it is a single insert, lookup or remove.
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for, then holds, the lock of `key`.
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = self.map().entry(key.to_owned()).or_default().clone();
        let guard = lock.lock_owned().await;
        KeyGuard {
            locks: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map();
        // Only the map's own reference left: nobody holds or waits for
        // this key (waiters clone the Arc under the map lock).
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn same_key_waits_other_keys_do_not_and_entries_go_away() {
        let locks = Arc::new(KeyLocks::default());
        let first = locks.lock("a").await;
        let _other = locks.lock("b").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
        assert_eq!(locks.len(), 1, "only `b` is still held");
    }
}
