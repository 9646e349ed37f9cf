//! The daemon's side of admission control in the programs
//! (`pxe_common::admit`): the limits, the budgets of the interfaces and
//! relays it serves, and the machines it knows, which are always admitted.
//!
//! The kernel's set of known machines follows the daemon's in two ways: a
//! machine is added the moment it is offered an address it holds or is
//! granted a lease (so its REQUEST is never refused), and the whole set is
//! reconciled periodically with reservations, the inventory, live leases
//! and held offers (so machines that left are removed, and the API's new
//! ones added).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use aya::maps::{Array, HashMap, MapData};
use pxe_common::admit::{
    AdmitConfig, BucketKey, Gcra, KnownMac, MacKey, Rate, ADMIT_CONFIG, DHCP_BUCKETS,
    DHCP_BUCKETS_CAPACITY, DHCP_KNOWN, DHCP_KNOWN_CAPACITY, NEW_RELAYS, TIER_TC, TIER_XDP,
};
use tracing::{debug, info, warn};

use super::{is_not_found, FastPath, FastPathError};
use crate::policy::Mac;

/// The limits an operator sets (flags `--admit-*`, `[admission]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionLimits {
    /// DHCP requests per second from machines pxed does not know, per
    /// interface and per relay, and how many at once.
    pub dhcp_unknown_rate: f64,
    pub dhcp_unknown_burst: u32,
    /// DISCOVERs per second from one MAC (its burst is the same number).
    pub dhcp_discover_per_mac: f64,
    /// New TFTP transfers per second in all, and at once.
    pub tftp_rate: f64,
    pub tftp_burst: u32,
    /// New TFTP transfers per second from one client address, and at once.
    pub tftp_per_source: f64,
    pub tftp_per_source_burst: u32,
}

impl Default for AdmissionLimits {
    /// Room for a rack-sized storm: 10,000 machines powering on together
    /// fit the bursts, with their retries; a flood reaches userspace at a
    /// few thousand requests a second at most (docs/ADMISSION.md).
    fn default() -> Self {
        Self {
            dhcp_unknown_rate: 2_000.0,
            dhcp_unknown_burst: 20_000,
            dhcp_discover_per_mac: 10.0,
            tftp_rate: 2_000.0,
            tftp_burst: 20_000,
            tftp_per_source: 20.0,
            tftp_per_source_burst: 64,
        }
    }
}

impl AdmissionLimits {
    /// The programs' configuration, enforced by `tier`.
    pub fn kernel_config(&self, tier: u32) -> AdmitConfig {
        let per_mac_burst = self.dhcp_discover_per_mac.ceil().clamp(1.0, 1e6) as u32;
        AdmitConfig {
            dhcp_unknown: Rate::new(self.dhcp_unknown_rate, self.dhcp_unknown_burst),
            dhcp_mac_discover: Rate::new(self.dhcp_discover_per_mac, per_mac_burst),
            tftp_source: Rate::new(self.tftp_per_source, self.tftp_per_source_burst),
            tftp_global: Rate::new(self.tftp_rate, self.tftp_burst),
            tier,
            _pad: 0,
        }
    }
}

/// Which program enforces the limits: XDP where it is attached (cheapest,
/// and a packet it passes reaches TC too), TC otherwise.
pub fn enforcing_tier(xdp_attached: bool) -> u32 {
    if xdp_attached {
        TIER_XDP
    } else {
        TIER_TC
    }
}

/// The known machines and relay budgets as the kernel holds them.
pub struct KernelAdmission {
    fastpath: Arc<Mutex<FastPath>>,
    /// What `DHCP_KNOWN` holds (changed only with this locked).
    known: Mutex<HashSet<[u8; 6]>>,
    /// The buckets created, so an answered relay costs a syscall once.
    buckets: Mutex<HashSet<BucketKey>>,
    warned_full: AtomicBool,
}

impl KernelAdmission {
    /// Sets the limits, enforced by `tier`, and gives each interface
    /// (`ifindex`) its budget for clients and for relays not yet answered.
    pub fn start(
        fastpath: Arc<Mutex<FastPath>>,
        config: AdmitConfig,
        ifindexes: &[u32],
    ) -> Result<Self, FastPathError> {
        let admission = Self {
            fastpath,
            known: Mutex::new(HashSet::new()),
            buckets: Mutex::new(HashSet::new()),
            warned_full: AtomicBool::new(false),
        };
        {
            let mut fp = admission.lock_fastpath();
            fp.set_admission(config)?;
        }
        for &ifindex in ifindexes {
            for giaddr in [[0; 4], NEW_RELAYS] {
                admission.ensure_bucket(BucketKey { ifindex, giaddr })?;
            }
        }
        Ok(admission)
    }

    fn lock_fastpath(&self) -> std::sync::MutexGuard<'_, FastPath> {
        self.fastpath.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A machine pxed now knows (an offer held for it, a lease): admitted
    /// from now on, whatever its interface's budget.
    pub fn know(&self, mac: Mac) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(&mac.0) {
            return;
        }
        if self.insert_known(mac.0) {
            known.insert(mac.0);
        }
    }

    /// Makes the kernel's known machines exactly those `wanted` returns.
    /// It is asked with the table locked, so a machine [`Self::know`] adds
    /// meanwhile (an offer just made) is in its answer, not removed by it.
    pub fn reconcile(&self, wanted: impl FnOnce() -> HashSet<[u8; 6]>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = wanted();
        let gone: Vec<[u8; 6]> = known.difference(&wanted).copied().collect();
        for mac in gone {
            let removed = self.lock_fastpath().remove_known(mac);
            match removed {
                Ok(()) => {
                    known.remove(&mac);
                }
                Err(e) => warn!("admission: forgetting a machine in the kernel: {e}"),
            }
        }
        let new: Vec<[u8; 6]> = wanted.difference(&known).copied().collect();
        let mut added = 0;
        for mac in new {
            if self.insert_known(mac) {
                known.insert(mac);
                added += 1;
            }
        }
        if added > 0 {
            debug!(
                added,
                known = known.len(),
                "admission: machines pxed knows, in the kernel"
            );
        }
    }

    fn insert_known(&self, mac: [u8; 6]) -> bool {
        match self.lock_fastpath().insert_known(mac) {
            Ok(()) => true,
            Err(e) => {
                if !self.warned_full.swap(true, Ordering::Relaxed) {
                    warn!(
                        capacity = DHCP_KNOWN_CAPACITY,
                        "admission: the kernel's table of known machines took no more ({e}); \
                         the rest are admitted within the budget of unknown ones (said once)"
                    );
                }
                false
            }
        }
    }

    /// A relay pxed answered through: it gets a budget of its own on
    /// `ifindex` (up to the table's size; past it, relays share one).
    pub fn relay_answered(&self, ifindex: u32, giaddr: std::net::Ipv4Addr) {
        if giaddr.is_unspecified() {
            return;
        }
        let key = BucketKey {
            ifindex,
            giaddr: giaddr.octets(),
        };
        if let Err(e) = self.ensure_bucket(key) {
            debug!(%giaddr, "admission: no budget of its own for this relay: {e}");
        }
    }

    fn ensure_bucket(&self, key: BucketKey) -> Result<(), FastPathError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.contains(&key) || buckets.len() >= DHCP_BUCKETS_CAPACITY as usize {
            return Ok(());
        }
        self.lock_fastpath().create_bucket(key)?;
        if key.giaddr != [0; 4] && key.giaddr != NEW_RELAYS {
            info!(relay = %std::net::Ipv4Addr::from(key.giaddr), "admission: this relay's unknown machines get a budget of their own");
        }
        buckets.insert(key);
        Ok(())
    }
}

/// `BPF_NOEXIST`: create, never replace (the programs own the value).
const NOEXIST: u64 = 1;

impl FastPath {
    /// Writes the limits the programs apply.
    pub fn set_admission(&mut self, config: AdmitConfig) -> Result<(), FastPathError> {
        let map = self
            .ebpf
            .map_mut(ADMIT_CONFIG)
            .expect("pxe-ebpf defines ADMIT_CONFIG");
        let mut array: Array<&mut MapData, AdmitConfig> =
            Array::try_from(map).map_err(|source| FastPathError::Map {
                name: ADMIT_CONFIG,
                source,
            })?;
        array
            .set(0, config, 0)
            .map_err(|source| FastPathError::Map {
                name: ADMIT_CONFIG,
                source,
            })
    }

    /// Creates a full bucket under `key` unless one exists: after this only
    /// the programs write it.
    pub fn create_bucket(&mut self, key: BucketKey) -> Result<(), FastPathError> {
        let mut buckets: HashMap<_, BucketKey, Gcra> = self.hash_map(DHCP_BUCKETS)?;
        match buckets.insert(key, Gcra::default(), NOEXIST) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(source) => Err(FastPathError::Map {
                name: DHCP_BUCKETS,
                source,
            }),
        }
    }

    pub fn insert_known(&mut self, mac: [u8; 6]) -> Result<(), FastPathError> {
        let mut known: HashMap<_, MacKey, KnownMac> = self.hash_map(DHCP_KNOWN)?;
        known
            .insert(MacKey::new(mac), KnownMac { flags: 0 }, 0)
            .map_err(|source| FastPathError::Map {
                name: DHCP_KNOWN,
                source,
            })
    }

    pub fn remove_known(&mut self, mac: [u8; 6]) -> Result<(), FastPathError> {
        let mut known: HashMap<_, MacKey, KnownMac> = self.hash_map(DHCP_KNOWN)?;
        match known.remove(&MacKey::new(mac)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(FastPathError::Map {
                name: DHCP_KNOWN,
                source,
            }),
        }
    }
}
