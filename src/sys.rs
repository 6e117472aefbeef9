//! Thin, safe wrappers over the Linux calls the crate needs and that std and our chosen crates
//! do not offer: pidfds, eventfds, epoll, timerfds, absolute-time sleeps, SCHED_FIFO, memory
//! locking, signal masks, fds inherited at exec, flock and a few `prctl`s. Every raw syscall
//! of the crate lives here; the only others are made by crates on our behalf (memmap2's mmap
//! in `shm`, seccompiler's seccomp in `worker::sandbox`, alsa-lib and cpal in `output`).

#![allow(unsafe_code)]

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
        let r = unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut()) };
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

/// SIGKILLs child `pid` and reaps it (a child that could not be watched after its spawn).
pub fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill(2) and waitpid(2) on our own child, which nothing else reaps (it was never
    // watched); a null status pointer is allowed.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Gives `file` a length of `len` bytes with every page reserved (posix_fallocate): on tmpfs a
/// full file system is ENOSPC here, instead of a SIGBUS at the first write through a mapping
/// of a file that was only `set_len`-ed (which reserves nothing).
pub fn reserve_file(file: &std::fs::File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: posix_fallocate on an fd we own; it returns an errno (not -1 and errno).
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// TEST-ONLY (the worker's fault switch): every way a worker could shrink the segment file at
/// `path` (mapped at `mapping`) under the supervisor, with what each gave. The worker's seccomp
/// filter must refuse them all (EPERM).
pub fn test_shrink_attempts(path: &std::path::Path, mapping: (*mut u8, usize)) -> Vec<(&'static str, io::Result<()>)> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    let rw = std::fs::OpenOptions::new().read(true).write(true).open(path);
    out.push((
        "ftruncate",
        rw.as_ref().map_err(|e| io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0))).and_then(|f| f.set_len(0)),
    ));
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: truncate(2) with a valid NUL-terminated path.
    out.push(("truncate", cvt(unsafe { libc::truncate(c.as_ptr(), 0) }).map(|_| ())));
    out.push(("open O_TRUNC", std::fs::OpenOptions::new().write(true).truncate(true).open(path).map(|_| ())));
    let punch = rw.as_ref().map_err(|e| io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0))).and_then(|f| {
        // SAFETY: fallocate(2) on an fd we own; it only changes the file.
        cvt(unsafe {
            libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        })
        .map(|_| ())
    });
    out.push(("fallocate punch hole", punch));
    // SAFETY: madvise(2) on this process's own mapping; MADV_REMOVE frees the backing pages
    // (which the filter must refuse); the mapping itself stays valid.
    out.push((
        "madvise MADV_REMOVE",
        cvt(unsafe { libc::madvise(mapping.0.cast(), mapping.1, libc::MADV_REMOVE) }).map(|_| ()),
    ));
    out
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

/// Waits up to `timeout` until one of `fds` is readable (without consuming anything); true if
/// one is.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> bool {
    let mut pfds = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 4];
    let n = fds.len().min(pfds.len());
    for (p, &fd) in pfds.iter_mut().zip(&fds[..n]) {
        p.fd = fd;
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `n` valid pollfds in a local array.
    unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) > 0 }
}

/// The signals the daemon takes synchronously (SIGTERM, SIGINT, SIGHUP), blocked in the
/// calling thread (and so in every thread it starts later).
pub struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    pub fn block_term_int_hup() -> BlockedSignals {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
        // on the calling thread with a valid set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            BlockedSignals(set)
        }
    }

    /// Waits up to `timeout` for one of them; returns it if one came.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as _, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: a valid set and timespec; no siginfo requested.
        let r = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (r > 0).then_some(r)
    }
}

/// Unblocks every signal in the calling thread. A worker's first step: the supervisor blocks
/// SIGTERM/SIGINT to take them synchronously, and the mask survives exec.
pub fn unblock_all_signals() {
    // SAFETY: an empty, initialised sigset applied to the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// PR_SET_PDEATHSIG(SIGKILL): die with the parent. Returns the parent's pid, checked after
/// (if it already exited, the signal will never come and getppid shows the reaper instead).
pub fn die_with_parent() -> i32 {
    // SAFETY: prctl(PR_SET_PDEATHSIG, SIGKILL) takes an integer signal number; getppid has no
    // preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        libc::getppid()
    }
}

/// Closes every fd from 3 on except `keep` (close_range): fds a concurrent spawn in the
/// supervisor may have leaked into a worker. The caller must own none of the closed fds.
pub fn close_fds_except(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&k| k >= 3).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &k in &keep {
        if (k as u32) > from {
            // SAFETY: close_range on fds nothing in this process owns (the caller's contract).
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0) };
}

/// A worker's inherited fds, owned: (audio ring file, control ring file, wake eventfd, event
/// eventfd). Call once, right after [`close_fds_except`] kept exactly these: the supervisor
/// passed them at exec and nothing else in the process owns them. The numbers come from the
/// worker's command line, checked to be >= 3; a number that is not open gives a file whose
/// every use fails (EBADF), never another object's fd.
pub fn adopt_worker_fds(fds: [RawFd; 4]) -> (std::fs::File, std::fs::File, EventFd, EventFd) {
    // SAFETY: see above: inherited at exec, owned by nothing else (stray fds were closed).
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
            EventFd::from_raw(fds[2]),
            EventFd::from_raw(fds[3]),
        )
    }
}

/// A duplicate of `fd` without FD_CLOEXEC (it survives exec), numbered 3 or above.
pub fn dup_inheritable(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD (not F_DUPFD_CLOEXEC) on a valid fd; returns a new fd we own.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD, 3) })?;
    // SAFETY: a fresh fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// flock(LOCK_EX | LOCK_NB) on `file`: Ok(true) locked, Ok(false) someone else holds it.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    loop {
        // SAFETY: flock on an fd owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
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

    /// Fires every `period` from now on.
    ///
    /// # Errors
    /// timerfd_settime's (only for an invalid period).
    pub fn set_period(&self, period: Duration) -> io::Result<()> {
        let ts = libc::timespec { tv_sec: period.as_secs() as _, tv_nsec: period.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: a valid timerfd and itimerspec; no old value requested.
        cvt(unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }).map(|_| ())
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

/// Names the calling thread (its `comm`, at most 15 bytes, longer is cut): for the main
/// thread, the process name `ps -e`, `top` and `pstree` show. No allocation, one prctl:
/// callable from the render loop when its role changes.
pub fn set_thread_name(name: &[u8]) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`, which
    // is NUL-terminated (byte 15 at the latest) and outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Asks for SCHED_FIFO at `priority` for the calling thread. EPERM (no RT budget, no
/// CAP_SYS_NICE) comes back as an error for the caller to report once; never fatal.
///
/// With SCHED_RESET_ON_FORK: a process this thread starts (the monitor spawning a worker)
/// begins as an ordinary SCHED_OTHER process instead of at this thread's real-time priority,
/// so a worker that is still exec'ing and starting up cannot starve the audio threads; it
/// asks for its own (render) priority once it is ready to render.
pub fn set_fifo(priority: i32) -> io::Result<()> {
    set_fifo_of(0, priority)
}

/// The CPUs the calling thread may run on (its affinity mask; a cpuset limits it).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread and
    // is told its size.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set filled above, within CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Pins thread or process `tid` to `cpu` alone (a worker's render thread: see the monitor's
/// `place_on_cpus`). Same uid suffices; EINVAL if `cpu` is not in its cpuset.
pub fn pin_to_cpu(tid: i32, cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: a zeroed cpu_set_t with one CPU (checked in range) set, passed with its size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes ownership of fd `fd`, handed over at exec (systemd's socket activation passes its
/// sockets as fds 3 and up). The caller must make sure nothing else owns it.
pub fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the fds systemd passes are ours alone from exec on; each is adopted once
    // (sd_notify::listen_fds lists each once, and main takes them once).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Asks the kernel to attach the sender's credentials to every datagram an AF_UNIX socket
/// receives (read back by [`recv_with_creds`]), whether or not the sender sent them.
pub fn set_passcred(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: SO_PASSCRED takes an int; the pointer and length describe `on`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The address family of socket `fd` (AF_UNIX, AF_INET, AF_INET6), and whether it is a
/// datagram socket: how a socket handed over by systemd is told apart.
pub fn socket_kind(fd: RawFd) -> io::Result<(i32, bool)> {
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: both options return an int into `v`, `len` says its size.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
        if r == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)? == libc::SOCK_DGRAM))
}

/// Who sent a datagram to an AF_UNIX socket: the kernel's credentials (with
/// [`set_passcred`]) and the sender's own address if it bound one (where a reply can go).
#[derive(Debug, Clone, Default)]
pub struct UnixSender {
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    pub path: Option<std::path::PathBuf>,
}

/// Receives one datagram without blocking (WouldBlock when there is none): its length (the
/// datagram is cut at `buf.len()`; `truncated` says so) and its sender.
pub fn recv_with_creds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, bool, UnixSender)> {
    // Room for one SCM_CREDENTIALS message (CMSG_SPACE of a ucred: 32 bytes on Linux).
    let mut control = [0u64; 8];
    // SAFETY: sockaddr_un and msghdr are plain data; every pointer handed to recvmsg points
    // into a live local buffer whose length goes with it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as above (a zeroed msghdr is valid; its fields are set below).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut addr).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` describes the buffers above, which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sender = UnixSender::default();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer recvmsg filled, within
    // msg_controllen; a SCM_CREDENTIALS payload is a ucred (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                (sender.pid, sender.uid) = (Some(cred.pid), Some(cred.uid));
            } else if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                // Nobody should send us fds; close any (they came in CLOEXEC).
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let path_len = (msg.msg_namelen as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    if path_len > 0 && addr.sun_path[0] != 0 {
        let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as u8)
            .collect();
        sender.path =
            Some(std::path::PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(bytes)));
    }
    Ok((n as usize, msg.msg_flags & libc::MSG_TRUNC != 0, sender))
}

/// The uid of the process at the other end of a connected AF_UNIX stream socket, as the
/// kernel recorded it at connect (SO_PEERCRED).
pub fn peer_uid(fd: RawFd) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred into `cred`; `len` says its size.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len) };
    if r == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The peer of connected stream socket `fd` has closed its end (or the socket failed): a
/// poll for POLLRDHUP that does not wait.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd on the stack; timeout 0.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The calling thread's kernel id (for [`set_fifo_of`] from another thread).
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sets SCHED_FIFO at `priority` (with SCHED_RESET_ON_FORK, see [`set_fifo`]) for another
/// thread or process by kernel id (0: the calling thread), e.g. a reload changing a running
/// thread's priority. Same errors as [`set_fifo`], and ESRCH if it is gone.
pub fn set_fifo_of(tid: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: a valid sched_param; a stale id gives ESRCH, not UB.
    cvt(unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) }).map(|_| ())
}

/// The SCHED_FIFO priority of a thread or process by kernel id (0: not real-time).
pub fn fifo_priority_of(tid: i32) -> io::Result<i32> {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid out-pointer; a stale id gives ESRCH.
    let policy = cvt(unsafe { libc::sched_getscheduler(tid) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::sched_getparam(tid, &mut param) })?;
    Ok(if policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_FIFO { param.sched_priority } else { 0 })
}

/// Waits up to `timeout` for the process behind `pidfd` to exit; true if it has.
pub fn pidfd_wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    wait_readable(&[pidfd.as_raw_fd()], timeout)
}

/// mlockall(MCL_CURRENT): pins every page mapped now.
pub fn mlockall() -> io::Result<()> {
    // SAFETY: mlockall takes flags only.
    cvt(unsafe { libc::mlockall(libc::MCL_CURRENT) }).map(|_| ())
}

/// The scheduling policy of a thread or process (SCHED_OTHER 0, SCHED_FIFO 1, ...), without
/// the SCHED_RESET_ON_FORK flag.
pub fn policy_of(tid: i32) -> io::Result<i32> {
    // SAFETY: sched_getscheduler takes an id; a stale one gives ESRCH.
    cvt(unsafe { libc::sched_getscheduler(tid) }).map(|p| p & !libc::SCHED_RESET_ON_FORK)
}

/// Pins the memory of `value` (a heap object the audio path reads, made after start-up's
/// mlockall(MCL_CURRENT), which only pinned what existed then). Best effort.
pub fn mlock_value<T>(value: &T) -> io::Result<()> {
    mlock((value as *const T).cast(), std::mem::size_of::<T>().max(1))
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

/// Makes this process non-dumpable (PR_SET_DUMPABLE 0): processes of the same uid (its
/// workers) then lose ptrace access to it, and with it /proc/PID/mem. Not a core dump setting
/// for the supervisor's sake (RLIMIT_CORE is left alone).
pub fn set_undumpable() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes one integer argument.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
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
