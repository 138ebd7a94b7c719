//! Binds the HTTP and gRPC listeners, runs timers and drains on shutdown.
