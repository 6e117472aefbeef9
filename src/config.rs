//! Daemon settings: the command line of `audiowardend` (clap), also used as the library's
//! configuration, with validation that names the valid range of every value.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, ValueEnum};

/// Where the audio goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// Paced on CLOCK_MONOTONIC like a sound card, plays into nothing.
    Virtual,
    /// Like `Virtual`, and records every played frame to a 32-bit float WAV file.
    Wav(PathBuf),
}

impl FromStr for OutputSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "virtual" => Ok(OutputSpec::Virtual),
            _ => match s.strip_prefix("wav:") {
                Some(p) if !p.is_empty() => Ok(OutputSpec::Wav(PathBuf::from(p))),
                _ => Err(format!("unknown output {s:?}: expected `virtual` or `wav:PATH`")),
            },
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

/// audiowardend: a Linux audio service whose audio never stops.
///
/// The supervisor (this process) plays the audio; the engine runs in worker processes with a
/// pre-warmed standby, so a worker crash is inaudible.
#[derive(Debug, Clone, Parser)]
#[command(name = "audiowardend", version, about, long_about = None)]
pub struct Config {
    /// Audio output: `virtual` (paced like a sound card, no device) or `wav:PATH` (the same,
    /// recording every played frame to PATH).
    #[arg(long, default_value = "virtual", value_parser = OutputSpec::from_str)]
    pub output: OutputSpec,

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

    /// A worker whose heartbeat (committed blocks) stands still this many block periods while
    /// its ring has room is declared hung and killed.
    #[arg(long, default_value_t = 2)]
    pub hang_timeout_blocks: u32,

    /// Restart intensity: at most this many worker deaths within --restart-window-s before
    /// new workers are started with an exponential backoff (a crash loop must not become a
    /// fork bomb; the primary keeps playing, or silence is played, meanwhile).
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

    /// Worker binary (default: this very binary, re-executed in the worker role).
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,

    /// TEST ONLY, never in production: the output thread stops advancing this many ms after
    /// start (it stays alive but plays nothing), to prove that the systemd watchdog restarts
    /// a daemon that plays nothing. Hidden from --help.
    #[arg(long, hide = true)]
    pub test_fault_output_stall_ms: Option<u64>,
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
        if !(2..=64).contains(&self.lookahead_blocks) {
            return err("lookahead-blocks", format!("{} is outside 2..=64 blocks", self.lookahead_blocks));
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
        if let Err(e) = crate::control::validate_frequency(self.frequency, self.sample_rate) {
            return err("frequency", e.to_string());
        }
        if let Err(e) = crate::control::validate_gain(self.gain) {
            return err("gain", e.to_string());
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
        Ok(())
    }

    /// Length of one block in nanoseconds.
    pub fn block_ns(&self) -> u64 {
        self.block_frames as u64 * 1_000_000_000 / self.sample_rate as u64
    }
}
