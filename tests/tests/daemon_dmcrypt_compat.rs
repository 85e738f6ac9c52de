//! ublk-crypt is dm-crypt, on disk: data written through ublk-crypt reads back identically
//! through `cryptsetup open --type plain` with the same key and options, and data written
//! through dm-crypt reads back through ublk-crypt — for every supported cipher spec, both key
//! sizes, 512- and 4096-byte sectors, with --offset/--skip, from a key file, from a passphrase
//! (hashed), from `--key-file -` and with cryptsetup's default hash.

use std::time::Duration;
use ublk_crypt_tests::vm::{vm_or_skip, Vm};

const GUEST_LIB: &str = r#"
N=0
# check MODE SPEC BITS SECTOR OFFSET SKIP [EXTRA...]   (on $DEV, /dev/vda by default)
check() {
    dev_=${DEV:-/dev/vda}
    mode=$1; spec=$2; bits=$3; ss=$4; off=$5; skip=$6; shift 6
    N=$((N + 1))
    opts="-c $spec -s $bits --sector-size $ss -o $off -p $skip $*"
    case $mode in
        keyfile) feed() { :; }; kopt="--key-file /root/key" ;;
        pass)    feed() { printf 'correct horse battery\n'; }; kopt="--hash sha256" ;;
        pass512) feed() { printf 'correct horse battery\n'; }; kopt="--hash sha512" ;;
        passrmd) feed() { printf 'correct horse battery\n'; }; kopt="" ;;  # default: ripemd160
        stdinkey) feed() { head -c 100 /root/key; }; kopt="--key-file - --hash sha256" ;;
    esac
    dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
    dd if=/dev/urandom of=/tmp/c bs=64k count=16 2>/dev/null

    dev=$(feed | ublk-crypt open $dev_ $opts $kopt --name cmp)
    dd if=/tmp/a of=$dev bs=64k oflag=direct 2>/dev/null
    ublk-crypt close cmp

    feed | cryptsetup open --type plain $opts $kopt $dev_ dm
    dd if=/dev/mapper/dm of=/tmp/b bs=64k count=16 iflag=direct 2>/dev/null
    cmp /tmp/a /tmp/b || { echo "MISMATCH ublk->dm: $mode $opts"; exit 1; }
    dd if=/tmp/c of=/dev/mapper/dm bs=64k oflag=direct 2>/dev/null
    cryptsetup close dm

    dev=$(feed | ublk-crypt open $dev_ $opts $kopt --name cmp)
    dd if=$dev of=/tmp/d bs=64k count=16 iflag=direct 2>/dev/null
    ublk-crypt close cmp
    cmp /tmp/c /tmp/d || { echo "MISMATCH dm->ublk: $mode $opts"; exit 1; }
    echo "ok $N: $mode $opts${DEV:+ on $DEV}"
}
"#;

#[test]
fn ublk_crypt_and_dm_crypt_read_each_others_writes() {
    if !vm_or_skip("dm-crypt compatibility") {
        return;
    }
    let mut script = String::from(GUEST_LIB);
    let mut expected = 0;
    for (spec, bits) in ublk_crypt_tests::cipher_matrix() {
        for ss in [512, 4096] {
            for mode in ["keyfile", "pass"] {
                script += &format!("check {mode} {spec} {bits} {ss} 8 24\n");
                expected += 1;
            }
        }
    }
    // Other key sources, no offset, and dm-crypt's iv_large_sectors.
    for line in [
        "check stdinkey aes-xts-plain64 512 512 0 0",
        "check pass512 aes-xts-plain64 256 4096 0 0",
        "check passrmd aes-cbc-essiv:sha256 256 512 0 0",
        "check keyfile aes-xts-plain64 512 4096 16 64 --iv-large-sectors",
        "check pass aes-xts-plain64be 512 4096 0 8 --iv-large-sectors",
    ] {
        script += line;
        script += "\n";
        expected += 1;
    }
    script += "echo all $N checks passed\n";

    let key: Vec<u8> = (0..256u32).map(|i| (i * 89 + 17) as u8).collect();
    let out = Vm::builder()
        .memory_mib(512)
        .disk_mib(32)
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .host_tool("cryptsetup")
        // dm-crypt's aes-cbc-essiv:sha256 needs the essiv template (cbc and sha256 are built in).
        .module("essiv")
        .file("/root/key", key)
        .timeout(Duration::from_secs(900))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let passed = out.console.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(
        passed, expected,
        "every configuration checked in both directions"
    );
    assert!(out
        .console
        .contains(&format!("all {expected} checks passed")));
}

/// Backings with 4096-byte logical blocks (a 4Kn disk, here a `losetup -b 4096` loop device)
/// and a file on a file system on one, whose O_DIRECT needs 4096-byte alignment (issue 18,
/// item 10). `--sector-size 512` on them is what dm-crypt makes of it: a device of 4096-byte
/// blocks whose data is encrypted in 512-byte sectors, so both read each other's writes. Before,
/// the block device was refused and the file opened but failed every IO with EINVAL.
#[test]
fn backings_with_4096_byte_blocks_serve_any_sector_size_like_dm_crypt() {
    if !vm_or_skip("4096-byte-block backings") {
        return;
    }
    let script = format!(
        r#"{GUEST_LIB}
        truncate -s 64M /tmp/disk4k
        # The host's util-linux tools by full path: busybox's come first in the guest's PATH.
        L=$(/usr/sbin/losetup -f --show -b 4096 /tmp/disk4k)
        vm_section lbs-backing cat /sys/block/$(basename $L)/queue/logical_block_size
        DEV=$L check keyfile aes-xts-plain64 512 512 8 24
        DEV=$L check pass aes-cbc-essiv:sha256 256 512 0 0
        DEV=$L check keyfile aes-xts-plain64 256 4096 8 0
        dev=$(ublk-crypt open $L --key-file /root/key --name b4k)
        vm_section lbs-device cat /sys/block/$(basename $dev)/queue/logical_block_size
        ublk-crypt close b4k
        # --offset that splits a 4096-byte block: refused, naming the block size.
        if ublk-crypt open $L --key-file /root/key --offset 1 --name b4k 2> /tmp/err; then
            echo "an offset inside a block was accepted"; exit 1
        fi
        vm_section offset-refusal cat /tmp/err
        # A file on ext4 on the 4Kn device: O_DIRECT there needs 4096-byte alignment.
        /usr/sbin/mkfs.ext4 -q -F $L
        mkdir -p /mnt/4k && mount $L /mnt/4k
        dd if=/dev/zero of=/mnt/4k/backing bs=1M count=16 status=none
        dev=$(ublk-crypt open /mnt/4k/backing --key-file /root/key --name f4k)
        vm_section lbs-file-device cat /sys/block/$(basename $dev)/queue/logical_block_size
        dd if=/dev/urandom of=/tmp/f bs=1M count=8 status=none
        dd if=/tmp/f of=$dev bs=64k oflag=direct status=none
        ublk-crypt close f4k
        dev=$(ublk-crypt open /mnt/4k/backing --key-file /root/key --name f4k)
        dd if=$dev bs=64k count=128 iflag=direct status=none | cmp - /tmp/f
        ublk-crypt close f4k
        umount /mnt/4k
        /usr/sbin/losetup -d $L
        echo "4k checks passed"
        "#
    );
    let key: Vec<u8> = (0..256u32).map(|i| (i * 89 + 17) as u8).collect();
    let out = Vm::builder()
        .memory_mib(512)
        .disk_mib(32)
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .host_tool("cryptsetup")
        .host_tool("losetup")
        .host_tool("mkfs.ext4")
        .module("loop")
        .module("essiv")
        .file("/root/key", key)
        .timeout(Duration::from_secs(600))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = |n: &str| out.section(n).unwrap_or_else(|| panic!("no section {n}"));
    assert_eq!(s("lbs-backing").trim(), "4096");
    assert_eq!(s("lbs-device").trim(), "4096", "the device's block size");
    assert_eq!(s("lbs-file-device").trim(), "4096", "on the file backing");
    assert!(
        s("offset-refusal").contains("4096-byte logical block size"),
        "{}",
        s("offset-refusal")
    );
    let passed = out.console.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(passed, 3, "both directions on the 4Kn device");
    assert!(out.console.contains("4k checks passed"));
}

/// Key files exactly as `cryptsetup open --type plain` reads them (issue 18 item 6): for each
/// option set, cryptsetup opens the device and writes through dm-crypt, then ublk-crypt opens it
/// with the same options and must read the same bytes; where cryptsetup refuses, ublk-crypt must
/// refuse too. The matrix: key file longer and shorter than the key, `-l` smaller than, equal to
/// and larger than the key size (and than the file), offsets, `--hash` given or not (ignored with
/// a key file), `-d -` (all of stdin, hashed), 256- and 512-bit keys.
#[test]
fn key_files_give_cryptsetups_key() {
    if !vm_or_skip("key file matrix") {
        return;
    }
    let mut script = String::from(
        r#"
        N=0
        head -c 20 /root/key > /root/k20
        mtx() {  # BITS OPTIONS...   (standard input: /root/key, for -d -)
            bits=$1; shift
            N=$((N + 1))
            what="-s $bits $*"
            dd if=/dev/urandom of=/tmp/a bs=64k count=4 2>/dev/null
            if cryptsetup open -q --type plain -c aes-xts-plain64 -s $bits "$@" /dev/vda dm < /root/key 2> /tmp/cs.err; then
                dd if=/tmp/a of=/dev/mapper/dm bs=64k oflag=direct 2>/dev/null
                cryptsetup close dm
                if dev=$(ublk-crypt open /dev/vda -c aes-xts-plain64 -s $bits "$@" --name m < /root/key 2> /tmp/u.err); then
                    dd if=$dev of=/tmp/b bs=64k count=4 iflag=direct 2>/dev/null
                    ublk-crypt close m
                    if cmp -s /tmp/a /tmp/b; then echo "same-key $N: $what"; else echo "DIFFERENT $N: $what"; fi
                else
                    echo "DIFFERENT $N: $what: only ublk-crypt refuses: $(cat /tmp/u.err)"
                fi
            elif dev=$(ublk-crypt open /dev/vda -c aes-xts-plain64 -s $bits "$@" --name m < /root/key 2> /tmp/u.err); then
                ublk-crypt close m
                echo "DIFFERENT $N: $what: only cryptsetup refuses: $(head -1 /tmp/cs.err)"
            else
                echo "both-refuse $N: $what: cryptsetup: $(head -1 /tmp/cs.err) / ublk-crypt: $(cat /tmp/u.err)"
            fi
        }
        "#,
    );
    let mut expected = 0;
    for bits in [256, 512] {
        for opts in [
            "-d /root/key",
            "-d /root/key -l 16",
            "-d /root/key -l 32",
            "-d /root/key -l 64",
            "-d /root/key -l 80",
            "-d /root/key -l 300",
            "-d /root/key --keyfile-offset 10",
            "-d /root/key --keyfile-offset 10 -l 16",
            "-d /root/key --keyfile-offset 250",
            "-d /root/k20",
            "-d /root/k20 -l 20",
            "-d /root/key -l 16 --hash sha256",
            "-d /root/key --hash sha256",
            "-d - --hash sha256",
            "-d - -l 16 --hash sha256",
            "-d - --keyfile-offset 4 --hash sha512",
            "-d - -l 16",
        ] {
            script += &format!("mtx {bits} {opts}\n");
            expected += 1;
        }
    }
    script += "echo \"matrix of $N done\"\n";
    let key: Vec<u8> = (0..256u32).map(|i| (i * 89 + 17) as u8).collect();
    let out = Vm::builder()
        .memory_mib(512)
        .disk_mib(32)
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .host_tool("cryptsetup")
        .file("/root/key", key)
        .timeout(Duration::from_secs(600))
        .run(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let different: Vec<&str> = out
        .console
        .lines()
        .filter(|l| l.contains("DIFFERENT "))
        .collect();
    assert!(different.is_empty(), "{different:#?}");
    let agreed = out
        .console
        .lines()
        .filter(|l| l.contains("same-key ") || l.contains("both-refuse "))
        .count();
    assert_eq!(agreed, expected);
    assert!(out.console.contains(&format!("matrix of {expected} done")));
}
