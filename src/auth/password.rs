//! Credentials: username and password rules, and argon2id password hashing.
//!
//! Hashing is deliberately CPU- and memory-heavy; async callers run it (and so
//! [`super::AuthStore::register`] and [`super::AuthStore::login`]) in `spawn_blocking`.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};

use super::AuthError;

/// Longest username, in characters.
pub const MAX_USERNAME_LEN: usize = 64;
/// Shortest password, in bytes.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password, in bytes (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordCost {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

impl Default for PasswordCost {
    /// The argon2 crate's recommended defaults (19 MiB, 2 iterations, 1 lane).
    fn default() -> Self {
        PasswordCost {
            m_cost_kib: Params::DEFAULT_M_COST,
            t_cost: Params::DEFAULT_T_COST,
            p_cost: Params::DEFAULT_P_COST,
        }
    }
}

impl PasswordCost {
    /// The cheapest valid setting: for tests only, never for real passwords.
    pub fn cheap_for_tests() -> Self {
        PasswordCost {
            m_cost_kib: Params::MIN_M_COST,
            t_cost: 1,
            p_cost: 1,
        }
    }

    fn hasher(&self) -> Result<Argon2<'static>, AuthError> {
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, None).map_err(|e| {
            AuthError::InvalidConfig {
                reason: format!("argon2 parameters: {e}"),
            }
        })?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Checks the parameters are valid for argon2.
    pub fn validate(&self) -> Result<(), AuthError> {
        self.hasher().map(|_| ())
    }
}

/// Checks a username: the name rule of [`crate::name`] (`[A-Za-z0-9._-]`, not starting with
/// `.`), at most 64 characters.
pub fn check_username(username: &str) -> Result<(), AuthError> {
    crate::name::check_with_max(username, MAX_USERNAME_LEN).map_err(|_| {
        AuthError::InvalidUsername {
            username: username.chars().take(MAX_USERNAME_LEN + 1).collect(),
        }
    })
}

/// Checks a new password's length: 8..=1024 bytes.
pub fn check_password(password: &str) -> Result<(), AuthError> {
    let len = password.len();
    if (MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&len) {
        Ok(())
    } else {
        Err(AuthError::InvalidPassword {
            reason: format!(
                "a password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} bytes long, not {len}"
            ),
        })
    }
}

/// Hashes a password with argon2id and a random salt; returns the PHC string
/// (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), which records the cost used.
pub fn hash_password(cost: &PasswordCost, password: &str) -> Result<String, AuthError> {
    let hash = cost
        .hasher()?
        .hash_password(password.as_bytes())
        .map_err(|e| AuthError::Hashing {
            reason: e.to_string(),
        })?;
    Ok(hash.to_string())
}

/// True if `password` matches the PHC string `hash` (whose own parameters are used).
pub fn verify_password(password: &str, hash: &str) -> bool {
    // The cost parameters come from the hash string; the hasher's own are not used.
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let cost = PasswordCost::cheap_for_tests();
        let h1 = hash_password(&cost, "correct horse").unwrap();
        let h2 = hash_password(&cost, "correct horse").unwrap();
        assert!(h1.starts_with("$argon2id$"));
        assert_ne!(h1, h2, "salts are random");
        assert!(verify_password("correct horse", &h1));
        assert!(!verify_password("correct horsf", &h1));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn username_rules() {
        for ok in ["a", "alice", "Bob.Smith_2-x", &"u".repeat(64)] {
            assert!(check_username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "with space", "ünï", "a/b", &"u".repeat(65)] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_rules() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"p".repeat(1024)).is_ok());
        assert!(check_password(&"p".repeat(1025)).is_err());
    }

    #[test]
    fn bad_cost_is_a_config_error() {
        let cost = PasswordCost {
            m_cost_kib: 1,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(matches!(
            cost.validate(),
            Err(AuthError::InvalidConfig { .. })
        ));
    }
}
