//! Reopening a lost device off the audio thread.
//!
//! Opening (or closing) a device can block for as long as it likes: ALSA's JACK plugin waits
//! forever for a JACK server that is stopped (SIGSTOP) rather than gone, and a plugin's own
//! threads inherit the priority of the thread that opens it. So the output thread (SCHED_FIFO
//! 80) never opens or closes a device after start-up: it hands a lost device to a helper
//! thread of ordinary priority and plays the virtual clock meanwhile; the helper disposes of
//! the lost device, opens a new one with backoff (100 ms doubling to 2 s) and hands it back.
//!
//! Real-time guarantees: [`Reopener::lost`] and [`Reopener::take`] are wait-free (an rtrb push
//! or pop and an eventfd write); they never allocate, lock, log or block. A lost device that
//! finds the hand-over queue full (more losses than the helper has disposed of) is leaked,
//! not dropped on the audio thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{REOPEN_FIRST_NS, REOPEN_MAX_NS};
use crate::sys::EventFd;

/// Lost devices waiting for disposal, at most.
const LOST_CAPACITY: usize = 4;

/// The audio thread's end.
pub(crate) struct Reopener<T> {
    wake: Arc<EventFd>,
    wanted: Arc<AtomicBool>,
    opened: rtrb::Consumer<T>,
    lost: rtrb::Producer<(T, i32)>,
}

impl<T: Send + 'static> Reopener<T> {
    /// Starts the helper thread `name`: `open` makes a new device (an error is retried with
    /// backoff), `dispose` gets rid of a lost one (with the errno it was lost with).
    pub(crate) fn start<E>(
        name: &str,
        mut open: impl FnMut() -> Result<T, E> + Send + 'static,
        dispose: impl Fn(T, i32) + Send + 'static,
    ) -> std::io::Result<Reopener<T>> {
        let wake = Arc::new(EventFd::new(true)?);
        let wanted = Arc::new(AtomicBool::new(false));
        let (opened_tx, opened) = rtrb::RingBuffer::new(1);
        let (lost, lost_rx) = rtrb::RingBuffer::new(LOST_CAPACITY);
        let (w, want) = (wake.clone(), wanted.clone());
        std::thread::Builder::new().name(name.into()).spawn(move || {
            let (mut opened_tx, mut lost_rx): (rtrb::Producer<T>, rtrb::Consumer<(T, i32)>) = (opened_tx, lost_rx);
            let mut backoff = Duration::from_nanos(REOPEN_FIRST_NS);
            loop {
                let waiting = want.load(Ordering::Acquire);
                // Wanted: the next attempt after the backoff; else until the audio thread asks.
                w.wait(waiting.then_some(backoff));
                while let Ok((dev, errno)) = lost_rx.pop() {
                    dispose(dev, errno);
                }
                if opened_tx.is_abandoned() {
                    return; // the output thread is gone
                }
                if !want.load(Ordering::Acquire) || !waiting {
                    continue; // asked just now: wait the first backoff before trying
                }
                match open() {
                    Ok(dev) => {
                        want.store(false, Ordering::Release);
                        backoff = Duration::from_nanos(REOPEN_FIRST_NS);
                        // Capacity 1, and only asked for again after the last one was taken.
                        if let Err(rtrb::PushError::Full(dev)) = opened_tx.push(dev) {
                            dispose(dev, 0);
                        }
                    }
                    Err(_) => backoff = (backoff * 2).min(Duration::from_nanos(REOPEN_MAX_NS)),
                }
            }
        })?;
        Ok(Reopener { wake, wanted, opened, lost })
    }

    /// Audio thread: `dev` is gone (`errno`): the helper disposes of it and opens a new one.
    pub(crate) fn lost(&mut self, dev: T, errno: i32) {
        if let Err(rtrb::PushError::Full((dev, _))) = self.lost.push((dev, errno)) {
            std::mem::forget(dev); // never closed here; bounded by the losses
        }
        self.wanted.store(true, Ordering::Release);
        self.wake.notify();
    }

    /// Audio thread: the new device, once the helper has opened one.
    pub(crate) fn take(&mut self) -> Option<T> {
        self.opened.pop().ok()
    }
}

impl<T> Drop for Reopener<T> {
    fn drop(&mut self) {
        // The helper sees its queue abandoned and ends (unless it is stuck in an open, which
        // it then leaves when that returns; nothing waits for it).
        self.wake.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open that blocks does not block the audio thread's side; the device arrives when
    /// the open returns, and lost devices are disposed of on the helper.
    #[test]
    fn a_blocking_open_never_blocks_the_audio_side() {
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let disposed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = disposed.clone();
        let mut r = Reopener::start(
            "test-reopen",
            move || {
                g.wait(); // blocks until the test lets it through
                Ok::<u32, ()>(7)
            },
            move |dev, errno| d.lock().unwrap().push((dev, errno)),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        r.lost(1, libc::ETIMEDOUT);
        for _ in 0..50 {
            assert!(r.take().is_none());
            std::thread::sleep(Duration::from_millis(4));
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "lost/take waited");
        gate.wait();
        let t0 = std::time::Instant::now();
        let dev = loop {
            if let Some(d) = r.take() {
                break d;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no device");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(dev, 7);
        assert_eq!(*disposed.lock().unwrap(), [(1, libc::ETIMEDOUT)]);
    }
}
