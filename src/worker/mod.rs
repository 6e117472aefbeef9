//! The worker role: `audiowardend --worker ring=FD,ctl=FD,wake=FD,event=FD,prio=N,ppid=PID`.
//!
//! A worker maps the two segments the supervisor created for it, locks and pre-faults what
//! the render loop touches (the rings, its stack, the engine), reports ready, and then renders
//! ahead into its audio ring whenever it has room, applying control messages at their stamped
//! frames. It keeps a small resident size on purpose: the kernel signals a process's exit on
//! its pidfd only after freeing its memory, so every MiB here is detection latency.
//!
//! The render loop is an audio thread: no allocation, no lock, no logging; it blocks only in
//! its eventfd wait.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};

use crate::engine::{Engine, EngineState};
use crate::shm::control::ControlRing;
use crate::shm::ring::{AudioRing, MODE_RUN};
use crate::sys::{self, EventFd};

/// Stack the render loop may use, faulted in and locked up front.
const STACK_PREFAULT: usize = 128 * 1024;

/// The worker's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerArgs {
    pub ring: RawFd,
    pub ctl: RawFd,
    pub wake: RawFd,
    pub event: RawFd,
    pub priority: i32,
    pub ppid: i32,
}

impl WorkerArgs {
    /// Parses `ring=3,ctl=4,wake=5,event=6,prio=70,ppid=123`.
    ///
    /// # Errors
    /// A missing or malformed field, named.
    pub fn parse(spec: &str) -> Result<WorkerArgs, String> {
        let mut v = [None::<i64>; 6];
        const KEYS: [&str; 6] = ["ring", "ctl", "wake", "event", "prio", "ppid"];
        for part in spec.split(',') {
            let (k, val) = part.split_once('=').ok_or_else(|| format!("malformed worker field {part:?}"))?;
            let i = KEYS.iter().position(|&x| x == k).ok_or_else(|| format!("unknown worker field {k:?}"))?;
            v[i] = Some(val.parse().map_err(|_| format!("worker field {k} is not a number: {val:?}"))?);
        }
        let get = |i: usize| v[i].ok_or_else(|| format!("worker field {} missing", KEYS[i]));
        let fd = |i: usize| -> Result<RawFd, String> {
            let x = get(i)?;
            if (3..=1_000_000).contains(&x) {
                Ok(x as RawFd)
            } else {
                Err(format!("worker field {} is not an inherited fd: {x}", KEYS[i]))
            }
        };
        Ok(WorkerArgs {
            ring: fd(0)?,
            ctl: fd(1)?,
            wake: fd(2)?,
            event: fd(3)?,
            priority: get(4)?.clamp(1, 99) as i32,
            ppid: get(5)? as i32,
        })
    }
}

/// Entry point of the worker role; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let parsed = match args.first().map(|s| WorkerArgs::parse(s)) {
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            eprintln!("audiowardend worker: {e}");
            return 2;
        }
        None => {
            eprintln!("audiowardend worker: missing fd specification");
            return 2;
        }
    };
    match run(parsed) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("audiowardend worker {}: {e}", std::process::id());
            1
        }
    }
}

/// Die with the supervisor, and make sure it is still the one that started us.
fn bind_to_parent(ppid: i32) -> Result<(), String> {
    // SAFETY: prctl(PR_SET_PDEATHSIG, SIGKILL) takes an integer signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != ppid {
        return Err("the supervisor exited before the worker started".into());
    }
    Ok(())
}

/// Closes every fd except stdio and ours: a concurrent spawn elsewhere in the supervisor
/// may have leaked its inheritable duplicates into us.
fn close_stray_fds(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.to_vec();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &k in &keep {
        if (k as u32) > from {
            // SAFETY: close_range on fds we do not use; no Rust object owns them.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}

/// The supervisor blocks SIGTERM/SIGINT to take them synchronously, and the mask survives
/// exec: unblock everything so a worker dies of SIGTERM as it should.
fn reset_signal_mask() {
    // SAFETY: an empty, initialised sigset applied to the calling (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn run(a: WorkerArgs) -> Result<std::convert::Infallible, String> {
    reset_signal_mask();
    bind_to_parent(a.ppid)?;
    sys::disable_core_dumps();
    close_stray_fds(&[a.ring, a.ctl, a.wake, a.event]);
    // SAFETY: the supervisor passed these fds to us at exec; nothing else in this process
    // owns them (stray fds were closed above, these were kept).
    let (ring_file, ctl_file, wake, event) =
        unsafe { (File::from_raw_fd(a.ring), File::from_raw_fd(a.ctl), EventFd::from_raw(a.wake), EventFd::from_raw(a.event)) };
    let ring = AudioRing::attach(&ring_file).map_err(|e| format!("audio ring: {e}"))?;
    let ctl = ControlRing::attach(&ctl_file).map_err(|e| format!("control ring: {e}"))?;
    drop((ring_file, ctl_file)); // the mappings stay

    // Everything the render loop touches, allocated, faulted in and locked now.
    let geo = ring.geometry();
    let mut engine = Engine::new(geo.sample_rate, EngineState::initial(440.0, 0.0, 1));
    let mut scratch = vec![0.0f32; geo.samples_per_block()];
    engine.render(&mut scratch); // warms the code path and the caches
    engine.lock_memory();
    let _ = ring.lock();
    let _ = ctl.lock();
    sys::prefault_stack(STACK_PREFAULT);
    let fault = TestFault::from_env();
    let realtime = sys::set_fifo(a.priority).is_ok();

    ring.set_status(std::process::id(), realtime);
    event.notify();
    render_loop(&ring, &ctl, &wake, &event, &mut engine, fault)
}

/// TEST-ONLY fault switch, for the containment tests. With `AUDIOWARDEN_TEST_FAULT=KIND:PATH`
/// in the environment, the first worker to render 50 blocks and to create PATH (O_EXCL, so
/// exactly one worker ever does) misbehaves:
/// - `garbage`: publishes one block of garbage (NaN samples, a state that fails its checksum)
///   and aborts, like a worker corrupting its memory as it dies;
/// - `spin`: spins forever without rendering (an endless loop).
///
/// Never set it in production.
struct TestFault {
    marker: Option<std::ffi::CString>,
    spin: bool,
}

impl TestFault {
    fn from_env() -> TestFault {
        let v = std::env::var("AUDIOWARDEN_TEST_FAULT").unwrap_or_default();
        let (spin, path) = match (v.strip_prefix("garbage:"), v.strip_prefix("spin:")) {
            (Some(p), _) => (false, Some(p)),
            (_, Some(p)) => (true, Some(p)),
            _ => (false, None),
        };
        let marker = path.and_then(|p| std::ffi::CString::new(p).ok());
        TestFault { marker, spin }
    }

    /// Called after each rendered block; true if this worker must now die with garbage.
    fn fires(&mut self, rendered: u64) -> bool {
        if rendered < 50 {
            return false;
        }
        let Some(path) = self.marker.take() else { return false };
        // SAFETY: open(2) with a valid NUL-terminated path; the fd is closed right away.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC, 0o600) };
        if fd < 0 {
            return false;
        }
        // SAFETY: closing the fd just opened.
        unsafe { libc::close(fd) };
        true
    }
}

/// The render loop (audio thread: see module docs). Runs until the process is killed.
fn render_loop(ring: &AudioRing, ctl: &ControlRing, wake: &EventFd, event: &EventFd, engine: &mut Engine, mut fault: TestFault) -> ! {
    let mut rendered = 0u64;
    let mut seen_command = 0u64;
    let mut running = false;
    let mut next_block = 0u64;
    let mut announce_first = false;
    let mut announce_full = false;
    loop {
        let command = ring.command();
        if command != seen_command {
            seen_command = command;
            running = command & 0xff == MODE_RUN;
            if running {
                let (base, state) = ring.handoff();
                engine.set_state(state);
                next_block = base;
                announce_first = true;
                announce_full = true;
            }
        }
        if running {
            loop {
                // Messages first: one due inside this block must be queued before it renders.
                while engine.can_accept() {
                    match ctl.pop() {
                        Some(m) => {
                            engine.enqueue(m);
                        }
                        None => break,
                    }
                }
                if ring.space() == 0 {
                    break;
                }
                if fault.marker.is_some() && fault.fires(rendered) {
                    if fault.spin {
                        loop {
                            std::hint::spin_loop();
                        }
                    }
                    ring.produce(next_block, |samples| {
                        samples.fill(f32::NAN);
                        let mut garbage = *engine.state();
                        garbage.frame += samples.len() as u64 / 2;
                        garbage.phase = 7.5; // out of range, and the checksum no longer matches
                        garbage
                    });
                    std::process::abort();
                }
                ring.produce(next_block, |samples| {
                    engine.render(samples);
                    *engine.state()
                });
                next_block += 1;
                rendered += 1;
                if announce_first {
                    announce_first = false;
                    event.notify();
                }
            }
            if announce_full {
                announce_full = false;
                event.notify();
            }
            ring.set_control_stats(engine.stats.late, engine.stats.duplicates);
        }
        wake.wait(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let a = WorkerArgs::parse("ring=3,ctl=4,wake=5,event=6,prio=70,ppid=9").unwrap();
        assert_eq!(a, WorkerArgs { ring: 3, ctl: 4, wake: 5, event: 6, priority: 70, ppid: 9 });
        assert!(WorkerArgs::parse("ring=3,ctl=4").unwrap_err().contains("wake"));
        assert!(WorkerArgs::parse("ring=1,ctl=4,wake=5,event=6,prio=70,ppid=9").unwrap_err().contains("ring"));
        assert!(WorkerArgs::parse("ring=x").is_err());
    }
}
