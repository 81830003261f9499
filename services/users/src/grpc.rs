//! The `meshwork.users.v1.UserService` handlers, kept thin: decode a request into domain values
//! (collecting every field violation into one INVALID_ARGUMENT), check that an end user touches
//! only their own profile, call the store, encode the answer. No SQL and no status-code
//! decisions beyond invalid input live here; who may call which method at all is the mesh's
//! authorization layer's business (see `config::default_policy`).

use mesh::{authz::require_owner, pagination::Page, status::FieldViolations, timestamp};
use meshwork::users::v1::{
    self as pb, CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse,
    GetUserRequest, GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest,
    UpdateUserResponse, user_service_server::UserService,
};
use prost_types::FieldMask;
use tonic::{Request, Response, Status};

use crate::{
    domain::{DisplayName, Email, NewUser, User, UserChanges, UserField, UserId},
    store::UserStore,
};

/// The gRPC face of the users service.
#[derive(Debug, Clone)]
pub struct UserGrpc {
    store: UserStore,
}

impl UserGrpc {
    pub fn new(store: UserStore) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl UserService for UserGrpc {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let new = decode_create(request.get_ref())?;
        let user = self.store.create(&new, timestamp::now_millis()).await?;
        Ok(Response::new(CreateUserResponse {
            user: Some(encode(user)),
        }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = decode_id("id", &request.get_ref().id)?;
        require_owner(&request, id.as_str())?;
        let user = self.store.get(&id).await?;
        Ok(Response::new(GetUserResponse {
            user: Some(encode(user)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let request = request.get_ref();
        let mut violations = FieldViolations::new();
        let page = Page::parse(request.page_size, &request.page_token, &mut violations);
        violations.into_result()?;
        let (users, next_page_token) = self.store.list(&page).await?;
        Ok(Response::new(ListUsersResponse {
            users: users.into_iter().map(encode).collect(),
            next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        let (id, changes) = decode_update(request.get_ref())?;
        require_owner(&request, id.as_str())?;
        let user = self
            .store
            .update(&id, &changes, timestamp::now_millis())
            .await?;
        Ok(Response::new(UpdateUserResponse {
            user: Some(encode(user)),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        let id = decode_id("id", &request.get_ref().id)?;
        require_owner(&request, id.as_str())?;
        self.store.delete(&id).await?;
        Ok(Response::new(DeleteUserResponse {}))
    }
}

fn decode_create(request: &CreateUserRequest) -> Result<NewUser, Status> {
    let mut violations = FieldViolations::new();
    let email = violations.check("email", Email::parse(&request.email));
    let display_name = violations.check("display_name", DisplayName::parse(&request.display_name));
    match (email, display_name) {
        (Some(email), Some(display_name)) => Ok(NewUser {
            email,
            display_name,
        }),
        _ => Err(violations.into_status()),
    }
}

fn decode_id(field: &str, raw: &str) -> Result<UserId, Status> {
    UserId::parse(raw).map_err(|error| mesh::status::invalid_argument(field, error.to_string()))
}

/// The user to change and the changes, as the mask names them; values outside the mask are
/// ignored, as field-mask semantics require.
fn decode_update(request: &UpdateUserRequest) -> Result<(UserId, UserChanges), Status> {
    let mut violations = FieldViolations::new();
    let fields = decode_mask(request.update_mask.as_ref(), &mut violations);
    let mut changes = UserChanges::default();
    let id = match &request.user {
        None => {
            violations.add("user", "is required");
            None
        }
        Some(user) => {
            for field in fields {
                match field {
                    UserField::Email => {
                        changes.email = violations.check("user.email", Email::parse(&user.email));
                    }
                    UserField::DisplayName => {
                        changes.display_name = violations
                            .check("user.display_name", DisplayName::parse(&user.display_name));
                    }
                }
            }
            violations.check("user.id", UserId::parse(&user.id))
        }
    };
    match id {
        Some(id) if violations.is_empty() => Ok((id, changes)),
        _ => Err(violations.into_status()),
    }
}

/// The distinct fields `mask` names; a missing or empty mask, or a path that names no
/// changeable field, is a violation.
fn decode_mask(mask: Option<&FieldMask>, violations: &mut FieldViolations) -> Vec<UserField> {
    let Some(mask) = mask else {
        violations.add(
            "update_mask",
            format!(
                "is required; it names the fields to change ({})",
                UserField::PATHS
            ),
        );
        return Vec::new();
    };
    if mask.paths.is_empty() {
        violations.add(
            "update_mask.paths",
            format!("must name at least one of: {}", UserField::PATHS),
        );
    }
    let mut fields = Vec::new();
    for path in &mask.paths {
        match UserField::from_path(path) {
            Some(field) if fields.contains(&field) => {}
            Some(field) => fields.push(field),
            None => violations.add(
                "update_mask.paths",
                format!("`{path}` cannot be updated; allowed: {}", UserField::PATHS),
            ),
        }
    }
    fields
}

fn encode(user: User) -> pb::User {
    pb::User {
        id: user.id,
        email: user.email,
        display_name: user.display_name,
        create_time: Some(timestamp::from_millis(user.create_time)),
        update_time: Some(timestamp::from_millis(user.update_time)),
    }
}

#[cfg(test)]
mod tests {
    use mesh::{authz::Caller, identity::SpiffeId};
    use tonic::Code;

    use super::*;
    use crate::store::MIGRATOR;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The handlers over a fresh SQLite file in `dir`.
    async fn handlers(dir: &tempfile::TempDir) -> Result<UserGrpc, Box<dyn std::error::Error>> {
        let database = mesh::store::testing::sqlite(dir.path(), "users");
        let pool = mesh::store::open(&database, &MIGRATOR).await?;
        Ok(UserGrpc::new(UserStore::new(pool)))
    }

    /// `message` as the authorization layer passes it on for end user `user_id`.
    fn as_user<T>(user_id: &str, message: T) -> Result<Request<T>, Box<dyn std::error::Error>> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller::User {
            user_id: user_id.to_owned(),
            via: SpiffeId::new("meshwork.local", "default", "operator")?,
        });
        Ok(request)
    }

    async fn create(users: &UserGrpc, email: &str) -> Result<pb::User, Box<dyn std::error::Error>> {
        let request = Request::new(CreateUserRequest {
            email: email.to_owned(),
            display_name: "Someone".to_owned(),
        });
        let user = users.create_user(request).await?.into_inner().user;
        user.ok_or_else(|| "CreateUser answered without a user".into())
    }

    fn code<T>(result: Result<T, Status>) -> Option<Code> {
        result.err().map(|status| status.code())
    }

    #[tokio::test]
    async fn an_end_user_reads_changes_and_deletes_only_their_own_profile() -> TestResult {
        let dir = tempfile::tempdir()?;
        let users = handlers(&dir).await?;
        let ada = create(&users, "ada@example.com").await?;
        let bob = create(&users, "bob@example.com").await?;

        let own = users
            .get_user(as_user(&ada.id, GetUserRequest { id: ada.id.clone() })?)
            .await?;
        assert_eq!(own.into_inner().user.as_ref(), Some(&ada));
        let other = users
            .get_user(as_user(&ada.id, GetUserRequest { id: bob.id.clone() })?)
            .await;
        assert_eq!(code(other), Some(Code::PermissionDenied));

        let renamed = pb::User {
            display_name: "Not Bob".to_owned(),
            ..bob.clone()
        };
        let update = UpdateUserRequest {
            user: Some(renamed),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".to_owned()],
            }),
        };
        let update = users.update_user(as_user(&ada.id, update)?).await;
        assert_eq!(code(update), Some(Code::PermissionDenied));
        let delete = DeleteUserRequest { id: bob.id.clone() };
        let delete = users.delete_user(as_user(&ada.id, delete)?).await;
        assert_eq!(code(delete), Some(Code::PermissionDenied));

        let untouched = users
            .get_user(Request::new(GetUserRequest { id: bob.id.clone() }))
            .await?;
        assert_eq!(untouched.into_inner().user, Some(bob));
        Ok(())
    }
}
