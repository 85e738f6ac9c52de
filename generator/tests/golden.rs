//! Golden-file tests of the generator binary (zram-generator's habit): each directory under
//! `tests/golden/` holds an input `ublk-crypttab`, the unit tree it must produce (`expected/`,
//! links as links) and the messages it must log (`messages`). `UPDATE_GOLDEN=1` rewrites the
//! expectations from what the generator does now (review the diff).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file and link under `dir`, relative path → contents or `-> target`.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.map(Result::unwrap) {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, format!("-> {}", fs::read_link(&p).unwrap().display()));
            } else if meta.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(rel, fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn every_golden_case_produces_its_units_and_messages() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "golden cases: {cases:?}");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for case in cases {
        let out = std::env::temp_dir().join(format!(
            "ublk-crypt-generator-{}-{}",
            std::process::id(),
            case.file_name().unwrap().to_string_lossy()
        ));
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out).unwrap();
        let input = case.join("ublk-crypttab");
        let run = Command::new(env!("CARGO_BIN_EXE_ublk-crypt-generator"))
            .arg(&out)
            .arg("/nonexistent-early")
            .arg("/nonexistent-late")
            .env("UBLK_CRYPTTAB", &input)
            .env("UBLK_CRYPT_GENERATOR_STDERR", "1")
            .output()
            .unwrap();
        assert!(run.status.success(), "{}: {run:?}", case.display());
        // The input's path stands where /etc/ublk-crypttab would.
        let norm = |s: &str| s.replace(&*input.to_string_lossy(), "/etc/ublk-crypttab");
        let messages = norm(&String::from_utf8_lossy(&run.stderr));
        let got: BTreeMap<PathBuf, String> =
            tree(&out).into_iter().map(|(k, v)| (k, norm(&v))).collect();
        let expected_dir = case.join("expected");
        if update {
            let _ = fs::remove_dir_all(&expected_dir);
            for (rel, v) in &got {
                let p = expected_dir.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                match v.strip_prefix("-> ") {
                    Some(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
                    None => fs::write(&p, v).unwrap(),
                }
            }
            fs::write(case.join("messages"), &messages).unwrap();
        }
        let want = tree(&expected_dir);
        assert_eq!(got, want, "{}: generated units differ", case.display());
        let want_messages = fs::read_to_string(case.join("messages")).unwrap_or_default();
        assert_eq!(
            messages,
            want_messages,
            "{}: messages differ",
            case.display()
        );
        let _ = fs::remove_dir_all(&out);
    }
}
