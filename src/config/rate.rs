//! Rate limits per client on the write routes (`api::rate` applies them).

use clap::Args;

/// How many write requests (every POST and DELETE under `/api/`) one client may send
/// to one replica. A client is a buyer (the `sub` of a verified buyer token) or, for
/// requests without one, an address. Each replica counts alone: behind N replicas a
/// client that is spread over all of them gets up to N times these rates.
#[derive(Debug, Clone, Args)]
pub struct RateLimitConfig {
    /// Write requests per second one buyer may send to this replica, in bursts of
    /// up to twice as many. 0: no limit per buyer.
    #[arg(long, env = "BOXOFFICE_RATE_LIMIT_BUYER", default_value_t = 0)]
    pub buyer: u32,

    /// Write requests per second one client address may send to this replica
    /// without a buyer token, in bursts of up to twice as many (IPv6 addresses count
    /// per /64). 0: no limit per address. Many buyers can share one address (a
    /// carrier's NAT, an office): set it to what such a crowd sends, not one person.
    #[arg(long, env = "BOXOFFICE_RATE_LIMIT_ADDRESS", default_value_t = 0)]
    pub address: u32,

    /// Proxies in front of this service that append the address they saw to
    /// `X-Forwarded-For` (the shipped nginx: 1). The client's address is the entry
    /// this many from the end; 0: the address of the connection. Set it only when
    /// every request comes through that many proxies: a client that reaches the
    /// service directly chooses its own `X-Forwarded-For`.
    #[arg(long, env = "BOXOFFICE_TRUSTED_HOPS", default_value_t = 0)]
    pub trusted_hops: usize,
}
