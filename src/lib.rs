//! audiowarden: a Linux audio service whose audio never stops.
//!
//! The supervisor ([`supervisor`]) owns the output ([`output`]) and runs the audio
//! [`engine`] in worker processes ([`worker`]) that render ahead into shared memory
//! ([`shm`]). A worker's death is noticed through its pidfd (or a stalled heartbeat) and a
//! pre-warmed standby continues the stream sample-exactly. Changes arrive through
//! [`control`]; everything is measured in [`metrics`].

// Layers, top to bottom (each module uses only those below it; tests/layering.rs checks):
//   ctl, dbus, osc, notify, reload, logging, runtime_socket -> supervisor -> config_file -> control, output, worker
//   -> playback -> config, metrics, shm, engine -> sys.
// `unsafe` is denied but in sys, shm and playback (the lock-free slot table).
#![deny(unsafe_code)]
// Short functions (the threshold is in clippy.toml); `cargo clippy -D warnings` enforces it.
#![warn(clippy::too_many_lines)]

pub mod config;
pub mod config_file;
pub mod control;
pub mod ctl;
pub mod dbus;
pub mod engine;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod osc;
pub mod output;
pub mod playback;
pub mod reload;
pub mod runtime_socket;
pub mod shm;
pub mod supervisor;
pub mod sys;
pub mod worker;

pub use config::{Config, ControlStamp, OutputSpec, StandbyMode};
pub use control::{Control, ControlError, Stamp};
pub use metrics::MetricsSnapshot;
pub use supervisor::{Event, Handle, StartError, State, Supervisor};
