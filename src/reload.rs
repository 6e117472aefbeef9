//! Reloading the configuration while playing (SIGHUP, `systemctl reload`, or the D-Bus
//! `Reload` method): the file is read again under the same command line, validated as a whole
//! (a bad file changes nothing), and compared with the settings in force. What changed and can
//! change live is applied; what changed and cannot is reported as needing a restart.
//!
//! Only settings that changed in the file are applied: a reload does not undo a frequency a
//! client set over D-Bus unless the file's frequency itself was edited.

use std::ffi::OsString;

use crate::config::Config;
use crate::config_file::{self, LoadError};
use crate::supervisor::Handle;

pub use crate::config::LIVE_SETTINGS;

/// One setting whose value in the file differs from the one in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.key, self.from, self.to)
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Changed and now in force.
    pub applied: Vec<Change>,
    /// Changed in the file, still the old value until the service restarts.
    pub needs_restart: Vec<Change>,
    /// Applied settings the kernel did not fully honour (a priority refused for a thread).
    pub refused: Vec<String>,
}

impl Report {
    fn join(list: &[Change]) -> String {
        list.iter().map(Change::to_string).collect::<Vec<_>>().join(", ")
    }

    /// One log line.
    pub fn summary(&self) -> String {
        let mut s = if self.applied.is_empty() {
            "nothing to apply".to_owned()
        } else {
            format!("applied {}", Self::join(&self.applied))
        };
        if !self.needs_restart.is_empty() {
            s += &format!("; needs a restart to take effect: {}", Self::join(&self.needs_restart));
        }
        s
    }
}

pub struct Reloader {
    /// The daemon's command line (it names the file, and its flags still override the file).
    args: Vec<OsString>,
    /// The settings in force: the start-up configuration with every reloaded live setting.
    current: Config,
    sup: Handle,
}

impl Reloader {
    pub fn new(args: Vec<OsString>, current: Config, sup: Handle) -> Reloader {
        Reloader { args, current, sup }
    }

    /// Reads the configuration again and applies what changed and can change live.
    ///
    /// # Errors
    /// The file cannot be read or is bad (named by file, line and key): nothing is applied.
    pub fn reload(&mut self) -> Result<Report, LoadError> {
        let new = config_file::load(self.args.clone())?;
        let old_values = self.current.settings();
        let mut report = Report::default();
        for ((key, from), (_, to)) in old_values.into_iter().zip(new.settings()) {
            if from != to {
                let change = Change { key, from, to };
                if LIVE_SETTINGS.contains(&key) {
                    report.applied.push(change);
                } else {
                    report.needs_restart.push(change);
                }
            }
        }
        let changed = |key: &str| report.applied.iter().any(|c| c.key == key);
        let c = &mut self.current;
        if changed("frequency") {
            // Validated with the file; refused only if the sample rate it was checked against
            // is not the running one (that change is reported as needing a restart).
            match self.sup.control().set_frequency(new.frequency) {
                Ok(_) => c.frequency = new.frequency,
                Err(e) => report.refused.push(format!("frequency: {e}")),
            }
        }
        if changed("gain") {
            match self.sup.control().set_gain(new.gain) {
                Ok(_) => c.gain = new.gain,
                Err(e) => report.refused.push(format!("gain: {e}")),
            }
        }
        if changed("output-priority") || changed("monitor-priority") || changed("render-priority") {
            (c.output_priority, c.monitor_priority, c.render_priority) =
                (new.output_priority, new.monitor_priority, new.render_priority);
            report.refused.extend(self.sup.set_priorities(c.output_priority, c.monitor_priority, c.render_priority));
        }
        if changed("max-restarts") || changed("restart-window-s") {
            (c.max_restarts, c.restart_window_s) = (new.max_restarts, new.restart_window_s);
            self.sup.set_restart_intensity(c.max_restarts, c.restart_window_s);
        }
        // A live setting the engine refused stays as it was: report it as not applied.
        report.applied.retain(|ch| !report.refused.iter().any(|r| r.starts_with(&format!("{}:", ch.key))));
        Ok(report)
    }

    /// Reloads and logs the outcome (the journal tells what a reload did).
    pub fn reload_and_log(&mut self) -> Result<Report, LoadError> {
        match self.reload() {
            Ok(r) => {
                tracing::info!("configuration reloaded: {}", r.summary());
                for why in &r.refused {
                    tracing::warn!("reload: {why}");
                }
                Ok(r)
            }
            Err(e) => {
                tracing::error!(
                    "configuration not reloaded, the settings in force are kept: {}",
                    e.to_string().trim_end()
                );
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_of_the_file_is_compared_on_reload() {
        let listed: Vec<&str> = Config::default().settings().into_iter().map(|(k, _)| k).collect();
        let mut names = config_file::setting_names();
        names.sort();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(sorted, names, "Config::settings() must list every setting of the file");
        for live in LIVE_SETTINGS {
            assert!(listed.contains(&live), "{live} is not a setting");
        }
    }
}
