# Helpers for the systemd boot test's guest scripts (run by vm-test.service under /bin/sh, set -e).

# wait_for DESCRIPTION SECONDS CMD...: polls CMD every 0.2 s until it succeeds, for at most
# SECONDS (guest clock), with a line every 10 s (console silence is how the host detects a hang).
wait_for() {
    _desc=$1
    _end=$(($(date +%s) + $2))
    _next=$(($(date +%s) + 10))
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        _now=$(date +%s)
        if [ "$_now" -ge "$_end" ]; then
            echo "timed out waiting for: $_desc"
            return 1
        fi
        if [ "$_now" -ge "$_next" ]; then
            echo "waiting for: $_desc"
            _next=$((_now + 10))
        fi
        sleep 0.2
    done
}

swap_on() { grep -q '^/dev/ublkb0 ' /proc/swaps; }
swap_used_kib() { awk '$1 == "/dev/ublkb0" { print $4 }' /proc/swaps; }
main_pid() { systemctl show -P MainPID ublk-crypt@swap.service; }
