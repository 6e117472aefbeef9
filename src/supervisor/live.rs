//! The settings a reload changes while the audio plays: the threads' real-time priorities and
//! the restart intensity. Threads read them when they start and workers when they are spawned;
//! a reload also moves the running threads and workers to the new priorities at once
//! (sched_setscheduler by kernel thread id, from the reloading thread, never the audio path).

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use crate::config::Config;
use crate::playback::Playback;
use crate::sys;

/// The output thread's priority and id live in [`crate::playback::Playback`] (the output
/// thread reads nothing else); these are the rest.
pub(crate) struct Live {
    pub monitor_priority: AtomicI32,
    pub render_priority: AtomicI32,
    pub max_restarts: AtomicU32,
    pub restart_window_s: AtomicU32,
    /// Kernel id of the monitor thread (0 until it runs).
    pub monitor_tid: AtomicI32,
}

impl Live {
    pub fn new(c: &Config) -> Live {
        Live {
            monitor_priority: AtomicI32::new(c.monitor_priority),
            render_priority: AtomicI32::new(c.render_priority),
            max_restarts: AtomicU32::new(c.max_restarts),
            restart_window_s: AtomicU32::new(c.restart_window_s),
            monitor_tid: AtomicI32::new(0),
        }
    }

    /// Stores new priorities, then applies them to the running output and monitor threads and
    /// to the `workers` (their render loop is the main thread: tid = pid). Stored first, so a
    /// worker spawned meanwhile already starts at the new priority. Returns what the kernel
    /// refused, one line each (the setting still holds for threads started later).
    pub fn set_priorities(
        &self,
        play: &Playback,
        output: i32,
        monitor: i32,
        render: i32,
        workers: &[u32],
    ) -> Vec<String> {
        // SeqCst, paired with the threads' "store my id, then load the priority": either this
        // sees the id, or the thread sees the new priority.
        play.priority.store(output, Ordering::SeqCst);
        self.monitor_priority.store(monitor, Ordering::SeqCst);
        self.render_priority.store(render, Ordering::SeqCst);
        let mut targets = vec![
            ("output thread".to_owned(), play.tid.load(Ordering::SeqCst), output),
            ("monitor thread".to_owned(), self.monitor_tid.load(Ordering::SeqCst), monitor),
        ];
        // A dead worker can stay listed for the microseconds between its reaping and the
        // monitor's next metrics store; pids are handed out in sequence up to pid_max, so its
        // pid is not reused within that window (a gone one gives ESRCH, reported).
        targets.extend(workers.iter().filter(|&&p| p != 0).map(|&p| (format!("worker {p}"), p as i32, render)));
        targets
            .into_iter()
            .filter(|(_, tid, _)| *tid > 0)
            .filter_map(|(what, tid, prio)| {
                sys::set_fifo_of(tid, prio).err().map(|e| format!("{what}: SCHED_FIFO {prio} refused ({e})"))
            })
            .collect()
    }

    pub fn set_restart_intensity(&self, max_restarts: u32, window_s: u32) {
        self.max_restarts.store(max_restarts, Ordering::Relaxed);
        self.restart_window_s.store(window_s, Ordering::Relaxed);
    }
}
