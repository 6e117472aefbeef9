//! An independent witness of machine stalls (the recipe of the shared stallprobe.c): on every
//! CPU, a thread pinned there at SCHED_FIFO 90 (above every thread of ours) waking every 1 ms
//! and recording how late each wake-up was. One per CPU, because a stall can be local to one
//! (a non-preemptible kernel section of another task there): a single probe on the other CPU
//! would not see the stall that held up a worker woken on this one. These VMs stall for several ms now and then (no forced preemption, a
//! hypervisor): an underrun while the probe saw no stall longer than the lookahead is the
//! product's fault; one during such a stall is the machine's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use audiowarden::sys::{now_ns, sleep_until_ns};

pub struct StallProbe {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stalls>>,
}

/// What the probe saw.
#[derive(Debug, Default, Clone)]
pub struct Stalls {
    /// The probe itself ran at SCHED_FIFO (without it, its lateness is also our load's).
    pub realtime: bool,
    pub periods: u64,
    pub max_late_ns: u64,
    /// (when, CLOCK_MONOTONIC ns; how late, ns) of every wake-up more than 2 ms late.
    pub over_2ms: Vec<(u64, u64)>,
    /// (CPU, its probe's max lateness in ns).
    pub per_cpu_max_ns: Vec<(usize, u64)>,
}

impl StallProbe {
    pub fn start() -> StallProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = allowed_cpus()
            .into_iter()
            .map(|cpu| {
                let flag = stop.clone();
                std::thread::spawn(move || probe_on(cpu, &flag))
            })
            .collect();
        StallProbe { stop, threads }
    }

    pub fn stop(mut self) -> Stalls {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Stalls { realtime: true, ..Stalls::default() };
        for t in self.threads.drain(..) {
            let s = t.join().unwrap_or_default();
            all.realtime &= s.realtime;
            all.periods += s.periods;
            all.max_late_ns = all.max_late_ns.max(s.max_late_ns);
            all.over_2ms.extend(s.over_2ms);
            all.per_cpu_max_ns.extend(s.per_cpu_max_ns);
        }
        all.over_2ms.sort_unstable();
        all
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set filled above.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// One probe, pinned to `cpu`, until `stop`.
fn probe_on(cpu: usize, stop: &AtomicBool) -> Stalls {
    // SAFETY: a zeroed cpu_set_t with one CPU set, applied to this thread only.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    let mut s = Stalls { realtime: pinned && audiowarden::sys::set_fifo(90).is_ok(), ..Stalls::default() };
    let mut deadline = now_ns();
    while !stop.load(Ordering::Relaxed) {
        deadline += 1_000_000;
        sleep_until_ns(deadline);
        let now = now_ns();
        let late = now.saturating_sub(deadline);
        s.periods += 1;
        s.max_late_ns = s.max_late_ns.max(late);
        if late > 2_000_000 {
            s.over_2ms.push((now, late));
        }
        if late > 1_000_000 {
            deadline = now; // resync, as the C probe does
        }
    }
    s.per_cpu_max_ns.push((cpu, s.max_late_ns));
    s
}

impl Drop for StallProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Stalls {
    /// Wake-ups later than `ns` (at least 2 ms: shorter ones are not kept). The probe sees a
    /// stall up to its 1 ms period short.
    pub fn count_over(&self, ns: u64) -> u64 {
        self.over_2ms.iter().filter(|&&(_, late)| late > ns).count() as u64
    }

    pub fn summary(&self) -> String {
        format!(
            "stall probe (realtime {}): {} periods, max late {:.1} ms ({}), {} wake-ups > 2 ms late",
            self.realtime,
            self.periods,
            self.max_late_ns as f64 / 1e6,
            self.per_cpu_max_ns
                .iter()
                .map(|(c, ns)| format!("cpu{c} {:.1}", *ns as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(", "),
            self.over_2ms.len()
        )
    }
}
