//! `org.audiowarden.Engine1` without a bus: peer-to-peer D-Bus on an AF_UNIX stream socket
//! (`--control-socket`, /run/audiowarden/control.sock by default, group `audio`, 0660: the
//! bus policy's "may change the sound"). It makes a development run, a machine without a
//! system bus, or one whose bus policy does not know the service yet, controllable: each
//! client gets its own peer-to-peer connection serving the same object, and the bridge sends
//! it the same signals as the bus. `audiowardenctl` falls back to it when the bus cannot
//! reach the service.
//!
//! One thread accepts; each handshake runs on a short-lived thread of its own, and one that
//! has not finished after [`HANDSHAKE_TIMEOUT`] is cut off, so a client that connects and says
//! nothing holds neither the socket nor a slot. At most [`MAX_PEERS`] clients at a time.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::service::Engine1;
use super::OBJECT_PATH;
use crate::runtime_socket::{self, CreatedFile};
use crate::sys::{self, EventFd};

/// Clients connected (or still in their handshake) at most.
pub const MAX_PEERS: usize = 16;
/// A client has this long from connect to a finished authentication.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// One client: its socket (a second handle, to see it hang up and to cut a stalled
/// handshake), its uid, and once authenticated, the connection and its object.
struct Peer {
    id: u64,
    probe: UnixStream,
    uid: u32,
    since: Instant,
    served: Option<zbus::blocking::Connection>,
}

/// The clients, shared by the accept thread (which adds them) and the bridge (which sends
/// them signals).
#[derive(Clone, Default)]
pub struct Peers(Arc<Mutex<Vec<Peer>>>);

impl Peers {
    /// The connections of the authenticated clients still connected (those that hung up are
    /// dropped here).
    pub fn connections(&self) -> Vec<zbus::blocking::Connection> {
        let mut peers = self.lock();
        peers.retain(|p| !sys::peer_hung_up(p.probe.as_raw_fd()));
        peers.iter().filter_map(|p| p.served.clone()).collect()
    }

    /// How many clients are connected (authenticated or not).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Peer>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops clients that hung up and cuts handshakes past their time.
    fn prune(&self) {
        let mut peers = self.lock();
        peers.retain(|p| !sys::peer_hung_up(p.probe.as_raw_fd()));
        for p in peers.iter().filter(|p| p.served.is_none() && p.since.elapsed() > HANDSHAKE_TIMEOUT) {
            // The handshake thread's read ends; it then removes the entry.
            let _ = p.probe.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The listening socket and its accept thread; stopped (and the socket file removed) on drop.
pub struct PeerServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    _file: CreatedFile,
}

impl PeerServer {
    /// Binds `path` ([`runtime_socket`]'s rules) and starts accepting; `object` makes the object
    /// served to each client. Every way it can fail is one log line: the daemon runs
    /// on without it.
    pub fn start(path: &Path, peers: Peers, object: impl Fn() -> Engine1 + Send + 'static) -> Option<PeerServer> {
        match bind(path) {
            Ok((listener, file, access)) => {
                let stop = match EventFd::new(true) {
                    Ok(e) => Arc::new(e),
                    Err(e) => {
                        tracing::error!("no D-Bus control socket: eventfd: {e}");
                        return None;
                    }
                };
                let s = stop.clone();
                let thread = std::thread::Builder::new()
                    .name("aw-dbus-peer".into())
                    .spawn(move || accept_loop(&listener, &peers, &s, &object));
                match thread {
                    Ok(t) => {
                        tracing::info!(
                            "D-Bus API also peer-to-peer on unix:path={} ({}; audiowardenctl uses it when the bus cannot reach us)",
                            path.display(),
                            access.describe()
                        );
                        Some(PeerServer { stop, thread: Some(t), _file: file })
                    }
                    Err(e) => {
                        tracing::error!("no D-Bus control socket: cannot start its thread: {e}");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::error!("no D-Bus control socket at {}: {e} (set --control-socket; none: off)", path.display());
                None
            }
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bind(path: &Path) -> io::Result<(UnixListener, CreatedFile, runtime_socket::Access)> {
    runtime_socket::prepare(path, |p| UnixStream::connect(p).map(drop))?;
    let listener = UnixListener::bind(path)?;
    let (file, access) = runtime_socket::restrict(path)?;
    listener.set_nonblocking(true)?;
    Ok((listener, file, access))
}

fn accept_loop(listener: &UnixListener, peers: &Peers, stop: &EventFd, object: &(impl Fn() -> Engine1 + Send)) {
    let next_id = AtomicU64::new(0);
    // (second, refusals in it): a client reconnecting in a loop is logged a few times a second.
    let mut refused_logged = (0u64, 0u32);
    loop {
        // Wakes for a client, a stop, or once a second to cut stalled handshakes.
        sys::wait_readable(&[listener.as_raw_fd(), stop.raw()], Duration::from_secs(1));
        if stop.drain() {
            return;
        }
        peers.prune();
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("D-Bus control socket: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            let admitted = admit(stream, peers, &next_id, object);
            if let Err(why) = admitted {
                let now = sys::now_ns() / 1_000_000_000;
                if refused_logged.0 != now {
                    refused_logged = (now, 0);
                }
                refused_logged.1 += 1;
                if refused_logged.1 <= 3 {
                    tracing::warn!("D-Bus control socket: a client was refused: {why}");
                }
            }
        }
    }
}

/// Takes one client in: records it and starts its handshake thread.
fn admit(
    stream: UnixStream,
    peers: &Peers,
    next_id: &AtomicU64,
    object: &(impl Fn() -> Engine1 + Send),
) -> Result<(), String> {
    if peers.len() >= MAX_PEERS {
        return Err(format!("{MAX_PEERS} clients are connected already"));
    }
    let uid = sys::peer_uid(stream.as_raw_fd()).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let probe = stream.try_clone().map_err(|e| e.to_string())?;
    // zbus drives the stream itself (non-blocking, on its own executor).
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    peers.lock().push(Peer { id, probe, uid, since: Instant::now(), served: None });
    let obj = object();
    let list = peers.clone();
    let started =
        std::thread::Builder::new().name("aw-dbus-hs".into()).spawn(move || handshake(stream, obj, id, &list));
    if let Err(e) = started {
        peers.lock().retain(|p| p.id != id);
        return Err(format!("cannot start a handshake thread: {e}"));
    }
    Ok(())
}

/// Authenticates the client (EXTERNAL: the uid it claims must be its socket's) and serves it
/// the object; on failure the entry goes.
fn handshake(stream: UnixStream, obj: Engine1, id: u64, peers: &Peers) {
    let built = zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .server(zbus::Guid::generate())
        .and_then(|b| b.p2p().serve_at(OBJECT_PATH, obj))
        .and_then(zbus::blocking::connection::Builder::build);
    let mut list = peers.lock();
    match built {
        Ok(served) => {
            if let Some(p) = list.iter_mut().find(|p| p.id == id) {
                tracing::debug!("D-Bus control socket: uid {} connected", p.uid);
                p.served = Some(served);
            }
        }
        Err(e) => {
            tracing::debug!("D-Bus control socket: a handshake failed: {e}");
            list.retain(|p| p.id != id);
        }
    }
}
