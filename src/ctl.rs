//! `audiowardenctl`: the command-line client. It speaks `org.audiowarden.Engine1` through the
//! same proxy as everyone else ([`crate::dbus`]).
//!
//! Exit codes: 0 success, 2 bad arguments, 3 service not reachable, 4 rejected by the service.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use zbus::zvariant::{OwnedValue, Value};

use crate::dbus::{Engine1ProxyBlocking, BUS_NAME};

pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_REJECTED: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "audiowardenctl",
    version,
    about = "Control and inspect the audiowarden service over D-Bus (system bus)"
)]
pub struct Cli {
    /// Talk to the daemon's peer-to-peer control socket at this path only (its
    /// --control-socket), not the system bus. Without it, the system bus is asked first and
    /// the default socket is the fallback where the bus cannot reach the service.
    #[arg(long, global = true, value_name = "PATH", env = "AUDIOWARDEN_CONTROL_SOCKET")]
    pub socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// Where the daemon serves its peer-to-peer control socket by default (`--control-socket`).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/audiowarden/control.sock";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// State, workers, tone, control latency, failovers, underruns, shared memory, CPU.
    Status {
        /// One JSON object, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Set the tone frequency in Hz (0 < HZ < sample_rate / 2).
    SetFrequency {
        #[arg(value_name = "HZ", allow_negative_numbers = true)]
        hz: f64,
    },
    /// Set the gain: linear 0..1, or in decibels with a dB suffix (e.g. -6dB).
    SetGain {
        #[arg(value_name = "G", allow_hyphen_values = true, value_parser = parse_gain)]
        gain: f64,
    },
    /// Every metric the service exports.
    Metrics {
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// In the Prometheus text exposition format (as the textfile collector reads it).
        #[arg(long)]
        prometheus: bool,
    },
    /// Show the status every second until Ctrl-C.
    Watch,
    /// Re-read the service's configuration file (like `systemctl reload audiowarden`): shows
    /// what was applied live and what needs a restart.
    Reload,
    /// The outputs this machine offers, with the --output value for each (as
    /// `audiowardend --list-outputs`; enumerated here, not asked of the service).
    Outputs,
}

/// A gain argument: `0.5` (linear) or `-6dB` / `-6 dB` (decibels, converted to linear).
pub fn parse_gain(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(db) = lower.strip_suffix("db") {
        let db: f64 = db.trim().parse().map_err(|_| format!("'{s}' is not a number of dB"))?;
        if db.is_nan() {
            return Err(format!("'{s}' is not a number of dB"));
        }
        return Ok(10f64.powf(db / 20.0));
    }
    t.parse::<f64>().map_err(|_| format!("'{s}' is neither a linear gain (0..1) nor a level in dB (e.g. -6dB)"))
}

/// Why a call failed, as the exit code tells it.
enum Failure {
    Unreachable(String),
    Rejected(String),
    /// Writing the output failed (not a closed pipe: that is the reader's choice).
    Output(std::io::Error),
}

/// Exit code when stdout cannot be written (a full disk, say).
pub const EXIT_OUTPUT: u8 = 1;

impl Failure {
    fn from_zbus(e: zbus::Error) -> Failure {
        use zbus::fdo::Error as F;
        const GONE: [&str; 5] = [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
            "org.freedesktop.DBus.Error.NoReply",
            "org.freedesktop.DBus.Error.Disconnected",
            "org.freedesktop.DBus.Error.TimedOut",
        ];
        match e {
            zbus::Error::MethodError(name, msg, _) => {
                let msg = msg.unwrap_or_else(|| name.to_string());
                if GONE.contains(&name.as_str()) {
                    Failure::Unreachable(msg)
                } else {
                    Failure::Rejected(msg)
                }
            }
            zbus::Error::FDO(f) => match *f {
                F::ServiceUnknown(m) | F::NameHasNoOwner(m) | F::NoReply(m) | F::Disconnected(m) | F::TimedOut(m) => {
                    Failure::Unreachable(m)
                }
                F::InvalidArgs(m) | F::AccessDenied(m) | F::AuthFailed(m) => Failure::Rejected(m),
                other => Failure::Rejected(other.to_string()),
            },
            // Transport: no bus, no socket, handshake refused.
            other => Failure::Unreachable(other.to_string()),
        }
    }

    fn report(self) -> ExitCode {
        match self {
            Failure::Unreachable(why) => {
                let bus = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
                    .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".into());
                eprintln!("audiowardenctl: cannot reach {BUS_NAME}: {why}");
                eprintln!("  bus: {bus}");
                eprintln!("  hint: systemctl status audiowarden; journalctl -u audiowarden");
                ExitCode::from(EXIT_UNREACHABLE)
            }
            Failure::Rejected(msg) => {
                eprintln!("audiowardenctl: rejected by the service: {msg}");
                ExitCode::from(EXIT_REJECTED)
            }
            Failure::Output(e) => {
                eprintln!("audiowardenctl: cannot write the output: {e}");
                ExitCode::from(EXIT_OUTPUT)
            }
        }
    }
}

/// The service: at `socket` if one is given; else on the system bus, or where no bus runs or
/// none has the service (a development run, no package policy), on the default control socket.
fn proxy(socket: Option<&Path>) -> Result<Engine1ProxyBlocking<'static>, Failure> {
    if let Some(path) = socket {
        return peer_proxy(path);
    }
    match bus_proxy() {
        Err(Failure::Unreachable(why)) => {
            let fallback = Path::new(DEFAULT_CONTROL_SOCKET);
            if std::fs::symlink_metadata(fallback).is_err() {
                return Err(Failure::Unreachable(format!("{why}; and no control socket at {DEFAULT_CONTROL_SOCKET}")));
            }
            peer_proxy(fallback).map_err(|e| match e {
                Failure::Unreachable(e2) => Failure::Unreachable(format!("{why}; and {e2}")),
                other => other,
            })
        }
        other => other,
    }
}

fn bus_proxy() -> Result<Engine1ProxyBlocking<'static>, Failure> {
    let conn = zbus::blocking::Connection::system().map_err(Failure::from_zbus)?;
    let driver = zbus::blocking::fdo::DBusProxy::new(&conn).map_err(Failure::from_zbus)?;
    let name = zbus::names::BusName::try_from(BUS_NAME).map_err(|e| Failure::Unreachable(e.to_string()))?;
    if !driver.name_has_owner(name).map_err(|e| Failure::from_zbus(e.into()))? {
        return Err(Failure::Unreachable(format!("{BUS_NAME} is not on the system bus")));
    }
    Engine1ProxyBlocking::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .map_err(Failure::from_zbus)
}

/// Peer-to-peer D-Bus on the daemon's control socket.
fn peer_proxy(path: &Path) -> Result<Engine1ProxyBlocking<'static>, Failure> {
    let stream = UnixStream::connect(path)
        .map_err(|e| Failure::Unreachable(format!("cannot connect to the control socket {}: {e}", path.display())))?;
    let conn = zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .p2p()
        .build()
        .map_err(|e| Failure::Unreachable(format!("control socket {}: {e}", path.display())))?;
    Engine1ProxyBlocking::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .map_err(Failure::from_zbus)
}

/// What `status` shows: the properties plus the metrics.
struct Status {
    state: String,
    frequency: f64,
    gain: f64,
    metrics: HashMap<String, OwnedValue>,
}

fn fetch(p: &Engine1ProxyBlocking<'_>) -> Result<Status, Failure> {
    let f = Failure::from_zbus;
    Ok(Status {
        state: p.state().map_err(f)?,
        frequency: p.frequency().map_err(f)?,
        gain: p.gain().map_err(f)?,
        metrics: p.get_metrics().map_err(f)?,
    })
}

/// A metric as JSON (numbers stay numbers, of their D-Bus type).
fn to_json(v: &Value<'_>) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Str(s) => json!(s.as_str()),
        other => json!(other.to_string()),
    }
}

fn metrics_json(m: &HashMap<String, OwnedValue>) -> serde_json::Map<String, serde_json::Value> {
    m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect::<BTreeMap<_, _>>().into_iter().collect()
}

fn num(m: &HashMap<String, OwnedValue>, k: &str) -> f64 {
    match m.get(k).map(|v| &**v) {
        Some(Value::U32(x)) => *x as f64,
        Some(Value::U64(x)) => *x as f64,
        Some(Value::F64(x)) => *x,
        _ => f64::NAN,
    }
}

fn flag(m: &HashMap<String, OwnedValue>, k: &str) -> bool {
    matches!(m.get(k).map(|v| &**v), Some(Value::Bool(true)))
}

/// A count that stays short: 999999, then 1.0M, 1.0G, 1.0T.
fn count(x: f64) -> String {
    match x {
        x if x.is_nan() => "?".into(),
        x if x < 1e6 => format!("{x}"),
        x if x < 1e9 => format!("{:.1}M", x / 1e6),
        x if x < 1e12 => format!("{:.1}G", x / 1e9),
        x => format!("{:.1}T", x / 1e12),
    }
}

fn db(gain: f64) -> String {
    if gain > 0.0 {
        format!("{:+.1} dB", 20.0 * gain.log10())
    } else {
        "-inf dB".into()
    }
}

/// The human status screen: aligned, at most 80 columns, colour only on a terminal.
fn render_status(s: &Status, colour: bool) -> String {
    let paint = |code: &str, text: &str| if colour { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() };
    let state = match s.state.as_str() {
        "running" => paint("1;32", &s.state),
        "degraded" | "starting" => paint("1;33", &s.state),
        _ => paint("1;31", &s.state),
    };
    let (sr, up) = (num(&s.metrics, "sample_rate"), num(&s.metrics, "uptime_s") as u64);
    let mut out = format!("audiowarden {state}  (up {}h {:02}m {:02}s, {} Hz)\n", up / 3600, up / 60 % 60, up % 60, sr);
    for (label, value) in activity_lines(s).into_iter().chain(health_lines(&s.metrics, &paint)) {
        out.push_str(&format!("  {label:<11} {value}\n"));
    }
    out
}

/// What it plays, who renders it and what control it took.
fn activity_lines(s: &Status) -> Vec<(&'static str, String)> {
    let m = &s.metrics;
    let ms = |samples: f64| samples * 1000.0 / num(m, "sample_rate");
    let pid = |k: &str| match num(m, k) as u64 {
        0 => "none".to_owned(),
        p => p.to_string(),
    };
    let (p95, p99) = (num(m, "control_latency_p95_samples"), num(m, "control_latency_p99_samples"));
    vec![
        ("tone", format!("{:.1} Hz, gain {:.3} ({})", s.frequency, s.gain, db(s.gain))),
        (
            "workers",
            format!(
                "primary {}, spare {} ({}), reserve {}",
                pid("primary_pid"),
                pid("spare_pid"),
                if flag(m, "spare_ready") { "ready" } else { "not ready" },
                pid("reserve_pid")
            ),
        ),
        (
            "control",
            format!(
                "{} received, {} applied, {} coalesced, {} rejected",
                count(num(m, "control_received")),
                count(num(m, "control_applied")),
                count(num(m, "control_coalesced")),
                count(num(m, "control_rejected"))
            ),
        ),
        ("latency", format!("p95 {p95} samples ({:.2} ms), p99 {p99} samples ({:.2} ms)", ms(p95), ms(p99))),
    ]
}

/// How well it has held up: failovers, rebuilds, underruns, leaks, real-time. Trouble is red.
fn health_lines(m: &HashMap<String, OwnedValue>, paint: &dyn Fn(&str, &str) -> String) -> Vec<(&'static str, String)> {
    let red_if = |bad: bool, text: String| if bad { paint("1;31", &text) } else { text };
    let (underruns, leaks) = (num(m, "underruns"), num(m, "shm_leaks"));
    vec![
        (
            "failovers",
            format!(
                "{}, last {:.3} ms, p99 {:.3} ms (crashes {})",
                count(num(m, "failover_count")),
                num(m, "failover_time_ms"),
                num(m, "failover_time_ms_p99"),
                count(num(m, "crash_count"))
            ),
        ),
        (
            "rebuilds",
            format!(
                "{}, last {:.3} ms, p99 {:.3} ms",
                count(num(m, "replacements")),
                num(m, "rebuild_time_ms"),
                num(m, "rebuild_time_ms_p99")
            ),
        ),
        (
            "underruns",
            format!(
                "{} in {} frames played",
                red_if(underruns > 0.0, count(underruns)),
                count(num(m, "frames_played"))
            ),
        ),
        ("shm", format!("{} segments, {}", num(m, "shm_segments"), red_if(leaks > 0.0, format!("{leaks} leaks")))),
        (
            "realtime",
            format!(
                "{}, cpu {:.1} %",
                if flag(m, "realtime") { "yes" } else { "no (SCHED_FIFO refused)" },
                num(m, "cpu_percent")
            ),
        ),
    ]
}

fn status_json(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "state": s.state,
        "frequency": s.frequency,
        "gain": s.gain,
        "metrics": metrics_json(&s.metrics),
    })
}

/// A write to stdout: a closed pipe ends the output quietly (`| head`), anything else fails.
fn emit(out: &mut impl Write, text: &str) -> Result<(), Failure> {
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure::Output(e)),
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut stdout = std::io::stdout();
    // Every command but `outputs` talks to the daemon.
    let socket = cli.socket.as_deref();
    let mut p = match cli.command {
        Command::Outputs => return emit(&mut stdout, &crate::output::outputs_text()),
        _ => proxy(socket)?,
    };
    let f = Failure::from_zbus;
    match cli.command {
        Command::Status { json } => {
            let s = fetch(&p)?;
            if json {
                emit(&mut stdout, &format!("{}\n", status_json(&s)))?;
            } else {
                let tty = stdout.is_terminal();
                emit(&mut stdout, &render_status(&s, tty))?;
            }
        }
        Command::SetFrequency { hz } => p.set_frequency(hz).map_err(f)?,
        Command::SetGain { gain } => p.set_gain(gain).map_err(f)?,
        Command::Metrics { prometheus: true, .. } => emit(&mut stdout, &p.get_metrics_prometheus().map_err(f)?)?,
        Command::Metrics { json, .. } => {
            let m = p.get_metrics().map_err(f)?;
            let sorted = metrics_json(&m);
            if json {
                emit(&mut stdout, &format!("{}\n", serde_json::Value::Object(sorted)))?;
            } else {
                let width = sorted.keys().map(String::len).max().unwrap_or(0);
                let text: String = sorted.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect();
                emit(&mut stdout, &text)?;
            }
        }
        Command::Reload => {
            let (applied, needs_restart, refused) = p.reload().map_err(f)?;
            emit(&mut stdout, &reload_text(&applied, &needs_restart, &refused))?;
        }
        Command::Outputs => {} // answered above, without the daemon
        Command::Watch => {
            let tty = stdout.is_terminal();
            loop {
                let screen = match fetch(&p) {
                    Ok(s) => render_status(&s, tty),
                    Err(Failure::Unreachable(why) | Failure::Rejected(why)) => {
                        // A restarted daemon is a new peer on its socket: connect again.
                        if let Ok(again) = proxy(socket) {
                            p = again;
                        }
                        format!("audiowarden: not reachable ({why})\n")
                    }
                    Err(Failure::Output(e)) => return Err(Failure::Output(e)),
                };
                let clear = if tty { "\x1b[H\x1b[2J" } else { "" };
                emit(&mut stdout, &format!("{clear}{screen}"))?;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

fn reload_text(applied: &[String], needs_restart: &[String], refused: &[String]) -> String {
    let list = |l: &[String]| if l.is_empty() { "none".to_owned() } else { l.join(", ") };
    let mut text = format!("applied: {}\nneeds a restart: {}\n", list(applied), list(needs_restart));
    for r in refused {
        text += &format!("refused: {r}\n");
    }
    text
}

/// The whole CLI; `main` of `audiowardenctl`.
pub fn main() -> ExitCode {
    // clap exits with 2 on bad arguments (and 0 for --help/--version).
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_fit_80_columns() {
        let text = crate::output::outputs_text();
        assert!(text.starts_with("virtual "));
        for l in text.lines() {
            assert!(l.chars().count() <= 80, "{} columns: {l}", l.chars().count());
        }
    }

    #[test]
    fn gain_accepts_linear_and_decibels() {
        assert_eq!(parse_gain("0.5"), Ok(0.5));
        assert!((parse_gain("-6dB").unwrap() - 0.501187).abs() < 1e-5);
        assert!((parse_gain("-6 dB").unwrap() - 0.501187).abs() < 1e-5);
        assert_eq!(parse_gain("0dB"), Ok(1.0));
        assert!(parse_gain("loud").is_err());
        assert!(parse_gain("xdB").is_err());
    }

    #[test]
    fn status_fits_80_columns_and_has_no_colour_off_a_terminal() {
        let m = crate::dbus::metrics_dict(&crate::MetricsSnapshot {
            primary_pid: 4_000_000,
            spare_pid: 4_000_001,
            reserve_pid: 4_000_002,
            control_received: 1_000_000_000,
            crash_count: 5_000_000_000,
            underruns: 123_456_789_012,
            control_applied: 1_000_000_000,
            control_coalesced: 1_000_000,
            control_rejected: 1_000_000,
            frames_played: u64::MAX / 2,
            sample_rate: 48_000,
            block_frames: 64,
            ..Default::default()
        });
        let s = Status { state: "degraded".into(), frequency: 23_999.9, gain: 0.0, metrics: m };
        let plain = render_status(&s, false);
        for l in plain.lines() {
            assert!(l.chars().count() <= 80, "{} columns: {l}", l.chars().count());
        }
        assert!(!plain.contains('\x1b'));
        assert!(render_status(&s, true).contains("\x1b[1;33mdegraded"));
    }
}
