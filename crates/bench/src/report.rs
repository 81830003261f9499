//! The results of one `make bench`: kept as JSON (everything measured) and rendered as the
//! Markdown tables printed at the end and committed under `bench/results/`.

use std::{fmt::Write as _, path::Path};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{collector::DbShare, load::Summary};

/// One run of the whole benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339).
    pub started: String,
    pub machine: Machine,
    pub settings: Settings,
    pub rows: Vec<Row>,
    pub goals: Vec<Goal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    /// The CPU the servers were pinned to, and the load generator's (equal when only one CPU
    /// was allowed: then both shared it).
    pub server_cpu: usize,
    pub load_cpu: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Closed-loop callers (concurrent streams) for the synthetic and the real runs.
    pub concurrency: usize,
    pub real_concurrency: usize,
    /// HTTP/2 connections the load is spread over.
    pub connections: usize,
    /// Open-loop rates, as fractions of each configuration's closed-loop maximum.
    pub load_fractions: Vec<f64>,
}

/// One configuration, measured every way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Short, stable name (`3-mesh`), which `baseline` refers to.
    pub id: String,
    pub title: String,
    pub baseline: Option<String>,
    /// The call made and how (`users.GetUser, in memory, mTLS`).
    pub call: String,
    pub sequential: Phase,
    pub max: Phase,
    pub rates: Vec<Phase>,
    /// The server-side processes, with their memory.
    pub processes: Vec<ProcessMemory>,
    /// Spans the trace sink received during the closed loop, when traces were exported.
    pub spans_per_call: Option<f64>,
    /// Database time, from a separate fully traced run (real services only).
    pub db: Option<DbShare>,
}

/// One phase of load on one configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// `1 at a time`, `max`, or the fraction of the maximum (`50%`).
    pub load: String,
    pub summary: Summary,
    /// Server processes' CPU time over the phase, in % of one core.
    pub server_cpu_pct: f64,
    /// Server CPU time per call answered.
    pub server_cpu_us_per_call: f64,
    /// The load generator's own CPU, in % of one core (a closed loop near 100% means the
    /// generator, not the server, was the limit).
    pub load_cpu_pct: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessMemory {
    pub name: String,
    /// Resident memory once serving, before any load.
    pub idle_rss_mib: f64,
    /// Peak resident memory over the whole run.
    pub peak_rss_mib: f64,
}

/// A goal of the issue, and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

impl Report {
    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|row| row.id == id)
    }

    /// Reads a report written by [`Self::write`].
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&json).with_context(|| format!("parsing {}", path.display()))
    }

    /// Writes `<dir>/<stem>.json` and `<dir>/<stem>.md`.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        let markdown = self.markdown();
        let mut written = Vec::new();
        for (ext, contents) in [("json", &json), ("md", &markdown)] {
            let path = dir.join(format!("{stem}.{ext}"));
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(out, "# Meshwork benchmark, {}\n", self.started);
        let _ = writeln!(
            out,
            "{} ({} CPUs), Linux {}. Servers pinned to CPU {}, load generator to CPU {}. \
             Release build. Each phase: {:.0} s warm-up, {:.0} s measured. Closed loop: {} \
             concurrent calls ({} for the real services) over {} HTTP/2 connections. Open loop: \
             {} of each configuration's own maximum, latency from each call's scheduled start.\n",
            m.cpu_model,
            m.cpus,
            m.kernel,
            m.server_cpu,
            m.load_cpu,
            s.warmup_s,
            s.duration_s,
            s.concurrency,
            s.real_concurrency,
            s.connections,
            s.load_fractions
                .iter()
                .map(|f| format!("{:.0}%", f * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
        );

        let _ = writeln!(out, "## Goals\n");
        let _ = writeln!(out, "| goal | measured | met |\n|---|---|---|");
        for goal in &self.goals {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                goal.goal,
                goal.measured,
                if goal.met { "yes" } else { "**no**" }
            );
        }

        let _ = writeln!(out, "\n## Maximum throughput (closed loop)\n");
        let _ = writeln!(
            out,
            "| configuration | req/s | vs baseline | p50 | p99 | p99.9 | errors | server CPU | \
             CPU/call | vs baseline | load CPU | 1-at-a-time p50 | RSS idle → peak |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let base = row.baseline.as_deref().and_then(|id| self.row(id));
            let max = &row.max;
            let _ = writeln!(
                out,
                "| {} | {:.0}{} | {} | {} | {} | {} | {} | {:.0}% | {:.1} µs | {} | {:.0}% | {} | {} |",
                label(row),
                max.summary.rps,
                if generator_bound(max) { " ‡" } else { "" },
                ratio(base.map(|b| (max.summary.rps, b.max.summary.rps))),
                micros(max.summary.p50_us),
                micros(max.summary.p99_us),
                micros(max.summary.p999_us),
                errors(&max.summary),
                max.server_cpu_pct,
                max.server_cpu_us_per_call,
                ratio(base.map(|b| (max.server_cpu_us_per_call, b.max.server_cpu_us_per_call))),
                max.load_cpu_pct,
                micros(row.sequential.summary.p50_us),
                memory(&row.processes),
            );
        }

        if self.rows.iter().any(|row| generator_bound(&row.max)) {
            let _ = writeln!(
                out,
                "\n‡ The load generator's CPU was at {GENERATOR_BOUND_PCT:.0}% or more: it, not \
                 the server, was the limit, and the server could serve more. Compare these rows \
                 by server CPU per call."
            );
        }

        let _ = writeln!(out, "\n## Latency at fixed rates (open loop)\n");
        let _ = writeln!(
            out,
            "| configuration | load | req/s | p50 | p99 | p99.9 | errors | server CPU | \
             p50 vs baseline | p99 vs baseline |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let base = row.baseline.as_deref().and_then(|id| self.row(id));
            for phase in &row.rates {
                let base_phase = base.and_then(|b| b.rates.iter().find(|p| p.load == phase.load));
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0}{} | {} | {} | {} | {} | {:.0}% | {} | {} |",
                    label(row),
                    phase.load,
                    phase.summary.offered_rps.unwrap_or(phase.summary.rps),
                    if fell_behind(phase) { " †" } else { "" },
                    micros(phase.summary.p50_us),
                    micros(phase.summary.p99_us),
                    micros(phase.summary.p999_us),
                    errors(&phase.summary),
                    phase.server_cpu_pct,
                    // Against a phase whose generator fell behind, a difference means nothing.
                    delta(
                        base_phase
                            .filter(|b| !fell_behind(b) && !fell_behind(phase))
                            .map(|b| phase.summary.p50_us - b.summary.p50_us)
                    ),
                    delta(
                        base_phase
                            .filter(|b| !fell_behind(b) && !fell_behind(phase))
                            .map(|b| phase.summary.p99_us - b.summary.p99_us)
                    ),
                );
            }
        }

        if self
            .rows
            .iter()
            .flat_map(|row| row.rates.iter())
            .any(fell_behind)
        {
            let _ = writeln!(
                out,
                "\n† The load generator fell behind its schedule (p99 send lateness over \
                 {SEND_LATE_LIMIT_US:.0} µs: its one CPU was the limit at this rate): the \
                 latencies of this row include its own backlog, not only the server's."
            );
        }

        let with_db: Vec<&Row> = self.rows.iter().filter(|row| row.db.is_some()).collect();
        if !with_db.is_empty() {
            let _ = writeln!(
                out,
                "\n## Database time (real services, every call traced)\n"
            );
            let _ = writeln!(
                out,
                "| configuration | traced calls | server time (mean) | database time (mean) | \
                 share | queries per call |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|");
            for row in with_db {
                if let Some(db) = &row.db {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {:.0}% | {:.1} |",
                        label(row),
                        db.traces,
                        micros(db.server_mean_us),
                        micros(db.db_mean_us),
                        db.share * 100.0,
                        db.queries_per_call,
                    );
                }
            }
        }

        let _ = writeln!(out, "\n## Configurations\n");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "- **{}**: {}{}{}",
                row.id,
                row.call,
                row.baseline
                    .as_deref()
                    .map(|b| format!(" (baseline: {b})"))
                    .unwrap_or_default(),
                row.spans_per_call
                    .map(|spans| format!("; {spans:.2} spans exported per call"))
                    .unwrap_or_default(),
            );
        }
        out
    }
}

/// A closed loop whose generator used this much of its CPU was limited by the generator.
const GENERATOR_BOUND_PCT: f64 = 90.0;

/// An open loop that sent calls later than this (p99) did not keep its schedule.
const SEND_LATE_LIMIT_US: f64 = 1_000.0;

pub fn fell_behind(phase: &Phase) -> bool {
    phase
        .summary
        .send_late_p99_us
        .is_some_and(|late| late > SEND_LATE_LIMIT_US)
}

fn generator_bound(phase: &Phase) -> bool {
    phase.load_cpu_pct >= GENERATOR_BOUND_PCT
}

fn label(row: &Row) -> String {
    format!("{} {}", row.id, row.title)
}

/// Microseconds, shown as µs below 10 ms and as ms above.
pub fn micros(us: f64) -> String {
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1_000.0)
    }
}

fn ratio(pair: Option<(f64, f64)>) -> String {
    match pair {
        Some((value, base)) if base > 0.0 => format!("{:.2}×", value / base),
        _ => "–".to_owned(),
    }
}

fn delta(us: Option<f64>) -> String {
    match us {
        Some(us) => format!("{us:+.0} µs"),
        None => "–".to_owned(),
    }
}

fn errors(summary: &Summary) -> String {
    if summary.errors == 0 {
        return "0".to_owned();
    }
    let codes: Vec<String> = summary
        .errors_by_code
        .iter()
        .map(|(code, n)| format!("{n} {code}"))
        .collect();
    codes.join(", ")
}

fn memory(processes: &[ProcessMemory]) -> String {
    processes
        .iter()
        .map(|p| {
            format!(
                "{} {:.1} → {:.1} MiB",
                p.name, p.idle_rss_mib, p.peak_rss_mib
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
