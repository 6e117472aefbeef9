#!/bin/bash
# A real systemd user manager (`/lib/systemd/systemd --user`), systemd-journald and a private
# system dbus-daemon, in private mount, PID and cgroup namespaces, for integration tests that
# start the project's unit with `systemctl --user`. Recipe: /work/shared/TESTING.md, section "A
# real systemd service manager, journald and that bus, in namespaces".
#
# Usage (as root):
#   systemd-harness.sh start DIR          DIR: an existing, empty directory of the caller
#   systemd-harness.sh run DIR CMD [ARG]  run CMD inside the namespaces (stdio and exit code pass)
#   systemd-harness.sh stop DIR           tear everything down; idempotent
#
# Files in DIR:
#   cgroup          the subtree's name (audiowarden-sd-<basename of DIR>)
#   cgroup.paths    the subtree's absolute paths, one per hierarchy (written before any mkdir)
#   init.pid        host PID of the namespace's PID 1 (the bash running the init part below)
#   unshare.pid     host PID of `unshare` (PID 1's parent)
#   watch.pid       host PID of the watchdog that tears down if the owner process dies
#   harness.log     output of the init part, journald, dbus-daemon, systemd and the watchdog
#   config/, data/  the manager's XDG_CONFIG_HOME and XDG_DATA_HOME (unit links, drop-ins)
#
# Inside the namespace: the bus on unix:path=/run/dbus/system_bus_socket, the journal in
# /run/log/journal (plain `journalctl` reads it; the host's /var/log/journal is hidden),
# XDG_RUNTIME_DIR=/run/xrt. All of /run is a tmpfs of the namespace, so sandboxed units
# (PrivateTmp=, ProtectHome=) still see the notify socket, the bus and the journal.
#
# Safety (shared machine):
# - only `systemd --user` is ever started, never a system manager, and only after the init part
#   has checked that it really is PID 1 of a new PID namespace, in a new mount and cgroup
#   namespace, and that every cgroup hierarchy it mounted is rooted at the harness's subtree;
# - systemd refuses to run --user as PID 1 ("Can't run --user mode as PID 1"), so the init part
#   (bash) stays PID 1 and runs journald, dbus-daemon and the manager as its children; that also
#   keeps systemd's PID-1-only boot code (clock, core_pattern, mounts) out of the picture;
# - journald runs without CAP_AUDIT_CONTROL/CAP_AUDIT_READ, so it cannot switch on the host
#   kernel's audit (systemd 252 journald tries to) nor read the host's audit messages;
# - processes are only ever killed by PID, and only PIDs found in the harness's own subtree or
#   recorded in DIR (checked against the subtree before the kill);
# - every mount is made inside the private mount namespace and vanishes with it; on the host
#   the harness only creates DIR's files and the cgroup subtree, which `stop` removes.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
HIERARCHIES=(cpu memory pids systemd unified)
PATHS=()
BUS_ADDRESS=unix:path=/run/dbus/system_bus_socket
XRT=/run/xrt
START_TIMEOUT=${AW_HARNESS_START_TIMEOUT:-15}

die() { echo "systemd-harness: $*" >&2; exit 1; }
log() { echo "[harness $(date +%T.%3N) $1] ${*:2}"; }

# ---------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------

# The caller's cgroup path in hierarchy $1 (cpu|memory|pids|systemd|unified), from
# /proc/self/cgroup. The subtree is created below it, so a caller confined by the machinery
# (e.g. in a memory cgroup of its own) stays confined.
own_cgroup() {
    local want=$1 id ctrls path
    while IFS=: read -r id ctrls path; do
        case $want in
            unified) [ "$id" = 0 ] && [ -z "$ctrls" ] && { echo "$path"; return; } ;;
            systemd) [ "$ctrls" = name=systemd ] && { echo "$path"; return; } ;;
            *) case ",$ctrls," in *",$want,"*) echo "$path"; return ;; esac ;;
        esac
    done < /proc/self/cgroup
    die "hierarchy $want not found in /proc/self/cgroup"
}

# The controller list of hierarchy $1 as mount options (cpu may be co-mounted with cpuacct).
mount_opts() {
    local want=$1 id ctrls path
    case $want in systemd) echo none,name=systemd; return ;; unified) return ;; esac
    while IFS=: read -r id ctrls path; do
        case ",$ctrls," in *",$want,"*) echo "$ctrls"; return ;; esac
    done < /proc/self/cgroup
    die "hierarchy $want not found"
}

# Reads DIR/cgroup.paths into the array PATHS (empty if start never got that far).
load_paths() {
    PATHS=()
    [ -f "$1/cgroup.paths" ] || return 0
    mapfile -t PATHS < "$1/cgroup.paths"
}

# The host path of the subtree in the pids hierarchy (used to check a PID belongs to us).
pids_path() { local p; for p in "${PATHS[@]}"; do case $p in /sys/fs/cgroup/pids/*) echo "$p"; return ;; esac; done; }

# True if PID $1 is alive and in the harness's subtree (pids hierarchy), i.e. one of ours.
pid_is_ours() {
    local pid=$1 pp rel line
    [ -n "$pid" ] && alive "$pid" && [ -r "/proc/$pid/cgroup" ] || return 1
    pp=$(pids_path); [ -n "$pp" ] || return 1
    rel=${pp#/sys/fs/cgroup/pids}
    while IFS= read -r line; do
        case $line in *:pids:"$rel"|*:pids:"$rel"/*) return 0 ;; esac
    done 2>/dev/null < "/proc/$pid/cgroup"
    return 1
}

# Every PID in the subtree, in every hierarchy, recursively.
subtree_pids() {
    local p
    for p in "${PATHS[@]}"; do
        [ -d "$p" ] || continue
        find "$p" -name cgroup.procs -exec cat {} + 2>/dev/null || true
    done | sort -un
}

# starttime, alive
. "$(dirname "${BASH_SOURCE[0]}")/proc-lib.sh"

# Moves the calling process ($BASHPID) into the subtree in every hierarchy.
enter_subtree() {
    local p
    for p in "${PATHS[@]}"; do echo "$BASHPID" > "$p/cgroup.procs"; done
}

# Host PID of the namespace's PID 1: the process in the subtree whose NSpid ends in " 1".
find_init_pid() {
    local pid nspid
    for pid in $(subtree_pids); do
        nspid=$(awk '/^NSpid:/ { print (NF >= 3 ? $NF : "x") }' "/proc/$pid/status" 2>/dev/null) || continue
        [ "$nspid" = 1 ] && { echo "$pid"; return 0; }
    done
    return 1
}

# nsenter into the namespaces of init PID $1 with the harness environment; $2 = DIR.
ns_exec() {
    local pid=$1 dir=$2; shift 2
    exec nsenter -t "$pid" -m -p -C -- env -u NOTIFY_SOCKET -u DBUS_SESSION_BUS_ADDRESS \
        -u INVOCATION_ID -u LISTEN_FDS -u LISTEN_PID -u WATCHDOG_USEC -u WATCHDOG_PID \
        XDG_RUNTIME_DIR=$XRT XDG_CONFIG_HOME="$dir/config" XDG_DATA_HOME="$dir/data" \
        DBUS_SYSTEM_BUS_ADDRESS=$BUS_ADDRESS SYSTEMD_PAGER=cat PAGER=cat SYSTEMD_COLORS=0 \
        "$@"
}

# ---------------------------------------------------------------------------------------------
# start DIR
# ---------------------------------------------------------------------------------------------
cmd_start() {
    [ $# -eq 1 ] || die "usage: $0 start DIR"
    [ "$(id -u)" = 0 ] || die "must run as root"
    local dir name h base rel p budget ok init_pid upid state deadline owner
    dir=$(readlink -e "$1") || die "start: $1 does not exist"
    [ -d "$dir" ] || die "start: $dir is not a directory"
    [ ! -e "$dir/cgroup.paths" ] || die "start: $dir already holds a harness (stop it first)"
    for p in /lib/systemd/systemd /lib/systemd/systemd-journald /etc/systemd/journald.conf \
             /usr/share/dbus-1/system.conf; do
        [ -e "$p" ] || die "start: $p is missing (systemd, dbus installed?)"
    done
    base=$(basename "$dir" | tr -c 'A-Za-z0-9_.\n-' '_')
    name="audiowarden-sd-$base"
    echo "$name" > "$dir/cgroup"

    # Record every path before creating any, so that `stop` can clean a half-done start.
    PATHS=()
    for h in "${HIERARCHIES[@]}"; do
        [ -d "/sys/fs/cgroup/$h" ] || die "start: /sys/fs/cgroup/$h is missing"
        rel=$(own_cgroup "$h")
        p="/sys/fs/cgroup/$h${rel%/}/$name"
        PATHS+=("$p")
    done
    printf '%s\n' "${PATHS[@]}" > "$dir/cgroup.paths"

    # From here on, any failure tears down what exists.
    trap 'rc=$?; if [ $rc -ne 0 ]; then echo "systemd-harness: start failed, cleaning up; log: $dir/harness.log" >&2; tail -n 40 "$dir/harness.log" >&2 2>/dev/null || true; cmd_stop "$dir" >&2 || true; fi' EXIT

    for p in "${PATHS[@]}"; do mkdir "$p"; done

    # RT budget for the subtree (siblings share the parent's 950000): take what is left.
    ok=
    for budget in ${AW_HARNESS_RT_US:-200000} 100000 50000; do
        if echo "$budget" > "${PATHS[0]}/cpu.rt_runtime_us" 2>/dev/null; then ok=$budget; break; fi
    done
    log host "cgroup subtree $name, rt budget ${ok:-none}" >> "$dir/harness.log"
    [ -n "$ok" ] || echo "systemd-harness: warning: no RT budget for ${PATHS[0]}" >&2

    # Watchdog: if the owner (the process that ran `start`, e.g. the test binary) dies without
    # calling stop (killed, ctrl-C), tear down. Started before anything runs in the subtree,
    # in a session of its own (a ctrl-C to the caller's process group does not reach it),
    # outside the subtree, with no inherited stdio.
    local owner owner_start
    owner=${AW_HARNESS_OWNER_PID:-$PPID}
    owner_start=$(starttime "$owner") || die "start: owner process $owner not found"
    setsid bash "$SELF" __watch "$dir" "$owner" "$owner_start" </dev/null >>"$dir/harness.log" 2>&1 &
    echo $! > "$dir/watch.pid"

    local opts=()
    for h in "${HIERARCHIES[@]}"; do opts+=("$(mount_opts "$h")"); done

    # The launcher: a subshell moves itself (not the caller) into the subtree, then becomes
    # `setsid unshare ...` (exec keeps the PID). Nothing it starts may hold the caller's
    # stdout/stderr, or a caller reading them would wait for the namespace to end.
    (
        enter_subtree
        exec </dev/null >>"$dir/harness.log" 2>&1
        export AW_HARNESS_HOST_MNTNS AW_HARNESS_HOST_PIDNS AW_HARNESS_HOST_CGNS AW_HARNESS_CG_OPTS
        AW_HARNESS_HOST_MNTNS=$(readlink /proc/self/ns/mnt)
        AW_HARNESS_HOST_PIDNS=$(readlink /proc/self/ns/pid)
        AW_HARNESS_HOST_CGNS=$(readlink /proc/self/ns/cgroup)
        AW_HARNESS_CG_OPTS="${opts[*]}"
        exec setsid unshare --mount --pid --fork --mount-proc --cgroup --propagation private \
            -- bash "$SELF" __init "$dir"
    ) &
    upid=$!
    echo "$upid" > "$dir/unshare.pid"

    # The namespace's PID 1, as seen from here.
    init_pid=
    deadline=$((SECONDS + 5))
    while [ $SECONDS -lt $deadline ]; do
        init_pid=$(find_init_pid) && break
        alive "$upid" || break
        sleep 0.02
    done
    if [ -z "$init_pid" ]; then
        alive "$upid" || die "start: the namespace's init exited during startup (see $dir/harness.log)"
        die "start: the namespace's init did not appear"
    fi
    echo "$init_pid" > "$dir/init.pid"

    # Ready when the manager says so.
    state=
    deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        if ! alive "$init_pid"; then
            die "start: the namespace's init exited during startup (see $dir/harness.log)"
        fi
        state=$( (ns_exec "$init_pid" "$dir" timeout 5 systemctl --user is-system-running) 2>/dev/null) || true
        case $state in running|degraded) break ;; esac
        [ $SECONDS -lt $deadline ] || die "start: systemd --user not running after ${START_TIMEOUT}s (last state: '${state:-no answer}')"
        sleep 0.05
    done
    log host "systemd --user is $state (init pid $init_pid)" >> "$dir/harness.log"
    trap - EXIT
}

# ---------------------------------------------------------------------------------------------
# The init part: PID 1 of the new namespaces (bash). Output goes to DIR/harness.log.
# ---------------------------------------------------------------------------------------------
init_part() {
    local dir=$1 h opts i line conf sd_pid jd_pid bus_pid status
    # PID 1 only gets the signals it handles: a SIGTERM from `stop` during setup ends it (and
    # with it the namespace) at once.
    trap 'log init "SIGTERM during setup"; exit 143' TERM
    # Refuse to go on unless every namespace is really new: a manager outside them takes over
    # every process of the machine.
    [ "$$" = 1 ] || die "init: not PID 1 of a new PID namespace"
    [ "$(readlink /proc/self/ns/pid)" != "$AW_HARNESS_HOST_PIDNS" ] || die "init: same PID namespace as the host"
    [ "$(readlink /proc/self/ns/mnt)" != "$AW_HARNESS_HOST_MNTNS" ] || die "init: same mount namespace as the host"
    [ "$(readlink /proc/self/ns/cgroup)" != "$AW_HARNESS_HOST_CGNS" ] || die "init: same cgroup namespace as the host"
    # The launcher moved us into the subtree; inside our cgroup namespace every hierarchy must
    # therefore read "/" (outside one they would read ".../audiowarden-sd-...").
    while IFS=: read -r i opts line; do
        [ "$line" = / ] || die "init: cgroup namespace root is not our cgroup ($i:$opts:$line)"
    done < /proc/self/cgroup
    log init "namespaces ok (pid 1, own mount/pid/cgroup ns)"

    mount --make-rprivate /

    # cgroups: a tmpfs over /sys/fs/cgroup and the hierarchies mounted again. Mounted inside
    # the cgroup namespace, each shows the subtree as its root.
    mount -t tmpfs -o mode=0755,nosuid,nodev,noexec aw-cgroup /sys/fs/cgroup
    read -r -a opts <<< "$AW_HARNESS_CG_OPTS"
    i=0
    for h in "${HIERARCHIES[@]}"; do
        mkdir "/sys/fs/cgroup/$h"
        if [ "$h" = unified ]; then
            mount -t cgroup2 -o nosuid,nodev,noexec aw-cgroup2 /sys/fs/cgroup/unified
        else
            mount -t cgroup -o "nosuid,nodev,noexec,${opts[$i]}" aw-cgroup "/sys/fs/cgroup/$h"
        fi
        i=$((i + 1))
    done
    # Each hierarchy mounted on our tmpfs must be rooted at the namespace's cgroup (mountinfo
    # field 4). The host's mounts, now hidden under the tmpfs, are not children of it.
    local tmpfs_id n=0 mid parent dev root mp
    tmpfs_id=$(awk '$5 == "/sys/fs/cgroup" { id = $1 } END { print id }' /proc/self/mountinfo)
    while read -r mid parent dev root mp line; do
        [ "$parent" = "$tmpfs_id" ] || continue
        [ "$root" = / ] || die "init: $mp is not rooted at the subtree ($root)"
        n=$((n + 1))
    done < /proc/self/mountinfo
    [ "$n" = ${#HIERARCHIES[@]} ] || die "init: expected ${#HIERARCHIES[@]} cgroup mounts, found $n"

    # /run as on a booted system: /run/systemd/system (the user manager wants it) and the
    # inaccessible nodes unit sandboxing (ProtectHome=, ProtectKernelTunables=...) needs.
    mount -t tmpfs -o mode=0755,nosuid,nodev aw-run /run
    mkdir -p /run/systemd/system /run/systemd/inaccessible /run/aw-harness /run/dbus
    mkdir -m 0700 "$XRT"
    local ina=/run/systemd/inaccessible
    : > "$ina/reg"
    mkdir "$ina/dir"
    mkfifo "$ina/fifo"
    perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0]) or die "sock: $!\n"' "$ina/sock"
    mknod "$ina/chr" c 0 0
    mknod "$ina/blk" b 0 0
    chmod 0000 "$ina"/{reg,dir,fifo,sock,chr,blk}
    # Hide the host's persistent journal (plain journalctl then reads only ours). Only over an
    # existing directory: never create anything on the host's file systems.
    [ -d /var/log/journal ] && mount -t tmpfs -o mode=2755 aw-journal /var/log/journal

    # journald, volatile, touching nothing of the host (no kmsg, no audit, no syslog).
    cat > /run/aw-harness/journald.conf <<'EOF'
[Journal]
Storage=volatile
RateLimitBurst=0
RuntimeMaxUse=64M
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
EOF
    mount --bind /run/aw-harness/journald.conf /etc/systemd/journald.conf
    [ ! -d /etc/systemd/journald.conf.d ] || mount -t tmpfs -o mode=0755 aw-empty /etc/systemd/journald.conf.d
    setpriv --bounding-set=-audit_control,-audit_read -- /lib/systemd/systemd-journald &
    jd_pid=$!
    for i in $(seq 200); do [ -S /run/systemd/journal/socket ] && break; sleep 0.025; done
    [ -S /run/systemd/journal/socket ] || die "init: journald did not create /run/systemd/journal/socket"
    log init "journald up (pid $jd_pid)"

    # The private system bus: /usr/share/dbus-1/system.conf minus what only the real system
    # bus does, listening on /run/dbus/system_bus_socket, plus the project's policy.
    conf=/run/aw-harness/system.conf
    {
        grep -vE '<user>|<fork/>|<pidfile>|<syslog/>|<servicehelper>|<standard_system_servicedirs/>|<listen>' \
            /usr/share/dbus-1/system.conf | sed '/<\/busconfig>/d'
        echo "  <listen>$BUS_ADDRESS</listen>"
        [ -z "${AW_DBUS_POLICY_DIR:-}" ] || echo "  <includedir>$AW_DBUS_POLICY_DIR</includedir>"
        echo "</busconfig>"
    } > "$conf"
    dbus-daemon --config-file="$conf" --nofork --nopidfile &
    bus_pid=$!
    for i in $(seq 200); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.025; done
    [ -S /run/dbus/system_bus_socket ] || die "init: dbus-daemon did not create its socket"
    log init "dbus-daemon up (pid $bus_pid)"

    # Mask what the Debian packages enable for every user (audio servers, agents, tmpfiles:
    # systemd-tmpfiles must never run against the host's shared /tmp).
    local units=$dir/config/systemd/user u
    mkdir -p "$units" "$dir/data"
    for u in pulseaudio.service pulseaudio.socket pipewire.service pipewire.socket \
             pipewire-pulse.service pipewire-pulse.socket wireplumber.service \
             filter-chain.service pipewire-media-session.service \
             systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer \
             gpg-agent.socket gpg-agent-browser.socket gpg-agent-extra.socket gpg-agent-ssh.socket \
             dirmngr.socket pk-debconf-helper.socket; do
        ln -sfn /dev/null "$units/$u"
    done
    for u in /usr/lib/systemd/user/{pulseaudio,pipewire,wireplumber,systemd-tmpfiles-}* \
             /etc/systemd/user/{pulseaudio,pipewire,wireplumber,systemd-tmpfiles-}*; do
        [ -f "$u" ] || continue
        case $u in *.d|*.wants|*.requires) continue ;; esac
        ln -sfn /dev/null "$units/$(basename "$u")"
    done

    # The manager, with a clean environment. It cannot be PID 1 in --user mode: we stay PID 1,
    # reap orphans, and end the namespace when it exits.
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8 \
        XDG_RUNTIME_DIR=$XRT XDG_CONFIG_HOME="$dir/config" XDG_DATA_HOME="$dir/data" \
        DBUS_SYSTEM_BUS_ADDRESS=$BUS_ADDRESS \
        /lib/systemd/systemd --user --log-target=journal &
    sd_pid=$!
    log init "systemd --user started (ns pid $sd_pid)"

    # SIGTERM (from `stop`) asks the manager to exit; its end ends the namespace.
    trap 'log init "SIGTERM: stopping systemd --user"; kill -TERM $sd_pid 2>/dev/null || true' TERM
    status=0
    while kill -0 "$sd_pid" 2>/dev/null; do
        wait "$sd_pid" && status=0 || status=$?
    done
    log init "systemd --user exited ($status); stopping dbus-daemon and journald"
    kill -TERM "$bus_pid" "$jd_pid" 2>/dev/null || true
    wait "$bus_pid" "$jd_pid" 2>/dev/null || true
    log init "init exits"
    # PID 1 exiting kills whatever is left in the namespace.
}

# ---------------------------------------------------------------------------------------------
# The watchdog: tears down if the owner dies first, or if DIR disappears under a live harness.
# Leaves quietly once the subtree is gone (a normal stop; stop also SIGTERMs it).
# ---------------------------------------------------------------------------------------------
watch_part() {
    local dir=$1 owner=$2 owner_start=$3
    load_paths "$dir"            # kept in memory: still usable if DIR is deleted
    [ ${#PATHS[@]} -gt 0 ] || return 0
    while [ -d "${PATHS[0]}" ]; do
        if [ "$(starttime "$owner" || echo gone)" != "$owner_start" ]; then
            log watch "owner $owner is gone: tearing down"
            AW_HARNESS_IN_WATCH=1 cmd_stop "$dir" || true
            return 0
        fi
        if [ ! -f "$dir/cgroup.paths" ]; then
            # stop removes cgroup.paths only after the subtree; give it time to finish.
            sleep 2
            [ -d "${PATHS[0]}" ] || return 0
            log watch "$dir vanished under a live harness: tearing down" >&2
            AW_HARNESS_IN_WATCH=1 cmd_stop "$dir" || true
            return 0
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------------------------------------
# run DIR CMD [ARGS...]
# ---------------------------------------------------------------------------------------------
cmd_run() {
    [ $# -ge 2 ] || die "usage: $0 run DIR CMD [ARGS...]"
    local dir init_pid
    dir=$(readlink -e "$1") || die "run: $1 does not exist"
    shift
    init_pid=$(cat "$dir/init.pid" 2>/dev/null) || die "run: no harness in $dir"
    load_paths "$dir"
    pid_is_ours "$init_pid" || die "run: the harness in $dir is not running"
    # Join the subtree (this process, not the caller) so that whatever CMD leaves behind is
    # accounted, RT-budgeted and cleaned with the harness.
    enter_subtree 2>/dev/null || true
    ns_exec "$init_pid" "$dir" "$@"
}

# ---------------------------------------------------------------------------------------------
# stop DIR
# ---------------------------------------------------------------------------------------------
cmd_stop() {
    [ $# -eq 1 ] || die "usage: $0 stop DIR"
    local dir=$1 init_pid upid wpid pid p i left
    # The subtree's paths: from DIR, or (watchdog, DIR deleted) those already in memory.
    if [ -f "$dir/cgroup.paths" ]; then load_paths "$dir"; fi
    [ ${#PATHS[@]} -gt 0 ] || return 0
    init_pid=$(cat "$dir/init.pid" 2>/dev/null || true)
    upid=$(cat "$dir/unshare.pid" 2>/dev/null || true)
    [ -n "$init_pid" ] || init_pid=$(find_init_pid || true)

    if pid_is_ours "$init_pid"; then
        # Orderly: the manager stops its units and exits, then the init part ends.
        # (If the manager does not answer, e.g. it is still starting, go straight to SIGTERM.)
        if (ns_exec "$init_pid" "$dir" timeout 5 systemctl --user exit) >/dev/null 2>&1; then
            for i in $(seq 100); do pid_is_ours "$init_pid" || break; sleep 0.05; done
        fi
        # Then SIGTERM (init's handler stops the manager), then SIGKILL: killing PID 1 of a
        # PID namespace kills everything in it.
        if pid_is_ours "$init_pid"; then
            kill -TERM "$init_pid" 2>/dev/null || true
            for i in $(seq 40); do pid_is_ours "$init_pid" || break; sleep 0.05; done
        fi
        if pid_is_ours "$init_pid"; then
            kill -KILL "$init_pid" 2>/dev/null || true
        fi
    fi

    # The watchdog (outside the subtree): only if it is the one recorded, and not ourselves.
    wpid=$(cat "$dir/watch.pid" 2>/dev/null || true)
    if [ -n "$wpid" ] && [ -z "${AW_HARNESS_IN_WATCH:-}" ] \
        && tr '\0' ' ' < "/proc/$wpid/cmdline" 2>/dev/null | grep -qF -- "__watch $dir "; then
        kill -TERM "$wpid" 2>/dev/null || true
    fi

    # Whatever is still in the subtree (`unshare` until it has reaped the init, processes
    # that joined through `run`): ours by construction. Wait, then SIGKILL by PID.
    for i in $(seq 200); do
        left=$(subtree_pids)
        [ -n "$left" ] || break
        if [ "$i" -gt 60 ]; then
            for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
        fi
        sleep 0.05
    done
    left=$(subtree_pids)
    [ -z "$left" ] || echo "systemd-harness: warning: processes still in the subtree: $left" >&2

    # rmdir deepest first, in every hierarchy (cgroup dirs only hold virtual files).
    for i in $(seq 40); do
        for p in "${PATHS[@]}"; do
            [ -d "$p" ] && find "$p" -depth -type d -exec rmdir {} + 2>/dev/null || true
        done
        left=
        for p in "${PATHS[@]}"; do [ -d "$p" ] && left="$left $p"; done
        [ -n "$left" ] || break
        sleep 0.05
    done
    if [ -n "$left" ]; then
        echo "systemd-harness: could not remove:$left" >&2
        return 1
    fi
    rm -f "$dir/cgroup.paths" "$dir/init.pid" "$dir/unshare.pid" "$dir/watch.pid"
    return 0
}

case ${1:-} in
    start) shift; cmd_start "$@" ;;
    run) shift; cmd_run "$@" ;;
    stop) shift; [ $# -eq 1 ] || die "usage: $0 stop DIR"
          d=$(readlink -f "$1"); cmd_stop "$d" ;;
    __init) shift; init_part "$@" ;;
    __watch) shift; watch_part "$@" ;;
    *) die "usage: $0 start DIR | run DIR CMD [ARGS...] | stop DIR" ;;
esac
