//! Login throttling as a caller sees it: beyond the configured attempts per account, or per
//! caller, logins are refused with RESOURCE_EXHAUSTED and a retry delay, before any password is
//! looked at; other accounts and other callers are still served.

mod support;

use std::num::NonZeroU32;

use anyhow::{Context, ensure};
use auth::TOO_MANY_ATTEMPTS;
use tonic::Code;
use tonic_types::StatusExt;

use support::{PASSWORD, TestMesh, code};

/// The small limit the tests configure, so that a flood is a handful of calls.
const LIMIT: u32 = 3;
/// A limit the tests never reach.
const GENEROUS: u32 = 1000;

fn per_minute(n: u32) -> anyhow::Result<NonZeroU32> {
    NonZeroU32::new(n).context("a limit must not be zero")
}

#[tokio::test]
async fn a_flood_of_wrong_passwords_on_one_account_is_throttled_and_others_are_served()
-> anyhow::Result<()> {
    let account = per_minute(LIMIT)?;
    let peer = per_minute(GENEROUS)?;
    let mut mesh = TestMesh::start_with(|config| {
        config.login_limits.per_account_per_minute = account;
        config.login_limits.per_peer_per_minute = peer;
    })
    .await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    mesh.register("bob@example.com", PASSWORD).await?;

    for attempt in 0..LIMIT {
        let wrong = mesh.login("ada@example.com", "not the password").await;
        ensure!(
            code(&wrong) == Some(Code::Unauthenticated),
            "attempt {attempt}: {wrong:?}"
        );
    }
    let throttled = mesh.login("ada@example.com", "not the password").await;
    let Err(status) = throttled else {
        anyhow::bail!("attempt {LIMIT} was served");
    };
    ensure!(status.code() == Code::ResourceExhausted, "{status:?}");
    ensure!(
        status.message().starts_with(TOO_MANY_ATTEMPTS),
        "{status:?}"
    );
    let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
    ensure!(
        delay.is_some_and(|d| !d.is_zero()),
        "no retry delay: {status:?}"
    );

    // Refused before the password is looked at: the right one does not get through either,
    // and the same account written differently is the same account.
    let right = mesh.login(" ADA@example.com", PASSWORD).await;
    ensure!(code(&right) == Some(Code::ResourceExhausted), "{right:?}");

    mesh.login("bob@example.com", PASSWORD).await?;
    Ok(())
}

#[tokio::test]
async fn a_flood_from_one_caller_is_throttled_across_accounts() -> anyhow::Result<()> {
    let account = per_minute(GENEROUS)?;
    let peer = per_minute(LIMIT)?;
    let mut mesh = TestMesh::start_with(|config| {
        config.login_limits.per_account_per_minute = account;
        config.login_limits.per_peer_per_minute = peer;
    })
    .await?;
    for n in 0..LIMIT {
        let unknown = mesh
            .login(&format!("nobody{n}@example.com"), PASSWORD)
            .await;
        ensure!(code(&unknown) == Some(Code::Unauthenticated), "{unknown:?}");
    }
    let throttled = mesh.login("somebody@example.com", PASSWORD).await;
    ensure!(
        code(&throttled) == Some(Code::ResourceExhausted),
        "{throttled:?}"
    );
    Ok(())
}

#[tokio::test]
async fn invalid_logins_are_refused_as_invalid_whatever_the_limits() -> anyhow::Result<()> {
    let account = per_minute(1)?;
    let mut mesh = TestMesh::start_with(|config| {
        config.login_limits.per_account_per_minute = account;
    })
    .await?;
    for _ in 0..2 {
        let empty = mesh.login("ada@example.com", "").await;
        ensure!(code(&empty) == Some(Code::InvalidArgument), "{empty:?}");
    }
    // The malformed attempts used none of the account's one attempt.
    let wrong = mesh.login("ada@example.com", "not the password").await;
    ensure!(code(&wrong) == Some(Code::Unauthenticated), "{wrong:?}");
    Ok(())
}
