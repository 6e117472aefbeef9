//! `audiowardend`: the supervisor daemon, or (with `--worker`, internal) a worker process.

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
    let config = match audiowarden::config_file::load(std::env::args_os()) {
        Ok(c) => c,
        // Bad flags, --help, --version: clap prints and exits (2 for errors, 0 otherwise).
        Err(audiowarden::config_file::LoadError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("audiowardend: {}", e.to_string().trim_end());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if config.list_outputs {
        list_outputs();
        return ExitCode::SUCCESS;
    }
    audiowarden::logging::init();
    if let Err(e) = config.validate() {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Signals are taken synchronously by this thread; every thread started later inherits
    // the mask (workers get a clean mask at spawn).
    let sigs = block_signals();
    let started_with = config.clone();
    let sup = match Supervisor::start(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    // SIGHUP and the D-Bus Reload method share one reloader (one reload at a time).
    let reloader = Arc::new(Mutex::new(Reloader::new(std::env::args_os().collect(), started_with, sup.handle())));
    // The D-Bus API; the audio does not depend on it (it retries if the bus is away).
    let service = match audiowarden::dbus::service::Service::start(sup.handle(), Some(reloader.clone())) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("cannot start the D-Bus thread: {e}");
            None
        }
    };
    let handle = sup.handle();
    let mut notifier = audiowarden::notify::Notifier::new();
    if let Some(w) = notifier.watchdog() {
        tracing::info!("systemd watchdog every {w:?}: pinged while the output advances and the monitor turns");
    }
    let summary_every = Duration::from_secs(10);
    let mut last_summary = std::time::Instant::now();
    loop {
        match wait_signal(&sigs, notifier.interval()) {
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
        if last_summary.elapsed() < summary_every {
            continue;
        }
        last_summary = std::time::Instant::now();
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
    // Announce `stopping` (to systemd and on the bus) and release the name before the audio
    // stops.
    notifier.stopping();
    drop(service);
    match sup.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stopping: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--list-outputs`: what can be given to --output on this machine.
fn list_outputs() {
    use std::io::Write;
    // A closed pipe (`| head`) is fine; nothing else can go wrong that we could report.
    let _ = std::io::stdout().write_all(audiowarden::output::outputs_text().as_bytes());
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask on the
    // calling thread with a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of the blocked signals; returns it if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: a valid set and timespec; no siginfo requested.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}
