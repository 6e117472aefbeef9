//! Starting a worker: the daemon binary re-executed in the worker role (never fork without
//! exec from this threaded process), with its segments and eventfds passed as inherited fds.
//!
//! std's `Command` uses posix_spawn (vfork semantics) when no `pre_exec` hook is set, which
//! keeps spawning fast whatever the supervisor's size; so the worker itself sets
//! PR_SET_PDEATHSIG, checks its parent and closes stray fds first thing (worker/mod.rs).
//! The fds it needs are handed over as fresh non-CLOEXEC duplicates that the parent closes
//! right after the spawn.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The fds a worker receives, as numbers in the supervisor.
pub(crate) struct WorkerFds<'a> {
    pub ring: &'a File,
    pub ctl: &'a File,
    pub wake: RawFd,
    pub event: RawFd,
    /// Its slot and generation, for its process name.
    pub slot: usize,
    pub id: u64,
}

use crate::sys::dup_inheritable;

/// Spawns `exe --worker ring=..,ctl=..,wake=..,event=..,prio=..,ppid=..,slot=..,id=..`.
/// Returns the pid.
pub(crate) fn spawn_worker(exe: &Path, fds: &WorkerFds<'_>, render_priority: i32) -> io::Result<u32> {
    let ring = dup_inheritable(fds.ring.as_raw_fd())?;
    let ctl = dup_inheritable(fds.ctl.as_raw_fd())?;
    let wake = dup_inheritable(fds.wake)?;
    let event = dup_inheritable(fds.event)?;
    let spec = format!(
        "ring={},ctl={},wake={},event={},prio={},ppid={},slot={},id={}",
        ring.as_raw_fd(),
        ctl.as_raw_fd(),
        wake.as_raw_fd(),
        event.as_raw_fd(),
        render_priority,
        std::process::id(),
        fds.slot,
        fds.id
    );
    // argv[0] names the service in ps/top even when exe is /proc/self/exe. A process group of
    // its own: a terminal's Ctrl-C, Ctrl-Z or Ctrl-\ goes to the supervisor, which stops its
    // workers itself, instead of killing or stopping them behind its back.
    let child = Command::new(exe)
        .arg0("audiowardend")
        .arg("--worker")
        .arg(spec)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()?;
    // The duplicates close here (drop); the child has its own copies.
    Ok(child.id())
}
