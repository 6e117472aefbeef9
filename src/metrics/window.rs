//! Rolling-window distribution of durations (render times, failover gaps, ...).
//!
//! # Real-time guarantees
//!
//! [`RollingWindow::new`] allocates the ring once; [`RollingWindow::push`] is O(1) and never
//! allocates, locks, logs or blocks, so it may run on the audio thread. [`RollingWindow::summary`]
//! allocates and sorts a copy: call it from the metrics/control side, not the audio thread.
//! The window itself is not synchronised; sharing it across threads is the owner's business.

/// The last `capacity` samples in any unit (milliseconds by convention), plus a total count.
#[derive(Debug, Clone)]
pub struct RollingWindow {
    /// Ring storage; only `buf[..len]` holds samples until the window has wrapped once.
    buf: Vec<f64>,
    /// Slot the next sample goes into (the oldest sample once the window is full).
    next: usize,
    len: usize,
    /// Samples ever accepted, including those that have rolled out of the window.
    count_total: u64,
    /// Their sum.
    sum_total: f64,
}

/// Distribution of the samples currently in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Most recent sample.
    pub last: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    /// Samples ever pushed (NaNs excluded), not just those still in the window.
    pub count: u64,
    /// The sum of those samples (a Prometheus summary's `_sum`).
    pub sum: f64,
}

impl RollingWindow {
    /// A window keeping the last `capacity` samples.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0: a window that keeps nothing has no distribution to report.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "RollingWindow capacity must be positive");
        RollingWindow { buf: vec![0.0; capacity], next: 0, len: 0, count_total: 0, sum_total: 0.0 }
    }

    /// Records a sample, evicting the oldest one when full. Never allocates.
    ///
    /// NaN is ignored (not stored, not counted) so that one bad measurement cannot poison every
    /// percentile that follows it.
    pub fn push(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        self.buf[self.next] = v;
        self.next = (self.next + 1) % self.buf.len();
        self.len = (self.len + 1).min(self.buf.len());
        self.count_total += 1;
        self.sum_total += v;
    }

    /// Samples currently in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Percentiles of the samples in the window; all zeros when it is empty. Allocates and
    /// sorts a copy, so keep it off the audio thread.
    pub fn summary(&self) -> Summary {
        if self.len == 0 {
            return Summary::default();
        }
        // `next` is one past the newest sample, wrapping.
        let last = self.buf[(self.next + self.buf.len() - 1) % self.buf.len()];
        // Until the ring wraps, `buf[..len]` is exactly the samples; after, it is all of `buf`.
        // Order does not matter once sorted.
        let mut sorted = self.buf[..self.len].to_vec();
        // total_cmp gives a total order without unwrap; NaN never gets in anyway.
        sorted.sort_unstable_by(f64::total_cmp);
        Summary {
            last,
            p50: percentile(&sorted, 50.0),
            p95: percentile(&sorted, 95.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            count: self.count_total,
            sum: self.sum_total,
        }
    }
}

/// Nearest-rank percentile of an ascending slice: the smallest sample such that at least `p`
/// percent of the samples are less than or equal to it. It always returns a sample that really
/// occurred, never an interpolation, so a p99 is a latency somebody actually heard.
///
/// `p` is clamped to `0..=100` (NaN counts as 0); `p = 0` gives the minimum, `p = 100` the
/// maximum. Returns 0.0 for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
    // Multiplying before dividing keeps whole `p` exact. A fractional `p` is itself inexact
    // (99.9 is not representable), so a product within float noise of a whole rank is taken as
    // that rank; a bare ceil would turn 999.0000000000001 into rank 1000.
    let exact = p * n as f64 / 100.0;
    let nearest = exact.round();
    let rank = if (exact - nearest).abs() <= 1e-9 * exact.max(1.0) { nearest } else { exact.ceil() };
    sorted[(rank as usize).clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_window_summarises_to_zeros() {
        assert_eq!(RollingWindow::new(4).summary(), Summary::default());
    }

    #[test]
    fn summary_of_one_to_hundred() {
        let mut w = RollingWindow::new(100);
        // Pushed in descending order, so the summary must really sort.
        for i in (1..=100).rev() {
            w.push(f64::from(i));
        }
        assert_eq!(
            w.summary(),
            Summary { last: 1.0, p50: 50.0, p95: 95.0, p99: 99.0, max: 100.0, count: 100, sum: 5050.0 }
        );
    }

    #[test]
    fn window_keeps_only_the_last_samples_but_counts_all() {
        let mut w = RollingWindow::new(3);
        for v in [100.0, 200.0, 1.0, 2.0, 3.0] {
            w.push(v);
        }
        assert_eq!(w.len(), 3);
        let s = w.summary();
        // 100 and 200 have rolled out: a spike is forgotten once the window moves past it.
        assert_eq!((s.last, s.p50, s.max, s.count), (3.0, 2.0, 3.0, 5));
        w.push(0.5);
        let s = w.summary();
        assert_eq!((s.last, s.p50, s.max, s.count), (0.5, 2.0, 3.0, 6));
    }

    #[test]
    fn nan_is_ignored() {
        let mut w = RollingWindow::new(4);
        w.push(1.0);
        w.push(f64::NAN);
        w.push(2.0);
        let s = w.summary();
        assert_eq!((s.last, s.max, s.count), (2.0, 2.0, 2));
        assert!(!s.p50.is_nan() && !s.p99.is_nan());
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn push_does_not_reallocate() {
        let mut w = RollingWindow::new(8);
        let ptr = w.buf.as_ptr();
        for i in 0..1000 {
            w.push(f64::from(i));
        }
        assert_eq!((w.buf.as_ptr(), w.buf.capacity()), (ptr, 8));
        assert_eq!(w.summary().max, 999.0);
    }

    #[test]
    #[should_panic(expected = "capacity must be positive")]
    fn zero_capacity_is_rejected() {
        RollingWindow::new(0);
    }

    #[test]
    fn percentile_edge_cases() {
        assert_eq!(percentile(&[], 50.0), 0.0);
        // One element: every percentile is that element.
        for p in [0.0, 1.0, 50.0, 99.9, 100.0] {
            assert_eq!(percentile(&[7.5], p), 7.5);
        }
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.0), 1.0, "p0 is the minimum");
        assert_eq!(percentile(&s, 100.0), 4.0, "p100 is the maximum");
        assert_eq!(percentile(&s, 25.0), 1.0, "exact rank boundary");
        assert_eq!(percentile(&s, 25.1), 2.0, "just past it rounds up");
        assert_eq!(percentile(&s, 50.0), 2.0, "nearest rank, not interpolated 2.5");
        assert_eq!(percentile(&s, -5.0), 1.0);
        assert_eq!(percentile(&s, 250.0), 4.0);
        assert_eq!(percentile(&s, f64::NAN), 1.0);
    }

    #[test]
    fn percentile_has_no_float_rounding_off_by_one() {
        let s: Vec<f64> = (1..=1000).map(f64::from).collect();
        // 99.9 / 100 * 1000 is 999.0000000000001 in f64; the rank must still be 999.
        assert_eq!(percentile(&s, 99.9), 999.0);
        assert_eq!(percentile(&s, 99.0), 990.0);
        let s: Vec<f64> = (1..=1500).map(f64::from).collect();
        // 2.2 * 1500 / 100 is 33.00000000000001 in f64.
        assert_eq!(percentile(&s, 2.2), 33.0);
    }
}
