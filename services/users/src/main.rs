//! The users service binary: load the configuration, start telemetry, serve until SIGTERM or
//! Ctrl-C.

use users::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Flushes the last spans when dropped, however main ends.
    let telemetry = mesh::telemetry::init("users");
    let config: Config = mesh::config::load()?;
    App::build(config)
        .await?
        .run_until_stopped(mesh::shutdown::signal())
        .await?;
    telemetry.shutdown();
    Ok(())
}
