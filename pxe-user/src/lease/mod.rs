//! Leases: what address a client holds, until when, durably.
//!
//! [`LeaseStore`] is the narrow storage seam (load everything at start, write
//! or forget leases, commit them): the embedded [`RedbLeaseStore`] by default,
//! [`MemLeaseStore`] for tests and the bench's simulations, and room for a
//! shared backend (PostgreSQL) that several servers use.
//!
//! The contract every implementation keeps: when [`LeaseStore::commit`]
//! returns `Ok`, every lease written since the previous commit survives a
//! crash of this process and of the machine; when it fails, none of them
//! count. The DHCP engine sends an ACK only after its lease is committed, and
//! commits the leases of a whole burst of requests at once (group commit: one
//! disk flush for a rack's worth of ACKs, not one each).

pub mod db;
mod mem;
pub mod postgres_store;
mod redb_store;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use self::{
    mem::MemLeaseStore, postgres_store::PostgresLeaseStore, redb_store::RedbLeaseStore,
};

/// What a lease record says about its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Held by the client until `expires`.
    Active,
    /// Given back (DHCPRELEASE); the client gets it again if it is still free.
    Released,
    /// Reported in use by someone else (DHCPDECLINE): not handed out until `expires`.
    Declined,
}

/// One address and who has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// How the client identifies itself: option 61 if sent, else its MAC
    /// (RFC 2131 §4.2), as bytes (see [`client_key`]).
    pub client: Vec<u8>,
    pub mac: [u8; 6],
    /// Seconds since the Unix epoch.
    pub expires: u64,
    pub state: LeaseState,
    pub hostname: Option<String>,
}

impl Lease {
    /// True if the address is held by its client (or quarantined) at `now`.
    pub fn is_current(&self, now: u64) -> bool {
        match self.state {
            LeaseState::Active | LeaseState::Declined => self.expires > now,
            LeaseState::Released => false,
        }
    }
}

/// The identity a lease is keyed by: `1` + option 61 when the client sent a
/// client identifier, else `0` + its MAC. The prefix keeps the two spaces apart.
///
/// A client identifier that is just "Ethernet" (type 1) and the same MAC
/// counts as the MAC: firmware PXE sends no option 61 and iPXE sends exactly
/// that, and one machine must keep one address across the chainload.
pub fn client_key(client_id: Option<&[u8]>, mac: [u8; 6]) -> Vec<u8> {
    match client_id {
        Some([1, rest @ ..]) if rest == mac => [&[0u8][..], &mac[..]].concat(),
        Some(id) if !id.is_empty() => [&[1u8][..], id].concat(),
        _ => [&[0u8][..], &mac[..]].concat(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ethernet_client_identifier_of_the_same_mac_is_the_mac() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let by_mac = client_key(None, mac);
        assert_eq!(
            client_key(Some(&[1, 0x52, 0x54, 0, 0, 0, 1]), mac),
            by_mac,
            "iPXE's option 61"
        );
        assert_ne!(
            client_key(Some(&[1, 0x52, 0x54, 0, 0, 0, 2]), mac),
            by_mac,
            "another MAC"
        );
        assert_ne!(
            client_key(Some(b"\xffduid-of-an-os"), mac),
            by_mac,
            "an RFC 4361 identifier"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease database {path}: {message}")]
    Database { path: String, message: String },
    #[error("lease record for {ip} is unreadable: {message}")]
    Corrupt { ip: Ipv4Addr, message: String },
    /// The shared database has these addresses held by other clients
    /// (another server leased them): the batch did not count, and these
    /// are their holders (never empty).
    #[error(
        "{} held by another client in the lease database (another server leased it)",
        taken_list(leases)
    )]
    Taken { leases: Vec<Lease> },
}

fn taken_list(leases: &[Lease]) -> String {
    match leases {
        [one] => format!("{} is", one.ip),
        many => format!(
            "{} addresses ({}...) are",
            many.len(),
            many.first().map_or(String::new(), |l| l.ip.to_string())
        ),
    }
}

/// Durable storage of leases.
pub trait LeaseStore: Send {
    /// Every committed lease, read once at start to build the in-memory index.
    fn load_all(&self) -> Result<Vec<Lease>, LeaseError>;
    /// Writes `lease` (replacing any record for its address); durable once committed.
    fn put(&mut self, lease: &Lease) -> Result<(), LeaseError>;
    /// Forgets the record for `ip`; durable once committed.
    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), LeaseError>;
    /// Makes every write since the last commit durable, all or nothing.
    fn commit(&mut self) -> Result<(), LeaseError>;
}
