//! The handler every synthetic configuration serves: an in-memory user directory answering the
//! users contract (GetUser is what the load calls). Lookups take a read lock on a map of a few
//! thousand users, so the handler costs a few microseconds, like a cache hit: what is measured
//! around it is the stack.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use meshwork::users::v1::{
    CreateUserRequest, CreateUserResponse, DeleteUserRequest, DeleteUserResponse, GetUserRequest,
    GetUserResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, UpdateUserResponse,
    User, user_service_client::UserServiceClient, user_service_server::UserService,
};
use tonic::{Request, Response, Status};

/// How many users the directory starts with: `user-0` .. `user-{N-1}`.
pub const SEEDED_USERS: usize = 4096;
/// The most users one ListUsers page returns.
const MAX_PAGE: usize = 100;

/// The id of the `i`th seeded user (the load asks for them in turn).
pub fn user_id(i: u64) -> String {
    format!("user-{}", i % SEEDED_USERS as u64)
}

/// Users by id, shared by the handler's clones.
#[derive(Clone)]
pub struct Directory {
    users: Arc<RwLock<BTreeMap<String, User>>>,
}

impl Directory {
    /// A directory holding [`SEEDED_USERS`] users.
    pub fn seeded() -> Self {
        let now = prost_types::Timestamp {
            seconds: 1_764_806_400,
            nanos: 0,
        };
        let users = (0..SEEDED_USERS as u64)
            .map(|i| {
                let id = user_id(i);
                let user = User {
                    email: format!("{id}@bench.example"),
                    display_name: format!("Bench User {i}"),
                    id: id.clone(),
                    create_time: Some(now),
                    update_time: Some(now),
                };
                (id, user)
            })
            .collect();
        Self {
            users: Arc::new(RwLock::new(users)),
        }
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, BTreeMap<String, User>>, Status> {
        self.users
            .read()
            .map_err(|_| Status::internal("the user directory's lock is poisoned"))
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, BTreeMap<String, User>>, Status> {
        self.users
            .write()
            .map_err(|_| Status::internal("the user directory's lock is poisoned"))
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    let value = value.trim();
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

#[tonic::async_trait]
impl UserService for Directory {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let request = request.into_inner();
        let email = required("email", &request.email)?.to_lowercase();
        let display_name = required("display_name", &request.display_name)?.to_owned();
        let mut users = self.write()?;
        if users.values().any(|user| user.email == email) {
            return Err(Status::already_exists(format!("email {email} is taken")));
        }
        let user = User {
            id: uuid::Uuid::now_v7().to_string(),
            email,
            display_name,
            create_time: Some(std::time::SystemTime::now().into()),
            update_time: None,
        };
        users.insert(user.id.clone(), user.clone());
        Ok(Response::new(CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let id = required("id", &request.get_ref().id)?;
        let user = self
            .read()?
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no user with id {id}")))?;
        Ok(Response::new(GetUserResponse { user: Some(user) }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let request = request.into_inner();
        let page_size = match usize::try_from(request.page_size) {
            Ok(0) => MAX_PAGE,
            Ok(size) => size.min(MAX_PAGE),
            Err(_) => return Err(Status::invalid_argument("page_size must not be negative")),
        };
        let users = self.read()?;
        let page: Vec<User> = users
            .range::<String, _>((
                std::ops::Bound::Excluded(&request.page_token),
                std::ops::Bound::Unbounded,
            ))
            .take(page_size.saturating_add(1))
            .map(|(_, user)| user.clone())
            .collect();
        let (page, next_page_token) = if page.len() > page_size {
            let page = page[..page_size].to_vec();
            let last = page.last().map(|user| user.id.clone()).unwrap_or_default();
            (page, last)
        } else {
            (page, String::new())
        };
        Ok(Response::new(ListUsersResponse {
            users: page,
            next_page_token,
        }))
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        let request = request.into_inner();
        let changes = request
            .user
            .ok_or_else(|| Status::invalid_argument("user is required"))?;
        let id = required("user.id", &changes.id)?.to_owned();
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let mut users = self.write()?;
        let user = users
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("no user with id {id}")))?;
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    user.display_name =
                        required("user.display_name", &changes.display_name)?.to_owned();
                }
                other => {
                    return Err(Status::invalid_argument(format!(
                        "update_mask: {other} cannot be updated"
                    )));
                }
            }
        }
        user.update_time = Some(std::time::SystemTime::now().into());
        Ok(Response::new(UpdateUserResponse {
            user: Some(user.clone()),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        let id = required("id", &request.get_ref().id)?;
        self.write()?
            .remove(id)
            .ok_or_else(|| Status::not_found(format!("no user with id {id}")))?;
        Ok(Response::new(DeleteUserResponse {}))
    }
}

/// A front server: serves the users contract by calling the directory one hop away, through
/// whichever channel it is given (bare tonic, or the mesh client stack).
#[derive(Clone)]
pub struct Front<C> {
    downstream: UserServiceClient<C>,
}

impl<C> Front<C> {
    pub fn new(downstream: UserServiceClient<C>) -> Self {
        Self { downstream }
    }
}

#[tonic::async_trait]
impl<C> UserService for Front<C>
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + Sync + 'static,
    C::Future: Send,
    C::ResponseBody: tonic::transport::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::transport::Body>::Error: Into<tonic::codegen::StdError> + Send,
    C::Error: Into<tonic::codegen::StdError>,
{
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        self.downstream
            .clone()
            .create_user(request.into_inner())
            .await
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        self.downstream.clone().get_user(request.into_inner()).await
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.downstream
            .clone()
            .list_users(request.into_inner())
            .await
    }

    async fn update_user(
        &self,
        request: Request<UpdateUserRequest>,
    ) -> Result<Response<UpdateUserResponse>, Status> {
        self.downstream
            .clone()
            .update_user(request.into_inner())
            .await
    }

    async fn delete_user(
        &self,
        request: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        self.downstream
            .clone()
            .delete_user(request.into_inner())
            .await
    }
}
