//! The configuration file as the daemon reads it: `--check-config`, line numbers, flags over
//! the file, and the shipped default file.

use std::path::Path;
use std::process::Command;

fn daemon(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_audiowardend")).args(args).output().unwrap()
}

fn write(dir: &Path, text: &str) -> String {
    let p = dir.join("audiowarden.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_line_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "output = \"virtual\"\nfrequency = 880\ngain = 0.5\nstandby = \"warm\"\n");
    let o = daemon(&["--config", &good, "--check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "configuration OK");

    for (text, want) in [
        ("frequency = 880\ngain = 7\n", ":2: `gain`: gain must be a finite linear gain with 0 <= g <= 1, got 7"),
        ("frequency = 880\n\nvolume = 3\n", ":3: unknown key `volume`"),
        ("output = 5\n", ":1: `output`"),
        ("gain = \n", ":1:"),
    ] {
        let bad = write(dir.path(), text);
        let o = daemon(&["--config", &bad, "--check-config"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{text:?}: {err}");
        assert!(err.contains(&format!("{bad}{want}")), "{text:?}: {err}");
    }
    // A flag overrides the bad value: the whole is valid.
    let bad = write(dir.path(), "gain = 7\n");
    assert_eq!(daemon(&["--config", &bad, "--gain", "0.5", "--check-config"]).status.code(), Some(0));
    // A missing file given explicitly is an error.
    assert_eq!(daemon(&["--config", "/nonexistent/audiowarden.toml", "--check-config"]).status.code(), Some(2));
}

/// packaging/audiowarden.toml is generated from the daemon's flags and cannot drift: this test
/// fails when it differs (AW_REGENERATE=1 rewrites it).
#[test]
fn the_shipped_default_file_is_current_and_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/audiowarden.toml");
    let want = audiowarden::config_file::default_file_text();
    if std::env::var_os("AW_REGENERATE").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert_eq!(shipped, want, "packaging/audiowarden.toml is stale: run AW_REGENERATE=1 cargo test --test config_file");
    let o = daemon(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}
