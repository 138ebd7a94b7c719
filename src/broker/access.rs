//! Users, grants and ownership as broker ops ([`AccessOp`]), so that a cluster replicates
//! them through its metadata group like queues and exchanges: a user registered on one
//! node logs in on every node, a grant made on one node holds on every node.
//!
//! The broker only carries these changes to the [`AuthStore`] the server installed
//! ([`Broker::set_auth`]); the rules (who may grant, reserved names) stay in `auth`.
//! Every change is checked again where it is applied, on every node alike (the state
//! before it is the same everywhere), so that two racing changes end the same on each.
//! A password never travels: the proposing node hashes it and the op carries the hash.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Broker, BrokerError, CreatedQueue};
use crate::auth::{AuthStore, Permission, Resource, UserRecord};

/// A password hash as it travels in an op (`Debug` redacts it, like [`UserRecord`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash(pub String);

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One change of users, ownership or grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessOp {
    /// Register a user (its password hashed by the proposing node).
    CreateUser {
        /// User name.
        username: String,
        /// argon2id PHC string.
        password_hash: PasswordHash,
        /// Registration time, Unix ms (the proposer's clock).
        created_at_ms: u64,
    },
    /// Record the creator of a queue or exchange as its owner.
    SetOwner {
        /// The queue or exchange.
        resource: Resource,
        /// Its owner.
        user: String,
    },
    /// Add permissions; refused unless `by` may manage `resource`.
    Grant {
        /// Who grants.
        by: String,
        /// On what.
        resource: Resource,
        /// To whom.
        user: String,
        /// What.
        permissions: Vec<Permission>,
    },
    /// Remove every permission of `user`; refused unless `by` may manage `resource`.
    Revoke {
        /// Who revokes.
        by: String,
        /// On what.
        resource: Resource,
        /// From whom.
        user: String,
    },
    /// Forget the owner and grants of a deleted queue or exchange. Proposed no more (a
    /// delete forgets them in its own entry); applied as ever from logs that hold it.
    Forget {
        /// The queue or exchange.
        resource: Resource,
    },
}

impl Broker {
    /// Installs the users and grants store that access ops change (once; the server does
    /// so when auth is on, before a cluster replays its log).
    pub fn set_auth(&self, store: Arc<AuthStore>) {
        let _ = self.auth.set(store);
    }

    /// Registers a user made by [`AuthStore::new_user`] (replicated in a cluster).
    pub async fn create_user(&self, username: &str, record: UserRecord) -> Result<(), BrokerError> {
        self.access(AccessOp::CreateUser {
            username: username.to_string(),
            password_hash: PasswordHash(record.password_hash),
            created_at_ms: record.created_at_ms,
        })
        .await
    }

    /// Records `user` as the owner of `resource`.
    pub async fn set_owner(&self, resource: &Resource, user: &str) -> Result<(), BrokerError> {
        self.access(AccessOp::SetOwner {
            resource: resource.clone(),
            user: user.to_string(),
        })
        .await
    }

    /// Grants `permissions` on `resource` to `user`, if `by` may manage it.
    pub async fn grant(
        &self,
        by: &str,
        resource: &Resource,
        user: &str,
        permissions: &[Permission],
    ) -> Result<(), BrokerError> {
        self.access(AccessOp::Grant {
            by: by.to_string(),
            resource: resource.clone(),
            user: user.to_string(),
            permissions: permissions.to_vec(),
        })
        .await
    }

    /// Revokes every permission of `user` on `resource`, if `by` may manage it.
    pub async fn revoke(
        &self,
        by: &str,
        resource: &Resource,
        user: &str,
    ) -> Result<(), BrokerError> {
        self.access(AccessOp::Revoke {
            by: by.to_string(),
            resource: resource.clone(),
            user: user.to_string(),
        })
        .await
    }

    /// Runs an access op: through the cluster when there is one (`replicate.rs`), else here.
    async fn access(&self, op: AccessOp) -> Result<(), BrokerError> {
        self.check_running()?;
        if self.replicator().is_some() {
            return self.submit_access(op).await;
        }
        self.apply_access(op)
    }

    /// Records `owner` as the owner of what a create made: the queue and the dead-letter
    /// queue made with it, nothing for a queue that existed (part of applying
    /// [`Op::CreateOwnedQueue`](super::replicate::Op::CreateOwnedQueue), and of a single
    /// node's create). Nothing with authentication off.
    pub(super) fn own_created_queue(
        &self,
        name: &str,
        created: &CreatedQueue,
        owner: &str,
    ) -> Result<(), BrokerError> {
        let Some(store) = self.auth.get() else {
            return Ok(());
        };
        if created.created {
            store.set_owner(&Resource::queue(name), owner)?;
        }
        if let Some(dead_letter) = &created.dead_letter_created {
            store.set_owner(&Resource::queue(dead_letter), owner)?;
        }
        Ok(())
    }

    /// Records `owner` as the owner of an exchange a create made (`created`), as
    /// [`Self::own_created_queue`] does for a queue.
    pub(super) fn own_created_exchange(
        &self,
        name: &str,
        created: bool,
        owner: &str,
    ) -> Result<(), BrokerError> {
        match self.auth.get() {
            Some(store) if created => Ok(store.set_owner(&Resource::exchange(name), owner)?),
            _ => Ok(()),
        }
    }

    /// Applies an access op to the installed store (the one apply path of the single node
    /// and of every cluster replica).
    pub(super) fn apply_access(&self, op: AccessOp) -> Result<(), BrokerError> {
        let store = self.auth.get().ok_or_else(|| {
            BrokerError::InvalidArgument("authentication is off on this node".into())
        })?;
        match op {
            AccessOp::CreateUser {
                username,
                password_hash,
                created_at_ms,
            } => store.insert_user(
                &username,
                UserRecord {
                    password_hash: password_hash.0,
                    created_at_ms,
                },
            )?,
            AccessOp::SetOwner { resource, user } => store.set_owner(&resource, &user)?,
            AccessOp::Grant {
                by,
                resource,
                user,
                permissions,
            } => store.grant(&by, &resource, &user, &permissions)?,
            AccessOp::Revoke { by, resource, user } => store.revoke(&by, &resource, &user)?,
            AccessOp::Forget { resource } => store.remove_resource(&resource)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password_hash() {
        let op = AccessOp::CreateUser {
            username: "alice".into(),
            password_hash: PasswordHash("secret-hash".into()),
            created_at_ms: 0,
        };
        assert!(!format!("{op:?}").contains("secret-hash"));
    }
}
