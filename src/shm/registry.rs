//! Registry of shared-memory segments, with a JSON manifest on disk.
//!
//! The supervisor creates every segment as a file in one directory (by default
//! `/dev/shm/audiowarden`) and lists them in `manifest.json` in that directory. Changes mark the
//! manifest dirty; it is rewritten atomically (`manifest.json.tmp`, then `rename`) by whoever
//! flushes it ([`Registry::flush`], or [`Registry::take_manifest`] then
//! [`write_manifest_file`] outside any lock: the supervisor's housekeeping thread, so the
//! real-time monitor never waits on manifest I/O), so a reader never sees a half-written file.
//! Segment files get their pages reserved when created (`posix_fallocate`): a full file system
//! is an error at [`Registry::create`], never a fault at the first write through a mapping.
//!
//! Guarantees:
//! - The directory is mode 0700 and owned by the effective user; segment files, the manifest and
//!   the lock file are mode 0600.
//! - Only one [`Registry`] uses a directory at a time: it holds `flock(LOCK_EX)` on `.lock` in the
//!   directory for its whole life; a second one gets [`ShmError::InUse`].
//! - [`Registry::open`] removes whatever a previous (crashed) instance left behind, and reports it.
//! - [`Registry::audit`] never deletes anything: files it does not know may not be ours.
//!
//! Not for the real-time path: every method allocates and performs file-system I/O.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Name of the manifest file in the segment directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Temporary file the manifest is written to before it is renamed over [`MANIFEST_FILE`].
pub const MANIFEST_TMP_FILE: &str = "manifest.json.tmp";
/// Lock file that keeps two instances from sharing a directory.
pub const LOCK_FILE: &str = ".lock";
/// Schema version written into the manifest.
pub const MANIFEST_VERSION: u32 = 1;
/// Longest segment id accepted.
pub const MAX_ID_LEN: usize = 64;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Errors of the shared-memory registry.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Another live instance holds the directory's lock.
    #[error("shared-memory directory {0} is in use by another audiowarden instance")]
    InUse(PathBuf),
    /// A file-system operation failed; `op` says which one.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// [`Registry::create`] with an id that is already registered.
    #[error("segment {0} is already registered")]
    Duplicate(String),
    /// An operation on an id that is not registered.
    #[error("segment {0} is not registered")]
    Unknown(String),
    /// The id is not 1 to 64 characters of `[A-Za-z0-9._-]`, starts with a dot, or names one of
    /// the registry's own files.
    #[error("invalid segment id {0:?}")]
    BadId(String),
}

impl ShmError {
    /// What failed and its errno, for callers that carry errors as plain data (EINVAL for the
    /// errors that are not I/O: ids, duplicates, a second instance).
    pub fn op_errno(&self) -> (&'static str, i32) {
        match self {
            ShmError::Io { op, source, .. } => (op, source.raw_os_error().unwrap_or(libc::EIO)),
            ShmError::InUse(_) => ("lock shm directory", libc::EBUSY),
            ShmError::Duplicate(_) | ShmError::Unknown(_) | ShmError::BadId(_) => ("register segment", libc::EINVAL),
        }
    }
}

/// Builds the `map_err` closure for an I/O error on `path`.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShmError + 'a {
    move |source| ShmError::Io { op, path: path.to_path_buf(), source }
}

/// What a segment holds; serialized as `"audio_ring"` / `"control_ring"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    AudioRing,
    ControlRing,
}

/// One registered segment, as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Allocation {
    /// File name of the segment in the registry directory, e.g. `ring-1-g7`.
    pub id: String,
    /// Size in bytes the file was created with.
    pub size: u64,
    #[serde(rename = "type")]
    pub kind: SegmentKind,
    /// Free-form description of the process that uses it, e.g. `worker-1 (pid 4242)`.
    pub owner: String,
    /// Creation time, UTC RFC 3339 (see [`rfc3339_utc`]).
    pub created: String,
}

/// Totals written into the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestStats {
    /// Sum of the sizes of the current allocations.
    pub total_allocated: u64,
    /// Number of current allocations.
    pub active_count: u64,
    /// What the last [`Registry::audit`] found that should not be there ([`AuditReport::leaked`]).
    pub leaked_count: u64,
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub allocations: Vec<Allocation>,
    pub stats: ManifestStats,
}

/// What the start-up sweep removed: everything a previous (crashed) instance left in the dir.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Names of the removed segment files, sorted (not counting `manifest.json`, its temporary
    /// file or `.lock`).
    pub files: Vec<String>,
    /// Total size of those files in bytes.
    pub bytes: u64,
    /// The old `manifest.json`, if it existed and parsed. A garbage manifest is logged and
    /// ignored, never an error.
    pub previous_manifest: Option<Manifest>,
}

/// Result of [`Registry::audit`]: directory vs manifest vs live owners. Every list is sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// In the directory but not registered (the registry's own files excluded).
    pub unknown_files: Vec<String>,
    /// Registered, but the file is gone.
    pub missing_files: Vec<String>,
    /// Registered and present, but no live owner holds it.
    pub orphaned: Vec<String>,
}

impl AuditReport {
    /// Number of findings that should not be there: unknown + missing + orphaned.
    pub fn leaked(&self) -> usize {
        self.unknown_files.len() + self.missing_files.len() + self.orphaned.len()
    }
}

/// The supervisor's registry of shared-memory segments in one directory.
///
/// Dropping it without [`Registry::remove_all`] leaves the segments and the manifest in place
/// (as a crash would) and releases the lock; the next [`Registry::open`] sweeps them.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    /// Held open for the registry's life: closing it releases the flock.
    _lock: File,
    allocations: Vec<Allocation>,
    leaked_count: u64,
    /// The manifest on disk lags the allocations.
    dirty: bool,
}

impl Registry {
    /// Creates or fixes the directory (mode 0700), takes its lock, then sweeps: unlinks every
    /// other file in it (stale segments of a crashed instance, the old manifest, temporary
    /// files), and writes a fresh empty manifest.
    ///
    /// # Errors
    ///
    /// - [`ShmError::InUse`] if another instance holds the directory's lock.
    /// - [`ShmError::Io`] if the directory cannot be created or chmod-ed, is a symlink or not a
    ///   directory, is owned by another user, or a file in it cannot be removed or written.
    pub fn open(dir: &Path) -> Result<(Registry, SweepReport), ShmError> {
        prepare_dir(dir)?;
        let lock = take_lock(dir)?;
        let mut registry =
            Registry { dir: dir.to_path_buf(), _lock: lock, allocations: Vec::new(), leaked_count: 0, dirty: true };
        let report = registry.sweep()?;
        registry.flush()?;
        Ok((registry, report))
    }

    /// Creates the segment file `id` (exclusively, mode 0600) with length `size`, every page
    /// reserved, records it and marks the manifest dirty. Returns the open file for the caller
    /// to map.
    ///
    /// # Errors
    ///
    /// - [`ShmError::BadId`] if `id` is not a valid segment id.
    /// - [`ShmError::Duplicate`] if `id` is already registered.
    /// - [`ShmError::Io`] if the file cannot be created (also if an unregistered file of that
    ///   name exists) or its pages cannot be reserved (ENOSPC: the file system is full). On any
    ///   error the registry is unchanged and the file does not exist.
    pub fn create(&mut self, id: &str, size: u64, kind: SegmentKind, owner: &str) -> Result<File, ShmError> {
        validate_id(id)?;
        if self.find(id).is_some() {
            return Err(ShmError::Duplicate(id.to_owned()));
        }
        let path = self.dir.join(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true) // O_CREAT|O_EXCL: never reuse a file we did not create
            .mode(FILE_MODE)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        if let Err(source) = crate::sys::reserve_file(&file, size) {
            remove_quietly(&path);
            return Err(ShmError::Io { op: "reserve segment", path, source });
        }
        self.allocations.push(Allocation {
            id: id.to_owned(),
            size,
            kind,
            owner: owner.to_owned(),
            created: rfc3339_utc(SystemTime::now()),
        });
        self.dirty = true;
        Ok(file)
    }

    /// Changes the recorded owner of `id` and marks the manifest dirty.
    ///
    /// # Errors
    ///
    /// [`ShmError::BadId`], [`ShmError::Unknown`] if `id` is not registered.
    pub fn set_owner(&mut self, id: &str, owner: &str) -> Result<(), ShmError> {
        validate_id(id)?;
        let i = self.find(id).ok_or_else(|| ShmError::Unknown(id.to_owned()))?;
        self.allocations[i].owner = owner.to_owned();
        self.dirty = true;
        Ok(())
    }

    /// Unlinks the segment file (already gone is fine), forgets the allocation and marks the
    /// manifest dirty. Mappings of the file stay valid until they are unmapped.
    ///
    /// # Errors
    ///
    /// - [`ShmError::BadId`], or [`ShmError::Unknown`] if `id` is not registered.
    /// - [`ShmError::Io`] if the file cannot be unlinked (the allocation is then kept).
    pub fn release(&mut self, id: &str) -> Result<(), ShmError> {
        validate_id(id)?;
        let i = self.find(id).ok_or_else(|| ShmError::Unknown(id.to_owned()))?;
        let path = self.dir.join(id);
        remove_if_exists(&path).map_err(io_err("unlink segment", &path))?;
        self.allocations.remove(i);
        self.dirty = true;
        Ok(())
    }

    /// The manifest to write, if the one on disk lags (serialized now; marks it clean). Write
    /// it with [`write_manifest_file`], outside any lock; if that fails, [`Registry::mark_dirty`].
    pub fn take_manifest(&mut self) -> Option<Vec<u8>> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let mut json = serde_json::to_vec_pretty(&self.manifest()).expect("a manifest always serializes");
        json.push(b'\n');
        Some(json)
    }

    /// The manifest must be written again (a write of [`Registry::take_manifest`]'s failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Writes the manifest now if it lags.
    ///
    /// # Errors
    /// [`ShmError::Io`] if it cannot be written (it stays dirty).
    pub fn flush(&mut self) -> Result<(), ShmError> {
        if let Some(json) = self.take_manifest() {
            if let Err(e) = write_manifest_file(&self.dir, &json) {
                self.dirty = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Compares the directory, the registered allocations and the live owners (`is_live(id)`
    /// says whether a live process holds segment `id`). Stores [`AuditReport::leaked`] as the
    /// manifest's `leaked_count`, and rewrites `manifest.json` if the file on disk differs from
    /// the in-memory state (someone edited or deleted it, or the count changed).
    ///
    /// Deletes nothing: unknown files may not be ours to delete, and what to do with a missing
    /// or orphaned segment is the caller's decision.
    ///
    /// # Errors
    ///
    /// [`ShmError::Io`] if the directory cannot be listed or the manifest cannot be written.
    pub fn audit(&mut self, is_live: &dyn Fn(&str) -> bool) -> Result<AuditReport, ShmError> {
        let present: BTreeSet<String> = self.list_dir()?.into_iter().filter(|name| !is_own_file(name)).collect();
        let registered: BTreeSet<&str> = self.allocations.iter().map(|a| a.id.as_str()).collect();

        let mut report = AuditReport {
            unknown_files: present.iter().filter(|name| !registered.contains(name.as_str())).cloned().collect(),
            ..AuditReport::default()
        };
        for id in &registered {
            if !present.contains(*id) {
                report.missing_files.push((*id).to_owned());
            } else if !is_live(id) {
                report.orphaned.push((*id).to_owned());
            }
        }

        self.leaked_count = report.leaked() as u64;
        let path = self.dir.join(MANIFEST_FILE);
        let on_disk = match read_own_file(&path) {
            Ok(bytes) => bytes.and_then(|b| serde_json::from_slice::<Manifest>(&b).ok()),
            Err(source) => return Err(ShmError::Io { op: "read manifest", path, source }),
        };
        if on_disk.as_ref() != Some(&self.manifest()) {
            if on_disk.is_none() && !self.dirty {
                tracing::warn!(path = %path.display(), "manifest deleted or corrupted, rewriting");
            }
            self.dirty = true;
        }
        Ok(report)
    }

    /// The registered segments, in creation order.
    pub fn allocations(&self) -> &[Allocation] {
        &self.allocations
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current in-memory manifest, with its stats computed from the allocations.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            allocations: self.allocations.clone(),
            stats: ManifestStats {
                total_allocated: self.allocations.iter().map(|a| a.size).sum(),
                active_count: self.allocations.len() as u64,
                leaked_count: self.leaked_count,
            },
        }
    }

    /// Clean shutdown: unlinks every registered segment, the manifest and the lock file. The
    /// directory itself stays: /dev/shm is world-writable, and a directory that is always
    /// there, ours, 0700, is one that nobody can squat while the service is stopped (it is
    /// created at boot by the tmpfiles.d entry; see "Shared memory" in docs/design.md).
    ///
    /// # Errors
    ///
    /// [`ShmError::Io`] for the first removal that failed; the others are still attempted, and
    /// the lock is released either way.
    pub fn remove_all(self) -> Result<(), ShmError> {
        let mut first_err: Option<ShmError> = None;
        let mut attempt = |op: &'static str, path: PathBuf, res: io::Result<()>| {
            if let Err(source) = res {
                tracing::warn!(path = %path.display(), error = %source, "{op} failed");
                first_err.get_or_insert(ShmError::Io { op, path, source });
            }
        };
        for a in &self.allocations {
            let path = self.dir.join(&a.id);
            let res = remove_if_exists(&path);
            attempt("unlink segment", path, res);
        }
        for (op, name) in [("unlink manifest", MANIFEST_FILE), ("unlink manifest", MANIFEST_TMP_FILE)] {
            let path = self.dir.join(name);
            let res = remove_if_exists(&path);
            attempt(op, path, res);
        }
        // Unlink the lock file while we still hold the lock, so no other instance can be
        // holding a lock on this inode believing it owns the directory.
        let lock_path = self.dir.join(LOCK_FILE);
        let res = remove_if_exists(&lock_path);
        attempt("unlink lock file", lock_path, res);
        drop(self);
        first_err.map_or(Ok(()), Err)
    }

    fn find(&self, id: &str) -> Option<usize> {
        self.allocations.iter().position(|a| a.id == id)
    }

    /// Names of all entries in the directory (lossy UTF-8; ids are ASCII so nothing registered
    /// is affected).
    fn list_dir(&self) -> Result<Vec<String>, ShmError> {
        let read_err = io_err("read directory", &self.dir);
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(read_err)? {
            let entry = entry.map_err(io_err("read directory", &self.dir))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Removes everything but the lock file. Called with the lock held, before anything is
    /// registered.
    fn sweep(&self) -> Result<SweepReport, ShmError> {
        let mut report = SweepReport::default();
        let manifest_path = self.dir.join(MANIFEST_FILE);
        report.previous_manifest = match read_own_file(&manifest_path) {
            Ok(None) => None,
            Ok(Some(bytes)) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %manifest_path.display(), error = %e,
                        "ignoring unparsable manifest of a previous instance");
                    None
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %manifest_path.display(), error = %e,
                    "ignoring unreadable manifest of a previous instance");
                None
            }
        };

        let entries = fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read directory", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LOCK_FILE {
                continue;
            }
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
            if meta.is_dir() {
                // Nothing we create; leave it to whoever made it rather than delete a tree.
                tracing::warn!(path = %path.display(), "leaving unexpected directory in place");
                continue;
            }
            remove_if_exists(&path).map_err(io_err("unlink stale file", &path))?;
            if !is_own_file(&name) {
                if meta.is_file() {
                    report.bytes += meta.len();
                }
                report.files.push(name);
            }
        }
        report.files.sort();
        // The caller logs the sweep (once, with the metrics it updates).
        Ok(report)
    }
}

/// Writes `json` (from [`Registry::take_manifest`]) to the temporary file in `dir` and renames it
/// into place, so readers see either the old or the new manifest, never a partial one. Needs no
/// lock: only one thread writes the manifest (the supervisor's housekeeping).
///
/// # Errors
/// [`ShmError::Io`] naming the step that failed (ENOSPC: the file system is full).
pub fn write_manifest_file(dir: &Path, json: &[u8]) -> Result<(), ShmError> {
    let tmp = dir.join(MANIFEST_TMP_FILE);
    let dest = dir.join(MANIFEST_FILE);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err("create manifest", &tmp))?;
    // `mode` only applies to a new file; a leftover temporary file may have another mode.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io_err("chmod manifest", &tmp))?;
    file.write_all(json).map_err(io_err("write manifest", &tmp))?;
    // Matters only if the directory is configured onto a persistent file system.
    file.sync_data().map_err(io_err("sync manifest", &tmp))?;
    drop(file);
    fs::rename(&tmp, &dest).map_err(io_err("rename manifest", &dest))
}

/// The contents of `path` if it is a regular file of ours; None if it is missing or anything
/// else (a symlink or FIFO someone planted is neither followed nor opened for long: O_NOFOLLOW
/// and O_NONBLOCK, then fstat).
fn read_own_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.uid() != crate::sys::euid() {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Creates the directory with mode 0700 (parents with the default mode), then makes sure it is
/// a real directory owned by us, and chmods it to 0700 in case it already existed.
fn prepare_dir(dir: &Path) -> Result<(), ShmError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(source) => return Err(ShmError::Io { op: "create directory", path: dir.into(), source }),
    }
    // /dev/shm is world-writable: refuse a symlink or a directory someone else planted there.
    let meta = fs::symlink_metadata(dir).map_err(io_err("stat directory", dir))?;
    if !meta.file_type().is_dir() {
        return Err(ShmError::Io {
            op: "check directory",
            path: dir.into(),
            source: io::Error::other("not a directory (symlinks are refused)"),
        });
    }
    let euid = crate::sys::euid();
    if meta.uid() != euid {
        return Err(ShmError::Io {
            op: "check directory",
            path: dir.into(),
            source: io::Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "owned by uid {}, not by us (uid {euid}): someone else created it; \
                     `systemd-tmpfiles --create audiowarden.conf` (run by the unit before every start) \
                     gives it back to the service user, or remove it",
                    meta.uid()
                ),
            ),
        });
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(io_err("chmod directory", dir))
}

/// Opens `.lock` and takes `flock(LOCK_EX|LOCK_NB)` on it.
fn take_lock(dir: &Path) -> Result<File, ShmError> {
    let path = dir.join(LOCK_FILE);
    // Anything at `.lock` that is not a regular file of ours was planted (our lock file is
    // always one): it is not another instance's lock, so it goes (the directory is ours).
    if let Ok(m) = fs::symlink_metadata(&path) {
        if !m.file_type().is_file() || m.uid() != crate::sys::euid() {
            remove_if_exists(&path).map_err(io_err("unlink planted lock file", &path))?;
        }
    }
    // A previous owner may unlink `.lock` between our open and our flock (remove_all does), in
    // which case we would hold a lock on a dead inode. Retry until the locked inode is the one
    // at the path; a handful of tries is plenty, since each race needs a whole shutdown.
    for _ in 0..8 {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        match crate::sys::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => return Err(ShmError::InUse(dir.to_path_buf())),
            Err(source) => return Err(ShmError::Io { op: "lock", path, source }),
        }
        let locked = file.metadata().map_err(io_err("stat lock file", &path))?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.dev() == locked.dev() && m.ino() == locked.ino() => {
                file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                    .map_err(io_err("chmod lock file", &path))?;
                return Ok(file);
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(ShmError::Io { op: "stat lock file", path, source }),
        }
    }
    // The lock file keeps being replaced under us: someone else is actively using the dir.
    Err(ShmError::InUse(dir.to_path_buf()))
}

/// Checks that `id` is 1 to 64 characters of `[A-Za-z0-9._-]`, does not start with a dot, and
/// is not one of the registry's own file names.
fn validate_id(id: &str) -> Result<(), ShmError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && !is_own_file(id)
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ShmError::BadId(id.to_owned()))
    }
}

/// The registry's own bookkeeping files, which are never segments.
fn is_own_file(name: &str) -> bool {
    matches!(name, MANIFEST_FILE | MANIFEST_TMP_FILE | LOCK_FILE)
}

/// `remove_file` that treats "already gone" as success.
fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Best-effort cleanup on an error path, where the original error is the one to report.
fn remove_quietly(path: &Path) {
    if let Err(e) = remove_if_exists(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove segment after a failed create");
    }
}

/// Formats `t` as UTC RFC 3339 with whole seconds, e.g. `2025-11-30T10:00:00Z`. Sub-second
/// parts are truncated (towards the past, also before 1970).
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -whole - i64::from(d.subsec_nanos() > 0)
        }
    };
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Proleptic Gregorian date of `z` days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468; // shift the epoch to 0000-03-01, so leap days fall at the end of a year
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year, [0, 365]
    let mp = (5 * doy + 2) / 153; // March-based month, [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    /// The manifest on disk once `reg` has written what it has (writes are deferred).
    fn flushed(reg: &mut Registry, dir: &Path) -> Manifest {
        reg.flush().expect("flush the manifest");
        disk_manifest(dir)
    }

    fn disk_manifest(dir: &Path) -> Manifest {
        let bytes = fs::read(dir.join(MANIFEST_FILE)).expect("read manifest");
        serde_json::from_slice(&bytes).expect("parse manifest")
    }

    fn open(dir: &Path) -> (Registry, SweepReport) {
        Registry::open(dir).expect("open registry")
    }

    #[test]
    fn open_creates_dir_0700_and_files_0600() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/b/shm");
        let (mut reg, sweep) = open(&dir);
        assert!(sweep.files.is_empty() && sweep.previous_manifest.is_none());
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert_eq!(mode(&dir.join(MANIFEST_FILE)), 0o600);
        assert_eq!(disk_manifest(&dir), reg.manifest());
        assert_eq!(reg.manifest().stats, ManifestStats::default());
        assert!(!dir.join(MANIFEST_TMP_FILE).exists());

        reg.create("ring-1-g1", 4096, SegmentKind::AudioRing, "w1").expect("create");
        assert_eq!(mode(&dir.join("ring-1-g1")), 0o600);
        assert_eq!(mode(&dir.join(MANIFEST_FILE)), 0o600);
    }

    #[test]
    fn open_fixes_mode_of_existing_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let (_reg, _) = open(&dir);
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn open_refuses_symlinked_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("real");
        fs::create_dir(&real).expect("mkdir");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(matches!(Registry::open(&link), Err(ShmError::Io { op: "check directory", .. })));
    }

    #[test]
    fn create_and_release_update_manifest_on_disk() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);

        let f = reg.create("ring-1-g7", 65_536, SegmentKind::AudioRing, "worker-1 (pid 4242)").expect("create ring");
        assert_eq!(f.metadata().expect("fstat").len(), 65_536);
        reg.create("ctl-1-g7", 4096, SegmentKind::ControlRing, "worker-1 (pid 4242)").expect("create ctl");

        let m = flushed(&mut reg, &dir);
        assert_eq!(m.version, 1);
        assert_eq!(m.stats, ManifestStats { total_allocated: 69_632, active_count: 2, leaked_count: 0 });
        assert_eq!(m.allocations[0].id, "ring-1-g7");
        assert_eq!(m.allocations[0].kind, SegmentKind::AudioRing);
        assert_eq!(m.allocations[1].kind, SegmentKind::ControlRing);
        assert_eq!(m, reg.manifest());
        // Field names and the created format as the design specifies them.
        let raw: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).expect("read")).expect("json");
        let a0 = &raw["allocations"][0];
        assert_eq!(a0["type"], "audio_ring");
        assert_eq!(a0["size"], 65_536);
        assert_eq!(a0["owner"], "worker-1 (pid 4242)");
        let created = a0["created"].as_str().expect("created");
        assert_eq!(created.len(), 20, "{created}");
        assert!(created.ends_with('Z') && created.as_bytes()[10] == b'T', "{created}");
        assert_eq!(raw["allocations"][1]["type"], "control_ring");

        reg.set_owner("ctl-1-g7", "worker-2 (pid 9)").expect("set_owner");
        assert_eq!(flushed(&mut reg, &dir).allocations[1].owner, "worker-2 (pid 9)");

        reg.release("ring-1-g7").expect("release");
        assert!(!dir.join("ring-1-g7").exists());
        let m = flushed(&mut reg, &dir);
        assert_eq!(m.stats, ManifestStats { total_allocated: 4096, active_count: 1, leaked_count: 0 });
        assert_eq!(m.allocations.len(), 1);
        assert_eq!(m.allocations[0].id, "ctl-1-g7");

        // A file that vanished on its own still releases cleanly.
        fs::remove_file(dir.join("ctl-1-g7")).expect("rm");
        reg.release("ctl-1-g7").expect("release missing file");
        assert_eq!(flushed(&mut reg, &dir).stats, ManifestStats::default());
        assert!(!dir.join(MANIFEST_TMP_FILE).exists());
    }

    #[test]
    fn duplicate_unknown_and_existing_file_errors() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        reg.create("ring-1-g1", 100, SegmentKind::AudioRing, "w").expect("create");
        assert!(matches!(
            reg.create("ring-1-g1", 200, SegmentKind::AudioRing, "w"),
            Err(ShmError::Duplicate(id)) if id == "ring-1-g1"
        ));
        assert_eq!(fs::metadata(dir.join("ring-1-g1")).expect("stat").len(), 100);
        assert!(matches!(reg.release("nope"), Err(ShmError::Unknown(id)) if id == "nope"));
        assert!(matches!(reg.set_owner("nope", "x"), Err(ShmError::Unknown(_))));

        // An unregistered file of that name is never taken over (O_EXCL).
        fs::write(dir.join("stray"), b"not ours").expect("write");
        assert!(matches!(
            reg.create("stray", 10, SegmentKind::ControlRing, "w"),
            Err(ShmError::Io { op: "create segment", .. })
        ));
        assert_eq!(fs::read(dir.join("stray")).expect("read"), b"not ours");
        assert_eq!(reg.allocations().len(), 1);
        assert_eq!(flushed(&mut reg, &dir).stats.active_count, 1);
    }

    #[test]
    fn bad_ids_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        let long = "a".repeat(MAX_ID_LEN + 1);
        for id in [
            "",
            ".hidden",
            ".lock",
            ".",
            "..",
            "manifest.json",
            "manifest.json.tmp",
            "a/b",
            "../x",
            "a b",
            "é",
            "ring\0",
            long.as_str(),
        ] {
            assert!(
                matches!(reg.create(id, 1, SegmentKind::AudioRing, "w"), Err(ShmError::BadId(ref b)) if b == id),
                "{id:?} accepted"
            );
            assert!(matches!(reg.release(id), Err(ShmError::BadId(_))));
        }
        assert!(reg.allocations().is_empty());
        let max = "Z".repeat(MAX_ID_LEN);
        for id in ["ring-1-g7", "a", "A.b_c-9", "manifest.json2", max.as_str()] {
            reg.create(id, 1, SegmentKind::AudioRing, "w").expect(id);
        }
    }

    #[test]
    fn second_open_is_in_use_until_first_is_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        reg.create("ring-1-g1", 10, SegmentKind::AudioRing, "w").expect("create");
        match Registry::open(&dir) {
            Err(ShmError::InUse(p)) => assert_eq!(p, dir),
            other => panic!("expected InUse, got {other:?}"),
        }
        // The failed open must not have swept the live instance's files.
        assert!(dir.join("ring-1-g1").exists());
        assert_eq!(flushed(&mut reg, &dir).stats.active_count, 1);

        // Dropping without remove_all is what a crash leaves behind: the next open sweeps it.
        drop(reg);
        let (reg2, sweep) = open(&dir);
        assert_eq!(sweep.files, ["ring-1-g1"]);
        assert_eq!(sweep.bytes, 10);
        let prev = sweep.previous_manifest.expect("previous manifest");
        assert_eq!(prev.allocations[0].id, "ring-1-g1");
        assert!(!dir.join("ring-1-g1").exists());
        assert!(reg2.allocations().is_empty());
    }

    #[test]
    fn open_sweeps_what_a_crashed_instance_left() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("ring-1-g3"), vec![0u8; 1000]).expect("write");
        fs::write(dir.join("ctl-1-g3"), vec![0u8; 24]).expect("write");
        fs::write(dir.join(MANIFEST_TMP_FILE), b"{half").expect("write");
        fs::write(dir.join(LOCK_FILE), b"").expect("write");
        let stale = Manifest {
            version: 1,
            allocations: vec![Allocation {
                id: "ring-1-g3".into(),
                size: 1000,
                kind: SegmentKind::AudioRing,
                owner: "worker-1 (pid 4242)".into(),
                created: "2026-11-30T10:00:00Z".into(),
            }],
            stats: ManifestStats { total_allocated: 1000, active_count: 1, leaked_count: 0 },
        };
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&stale).expect("ser")).expect("write");

        let (reg, sweep) = open(&dir);
        assert_eq!(sweep.files, ["ctl-1-g3", "ring-1-g3"]);
        assert_eq!(sweep.bytes, 1024);
        assert_eq!(sweep.previous_manifest, Some(stale));
        let mut left: Vec<String> = reg.list_dir().expect("ls");
        left.sort();
        assert_eq!(left, [LOCK_FILE, MANIFEST_FILE]);
        assert_eq!(disk_manifest(&dir), reg.manifest());
        assert!(reg.allocations().is_empty());
    }

    #[test]
    fn garbage_manifest_is_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join(MANIFEST_FILE), b"\x00not json").expect("write");
        fs::write(dir.join("ring-9-g1"), b"x").expect("write");
        let (reg, sweep) = open(&dir);
        assert!(sweep.previous_manifest.is_none());
        assert_eq!(sweep.files, ["ring-9-g1"]);
        assert_eq!(disk_manifest(&dir), reg.manifest());
    }

    #[test]
    fn audit_finds_unknown_missing_and_orphaned() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        for id in ["ring-1-g1", "ring-2-g1", "ring-3-g1"] {
            reg.create(id, 64, SegmentKind::AudioRing, "w").expect("create");
        }
        let all_live = |_: &str| true;
        assert_eq!(reg.audit(&all_live).expect("audit"), AuditReport::default());

        fs::write(dir.join("stray"), b"?").expect("write");
        fs::remove_file(dir.join("ring-2-g1")).expect("rm");
        let live = |id: &str| id != "ring-3-g1";
        let report = reg.audit(&live).expect("audit");
        assert_eq!(report.unknown_files, ["stray"]);
        assert_eq!(report.missing_files, ["ring-2-g1"]);
        assert_eq!(report.orphaned, ["ring-3-g1"]);
        assert_eq!(report.leaked(), 3);
        assert_eq!(reg.manifest().stats.leaked_count, 3);
        assert_eq!(flushed(&mut reg, &dir).stats.leaked_count, 3);
        // Audit deletes nothing and keeps the registrations.
        assert!(dir.join("stray").exists());
        assert!(dir.join("ring-3-g1").exists());
        assert_eq!(reg.allocations().len(), 3);

        // Once fixed, the count goes back to zero on disk too.
        fs::remove_file(dir.join("stray")).expect("rm");
        reg.release("ring-2-g1").expect("release");
        reg.release("ring-3-g1").expect("release");
        assert_eq!(reg.audit(&all_live).expect("audit").leaked(), 0);
        assert_eq!(flushed(&mut reg, &dir).stats.leaked_count, 0);
    }

    #[test]
    fn audit_restores_edited_or_deleted_manifest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        reg.create("ring-1-g1", 64, SegmentKind::AudioRing, "w").expect("create");

        fs::remove_file(dir.join(MANIFEST_FILE)).expect("rm");
        reg.audit(&|_: &str| true).expect("audit");
        assert_eq!(flushed(&mut reg, &dir), reg.manifest());

        let mut edited = reg.manifest();
        edited.allocations[0].owner = "someone else".into();
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&edited).expect("ser")).expect("write");
        reg.audit(&|_: &str| true).expect("audit");
        assert_eq!(flushed(&mut reg, &dir), reg.manifest());

        fs::write(dir.join(MANIFEST_FILE), b"garbage").expect("write");
        let report = reg.audit(&|_: &str| true).expect("audit");
        assert_eq!(report, AuditReport::default());
        assert_eq!(flushed(&mut reg, &dir), reg.manifest());
    }

    #[test]
    fn remove_all_cleans_up_and_releases_lock() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        let (mut reg, _) = open(&dir);
        reg.create("ring-1-g1", 64, SegmentKind::AudioRing, "w").expect("create");
        reg.create("ctl-1-g1", 64, SegmentKind::ControlRing, "w").expect("create");
        reg.remove_all().expect("remove_all");
        // The directory stays, empty and ours (never removed: see remove_all).
        assert_eq!(fs::read_dir(&dir).expect("ls").count(), 0);
        assert_eq!(mode(&dir), 0o700);

        // With a file that is not ours, everything of ours goes.
        let (mut reg, _) = open(&dir);
        reg.create("ring-1-g2", 64, SegmentKind::AudioRing, "w").expect("create");
        fs::write(dir.join("stray"), b"?").expect("write");
        reg.remove_all().expect("remove_all");
        let mut left: Vec<_> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        assert_eq!(left, ["stray"]);
        let (_reg, sweep) = open(&dir);
        assert_eq!(sweep.files, ["stray"]);
        assert!(sweep.previous_manifest.is_none());
    }

    /// What someone planted while no instance ran (a symlink or FIFO where the manifest and
    /// the lock file go, a file of someone else's as the lock file) is neither followed nor
    /// opened for long: the open never blocks or fails on it, and the sweep removes it.
    #[test]
    fn planted_links_and_fifos_neither_followed_nor_blocking() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("shm");
        fs::create_dir(&dir).expect("mkdir");
        let target = tmp.path().join("precious");
        fs::write(&target, b"not yours").expect("write");
        std::os::unix::fs::symlink(&target, dir.join(MANIFEST_FILE)).expect("symlink");
        let fifo = |p: &Path| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        fifo(&dir.join(LOCK_FILE));
        fifo(&dir.join(MANIFEST_TMP_FILE));
        fifo(&dir.join("ring-0-g1"));
        let (reg, sweep) = open(&dir);
        assert!(sweep.previous_manifest.is_none(), "a symlinked manifest is not read");
        assert_eq!(fs::read(&target).expect("read"), b"not yours", "the link's target is untouched");
        assert!(fs::symlink_metadata(dir.join(LOCK_FILE)).expect("lock").file_type().is_file());
        assert!(fs::symlink_metadata(dir.join(MANIFEST_FILE)).expect("manifest").file_type().is_file());
        assert!(!dir.join("ring-0-g1").exists() && !dir.join(MANIFEST_TMP_FILE).exists());
        assert_eq!(disk_manifest(&dir), reg.manifest());
    }

    #[test]
    fn rfc3339_known_instants() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(1_764_496_800), "2025-11-30T10:00:00Z"); // date -u -d @1764496800
        assert_eq!(at(1_796_032_800), "2026-11-30T10:00:00Z");
        assert_eq!(at(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(at(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z"); // 2100 is not a leap year
        assert_eq!(rfc3339_utc(UNIX_EPOCH + Duration::from_millis(1_764_496_800_999)), "2025-11-30T10:00:00Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH - Duration::from_secs(1)), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59Z");
    }
}
