//! Writes the man pages and shell completions of `audiowardend` and `audiowardenctl` into a
//! directory, from their clap definitions, so that they cannot drift from the code:
//!
//!     cargo run --release --example gen-docs -- target/deb-assets
//!
//! Output: audiowardend.8, audiowardenctl.1 (uncompressed; cargo-deb gzips them), and for
//! each binary `NAME.bash`, `_NAME` (zsh) and `NAME.fish`. packaging/build-deb runs this
//! before `cargo deb`.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use audiowarden::{config::Config, ctl::Cli};
use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// The daemon page's DESCRIPTION (clap's one-line about is too short for a man page).
const DAEMON_DESCRIPTION: &str = "audiowardend is an audio service whose audio never stops. The \
supervisor (this process, the main process of audiowarden.service) plays to the sound card from a \
real-time output thread; the audio engine (a stereo sine oscillator with frequency and gain) \
renders ahead in worker processes through shared memory, with a pre-warmed standby. When a \
worker crashes, hangs or is killed, the supervisor notices through its pidfd (or a stalled \
heartbeat) and the standby continues the stream sample-exactly: no underrun, no click. A new \
standby is built and every shared-memory segment reclaimed.\n\n\
It is controlled over D-Bus on the system bus (name org.audiowarden.Engine1: SetFrequency, \
SetGain, GetMetrics, Reload), for example with audiowardenctl(1) or busctl(1), and logs to the \
journal. Run it as a service: systemctl enable --now audiowarden.";

/// The daemon's sections that clap does not know, after the generated ones.
const DAEMON_EXTRA: &str = r#".SH FILES
.TP
.I /etc/audiowarden/audiowarden.toml
The configuration file, read at start if it exists (another one with \fB\-\-config\fR \fIFILE\fR).
Every flag can be set there, as \fIkey\fR = \fIvalue\fR with the flag's long name as the key
(e.g. \fBfrequency = 440\fR); flags given on the command line override the file.
\fBaudiowardend \-\-check\-config\fR validates the file and the flags and exits.
.TP
.I /dev/shm/audiowarden
The shared-memory segments of the workers (rings and state) with a JSON manifest,
\fImanifest.json\fR, by which the next instance reclaims the segments of a crashed one
(another directory with \fB\-\-shm\-dir\fR).
.SH SIGNALS
.TP
.B SIGHUP
Re-reads the configuration and applies the live settings: frequency, gain, the real-time
priorities and the restart intensity (max-restarts, restart-window-s).
The other settings need a restart of the service; a file with an error changes nothing.
\fBsystemctl reload audiowarden\fR and \fBaudiowardenctl reload\fR do the same.
.TP
.BR SIGTERM ", " SIGINT
Stop: the workers are stopped and the daemon exits.
.SH "EXIT STATUS"
.TP
.B 0
Success (also after \fB\-\-check\-config\fR with a valid configuration).
.TP
.B 2
Bad configuration: a flag, or a line of the configuration file, is invalid.
The unit does not restart the service on this status (RestartPreventExitStatus=2).
.TP
.B 3
Could not start (e.g. the workers or the audio output could not be set up).
.SH "SEE ALSO"
.BR audiowardenctl (1),
.BR systemd.service (5),
.BR busctl (1)
"#;

fn main() -> io::Result<()> {
    let dir = std::env::args_os().nth(1).expect("usage: gen-docs OUTPUT_DIR");
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;

    let daemon = Config::command().long_about(DAEMON_DESCRIPTION);
    let mut f = File::create(dir.join("audiowardend.8"))?;
    Man::new(daemon.clone()).section("8").manual("System Administration").render(&mut f)?;
    f.write_all(DAEMON_EXTRA.as_bytes())?;

    // clap_mangen would list the subcommands as pages of their own (audiowardenctl-status(1)
    // ...); one page describes them all instead.
    let mut ctl = Cli::command().disable_help_subcommand(true);
    ctl.build();
    let man = Man::new(ctl.clone()).manual("User Commands");
    let mut f = File::create(dir.join("audiowardenctl.1"))?;
    man.render_title(&mut f)?;
    man.render_name_section(&mut f)?;
    man.render_synopsis_section(&mut f)?;
    man.render_description_section(&mut f)?;
    man.render_options_section(&mut f)?;
    commands_section(&mut ctl).to_writer(&mut f)?;
    man.render_version_section(&mut f)?;
    writeln!(f, ".SH \"SEE ALSO\"\n.BR audiowardend (8),\n.BR busctl (1)")?;

    for mut cmd in [daemon, Cli::command()] {
        let name = cmd.get_name().to_owned();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            clap_complete::generate_to(shell, &mut cmd, &name, dir)?;
        }
    }
    Ok(())
}

/// COMMANDS: each subcommand's usage line, its help, and its options with their help.
fn commands_section(ctl: &mut Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in ctl.get_subcommands_mut().filter(|s| !s.is_hide_set()) {
        let usage = sub.render_usage().to_string();
        roff.control("TP", []);
        roff.text([bold(usage.trim_start_matches("Usage: "))]);
        let about = sub.get_long_about().or(sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
        roff.text([roman(about)]);
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help")) {
            let value = match arg.get_value_names() {
                Some(names) if arg.get_action().takes_values() => format!(" <{}>", names[0]),
                _ => String::new(),
            };
            let help = arg.get_help().map(|h| format!(": {h}")).unwrap_or_default();
            roff.control("br", []);
            roff.text([bold(format!("--{}{value}", arg.get_long().unwrap())), roman(help)]);
        }
    }
    roff
}
