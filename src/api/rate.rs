//! Rate limits per client on the write routes: a token bucket per buyer (the `sub` of
//! a verified buyer token) and, for requests without one, per client address.
//!
//! Each replica decides alone, in memory: a refused request costs Redis nothing, which
//! is the point when Redis is what a flood would fill. The price is that behind N
//! replicas a client spread over all of them gets up to N times the per-replica rate
//! (docs/operations.md, "Abuse and hardening").

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use poem::Request;
use poem::http::{HeaderMap, Method, header};

use crate::config::RateLimitConfig;
use crate::domain::Buyer;

/// How often buckets that have refilled are dropped: they are the same as none.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// The write routes' limits of this replica.
pub struct RateLimits {
    buyers: Option<DefaultKeyedRateLimiter<Buyer>>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_hops: usize,
    pruned: Mutex<Instant>,
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            buyers: limiter(config.buyer),
            addresses: limiter(config.address),
            trusted_hops: config.trusted_hops,
            pruned: Mutex::new(Instant::now()),
        }
    }

    /// Whether `req` is a write request this replica limits.
    pub fn applies(&self, req: &Request) -> bool {
        (self.buyers.is_some() || self.addresses.is_some())
            && matches!(*req.method(), Method::POST | Method::DELETE)
            && req.uri().path().starts_with("/api/")
    }

    /// Whether buyers have a limit of their own (else only addresses count, and a
    /// buyer's token need not be checked here).
    pub fn limits_buyers(&self) -> bool {
        self.buyers.is_some()
    }

    /// Counts `req` against its client: `Err` with the time to wait (at least a
    /// second) when the client is over its limit. `buyer` is the buyer a verified
    /// token names, if any: with a limit per buyer they count as themselves,
    /// otherwise as their address.
    pub fn check(&self, req: &Request, buyer: Option<Buyer>) -> Result<(), Duration> {
        self.prune();
        let refused = match (buyer, &self.buyers, &self.addresses) {
            (Some(buyer), Some(buyers), _) => buyers.check_key(&buyer).err(),
            (_, _, Some(addresses)) => {
                let peer = req.remote_addr().as_socket_addr().map(SocketAddr::ip);
                addresses
                    .check_key(&self.address(peer, req.headers()))
                    .err()
            }
            (_, _, None) => None,
        };
        match refused {
            Some(not_until) => Err(not_until
                .wait_time_from(DefaultClock::default().now())
                .max(Duration::from_secs(1))),
            None => Ok(()),
        }
    }

    /// The client's address: the `X-Forwarded-For` entry `trusted_hops` from the end,
    /// or the connection's; an IPv6 address stands for its /64, which one host gets.
    fn address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
        let peer = peer.unwrap_or(IpAddr::V4([0, 0, 0, 0].into()));
        let address = if self.trusted_hops == 0 {
            peer
        } else {
            forwarded_client(headers, self.trusted_hops).unwrap_or(peer)
        };
        match address {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
            },
            v4 => v4,
        }
    }

    /// Drops the buckets that have refilled, at most every [`PRUNE_EVERY`]: the
    /// buckets kept are those of clients active in the last few seconds.
    fn prune(&self) {
        let Ok(mut pruned) = self.pruned.try_lock() else {
            return;
        };
        if pruned.elapsed() < PRUNE_EVERY {
            return;
        }
        *pruned = Instant::now();
        for limiter in self.buyers.iter() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for limiter in self.addresses.iter() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// `per_second` per second with bursts of twice as many; `None` for 0.
fn limiter<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = rate.saturating_mul(NonZeroU32::new(2).expect("2 is not 0"));
    Some(DefaultKeyedRateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

/// The `X-Forwarded-For` entry `hops` from the end (over every such header, in
/// order), when there are that many and it is an address.
fn forwarded_client(headers: &HeaderMap, hops: usize) -> Option<IpAddr> {
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let entry = entries.len().checked_sub(hops).map(|i| entries[i])?;
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
}

/// The bearer token of `req`, if it sends one, read as the handlers read it: the
/// scheme in any case, spaces around the token ignored.
pub fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().unwrap());
        }
        headers
    }

    fn limits(address: u32, trusted_hops: usize) -> RateLimits {
        RateLimits::new(&RateLimitConfig {
            buyer: 0,
            address,
            trusted_hops,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_entry_the_trusted_proxies_appended() {
        let peer = Some(ip("10.0.0.9"));
        let spoofed = forwarded(&["1.1.1.1, 203.0.113.7"]);
        assert_eq!(limits(1, 1).address(peer, &spoofed), ip("203.0.113.7"));
        let two_headers = forwarded(&["1.1.1.1", "203.0.113.8:4711"]);
        assert_eq!(limits(1, 1).address(peer, &two_headers), ip("203.0.113.8"));
        assert_eq!(limits(1, 2).address(peer, &spoofed), ip("1.1.1.1"));
        // Fewer entries than proxies, or an entry that is no address: the connection's.
        assert_eq!(limits(1, 3).address(peer, &spoofed), ip("10.0.0.9"));
        assert_eq!(
            limits(1, 1).address(peer, &forwarded(&["x"])),
            ip("10.0.0.9")
        );
        // No trusted proxy: whatever the client wrote is ignored.
        assert_eq!(limits(1, 0).address(peer, &spoofed), ip("10.0.0.9"));
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let limits = limits(1, 0);
        let none = HeaderMap::new();
        let a = limits.address(Some(ip("2001:db8:1:2::1")), &none);
        let b = limits.address(Some(ip("2001:db8:1:2:ffff::9")), &none);
        assert_eq!((a, b), (ip("2001:db8:1:2::"), a));
        let mapped = limits.address(Some(ip("::ffff:192.0.2.1")), &none);
        assert_eq!(mapped, ip("192.0.2.1"));
    }

    #[test]
    fn a_client_over_its_burst_waits_and_others_do_not() {
        let limits = limits(5, 1);
        let from = |address: &str| {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri_str("/api/v1/purchase")
                .finish();
            *req.headers_mut() = forwarded(&[address]);
            req
        };
        let flooder = from("192.0.2.1");
        assert!(limits.applies(&flooder));
        let allowed = (0..30)
            .filter(|_| limits.check(&flooder, None).is_ok())
            .count();
        assert_eq!(allowed, 10, "a burst of twice the rate");
        let wait = limits.check(&flooder, None).unwrap_err();
        assert_eq!(
            wait,
            Duration::from_secs(1),
            "a token is back in 200 ms: 1 s at least"
        );
        assert!(limits.check(&from("192.0.2.2"), None).is_ok());
        let read = Request::builder().uri_str("/api/v1/purchase").finish();
        assert!(!limits.applies(&read), "a GET is not a write");
    }

    #[test]
    fn a_bearer_token_is_read_whatever_the_case_of_the_scheme() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc ", " Bearer abc"] {
            let req = Request::builder().header("authorization", value).finish();
            assert_eq!(bearer(&req), Some("abc"), "{value}");
        }
        let basic = Request::builder()
            .header("authorization", "Basic abc")
            .finish();
        assert_eq!(bearer(&basic), None);
    }
}
