//! A reader's place in a topic, kept by the group that reads there: its
//! own module, so the topic and the group both name it and neither
//! imports the other for it.

/// Where a reader is: a segment and a byte position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadPos {
    pub(crate) segment: u64,
    pub(crate) pos: u64,
}
