# Process helpers shared by the test harness scripts (sourced, not run).

# Start time of PID $1 (field 22 of /proc/PID/stat, counted after the command name, which may
# hold spaces): with the PID, identifies a process across PID reuse.
starttime() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] || return 1
    st=${st##*) }
    set -- $st
    echo "${20}"
}

# True if PID $1 exists and is not a zombie.
alive() { local st; st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
