//! The auth binary: configuration from defaults, file and environment, then serve until
//! SIGINT/SIGTERM.

use auth::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh::telemetry::init("auth");
    let config: Config = mesh::config::load()?;
    App::build(config)
        .await?
        .run_until_stopped(mesh::shutdown::signal())
        .await?;
    Ok(())
}
