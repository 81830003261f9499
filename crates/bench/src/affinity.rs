//! CPU pinning, so that the servers run on one core and the load generator on the other and
//! neither takes the other's CPU. A process pins itself before it starts any thread (threads
//! inherit the mask, and tokio sizes its worker pool from it); a real service binary is pinned
//! by `meshwork-bench pinned --cpu N -- <binary>`, which pins itself and then `exec`s the binary
//! (the mask survives `exec`).

use std::{ffi::CString, path::Path};

use anyhow::Context;
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};

/// The CPUs this process may run on, in order.
pub fn allowed() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|cpu| set.is_set(*cpu).unwrap_or(false))
        .collect())
}

/// Restricts this process (its current thread, and every thread it starts later) to `cpu`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} does not exist"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// Pins this process to `cpu`, then replaces it with `program` (its arguments after it).
/// Returns only on failure.
pub fn exec_pinned(cpu: usize, program: &Path, args: &[String]) -> anyhow::Result<()> {
    pin_self(cpu)?;
    let path = CString::new(program.as_os_str().as_encoded_bytes())
        .context("the program's path has a NUL byte")?;
    let mut argv = vec![path.clone()];
    for arg in args {
        argv.push(CString::new(arg.as_bytes()).context("an argument has a NUL byte")?);
    }
    let error = nix::unistd::execv(&path, &argv).err();
    anyhow::bail!("cannot run {}: {error:?}", program.display())
}
