//! The module layering of `src/`, checked: no import circle, and every `crate::` reference
//! goes down the layers (or sideways within one), so that the process diagram reads top to
//! bottom. Layers, top to bottom:
//!
//! ```text
//! ctl, dbus, osc, notify, reload,       the edges: the daemon's main loop, the client, the bus,
//!   logging, runtime_socket             the socket files
//! supervisor                            the monitor, the events, housekeeping, start and stop
//! config_file                           the configuration file
//! control, output, worker               stamping changes; playing; rendering (another process)
//! playback                              what the output thread may touch (lock-free)
//! config, metrics, shm, engine          settings, metric declarations, shared memory, the DSP
//! sys                                   every raw syscall
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: &[&[&str]] = &[
    &["ctl", "dbus", "osc", "notify", "reload", "logging", "runtime_socket"],
    &["supervisor"],
    &["config_file"],
    &["control", "output", "worker"],
    &["playback"],
    &["config", "metrics", "shm", "engine"],
    &["sys"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/layering.rs"))
}

/// Every `.rs` file under `src/`: (path relative to `src/`, text).
fn src_files() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            if rel.ends_with(".rs") {
                files.push((rel, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    files
}

/// Top-level module -> the top-level modules its files name through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in src_files() {
        if rel == "main.rs" || rel == "lib.rs" || rel.starts_with("bin/") {
            continue;
        }
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs").to_owned();
        let deps = g.entry(module.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(|n| n.trim().split("::").next().unwrap_or(""))
                        .collect(),
                    None => vec![rest.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or("")],
                };
                for n in names {
                    // Modules are lower case; `crate::Config` and friends are re-exports.
                    if n.starts_with(|c: char| c.is_ascii_lowercase()) && n != module {
                        deps.insert(n.to_owned());
                    }
                }
            }
        }
    }
    g
}

#[test]
fn modules_depend_only_downwards_and_never_in_a_circle() {
    let g = graph();
    for (m, deps) in &g {
        for d in deps {
            assert!(layer(d) >= layer(m), "{m} (layer {}) uses {d} (layer {}), a layer above it", layer(m), layer(d));
        }
    }
    // Within a layer too: no circle (depth-first search for a back edge).
    fn visit(g: &BTreeMap<String, BTreeSet<String>>, m: &str, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import circle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m.to_owned());
        for d in g.get(m).into_iter().flatten() {
            visit(g, d, path, done);
        }
        path.pop();
        done.insert(m.to_owned());
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        visit(&g, m, &mut Vec::new(), &mut done);
    }
    // The output stage and the worker see none of the supervisor.
    for m in ["output", "worker", "control", "playback"] {
        assert!(!g[m].contains("supervisor"), "{m} reaches into the supervisor");
    }
}

/// Item 1 of the layering: what the output thread (and cpal's callback) and the worker can
/// reach holds no lock. The modules they are built from (and everything below them but sys,
/// which defines the PI mutex the supervisor uses) name no lock type outside their unit tests.
#[test]
fn the_audio_side_modules_name_no_lock_type() {
    const AUDIO_SIDE: &[&str] = &["output", "worker", "playback", "config", "metrics", "shm", "engine"];
    const LOCKS: &[&str] = &["Mutex", "RwLock", "Condvar", "Barrier", "PiMutex"];
    let mut checked = 0;
    for (rel, text) in src_files() {
        let module = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if !AUDIO_SIDE.contains(&module) {
            continue;
        }
        // Unit tests (a trailing `#[cfg(test)]` module) may use locks to drive the code.
        let product = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in product.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for lock in LOCKS {
                assert!(!code.contains(lock), "src/{rel}:{}: the audio side names a lock: {line}", n + 1);
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} audio-side files found under src/");
}

/// The monitor thread (FIFO, the takeover path) and what the output and render loops run
/// never log: their events go to the event thread, which logs them (issue 11 item 7).
#[test]
fn the_monitor_and_the_audio_path_never_log() {
    const SILENT: &[&str] =
        &["supervisor/monitor.rs", "supervisor/spawn.rs", "playback.rs", "engine.rs", "shm/ring.rs", "shm/control.rs"];
    const LOGGING: &[&str] = &["tracing::", "info!(", "warn!(", "error!(", "debug!(", "println!", "eprintln!"];
    let files = src_files();
    for silent in SILENT {
        let (_, text) = files.iter().find(|(rel, _)| rel == silent).unwrap_or_else(|| panic!("src/{silent} is gone"));
        let product = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in product.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for log in LOGGING {
                assert!(!code.contains(log), "src/{silent}:{}: logs on a real-time path: {line}", n + 1);
            }
        }
    }
}
