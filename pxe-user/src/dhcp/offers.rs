//! Addresses offered and not yet requested: held for their client until a
//! deadline, so a storm of DISCOVERs never offers one address twice.
//!
//! Indexed both ways, because both questions are asked per request ("is
//! this address held for someone else?", "what did this client get
//! offered?"), and a rack's worth of open offers must not make every request
//! scan them all. Expired offers are swept at most once a second.
//!
//! Offers to strangers (machines pxed knows nothing of: no reservation, no
//! inventory entry, no lease) are counted per subnet, so a flood of
//! DISCOVERs from made-up MACs cannot hold the whole pool: the engine stops
//! holding addresses for strangers at a bound.

use std::{collections::HashMap, net::Ipv4Addr};

/// One held offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub client: Vec<u8>,
    /// The machine's hardware address (chaddr), which the kernel knows it by.
    pub mac: [u8; 6],
    pub until: u64,
    /// The subnet, when it was offered to a stranger.
    pub stranger_in: Option<usize>,
}

#[derive(Debug, Default)]
pub struct Offers {
    by_ip: HashMap<Ipv4Addr, Held>,
    by_client: HashMap<Vec<u8>, Ipv4Addr>,
    /// Offers held for strangers, by subnet.
    strangers: HashMap<usize, usize>,
    swept_at: u64,
}

impl Offers {
    /// Drops offers whose deadline is `now` or earlier (once per second of `now`).
    pub fn sweep(&mut self, now: u64) {
        if now <= self.swept_at {
            return;
        }
        self.swept_at = now;
        let Self {
            by_ip,
            by_client,
            strangers,
            ..
        } = self;
        by_ip.retain(|_, held| {
            let keep = held.until > now;
            if !keep {
                uncount(strangers, held);
            }
            keep
        });
        by_client.retain(|client, ip| by_ip.get(ip).is_some_and(|held| &held.client == client));
    }

    /// Holds `ip` for `held.client` until `held.until`; the client's earlier
    /// offer, if any, is given up.
    pub fn hold(&mut self, ip: Ipv4Addr, held: Held) {
        self.release_client(&held.client);
        self.release_ip(ip);
        if let Some(subnet) = held.stranger_in {
            *self.strangers.entry(subnet).or_default() += 1;
        }
        self.by_client.insert(held.client.clone(), ip);
        self.by_ip.insert(ip, held);
    }

    /// The machines offers are held for at `now` (an offer past its deadline
    /// may wait for the next sweep; it holds nothing).
    pub fn macs(&self, now: u64) -> impl Iterator<Item = [u8; 6]> + '_ {
        self.by_ip
            .values()
            .filter(move |held| held.until > now)
            .map(|held| held.mac)
    }

    /// Offers held for strangers in `subnet`.
    pub fn held_for_strangers(&self, subnet: usize) -> usize {
        self.strangers.get(&subnet).copied().unwrap_or(0)
    }

    /// The address offered to `client`, if one is held for it.
    pub fn of_client(&self, client: &[u8]) -> Option<Ipv4Addr> {
        self.by_client.get(client).copied()
    }

    /// Whether `ip` is held for `client`.
    pub fn is_held_for(&self, ip: Ipv4Addr, client: &[u8]) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|held| held.client == client)
    }

    /// Whether `ip` is held for a client other than `client` at `now`.
    pub fn is_held_for_another(&self, ip: Ipv4Addr, client: &[u8], now: u64) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|held| held.client != client && held.until > now)
    }

    /// Ends the offer of `ip` (it was taken, or declined); returns it.
    pub fn release_ip(&mut self, ip: Ipv4Addr) -> Option<Held> {
        let held = self.by_ip.remove(&ip)?;
        if self.by_client.get(&held.client) == Some(&ip) {
            self.by_client.remove(&held.client);
        }
        uncount(&mut self.strangers, &held);
        Some(held)
    }

    /// Ends the offer made to `client` (it chose another server).
    pub fn release_client(&mut self, client: &[u8]) {
        if let Some(ip) = self.by_client.remove(client) {
            if let Some(held) = self.by_ip.remove(&ip) {
                uncount(&mut self.strangers, &held);
            }
        }
    }
}

fn uncount(strangers: &mut HashMap<usize, usize>, held: &Held) {
    if let Some(subnet) = held.stranger_in {
        if let Some(n) = strangers.get_mut(&subnet) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);

    fn held(client: &[u8], until: u64) -> Held {
        Held {
            client: client.to_vec(),
            mac: [0; 6],
            until,
            stranger_in: None,
        }
    }

    #[test]
    fn offers_to_strangers_are_counted_until_they_end_however_they_end() {
        let mut o = Offers::default();
        let stranger = |client: &[u8]| Held {
            stranger_in: Some(0),
            ..held(client, 100)
        };
        o.hold(A, stranger(b"one"));
        o.hold(B, stranger(b"two"));
        o.hold(Ipv4Addr::new(198, 18, 0, 102), held(b"known", 100));
        assert_eq!(o.held_for_strangers(0), 2);
        assert_eq!(o.held_for_strangers(1), 0);
        o.hold(B, stranger(b"one"));
        assert_eq!(o.held_for_strangers(0), 1, "one's new offer replaced both");
        o.release_client(b"one");
        assert_eq!(o.held_for_strangers(0), 0);
        o.hold(A, stranger(b"three"));
        o.release_ip(A);
        assert_eq!(o.held_for_strangers(0), 0);
        o.hold(A, stranger(b"four"));
        o.sweep(100);
        assert_eq!(o.held_for_strangers(0), 0, "expired");
    }

    #[test]
    fn the_machines_offers_are_held_for_exclude_offers_past_their_deadline() {
        let mut o = Offers::default();
        o.hold(
            A,
            Held {
                mac: [1; 6],
                ..held(b"one", 100)
            },
        );
        o.hold(
            B,
            Held {
                mac: [2; 6],
                ..held(b"two", 200)
            },
        );
        let macs = |o: &Offers, now| {
            let mut m: Vec<_> = o.macs(now).collect();
            m.sort();
            m
        };
        assert_eq!(macs(&o, 99), [[1; 6], [2; 6]]);
        // Not swept yet, and still not admitted as known.
        assert_eq!(macs(&o, 100), [[2; 6]]);
    }

    #[test]
    fn an_offer_is_found_both_ways_until_it_is_released_or_expires() {
        let mut o = Offers::default();
        o.hold(A, held(b"one", 100));
        assert_eq!(o.of_client(b"one"), Some(A));
        assert!(o.is_held_for(A, b"one"));
        assert!(o.is_held_for_another(A, b"two", 99));
        assert!(
            !o.is_held_for_another(A, b"two", 100),
            "expired at its deadline"
        );
        o.sweep(99);
        assert_eq!(o.of_client(b"one"), Some(A));
        o.sweep(100);
        assert_eq!(o.of_client(b"one"), None);
        assert!(!o.is_held_for(A, b"one"));

        o.hold(A, held(b"one", 200));
        o.release_ip(A);
        assert_eq!(o.of_client(b"one"), None);
        o.hold(B, held(b"one", 200));
        o.release_client(b"one");
        assert!(!o.is_held_for(B, b"one"));
    }

    #[test]
    fn a_new_offer_replaces_the_clients_earlier_one_and_an_address_changes_hands_cleanly() {
        let mut o = Offers::default();
        o.hold(A, held(b"one", 100));
        o.hold(B, held(b"one", 100));
        assert!(!o.is_held_for(A, b"one"), "one client, one offer");
        assert_eq!(o.of_client(b"one"), Some(B));
        o.hold(B, held(b"two", 100));
        assert_eq!(o.of_client(b"one"), None, "B went to two");
        assert_eq!(o.of_client(b"two"), Some(B));
    }
}
