//! Meshwork's shared stack. Every service gets its server, its clients, its configuration and
//! its storage plumbing from here, so that a behaviour of the mesh lives in exactly one place.
//!
//! - [`config`]: defaults -> optional file -> `MESHWORK_` environment, validated at start;
//! - [`server`]: the one server builder (health, reflection, limits, graceful shutdown);
//! - [`client`]: the one client channel builder (endpoints, connect timeout, deadlines);
//! - [`deadline`]: deadlines in and out (the caller's remaining deadline bounds every outgoing
//!   call) and the `grpc-timeout` codec;
//! - [`metrics`]: what servers and clients count, served as Prometheus text on the admin port;
//! - [`retry`]: retries where safe, with backoff and a retry budget;
//! - [`store`]: opening SQLite or PostgreSQL and applying a service's migrations;
//! - [`status`]: field violations and storage failures as gRPC statuses;
//! - [`pagination`], [`timestamp`]: the contracts' conventions, implemented once;
//! - [`shutdown`], [`telemetry`]: process plumbing shared by every binary.

pub mod authz;
pub mod client;
pub mod config;
pub mod deadline;
pub mod discovery;
pub mod eject;
pub mod identity;
pub mod jwt;
pub mod metrics;
pub mod pagination;
pub mod pki;
pub mod retry;
pub mod server;
pub mod shed;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod timestamp;
pub mod tls;
pub mod trace;
pub mod transport;
