//! Addresses offered and not yet requested: held for their client until a
//! deadline, so a storm of DISCOVERs never offers one address twice.
//!
//! Indexed both ways, because both questions are asked per request ("is
//! this address held for someone else?", "what did this client get
//! offered?"), and a rack's worth of open offers must not make every request
//! scan them all. Expired offers are swept at most once a second.

use std::{collections::HashMap, net::Ipv4Addr};

#[derive(Debug, Default)]
pub struct Offers {
    by_ip: HashMap<Ipv4Addr, (Vec<u8>, u64)>,
    by_client: HashMap<Vec<u8>, Ipv4Addr>,
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
            by_ip, by_client, ..
        } = self;
        by_ip.retain(|_, (_, until)| *until > now);
        by_client.retain(|client, ip| by_ip.get(ip).is_some_and(|(holder, _)| holder == client));
    }

    /// Holds `ip` for `client` until `until`; the client's earlier offer, if
    /// any, is given up.
    pub fn hold(&mut self, ip: Ipv4Addr, client: Vec<u8>, until: u64) {
        self.release_client(&client);
        self.release_ip(ip);
        self.by_client.insert(client.clone(), ip);
        self.by_ip.insert(ip, (client, until));
    }

    /// The address offered to `client`, if one is held for it.
    pub fn of_client(&self, client: &[u8]) -> Option<Ipv4Addr> {
        self.by_client.get(client).copied()
    }

    /// Whether `ip` is held for `client`.
    pub fn is_held_for(&self, ip: Ipv4Addr, client: &[u8]) -> bool {
        self.by_ip.get(&ip).is_some_and(|(c, _)| c == client)
    }

    /// Whether `ip` is held for a client other than `client` at `now`.
    pub fn is_held_for_another(&self, ip: Ipv4Addr, client: &[u8], now: u64) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|(c, until)| c != client && *until > now)
    }

    /// Ends the offer of `ip` (it was taken, or declined); returns whom it
    /// was held for and until when.
    pub fn release_ip(&mut self, ip: Ipv4Addr) -> Option<(Vec<u8>, u64)> {
        let (client, until) = self.by_ip.remove(&ip)?;
        if self.by_client.get(&client) == Some(&ip) {
            self.by_client.remove(&client);
        }
        Some((client, until))
    }

    /// Ends the offer made to `client` (it chose another server).
    pub fn release_client(&mut self, client: &[u8]) {
        if let Some(ip) = self.by_client.remove(client) {
            self.by_ip.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);

    #[test]
    fn an_offer_is_found_both_ways_until_it_is_released_or_expires() {
        let mut o = Offers::default();
        o.hold(A, b"one".to_vec(), 100);
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

        o.hold(A, b"one".to_vec(), 200);
        o.release_ip(A);
        assert_eq!(o.of_client(b"one"), None);
        o.hold(B, b"one".to_vec(), 200);
        o.release_client(b"one");
        assert!(!o.is_held_for(B, b"one"));
    }

    #[test]
    fn a_new_offer_replaces_the_clients_earlier_one_and_an_address_changes_hands_cleanly() {
        let mut o = Offers::default();
        o.hold(A, b"one".to_vec(), 100);
        o.hold(B, b"one".to_vec(), 100);
        assert!(!o.is_held_for(A, b"one"), "one client, one offer");
        assert_eq!(o.of_client(b"one"), Some(B));
        o.hold(B, b"two".to_vec(), 100);
        assert_eq!(o.of_client(b"one"), None, "B went to two");
        assert_eq!(o.of_client(b"two"), Some(B));
    }
}
