//! The D-Bus API against a real dbus-daemon (private, system-bus configuration and the
//! project's policy), the real daemon binary, busctl, dbus-send and setpriv.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use audiowarden::dbus::{metric_keys, BUS_NAME, INTERFACE, OBJECT_PATH};
use common::bus::{get_bool, get_u64, proxy, rss_kib, Daemon, PrivateBus};
use common::wait_until;

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn call(bus: &PrivateBus, method: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["call", BUS_NAME, OBJECT_PATH, INTERFACE, method];
    a.extend_from_slice(args);
    bus.busctl(&a)
}

fn get_property(bus: &PrivateBus, name: &str) -> String {
    ok(&bus.busctl(&["get-property", BUS_NAME, OBJECT_PATH, INTERFACE, name]), name).trim().to_owned()
}

#[test]
fn busctl_calls_every_method_and_reads_every_property() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "busctl", &["--frequency", "440", "--gain", "0.25"]);

    assert_eq!(get_property(&bus, "Frequency"), "d 440");
    assert_eq!(get_property(&bus, "Gain"), "d 0.25");
    assert_eq!(get_property(&bus, "State"), "s \"running\"");
    assert_eq!(get_property(&bus, "SpareReady"), "b true");
    let pid: u32 = get_property(&bus, "PrimaryPid").strip_prefix("u ").unwrap().parse().unwrap();
    assert!(pid > 0);

    ok(&call(&bus, "SetFrequency", &["d", "880"]), "SetFrequency");
    ok(&call(&bus, "SetGain", &["d", "0.5"]), "SetGain");
    assert_eq!(get_property(&bus, "Frequency"), "d 880");
    assert_eq!(get_property(&bus, "Gain"), "d 0.5");
    // No configuration file here: nothing changes, nothing to restart, nothing refused.
    assert_eq!(ok(&call(&bus, "Reload", &[]), "Reload").trim(), "asasas 0 0 0");

    // GetMetrics: every key of the contract with its type.
    let json = ok(&bus.busctl(&["--json=short", "call", BUS_NAME, OBJECT_PATH, INTERFACE, "GetMetrics"]), "GetMetrics");
    let v: serde_json::Value = serde_json::from_str(&json).expect("busctl JSON");
    assert_eq!(v["type"], "a{sv}");
    let dict = &v["data"][0];
    for (key, sig) in metric_keys() {
        let entry = &dict[key.as_str()];
        assert_eq!(entry["type"], sig, "GetMetrics[{key}] should be of type {sig}: {entry}");
    }
    assert_eq!(dict["primary_pid"]["data"], pid);
    assert_eq!(dict["sample_rate"]["data"], 48000);
    assert_eq!(dict["control_received"]["data"], 2);
}

/// dbus-daemon restarts (every connection and name lost): the daemon plays on, notices within
/// its check interval, connects again and owns its name; the API works as before.
#[test]
fn the_daemon_reconnects_after_the_bus_restarts() {
    let mut bus = PrivateBus::start();
    let d = Daemon::start(&bus, "bus-restart", &[]);
    bus.restart();
    wait_until("the name owned again", Duration::from_secs(10), || {
        let out = bus.busctl(&["get-property", BUS_NAME, OBJECT_PATH, INTERFACE, "State"]);
        String::from_utf8_lossy(&out.stdout).trim() == "s \"running\""
    });
    ok(&call(&bus, "SetGain", &["d", "0.5"]), "SetGain after the restart");
    assert_eq!(get_property(&bus, "Gain"), "d 0.5");
    let log = d.log_text();
    assert!(log.contains("lost the system bus"), "{log}");
    let conn = bus.connection();
    assert_eq!(get_u64(&proxy(&conn).get_metrics().unwrap(), "underruns"), 0);
}

/// The shipped introspection XML describes the live interface exactly.
#[test]
fn live_introspection_matches_the_shipped_xml() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "introspect", &[]);
    let live = ok(&bus.busctl(&["introspect", "--xml-interface", BUS_NAME, OBJECT_PATH]), "introspect");
    let shipped = std::fs::read_to_string(common::bus::dbus_dir().join("org.audiowarden.Engine1.xml")).unwrap();
    let canon = |xml: &str| {
        let node = zbus_xml::Node::from_reader(xml.as_bytes()).expect("valid introspection XML");
        let iface = node.interfaces().iter().find(|i| i.name() == INTERFACE).expect("our interface").clone();
        let args = |a: &[zbus_xml::Arg]| {
            a.iter()
                .map(|a| format!("{}:{:?}:{:?}", a.name().unwrap_or(""), a.ty(), a.direction()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut items: Vec<String> = Vec::new();
        items.extend(
            iface.methods().iter().map(|m| format!("method {}({}) {:?}", m.name(), args(m.args()), m.annotations())),
        );
        items.extend(
            iface.signals().iter().map(|s| format!("signal {}({}) {:?}", s.name(), args(s.args()), s.annotations())),
        );
        items.extend(
            iface
                .properties()
                .iter()
                .map(|p| format!("property {} {:?} {:?} {:?}", p.name(), p.ty(), p.access(), p.annotations())),
        );
        items.sort();
        items
    };
    let (live, shipped) = (canon(&live), canon(&shipped));
    assert_eq!(live, shipped, "dbus/org.audiowarden.Engine1.xml differs from the live service");
    assert_eq!(live.len(), 5 + 1 + 5);
}

#[test]
fn failover_signal_and_metrics_after_sigkill_of_the_reported_primary() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "failover-signal", &[]);
    let conn = bus.connection();
    let p = proxy(&conn);
    let before = p.get_metrics().unwrap();
    let primary = get_u64(&before, "primary_pid") as u32;
    assert_eq!(p.primary_pid().unwrap(), primary);
    let mut failovers = p.receive_failover().unwrap();
    // PropertiesChanged, through a caching proxy (which follows the signal).
    let cached = audiowarden::dbus::Engine1ProxyBlocking::new(&conn).unwrap();
    let prx = common::bus::follow(cached.receive_primary_pid_changed());
    // The first item of the stream is the current value.
    assert_eq!(prx.recv_timeout(Duration::from_secs(5)).unwrap(), primary);

    common::signal(primary, libc::SIGKILL);

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(sig) = failovers.next() {
            let a = sig.args().unwrap();
            let _ = tx.send((a.old_pid, a.new_pid, a.failover_ms));
        }
    });
    let (old, new, ms) = rx.recv_timeout(Duration::from_secs(5)).expect("a Failover signal within 5 s");
    assert_eq!(old, primary);
    assert_ne!(new, primary);
    assert!(new > 0 && ms.is_finite() && ms >= 0.0, "Failover({old}, {new}, {ms})");

    let mut after = HashMap::new();
    wait_until("the rebuild", Duration::from_secs(5), || {
        after = p.get_metrics().unwrap();
        get_u64(&after, "replacements") == get_u64(&before, "replacements") + 1 && get_bool(&after, "spare_ready")
    });
    assert_eq!(get_u64(&after, "crash_count"), get_u64(&before, "crash_count") + 1);
    assert_eq!(get_u64(&after, "primary_pid") as u32, new);
    assert_eq!(get_u64(&after, "underruns"), 0);
    assert!(p.spare_ready().unwrap());
    assert_eq!(p.primary_pid().unwrap(), new);
    assert_eq!(p.state().unwrap(), "running");
    assert_eq!(prx.recv_timeout(Duration::from_secs(2)).expect("PropertiesChanged(PrimaryPid)"), new);
}

#[test]
fn bad_values_are_invalid_args_naming_the_range_and_change_nothing() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "invalid-args", &["--frequency", "440", "--gain", "0.25"]);
    let conn = bus.connection();
    let p = proxy(&conn);
    let bad_freq = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -440.0, 0.0, -0.0, 24_000.0, 96_000.0, 1e300];
    for hz in bad_freq {
        match p.set_frequency(hz) {
            Err(zbus::Error::MethodError(name, Some(msg), _)) => {
                assert_eq!(name.as_str(), "org.freedesktop.DBus.Error.InvalidArgs", "SetFrequency({hz})");
                assert!(msg.contains("0 < f < 24000"), "SetFrequency({hz}): message should name the range: {msg}");
            }
            other => panic!("SetFrequency({hz}) gave {other:?}, want InvalidArgs"),
        }
    }
    // Gain 0 is valid (mute); the bad ones are outside 0..=1 or not finite.
    for g in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5, -1e-9, 1.000001, 2.0, 1e300] {
        match p.set_gain(g) {
            Err(zbus::Error::MethodError(name, Some(msg), _)) => {
                assert_eq!(name.as_str(), "org.freedesktop.DBus.Error.InvalidArgs", "SetGain({g})");
                assert!(msg.contains("0 <= g <= 1"), "SetGain({g}): message should name the range: {msg}");
            }
            other => panic!("SetGain({g}) gave {other:?}, want InvalidArgs"),
        }
    }
    // The error's name as a plain D-Bus tool shows it.
    let out = bus
        .command("dbus-send")
        .args([
            "--system",
            "--print-reply",
            &format!("--dest={BUS_NAME}"),
            OBJECT_PATH,
            &format!("{INTERFACE}.SetGain"),
            "double:7",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("org.freedesktop.DBus.Error.InvalidArgs") && err.contains("0 <= g <= 1"),
        "{err}"
    );

    // Wrong types and arity are refused by the bus binding before any of our code runs.
    for args in [&["s", "loud"][..], &["u", "7"], &[]] {
        let out = call(&bus, "SetGain", args);
        assert!(!out.status.success(), "SetGain{args:?} was accepted");
    }

    assert_eq!(p.frequency().unwrap(), 440.0);
    assert_eq!(p.gain().unwrap(), 0.25);
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "control_received"), 0, "nothing was queued");
    assert_eq!(get_u64(&m, "control_rejected"), (bad_freq.len() + 8 + 1) as u64);
    assert_eq!(p.state().unwrap(), "running", "the daemon is unharmed");
}

/// The policy: anyone may read, only root and group audio may change the sound.
#[test]
fn unprivileged_users_read_metrics_but_only_group_audio_may_set() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "policy", &["--gain", "0.25"]);
    let as_user = |groups: &[&str], args: &[&str]| {
        let mut c = bus.command("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup"]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={}", groups.join(",")));
        }
        c.arg("busctl").arg("--system").args(args).output().unwrap()
    };
    let get_metrics = ["call", BUS_NAME, OBJECT_PATH, INTERFACE, "GetMetrics"];
    let set_gain = ["call", BUS_NAME, OBJECT_PATH, INTERFACE, "SetGain", "d", "0.5"];

    ok(&as_user(&[], &get_metrics), "GetMetrics as nobody");
    ok(&as_user(&[], &["get-property", BUS_NAME, OBJECT_PATH, INTERFACE, "Gain"]), "Get(Gain) as nobody");
    ok(&as_user(&[], &["introspect", BUS_NAME, OBJECT_PATH]), "introspect as nobody");
    for call in [&set_gain[..], &["call", BUS_NAME, OBJECT_PATH, INTERFACE, "Reload"]] {
        let denied = as_user(&[], call);
        let err = String::from_utf8_lossy(&denied.stderr);
        assert!(!denied.status.success() && err.to_lowercase().contains("access denied"), "{call:?} as nobody: {err}");
    }
    assert_eq!(get_property(&bus, "Gain"), "d 0.25");

    // A member of group audio may.
    ok(&as_user(&["audio"], &set_gain), "SetGain as nobody in group audio");
    assert_eq!(get_property(&bus, "Gain"), "d 0.5");
    // And nobody may own the name.
    let own = bus
        .command("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
        ])
        .args(["/org/freedesktop/DBus", "org.freedesktop.DBus.RequestName", &format!("string:{BUS_NAME}"), "uint32:4"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("AccessDenied"),
        "RequestName as nobody: {}",
        String::from_utf8_lossy(&own.stderr)
    );
}

/// 2,000 SetFrequency calls as fast as one client sends them (pipelined, not waiting for
/// each reply): zero underruns, every call counted and accounted for, the last value wins,
/// and the daemon's memory stays flat.
#[test]
fn a_flood_of_2000_set_frequency_calls() {
    let bus = PrivateBus::start();
    let d = Daemon::start(&bus, "flood", &[]);
    let conn = zbus::block_on(zbus::connection::Builder::address(bus.address.as_str()).unwrap().build()).unwrap();
    let p = zbus::block_on(
        audiowarden::dbus::Engine1Proxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build(),
    )
    .unwrap();
    // Pipelined, at most 64 calls in flight: the system bus allows 128 pending replies per
    // connection.
    let flood = |n: usize, base: f64| {
        use futures_util::StreamExt;
        let values: Vec<f64> = (0..n).map(|i| base + i as f64 * 0.25).collect();
        let results: Vec<_> = zbus::block_on(
            futures_util::stream::iter(values.iter().map(|&hz| p.set_frequency(hz))).buffered(64).collect(),
        );
        for r in results {
            r.expect("SetFrequency");
        }
        *values.last().unwrap()
    };
    let metrics = || zbus::block_on(p.get_metrics()).unwrap();
    let settle = |sent: u64| {
        let mut m = metrics();
        wait_until("every change played", Duration::from_secs(5), || {
            m = metrics();
            get_u64(&m, "control_applied") + get_u64(&m, "control_coalesced") == sent
        });
        m
    };
    metrics();
    let rss0 = rss_kib(d.pid());
    let last = flood(2000, 500.0);
    assert_eq!(get_u64(&metrics(), "control_received"), 2000);
    let m = settle(2000);
    let rss1 = rss_kib(d.pid());
    assert_eq!(get_u64(&m, "control_received"), 2000);
    let rewinds = ["control_rewinds", "control_rewritten_blocks", "control_rewrites_refused", "control_rewinds_failed"];
    let counts: Vec<(&str, u64)> = ["stale_blocks", "output_divergences", "control_late"]
        .iter()
        .chain(&rewinds)
        .map(|&k| (k, get_u64(&m, k)))
        .collect();
    eprintln!("flood: {counts:?}");
    assert_eq!(get_u64(&m, "underruns"), 0);
    assert_eq!(get_u64(&m, "control_late"), 0);
    assert_eq!(get_u64(&m, "control_undelivered"), 0);
    assert_eq!(zbus::block_on(p.frequency()).unwrap(), last);
    eprintln!(
        "flood: applied {} coalesced {}; rss {rss0} -> {rss1} KiB",
        get_u64(&m, "control_applied"),
        get_u64(&m, "control_coalesced")
    );
    // A second flood: memory must not grow with the number of calls.
    let last = flood(2000, 1000.0);
    let m = settle(4000);
    let rss2 = rss_kib(d.pid());
    eprintln!("second flood: rss {rss2} KiB");
    assert_eq!(get_u64(&m, "underruns"), 0);
    assert_eq!(zbus::block_on(p.frequency()).unwrap(), last);
    assert!(rss2 <= rss1 + 256, "resident memory grew from {rss1} to {rss2} KiB over the second 2000 calls");
    assert!(rss1 <= rss0 + 2048, "resident memory grew from {rss0} to {rss1} KiB over the first 2000 calls");
}
