#!/bin/bash
# A paced ALSA playback device without a sound card: jackd2's dummy backend (paced by its own
# timer, like a card's interrupt) behind ALSA's JACK plugin (libasound2-plugins). Recipe:
# /work/shared/TESTING.md, section "Audio without a sound card".
#
# Needs (Debian 12): jackd2 libasound2-plugins alsa-utils (aplay), run as root (SCHED_FIFO).
#
# Usage:
#   with-jackd.sh start DIR     DIR: an existing, empty directory of the caller
#   with-jackd.sh stop DIR      stop jackd (TERM, then KILL) and clean up; idempotent
#
# Environment of `start` (all optional):
#   AW_JACK_OWNER_PID  the process whose death tears the server down (default: the caller,
#                      $PPID); "none" to keep the server until `stop` (interactive use)
#   AW_JACK_PERIOD     JACK period in frames (default 64, see below)
#   AW_JACK_RATE       sample rate (default 48000)
#   AW_JACK_REALTIME   0: jackd -r (no real-time threads, for the CPU benchmark's no-RT rows);
#                      default 1: -R -P 70
#   AW_JACK_SLOT_WAIT  seconds to wait for a free server slot when 8 JACK servers already run
#                      on the machine (jackd2's limit; default 120)
#
# Files in DIR:
#   env             what a client process needs, KEY=VALUE per line (see below)
#   alsa/asoundrc   alsa-lib config; found through XDG_CONFIG_HOME=DIR (alsa.conf of alsa-lib
#                   1.2.8 loads $XDG_CONFIG_HOME/alsa/asoundrc after /etc/asound.conf and
#                   ~/.asoundrc)
#   jackd.pid       jackd's PID            jackd.log   jackd's stdout and stderr
#   watch.pid       PID of the watchdog (jackd's parent; tears down if the owner dies or DIR
#                   disappears)
#   capture.raw     what clients of `awcapture` wrote, headerless, in the client's own sample
#                   format, rate and channel count; a second open of awcapture (while or after
#                   the first) writes capture.raw.0001, then .0002, ... (never truncates)
#
# ALSA PCMs defined (all playback only, 2 channels, at jackd's rate):
#   awjack_raw  the JACK plugin itself: FLOAT_LE only, period = a multiple of the JACK period
#   awjack      plug:awjack_raw; converts format (and rate and channels) for the client
#   awcapture   file plugin in front of awjack: records and plays paced
#
# The JACK period: the plugin only allows ALSA periods of 1..64 whole JACK periods and a
# buffer of at least 2 periods, so a writer gets 64-frame periods (and a buffer as small as
# 128 frames) only if jackd runs with -p 64; with -p 128 or -p 256, set_period_size_near(64)
# silently gives 128 or 256, and an exact set_period_size(64) fails with EINVAL. Pacing is the
# same at 64, 128 and 256 (5 s of audio in 5.1-5.2 s). The price of -p 64: 750 wakeups a
# second, and under CPU load jackd logs a few JACK-level xruns of its own in jackd.log
# ("JackTimedDriver::Process XRun", "JackEngine::XRun: client ... was not finished"), which
# -p 256 does not; ALSA clients are not told of those (no EPIPE, pacing holds), and the
# capture (recorded before JACK) cannot show them. Without an RT budget jackd logs such lines
# all the time at -p 64.
#
# Several servers may run at once: each has a name derived from DIR (JACK_DEFAULT_SERVER),
# and its sockets and semaphores in /dev/shm carry that name. The JACK shm registry
# (/dev/shm/jack-shm-registry, /dev/shm/jack-UID-N segments, /dev/shm/jack_db-UID and the
# SysV semaphore 0x282929) is shared by all servers of the machine: it is removed only by the
# last one out, i.e. when no jackd process is left, under a lock (flock on /dev/shm) that
# every start holds while launching its jackd.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
UID_=$(id -u)
JACK_REGISTRY_SEM=0x282929      # jackd2's SysV semaphore guarding the shm registry

die() { echo "with-jackd.sh: $*" >&2; exit 1; }

# starttime, alive
. "$(dirname "${BASH_SOURCE[0]}")/proc-lib.sh"

# True if PID $1 is alive and its command line contains $2 (guards against PID reuse).
is_ours() { alive "$1" && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"; }

# The server name of DIR $1 (absolute): a hash of the path, fixed length so that no name is a
# prefix of another (the cleanup globs below rely on that).
server_name() { echo "aw-$(printf '%s' "$1" | sha1sum | cut -c1-16)"; }

# True if any jackd (of any user, ours or not) is running on the machine.
any_jackd() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = jackd ] && alive "${p#/proc/}" && return 0
    done
    return 1
}

# Removes what jackd leaves in /dev/shm. $1 = server name. Must be called with the /dev/shm
# lock held (fd 9) and only once that server's jackd is dead.
cleanup_shm_locked() {
    local name=$1
    # This server's: its socket (jack_NAME_UID_0) and futex semaphores (jack_sem.UID_NAME_*).
    rm -f /dev/shm/jack_"$name"_* /dev/shm/jack_sem.*_"$name"_*
    # The machine-wide registry and the segments it hands out: only when no server is left (a
    # jackd killed with KILL leaves its segments; the next jackd to start would reclaim them).
    if ! any_jackd; then
        rm -rf /dev/shm/jack-shm-registry /dev/shm/jack-"$UID_"-* /dev/shm/jack_db-"$UID_"
        ipcrm -S "$JACK_REGISTRY_SEM" 2>/dev/null || true
    fi
}

cleanup_shm() {
    (
        flock -w 30 9 || die "could not lock /dev/shm"
        cleanup_shm_locked "$1"
    ) 9</dev/shm
}

# TERM, then (after 3 s) KILL PID $1 if it is still ours ($2: a string of its command line);
# returns once it is gone or a zombie.
terminate() {
    local pid=$1 what=$2 i
    is_ours "$pid" "$what" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 60); do alive "$pid" || return 0; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 100); do alive "$pid" || return 0; sleep 0.05; done
    echo "with-jackd.sh: PID $pid ($what) survived SIGKILL" >&2
    return 1
}

# One attempt to launch jackd, with the /dev/shm lock on fd 9 (taken here). Returns 0 once a
# client can connect, 3 if jackd found no free server slot, 1 on any other failure; the caller
# stops what is left.
launch() {
    local dir=$1 name=$2 period=$3 rate=$4 owner=$5 owner_start=$6 i jpid
    # Starts are serialized with every other start and cleanup (see the header), so that "no
    # jackd is running" means the same thing to all of them.
    flock -w 30 9 || { echo "with-jackd.sh: start: could not lock /dev/shm" >&2; return 1; }
    # Left over from servers killed without cleanup (e.g. their watchdog was killed too).
    cleanup_shm_locked "$name"
    # The watchdog starts jackd as its child, so it reaps it and sees it die at once. Neither
    # may inherit fd 9, or they would hold the lock for their whole life.
    setsid bash "$SELF" __run "$dir" "$name" "$period" "$rate" "$owner" "$owner_start" \
        </dev/null >/dev/null 2>>"$dir/jackd.log" 9<&- &
    echo $! > "$dir/watch.pid"
    for i in $(seq 100); do [ -s "$dir/jackd.pid" ] && break; sleep 0.05; done
    jpid=$(cat "$dir/jackd.pid" 2>/dev/null) || { echo "with-jackd.sh: start: jackd was not launched" >&2; return 1; }
    # Up = a client can connect. `jack_wait -s NAME -c` (prints "running" or "not running",
    # exits 0 either way) polled every 50 ms: `jack_wait -w -t 5` would do too, but it polls
    # only once a second. -s names the server; JACK_NO_START_SERVER: never start one.
    for i in $(seq 100); do
        alive "$jpid" || break
        [ "$(JACK_NO_START_SERVER=1 jack_wait -s "$name" -c 2>/dev/null)" = running ] && return 0
        sleep 0.05
    done
    # Let a dying jackd finish its log.
    for i in $(seq 20); do alive "$jpid" || break; sleep 0.05; done
    grep -q "Too many servers already active" "$dir/jackd.log" && return 3
    echo "with-jackd.sh: start: jackd did not come up within 5 s" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------
# start DIR
# ---------------------------------------------------------------------------------------------
cmd_start() {
    [ $# -eq 1 ] || die "usage: with-jackd.sh start DIR"
    [ -d "$1" ] || die "start: $1 is not a directory"
    local dir name period rate owner owner_start
    dir=$(cd "$1" && pwd -P)
    [ ! -e "$dir/jackd.pid" ] || die "start: $dir/jackd.pid exists (already started?)"
    name=$(server_name "$dir")
    period=${AW_JACK_PERIOD:-64}
    rate=${AW_JACK_RATE:-48000}
    owner=${AW_JACK_OWNER_PID:-$PPID}
    if [ "$owner" = none ]; then owner_start=none
    else owner_start=$(starttime "$owner") || die "start: owner process $owner not found"; fi

    # The ALSA side. Playback ports only: the dummy driver's system:playback_1/2.
    mkdir -p "$dir/alsa"
    cat > "$dir/alsa/asoundrc" <<EOF
# Written by tests/support/with-jackd.sh for JACK server "$name" (JACK_DEFAULT_SERVER).
pcm.awjack_raw {
    type jack
    playback_ports { 0 system:playback_1  1 system:playback_2 }
    hint { show on  description "JACK plugin (FLOAT_LE only) on test server $name" }
}
pcm.awjack {
    type plug
    slave.pcm "awjack_raw"
    hint { show on  description "Paced test output: plug to JACK server $name" }
}
# For the README's waveform figure (benches/waveform.rs): what a JACK recorder (jack_rec,
# client "jackrec") hears, across restarts of the player.
pcm.awrec_raw {
    type jack
    playback_ports { 0 jackrec:input1  1 jackrec:input2 }
}
pcm.awrec {
    type plug
    slave.pcm "awrec_raw"
    hint { show on  description "Paced test output into jack_rec on test server $name" }
}
pcm.awcapture {
    type file
    slave.pcm "awjack"
    file "$dir/capture.raw"
    format "raw"
    truncate false
    hint { show on  description "Paced test output, recorded to $dir/capture.raw" }
}
EOF
    # JACK_NO_START_SERVER: a client must never spawn a jackd of its own (with ~/.jackdrc's or
    # the built-in default settings) when this server is gone.
    cat > "$dir/env" <<EOF
XDG_CONFIG_HOME=$dir
JACK_DEFAULT_SERVER=$name
JACK_NO_START_SERVER=1
EOF

    # jackd2 allows at most 8 servers per machine (slots in the shared registry): a start that
    # finds them all taken ("Too many servers already active") waits for one, up to
    # AW_JACK_SLOT_WAIT seconds (default 120).
    local deadline=$((SECONDS + ${AW_JACK_SLOT_WAIT:-120})) rc waited=
    while :; do
        : > "$dir/jackd.log"
        rc=0
        launch "$dir" "$name" "$period" "$rate" "$owner" "$owner_start" 9</dev/shm || rc=$?
        [ "$rc" -ne 0 ] || break
        cmd_stop "$dir" || true
        if [ "$rc" -eq 3 ] && [ "$SECONDS" -lt "$deadline" ]; then
            [ -n "$waited" ] || echo "with-jackd.sh: all 8 JACK server slots taken: waiting" >&2
            waited=1
            sleep 0.5
            continue
        fi
        echo "--- $dir/jackd.log ---" >&2
        cat "$dir/jackd.log" >&2 2>/dev/null || true
        die "start failed"
    done
    if grep -q "Cannot use real-time scheduling" "$dir/jackd.log"; then
        echo "with-jackd.sh: warning: jackd runs without SCHED_FIFO: expect spurious xruns" >&2
    fi
}

# ---------------------------------------------------------------------------------------------
# The watchdog (internal): runs jackd as its child; tears down when jackd exits, when the
# owner dies, when DIR disappears, or on TERM (from stop).
# ---------------------------------------------------------------------------------------------
run_part() {
    local dir=$1 name=$2 period=$3 rate=$4 owner=$5 owner_start=$6 jpid= spid=
    shutdown() {
        trap '' TERM INT                 # finish the cleanup even if stop TERMs us meanwhile
        [ -z "$spid" ] || kill "$spid" 2>/dev/null || true     # no stray `sleep` left behind
        [ -z "$jpid" ] || terminate "$jpid" "-n $name" || true
        cleanup_shm "$name" || true
        exit 0
    }
    trap shutdown TERM INT
    # JACK_NO_AUDIO_RESERVATION: no D-Bus device reservation (there is no session bus).
    # -R -P 70: SCHED_FIFO 70 for the driver thread; clients' JACK threads (in the ALSA
    # plugin) get SCHED_FIFO 65.
    local rt=(-R -P 70)
    [ "${AW_JACK_REALTIME:-1}" != 0 ] || rt=(-r)
    JACK_NO_AUDIO_RESERVATION=1 JACK_NO_START_SERVER=1 \
        jackd -n "$name" "${rt[@]}" -d dummy -r "$rate" -p "$period" >>"$dir/jackd.log" 2>&1 &
    jpid=$!
    echo "$jpid" > "$dir/jackd.pid.tmp" && mv "$dir/jackd.pid.tmp" "$dir/jackd.pid"
    while alive "$jpid" && [ -d "$dir" ]; do
        if [ "$owner_start" != none ] && [ "$(starttime "$owner" || echo gone)" != "$owner_start" ]; then
            echo "with-jackd.sh: owner $owner is gone: stopping jackd" >&2
            break
        fi
        sleep 0.25 & spid=$!
        wait "$spid" || true             # `wait` (unlike a foreground sleep) lets TERM in at once
        spid=
    done
    shutdown
}

# ---------------------------------------------------------------------------------------------
# stop DIR
# ---------------------------------------------------------------------------------------------
cmd_stop() {
    [ $# -eq 1 ] || die "usage: with-jackd.sh stop DIR"
    [ -d "$1" ] || return 0
    local dir name jpid wpid
    dir=$(cd "$1" && pwd -P)
    name=$(server_name "$dir")
    jpid=$(cat "$dir/jackd.pid" 2>/dev/null || true)
    wpid=$(cat "$dir/watch.pid" 2>/dev/null || true)
    # jackd first (by PID, only if it is still this server's), then its watchdog.
    [ -z "$jpid" ] || terminate "$jpid" "-n $name"
    [ -z "$wpid" ] || terminate "$wpid" "__run $dir "
    cleanup_shm "$name"
    rm -f "$dir/jackd.pid" "$dir/watch.pid"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    __run) shift; run_part "$@" ;;
    *) die "usage: with-jackd.sh start DIR | stop DIR" ;;
esac
