//! Daemon settings: the command line of `audiowardend` (clap), also used as the library's
//! configuration, with validation that names the valid range of every value.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, ValueEnum};

/// The settings a reload applies to the running service (the rest need a restart).
pub const LIVE_SETTINGS: [&str; 7] =
    ["frequency", "gain", "output-priority", "monitor-priority", "render-priority", "max-restarts", "restart-window-s"];

/// Where the audio goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// `alsa:default` if it opens, else `Virtual` (with one warning saying why).
    Auto,
    /// Paced on CLOCK_MONOTONIC like a sound card, plays into nothing.
    Virtual,
    /// Like `Virtual`, and records every played frame to a 32-bit float WAV file.
    Wav(PathBuf),
    /// An ALSA PCM (`default`, `hw:0,0`, `plughw:CARD=PCH,DEV=0`, `plug:jack`, ...).
    Alsa(String),
    /// A cpal output device, by the name cpal gives it (`default`: the host's default).
    Cpal(String),
}

impl FromStr for OutputSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("unknown output {s:?}: expected `auto`, `virtual`, `wav:PATH`, `alsa:PCM` or `cpal:DEVICE` (see --list-outputs)")
        };
        match s {
            "auto" => Ok(OutputSpec::Auto),
            "virtual" => Ok(OutputSpec::Virtual),
            _ => {
                if let Some(p) = s.strip_prefix("wav:") {
                    (!p.is_empty()).then(|| OutputSpec::Wav(PathBuf::from(p))).ok_or_else(bad)
                } else if let Some(pcm) = s.strip_prefix("alsa:") {
                    (!pcm.is_empty()).then(|| OutputSpec::Alsa(pcm.to_owned())).ok_or_else(bad)
                } else if let Some(dev) = s.strip_prefix("cpal:") {
                    (!dev.is_empty()).then(|| OutputSpec::Cpal(dev.to_owned())).ok_or_else(bad)
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl std::fmt::Display for OutputSpec {
    /// The form `--output` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputSpec::Auto => f.write_str("auto"),
            OutputSpec::Virtual => f.write_str("virtual"),
            OutputSpec::Wav(p) => write!(f, "wav:{}", p.display()),
            OutputSpec::Alsa(pcm) => write!(f, "alsa:{pcm}"),
            OutputSpec::Cpal(dev) => write!(f, "cpal:{dev}"),
        }
    }
}

/// What the standby worker does until it is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StandbyMode {
    /// Renders in lockstep into its own ring: takeover is a ring switch at the next block.
    Hot,
    /// Started, memory locked and pre-faulted, idle: continues from the dead primary's last
    /// committed state.
    Warm,
    /// No standby: a new worker is started cold after each crash (what a plain
    /// restart-on-failure supervisor gives; the baseline of the benchmarks).
    None,
}

/// Where a control change is stamped (its first affected frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ControlStamp {
    /// Beyond every block a worker may hold (its ring plus 4 blocks): nothing is rendered
    /// again, and the change waits for the whole lookahead.
    Lookahead,
    /// The first block the output takes at least a guard (0.5 ms) after the call: the
    /// workers render the blocks they already hold again (a rewind in their rings), so the
    /// change is heard within a wake-up or two whatever the lookahead. Not the default yet:
    /// a warm takeover racing a change still replaces a worker now and then (issue 15).
    Rewind,
}

/// audiowardend: a Linux audio service whose audio never stops.
///
/// The supervisor (this process) plays the audio; the engine runs in worker processes with a
/// pre-warmed standby, so a worker crash is inaudible.
#[derive(Debug, Clone, Parser)]
#[command(name = "audiowardend", version, about, long_about = None)]
pub struct Config {
    /// Audio output: `auto` (`alsa:default` if it opens, else `virtual`), `alsa:PCM` (an ALSA
    /// device, e.g. alsa:default, alsa:hw:0,0, alsa:plug:jack), `cpal:DEVICE` (through cpal;
    /// cpal:default or a name from --list-outputs), `virtual` (paced like a sound
    /// card, no device) or `wav:PATH` (virtual, recording every played frame to PATH).
    #[arg(long, default_value = "auto", value_parser = OutputSpec::from_str)]
    pub output: OutputSpec,

    /// Output buffer, in periods of --block-frames: what an ALSA device holds ahead of the
    /// sound (its latency), and for every output how late the output thread may wake up
    /// before that is an xrun (the virtual clock then resyncs to now, as a device would).
    #[arg(long, default_value_t = 4)]
    pub device_periods: u32,

    /// List the outputs ALSA can play to, with the --output value for each, and exit.
    #[arg(long)]
    pub list_outputs: bool,

    /// Configuration file (default: /etc/audiowarden/audiowarden.toml if it exists); flags
    /// given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the configuration (file and flags) and exit: 0 if it is valid, 2 with the first
    /// problem (file, line and key) if not.
    #[arg(long)]
    pub check_config: bool,

    /// Directory of the shared-memory segments and their manifest.json.
    #[arg(long, default_value = "/dev/shm/audiowarden")]
    pub shm_dir: PathBuf,

    /// Sample rate in Hz.
    #[arg(long, default_value_t = 48_000)]
    pub sample_rate: u32,

    /// Frames per block (one output period).
    #[arg(long, default_value_t = 64)]
    pub block_frames: u32,

    /// Blocks workers render ahead of the output: the time budget for detecting a crash and
    /// taking over without an underrun.
    #[arg(long, default_value_t = 8)]
    pub lookahead_blocks: u32,

    /// Where a change is stamped: `lookahead` (past every block a worker holds: heard after
    /// the whole lookahead) or `rewind` (heard 0.5 to 3.2 ms after the call at the
    /// defaults, whatever the lookahead: the workers render again the blocks they hold).
    #[arg(long, value_enum, default_value_t = ControlStamp::Lookahead)]
    pub control_stamp: ControlStamp,

    /// Initial tone frequency in Hz.
    #[arg(long, default_value_t = 440.0)]
    pub frequency: f64,

    /// Initial linear gain, 0 to 1.
    #[arg(long, default_value_t = 0.25)]
    pub gain: f64,

    /// Standby mode.
    #[arg(long, value_enum, default_value_t = StandbyMode::Hot)]
    pub standby: StandbyMode,

    /// Reserve workers (0 or 1): started, mapped, locked and idle, one step behind the
    /// standby. When the standby takes over, the reserve becomes the new standby at once
    /// (no exec on the recovery path) and a new reserve is started in the background.
    /// Ignored with `--standby none`.
    #[arg(long, default_value_t = 1)]
    pub reserve_workers: u32,

    /// SCHED_FIFO priority of the output thread (the highest of the service).
    #[arg(long, default_value_t = 80)]
    pub output_priority: i32,

    /// SCHED_FIFO priority of the monitor thread (death detection and failover).
    #[arg(long, default_value_t = 75)]
    pub monitor_priority: i32,

    /// SCHED_FIFO priority of the workers' render threads.
    #[arg(long, default_value_t = 70)]
    pub render_priority: i32,

    /// A worker whose heartbeat (committed blocks) stands still this many block periods after
    /// a batch of its ring fell free (the output woke it to fill it) is declared hung and
    /// killed.
    #[arg(long, default_value_t = 2)]
    pub hang_timeout_blocks: u32,

    /// Restart intensity: at most this many worker deaths within --restart-window-s before
    /// new workers are started with an exponential backoff (a crash loop must not become a
    /// fork bomb; the primary keeps playing, or silence is played, meanwhile). The newest 4096
    /// deaths are remembered: a limit of 4096 or more never throttles.
    #[arg(long, default_value_t = 100)]
    pub max_restarts: u32,

    /// The window of --max-restarts, in seconds.
    #[arg(long, default_value_t = 10)]
    pub restart_window_s: u32,

    /// Hold a CPU wake-up latency request (/dev/cpu_dma_latency, PM QoS) of this many µs
    /// while running, so idle CPUs stay in shallow idle states and wake up at once: faster
    /// crash detection (a killed worker exits sooner) at the cost of power (on a VM, idle
    /// vCPUs poll instead of halting). Off by default; 0 is the lowest latency.
    #[arg(long)]
    pub cpu_latency_qos_us: Option<u32>,

    /// Serve the D-Bus API peer-to-peer on an AF_UNIX stream socket at this path too, created
    /// group `audio`, mode 0660 (who may change the sound on the bus): `audiowardenctl` uses it
    /// when no system bus runs or no bus knows the service (a development run, a machine
    /// without the package's policy). `none`: no such socket.
    #[arg(long, value_name = "PATH", default_value = "/run/audiowarden/control.sock")]
    pub control_socket: String,

    /// OSC over an AF_UNIX datagram socket at this path, created group `audio`, mode 0660: only
    /// root and the audio group may send (liblo reaches it as `osc.unix:///PATH`; the journal
    /// names the sender's uid). Under systemd, audiowarden-osc.socket hands it over instead.
    /// `none`: no AF_UNIX OSC socket.
    #[arg(long, value_name = "PATH", default_value = "/run/audiowarden/osc.sock")]
    pub osc_socket: String,

    /// OSC over UDP at ADDR:PORT too (off by default). OSC has no authentication: on loopback
    /// every local user can set the tone, `nobody` included (D-Bus reserves that for group
    /// `audio`). A non-loopback address also needs --osc-allow-remote. Under systemd, use
    /// audiowarden-osc-udp.socket (the shipped unit has no network of its own).
    #[arg(long, value_name = "ADDR:PORT")]
    pub osc_listen: Option<String>,

    /// Let --osc-listen take a non-loopback address: anyone who can reach it over the network
    /// can then set the tone.
    #[arg(long)]
    pub osc_allow_remote: bool,

    /// Write every metric, in the Prometheus text format, to this file once a second (atomically:
    /// a temporary file renamed over it, mode 0644), for node_exporter's textfile collector:
    /// e.g. /var/lib/prometheus/node-exporter/audiowarden.prom (Debian's
    /// prometheus-node-exporter reads that directory). Off by default.
    #[arg(long, value_name = "PATH")]
    pub prometheus_textfile: Option<PathBuf>,

    /// Worker binary (default: this very binary, re-executed in the worker role).
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,

    /// TEST ONLY, never in production: the output thread stops advancing this many ms after
    /// start (it stays alive but plays nothing), to prove that the systemd watchdog restarts
    /// a daemon that plays nothing. Hidden from --help.
    #[arg(long, hide = true)]
    pub test_fault_output_stall_ms: Option<u64>,

    /// TEST ONLY, never in production: `AT_MS:FOR_MS`, the output thread sleeps FOR_MS once,
    /// AT_MS after start (a writer stalled longer than the device buffer: an xrun).
    #[arg(long, hide = true, value_parser = parse_pause)]
    pub test_fault_output_pause: Option<(u64, u64)>,
}

fn parse_pause(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').ok_or("expected AT_MS:FOR_MS")?;
    Ok((a.parse().map_err(|_| "AT_MS: not a number")?, b.parse().map_err(|_| "FOR_MS: not a number")?))
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["audiowardend"])
    }
}

/// A setting outside its valid range.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{key}: {message}")]
pub struct ConfigError {
    pub key: &'static str,
    pub message: String,
}

impl Config {
    /// Checks every value against its valid range.
    ///
    /// # Errors
    /// The first setting out of range, naming the range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, message: String| Err(ConfigError { key, message });
        if !(8_000..=384_000).contains(&self.sample_rate) {
            return err("sample-rate", format!("{} is outside 8000..=384000 Hz", self.sample_rate));
        }
        if !(16..=4096).contains(&self.block_frames) {
            return err("block-frames", format!("{} is outside 16..=4096 frames", self.block_frames));
        }
        if !(2..=128).contains(&self.lookahead_blocks) {
            return err("lookahead-blocks", format!("{} is outside 2..=128 blocks", self.lookahead_blocks));
        }
        if !(2..=32).contains(&self.device_periods) {
            return err("device-periods", format!("{} is outside 2..=32 periods", self.device_periods));
        }
        if !(1..=64).contains(&self.hang_timeout_blocks) {
            return err("hang-timeout-blocks", format!("{} is outside 1..=64 blocks", self.hang_timeout_blocks));
        }
        if self.reserve_workers > 1 {
            return err("reserve-workers", format!("{} is outside 0..=1", self.reserve_workers));
        }
        if !(1..=1_000_000).contains(&self.max_restarts) {
            return err("max-restarts", format!("{} is outside 1..=1000000", self.max_restarts));
        }
        if !(1..=3600).contains(&self.restart_window_s) {
            return err("restart-window-s", format!("{} is outside 1..=3600 seconds", self.restart_window_s));
        }
        if !crate::engine::frequency_ok(self.frequency, self.sample_rate) {
            return err("frequency", crate::engine::frequency_range_message(self.frequency, self.sample_rate));
        }
        if !crate::engine::gain_ok(self.gain) {
            return err("gain", crate::engine::gain_range_message(self.gain));
        }
        for (key, p) in [
            ("output-priority", self.output_priority),
            ("monitor-priority", self.monitor_priority),
            ("render-priority", self.render_priority),
        ] {
            if !(1..=99).contains(&p) {
                return err(key, format!("{p} is outside 1..=99"));
            }
        }
        self.validate_osc()?;
        // The output must never wait for the monitor, nor the monitor for a render thread.
        if !(self.output_priority > self.monitor_priority && self.monitor_priority > self.render_priority) {
            return err(
                "output-priority",
                format!(
                    "priorities must be ordered output > monitor > render, got {} > {} > {}",
                    self.output_priority, self.monitor_priority, self.render_priority
                ),
            );
        }
        Ok(())
    }

    /// `--osc-listen` is ADDR:PORT, on loopback unless remote access is meant.
    fn validate_osc(&self) -> Result<(), ConfigError> {
        let err = |key, message: String| Err(ConfigError { key, message });
        if let Some(l) = &self.osc_listen {
            match l.parse::<std::net::SocketAddr>() {
                Err(_) => return err("osc-listen", format!("{l:?} is not ADDR:PORT (e.g. 127.0.0.1:9000)")),
                Ok(a) if !a.ip().is_loopback() && !self.osc_allow_remote => {
                    return err(
                        "osc-listen",
                        format!(
                            "{a} is not a loopback address: OSC has no authentication, so anyone who can \
                             reach it could set the tone; add --osc-allow-remote to mean it"
                        ),
                    )
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Every setting (what the configuration file may hold) by its flag name, with its value
    /// as text: what a reload compares. A test keeps it equal to the flags.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let qos = self.cpu_latency_qos_us.map_or_else(|| "unset".to_owned(), |v| v.to_string());
        vec![
            ("output", self.output.to_string()),
            ("device-periods", self.device_periods.to_string()),
            ("shm-dir", self.shm_dir.display().to_string()),
            ("sample-rate", self.sample_rate.to_string()),
            ("block-frames", self.block_frames.to_string()),
            ("lookahead-blocks", self.lookahead_blocks.to_string()),
            ("control-stamp", format!("{:?}", self.control_stamp).to_lowercase()),
            ("frequency", self.frequency.to_string()),
            ("gain", self.gain.to_string()),
            ("standby", format!("{:?}", self.standby).to_lowercase()),
            ("reserve-workers", self.reserve_workers.to_string()),
            ("output-priority", self.output_priority.to_string()),
            ("monitor-priority", self.monitor_priority.to_string()),
            ("render-priority", self.render_priority.to_string()),
            ("hang-timeout-blocks", self.hang_timeout_blocks.to_string()),
            ("max-restarts", self.max_restarts.to_string()),
            ("restart-window-s", self.restart_window_s.to_string()),
            ("cpu-latency-qos-us", qos),
            ("control-socket", self.control_socket.clone()),
            ("osc-socket", self.osc_socket.clone()),
            ("osc-listen", self.osc_listen.clone().unwrap_or_else(|| "unset".to_owned())),
            ("osc-allow-remote", self.osc_allow_remote.to_string()),
            (
                "prometheus-textfile",
                self.prometheus_textfile.as_ref().map_or_else(|| "unset".to_owned(), |p| p.display().to_string()),
            ),
        ]
    }

    /// Length of one block in nanoseconds.
    pub fn block_ns(&self) -> u64 {
        self.block_frames as u64 * 1_000_000_000 / self.sample_rate as u64
    }

    /// Blocks a worker renders per wake-up (k): the output wakes each worker once every k
    /// blocks, when k slots of its ring are free, instead of after every block. Half the
    /// lookahead, at most 4 (4 at the default 8). Its ring holds the lookahead plus a batch
    /// ([`Config::ring_blocks`]), so a healthy ring never holds less than the lookahead (the
    /// budget for a takeover and for a stalled machine stays what it was), and a hang is
    /// judged hang-timeout blocks after the wake-up that found it not rendering, with the
    /// whole lookahead still in its ring.
    pub fn render_batch_blocks(&self) -> u32 {
        (self.lookahead_blocks / 2).clamp(1, 4)
    }

    /// Slots of a worker's audio ring: the lookahead and a batch (12 at the defaults). Control
    /// changes are stamped beyond it.
    pub fn ring_blocks(&self) -> u32 {
        self.lookahead_blocks + self.render_batch_blocks()
    }

    /// Periods the virtual clock (the `virtual` and `wav:` outputs, and a lost device's
    /// stand-in) plays per wake-up: half the device buffer, at most 2 (2 at the default 4),
    /// so at least half the buffer is always left as the margin for a late wake-up.
    pub fn periods_per_wake(&self) -> u32 {
        (self.device_periods / 2).clamp(1, 2)
    }

    /// The monitor's timer while something is in flight (a worker starting, a dead ring
    /// draining, a retry or a cold takeover pending): every half batch (2 blocks at the
    /// defaults). The heartbeat does not wait for it: the output thread wakes the monitor as
    /// soon as a worker's batch is overdue or a block it holds no longer checks out.
    pub fn monitor_busy_tick_ns(&self) -> u64 {
        self.block_ns() * (self.render_batch_blocks() / 2).max(1) as u64
    }

    /// The monitor's timer when all is well: 64 blocks, at most 100 ms (85 ms at the
    /// defaults): the full scan of every held block, the metrics it keeps, and the proof of
    /// its liveness the systemd watchdog asks for.
    pub fn monitor_idle_tick_ns(&self) -> u64 {
        (self.block_ns() * 64).min(100_000_000).max(self.monitor_busy_tick_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_values_parse_and_bad_ones_name_the_choices() {
        assert_eq!("auto".parse(), Ok(OutputSpec::Auto));
        assert_eq!("virtual".parse(), Ok(OutputSpec::Virtual));
        assert_eq!("wav:/tmp/x.wav".parse(), Ok(OutputSpec::Wav("/tmp/x.wav".into())));
        assert_eq!("alsa:plughw:CARD=PCH,DEV=0".parse(), Ok(OutputSpec::Alsa("plughw:CARD=PCH,DEV=0".into())));
        assert_eq!("alsa:plug:jack".parse(), Ok(OutputSpec::Alsa("plug:jack".into())));
        for bad in ["alsa:", "wav:", "speakers", ""] {
            let e = bad.parse::<OutputSpec>().unwrap_err();
            assert!(e.contains("alsa:PCM") && e.contains("--list-outputs"), "{e}");
        }
    }

    #[test]
    fn defaults_are_auto_output_and_four_device_periods() {
        let c = Config::default();
        assert_eq!(c.output, OutputSpec::Auto);
        assert_eq!(c.device_periods, 4);
        assert!(c.validate().is_ok());
        let bad = Config { device_periods: 1, ..Config::default() };
        assert_eq!(bad.validate().unwrap_err().key, "device-periods");
    }

    #[test]
    fn priorities_must_be_ordered() {
        let bad = Config { monitor_priority: 85, ..Config::default() };
        let e = bad.validate().unwrap_err();
        assert!(e.message.contains("output > monitor > render"), "{e}");
        let ok = Config { output_priority: 90, monitor_priority: 60, render_priority: 50, ..Config::default() };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn the_output_pause_fault_parses() {
        assert_eq!(parse_pause("1500:200"), Ok((1500, 200)));
        assert!(parse_pause("1500").is_err());
    }
}
