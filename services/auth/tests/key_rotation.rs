//! Signing-key rotation as a caller sees it: once the key is older than `tokens.key_rotation`,
//! tokens carry a new `kid`, and tokens signed by the old key still verify against the key set
//! auth publishes. (Retirement of old keys, which takes the lifetime of an access token, is
//! tested with a controlled clock beside the key ring.)

mod support;

use std::time::Duration;

use anyhow::{Context, ensure};

use support::{PASSWORD, TestMesh, kid};

/// The shortest rotation the configuration accepts.
const ROTATION: Duration = Duration::from_secs(1);
/// How long the test waits for a key to be replaced: many rotations.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_due_key_is_replaced_and_tokens_of_the_old_one_still_verify() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_with(|config| config.tokens.key_rotation = ROTATION).await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (user_id, first) = mesh.login("ada@example.com", PASSWORD).await?;
    let first_kid = kid(&first.access_token)?;

    // Each refresh signs a new access token: wait until one carries another kid.
    let mut refresh_token = first.refresh_token.clone();
    let rotated = tokio::time::timeout(ROTATION_TIMEOUT, async {
        loop {
            let pair = mesh.refresh(&refresh_token).await?;
            refresh_token = pair.refresh_token.clone();
            if kid(&pair.access_token)? != first_kid {
                return anyhow::Ok(pair);
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .context("the signing key was never replaced")??;

    let jwks = mesh.jwks().await?;
    let kids: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
    ensure!(kids.contains(&first_kid.as_str()), "old key gone: {kids:?}");
    ensure!(kids.len() >= 2, "{kids:?}");

    let verifier = mesh.verifier().await?;
    ensure!(verifier.verify(&first.access_token)?.sub == user_id);
    ensure!(verifier.verify(&rotated.access_token)?.sub == user_id);
    // A login now signs with a newer key too.
    let (_, later) = mesh.login("ada@example.com", PASSWORD).await?;
    ensure!(kid(&later.access_token)? != first_kid);
    Ok(())
}

#[tokio::test]
async fn without_rotation_due_the_key_set_holds_one_key() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, first) = mesh.login("ada@example.com", PASSWORD).await?;
    let (_, second) = mesh.login("ada@example.com", PASSWORD).await?;
    ensure!(kid(&first.access_token)? == kid(&second.access_token)?);
    ensure!(mesh.jwks().await?.keys.len() == 1);
    Ok(())
}
