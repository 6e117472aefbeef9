//! The worker's seccomp filter: what a worker must never do to the supervisor, even with its
//! memory corrupt (or its code hijacked). Installed once the worker has mapped its segments,
//! before it renders; inherited by nothing (workers never fork) and impossible to lift.
//!
//! The segment files live in /dev/shm under the worker's own uid, so without a filter a worker
//! could shrink one (ftruncate, truncate by path, open with O_TRUNC, fallocate punching a
//! hole, madvise(MADV_REMOVE) on its mapping, or the same through io_uring): the supervisor's
//! next read of that mapping would then die of SIGBUS, silencing everything. Files in /dev/shm
//! cannot be sealed, so the calls themselves are refused (EPERM). A worker may also not signal
//! or trace any process but itself. (Writing into the supervisor through /proc/PID/mem needs
//! the same ptrace access: the supervisor makes itself non-dumpable, which denies it.) Everything else is allowed: the filter names only what is
//! refused, so a libc that takes a new path for an ordinary call keeps working.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Refused with EPERM.
fn rules(own_pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let always = |nr: libc::c_long| (nr, Vec::new());
    // Arg `idx` has bits `mask` set.
    let has = |idx: u8, mask: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(idx, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), mask)?])
    };
    let equals = |idx: u8, v: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(idx, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?])
    };
    // A signal to anyone but this process (kill(-1, ..) included).
    let not_self = |idx: u8| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(idx, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, own_pid as u64)?])
    };
    let trunc = libc::O_TRUNC as u64;
    Ok(BTreeMap::from([
        // Shrinking or punching holes into a shared file.
        always(libc::SYS_truncate),
        always(libc::SYS_ftruncate),
        always(libc::SYS_fallocate),
        #[cfg(target_arch = "x86_64")]
        always(libc::SYS_creat), // O_CREAT|O_WRONLY|O_TRUNC
        #[cfg(target_arch = "x86_64")]
        (libc::SYS_open, vec![has(1, trunc)?]),
        (libc::SYS_openat, vec![has(2, trunc)?]),
        always(libc::SYS_openat2), // its flags are in a struct the filter cannot read
        (libc::SYS_madvise, vec![equals(2, libc::MADV_REMOVE as u64)?]),
        // The same, asynchronously.
        always(libc::SYS_io_uring_setup),
        always(libc::SYS_io_uring_enter),
        always(libc::SYS_io_uring_register),
        // Other processes (the supervisor above all).
        always(libc::SYS_ptrace),
        always(libc::SYS_process_vm_writev),
        always(libc::SYS_pidfd_send_signal),
        (libc::SYS_kill, vec![not_self(0)?]),
        (libc::SYS_tgkill, vec![not_self(0)?]),
        (libc::SYS_rt_sigqueueinfo, vec![not_self(0)?]),
        (libc::SYS_rt_tgsigqueueinfo, vec![not_self(0)?]),
        always(libc::SYS_tkill), // takes a thread id of any process; abort() uses tgkill
    ]))
}

/// Installs the filter on the calling (only) thread. (Native syscalls only: x32 calls on
/// x86_64 are not matched; the shipped unit forbids them with SystemCallArchitectures=native.)
///
/// # Errors
/// The filter cannot be built or the kernel refuses it (no seccomp, or a unit whose
/// SystemCallFilter= lacks `seccomp`): the worker then runs without it and the supervisor
/// reports that once (`worker_sandboxed` false).
pub fn install() -> Result<(), String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e}"))?;
    let filter = SeccompFilter::new(
        rules(std::process::id()).map_err(|e| format!("seccomp rules: {e}"))?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram =
        filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp program: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp: {e}"))
}
