//! A paced ALSA playback device without a sound card, for tests of the ALSA output: a jackd2
//! dummy-backend server of the test's own (tests/support/with-jackd.sh) and an alsa-lib
//! config with three PCMs:
//!
//! - `awjack`: `plug` in front of the JACK plugin; paced by jackd's timer like a card;
//! - `awcapture`: a `file` plugin in front of `awjack`: plays paced and records what the
//!   client wrote, headerless, in the client's sample format, to [`JackServer::capture_path`]
//!   (a second open of the PCM records to `capture.raw.0001`, see [`JackServer::capture_paths`]);
//! - `awjack_raw`: the JACK plugin itself (FLOAT_LE only).
//!
//! A child process reaches them with [`JackServer::env`] set (`Command::envs`). JACK period:
//! 64 frames at 48 kHz, so a writer gets 64-frame periods and a 256-frame buffer if it asks.
//! Needs root (SCHED_FIFO) and the packages jackd2, libasound2-plugins, alsa-utils.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// tests/support/with-jackd.sh.
pub fn jack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/with-jackd.sh")
}

/// A running jackd (dummy backend, 48 kHz, 64-frame periods, SCHED_FIFO 70) with a name of
/// its own, so that concurrent tests and test runs do not share it. Stopped (by PID) and its
/// files in /dev/shm removed on drop; a watchdog does the same if the test process dies first.
pub struct JackServer {
    pub dir: tempfile::TempDir,
    /// The JACK server name (the clients' JACK_DEFAULT_SERVER).
    pub name: String,
    pub jackd_pid: u32,
    stopped: bool,
    realtime: bool,
}

impl JackServer {
    /// Starts the server (64-frame JACK periods); returns once a client can connect. Panics
    /// with jackd.log on failure.
    pub fn start() -> JackServer {
        JackServer::start_with_period(64)
    }

    /// Like [`JackServer::start`] with another JACK period (frames). ALSA periods are then
    /// whole multiples of it.
    pub fn start_with_period(period_frames: u32) -> JackServer {
        JackServer::start_with(period_frames, true)
    }

    /// Like [`JackServer::start_with_period`]; `realtime: false` runs `jackd -r` (no
    /// SCHED_FIFO for the driver or the clients' JACK threads).
    pub fn start_with(period_frames: u32, realtime: bool) -> JackServer {
        let dir = tempfile::Builder::new().prefix("aw-test-jack-").tempdir().expect("tempdir");
        let mut server = JackServer { dir, name: String::new(), jackd_pid: 0, stopped: true, realtime };
        server.launch(period_frames);
        server
    }

    /// Starts the server again after [`JackServer::stop`], under the same name and with the
    /// same client configuration (a device coming back).
    pub fn restart(&mut self) {
        assert!(self.stopped, "restart: the server still runs");
        self.launch(64);
    }

    fn launch(&mut self, period_frames: u32) {
        let dir = &self.dir;
        let out = Command::new("bash")
            .arg(jack_script())
            .arg("start")
            .arg(dir.path())
            .env("AW_JACK_OWNER_PID", std::process::id().to_string())
            .env("AW_JACK_PERIOD", period_frames.to_string())
            .env("AW_JACK_REALTIME", if self.realtime { "1" } else { "0" })
            .stdin(Stdio::null())
            .output()
            .expect("run tests/support/with-jackd.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.path().join("jackd.log")).unwrap_or_default();
            panic!("jackd failed to start ({})\n--- stderr ---\n{stderr}\n--- jackd.log ---\n{log}", out.status);
        }
        if !stderr.trim().is_empty() {
            eprintln!("with-jackd.sh: {}", stderr.trim());
        }
        let pid = std::fs::read_to_string(dir.path().join("jackd.pid")).expect("jackd.pid");
        self.jackd_pid = pid.trim().parse().expect("jackd.pid");
        self.stopped = false;
        self.name =
            self.env().into_iter().find(|(k, _)| k == "JACK_DEFAULT_SERVER").expect("JACK_DEFAULT_SERVER in env").1;
    }

    /// The variables a client process needs (XDG_CONFIG_HOME pointing at the alsa-lib config,
    /// JACK_DEFAULT_SERVER, JACK_NO_START_SERVER), from DIR/env.
    pub fn env(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.path().join("env")).expect("jack env file");
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Where `awcapture` records the first opening's audio (raw, the client's format).
    pub fn capture_path(&self) -> PathBuf {
        self.dir.path().join("capture.raw")
    }

    /// Every recording of `awcapture`, one per opening of the PCM, in order: capture.raw,
    /// capture.raw.0001, capture.raw.0002, ... (the file plugin never truncates here).
    pub fn capture_paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("read jack dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("capture.raw")))
            .collect();
        v.sort();
        v
    }

    /// A capture read as interleaved FLOAT_LE samples (a client that wrote floats).
    pub fn read_f32(path: &Path) -> Vec<f32> {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// A capture read as interleaved S16_LE samples (a client that wrote S16).
    pub fn read_s16(path: &Path) -> Vec<i16> {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect()
    }

    /// jackd's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jackd.log")).unwrap_or_default()
    }

    /// JACK-level xruns jackd logged so far: its timer woke late ("JackTimedDriver::Process
    /// XRun") or a client was late ("JackEngine::XRun: client ... was not finished"). ALSA
    /// clients are not told of these (they get EPIPE only when their own buffer runs dry). A
    /// few appear under CPU load at 64-frame periods; a client killed while playing causes a
    /// burst, and a stopped (SIGSTOP) one about one per period until it goes on.
    pub fn xruns_in_log(&self) -> usize {
        self.log().lines().filter(|l| l.contains("XRun")).count()
    }

    /// Stops jackd now (drop does it otherwise) and removes its files in /dev/shm. Idempotent.
    pub fn stop(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        super::stop_support_script("with-jackd.sh", self.dir.path())
    }
}

impl Drop for JackServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            // No panic in drop (it may run while unwinding): say it loudly instead.
            eprintln!("WARNING: {e}");
        }
    }
}
