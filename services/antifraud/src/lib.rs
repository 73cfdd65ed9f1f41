//! Anti-fraud: deterministic rules and a risk score for each submitted payment.
