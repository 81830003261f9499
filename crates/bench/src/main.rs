//! `meshwork-bench`: what the mesh costs per hop, measured against bare tonic in the same run,
//! and what the real services cost on SQLite and PostgreSQL (`make bench`).
//!
//! `meshwork-bench run` starts each configuration as separate server processes pinned to one
//! CPU, drives it from this process pinned to the other (closed loop for the maximum, open loop
//! at 25/50/75% of it for latency, one call at a time for the round trip), reads the servers'
//! CPU and memory from `/proc`, and writes `bench/results/<date>.{md,json}`:
//!
//! 1. `1-bare`: bare tonic, plaintext: the baseline;
//! 2. `2-bare-mtls`: bare tonic over rustls mutual TLS: what TLS alone costs;
//! 3. `3-mesh` / `3t-mesh-traced`: the full mesh server stack, tracing at the chart's sampler
//!    (10%) and at 100%;
//! 4. `4-hop-bare`: a front calling the handler on two replicas through a bare tonic `Channel`;
//! 5. `5-hop-mesh`: the same hop through the mesh client stack;
//! 6. `6-users-get-*`: users.GetUser on the real service, from SQLite / PostgreSQL;
//! 7. `7-create-order-*`: orders.CreateOrder end to end on the real services, and how much of
//!    each call is database time (from a second, fully traced run).
//!
//! The other subcommands are its parts: `serve` runs one synthetic server, `pinned` runs a
//! program pinned to a CPU (how the real service binaries are started).

mod affinity;
mod collector;
mod directory;
mod load;
mod procs;
mod procstat;
mod real;
mod report;
mod run;
mod synthetic;
mod targets;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshwork-bench",
    about = "What the mesh costs per hop, against bare tonic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure every configuration and write the report.
    Run(run::RunArgs),
    /// Serve one synthetic configuration until SIGTERM (started by `run`).
    Serve(synthetic::ServeArgs),
    /// Render a report's JSON (written by `run`) as Markdown again, beside it.
    Render { json: PathBuf },
    /// Run a program pinned to one CPU (how `run` starts the service binaries).
    Pinned {
        #[arg(long)]
        cpu: usize,
        program: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Run(args) => bench(args),
        Command::Serve(args) => synthetic::serve(args),
        Command::Render { json } => render(&json),
        Command::Pinned { cpu, program, args } => affinity::exec_pinned(cpu, &program, &args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meshwork-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `<json without .json>.md` from a report's JSON.
fn render(json: &std::path::Path) -> anyhow::Result<()> {
    let report = report::Report::read(json)?;
    let markdown = json.with_extension("md");
    std::fs::write(&markdown, report.markdown())
        .with_context(|| format!("writing {}", markdown.display()))?;
    println!("wrote {}", markdown.display());
    Ok(())
}

/// Pins this process to the load CPU (the servers get the first allowed CPU, the load the
/// second), runs everything on one runtime thread, and writes the report.
fn bench(args: run::RunArgs) -> anyhow::Result<()> {
    let cpus = affinity::allowed()?;
    let server_cpu = *cpus.first().context("no CPU is allowed")?;
    let load_cpu = cpus.get(1).copied().unwrap_or(server_cpu);
    if load_cpu == server_cpu {
        eprintln!("meshwork-bench: only one CPU: servers and load share it");
    }
    affinity::pin_self(load_cpu)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let out = args.out.clone();
    let report = runtime.block_on(run::run(args, server_cpu, load_cpu))?;
    let stem = report
        .started
        .get(..16)
        .unwrap_or(&report.started)
        .replace(':', "");
    println!("\n{}", report.markdown());
    for path in report.write(&out, &stem)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
