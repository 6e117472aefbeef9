//! `audiowardenctl`: control and inspect the audiowarden service (see `audiowarden::ctl`).

fn main() -> std::process::ExitCode {
    audiowarden::ctl::main()
}
