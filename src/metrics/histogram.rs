//! A lock-free histogram of microsecond values for the audio thread: recording is three relaxed
//! atomic operations (its bucket, the max, the sum), no allocation, no lock. Buckets are exact below 16 µs, then four per
//! power of two (a value is reported as its bucket's upper bound: at most 25 % high); the
//! maximum is exact.

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: usize = 16 + 4 * 40;

pub struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    max: AtomicU64,
    /// Of every value recorded (wraps after 584,000 years of microseconds).
    sum: AtomicU64,
}

/// Upper bounds (inclusive, µs) at which the cumulative counts are exported (Prometheus
/// buckets): 2^k - 1, each the upper bound of one of the recorder's buckets, so the counts are
/// exact; then +Inf.
pub const EXPORTED_BOUNDS_US: [u64; 14] =
    [15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16_383, 32_767, 65_535, 131_071];

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

fn index(v: u64) -> usize {
    if v < 16 {
        return v as usize;
    }
    let octave = 63 - v.leading_zeros() as usize; // >= 4
    let sub = ((v >> (octave - 2)) & 3) as usize;
    (16 + (octave - 4) * 4 + sub).min(BUCKETS - 1)
}

/// The largest value that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let octave = (i - 16) / 4 + 4;
    let sub = ((i - 16) % 4) as u64;
    ((4 + sub + 1) << (octave - 2)) - 1
}

/// p50, p99, max and count of what was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct HistogramSummary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub count: u64,
    /// Of every value recorded.
    pub sum: u64,
    /// Values recorded at or below each of [`EXPORTED_BOUNDS_US`].
    pub cumulative: [u64; EXPORTED_BOUNDS_US.len()],
}

impl AtomicHistogram {
    /// Audio-thread safe.
    pub fn record(&self, us: u64) {
        self.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
        self.sum.fetch_add(us, Ordering::Relaxed);
    }

    pub fn summary(&self) -> HistogramSummary {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Ordering::Relaxed);
        let at = |p: f64| {
            if total == 0 {
                return 0;
            }
            let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper(i).min(max);
                }
            }
            max
        };
        let mut cumulative = [0; EXPORTED_BOUNDS_US.len()];
        for (c, &le) in cumulative.iter_mut().zip(&EXPORTED_BOUNDS_US) {
            *c = counts.iter().enumerate().filter(|&(i, _)| upper(i) <= le).map(|(_, n)| n).sum();
        }
        let sum = self.sum.load(Ordering::Relaxed);
        HistogramSummary { p50: at(50.0), p99: at(99.0), max, count: total, sum, cumulative }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_with_bounded_error() {
        for v in (0..100_000u64).chain([1 << 20, 123_456_789, u64::MAX / 2]) {
            let i = index(v);
            assert!(upper(i) >= v.min(upper(BUCKETS - 1)), "{v} in bucket {i} up to {}", upper(i));
            if v >= 16 && i < BUCKETS - 1 {
                assert!(upper(i) as f64 <= v as f64 * 1.25 + 1.0, "{v}: {}", upper(i));
            }
        }
    }

    #[test]
    fn percentiles_and_exact_max() {
        let h = AtomicHistogram::default();
        for v in 1..=100 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.max, 100);
        assert!((50..=63).contains(&s.p50), "{s:?}");
        assert!((99..=100).contains(&s.p99), "{s:?}");
    }
}
