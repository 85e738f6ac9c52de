//! The command line that `systemd/ublk-crypt@.service` runs, expanded with each example config
//! in `systemd/examples/` the way systemd expands it, must be one this binary accepts, with the
//! values the config means. (`tests/tests/systemd_units.rs` runs `systemd-analyze verify`.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use ublk_crypt::cli::{Cli, Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// An environment file as systemd reads it: `KEY=value`, `#` comments, optional quotes.
fn env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=value: {l}"));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// systemd's expansion of an ExecStart= line: `%i`, `${VAR}` as one word, `$VAR` alone as a
/// word split at whitespace (what the unit uses; no quoting in it).
fn expand(exec: &str, instance: &str, env: &HashMap<String, String>) -> Vec<String> {
    let mut argv = vec![];
    for word in exec.split_whitespace() {
        let word = word.replace("%i", instance);
        if let Some(var) = word.strip_prefix('$').filter(|v| !v.starts_with('{')) {
            argv.extend(
                env.get(var)
                    .map(String::as_str)
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string),
            );
        } else {
            let mut w = word.clone();
            for (k, v) in env {
                w = w.replace(&format!("${{{k}}}"), v);
            }
            assert!(!w.contains("${"), "unset variable in {word}");
            argv.push(w);
        }
    }
    argv
}

fn exec_start() -> String {
    let unit = read("systemd/ublk-crypt@.service");
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(lines.len(), 1);
    lines[0].to_string()
}

#[test]
fn unit_command_line_parses_with_every_example_config() {
    let exec = exec_start();
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("systemd/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("conf") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if text.contains("[Unit]") {
            continue; // a drop-in (backing.conf), not a config
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let env = env_file(&text);
        for key in ["BACKING", "ID", "OPTIONS"] {
            assert!(env.contains_key(key), "{name}.conf lacks {key}");
        }
        let argv = expand(&exec, &name, &env);
        // argv[0] is the installed path; clap only needs a program name.
        let cli =
            Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{name}.conf: {argv:?}: {e}"));
        let Command::Open(a) = cli.command else {
            panic!("{name}: not open")
        };
        assert_eq!(a.backing, PathBuf::from(&env["BACKING"]), "{name}");
        assert_eq!(a.id, Some(env["ID"].parse().unwrap()), "{name}: fixed id");
        assert_eq!(a.name.as_deref(), Some(name.as_str()));
        assert!(a.foreground, "{name}: Type=notify needs the foreground");
        if name == "swap" {
            assert_eq!(
                a.key_file.as_deref(),
                Some(Path::new("/dev/urandom")),
                "swap: fresh key"
            );
        }
        seen += 1;
    }
    assert!(seen >= 2, "swap.conf and data.conf are checked");
}

#[test]
fn a_config_without_id_is_a_one_line_error() {
    // ${ID} empty: systemd passes an empty word, which clap must reject (recovery needs it).
    let mut env = env_file(&read("systemd/examples/swap.conf"));
    env.insert("ID".into(), String::new());
    let argv = expand(&exec_start(), "swap", &env);
    let e = Cli::try_parse_from(&argv).unwrap_err().to_string();
    assert!(e.contains("--id"), "{e}");
}
