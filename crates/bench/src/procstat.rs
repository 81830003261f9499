//! What a process costs, read from `/proc`: CPU time used (user + system, all threads) and
//! resident memory (now, and the peak).

use std::time::Duration;

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat`'s times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// CPU time `pid` (0: this process) has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), counted from 1 with the name as field 2: here 11, 12.
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("{path}: too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("{path}: field {} is not a number", index + 3))
    };
    let total = ticks(11)?.saturating_add(ticks(12)?);
    Ok(Duration::from_millis(
        total.saturating_mul(1000) / TICKS_PER_SECOND,
    ))
}

/// Resident memory of `pid`: (now, peak), in bytes.
pub fn resident(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
            .with_context(|| format!("{path}: no {key}"))
    };
    Ok((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_and_memory() -> anyhow::Result<()> {
        let before = cpu_time(0)?;
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = cpu_time(0)?.saturating_sub(before);
        assert!(
            used >= Duration::from_millis(200),
            "{used:?} of 300 ms spinning"
        );
        let (now, peak) = resident(std::process::id())?;
        assert!(now > 1024 * 1024 && peak >= now, "{now} {peak}");
        Ok(())
    }
}
