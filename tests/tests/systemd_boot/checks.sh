# Boot 2: (a) swap at boot, (c) the previous shutdown, (b) kill -9 under a hog, (h) a package
# upgrade reloads the unit, (f) no key in the journal; then the config of (d) for the next boot.

# (a) Swap on /dev/ublkb0 at boot, before swap.target; both units active; status answers.
wait_for "swap on /dev/ublkb0 at boot" 60 swap_on
vm_section units systemctl is-active ublk-crypt@swap.service ublk-crypt-swap@swap.service
vm_begin order
for u in ublk-crypt@swap.service ublk-crypt-swap@swap.service swap.target; do
    echo "$u $(systemctl show -P ActiveEnterTimestampMonotonic "$u")"
done
vm_end order
vm_section status ublk-crypt status swap

# (c) How the previous boot's poweroff went, for the two units.
vm_section prev-shutdown journalctl -b -1 --no-pager -o short-precise \
    -u ublk-crypt-swap@swap.service -u ublk-crypt@swap.service

# (b) kill -9 of the daemon under global memory pressure (a hog of 1.5x RAM, no memory limit,
# deep in swap): its standby takes the device over, the service goes on (no restart), PID 1
# never blocks, and the hog verifies every page.
pid0=$(main_pid)
ready_standby() {
    ublk-crypt status swap --json | grep -o '"standby":{"pid":[0-9]*,"ready":true' |
        grep -o '[0-9][0-9]*'
}
wait_for "a ready standby" 120 ready_standby
standby0=$(ready_standby)
restarts0=$(systemctl show -P NRestarts ublk-crypt@swap.service)
# A scope (systemd-run --wait would need D-Bus, which a minimal system does not have): the hog
# stays this script's child, in a cgroup of its own without a memory limit.
systemd-run --scope --unit=hog-b /vm/bin/page-hog --name b --mib 768 \
    --passes 2 --order seq,rev --mark 1:40:/run/hog-b-mark --heartbeat 5 >/root/hog-b.log 2>&1 &
hog=$!
hog_marked_or_gone() { test -e /run/hog-b-mark || ! kill -0 "$hog"; }
wait_for "the hog at 40 % of its first re-stamp" 600 hog_marked_or_gone
if ! test -e /run/hog-b-mark; then
    echo "the hog ended before its mark:"
    cat /root/hog-b.log
    exit 1
fi
(while :; do systemctl show -P ActiveState ublk-crypt-swap@swap.service; sleep 0.2; done) \
    >/root/swap-states 2>&1 &
sampler=$!
vm_section swap-at-kill cat /proc/swaps
kill -9 "$pid0"
new_daemon() {
    p=$(main_pid)
    [ "$p" != "$pid0" ] && [ "$p" != 0 ] && [ "$(systemctl is-active ublk-crypt@swap.service)" = active ]
}
wait_for "a new daemon serving /dev/ublkb0" 120 new_daemon
hog_rc=0
wait "$hog" || hog_rc=$?
kill "$sampler"
vm_begin restart
echo "old-pid $pid0"
echo "standby-pid $standby0"
echo "new-pid $(main_pid)"
echo "service $(systemctl show -P ActiveState ublk-crypt@swap.service) $(systemctl show -P Result ublk-crypt@swap.service)"
echo "mem-available-kib $(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo)"
echo "restarts-before $restarts0"
echo "restarts-after $(systemctl show -P NRestarts ublk-crypt@swap.service)"
echo "hog-exit $hog_rc"
vm_end restart
vm_section swap-states sh -c 'sort /root/swap-states | uniq -c'
vm_section hog-b cat /root/hog-b.log
vm_section daemon-journal journalctl -b --no-pager -o cat -u ublk-crypt@swap.service
vm_section hung-tasks sh -c 'journalctl -k -b --no-pager -o cat | grep -c "blocked for more than" || true'
vm_section status-after ublk-crypt status swap

# (h) A package upgrade (the same .deb again; dpkg runs the postinst with the installed version):
# the postinst reloads the unit, whose ExecReload= hands the device to a daemon from the
# binary now installed. Swap stays on, no restart, the old daemon's binary is the replaced one.
pid1=$(main_pid)
restarts1=$(systemctl show -P NRestarts ublk-crypt@swap.service)
dpkg_rc=0
dpkg -i /root/ublk-crypt_*.deb >/root/dpkg-h.log 2>&1 || dpkg_rc=$?
vm_begin upgrade
echo "dpkg-exit $dpkg_rc"
echo "before-pid $pid1"
echo "after-pid $(main_pid)"
echo "after-exe $(readlink /proc/"$(main_pid)"/exe)"
echo "service $(systemctl show -P ActiveState ublk-crypt@swap.service) $(systemctl show -P Result ublk-crypt@swap.service)"
echo "restarts-before $restarts1"
echo "restarts-after $(systemctl show -P NRestarts ublk-crypt@swap.service)"
echo "swap-on $(grep -c '^/dev/ublkb0 ' /proc/swaps)"
echo "takeover $(ublk-crypt status swap --json | grep -o '"last_takeover":{[^}]*}')"
vm_end upgrade
vm_section dpkg-h cat /root/dpkg-h.log
vm_section reload-journal sh -c 'journalctl -b --no-pager -o cat -u ublk-crypt@swap.service | tail -n 20'

# (f) No key material in the journal (every boot): the swap device's kept key and the data
# volume's key file, 16 bytes at a time, as text and as raw bytes; a logged control string
# must be found both ways (the search's positive control).
ctl="vm-control-$(head -c 16 /dev/urandom | od -An -v -tx1 | tr -d ' \n')"
echo "$ctl" | systemd-cat -t vm-control
journalctl --sync
serial=$(keyctl search @u user ublk-crypt:dev0)
keyhex=$(keyctl pipe "$serial" | od -An -v -tx1 | tr -d ' \n')
datahex=$(od -An -v -tx1 /root/data.key | tr -d ' \n')
journalctl --no-pager -o export >/root/journal.export
od -An -v -tx1 /root/journal.export | tr -d ' \n' >/root/journal.hex
found() { # HEX: 16-byte chunks of HEX found in the journal, as text or as raw bytes
    _n=0
    _h=$1
    while [ ${#_h} -ge 32 ]; do
        _c=$(printf %s "$_h" | cut -c1-32)
        _h=$(printf %s "$_h" | cut -c33-)
        if grep -q -i -F "$_c" /root/journal.export || grep -q -F "$_c" /root/journal.hex; then
            _n=$((_n + 1))
        fi
    done
    echo "$_n"
}
vm_begin key-search
echo "key-bytes $((${#keyhex} / 2))"
echo "data-key-bytes $((${#datahex} / 2))"
echo "key-chunks-found $(found "$keyhex")"
echo "data-key-chunks-found $(found "$datahex")"
echo "control-text $(grep -c -F "$ctl" /root/journal.export || true)"
echo "control-raw $(grep -c -F "$(printf %s "$ctl" | od -An -v -tx1 | tr -d ' \n')" /root/journal.hex || true)"
vm_end key-search

# (d), next boot: the backing becomes a path that does not exist at boot (in /run). Through the
# from-source route this time: the ublk-crypttab line goes, and systemd/install-swap (which
# systemd/README.md documents) writes /etc/ublk-crypt/swap.conf and units of its own.
sed -i '/^swap /d' /etc/ublk-crypttab
cd /root/ublk-crypt
systemd/install-swap --binary /usr/sbin/ublk-crypt --no-start swap /run/late-backing 0
