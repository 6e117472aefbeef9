//! `audiowardend`: the supervisor daemon, or (with `--worker`, internal) a worker process.

#![deny(unsafe_code)]
// Short functions (the threshold is in clippy.toml); `cargo clippy -D warnings` enforces it.
#![warn(clippy::too_many_lines)]

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use audiowarden::reload::Reloader;
use audiowarden::Supervisor;

/// Exit codes a unit file can name (e.g. in RestartPreventExitStatus=).
const EXIT_CONFIG: u8 = 2;
const EXIT_START: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        // The worker role: no logging framework, no clap; it must stay small.
        return ExitCode::from(audiowarden::worker::main(&args[2..]) as u8);
    }
    let config = match load_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Sockets systemd passed (the OSC socket units), taken before any thread starts.
    let activated: Vec<std::os::fd::RawFd> = sd_notify::listen_fds().map(Iterator::collect).unwrap_or_default();
    // Signals are taken synchronously by this thread; every thread started later inherits
    // the mask (workers get a clean mask at spawn).
    let sigs = audiowarden::sys::BlockedSignals::block_term_int_hup();
    let mut notifier = audiowarden::notify::Notifier::new();
    let sup = match start_when_there_is_room(&config, &sigs, &mut notifier) {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::SUCCESS, // stopped while waiting
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    serve(&sup, config, &activated, &sigs, &mut notifier);
    match sup.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stopping: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration from the flags and files, validated; the one-shot modes
/// (`--check-config`, `--list-outputs`) end here with their exit code. Logging is set up
/// once the daemon is going to run.
fn load_config() -> Result<audiowarden::Config, ExitCode> {
    let config = match audiowarden::config_file::load(std::env::args_os()) {
        Ok(c) => c,
        // Bad flags, --help, --version: clap prints and exits (2 for errors, 0 otherwise).
        Err(audiowarden::config_file::LoadError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("audiowardend: {}", e.to_string().trim_end());
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    if config.check_config {
        println!("configuration OK");
        return Err(ExitCode::SUCCESS);
    }
    if config.list_outputs {
        list_outputs();
        return Err(ExitCode::SUCCESS);
    }
    audiowarden::logging::init();
    if let Err(e) = config.validate() {
        tracing::error!("{e}");
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(config)
}

/// The main thread while the daemon runs: takes the signals (SIGHUP reloads, SIGTERM and
/// SIGINT stop), pings systemd's watchdog and logs a summary every 10 s. Returns once
/// stopping has been announced and the D-Bus name released, before the audio stops.
fn serve(
    sup: &Supervisor,
    started_with: audiowarden::Config,
    activated: &[std::os::fd::RawFd],
    sigs: &audiowarden::sys::BlockedSignals,
    notifier: &mut audiowarden::notify::Notifier,
) {
    // OSC, the engine's original control path (none of it on the audio path either).
    let osc_sockets = audiowarden::osc::open(&started_with, activated);
    // The D-Bus API peer-to-peer too, for a run that no bus can reach.
    let control_socket =
        (started_with.control_socket != "none").then(|| std::path::PathBuf::from(&started_with.control_socket));
    // SIGHUP and the D-Bus Reload method share one reloader (one reload at a time).
    let reloader = Arc::new(Mutex::new(Reloader::new(std::env::args_os().collect(), started_with, sup.handle())));
    // The D-Bus API; the audio does not depend on it (it retries if the bus is away).
    let service = match audiowarden::dbus::service::Service::start(
        sup.handle(),
        Some(reloader.clone()),
        control_socket.as_deref(),
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot start the D-Bus thread: {e}");
            None
        }
    };
    let osc = audiowarden::osc::OscServer::start(sup.handle(), osc_sockets).unwrap_or_else(|e| {
        tracing::error!("cannot start the OSC thread: {e}");
        None
    });
    let handle = sup.handle();
    if let Some(w) = notifier.watchdog() {
        tracing::info!("systemd watchdog every {w:?}: pinged while the output advances and the monitor turns");
    }
    let summary_every = Duration::from_secs(10);
    let mut last_summary = std::time::Instant::now();
    loop {
        match sigs.wait(notifier.interval()) {
            Some(libc::SIGHUP) => {
                tracing::info!("SIGHUP: reloading the configuration");
                notifier.reloading();
                // Logged by the reloader, success or not; a bad file keeps the settings in force.
                let _ = reloader.lock().unwrap_or_else(|p| p.into_inner()).reload_and_log();
                notifier.reloaded();
            }
            Some(sig) => {
                tracing::info!("signal {sig}: stopping");
                break;
            }
            None => {}
        }
        notifier.tick(&handle, service.as_ref().is_some_and(|s| s.name_owned()));
        if last_summary.elapsed() >= summary_every {
            last_summary = std::time::Instant::now();
            log_summary(sup);
        }
    }
    // Announce `stopping` (to systemd and on the bus) and release the name before the audio
    // stops.
    notifier.stopping();
    drop(osc);
    drop(service);
}

/// The periodic one-line story for journalctl.
fn log_summary(sup: &Supervisor) {
    let m = sup.metrics();
    tracing::info!(
        "playing {:.1} Hz gain {:.2}; primary {} spare {} ({}); crashes {} replacements {}; failover p99 {:.3} ms; underruns {}; shm leaks {}; cpu {:.1}%",
        sup.control().frequency(),
        sup.control().gain(),
        m.primary_pid,
        m.spare_pid,
        if m.spare_ready { "ready" } else { "not ready" },
        m.crash_count,
        m.replacements,
        m.failover_time_ms.p99,
        m.underruns,
        m.shm_leaks,
        m.cpu_percent
    );
}

/// Starts the supervisor. A full shm file system (/dev/shm is world-writable: anyone can fill
/// it) is not fatal: one line says so, and the start is retried with backoff (up to 5 s)
/// until there is room, telling systemd we are alive and still starting. None if a signal
/// stopped the wait.
fn start_when_there_is_room(
    config: &audiowarden::Config,
    sigs: &audiowarden::sys::BlockedSignals,
    notifier: &mut audiowarden::notify::Notifier,
) -> Result<Option<Supervisor>, audiowarden::StartError> {
    let mut backoff = Duration::from_millis(100);
    let mut waiting_since: Option<std::time::Instant> = None;
    loop {
        match Supervisor::start(config.clone()) {
            Ok(s) => {
                if let Some(t) = waiting_since {
                    tracing::info!(
                        "there is room in {} again: started after waiting {:.1} s",
                        config.shm_dir.display(),
                        t.elapsed().as_secs_f64()
                    );
                }
                return Ok(Some(s));
            }
            Err(e) if e.is_no_space() => {
                if waiting_since.is_none() {
                    waiting_since = Some(std::time::Instant::now());
                    tracing::error!(
                        SHM_DIR = %config.shm_dir.display(),
                        "cannot start: {e}: the shared-memory file system is full; waiting for room, retrying every few seconds"
                    );
                }
                notifier
                    .still_starting(&format!("waiting for room in {} (full)", config.shm_dir.display()), backoff * 2);
                if let Some(sig) = sigs.wait(backoff) {
                    tracing::info!("signal {sig}: stopping before the start");
                    return Ok(None);
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `--list-outputs`: what can be given to --output on this machine.
fn list_outputs() {
    use std::io::Write;
    // A closed pipe (`| head`) is fine; nothing else can go wrong that we could report.
    let _ = std::io::stdout().write_all(audiowarden::output::outputs_text().as_bytes());
}
