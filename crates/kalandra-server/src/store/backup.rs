//! Online backup: a consistent copy of the database, written while the
//! server runs and takes traffic.
//!
//! The copy is one redb read transaction of the live database — an MVCC
//! snapshot of the last committed transaction when it began, so it holds
//! every entry acknowledged before the backup started (acknowledgements
//! are sent only after their transaction committed) and nothing half
//! written — copied table by table into a fresh redb file
//! ([`Store::write_snapshot`]). Writers go on meanwhile: redb never
//! rewrites a page a live read transaction can see.
//!
//! [`write_backup`] places the copy in the operator's backup directory
//! under a plain file name ([`check_backup_name`]: no separator, no
//! leading dot, so no name leaves the directory). It writes a hidden
//! temporary file (mode 0600: the copy holds the data keys), commits it
//! durably, verifies its checksums, then links it under its name — a link
//! never replaces an existing file — and syncs the directory. A backup
//! that fails leaves no file under its name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{InvariantViolation, StorageFailure, Store};
use crate::audit::AuditHead;

/// Longest backup file name, in characters.
pub const BACKUP_NAME_CHARS_MAX: usize = 128;
/// Mode of a backup file: owner only (it holds every data key).
pub const BACKUP_FILE_MODE: u32 = 0o600;

/// What one snapshot copy holds ([`Store::write_snapshot`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCopy {
    /// Rows copied, over every table.
    pub rows: u64,
    /// Tables copied.
    pub tables: usize,
    /// Rooms in the snapshot.
    pub rooms: u64,
    /// Log entries in the snapshot (erased ones included).
    pub log_entries: u64,
    /// The audit log's head in the snapshot.
    pub audit_head: Option<AuditHead>,
}

/// What [`write_backup`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size, bytes.
    pub bytes: u64,
    /// What it holds.
    pub copy: SnapshotCopy,
    /// Time taken, from taking the snapshot to the synced directory.
    pub duration_ms: u64,
}

/// Why a backup was not written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The name is not a plain file name the server accepts (caller misuse).
    #[error(
        "backup name {name:?} is not 1 to {BACKUP_NAME_CHARS_MAX} characters of A-Z, a-z, 0-9, '.', '_', '-' \
         starting with a letter or digit"
    )]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// A file of that name exists; backups never replace a file.
    #[error("{} already exists; backups never replace a file", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// This store has no online backup (it is not a database file).
    #[error("this store cannot be backed up")]
    Unsupported,
    /// The database holds a table the copy does not know: a copy without
    /// it would be incomplete (a bug: every table must be listed).
    #[error("the database holds table {name:?}, which the backup does not copy")]
    UnknownTable {
        /// The table.
        name: String,
    },
    /// The written copy does not verify (its checksums do not match).
    #[error("the written copy {} does not verify", path.display())]
    NotVerified {
        /// The temporary file, removed.
        path: PathBuf,
    },
    /// Reading the database, or writing, syncing or linking the copy, failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// The snapshot breaks an invariant of the store (a bug or corrupt data).
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

/// Checks a backup file name: 1 to [`BACKUP_NAME_CHARS_MAX`] characters of
/// `A-Za-z0-9._-`, the first a letter or digit. Such a name is one path
/// component that is neither `.`, `..` nor hidden: it cannot leave the
/// backup directory or collide with a temporary file.
pub fn check_backup_name(name: &str) -> Result<(), BackupError> {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-');
    let valid = !name.is_empty()
        && name.len() <= BACKUP_NAME_CHARS_MAX
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(allowed);
    if valid {
        Ok(())
    } else {
        Err(BackupError::InvalidName { name: name.to_owned() })
    }
}

/// Mode of a backup directory the server creates: owner only.
pub const BACKUP_DIR_MODE: u32 = 0o700;

/// Creates the backup directory `dir` (and its parents) with mode
/// [`BACKUP_DIR_MODE`] if it is missing; an existing one is left as it is.
/// Fails if `dir` exists and is not a directory.
pub fn prepare_backup_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().recursive(true).mode(BACKUP_DIR_MODE).create(dir)
}

/// The temporary file a backup named `name` is written to first.
fn partial_name(name: &str) -> String {
    format!(".{name}.partial")
}

fn io_failed(operation: &'static str) -> impl FnOnce(std::io::Error) -> StorageFailure {
    move |error| StorageFailure::new(operation, error)
}

/// Writes a consistent copy of `store` to `dir/name` (see the module
/// documentation). `dir` must exist. Blocking: call it off the async
/// runtime. At most one backup per directory may run at a time (the
/// caller serialises them); a temporary file left by an interrupted
/// backup of the same name is replaced.
pub fn write_backup(store: &dyn Store, dir: &Path, name: &str) -> Result<BackupReport, BackupError> {
    const OP: &str = "backup";
    check_backup_name(name)?;
    let started = Instant::now();
    let path = dir.join(name);
    let exists = |path: &Path| std::fs::symlink_metadata(path).is_ok();
    if exists(&path) {
        return Err(BackupError::Exists { path });
    }
    let partial = dir.join(partial_name(name));
    match std::fs::remove_file(&partial) {
        Ok(()) => tracing::warn!(path = %partial.display(), "removed the leftover of an interrupted backup"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_failed(OP)(error).into()),
    }
    let result = write_partial(store, &partial).and_then(|copy| {
        link_new(&partial, &path)?;
        Ok(copy)
    });
    // The temporary name goes in every case: after the link the file
    // lives on under its name, after a failure it is incomplete.
    let _ = std::fs::remove_file(&partial);
    let copy = result?;
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_failed(OP))?;
    let bytes = std::fs::metadata(&path).map_err(io_failed(OP))?.len();
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(BackupReport { path, bytes, copy, duration_ms })
}

/// Creates `partial` (never following or replacing anything there),
/// copies the snapshot into it and verifies it.
fn write_partial(store: &dyn Store, partial: &Path) -> Result<SnapshotCopy, BackupError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    const OP: &str = "backup";
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(BACKUP_FILE_MODE)
        .open(partial)
        .map_err(io_failed(OP))?;
    let check = file.try_clone().map_err(io_failed(OP))?;
    let copy = store.write_snapshot(file)?;
    if !verify_file(check)? {
        return Err(BackupError::NotVerified { path: partial.to_owned() });
    }
    Ok(copy)
}

/// Opens the redb database in `file` and checks its checksums: `false` if
/// it needed repair, or does not verify.
fn verify_file(file: File) -> Result<bool, StorageFailure> {
    const OP: &str = "backup";
    let failed = |error: ::redb::Error| StorageFailure::new(OP, error);
    let backend = ::redb::backends::FileBackend::new(file).map_err(|error| failed(error.into()))?;
    let mut db =
        ::redb::Database::builder().create_with_backend(backend).map_err(|error| failed(error.into()))?;
    match db.check_integrity() {
        Ok(intact) => Ok(intact),
        Err(::redb::DatabaseError::Storage(::redb::StorageError::Corrupted(_))) => Ok(false),
        Err(error) => Err(failed(error.into())),
    }
}

/// Gives `from` the name `to`, failing if `to` exists (a hard link, which
/// never replaces a file, unlike a rename).
fn link_new(from: &Path, to: &Path) -> Result<(), BackupError> {
    match std::fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(BackupError::Exists { path: to.to_owned() })
        }
        Err(error) => Err(io_failed("backup")(error).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::{entry, room};
    use crate::store::{MemoryStore, RedbStore};

    #[test]
    fn names_are_plain_file_names() {
        for name in ["a", "kalandra-2024-06-01.redb", "B_1.2", &"x".repeat(BACKUP_NAME_CHARS_MAX)] {
            check_backup_name(name).unwrap_or_else(|error| panic!("{name:?}: {error}"));
        }
        for name in [
            "",
            ".",
            "..",
            ".hidden",
            "../escape",
            "a/b",
            "/etc/passwd",
            "-flag",
            "a b",
            "a\\b",
            "é",
            "a\0b",
            &"x".repeat(BACKUP_NAME_CHARS_MAX + 1),
        ] {
            assert!(
                matches!(check_backup_name(name), Err(BackupError::InvalidName { .. })),
                "{name:?} is refused"
            );
        }
    }

    #[test]
    fn a_backup_is_a_database_with_the_same_content_and_never_replaces_a_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let backups = dir.path().join("backups");
        std::fs::create_dir(&backups).unwrap();
        let store = RedbStore::open(dir.path().join("live.redb")).unwrap();
        let a = room(3);
        store.append_batch(&[entry(a, 0), entry(a, 1), entry(a, 2)]).unwrap();
        let report = write_backup(&store, &backups, "first.redb").unwrap();
        assert_eq!(report.path, backups.join("first.redb"));
        assert_eq!((report.copy.rooms, report.copy.log_entries), (1, 3));
        assert_eq!(report.bytes, std::fs::metadata(&report.path).unwrap().len());
        let mode = std::fs::metadata(&report.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, BACKUP_FILE_MODE);
        // Writes after the snapshot are not in it.
        store.append_batch(&[entry(a, 3)]).unwrap();
        let copy = RedbStore::open(&report.path).unwrap();
        assert_eq!(copy.read_range(a, 0, 10).unwrap(), (0..3).map(|i| entry(a, i)).collect::<Vec<_>>());
        for index in 0..3 {
            assert_eq!(copy.data_key(a, index).unwrap(), store.data_key(a, index).unwrap());
        }
        drop(copy);
        // The name is taken: refused, and the file is unchanged.
        let before = std::fs::read(&report.path).unwrap();
        assert!(matches!(write_backup(&store, &backups, "first.redb"), Err(BackupError::Exists { .. })));
        assert_eq!(std::fs::read(&report.path).unwrap(), before);
        // A dangling link under the name is not followed either.
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), backups.join("link.redb")).unwrap();
        assert!(matches!(write_backup(&store, &backups, "link.redb"), Err(BackupError::Exists { .. })));
        assert!(!dir.path().join("elsewhere").exists());
        // No name leaves the directory.
        assert!(matches!(
            write_backup(&store, &backups, "../live.redb"),
            Err(BackupError::InvalidName { .. })
        ));
        // A leftover temporary file is replaced; none remains afterwards.
        std::fs::write(backups.join(partial_name("second.redb")), b"junk").unwrap();
        write_backup(&store, &backups, "second.redb").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["first.redb", "link.redb", "second.redb"]);
    }

    #[test]
    fn a_store_without_a_file_cannot_be_backed_up() {
        let dir = tempfile::tempdir().unwrap();
        let result = write_backup(&MemoryStore::default(), dir.path(), "memory.redb");
        assert!(matches!(result, Err(BackupError::Unsupported)));
        assert!(!dir.path().join("memory.redb").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is left behind");
    }
}
