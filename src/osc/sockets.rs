//! The OSC sockets: handed over by systemd (socket activation: the shipped socket units) or
//! bound here (a run without them). Every way it can go wrong is one log line that says what
//! to do; the daemon plays on without OSC.

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use crate::config::Config;
use crate::runtime_socket::{self, CreatedFile};
use crate::sys;

/// The AF_UNIX socket, and the file we created for it (None when systemd owns the file).
pub struct UnixSocket {
    pub socket: UnixDatagram,
    #[allow(dead_code)] // held for its drop: the file is removed with the socket
    created: Option<CreatedFile>,
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

/// Binds the AF_UNIX socket at `path`, group `audio`, 0660 ([`runtime_socket`]).
fn bind_unix(path: &Path) -> Option<UnixSocket> {
    let hint = "under systemd, enable audiowarden-osc.socket; or set --osc-socket (none: off)";
    let bound = runtime_socket::prepare(path, |p| UnixDatagram::unbound()?.connect(p)).and_then(|()| {
        let socket = UnixDatagram::bind(path)?;
        let (created, access) = runtime_socket::restrict(path)?;
        prepare_unix(&socket)?;
        Ok((socket, created, access))
    });
    match bound {
        Ok((socket, created, access)) => {
            tracing::info!("OSC on osc.unix://{} ({})", path.display(), access.describe());
            Some(UnixSocket { socket, created: Some(created) })
        }
        Err(e) => {
            tracing::error!("no OSC socket at {}: {e} ({hint})", path.display());
            None
        }
    }
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
