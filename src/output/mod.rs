//! The output stage: an RT thread of the supervisor (never of a worker) that plays one block
//! per period.
//!
//! Audio thread. After start-up this loop allocates nothing, takes no lock, logs nothing and
//! blocks only in its absolute-time sleep; what it has to say leaves through atomics
//! (metrics) and the WAV tap's wait-free ring.
//!
//! Each period it plays block `pos` from the first ring that holds a valid one, the active
//! worker's first. Every ring agrees on what block `pos` is (see shm::ring), so a dead
//! primary's remaining blocks, a hot standby's, or a warm standby's after its first render
//! are interchangeable: failover is just which ring answers. No ring holding it is an
//! underrun: the period plays silence and `pos` stays, so the stream resumes where it left off.

pub mod wav;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::supervisor::Shared;
use crate::sys;

/// Where played blocks go besides the (virtual) device clock.
pub enum Sink {
    Virtual,
    Wav(wav::WavTap),
}

impl Sink {
    fn play(&mut self, block: &[f32]) {
        match self {
            Sink::Virtual => {}
            Sink::Wav(tap) => tap.push(block),
        }
    }
}

/// The output thread's only memory besides its stack: allocated before the thread starts.
pub(crate) struct Buffers {
    block: Vec<f32>,
    silence: Vec<f32>,
}

impl Buffers {
    pub(crate) fn new(samples_per_block: usize) -> Buffers {
        Buffers { block: vec![0.0; samples_per_block], silence: vec![0.0; samples_per_block] }
    }
}

/// The output thread's body. Paced on CLOCK_MONOTONIC: period `n` ends at
/// `start + n * block_frames / sample_rate`, computed exactly so the clock never drifts.
/// The outcome of the SCHED_FIFO request goes back through `rt` (this thread never logs).
pub(crate) fn run(sh: Arc<Shared>, mut sink: Sink, buffers: Buffers, rt: std::sync::mpsc::Sender<std::io::Result<()>>) {
    let fifo = sys::set_fifo(sh.config.output_priority);
    sh.metrics.output_realtime.store(fifo.is_ok(), Ordering::Relaxed);
    let _ = rt.send(fifo);
    drop(rt);
    let bf = sh.config.block_frames as u64;
    let sr = sh.config.sample_rate as u64;
    let Buffers { mut block, silence } = buffers;
    let start = sys::now_ns();
    let mut period: u64 = 0;
    // Test-only fault (--test-fault-output-stall-ms): from this time on, play nothing.
    let stall_at = sh.config.test_fault_output_stall_ms.map_or(u64::MAX, |ms| start.saturating_add(ms.saturating_mul(1_000_000)));

    while sh.running.load(Ordering::Acquire) {
        period += 1;
        let deadline = start + (period as u128 * bf as u128 * 1_000_000_000 / sr as u128) as u64;
        sys::sleep_until_ns(deadline);
        if deadline >= stall_at {
            continue; // wedged: alive, but the position never advances again
        }

        let pos = sh.position.load(Ordering::Relaxed);
        let mut played = None;
        sh.table.for_each(|w| {
            played = w.ring.read_block(pos, &mut block);
            played.is_none()
        });
        match played {
            Some(state) => {
                sink.play(&block);
                // Seqlock write (see Shared::clock_seq): position and its start time change
                // together for readers.
                sh.clock_seq.fetch_add(1, Ordering::AcqRel);
                sh.last_period_ns.store(deadline, Ordering::Release);
                sh.position.store(pos + 1, Ordering::Release);
                sh.clock_seq.fetch_add(1, Ordering::Release);
                sh.metrics.frames_played.fetch_add(bf, Ordering::Relaxed);
                sh.metrics.played_seq.store(state.last_seq, Ordering::Relaxed);
                // Free the slot in every ring and wake the writers.
                sh.table.for_each(|w| {
                    w.ring.set_read_index(pos + 1);
                    if w.running.load(Ordering::Relaxed) {
                        w.wake.notify();
                    }
                    true
                });
            }
            None => {
                sh.metrics.underruns.fetch_add(1, Ordering::Relaxed);
                sink.play(&silence);
            }
        }
        // Every reference into the table taken this period is dead now.
        // SeqCst pairs with the monitor's SeqCst clear-then-read-epoch (see SlotTable).
        sh.epoch.fetch_add(1, Ordering::SeqCst);
    }
}
