//! Adapters: HTTP (axum) and gRPC (tonic). Thin: parse, call the broker, map errors.
