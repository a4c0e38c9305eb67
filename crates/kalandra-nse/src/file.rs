//! The key cache as a file: written atomically by the app, read (bounded) by
//! the NSE. See the [crate documentation](crate#key-cache-file).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::{decrypt_push, KeyCache, KeyCacheView, PushError, PushFormat, PushMessage, CACHE_BYTES_MAX};

/// Suffix of the temporary file a new cache is written to before the rename.
pub const TEMPORARY_SUFFIX: &str = ".tmp";

/// Why a key cache file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyCacheFileError {
    /// The file system refused.
    #[error("key cache file {path}: {operation}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The system's message.
        detail: String,
    },
    /// The file's content is not a key cache, or the push does not decrypt.
    #[error(transparent)]
    Push(#[from] PushError),
}

fn io_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(std::io::Error) -> KeyCacheFileError + 'a {
    move |error| KeyCacheFileError::Io { path: path.to_owned(), operation, detail: error.to_string() }
}

/// The file name of the temporary file next to `path`.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(TEMPORARY_SUFFIX);
    path.with_file_name(name)
}

/// Reads the key cache at `path` and checks it whole ([`KeyCacheView::parse`]).
/// Reads at most [`CACHE_BYTES_MAX`] + 1 bytes: a longer file is
/// [`PushError::TooLarge`] without being read to its end.
pub fn read_key_cache_file(path: &Path) -> Result<Vec<u8>, KeyCacheFileError> {
    let file = std::fs::File::open(path).map_err(io_error(path, "open"))?;
    let limit = u64::try_from(CACHE_BYTES_MAX + 1).unwrap_or(u64::MAX);
    let mut bytes = Vec::with_capacity(CACHE_BYTES_MAX + 1);
    file.take(limit).read_to_end(&mut bytes).map_err(io_error(path, "read"))?;
    if bytes.len() > CACHE_BYTES_MAX {
        crate::wipe(&mut bytes);
        return Err(PushError::TooLarge {
            format: PushFormat::KeyCache,
            len_bytes: bytes.len(),
            max_bytes: CACHE_BYTES_MAX,
        }
        .into());
    }
    if let Err(error) = KeyCacheView::parse(&bytes) {
        crate::wipe(&mut bytes);
        return Err(error.into());
    }
    Ok(bytes)
}

/// Decrypts `payload` with the key cache at `path`: [`read_key_cache_file`]
/// then [`decrypt_push`]. The cache bytes are overwritten before returning.
pub fn decrypt_push_file(path: &Path, payload: &[u8]) -> Result<PushMessage, KeyCacheFileError> {
    let mut cache = read_key_cache_file(path)?;
    let result = decrypt_push(&cache, payload);
    crate::wipe(&mut cache);
    Ok(result?)
}

/// Writes `cache` to `path` atomically: to `<path>.tmp` (mode 0600 on Unix),
/// flushed to disk, renamed over `path`, then the directory flushed. A
/// reader sees the previous file or this one, whole.
pub fn write_key_cache_file(path: &Path, cache: &KeyCache) -> Result<(), KeyCacheFileError> {
    let temporary = temporary_path(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(io_error(&temporary, "create"))?;
    file.write_all(cache.as_bytes()).map_err(io_error(&temporary, "write"))?;
    file.sync_all().map_err(io_error(&temporary, "sync"))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io_error(path, "rename"))?;
    sync_directory(path)
}

/// Flushes the directory entry of the rename (Unix; elsewhere the rename is
/// left to the file system).
fn sync_directory(path: &Path) -> Result<(), KeyCacheFileError> {
    #[cfg(unix)]
    {
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let handle = std::fs::File::open(directory).map_err(io_error(directory, "open directory"))?;
        handle.sync_all().map_err(io_error(directory, "sync directory"))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        export_notification_keys, seal_push, CacheDefect, NotificationKey, PUSH_PLAINTEXT_BYTES_MAX,
    };
    use kalandra_proto::RoomId;

    const ROOM: RoomId = RoomId(*b"file-test-room-1");

    fn key(epoch: u64) -> NotificationKey {
        NotificationKey::from_pcek(ROOM, epoch, &[u8::try_from(epoch).unwrap(); 32])
    }

    #[test]
    fn a_written_cache_reads_back_and_decrypts_a_push() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push-keys");
        let cache = export_notification_keys(&[key(3), key(4)]).unwrap();
        write_key_cache_file(&path, &cache).unwrap();
        assert_eq!(read_key_cache_file(&path).unwrap(), cache.as_bytes());
        assert!(!temporary_path(&path).exists(), "the temporary file was renamed");
        let payload = seal_push(&key(3), b"hi", &[7; 24]).unwrap();
        assert_eq!(decrypt_push_file(&path, &payload).unwrap().plaintext, b"hi");
        // Rewritten with a newer epoch: the old cache is replaced whole.
        write_key_cache_file(&path, &export_notification_keys(&[key(4), key(5)]).unwrap()).unwrap();
        assert_eq!(
            decrypt_push_file(&path, &payload).unwrap_err().to_string(),
            PushError::UnknownRoomOrEpoch { room_id: ROOM, epoch: 3 }.to_string()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_oversized_and_damaged_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push-keys");
        assert!(matches!(read_key_cache_file(&path), Err(KeyCacheFileError::Io { operation: "open", .. })));
        std::fs::write(&path, vec![0u8; CACHE_BYTES_MAX + 10]).unwrap();
        assert!(matches!(
            read_key_cache_file(&path),
            Err(KeyCacheFileError::Push(PushError::TooLarge { len_bytes, .. })) if len_bytes == CACHE_BYTES_MAX + 1
        ));
        let mut bytes = export_notification_keys(&[key(1)]).unwrap().as_bytes().to_vec();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_key_cache_file(&path),
            Err(KeyCacheFileError::Push(PushError::MalformedCache(CacheDefect::Truncated)))
        ));
        let payload = seal_push(&key(1), &[1; PUSH_PLAINTEXT_BYTES_MAX], &[0; 24]).unwrap();
        assert!(matches!(decrypt_push_file(&path, &payload), Err(KeyCacheFileError::Push(_))));
    }
}
