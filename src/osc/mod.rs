//! Open Sound Control, the engine's original control path: `/engine/frequency` and
//! `/engine/gain` (one number each: `f`, `d` or `i`) and `/engine/status` (answered to the
//! sender). Controllers, TouchOSC, Pure Data, SuperCollider and show-control systems speak it.
//!
//! OSC has no authentication, so who may send is who may reach the socket:
//! - an AF_UNIX datagram socket (default `/run/audiowarden/osc.sock`, group `audio`, 0660;
//!   liblo's `osc.unix:///run/audiowarden/osc.sock`): the kernel says who sent each datagram,
//!   and the journal names that uid;
//! - UDP, opt-in (`--osc-listen`): every local user, and the network for a non-loopback
//!   address (which needs `--osc-allow-remote` too).
//!
//! Under systemd both come from socket units (audiowarden-osc.socket,
//! audiowarden-osc-udp.socket), so the service itself keeps PrivateNetwork=yes.
//!
//! Changes go through the same [`crate::Control`] as D-Bus: the same validation and ranges,
//! exactly once across failovers, coalescing counted, PropertiesChanged on the bus. A bundle's
//! messages are applied on receipt, whatever its time tag (sample-accurate scheduling is for
//! later). Nothing a datagram holds can do more than be counted as rejected (`osc_rejected`)
//! and logged, at most [`LOG_BURST`] lines a second. This thread never touches the audio path.

mod sockets;

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use rosc::{OscMessage, OscPacket, OscType};

pub use sockets::{open, Sockets};

use crate::control::ControlError;
use crate::supervisor::Handle;
use crate::sys::{Epoll, EventFd};

/// Log lines (changes and rejections) per second at most; the rest are counted in one line.
pub const LOG_BURST: u32 = 10;
/// `/engine/status` answers per second at most (a flood of queries must not become a flood
/// of answers to a spoofed UDP source).
const REPLY_BURST: u32 = 20;
/// Bundles nested deeper than this are rejected.
const MAX_BUNDLE_DEPTH: usize = 8;
/// The receive buffer: UDP's own limit, so that the length read is the datagram's (an AF_UNIX
/// one longer than this is cut, and rejected).
const MAX_DATAGRAM: usize = 65_536;
/// The largest datagram decoded (ours are tens of bytes; a controller's bundle a few hundred):
/// a longer one is rejected unread. With [`MAX_NESTING_MARKS`] it bounds how deep the
/// decoder's recursion (bundles) and the drop of what it built (arrays) can go.
const MAX_DECODED: usize = 8192;
/// Bundle headers or array openings a datagram may hold before it is rejected unread (none
/// of our addresses takes an array; a legitimate bundle holds a handful).
const MAX_NESTING_MARKS: usize = 64;
/// Datagrams read from one socket per wake-up, so that a flood cannot keep the thread from
/// seeing its stop request.
const DRAIN_BATCH: usize = 64;
/// The OSC thread's stack: room for the decoder's recursion within the limits above.
const STACK: usize = 8 << 20;

const TOKEN_STOP: u64 = 0;
const TOKEN_UNIX: u64 = 1;
const TOKEN_UDP: u64 = 2;

/// Who sent a datagram, for the journal and for an answer.
#[derive(Debug, Clone)]
enum Peer {
    Unix(crate::sys::UnixSender),
    Udp(std::net::SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix(s) => match (s.uid, s.pid) {
                (Some(uid), Some(pid)) => write!(f, "uid {uid} (pid {pid})"),
                _ => write!(f, "an unknown local sender"),
            },
            Peer::Udp(a) => write!(f, "udp {a}"),
        }
    }
}

/// The OSC thread; stopped (and a socket file it created removed) on drop.
pub struct OscServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl OscServer {
    /// Starts serving `sockets` (None if there is none to serve).
    ///
    /// # Errors
    /// The thread or its epoll could not be created.
    pub fn start(sup: Handle, sockets: Sockets) -> std::io::Result<Option<OscServer>> {
        if sockets.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(EventFd::new(true)?);
        let epoll = Epoll::new()?;
        epoll.add(stop.raw(), TOKEN_STOP)?;
        if let Some(u) = &sockets.unix {
            epoll.add(u.socket.as_raw_fd(), TOKEN_UNIX)?;
        }
        if let Some(u) = &sockets.udp {
            epoll.add(u.as_raw_fd(), TOKEN_UDP)?;
        }
        let mut server = Server { sup, sockets, limits: Limits::default() };
        let thread =
            std::thread::Builder::new().name("aw-osc".into()).stack_size(STACK).spawn(move || server.run(&epoll))?;
        Ok(Some(OscServer { stop, thread: Some(thread) }))
    }
}

impl Drop for OscServer {
    fn drop(&mut self) {
        self.stop.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-second budgets for log lines and answers.
#[derive(Default)]
struct Limits {
    second: u64,
    logged: u32,
    suppressed: u32,
    replies: u32,
}

struct Server {
    sup: Handle,
    sockets: Sockets,
    limits: Limits,
}

impl Server {
    fn run(&mut self, epoll: &Epoll) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        loop {
            // With lines held back, wake within a second to say how many, even if nothing
            // more arrives.
            let timeout_ms = if self.limits.suppressed > 0 { 250 } else { -1 };
            let n = epoll.wait(&mut evs, timeout_ms);
            self.roll_second();
            for ev in &evs[..n] {
                match ev.u64 {
                    TOKEN_STOP => return,
                    TOKEN_UNIX => self.drain_unix(&mut buf),
                    TOKEN_UDP => self.drain_udp(&mut buf),
                    _ => {}
                }
            }
        }
    }

    /// Reads up to [`DRAIN_BATCH`] datagrams (the epoll is level-triggered: more wake it again).
    fn drain_unix(&mut self, buf: &mut [u8]) {
        let Some(fd) = self.sockets.unix.as_ref().map(|u| u.socket.as_raw_fd()) else { return };
        for _ in 0..DRAIN_BATCH {
            match crate::sys::recv_with_creds(fd, buf) {
                Ok((n, truncated, sender)) => {
                    let peer = Peer::Unix(sender);
                    let n = if truncated { usize::MAX } else { n };
                    self.on_datagram(buf, n, &peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock: drained
            }
        }
    }

    fn drain_udp(&mut self, buf: &mut [u8]) {
        for _ in 0..DRAIN_BATCH {
            let Some(udp) = &self.sockets.udp else { return };
            match udp.recv_from(buf) {
                Ok((n, from)) => self.on_datagram(buf, n, &Peer::Udp(from)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Datagram `buf[..n]` (`n` = usize::MAX: cut at the buffer's end).
    fn on_datagram(&mut self, buf: &[u8], n: usize, peer: &Peer) {
        if n > MAX_DECODED {
            return self.reject_datagram(peer, &"longer than 8 KiB");
        }
        let data = &buf[..n];
        let marks = data.windows(7).filter(|w| *w == b"#bundle").count() + data.iter().filter(|&&b| b == b'[').count();
        if marks > MAX_NESTING_MARKS {
            return self.reject_datagram(peer, &"too many bundles or arrays");
        }
        match rosc::decoder::decode_udp(data) {
            Ok(([], packet)) => self.on_packet(packet, peer, 0),
            Ok(_) => self.reject_datagram(peer, &"trailing bytes after the packet"),
            Err(e) => self.reject_datagram(peer, &DecodeError(e)),
        }
    }

    fn on_packet(&mut self, packet: OscPacket, peer: &Peer, depth: usize) {
        match packet {
            OscPacket::Message(m) => self.on_message(&m, peer),
            OscPacket::Bundle(b) if depth < MAX_BUNDLE_DEPTH => {
                // Applied on receipt, whatever the time tag says (see the module's doc).
                for p in b.content {
                    self.on_packet(p, peer, depth + 1);
                }
            }
            OscPacket::Bundle(_) => self.reject_datagram(peer, &"bundles nested too deep"),
        }
    }

    fn on_message(&mut self, m: &OscMessage, peer: &Peer) {
        self.counters().received.fetch_add(1, Ordering::Relaxed);
        match m.addr.as_str() {
            "/engine/frequency" | "/engine/gain" => match one_number(&m.args) {
                Some(v) => self.change(&m.addr, v, peer),
                None => self.reject(peer, &m.addr, &format!("takes one number (f, d or i), got {}", tags(&m.args))),
            },
            "/engine/status" if m.args.is_empty() => self.answer_status(peer),
            "/engine/status" => self.reject(peer, &m.addr, "takes no arguments"),
            other => self.reject(peer, other, "unknown address (/engine/frequency, /engine/gain, /engine/status)"),
        }
    }

    /// A frequency or gain change, through the same control path as D-Bus.
    fn change(&mut self, addr: &str, value: f64, peer: &Peer) {
        let control = self.sup.control();
        let (method, result) = if addr == "/engine/frequency" {
            ("SetFrequency", control.set_frequency(value))
        } else {
            ("SetGain", control.set_gain(value))
        };
        match result {
            Ok(stamp) => {
                if self.may_log() {
                    tracing::info!(
                        METHOD = method,
                        VALUE = value,
                        OSC_PEER = %peer,
                        "OSC {addr} {value} from {peer}: change #{} at frame {}",
                        stamp.seq,
                        stamp.apply_at
                    );
                }
            }
            Err(e @ (ControlError::Busy { .. } | ControlError::ShuttingDown)) => {
                self.counters().dropped.fetch_add(1, Ordering::Relaxed);
                if self.may_log() {
                    tracing::warn!(OSC_PEER = %peer, "OSC {addr} {value} from {peer} dropped: {e}");
                }
                self.answer_error(peer, addr, &e.to_string());
            }
            Err(e) => self.reject(peer, addr, &e.to_string()),
        }
    }

    fn counters(&self) -> &crate::metrics::OscCounters {
        self.sup.osc_counters()
    }

    /// A datagram that is not (well-formed) OSC: one rejected message. `why` is formatted only
    /// if the line is logged.
    fn reject_datagram(&mut self, peer: &Peer, why: &dyn std::fmt::Display) {
        self.counters().received.fetch_add(1, Ordering::Relaxed);
        self.counters().rejected.fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::warn!(OSC_PEER = %peer, "OSC datagram from {peer} rejected: {why}");
        }
    }

    fn reject(&mut self, peer: &Peer, addr: &str, why: &str) {
        self.counters().rejected.fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::warn!(OSC_PEER = %peer, "OSC {addr} from {peer} rejected: {why}");
        }
        self.answer_error(peer, addr, why);
    }

    /// One more log line this second? Once a second is over, says how many were not logged.
    fn may_log(&mut self) -> bool {
        self.roll_second();
        if self.limits.logged < LOG_BURST {
            self.limits.logged += 1;
            true
        } else {
            self.limits.suppressed += 1;
            false
        }
    }

    fn roll_second(&mut self) {
        let now = self.sup.uptime_s();
        if now != self.limits.second {
            if self.limits.suppressed > 0 {
                tracing::warn!("{} more OSC messages were not logged", self.limits.suppressed);
            }
            self.limits = Limits { second: now, ..Limits::default() };
        }
    }

    /// `/engine/status ,sddbhhhh`: state, frequency, gain, standby ready, underruns, crashes,
    /// control changes received, OSC messages rejected.
    fn answer_status(&mut self, peer: &Peer) {
        // The budget first: a snapshot sorts the metrics' windows.
        self.roll_second();
        if self.limits.replies >= REPLY_BURST {
            return;
        }
        let m = self.sup.metrics();
        let control = self.sup.control();
        let args = vec![
            OscType::String(self.sup.state().as_str().to_owned()),
            OscType::Double(control.frequency()),
            OscType::Double(control.gain()),
            OscType::Bool(m.spare_ready),
            OscType::Long(m.underruns as i64),
            OscType::Long(m.crash_count as i64),
            OscType::Long(m.control_received as i64),
            OscType::Long(m.osc_rejected as i64),
        ];
        if self.send(peer, "/engine/status", args) {
            self.counters().replies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `/engine/error ,ss`: the address and why, where the sender can take an answer.
    fn answer_error(&mut self, peer: &Peer, addr: &str, why: &str) {
        self.send(peer, "/engine/error", vec![OscType::String(addr.to_owned()), OscType::String(why.to_owned())]);
    }

    /// Sends an answer to `peer` if it has an address and this second's budget allows; never
    /// blocks (a receiver that does not read loses it).
    fn send(&mut self, peer: &Peer, addr: &str, args: Vec<OscType>) -> bool {
        self.roll_second();
        if self.limits.replies >= REPLY_BURST {
            return false;
        }
        let packet = OscPacket::Message(OscMessage { addr: addr.to_owned(), args });
        let Ok(bytes) = rosc::encoder::encode(&packet) else { return false };
        let sent = match peer {
            Peer::Udp(to) => self.sockets.udp.as_ref().is_some_and(|u| u.send_to(&bytes, to).is_ok()),
            Peer::Unix(s) => match (&self.sockets.unix, &s.path) {
                (Some(u), Some(path)) if answerable(path, s.uid) => u.socket.send_to(&bytes, path).is_ok(),
                _ => false,
            },
        };
        if sent {
            self.limits.replies += 1;
        }
        sent
    }
}

/// A rosc error, shortened for the journal (a bad string's error lists every byte).
struct DecodeError(rosc::OscError);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = self.0.to_string();
        let cut: String = full.chars().take(80).collect();
        write!(f, "not an OSC packet ({cut}{})", if cut.len() < full.len() { "..." } else { "" })
    }
}

/// A sender's bound path gets an answer only if it is (still) a socket of the sender's own,
/// not a symlink: the name the kernel reports stays after the sender swaps the file, and an
/// answer must not be aimed at someone else's socket.
fn answerable(path: &std::path::Path, uid: Option<u32>) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && Some(m.uid()) == uid)
}

/// The one number a frequency or gain message carries (`f`, `d` or `i`).
fn one_number(args: &[OscType]) -> Option<f64> {
    match args {
        [OscType::Float(v)] => Some(f64::from(*v)),
        [OscType::Double(v)] => Some(*v),
        [OscType::Int(v)] => Some(f64::from(*v)),
        _ => None,
    }
}

/// The type tags of `args`, for an error message (`,s`, or `none`).
fn tags(args: &[OscType]) -> String {
    if args.is_empty() {
        return "no arguments".into();
    }
    let t: String = args
        .iter()
        .map(|a| match a {
            OscType::Int(_) => 'i',
            OscType::Float(_) => 'f',
            OscType::String(_) => 's',
            OscType::Blob(_) => 'b',
            OscType::Time(_) => 't',
            OscType::Long(_) => 'h',
            OscType::Double(_) => 'd',
            OscType::Char(_) => 'c',
            OscType::Color(_) => 'r',
            OscType::Midi(_) => 'm',
            OscType::Bool(true) => 'T',
            OscType::Bool(false) => 'F',
            OscType::Array(_) => '[',
            OscType::Nil => 'N',
            OscType::Inf => 'I',
        })
        .collect();
    format!(",{t}")
}
