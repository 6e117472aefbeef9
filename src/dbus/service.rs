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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;

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

impl Engine1 {
    fn current_state(&self) -> State {
        if self.stopping.load(Ordering::Acquire) {
            State::Stopping
        } else {
            self.sup.state()
        }
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
/// name and ends the bridge thread.
pub struct Service {
    sup: Handle,
    stopping: Arc<AtomicBool>,
    owned: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    /// Starts the bridge thread, which connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`
    /// or the standard socket), serves the object and owns [`BUS_NAME`].
    pub fn start(sup: Handle, reloader: Option<Arc<Mutex<Reloader>>>) -> std::io::Result<Service> {
        let stopping = Arc::new(AtomicBool::new(false));
        let owned = Arc::new(AtomicBool::new(false));
        let (st, ow, s) = (stopping.clone(), owned.clone(), sup.clone());
        let thread = std::thread::Builder::new().name("aw-dbus".into()).spawn(move || bridge(s, reloader, st, ow))?;
        Ok(Service { sup, stopping, owned, thread: Some(thread) })
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
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn connect(
    sup: &Handle,
    reloader: &Option<Arc<Mutex<Reloader>>>,
    stopping: &Arc<AtomicBool>,
) -> zbus::Result<zbus::blocking::Connection> {
    let obj = Engine1 {
        sup: sup.clone(),
        reloader: reloader.clone(),
        stopping: stopping.clone(),
        log_limit: std::sync::Mutex::new((0, 0)),
    };
    // Our own calls (the bus check) give up after a while rather than hang on a wedged bus.
    zbus::blocking::connection::Builder::system()?
        .method_timeout(RETRY)
        .serve_at(OBJECT_PATH, obj)?
        .name(BUS_NAME)?
        .build()
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

fn bridge(sup: Handle, reloader: Option<Arc<Mutex<Reloader>>>, stopping: Arc<AtomicBool>, owned: Arc<AtomicBool>) {
    // Subscribe before connecting, so no failover between the two is missed.
    let events = sup.subscribe();
    let mut warned = false;
    while !stopping.load(Ordering::Acquire) {
        match connect(&sup, &reloader, &stopping) {
            Ok(conn) => {
                warned = false;
                owned.store(true, Ordering::Release);
                tracing::info!(BUS_NAME = BUS_NAME, "D-Bus API on the system bus as {BUS_NAME}");
                let lost = serve(&conn, &sup, &events, &stopping);
                owned.store(false, Ordering::Release);
                match lost {
                    // Stopping: release the name (announced `stopping` first) and disconnect.
                    None => {
                        let _ = conn.release_name(BUS_NAME);
                        return;
                    }
                    // The bus went away (dbus-daemon restarted): connect again.
                    Some(e) => {
                        tracing::warn!(BUS_NAME = BUS_NAME, "lost the system bus ({e}); playing on, reconnecting")
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        BUS_NAME = BUS_NAME,
                        "D-Bus API unavailable ({e}); playing on without it, retrying every {} s",
                        RETRY.as_secs()
                    );
                    warned = true;
                }
            }
        }
        let t0 = Instant::now();
        while t0.elapsed() < RETRY && !stopping.load(Ordering::Acquire) {
            sup.wait_for_change(RETRY.saturating_sub(t0.elapsed()));
            // Events are not announced while there is no bus; keep the queue short.
            while events.try_recv().is_ok() {}
        }
    }
}

/// Serves on `conn`: emits Failover for each event and PropertiesChanged for what changed,
/// and checks every [`RETRY`] that the bus is still there and the name still ours. Returns
/// None when stopping, or why the bus was lost.
fn serve(
    conn: &zbus::blocking::Connection,
    sup: &Handle,
    events: &std::sync::mpsc::Receiver<Event>,
    stopping: &AtomicBool,
) -> Option<String> {
    let iface = match conn.object_server().interface::<_, Engine1>(OBJECT_PATH) {
        Ok(i) => i,
        Err(e) => return Some(format!("D-Bus object missing after registration: {e}")),
    };
    let driver = match zbus::blocking::fdo::DBusProxy::new(conn) {
        Ok(d) => d,
        Err(e) => return Some(e.to_string()),
    };
    let name: zbus::names::BusName<'_> = match BUS_NAME.try_into() {
        Ok(n) => n,
        Err(e) => return Some(format!("{BUS_NAME}: {e}")),
    };
    let emitter = iface.signal_emitter().clone();
    let mut last = Announced::of(&iface);
    let mut last_check = Instant::now();
    loop {
        // Event-driven: whoever changes what is announced here notifies (the monitor, the
        // output thread, the control path, the event thread); RETRY bounds the sleep for the
        // bus check.
        sup.wait_for_change(RETRY.saturating_sub(last_check.elapsed()));
        // Read after the wait: a stop notified before it is seen now.
        let stop = stopping.load(Ordering::Acquire);
        loop {
            match events.try_recv() {
                Ok(Event::Failover { old_pid, new_pid, detected_ns, failover_ns }) => {
                    let ms = failover_ns.saturating_sub(detected_ns) as f64 / 1e6;
                    if let Err(e) = zbus::block_on(Engine1::failover(&emitter, old_pid, new_pid, ms)) {
                        tracing::warn!("cannot emit Failover: {e}");
                    }
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return None,
            }
        }
        let now = Announced::of(&iface);
        if now != last {
            if let Err(e) = zbus::block_on(announce_changes(&iface, &emitter, now, last)) {
                tracing::warn!("cannot emit PropertiesChanged: {e}");
            }
            last = now;
            if !stop {
                std::thread::sleep(MIN_ANNOUNCE_GAP);
            }
        }
        if stop {
            // `stopping` was announced above.
            return None;
        }
        if last_check.elapsed() >= RETRY {
            last_check = Instant::now();
            // A round trip to the bus driver: fails once dbus-daemon is gone.
            match driver.get_name_owner(name.clone()) {
                Ok(owner) if conn.unique_name().is_some_and(|me| owner.as_str() == me.as_str()) => {}
                Ok(owner) => return Some(format!("{BUS_NAME} is now owned by {owner}")),
                Err(e) => return Some(e.to_string()),
            }
        }
    }
}

impl Announced {
    fn of(iface: &zbus::blocking::object_server::InterfaceRef<Engine1>) -> Self {
        let o = iface.get();
        Announced {
            state: o.current_state(),
            spare_ready: o.spare_ready(),
            primary_pid: o.primary_pid(),
            frequency: o.frequency(),
            gain: o.gain(),
        }
    }
}

/// PropertiesChanged for each property that differs between `last` and `now`.
async fn announce_changes(
    iface: &zbus::blocking::object_server::InterfaceRef<Engine1>,
    emitter: &zbus::object_server::SignalEmitter<'_>,
    now: Announced,
    last: Announced,
) -> zbus::Result<()> {
    let o = iface.get();
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
