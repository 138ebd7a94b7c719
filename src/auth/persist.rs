//! Durable auth files: whole-file JSON written atomically ([`storage::atomic_replace`]:
//! temp file, fsync, rename, directory fsync) with owner-only permissions, since they hold
//! password hashes and the signing secret.

use std::fs;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AuthError;
use crate::storage::{self, Disk, Storage};

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Sets mode 0600 on an existing file (a no-op off Unix).
pub fn restrict_permissions(path: &Path) -> Result<(), AuthError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(io_error(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "tightening permissions of an auth file to 0600");
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_error(path))?;
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably; the file has mode 0600.
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<(), AuthError> {
    let dir = storage::parent_dir(path);
    Disk.create_dir_all(dir).map_err(io_error(dir))?;
    storage::atomic_replace(&Disk, path, bytes, true).map_err(|e| AuthError::Io {
        path: e.path,
        source: e.source,
    })
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AuthError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AuthError::CorruptState {
        path: path.to_path_buf(),
        reason: format!("cannot serialize: {e}"),
    })?;
    write_private_atomically(path, &bytes)
}

/// Reads JSON from `path`; `T::default()` when the file does not exist.
pub fn load_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T, AuthError> {
    match storage::read_if_exists(&Disk, path) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).map_err(|e| AuthError::CorruptState {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Ok(None) => Ok(T::default()),
        Err(source) => Err(AuthError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
