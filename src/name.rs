//! Names of queues, groups, exchanges and users: the one rule, and the one way a name
//! becomes a path.
//!
//! A name is 1-200 characters of `[A-Za-z0-9._-]` that does not start with `.`. That makes
//! every name a single plain path component: never `.` or `..` (which Kafka rejects as
//! topic names for the same reason), never a hidden file, never a separator, never NUL, and
//! the same bytes on every file system. [`child`] joins a checked name to its parent
//! directory and checks again that the result is a direct child, so a name can never address
//! anything outside its parent; [`remove_child_dir`] deletes such a child without following a
//! symlink out of the parent.
//!
//! This module sits below `broker`, `route`, `group`, `auth` and `api` and imports none of
//! them; it deletes through the [`crate::storage`] seam.

use std::path::{Component, Path, PathBuf};

use crate::storage::Storage;

/// Longest queue, group or exchange name.
pub const MAX_NAME_LEN: usize = 200;
/// How much of a rejected name an error message repeats.
const SHOWN_LEN: usize = 64;

/// A name that breaks the rule, or a path that would leave its parent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is not 1-`max` chars of `[A-Za-z0-9._-]` not starting with `.`.
    #[error(
        "invalid name `{shown}`: {reason} (names are 1-{max} characters of [A-Za-z0-9._-] and do not start with `.`)"
    )]
    Invalid {
        /// The name, cut to a readable length.
        shown: String,
        /// What is wrong with it.
        reason: &'static str,
        /// The longest allowed name.
        max: usize,
    },
    /// A path built from a name would not be a direct child of its parent.
    #[error("`{}` is not inside `{}`", path.display(), parent.display())]
    Outside {
        /// The parent directory.
        parent: PathBuf,
        /// The path that left it.
        path: PathBuf,
    },
    /// Looking at or removing the path failed.
    #[error("{} on {}: {kind}", what, path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        kind: std::io::ErrorKind,
    },
}

/// The name cut to at most [`SHOWN_LEN`] characters, with control characters escaped, for
/// error messages (a hostile name may be megabytes long or hold terminal escapes).
fn shown(name: &str) -> String {
    let mut out: String = name
        .chars()
        .take(SHOWN_LEN)
        .flat_map(char::escape_default)
        .collect();
    if name.chars().count() > SHOWN_LEN {
        out.push('…');
    }
    out
}

/// Checks `name` against the rule with a maximum length of `max` bytes.
pub fn check_with_max(name: &str, max: usize) -> Result<(), NameError> {
    let invalid = |reason| NameError::Invalid {
        shown: shown(name),
        reason,
        max,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > max {
        return Err(invalid("it is too long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid("it has a character outside [A-Za-z0-9._-]"));
    }
    if name == "." || name == ".." {
        return Err(invalid("`.` and `..` are reserved"));
    }
    if name.starts_with('.') {
        return Err(invalid("it starts with `.`"));
    }
    Ok(())
}

/// Checks a queue, group or exchange name (at most [`MAX_NAME_LEN`] characters).
pub fn check(name: &str) -> Result<(), NameError> {
    check_with_max(name, MAX_NAME_LEN)
}

/// True when `name` is a valid queue, group or exchange name.
pub fn is_valid(name: &str) -> bool {
    check(name).is_ok()
}

/// `{parent}/{name}{suffix}` for a valid `name`, checked to be a direct child of `parent`.
/// `suffix` is a fixed extension such as `.journal` (or empty).
pub fn child(parent: &Path, name: &str, suffix: &str) -> Result<PathBuf, NameError> {
    check(name)?;
    let file = format!("{name}{suffix}");
    let path = parent.join(&file);
    let mut components = Path::new(&file).components();
    let single = matches!(components.next(), Some(Component::Normal(c)) if c == file.as_str())
        && components.next().is_none();
    if !single || path.parent() != Some(parent) {
        return Err(NameError::Outside {
            parent: parent.to_path_buf(),
            path,
        });
    }
    Ok(path)
}

/// Removes directory `{parent}/{name}` and everything in it through `storage`, whose
/// `remove_dir_all` never follows a symlink (a symlinked child loses only the link; its
/// target stays untouched, wherever it is). A missing entry is no error (`Ok(false)`);
/// `Ok(true)` when something was removed.
pub fn remove_child_dir(
    storage: &dyn Storage,
    parent: &Path,
    name: &str,
) -> Result<bool, NameError> {
    let path = child(parent, name, "")?;
    match storage.remove_dir_all(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(NameError::Io {
            what: "removing",
            path,
            kind: e.kind(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_names_are_rejected() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for name in [
            "",
            ".",
            "..",
            "...",
            ".dlq",
            ".hidden",
            "a/b",
            "/",
            "a\\b",
            "\\",
            "a\0b",
            "%2F",
            "%2e%2e",
            "a b",
            "ａ",      // fullwidth a
            "queue․x", // one-dot leader, looks like `.`
            "ключ",
            long.as_str(),
        ] {
            assert!(check(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn plain_names_are_accepted() {
        let longest = "a".repeat(MAX_NAME_LEN);
        for name in [
            "a",
            "orders",
            "orders.dlq",
            "a..b",
            "a.",
            "-x",
            "_",
            "A-9_z.",
            &longest,
        ] {
            check(name).unwrap();
        }
    }

    #[test]
    fn errors_repeat_a_short_escaped_name() {
        let message = check(&format!("\x1b[31m{}", "x".repeat(10_000)))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 400, "{message}");
        assert!(message.contains("\\u{1b}"), "{message}");
    }

    #[test]
    fn child_is_a_direct_child() {
        let parent = Path::new("/data/queues");
        assert_eq!(
            child(parent, "orders", ".journal").unwrap(),
            Path::new("/data/queues/orders.journal")
        );
        assert!(child(parent, "..", "").is_err());
        assert!(child(parent, "a/../..", "").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn removing_a_symlinked_child_keeps_its_target() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"x").unwrap();
        let parent = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), parent.path().join("q")).unwrap();
        assert!(remove_child_dir(&*crate::storage::disk(), parent.path(), "q").unwrap());
        assert!(!parent.path().join("q").exists());
        assert!(outside.path().join("precious").exists());
        assert!(!remove_child_dir(&*crate::storage::disk(), parent.path(), "q").unwrap());
    }

    #[test]
    fn removing_a_child_dir_leaves_its_siblings() {
        let parent = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            std::fs::create_dir_all(parent.path().join(name).join("0")).unwrap();
        }
        assert!(remove_child_dir(&*crate::storage::disk(), parent.path(), "a").unwrap());
        assert!(!parent.path().join("a").exists());
        assert!(parent.path().join("b/0").exists());
        assert!(remove_child_dir(&*crate::storage::disk(), parent.path(), "..").is_err());
        assert!(parent.path().exists());
    }

    proptest! {
        /// No accepted name, with any suffix the broker uses, resolves outside its parent.
        #[test]
        fn accepted_names_stay_inside(name in "\\PC{0,12}|[A-Za-z0-9._/\\\\-]{0,12}") {
            let parent = Path::new("/data/queues");
            if check(&name).is_ok() {
                for suffix in ["", ".journal"] {
                    let path = child(parent, &name, suffix).unwrap();
                    prop_assert_eq!(path.parent(), Some(parent));
                    prop_assert!(path.components().all(|c| !matches!(c, Component::ParentDir | Component::CurDir)));
                    prop_assert!(path.starts_with(parent));
                }
            } else {
                prop_assert!(child(parent, &name, "").is_err());
            }
        }
    }
}
