//! systemd integration (Type=notify): READY, STATUS, WATCHDOG and STOPPING, sent from the
//! daemon's main thread. Without $NOTIFY_SOCKET (not started by systemd) every call is a
//! no-op.
//!
//! - READY=1 once the bus name is owned, the primary is playing and the standby is ready:
//!   "active (running)" then means "a crash now is inaudible and clients can reach us".
//! - WATCHDOG=1 only while the output position advances and the monitor thread turns: a
//!   daemon that is alive but plays nothing, or whose supervisor is wedged, stops pinging and
//!   systemd restarts it (WatchdogSec=). The main thread sends the pings, so a wedged main
//!   thread counts as well.
//! - STATUS= a one-line summary, sent when it changes.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::supervisor::{Handle, State};

/// What the main loop needs to know from one look at the daemon.
pub struct Notifier {
    watchdog: Option<Duration>,
    ready: bool,
    status: String,
    last_position: u64,
    last_monitor_ticks: u64,
    /// When the output position and the monitor were last both seen moving.
    last_progress: Instant,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    pub fn new() -> Notifier {
        Notifier {
            watchdog: sd_notify::watchdog_enabled(),
            ready: false,
            status: String::new(),
            last_position: 0,
            last_monitor_ticks: 0,
            last_progress: Instant::now(),
        }
    }

    /// How long the main loop may sleep between calls to [`Notifier::tick`]: a quarter of the
    /// watchdog period (so one late wake-up does not cost a restart), at most one second.
    pub fn interval(&self) -> Duration {
        self.watchdog
            .map_or(Duration::from_secs(1), |w| (w / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Looks at the daemon and tells systemd what it sees. `bus_owned`: the D-Bus name is ours.
    pub fn tick(&mut self, sup: &Handle, bus_owned: bool) {
        let state = sup.state();
        if !self.ready && bus_owned && state == State::Running {
            self.ready = true;
            self.send(&[NotifyState::Ready]);
        }
        let status = status_line(sup, state, bus_owned);
        if status != self.status {
            self.send(&[NotifyState::Status(&status)]);
            self.status = status;
        }
        if self.watchdog.is_some() && self.alive(sup) {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// The output position and the monitor have both moved within half a watchdog period.
    /// Each is compared with what it was when both last moved, so an early extra look (a
    /// signal waking the main loop) cannot miss progress.
    fn alive(&mut self, sup: &Handle) -> bool {
        let (pos, ticks) = (sup.position_frames(), sup.monitor_ticks());
        if pos > self.last_position && ticks > self.last_monitor_ticks {
            self.last_position = pos;
            self.last_monitor_ticks = ticks;
            self.last_progress = Instant::now();
        }
        let window = self.watchdog.map_or(Duration::from_secs(1), |w| w / 2);
        self.last_progress.elapsed() < window
    }

    /// Still starting (e.g. waiting for room in a full shm file system): STATUS=`status`,
    /// more start-up time (EXTEND_TIMEOUT_USEC, so TimeoutStartSec does not fail the unit
    /// while there is nothing wrong with us), and a watchdog ping (systemd runs the watchdog
    /// from the start on).
    pub fn still_starting(&mut self, status: &str, for_at_least: Duration) {
        let usec = u32::try_from(for_at_least.as_micros()).unwrap_or(u32::MAX);
        let mut states = vec![NotifyState::Status(status), NotifyState::ExtendTimeoutUsec(usec)];
        if self.watchdog.is_some() {
            states.push(NotifyState::Watchdog);
        }
        self.send(&states);
        self.status = status.to_owned();
    }

    /// RELOADING=1 (with the monotonic time systemd asks for) before a reload; systemd shows
    /// the unit reloading until [`Notifier::reloaded`]. Nothing before the first READY=1.
    pub fn reloading(&mut self) {
        if self.ready {
            match NotifyState::monotonic_usec_now() {
                Ok(now) => self.send(&[NotifyState::Reloading, now]),
                Err(e) => tracing::warn!("sd_notify: no monotonic time for RELOADING=1: {e}"),
            }
        }
    }

    /// READY=1 again after a reload (whether or not it changed anything).
    pub fn reloaded(&mut self) {
        if self.ready {
            self.send(&[NotifyState::Ready]);
        }
    }

    /// STOPPING=1, before the audio stops.
    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

/// "playing 440.0 Hz, gain 0.25, spare ready, 3 failovers, last 0.41 ms".
pub fn status_line(sup: &Handle, state: State, bus_owned: bool) -> String {
    let m = sup.metrics();
    let c = sup.control();
    let what = match state {
        State::Starting => "starting".to_owned(),
        State::Stopping => "stopping".to_owned(),
        State::Running | State::Degraded => format!("playing {:.1} Hz, gain {:.2}", c.frequency(), c.gain()),
    };
    let spare = if m.spare_ready { "spare ready" } else { "no spare ready" };
    let n = m.failover_time_ms.count;
    let failovers = match n {
        0 => "no failovers".to_owned(),
        1 => format!("1 failover, {:.2} ms", m.failover_time_ms.last),
        n => format!("{n} failovers, last {:.2} ms", m.failover_time_ms.last),
    };
    let mut line = format!("{what}, {spare}, {failovers}");
    if m.underruns > 0 {
        line.push_str(&format!(", {} underruns", m.underruns));
    }
    if !bus_owned {
        line.push_str(", D-Bus name not owned");
    }
    line
}
