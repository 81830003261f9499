//! The billing binary: loads its configuration, starts telemetry, serves until SIGTERM or Ctrl-C.

use billing::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh::telemetry::init("billing");
    let config: Config = mesh::config::load()?;
    App::build(config)
        .await?
        .run_until_stopped(mesh::shutdown::signal())
        .await?;
    Ok(())
}
