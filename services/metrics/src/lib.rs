//! Payment metrics: counts, amounts, approval and fraud rates, time to activation.
