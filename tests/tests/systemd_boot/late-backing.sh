# Boot 3 (d): the daemon fails at boot (its backing, /run/late-backing, does not exist) and
# systemd keeps restarting it; once the backing appears, the daemon starts and swap comes up
# with it, with no manual step.
failed_twice() { [ "$(systemctl show -P NRestarts ublk-crypt@swap.service)" -ge 2 ]; }
wait_for "the daemon failing and restarting" 120 failed_twice
vm_begin before
echo "swap-unit $(systemctl is-active ublk-crypt-swap@swap.service || true)"
echo "swaps $(grep -c '^/dev/ublkb' /proc/swaps || true)"
vm_end before
ln -s /dev/vdb1 /run/late-backing
wait_for "swap on /dev/ublkb0 once the backing exists" 120 swap_on
vm_section after systemctl is-active ublk-crypt@swap.service ublk-crypt-swap@swap.service
vm_section swap-journal journalctl -b --no-pager -o cat -u ublk-crypt-swap@swap.service
