//! The shipped unit file: hardened to an exposure level of 2.5 or lower, as
//! `systemd-analyze security --offline=yes` rates it.

use std::path::Path;
use std::process::Command;

#[test]
fn unit_exposure_level_is_at_most_2_5() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/audiowarden.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for audiowarden.service"))
        .unwrap_or_else(|| panic!("no overall exposure line:\n{text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let level: f64 =
        line.split(':').nth(1).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).expect(line);
    eprintln!("{line}");
    assert!(level <= 2.5, "{line}");
}
