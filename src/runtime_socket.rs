//! The daemon's socket files (the OSC socket, the peer-to-peer D-Bus control socket), by
//! default in /run/audiowarden: one set of rules for both. The directory must be ours or
//! root's (someone else's could have the file swapped under us); a stale socket file (nobody
//! answers on it) is replaced, anything else there is left alone; the file gets group `audio`
//! and mode 0660 (0600 where there is no such group); and it is removed on drop only if it is
//! still the file we created.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// A socket file we created, with its (device, inode): removed on drop if it is still ours
/// (not if another instance replaced it meanwhile).
pub struct CreatedFile {
    path: PathBuf,
    id: (u64, u64),
}

impl CreatedFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Who may use the socket, as set on its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Group `audio`, mode 0660.
    GroupAudio,
    /// No group `audio` on this machine: mode 0600, our uid only.
    OwnerOnly,
}

impl Access {
    /// For the log line that announces the socket.
    pub fn describe(self) -> String {
        match self {
            Access::GroupAudio => "group audio, mode 0660".to_owned(),
            Access::OwnerOnly => format!("mode 0600: no group `audio` here, so only uid {} may use it", sys::euid()),
        }
    }
}

/// Makes `path` ready for a bind: creates its directory (0755) if needed and checks that it is
/// ours or root's, and removes a stale socket file there. `answers` connects to the socket
/// file found at the path: Ok(()) means someone is serving on it (another instance: refused),
/// ECONNREFUSED means stale (removed); any other error means a socket that is not ours.
pub fn prepare(path: &Path, answers: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        let meta = std::fs::metadata(dir)?;
        if meta.uid() != sys::euid() && meta.uid() != 0 {
            return Err(io::Error::other(format!("{} is owned by uid {}, not by us", dir.display(), meta.uid())));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match answers(path) {
            // Stale: nobody receives there. Anything else (EACCES: someone else's live socket,
            // EPROTOTYPE: a socket of another type) is not ours to remove.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path),
            Ok(()) => Err(io::Error::other("another process serves on it (a second instance?)")),
            Err(e) => Err(io::Error::other(format!("a socket that is not ours is there ({e}): left alone"))),
        },
        Ok(_) => Err(io::Error::other("it exists and is not a socket: left alone")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the group and mode of the socket file just bound at `path` and takes ownership of it
/// (removed on drop).
pub fn restrict(path: &Path) -> io::Result<(CreatedFile, Access)> {
    let meta = std::fs::symlink_metadata(path)?;
    let created = CreatedFile { path: path.to_owned(), id: (meta.dev(), meta.ino()) };
    let group = audio_gid().and_then(|gid| std::os::unix::fs::chown(path, None, Some(gid)).ok());
    let (mode, access) = match group {
        Some(()) => (0o660, Access::GroupAudio),
        None => (0o600, Access::OwnerOnly),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok((created, access))
}

/// The gid of group `audio`, from /etc/group.
pub fn audio_gid() -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some("audio")).then(|| f.nth(1).and_then(|g| g.parse().ok())).flatten()
    })
}
