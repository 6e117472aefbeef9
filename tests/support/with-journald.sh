#!/bin/bash
# Runs a command with a real systemd-journald, in a private mount namespace whose /run is a
# fresh tmpfs (so the journal socket exists only there), then dumps the journal as JSON.
# Usage (as root): unshare --mount --propagation private -- bash with-journald.sh WORKDIR CMD...
# The command runs in the background; the script stops it with SIGTERM once WORKDIR/stop
# exists, then writes WORKDIR/journal.json and WORKDIR/cmd.status.
set -euo pipefail
work=$1; shift
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/journal
# Volatile, and touching nothing of the host: no kmsg, no syslog, and no audit (journald 252
# would otherwise switch on the host kernel's audit, which is machine-wide).
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\nReadKMsg=no\nForwardToSyslog=no\nForwardToKMsg=no\nForwardToConsole=no\nForwardToWall=no\n' > "$work/journald.conf"
mount --bind "$work/journald.conf" /etc/systemd/journald.conf
[ ! -d /etc/systemd/journald.conf.d ] || mount -t tmpfs -o mode=0755 aw-empty /etc/systemd/journald.conf.d
setpriv --bounding-set=-audit_control,-audit_read -- /lib/systemd/systemd-journald & jpid=$!
cmd_pid=
cleanup() {
    [ -n "$cmd_pid" ] && kill -TERM "$cmd_pid" 2>/dev/null || true
    kill -TERM "$jpid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap "exit 143" TERM INT
for _ in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
[ -S /run/systemd/journal/socket ] || { echo "journald did not start" >&2; exit 1; }
"$@" > "$work/cmd.out" 2>&1 & cmd_pid=$!
echo "$cmd_pid" > "$work/cmd.pid"
# Ends when told to, when the command dies, or when the caller's work dir is gone.
while [ ! -e "$work/stop" ] && [ -d "$work" ] && kill -0 "$cmd_pid" 2>/dev/null; do sleep 0.05; done
kill -TERM "$cmd_pid" 2>/dev/null || true
status=0; wait "$cmd_pid" || status=$?
cmd_pid=
echo "$status" > "$work/cmd.status"
journalctl --sync 2>/dev/null || sleep 0.5
journalctl -D /run/log/journal -o json > "$work/journal.json.tmp"
mv "$work/journal.json.tmp" "$work/journal.json"
