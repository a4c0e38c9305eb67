//! The server's long-term Ed25519 keys, each created on first run in the
//! data directory: the signing key listed in every room's MLS
//! `external_senders` (so the server can issue Remove proposals) and sent to
//! clients in `AuthOk`, and the federation key its domain proves to peer
//! domains (`docs/FEDERATION.md`). They are separate keys, and separate from
//! the TLS key.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

/// File name of the key inside the data directory (32 raw bytes, mode 0600).
pub const SERVER_KEY_FILE_NAME: &str = "server-signing.key";
/// File name of the federation key inside the data directory (32 raw
/// bytes, mode 0600).
pub const FEDERATION_KEY_FILE_NAME: &str = "federation-signing.key";

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not hold a 32-byte key.
    #[error("{path}: expected 32 bytes, found {len_bytes}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its length.
        len_bytes: usize,
    },
}

/// Loads the key from `data_dir`, creating it from `seed_if_new` (fresh OS
/// randomness in production) when there is none. Returns the key and
/// whether it was created.
pub fn load_or_create(data_dir: &Path, seed_if_new: [u8; 32]) -> Result<(SigningKey, bool), ServerKeyError> {
    load_or_create_file(data_dir, SERVER_KEY_FILE_NAME, seed_if_new)
}

/// The federation key, as [`load_or_create`] does the signing key.
pub fn load_or_create_federation_key(
    data_dir: &Path,
    seed_if_new: [u8; 32],
) -> Result<(SigningKey, bool), ServerKeyError> {
    load_or_create_file(data_dir, FEDERATION_KEY_FILE_NAME, seed_if_new)
}

fn load_or_create_file(
    data_dir: &Path,
    file_name: &str,
    seed_if_new: [u8; 32],
) -> Result<(SigningKey, bool), ServerKeyError> {
    let path = data_dir.join(file_name);
    let io = |source| ServerKeyError::Io { path: path.clone(), source };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| ServerKeyError::Malformed { path: path.clone(), len_bytes: bytes.len() })?;
            Ok((SigningKey::from_bytes(&seed), false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&path).map_err(io)?;
            file.write_all(&seed_if_new).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok((SigningKey::from_bytes(&seed_if_new), true))
        }
        Err(error) => Err(io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (created, was_created) = load_or_create(dir.path(), [7; 32]).unwrap();
        assert!(was_created);
        let (loaded, was_created) = load_or_create(dir.path(), [9; 32]).unwrap();
        assert!(!was_created);
        assert_eq!(created.to_bytes(), loaded.to_bytes());
        std::fs::write(dir.path().join(SERVER_KEY_FILE_NAME), [1u8; 5]).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), [9; 32]),
            Err(ServerKeyError::Malformed { len_bytes: 5, .. })
        ));
    }

    #[test]
    fn the_federation_key_is_a_separate_owner_only_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (signing, _) = load_or_create(dir.path(), [7; 32]).unwrap();
        let (federation, created) = load_or_create_federation_key(dir.path(), [8; 32]).unwrap();
        assert!(created);
        assert_ne!(signing.to_bytes(), federation.to_bytes());
        let (again, created) = load_or_create_federation_key(dir.path(), [9; 32]).unwrap();
        assert!(!created);
        assert_eq!(again.to_bytes(), federation.to_bytes());
        let mode = std::fs::metadata(dir.path().join(FEDERATION_KEY_FILE_NAME)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
