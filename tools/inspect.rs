//! `qit-inspect`: offline segment inspection.
fn main() {}
