//! Server configuration: TOML file, `QIT_*` environment and flags.
