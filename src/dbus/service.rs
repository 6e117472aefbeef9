//! The daemon's side of `org.audiowarden.Engine1`: the interface object (method calls run on
//! zbus's executor thread) and a bridge thread that turns supervisor events and state changes
//! into signals.
//!
//! Nothing here touches the audio path: a set call validates, stamps and queues through
//! [`Control`] (a short critical section shared with the monitor, never with the output
//! thread), and everything else only reads atomics and snapshots.
//!
//! The bus is optional for the audio: if it cannot be reached (no system bus on a development
//! machine, a policy that denies the name) the daemon keeps playing, logs why once, and tries
//! again every few seconds.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zbus::blocking::object_server::InterfaceRef;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;

use super::peer::{PeerServer, Peers};
use super::{metrics_dict, BUS_NAME, OBJECT_PATH};
use crate::config_file::LoadError;
use crate::reload::Reloader;
use crate::supervisor::{Event, Handle, State};

/// PropertiesChanged at most this often (a flood of SetFrequency calls is announced as a
/// few changes, not thousands); the bridge otherwise sleeps until something changes.
const MIN_ANNOUNCE_GAP: Duration = Duration::from_millis(20);
/// Between attempts to reach the bus.
const RETRY: Duration = Duration::from_secs(2);

/// The object served at [`OBJECT_PATH`].
pub struct Engine1 {
    sup: Handle,
    /// The daemon's reloader (shared with SIGHUP); None where there is no configuration to
    /// reload (a library user such as the benchmarks).
    reloader: Option<Arc<Mutex<Reloader>>>,
    stopping: Arc<AtomicBool>,
    /// (second of uptime, rejected calls in it), for the log rate limit.
    log_limit: std::sync::Mutex<(u64, u64)>,
}

/// Rejected calls logged per second at most.
const LOG_BURST: u64 = 10;

/// `stopping` once the D-Bus side has begun to stop, else the supervisor's state.
fn current_state(sup: &Handle, stopping: &AtomicBool) -> State {
    if stopping.load(Ordering::Acquire) {
        State::Stopping
    } else {
        sup.state()
    }
}

impl Engine1 {
    /// The object for one connection (the bus, or a peer-to-peer client).
    pub(crate) fn new(sup: &Handle, reloader: &Option<Arc<Mutex<Reloader>>>, stopping: &Arc<AtomicBool>) -> Engine1 {
        Engine1 {
            sup: sup.clone(),
            reloader: reloader.clone(),
            stopping: stopping.clone(),
            log_limit: std::sync::Mutex::new((0, 0)),
        }
    }

    fn current_state(&self) -> State {
        current_state(&self.sup, &self.stopping)
    }

    fn rejected(&self, method: &str, value: f64, e: &crate::ControlError) -> zbus::fdo::Error {
        // Logged once each, but at most LOG_BURST a second: a client looping on bad values
        // must not flood the journal (the count is in control_rejected either way).
        let now_s = self.sup.uptime_s();
        let mut lim = self.log_limit.lock().unwrap_or_else(|p| p.into_inner());
        if lim.0 != now_s {
            if lim.1 > LOG_BURST {
                tracing::warn!("{} more rejected calls were not logged", lim.1 - LOG_BURST);
            }
            *lim = (now_s, 0);
        }
        lim.1 += 1;
        if lim.1 <= LOG_BURST {
            tracing::warn!(METHOD = method, VALUE = value, "rejected {method}({value}): {e}");
        }
        match e {
            crate::ControlError::Busy { .. } => zbus::fdo::Error::LimitsExceeded(e.to_string()),
            crate::ControlError::ShuttingDown => zbus::fdo::Error::Failed(e.to_string()),
            _ => zbus::fdo::Error::InvalidArgs(e.to_string()),
        }
    }
}

// spawn = false: calls are handled one at a time in the order they arrive, so the last
// SetFrequency sent is the last one applied.
#[zbus::interface(name = "org.audiowarden.Engine1", spawn = false)]
impl Engine1 {
    /// Queues a frequency change; returns once every worker has it.
    fn set_frequency(&self, hz: f64) -> zbus::fdo::Result<()> {
        self.sup.control().set_frequency(hz).map_err(|e| self.rejected("SetFrequency", hz, &e))?;
        Ok(())
    }

    /// Queues a linear gain change; returns once every worker has it.
    fn set_gain(&self, gain: f64) -> zbus::fdo::Result<()> {
        self.sup.control().set_gain(gain).map_err(|e| self.rejected("SetGain", gain, &e))?;
        Ok(())
    }

    /// Re-reads the configuration file and applies the settings that changed and can change
    /// live; returns their names, the changed ones that need a restart, and what the kernel
    /// refused (a priority). A bad file changes nothing: InvalidFileContent naming the line.
    #[zbus(out_args("applied", "needs_restart", "refused"))]
    fn reload(&self) -> zbus::fdo::Result<(Vec<String>, Vec<String>, Vec<String>)> {
        let Some(reloader) = &self.reloader else {
            return Err(zbus::fdo::Error::NotSupported("this instance has no configuration to reload".into()));
        };
        let result = reloader.lock().unwrap_or_else(|p| p.into_inner()).reload_and_log();
        let report = result.map_err(|e| match e {
            LoadError::File { .. } | LoadError::Invalid(_) => {
                zbus::fdo::Error::InvalidFileContent(format!("{}; nothing was changed", e.to_string().trim_end()))
            }
            other => zbus::fdo::Error::Failed(format!("{}; nothing was changed", other.to_string().trim_end())),
        })?;
        let names = |l: &[crate::reload::Change]| l.iter().map(|c| c.key.to_owned()).collect::<Vec<_>>();
        Ok((names(&report.applied), names(&report.needs_restart), report.refused))
    }

    #[zbus(out_args("metrics"))]
    fn get_metrics(&self) -> HashMap<String, OwnedValue> {
        metrics_dict(&self.sup.metrics())
    }

    #[zbus(out_args("text"))]
    fn get_metrics_prometheus(&self) -> String {
        crate::metrics::exposition::text(&self.sup.metrics())
    }

    #[zbus(property)]
    fn frequency(&self) -> f64 {
        self.sup.control().frequency()
    }

    #[zbus(property)]
    fn gain(&self) -> f64 {
        self.sup.control().gain()
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.current_state().as_str().to_owned()
    }

    #[zbus(property)]
    fn spare_ready(&self) -> bool {
        self.sup.metrics_spare_ready()
    }

    #[zbus(property)]
    fn primary_pid(&self) -> u32 {
        self.sup.primary_pid()
    }

    #[zbus(signal)]
    async fn failover(emitter: &SignalEmitter<'_>, old_pid: u32, new_pid: u32, failover_ms: f64) -> zbus::Result<()>;
}

/// The running D-Bus side. [`Service::stop`] (or drop) announces `stopping`, releases the
/// name and ends the bridge thread (and the control socket's).
pub struct Service {
    sup: Handle,
    stopping: Arc<AtomicBool>,
    owned: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    peer_server: Option<PeerServer>,
}

impl Service {
    /// Starts the bridge thread, which connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`
    /// or the standard socket), serves the object and owns [`BUS_NAME`]; and, with
    /// `control_socket`, serves the same object peer-to-peer there ([`super::peer`]).
    pub fn start(
        sup: Handle,
        reloader: Option<Arc<Mutex<Reloader>>>,
        control_socket: Option<&Path>,
    ) -> std::io::Result<Service> {
        let stopping = Arc::new(AtomicBool::new(false));
        let owned = Arc::new(AtomicBool::new(false));
        let peers = Peers::default();
        let peer_server = control_socket.and_then(|path| {
            let (s, r, st) = (sup.clone(), reloader.clone(), stopping.clone());
            PeerServer::start(path, peers.clone(), move || Engine1::new(&s, &r, &st))
        });
        let (st, ow, s) = (stopping.clone(), owned.clone(), sup.clone());
        let thread =
            std::thread::Builder::new().name("aw-dbus".into()).spawn(move || bridge(s, reloader, st, ow, peers))?;
        Ok(Service { sup, stopping, owned, thread: Some(thread), peer_server })
    }

    /// The bus name is ours (systemd's READY waits for this).
    pub fn name_owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.sup.note_change();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // After the bridge announced `stopping` to the peers too.
        self.peer_server.take();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The system bus connection the bridge serves on, with what its checks need.
struct Bus {
    conn: zbus::blocking::Connection,
    driver: zbus::blocking::fdo::DBusProxy<'static>,
    last_check: Instant,
}

fn connect(sup: &Handle, reloader: &Option<Arc<Mutex<Reloader>>>, stopping: &Arc<AtomicBool>) -> zbus::Result<Bus> {
    // Our own calls (the bus check) give up after a while rather than hang on a wedged bus.
    let conn = zbus::blocking::connection::Builder::system()?
        .method_timeout(RETRY)
        .serve_at(OBJECT_PATH, Engine1::new(sup, reloader, stopping))?
        .name(BUS_NAME)?
        .build()?;
    let driver = zbus::blocking::fdo::DBusProxy::new(&conn)?;
    Ok(Bus { conn, driver, last_check: Instant::now() })
}

impl Bus {
    /// A round trip to the bus driver: fails once dbus-daemon is gone, or says who owns the
    /// name if it is not us any more.
    fn check(&self) -> Result<(), String> {
        let name: zbus::names::BusName<'_> = BUS_NAME.try_into().map_err(|e| format!("{BUS_NAME}: {e}"))?;
        match self.driver.get_name_owner(name) {
            Ok(owner) if self.conn.unique_name().is_some_and(|me| owner.as_str() == me.as_str()) => Ok(()),
            Ok(owner) => Err(format!("{BUS_NAME} is now owned by {owner}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What the bridge last announced.
#[derive(PartialEq, Clone, Copy)]
struct Announced {
    state: State,
    spare_ready: bool,
    primary_pid: u32,
    /// Changed by SetFrequency/SetGain, a reload (SIGHUP or D-Bus) or an in-process caller:
    /// announced from here, whoever changed them.
    frequency: f64,
    gain: f64,
}

/// The bridge thread: keeps the system bus connected (retrying every [`RETRY`] while it is
/// away) and sends Failover and PropertiesChanged to it and to every peer-to-peer client.
/// Event-driven: whoever changes what is announced notifies (the monitor, the output thread,
/// the control path, the event thread); RETRY bounds the sleep for the bus check.
fn bridge(
    sup: Handle,
    reloader: Option<Arc<Mutex<Reloader>>>,
    stopping: Arc<AtomicBool>,
    owned: Arc<AtomicBool>,
    peers: Peers,
) {
    // Subscribe before connecting, so no failover between the two is missed.
    let events = sup.subscribe();
    let mut link = BusLink { bus: None, warned: false, next_attempt: Instant::now(), owned };
    let mut last = Announced::now(&sup, &stopping);
    loop {
        if !stopping.load(Ordering::Acquire) {
            link.connect_if_due(&sup, &reloader, &stopping);
        }
        sup.wait_for_change(link.due().saturating_duration_since(Instant::now()));
        // Read after the wait: a stop notified before it is seen now.
        let stop = stopping.load(Ordering::Acquire);
        // The bus and every peer-to-peer client: each serves its own object.
        let targets: Vec<InterfaceRef<Engine1>> = link
            .bus
            .iter()
            .map(|b| b.conn.clone())
            .chain(peers.connections())
            .filter_map(|c| c.object_server().interface::<_, Engine1>(OBJECT_PATH).ok())
            .collect();
        if !emit_failovers(&events, &targets) {
            return;
        }
        let now = Announced::now(&sup, &stopping);
        if now != last {
            for t in &targets {
                if let Err(e) = zbus::block_on(announce_changes(t, now, last)) {
                    tracing::debug!("cannot emit PropertiesChanged: {e}");
                }
            }
            last = now;
            if !stop {
                std::thread::sleep(MIN_ANNOUNCE_GAP);
            }
        }
        if stop {
            // `stopping` was announced above.
            link.release();
            return;
        }
        link.check_if_due();
    }
}

/// Failover for each event queued since the last look; false once the supervisor is gone.
fn emit_failovers(events: &std::sync::mpsc::Receiver<Event>, targets: &[InterfaceRef<Engine1>]) -> bool {
    loop {
        match events.try_recv() {
            Ok(Event::Failover { old_pid, new_pid, detected_ns, failover_ns }) => {
                let ms = failover_ns.saturating_sub(detected_ns) as f64 / 1e6;
                for t in targets {
                    if let Err(e) = zbus::block_on(Engine1::failover(t.signal_emitter(), old_pid, new_pid, ms)) {
                        tracing::debug!("cannot emit Failover: {e}");
                    }
                }
            }
            Ok(_) => {}
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

/// The system bus side of the bridge: connected or waiting to retry.
struct BusLink {
    bus: Option<Bus>,
    /// The "unavailable" line was logged for this episode.
    warned: bool,
    next_attempt: Instant,
    owned: Arc<AtomicBool>,
}

impl BusLink {
    fn connect_if_due(&mut self, sup: &Handle, reloader: &Option<Arc<Mutex<Reloader>>>, stopping: &Arc<AtomicBool>) {
        if self.bus.is_some() || Instant::now() < self.next_attempt {
            return;
        }
        match connect(sup, reloader, stopping) {
            Ok(b) => {
                self.warned = false;
                self.owned.store(true, Ordering::Release);
                tracing::info!(BUS_NAME = BUS_NAME, "D-Bus API on the system bus as {BUS_NAME}");
                self.bus = Some(b);
            }
            Err(e) => {
                if !self.warned {
                    tracing::warn!(
                        BUS_NAME = BUS_NAME,
                        "D-Bus API unavailable on the system bus ({e}); playing on without it, retrying every {} s",
                        RETRY.as_secs()
                    );
                    self.warned = true;
                }
                self.next_attempt = Instant::now() + RETRY;
            }
        }
    }

    /// When the next check or connection attempt is due.
    fn due(&self) -> Instant {
        self.bus.as_ref().map_or(self.next_attempt, |b| b.last_check + RETRY)
    }

    /// Every RETRY, a round trip proves the bus and the name still ours; else connect again.
    fn check_if_due(&mut self) {
        let Some(b) = self.bus.as_mut() else { return };
        if b.last_check.elapsed() < RETRY {
            return;
        }
        b.last_check = Instant::now();
        if let Err(e) = b.check() {
            // The bus went away (dbus-daemon restarted): connect again.
            tracing::warn!(BUS_NAME = BUS_NAME, "lost the system bus ({e}); playing on, reconnecting");
            self.owned.store(false, Ordering::Release);
            self.bus = None;
            self.next_attempt = Instant::now();
        }
    }

    /// Stopping: release the name and disconnect.
    fn release(&mut self) {
        if let Some(b) = self.bus.take() {
            self.owned.store(false, Ordering::Release);
            let _ = b.conn.release_name(BUS_NAME);
        }
    }
}

impl Announced {
    fn now(sup: &Handle, stopping: &AtomicBool) -> Self {
        let control = sup.control();
        Announced {
            state: current_state(sup, stopping),
            spare_ready: sup.metrics_spare_ready(),
            primary_pid: sup.primary_pid(),
            frequency: control.frequency(),
            gain: control.gain(),
        }
    }
}

/// PropertiesChanged for each property that differs between `last` and `now`.
async fn announce_changes(iface: &InterfaceRef<Engine1>, now: Announced, last: Announced) -> zbus::Result<()> {
    let o = iface.get();
    let emitter = iface.signal_emitter();
    if now.state != last.state {
        o.state_changed(emitter).await?;
    }
    if now.spare_ready != last.spare_ready {
        o.spare_ready_changed(emitter).await?;
    }
    if now.primary_pid != last.primary_pid {
        o.primary_pid_changed(emitter).await?;
    }
    if now.frequency != last.frequency {
        o.frequency_changed(emitter).await?;
    }
    if now.gain != last.gain {
        o.gain_changed(emitter).await?;
    }
    Ok(())
}
