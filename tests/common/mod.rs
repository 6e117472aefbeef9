//! Shared helpers of the integration tests: a supervisor configured for a private shm dir
//! and the real worker binary, waiting, killing, and comparing a capture with the reference.
#![allow(dead_code)]

pub mod bus;
pub mod jack;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use audiowarden::engine::{render_reference, ControlMsg, CHANNELS};
use audiowarden::output::wav::read_f32_wav;
use audiowarden::{Config, MetricsSnapshot, OutputSpec, StandbyMode, Supervisor};

/// The supervisor's log (worker deaths, hangs, failovers) into the test's captured output,
/// which the harness prints when the test fails.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
}

/// A worker executable in `dir` for crash-loop tests: the real worker for the first three
/// starts (the first primary, spare and reserve), then one that exits 1 at once. The start
/// tickets are taken atomically (mkdir): the workers start concurrently.
pub fn crash_loop_worker(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("crash-loop-worker.sh");
    let t = dir.join("ticket");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif mkdir '{t}.1' 2>/dev/null || mkdir '{t}.2' 2>/dev/null || mkdir '{t}.3' 2>/dev/null; then exec '{w}' \"$@\"; fi\nexit 1\n",
            t = t.display(),
            w = env!("CARGO_BIN_EXE_audiowardend")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A unique shm dir under /dev/shm, removed on drop if the supervisor left anything.
pub struct ShmDir(pub PathBuf);

impl ShmDir {
    pub fn new(tag: &str) -> ShmDir {
        let p = PathBuf::from(format!("/dev/shm/aw-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        ShmDir(p)
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn config(shm: &ShmDir, output: OutputSpec, standby: StandbyMode, freq: f64, gain: f64) -> Config {
    capture_logs();
    Config {
        shm_dir: shm.0.clone(),
        output,
        standby,
        frequency: freq,
        gain,
        worker_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_audiowardend"))),
        ..Config::default()
    }
}

pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until_every(what, timeout, Duration::from_millis(1), cond)
}

/// [`wait_until`], checking every `every` (for checks that run a process).
pub fn wait_until_every(what: &str, timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(every);
    }
}

pub fn signal(pid: u32, sig: i32) {
    assert!(pid > 0, "no such worker");
    // SAFETY: kill(2) on a worker pid this test's supervisor spawned and has not reaped.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}) failed: {}", std::io::Error::last_os_error());
}

/// Waits until `n` replacements are done and a spare is ready again.
pub fn wait_rebuilt(sup: &Supervisor, n: u64) -> MetricsSnapshot {
    let mut m = sup.metrics();
    wait_until(&format!("replacement {n} and a ready spare"), Duration::from_secs(5), || {
        m = sup.metrics();
        m.crash_count >= n && m.replacements >= n && m.spare_ready
    });
    m
}

/// A small deterministic PRNG (xorshift), seeded from the clock and printed, so a failing
/// random schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::env::var("AW_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("random schedule seed: AW_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo))
    }
}

/// Reads the capture and checks it against the crash-free reference render, bit for bit.
/// Blocks of pure silence (underruns) are removed first when `skip_silence` is set, so a
/// stream that paused and resumed can still be checked for continuity.
pub fn assert_matches_reference(wav: &Path, cfg: &Config, msgs: &[ControlMsg], skip_silence: bool) -> usize {
    let data = read_f32_wav(wav).expect("read capture");
    assert_eq!(data.sample_rate, cfg.sample_rate);
    assert_eq!(data.channels as usize, CHANNELS);
    let spb = cfg.block_frames as usize * CHANNELS;
    let mut captured = data.samples;
    let mut skipped = 0;
    if skip_silence {
        let blocks: Vec<&[f32]> = captured.chunks(spb).collect();
        let kept: Vec<f32> = blocks.iter().filter(|b| b.iter().any(|&s| s != 0.0)).flat_map(|b| b.iter().copied()).collect();
        skipped = (captured.len() - kept.len()) / spb;
        captured = kept;
    }
    let frames = captured.len() / CHANNELS;
    assert!(frames > cfg.sample_rate as usize / 2, "capture too short: {frames} frames");
    let reference = render_reference(cfg.sample_rate, cfg.frequency, cfg.gain, msgs, frames, cfg.block_frames as usize);
    if let Some(i) = captured.iter().zip(&reference).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!(
            "capture differs from the reference at frame {} (block {}): got {} want {}",
            i / CHANNELS,
            i / spb,
            captured[i],
            reference[i]
        );
    }
    skipped
}

/// A capture file in a per-test temporary directory, removed (with the directory) on drop.
pub struct TempWav {
    dir: PathBuf,
    pub path: PathBuf,
}

impl Drop for TempWav {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn temp_wav(name: &str) -> TempWav {
    let dir = std::env::temp_dir().join(format!("aw-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempWav { path: dir.join(format!("{name}.wav")), dir }
}

/// Waits up to `timeout` for a child to exit; None if it is still running.
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `bash tests/support/SCRIPT SUBCOMMAND DIR`, stdin closed (the harness scripts' interface).
pub fn support_script(script: &str, subcommand: &str, dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support").join(script)).arg(subcommand).arg(dir).stdin(std::process::Stdio::null());
    c
}

/// `SCRIPT stop DIR`, its failure as a message.
pub fn stop_support_script(script: &str, dir: &Path) -> Result<(), String> {
    let out = support_script(script, "stop", dir).output().map_err(|e| format!("run {script} stop: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{script} stop failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}
