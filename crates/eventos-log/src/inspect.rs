//! Offline inspection of a data directory (`eventos log …`).
