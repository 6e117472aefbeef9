//! A memory cgroup of the test's own (cgroup v1, as on these machines: the memory controller
//! at /sys/fs/cgroup/memory), with a limit: a memory-cgroup OOM stays inside it, never a
//! machine-wide one. Every process in it was started by the test (the daemon, its workers,
//! the hogs); on drop they are killed by PID and the cgroup removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

pub struct MemCg {
    pub path: PathBuf,
}

impl MemCg {
    /// None if this machine has no cgroup v1 memory controller we may use (then the caller
    /// says so and skips).
    pub fn new(tag: &str, limit: u64) -> Option<MemCg> {
        let root = Path::new("/sys/fs/cgroup/memory");
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        let path = root.join(format!("aw-test-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        let cg = MemCg { path };
        std::fs::write(cg.path.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        // No swap either, where the kernel accounts it.
        let _ = std::fs::write(cg.path.join("memory.memsw.limit_in_bytes"), limit.to_string());
        Some(cg)
    }

    /// `cmd` started inside the cgroup from its first instruction on.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Child {
        Command::new("sh")
            .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\""])
            .arg(&self.path)
            .arg(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn into the cgroup")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// OOM kills inside the cgroup so far (memory.oom_control's oom_kill).
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn max_usage(&self) -> u64 {
        self.read("memory.max_usage_in_bytes").trim().parse().unwrap_or(0)
    }

    pub fn pids(&self) -> Vec<i32> {
        self.read("cgroup.procs").lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for MemCg {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() && std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            for p in pids {
                // SAFETY: kill(2) on a process in the test's own cgroup (started by the test).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove {}", self.path.display());
    }
}

/// A cpu cgroup without an RT budget (cpu.rt_runtime_us = 0: SCHED_FIFO is refused inside),
/// for the benchmarks' rows without real-time scheduling; removed on drop (retried while the
/// processes moved into it are still exiting).
pub struct NoRt {
    pub path: PathBuf,
}

impl NoRt {
    pub fn new(tag: &str) -> Option<NoRt> {
        let path = PathBuf::from(format!("/sys/fs/cgroup/cpu/aw-{tag}-nort-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        std::fs::write(path.join("cpu.rt_runtime_us"), "0").ok()?;
        Some(NoRt { path })
    }
}

impl Drop for NoRt {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
