//! The billing binary: loads its configuration, starts telemetry, serves until SIGTERM or Ctrl-C.

use billing::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Flushes the last spans when dropped, however main ends.
    let telemetry = mesh::telemetry::init("billing");
    let config: Config = mesh::config::load()?;
    App::build(config)
        .await?
        .run_until_stopped(mesh::shutdown::signal())
        .await?;
    telemetry.shutdown();
    Ok(())
}
