//! The `qit` binary.
fn main() {}
