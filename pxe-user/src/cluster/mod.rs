//! Several servers on one PostgreSQL (`--lease-store`): what one server
//! writes reaches the others' memory.
//!
//! Every write a server commits to the shared tables (a burst's leases, an
//! API change to machines or profiles) carries a notification in the same
//! transaction (`pg_notify` on [`CHANGES`]), so it is delivered exactly
//! when, and only if, the write is durable. Each server's [`feed`] listens
//! and applies what it hears: lease records (carried in the notification,
//! exactly as committed, in commit order) to the DHCP engine, and
//! inventory records (re-read from the database, whose rows are the truth)
//! to the inventory, with the kernel's DHCP templates of the machines
//! concerned taken back.
//!
//! An API change waits, before it answers, for every live server to say
//! it applied it ([`APPLIED`]), for at most [`PEER_BOUND`]; a server that
//! does not confirm by then is named in the log. Lease changes are not
//! waited for (a DHCP ACK must not wait on another machine): the database
//! refuses a second holder of an address whatever memory says, and the
//! feed delivers within milliseconds (docs/CLUSTER.md has the bounds).

pub mod feed;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{dhcp::PoolShare, lease::Lease};

/// The channel writes are announced on.
pub const CHANGES: &str = "pxed_changes";
/// The channel servers confirm applied API changes on.
pub const APPLIED: &str = "pxed_applied";
/// How long an API change waits for the other servers to confirm it.
pub const PEER_BOUND: Duration = Duration::from_secs(2);
/// A server is live while its heartbeat is this recent.
pub const LIVE_WITHIN_SECS: u32 = 5;
/// PostgreSQL refuses a notification payload of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;

/// A committed write, as announced on [`CHANGES`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The writing server's id.
    pub server: String,
    /// Its number for the change, when it waits for confirmations (API
    /// changes); 0 for leases.
    #[serde(default)]
    pub change: u64,
    /// Lease records as committed (`lease: None`: the record was removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseWritten>,
    /// MACs as text (`52:54:00:...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
}

/// One lease record as a commit left it. The notification carries the
/// record itself: it is sent in the writing transaction and delivered in
/// commit order, so it is exactly what the table holds after it, and a
/// peer need not read the row again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseWritten {
    pub ip: Ipv4Addr,
    /// `None`: removed (or, with `unsent`, not in the message).
    pub lease: Option<Lease>,
    /// The record alone would not fit in a notification (a client's
    /// oversized host name or identifier): the peer reads the row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsent: bool,
}

/// A server's confirmation, on [`APPLIED`], that it applied `origin`'s `change`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub server: String,
    pub origin: String,
    pub change: u64,
}

impl Change {
    /// The notifications announcing `leases` as `server` committed them,
    /// each within PostgreSQL's payload limit.
    pub fn lease_payloads(server: &str, leases: &[LeaseWritten]) -> Vec<String> {
        let mut payloads = Vec::new();
        let mut change = Change {
            server: server.to_owned(),
            ..Change::default()
        };
        let mut size = 100 + server.len();
        for written in leases {
            let mut one = serde_json::to_string(written)
                .expect("a lease serialises")
                .len()
                + 1;
            let unsent;
            let written = if 200 + server.len() + one > MAX_PAYLOAD {
                one = 64;
                unsent = LeaseWritten {
                    ip: written.ip,
                    lease: None,
                    unsent: true,
                };
                &unsent
            } else {
                written
            };
            if size + one > MAX_PAYLOAD && !change.leases.is_empty() {
                payloads.push(serde_json::to_string(&change).expect("a change serialises"));
                change.leases.clear();
                size = 100 + server.len();
            }
            change.leases.push(written.clone());
            size += one;
        }
        if !change.leases.is_empty() {
            payloads.push(serde_json::to_string(&change).expect("a change serialises"));
        }
        payloads
    }

    /// The notifications announcing an inventory change; the first names
    /// the change number, the rest (a bulk change of many machines) too.
    pub fn inventory_payloads(
        server: &str,
        change: u64,
        machines: &[String],
        profiles: &[String],
    ) -> Vec<String> {
        let per = (MAX_PAYLOAD - 100 - server.len()) / 20;
        let mut payloads: Vec<String> = machines
            .chunks(per.max(1))
            .map(|chunk| Change {
                server: server.to_owned(),
                change,
                machines: chunk.to_vec(),
                ..Change::default()
            })
            .chain(profiles.chunks(per.max(1) / 4).map(|chunk| Change {
                server: server.to_owned(),
                change,
                profiles: chunk.to_vec(),
                ..Change::default()
            }))
            .map(|c| serde_json::to_string(&c).expect("a change serialises"))
            .collect();
        if payloads.is_empty() {
            payloads.push(
                serde_json::to_string(&Change {
                    server: server.to_owned(),
                    change,
                    ..Change::default()
                })
                .expect("a change serialises"),
            );
        }
        payloads
    }
}

/// Another server on the database, as its heartbeat names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    /// Host name and process, for logs.
    pub name: String,
}

/// This server's place among the others: its id, the live peers, and the
/// confirmations its API changes wait for.
pub struct Cluster {
    id: String,
    name: String,
    next_change: AtomicU64,
    peers: Mutex<Vec<Peer>>,
    /// This server's part of the pools, among the live servers.
    pool_share: Arc<PoolShare>,
    /// Changes waited for → the servers that confirmed them.
    confirmed: Mutex<HashMap<u64, HashSet<String>>>,
    arrived: Condvar,
}

/// Why a wait for confirmations ended without all of them.
#[derive(Debug, PartialEq, Eq)]
pub struct Unconfirmed {
    /// The live servers that did not confirm in time.
    pub lagging: Vec<String>,
}

impl Cluster {
    /// A new identity: unique per process start.
    pub fn new() -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned());
        let pid = std::process::id();
        Self {
            id: format!("{:016x}", random_u64()),
            name: format!("{host} (pid {pid})"),
            next_change: AtomicU64::new(1),
            peers: Mutex::new(Vec::new()),
            pool_share: Arc::new(PoolShare::default()),
            confirmed: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The live servers besides this one, as of the last heartbeat.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pools' part this server prefers: kept current as servers come
    /// and go, for the DHCP engine.
    pub fn pool_share(&self) -> Arc<PoolShare> {
        Arc::clone(&self.pool_share)
    }

    /// A change that was never written: nobody will confirm it.
    pub fn abandon_change(&self, change: u64) {
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&change);
    }

    pub(crate) fn set_peers(&self, peers: Vec<Peer>) {
        // Servers number themselves by id, so each knows its slot without
        // asking the others.
        let mut ids: Vec<&str> = peers.iter().map(|p| p.id.as_str()).collect();
        ids.push(&self.id);
        ids.sort_unstable();
        ids.dedup();
        let slot = ids.iter().position(|id| *id == self.id).unwrap_or(0);
        self.pool_share.set(slot as u32, ids.len() as u32);
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
        // Under the waiters' lock, so none misses it between its check and its wait.
        let _confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        self.arrived.notify_all();
    }

    /// A number for a change about to be written, whose confirmations
    /// [`Self::wait_applied`] then waits for.
    pub fn begin_change(&self) -> u64 {
        let change = self.next_change.fetch_add(1, Ordering::Relaxed);
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(change, HashSet::new());
        change
    }

    /// `server` applied our `change`.
    pub(crate) fn confirm(&self, change: u64, server: &str) {
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(by) = confirmed.get_mut(&change) {
            by.insert(server.to_owned());
            self.arrived.notify_all();
        }
    }

    /// Waits until every live peer confirmed `change`, for at most `bound`.
    /// Returns how many confirmed, or the names of those that did not.
    pub fn wait_applied(&self, change: u64, bound: Duration) -> Result<usize, Unconfirmed> {
        let until = Instant::now() + bound;
        let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let peers = self.peers();
            let by = confirmed.get(&change).cloned().unwrap_or_default();
            let lagging: Vec<String> = peers
                .iter()
                .filter(|p| !by.contains(&p.id))
                .map(|p| p.name.clone())
                .collect();
            let now = Instant::now();
            if lagging.is_empty() || now >= until {
                confirmed.remove(&change);
                return if lagging.is_empty() {
                    Ok(peers.len())
                } else {
                    Err(Unconfirmed { lagging })
                };
            }
            confirmed = self
                .arrived
                .wait_timeout(confirmed, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// 64 bits from the OS's randomness (std's hasher keys come from it).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_postgres_limit_and_say_everything() {
        let written: Vec<LeaseWritten> = (0..5000u32)
            .map(|n| {
                let ip = Ipv4Addr::from(0xc612_0000 + n);
                let mac = [0x52, 0x54, 0, 0, (n >> 8) as u8, n as u8];
                let lease = (n % 7 != 0).then(|| Lease {
                    ip,
                    client: crate::lease::client_key(None, mac),
                    mac,
                    expires: 1_800_000_000 + u64::from(n),
                    state: crate::lease::LeaseState::Active,
                    hostname: Some(format!("node-{n:05}.rack-{:03}.example", n / 40)),
                });
                LeaseWritten {
                    ip,
                    lease,
                    unsent: false,
                }
            })
            .collect();
        let payloads = Change::lease_payloads("0123456789abcdef", &written);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() < 8000, "{} bytes", p.len());
            let c: Change = serde_json::from_str(p).unwrap();
            assert_eq!(c.server, "0123456789abcdef");
            back.extend(c.leases);
        }
        assert_eq!(back, written);
        // A record too big for any notification goes by address.
        let mut huge = written[1].clone();
        if let Some(lease) = &mut huge.lease {
            lease.hostname = Some("\u{1}".repeat(3000));
        }
        let payloads = Change::lease_payloads("s", &[written[2].clone(), huge.clone()]);
        let all: Vec<LeaseWritten> = payloads
            .iter()
            .inspect(|p| assert!(p.len() < 8000, "{} bytes", p.len()))
            .flat_map(|p| serde_json::from_str::<Change>(p).unwrap().leases)
            .collect();
        assert_eq!(all[0], written[2]);
        assert_eq!(
            all[1],
            LeaseWritten {
                ip: huge.ip,
                lease: None,
                unsent: true
            }
        );
        let macs: Vec<String> = (0..3000)
            .map(|n| format!("52:54:00:00:{:02x}:{:02x}", n >> 8, n & 0xff))
            .collect();
        let payloads = Change::inventory_payloads("s", 7, &macs, &["installer".into()]);
        let all: Vec<Change> = payloads
            .iter()
            .inspect(|p| assert!(p.len() < 8000))
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        assert!(all.iter().all(|c| c.change == 7));
        assert_eq!(all.iter().map(|c| c.machines.len()).sum::<usize>(), 3000);
        assert_eq!(all.last().unwrap().profiles, ["installer"]);
        assert_eq!(
            Change::inventory_payloads("s", 8, &[], &[]).len(),
            1,
            "even an empty change is announced, so it can be confirmed"
        );
    }

    #[test]
    fn a_wait_ends_when_every_live_peer_confirmed_or_names_the_laggard() {
        let cluster = std::sync::Arc::new(Cluster::new());
        cluster.set_peers(vec![
            Peer {
                id: "a".into(),
                name: "host-a".into(),
            },
            Peer {
                id: "b".into(),
                name: "host-b".into(),
            },
        ]);
        let change = cluster.begin_change();
        let confirmer = {
            let cluster = std::sync::Arc::clone(&cluster);
            std::thread::spawn(move || {
                cluster.confirm(change, "a");
                cluster.confirm(change, "b");
            })
        };
        assert_eq!(cluster.wait_applied(change, Duration::from_secs(10)), Ok(2));
        confirmer.join().unwrap();

        let change = cluster.begin_change();
        cluster.confirm(change, "a");
        cluster.confirm(change + 100, "b"); // not a change anyone waits for
        assert_eq!(
            cluster.wait_applied(change, Duration::from_millis(50)),
            Err(Unconfirmed {
                lagging: vec!["host-b".into()]
            })
        );
        cluster.set_peers(Vec::new());
        let change = cluster.begin_change();
        assert_eq!(
            cluster.wait_applied(change, Duration::from_secs(10)),
            Ok(0),
            "alone: nothing to wait for"
        );
    }
}
