# The OOM torture's fixed guest functions (tests/src/torture/script.rs puts the run's variables
# before this file and the backend's device and the phases after it). Busybox sh, set -e.
# Expects: U (the ublk-crypt binary), T (a work directory), SYSRQ (vm-watchdog's sysrq
# schedule), SAMPLE_SECS (the sampler's period); dev (the swap device) before swap_on_and_sample.

mkdir -p $T
ev() { echo "torture: $*"; }
daemon_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' /run/ublk-crypt/*.json 2>/dev/null | head -n 1; }
daemon_check() {  # WHEN
    p=$(cat $T/daemon-pid 2>/dev/null || true)
    [ -n "$p" ] || return 0
    if [ -d /proc/$p ]; then
        ev "daemon-check when=$1 pid=$p record_pid=$(daemon_pid) alive=1 oom_score_adj=$(cat /proc/$p/oom_score_adj)"
    else
        ev "daemon-check when=$1 pid=$p record_pid=$(daemon_pid) alive=0"
    fi
}
hog_exit() {  # NAME PID
    set +e; wait $2; rc=$?; set -e
    ev "hog-exit name=$1 rc=$rc"
}
wait_for() { while [ ! -e "$1" ]; do sleep 1; done; }

# Dumps blocked tasks and memory while no hog has beaten for 30 s; crashes the guest at 180 s.
start_watchdog() {
    vm-watchdog $SYSRQ --heartbeat $T/hb 30 180 &
}

# The sampler: the machine's and the daemon's memory every SAMPLE_SECS (shell builtins reading
# /proc and /sys, no fork), and every 4th time `status --json` (pool high water, waits, errors).
sampler() {
    set +e
    n=0
    while [ -e $T/sampling ]; do
        read up _ < /proc/uptime
        while read k v _; do
            case $k in MemFree:) mf=$v;; MemAvailable:) ma=$v;; SwapFree:) sf=$v;; esac
        done < /proc/meminfo
        line="sample t=$up mem_free_kib=$mf mem_avail_kib=$ma swap_free_kib=$sf"
        pid=
        [ -e $T/daemon-pid ] && read pid < $T/daemon-pid
        if [ -n "$pid" ] && [ -r /proc/$pid/status ]; then
            r=; l=; w=; a=
            while read k v _; do
                case $k in VmRSS:) r=$v;; VmLck:) l=$v;; VmSwap:) w=$v;; esac
            done < /proc/$pid/status
            read a < /proc/$pid/oom_score_adj
            line="$line pid=$pid rss_kib=$r lck_kib=$l swap_kib=$w oom_adj=$a"
        fi
        # The swap device's own counters (reads, ms reading, writes, ms writing, in flight):
        # per pass, the kernel's time per request next to the daemon's (status --json).
        if [ -n "$bdev" ] && read r1 _ _ r4 w1 _ _ w4 f _ < /sys/block/$bdev/stat; then
            line="$line blk_reads=$r1 blk_read_ms=$r4 blk_writes=$w1 blk_write_ms=$w4 blk_inflight=$f"
        fi
        # And the disk under it: reads and writes in flight there.
        if read vr vw < /sys/block/vda/inflight; then
            line="$line vda_inflight_r=$vr vda_inflight_w=$vw"
        fi
        echo "$line"
        n=$((n + 1))
        if [ -n "$pid" ] && [ $((n % 4)) = 0 ]; then
            st=$($U status tswap --json 2>&1)
            echo "daemon-status t=$up $st"
        fi
        sleep $SAMPLE_SECS
    done
}

# mkswap + swapon on $dev, then the sampler in the background (until $T/sampling goes).
swap_on_and_sample() {
    mkswap $dev > /dev/null
    swapon $dev
    ev "swap on $dev: $(grep -F "$(basename $(readlink -f $dev))" /proc/swaps | tr -s ' \t' ' ')"
    touch $T/sampling
    bdev=$(basename $(readlink -f $dev))
    # A device-mapper node made by cryptsetup is no symlink here: find it by its dm name.
    for b in /sys/block/dm-*; do
        [ "$(cat $b/dm/name 2>/dev/null)" = "$bdev" ] && bdev=${b##*/}
    done
    echo "vda: scheduler $(cat /sys/block/vda/queue/scheduler) wbt_lat_usec $(cat /sys/block/vda/queue/wbt_lat_usec 2>/dev/null) nr_requests $(cat /sys/block/vda/queue/nr_requests) mq $(ls /sys/block/vda/mq | wc -l)"
    sampler &
}
