//! Proves tests/common/jack.rs: `aplay` through `awcapture` is paced like a card and recorded
//! bit for bit, and nothing of the server is left behind.
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::jack::JackServer;

#[test]
fn aplay_through_awcapture_is_paced_and_recorded() {
    let jack = JackServer::start();
    eprintln!("jack server {} (jackd PID {}) in {}", jack.name, jack.jackd_pid, jack.dir.path().display());

    // 1 s of 48 kHz stereo S16_LE: xorshift noise over the whole range.
    let frames = 48_000usize;
    let mut x: u32 = 0x2545_f491;
    let mut input = Vec::with_capacity(frames * 4);
    for _ in 0..frames * 2 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        input.extend_from_slice(&(x as i16).to_le_bytes());
    }
    let input_path = jack.dir.path().join("input.s16");
    std::fs::write(&input_path, &input).unwrap();

    let t0 = Instant::now();
    let out = Command::new("aplay")
        .envs(jack.env())
        .args(["-D", "awcapture", "-t", "raw", "-f", "S16_LE", "-r", "48000", "-c", "2"])
        .args(["--period-size=64", "--buffer-size=256"])
        .arg(&input_path)
        .output()
        .expect("run aplay (alsa-utils)");
    let wall = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "aplay failed ({}): {stderr}\n--- jackd.log ---\n{}", out.status, jack.log());
    eprintln!(
        "aplay: {wall:?} for 1 s of audio; jackd logged {} xruns; aplay said: {}",
        jack.xruns_in_log(),
        stderr.trim()
    );

    // Recorded exactly; aplay pads its last period with silence, and adds a whole period of it
    // when the input ends on a period boundary (as here: 750 periods of 64 frames).
    let cap = std::fs::read(jack.capture_path()).expect("capture.raw");
    assert!(cap.len() >= input.len(), "capture too short: {} < {} bytes", cap.len(), input.len());
    if let Some(i) = cap.iter().zip(&input).position(|(a, b)| a != b) {
        panic!("capture differs from the input at byte {i} (frame {})", i / 4);
    }
    assert!(cap[input.len()..].iter().all(|&b| b == 0), "non-silent tail after the input");
    assert!(cap.len() - input.len() <= 64 * 4, "tail of {} bytes is more than a period", cap.len() - input.len());
    assert_eq!(jack.capture_paths(), vec![jack.capture_path()], "one opening, one recording");

    // Paced: 1 s of audio cannot be played in less (the buffer is 256 frames, 5.3 ms).
    assert!(wall >= Duration::from_millis(990), "not paced: 1 s of audio played in {wall:?}");
    assert!(wall < Duration::from_millis(1500), "too slow: 1 s of audio played in {wall:?}");
    assert!(!stderr.contains("underrun"), "aplay had an underrun: {stderr}");

    // Stop: jackd gone, and nothing of this server left in /dev/shm.
    let (pid, name) = (jack.jackd_pid, jack.name.clone());
    let dir = jack.dir.path().to_path_buf();
    drop(jack);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "jackd {pid} still running: {stat}");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.contains(&name))
        .collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
}
