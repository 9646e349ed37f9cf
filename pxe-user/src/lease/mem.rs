//! Leases in memory only: for tests and simulations, never for serving.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{Lease, LeaseError, LeaseStore};

#[derive(Debug, Default)]
pub struct MemLeaseStore {
    leases: BTreeMap<Ipv4Addr, Lease>,
}

impl LeaseStore for MemLeaseStore {
    fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.leases.values().cloned().collect())
    }

    fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        self.leases.insert(lease.ip, lease.clone());
        Ok(())
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), LeaseError> {
        self.leases.remove(&ip);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), LeaseError> {
        Ok(())
    }
}
