//! Which of the daemon's hot crypto loops straddle a 4 KiB page: the one property of a build
//! that moved TCG figures by 10–100 % with no change in the code that ran.
//!
//! Why: a build can read 4 KiB at queue depth 1 20 % slower in the VM (session 16) or run the
//! torture's verify passes 1.6x slower (session 13) with no change in the code that runs: a
//! never-called function was enough. The suspect: qemu's TCG does not chain translation blocks
//! directly across a guest page boundary, so a hot loop whose body crosses one pays a lookup on
//! every iteration, and any change to the binary moves every function after it. In session 16
//! the slow builds had loops of `SectorCipher::crypt` across a page and the fast one none, but a
//! fifth build with other loops of it across a page was fast: this lists facts to correlate,
//! not a verdict. On a real CPU none of it costs anything.
//!
//! How: `nm -S -C` for the functions the `portable` tier runs ([`HOT`]), `objdump -d` of each, every backward
//! jump inside the function is a loop `[target, jump]`; one shorter than [`MAX_LOOP`] whose two
//! ends lie in different pages is reported.

use std::path::Path;
use std::process::Command;

/// The functions the `portable` XTS tier runs, the tier the VM's reports use (`scripts/bench
/// --xts-tier`): the sector loop with the XTS code inlined, the `aes` crate's AES-NI rounds.
/// The fused tiers' and CBC's code is not on that path, and listing it only hides the signal.
const HOT: [&str; 3] = [
    "ublk_crypt_crypto::sector::SectorCipher::crypt",
    "ublk_crypt_crypto::xts::",
    "aes::backends::x86_aes::",
];

/// Loops longer than this are not the per-block or per-round loops that run hot.
const MAX_LOOP: u64 = 1024;

/// A loop that straddles a page: its function, where the function starts within its page, and
/// the loop's ends as offsets into the function.
pub struct StraddlingLoop {
    pub function: String,
    pub page_offset: u64,
    pub start: u64,
    pub end: u64,
}

/// How many crypto functions `binary` (unstripped) has, and their loops that straddle a page.
/// Err if `nm` or `objdump` cannot be run.
pub fn straddling_loops(binary: &Path) -> Result<(usize, Vec<StraddlingLoop>), String> {
    let nm = Command::new("nm")
        .args(["-S", "-C"])
        .arg(binary)
        .output()
        .map_err(|e| format!("nm: {e}"))?;
    let mut functions = 0;
    let mut found = vec![];
    for line in String::from_utf8_lossy(&nm.stdout).lines() {
        let mut f = line.splitn(4, ' ');
        let (Some(addr), Some(size), Some(kind), Some(name)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if !matches!(kind, "t" | "T") || !HOT.iter().any(|h| name.contains(h)) {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16))
        else {
            continue;
        };
        if size < 64 {
            continue;
        }
        functions += 1;
        let dis = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(format!("--start-address={addr:#x}"))
            .arg(format!("--stop-address={:#x}", addr + size))
            .arg(binary)
            .output()
            .map_err(|e| format!("objdump: {e}"))?;
        for l in String::from_utf8_lossy(&dis.stdout).lines() {
            // "  4d2f10:\tjne    4d2e90 <...>"
            let mut parts = l.split('\t');
            let (Some(at), Some(insn)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(at) = u64::from_str_radix(at.trim().trim_end_matches(':'), 16) else {
                continue;
            };
            let mut words = insn.split_whitespace();
            let (Some(op), Some(target)) = (words.next(), words.next()) else {
                continue;
            };
            if !op.starts_with('j') {
                continue;
            }
            let Ok(target) = u64::from_str_radix(target, 16) else {
                continue;
            };
            if target < addr || target > at || at - target > MAX_LOOP {
                continue;
            }
            if target / 4096 != at / 4096 {
                found.push(StraddlingLoop {
                    function: name.to_string(),
                    page_offset: addr % 4096,
                    start: target - addr,
                    end: at - addr,
                });
            }
        }
    }
    Ok((functions, found))
}

/// One line for a report: how many loops straddle a page, and where.
pub fn summary(binary: &Path) -> String {
    match straddling_loops(binary) {
        Err(e) => format!("not checked ({e})"),
        Ok((0, _)) => "not checked (no symbols: a stripped binary?)".to_string(),
        Ok((n, loops)) if loops.is_empty() => {
            format!("no loop under {MAX_LOOP} bytes of the {n} hot crypto functions straddles a 4 KiB page")
        }
        Ok((n, loops)) => {
            let list: Vec<String> = loops
                .iter()
                .map(|l| {
                    format!(
                        "`{}` (at page offset {}) +{}..+{}",
                        short(&l.function),
                        l.page_offset,
                        l.start,
                        l.end
                    )
                })
                .collect();
            format!(
                "{} loop(s) under {MAX_LOOP} bytes of the {n} hot crypto functions straddle a 4 KiB page: {}",
                loops.len(),
                list.join(", ")
            )
        }
    }
}

/// `ublk_crypt_crypto::sector::SectorCipher::crypt` -> `sector::SectorCipher::crypt`.
fn short(name: &str) -> String {
    name.replace("ublk_crypt_crypto::", "")
}
