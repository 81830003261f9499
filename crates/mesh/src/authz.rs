//! Per-method authorization by caller identity: the server-side layer between the TLS peer and
//! the handlers. A [`Policy`] (one per service, in its configuration) maps each method — or every
//! method of a service, with `/*` — to who may call it:
//!
//! - a service name (`orders`): the mesh identity `spiffe://<trust-domain>/ns/*/sa/orders`;
//! - `*`: any identity of the mesh;
//! - `user`: an end user, proved by `authorization: Bearer <access token>` (verified by the
//!   configured [`TokenVerifier`]); handlers then restrict the call to that user's own data
//!   with [`Caller::require_owner`].
//!
//! A token always narrows: when a method admits users and the call carries a token, the call is
//! made as that user even if the peer itself would be admitted (so `meshctl --token` acts as the
//! user, not as the operator whose certificate it presents).
//!
//! Anything else is PERMISSION_DENIED (UNAUTHENTICATED for a bad token), logged with the
//! caller's identity and the method. Health and reflection are open to every mesh identity.
//! The decided [`Caller`] is put into the request's extensions for the handlers.

use std::{
    collections::BTreeMap,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{Request, Response};
use serde::{Deserialize, Serialize};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::identity::{PeerInfo, SpiffeId};

/// Policy entry admitting any mesh identity.
pub const ANY_SERVICE: &str = "*";
/// Policy entry admitting end users with a valid access token.
pub const END_USER: &str = "user";
/// Methods every mesh identity may call, whatever the policy says.
const ALWAYS_OPEN: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Method (`package.Service/Method` or `package.Service/*`) -> who may call it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Policy(pub BTreeMap<String, Vec<String>>);

impl Policy {
    /// Builds a policy from `(method, callers)` pairs.
    pub fn from_rules<'a>(rules: impl IntoIterator<Item = (&'a str, &'a [&'a str])>) -> Self {
        Self(
            rules
                .into_iter()
                .map(|(method, callers)| {
                    (
                        method.to_owned(),
                        callers.iter().map(|c| (*c).to_owned()).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Who may call `path` (`/package.Service/Method`): the exact rule, else the service's `/*`.
    fn callers(&self, path: &str) -> Option<&[String]> {
        let method = path.trim_start_matches('/');
        let service = method.split_once('/').map(|(s, _)| s).unwrap_or(method);
        self.0
            .get(method)
            .or_else(|| self.0.get(&format!("{service}/*")))
            .map(Vec::as_slice)
    }

    pub fn validate(&self, prefix: &str) -> Result<(), crate::config::ConfigError> {
        for (method, callers) in &self.0 {
            let well_formed = method
                .split_once('/')
                .is_some_and(|(service, name)| service.contains('.') && !name.is_empty());
            if !well_formed {
                return Err(crate::config::ConfigError::invalid(
                    format!("{prefix}.\"{method}\""),
                    "must be package.Service/Method or package.Service/*",
                ));
            }
            if callers.iter().any(String::is_empty) {
                return Err(crate::config::ConfigError::invalid(
                    format!("{prefix}.\"{method}\""),
                    "caller names must not be empty",
                ));
            }
        }
        Ok(())
    }
}

/// Every `package.Service/Method` of `service` (e.g. `meshwork.users.v1.UserService`) in the
/// contracts: what a service's default policy must cover, rule for rule.
pub fn methods_of(service: &str) -> Result<std::collections::BTreeSet<String>, prost::DecodeError> {
    use prost::Message;
    let files = prost_types::FileDescriptorSet::decode(meshwork::FILE_DESCRIPTOR_SET)?;
    Ok(files
        .file
        .iter()
        .flat_map(|file| {
            file.service
                .iter()
                .filter(move |s| format!("{}.{}", file.package(), s.name()) == service)
        })
        .flat_map(|s| s.method.iter())
        .map(|method| format!("{service}/{}", method.name()))
        .collect())
}

/// Who the handler is serving, as decided by the authorization layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A mesh service (or the operator) that the policy admits for this method.
    Service(SpiffeId),
    /// An end user with a verified access token, calling through `via`.
    User { user_id: String, via: SpiffeId },
}

impl Caller {
    /// The caller of `request`, once the authorization layer has run.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }

    /// Allows services; allows an end user only for data owned by `owner_user_id`.
    pub fn require_owner(&self, owner_user_id: &str) -> Result<(), Status> {
        match self {
            Caller::Service(_) => Ok(()),
            Caller::User { user_id, .. } if user_id == owner_user_id => Ok(()),
            Caller::User { user_id, .. } => {
                tracing::warn!(%user_id, "user denied access to another user's data");
                Err(Status::permission_denied("this belongs to another user"))
            }
        }
    }
}

/// For handlers: `Ok` for services, and for the end user who owns `owner_user_id`.
/// Without the layer in front (no caller recorded), nothing is restricted.
pub fn require_owner<T>(request: &tonic::Request<T>, owner_user_id: &str) -> Result<(), Status> {
    Caller::of(request).map_or(Ok(()), |caller| caller.require_owner(owner_user_id))
}

/// Verifies end-user access tokens; returns the user id (`sub`).
pub trait TokenVerifier: Send + Sync + 'static {
    fn verify(&self, token: &str) -> BoxFuture<'_, Result<String, Status>>;
}

/// The authorization layer: see the module documentation.
#[derive(Clone)]
pub struct AuthzLayer {
    policy: Arc<Policy>,
    verifier: Option<Arc<dyn TokenVerifier>>,
}

impl AuthzLayer {
    pub fn new(policy: Policy, verifier: Option<Arc<dyn TokenVerifier>>) -> Self {
        Self {
            policy: Arc::new(policy),
            verifier,
        }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policy: self.policy.clone(),
            verifier: self.verifier.clone(),
        }
    }
}

/// See [`AuthzLayer`].
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    policy: Arc<Policy>,
    verifier: Option<Arc<dyn TokenVerifier>>,
}

/// What the policy says about one request, before the token (if any) is verified.
enum Decision {
    Service(SpiffeId),
    NeedsUserToken(SpiffeId),
    Denied(Option<SpiffeId>),
}

fn decide(policy: &Policy, path: &str, peer: Option<SpiffeId>, has_token: bool) -> Decision {
    let Some(peer) = peer else {
        return Decision::Denied(None);
    };
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if ALWAYS_OPEN.contains(&service) {
        return Decision::Service(peer);
    }
    let Some(callers) = policy.callers(path) else {
        return Decision::Denied(Some(peer));
    };
    let admits_peer = callers
        .iter()
        .any(|c| c == ANY_SERVICE || c == peer.service());
    let admits_users = callers.iter().any(|c| c == END_USER);
    match (admits_users && has_token, admits_peer, admits_users) {
        (true, _, _) => Decision::NeedsUserToken(peer),
        (false, true, _) => Decision::Service(peer),
        (false, false, true) => Decision::NeedsUserToken(peer),
        (false, false, false) => Decision::Denied(Some(peer)),
    }
}

fn bearer_token<B>(request: &Request<B>) -> Option<String> {
    let value = request
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

impl<S, B> Service<Request<B>> for Authz<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.identity.clone());
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let token = bearer_token(&request);
        match decide(&self.policy, &path, peer, token.is_some()) {
            Decision::Service(peer) => {
                request.extensions_mut().insert(Caller::Service(peer));
                Box::pin(inner.call(request))
            }
            Decision::Denied(peer) => {
                let caller = peer.map_or_else(|| "<no identity>".to_owned(), |p| p.to_string());
                tracing::warn!(%caller, method = %path, "permission denied");
                let status = Status::permission_denied(format!("{caller} may not call {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
            Decision::NeedsUserToken(peer) => {
                let verifier = self.verifier.clone();
                Box::pin(async move {
                    let verified = match (token, verifier) {
                        (None, _) => Err(Status::unauthenticated(format!(
                            "{path} needs `authorization: Bearer <access token>`"
                        ))),
                        (Some(_), None) => Err(Status::unauthenticated(
                            "this service cannot verify user tokens",
                        )),
                        (Some(token), Some(verifier)) => verifier.verify(&token).await,
                    };
                    match verified {
                        Ok(user_id) => {
                            request
                                .extensions_mut()
                                .insert(Caller::User { user_id, via: peer });
                            inner.call(request).await
                        }
                        Err(status) => {
                            tracing::warn!(caller = %peer, method = %path, reason = status.message(), "user not authenticated");
                            Ok(status.into_http())
                        }
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET_USER: &str = "/meshwork.users.v1.UserService/GetUser";
    const DELETE_USER: &str = "/meshwork.users.v1.UserService/DeleteUser";

    fn id(service: &str) -> Option<SpiffeId> {
        SpiffeId::new("meshwork.local", "default", service).ok()
    }

    fn policy() -> Policy {
        Policy::from_rules([
            (
                "meshwork.users.v1.UserService/GetUser",
                &["orders", "user"][..],
            ),
            ("meshwork.users.v1.UserService/*", &["auth"][..]),
        ])
    }

    #[test]
    fn a_listed_service_is_admitted() {
        let d = decide(&policy(), GET_USER, id("orders"), false);
        assert!(matches!(d, Decision::Service(_)));
    }

    #[test]
    fn a_token_narrows_an_admitted_peer_to_its_user() {
        let d = decide(&policy(), GET_USER, id("orders"), true);
        assert!(matches!(d, Decision::NeedsUserToken(_)));
    }

    #[test]
    fn a_wildcard_rule_covers_unlisted_methods() {
        let d = decide(&policy(), DELETE_USER, id("auth"), false);
        assert!(matches!(d, Decision::Service(_)));
        let d = decide(&policy(), DELETE_USER, id("orders"), true);
        assert!(matches!(d, Decision::Denied(_)));
    }

    #[test]
    fn an_exact_rule_wins_over_the_wildcard() {
        // GetUser's own rule does not list `auth`, although the service-wide rule does.
        let d = decide(&policy(), GET_USER, id("auth"), false);
        assert!(matches!(d, Decision::NeedsUserToken(_)));
    }

    #[test]
    fn unknown_methods_and_anonymous_peers_are_denied() {
        let charge = "/meshwork.billing.v1.BillingService/Charge";
        assert!(matches!(
            decide(&policy(), charge, id("orders"), false),
            Decision::Denied(_)
        ));
        assert!(matches!(
            decide(&policy(), GET_USER, None, true),
            Decision::Denied(None)
        ));
    }

    #[test]
    fn health_and_reflection_are_open_to_the_mesh() {
        let d = decide(
            &policy(),
            "/grpc.health.v1.Health/Check",
            id("anyone"),
            false,
        );
        assert!(matches!(d, Decision::Service(_)));
    }

    #[test]
    fn users_reach_only_their_own_data() {
        let Some(via) = id("operator") else {
            panic!("a valid identity did not parse");
        };
        let caller = Caller::User {
            user_id: "u1".into(),
            via,
        };
        assert!(caller.require_owner("u1").is_ok());
        assert_eq!(
            caller.require_owner("u2").err().map(|s| s.code()),
            Some(tonic::Code::PermissionDenied)
        );
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let request = Request::builder()
            .header("authorization", "bearer abc")
            .body(())
            .ok();
        assert_eq!(
            request.as_ref().and_then(bearer_token),
            Some("abc".to_owned())
        );
        let request = Request::builder()
            .header("authorization", "Basic abc")
            .body(())
            .ok();
        assert_eq!(request.as_ref().and_then(bearer_token), None);
    }

    #[test]
    fn the_methods_of_a_service_come_from_the_contracts() -> Result<(), prost::DecodeError> {
        let methods = methods_of("meshwork.orders.v1.OrderService")?;
        assert!(methods.contains("meshwork.orders.v1.OrderService/WatchOrder"));
        assert_eq!(methods.len(), 5);
        Ok(())
    }

    #[test]
    fn malformed_rules_are_named() {
        let bad = Policy::from_rules([("GetUser", &["auth"][..])]);
        assert!(
            bad.validate("authz")
                .err()
                .is_some_and(|e| e.to_string().contains("GetUser"))
        );
    }
}
