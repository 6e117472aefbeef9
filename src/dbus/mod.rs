//! The D-Bus contract, in one place for the daemon, `audiowardenctl` and the tests: the bus
//! name, object path and interface, the proxy, and the keys and types of `GetMetrics`.
//!
//! The service side is in [`service`]. The shipped description of the interface is
//! `dbus/org.audiowarden.Engine1.xml`; a test compares it with the live introspection.

pub mod service;

use std::collections::HashMap;

use zbus::zvariant::OwnedValue;

use crate::metrics::{Dist, MetricsSnapshot};

pub const BUS_NAME: &str = "org.audiowarden.Engine1";
pub const OBJECT_PATH: &str = "/org/audiowarden/Engine1";
pub const INTERFACE: &str = "org.audiowarden.Engine1";

/// The client side of `org.audiowarden.Engine1` (`Engine1Proxy`, and `Engine1ProxyBlocking`).
#[zbus::proxy(interface = "org.audiowarden.Engine1", default_service = "org.audiowarden.Engine1", default_path = "/org/audiowarden/Engine1")]
pub trait Engine1 {
    /// Queues a frequency change (Hz, 0 < hz < sample_rate / 2); returns once every worker
    /// has it. It takes effect at its stamped frame, a few blocks ahead.
    fn set_frequency(&self, hz: f64) -> zbus::Result<()>;

    /// Queues a linear gain change (0..=1).
    fn set_gain(&self, gain: f64) -> zbus::Result<()>;

    /// Every metric, keyed as in [`metrics_dict`].
    fn get_metrics(&self) -> zbus::Result<HashMap<String, OwnedValue>>;

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

/// `GetMetrics`' dictionary. The types are part of the contract: counters of events `u`,
/// sample and frame counts `t`, times and percentages `d`, flags `b`. A distribution `x_ms`
/// is its last value, with `x_ms_p50`, `_p95`, `_p99`, `_max` and `x_count`.
pub fn metrics_dict(m: &MetricsSnapshot, block_frames: u32) -> HashMap<String, OwnedValue> {
    let mut d: HashMap<String, OwnedValue> = HashMap::with_capacity(64);
    let mut put = |k: &str, v: OwnedValue| {
        d.insert(k.to_owned(), v);
    };
    put("crash_count", u(m.crash_count));
    put("replacements", u(m.replacements));
    put("spare_ready", m.spare_ready.into());
    put("shm_leaks", u(m.shm_leaks));
    put("shm_segments", u(m.shm_segments));
    put("stale_segments_reclaimed", u(m.stale_segments_reclaimed));
    put("hang_kills", u(m.hang_kills));
    put("state_resyncs", u(m.state_resyncs));
    put("throttled_spawns", u(m.throttled_spawns));
    let mut dist = |name: &str, s: &Dist| {
        put(name, s.last.into());
        put(&format!("{name}_p50"), s.p50.into());
        put(&format!("{name}_p95"), s.p95.into());
        put(&format!("{name}_p99"), s.p99.into());
        put(&format!("{name}_max"), s.max.into());
        put(&format!("{}_count", name.trim_end_matches("_time_ms")), u(s.count));
    };
    dist("detection_time_ms", &m.detection_time_ms);
    dist("failover_time_ms", &m.failover_time_ms);
    dist("rebuild_time_ms", &m.rebuild_time_ms);
    put("underruns", m.underruns.into());
    put("frames_played", m.frames_played.into());
    put("device", OwnedValue::try_from(zbus::zvariant::Value::from(m.device.as_str())).expect("a string is a value"));
    put("period_frames", m.period_frames.into());
    put("buffer_frames", m.buffer_frames.into());
    put("output_latency_ms", m.output_latency_ms.into());
    put("device_xruns", m.device_xruns.into());
    put("device_losses", m.device_losses.into());
    put("output_wake_late_us_p50", u(m.output_wake_late_us.p50));
    put("output_wake_late_us_p99", u(m.output_wake_late_us.p99));
    put("output_wake_late_us_max", u(m.output_wake_late_us.max));
    put("control_received", m.control_received.into());
    put("control_applied", m.control_applied.into());
    put("control_coalesced", m.control_coalesced.into());
    put("control_rejected", m.control_rejected.into());
    put("control_busy", m.control_busy.into());
    put("control_undelivered", m.control_undelivered.into());
    put("control_late", m.control_late.into());
    put("control_latency_p95_samples", u(m.control_latency_p95_samples));
    put("control_latency_p99_samples", u(m.control_latency_p99_samples));
    put("primary_pid", m.primary_pid.into());
    put("spare_pid", m.spare_pid.into());
    put("reserve_pid", m.reserve_pid.into());
    put("realtime", m.realtime.into());
    put("cpu_percent", m.cpu_percent.into());
    put("sample_rate", m.sample_rate.into());
    put("block_frames", block_frames.into());
    put("uptime_s", m.uptime_s.into());
    d
}

/// Every key `GetMetrics` must carry with its D-Bus signature (the list); tests
/// check the live dictionary against it.
pub const REQUIRED_METRICS: &[(&str, &str)] = &[
    ("crash_count", "u"),
    ("replacements", "u"),
    ("spare_ready", "b"),
    ("shm_leaks", "u"),
    ("failover_time_ms", "d"),
    ("failover_time_ms_p50", "d"),
    ("failover_time_ms_p95", "d"),
    ("failover_time_ms_p99", "d"),
    ("failover_time_ms_max", "d"),
    ("rebuild_time_ms", "d"),
    ("rebuild_time_ms_p50", "d"),
    ("rebuild_time_ms_p95", "d"),
    ("rebuild_time_ms_p99", "d"),
    ("rebuild_time_ms_max", "d"),
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
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_dict_has_every_required_key_with_its_type() {
        let m = MetricsSnapshot::default();
        let d = metrics_dict(&m, 64);
        for (k, sig) in REQUIRED_METRICS {
            let v = d.get(*k).unwrap_or_else(|| panic!("missing {k}"));
            assert_eq!(v.value_signature().to_string(), *sig, "{k}");
        }
    }

    #[test]
    fn counts_saturate_instead_of_wrapping() {
        let m = MetricsSnapshot { crash_count: u64::from(u32::MAX) + 5, ..Default::default() };
        let d = metrics_dict(&m, 64);
        assert_eq!(u32::try_from(&d["crash_count"]).unwrap(), u32::MAX);
    }
}
