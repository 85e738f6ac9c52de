# Helpers for the systemd boot test's guest scripts (run by vm-test.service under /bin/sh, set -e).

# wait_for DESCRIPTION SECONDS CMD...: polls CMD every 0.2 s until it succeeds.
wait_for() {
    _desc=$1 _secs=$2
    shift 2
    _tries=$((_secs * 5))
    while ! "$@" >/dev/null 2>&1; do
        _tries=$((_tries - 1))
        if [ "$_tries" -le 0 ]; then
            echo "timed out after ${_secs} s waiting for: $_desc"
            return 1
        fi
        # A line every 10 s: console silence is how the host detects a hung guest.
        [ $((_tries % 50)) -ne 0 ] || echo "waiting for: $_desc"
        sleep 0.2
    done
}

swap_on() { grep -q '^/dev/ublkb0 ' /proc/swaps; }
swap_used_kib() { awk '$1 == "/dev/ublkb0" { print $4 }' /proc/swaps; }
main_pid() { systemctl show -P MainPID ublk-crypt@swap.service; }
