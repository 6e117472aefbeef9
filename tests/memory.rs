//! Memory: pressure, OOM and locking. The daemon runs in a memory cgroup of the test's own
//! (cgroup v1 here), so that its limit, and an OOM at it, stay inside: never a machine-wide
//! OOM. Hogs and loads are ordinary programs (perl, cat, sh) started by the test in the same
//! cgroup and killed by PID with it.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::bus::{get_bool, get_u64, proxy, Daemon, Launch, PrivateBus};
use common::cgroup::MemCg;
use common::stall::StallProbe;
use common::{wait_until, Rng};

const MIB: u64 = 1 << 20;

/// Keeps `mib` MiB of its own memory dirty (a byte written into every MiB, over and over).
const DIRTY_HOG: &str = r#"my @c = map { "x" x (1 << 20) } 1 .. $ARGV[0];
while (1) { for my $s (@c) { substr($s, int(rand(1 << 20)), 1, "y") } select(undef, undef, undef, 0.001) }"#;
/// Grows by 1 MiB every 2 ms until something stops it.
const GROWING_HOG: &str = r#"my @c; while (1) { push @c, "x" x (1 << 20); select(undef, undef, undef, 0.002) }"#;

fn oom_score(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score")).unwrap().trim().parse().unwrap()
}

fn oom_score_adj(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap().trim().parse().unwrap()
}

/// A file of `bytes` on disk that is not in the page cache (fallocate: reading it fills the
/// cache, charged to the reader's cgroup). Removed on drop.
struct BigFile(PathBuf);

impl BigFile {
    fn new(bytes: u64) -> BigFile {
        let p = PathBuf::from(format!("/var/tmp/aw-test-bigfile-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        assert_eq!(
            std::process::Command::new("fallocate").args(["-l", &bytes.to_string()]).arg(&p).status().unwrap().code(),
            Some(0),
            "fallocate"
        );
        drop(f);
        BigFile(p)
    }
}

impl Drop for BigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The seed's stress scenario: the daemon in a memory cgroup at its limit, next to a hog
/// that keeps 64 MiB dirty and a reader streaming a 512 MiB file through the page cache (so
/// the cgroup reclaims all the time), four busy loops on the two CPUs, and a random worker
/// SIGKILLed every 100-300 ms for 10 s. The supervisor is never OOM-killed, every kill is
/// counted and rebuilt, and with real-time scheduling the audio never runs dry (an underrun
/// is excused only if the stall probe saw the machine itself stall longer than the lookahead).
#[test]
fn under_memory_and_cpu_pressure_with_random_kills_the_audio_holds() {
    let Some(cg) = MemCg::new("pressure", 160 * MIB) else {
        eprintln!("no cgroup v1 memory controller here: skipped");
        return;
    };
    let bus = PrivateBus::start();
    let mut d = Daemon::start_in(&bus, "pressure", &[], &[], Some(&cg.path));
    let conn = bus.connection();
    let p = proxy(&conn);
    let metric = |k: &str| get_u64(&p.get_metrics().unwrap(), k);
    let big = BigFile::new(512 * MIB);
    let reader = format!("while :; do cat '{}' > /dev/null; done", big.0.display());
    let mut load = vec![cg.spawn("perl", &["-e", DIRTY_HOG, "64"]), cg.spawn("sh", &["-c", &reader])];
    for _ in 0..4 {
        load.push(cg.spawn("sh", &["-c", "while :; do :; done"]));
    }
    std::thread::sleep(Duration::from_millis(500));
    let probe = StallProbe::start();
    let u0 = metric("underruns");
    let mut rng = Rng::new();
    let mut kills = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(rng.range_ms(100, 300));
        let m = p.get_metrics().unwrap();
        let role = ["primary_pid", "spare_pid", "reserve_pid"][rng.range_ms(0, 3).as_millis() as usize];
        let pid = get_u64(&m, role) as u32;
        // SAFETY: kill(2) on a worker of the daemon this test started (0: none in that role).
        if pid != 0 && unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
            kills += 1;
        }
    }
    let stalls = probe.stop();
    for mut c in load {
        let _ = c.kill();
        let _ = c.wait();
    }
    wait_until("rebuilt after the last kill", Duration::from_secs(10), || {
        p.state().unwrap() == "running" && metric("reserve_pid") != 0
    });
    let m = p.get_metrics().unwrap();
    assert!(d.alive(), "the supervisor died:\n{}", d.log_text());
    assert_eq!(cg.oom_kills(), 0, "pressure, not an OOM: the page cache is reclaimed");
    assert!(cg.max_usage() > 150 * MIB, "the cgroup was at its limit: max usage {} MiB", cg.max_usage() / MIB);
    let underruns = get_u64(&m, "underruns") - u0;
    let lookahead_ns = 8 * 64 * 1_000_000_000 / 48_000;
    eprintln!("{kills} kills under pressure: {underruns} underruns; {}", stalls.summary());
    // Every kill counted; a death beyond them is a worker the heartbeat declared hung, which
    // a non-preemptible kernel reclaiming memory on a CPU can make it look (counted).
    let (crashes, hangs) = (get_u64(&m, "crash_count"), get_u64(&m, "hang_kills"));
    assert!(crashes >= kills && crashes - kills <= hangs, "{kills} kills, {crashes} deaths, {hangs} hang kills: {m:?}");
    if get_bool(&m, "realtime") {
        assert!(
            underruns == 0 || stalls.max_late_ns > lookahead_ns,
            "{underruns} underruns while the machine never stalled longer than the lookahead ({}; stalls over 2 ms \
             at CLOCK_MONOTONIC ms {:?}; standby on another CPU: {}); the daemon's warnings:\n{}",
            stalls.summary(),
            stalls.over_2ms.iter().map(|(t, late)| (t / 1_000_000, late / 1_000_000)).collect::<Vec<_>>(),
            get_bool(&m, "standby_on_other_cpu"),
            d.log_text().lines().filter(|l| l.contains("WARN")).collect::<Vec<_>>().join("\n")
        );
    }
    assert!(d.stop().success());
}

/// Out of memory in the daemon's cgroup: the kernel's OOM killer must pick a worker (whose
/// death is a failover) or the hog, never the supervisor (whose death is silence). Workers
/// raise their own oom_score_adj (+500), so every worker scores above the supervisor; a hog
/// then grows until the cgroup's OOM killer strikes.
#[test]
fn a_memory_cgroup_oom_never_picks_the_supervisor() {
    let Some(cg) = MemCg::new("oom", 128 * MIB) else {
        eprintln!("no cgroup v1 memory controller here: skipped");
        return;
    };
    let bus = PrivateBus::start();
    let mut d = Daemon::start_in(&bus, "oom", &[], &[], Some(&cg.path));
    let conn = bus.connection();
    let p = proxy(&conn);
    let m = p.get_metrics().unwrap();
    let workers = ["primary_pid", "spare_pid", "reserve_pid"].map(|k| get_u64(&m, k) as u32);
    let sup = d.pid();
    for w in workers {
        assert_eq!(oom_score_adj(w), audiowarden::worker::OOM_SCORE_ADJ as i64, "worker {w} raised its oom_score_adj");
        assert!(
            oom_score(w) > oom_score(sup),
            "worker {w} scores {} <= the supervisor's {}",
            oom_score(w),
            oom_score(sup)
        );
    }
    let mut hog = cg.spawn("perl", &["-e", GROWING_HOG]);
    let t0 = Instant::now();
    while cg.oom_kills() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no OOM in the cgroup after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever was picked first, the hog goes eventually (it only grows); then it is over.
    let _ = common::wait_child(&mut hog, Duration::from_secs(20));
    let _ = hog.kill();
    let _ = hog.wait();
    assert!(d.alive(), "the supervisor was OOM-killed:\n{}", d.log_text());
    wait_until("running again", Duration::from_secs(10), || p.state().unwrap() == "running");
    let m = p.get_metrics().unwrap();
    eprintln!(
        "{} OOM kills in the cgroup; the daemon counted {} worker deaths",
        cg.oom_kills(),
        get_u64(&m, "crash_count")
    );
    assert!(d.stop().success());
}

/// Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, nothing can be locked: the daemon
/// plays on (a degradation, like a refused SCHED_FIFO), counts every refusal in
/// `mlock_failures` and says so once, not once per worker.
#[test]
fn a_refused_mlock_is_counted_and_logged_once() {
    let bus = PrivateBus::start();
    let prefix =
        ["prlimit", "--memlock=65536:65536", "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--"];
    let d = Daemon::launch(
        &bus,
        "nomlock",
        Launch { prefix: prefix.iter().map(|s| s.into()).collect(), ..Launch::default() },
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    for k in 1..=2 {
        let victim = get_u64(&p.get_metrics().unwrap(), "primary_pid");
        common::signal(victim as u32, libc::SIGKILL);
        wait_until(&format!("rebuild {k}"), Duration::from_secs(5), || {
            let m = p.get_metrics().unwrap();
            get_u64(&m, "replacements") == k && get_bool(&m, "spare_ready") && get_u64(&m, "primary_pid") != victim
        });
    }
    let m = p.get_metrics().unwrap();
    // mlockall at start-up, and every worker spawned since (the first three and two more).
    assert!(get_u64(&m, "mlock_failures") >= 6, "{m:?}");
    assert_eq!(get_u64(&m, "underruns"), 0);
    let log = d.log_text();
    assert_eq!(log.matches("mlockall refused").count(), 1, "{log}");
    assert_eq!(log.matches("mlock refused for worker").count(), 1, "once, not per worker:\n{log}");
}
