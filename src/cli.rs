//! Command-line types (clap): `serve` and the client subcommands.
