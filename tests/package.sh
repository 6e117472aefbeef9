#!/usr/bin/env bash
# Acceptance test of the Debian package: builds it (packaging/build-deb), inspects it, installs
# it on this machine with dpkg, checks what got installed (binaries, user, unit, D-Bus policy,
# man pages, completions, configuration), purges it and checks what is left.
#
# Run as root (tests/run-all.sh does). A package `audiowarden` already installed is purged
# first. The system user audiowarden is kept by the purge (by design, see
# packaging/debian/postrm); if it did not exist before this test, the test removes it at the
# end, so that every run creates it from scratch. Ends with one line in cargo's format
# (`test result: ok. N passed; M failed; ...`) that run-all.sh's summary counts; exits
# non-zero if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PKG=audiowarden
UNIT=/usr/lib/systemd/system/audiowarden.service
POLICY=/usr/share/dbus-1/system.d/org.audiowarden.Engine1.conf
IFACE=/usr/share/dbus-1/interfaces/org.audiowarden.Engine1.xml
CONF=/etc/audiowarden/audiowarden.toml
# Every file the package must hold, and nothing else (directories aside).
EXPECTED_FILES="
/etc/audiowarden/audiowarden.toml
/usr/bin/audiowardenctl
/usr/bin/audiowardend
/usr/lib/systemd/system/audiowarden-osc-udp.socket
/usr/lib/systemd/system/audiowarden-osc.socket
/usr/lib/systemd/system/audiowarden.service
/usr/lib/sysusers.d/audiowarden.conf
/usr/lib/tmpfiles.d/audiowarden.conf
/usr/share/bash-completion/completions/audiowardenctl
/usr/share/bash-completion/completions/audiowardend
/usr/share/dbus-1/interfaces/org.audiowarden.Engine1.xml
/usr/share/dbus-1/system.d/org.audiowarden.Engine1.conf
/usr/share/doc/audiowarden/README.md
/usr/share/doc/audiowarden/copyright
/usr/share/fish/vendor_completions.d/audiowardenctl.fish
/usr/share/fish/vendor_completions.d/audiowardend.fish
/usr/share/man/man1/audiowardenctl.1.gz
/usr/share/man/man8/audiowardend.8.gz
/usr/share/zsh/vendor-completions/_audiowardenctl
/usr/share/zsh/vendor-completions/_audiowardend
"

# Milliseconds since the epoch; seconds with one or two decimals since a start.
now_ms() { echo $(($(date +%s%N) / 1000000)); }
since() { local ms=$(($(now_ms) - $1)); printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)); }
start=$(now_ms)
tmp=$(mktemp -d /tmp/audiowarden-package.XXXXXX)
deb=
installed_by_us=0
user_existed=0
getent passwd audiowarden >/dev/null && user_existed=1
cleanup() {
    if [ "$installed_by_us" = 1 ] && dpkg -s "$PKG" >/dev/null 2>&1; then
        echo "cleanup: purging $PKG"
        dpkg --purge "$PKG" >/dev/null 2>&1 || echo "cleanup: dpkg --purge $PKG failed" >&2
    fi
    if [ "$user_existed" = 0 ] && getent passwd audiowarden >/dev/null; then
        userdel audiowarden 2>/dev/null || echo "cleanup: userdel audiowarden failed" >&2
        if getent group audiowarden >/dev/null; then groupdel audiowarden || echo "cleanup: groupdel audiowarden failed" >&2; fi
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

passed=0
failed=0
ignored=0
status=0
# A problem found by a check: the check goes on (to report every problem) and fails.
fail() { echo "$*"; status=1; }
# A check that cannot run here says why and is counted as ignored.
skip() { echo "$*"; status=2; }
# Runs check_NAME and prints its verdict, then its output (indented). A fatal check that
# fails ends the test (nothing after it could pass).
run() {
    local name=$1 fatal=${2:-} t0 t
    status=0
    t0=$(now_ms)
    "check_$name" >"$tmp/out" 2>&1 || [ "$status" != 0 ] || status=1
    t=$(since "$t0")
    if [ "$status" = 0 ]; then
        echo "check $name ... ok (${t}s)"
        sed 's/^/    /' "$tmp/out"
        passed=$((passed + 1))
    elif [ "$status" = 2 ]; then
        echo "check $name ... ignored: $(tr '\n' ' ' <"$tmp/out")"
        ignored=$((ignored + 1))
    else
        echo "check $name ... FAILED (${t}s)"
        sed 's/^/    /' "$tmp/out"
        failed=$((failed + 1))
        [ "$fatal" = fatal ] && finish
    fi
}
finish() {
    local t
    t=$(since "$start")
    if [ "$failed" = 0 ]; then
        echo "test result: ok. $passed passed; 0 failed; $ignored ignored; 0 measured; 0 filtered out; finished in ${t}s"
        exit 0
    fi
    echo "test result: FAILED. $passed passed; $failed failed; $ignored ignored; 0 measured; 0 filtered out; finished in ${t}s"
    exit 1
}

# The crate's version, as Cargo sees it (pkgid ends in #VERSION or @VERSION).
version=$(cargo pkgid 2>/dev/null | sed 's/.*[#@]//')

check_root() {
    [ "$(id -u)" = 0 ] || fail "needs root (it installs the package with dpkg)"
    [ -n "$version" ] || fail "cannot read the crate's version (cargo pkgid)"
}

# --fast: the same package, compressed at xz level 1 (it is only installed here).
check_build() {
    deb=$(bash packaging/build-deb --fast 2>"$tmp/build.log") || { cat "$tmp/build.log"; fail "packaging/build-deb failed"; return; }
    [ -f "$deb" ] || fail "packaging/build-deb printed '$deb', not a file"
    case "$deb" in "$PWD"/target/*|target/*|"${CARGO_TARGET_DIR:-$PWD/target}"/*) ;; *) fail "the .deb is not under target/: $deb" ;; esac
    echo "$deb"
}

# dpkg-deb -c: every expected file, nothing else, nothing in /usr/local or from target/.
check_contents() {
    dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|' >"$tmp/all"
    grep -v '/$' "$tmp/all" | sort >"$tmp/files"
    echo "$EXPECTED_FILES" | sed '/^$/d' | sort >"$tmp/expected"
    comm -23 "$tmp/expected" "$tmp/files" | sed 's/^/missing: /' | grep . && fail "files missing from the package"
    comm -13 "$tmp/expected" "$tmp/files" | sed 's/^/unexpected: /' | grep . && fail "unexpected files in the package"
    grep -E '^/usr/local(/|$)|target/' "$tmp/all" && fail "paths under /usr/local or from target/"
    dpkg-deb -c "$deb" | awk '$6 ~ /^\.\/usr\/bin\/./ && $1 != "-rwxr-xr-x" {print}' | grep . && fail "binaries not 0755"
    return 0
}

check_control() {
    local f v
    for f in Package Version Architecture Depends Section Priority Maintainer Description; do
        v=$(dpkg-deb -f "$deb" "$f")
        echo "$f: $(echo "$v" | head -n 1)"
        [ -n "$v" ] || fail "no $f field"
    done
    [ "$(dpkg-deb -f "$deb" Package)" = "$PKG" ] || fail "Package is not $PKG"
    [ "$(dpkg-deb -f "$deb" Version)" = "$version" ] || fail "Version is not Cargo.toml's $version"
    [ "$(dpkg-deb -f "$deb" Architecture)" = "$(dpkg --print-architecture)" ] || fail "Architecture is not $(dpkg --print-architecture)"
    [ "$(dpkg-deb -f "$deb" Section)" = sound ] || fail "Section is not sound"
    [ "$(dpkg-deb -f "$deb" Priority)" = optional ] || fail "Priority is not optional"
    v=$(dpkg-deb -f "$deb" Depends)
    for f in libasound2 dbus; do
        echo ", $v," | grep -qE "[, ]$f( \(|,)" || fail "Depends ($v) lacks $f"
    done
    [ "$(dpkg-deb -f "$deb" Description | wc -l)" -ge 5 ] || fail "the extended description is missing or short"
}

check_conffiles() {
    dpkg-deb -I "$deb" conffiles >"$tmp/conffiles" || fail "no conffiles in the control archive"
    cat "$tmp/conffiles"
    [ "$(cat "$tmp/conffiles")" = "$CONF" ] || fail "conffiles is not exactly $CONF"
}

# The control archive's scripts are packaging/debian's, as written (no debhelper snippets).
check_maintainer_scripts() {
    local s
    mkdir -p "$tmp/control"
    dpkg-deb -e "$deb" "$tmp/control"
    for s in postinst prerm postrm; do
        cmp "$tmp/control/$s" "packaging/debian/$s" || fail "$s differs from packaging/debian/$s"
        [ -x "$tmp/control/$s" ] || fail "$s is not executable"
        sh -n "$tmp/control/$s" || fail "$s: syntax error"
        grep -q '#DEBHELPER#' "$tmp/control/$s" && fail "$s has a #DEBHELPER# token"
    done
    [ -e "$tmp/control/preinst" ] && fail "unexpected preinst"
    return 0
}

# Debian's docker images drop /usr/share/man and docs with dpkg path-exclude rules: the
# installed man pages (and systemd-analyze verify's man check) could not be tested there.
check_dpkg_excludes() {
    local rules p rule excluded
    rules=$(cat /etc/dpkg/dpkg.cfg /etc/dpkg/dpkg.cfg.d/* 2>/dev/null | sed -nE 's/^[[:space:]]*(path-(exclude|include))[= ]+(.*)$/\1 \3/p')
    [ -n "$rules" ] && echo "dpkg path rules: $rules"
    for p in $EXPECTED_FILES; do
        excluded=0
        while read -r rule pat; do
            [ -n "$rule" ] || continue
            # shellcheck disable=SC2053 # a glob, as dpkg matches it
            if [[ $p == $pat ]]; then
                [ "$rule" = path-exclude ] && excluded=1 || excluded=0
            fi
        done <<<"$rules"
        [ "$excluded" = 1 ] && fail "dpkg is configured not to install $p (path-exclude in /etc/dpkg/dpkg.cfg.d/): remove the rule to test the package"
    done
    return 0
}

check_install() {
    if dpkg -s "$PKG" >/dev/null 2>&1; then
        echo "$PKG $(dpkg-query -W -f='${Version}' "$PKG") was installed already: purging it first"
        dpkg --purge "$PKG" || { fail "cannot purge the installed $PKG"; return; }
    fi
    installed_by_us=1
    dpkg -i "$deb" || fail "dpkg -i failed"
    [ "$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null)" = "install ok installed" ] || fail "dpkg does not list $PKG as installed"
}

# Every file is where the package put it, with its checksum (dpkg --verify).
check_installed_files() {
    local p
    for p in $EXPECTED_FILES; do [ -f "$p" ] || fail "not installed: $p"; done
    dpkg --verify "$PKG" | grep . && fail "dpkg --verify: files differ from the package"
    dpkg-query -W -f='${Conffiles}\n' "$PKG" | grep -q "^ $CONF " || fail "dpkg does not know $CONF as a conffile"
    return 0
}

check_version() {
    local out
    out=$(/usr/bin/audiowardend --version) || fail "audiowardend --version failed"
    echo "$out"
    [ "$out" = "audiowardend $version" ] || fail "audiowardend --version is not 'audiowardend $version'"
    out=$(/usr/bin/audiowardenctl --version) || fail "audiowardenctl --version failed"
    echo "$out"
    [ "$out" = "audiowardenctl $version" ] || fail "audiowardenctl --version is not 'audiowardenctl $version'"
}

# A system user and group, no home, no login shell, in group audio.
check_user() {
    local pw uid home shell groups
    pw=$(getent passwd audiowarden) || { fail "no user audiowarden"; return; }
    echo "$pw"
    IFS=: read -r _ _ uid _ _ home shell <<<"$pw"
    (( uid > 0 && uid < 1000 )) || fail "uid $uid is not a system uid (1..999)"
    [ "$home" = /nonexistent ] || fail "home is $home, not /nonexistent"
    case "$shell" in /usr/sbin/nologin|/sbin/nologin|/bin/false|/usr/bin/false) ;; *) fail "login shell $shell" ;; esac
    [ -e "$home" ] && fail "$home exists"
    getent group audiowarden >/dev/null || fail "no group audiowarden"
    groups=" $(id -nG audiowarden) "
    echo "groups:$groups"
    [[ $groups == *" audiowarden "* ]] || fail "not in group audiowarden"
    [[ $groups == *" audio "* ]] || fail "not in group audio"
    return 0
}

# The shm registry directory exists from the install on, owned by the service user, 0700
# (tmpfiles.d/audiowarden.conf, applied by postinst): nobody else can create it first.
check_shm_dir() {
    local st
    st=$(stat -c '%F %U:%G %a' /dev/shm/audiowarden 2>&1) || { fail "no /dev/shm/audiowarden: $st"; return; }
    echo "/dev/shm/audiowarden: $st"
    [ "$st" = "directory audiowarden:audiowarden 700" ] || fail "/dev/shm/audiowarden is '$st', not 'directory audiowarden:audiowarden 700'"
    return 0
}

# systemd-analyze verify works without systemd as PID 1: it loads the unit and its
# dependencies, checks that ExecStart= is executable and runs `man` for each
# Documentation=man: page, so it also proves that the man pages are installed.
check_systemd_verify() {
    local sockets="/usr/lib/systemd/system/audiowarden-osc.socket /usr/lib/systemd/system/audiowarden-osc-udp.socket"
    # shellcheck disable=SC2086
    systemd-analyze verify "$UNIT" $sockets >"$tmp/verify" 2>&1 || fail "systemd-analyze verify $UNIT $sockets failed"
    grep -v '^$' "$tmp/verify" && fail "systemd-analyze verify printed warnings"
    return 0
}

# Valid against the bus configuration DTD. The DTD that Debian 12 ships (in libdbus-1-dev,
# /usr/share/xml/dbus-1/busconfig.dtd; the dbus package has none) predates the send_* /
# receive_* attributes that every policy uses (even dbus' own system.conf fails it), so they
# are declared on top of it, as dbus-daemon(1) documents them; elements, their nesting and
# the other attributes are checked as the DTD says.
check_dbus_policy_dtd() {
    local dtd=/usr/share/xml/dbus-1/busconfig.dtd a attrs=
    [ -f "$dtd" ] || { fail "$dtd missing (package libdbus-1-dev)"; return; }
    command -v xmllint >/dev/null || { fail "xmllint missing (package libxml2-utils)"; return; }
    for a in send_interface send_member send_error send_destination send_destination_prefix \
        send_path send_type send_requested_reply send_broadcast receive_interface \
        receive_member receive_error receive_sender receive_path receive_type \
        receive_requested_reply eavesdrop own_prefix group log max_fds min_fds; do
        attrs+=" $a CDATA #IMPLIED"
    done
    { cat "$dtd"; echo "<!ATTLIST allow$attrs>"; echo "<!ATTLIST deny$attrs>"; } >"$tmp/busconfig.dtd"
    grep -q '^<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"' "$POLICY" || fail "no busconfig DOCTYPE"
    xmllint --noout --nonet "$POLICY" || fail "not well-formed"
    xmllint --noout --nonet --dtdvalid "$tmp/busconfig.dtd" "$POLICY" || fail "not valid against busconfig.dtd"
}

# dbus-daemon itself loads the policy (it rejects unknown elements and attributes, and warns
# about unknown users: the user audiowarden must exist): a bus with a private socket.
check_dbus_policy_loads() {
    local pid addr
    cat >"$tmp/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path=$tmp/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default"><allow user="root"/></policy>
  <include>$POLICY</include>
</busconfig>
EOF
    dbus-daemon --config-file="$tmp/bus.conf" --nofork --print-address=3 3>"$tmp/bus.addr" 2>"$tmp/bus.err" &
    pid=$!
    for _ in $(seq 50); do [ -s "$tmp/bus.addr" ] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    addr=$(cat "$tmp/bus.addr")
    [ -n "$addr" ] || fail "dbus-daemon did not start with the policy"
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    # As root it tries to raise its fd limit to 65536, above a container's hard limit: not
    # about the policy.
    grep -v 'Failed to set fd limit' "$tmp/bus.err" | grep . && fail "dbus-daemon complained about the policy"
    return 0
}

# The interface description: well-formed and valid against introspect.dtd (found through
# the XML catalog that libdbus-1-dev registers).
check_dbus_interface_xml() {
    xmllint --noout --nonet "$IFACE" || fail "$IFACE is not well-formed"
    xmllint --noout --nonet --valid "$IFACE" || fail "$IFACE is not valid against introspect.dtd"
    grep -q '<interface name="org.audiowarden.Engine1">' "$IFACE" || fail "no org.audiowarden.Engine1 interface"
}

# Renders (man's own path lookup finds it, groff has no warning) and documents every long
# flag that `audiowardend --help` lists, and the hand-written sections.
# Finds page NAME(SECTION) where the package put it and renders it, without warnings, into
# $tmp/manSECTION.
render_man() {
    local name=$1 section=$2 page
    page=$(man -w "$name") || { fail "man -w $name finds no page"; return 1; }
    [ "$page" = "/usr/share/man/man$section/$name.$section.gz" ] || fail "man finds $page"
    zcat "$page" | grep -q "^\.TH $name $section " || fail "no .TH $name $section line"
    MANWIDTH=200 man --nh --nj --warnings -l "$page" >"$tmp/man$section" 2>"$tmp/man$section.err" || fail "man -l $page failed"
    grep . "$tmp/man$section.err" && fail "warnings while rendering"
    return 0
}

check_man_daemon() {
    local flag
    render_man audiowardend 8 || return
    /usr/bin/audiowardend --help | sed -nE 's/^ +(-[a-zA-Z], )?(--[a-z0-9-]+).*/\2/p' >"$tmp/flags"
    [ "$(wc -l <"$tmp/flags")" -ge 10 ] || fail "found only $(wc -l <"$tmp/flags") flags in audiowardend --help"
    while read -r flag; do
        grep -qE -- "(^|[^a-z-])$flag([^a-z-]|$)" "$tmp/man8" || fail "flag $flag is not in the man page"
    done <"$tmp/flags"
    for s in NAME SYNOPSIS OPTIONS FILES SIGNALS "EXIT STATUS" "SEE ALSO"; do
        grep -q "^$s\$" "$tmp/man8" || fail "no $s section"
    done
    grep -q "$CONF" "$tmp/man8" || fail "FILES does not name $CONF"
    grep -q SIGHUP "$tmp/man8" || fail "SIGNALS does not name SIGHUP"
    echo "$(wc -l <"$tmp/flags") flags documented"
}

# Every subcommand that `audiowardenctl --help` lists is described in the page.
check_man_ctl() {
    local sub
    render_man audiowardenctl 1 || return
    /usr/bin/audiowardenctl --help | sed -n '/^Commands:/,/^$/p' | sed -nE 's/^  ([a-z][a-z0-9-]*) .*/\1/p' | grep -vx help >"$tmp/subs"
    [ "$(wc -l <"$tmp/subs")" -ge 5 ] || fail "found only $(wc -l <"$tmp/subs") subcommands in audiowardenctl --help"
    while read -r sub; do
        grep -qE "^ +audiowardenctl $sub( |$)" "$tmp/man1" || fail "subcommand $sub is not in the man page"
    done <"$tmp/subs"
    echo "subcommands: $(tr '\n' ' ' <"$tmp/subs")"
}

# bash, zsh and fish completions of both binaries: every daemon flag and every client
# subcommand (the lists the man checks took from --help), and bash really completes them.
check_completions() {
    local b f flag sub out
    for b in audiowardend audiowardenctl; do
        for f in "/usr/share/bash-completion/completions/$b" "/usr/share/zsh/vendor-completions/_$b" \
            "/usr/share/fish/vendor_completions.d/$b.fish"; do
            [ -s "$f" ] || fail "missing or empty: $f"
        done
    done
    [ "$status" = 0 ] || return
    while read -r flag; do
        grep -q -- "$flag" /usr/share/bash-completion/completions/audiowardend || fail "bash: no $flag"
        grep -q -- "$flag" /usr/share/zsh/vendor-completions/_audiowardend || fail "zsh: no $flag"
        grep -q -- "-l ${flag#--}" /usr/share/fish/vendor_completions.d/audiowardend.fish || fail "fish: no $flag"
    done <"$tmp/flags"
    while read -r sub; do
        grep -qw -- "$sub" /usr/share/bash-completion/completions/audiowardenctl || fail "bash: no $sub"
        grep -qw -- "$sub" /usr/share/zsh/vendor-completions/_audiowardenctl || fail "zsh: no $sub"
        grep -qw -- "$sub" /usr/share/fish/vendor_completions.d/audiowardenctl.fish || fail "fish: no $sub"
    done <"$tmp/subs"
    # shellcheck disable=SC2016 # expanded by the inner bash
    out=$(bash -c 'source /usr/share/bash-completion/completions/audiowardenctl
        COMP_WORDS=(audiowardenctl set-); COMP_CWORD=1; COMP_LINE="audiowardenctl set-"; COMP_POINT=${#COMP_LINE}
        _audiowardenctl audiowardenctl set- audiowardenctl; echo "${COMPREPLY[*]}"')
    echo "bash: audiowardenctl set-<TAB> -> $out"
    [ "$out" = "set-frequency set-gain" ] || fail "bash completes 'audiowardenctl set-' to '$out'"
    # shellcheck disable=SC2016
    out=$(bash -c 'source /usr/share/bash-completion/completions/audiowardend
        COMP_WORDS=(audiowardend --freq); COMP_CWORD=1; COMP_LINE="audiowardend --freq"; COMP_POINT=${#COMP_LINE}
        _audiowardend audiowardend --freq audiowardend; echo "${COMPREPLY[*]}"')
    echo "bash: audiowardend --freq<TAB> -> $out"
    [ "$out" = "--frequency" ] || fail "bash completes 'audiowardend --freq' to '$out'"
}

# The shipped configuration passes --check-config (read by default, by --config, and as the
# service's user); a broken copy does not (so the file really is read).
check_check_config() {
    /usr/bin/audiowardend --check-config || fail "--check-config (default file) failed"
    /usr/bin/audiowardend --config "$CONF" --check-config || fail "--config $CONF --check-config failed"
    setpriv --reuid audiowarden --regid audiowarden --init-groups /usr/bin/audiowardend --config "$CONF" --check-config \
        || fail "--check-config as user audiowarden failed"
    { cat "$CONF"; echo 'frequency = "loud"'; } >"$tmp/bad.toml"
    /usr/bin/audiowardend --config "$tmp/bad.toml" --check-config
    [ $? = 2 ] || fail "a broken file did not exit with 2"
    return 0
}

# Installing again (postinst configure with the old version: the upgrade path) keeps the
# administrator's edit of the conffile and the user.
check_reinstall() {
    echo "# edited by the admin" >>"$CONF"
    dpkg -i "$deb" || fail "dpkg -i again failed"
    grep -q '^# edited by the admin$' "$CONF" || fail "the edited $CONF was replaced"
    /usr/bin/audiowardend --check-config || fail "--check-config after reinstall failed"
    getent passwd audiowarden >/dev/null || fail "user audiowarden gone"
}

# Purge: every file of the package is gone, /etc/audiowarden too, dpkg forgets the package,
# leftover shared memory is removed; the user stays (Debian policy, see postrm).
check_purge() {
    local p made_shm=0
    # What an instance killed last would leave (its manifest), in the directory postinst made.
    if [ -d /dev/shm/audiowarden ]; then
        echo '{}' >/dev/shm/audiowarden/manifest.json && made_shm=1
    fi
    dpkg --purge "$PKG" || fail "dpkg --purge failed"
    for p in $EXPECTED_FILES; do [ -e "$p" ] && fail "still there: $p"; done
    [ -e /etc/audiowarden ] && fail "/etc/audiowarden still there"
    dpkg -s "$PKG" >/dev/null 2>&1 && fail "dpkg still knows $PKG"
    if [ "$made_shm" = 1 ] && [ -e /dev/shm/audiowarden ]; then
        fail "leftover /dev/shm/audiowarden not removed"
        rm -rf /dev/shm/audiowarden
    fi
    getent passwd audiowarden >/dev/null || fail "user audiowarden was removed (it must stay)"
    echo "user audiowarden kept after purge: $(getent passwd audiowarden)"
    return 0
}

# The postinst's other way to create the user, for systems without systemd-sysusers: run
# with a PATH that lacks it, on a machine where the user does not exist (only when this test
# is the one that created it, since it deletes it first).
check_adduser_fallback() {
    local t
    [ "$user_existed" = 0 ] || { skip "user audiowarden existed before this test: not deleting it"; return; }
    userdel audiowarden || { fail "cannot delete user audiowarden"; return; }
    if getent group audiowarden >/dev/null; then groupdel audiowarden || fail "cannot delete group audiowarden"; fi
    mkdir -p "$tmp/bin"
    for t in getent adduser; do ln -s "$(command -v "$t")" "$tmp/bin/$t"; done
    PATH="$tmp/bin" /bin/sh "$tmp/control/postinst" configure || fail "postinst configure (adduser) failed"
    check_user
}

run root fatal
run build fatal
run contents
run control
run conffiles
run maintainer_scripts
run dpkg_excludes
run install fatal
run installed_files
run version
run user
run shm_dir
run systemd_verify
run dbus_policy_dtd
run dbus_policy_loads
run dbus_interface_xml
run man_daemon
run man_ctl
run completions
run check_config
run reinstall
run purge
run adduser_fallback
finish
