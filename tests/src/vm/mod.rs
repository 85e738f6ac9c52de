//! The qemu VM harness: boot Debian's kernel under TCG with a busybox initramfs, run a
//! shell script as the test, and bring back its exit status, console and disk images.
//!
//! ```no_run
//! use std::time::Duration;
//! use ublk_crypt_tests::vm::{vm_or_skip, Vm};
//!
//! if !vm_or_skip("example") {
//!     return;
//! }
//! let out = Vm::builder()
//!     .memory_mib(256)
//!     .disk_mib(64)
//!     .host_tool("cryptsetup")
//!     .stall_timeout(Duration::from_secs(30))
//!     .run("test -c /dev/ublk-control\nvm_section hello echo hi")
//!     .unwrap();
//! assert_eq!(out.section("hello").unwrap(), "hi");
//! ```
//!
//! How a run works (see `tests/README.md` for the long version):
//! 1. [`VmEnv::get`] finds qemu, busybox-static, mke2fs and the kernel (fetched once into
//!    `target/vm-cache/`).
//! 2. Host tools and all shared libraries go into a cached read-only ext2 image mounted at
//!    `/usr`; busybox, `/init`, the decompressed modules, project binaries (`/vm/bin`) and
//!    test files go into an uncompressed initramfs written per run.
//! 3. qemu boots; `/init` mounts the API filesystems, loads the modules, mounts `/usr`, prints
//!    `@@VM-READY@@`, runs the script under `sh` with `set -e`, prints `@@VM-EXIT <code>@@`
//!    and powers off.
//! 4. The host streams the serial console into the test's output and a log file, watching
//!    for the markers, for kernel panics (oops, hung tasks and soft lockups are made to
//!    panic), for console silence (the stall detector) and for the overall deadline.

pub mod cpio;
mod env;
pub mod kernel;
pub mod kmod;
pub mod rootfs;
mod sysroot;

pub use env::{cache_dir, in_ci, vm_or_skip, VmEnv};
pub use kernel::KernelChoice;

mod builder;
mod guest;
mod output;
mod prepare;
mod qemu;
mod supervisor;

pub use builder::VmBuilder;
pub use guest::GUEST_LIB;
pub use output::{VmError, VmOutput};

use builder::*;
use guest::*;
use prepare::*;
use qemu::*;
use supervisor::*;

use std::time::Duration;

use cpio::{Archive, Node, Source};
use sysroot::UsrFile;

/// Entry point: `Vm::builder()`.
pub struct Vm;

impl Vm {
    /// A builder with defaults: 256 MiB, 1 CPU, no disks, the default modules
    /// ([`kmod::DEFAULT_MODULES`]), 60 s stall timeout, 300 s overall timeout.
    pub fn builder() -> VmBuilder {
        VmBuilder {
            name: None,
            memory_mib: 256,
            cpus: 1,
            disks: vec![],
            binaries: vec![],
            host_tools: vec![],
            files: vec![],
            modules: kmod::DEFAULT_MODULES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            kernel_args: vec![],
            stall_timeout: Duration::from_secs(60),
            timeout: Duration::from_secs(300),
            keep: false,
            echo: true,
            debuginfo: false,
            root_disk: None,
        }
    }
}
