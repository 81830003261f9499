//! The users service as a caller sees it: the real [`users::App`] started in-process on an
//! ephemeral port with its own SQLite file and a throw-away PKI, called through a generated
//! client over the mesh's mutual-TLS channel (as the operator unless a test says otherwise).
//! Each test asserts what the caller gets back: a status code, the fields a violation names, the
//! users returned.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use anyhow::{Context, bail, ensure};
use mesh::{client::MeshChannel, config::ServerConfig, status::field_violations, testing::TestPki};
use meshwork::users::v1::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest,
    User, user_service_client::UserServiceClient,
};
use prost_types::FieldMask;
use tokio::sync::oneshot;
use tonic::{Code, Status};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use users::{App, Config};

/// The name health reports the users service under.
const SERVICE_NAME: &str = "meshwork.users.v1.UserService";
/// How long a freshly started service may take to report SERVING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running users service and clients connected to it as the operator; dropping it stops
/// the service.
struct TestUsers {
    client: UserServiceClient<MeshChannel>,
    health: HealthClient<MeshChannel>,
    addr: SocketAddr,
    pki: TestPki,
    _stop: oneshot::Sender<()>,
    /// The SQLite file and the certificates.
    _data: tempfile::TempDir,
}

impl TestUsers {
    /// Starts the service on port 0 with a fresh database and waits until it reports SERVING.
    async fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let pki = TestPki::new(data.path())?;
        let config = Config {
            server: ServerConfig {
                listen_addr: "127.0.0.1:0".parse()?,
                ..ServerConfig::default()
            },
            database: mesh::store::testing::sqlite(data.path(), "users"),
            tls: pki.config("users"),
            ..Config::default()
        };
        let app = App::build(config).await?;
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async move {
            // Resolves when the sender is dropped, that is when the test ends.
            let _ = stopped.await;
        }));
        let channel = pki.channel(addr, "users")?;
        let mut health = HealthClient::new(channel.clone());
        wait_until_serving(&mut health).await?;
        Ok(Self {
            client: UserServiceClient::new(channel),
            health,
            addr,
            pki,
            _stop: stop,
            _data: data,
        })
    }

    /// A client presenting the mesh identity of `service` instead of the operator's.
    fn client_as(&self, service: &str) -> anyhow::Result<UserServiceClient<MeshChannel>> {
        Ok(UserServiceClient::new(
            self.pki.channel_as(service, self.addr, "users")?,
        ))
    }

    async fn create(&mut self, email: &str, display_name: &str) -> Result<User, Status> {
        let response = self
            .client
            .create_user(CreateUserRequest {
                email: email.into(),
                display_name: display_name.into(),
            })
            .await?;
        response
            .into_inner()
            .user
            .ok_or_else(|| Status::data_loss("CreateUser answered without a user"))
    }

    async fn get(&mut self, id: &str) -> Result<User, Status> {
        let response = self
            .client
            .get_user(GetUserRequest { id: id.into() })
            .await?;
        response
            .into_inner()
            .user
            .ok_or_else(|| Status::data_loss("GetUser answered without a user"))
    }

    async fn update(&mut self, user: User, paths: &[&str]) -> Result<User, Status> {
        let response = self
            .client
            .update_user(UpdateUserRequest {
                user: Some(user),
                update_mask: Some(mask(paths)),
            })
            .await?;
        response
            .into_inner()
            .user
            .ok_or_else(|| Status::data_loss("UpdateUser answered without a user"))
    }
}

/// Follows the health stream of the users service until it says SERVING, within
/// [`READY_TIMEOUT`].
async fn wait_until_serving(health: &mut HealthClient<MeshChannel>) -> anyhow::Result<()> {
    tokio::time::timeout(READY_TIMEOUT, async {
        let mut updates = health
            .watch(HealthCheckRequest {
                service: SERVICE_NAME.into(),
            })
            .await?
            .into_inner();
        while let Some(update) = updates.message().await? {
            if update.status == ServingStatus::Serving as i32 {
                return Ok(());
            }
        }
        bail!("health stream ended before the service was SERVING")
    })
    .await
    .context("users did not report SERVING in time")?
}

fn mask(paths: &[&str]) -> FieldMask {
    FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    }
}

/// The fields an INVALID_ARGUMENT names, or an error saying what came back instead.
fn violated_fields<T: std::fmt::Debug>(result: Result<T, Status>) -> anyhow::Result<Vec<String>> {
    match result {
        Err(status) if status.code() == Code::InvalidArgument => Ok(field_violations(&status)
            .into_iter()
            .map(|(field, _)| field)
            .collect()),
        other => bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

/// The status code of a call that must fail.
fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> anyhow::Result<Code> {
    match result {
        Err(status) => Ok(status.code()),
        Ok(value) => bail!("expected a failure, got {value:?}"),
    }
}

#[tokio::test]
async fn health_reports_serving_once_the_database_is_up() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    for service in [SERVICE_NAME, ""] {
        let response = users
            .health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        ensure!(
            response.into_inner().status == ServingStatus::Serving as i32,
            "`{service}` is not SERVING"
        );
    }
    Ok(())
}

#[tokio::test]
async fn created_user_has_a_normalised_email_and_times() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let user = users.create("  Ada@Example.COM ", " Ada Lovelace ").await?;
    ensure!(!user.id.is_empty());
    assert_eq!(user.email, "ada@example.com");
    assert_eq!(user.display_name, "Ada Lovelace");
    ensure!(user.create_time.is_some() && user.update_time == user.create_time);
    assert_eq!(users.get(&user.id).await?, user);
    Ok(())
}

#[tokio::test]
async fn invalid_email_is_invalid_argument_naming_email() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let fields = violated_fields(users.create("not-an-email", "Ada").await)?;
    assert_eq!(fields, vec!["email"]);
    Ok(())
}

#[tokio::test]
async fn every_invalid_field_is_reported_at_once() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let fields = violated_fields(users.create("ada@localhost", "   ").await)?;
    assert_eq!(fields, vec!["email", "display_name"]);
    Ok(())
}

#[tokio::test]
async fn duplicate_email_is_already_exists() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    users.create("ada@example.com", "Ada").await?;
    let duplicate = users.create("ada@example.com", "Another Ada").await;
    let status = duplicate.err().context("the duplicate was created")?;
    assert_eq!(status.code(), Code::AlreadyExists);
    ensure!(status.message().contains("ada@example.com"), "{status:?}");
    Ok(())
}

#[tokio::test]
async fn duplicate_email_differing_in_case_and_whitespace_is_already_exists() -> anyhow::Result<()>
{
    let mut users = TestUsers::start().await?;
    users.create("ada@example.com", "Ada").await?;
    let duplicate = users.create("  ADA@Example.com\t", "Another Ada").await;
    assert_eq!(code(duplicate)?, Code::AlreadyExists);
    Ok(())
}

#[tokio::test]
async fn unknown_id_is_not_found_naming_it() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let status = users
        .get("0190a000-0000-7000-8000-000000000000")
        .await
        .err()
        .context("an unknown id was found")?;
    assert_eq!(status.code(), Code::NotFound);
    ensure!(
        status
            .message()
            .contains("0190a000-0000-7000-8000-000000000000"),
        "{status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn empty_id_is_invalid_argument_naming_id() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    assert_eq!(violated_fields(users.get("").await)?, vec!["id"]);
    Ok(())
}

#[tokio::test]
async fn pagination_walks_all_users_without_duplicates_or_gaps() -> anyhow::Result<()> {
    const USERS: usize = 7;
    const PAGE_SIZE: i32 = 3;
    let mut users = TestUsers::start().await?;
    let mut created = Vec::new();
    for n in 0..USERS {
        created.push(
            users
                .create(&format!("user{n}@example.com"), "User")
                .await?
                .id,
        );
    }
    let mut listed = Vec::new();
    let mut page_token = String::new();
    // One more page than needed, so a token that never ends fails instead of looping.
    for _ in 0..=USERS.div_ceil(usize::try_from(PAGE_SIZE)?) {
        let page = users
            .client
            .list_users(ListUsersRequest {
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        ensure!(page.users.len() <= usize::try_from(PAGE_SIZE)?);
        listed.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, created, "not every user once, oldest first");
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), USERS);
    Ok(())
}

#[tokio::test]
async fn foreign_page_token_is_invalid_argument() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let result = users
        .client
        .list_users(ListUsersRequest {
            page_size: 0,
            page_token: "not a token".into(),
        })
        .await;
    assert_eq!(violated_fields(result)?, vec!["page_token"]);
    Ok(())
}

#[tokio::test]
async fn update_with_mask_changes_only_masked_fields() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let request = User {
        email: "someone.else@example.com".into(),
        display_name: "Countess of Lovelace".into(),
        ..ada.clone()
    };
    let updated = users.update(request, &["display_name"]).await?;
    assert_eq!(updated.display_name, "Countess of Lovelace");
    assert_eq!(updated.email, ada.email, "a field outside the mask changed");
    assert_eq!(updated.create_time, ada.create_time);
    let (before, after) = (ada.update_time, updated.update_time);
    let seconds_nanos = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    ensure!(
        seconds_nanos(after) >= seconds_nanos(before),
        "update_time went back"
    );
    assert_eq!(users.get(&ada.id).await?, updated);
    Ok(())
}

#[tokio::test]
async fn update_of_email_normalises_it() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let request = User {
        email: " Countess@Example.com ".into(),
        ..ada.clone()
    };
    let updated = users.update(request, &["email"]).await?;
    assert_eq!(updated.email, "countess@example.com");
    assert_eq!(updated.display_name, ada.display_name);
    Ok(())
}

#[tokio::test]
async fn update_with_unknown_mask_path_is_invalid_argument() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let fields = violated_fields(users.update(ada.clone(), &["display_name", "id"]).await)?;
    assert_eq!(fields, vec!["update_mask.paths"]);
    assert_eq!(
        users.get(&ada.id).await?,
        ada,
        "a rejected update changed the user"
    );
    Ok(())
}

#[tokio::test]
async fn update_without_mask_paths_is_invalid_argument() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let missing = users
        .client
        .update_user(UpdateUserRequest {
            user: Some(ada.clone()),
            update_mask: None,
        })
        .await;
    assert_eq!(violated_fields(missing)?, vec!["update_mask"]);
    let empty = users.update(ada, &[]).await;
    assert_eq!(violated_fields(empty)?, vec!["update_mask.paths"]);
    Ok(())
}

#[tokio::test]
async fn update_checks_masked_values_and_the_id() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let request = User {
        id: String::new(),
        email: "not-an-email".into(),
        display_name: String::new(),
        ..User::default()
    };
    let fields = violated_fields(users.update(request, &["email", "display_name"]).await)?;
    assert_eq!(fields, vec!["user.email", "user.display_name", "user.id"]);
    Ok(())
}

#[tokio::test]
async fn update_to_another_users_email_is_already_exists() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    users.create("ada@example.com", "Ada").await?;
    let bob = users.create("bob@example.com", "Bob").await?;
    let request = User {
        email: "ADA@example.com".into(),
        ..bob.clone()
    };
    assert_eq!(
        code(users.update(request, &["email"]).await)?,
        Code::AlreadyExists
    );
    assert_eq!(users.get(&bob.id).await?.email, "bob@example.com");
    Ok(())
}

#[tokio::test]
async fn update_of_unknown_id_is_not_found() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let request = User {
        id: "no-such-user".into(),
        display_name: "Nobody".into(),
        ..User::default()
    };
    assert_eq!(
        code(users.update(request, &["display_name"]).await)?,
        Code::NotFound
    );
    Ok(())
}

#[tokio::test]
async fn delete_then_get_is_not_found() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    users
        .client
        .delete_user(DeleteUserRequest { id: ada.id.clone() })
        .await?;
    assert_eq!(code(users.get(&ada.id).await)?, Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn delete_of_unknown_id_is_not_found() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let result = users
        .client
        .delete_user(DeleteUserRequest {
            id: "no-such-user".into(),
        })
        .await;
    assert_eq!(code(result)?, Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn deleted_email_can_be_used_again() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    users
        .client
        .delete_user(DeleteUserRequest { id: ada.id })
        .await?;
    users.create("ada@example.com", "Ada again").await?;
    Ok(())
}

#[tokio::test]
async fn auth_creates_users_and_orders_reads_them() -> anyhow::Result<()> {
    let users = TestUsers::start().await?;
    let created = users
        .client_as("auth")?
        .create_user(CreateUserRequest {
            email: "ada@example.com".into(),
            display_name: "Ada".into(),
        })
        .await?
        .into_inner()
        .user
        .context("CreateUser answered without a user")?;
    let read = users
        .client_as("orders")?
        .get_user(GetUserRequest {
            id: created.id.clone(),
        })
        .await?
        .into_inner()
        .user;
    assert_eq!(read, Some(created));
    Ok(())
}

#[tokio::test]
async fn the_operator_may_list_users() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    users.create("ada@example.com", "Ada").await?;
    let page = users
        .client
        .list_users(ListUsersRequest::default())
        .await?
        .into_inner();
    assert_eq!(page.users.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_service_outside_the_policy_is_permission_denied() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let create = users
        .client_as("billing")?
        .create_user(CreateUserRequest {
            email: "ada@example.com".into(),
            display_name: "Ada".into(),
        })
        .await;
    assert_eq!(code(create)?, Code::PermissionDenied);
    let list = users
        .client_as("orders")?
        .list_users(ListUsersRequest::default())
        .await;
    assert_eq!(code(list)?, Code::PermissionDenied);
    let listed = users
        .client
        .list_users(ListUsersRequest::default())
        .await?
        .into_inner();
    ensure!(
        listed.users.is_empty(),
        "a denied CreateUser created a user"
    );
    Ok(())
}

/// UpdateUser admits the operator and end users; `orders` is neither, and without an access
/// token it cannot act for a user.
#[tokio::test]
async fn update_as_orders_without_a_token_is_refused() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let renamed = User {
        display_name: "Not Ada".into(),
        ..ada.clone()
    };
    let update = users
        .client_as("orders")?
        .update_user(UpdateUserRequest {
            user: Some(renamed),
            update_mask: Some(mask(&["display_name"])),
        })
        .await;
    assert_eq!(code(update)?, Code::Unauthenticated);
    assert_eq!(
        users.get(&ada.id).await?,
        ada,
        "a refused update changed the user"
    );
    Ok(())
}

/// GetUser admits end users, so a service that is not listed for it (`billing`) is asked for
/// the token of the user it acts for.
#[tokio::test]
async fn a_call_needing_a_user_token_without_one_is_unauthenticated() -> anyhow::Result<()> {
    let mut users = TestUsers::start().await?;
    let ada = users.create("ada@example.com", "Ada").await?;
    let status = users
        .client_as("billing")?
        .get_user(GetUserRequest { id: ada.id })
        .await
        .err()
        .context("billing read a user without a token")?;
    assert_eq!(status.code(), Code::Unauthenticated);
    ensure!(status.message().contains("Bearer"), "{status:?}");
    Ok(())
}
