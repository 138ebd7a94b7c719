//! The one place that maps broker errors to HTTP statuses, error codes and gRPC statuses.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::ErrorClass;
use crate::broker::BrokerError;

/// The body, or the JSON error for a rejected one (413 when too large). Here, not in the
/// route table, so that every HTTP adapter file maps a rejected body the same way without
/// importing another adapter file.
pub fn body_bytes(
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<bytes::Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "message_too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, rejection.body_text())
    })
}

/// Turns an error answer that is not JSON into the JSON error shape. axum's own extractor
/// rejections (a path parameter that is not UTF-8, say) answer `text/plain`; every error of
/// the API is `{"error": {"code", "message"}}`, so the router maps them here, in one place.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_text = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !is_text {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "message_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ if status.is_server_error() => "internal_error",
        _ => "bad_request",
    };
    ApiError::new(status, code, text).into_response()
}

/// An error answer of the API: status, snake_case code, human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// A 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    /// An error with any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        use BrokerError as E;
        let (status, code) = match &error {
            E::InvalidName(crate::name::NameError::Io { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_error")
            }
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            E::InvalidSetting(_) => (StatusCode::BAD_REQUEST, "invalid_setting"),
            E::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            E::InvalidBinding(_) => (StatusCode::BAD_REQUEST, "invalid_binding"),
            E::QueueNotFound(_) => (StatusCode::NOT_FOUND, "queue_not_found"),
            E::GroupNotFound { .. } => (StatusCode::NOT_FOUND, "group_not_found"),
            E::ExchangeNotFound(_) => (StatusCode::NOT_FOUND, "exchange_not_found"),
            E::MessageNotFound(_) => (StatusCode::NOT_FOUND, "message_not_found"),
            E::NotLeased(_) => (StatusCode::CONFLICT, "not_leased"),
            E::GroupInUse { .. } => (StatusCode::CONFLICT, "group_in_use"),
            E::QueueExists(_) => (StatusCode::CONFLICT, "queue_exists"),
            E::ExchangeExists(_) => (StatusCode::CONFLICT, "exchange_exists"),
            E::MessageTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large"),
            E::LimitReached(_) => (StatusCode::TOO_MANY_REQUESTS, "limit_reached"),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            E::QueueDamaged { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_damaged"),
            E::Log(_) | E::Journal(_) | E::Storage { .. } | E::Corrupt { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_error")
            }
            E::NoLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            E::Auth(auth) => auth_status(auth.class()),
            E::Remote { .. } => (remote_status(error.code()), error.code()),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE && code == "storage_error" {
            tracing::error!(%error, "storage error");
        }
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

/// The HTTP status and code of an auth error of this class.
pub fn auth_status(class: ErrorClass) -> (StatusCode, &'static str) {
    match class {
        ErrorClass::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        ErrorClass::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        ErrorClass::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
        ErrorClass::NotFound => (StatusCode::NOT_FOUND, "user_not_found"),
        ErrorClass::Conflict => (StatusCode::CONFLICT, "user_exists"),
        ErrorClass::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        ErrorClass::Internal => (StatusCode::SERVICE_UNAVAILABLE, "storage_error"),
    }
}

/// The HTTP status of an error code another cluster node answered with.
fn remote_status(code: &str) -> StatusCode {
    match code {
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "user_not_found" | "node_not_found" => StatusCode::NOT_FOUND,
        "user_exists" | "membership_conflict" => StatusCode::CONFLICT,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "invalid_name" | "invalid_setting" | "bad_request" | "invalid_binding" => {
            StatusCode::BAD_REQUEST
        }
        "queue_not_found" | "group_not_found" | "exchange_not_found" | "message_not_found" => {
            StatusCode::NOT_FOUND
        }
        "not_leased" | "group_in_use" | "queue_exists" | "exchange_exists" => StatusCode::CONFLICT,
        "message_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "limit_reached" => StatusCode::TOO_MANY_REQUESTS,
        "shutting_down" | "queue_damaged" | "storage_error" | "no_leader" => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        if matches!(self.code, "no_leader" | "catching_up") {
            // A leader is usually elected, and a node caught up, within a second or two.
            return (
                self.status,
                [(axum::http::header::RETRY_AFTER, "1")],
                Json(body),
            )
                .into_response();
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::cluster::metadata_catch_up::MetadataBehind> for ApiError {
    fn from(behind: crate::cluster::metadata_catch_up::MetadataBehind) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "catching_up",
            behind.to_string(),
        )
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        use tonic::Code;
        let code = match error.status {
            StatusCode::BAD_REQUEST => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::CONFLICT if error.code.ends_with("_exists") => Code::AlreadyExists,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => {
                Code::ResourceExhausted
            }
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            _ => Code::Internal,
        };
        tonic::Status::new(code, error.message)
    }
}

impl From<BrokerError> for tonic::Status {
    fn from(error: BrokerError) -> Self {
        ApiError::from(error).into()
    }
}
