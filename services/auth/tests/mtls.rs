//! Auth on the mesh: it speaks mutual TLS only, admits callers by its policy (by default every
//! mesh identity), reaches users as itself and only a server proving to be users, and answers
//! health probes in plaintext on its admin port and nothing else there.

mod support;

use std::time::Duration;

use anyhow::{bail, ensure};
use mesh::authz::Policy;
use meshwork::auth::v1::{GetJwksRequest, LoginRequest, auth_service_client::AuthServiceClient};
use tonic::{Code, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use support::{AUTH_SERVICE, PASSWORD, READY_TIMEOUT, TestMesh, code};

/// Long enough for a refused handshake to be noticed, short enough to fail fast.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn every_mesh_identity_may_log_in_and_fetch_the_keys() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    for identity in ["users", "billing", "orders", "operator"] {
        let mut auth = mesh.auth_as(identity)?;
        let keys = auth.get_jwks(GetJwksRequest {}).await?.into_inner().keys;
        ensure!(keys.len() == 1, "{identity}: {keys:?}");
        let login = auth
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: PASSWORD.into(),
            })
            .await;
        ensure!(login.is_ok(), "{identity}: {login:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_configured_policy_is_enforced() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(|config| {
        config.authz =
            Policy::from_rules([("meshwork.auth.v1.AuthService/GetJwks", &["billing"][..])]);
    })
    .await?;
    let keys = mesh.auth_as("billing")?.get_jwks(GetJwksRequest {}).await;
    ensure!(keys.is_ok(), "{keys:?}");
    let denied = mesh.auth_as("orders")?.get_jwks(GetJwksRequest {}).await;
    ensure!(code(&denied) == Some(Code::PermissionDenied), "{denied:?}");
    let unlisted = mesh
        .auth_as("billing")?
        .login(LoginRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
        })
        .await;
    ensure!(
        code(&unlisted) == Some(Code::PermissionDenied),
        "{unlisted:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_gets_no_answer() -> anyhow::Result<()> {
    let mesh = TestMesh::start().await?;
    let plaintext = Endpoint::from_shared(format!("http://{}", mesh.running_auth.addr))?
        .connect_timeout(CALL_TIMEOUT)
        .connect_lazy();
    let mut client = AuthServiceClient::new(plaintext);
    let call = client.get_jwks(GetJwksRequest {});
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(keys)) => bail!("a plaintext client was served: {keys:?}"),
        Ok(Err(_)) | Err(_) => Ok(()),
    }
}

#[tokio::test]
async fn registration_refuses_a_users_endpoint_that_is_not_users() -> anyhow::Result<()> {
    // The service at auth's users endpoint presents billing's certificate.
    let mut mesh = TestMesh::start_with_users_as("billing", |_| {}).await?;
    let result = mesh.register("ada@example.com", PASSWORD).await;
    ensure!(code(&result) == Some(Code::Unavailable), "{result:?}");
    ensure!(mesh.user_count().await? == 0, "a user was created");
    Ok(())
}

#[tokio::test]
async fn the_admin_port_answers_health_in_plaintext_and_nothing_else() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(|config| {
        config.admin.listen_addr = "127.0.0.1:0".parse().ok();
    })
    .await?;
    let Some(admin) = mesh.running_auth.admin_addr else {
        bail!("auth has no admin port");
    };
    let channel = Endpoint::from_shared(format!("http://{admin}"))?.connect_lazy();
    let mut health = HealthClient::new(channel.clone());
    let status = tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            let answer = health
                .check(HealthCheckRequest {
                    service: AUTH_SERVICE.into(),
                })
                .await?
                .into_inner();
            if answer.status == ServingStatus::Serving as i32 {
                return anyhow::Ok(answer.status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    ensure!(status == ServingStatus::Serving as i32);

    let keys = AuthServiceClient::new(channel)
        .get_jwks(GetJwksRequest {})
        .await;
    ensure!(code(&keys) == Some(Code::Unimplemented), "{keys:?}");
    Ok(())
}
