//! Login throttling: keyed rate limits on the attempts made on one account (its normalised
//! email) and from one caller address, checked before any password is verified, so that
//! guessing costs the guesser time and costs auth no hashing. An attempt over either limit is
//! answered RESOURCE_EXHAUSTED with the delay after which one more attempt is allowed.
//!
//! ```text
//! let limiter = LoginLimiter::new(&config.login_limits);
//! limiter.check(&email, peer_ip)?;   // before password::verify
//! limiter.forget_idle();             // now and then, to drop the entries that refilled
//! ```
//! The counts live in this replica's memory: with `n` replicas an account can be tried up to
//! `n` times its limit. They are not shared through the database on purpose: a flood of logins
//! must not turn into a flood of writes.

use std::net::{IpAddr, Ipv6Addr};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use sha2::{Digest, Sha256};

use crate::{config::LoginLimits, domain::LoginEmail, error::DomainError};

/// An account as the limiter knows it: the SHA-256 of its normalised email, so that an entry
/// has a fixed size whatever a caller sends as an email.
type AccountKey = [u8; 32];

/// The leading bits of an IPv6 address that identify one caller: a /64 is what one host (or
/// one customer network) gets, and it would otherwise hand out 2^64 fresh keys.
const IPV6_PEER_PREFIX_BITS: u32 = 64;

/// The per-account and per-peer limits of one auth replica.
pub struct LoginLimiter {
    per_account: DefaultKeyedRateLimiter<AccountKey>,
    per_peer: DefaultKeyedRateLimiter<IpAddr>,
}

impl std::fmt::Debug for LoginLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginLimiter")
            .field("accounts", &self.per_account.len())
            .field("peers", &self.per_peer.len())
            .finish()
    }
}

impl LoginLimiter {
    pub fn new(limits: &LoginLimits) -> Self {
        Self {
            per_account: RateLimiter::keyed(Quota::per_minute(limits.per_account_per_minute)),
            per_peer: RateLimiter::keyed(Quota::per_minute(limits.per_peer_per_minute)),
        }
    }

    /// Counts one login attempt on `email` from `peer` (when the caller's address is known).
    /// The peer is checked first, so an attempt refused for its peer does not use up the
    /// account's allowance: one flooding caller cannot lock an account out by itself.
    pub fn check(&self, email: &LoginEmail, peer: Option<IpAddr>) -> Result<(), DomainError> {
        if let Some(peer) = peer.map(peer_key) {
            self.per_peer.check_key(&peer).map_err(|not_until| {
                tracing::warn!(%peer, "login attempts from one caller throttled");
                DomainError::TooManyAttempts {
                    retry_after: not_until.wait_time_from(self.per_peer.clock().now()),
                }
            })?;
        }
        self.per_account
            .check_key(&account_key(email))
            .map_err(|not_until| {
                tracing::warn!(?peer, "login attempts on one account throttled");
                DomainError::TooManyAttempts {
                    retry_after: not_until.wait_time_from(self.per_account.clock().now()),
                }
            })
    }

    /// Drops the entries that have refilled completely (they are the same as no entry), so
    /// that memory follows the recent callers, not every caller ever seen.
    pub fn forget_idle(&self) {
        self.per_account.retain_recent();
        self.per_account.shrink_to_fit();
        self.per_peer.retain_recent();
        self.per_peer.shrink_to_fit();
    }
}

fn account_key(email: &LoginEmail) -> AccountKey {
    Sha256::digest(email.as_str().as_bytes()).into()
}

/// The address a peer is counted under: IPv4 as is (also when written as IPv4-mapped IPv6),
/// IPv6 by its /64.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (u128::BITS - IPV6_PEER_PREFIX_BITS);
            IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    const LIMIT: u32 = 3;

    fn limiter() -> LoginLimiter {
        let limit = NonZeroU32::new(LIMIT).unwrap_or(NonZeroU32::MIN);
        LoginLimiter::new(&LoginLimits {
            per_account_per_minute: limit,
            per_peer_per_minute: limit.saturating_add(LIMIT),
        })
    }

    fn email(raw: &str) -> Result<LoginEmail, String> {
        LoginEmail::parse(raw)
    }

    fn ip(raw: &str) -> Option<IpAddr> {
        raw.parse().ok()
    }

    fn throttled(result: Result<(), DomainError>) -> bool {
        matches!(result, Err(DomainError::TooManyAttempts { retry_after }) if !retry_after.is_zero())
    }

    #[test]
    fn an_account_is_throttled_after_its_limit_whoever_tries() -> Result<(), String> {
        let limiter = limiter();
        let ada = email("ada@example.com")?;
        for n in 0..LIMIT {
            let peer = ip(&format!("10.0.0.{n}"));
            assert!(limiter.check(&ada, peer).is_ok(), "attempt {n}");
        }
        assert!(throttled(limiter.check(&ada, ip("10.0.0.99"))));
        // The same account however it is written.
        assert!(throttled(limiter.check(&email(" ADA@example.com")?, None)));
        assert!(limiter.check(&email("bob@example.com")?, None).is_ok());
        Ok(())
    }

    #[test]
    fn a_peer_is_throttled_across_accounts() -> Result<(), String> {
        let limiter = limiter();
        let peer = ip("192.0.2.7");
        for n in 0..2 * LIMIT {
            let account = email(&format!("user{n}@example.com"))?;
            assert!(limiter.check(&account, peer).is_ok(), "attempt {n}");
        }
        let fresh = email("fresh@example.com")?;
        assert!(throttled(limiter.check(&fresh, peer)));
        // Refused for its peer, the attempt did not count against the account.
        for n in 0..LIMIT {
            assert!(
                limiter.check(&fresh, ip("192.0.2.8")).is_ok(),
                "attempt {n}"
            );
        }
        Ok(())
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_bit_prefix() {
        assert_eq!(
            ip("2001:db8:1:2:3:4:5:6").map(peer_key),
            ip("2001:db8:1:2::").map(peer_key)
        );
        assert_ne!(
            ip("2001:db8:1:2::1").map(peer_key),
            ip("2001:db8:1:3::1").map(peer_key)
        );
        assert_eq!(ip("::ffff:192.0.2.1").map(peer_key), ip("192.0.2.1"));
    }

    #[test]
    fn forgetting_idle_entries_keeps_the_counts_of_busy_ones() -> Result<(), String> {
        let limiter = limiter();
        let ada = email("ada@example.com")?;
        for n in 0..LIMIT {
            assert!(limiter.check(&ada, None).is_ok(), "attempt {n}");
        }
        limiter.forget_idle();
        assert!(throttled(limiter.check(&ada, None)));
        Ok(())
    }
}
