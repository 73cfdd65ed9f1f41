//! Backoff bounds, for arbitrary policies and attempts.

use std::time::Duration;

use eventos::Backoff;
use proptest::prelude::*;
use rand::SeedableRng;

fn policy() -> impl Strategy<Value = Backoff> {
    (0u64..10_000_000_000, 0u64..100_000_000_000, 1u32..100).prop_map(|(base, cap, max)| {
        Backoff::new(Duration::from_nanos(base), Duration::from_nanos(cap), max)
    })
}

proptest! {
    #[test]
    fn never_above_the_cap(p in policy(), attempt in 0u32..200, seed in any::<u64>()) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        prop_assert!(p.ceiling(attempt) <= p.cap);
        if let Some(d) = p.delay(attempt, &mut rng) {
            prop_assert!(d <= p.ceiling(attempt));
            prop_assert!(d <= p.cap);
        }
    }

    #[test]
    fn grows_until_the_cap(p in policy(), attempt in 1u32..200) {
        let (now, then) = (p.ceiling(attempt), p.ceiling(attempt + 1));
        prop_assert!(then >= now);
        if now < p.cap && !p.base.is_zero() {
            prop_assert!(then > now, "ceiling must grow below the cap: {now:?} -> {then:?}");
        }
    }

    #[test]
    fn stops_at_max_attempts(p in policy(), seed in any::<u64>()) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for attempt in 1..p.max_attempts {
            prop_assert!(p.delay(attempt, &mut rng).is_some());
        }
        prop_assert!(p.delay(p.max_attempts, &mut rng).is_none());
    }

    #[test]
    fn huge_attempts_do_not_overflow(base in any::<u64>(), cap in any::<u64>(), attempt in any::<u32>()) {
        let p = Backoff::new(Duration::from_nanos(base), Duration::from_nanos(cap), u32::MAX);
        prop_assert!(p.ceiling(attempt) <= p.cap);
    }
}

#[test]
fn default_doubles_from_200ms() {
    let p = Backoff::default();
    let ceilings: Vec<_> = (1..=4).map(|a| p.ceiling(a).as_millis()).collect();
    assert_eq!(ceilings, vec![200, 400, 800, 1600]);
}
