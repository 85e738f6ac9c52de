# Boot 1: what an admin does: the README's quick start, its lines copied from README.md by the
# host into /root/quick-start.sh (install the package, one ublk-crypttab line, start
# swap.target), run from /root, where the package lies. /dev/vdb1 is the GPT partition named
# cryptswap that the README's line names.
cd /root
vm_section quick-start sh -ex /root/quick-start.sh
wait_for "swap on /dev/ublkb0 after the quick start" 60 swap_on
vm_section swaps cat /proc/swaps
vm_section generated sh -c 'cd /run/systemd/generator && find . -path "*ublk-crypt*" | sort'

# A line the generator must refuse (swap over a persistent key): a clear line in the journal,
# no units for it, the other line untouched.
head -c 64 /dev/urandom >/root/data.key
echo 'bad /dev/vdc /root/data.key swap,id=1' >>/etc/ublk-crypttab
systemctl daemon-reload
# (The kernel log line "ublk-crypt-generator: ..." is in the journal under that identifier.)
generator_logged() { journalctl -b --no-pager -t ublk-crypt-generator -o cat | grep -q 'no units'; }
wait_for "the generator's message in the journal" 30 generator_logged
vm_section generator-log journalctl -b --no-pager -t ublk-crypt-generator -o cat
vm_section generated-bad sh -c 'find /run/systemd/generator -name "*@bad*" | wc -l'
sed -i '/^bad /d' /etc/ublk-crypttab
systemctl daemon-reload

# (e) A config with a persistent key: the swap unit must refuse to mkswap its device.
mkdir -p /etc/ublk-crypt
printf 'BACKING=/dev/vdc\nID=1\nOPTIONS=--key-file /root/data.key --cipher aes-xts-plain64 --key-size 512\n' \
    >/etc/ublk-crypt/data.conf
if systemctl start ublk-crypt@data.service ublk-crypt-swap@data.service; then
    echo "ublk-crypt-swap@data started on a device with a persistent key"
    exit 1
fi
vm_section data-swap-state systemctl show -P ActiveState,Result ublk-crypt-swap@data.service
vm_section data-swap-journal journalctl -b --no-pager -o cat -u ublk-crypt-swap@data.service
vm_section data-daemon-state systemctl is-active ublk-crypt@data.service
vm_section data-signature sh -c 'dd if=/dev/ublkb1 bs=4096 count=1 2>/dev/null | grep -c SWAPSPACE2 || true'
# systemctl stop (SIGTERM) is the clean stop: no device, record, socket or kept key left.
systemctl stop ublk-crypt@data.service
vm_begin data-after-stop
echo "device $(test -e /sys/block/ublkb1 && echo yes || echo no)"
echo "record $(ls /run/ublk-crypt/1.json /run/ublk-crypt/1.sock 2>/dev/null | wc -l)"
echo "key $(keyctl search @u user ublk-crypt:dev1 >/dev/null 2>&1 && echo yes || echo no)"
vm_end data-after-stop

# (c) Power off with pages in swap: a hog in a memory cgroup, waiting before its last pass.
# The next boot reads this shutdown from the journal.
systemd-run --unit=hog-c -p MemoryMax=64M /vm/bin/page-hog --name c --mib 128 --passes 2 \
    --wait-file /run/never
swap_has_pages() { [ "$(swap_used_kib)" -gt 32768 ]; }
wait_for "32 MiB in swap before poweroff" 180 swap_has_pages
vm_section swap-at-poweroff cat /proc/swaps
