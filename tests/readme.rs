//! The README is a front page, and what it says is true of the code (issue 12 item 7):
//! the sections an operator needs and nothing buried under catalogues (the test catalogue and
//! the benchmark logs live in docs/, linked, and every link resolves); the control distance
//! and the status sample it quotes match the default stamping; no stale comment survives in
//! the places once found stale; and the WAV module is split by role with hound doing the
//! format.

use std::path::{Path, PathBuf};

use audiowarden::control::StampTiming;
use audiowarden::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Where a change is heard at the defaults, in frames after the frame playing at the call,
/// wherever in the output's wake-up cycle the call lands (the stamping's own arithmetic).
fn stamp_distance_frames() -> (f64, f64) {
    let c = Config::default();
    let timing = StampTiming {
        sample_rate: c.sample_rate,
        block_frames: c.block_frames,
        lookahead_blocks: c.ring_blocks(),
        periods_per_wake: c.periods_per_wake(),
        stamp: c.control_stamp,
    };
    let bf = c.block_frames as u64;
    let pos = 1000;
    let cycle = (pos - c.periods_per_wake() as u64) * bf..pos * bf;
    let ahead: Vec<u64> = cycle.map(|now| timing.first_frame(pos, now) - now).collect();
    (*ahead.iter().min().unwrap() as f64, *ahead.iter().max().unwrap() as f64)
}

#[test]
fn the_readme_is_a_front_page_with_the_catalogues_in_docs() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(lines <= 300, "README.md has {lines} lines: the front page belongs on a screen or few, details in docs/");
    let headings: Vec<&str> = readme.lines().filter(|l| l.starts_with("## ")).collect();
    for want in ["Install", "The two commands", "Control", "How it works", "Figures", "Troubleshooting"] {
        assert!(headings.iter().any(|h| h.contains(want)), "README.md has no section {want:?}: {headings:?}");
    }
    for doc in ["docs/tests.md", "docs/benchmarks.md", "docs/operating.md", "docs/metrics.md"] {
        assert!(readme.contains(&format!("]({doc}")), "README.md does not link {doc}");
    }
    // The catalogues are complete where they live: docs/tests.md names every test file, and
    // every benchmark's command (`--bench NAME`) is in docs/benchmarks.md or docs/tests.md.
    let (tests_md, benches_md) = (read("docs/tests.md"), read("docs/benchmarks.md"));
    for (dir, named) in [("tests", false), ("benches", true)] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "rs") {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                if named {
                    let cmd = format!("--bench {name}");
                    assert!(tests_md.contains(&cmd) || benches_md.contains(&cmd), "docs/ has no `{cmd}`");
                } else {
                    assert!(tests_md.contains(&format!("`{name}::")), "docs/tests.md does not name {dir}/{name}.rs");
                }
            }
        }
    }
}

/// Every relative link in the README and in docs/ points at a file that exists.
#[test]
fn every_relative_link_resolves() {
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            files.push(p);
        }
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap().trim();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            assert!(
                Path::new(dir).join(target).exists(),
                "{}: link to {target:?}, which does not exist",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} relative links found: is the parser still reading links?");
}

/// The README's figures for where a change is heard are the default stamping's, not a
/// figure from an earlier layout.
#[test]
fn the_readmes_control_distance_and_status_sample_match_the_default_stamp() {
    let readme = read("README.md");
    let (lo, hi) = stamp_distance_frames();
    let sr = Config::default().sample_rate as f64;
    let (lo_ms, hi_ms) = (lo * 1000.0 / sr, hi * 1000.0 / sr);
    let mut quoted = 0;
    for f in ["README.md", "docs/operating.md"] {
        let text = read(f);
        for (i, _) in text.match_indices(" ms ahead") {
            let Some(ms) = text[..i].rsplit(' ').next().and_then(|w| w.parse::<f64>().ok()) else { continue };
            assert!(
                (lo_ms - 0.5..=hi_ms + 0.5).contains(&ms),
                "{f} says changes are heard about {ms} ms ahead; the default stamp is {lo_ms:.1}-{hi_ms:.1} ms"
            );
            quoted += 1;
        }
    }
    assert!(quoted >= 2, "the README and docs/operating.md no longer say where a change is heard ({quoted} found)");
    let line =
        readme.lines().find(|l| l.trim_start().starts_with("latency ")).expect("the status sample's latency line");
    let samples: Vec<f64> =
        line.split_whitespace().filter_map(|w| w.parse().ok()).filter(|&v: &f64| v >= 100.0).collect();
    assert!(!samples.is_empty(), "no sample counts in {line:?}");
    for s in samples {
        assert!((lo..=hi).contains(&s), "status sample {line:?}: {s} samples, the default stamp is {lo}-{hi}");
    }
}

/// The comments once found stale (issue 12) stay fixed.
#[test]
fn no_stale_comment_is_back() {
    assert!(!read("src/metrics/mod.rs").contains("(later) D-Bus"), "metrics says D-Bus comes later");
    for f in ["src/supervisor/mod.rs", "src/supervisor/start.rs", "src/main.rs"] {
        for line in read(f).lines().filter(|l| l.contains("MCL_FUTURE")) {
            assert!(line.contains("Not MCL_FUTURE"), "{f} claims mlockall(MCL_FUTURE), which is not done: {line}");
        }
    }
}

/// The WAV output is split by role, and hound does the file format: only the real-time tap
/// and the writer thread are ours.
#[test]
fn the_wav_module_is_split_by_role_and_hound_writes_the_format() {
    for f in ["mod.rs", "writer.rs", "read.rs", "tests.rs"] {
        assert!(root().join("src/output/wav").join(f).exists(), "src/output/wav/{f} is missing");
    }
    assert!(read("src/output/wav/writer.rs").contains("hound::WavWriter"), "the writer does not use hound's writer");
    assert!(read("src/output/wav/read.rs").contains("hound::WavReader"), "the reader does not use hound's reader");
    for f in ["mod.rs", "writer.rs", "read.rs"] {
        let text = read(&format!("src/output/wav/{f}"));
        assert!(
            !text.contains("b\"RIFF") && !text.contains("b\"WAVE"),
            "src/output/wav/{f} writes a WAV header by hand"
        );
    }
}
