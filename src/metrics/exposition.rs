//! Every metric in the Prometheus text exposition format, generated from the declarations
//! ([`super::declare`]) and encoded by the `prometheus` crate's `TextEncoder` (its plain data
//! model, without protobuf). Names are `audiowarden_<name>` with the unit in the name, in base
//! units (`_seconds`, `_ratio`; `_frames`, `_samples`, `_hertz` as counted), counters end in
//! `_total`, flags are 0 or 1, a string is `<name>_info{value="..."} 1`.
//!
//! The rolling windows (detection, failover, rebuild times) are not histograms: each is a
//! summary (quantiles 0.5, 0.95 and 0.99 of its window, `_sum` and `_count` of every sample
//! ever) and a `_max` gauge of its window. The output thread's wake-up lateness is a real
//! histogram of every wake-up since start, with cumulative buckets at 2^k - 1 µs (bounds of the
//! recorder's own buckets, so every count is exact).

use prometheus::proto::Summary as PromSummary;
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile};

use super::declare::{Decl, Kind, MetricsSnapshot, Value};
use super::histogram::{HistogramSummary, EXPORTED_BOUNDS_US};
use super::window::Summary;

/// The whole exposition, as a scrape or the textfile collector reads it.
pub fn text(m: &MetricsSnapshot) -> String {
    let mut families = Vec::new();
    m.each(|decl, v| families.extend(families_of(decl, v)));
    // Only fails on a family without a name or a sample, which families_of never builds.
    prometheus::TextEncoder::new().encode_to_string(&families).unwrap_or_default()
}

/// The exported name (without `_total`) and what a declared value is divided by to be in the
/// base unit (a division, not a product with 1e-6: 15 µs is then printed 0.000015).
fn name_and_scale(decl: &Decl) -> (String, f64) {
    let n = decl.name;
    let (stem, unit, scale) = match decl.unit {
        "ms" => (n.strip_suffix("_ms").unwrap_or(n), "seconds", 1e3),
        "us" => (n.strip_suffix("_us").unwrap_or(n), "seconds", 1e6),
        "s" => (n.strip_suffix("_s").unwrap_or(n), "seconds", 1.0),
        "percent" => (n.strip_suffix("_percent").unwrap_or(n), "ratio", 1e2),
        "Hz" => (n, "hertz", 1.0),
        // Counted units already in the name (frames_played, period_frames, ..._samples), and
        // pids: as they are.
        _ => (n, "", 1.0),
    };
    let name = if unit.is_empty() { format!("audiowarden_{stem}") } else { format!("audiowarden_{stem}_{unit}") };
    (name, scale)
}

fn family(name: String, help: &str, kind: MetricType, metric: Metric) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name);
    f.set_help(help.to_owned());
    f.set_field_type(kind);
    f.set_metric(vec![metric]);
    f
}

fn gauge(name: String, help: &str, v: f64) -> MetricFamily {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_gauge(g);
    family(name, help, MetricType::GAUGE, m)
}

fn counter(name: String, help: &str, v: f64) -> MetricFamily {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_counter(c);
    family(name, help, MetricType::COUNTER, m)
}

fn families_of(decl: &Decl, v: Value<'_>) -> Vec<MetricFamily> {
    let (name, scale) = name_and_scale(decl);
    let help = decl.doc.trim();
    let number = |x: f64| x / scale;
    match v {
        Value::Dist(s) => summary(name, help, s, scale),
        Value::Hist(h) => vec![histogram(name, help, h, scale)],
        Value::Str(s) => {
            let mut label = LabelPair::default();
            label.set_name("value".to_owned());
            label.set_value(s.to_owned());
            let mut g = Gauge::default();
            g.set_value(1.0);
            let mut m = Metric::default();
            m.set_label(vec![label]);
            m.set_gauge(g);
            vec![family(format!("{name}_info"), help, MetricType::GAUGE, m)]
        }
        Value::Bool(b) => vec![gauge(name, help, f64::from(u8::from(b)))],
        Value::U64(x) => vec![scalar(decl, name, help, number(x as f64))],
        Value::U32(x) => vec![scalar(decl, name, help, number(f64::from(x)))],
        Value::F64(x) => vec![scalar(decl, name, help, number(x))],
    }
}

fn scalar(decl: &Decl, name: String, help: &str, v: f64) -> MetricFamily {
    match decl.kind {
        Kind::Counter => counter(format!("{name}_total"), help, v),
        _ => gauge(name, help, v),
    }
}

/// A rolling window: the summary of its quantiles and of every sample ever, and its max.
fn summary(name: String, help: &str, s: &Summary, scale: f64) -> Vec<MetricFamily> {
    let quantiles = [(0.5, s.p50), (0.95, s.p95), (0.99, s.p99)]
        .into_iter()
        .map(|(q, v)| {
            let mut x = Quantile::default();
            x.set_quantile(q);
            x.set_value(v / scale);
            x
        })
        .collect();
    let mut p = PromSummary::default();
    p.set_quantile(quantiles);
    p.set_sample_count(s.count);
    p.set_sample_sum(s.sum / scale);
    let mut m = Metric::default();
    m.set_summary(p);
    let max_help = format!("The largest in the window of {name}.");
    vec![family(name.clone(), help, MetricType::SUMMARY, m), gauge(format!("{name}_max"), &max_help, s.max / scale)]
}

/// The histogram of every value since start, with its exact cumulative buckets.
fn histogram(name: String, help: &str, h: &HistogramSummary, scale: f64) -> MetricFamily {
    let buckets = EXPORTED_BOUNDS_US
        .iter()
        .zip(h.cumulative)
        .map(|(&le, count)| {
            let mut b = Bucket::default();
            b.set_upper_bound(le as f64 / scale);
            b.set_cumulative_count(count);
            b
        })
        .collect();
    let mut p = Histogram::default();
    p.set_bucket(buckets);
    p.set_sample_count(h.count);
    p.set_sample_sum(h.sum as f64 / scale);
    let mut m = Metric::default();
    m.set_histogram(p);
    family(name, help, MetricType::HISTOGRAM, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_base_units_and_counters_end_in_total() {
        let text = text(&MetricsSnapshot::default());
        for want in [
            "# TYPE audiowarden_crash_count_total counter",
            "# TYPE audiowarden_detection_time_seconds summary",
            "audiowarden_detection_time_seconds{quantile=\"0.99\"} 0",
            "audiowarden_detection_time_seconds_count 0",
            "# TYPE audiowarden_detection_time_seconds_max gauge",
            "# TYPE audiowarden_output_wake_late_seconds histogram",
            "audiowarden_output_wake_late_seconds_bucket{le=\"+Inf\"} 0",
            "# TYPE audiowarden_uptime_seconds gauge",
            "# TYPE audiowarden_cpu_ratio gauge",
            "# TYPE audiowarden_sample_rate_hertz gauge",
            "audiowarden_device_info{value=\"\"} 1",
            "# TYPE audiowarden_spare_ready gauge",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("_ms"), "a millisecond name left:\n{text}");
    }
}
