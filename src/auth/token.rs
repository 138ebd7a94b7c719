//! JWTs (HS256) and the signing secret.
//!
//! The secret comes from configuration when given; otherwise 32 random bytes are generated
//! once and kept in `{data_dir}/auth/jwt.secret` (base64, mode 0600), so tokens survive
//! restarts. Expiry is checked here against an injectable `now` (no leeway), so tests need
//! no sleeping.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AuthError;
use super::persist;

/// Name of the generated secret file inside the auth directory.
pub const SECRET_FILE: &str = "jwt.secret";
/// Shortest configured secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
const GENERATED_SECRET_LEN: usize = 32;

/// The claims of a qit token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The username.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The HS256 signing secret. `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

impl Secret {
    /// A configured secret; at least [`MIN_SECRET_LEN`] bytes.
    pub fn from_config(secret: &str) -> Result<Secret, AuthError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(AuthError::InvalidConfig {
                reason: format!("the JWT secret must be at least {MIN_SECRET_LEN} bytes"),
            });
        }
        Ok(Secret(secret.as_bytes().to_vec()))
    }

    /// Loads `{auth_dir}/jwt.secret`, generating it (mode 0600) on first use.
    pub fn load_or_generate(auth_dir: &Path) -> Result<Secret, AuthError> {
        let path = auth_dir.join(SECRET_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes =
                    URL_SAFE_NO_PAD
                        .decode(text.trim())
                        .map_err(|e| AuthError::CorruptState {
                            path: path.clone(),
                            reason: format!("secret is not base64: {e}"),
                        })?;
                if bytes.len() < MIN_SECRET_LEN {
                    return Err(AuthError::CorruptState {
                        path,
                        reason: format!("secret shorter than {MIN_SECRET_LEN} bytes"),
                    });
                }
                persist::restrict_permissions(&path)?;
                Ok(Secret(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes: [u8; GENERATED_SECRET_LEN] = rand::random();
                let text = URL_SAFE_NO_PAD.encode(bytes);
                persist::write_private_atomically(&path, text.as_bytes())?;
                tracing::info!(path = %path.display(), "generated a new JWT signing secret");
                Ok(Secret(bytes.to_vec()))
            }
            Err(source) => Err(AuthError::Io { path, source }),
        }
    }

    /// Signs a token for `username` valid until `exp` (Unix seconds).
    pub fn issue(&self, username: &str, exp: u64) -> Result<String, AuthError> {
        let claims = Claims {
            sub: username.to_owned(),
            exp,
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.0),
        )
        .map_err(|e| AuthError::Signing {
            reason: e.to_string(),
        })
    }

    /// Verifies a token's signature and shape, then its expiry against `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against the injected `now`, without leeway.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&self.0), &validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                        AuthError::TamperedToken
                    }
                    _ => AuthError::MalformedToken,
                })?;
        if data.claims.exp <= now {
            return Err(AuthError::ExpiredToken);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_config(&"s".repeat(32)).unwrap()
    }

    #[test]
    fn issue_and_verify() {
        let s = secret();
        let token = s.issue("alice", 1_000).unwrap();
        let claims = s.verify(&token, 999).unwrap();
        assert_eq!(claims.sub, "alice");
        assert!(matches!(
            s.verify(&token, 1_000),
            Err(AuthError::ExpiredToken)
        ));
    }

    #[test]
    fn other_secret_is_tampered() {
        let token = secret().issue("alice", 1_000).unwrap();
        let other = Secret::from_config(&"t".repeat(32)).unwrap();
        assert!(matches!(
            other.verify(&token, 0),
            Err(AuthError::TamperedToken)
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        for token in ["", "abc", "a.b.c", "...."] {
            assert!(matches!(
                secret().verify(token, 0),
                Err(AuthError::MalformedToken)
            ));
        }
    }

    #[test]
    fn short_configured_secret_is_refused() {
        assert!(Secret::from_config("short").is_err());
    }

    #[test]
    fn debug_redacts() {
        assert!(!format!("{:?}", secret()).contains("sss"));
    }
}
