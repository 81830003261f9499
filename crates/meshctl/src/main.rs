//! `meshctl`: writes the development certificates (`meshctl certs`), runs the local mesh
//! (`meshctl up`) and walks the user journey (register, login, top up, order, watch, cancel)
//! through the generated Rust client, over mutual TLS as the operator.

mod certs;
mod collector;
mod journey;
mod trace;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Run and call the Meshwork gRPC mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the development CA and certificates (services and operator) where missing.
    Certs(certs::CertsArgs),
    /// Start every service locally (users twice), wait until all are SERVING, stop on Ctrl-C.
    Up(up::UpArgs),
    /// Show the last traces `meshctl up` received, as trees of spans with their durations.
    Trace(trace::TraceArgs),
    #[command(flatten)]
    Journey(journey::JourneyCommand),
}

/// The log filter of the one-shot commands (unless `RUST_LOG` says otherwise).
const QUIET_FILTER: &str = "warn";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `up` reports what it runs; the one-shot commands print their answer and only problems.
    let telemetry = match (&cli.command, std::env::var_os("RUST_LOG")) {
        (Command::Up(_), _) | (_, Some(_)) => mesh::telemetry::init("meshctl"),
        _ => mesh::telemetry::Telemetry::from_env("meshctl")
            .with_filter(QUIET_FILTER)
            .init(),
    };
    let outcome = match cli.command {
        Command::Certs(args) => certs::run(args),
        Command::Up(args) => up::run(args).await,
        Command::Trace(args) => trace::run(args),
        Command::Journey(command) => journey::run(command).await,
    };
    telemetry.shutdown();
    outcome
}
