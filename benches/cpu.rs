//! CPU benchmark: audiowarden (supervisor + primary + hot standby + reserve) against JACK
//! playing a sine (`jackd -d dummy` + `jack_simple_client`), side by side in one run, for
//! 64-, 256- and 1024-frame periods, with real-time scheduling and without it.
//!
//! - `virtual` rows: `audiowardend --output virtual` against jackd + jack_simple_client (both
//!   processes counted: jackd is the device there).
//! - `alsa` rows (64 frames): jackd is the device for both, and its CPU is counted on neither
//!   side: `audiowardend --output alsa:awjack` (ALSA's JACK plugin; its JACK thread runs inside
//!   our process and is counted with us) against jack_simple_client alone, and against a
//!   plain ALSA player of a sine through the same PCM with the same period and buffer
//!   (`speaker-test -t sine`, whose process holds the plugin's JACK thread too).
//!
//! CPU is the time on CPU of every thread of the processes (/proc/PID/task/TID/schedstat, ns),
//! over the window, as a percentage of one core. Wake-ups are voluntary context switches
//! (/proc/PID/task/TID/status): each is one sleep ended by one wake-up. The two sides run
//! alternately, AW_CPU_RUNS times (default 3), AW_CPU_SECONDS each (default 20); the table gives
//! the medians. Without RT, audiowarden runs in a cpu cgroup with no RT budget and jackd with -r.
//!
//! `cargo bench --bench cpu` (AW_CPU_BLOCKS=64,256, AW_CPU_OUTPUTS=virtual,alsa and
//! AW_CPU_RT=rt,nort choose the rows).

#[path = "../tests/common/mod.rs"]
mod common;

use common::cgroup::NoRt;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bus::{get_u64, proxy, Daemon, PrivateBus};
use common::jack::JackServer;

/// One thread's counters at one moment.
#[derive(Clone, Copy)]
struct ThreadCount {
    cpu_ns: u64,
    wakeups: u64,
}

/// Every thread of a set of processes, by (process label, thread label, tid).
type Census = BTreeMap<(String, String, u32), ThreadCount>;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A worker is named `aw3.12 primary`: grouped by role, not by generation.
fn label(comm: &str) -> String {
    match comm.split_once(' ') {
        Some((id, role)) if id.starts_with("aw") => format!("worker {role}"),
        _ => comm.to_string(),
    }
}

fn census(pids: &[u32]) -> Census {
    let mut c = Census::new();
    for &pid in pids {
        let Some(pcomm) = read(&format!("/proc/{pid}/comm")) else { continue };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            let base = format!("/proc/{pid}/task/{tid}");
            let (Some(comm), Some(sched), Some(status)) =
                (read(&format!("{base}/comm")), read(&format!("{base}/schedstat")), read(&format!("{base}/status")))
            else {
                continue;
            };
            let cpu_ns = sched.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let wakeups = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            c.insert((label(pcomm.trim()), label(comm.trim()), tid), ThreadCount { cpu_ns, wakeups });
        }
    }
    c
}

/// What a set of processes did over a window.
#[derive(Default, Clone)]
struct Usage {
    /// % of one core.
    cpu: f64,
    /// (process, thread) -> wake-ups per second (threads of one label summed).
    wakeups: BTreeMap<(String, String), f64>,
    /// (process, thread) -> % of one core.
    thread_cpu: BTreeMap<(String, String), f64>,
}

fn usage(before: &Census, after: &Census, secs: f64) -> Usage {
    let mut u = Usage::default();
    for (k, a) in after {
        let Some(b) = before.get(k) else { continue };
        let cpu = a.cpu_ns.saturating_sub(b.cpu_ns) as f64 / (secs * 1e9) * 100.0;
        u.cpu += cpu;
        *u.thread_cpu.entry((k.0.clone(), k.1.clone())).or_default() += cpu;
        *u.wakeups.entry((k.0.clone(), k.1.clone())).or_default() += a.wakeups.saturating_sub(b.wakeups) as f64 / secs;
    }
    u
}

/// Measures `pids` (re-listed at the start: a daemon's workers) for `secs`.
fn measure(pids: impl Fn() -> Vec<u32>, secs: u64) -> Usage {
    let ps = pids();
    let before = census(&ps);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = census(&ps);
    usage(&before, &after, t0.elapsed().as_secs_f64())
}

/// `pid` and its children (a supervisor and its workers).
fn with_children(pid: u32) -> Vec<u32> {
    let mut v = vec![pid];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Some(stat) = read(&format!("/proc/{p}/stat")) else { continue };
        // Fields after the parenthesised comm: state, ppid, ...
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            v.push(p);
        }
    }
    v
}

/// `jack_simple_client` on `jack`, stopped (by PID) on drop.
struct SimpleClient(Child);

impl SimpleClient {
    fn start(jack: &JackServer) -> SimpleClient {
        let child = Command::new("jack_simple_client")
            .envs(jack.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("jack_simple_client (Debian: jackd2)");
        SimpleClient(child)
    }
}

impl Drop for SimpleClient {
    fn drop(&mut self) {
        common::signal(self.0.id(), libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    Virtual,
    Alsa,
}

struct Row {
    block: u32,
    realtime: bool,
    output: Output,
    jack: Vec<Usage>,
    ours: Vec<Usage>,
    /// alsa rows: speaker-test through the same PCM.
    player: Vec<Usage>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Settling time before a window: start-up work (mapping, pre-faulting, the reserve's start)
/// is not what is measured.
const SETTLE: Duration = Duration::from_secs(2);

/// A peer that quit before its window (JACK can drop a client that misses its deadline, most
/// of all without RT on a machine that stalls): that run is skipped and says why, rather than
/// ending the benchmark.
fn peer_quit(what: &str, status: impl std::fmt::Debug) -> Option<Usage> {
    println!("  ({what} quit before its window ({status:?}): this run of it is skipped)");
    None
}

fn jack_side(block: u32, realtime: bool, output: Output, secs: u64) -> Option<Usage> {
    let jack = JackServer::start_with(block, realtime);
    let mut client = SimpleClient::start(&jack);
    std::thread::sleep(SETTLE);
    if let Ok(Some(status)) = client.0.try_wait() {
        return peer_quit("jack_simple_client", status);
    }
    let jackd = jack.jackd_pid;
    let cid = client.0.id();
    Some(match output {
        Output::Virtual => measure(|| vec![jackd, cid], secs),
        Output::Alsa => measure(|| vec![cid], secs),
    })
}

/// `speaker-test -t sine` through `awjack` (jackd not counted), periods of `block` frames and a
/// buffer of 4, like the daemon's defaults.
fn player_side(block: u32, realtime: bool, secs: u64) -> Option<Usage> {
    let jack = JackServer::start_with(block, realtime);
    let us = |frames: u32| (frames as u64 * 1_000_000 / 48_000).to_string();
    let mut child = Command::new("speaker-test")
        .args(["-D", "awjack", "-c", "2", "-r", "48000", "-F", "FLOAT_LE", "-t", "sine", "-f", "440", "-l", "0"])
        .args(["-p", &us(block), "-b", &us(4 * block)])
        .envs(jack.env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("speaker-test (Debian: alsa-utils)");
    std::thread::sleep(SETTLE);
    if let Ok(Some(status)) = child.try_wait() {
        return peer_quit("speaker-test", status);
    }
    let pid = child.id();
    let u = measure(|| vec![pid], secs);
    common::signal(pid, libc::SIGTERM);
    let _ = child.wait();
    Some(u)
}

fn our_side(bus: &PrivateBus, block: u32, rt: Option<&NoRt>, output: Output, secs: u64) -> Option<Usage> {
    let bf = block.to_string();
    // The JACK device of the alsa rows: jackd runs, and is not counted.
    let jack = (output == Output::Alsa).then(|| JackServer::start_with(block, rt.is_none()));
    let env = jack.as_ref().map(JackServer::env).unwrap_or_default();
    let out = if output == Output::Alsa { "alsa:awjack" } else { "virtual" };
    let args = ["--output", out, "--block-frames", &bf];
    let mut d = Daemon::start_in(bus, "bench-cpu", &args, &env, rt.map(|c| c.path.as_path()));
    std::thread::sleep(SETTLE);
    let conn = bus.connection();
    let p = proxy(&conn);
    let m0 = p.get_metrics().unwrap();
    let pid = d.pid();
    let u = measure(|| with_children(pid), secs);
    let m1 = p.get_metrics().unwrap();
    let played = get_u64(&m1, "frames_played") - get_u64(&m0, "frames_played");
    let expected = 48_000 * secs;
    let underruns = get_u64(&m1, "underruns") - get_u64(&m0, "underruns");
    if underruns > 0 {
        println!("  (block {block}: {underruns} underruns in the window)");
    }
    assert!(d.stop().success());
    // Measured while playing in real time, or not a measurement of playing: a device that
    // fell behind (JACK without RT dropping the plugin's client, say) is reported, not timed.
    if played * 10 < expected * 9 {
        println!("  (block {block}: played {played} of {expected} frames in the window: this run is skipped)");
        return None;
    }
    Some(u)
}

fn print_wakeups(title: &str, u: &Usage) {
    let per: Vec<String> = u
        .wakeups
        .iter()
        .filter(|(_, &w)| w >= 0.5)
        .map(|(k, w)| {
            let cpu = u.thread_cpu.get(k).copied().unwrap_or(0.0);
            let (p, t) = k;
            let name = if p == t { t.clone() } else { format!("{p}/{t}") };
            format!("{name} {w:.0} ({cpu:.2} %)")
        })
        .collect();
    let total: f64 = u.wakeups.values().sum();
    println!("    {title:<12} {total:>6.0} wake-ups/s (cpu): {}", per.join(", "));
}

fn print_row(r: &Row) {
    if r.jack.is_empty() || r.ours.is_empty() {
        println!("{:>5} {:<3} no valid run of both sides: no figure", r.block, if r.realtime { "RT" } else { "-" });
        return;
    }
    let jack = median(r.jack.iter().map(|u| u.cpu).collect());
    let ours = median(r.ours.iter().map(|u| u.cpu).collect());
    let runs = |v: &[Usage]| v.iter().map(|u| format!("{:.2}", u.cpu)).collect::<Vec<_>>().join(" ");
    let (what, peer) = match r.output {
        Output::Virtual => ("virtual", "jackd+client"),
        Output::Alsa => ("alsa:awjack", "client only"),
    };
    println!(
        "{:>5} {:<3} {what:<12} {peer:<13} jack {jack:5.2} %  audiowarden {ours:5.2} %  ratio {:.2}   (runs: jack {}; ours {})",
        r.block,
        if r.realtime { "RT" } else { "-" },
        ours / jack,
        runs(&r.jack),
        runs(&r.ours),
    );
    // Wake-ups of the run with the median CPU.
    let mid = |v: &[Usage]| {
        let mut s: Vec<&Usage> = v.iter().collect();
        s.sort_by(|a, b| a.cpu.total_cmp(&b.cpu));
        s[s.len() / 2].clone()
    };
    if !r.player.is_empty() {
        let player = median(r.player.iter().map(|u| u.cpu).collect());
        println!(
            "{:>5} {:<3} {:<12} {:<13} speaker-test {player:5.2} %  audiowarden {ours:5.2} %  ratio {:.2}   (runs: {})",
            "",
            "",
            "",
            "same PCM",
            ours / player,
            runs(&r.player)
        );
    }
    print_wakeups("jack", &mid(&r.jack));
    if !r.player.is_empty() {
        print_wakeups("speaker-test", &mid(&r.player));
    }
    print_wakeups("audiowarden", &mid(&r.ours));
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let env_u64 = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let secs = env_u64("AW_CPU_SECONDS", 20);
    let runs = env_u64("AW_CPU_RUNS", 3).max(1);
    let blocks: Vec<u32> = std::env::var("AW_CPU_BLOCKS")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let outputs = std::env::var("AW_CPU_OUTPUTS").unwrap_or_else(|_| "virtual,alsa".into());
    let rt_modes = std::env::var("AW_CPU_RT").unwrap_or_else(|_| "rt,nort".into());
    let bus = PrivateBus::start();
    let nort = NoRt::new("bench-cpu");
    if nort.is_none() {
        println!("(no-RT rows skipped: cannot create a cpu cgroup here)");
    }
    let mut rows = Vec::new();
    for &block in &blocks {
        for realtime in [true, false] {
            if !rt_modes.split(',').any(|m| m == if realtime { "rt" } else { "nort" }) || (!realtime && nort.is_none())
            {
                continue;
            }
            if outputs.split(',').any(|o| o == "virtual") {
                rows.push(Row { block, realtime, output: Output::Virtual, jack: vec![], ours: vec![], player: vec![] });
            }
            if block == 64 && outputs.split(',').any(|o| o == "alsa") {
                rows.push(Row { block, realtime, output: Output::Alsa, jack: vec![], ours: vec![], player: vec![] });
            }
        }
    }
    println!(
        "cpu benchmark: 48 kHz stereo; audiowarden at its defaults (hot standby + reserve, lookahead 8 blocks); \
         {secs} s per side, {runs} runs alternating, medians; cpu = % of one core; wake-ups = voluntary context switches"
    );
    for r in &mut rows {
        let rt = if r.realtime { None } else { nort.as_ref() };
        for _ in 0..runs {
            r.jack.extend(jack_side(r.block, r.realtime, r.output, secs));
            r.ours.extend(our_side(&bus, r.block, rt, r.output, secs));
            if r.output == Output::Alsa {
                r.player.extend(player_side(r.block, r.realtime, secs));
            }
        }
        print_row(r);
    }
}
