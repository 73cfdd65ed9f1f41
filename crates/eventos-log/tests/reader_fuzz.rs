//! The fuzz target's body, run on every test: arbitrary bytes and
//! mutations of a valid segment must scan, recover and read back without a
//! panic (see `fuzz/` for the coverage-guided version).

use eventos_core::{Event, Publisher, Transport};
use eventos_log::LogTransport;
use proptest::prelude::*;

fn valid_segment() -> Vec<u8> {
    static SEGMENT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEGMENT.get_or_init(write_segment).clone()
}

fn write_segment() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let log = LogTransport::open(dir.path()).unwrap();
        for n in 0..8u32 {
            let ev = Event::builder("/f", "t")
                .subject("s")
                .json(&n)
                .unwrap()
                .build()
                .unwrap();
            log.publish("t", vec![ev]).await.unwrap();
        }
        log.close().await.unwrap();
    });
    std::fs::read(dir.path().join("topics/t/00000000000000000000.log")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        eventos_log::fuzzing::segment(&data);
    }

    #[test]
    fn mutated_valid_segments(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut data = valid_segment();
        for (at, bit) in flips {
            let i = at.index(data.len());
            data[i] ^= 1 << bit;
        }
        let len = cut.index(data.len() + 1);
        data.truncate(len);
        eventos_log::fuzzing::segment(&data);
    }
}
