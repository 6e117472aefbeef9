//! Shared helpers of the integration tests: a supervisor configured for a private shm dir
//! and the real worker binary, waiting, killing, and comparing a capture with the reference.
#![allow(dead_code)]

pub mod bus;
pub mod cgroup;
pub mod jack;
pub mod stall;
pub mod storm;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use audiowarden::engine::{render_reference, ControlMsg, CHANNELS};
use audiowarden::output::wav::read_f32_wav;
use audiowarden::{Config, Event, MetricsSnapshot, OutputSpec, StandbyMode, Supervisor};

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
    config_quiet(shm, output, standby, freq, gain)
}

/// [`config`] without capturing the supervisor's log into the test's output (which the test
/// harness keeps in memory: a test that measures this process's resident size, or logs
/// thousands of events, must not).
pub fn config_quiet(shm: &ShmDir, output: OutputSpec, standby: StandbyMode, freq: f64, gain: f64) -> Config {
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

/// A supervisor's events, and waits that each match the event of their own cause (this
/// kill, this pid): an event that another cause produced (an earlier kill's late rebuild, a
/// worker that died on its own) never satisfies a wait. Events that arrive while a wait
/// looks for another are kept, so a later wait still finds them whatever the order.
pub struct Watch {
    rx: Receiver<Event>,
    seen: Vec<Event>,
}

impl Watch {
    /// Every event from now on (subscribe before the action whose events you wait for).
    pub fn new(sup: &Supervisor) -> Watch {
        Watch { rx: sup.subscribe(), seen: Vec::new() }
    }

    /// Starts a supervisor watched from its first spawn on (for a fault that may strike
    /// while `start` still runs).
    pub fn start(cfg: Config) -> (Supervisor, Watch) {
        let (sup, rx) = Supervisor::start_subscribed(cfg).expect("start");
        (sup, Watch { rx, seen: Vec::new() })
    }

    /// Waits up to `timeout` for the first event (kept or new) that `f` accepts.
    pub fn wait<T>(&mut self, what: &str, timeout: Duration, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        if let Some((i, v)) = self.seen.iter().enumerate().find_map(|(i, e)| f(e).map(|v| (i, v))) {
            self.seen.remove(i);
            return v;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => match f(&e) {
                    Some(v) => return v,
                    None => self.seen.push(e),
                },
                Err(_) => {
                    panic!("timed out after {timeout:?} waiting for {what}; other events meanwhile: {:?}", self.seen)
                }
            }
        }
    }

    /// The death of worker `pid` (a kill, or a hang it was killed for): its detection time.
    pub fn died(&mut self, pid: u32) -> u64 {
        self.wait(&format!("the death of worker {pid}"), Duration::from_secs(5), |e| match *e {
            Event::WorkerDied { pid: p, detected_ns, .. } if p == pid => Some(detected_ns),
            _ => None,
        })
    }

    /// The next death of any worker (for a fault whose victim is not known in advance).
    pub fn any_death(&mut self) -> u32 {
        self.wait("a worker death", Duration::from_secs(5), |e| match *e {
            Event::WorkerDied { pid, .. } => Some(pid),
            _ => None,
        })
    }

    /// The replacement of dead worker `dead`, ready for its role: (new pid, its role).
    pub fn replaced(&mut self, dead: u32) -> (u32, &'static str) {
        self.wait(&format!("the replacement of worker {dead}"), Duration::from_secs(5), |e| match *e {
            Event::Replaced { pid, role, replaces_pid, .. } if replaces_pid == dead => Some((pid, role)),
            _ => None,
        })
    }

    /// The takeover from dead primary `old`: the new primary's pid.
    pub fn failover(&mut self, old: u32) -> u32 {
        self.wait(&format!("the failover from worker {old}"), Duration::from_secs(5), |e| match *e {
            Event::Failover { old_pid, new_pid, .. } if old_pid == old => Some(new_pid),
            _ => None,
        })
    }

    /// A new reserve ready after the death of `dead` (the pool is whole again): its pid.
    pub fn reserve_after(&mut self, dead: u32) -> u32 {
        self.wait(&format!("a new reserve after worker {dead}"), Duration::from_secs(5), |e| match *e {
            Event::ReserveReady { pid, after_death_of, .. } if after_death_of == Some(dead) => Some(pid),
            _ => None,
        })
    }
}

/// Kills primary `victim` and waits for exactly this kill's consequences: its death, the
/// takeover from it, and the replacement of it ready (a new spare, or with no standby the
/// cold-started primary). Returns the metrics then.
pub fn kill_primary_and_wait_rebuilt(sup: &Supervisor, watch: &mut Watch, victim: u32) -> MetricsSnapshot {
    signal(victim, libc::SIGKILL);
    wait_rebuilt_after(sup, watch, victim)
}

/// Waits for the death of primary `victim` (already signalled), the takeover from it and its
/// replacement ready. Returns the metrics then.
pub fn wait_rebuilt_after(sup: &Supervisor, watch: &mut Watch, victim: u32) -> MetricsSnapshot {
    watch.died(victim);
    let new = watch.failover(victim);
    watch.replaced(victim);
    let m = sup.metrics();
    assert_ne!(m.primary_pid, victim, "worker {victim} is still the primary after its replacement: {m:?}");
    assert_ne!(new, victim);
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
        let kept: Vec<f32> =
            blocks.iter().filter(|b| b.iter().any(|&s| s != 0.0)).flat_map(|b| b.iter().copied()).collect();
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

/// What this process's fds point to, sorted, without the ones housekeeping opens for a moment
/// (/proc files, the shm dir's listing, the manifest being read or written): the leak check's
/// view of the supervisor's fds (pidfds, eventfds, epoll, segments, sockets, ...).
pub fn stable_fds(shm_dir: &Path) -> Vec<String> {
    let manifest = shm_dir.join("manifest.json").to_string_lossy().into_owned();
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| !t.starts_with("/proc") && t != shm_dir)
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| !t.starts_with(&manifest))
        .collect();
    v.sort();
    v
}

/// After a clean stop the shm dir is still there (never removed: nobody can squat it), empty
/// and 0700.
pub fn assert_shm_dir_emptied(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("the shm dir {} is gone ({e}): it must stay", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "left behind in {}: {left:?}", dir.display());
    assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o7777, 0o700);
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
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support").join(script))
        .arg(subcommand)
        .arg(dir)
        .stdin(std::process::Stdio::null());
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

/// Changes around kills of the primary: one right before a kill, and two racing the takeover
/// right after another. Runs the supervisor of `cfg` (whose output is the `wav:` capture the
/// caller compares) through it and returns what it counted and the changes made.
pub fn changes_around_kills(cfg: &Config) -> (MetricsSnapshot, Vec<ControlMsg>) {
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    let ctl = sup.control();
    let mut msgs = Vec::new();
    std::thread::sleep(Duration::from_millis(300));
    // Change, then kill immediately.
    msgs.push(ctl.set_frequency(1500.0).unwrap().msg);
    kill_primary_and_wait_rebuilt(&sup, &mut watch, sup.metrics().primary_pid);
    std::thread::sleep(Duration::from_millis(200));
    // Kill, then change immediately (the change races the takeover).
    let victim = sup.metrics().primary_pid;
    signal(victim, libc::SIGKILL);
    msgs.push(ctl.set_gain(0.3).unwrap().msg);
    msgs.push(ctl.set_frequency(700.0).unwrap().msg);
    wait_rebuilt_after(&sup, &mut watch, victim);
    std::thread::sleep(Duration::from_millis(300));
    let m = sup.metrics();
    sup.shutdown().expect("shutdown");
    (m, msgs)
}
