//! The address manager: who holds which address, over the [`LeaseStore`].
//!
//! It keeps the in-memory indexes (by address, by client, open offers,
//! reservations) and writes leases into the store's open batch. The indexes
//! change as each request of a burst is decided, so that the next request
//! of the same burst sees them; every change is journalled until the batch
//! commits. When the commit fails the journal is played back, so memory
//! says exactly what the disk has (the contract of [`crate::lease`]): no
//! lease the disk lacks, no offer given up for a lease that was never stored.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use super::{
    offers::{Held, Offers},
    pool::Subnet,
};
use crate::{
    lease::{Lease, LeaseError, LeaseState, LeaseStore},
    policy::Mac,
};

/// This server's share of the pools when several lease from them (a
/// shared database): it prefers the addresses whose index in a pool is
/// `slot` modulo `of`, and takes the others only when its own are gone.
/// Set by whoever knows the live servers (`crate::cluster`); one server
/// alone has all of it.
#[derive(Debug)]
pub struct PoolShare(AtomicU64);

impl Default for PoolShare {
    fn default() -> Self {
        Self(AtomicU64::new(1))
    }
}

impl PoolShare {
    /// This server is number `slot` of `of` (0-based; `of` ≥ 1).
    pub fn set(&self, slot: u32, of: u32) {
        let of = of.max(1);
        let slot = slot.min(of - 1);
        self.0
            .store(u64::from(slot) << 32 | u64::from(of), Ordering::Relaxed);
    }

    /// (slot, of).
    pub fn get(&self) -> (u64, u64) {
        let v = self.0.load(Ordering::Relaxed);
        (v >> 32, (v & 0xffff_ffff).max(1))
    }
}

/// How long a declined address stays out of use.
pub const DECLINE_QUARANTINE_SECS: u64 = 600;

/// One index change, with what it replaced.
enum Undo {
    Lease(Ipv4Addr, Option<Lease>),
    Client(Vec<u8>, Option<Ipv4Addr>),
    Offer(Ipv4Addr, Option<Held>),
}

pub struct Addresses {
    store: Box<dyn LeaseStore>,
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_client: HashMap<Vec<u8>, Ipv4Addr>,
    offers: Offers,
    /// Fixed addresses by MAC, and the same by address.
    reservations: HashMap<Mac, Ipv4Addr>,
    reserved: HashMap<Ipv4Addr, Mac>,
    /// Where each subnet's free-address search resumes; `None` until the
    /// first search, which starts at 0 or, with [`Self::spread`], at a
    /// point the server's own address picks.
    cursors: Vec<Option<u64>>,
    spread: bool,
    /// Which part of each pool this server prefers (see [`PoolShare`]).
    share: Option<Arc<PoolShare>>,
    /// With other servers: addresses this server committed whose own
    /// notification the change feed has not delivered yet, and how many.
    unseen_own: HashMap<Ipv4Addr, u32>,
    /// Index changes since the last commit, oldest first.
    journal: Vec<Undo>,
    /// Writes into the store's batch, ever: a request wrote if it grew.
    writes: u64,
}

/// What an address is being considered for: a client, and where it asked.
#[derive(Clone, Copy)]
pub struct Claim<'a> {
    pub client: &'a [u8],
    pub mac: Mac,
    pub subnet: usize,
    /// Our own address there, never handed out.
    pub server: Ipv4Addr,
    pub now: u64,
}

impl Addresses {
    /// The indexes of every lease the store holds.
    pub fn load(
        store: Box<dyn LeaseStore>,
        subnets: usize,
        reservations: HashMap<Mac, Ipv4Addr>,
    ) -> Result<Self, LeaseError> {
        let by_ip: HashMap<Ipv4Addr, Lease> =
            store.load_all()?.into_iter().map(|l| (l.ip, l)).collect();
        let by_client = client_index(&by_ip);
        let mut addresses = Self {
            store,
            by_ip,
            by_client,
            offers: Offers::default(),
            reservations: HashMap::new(),
            reserved: HashMap::new(),
            cursors: Vec::new(),
            spread: false,
            share: None,
            unseen_own: HashMap::new(),
            journal: Vec::new(),
            writes: 0,
        };
        addresses.reconfigure(subnets, reservations);
        Ok(addresses)
    }

    /// Other servers lease from the same pools: start each subnet's search
    /// where this server's address says (see `EngineConfig::shared_pools`).
    pub fn spread(&mut self, on: bool) {
        self.spread = on;
    }

    /// Several servers lease from these pools: prefer this server's share.
    pub fn share(&mut self, share: Arc<PoolShare>) {
        self.spread = true;
        self.share = Some(share);
    }

    /// New subnets and reservations (SIGHUP); leases and offers stay.
    pub fn reconfigure(&mut self, subnets: usize, reservations: HashMap<Mac, Ipv4Addr>) {
        self.cursors = vec![None; subnets];
        self.reserved = reservations.iter().map(|(mac, ip)| (*ip, *mac)).collect();
        self.reservations = reservations;
    }

    /// The lease recorded for `ip`, if any.
    pub fn lease(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// Every lease recorded, by address.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    /// The address `client` holds or last held.
    pub fn of_client(&self, client: &[u8]) -> Option<Ipv4Addr> {
        self.by_client.get(client).copied()
    }

    pub fn reservation(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.reservations.get(&mac).copied()
    }

    /// Writes into the store's batch so far (compare before and after a
    /// request to know whether its reply must wait for the commit).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// What the store holds, as a restart would read it.
    #[cfg(test)]
    pub fn stored(&self) -> Result<Vec<Lease>, LeaseError> {
        self.store.load_all()
    }

    // ---- offers -----------------------------------------------------------

    pub fn sweep_offers(&mut self, now: u64) {
        self.offers.sweep(now);
    }

    /// Holds `ip` for `client` until `until`, counted as a stranger's in
    /// `stranger_in` (not journalled: an offer writes nothing to disk, so
    /// nothing can disagree with it).
    pub fn hold_offer(
        &mut self,
        ip: Ipv4Addr,
        client: Vec<u8>,
        mac: Mac,
        until: u64,
        stranger_in: Option<usize>,
    ) {
        self.offers.hold(
            ip,
            Held {
                client,
                mac: mac.0,
                until,
                stranger_in,
            },
        );
    }

    /// The machines offers are held for at `now`.
    pub fn offered_macs(&self, now: u64) -> impl Iterator<Item = [u8; 6]> + '_ {
        self.offers.macs(now)
    }

    /// The machines with a reservation.
    pub fn reserved_macs(&self) -> impl Iterator<Item = [u8; 6]> + '_ {
        self.reservations.keys().map(|mac| mac.0)
    }

    /// Offers held for strangers in subnet `subnet`.
    pub fn offers_held_for_strangers(&self, subnet: usize) -> usize {
        self.offers.held_for_strangers(subnet)
    }

    pub fn is_offered_to(&self, ip: Ipv4Addr, client: &[u8]) -> bool {
        self.offers.is_held_for(ip, client)
    }

    /// The client chose another server: its offer is given up.
    pub fn release_offer_of(&mut self, client: &[u8]) {
        self.offers.release_client(client);
    }

    // ---- choosing -----------------------------------------------------------

    /// Whether `ip` is held by someone other than `client` at `now`.
    pub fn held_by_other(&self, ip: Ipv4Addr, client: &[u8], now: u64) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|l| l.is_current(now) && l.client != client)
    }

    /// May `ip` go to this claim now?
    pub fn assignable(&self, ip: Ipv4Addr, subnet: &Subnet, c: Claim<'_>) -> bool {
        let reserved_for_this = self.reservations.get(&c.mac) == Some(&ip);
        let reserved_for_other = self.reserved.get(&ip).is_some_and(|m| *m != c.mac);
        (subnet.in_pool(ip) || (reserved_for_this && subnet.contains(ip)))
            && !reserved_for_other
            && ip != c.server
            && !self.held_by_other(ip, c.client, c.now)
            && !self.offers.is_held_for_another(ip, c.client, c.now)
    }

    /// The address to offer: the reservation, else what the client was
    /// offered, held, or asks for, else a fresh address, else an expired one.
    pub fn choose(
        &mut self,
        subnet: &Subnet,
        requested: Option<Ipv4Addr>,
        c: Claim<'_>,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = self.reservation(c.mac) {
            return self.assignable(ip, subnet, c).then_some(ip);
        }
        let offered = self.offers.of_client(c.client);
        let previous = self.of_client(c.client);
        if let Some(ip) = [offered, previous, requested]
            .into_iter()
            .flatten()
            .find(|ip| self.assignable(*ip, subnet, c))
        {
            return Some(ip);
        }
        let len = subnet.pool_len();
        let spread = self.spread;
        let start = *self.cursors[c.subnet].get_or_insert_with(|| {
            // Knuth's multiplicative hash spreads neighbouring addresses.
            let seed = u64::from(u32::from(c.server).wrapping_mul(2_654_435_761));
            if spread && len > 0 {
                seed % len
            } else {
                0
            }
        });
        // This server's share before the others' (their first choice);
        // within each, fresh addresses before expired or released ones.
        let (slot, of) = self.share.as_ref().map_or((0, 1), |s| s.get());
        let passes: &[bool] = if of > 1 { &[true, false] } else { &[false] };
        for &own_only in passes {
            for reclaim in [false, true] {
                for step in 0..len {
                    let n = (start + step) % len;
                    if own_only && n % of != slot {
                        continue;
                    }
                    let Some(ip) = subnet.nth(n) else {
                        continue;
                    };
                    if (reclaim || !self.by_ip.contains_key(&ip)) && self.assignable(ip, subnet, c)
                    {
                        self.cursors[c.subnet] = Some((n + 1) % len);
                        return Some(ip);
                    }
                }
            }
        }
        None
    }

    // ---- changes (journalled until commit) ------------------------------------

    /// Gives `lease` to its client; an address the client held before is
    /// released. Both are in the store's batch when this returns `Ok`.
    pub fn grant(&mut self, lease: Lease, now: u64) -> Result<(), LeaseError> {
        let previous = self
            .of_client(&lease.client)
            .filter(|old| *old != lease.ip)
            .and_then(|old| self.by_ip.get(&old).cloned())
            .map(|mut previous| {
                previous.state = LeaseState::Released;
                previous.expires = now;
                previous
            });
        if let Some(previous) = &previous {
            self.put(previous)?;
        }
        self.put(&lease)?;
        if let Some(previous) = previous {
            self.set_lease(previous);
        }
        self.end_offer(lease.ip);
        self.set_client(lease.client.clone(), Some(lease.ip));
        self.set_lease(lease);
        Ok(())
    }

    /// The client gives `ip` back; it keeps its claim to get it again.
    pub fn release(&mut self, ip: Ipv4Addr, now: u64) -> Result<bool, LeaseError> {
        let Some(mut lease) = self.by_ip.get(&ip).cloned() else {
            return Ok(false);
        };
        lease.state = LeaseState::Released;
        lease.expires = now;
        self.put(&lease)?;
        self.set_lease(lease);
        Ok(true)
    }

    /// `ip` is in use on the wire: out of use for the quarantine, and no
    /// longer the client's.
    pub fn decline(
        &mut self,
        ip: Ipv4Addr,
        client: &[u8],
        mac: Mac,
        now: u64,
    ) -> Result<(), LeaseError> {
        let quarantined = Lease {
            ip,
            client: Vec::new(),
            mac: mac.0,
            expires: now + DECLINE_QUARANTINE_SECS,
            state: LeaseState::Declined,
            hostname: None,
        };
        self.put(&quarantined)?;
        self.set_client(client.to_vec(), None);
        self.end_offer(ip);
        self.set_lease(quarantined);
        Ok(())
    }

    /// Makes the batch durable. On failure, every index change since the
    /// last commit is undone and the error returned: nothing of the batch
    /// counts, on disk or in memory.
    pub fn commit(&mut self) -> Result<(), LeaseError> {
        let result = self.store.commit();
        if result.is_err() {
            self.roll_back();
        } else if self.share.is_some() {
            // Other servers' records of these addresses that the feed has
            // yet to deliver are older than what memory has now.
            for undo in &self.journal {
                if let Undo::Lease(ip, _) = undo {
                    *self.unseen_own.entry(*ip).or_default() += 1;
                }
            }
        }
        self.journal.clear();
        if let Err(LeaseError::Taken { leases }) = &result {
            for lease in leases {
                self.learn(lease);
            }
        }
        result
    }

    /// A lease another server holds, as the shared database has it: known
    /// from now on, so this server offers the address to nobody else.
    fn learn(&mut self, lease: &Lease) {
        self.offers.release_ip(lease.ip);
        if let Some(old) = self.by_ip.insert(lease.ip, lease.clone()) {
            if old.client != lease.client && self.by_client.get(&old.client) == Some(&lease.ip) {
                self.by_client.remove(&old.client);
            }
        }
        // A record the client gave back does not replace the lease it holds.
        if lease.state == LeaseState::Active
            || (lease.state == LeaseState::Released && !self.by_client.contains_key(&lease.client))
        {
            self.by_client.insert(lease.client.clone(), lease.ip);
        }
    }

    /// What the shared database now says of `ip` after another server
    /// changed it (`None`: the record is gone). Called between bursts, never
    /// with a batch open. Returns the MACs whose answers may have changed:
    /// the address's holder before and after.
    pub fn absorb(&mut self, ip: Ipv4Addr, lease: Option<Lease>) -> Vec<Mac> {
        debug_assert!(self.journal.is_empty(), "absorbed with a batch open");
        let mut touched: Vec<Mac> = self
            .by_ip
            .get(&ip)
            .map(|l| Mac(l.mac))
            .into_iter()
            .collect();
        if self.unseen_own.get(&ip).is_some_and(|n| *n > 0) {
            // This server committed the address after that record (its own
            // notification, later in commit order, has not come yet):
            // memory is newer.
            return Vec::new();
        }
        match lease {
            Some(lease) => {
                // It took a lease elsewhere: what this server offered it is moot.
                self.offers.release_client(&lease.client);
                touched.push(Mac(lease.mac));
                self.learn(&lease);
            }
            None => {
                if let Some(old) = self.by_ip.remove(&ip) {
                    if self.by_client.get(&old.client) == Some(&ip) {
                        self.by_client.remove(&old.client);
                    }
                }
            }
        }
        touched.dedup();
        touched
    }

    /// The change feed heard this server's own commits of these addresses.
    pub fn own_writes_seen(&mut self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        for ip in ips {
            if let Some(n) = self.unseen_own.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.unseen_own.remove(&ip);
                }
            }
        }
    }

    /// Reads every lease from the store again, replacing memory's (the
    /// store recovered from failures: what it has is the truth). Returns
    /// how many leases it holds.
    pub fn reread(&mut self) -> Result<usize, LeaseError> {
        let leases = self.store.load_all()?;
        let n = leases.len();
        self.resync(leases);
        Ok(n)
    }

    /// Replaces every lease in memory with the database's (after the
    /// change feed was interrupted and changes may have been missed).
    /// Returns how many records differed.
    pub fn resync(&mut self, leases: Vec<Lease>) -> usize {
        debug_assert!(self.journal.is_empty(), "resynchronised with a batch open");
        let fresh: HashMap<Ipv4Addr, Lease> = leases.into_iter().map(|l| (l.ip, l)).collect();
        let differed = fresh
            .iter()
            .filter(|(ip, l)| self.by_ip.get(ip) != Some(l))
            .count()
            + self
                .by_ip
                .keys()
                .filter(|ip| !fresh.contains_key(ip))
                .count();
        self.by_client = client_index(&fresh);
        // Memory is the database now: nothing of this server's is newer.
        self.unseen_own.clear();
        self.by_ip = fresh;
        differed
    }

    fn roll_back(&mut self) {
        while let Some(undo) = self.journal.pop() {
            match undo {
                Undo::Lease(ip, Some(lease)) => drop(self.by_ip.insert(ip, lease)),
                Undo::Lease(ip, None) => drop(self.by_ip.remove(&ip)),
                Undo::Client(client, Some(ip)) => drop(self.by_client.insert(client, ip)),
                Undo::Client(client, None) => drop(self.by_client.remove(&client)),
                Undo::Offer(ip, Some(held)) => self.offers.hold(ip, held),
                Undo::Offer(_, None) => {}
            }
        }
    }

    fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        self.writes += 1;
        self.store.put(lease)
    }

    fn set_lease(&mut self, lease: Lease) {
        let ip = lease.ip;
        let before = self.by_ip.insert(ip, lease);
        self.journal.push(Undo::Lease(ip, before));
    }

    fn set_client(&mut self, client: Vec<u8>, ip: Option<Ipv4Addr>) {
        let before = match ip {
            Some(ip) => self.by_client.insert(client.clone(), ip),
            None => self.by_client.remove(&client),
        };
        self.journal.push(Undo::Client(client, before));
    }

    fn end_offer(&mut self, ip: Ipv4Addr) {
        let before = self.offers.release_ip(ip);
        self.journal.push(Undo::Offer(ip, before));
    }
}

/// Each client's address: of its records (a client may have an old,
/// released one beside its lease), the active one expiring last.
fn client_index(by_ip: &HashMap<Ipv4Addr, Lease>) -> HashMap<Vec<u8>, Ipv4Addr> {
    let mut records: Vec<&Lease> = by_ip
        .values()
        .filter(|l| l.state != LeaseState::Declined)
        .collect();
    records.sort_by_key(|l| (l.state == LeaseState::Active, l.expires));
    records
        .into_iter()
        .map(|l| (l.client.clone(), l.ip))
        .collect()
}
