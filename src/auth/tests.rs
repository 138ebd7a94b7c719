//! Unit tests of [`AuthStore`]: register/login/verify, tokens, persistence, the authorize
//! matrix and the rate limit.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;

fn config() -> AuthConfig {
    AuthConfig {
        admin: Some("root".into()),
        password_cost: PasswordCost::cheap_for_tests(),
        ..AuthConfig::default()
    }
}

fn store(dir: &Path) -> AuthStore {
    AuthStore::open(dir, config()).unwrap()
}

/// A store with users root (admin), alice (owner of queue q) and bob.
fn populated(dir: &Path) -> AuthStore {
    let s = store(dir);
    s.create_user("root", "password123").unwrap();
    for user in ["alice", "bob"] {
        s.register(user, "password123").unwrap();
    }
    s.set_owner(&Resource::queue("q"), "alice").unwrap();
    s
}

#[test]
fn register_login_verify() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let token = s.login("alice", "password123").unwrap();
    let claims = s.verify_token(&token).unwrap();
    assert_eq!(claims.sub, "alice");
    assert!(claims.exp > unix_now() + 3500);
    assert!(matches!(
        s.register("alice", "password456"),
        Err(AuthError::UserExists { .. })
    ));
}

#[test]
fn wrong_password_and_unknown_user_look_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let wrong = s.login("alice", "password124").unwrap_err();
    let unknown = s.login("mallory", "password123").unwrap_err();
    assert!(matches!(wrong, AuthError::InvalidCredentials));
    assert!(matches!(unknown, AuthError::InvalidCredentials));
    assert_eq!(wrong.to_string(), unknown.to_string());
}

#[test]
fn registration_rules() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    for bad in ["bad name", "..", ".", ".hidden", "a/b"] {
        assert!(matches!(
            s.register(bad, "password123"),
            Err(AuthError::InvalidUsername { .. })
        ));
    }
    assert!(matches!(
        s.register("alice", "short"),
        Err(AuthError::InvalidPassword { .. })
    ));
}

/// Flips one character of a base64url string to another valid one.
fn flip(part: &str, at: usize) -> String {
    let mut chars: Vec<char> = part.chars().collect();
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[test]
fn tampered_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let token = s.login("alice", "password123").unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);

    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], flip(parts[2], 0));
    let err = s.verify_token(&bad_sig).unwrap_err();
    assert!(matches!(err, AuthError::TamperedToken), "{err:?}");

    let bad_payload = format!("{}.{}.{}", parts[0], flip(parts[1], 5), parts[2]);
    let err = s.verify_token(&bad_payload).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unauthenticated, "{err:?}");

    // A forged payload naming another user, keeping the old signature.
    let forged = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"root","exp":{}}}"#, u64::MAX));
    let err = s
        .verify_token(&format!("{}.{forged}.{}", parts[0], parts[2]))
        .unwrap_err();
    assert!(matches!(err, AuthError::TamperedToken), "{err:?}");

    for garbage in ["", "x", "a.b", "a.b.c"] {
        assert!(matches!(
            s.verify_token(garbage),
            Err(AuthError::MalformedToken)
        ));
    }
}

#[test]
fn expired_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let t0 = 1_700_000_000;
    let token = s
        .login_at("alice", "password123", None, Instant::now(), t0)
        .unwrap();
    assert!(s.verify_token_at(&token, t0 + 3599).is_ok());
    assert!(matches!(
        s.verify_token_at(&token, t0 + 3600),
        Err(AuthError::ExpiredToken)
    ));

    let zero_ttl = AuthStore::open(
        dir.path(),
        AuthConfig {
            token_ttl: Duration::ZERO,
            ..config()
        },
    )
    .unwrap();
    let token = zero_ttl.login("alice", "password123").unwrap();
    assert!(matches!(
        zero_ttl.verify_token(&token),
        Err(AuthError::ExpiredToken)
    ));
}

#[test]
fn state_and_secret_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let token = {
        let s = populated(dir.path());
        s.grant(
            "alice",
            &Resource::queue("q"),
            "bob",
            &[Permission::Consume],
        )
        .unwrap();
        s.login("bob", "password123").unwrap()
    };
    let s = store(dir.path());
    assert_eq!(s.verify_token(&token).unwrap().sub, "bob");
    assert!(s.login("alice", "password123").is_ok());
    assert_eq!(s.owner(&Resource::queue("q")).as_deref(), Some("alice"));
    assert_eq!(
        s.permissions(&Resource::queue("q"), "bob"),
        [Permission::Consume]
    );
}

#[cfg(unix)]
#[test]
fn auth_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    for file in ["jwt.secret", "users.json", "grants.json"] {
        let path = dir.path().join("auth").join(file);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn configured_secret_is_used_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuthConfig {
        jwt_secret: Some("k".repeat(40)),
        ..config()
    };
    let s = AuthStore::open(dir.path(), cfg.clone()).unwrap();
    s.register("alice", "password123").unwrap();
    let token = s.login("alice", "password123").unwrap();
    assert!(!dir.path().join("auth/jwt.secret").exists());
    // Another store with the same secret accepts it; a generated secret does not.
    assert!(
        AuthStore::open(dir.path(), cfg)
            .unwrap()
            .verify_token(&token)
            .is_ok()
    );
    assert!(matches!(
        store(dir.path()).verify_token(&token),
        Err(AuthError::TamperedToken)
    ));
}

#[test]
fn authorize_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let s = populated(dir.path());
    let q = Resource::queue("q");
    s.grant("alice", &q, "bob", &[Permission::Publish]).unwrap();
    use Action::*;
    // (user, action, allowed)
    let rows = [
        ("alice", Publish, true),
        ("alice", Consume, true),
        ("alice", Manage, true),
        ("alice", Create, true),
        ("root", Publish, true),
        ("root", Consume, true),
        ("root", Manage, true),
        ("bob", Publish, true),
        ("bob", Consume, false),
        ("bob", Manage, false),
        ("bob", Create, true),
        ("carol", Publish, false),
        ("carol", Consume, false),
        ("carol", Manage, false),
        ("carol", Create, true),
        ("alice", View, true),
        ("root", View, true),
        ("bob", View, true),
        ("carol", View, false),
    ];
    for (user, action, allowed) in rows {
        let result = s.authorize(user, action, &q);
        assert_eq!(result.is_ok(), allowed, "{user} {action}");
        if let Err(e) = result {
            assert_eq!(e.class(), ErrorClass::Forbidden);
        }
    }
    // The same-named exchange is a different resource.
    assert!(
        s.authorize("bob", Publish, &Resource::exchange("q"))
            .is_err()
    );
}

#[test]
fn grants_need_manage_rights_and_known_users() {
    let dir = tempfile::tempdir().unwrap();
    let s = populated(dir.path());
    let q = Resource::queue("q");
    assert!(matches!(
        s.grant("bob", &q, "bob", &[Permission::Consume]),
        Err(AuthError::Forbidden { .. })
    ));
    assert!(matches!(
        s.grant("alice", &q, "nobody", &[Permission::Consume]),
        Err(AuthError::UnknownUser { .. })
    ));
    s.grant("root", &q, "bob", &[Permission::Consume]).unwrap();
    s.grant("alice", &q, "bob", &[Permission::Publish]).unwrap();
    assert_eq!(
        s.permissions(&q, "bob"),
        [Permission::Publish, Permission::Consume]
    );
    assert!(matches!(
        s.revoke("bob", &q, "bob"),
        Err(AuthError::Forbidden { .. })
    ));
    s.revoke("alice", &q, "bob").unwrap();
    assert!(s.authorize("bob", Action::Consume, &q).is_err());
}

#[test]
fn removing_a_resource_forgets_owner_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let s = populated(dir.path());
    let q = Resource::queue("q");
    s.grant("alice", &q, "bob", &[Permission::Consume]).unwrap();
    s.remove_resource(&q).unwrap();
    assert_eq!(s.owner(&q), None);
    assert!(s.authorize("alice", Action::Manage, &q).is_err());
    assert!(s.authorize("bob", Action::Consume, &q).is_err());
    assert!(s.authorize("root", Action::Manage, &q).is_ok());
}

#[test]
fn failed_logins_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let t0 = Instant::now();
    let unix = unix_now();
    for i in 0..5 {
        let at = t0 + Duration::from_secs(i);
        assert!(matches!(
            s.login_at("alice", "wrong-password", None, at, unix),
            Err(AuthError::InvalidCredentials)
        ));
    }
    let err = s
        .login_at(
            "alice",
            "password123",
            None,
            t0 + Duration::from_secs(10),
            unix,
        )
        .unwrap_err();
    assert!(matches!(err, AuthError::RateLimited { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::TooManyRequests);
    assert!(
        s.login_at(
            "alice",
            "password123",
            None,
            t0 + Duration::from_secs(61),
            unix
        )
        .is_ok()
    );
}

#[test]
fn admin_is_bootstrapped_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuthConfig {
        admin_password: Some("admin-password".into()),
        ..config()
    };
    let s = AuthStore::open(dir.path(), cfg.clone()).unwrap();
    assert!(s.login("root", "admin-password").is_ok());
    // Reopening with the admin present is fine.
    AuthStore::open(dir.path(), cfg).unwrap();
}

#[test]
fn debug_output_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuthConfig {
        jwt_secret: Some("super-secret-value-of-32-bytes-or-more".into()),
        admin_password: Some("admin-password".into()),
        ..config()
    };
    let s = AuthStore::open(dir.path(), cfg).unwrap();
    let text = format!("{s:?}");
    assert!(!text.contains("super-secret"), "{text}");
    assert!(!text.contains("admin-password"), "{text}");
    let users = s.users.read();
    let record = format!("{:?}", users.users.get("root").unwrap());
    assert!(!record.contains("argon2"), "{record}");
}

/// Regression (issue 19, item 5): with an `admin` configured, nobody may register its
/// name (with no `admin_password`, anyone could claim it first).
#[test]
fn the_admin_name_cannot_be_registered() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let err = s.register("root", "password123").unwrap_err();
    assert!(matches!(err, AuthError::ReservedUsername { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Forbidden);
    assert!(!s.user_exists("root"));
}

/// Regression (issue 19, item 6): a correctly signed token of a user that does not exist
/// (any more) is refused.
#[test]
fn token_of_an_unknown_user_is_refused() {
    let cfg = AuthConfig {
        jwt_secret: Some("k".repeat(40)),
        ..config()
    };
    let first = tempfile::tempdir().unwrap();
    let s = AuthStore::open(first.path(), cfg.clone()).unwrap();
    s.register("alice", "password123").unwrap();
    let token = s.login("alice", "password123").unwrap();
    let other = tempfile::tempdir().unwrap();
    let err = AuthStore::open(other.path(), cfg)
        .unwrap()
        .verify_token(&token)
        .unwrap_err();
    assert!(matches!(err, AuthError::UnknownTokenUser), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Unauthenticated);
}

/// Regression (issue 19, item 6): failed logins lock out one client for one user, not the
/// user for everyone.
#[test]
fn lockout_is_per_client_and_user() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    s.register("alice", "password123").unwrap();
    let (t0, unix) = (Instant::now(), unix_now());
    let mallory: Option<IpAddr> = Some("10.0.0.66".parse().unwrap());
    let alice: Option<IpAddr> = Some("10.0.0.7".parse().unwrap());
    for _ in 0..5 {
        let _ = s.login_at("alice", "wrong-password", mallory, t0, unix);
    }
    assert!(matches!(
        s.login_at("alice", "password123", mallory, t0, unix),
        Err(AuthError::RateLimited { .. })
    ));
    assert!(s.login_at("alice", "password123", alice, t0, unix).is_ok());
}

/// Regression (issue 19, item 8): a huge username is refused before it is hashed, kept by
/// the limiter or put whole into an error (and so into a log line).
#[test]
fn a_huge_username_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let huge = "a".repeat(1 << 20);
    let (t0, unix) = (Instant::now(), unix_now());
    for _ in 0..10 {
        let err = s
            .login_at(&huge, "password123", None, t0, unix)
            .unwrap_err();
        assert!(matches!(err, AuthError::InvalidUsername { .. }), "{err:?}");
        assert!(err.to_string().len() < 200);
    }
    // Refused before the limiter: ten attempts did not lock it out.
    assert!(matches!(
        s.login_at(&huge, "password123", None, t0, unix),
        Err(AuthError::InvalidUsername { .. })
    ));
}
