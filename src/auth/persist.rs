//! Durable auth files: whole-file JSON written atomically (temp file, fsync, rename,
//! directory fsync) with owner-only permissions, since they hold password hashes and the
//! signing secret.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AuthError;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Creates (or truncates) a file readable and writable by its owner only.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let tmp = tmp_path(path);
    let mut file = create_private(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    // A leftover temp file from an earlier run may have kept looser permissions.
    restrict_permissions(&tmp)?;
    fs::rename(&tmp, path).map_err(io_error(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
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
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuthError::CorruptState {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(AuthError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
