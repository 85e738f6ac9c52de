//! How the daemon starts and says that it is serving: stderr logging, forking into the
//! background (the parent prints the device path or the error and exits), and systemd's
//! readiness protocol (`sd_notify`, Type=notify).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;

use anyhow::{bail, Context, Result};

use crate::records;

/// Logging of the non-IO threads, to stderr (`UBLK_CRYPT_LOG` filters, default `info`). The IO
/// path logs to the kernel instead (`kernel_log.rs`).
///
/// The filter is `Targets` (`debug`, `warn,ublk_crypt::keeper=debug`), not `EnvFilter`:
/// EnvFilter's span and field matching brings the regex crates, 516 KiB of code and tables
/// that `mlockall` locked in every daemon and standby for a feature nobody uses here.
pub fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("UBLK_CRYPT_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .with(filter)
        .try_init();
}

/// How `open` reports the outcome: to the parent through a pipe (daemon mode), or directly.
pub enum Readiness {
    Pipe(File),
    Foreground,
}

impl Readiness {
    /// In the foreground, the caller's readiness; else forks, and only the child returns
    /// (`None`: this is the parent, whose job is done).
    pub fn start(foreground: bool) -> Result<Option<Readiness>> {
        if foreground {
            return Ok(Some(Readiness::Foreground));
        }
        Ok(daemonize()?.map(Readiness::Pipe))
    }

    /// The device is live: tells whoever waits (the parent, or stdout) and systemd.
    pub fn ready(&mut self, path: &str) {
        match self {
            Readiness::Pipe(p) => {
                let _ = writeln!(p, "OK {path}");
            }
            Readiness::Foreground => {
                println!("{path}");
                let _ = std::io::stdout().flush();
            }
        }
        sd_notify(&format!(
            "READY=1\nSTATUS=serving {path}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// Start-up failed: the parent prints `e` (in the foreground the caller does).
    pub fn fail(&mut self, e: &anyhow::Error) {
        if let Readiness::Pipe(p) = self {
            let _ = writeln!(p, "ERR {e:#}");
        }
    }
}

/// Tells systemd (Type=notify) about state changes; a no-op outside systemd.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let _ = if let Some(abstract_name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
}

/// Forks into the background. The parent waits for the child's verdict, prints the device path
/// (or the error) and exits; the child returns its end of the pipe.
fn daemonize() -> Result<Option<File>> {
    let (rd, wr) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: no other thread exists yet (nothing has spawned one before this point), so the
    // child inherits a consistent single-threaded state.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            let line = msg.lines().next().unwrap_or("");
            if let Some(path) = line.strip_prefix("OK ") {
                println!("{path}");
                return Ok(None);
            }
            if let Some(err) = line.strip_prefix("ERR ") {
                bail!("{err}");
            }
            bail!(
                "the daemon exited during start-up (see {})",
                records::RUN_DIR
            )
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            nix::unistd::setsid().context("setsid")?;
            let devnull = File::options().read(true).write(true).open("/dev/null")?;
            nix::unistd::dup2_stdin(&devnull)?;
            nix::unistd::dup2_stdout(&devnull)?;
            let dir = records::ensure_run_dir()?;
            let log = File::options()
                .create(true)
                .append(true)
                .open(records::log_path(std::process::id()))
                .with_context(|| format!("cannot open a log file in {}", dir.display()))?;
            nix::unistd::dup2_stderr(&log)?;
            Ok(Some(File::from(wr)))
        }
    }
}
