//! What auth reasons about: resources, actions, permissions, and the persisted records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Something that can be owned and granted: a queue or an exchange (separate namespaces).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Resource {
    /// A queue by name.
    Queue(String),
    /// An exchange by name.
    Exchange(String),
}

impl Resource {
    /// A queue.
    pub fn queue(name: &str) -> Resource {
        Resource::Queue(name.to_owned())
    }

    /// An exchange.
    pub fn exchange(name: &str) -> Resource {
        Resource::Exchange(name.to_owned())
    }
}

/// `queue/{name}` or `exchange/{name}`: the persisted key (names never contain `/`).
impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Queue(name) => write!(f, "queue/{name}"),
            Resource::Exchange(name) => write!(f, "exchange/{name}"),
        }
    }
}

impl From<Resource> for String {
    fn from(resource: Resource) -> String {
        resource.to_string()
    }
}

impl TryFrom<String> for Resource {
    type Error = String;
    fn try_from(text: String) -> Result<Resource, String> {
        match text.split_once('/') {
            Some(("queue", name)) => Ok(Resource::queue(name)),
            Some(("exchange", name)) => Ok(Resource::exchange(name)),
            _ => Err(format!("`{text}` is not `queue/NAME` or `exchange/NAME`")),
        }
    }
}

/// What a user wants to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish messages to it.
    Publish,
    /// Receive, ack, nack, extend; read its log and group state.
    Consume,
    /// Delete it, bind/unbind, change its grants.
    Manage,
    /// Create it (any authenticated user may).
    Create,
    /// See it: read its settings and counts, find it in lists (its owner, the admin, and
    /// anyone granted any permission on it may).
    View,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Publish => "publish",
            Action::Consume => "consume",
            Action::Manage => "manage",
            Action::Create => "create",
            Action::View => "view",
        })
    }
}

/// A grantable permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Allows [`Action::Publish`].
    Publish,
    /// Allows [`Action::Consume`].
    Consume,
}

impl Permission {
    /// The permission that allows `action`, if any can.
    pub fn for_action(action: Action) -> Option<Permission> {
        match action {
            Action::Publish => Some(Permission::Publish),
            Action::Consume => Some(Permission::Consume),
            Action::Manage | Action::Create | Action::View => None,
        }
    }
}

/// A registered user. `Debug` redacts the hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// argon2id PHC string.
    pub password_hash: String,
    /// Registration time, Unix milliseconds.
    pub created_at_ms: u64,
}

impl fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserRecord")
            .field("password_hash", &"<redacted>")
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// Contents of `auth/users.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsersFile {
    /// Users by name.
    pub users: BTreeMap<String, UserRecord>,
}

/// Contents of `auth/grants.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GrantsFile {
    /// The owner (creator) of each resource.
    pub owners: BTreeMap<Resource, String>,
    /// Permissions granted per resource per user.
    pub grants: BTreeMap<Resource, BTreeMap<String, BTreeSet<Permission>>>,
}

impl GrantsFile {
    /// The permissions `user` holds on `resource`.
    pub fn permissions(&self, resource: &Resource, user: &str) -> Option<&BTreeSet<Permission>> {
        self.grants
            .get(resource)
            .and_then(|by_user| by_user.get(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_keys_round_trip() {
        for r in [Resource::queue("orders.v1"), Resource::exchange("events")] {
            assert_eq!(Resource::try_from(r.to_string()), Ok(r));
        }
        assert!(Resource::try_from("topic/x".to_owned()).is_err());
    }

    #[test]
    fn grants_file_json() {
        let mut g = GrantsFile::default();
        g.owners.insert(Resource::queue("q"), "alice".into());
        g.grants
            .entry(Resource::queue("q"))
            .or_default()
            .insert("bob".into(), [Permission::Publish].into());
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains(r#""queue/q":"alice""#), "{json}");
        assert!(json.contains(r#""bob":["publish"]"#), "{json}");
        let back: GrantsFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.owners, g.owners);
    }
}
