//! The configuration file, `/etc/audiowarden/audiowarden.toml` by default: every daemon flag
//! by its long name (`sample-rate = 48000`, `output = "alsa:default"`). Flags given on the
//! command line override the file. Any bad line (syntax, unknown key, wrong type, value out of
//! range) is an error naming the file, the line and the key, and nothing starts on half a
//! configuration.
//!
//! The file is turned into flags placed before the command line's (clap lets a later flag
//! override an earlier one), so the file and the flags share one parser, one set of defaults
//! and one validation.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::config::Config;

pub const DEFAULT_PATH: &str = "/etc/audiowarden/audiowarden.toml";

/// Flags that are actions, not settings (or test-only), and so not in the file.
const NOT_SETTINGS: [&str; 5] = ["config", "check-config", "list-outputs", "help", "version"];

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// `file:line: message` (line 0: the file as a whole).
    #[error("{}:{line}: {message}", path.display())]
    File { path: PathBuf, line: usize, message: String },
    /// The command line itself (clap's own error; `--help` and `--version` come this way too:
    /// `e.exit()` prints them).
    #[error("{}", .0.render())]
    Args(clap::Error),
    /// A value out of range, from the command line.
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
}

/// A setting the file may hold: its long flag name and the TOML type it takes.
struct Setting {
    long: String,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// An on/off flag: true or false.
    Switch,
    /// A number (integer, or float where the flag takes one: clap checks).
    Number,
    /// A string (a path, an output, a choice).
    Text,
}

fn kind_of(a: &clap::Arg) -> Kind {
    use std::any::TypeId;
    let ty = a.get_value_parser().type_id();
    if matches!(a.get_action(), ArgAction::SetTrue) {
        Kind::Switch
    } else if [TypeId::of::<u32>(), TypeId::of::<i32>(), TypeId::of::<u64>(), TypeId::of::<f64>()]
        .iter()
        .any(|t| ty == *t)
    {
        Kind::Number
    } else if [
        TypeId::of::<String>(),
        TypeId::of::<std::path::PathBuf>(),
        TypeId::of::<crate::config::OutputSpec>(),
        TypeId::of::<crate::config::StandbyMode>(),
        TypeId::of::<crate::config::ControlStamp>(),
    ]
    .iter()
    .any(|t| ty == *t)
    {
        Kind::Text
    } else {
        // A new flag of another type: say here whether the file writes it as a number or a
        // string (the tests reach this for every setting).
        panic!("--{}: add its value type to config_file::kind_of", a.get_long().unwrap_or("?"))
    }
}

fn settings() -> Vec<Setting> {
    Config::command()
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            (!NOT_SETTINGS.contains(&long.as_str())).then(|| Setting { kind: kind_of(a), long })
        })
        .collect()
}

/// The long names of every setting the file may hold.
pub fn setting_names() -> Vec<String> {
    settings().into_iter().map(|s| s.long).collect()
}

/// The 1-based line on which `key` is set in `text` (0 if it cannot be found).
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let k = l.split('=').next().unwrap_or("").trim().trim_matches('"');
            l.contains('=') && (k == key || k.replace('_', "-") == key)
        })
        .map_or(0, |i| i + 1)
}

/// Reads `path` into flags (`--key=value`), checking each key and value on its own.
fn file_args(path: &Path, text: &str) -> Result<Vec<String>, LoadError> {
    let err = |line, message: String| LoadError::File { path: path.to_owned(), line, message };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        err(line, e.message().to_owned())
    })?;
    let known = settings();
    let mut args = Vec::new();
    for (key, value) in &table {
        let line = line_of(text, key);
        let long = key.replace('_', "-");
        let Some(s) = known.iter().find(|s| s.long == long) else {
            let names: Vec<&str> = known.iter().map(|s| s.long.as_str()).collect();
            return Err(err(line, format!("unknown key `{key}` (known: {})", names.join(", "))));
        };
        let arg = match (value, s.kind) {
            (toml::Value::Boolean(true), Kind::Switch) => Some(format!("--{long}")),
            (toml::Value::Boolean(false), Kind::Switch) => None,
            (_, Kind::Switch) => return Err(err(line, format!("`{key}` must be true or false"))),
            (toml::Value::Integer(v), Kind::Number) => Some(format!("--{long}={v}")),
            (toml::Value::Float(v), Kind::Number) => Some(format!("--{long}={v}")),
            (toml::Value::String(v), Kind::Text) => Some(format!("--{long}={v}")),
            (toml::Value::Boolean(_), _) => return Err(err(line, format!("`{key}` takes a value, not true or false"))),
            (toml::Value::String(_), Kind::Number) => {
                return Err(err(line, format!("`{key}` must be a number, without quotes")))
            }
            (toml::Value::Integer(_) | toml::Value::Float(_), Kind::Text) => {
                return Err(err(line, format!("`{key}` must be a string, in quotes")))
            }
            (_, _) => return Err(err(line, format!("`{key}` must be a single value (a string or a number)"))),
        };
        if let Some(arg) = arg {
            // Each value on its own, so that a bad one is reported at its line.
            if let Err(e) = Config::try_parse_from(["audiowardend", arg.as_str()]) {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ");
                return Err(err(line, format!("`{key}`: {first}")));
            }
            args.push(arg);
        }
    }
    Ok(args)
}

/// The configuration: the file (from `--config`, else the default path if it exists) under
/// the command line, validated as a whole.
///
/// # Errors
/// The file cannot be read or has a bad line; the command line is bad; a value is out of range
/// (named with its line when it came from the file).
pub fn load(cli: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> Result<Config, LoadError> {
    let cli: Vec<OsString> = cli.into_iter().map(Into::into).collect();
    // The command line alone first: it names the file, and its errors are its own.
    let alone = Config::try_parse_from(&cli).map_err(LoadError::Args)?;
    let (path, explicit) = match &alone.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => return finish(alone, None),
        Err(e) => return Err(LoadError::Read(path, e)),
    };
    let from_file = file_args(&path, &text)?;
    let mut all: Vec<OsString> = cli.first().cloned().into_iter().collect();
    all.extend(from_file.iter().map(OsString::from));
    all.extend(cli.iter().skip(1).cloned());
    let merged = Config::command().args_override_self(true).try_get_matches_from(&all).map_err(LoadError::Args)?;
    let config = Config::from_arg_matches(&merged).map_err(LoadError::Args)?;
    let overridden = |key: &str| cli.iter().skip(1).any(|a| a.to_string_lossy().starts_with(&format!("--{key}")));
    finish(config, Some((&path, &text, &overridden as &dyn Fn(&str) -> bool)))
}

/// The file a configuration came from: its path, its text, and whether a key was overridden
/// on the command line.
type Source<'a> = (&'a Path, &'a str, &'a dyn Fn(&str) -> bool);

fn finish(config: Config, file: Option<Source<'_>>) -> Result<Config, LoadError> {
    match config.validate() {
        Ok(()) => Ok(config),
        Err(e) => match file {
            Some((path, text, overridden)) if !overridden(e.key) && line_of(text, e.key) > 0 => Err(LoadError::File {
                path: path.to_owned(),
                line: line_of(text, e.key),
                message: format!("`{}`: {}", e.key, e.message),
            }),
            _ => Err(LoadError::Invalid(e)),
        },
    }
}

/// The shipped default file: every setting, commented out at its default, with its help.
pub fn default_file_text() -> String {
    let mut out = String::from(
        "# audiowarden: /etc/audiowarden/audiowarden.toml\n\
         # Every setting of audiowardend, at its default (uncomment to change). Flags given on\n\
         # the command line override this file. Check a file with `audiowardend --check-config`\n\
         # (or `audiowardend --config FILE --check-config`). `systemctl reload audiowarden`\n\
         # (SIGHUP) applies the settings marked [reload] at once; the others need a restart.\n\
         # Generated from the daemon's flags\n\
         # (`audiowarden::config_file::default_file_text`); a test keeps it in step.\n",
    );
    let cmd = Config::command();
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let Some(long) = a.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        if crate::config::LIVE_SETTINGS.contains(&long) {
            help += " [reload]";
        }
        out.push('\n');
        for l in wrap(&help, 76) {
            out.push_str(&format!("# {l}\n"));
        }
        let default = a.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        let line = match (matches!(a.get_action(), ArgAction::SetTrue), default) {
            (true, _) => format!("# {long} = false"),
            (false, Some(d)) if d.parse::<f64>().is_ok() => format!("# {long} = {d}"),
            (false, Some(d)) => format!("# {long} = \"{d}\""),
            (false, None) => format!("# {long} =  (not set by default)"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let cur = lines.last_mut().unwrap();
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, cli: &[&str]) -> Result<Config, LoadError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, text).unwrap();
        let mut args = vec!["audiowardend".to_owned(), "--config".to_owned(), p.display().to_string()];
        args.extend(cli.iter().map(|s| s.to_string()));
        load(args)
    }

    fn message(r: Result<Config, LoadError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn an_empty_file_gives_the_flags_defaults() {
        let mut c = load_text("", &[]).unwrap();
        assert!(c.config.is_some());
        c.config = None;
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn the_file_sets_and_flags_override() {
        let c = load_text("sample-rate = 44100\ngain = 0.5\noutput = \"virtual\"\nstandby = \"warm\"\n", &[]).unwrap();
        assert_eq!((c.sample_rate, c.gain, c.standby), (44_100, 0.5, crate::StandbyMode::Warm));
        let c = load_text("sample-rate = 44100\ngain = 0.5\n", &["--gain", "0.125"]).unwrap();
        assert_eq!((c.sample_rate, c.gain), (44_100, 0.125));
        // Underscores work as well as dashes.
        assert_eq!(load_text("block_frames = 128\n", &[]).unwrap().block_frames, 128);
    }

    #[test]
    fn bad_keys_types_and_ranges_name_their_line() {
        let m = message(load_text("gain = 0.5\nspeakers = 2\n", &[]));
        assert!(m.ends_with(":2: unknown key `speakers` (known: output, device-periods, shm-dir, sample-rate, block-frames, lookahead-blocks, frequency, gain, standby, reserve-workers, output-priority, monitor-priority, render-priority, hang-timeout-blocks, max-restarts, restart-window-s, cpu-latency-qos-us)") || m.contains(":2: unknown key `speakers`"), "{m}");
        let m = message(load_text("\n\nsample-rate = \"fast\"\n", &[]));
        assert!(m.contains(":3: `sample-rate`"), "{m}");
        let m = message(load_text("frequency = 440\ngain = [1, 2]\n", &[]));
        assert!(m.contains(":2: `gain` must be a single value"), "{m}");
        let m = message(load_text("standby = true\n", &[]));
        assert!(m.contains(":1: `standby` takes a value"), "{m}");
        let m = message(load_text("gain = 0.5\n\nsample-rate = 1000\n", &[]));
        assert!(m.contains(":3: `sample-rate`: 1000 is outside 8000..=384000 Hz"), "{m}");
        let m = message(load_text("gain = 0.5\nfrequency = \n", &[]));
        assert!(m.contains(":2:"), "{m}");
        // Out of range in the file, but the flag overrides it: fine.
        assert!(load_text("sample-rate = 1000\n", &["--sample-rate", "48000"]).is_ok());
    }

    /// Every setting, with a value of the wrong type and (where it has one) a value outside its
    /// range: each is refused naming the line it is on and its key.
    #[test]
    fn every_setting_refuses_a_wrong_type_and_an_out_of_range_value_at_its_line() {
        // (key, wrong type, out of range or not one of the choices)
        let cases: [(&str, &str, Option<&str>); 23] = [
            ("output", "[1]", Some("\"speakers\"")),
            ("device-periods", "\"four\"", Some("1")),
            ("shm-dir", "true", None),
            ("sample-rate", "\"fast\"", Some("1000")),
            ("block-frames", "64.5", Some("8")),
            ("lookahead-blocks", "\"eight\"", Some("129")),
            ("control-stamp", "2", Some("\"soon\"")),
            ("frequency", "\"A4\"", Some("30000.0")),
            ("gain", "{ db = -6 }", Some("1.5")),
            ("standby", "1", Some("\"lukewarm\"")),
            ("reserve-workers", "\"one\"", Some("2")),
            ("output-priority", "80.5", Some("100")),
            ("monitor-priority", "\"high\"", Some("0")),
            ("render-priority", "false", Some("-1")),
            ("hang-timeout-blocks", "\"2\"", Some("0")),
            ("max-restarts", "[100]", Some("0")),
            ("restart-window-s", "\"10s\"", Some("3601")),
            ("cpu-latency-qos-us", "\"none\"", Some("-5")),
            ("control-socket", "5", None),
            ("osc-socket", "5", None),
            ("osc-listen", "9000", Some("\"0.0.0.0:9000\"")),
            ("osc-allow-remote", "\"yes\"", None),
            ("prometheus-textfile", "5", None),
        ];
        let mut keys: Vec<&str> = cases.iter().map(|c| c.0).collect();
        keys.sort();
        let mut all = setting_names();
        all.sort();
        assert_eq!(keys, all, "every setting needs its bad values here");
        for (key, wrong_type, out_of_range) in cases {
            for bad in std::iter::once(wrong_type).chain(out_of_range) {
                // Two good lines first, so the line number is not trivially 1.
                let text = format!("# a comment\nblock-frames = 64\n{key} = {bad}\n");
                let text =
                    if key == "block-frames" { text.replace("block-frames = 64\n", "gain = 0.25\n") } else { text };
                let m = match load_text(&text, &[]) {
                    Ok(c) => panic!("{key} = {bad} was accepted: {c:?}"),
                    Err(e) => e.to_string(),
                };
                assert!(m.contains(":3:") && m.contains(key), "{key} = {bad}: {m}");
            }
        }
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_a_missing_default_is_not() {
        let m = message(load(["audiowardend", "--config", "/nonexistent/aw.toml"]));
        assert!(m.starts_with("/nonexistent/aw.toml: "), "{m}");
        if !Path::new(DEFAULT_PATH).exists() {
            assert!(load(["audiowardend"]).is_ok());
        }
    }

    #[test]
    fn the_default_file_lists_every_setting_and_loads_to_the_defaults() {
        let text = default_file_text();
        for s in settings() {
            assert!(text.lines().any(|l| l.starts_with(&format!("# {} = ", s.long))), "{} missing", s.long);
        }
        // Uncommented, it is a valid file that changes nothing.
        let uncommented: String = text
            .lines()
            .filter(|l| l.starts_with("# ") && l.contains(" = ") && !l.contains("(not set by default)"))
            .filter(|l| settings().iter().any(|s| l.starts_with(&format!("# {} = ", s.long))))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let c = load_text(&uncommented, &[]).unwrap();
        let d = Config::default();
        assert_eq!(
            (c.sample_rate, c.gain, c.frequency, c.output.clone()),
            (d.sample_rate, d.gain, d.frequency, d.output.clone())
        );
    }
}
