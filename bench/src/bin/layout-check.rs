//! `layout-check BINARY...`: for each (unstripped) build of the daemon, which hot crypto loops
//! straddle a 4 KiB page: the suspect when a build alone moves VM figures by 10–100 % under
//! qemu's TCG (`tcg_layout.rs`; not proven). Compare both binaries of a VM A/B.

#[path = "../tcg_layout.rs"]
mod tcg_layout;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let bins: Vec<String> = std::env::args().skip(1).collect();
    if bins.is_empty() {
        eprintln!("usage: layout-check BINARY...  (e.g. target/release/ublk-crypt)");
        return ExitCode::from(2);
    }
    for b in &bins {
        println!("{b}: {}", tcg_layout::summary(Path::new(b)));
    }
    ExitCode::SUCCESS
}
