//! Offline verification, dumps and statistics of segments (used by `qit-inspect`).
