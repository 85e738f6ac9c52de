//! The VM harness reports guest failures as failures, quickly: a non-zero exit, a hang, a
//! kernel panic, an overall timeout. And project binaries, files and sections work.

use std::time::Duration;

use ublk_crypt_tests::vm::{vm_or_skip, Vm, VmError};

#[test]
fn script_exit_code_is_reported() {
    if !vm_or_skip("script_exit_code_is_reported") {
        return;
    }
    let err = Vm::builder()
        .run("echo about to fail\nexit 3")
        .expect_err("exit 3 must fail the run");
    match &err {
        VmError::ScriptFailed { code: 3, output } => {
            assert!(output.console.contains("about to fail"));
            assert_eq!(output.exit_code, Some(3));
        }
        other => panic!("expected ScriptFailed with code 3, got: {other}"),
    }
    assert!(err.to_string().contains("exit code 3"));
    assert!(
        err.to_string().contains("about to fail"),
        "the tail is in the message"
    );
}

#[test]
fn failing_command_fails_the_script() {
    if !vm_or_skip("failing_command_fails_the_script") {
        return;
    }
    // Scripts run under `set -e`: the first failing command ends them.
    let err = Vm::builder()
        .run("false\necho not reached")
        .expect_err("set -e");
    assert!(
        matches!(err, VmError::ScriptFailed { code: 1, .. }),
        "{err}"
    );
    assert!(!err.output().unwrap().console.contains("not reached"));
}

#[test]
fn silent_guest_is_a_stall() {
    if !vm_or_skip("silent_guest_is_a_stall") {
        return;
    }
    let err = Vm::builder()
        .stall_timeout(Duration::from_secs(5))
        .run("echo going silent\nsleep 1000")
        .expect_err("a hang must fail");
    match &err {
        VmError::Stall { silent_for, output } => {
            assert!(*silent_for >= Duration::from_secs(5));
            assert!(output.console.contains("going silent"));
            assert_eq!(output.exit_code, None);
            // Before killing it, the host asked the guest (serial break + sysrq) for its
            // blocked tasks and memory.
            assert!(
                output.console.contains("sysrq: Show Blocked State"),
                "no blocked-task dump after the stall"
            );
            assert!(output.console.contains("sysrq: Show Memory"));
            // Boot (~4 s) + 5 s of silence: generous for a loaded CI host, far below the
            // 1000 s sleep. (`duration` counts from qemu's start, not from the lock wait.)
            assert!(
                output.duration < Duration::from_secs(60),
                "stall detection took {:?}",
                output.duration
            );
        }
        other => panic!("expected a stall, got: {other}"),
    }
}

#[test]
fn chatty_guest_hits_the_overall_timeout() {
    if !vm_or_skip("chatty_guest_hits_the_overall_timeout") {
        return;
    }
    let err = Vm::builder()
        .stall_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(12))
        .run("while :; do echo tick; sleep 1; done")
        .expect_err("an endless script must time out");
    assert!(matches!(err, VmError::Timeout { .. }), "{err}");
    let took = err.output().unwrap().duration;
    assert!(
        took >= Duration::from_secs(12) && took < Duration::from_secs(30),
        "{took:?}"
    );
}

#[test]
fn kernel_panic_is_reported() {
    if !vm_or_skip("kernel_panic_is_reported") {
        return;
    }
    let err = Vm::builder()
        .run("echo c > /proc/sysrq-trigger\nsleep 100")
        .expect_err("a panic must fail");
    match &err {
        VmError::KernelPanic { reason, .. } => assert!(reason.contains("sysrq"), "{reason}"),
        other => panic!("expected a kernel panic, got: {other}"),
    }
}

#[test]
fn binaries_files_and_sections_reach_the_guest() {
    if !vm_or_skip("binaries_files_and_sections_reach_the_guest") {
        return;
    }
    // vm-shell stands in for a project binary: a dynamically linked Rust executable from
    // this workspace, which must find its libraries on the /usr disk.
    let bin = env!("CARGO_BIN_EXE_vm-shell");
    let out = Vm::builder()
        .binary(bin)
        .file("/root/hello.txt", "hello from the host\n")
        .host_file("/usr/share/vm-test/Cargo.toml", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .disk_mib(8)
        .disk_mib(16)
        .run(
            r#"
vm_section help vm-shell --help
vm_section hello cat /root/hello.txt
vm_section manifest grep -c ublk-crypt-tests /usr/share/vm-test/Cargo.toml
vm_section disks sh -c 'for d in vda vdb; do echo $d $(cat /sys/block/$d/size) $(cat /sys/block/$d/serial); done'
vm_begin two
echo first
vm_end two
vm_begin two
echo second
vm_end two
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.section("help").unwrap().starts_with("usage: vm-shell"));
    assert_eq!(out.section("hello").unwrap(), "hello from the host");
    assert_eq!(out.section("manifest").unwrap(), "1");
    assert_eq!(
        out.section("disks").unwrap(),
        "vda 16384 vm-disk0\nvdb 32768 vm-disk1"
    );
    assert_eq!(out.sections("two"), ["first", "second"]);
    assert_eq!(out.section("missing"), None);
    assert_eq!(out.exit_code, Some(0));
    assert!(
        out.kernel_complaints().is_empty(),
        "{:?}",
        out.kernel_complaints()
    );
}
