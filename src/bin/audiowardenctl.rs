//! `audiowardenctl`: control and inspect the audiowarden service (see `audiowarden::ctl`).

#![deny(unsafe_code)]
// Short functions (the threshold is in clippy.toml); `cargo clippy -D warnings` enforces it.
#![warn(clippy::too_many_lines)]

fn main() -> std::process::ExitCode {
    audiowarden::ctl::main()
}
