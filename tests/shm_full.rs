//! A full shared-memory file system. /dev/shm is world-writable, so anyone can fill it; that
//! must never take the supervisor down. Here the shm dir is on a 2 MiB tmpfs of its own, in a
//! private mount namespace (nothing of the host's /dev/shm is touched), filled by the test
//! through /proc/PID/root. Segments reserve their pages when created, so a full file system is
//! an ordinary spawn error: the service plays on from what it has (degraded when no standby
//! is left, silence counted as underruns when no worker is), says so once per episode,
//! retries with backoff, and rebuilds everything when space returns. A start on a full file
//! system waits for room with one line instead of failing.

mod common;

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::time::Duration;

use common::bus::{get_u64, proxy, Daemon, Launch, PrivateBus};
use common::{wait_until, ShmDir};

/// The tmpfs size and the script that mounts it in a private mount namespace, optionally
/// fills it with `filler` (before the daemon starts), and execs the daemon.
const TMPFS_SIZE: &str = "2m";
const MOUNT_AND_EXEC: &str = r#"set -e
mount -t tmpfs -o "size=$1,mode=0755" tmpfs "$0"
if [ "$2" != 0 ]; then head -c "$2" /dev/zero > "$0/filler" 2>/dev/null || true; fi
shift 2
exec "$@""#;

struct SmallShm {
    /// The mount point (the host sees an empty directory there).
    mount: ShmDir,
}

impl SmallShm {
    fn new(tag: &str) -> SmallShm {
        let mount = ShmDir::new(&format!("{tag}-mnt"));
        std::fs::create_dir_all(&mount.0).unwrap();
        SmallShm { mount }
    }

    fn prefix(&self, prefill: &str) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> =
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT_AND_EXEC]
                .iter()
                .map(|s| s.into())
                .collect();
        v.push(self.mount.0.clone().into());
        v.push(TMPFS_SIZE.into());
        v.push(prefill.into());
        v
    }

    fn shm_dir(&self) -> PathBuf {
        self.mount.0.join("aw")
    }

    /// The filler file as the daemon sees it (in its mount namespace).
    fn filler(&self, d: &Daemon) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}/filler", d.pid(), self.mount.0.display()))
    }

    /// Fills the tmpfs, then frees `free` bytes of it.
    fn fill_leaving(&self, d: &Daemon, free: u64) {
        let path = self.filler(d);
        let mut f = OpenOptions::new().create(true).append(true).open(&path).expect("open the filler");
        let page = [0u8; 4096];
        loop {
            match f.write_all(&page) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(free) / 4096 * 4096).unwrap();
    }

    /// Keeps the file system full from now on (someone filling /dev/shm): takes every page
    /// that comes free (a dead worker's reclaimed segments) within about 100 µs, long before
    /// the supervisor's next spawn attempt (at least a block period after a reclaim, then
    /// backing off from 100 ms). Stops, and frees it all, when dropped.
    fn hog(&self, d: &Daemon) -> Hog {
        let mut f = OpenOptions::new().create(true).append(true).open(self.filler(d)).expect("open the filler");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let _ = audiowarden::sys::set_fifo(60); // beats a spawn retry even on a busy machine
            let page = [0u8; 4096];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if f.write_all(&page).is_err() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            f.set_len(0).unwrap();
        });
        Hog { stop, thread: Some(thread) }
    }

    fn free_all(&self, d: &Daemon) {
        match OpenOptions::new().write(true).open(self.filler(d)) {
            Ok(f) => f.set_len(0).unwrap(),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("{e}"),
        }
    }
}

struct Hog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

/// Fills the shm file system to `free` bytes free while the service runs, then kills the
/// primary three times: first the reserve cannot be rebuilt, then not the standby either
/// (degraded), then no worker is left at all (silence, counted). The supervisor survives it
/// all; when space returns everything is rebuilt and the stream resumes exactly.
fn full_while_running(free: u64, tag: &str) {
    let bus = PrivateBus::start();
    let shm = SmallShm::new(tag);
    let wav = common::temp_wav(tag);
    let out = format!("wav:{}", wav.path.display());
    let args = ["--output", out.as_str(), "--frequency", "1000", "--gain", "0.5"];
    let mut d = Daemon::launch(
        &bus,
        tag,
        Launch { args: &args, prefix: shm.prefix("0"), shm_dir: Some(shm.shm_dir()), ..Launch::default() },
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    let metric = |k: &str| get_u64(&p.get_metrics().unwrap(), k);
    std::thread::sleep(Duration::from_millis(300));
    shm.fill_leaving(&d, free);

    // 1. The reserve cannot be rebuilt: a spawn error, not a SIGBUS. From now on the file
    // system stays full (what the dead workers free is taken at once).
    let victim = metric("primary_pid") as u32;
    common::signal(victim, libc::SIGKILL);
    let hog = shm.hog(&d);
    wait_until("the takeover and a failing reserve spawn", Duration::from_secs(5), || {
        metric("replacements") == 1 && metric("spawn_failures") >= 1 && metric("primary_pid") as u32 != victim
    });
    assert!(d.alive(), "the supervisor died:\n{}", d.log_text());
    // 2. Nor the standby: playing on without one.
    let victim = metric("primary_pid") as u32;
    common::signal(victim, libc::SIGKILL);
    wait_until("degraded", Duration::from_secs(5), || {
        p.state().unwrap() == "degraded" && metric("crash_count") == 2 && metric("primary_pid") as u32 != victim
    });
    let played = metric("frames_played");
    std::thread::sleep(Duration::from_millis(300));
    assert!(metric("frames_played") > played, "the last worker plays on");
    assert_eq!(metric("underruns"), 0, "a standby took over both times");
    // 3. No worker at all: silence (counted), the supervisor still up, retrying.
    let victim = metric("primary_pid") as u32;
    common::signal(victim, libc::SIGKILL);
    wait_until("silence", Duration::from_secs(5), || metric("crash_count") == 3 && metric("underruns") > 0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.alive(), "the supervisor died:\n{}", d.log_text());
    assert_eq!(metric("cold_starts"), 1, "the third takeover found no ready worker");
    // One snapshot: the silence goes on while we read.
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "cold_start_underruns"), get_u64(&m, "underruns"), "the silence is the cold start's");

    // Space returns: a primary from where the stream stopped, then the standby and the reserve.
    drop(hog);
    // (The failover's own report too: the event thread records it into the metrics after the
    // monitor has moved on, so `running` alone may come first.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = p.state().unwrap();
        // Wait for the takeover of the primary now playing (its own report). Without RT a
        // starved new primary may be judged hung and replaced, before or after its takeover,
        // so a hang kill adds at most one; with RT there are exactly the three.
        let primary = metric("primary_pid");
        let reported = d.log_text().contains(&format!("failover: worker {primary} took over"));
        if state == "running" && metric("reserve_pid") != 0 && reported {
            let (takeovers, hangs) = (metric("failover_count"), metric("hang_kills"));
            assert!((3..=3 + hangs).contains(&takeovers), "{takeovers} takeovers with {hangs} hang kills");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not running again with a reserve and the cold start's takeover reported 10 s after space \
             returned: state {state}, metrics {:?}\n{}",
            p.get_metrics().unwrap(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = p.get_metrics().unwrap();
    let log = d.log_text();
    if std::env::var_os("AW_EXPECT_NO_RT").is_none() {
        assert_eq!(get_u64(&m, "hang_kills"), 0, "with RT nothing is starved:\n{log}");
    }
    assert_eq!(count(&log, "cannot start a"), 1, "one line per episode, not per retry:\n{log}");
    assert_eq!(count(&log, "workers start again"), 1, "{log}");
    assert!(get_u64(&m, "spawn_failures") > 1, "retried: {m:?}");
    assert_eq!(get_u64(&m, "shm_leaks"), 0);
    let underruns = get_u64(&m, "underruns");
    assert_eq!(get_u64(&m, "cold_start_underruns"), underruns, "every silent period was the cold start's");
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.stop().success(), "{}", d.log_text());
    // The stream paused (the silent blocks are exactly the underruns) and resumed exactly
    // where it stopped.
    let shm_dir = ShmDir::new(&format!("{tag}-ref"));
    let cfg = common::config(
        &shm_dir,
        audiowarden::OutputSpec::Wav(wav.path.clone()),
        audiowarden::StandbyMode::Hot,
        1000.0,
        0.5,
    );
    let skipped = common::assert_matches_reference(&wav.path, &cfg, &[], true);
    assert!(skipped as u64 >= underruns, "silent blocks {skipped} vs underruns {underruns}");
}

#[test]
fn a_full_shm_with_4k_free_is_a_spawn_error_and_everything_is_rebuilt_when_space_returns() {
    full_while_running(4096, "full-4k");
}

#[test]
fn a_full_shm_with_8k_free_is_a_spawn_error_and_everything_is_rebuilt_when_space_returns() {
    full_while_running(8192, "full-8k");
}

/// Started on a full shm file system: one line, retried, up once there is room.
#[test]
fn a_start_on_a_full_shm_waits_for_room_with_one_line() {
    let bus = PrivateBus::start();
    let shm = SmallShm::new("full-start");
    let mut d = Daemon::launch(
        &bus,
        "full-start",
        Launch { prefix: shm.prefix("4m"), shm_dir: Some(shm.shm_dir()), no_wait: true, ..Launch::default() },
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(d.alive(), "gave up instead of waiting:\n{}", d.log_text());
    let log = d.log_text();
    assert_eq!(count(&log, "the shared-memory file system is full"), 1, "one line, not one per retry:\n{log}");
    shm.free_all(&d);
    d.wait_running(&bus, Duration::from_secs(10));
    assert!(d.log_text().contains("started after waiting"), "{}", d.log_text());
    assert!(d.stop().success());
}
