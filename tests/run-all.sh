#!/usr/bin/env bash
# Runs the whole audiowarden test suite on a fresh Debian 12 machine: installs what it needs,
# runs every test with real-time scheduling, then again with SCHED_FIFO refused (a cpu cgroup
# without an RT budget), then short smoke runs of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
cg=/sys/fs/cgroup/cpu
nort="$cg/audiowarden-nort-$$"
# Removes the no-RT cgroup once its last process is gone (processes the tests started, such
# as a harness's watchdog or a zombie unshare being reaped, can take a moment to leave).
remove_nort() {
    for _ in $(seq 100); do
        [ -d "$nort" ] || return 0
        rmdir "$nort" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "cannot remove $nort: still in it: $(cat "$nort/cgroup.procs" | tr '\n' ' ')" >&2
    return 1
}
cleanup() {
    if [ -d "$nort" ]; then
        echo $$ > "$cg/cgroup.procs" 2>/dev/null || true
        remove_nort || true
    fi
    rm -f "$log"
}
trap cleanup EXIT

# pkg-config, libasound2-dev: build (alsa-sys). dbus: dbus-daemon, dbus-send (the private
# system bus). systemd: busctl, journald, journalctl, systemctl, systemd --user,
# systemd-analyze. util-linux: setpriv, unshare, nsenter. procps: pgrep. jackd2,
# libasound2-plugins, alsa-utils: the paced ALSA device (jackd dummy + ALSA's JACK plugin).
# The Debian package (tests/package.sh): dpkg-dev (dpkg-shlibdeps, for cargo-deb's $auto
# Depends), libxml2-utils (xmllint), libdbus-1-dev (the D-Bus DTDs and their XML catalog),
# man-db (man; systemd-analyze verify runs it for Documentation=man:), adduser (the postinst
# without systemd-sysusers). liblo-tools: oscsend, the real OSC client (tests/osc.rs).
# prometheus (promtool), prometheus-node-exporter: the real checker and scraper
# (tests/prometheus.rs; their services are not started: no systemd as PID 1 here).
need_pkgs=(pkg-config libasound2-dev dbus systemd util-linux procps jackd2 libasound2-plugins alsa-utils
    dpkg-dev libxml2-utils libdbus-1-dev man-db adduser liblo-tools prometheus prometheus-node-exporter)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${need_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
fi

# Formatting (rustfmt.toml) and lints (clippy, warnings denied) are part of the suite.
echo "== cargo fmt --check; cargo clippy --all-targets -- -D warnings"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

# The integration tests run one at a time: each starts a supervisor with RT threads and two
# workers, and a 2-core machine is what they are meant to pass on.
echo "== tests, with real-time scheduling where the machine grants it"
cargo test --release --all-targets -- --test-threads=1 2>&1 | tee -a "$log"

# The library's unit tests once more in a debug build: overflow checks on, so arithmetic on
# values a broken worker can write (ring indices) is proven not to overflow (shm::ring tests).
echo "== unit tests in a debug build (overflow checks)"
cargo test --lib 2>&1 | tee -a "$log"

# Builds the .deb from the release binaries just built, installs it with dpkg, checks it and
# purges it (needs root).
echo "== Debian package"
bash tests/package.sh 2>&1 | tee -a "$log"

if [ "$(id -u)" = 0 ] && [ -w "$cg/cgroup.procs" ] && [ -e "$cg/cpu.rt_runtime_us" ]; then
    echo "== tests again, with SCHED_FIFO refused (cpu cgroup without an RT budget)"
    mkdir "$nort"
    echo 0 > "$nort/cpu.rt_runtime_us"
    (
        echo $BASHPID > "$nort/cgroup.procs"
        AW_EXPECT_NO_RT=1 cargo test --release --tests -- --test-threads=1 2>&1 | tee -a "$log"
    )
    echo $$ > "$cg/cgroup.procs"
    remove_nort
else
    echo "== skipping the no-RT pass: needs root and a cgroup v1 cpu controller"
fi

echo "== benchmarks (smoke runs; the README's figures come from 500 cycles and 1000 calls)"
# The failover smoke run also draws target/figures/failover.svg.
AW_BENCH_CYCLES=50 AW_BENCH_STORM_SECONDS=5 cargo bench --bench failover
AW_BENCH_CALLS=100 cargo bench --bench dbus_latency
AW_BENCH_SECONDS=2 cargo bench --bench output
# CPU against JACK (jackd dummy + jack_simple_client) and a plain ALSA player (speaker-test);
# the README's figures come from 20 s x 3 runs of every row.
AW_CPU_SECONDS=2 AW_CPU_RUNS=1 AW_CPU_BLOCKS=64 cargo bench --bench cpu
# The README's waveform figure, into target/figures (AW_FIGURES_DIR=docs/figures for the README's).
cargo bench --bench waveform

# One closing line over both passes (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "suite: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
