//! Discovery: where a downstream service's replicas are, as a stream of [`Change`]s that the
//! client's balancer applies while it runs, so replicas join and leave without a restart.
//!
//! Three sources, chosen per entry of [`ClientConfig::endpoints`]:
//! - static, `https://host:port`: one endpoint, inserted once. An IP address is the endpoint's
//!   address; a host name stays one endpoint whose every connection attempt resolves the name
//!   (a Kubernetes ClusterIP Service, a local name);
//! - DNS, `dns://host:port`: every address the name resolves to is an endpoint. The name is
//!   re-resolved every `dns_refresh`; new addresses are inserted, vanished ones removed. A lookup
//!   that fails or finds nothing changes nothing: a resolver hiccup never empties the set;
//! - in-process, for tests: [`Discovery::in_process`] hands back an [`InProcess`] handle whose
//!   [`InProcess::add`] and [`InProcess::remove`] change the set.
//!
//! ```text
//! let discovery = Discovery::from_config(&config)?;          // static and DNS entries
//! let (replicas, discovery) = Discovery::in_process();       // or, in a test
//! replicas.add(addr);
//! let channel = mesh::client::connect_discovered(&config, &tls, "users", discovery)?;
//! ```
//!
//! Discovery only says which addresses exist; whether one is healthy is the balancer's and
//! outlier ejection's business ([`crate::eject`]).

use std::{
    collections::BTreeSet,
    fmt, io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, future::BoxFuture};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::config::ClientConfig;

/// The port of an `https://` endpoint that names none (every mesh port speaks TLS).
const DEFAULT_PORT: u16 = 443;
/// A DNS lookup that has not answered by then counts as failed (the previous addresses stay), so
/// that a stuck resolver cannot stop later refreshes.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one replica listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// An IP address and port: what DNS discovery yields, and a static IP endpoint.
    Socket(SocketAddr),
    /// A host name that each connection attempt resolves: a static endpoint given by name.
    Named { host: String, port: u16 },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(addr) => write!(f, "{addr}"),
            Self::Named { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Self::Socket(addr)
    }
}

/// A change to the set of endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Insert(Address),
    Remove(Address),
}

/// Why an endpoint entry is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("`{endpoint}`: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("no endpoints configured")]
    NoEndpoints,
}

/// One entry of [`ClientConfig::endpoints`], parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `https://host:port` or `http://host:port`: one endpoint.
    Static(Address),
    /// `dns://host:port`: one endpoint per address the name resolves to.
    Dns { host: String, port: u16 },
}

impl Source {
    /// Parses an endpoint entry; the error says what is wrong with it.
    pub fn parse(endpoint: &str) -> Result<Self, DiscoveryError> {
        let bad = |reason: &str| DiscoveryError::BadEndpoint {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        const SHAPE: &str = "must look like https://host:port or dns://host:port";
        let uri: http::Uri = endpoint.parse().map_err(|_| bad(SHAPE))?;
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(bad(SHAPE));
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("an endpoint has no path or query"));
        }
        if authority.as_str().contains('@') {
            return Err(bad("an endpoint has no user information"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad(SHAPE));
        }
        match scheme {
            "https" | "http" => {
                let port = authority.port_u16().unwrap_or(DEFAULT_PORT);
                Ok(Self::Static(match host.parse::<IpAddr>() {
                    Ok(ip) => Address::Socket(SocketAddr::new(ip, port)),
                    Err(_) => Address::Named { host, port },
                }))
            }
            "dns" => {
                let port = authority
                    .port_u16()
                    .ok_or_else(|| bad("a dns:// endpoint needs a port"))?;
                Ok(Self::Dns { host, port })
            }
            _ => Err(bad("the scheme must be https, http or dns")),
        }
    }
}

/// The stream of endpoint changes one client's balancer follows. It never ends: a source that
/// has nothing more to say leaves the set as it is.
pub struct Discovery {
    changes: mpsc::UnboundedReceiver<Change>,
    /// The DNS refresh task, if any; it stops with the stream.
    resolver: Option<JoinHandle<()>>,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("dns", &self.resolver.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(resolver) = &self.resolver {
            resolver.abort();
        }
    }
}

impl Stream for Discovery {
    type Item = Change;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        match self.changes.poll_recv(cx) {
            Poll::Ready(Some(change)) => Poll::Ready(Some(change)),
            // NOTE: every sender is gone, so nothing will ever change again: the set stays as it
            // is, and no wake-up is owed. Ending the stream instead would make the balancer
            // poll a finished stream.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Discovery {
    /// The sources named by `config.endpoints`: static entries at once, DNS entries resolved now
    /// and every `config.dns_refresh`. Must be called inside a tokio runtime when there are DNS
    /// entries.
    pub fn from_config(config: &ClientConfig) -> Result<Self, DiscoveryError> {
        if config.endpoints.is_empty() {
            return Err(DiscoveryError::NoEndpoints);
        }
        let mut fixed = BTreeSet::new();
        let mut names = Vec::new();
        for endpoint in &config.endpoints {
            match Source::parse(endpoint)? {
                Source::Static(address) => {
                    fixed.insert(address);
                }
                Source::Dns { host, port } => names.push((host, port)),
            }
        }
        // Unbounded: the DNS task sends only differences, so what waits for a client that makes
        // no calls (and so reads no changes) is bounded by how much the set churns meanwhile.
        let (tx, changes) = mpsc::unbounded_channel();
        for address in &fixed {
            // The receiver is right here: sending cannot fail.
            let _ = tx.send(Change::Insert(address.clone()));
        }
        let resolver = (!names.is_empty()).then(|| {
            tokio::spawn(refresh(
                names,
                fixed,
                config.dns_refresh,
                system_lookup(),
                tx,
            ))
        });
        Ok(Self { changes, resolver })
    }

    /// An empty set that the returned handle changes: the source for tests.
    pub fn in_process() -> (InProcess, Self) {
        let (tx, changes) = mpsc::unbounded_channel();
        (
            InProcess { tx },
            Self {
                changes,
                resolver: None,
            },
        )
    }
}

/// Changes the set of an in-process [`Discovery`]. A change takes effect before the next call
/// is dispatched.
#[derive(Debug, Clone)]
pub struct InProcess {
    tx: mpsc::UnboundedSender<Change>,
}

impl InProcess {
    /// Adds a replica (adding one already there replaces its connection).
    pub fn add(&self, addr: SocketAddr) {
        // A client that is gone needs no updates.
        let _ = self.tx.send(Change::Insert(Address::Socket(addr)));
    }

    /// Removes a replica: no call is sent to it after this returns.
    pub fn remove(&self, addr: SocketAddr) {
        // A client that is gone needs no updates.
        let _ = self.tx.send(Change::Remove(Address::Socket(addr)));
    }
}

/// The changes that turn `current` into `next`: insertions first, so that a replaced set never
/// looks empty to the balancer in between.
pub fn diff(current: &BTreeSet<SocketAddr>, next: &BTreeSet<SocketAddr>) -> Vec<Change> {
    let inserted = next
        .difference(current)
        .map(|addr| Change::Insert(Address::Socket(*addr)));
    let removed = current
        .difference(next)
        .map(|addr| Change::Remove(Address::Socket(*addr)));
    inserted.chain(removed).collect()
}

/// Resolves a host and port to addresses.
type Lookup =
    Arc<dyn Fn(String, u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The system resolver (`getaddrinfo`, which honours `/etc/hosts` and the search domains).
fn system_lookup() -> Lookup {
    Arc::new(|host, port| {
        Box::pin(async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(Iterator::collect)
        })
    })
}

/// Resolves every name now and then every `interval`, sending what changed. Each name keeps
/// its last good answer when a lookup fails, times out or comes back empty. Addresses that are
/// also static endpoints are left to the static entry.
async fn refresh(
    names: Vec<(String, u16)>,
    fixed: BTreeSet<Address>,
    interval: Duration,
    lookup: Lookup,
    tx: mpsc::UnboundedSender<Change>,
) {
    let mut answers: Vec<BTreeSet<SocketAddr>> = vec![BTreeSet::new(); names.len()];
    let mut current = BTreeSet::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let lookups = names
            .iter()
            .map(|(host, port)| tokio::time::timeout(LOOKUP_TIMEOUT, lookup(host.clone(), *port)));
        let results = futures::future::join_all(lookups).await;
        for (((host, port), answer), result) in names.iter().zip(&mut answers).zip(results) {
            match result {
                Ok(Ok(addrs)) if !addrs.is_empty() => *answer = addrs.into_iter().collect(),
                Ok(Ok(_)) => {
                    tracing::warn!(%host, port, "DNS lookup found no address; keeping the last answer");
                }
                Ok(Err(error)) => {
                    tracing::warn!(%host, port, %error, "DNS lookup failed; keeping the last answer");
                }
                Err(_) => {
                    tracing::warn!(%host, port, timeout = ?LOOKUP_TIMEOUT, "DNS lookup timed out; keeping the last answer");
                }
            }
        }
        let next: BTreeSet<SocketAddr> = answers
            .iter()
            .flatten()
            .filter(|addr| !fixed.contains(&Address::Socket(**addr)))
            .copied()
            .collect();
        let changes = diff(&current, &next);
        if !changes.is_empty() {
            tracing::info!(endpoints = next.len(), ?changes, "DNS endpoints changed");
        }
        for change in changes {
            if tx.send(change).is_err() {
                return;
            }
        }
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use futures::StreamExt;

    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 50051))
    }

    fn set(lasts: &[u8]) -> BTreeSet<SocketAddr> {
        lasts.iter().copied().map(addr).collect()
    }

    fn insert(last: u8) -> Change {
        Change::Insert(Address::Socket(addr(last)))
    }

    fn remove(last: u8) -> Change {
        Change::Remove(Address::Socket(addr(last)))
    }

    #[test]
    fn diff_inserts_new_addresses_before_removing_vanished_ones() {
        assert_eq!(
            diff(&set(&[1, 2, 3]), &set(&[2, 3, 4])),
            vec![insert(4), remove(1)]
        );
        assert_eq!(diff(&set(&[1, 2]), &set(&[1, 2])), vec![]);
        assert_eq!(diff(&set(&[]), &set(&[1])), vec![insert(1)]);
        assert_eq!(diff(&set(&[1]), &set(&[])), vec![remove(1)]);
    }

    #[test]
    fn endpoints_parse_into_sources() {
        let parsed = |e: &str| Source::parse(e).ok();
        assert_eq!(
            parsed("https://127.0.0.1:50051"),
            Some(Source::Static(Address::Socket(SocketAddr::from((
                [127, 0, 0, 1],
                50051
            )))))
        );
        assert_eq!(
            parsed("http://[::1]:7"),
            Some(Source::Static(Address::Socket(SocketAddr::from((
                std::net::Ipv6Addr::LOCALHOST,
                7
            )))))
        );
        assert_eq!(
            parsed("https://users.default.svc:50051/"),
            Some(Source::Static(Address::Named {
                host: "users.default.svc".into(),
                port: 50051
            }))
        );
        assert_eq!(
            parsed("https://users"),
            Some(Source::Static(Address::Named {
                host: "users".into(),
                port: DEFAULT_PORT
            }))
        );
        assert_eq!(
            parsed("dns://users-headless:50051"),
            Some(Source::Dns {
                host: "users-headless".into(),
                port: 50051
            })
        );
        for bad in [
            "users:50051",
            "dns://users",
            "ftp://users:1",
            "https://users:1/path",
            "https://u@users:1",
            "",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn static_endpoints_are_inserted_once_each() -> Result<(), DiscoveryError> {
        let config = ClientConfig {
            endpoints: vec![
                "https://10.0.0.1:50051".into(),
                "https://10.0.0.1:50051".into(),
                "https://users:50051".into(),
            ],
            ..ClientConfig::default()
        };
        let mut discovery = Discovery::from_config(&config)?;
        let first = discovery.next().await;
        let second = discovery.next().await;
        assert_eq!(first, Some(insert(1)));
        assert_eq!(
            second,
            Some(Change::Insert(Address::Named {
                host: "users".into(),
                port: 50051
            }))
        );
        let more = tokio::time::timeout(Duration::from_millis(50), discovery.next()).await;
        assert!(more.is_err(), "a static set does not change: {more:?}");
        Ok(())
    }

    /// A resolver that gives scripted answers, one per lookup, repeating the last.
    fn scripted(answers: Vec<io::Result<Vec<SocketAddr>>>) -> Lookup {
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        Arc::new(move |_, _| {
            let answers = Arc::clone(&answers);
            Box::pin(async move {
                let mut answers = answers.lock().unwrap_or_else(|e| e.into_inner());
                let answer = if answers.len() > 1 {
                    answers.pop_front()
                } else {
                    answers.front().map(|a| match a {
                        Ok(addrs) => Ok(addrs.clone()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    })
                };
                answer.unwrap_or_else(|| Ok(Vec::new()))
            })
        })
    }

    /// The changes sent by the next refresh.
    async fn next_changes(rx: &mut mpsc::UnboundedReceiver<Change>) -> Vec<Change> {
        let mut changes = Vec::new();
        if let Some(change) = rx.recv().await {
            changes.push(change);
        }
        while let Ok(change) = rx.try_recv() {
            changes.push(change);
        }
        changes
    }

    #[tokio::test(start_paused = true)]
    async fn dns_refresh_follows_the_answers_and_survives_failed_lookups() {
        let answers = vec![
            Ok(set(&[1, 2]).into_iter().collect()),
            Err(io::Error::other("resolver down")),
            Ok(Vec::new()),
            Ok(set(&[2, 3]).into_iter().collect()),
        ];
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(refresh(
            vec![("users".into(), 50051)],
            BTreeSet::new(),
            Duration::from_secs(5),
            scripted(answers),
            tx,
        ));
        assert_eq!(next_changes(&mut rx).await, vec![insert(1), insert(2)]);
        // The failed and the empty lookups change nothing; the next good answer is applied.
        assert_eq!(next_changes(&mut rx).await, vec![insert(3), remove(1)]);
        let quiet = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
        assert!(quiet.is_err(), "unchanged answers send nothing: {quiet:?}");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dns_address_that_is_also_a_static_endpoint_is_left_to_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(refresh(
            vec![("users".into(), 50051)],
            BTreeSet::from([Address::Socket(addr(1))]),
            Duration::from_secs(5),
            scripted(vec![Ok(set(&[1, 2]).into_iter().collect())]),
            tx,
        ));
        assert_eq!(next_changes(&mut rx).await, vec![insert(2)]);
        task.abort();
    }

    #[tokio::test]
    async fn the_in_process_source_reports_adds_and_removes_in_order() {
        let (replicas, mut discovery) = Discovery::in_process();
        replicas.add(addr(1));
        replicas.add(addr(2));
        replicas.remove(addr(1));
        drop(replicas);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(discovery.next().await);
        }
        assert_eq!(seen, vec![insert(1), insert(2), remove(1)]);
    }

    #[tokio::test]
    async fn the_system_resolver_finds_the_loopback_address() {
        let found = system_lookup()("127.0.0.1".into(), 7).await.ok();
        assert_eq!(found, Some(vec![SocketAddr::from(([127, 0, 0, 1], 7))]));
    }
}
