//! Who the client is: the peer address of the TCP connection, or, behind proxies listed in
//! TRUSTED_PROXIES, the right-most address in `X-Forwarded-For` that is not a trusted proxy.
//!
//! The accept loop hands each request's peer address to [`api::handle`](crate::api::handle)
//! (an argument, not a request extension: that would cost a map and two allocations per
//! request). Reading `X-Forwarded-For` from the right and stopping at the first hop that is not
//! trusted means a client cannot choose its own address by sending the header: whatever it
//! writes is to the left of what the trusted proxies append. Without TRUSTED_PROXIES the header is ignored.

use std::fmt;
use std::net::IpAddr;

use hyper::HeaderMap;

/// Networks whose `X-Forwarded-For` is believed (TRUSTED_PROXIES): addresses or CIDR blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Network>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(net).into(), 32, self.prefix) == mask(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(net.into(), 128, self.prefix) == mask(ip.into(), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn mask(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits >> (width - prefix)
    }
}

/// The key a client is counted under (login throttling, connections per client): an IPv4
/// address as is, an IPv6 address by its /64, the block one subscriber usually holds.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl TrustedProxies {
    /// Parses a comma-separated list of addresses and CIDR blocks (`10.0.0.0/8, ::1`).
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(Self::default());
        }
        value
            .split(',')
            .map(str::trim)
            .map(|entry| {
                let bad = || format!("{entry:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8 or ::1)");
                let (addr, prefix) = match entry.split_once('/') {
                    Some((addr, prefix)) => (addr, Some(prefix)),
                    None => (entry, None),
                };
                let addr = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
                let width = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    Some(p) => p.parse::<u8>().ok().filter(|p| *p <= width).ok_or_else(bad)?,
                    None => width,
                };
                Ok(Network { addr, prefix })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request from `peer` with `headers` (see the module doc).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        // Every X-Forwarded-For line, in order, as one list of hops; the peer is the last hop.
        let mut hops: Vec<&str> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else { return peer };
            hops.extend(text.split(',').map(str::trim));
        }
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.contains(client) {
                        return client;
                    }
                }
                // A hop that is not an address: the trusted proxy to its right is the client.
                Err(_) => return client,
            }
        }
        client
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(|n| format!("{}/{}", n.addr, n.prefix)).collect();
        f.write_str(&list.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::parse("").unwrap();
        assert_eq!(none.client(ip("203.0.113.9"), &headers(&["198.51.100.1"])), ip("203.0.113.9"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.168.1.1, ::1").unwrap();
        // The client wrote a fake first hop; the proxies appended the real one.
        let h = headers(&["6.6.6.6, 198.51.100.7", "10.1.2.3"]);
        assert_eq!(trusted.client(ip("192.168.1.1"), &h), ip("198.51.100.7"));
        // An untrusted peer's header is not believed.
        assert_eq!(trusted.client(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        // Only trusted hops: the left-most of them.
        assert_eq!(trusted.client(ip("::1"), &headers(&["10.0.0.5"])), ip("10.0.0.5"));
        // No header: the proxy itself.
        assert_eq!(trusted.client(ip("::1"), &HeaderMap::new()), ip("::1"));
        // A hop that is not an address stops the walk at the trusted hop to its right.
        assert_eq!(trusted.client(ip("::1"), &headers(&["junk, 10.0.0.5"])), ip("10.0.0.5"));
        // IPv4-mapped IPv6 peers count as their IPv4 address.
        assert_eq!(trusted.client(ip("::ffff:192.168.1.1"), &headers(&["198.51.100.7"])), ip("198.51.100.7"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["10.0.0.0/33", "localhost", "10.0.0.1/x", "::1/129", "1.2.3.4,,"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
        let parsed = TrustedProxies::parse("10.0.0.0/8,2001:db8::/32").unwrap();
        assert_eq!(parsed.to_string(), "10.0.0.0/8,2001:db8::/32");
        assert!(parsed.contains(ip("2001:db8:1::1")) && !parsed.contains(ip("2001:db9::1")));
        assert!(TrustedProxies::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    }
}
