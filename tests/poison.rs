//! A poison change: a valid value that kills every worker that applies it (the worker's
//! TEST-ONLY fault switch `poison:VALUE` makes a worker abort as it is about to apply it).
//! Without a quarantine that is a crash loop, then silence. After two deaths at that change
//! it is withdrawn from every worker and from the replay history: the stream goes on with the
//! previous value, `Frequency` says so, the log names the value, `control_quarantined`
//! counts it (received = applied + coalesced + quarantined), and a later change works. Its
//! own test binary: the switch travels through the process environment.

mod common;

use std::time::Duration;

use audiowarden::{Event, OutputSpec, StandbyMode, Supervisor};
use common::bus::{get_u64, proxy, Daemon, Launch, PrivateBus};
use common::*;

const POISON: f64 = 1234.5;

fn quarantined_and_the_stream_goes_on(standby: StandbyMode, tag: &str) {
    std::env::set_var("AUDIOWARDEN_TEST_FAULT", format!("poison:{POISON}"));
    let shm = ShmDir::new(tag);
    let wav = temp_wav(tag);
    let cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), standby, 1000.0, 0.5);
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    let ctl = sup.control();
    std::thread::sleep(Duration::from_millis(300));
    let poison = ctl.set_frequency(POISON).expect("a valid value is accepted");
    let (deaths, kept) = watch.wait("the quarantine", Duration::from_secs(5), |e| match *e {
        Event::Quarantined { seq, value, deaths, kept } if seq == poison.seq => {
            assert_eq!(value, POISON);
            Some((deaths, kept))
        }
        _ => None,
    });
    assert_eq!(deaths, 2, "quarantined at the second death");
    assert_eq!(kept, 1000.0, "the previous value stays");
    assert_eq!(ctl.frequency(), 1000.0, "Frequency says what plays");
    // Running again: a standby ready (whoever was still starting the poison dies too, at most
    // one more; then nobody gets it any more).
    wait_until("running again", Duration::from_secs(5), || sup.state() == audiowarden::State::Running);
    // A later change works.
    std::thread::sleep(Duration::from_millis(100));
    let later = ctl.set_frequency(700.0).expect("a later change");
    wait_until("the later change played", Duration::from_secs(5), || {
        let m = sup.metrics();
        m.control_applied + m.control_coalesced + m.control_quarantined == m.control_received
    });
    std::thread::sleep(Duration::from_millis(300));
    let m = sup.metrics();
    sup.shutdown().expect("shutdown");
    std::env::remove_var("AUDIOWARDEN_TEST_FAULT");
    assert_eq!(m.control_quarantined, 1, "{m:?}");
    assert_eq!((m.control_received, m.control_applied, m.control_coalesced), (2, 1, 0), "{m:?}");
    assert!((2..=3).contains(&m.crash_count), "the poison killed {} workers: {m:?}", m.crash_count);
    assert_eq!(m.throttled_spawns, 0, "no crash loop: {m:?}");
    assert_eq!(ctl.frequency(), 700.0);
    // The stream without the poison, the later change at its frame; the silent blocks (the
    // takeovers that had to render the poisoned block again) are exactly the underruns.
    let skipped = assert_matches_reference(&wav.path, &cfg, &[later.msg], true);
    assert_eq!(skipped as u64, m.underruns, "silent blocks vs underruns: {m:?}");
    eprintln!("{tag}: {} deaths, {} underruns", m.crash_count, m.underruns);
}

#[test]
fn a_poison_change_is_quarantined_hot_and_warm_and_over_dbus() {
    // One after the other: the switch is process-wide.
    quarantined_and_the_stream_goes_on(StandbyMode::Hot, "poison-hot");
    quarantined_and_the_stream_goes_on(StandbyMode::Warm, "poison-warm");

    // The same through the daemon: the Frequency property and the log.
    let bus = PrivateBus::start();
    let env = [("AUDIOWARDEN_TEST_FAULT".to_owned(), format!("poison:{POISON}"))];
    let d =
        Daemon::launch(&bus, "poison-dbus", Launch { args: &["--frequency", "1000"], env: &env, ..Launch::default() });
    let conn = bus.connection();
    let p = proxy(&conn);
    p.set_frequency(POISON).expect("accepted");
    wait_until("the quarantine", Duration::from_secs(5), || {
        get_u64(&p.get_metrics().unwrap(), "control_quarantined") == 1
    });
    wait_until("Frequency back", Duration::from_secs(2), || p.frequency().unwrap() == 1000.0);
    wait_until("running again", Duration::from_secs(5), || p.state().unwrap() == "running");
    let log = d.log_text();
    assert!(
        log.contains(&format!("SetFrequency {POISON}")) && log.contains("quarantined"),
        "the log names the change:\n{log}"
    );
    p.set_frequency(700.0).expect("a later change");
    assert_eq!(p.frequency().unwrap(), 700.0);
}
