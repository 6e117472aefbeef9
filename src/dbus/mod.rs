//! The D-Bus contract, in one place for the daemon, `audiowardenctl` and the tests: the bus
//! name, object path and interface, the proxy, and the keys and types of `GetMetrics`.
//!
//! The service side is in [`service`]; [`peer`] serves it without a bus, on a socket. The shipped description of the interface is
//! `dbus/org.audiowarden.Engine1.xml`; a test compares it with the live introspection.

pub mod peer;
pub mod service;

use std::collections::HashMap;

use zbus::zvariant::OwnedValue;

use crate::metrics::{count_key, Kind, MetricsSnapshot, Value, METRICS};

pub const BUS_NAME: &str = "org.audiowarden.Engine1";
pub const OBJECT_PATH: &str = "/org/audiowarden/Engine1";
pub const INTERFACE: &str = "org.audiowarden.Engine1";

/// The client side of `org.audiowarden.Engine1` (`Engine1Proxy`, and `Engine1ProxyBlocking`).
#[zbus::proxy(
    interface = "org.audiowarden.Engine1",
    default_service = "org.audiowarden.Engine1",
    default_path = "/org/audiowarden/Engine1"
)]
pub trait Engine1 {
    /// Queues a frequency change (Hz, 0 < hz < sample_rate / 2); returns once every worker
    /// has it. It takes effect at its stamped frame, a few blocks ahead.
    fn set_frequency(&self, hz: f64) -> zbus::Result<()>;

    /// Queues a linear gain change (0..=1).
    fn set_gain(&self, gain: f64) -> zbus::Result<()>;

    /// Every metric, keyed as in [`metrics_dict`].
    fn get_metrics(&self) -> zbus::Result<HashMap<String, OwnedValue>>;

    /// Every metric in the Prometheus text exposition format.
    fn get_metrics_prometheus(&self) -> zbus::Result<String>;

    /// (applied, needs_restart, refused).
    fn reload(&self) -> zbus::Result<(Vec<String>, Vec<String>, Vec<String>)>;

    #[zbus(property)]
    fn frequency(&self) -> zbus::Result<f64>;

    #[zbus(property)]
    fn gain(&self) -> zbus::Result<f64>;

    /// starting, running, degraded (playing without a ready standby) or stopping.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn spare_ready(&self) -> zbus::Result<bool>;

    #[zbus(property)]
    fn primary_pid(&self) -> zbus::Result<u32>;

    /// The standby took over from a dead or hung primary.
    #[zbus(signal)]
    fn failover(&self, old_pid: u32, new_pid: u32, failover_ms: f64) -> zbus::Result<()>;
}

/// D-Bus counts are `u` (u32); a counter that somehow passes 4 billion saturates.
fn u(v: u64) -> OwnedValue {
    OwnedValue::from(u32::try_from(v).unwrap_or(u32::MAX))
}

/// A scalar metric as its declared D-Bus type.
fn scalar(sig: &str, v: Value<'_>) -> OwnedValue {
    let as_u64 = |v: Value<'_>| match v {
        Value::U64(x) => x,
        Value::U32(x) => u64::from(x),
        Value::F64(x) => x as u64,
        Value::Bool(b) => u64::from(b),
        _ => 0,
    };
    match (sig, v) {
        ("b", Value::Bool(b)) => b.into(),
        ("d", Value::F64(x)) => x.into(),
        ("s", Value::Str(s)) => OwnedValue::try_from(zbus::zvariant::Value::from(s)).expect("a string is a value"),
        ("t", v) => as_u64(v).into(),
        (_, v) => u(as_u64(v)),
    }
}

/// `GetMetrics`' dictionary, from the declarations (metrics/declare.rs). The types are part
/// of the contract: counters of events `u`, sample and frame counts `t`, times and
/// percentages `d`, flags `b`. A distribution `x_ms` is its last value, with `x_ms_p50`,
/// `_p95`, `_p99`, `_max` and a `u` count `x_count` (`detection_time_ms` counts as
/// `detection_count`); a histogram `x_us` is `x_us_p50`, `_p99` and `_max`.
pub fn metrics_dict(m: &MetricsSnapshot) -> HashMap<String, OwnedValue> {
    let mut d: HashMap<String, OwnedValue> = HashMap::with_capacity(96);
    m.each(|decl, v| match v {
        Value::Dist(s) => {
            d.insert(decl.name.to_owned(), s.last.into());
            for (suffix, x) in [("p50", s.p50), ("p95", s.p95), ("p99", s.p99), ("max", s.max)] {
                d.insert(format!("{}_{suffix}", decl.name), x.into());
            }
            d.insert(count_key(decl.name), u(s.count));
        }
        Value::Hist(h) => {
            for (suffix, x) in [("p50", h.p50), ("p99", h.p99), ("max", h.max)] {
                d.insert(format!("{}_{suffix}", decl.name), u(x));
            }
        }
        v => {
            d.insert(decl.name.to_owned(), scalar(decl.dbus, v));
        }
    });
    d
}

/// Every key `GetMetrics` carries, with its D-Bus signature, from the declarations; tests
/// check the live dictionary against it.
pub fn metric_keys() -> Vec<(String, &'static str)> {
    let mut keys = Vec::new();
    for decl in METRICS {
        match decl.kind {
            Kind::Distribution => {
                keys.push((decl.name.to_owned(), "d"));
                for suffix in ["p50", "p95", "p99", "max"] {
                    keys.push((format!("{}_{suffix}", decl.name), "d"));
                }
                keys.push((count_key(decl.name), "u"));
            }
            Kind::Histogram => {
                for suffix in ["p50", "p99", "max"] {
                    keys.push((format!("{}_{suffix}", decl.name), "u"));
                }
            }
            _ => keys.push((decl.name.to_owned(), decl.dbus)),
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_dict_has_every_declared_key_with_its_type_and_nothing_else() {
        let m = MetricsSnapshot::default();
        let d = metrics_dict(&m);
        let keys = metric_keys();
        for (k, sig) in &keys {
            let v = d.get(k).unwrap_or_else(|| panic!("missing {k}"));
            assert_eq!(v.value_signature().to_string(), *sig, "{k}");
        }
        assert_eq!(d.len(), keys.len(), "undeclared keys in the dictionary");
    }

    /// The keys of the D-Bus contract that existed before the metrics were declared in one
    /// place: still there, with the same types.
    #[test]
    fn the_keys_clients_know_keep_their_types() {
        let keys = metric_keys();
        for (k, sig) in [
            ("crash_count", "u"),
            ("replacements", "u"),
            ("spare_ready", "b"),
            ("shm_leaks", "u"),
            ("failover_time_ms", "d"),
            ("failover_time_ms_p99", "d"),
            ("rebuild_time_ms_max", "d"),
            ("detection_count", "u"),
            ("underruns", "t"),
            ("frames_played", "t"),
            ("control_received", "t"),
            ("control_applied", "t"),
            ("control_coalesced", "t"),
            ("control_busy", "t"),
            ("control_latency_p95_samples", "u"),
            ("control_latency_p99_samples", "u"),
            ("primary_pid", "u"),
            ("spare_pid", "u"),
            ("realtime", "b"),
            ("cpu_percent", "d"),
            ("sample_rate", "u"),
            ("uptime_s", "d"),
            ("device", "s"),
            ("period_frames", "u"),
            ("buffer_frames", "u"),
            ("output_latency_ms", "d"),
            ("device_xruns", "t"),
            ("output_wake_late_us_p99", "u"),
            ("block_frames", "u"),
        ] {
            assert!(keys.iter().any(|(key, s)| key == k && *s == sig), "{k}: {sig}");
        }
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let m = MetricsSnapshot { crash_count: u64::from(u32::MAX) + 5, ..Default::default() };
        let d = metrics_dict(&m);
        assert_eq!(u32::try_from(&d["crash_count"]).unwrap(), u32::MAX);
    }
}
