//! Auth's contract as a caller sees it: registering, logging in, refreshing and logging out,
//! the key set that verifies its tokens, and what happens when users or auth's own database
//! fail. The harness (real auth and users over mutual TLS) is in `support`.

mod support;

use anyhow::{bail, ensure};
use auth::{
    BAD_CREDENTIALS,
    tokens::{Claims, VerifyError},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use mesh::testing::TestPki;
use meshwork::auth::v1::{GetJwksRequest, RegisterRequest, auth_service_client::AuthServiceClient};
use tonic::Code;

use support::{
    ACCESS_TTL_SECS, PASSWORD, TestMesh, auth_config, code, start_auth, violated_fields,
};

#[tokio::test]
async fn registered_user_logs_in_with_a_token_that_verifies_against_the_jwks() -> anyhow::Result<()>
{
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("ada@example.com", PASSWORD).await?;
    let (login_user, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    ensure!(
        login_user == user_id,
        "login names {login_user}, not {user_id}"
    );
    ensure!(tokens.token_type == "Bearer");
    ensure!(tokens.expires_in_seconds == ACCESS_TTL_SECS);
    ensure!(!tokens.refresh_token.is_empty());

    let claims = mesh.verifier().await?.verify(&tokens.access_token)?;
    let now = mesh::timestamp::now_millis() / 1000;
    ensure!(claims.sub == user_id, "sub is {}", claims.sub);
    ensure!(
        claims.iss == "meshwork-auth" && claims.aud == "meshwork",
        "{claims:?}"
    );
    ensure!(claims.exp - claims.iat == ACCESS_TTL_SECS, "{claims:?}");
    ensure!(
        (claims.iat - now).abs() <= 5,
        "iat {} is not now ({now})",
        claims.iat
    );
    Ok(())
}

#[tokio::test]
async fn login_finds_the_email_however_it_is_cased() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("  Ada@Example.com ", PASSWORD).await?;
    let (login_user, _) = mesh.login("ADA@example.COM", PASSWORD).await?;
    ensure!(login_user == user_id);
    Ok(())
}

#[tokio::test]
async fn wrong_password_is_unauthenticated() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let result = mesh.login("ada@example.com", "not the password").await;
    ensure!(code(&result) == Some(Code::Unauthenticated), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn unknown_email_is_unauthenticated_with_the_same_message() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let wrong_password = mesh.login("ada@example.com", "not the password").await;
    let unknown = mesh.login("nobody@example.com", PASSWORD).await;
    let (Err(wrong_password), Err(unknown)) = (wrong_password, unknown) else {
        bail!("both logins should fail");
    };
    ensure!(unknown.code() == Code::Unauthenticated, "{unknown:?}");
    ensure!(
        unknown.message() == wrong_password.message(),
        "{unknown:?} / {wrong_password:?}"
    );
    ensure!(unknown.message() == BAD_CREDENTIALS);
    Ok(())
}

#[tokio::test]
async fn duplicate_email_on_register_is_already_exists() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let again = mesh.register(" ADA@example.com", "another password").await;
    ensure!(code(&again) == Some(Code::AlreadyExists), "{again:?}");
    // The first registration's password still works.
    mesh.login("ada@example.com", PASSWORD).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_email_on_register_is_users_own_invalid_argument() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let fields = violated_fields(mesh.register("not an email", PASSWORD).await)?;
    ensure!(fields == ["email"], "{fields:?}");
    Ok(())
}

#[tokio::test]
async fn short_password_is_invalid_argument_and_creates_no_user() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let fields = violated_fields(mesh.register("ada@example.com", "short").await)?;
    ensure!(fields == ["password"], "{fields:?}");
    ensure!(mesh.user_count().await? == 0);
    Ok(())
}

#[tokio::test]
async fn refresh_rotates_and_the_old_token_is_refused() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    let user_id = mesh.register("ada@example.com", PASSWORD).await?;
    let (_, first) = mesh.login("ada@example.com", PASSWORD).await?;

    let second = mesh.refresh(&first.refresh_token).await?;
    ensure!(second.refresh_token != first.refresh_token);
    let claims = mesh.verifier().await?.verify(&second.access_token)?;
    ensure!(claims.sub == user_id);

    let replay = mesh.refresh(&first.refresh_token).await;
    ensure!(code(&replay) == Some(Code::Unauthenticated), "{replay:?}");
    Ok(())
}

#[tokio::test]
async fn reusing_a_rotated_token_revokes_its_whole_family() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, first) = mesh.login("ada@example.com", PASSWORD).await?;
    let (_, other_session) = mesh.login("ada@example.com", PASSWORD).await?;
    let second = mesh.refresh(&first.refresh_token).await?;

    let replay = mesh.refresh(&first.refresh_token).await;
    ensure!(code(&replay) == Some(Code::Unauthenticated), "{replay:?}");
    let newest = mesh.refresh(&second.refresh_token).await;
    ensure!(
        code(&newest) == Some(Code::Unauthenticated),
        "newest token still works: {newest:?}"
    );
    // Another login is another family, untouched.
    mesh.refresh(&other_session.refresh_token).await?;
    Ok(())
}

#[tokio::test]
async fn logout_revokes_the_refresh_token() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    mesh.logout(&tokens.refresh_token).await?;
    let after = mesh.refresh(&tokens.refresh_token).await;
    ensure!(code(&after) == Some(Code::Unauthenticated), "{after:?}");
    Ok(())
}

#[tokio::test]
async fn logout_of_an_unknown_token_is_ok_and_of_an_empty_one_invalid() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.logout("never-issued").await?;
    let fields = violated_fields(mesh.logout("").await)?;
    ensure!(fields == ["refresh_token"], "{fields:?}");
    Ok(())
}

#[tokio::test]
async fn tampered_or_foreign_tokens_fail_verification() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    let verifier = mesh.verifier().await?;
    let genuine: Claims = verifier.verify(&tokens.access_token)?;

    // Same header and signature, another user in the payload.
    let parts: Vec<&str> = tokens.access_token.split('.').collect();
    ensure!(parts.len() == 3, "not a JWS: {}", tokens.access_token);
    let forged = Claims {
        sub: "someone-else".into(),
        ..genuine.clone()
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged)?);
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    ensure!(verifier.verify(&tampered) == Err(VerifyError::InvalidSignature));

    // The same claims under the published kid, signed by a key auth never had.
    let header = jsonwebtoken::decode_header(&tokens.access_token)?;
    let intruder = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let key = jsonwebtoken::EncodingKey::from_ed_der(intruder.to_pkcs8_der()?.as_bytes());
    let foreign = jsonwebtoken::encode(&header, &genuine, &key)?;
    ensure!(verifier.verify(&foreign) == Err(VerifyError::InvalidSignature));
    Ok(())
}

#[tokio::test]
async fn signing_key_survives_a_restart() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    mesh.register("ada@example.com", PASSWORD).await?;
    let (_, tokens) = mesh.login("ada@example.com", PASSWORD).await?;
    let before = mesh.jwks().await?;

    // Users is not needed to serve keys: point the restarted auth at a port nothing serves.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = auth_config(&mesh.pki, &mesh.auth_database, closed)?;
    let restarted = start_auth(&mesh.pki, config).await?;
    let mut again = AuthServiceClient::new(mesh.pki.channel(restarted.addr, "auth")?);
    let after = again.get_jwks(GetJwksRequest {}).await?.into_inner();
    ensure!(after == before, "{after:?} != {before:?}");
    ensure!(before.keys.len() == 1, "{before:?}");
    mesh.verifier().await?.verify(&tokens.access_token)?;
    Ok(())
}

#[tokio::test]
async fn register_while_users_is_down_is_unavailable() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let pki = TestPki::new(data.path())?;
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let database = mesh::store::testing::sqlite(data.path(), "auth");
    let auth = start_auth(&pki, auth_config(&pki, &database, closed)?).await?;
    let result = AuthServiceClient::new(pki.channel(auth.addr, "auth")?)
        .register(RegisterRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            display_name: "Ada".into(),
        })
        .await;
    ensure!(code(&result) == Some(Code::Unavailable), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn user_is_deleted_again_when_credentials_cannot_be_stored() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start().await?;
    // Make auth's own write fail after users has created the user.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&mesh.auth_database.url).await?;
    sqlx::query(
        "CREATE TRIGGER refuse_credentials BEFORE INSERT ON credentials \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&pool)
    .await?;

    let result = mesh.register("ada@example.com", PASSWORD).await;
    ensure!(result.is_err(), "registration succeeded: {result:?}");
    ensure!(mesh.user_count().await? == 0, "the user was left behind");
    Ok(())
}
