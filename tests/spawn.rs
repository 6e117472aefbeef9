//! Starting workers. The monitor thread runs at SCHED_FIFO 75 and spawns the workers: with
//! SCHED_RESET_ON_FORK a new worker starts as an ordinary process (SCHED_OTHER) and asks for
//! its render priority itself once it is ready, instead of exec'ing and starting up at the
//! monitor's priority. And a worker that never gets ready (stuck in its start-up) is killed
//! after a timeout and started again, instead of holding its role (and the state at degraded)
//! forever. Uses the worker's TEST-ONLY fault switch `stuck:PATH` (worker/mod.rs); its own
//! test binary, since the switch travels through the process environment.

mod common;

use std::time::Duration;

use audiowarden::{Event, OutputSpec, StandbyMode, Supervisor};
use common::*;

#[test]
fn a_new_worker_starts_unprivileged_and_one_that_never_gets_ready_is_replaced() {
    let shm = ShmDir::new("stuck");
    let cfg = config(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    let sup = Supervisor::start(cfg).expect("start");
    let mut watch = Watch::new(&sup);
    std::thread::sleep(Duration::from_millis(200));
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("stuck");
    // Workers spawned from now on see the switch (it is read from the environment at exec).
    std::env::set_var("AUDIOWARDEN_TEST_FAULT", format!("stuck:{}", marker.display()));
    let reserve = sup.metrics().reserve_pid;
    signal(reserve, libc::SIGKILL);
    watch.died(reserve);
    wait_until("the new reserve stuck in its start-up", Duration::from_secs(2), || marker.exists());
    std::env::remove_var("AUDIOWARDEN_TEST_FAULT");
    let stuck = sup.metrics().reserve_pid;
    assert!(stuck != 0 && stuck != reserve);
    // Spawned by the real-time monitor, it is not real-time itself. (Only the pass with
    // real-time scheduling can tell: without it the monitor is SCHED_OTHER too.)
    let policy = audiowarden::sys::policy_of(stuck as i32).expect("the stuck worker's policy");
    assert_eq!(policy, libc::SCHED_OTHER, "a starting worker runs at SCHED_OTHER, not at the monitor's SCHED_FIFO");
    assert_eq!(sup.state(), audiowarden::State::Running, "the pool lacks only a ready reserve");

    // Killed after the ready timeout, and a new reserve started.
    let why = watch.wait("the stuck worker declared hung", Duration::from_secs(5), |e| match e {
        Event::HangDetected { pid, why, .. } if *pid == stuck => Some(*why),
        _ => None,
    });
    assert_eq!(why, "never became ready");
    watch.died(stuck);
    let (new, role) = watch.replaced(stuck);
    assert_eq!(role, "reserve");
    let m = sup.metrics();
    sup.shutdown().unwrap();
    assert_eq!(m.reserve_pid, new);
    assert_eq!(m.hang_kills, 1, "{m:?}");
    assert_eq!(m.crash_count, 2, "{m:?}");
    assert_eq!(m.underruns, 0, "{m:?}");
}
