//! Structured logging into a real systemd-journald: the daemon runs in a mount namespace whose
//! /run holds a journal socket (tests/support/with-journald.sh); a failover there must leave
//! journal entries with their fields.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bus::{get_bool, get_u64, proxy, PrivateBus};
use common::{wait_until, ShmDir};

/// The namespace's script. Dropping it (also when the test fails) tells the script to stop
/// the daemon and dump the journal, and waits for it; killed by PID as a last resort.
struct Namespace {
    child: std::process::Child,
    work: std::path::PathBuf,
}

impl Namespace {
    fn finish(&mut self) -> std::process::ExitStatus {
        let _ = std::fs::write(self.work.join("stop"), b"");
        common::wait_child(&mut self.child, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("the journald namespace did not finish")
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::fs::write(self.work.join("stop"), b"");
            if common::wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

#[test]
fn a_failover_is_in_the_journal_with_structured_fields() {
    let bus = PrivateBus::start();
    let shm = ShmDir::new("journald");
    let work = tempfile::Builder::new().prefix("aw-test-journald-").tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/with-journald.sh");
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "bash"])
        .arg(&script)
        .arg(work.path())
        .arg(env!("CARGO_BIN_EXE_audiowardend"))
        .arg("--shm-dir")
        .arg(&shm.0)
        .args(["--output", "virtual"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("RUST_LOG", "info")
        .env_remove("AUDIOWARDEN_LOG")
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut ns = Namespace { child, work: work.path().to_owned() };

    let conn = bus.connection();
    let p = proxy(&conn);
    wait_until("the daemon running on the bus", Duration::from_secs(10), || p.state().is_ok_and(|s| s == "running"));
    let realtime = get_bool(&p.get_metrics().unwrap(), "realtime");
    // A client looping on a bad value: logged at most 10 times a second, then summed up.
    for _ in 0..30 {
        assert!(p.set_gain(2.0).is_err(), "a rejected call, to be logged");
    }
    let old = p.primary_pid().unwrap();
    common::signal(old, libc::SIGKILL);
    let mut new = 0;
    wait_until("a rebuilt spare", Duration::from_secs(5), || {
        let m = p.get_metrics().unwrap();
        new = get_u64(&m, "primary_pid") as u32;
        get_u64(&m, "replacements") == 1 && get_bool(&m, "spare_ready") && new != old
    });
    // The dead worker's segments are reclaimed a little later.
    std::thread::sleep(Duration::from_millis(300));
    // A rejection in a later second reports how many were not logged before it.
    std::thread::sleep(Duration::from_millis(1100));
    assert!(p.set_gain(2.0).is_err());
    let status = ns.finish();
    assert!(status.success(), "with-journald.sh failed: {status}");
    assert_eq!(
        std::fs::read_to_string(work.path().join("cmd.status")).unwrap().trim(),
        "0",
        "audiowardend exit status"
    );

    let journal = std::fs::read_to_string(work.path().join("journal.json")).unwrap();
    let entries: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["SYSLOG_IDENTIFIER"] == "audiowardend")
        .collect();
    let find = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let hits: Vec<_> = entries.iter().filter(|e| pred(e)).collect();
        assert_eq!(hits.len(), 1, "want exactly one journal entry for {what}, got {}:\n{journal}", hits.len());
        hits[0].clone()
    };
    let s = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or("").to_owned();

    find("the start", &|e| s(e, "MESSAGE").starts_with("playing 440 Hz"));
    let died = find("the death", &|e| e.get("STATUS").is_some() && s(e, "WORKER_PID") == old.to_string());
    assert_eq!(s(&died, "ROLE"), "primary");
    assert_eq!(s(&died, "PRIORITY"), "4", "a death is a warning");
    let fo = find("the failover", &|e| e.get("FAILOVER_US").is_some());
    assert_eq!(s(&fo, "WORKER_PID"), old.to_string());
    assert_eq!(s(&fo, "NEW_PID"), new.to_string());
    assert!(s(&fo, "FAILOVER_US").parse::<u64>().is_ok(), "{fo}");
    let rebuilt = find("the rebuild", &|e| e.get("REBUILD_US").is_some());
    assert!(s(&rebuilt, "NEW_PID").parse::<u32>().is_ok_and(|p| p > 0));
    let reclaimed =
        find("the reclaimed segments", &|e| e.get("SEGMENT").is_some() && s(e, "WORKER_PID") == old.to_string());
    assert_eq!(s(&reclaimed, "SEGMENT").split(',').count(), 2, "{reclaimed}");
    find("the stop", &|e| s(e, "MESSAGE").contains("stopping"));
    let rejected_logged: Vec<_> = entries.iter().filter(|e| e.get("METHOD").is_some()).collect();
    // The burst may straddle a second: at most 10 per second, plus the later one.
    assert!((2..=21).contains(&rejected_logged.len()), "{} of 31 rejected calls logged", rejected_logged.len());
    assert!(
        entries.iter().any(|e| s(e, "MESSAGE").ends_with("more rejected calls were not logged")),
        "no count of unlogged rejections:\n{journal}"
    );
    let rejected = rejected_logged[0].clone();
    assert_eq!(s(&rejected, "METHOD"), "SetGain");
    assert_eq!(s(&rejected, "VALUE").parse::<f64>().ok(), Some(2.0));
    assert!(s(&rejected, "MESSAGE").contains("0 <= g <= 1"), "{rejected}");
    // RT refusals: one entry per refused thread kind, none when everything got SCHED_FIFO.
    let refusals: Vec<String> = entries.iter().filter(|e| e.get("THREAD").is_some()).map(|e| s(e, "THREAD")).collect();
    if realtime {
        assert!(refusals.is_empty(), "realtime granted, yet refusals logged: {refusals:?}");
    } else {
        let mut kinds = refusals.clone();
        kinds.sort();
        assert_eq!(kinds, ["monitor", "output", "render"], "each refusal logged once: {refusals:?}");
    }
    // Code locations come along (tracing-journald's CODE_FILE / CODE_LINE).
    assert!(fo.get("CODE_FILE").is_some(), "{fo}");
}
