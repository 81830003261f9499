//! The server processes of a run: started pinned to the server CPU, logging to a file each,
//! watched for CPU and memory, stopped with SIGTERM (then SIGKILL).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use crate::{procstat, report::ProcessMemory};

/// How long a process gets to announce its port or report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

const MIB: f64 = 1024.0 * 1024.0;

/// A running server process.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub addr: SocketAddr,
    child: Child,
    idle_rss: Option<u64>,
}

/// Everything a process needs to be started.
pub struct Spec<'a> {
    pub name: String,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log_dir: &'a Path,
}

impl Spec<'_> {
    /// The command, its stderr (and stdout unless `stdout` is given) into its log file.
    fn command(&self, stdout: Option<Stdio>) -> anyhow::Result<Command> {
        let log = self.log_path();
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = match stdout {
            Some(stdout) => stdout,
            None => Stdio::from(stderr.try_clone()?),
        };
        let mut command = Command::new(self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        Ok(command)
    }

    fn log_path(&self) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.name))
    }
}

impl Proc {
    /// Starts a process that prints `LISTENING <addr>` on stdout when its port is bound (a
    /// synthetic server); the rest of its stdout is appended to its log.
    pub async fn announcing(spec: Spec<'_>) -> anyhow::Result<Self> {
        let mut child = spec
            .command(Some(Stdio::piped()))?
            .spawn()
            .with_context(|| format!("starting {}", spec.name))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut log = tokio::fs::OpenOptions::new()
            .append(true)
            .open(spec.log_path())
            .await?;
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("LISTENING ") {
                    return addr
                        .trim()
                        .parse::<SocketAddr>()
                        .map_err(anyhow::Error::from);
                }
                log.write_all(format!("{line}\n").as_bytes()).await?;
            }
            bail!(
                "{} exited without listening (see {})",
                spec.name,
                spec.log_path().display()
            )
        })
        .await
        .with_context(|| format!("{} did not listen within {START_TIMEOUT:?}", spec.name))??;
        // Keep reading, or the process blocks once the pipe is full.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if log.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
        Self::running(spec.name, child, addr)
    }

    /// Starts a process that listens on `addr` (a real service); whether it is ready is the
    /// caller's to check.
    pub fn listening_on(spec: Spec<'_>, addr: SocketAddr) -> anyhow::Result<Self> {
        let child = spec
            .command(None)?
            .spawn()
            .with_context(|| format!("starting {}", spec.name))?;
        Self::running(spec.name, child, addr)
    }

    fn running(name: String, child: Child, addr: SocketAddr) -> anyhow::Result<Self> {
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Self {
            name,
            pid,
            addr,
            child,
            idle_rss: None,
        })
    }

    /// Records its resident memory now as its idle memory (call once it serves, before load).
    pub fn mark_idle(&mut self) -> anyhow::Result<()> {
        self.idle_rss = Some(procstat::resident(self.pid)?.0);
        Ok(())
    }

    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        procstat::cpu_time(self.pid)
    }

    pub fn memory(&self) -> anyhow::Result<ProcessMemory> {
        let (now, peak) = procstat::resident(self.pid)?;
        Ok(ProcessMemory {
            name: self.name.clone(),
            idle_rss_mib: self.idle_rss.unwrap_or(now) as f64 / MIB,
            peak_rss_mib: peak as f64 / MIB,
        })
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})", self.name);
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "{} did not stop within {STOP_GRACE:?}; killing it",
                self.name
            );
            let _ = self.child.kill().await;
        }
    }
}

/// Total CPU time of `procs` so far.
pub fn cpu_time(procs: &[Proc]) -> anyhow::Result<Duration> {
    procs.iter().map(Proc::cpu_time).sum()
}

/// A free port on 127.0.0.1 (bound and released: another process could take it in between,
/// which on a benchmark machine nothing does).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?)
}
