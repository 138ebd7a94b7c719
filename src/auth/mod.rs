//! Authentication and authorization core: users with argon2id password hashes, HS256 JWTs,
//! resource ownership and per-queue grants, and a failed-login rate limiter.
//!
//! A library only: the HTTP/gRPC adapters call [`AuthStore`] and map [`AuthError`] to
//! statuses ([`AuthError::class`]). State lives under `{data_dir}/auth/`:
//! `users.json` (users and password hashes), `grants.json` (owners and grants), and
//! `jwt.secret` (generated signing secret when none is configured). Each file is replaced
//! atomically (temp + fsync + rename) and has mode 0600.
//!
//! Rules: the creator owns a queue or exchange; the owner and the admin (named in
//! [`AuthConfig::admin`]) may do everything with it; other users need a grant for
//! [`Action::Publish`] / [`Action::Consume`] and are refused [`Action::Manage`]; any
//! grant allows [`Action::View`]; any authenticated user may [`Action::Create`].
//!
//! [`AuthStore::register`] and [`AuthStore::login`] hash passwords (deliberately slow):
//! async callers run them in `tokio::task::spawn_blocking`. Nothing here logs or `Debug`s a
//! password, hash or secret.

mod limiter;
mod model;
mod password;
mod persist;
mod token;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

pub use limiter::LoginLimiter;
pub use model::{Action, GrantsFile, Permission, Resource, UserRecord, UsersFile};
pub use password::{
    MAX_PASSWORD_LEN, MAX_USERNAME_LEN, MIN_PASSWORD_LEN, PasswordCost, check_password,
    check_username,
};
pub use token::{Claims, MIN_SECRET_LEN, unix_now};

use token::Secret;

/// Environment variable the server may read the JWT secret from (see
/// [`AuthConfig::with_env_secret`]).
pub const JWT_SECRET_ENV: &str = "QIT_JWT_SECRET";

/// Errors of authentication and authorization.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A username that breaks the rules.
    #[error(
        "invalid username `{username}`: use 1-64 characters of [A-Za-z0-9._-], not starting with `.`"
    )]
    InvalidUsername {
        /// The name given (cut to 65 characters).
        username: String,
    },
    /// A password that breaks the rules.
    #[error("invalid password: {reason}")]
    InvalidPassword {
        /// Which rule.
        reason: String,
    },
    /// Registering a name that is taken.
    #[error("user `{username}` already exists")]
    UserExists {
        /// The name.
        username: String,
    },
    /// Registering the configured admin's name (only the configuration creates it).
    #[error("the username `{username}` is reserved")]
    ReservedUsername {
        /// The name.
        username: String,
    },
    /// A well-signed token whose user no longer exists.
    #[error("the token's user no longer exists")]
    UnknownTokenUser,
    /// Granting to a user that does not exist.
    #[error("unknown user `{username}`")]
    UnknownUser {
        /// The name.
        username: String,
    },
    /// Wrong password or unknown user (deliberately indistinguishable).
    #[error("invalid username or password")]
    InvalidCredentials,
    /// Too many failed logins for this username from this client.
    #[error("too many failed logins for `{username}`; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited {
        /// The username.
        username: String,
        /// When the next attempt may succeed.
        retry_after: Duration,
    },
    /// Not a well-formed JWT of ours.
    #[error("malformed token")]
    MalformedToken,
    /// A token whose signature does not verify.
    #[error("invalid token signature")]
    TamperedToken,
    /// A token past its expiry.
    #[error("token expired")]
    ExpiredToken,
    /// An authenticated user without the right.
    #[error("user `{user}` may not {action} {resource}")]
    Forbidden {
        /// Who asked.
        user: String,
        /// What for.
        action: Action,
        /// On what.
        resource: Resource,
    },
    /// Bad auth configuration.
    #[error("invalid auth configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// Password hashing failed.
    #[error("password hashing failed: {reason}")]
    Hashing {
        /// The cause.
        reason: String,
    },
    /// Token signing failed.
    #[error("token signing failed: {reason}")]
    Signing {
        /// The cause.
        reason: String,
    },
    /// An I/O error on an auth file.
    #[error("auth I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An auth file that cannot be read back.
    #[error("corrupt auth file {path}: {reason}")]
    CorruptState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// How an adapter should answer an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 400 / INVALID_ARGUMENT.
    BadRequest,
    /// 401 / UNAUTHENTICATED.
    Unauthenticated,
    /// 403 / PERMISSION_DENIED.
    Forbidden,
    /// 404 / NOT_FOUND.
    NotFound,
    /// 409 / ALREADY_EXISTS.
    Conflict,
    /// 429 / RESOURCE_EXHAUSTED.
    TooManyRequests,
    /// 500 / INTERNAL (503 for I/O is also fitting).
    Internal,
}

impl AuthError {
    /// The response class for this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            AuthError::InvalidUsername { .. } | AuthError::InvalidPassword { .. } => {
                ErrorClass::BadRequest
            }
            AuthError::UserExists { .. } => ErrorClass::Conflict,
            AuthError::ReservedUsername { .. } => ErrorClass::Forbidden,
            AuthError::UnknownUser { .. } => ErrorClass::NotFound,
            AuthError::InvalidCredentials
            | AuthError::MalformedToken
            | AuthError::TamperedToken
            | AuthError::ExpiredToken
            | AuthError::UnknownTokenUser => ErrorClass::Unauthenticated,
            AuthError::RateLimited { .. } => ErrorClass::TooManyRequests,
            AuthError::Forbidden { .. } => ErrorClass::Forbidden,
            AuthError::InvalidConfig { .. }
            | AuthError::Hashing { .. }
            | AuthError::Signing { .. }
            | AuthError::Io { .. }
            | AuthError::CorruptState { .. } => ErrorClass::Internal,
        }
    }
}

/// Auth settings. `Debug` redacts the secret and the admin password.
#[derive(Clone)]
pub struct AuthConfig {
    /// The admin user's name: may do everything.
    pub admin: Option<String>,
    /// If set with `admin`, the admin user is created with this password when missing (so
    /// nobody else can claim the name first).
    pub admin_password: Option<String>,
    /// HS256 secret (at least 32 bytes); when `None`, one is generated and kept in
    /// `{data_dir}/auth/jwt.secret`.
    pub jwt_secret: Option<String>,
    /// Token lifetime (default 1 h).
    pub token_ttl: Duration,
    /// argon2id cost for new hashes.
    pub password_cost: PasswordCost,
    /// Failed logins per (client address, username) allowed within `failed_login_window`
    /// (default 5).
    pub max_failed_logins: u32,
    /// The failed-login window (default 60 s).
    pub failed_login_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin: None,
            admin_password: None,
            jwt_secret: None,
            token_ttl: Duration::from_secs(3600),
            password_cost: PasswordCost::default(),
            max_failed_logins: 5,
            failed_login_window: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("AuthConfig")
            .field("admin", &self.admin)
            .field("admin_password", &redact(&self.admin_password))
            .field("jwt_secret", &redact(&self.jwt_secret))
            .field("token_ttl", &self.token_ttl)
            .field("password_cost", &self.password_cost)
            .field("max_failed_logins", &self.max_failed_logins)
            .field("failed_login_window", &self.failed_login_window)
            .finish()
    }
}

impl AuthConfig {
    /// Takes the secret from [`JWT_SECRET_ENV`] when none is configured.
    pub fn with_env_secret(mut self) -> Self {
        if self.jwt_secret.is_none() {
            self.jwt_secret = std::env::var(JWT_SECRET_ENV).ok().filter(|s| !s.is_empty());
        }
        self
    }
}

/// Users, ownership and grants, durable under `{data_dir}/auth/`. Share as
/// `Arc<AuthStore>`; all methods take `&self`.
pub struct AuthStore {
    dir: PathBuf,
    config: AuthConfig,
    secret: Secret,
    users: RwLock<UsersFile>,
    grants: RwLock<GrantsFile>,
    limiter: Mutex<LoginLimiter>,
    /// A hash verified against for unknown users, so that a login's timing does not tell
    /// whether the user exists.
    dummy_hash: OnceLock<String>,
}

impl fmt::Debug for AuthStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthStore")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("users", &self.users.read().users.len())
            .finish_non_exhaustive()
    }
}

/// Names of the files under the auth directory.
const USERS_FILE: &str = "users.json";
const GRANTS_FILE: &str = "grants.json";

impl AuthStore {
    /// Opens (creating if needed) the auth state under `{data_dir}/auth/`.
    pub fn open(data_dir: &Path, config: AuthConfig) -> Result<AuthStore, AuthError> {
        config.password_cost.validate()?;
        if let Some(admin) = &config.admin {
            check_username(admin)?;
        }
        let dir = data_dir.join("auth");
        std::fs::create_dir_all(&dir).map_err(|source| AuthError::Io {
            path: dir.clone(),
            source,
        })?;
        let secret = match &config.jwt_secret {
            Some(configured) => Secret::from_config(configured)?,
            None => Secret::load_or_generate(&dir)?,
        };
        let users: UsersFile = persist::load_json(&dir.join(USERS_FILE))?;
        let grants: GrantsFile = persist::load_json(&dir.join(GRANTS_FILE))?;
        let limiter = LoginLimiter::new(config.max_failed_logins, config.failed_login_window);
        let store = AuthStore {
            dir,
            config,
            secret,
            users: RwLock::new(users),
            grants: RwLock::new(grants),
            limiter: Mutex::new(limiter),
            dummy_hash: OnceLock::new(),
        };
        store.bootstrap_admin()?;
        Ok(store)
    }

    fn bootstrap_admin(&self) -> Result<(), AuthError> {
        let (Some(admin), Some(password)) = (&self.config.admin, &self.config.admin_password)
        else {
            return Ok(());
        };
        match self.create_user(admin, password) {
            Ok(()) | Err(AuthError::UserExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// True if `user` is the configured admin.
    pub fn is_admin(&self, user: &str) -> bool {
        self.config.admin.as_deref() == Some(user)
    }

    /// True if `user` is registered.
    pub fn user_exists(&self, user: &str) -> bool {
        self.users.read().users.contains_key(user)
    }

    /// Registers a user; the configured admin's name is refused (the configuration creates
    /// it). CPU-heavy (hashes the password): use `spawn_blocking` from async.
    pub fn register(&self, username: &str, password: &str) -> Result<(), AuthError> {
        check_username(username)?;
        if self.is_admin(username) {
            return Err(AuthError::ReservedUsername {
                username: username.to_owned(),
            });
        }
        self.create_user(username, password)
    }

    fn create_user(&self, username: &str, password: &str) -> Result<(), AuthError> {
        let record = self.hash_new_user(username, password)?;
        self.insert_user(username, record)
    }

    /// The first half of [`AuthStore::register`]: checks the name and password and hashes
    /// the password into the record to store (so that a cluster replicates the hash, never
    /// the password). CPU-heavy: use `spawn_blocking` from async.
    pub fn new_user(&self, username: &str, password: &str) -> Result<UserRecord, AuthError> {
        check_username(username)?;
        if self.is_admin(username) {
            return Err(AuthError::ReservedUsername {
                username: username.to_owned(),
            });
        }
        self.hash_new_user(username, password)
    }

    fn hash_new_user(&self, username: &str, password: &str) -> Result<UserRecord, AuthError> {
        check_username(username)?;
        check_password(password)?;
        if self.user_exists(username) {
            return Err(AuthError::UserExists {
                username: username.to_owned(),
            });
        }
        let password_hash = password::hash_password(&self.config.password_cost, password)?;
        Ok(UserRecord {
            password_hash,
            created_at_ms: unix_now().saturating_mul(1000),
        })
    }

    /// The second half of [`AuthStore::register`]: stores a user made by
    /// [`AuthStore::new_user`] (here or on another cluster node). Deterministic: every node
    /// given the same users before answers the same.
    pub fn insert_user(&self, username: &str, record: UserRecord) -> Result<(), AuthError> {
        check_username(username)?;
        let mut users = self.users.write();
        // Checked again under the lock: another registration may have won meanwhile.
        if users.users.contains_key(username) {
            return Err(AuthError::UserExists {
                username: username.to_owned(),
            });
        }
        let mut next = users.clone();
        next.users.insert(username.to_owned(), record);
        persist::save_json(&self.dir.join(USERS_FILE), &next)?;
        *users = next;
        tracing::info!(user = username, "registered user");
        Ok(())
    }

    /// Checks a password and returns a signed token. CPU-heavy: use `spawn_blocking`.
    pub fn login(&self, username: &str, password: &str) -> Result<String, AuthError> {
        self.login_from(username, password, None)
    }

    /// [`AuthStore::login`] by a client at `client` (failed logins lock out that client
    /// for that user, not the user for everyone).
    pub fn login_from(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        self.login_at(username, password, client, Instant::now(), unix_now())
    }

    /// [`AuthStore::login_from`] at a given time (`now` for the rate limiter, `unix_now` in
    /// seconds for the token's expiry).
    pub fn login_at(
        &self,
        username: &str,
        password: &str,
        client: Option<IpAddr>,
        now: Instant,
        unix_now: u64,
    ) -> Result<String, AuthError> {
        // Before anything else: a bad name is neither hashed, nor kept, nor logged.
        check_username(username)?;
        let key = (client, username);
        if let Err(retry_after) = self.limiter.lock().check(key, now) {
            return Err(AuthError::RateLimited {
                username: username.to_owned(),
                retry_after,
            });
        }
        let stored = self
            .users
            .read()
            .users
            .get(username)
            .map(|u| u.password_hash.clone());
        let matches = match &stored {
            Some(hash) => password::verify_password(password, hash),
            None => {
                // Spend the same work as for a real user, then fail.
                let _ = password::verify_password(password, self.dummy_hash());
                false
            }
        };
        if !matches {
            self.limiter.lock().record_failure(key, now);
            tracing::info!(user = username, "failed login");
            return Err(AuthError::InvalidCredentials);
        }
        self.limiter.lock().record_success(key);
        let exp = unix_now.saturating_add(self.config.token_ttl.as_secs());
        self.secret.issue(username, exp)
    }

    fn dummy_hash(&self) -> &str {
        self.dummy_hash.get_or_init(|| {
            password::hash_password(&self.config.password_cost, "qit-no-such-user-password")
                .unwrap_or_default()
        })
    }

    /// Verifies a token (signature, shape, expiry, and that its user still exists) and
    /// returns its claims.
    pub fn verify_token(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_token_at(token, unix_now())
    }

    /// [`AuthStore::verify_token`] at `unix_now` seconds.
    pub fn verify_token_at(&self, token: &str, unix_now: u64) -> Result<Claims, AuthError> {
        let claims = self.secret.verify(token, unix_now)?;
        if !self.user_exists(&claims.sub) {
            return Err(AuthError::UnknownTokenUser);
        }
        Ok(claims)
    }

    /// Records `user` as the owner (creator) of `resource`.
    pub fn set_owner(&self, resource: &Resource, user: &str) -> Result<(), AuthError> {
        self.update_grants(|g| {
            g.owners.insert(resource.clone(), user.to_owned());
            Ok(())
        })
    }

    /// The owner of `resource`, if recorded.
    pub fn owner(&self, resource: &Resource) -> Option<String> {
        self.grants.read().owners.get(resource).cloned()
    }

    /// The permissions `user` was granted on `resource`.
    pub fn permissions(&self, resource: &Resource, user: &str) -> Vec<Permission> {
        self.grants
            .read()
            .permissions(resource, user)
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    /// `Ok` if `user` may do `action` on `resource`.
    pub fn authorize(
        &self,
        user: &str,
        action: Action,
        resource: &Resource,
    ) -> Result<(), AuthError> {
        if self.is_admin(user) || action == Action::Create {
            return Ok(());
        }
        let grants = self.grants.read();
        if grants.owners.get(resource).map(String::as_str) == Some(user) {
            return Ok(());
        }
        let held = grants.permissions(resource, user);
        let granted = match action {
            Action::View => held.is_some_and(|held| !held.is_empty()),
            action => Permission::for_action(action)
                .is_some_and(|needed| held.is_some_and(|held| held.contains(&needed))),
        };
        if granted {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                user: user.to_owned(),
                action,
                resource: resource.clone(),
            })
        }
    }

    /// Adds `permissions` on `resource` for `user`; only the owner or the admin may.
    pub fn grant(
        &self,
        by_user: &str,
        resource: &Resource,
        user: &str,
        permissions: &[Permission],
    ) -> Result<(), AuthError> {
        self.authorize(by_user, Action::Manage, resource)?;
        if !self.user_exists(user) {
            return Err(AuthError::UnknownUser {
                username: user.to_owned(),
            });
        }
        self.update_grants(|g| {
            g.grants
                .entry(resource.clone())
                .or_default()
                .entry(user.to_owned())
                .or_default()
                .extend(permissions.iter().copied());
            Ok(())
        })
    }

    /// Removes every permission of `user` on `resource`; only the owner or the admin may.
    pub fn revoke(&self, by_user: &str, resource: &Resource, user: &str) -> Result<(), AuthError> {
        self.authorize(by_user, Action::Manage, resource)?;
        self.update_grants(|g| {
            if let Some(by_user) = g.grants.get_mut(resource) {
                by_user.remove(user);
                if by_user.is_empty() {
                    g.grants.remove(resource);
                }
            }
            Ok(())
        })
    }

    /// Forgets the owner and grants of a deleted resource (a later one of the same name
    /// starts clean).
    pub fn remove_resource(&self, resource: &Resource) -> Result<(), AuthError> {
        self.update_grants(|g| {
            g.owners.remove(resource);
            g.grants.remove(resource);
            Ok(())
        })
    }

    /// Every user and grant now (a cluster's metadata snapshot).
    pub fn export(&self) -> (UsersFile, GrantsFile) {
        (self.users.read().clone(), self.grants.read().clone())
    }

    /// Replaces every user and grant (a cluster node installing a metadata snapshot); the
    /// configured admin is kept (created again if the snapshot lacks it).
    pub fn replace(&self, users: UsersFile, grants: GrantsFile) -> Result<(), AuthError> {
        {
            let mut current = self.users.write();
            persist::save_json(&self.dir.join(USERS_FILE), &users)?;
            *current = users;
        }
        {
            let mut current = self.grants.write();
            persist::save_json(&self.dir.join(GRANTS_FILE), &grants)?;
            *current = grants;
        }
        self.bootstrap_admin()
    }

    /// Applies `change` to a copy of the grants, persists it, then makes it current, so a
    /// failed write leaves memory and disk agreeing.
    fn update_grants(
        &self,
        change: impl FnOnce(&mut GrantsFile) -> Result<(), AuthError>,
    ) -> Result<(), AuthError> {
        let mut grants = self.grants.write();
        let mut next = grants.clone();
        change(&mut next)?;
        persist::save_json(&self.dir.join(GRANTS_FILE), &next)?;
        *grants = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
