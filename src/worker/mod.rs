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

use std::os::fd::RawFd;

mod rewind;
mod sandbox;

use rewind::Rewinder;

use crate::engine::{Engine, EngineState, PENDING_CAPACITY};
use crate::shm::control::ControlRing;
use crate::shm::ring::{AudioRing, BlockMeta, MODE_RUN, ROLE_NONE, ROLE_PRIMARY, ROLE_RESERVE, ROLE_SPARE};
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
    /// Its slot and generation (the segments' `ring-SLOT-gID`), for its process name.
    pub slot: u32,
    pub id: u64,
}

impl WorkerArgs {
    /// Parses `ring=3,ctl=4,wake=5,event=6,prio=70,ppid=123,slot=0,id=1`.
    ///
    /// # Errors
    /// A missing or malformed field, named.
    pub fn parse(spec: &str) -> Result<WorkerArgs, String> {
        let mut v = [None::<i64>; 8];
        const KEYS: [&str; 8] = ["ring", "ctl", "wake", "event", "prio", "ppid", "slot", "id"];
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
            slot: get(6)?.clamp(0, u32::MAX as i64) as u32,
            id: get(7)?.max(0) as u64,
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
    if sys::die_with_parent() != ppid {
        return Err("the supervisor exited before the worker started".into());
    }
    Ok(())
}

/// How much more an OOM killer should prefer this worker: a dead worker is a failover nobody
/// hears, a dead supervisor is silence. With +500 (raising needs no privilege) a worker goes
/// before the supervisor and before every process using less than half of the memory, while a
/// runaway one using more (the likely cause) still goes first.
pub const OOM_SCORE_ADJ: i32 = 500;

fn prefer_to_be_oom_killed() {
    // Best effort: without /proc the worker just keeps the supervisor's score.
    let _ = std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ.to_string());
}

fn run(a: WorkerArgs) -> Result<std::convert::Infallible, String> {
    // The supervisor blocks SIGTERM/SIGINT to take them synchronously, and the mask survives
    // exec: a worker must die of SIGTERM as it should.
    sys::unblock_all_signals();
    bind_to_parent(a.ppid)?;
    prefer_to_be_oom_killed();
    test_fault_stuck_at_start();
    sys::disable_core_dumps();
    // A concurrent spawn elsewhere in the supervisor may have leaked its inheritable
    // duplicates into us: every fd but stdio and ours goes.
    sys::close_fds_except(&[a.ring, a.ctl, a.wake, a.event]);
    let (ring_file, ctl_file, wake, event) = sys::adopt_worker_fds([a.ring, a.ctl, a.wake, a.event]);
    let ring = AudioRing::attach(&ring_file).map_err(|e| format!("audio ring: {e}"))?;
    let ctl = ControlRing::attach(&ctl_file).map_err(|e| format!("control ring: {e}"))?;
    let mut fault = TestFault::from_env();
    fault.ring_path = fault.marker.as_ref().and_then(|_| std::fs::read_link(format!("/proc/self/fd/{}", a.ring)).ok());
    drop((ring_file, ctl_file)); // the mappings stay

    // Everything the render loop touches, allocated, faulted in and locked now.
    let geo = ring.geometry();
    let mut engine = Engine::new(geo.sample_rate, EngineState::initial(440.0, 0.0, 1));
    // The applied messages since the oldest block it holds: what a rewrite renders again.
    engine.keep_applied(PENDING_CAPACITY);
    let mut scratch = vec![0.0f32; geo.samples_per_block()];
    engine.render(&mut scratch); // warms the code path and the caches
    engine.lock_memory();
    let rewinder = Rewinder::new(&ring);
    let _ = ring.lock();
    let _ = ctl.lock();
    sys::prefault_stack(STACK_PREFAULT);
    // From here on the worker cannot shrink a segment or signal another process. Refused
    // (a kernel without seccomp, a unit whose SystemCallFilter= lacks `seccomp`): it runs
    // without, and the supervisor reports that once, like a refused SCHED_FIFO.
    let sandboxed = match sandbox::install() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("audiowardend worker {}: {e}; running without the sandbox", std::process::id());
            false
        }
    };
    let realtime = sys::set_fifo(a.priority).is_ok();
    let names = Names::new(a.slot, a.id);
    sys::set_thread_name(names.of(ROLE_NONE));

    ring.set_status(std::process::id(), realtime, sandboxed);
    event.notify();
    render_loop(&ring, &ctl, &wake, &event, &mut Render { engine, rewinder }, fault, &names)
}

/// TEST-ONLY: with `AUDIOWARDEN_TEST_FAULT=stuck:PATH`, the first worker to create PATH never
/// gets ready: it sleeps at the very start, before mapping anything or asking for its
/// priority (so its scheduling policy is still the one it was spawned with). Never set it in
/// production.
fn test_fault_stuck_at_start() {
    let Ok(v) = std::env::var("AUDIOWARDEN_TEST_FAULT") else { return };
    let Some(path) = v.strip_prefix("stuck:") else { return };
    if std::fs::OpenOptions::new().write(true).create_new(true).open(path).is_ok() {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// TEST-ONLY fault switch, for the containment tests. With `AUDIOWARDEN_TEST_FAULT=KIND:PATH`
/// in the environment, the first worker to render 50 blocks and to create PATH (O_EXCL, so
/// exactly one worker ever does) misbehaves:
/// - `garbage`: publishes one block of garbage (NaN samples, a state that fails its checksum)
///   and aborts, like a worker corrupting its memory as it dies;
/// - `spin`: spins forever without rendering (an endless loop);
/// - `scribble`: overwrites the samples of the newest block it published with full-scale
///   noise (a stray write into published memory) and goes on rendering;
/// - `truncate`: tries every way to shrink its audio ring's file (ftruncate, truncate by path,
///   open with O_TRUNC, a punched hole, madvise(MADV_REMOVE)), writes what each gave to
///   PATH.result, and aborts.
///
/// And `poison:VALUE`: every worker aborts as it is about to apply a change to VALUE (a
/// change that kills whoever applies it).
///
/// Never set it in production.
struct TestFault {
    marker: Option<std::ffi::CString>,
    kind: FaultKind,
    /// The audio ring's file (for `truncate`).
    ring_path: Option<std::path::PathBuf>,
    /// `poison:VALUE`.
    poison: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    Garbage,
    Spin,
    Scribble,
    Truncate,
}

impl TestFault {
    fn from_env() -> TestFault {
        let v = std::env::var("AUDIOWARDEN_TEST_FAULT").unwrap_or_default();
        let (kind, path) = v.split_once(':').unwrap_or(("", ""));
        let kind = match kind {
            "garbage" => Some(FaultKind::Garbage),
            "spin" => Some(FaultKind::Spin),
            "scribble" => Some(FaultKind::Scribble),
            "truncate" => Some(FaultKind::Truncate),
            _ => None,
        };
        let marker = kind.and_then(|_| std::ffi::CString::new(path).ok());
        let poison = v.strip_prefix("poison:").and_then(|x| x.parse().ok());
        TestFault { marker, kind: kind.unwrap_or(FaultKind::Garbage), ring_path: None, poison }
    }

    /// Before block `next_block` renders (`rendered` blocks so far): strikes if it is time,
    /// and aborts (poison) if the block would apply the poisoned value.
    fn before_block(&mut self, ring: &AudioRing, engine: &Engine, next_block: u64, rendered: u64) {
        if self.marker.is_some() {
            if let Some(marker) = self.fires(rendered) {
                self.strike(ring, engine, next_block, &marker);
            }
        }
        self.poison_check(ring, engine);
    }

    /// `poison`: aborts if a change to the value is due before the end of the next block
    /// the engine renders, whether a new one or one rendered again (a change stamped inside
    /// blocks the ring holds is due before the engine's frame).
    fn poison_check(&self, ring: &AudioRing, engine: &Engine) {
        if let Some(v) = self.poison {
            let end = engine.state().frame + ring.geometry().block_frames as u64;
            if engine.due_before(end).any(|m| m.value == v) {
                std::process::abort();
            }
        }
    }

    /// Called after each rendered block; the marker path if this worker must misbehave now.
    fn fires(&mut self, rendered: u64) -> Option<std::ffi::CString> {
        if rendered < 50 {
            return None;
        }
        let path = self.marker.take()?;
        let os: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(path.as_bytes());
        std::fs::OpenOptions::new().write(true).create_new(true).open(os).ok()?;
        Some(path)
    }

    /// Misbehaves as configured, at block `next_block` (not yet rendered). `marker`: the
    /// marker path (already taken by `fires`).
    fn strike(&self, ring: &AudioRing, engine: &Engine, next_block: u64, marker: &std::ffi::CStr) {
        match self.kind {
            FaultKind::Spin => loop {
                std::hint::spin_loop();
            },
            FaultKind::Garbage => {
                ring.produce(next_block, BlockMeta::default(), |samples| {
                    samples.fill(f32::NAN);
                    let mut garbage = *engine.state();
                    garbage.frame += samples.len() as u64 / 2;
                    garbage.phase = 7.5; // out of range, and the checksum no longer matches
                    garbage
                });
                std::process::abort();
            }
            FaultKind::Scribble => ring.test_scribble_samples(next_block.saturating_sub(1)),
            FaultKind::Truncate => {
                let results = match &self.ring_path {
                    Some(p) => sys::test_shrink_attempts(p, ring.test_mapping()),
                    None => Vec::new(),
                };
                let text: String = results
                    .iter()
                    .map(|(what, r)| {
                        format!("{what}: {}\n", r.as_ref().map_or_else(|e| e.to_string(), |_| "done".into()))
                    })
                    .collect();
                // Not fs::write: that opens with O_TRUNC, which the sandbox refuses.
                let result_path = format!("{}.result", marker.to_string_lossy());
                if let Ok(mut f) = std::fs::OpenOptions::new().write(true).create_new(true).open(result_path) {
                    let _ = std::io::Write::write_all(&mut f, text.as_bytes());
                }
                std::process::abort();
            }
        }
    }
}

/// The process names a worker takes, made before the render loop: `aw3.12` (slot 3, the
/// segments' generation 12) until it is told its role, then `aw3.12 primary`, `aw3.12 spare`
/// or `aw3.12 reserve` (the kernel keeps 15 bytes: a long generation shortens the role).
struct Names([Vec<u8>; 4]);

impl Names {
    fn new(slot: u32, id: u64) -> Names {
        let base = format!("aw{slot}.{id}");
        Names([ROLE_NONE, ROLE_PRIMARY, ROLE_SPARE, ROLE_RESERVE].map(|r| {
            let role = match r {
                ROLE_PRIMARY => " primary",
                ROLE_SPARE => " spare",
                ROLE_RESERVE => " reserve",
                _ => "",
            };
            format!("{base}{role}").into_bytes()
        }))
    }

    /// The name for role `r` (an unknown value: the bare name).
    fn of(&self, r: u32) -> &[u8] {
        self.0.get(r as usize).unwrap_or(&self.0[0])
    }
}

/// What the render loop renders with: the engine, and its memory of the blocks it committed
/// (to render them again for a change stamped inside them).
struct Render {
    engine: Engine,
    rewinder: Rewinder,
}

/// The render loop (audio thread: see module docs). Runs until the process is killed.
fn render_loop(
    ring: &AudioRing,
    ctl: &ControlRing,
    wake: &EventFd,
    event: &EventFd,
    render: &mut Render,
    mut fault: TestFault,
    names: &Names,
) -> ! {
    let Render { engine, rewinder } = render;
    let mut rendered = 0u64;
    let mut seen_command = 0u64;
    let mut running = false;
    let mut next_block = 0u64;
    let mut announce_first = false;
    let mut announce_full = false;
    let mut role = ROLE_NONE;
    // The newest control sequence received (what every block committed says it knows), and
    // the handoff's: every message up to it was in the control ring at the run command, so
    // it is known once the ring has been drained empty (the engine may hold fewer).
    let mut known_seq = 0u64;
    let mut known_at_handoff = 0u64;
    loop {
        if ring.role() != role {
            // Only when the supervisor changes it: one prctl, no allocation.
            role = ring.role();
            sys::set_thread_name(names.of(role));
        }
        let command = ring.command();
        if command != seen_command {
            seen_command = command;
            running = command & 0xff == MODE_RUN;
            if running {
                let (base, state, known) = ring.handoff();
                (known_seq, known_at_handoff) = (state.last_seq, known);
                engine.set_state(state);
                rewinder.start_new_run(ring, base, state);
                next_block = base;
                announce_first = true;
                announce_full = true;
            }
        }
        if running {
            rewinder.forget_played(engine, ring.read_index());
            loop {
                // Messages first: one due inside this block must be queued before it renders,
                // and one stamped inside blocks the ring holds makes it render them again (a
                // rewrite of the ring per message that arrived since the last: at most one per
                // block committed in this wake-up, plus one).
                known_seq = known_seq.max(drain_control(ctl, engine, known_at_handoff));
                fault.poison_check(ring, engine);
                rewinder.follow(ring, engine, next_block, known_seq);
                if ring.space() == 0 {
                    break;
                }
                fault.before_block(ring, engine, next_block, rendered);
                let meta = BlockMeta { known_seq, start_check: engine.state().check };
                ring.produce(next_block, meta, |samples| {
                    engine.render(samples);
                    *engine.state()
                });
                rewinder.committed(next_block, *engine.state());
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
            ring.set_control_stats(engine.stats.late, engine.stats.duplicates, &rewinder.stats);
        }
        wake.wait(None);
    }
}

/// Queues the control messages waiting in `ctl`, as many as the engine can hold. Returns
/// the newest sequence number known: the newest among them, or `known_at_handoff` once `ctl`
/// is empty (0: none).
fn drain_control(ctl: &ControlRing, engine: &mut Engine, known_at_handoff: u64) -> u64 {
    let mut newest = 0;
    while engine.can_accept() {
        match ctl.pop() {
            Some(m) => {
                newest = newest.max(m.seq);
                engine.enqueue(m);
            }
            None => return newest.max(known_at_handoff),
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let a = WorkerArgs::parse("ring=3,ctl=4,wake=5,event=6,prio=70,ppid=9,slot=2,id=12").unwrap();
        assert_eq!(a, WorkerArgs { ring: 3, ctl: 4, wake: 5, event: 6, priority: 70, ppid: 9, slot: 2, id: 12 });
        assert!(WorkerArgs::parse("ring=3,ctl=4").unwrap_err().contains("wake"));
        assert!(WorkerArgs::parse("ring=3,ctl=4,wake=5,event=6,prio=70,ppid=9").unwrap_err().contains("slot"));
        let bad_fd = "ring=1,ctl=4,wake=5,event=6,prio=70,ppid=9,slot=2,id=12";
        assert!(WorkerArgs::parse(bad_fd).unwrap_err().contains("ring"));
        assert!(WorkerArgs::parse("ring=x").is_err());
    }

    /// Review finding (issue 15 step 3): a worker took over with more messages replayed into
    /// its control ring than its engine holds; claiming the handoff's sequence at once made
    /// its blocks say they knew messages still waiting in the ring.
    #[test]
    fn the_handoffs_sequence_is_known_only_once_the_control_ring_is_drained() {
        use crate::engine::{ControlKind, ControlMsg};
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(crate::shm::control::segment_size(4096)).unwrap();
        let ctl = ControlRing::create(file.as_file(), 4096).unwrap();
        let mut engine = Engine::new(48_000, EngineState::initial(440.0, 0.5, 1));
        for seq in 1..=PENDING_CAPACITY as u64 + 500 {
            assert!(ctl.push(ControlMsg::new(seq, 0, ControlKind::SetGain, 0.25)));
        }
        let handoff = PENDING_CAPACITY as u64 + 600;
        assert_eq!(drain_control(&ctl, &mut engine, handoff), PENDING_CAPACITY as u64, "only what the engine took");
        engine.render(&mut [0.0; 128]);
        assert_eq!(drain_control(&ctl, &mut engine, handoff), handoff, "the ring is empty: the handoff's holds");
    }

    #[test]
    fn process_names_fit_and_keep_the_generation() {
        let n = Names::new(3, 12);
        assert_eq!(n.of(ROLE_NONE), b"aw3.12");
        assert_eq!(n.of(ROLE_PRIMARY), b"aw3.12 primary");
        assert_eq!(n.of(ROLE_SPARE), b"aw3.12 spare");
        assert_eq!(n.of(ROLE_RESERVE), b"aw3.12 reserve");
        assert_eq!(n.of(77), b"aw3.12", "a garbage role is the bare name");
        // The kernel keeps 15 bytes: the generation always survives, the role is cut.
        assert!(Names::new(4, 123_456).of(ROLE_PRIMARY)[..15].starts_with(b"aw4.123456 "));
    }
}
