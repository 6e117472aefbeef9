//! Thin, safe wrappers over the Linux calls the crate needs and that std and our chosen crates
//! do not offer: pidfds, eventfds, epoll, timerfds, absolute-time sleeps, SCHED_FIFO, memory
//! locking and a few `prctl`s. Every raw syscall of the crate lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds. The one clock of the crate: the output pacing, the
/// heartbeat and every latency figure are measured on it.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until the CLOCK_MONOTONIC instant `deadline_ns` (absolute, so pacing never drifts).
/// Real-time safe: this is the output thread's wake-up wait.
pub fn sleep_until_ns(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: `ts` is a valid timespec; a null remainder is allowed with TIMER_ABSTIME.
        let r = unsafe {
            libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut())
        };
        if r != libc::EINTR {
            return;
        }
    }
}

/// A pidfd (pidfd_open(2)): readable once the process has exited, usable to signal exactly that
/// process even after its PID is reused.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd`. ESRCH (already reaped) is reported as an error.
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reaps the exited child behind `pidfd` (waitid(P_PIDFD)); returns a description of how it
/// ended. Call only once the pidfd is readable.
pub fn pidfd_reap(pidfd: &OwnedFd) -> io::Result<ExitStatus> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid initial value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // P_PIDFD = 3 (libc lacks the constant on some targets).
    // SAFETY: a valid pidfd and a writable siginfo_t.
    cvt(unsafe { libc::waitid(3 as libc::idtype_t, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) })?;
    // SAFETY: after a successful waitid with WEXITED the status fields are initialised.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    Ok(match code {
        libc::CLD_EXITED => ExitStatus::Exited(status),
        _ => ExitStatus::Signaled(status),
    })
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// An eventfd used as a wake-up: `notify` never blocks (non-blocking fd), `wait` blocks until
/// the counter is non-zero and resets it. Level-triggered, so a notify between a check and a
/// wait is never lost.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A non-blocking eventfd; `cloexec: false` for fds handed to a worker at exec.
    pub fn new(cloexec: bool) -> io::Result<EventFd> {
        let flags = libc::EFD_NONBLOCK | if cloexec { libc::EFD_CLOEXEC } else { 0 };
        // SAFETY: eventfd takes an initial value and flags.
        let fd = cvt(unsafe { libc::eventfd(0, flags) })?;
        // SAFETY: a fresh fd we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adopts an inherited eventfd (worker side).
    ///
    /// # Safety
    /// `fd` must be an open eventfd that nothing else in the process owns.
    pub unsafe fn from_raw(fd: RawFd) -> EventFd {
        // SAFETY: guaranteed by the caller.
        EventFd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Adds one to the counter. Never blocks; real-time safe (one write syscall).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd. Errors (EAGAIN at a
        // saturated counter) mean a wake-up is already pending, which is all we want.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter without blocking; returns true if it was non-zero.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our non-blocking eventfd.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        r == 8
    }

    /// Blocks until the counter is non-zero (or `timeout` passes), then resets it.
    pub fn wait(&self, timeout: Option<Duration>) {
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.drain();
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A periodic CLOCK_MONOTONIC timerfd (the monitor's heartbeat tick).
pub struct TimerFd(OwnedFd);

impl TimerFd {
    pub fn periodic(period: Duration) -> io::Result<TimerFd> {
        // SAFETY: timerfd_create takes a clock id and flags.
        let fd = cvt(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) })?;
        // SAFETY: a fresh fd we own.
        let t = TimerFd(unsafe { OwnedFd::from_raw_fd(fd) });
        let ts = libc::timespec { tv_sec: period.as_secs() as _, tv_nsec: period.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: a valid timerfd and itimerspec; no old value requested.
        cvt(unsafe { libc::timerfd_settime(t.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
        Ok(t)
    }

    /// Consumes the expiration count (non-blocking).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from our non-blocking timerfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll set whose events carry a caller-chosen u64 token.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes flags.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a fresh fd we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: valid epoll fd, fd and event.
        cvt(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
        Ok(())
    }

    pub fn remove(&self, fd: RawFd) {
        // SAFETY: valid epoll fd; a null event is allowed for EPOLL_CTL_DEL. A failure means the
        // fd was not in the set, which is fine.
        unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Waits for events; returns how many of `out` were filled (0 on timeout or EINTR).
    pub fn wait(&self, out: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: `out` is a valid writable buffer of `out.len()` events.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), out.as_mut_ptr(), out.len() as i32, timeout_ms) };
        n.max(0) as usize
    }
}

/// Asks for SCHED_FIFO at `priority` for the calling thread. EPERM (no RT budget, no
/// CAP_SYS_NICE) comes back as an error for the caller to report once; never fatal.
pub fn set_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: a valid sched_param; pthread_self is always valid.
    let r = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if r != 0 {
        Err(io::Error::from_raw_os_error(r))
    } else {
        Ok(())
    }
}

/// The calling thread's kernel id (for [`set_fifo_of`] from another thread).
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sets SCHED_FIFO at `priority` for another thread or process, by kernel id (a reload
/// changing a running thread's priority). Same errors as [`set_fifo`], and ESRCH if it is gone.
pub fn set_fifo_of(tid: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: a valid sched_param; a stale id gives ESRCH, not UB.
    cvt(unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) }).map(|_| ())
}

/// The SCHED_FIFO priority of a thread or process by kernel id (0: not real-time).
pub fn fifo_priority_of(tid: i32) -> io::Result<i32> {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid out-pointer; a stale id gives ESRCH.
    let policy = cvt(unsafe { libc::sched_getscheduler(tid) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::sched_getparam(tid, &mut param) })?;
    Ok(if policy == libc::SCHED_FIFO { param.sched_priority } else { 0 })
}

/// mlockall(MCL_CURRENT): pins every page mapped now.
pub fn mlockall() -> io::Result<()> {
    // SAFETY: mlockall takes flags only.
    cvt(unsafe { libc::mlockall(libc::MCL_CURRENT) }).map(|_| ())
}

/// Locks `len` bytes at `ptr` in memory (a shared-memory mapping the audio path touches).
pub fn mlock(ptr: *const u8, len: usize) -> io::Result<()> {
    // SAFETY: mlock only pins pages; an invalid range gives ENOMEM, not UB.
    cvt(unsafe { libc::mlock(ptr.cast(), len) }).map(|_| ())
}

/// Faults in and locks `bytes` of the calling thread's stack, so the render loop never takes a
/// page fault on its stack.
#[inline(never)]
pub fn prefault_stack(bytes: usize) {
    const CHUNK: usize = 16 * 1024;
    let buf = [0u8; CHUNK];
    let buf = std::hint::black_box(buf);
    // Lock the pages below the current frame, then recurse to reach deeper ones.
    let _ = mlock(buf.as_ptr(), CHUNK);
    if bytes > CHUNK {
        prefault_stack(bytes - CHUNK);
    }
    std::hint::black_box(&buf);
}

/// No core dumps: a dump is written before the exit is reported, which would delay detection.
pub fn disable_core_dumps() {
    let lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit struct; prctl with PR_SET_DUMPABLE takes one integer argument.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

/// Clears FD_CLOEXEC so `fd` survives exec (used in the child between fork and exec).
/// Async-signal-safe.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd number; errors are reported, never UB.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Number of open fds of this process (a leak check for the supervisor).
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Total CPU time (user + system) of `pid` in clock ticks, from /proc/PID/stat. None if gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After ')': state is field 3 (index 0); utime is field 14 (index 11), stime 15 (index 12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second for `cpu_ticks`.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a name and has no other effect.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// A held PM QoS CPU latency request: in force while the returned file stays open.
pub fn cpu_latency_request(us: u32) -> io::Result<std::fs::File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/cpu_dma_latency")?;
    f.write_all(&(us.min(i32::MAX as u32) as i32).to_ne_bytes())?;
    Ok(f)
}

/// What the scheduler says about a process: its state letter (R, S, D, T, ...) from
/// /proc/PID/stat and its CPU time in ns from /proc/PID/schedstat. None if it is gone.
pub struct SchedProbe {
    pub state: char,
    pub exec_ns: u64,
}

pub fn sched_probe(pid: u32) -> Option<SchedProbe> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 2..].chars().next()?;
    let sched = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let exec_ns = sched.split_whitespace().next()?.parse().ok()?;
    Some(SchedProbe { state, exec_ns })
}

/// A mutex with priority inheritance (PTHREAD_PRIO_INHERIT) for the few locks a real-time
/// thread (the monitor) shares with ordinary threads (control, D-Bus, housekeeping): while
/// an ordinary thread holds it and an RT thread waits, the holder runs at the waiter's
/// priority, so RT worker threads cannot starve it and stretch the wait. No poisoning (the
/// daemon aborts on panic).
pub struct PiMutex<T> {
    // Boxed: a pthread mutex must not move once initialised.
    raw: Box<std::cell::UnsafeCell<libc::pthread_mutex_t>>,
    data: std::cell::UnsafeCell<T>,
}

// SAFETY: the data is only reached through a guard, which exists only while the pthread
// mutex is held, so at most one thread touches it at a time (the usual Mutex<T> contract).
unsafe impl<T: Send> Send for PiMutex<T> {}
// SAFETY: as above; shared references only hand out exclusive access under the lock.
unsafe impl<T: Send> Sync for PiMutex<T> {}

impl<T> PiMutex<T> {
    pub fn new(value: T) -> PiMutex<T> {
        // SAFETY: a zeroed pthread_mutex_t is only storage; pthread_mutex_init below
        // initialises it in place (boxed, so it never moves). The attribute object is
        // initialised before use and destroyed after.
        let raw = unsafe {
            let raw = Box::new(std::cell::UnsafeCell::new(std::mem::zeroed::<libc::pthread_mutex_t>()));
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let mut r = libc::pthread_mutexattr_init(&mut attr);
            if r == 0 {
                r = libc::pthread_mutexattr_setprotocol(&mut attr, libc::PTHREAD_PRIO_INHERIT);
            }
            if r == 0 {
                // A relock on the same thread is an error (EDEADLK), not a silent hang.
                r = libc::pthread_mutexattr_settype(&mut attr, libc::PTHREAD_MUTEX_ERRORCHECK);
            }
            if r == 0 {
                r = libc::pthread_mutex_init(raw.get(), &attr);
            }
            libc::pthread_mutexattr_destroy(&mut attr);
            assert_eq!(r, 0, "initialising a priority-inheritance mutex: {}", std::io::Error::from_raw_os_error(r));
            raw
        };
        PiMutex { raw, data: std::cell::UnsafeCell::new(value) }
    }

    pub fn lock(&self) -> PiGuard<'_, T> {
        // SAFETY: the mutex was initialised in new() and lives as long as self.
        let r = unsafe { libc::pthread_mutex_lock(self.raw.get()) };
        // Only EDEADLK/EINVAL are possible (a bug, not a runtime condition).
        assert_eq!(r, 0, "pthread_mutex_lock: {}", std::io::Error::from_raw_os_error(r));
        PiGuard { m: self, _not_send: std::marker::PhantomData }
    }
}

impl<T> Drop for PiMutex<T> {
    fn drop(&mut self) {
        // SAFETY: no guard can exist any more (they borrow self), but one may have been
        // forgotten while locked: destroy only a mutex this thread can take; otherwise leak it
        // (as std does).
        unsafe {
            if libc::pthread_mutex_trylock(self.raw.get()) == 0 {
                libc::pthread_mutex_unlock(self.raw.get());
                libc::pthread_mutex_destroy(self.raw.get());
            }
        }
    }
}

/// Exclusive access to a [`PiMutex`]'s data; unlocks on drop. Not Send: a PI mutex must be
/// unlocked by the thread that locked it.
pub struct PiGuard<'a, T> {
    m: &'a PiMutex<T>,
    _not_send: std::marker::PhantomData<*const ()>,
}

// SAFETY: sharing a guard shares `&T` only (Deref); that is sound exactly when T: Sync.
unsafe impl<T: Sync> Sync for PiGuard<'_, T> {}

impl<T> std::ops::Deref for PiGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock, so no other reference to the data exists.
        unsafe { &*self.m.data.get() }
    }
}

impl<T> std::ops::DerefMut for PiGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref, and &mut self makes this the only access through the guard.
        unsafe { &mut *self.m.data.get() }
    }
}

impl<T> Drop for PiGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex when the guard was made (the guard is not Send).
        let r = unsafe { libc::pthread_mutex_unlock(self.m.raw.get()) };
        debug_assert_eq!(r, 0, "pthread_mutex_unlock: {}", std::io::Error::from_raw_os_error(r));
    }
}

#[cfg(test)]
mod pi_mutex_tests {
    use super::PiMutex;

    #[test]
    fn excludes_across_threads() {
        let m = std::sync::Arc::new(PiMutex::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let mut g = m.lock();
                        let v = *g;
                        std::hint::black_box(());
                        *g = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*m.lock(), 40_000);
    }
}
