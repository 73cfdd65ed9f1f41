//! Billing: charges through a payment-gateway port, idempotently, and refunds on a late fraud signal.
