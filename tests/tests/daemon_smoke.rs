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
            vm_section json ublk-crypt status t0 --json
            vm_section log sh -c 'cat /run/ublk-crypt/daemon-*.log | grep "ublk features"'
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
    // The ublk features the kernel offers and the device uses, by name (issue 21 item 2).
    let json: serde_json::Value = serde_json::from_str(&out.section("json").unwrap()).unwrap();
    let f = &json["ublk_features"];
    let list = |k: &str| -> Vec<String> {
        f[k].as_array()
            .unwrap_or_else(|| panic!("no ublk_features.{k}: {json}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (offered, in_use) = (list("offered"), list("in_use"));
    for name in ["USER_COPY", "USER_RECOVERY", "USER_RECOVERY_REISSUE"] {
        assert!(
            in_use.iter().any(|n| n == name),
            "{name} in use: {in_use:?}"
        );
    }
    assert!(
        in_use.iter().all(|n| offered.contains(n)),
        "only what the kernel offers is used: {in_use:?} of {offered:?}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains("ublk:        uses ") && l.contains(" USER_COPY")),
        "{status}"
    );
    let log = out.section("log").unwrap();
    assert!(
        log.contains("the kernel offers") && log.contains("USER_RECOVERY"),
        "{log}"
    );
}
