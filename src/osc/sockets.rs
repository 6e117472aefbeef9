//! The OSC sockets: handed over by systemd (socket activation: the shipped socket units) or
//! bound here (a run without them). Every way it can go wrong is one log line that says what
//! to do; the daemon plays on without OSC.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::sys;

/// The AF_UNIX socket, and the file we created for it with its (device, inode): removed on
/// drop if it is still ours (not if another instance replaced it meanwhile); None when
/// systemd owns the file.
pub struct UnixSocket {
    pub socket: UnixDatagram,
    created: Option<(PathBuf, (u64, u64))>,
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if let Some((p, id)) = &self.created {
            if std::fs::symlink_metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// What the OSC thread serves.
#[derive(Default)]
pub struct Sockets {
    pub unix: Option<UnixSocket>,
    pub udp: Option<UdpSocket>,
}

impl Sockets {
    pub fn is_empty(&self) -> bool {
        self.unix.is_none() && self.udp.is_none()
    }
}

/// The sockets to serve: those systemd passed (`activated`, from `sd_notify::listen_fds`, taken
/// before any thread started), then, for a transport it did not pass, the configuration's.
pub fn open(config: &Config, activated: &[RawFd]) -> Sockets {
    let mut s = Sockets::default();
    for &fd in activated {
        adopt(&mut s, fd);
    }
    if s.unix.is_none() && config.osc_socket != "none" {
        s.unix = bind_unix(Path::new(&config.osc_socket));
    }
    if s.udp.is_none() {
        if let Some(addr) = &config.osc_listen {
            s.udp = bind_udp(addr);
        }
    }
    s
}

/// A socket systemd handed over: an AF_UNIX or a UDP datagram socket, told apart by its family.
fn adopt(s: &mut Sockets, fd: RawFd) {
    let kind = sys::socket_kind(fd);
    let owned = sys::adopt_fd(fd);
    match kind {
        Ok((libc::AF_UNIX, true)) if s.unix.is_none() => {
            let socket = UnixDatagram::from(owned);
            let path = socket.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
            if let Err(e) = prepare_unix(&socket) {
                tracing::error!("OSC: the AF_UNIX socket systemd passed cannot be used: {e}");
                return;
            }
            let shown = path.map_or_else(|| "(unnamed)".to_owned(), |p| p.display().to_string());
            tracing::info!("OSC on osc.unix://{shown} (from systemd: audiowarden-osc.socket)");
            s.unix = Some(UnixSocket { socket, created: None });
        }
        Ok((libc::AF_INET | libc::AF_INET6, true)) if s.udp.is_none() => {
            let socket = UdpSocket::from(owned);
            if let Err(e) = socket.set_nonblocking(true) {
                tracing::error!("OSC: the UDP socket systemd passed cannot be used: {e}");
                return;
            }
            let addr = socket.local_addr().map_or_else(|_| "?".to_owned(), |a| a.to_string());
            tracing::warn!(
                "OSC on osc.udp://{addr} (from systemd: audiowarden-osc-udp.socket): open to every local user, \
                 OSC has no authentication"
            );
            s.udp = Some(socket);
        }
        _ => tracing::warn!("ignoring fd {fd} that systemd passed: not an OSC datagram socket, or a second one"),
    }
}

fn prepare_unix(socket: &UnixDatagram) -> io::Result<()> {
    sys::set_passcred(socket.as_raw_fd())?;
    socket.set_nonblocking(true)
}

/// Binds the AF_UNIX socket at `path`, group `audio`, 0660. A stale file (no one receives on
/// it) is replaced; a live one (another instance) or anything not a socket is left alone.
fn bind_unix(path: &Path) -> Option<UnixSocket> {
    let hint = "under systemd, enable audiowarden-osc.socket; or set --osc-socket (none: off)";
    match try_bind_unix(path) {
        Ok((socket, group)) => {
            match group {
                Some(()) => tracing::info!("OSC on osc.unix://{} (group audio, mode 0660)", path.display()),
                None => tracing::warn!(
                    "OSC on osc.unix://{} (mode 0600: no group `audio` here, so only uid {} may send)",
                    path.display(),
                    sys::euid()
                ),
            }
            let id = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino())).unwrap_or_default();
            Some(UnixSocket { socket, created: Some((path.to_owned(), id)) })
        }
        Err(e) => {
            tracing::error!("no OSC socket at {}: {e} ({hint})", path.display());
            None
        }
    }
}

fn try_bind_unix(path: &Path) -> io::Result<(UnixDatagram, Option<()>)> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        let meta = std::fs::metadata(dir)?;
        // A directory someone else owns could have the socket swapped under us.
        if meta.uid() != sys::euid() && meta.uid() != 0 {
            return Err(io::Error::other(format!("{} is owned by uid {}, not by us", dir.display(), meta.uid())));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixDatagram::unbound()?.connect(path) {
            // Stale: nobody receives there. Anything else (EACCES: someone else's live socket,
            // EPROTOTYPE: a stream socket) is not ours to remove.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path)?,
            Ok(()) => return Err(io::Error::other("another process receives on it (a second instance?)")),
            Err(e) => return Err(io::Error::other(format!("a socket that is not ours is there ({e}): left alone"))),
        },
        Ok(_) => return Err(io::Error::other("it exists and is not a socket: left alone")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = UnixDatagram::bind(path)?;
    prepare_unix(&socket)?;
    let group = audio_gid().and_then(|gid| std::os::unix::fs::chown(path, None, Some(gid)).ok());
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok((socket, group))
}

/// The gid of group `audio`, from /etc/group.
fn audio_gid() -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some("audio")).then(|| f.nth(1).and_then(|g| g.parse().ok())).flatten()
    })
}

/// Binds UDP at `addr` (validated by the configuration: loopback unless remote is allowed).
fn bind_udp(addr: &str) -> Option<UdpSocket> {
    let socket = match UdpSocket::bind(addr).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::EAFNOSUPPORT | libc::EPERM | libc::EACCES) => {
                    " (this sandbox allows no IP sockets, as the shipped unit's RestrictAddressFamilies=AF_UNIX: \
                     enable audiowarden-osc-udp.socket instead)"
                }
                _ => "",
            };
            tracing::error!("no OSC on UDP {addr}: {e}{why}");
            return None;
        }
    };
    let remote = socket.local_addr().is_ok_and(|a| !a.ip().is_loopback());
    tracing::warn!(
        "OSC on osc.udp://{addr}: open to every local user{}, OSC has no authentication",
        if remote { " and to the network" } else { "" }
    );
    if only_loopback_here() {
        tracing::warn!(
            "this process sees no network interface but loopback (PrivateNetwork=yes?): clients outside cannot \
             reach osc.udp://{addr}; under systemd, enable audiowarden-osc-udp.socket instead"
        );
    }
    Some(socket)
}

/// The network namespace has no interface but `lo` (a private network).
fn only_loopback_here() -> bool {
    std::fs::read_to_string("/proc/net/dev").is_ok_and(|t| {
        let ifaces: Vec<&str> = t.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
        ifaces.iter().all(|i| *i == "lo")
    })
}
