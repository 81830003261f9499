//! The one client builder: a channel to a downstream service, built from its [`ClientConfig`],
//! with a connect timeout per endpoint and a default deadline per call (see [`crate::deadline`]).
//! Every generated client in the mesh is a `XClient<MeshChannel>`.
//!
//! Connections are made lazily, so a service starts even when its downstream is not up yet; a
//! call made while it is unreachable fails UNAVAILABLE (or DEADLINE_EXCEEDED), never hangs.
//! With several endpoints, calls are spread over them by tonic's balancer.

use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;

use crate::{
    config::ClientConfig,
    deadline::{Deadline, DeadlineLayer},
};

/// The stack every mesh client sends through, outermost first.
pub type MeshChannel = Deadline<Channel>;

/// Why a channel could not be built (only ever bad configuration).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("endpoint `{endpoint}`: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("no endpoints configured")]
    NoEndpoints,
}

/// Builds the channel to one downstream service. Must be called inside a tokio runtime.
pub fn channel(config: &ClientConfig) -> Result<MeshChannel, ClientError> {
    let endpoints = config
        .endpoints
        .iter()
        .map(|uri| {
            Endpoint::from_shared(uri.clone())
                .map(|endpoint| endpoint.connect_timeout(config.connect_timeout).tcp_nodelay(true))
                .map_err(|source| ClientError::Endpoint {
                    endpoint: uri.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let channel = match endpoints.as_slice() {
        [] => return Err(ClientError::NoEndpoints),
        [one] => one.connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    };
    Ok(ServiceBuilder::new()
        .layer(DeadlineLayer::new(config.default_deadline))
        .service(channel))
}
