//! What one Kafka connection knows about its client, and the SASL/PLAIN exchange that
//! names its user (checked as a login against qit's users, with the login rate limiter).

use std::net::SocketAddr;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::Kafka;

/// What one connection knows about its client.
#[derive(Debug, Clone)]
pub struct Session {
    /// The authenticated user (`None` before SASL, and always with auth off).
    pub user: Option<String>,
    /// True once SaslHandshake chose PLAIN.
    pub mechanism_chosen: bool,
    /// The address the client reached us on: advertised as the broker's address.
    pub local: SocketAddr,
    /// The client's address (for the login rate limiter).
    pub peer: SocketAddr,
}

impl Session {
    /// SaslHandshake: only PLAIN is offered.
    pub fn handshake(&mut self, request: &SaslHandshakeRequest) -> SaslHandshakeResponse {
        let mut response = SaslHandshakeResponse::default();
        response.mechanisms = vec![StrBytes::from_static_str("PLAIN")];
        if request.mechanism.as_str() == "PLAIN" {
            self.mechanism_chosen = true;
        } else {
            response.error_code = ResponseError::UnsupportedSaslMechanism.code();
        }
        response
    }

    /// SaslAuthenticate with a PLAIN token (`authzid NUL user NUL password`), checked as a
    /// login against qit's users.
    pub async fn authenticate(
        &mut self,
        kafka: &Kafka,
        request: SaslAuthenticateRequest,
    ) -> SaslAuthenticateResponse {
        let mut response = SaslAuthenticateResponse::default();
        let fail = |mut response: SaslAuthenticateResponse, code: ResponseError, why: &str| {
            response.error_code = code.code();
            response.error_message = Some(StrBytes::from_string(why.to_string()));
            response
        };
        let Some(store) = kafka.auth.clone() else {
            return fail(response, ResponseError::IllegalSaslState, "auth is off");
        };
        if !self.mechanism_chosen || self.user.is_some() {
            return fail(response, ResponseError::IllegalSaslState, "no handshake");
        }
        let token = request.auth_bytes;
        let mut parts = token.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "a PLAIN token is authzid NUL user NUL password",
            );
        };
        let (Ok(user), Ok(password)) = (
            std::str::from_utf8(user).map(str::to_string),
            std::str::from_utf8(password).map(str::to_string),
        ) else {
            return fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "user and password must be UTF-8",
            );
        };
        let client = Some(self.peer.ip());
        let name = user.clone();
        let checked =
            tokio::task::spawn_blocking(move || store.login_from(&name, &password, client)).await;
        match checked {
            Ok(Ok(_token)) => {
                self.user = Some(user);
                response.session_lifetime_ms = 0;
                response
            }
            Ok(Err(error)) => fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                &error.to_string(),
            ),
            Err(_) => fail(
                response,
                ResponseError::SaslAuthenticationFailed,
                "login failed",
            ),
        }
    }
}
