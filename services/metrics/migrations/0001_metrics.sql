-- One row per series: `count` is how many events it saw, `total` the sum
-- of what they measured (amounts in minor units, durations in ms). Labels
-- not used by a series are ''.
CREATE TABLE metrics_counters (
    metric   TEXT    NOT NULL,
    label    TEXT    NOT NULL,
    currency TEXT    NOT NULL,
    count    INTEGER NOT NULL,
    total    INTEGER NOT NULL,
    PRIMARY KEY (metric, label, currency)
);

-- Histogram buckets, not cumulative: an observation is counted once, in
-- the first bucket whose upper bound (ms, inclusive) holds it. Those above
-- every bound are only in the series' count, which is the +Inf bucket.
CREATE TABLE metrics_buckets (
    metric TEXT    NOT NULL,
    le_ms  INTEGER NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (metric, le_ms)
);
