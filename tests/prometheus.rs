//! Prometheus metrics, checked by the real tools: `promtool check metrics` (Debian's prometheus)
//! accepts both the daemon's textfile and `audiowardenctl metrics --prometheus`, and a real
//! node_exporter (prometheus-node-exporter) with the textfile collector scrapes the
//! `audiowarden_*` series, whose values match GetMetrics after a kill.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bus::{get_bool, get_u64, proxy, Daemon, PrivateBus};
use common::wait_until;

fn promtool_accepts(text: &str) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused it: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "promtool lint: {out:?}");
}

/// The value of the sample line `series` (name and labels, exactly) in an exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// node_exporter reading `dir`, on a free loopback port; killed (by its pid) on drop.
struct NodeExporter {
    child: std::process::Child,
    port: u16,
}

impl NodeExporter {
    fn start(dir: &std::path::Path) -> NodeExporter {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("prometheus-node-exporter")
            .args(["--collector.disable-defaults", "--collector.textfile"])
            .arg(format!("--collector.textfile.directory={}", dir.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-node-exporter is installed");
        NodeExporter { child, port }
    }

    /// GET /metrics (None until it listens).
    fn scrape(&self) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn promtool_accepts_the_metrics_and_node_exporter_scrapes_them_with_get_metrics_values() {
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("audiowarden.prom");
    let mut d = Daemon::start(&bus, "prom", &["--prometheus-textfile", prom.to_str().unwrap()]);
    let conn = bus.connection();
    let p = proxy(&conn);
    // A kill and its failover, so that counters and the summaries are not all zero.
    let primary = get_u64(&p.get_metrics().unwrap(), "primary_pid") as u32;
    common::signal(primary, libc::SIGKILL);
    wait_until("rebuilt after the kill", Duration::from_secs(5), || {
        let m = p.get_metrics().unwrap();
        get_u64(&m, "replacements") >= 1 && get_bool(&m, "spare_ready")
    });
    // The textfile is rewritten once a second: wait for one written after the rebuild.
    wait_until("the textfile shows the kill", Duration::from_secs(5), || {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.contains("audiowarden_crash_count_total 1"))
    });
    let file = std::fs::read_to_string(&prom).unwrap();
    promtool_accepts(&file);
    let out = bus.command(env!("CARGO_BIN_EXE_audiowardenctl")).args(["metrics", "--prometheus"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let ctl = String::from_utf8(out.stdout).unwrap();
    promtool_accepts(&ctl);

    // The same values as GetMetrics (taken now: nothing moves between these but time).
    let m = p.get_metrics().unwrap();
    for (series, key) in [
        ("audiowarden_crash_count_total", "crash_count"),
        ("audiowarden_replacements_total", "replacements"),
        ("audiowarden_failover_time_seconds_count", "failover_count"),
        ("audiowarden_underruns_total", "underruns"),
        ("audiowarden_shm_leaks", "shm_leaks"),
        ("audiowarden_primary_pid", "primary_pid"),
    ] {
        assert_eq!(sample(&ctl, series), get_u64(&m, key) as f64, "{series} vs {key}");
    }
    assert_eq!(sample(&ctl, "audiowarden_spare_ready"), 1.0);
    let p99_ms = match &*m["failover_time_ms_p99"] {
        zbus::zvariant::Value::F64(x) => *x,
        v => panic!("{v:?}"),
    };
    assert_eq!(sample(&ctl, "audiowarden_failover_time_seconds{quantile=\"0.99\"}"), p99_ms / 1e3);
    assert!(sample(&ctl, "audiowarden_output_wake_late_seconds_count") > 0.0);

    // A real scrape through node_exporter's textfile collector.
    let exporter = NodeExporter::start(dir.path());
    let mut scraped = String::new();
    wait_until("node_exporter serves the textfile", Duration::from_secs(10), || {
        scraped = exporter.scrape().unwrap_or_default();
        scraped.contains("audiowarden_crash_count_total")
    });
    assert_eq!(sample(&scraped, "audiowarden_crash_count_total"), 1.0);
    assert_eq!(sample(&scraped, "audiowarden_spare_ready"), 1.0);
    assert!(scraped.contains("node_textfile_scrape_error 0"), "{scraped}");
    assert!(d.stop().success());
    assert!(!prom.exists(), "a stopped service leaves no metrics behind");
}
