//! Subnets and their address pools.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// One subnet the server hands addresses out in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Net,
    /// Inclusive ranges the pool is made of.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Addresses inside the ranges that are never handed out.
    pub exclude: Vec<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// Seconds.
    pub lease_time: u32,
    /// `[dhcp.subnet.options]`: what every lease of the subnet carries,
    /// unless its machine's profile or entry sets the same code.
    pub options: crate::policy::options::OptionSet,
}

impl Subnet {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.network.contains(&ip)
    }

    /// True if `ip` is one the pool may hand out.
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&ip))
            && !self.exclude.contains(&ip)
            && ip != self.network.network()
            && ip != self.network.broadcast()
    }

    /// Number of addresses in the ranges (exclusions not subtracted).
    pub fn pool_len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|(a, b)| u64::from(u32::from(*b)) - u64::from(u32::from(*a)) + 1)
            .sum()
    }

    /// The `n`th address of the ranges, in order (`n < pool_len()`).
    pub fn nth(&self, mut n: u64) -> Option<Ipv4Addr> {
        for (a, b) in &self.ranges {
            let len = u64::from(u32::from(*b)) - u64::from(u32::from(*a)) + 1;
            if n < len {
                return Some(Ipv4Addr::from(u32::from(*a) + n as u32));
            }
            n -= len;
        }
        None
    }
}

/// Parses `a.b.c.d-e.f.g.h` (inclusive; a single address is a range of one).
pub fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{s:?} is not an IPv4 address"))
    };
    let (first, last) = (parse(first)?, parse(last)?);
    if first > last {
        return Err(format!("range {text:?} ends before it starts"));
    }
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_walk_their_ranges_and_skip_exclusions() {
        let s = Subnet {
            network: "198.18.0.0/24".parse().unwrap(),
            ranges: vec![
                parse_range("198.18.0.10-198.18.0.12").unwrap(),
                parse_range("198.18.0.20").unwrap(),
            ],
            exclude: vec!["198.18.0.11".parse().unwrap()],
            router: None,
            dns: vec![],
            domain: None,
            lease_time: 3600,
            options: Default::default(),
        };
        assert_eq!(s.pool_len(), 4);
        assert_eq!(s.nth(3), Some("198.18.0.20".parse().unwrap()));
        assert!(s.in_pool("198.18.0.10".parse().unwrap()));
        assert!(!s.in_pool("198.18.0.11".parse().unwrap()), "excluded");
        assert!(
            !s.in_pool("198.18.0.13".parse().unwrap()),
            "outside the ranges"
        );
        assert!(parse_range("198.18.0.9-198.18.0.1").is_err());
        assert!(parse_range("nope").is_err());
    }
}
