//! Shell completions and man pages, generated from the clap definition of the command line
//! (`cli.rs` passes it in) so they never drift from `--help`:
//!
//! ```text
//! ublk-crypt completions bash > /etc/bash_completion.d/ublk-crypt
//! ublk-crypt manpage > /usr/local/share/man/man8/ublk-crypt.8          # the main page
//! ublk-crypt manpage --dir /usr/local/share/man/man8                   # + one per subcommand
//! ```

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Man page section: an administrator's command (it needs root and a kernel driver).
pub const MAN_SECTION: &str = "8";

/// The completion script of `cli` for `shell`.
pub fn completion_script(cli: &clap::Command, shell: Shell) -> Vec<u8> {
    let mut cmd = visible(cli);
    let mut out = vec![];
    clap_complete::generate(shell, &mut cmd, "ublk-crypt", &mut out);
    if shell == Shell::Bash {
        // clap_complete's bash generator spells the state of a subcommand of a hyphenated
        // binary two ways (clap-rs/clap#6421): the word loop sets `ublk__crypt__subcmd__open`,
        // the case arm is `ublk__subcmd__crypt__subcmd__open`, and no subcommand option ever
        // completes. Spell the arms like the loop.
        let text = String::from_utf8_lossy(&out).replace("ublk__subcmd__crypt", "ublk__crypt");
        out = text.into_bytes();
    }
    out
}

/// `cmd` without its hidden arguments and subcommands, which clap_complete would otherwise
/// offer (the test-only `--test-disable-protections` must never be one tab away).
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut c = clap::Command::new(cmd.get_name().to_string());
    if let Some(about) = cmd.get_about() {
        c = c.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        c = c.version(version.to_string());
    }
    c.args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(visible),
        )
}

/// Every man page: (file name, roff text). The first is `ublk-crypt.8`, then one per visible
/// subcommand (`ublk-crypt-open.8`, ...), as git and cargo do.
pub fn man_pages(cli: &clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = cli.clone().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![];
    let mut add = |c: clap::Command| -> Result<()> {
        let man = clap_mangen::Man::new(c)
            .section(MAN_SECTION)
            .manual("ublk-crypt manual");
        let mut text = vec![];
        man.render(&mut text).context("rendering a man page")?;
        pages.push((man.get_filename(), text));
        Ok(())
    };
    add(cmd.clone())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        add(sub.clone())?;
    }
    Ok(pages)
}

/// `ublk-crypt completions SHELL`.
pub fn completions(cli: &clap::Command, shell: Shell) -> Result<ExitCode> {
    std::io::stdout()
        .write_all(&completion_script(cli, shell))
        .context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// `ublk-crypt manpage [--dir DIR]`: the main page on stdout, or every page into DIR.
pub fn manpage(cli: &clap::Command, dir: Option<&Path>) -> Result<ExitCode> {
    let pages = man_pages(cli)?;
    match dir {
        None => std::io::stdout()
            .write_all(&pages[0].1)
            .context("writing the man page")?,
        Some(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("{} is not a directory", dir.display());
            }
            for (name, text) in &pages {
                let path = dir.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, ValueEnum};

    /// The real command line.
    fn cli() -> clap::Command {
        crate::cli::Cli::command()
    }

    #[test]
    fn every_shell_gets_a_completion_script_naming_the_options() {
        for &shell in Shell::value_variants() {
            let s = String::from_utf8(completion_script(&cli(), shell)).unwrap();
            assert!(s.contains("ublk-crypt"), "{shell}");
            for word in ["open", "recover", "benchmark", "key-file", "allow-discards"] {
                assert!(s.contains(word), "{shell} completion lacks {word}");
            }
            // Hidden subcommands and the test-only option stay out of completions.
            for hidden in ["test-disable-protections", "manpage"] {
                assert!(!s.contains(hidden), "{shell} completion offers {hidden}");
            }
        }
    }

    /// Runs the bash completion function for `words` (the last one being completed).
    fn bash_complete(words: &[&str]) -> Option<String> {
        let script = std::env::temp_dir().join(format!("ublk-crypt-bash-{}", std::process::id()));
        std::fs::write(&script, completion_script(&cli(), Shell::Bash)).unwrap();
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let n = words.len() - 1;
        let prog = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={n}; _ublk__crypt ublk-crypt '{}' '{}'; \
             echo \"${{COMPREPLY[*]}}\"",
            script.display(),
            quoted.join(" "),
            words[n],
            words[n - 1],
        );
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(prog)
            .output();
        std::fs::remove_file(&script).unwrap();
        let out = out.ok()?; // no bash on this machine: nothing to run
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }

    #[test]
    fn bash_completes_subcommands_and_their_options() {
        let Some(sub) = bash_complete(&["ublk-crypt", "rec"]) else {
            eprintln!("no bash: completion not exercised");
            return;
        };
        assert_eq!(sub, "recover");
        assert_eq!(
            bash_complete(&["ublk-crypt", "open", "--key-f"]).unwrap(),
            "--key-file"
        );
        assert_eq!(
            bash_complete(&["ublk-crypt", "benchmark", "--seco"]).unwrap(),
            "--seconds"
        );
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let pages = man_pages(&cli()).unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ublk-crypt.8",
                "ublk-crypt-open.8",
                "ublk-crypt-close.8",
                "ublk-crypt-list.8",
                "ublk-crypt-status.8",
                "ublk-crypt-recover.8",
                "ublk-crypt-upgrade.8",
                "ublk-crypt-mkswap.8",
                "ublk-crypt-benchmark.8",
            ]
        );
        let text = |i: usize| String::from_utf8(pages[i].1.clone()).unwrap();
        let main = text(0);
        assert!(main.contains(".TH ublk-crypt 8"), "{main}");
        assert!(main.contains("dm\\-crypt"), "the description is there");
        assert!(main.contains("open"), "subcommands are listed");
        let open = text(1);
        assert!(open.contains(".TH ublk-crypt-open 8"), "{open}");
        for opt in [
            "key\\-file",
            "sector\\-size",
            "allow\\-discards",
            "foreground",
        ] {
            assert!(open.contains(opt), "open page lacks {opt}");
        }
        assert!(
            !open.contains("test\\-disable"),
            "hidden options stay hidden"
        );
    }

    #[test]
    fn manpage_dir_writes_every_page_and_rejects_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("ublk-crypt-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        manpage(&cli(), Some(&dir)).unwrap();
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(n, man_pages(&cli()).unwrap().len());
        std::fs::remove_dir_all(&dir).unwrap();
        let e = manpage(&cli(), Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("not a directory") && !e.contains('\n'), "{e}");
    }
}
