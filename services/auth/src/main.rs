//! The auth binary: configuration from defaults, file and environment, then serve until
//! SIGINT/SIGTERM.

use auth::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Flushes the last spans when dropped, however main ends.
    let telemetry = mesh::telemetry::init("auth");
    let config: Config = mesh::config::load()?;
    App::build(config)
        .await?
        .run_until_stopped(mesh::shutdown::signal())
        .await?;
    telemetry.shutdown();
    Ok(())
}
