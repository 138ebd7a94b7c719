//! Adapters: HTTP (axum) and gRPC (tonic). Thin: parse, call the broker, map errors in
//! one place ([`error`]). [`routes`] is the one table the HTTP router and the OpenAPI
//! document are both built from; [`console`] serves the web console's embedded files.

pub mod auth;
pub mod catch_up;
pub mod conn;
pub mod console;
pub mod error;
pub mod grpc;
pub mod http;
pub mod json;
pub mod limits;
pub mod members;
pub mod object;
pub mod publish;
pub mod receive;
pub mod request_checks;
pub mod routes;
pub mod schema;
pub mod state;
pub mod wire;
