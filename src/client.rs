//! A small HTTP/gRPC client used by the CLI subcommands and `qit bench`.
