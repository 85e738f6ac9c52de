//! The region as the kernel sees it: locked, resident, excluded from dumps and forks, and
//! unmapped on drop. One test in its own binary, so no other test maps memory meanwhile (which
//! could reuse the address range after the drop).

use std::fs;

use ublk_crypt_pool::{PoolConfig, ReservePool};

/// The smaps entry of the mapping starting at `start`, if any.
fn smaps_entry(start: usize) -> Option<String> {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let head = format!("{start:x}-");
    let mut found: Option<String> = None;
    for line in smaps.lines() {
        let is_header = line.split_whitespace().next().is_some_and(|w| {
            w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        });
        if is_header {
            if found.is_some() {
                break;
            }
            if line.starts_with(&head) {
                found = Some(String::new());
            }
        }
        if let Some(entry) = found.as_mut() {
            entry.push_str(line);
            entry.push('\n');
        }
    }
    found
}

fn field_kb(entry: &str, name: &str) -> usize {
    entry
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{entry}"))
}

fn vm_flags(entry: &str) -> Vec<String> {
    entry
        .lines()
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .unwrap_or_else(|| panic!("no VmFlags in\n{entry}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn region_is_locked_resident_dontdump_dontfork_and_unmapped_on_drop() {
    let budget = 4 << 20;
    for lock in [true, false] {
        let p = ReservePool::new(PoolConfig {
            budget_bytes: budget,
            lock,
            ..PoolConfig::with_queues(2)
        })
        .unwrap();
        let start = {
            let c = p.try_acquire(0).unwrap();
            c.as_ptr() as usize - c.offset()
        };
        let entry = smaps_entry(start).expect("region in smaps");
        assert_eq!(field_kb(&entry, "Size"), budget / 1024, "{entry}");
        // Pre-faulted: every page resident, whether locked or not.
        assert_eq!(field_kb(&entry, "Rss"), budget / 1024, "{entry}");
        let flags = vm_flags(&entry);
        let has = |f: &str| flags.iter().any(|x| x == f);
        assert!(has("dd"), "MADV_DONTDUMP missing: {flags:?}");
        assert!(has("dc"), "MADV_DONTFORK missing: {flags:?}");
        assert_eq!(has("lo"), lock, "mlock flag: {flags:?}");
        if lock {
            assert_eq!(field_kb(&entry, "Locked"), budget / 1024, "{entry}");
        }
        assert_eq!(p.is_locked(), lock);
        drop(p);
        assert!(
            smaps_entry(start).is_none(),
            "region still mapped after drop"
        );
    }
}

/// A standby's pool maps the daemon's buffers: what one writes, the other reads, attaching
/// writes nothing, and a memfd of the wrong size is refused.
#[test]
fn a_shareable_pool_is_seen_by_an_attached_one() {
    use std::os::fd::AsFd;
    let config = PoolConfig {
        budget_bytes: 1 << 20,
        lock: false,
        ..PoolConfig::with_queues(1)
    };
    let primary = ReservePool::new_shareable(config).unwrap();
    let mut chunk = primary.try_acquire(0).unwrap();
    let index = chunk.index();
    chunk[..5].copy_from_slice(b"hello");
    let fd = primary.shared_fd().unwrap().try_clone_to_owned().unwrap();
    let standby = ReservePool::attach(config, fd).unwrap();
    assert!(standby.shared_fd().is_some());
    let seen = standby.try_acquire(0).unwrap();
    assert_eq!(seen.index(), index, "same free list order in both");
    assert_eq!(&seen[..5], b"hello", "attaching must not clear the buffers");
    assert!(ReservePool::new(config).unwrap().shared_fd().is_none());
    let fd = primary
        .shared_fd()
        .unwrap()
        .as_fd()
        .try_clone_to_owned()
        .unwrap();
    let other = PoolConfig {
        budget_bytes: 2 << 20,
        ..config
    };
    let e = ReservePool::attach(other, fd).unwrap_err().to_string();
    assert!(e.contains("this pool needs"), "{e}");
}
