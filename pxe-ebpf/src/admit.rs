//! Admission control: what of a storm or a flood reaches userspace. The
//! limits and their state are `pxe_common::admit`'s; this module holds
//! their maps and applies them to a DHCP request or a TFTP read request
//! that no kernel tier answers.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use pxe_common::{
    admit::{
        AdmitConfig, BucketKey, Gcra, KnownMac, MacKey, SourceKey, DHCP_BUCKETS_CAPACITY,
        DHCP_KNOWN_CAPACITY, NEW_RELAYS, RATE_LRU_CAPACITY,
    },
    counter::Counter,
};

/// The limits; written by the daemon, read by both programs.
#[map]
static ADMIT_CONFIG: Array<AdmitConfig> = Array::with_max_entries(1, 0);

/// MAC → always admitted; written by the daemon only. Not preallocated: a
/// rack's worth is a small part of its capacity.
#[map]
static DHCP_KNOWN: HashMap<MacKey, KnownMac> =
    HashMap::with_max_entries(DHCP_KNOWN_CAPACITY, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Interface and relay → the budget of unknown machines; created by the
/// daemon, written in place by the programs only.
#[map]
static DHCP_BUCKETS: HashMap<BucketKey, Gcra> = HashMap::with_max_entries(DHCP_BUCKETS_CAPACITY, 0);

/// MAC → its DISCOVER rate; created and written by the programs only.
#[map]
static DHCP_MAC_RATE: LruHashMap<MacKey, Gcra> = LruHashMap::with_max_entries(RATE_LRU_CAPACITY, 0);

/// Client address → its RRQ rate; created and written by the programs only.
#[map]
static TFTP_SOURCE_RATE: LruHashMap<SourceKey, Gcra> =
    LruHashMap::with_max_entries(RATE_LRU_CAPACITY, 0);

/// Every RRQ's rate; written by the programs only.
#[map]
static TFTP_GLOBAL_RATE: Array<Gcra> = Array::with_max_entries(1, 0);

/// What admission made of a request.
pub enum Admission {
    /// Not limited here: a known machine, or limits off in this tier.
    Free,
    /// An unknown machine, within its budget.
    Unknown,
    /// Refused: drop it and count this verdict.
    Refused(Counter),
}

/// The limits, if `tier` (`TIER_XDP`, `TIER_TC`) is the one enforcing them.
#[inline(always)]
fn config(tier: u32) -> Option<&'static AdmitConfig> {
    let config = ADMIT_CONFIG.get(0)?;
    (config.tier == tier).then_some(config)
}

/// Admits a DHCP request from `mac` arrived on `ifindex` through relay
/// `giaddr` (0.0.0.0: none) that no template answers.
#[inline(always)]
pub fn dhcp(tier: u32, ifindex: u32, mac: [u8; 6], giaddr: [u8; 4], discover: bool) -> Admission {
    let Some(config) = config(tier) else {
        return Admission::Free;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = MacKey::new(mac);
    // Per MAC first: one machine resending in a loop must not spend its
    // interface's budget for everyone else.
    if discover && !within(&DHCP_MAC_RATE, &key, now, &config.dhcp_mac_discover) {
        return Admission::Refused(Counter::DROP_DHCP_MAC_OVER_RATE);
    }
    // SAFETY: the value is only tested for presence, never read.
    if unsafe { DHCP_KNOWN.get(key).is_some() } {
        return Admission::Free;
    }
    let bucket = DHCP_BUCKETS
        .get_ptr_mut(BucketKey { ifindex, giaddr })
        .or_else(|| {
            if giaddr == [0; 4] {
                return None;
            }
            DHCP_BUCKETS.get_ptr_mut(BucketKey {
                ifindex,
                giaddr: NEW_RELAYS,
            })
        });
    let Some(bucket) = bucket else {
        // An interface the daemon set no budget for.
        return Admission::Free;
    };
    // SAFETY: a value pointer the lookup just returned; the daemon never
    // removes an entry while the programs run on its interface.
    if unsafe { (*bucket).admit(now, &config.dhcp_unknown) } {
        Admission::Unknown
    } else {
        Admission::Refused(Counter::DROP_DHCP_UNKNOWN_OVER_RATE)
    }
}

/// Admits a packet to port 69 (a read request, as a rule) from `source`.
#[inline(always)]
pub fn tftp_request(tier: u32, source: [u8; 4]) -> Admission {
    let Some(config) = config(tier) else {
        return Admission::Free;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // Per source first, as for DHCP: one noisy host does not spend the
    // budget of all.
    if !within(
        &TFTP_SOURCE_RATE,
        &SourceKey { ip: source },
        now,
        &config.tftp_source,
    ) {
        return Admission::Refused(Counter::DROP_TFTP_SOURCE_OVER_RATE);
    }
    let Some(global) = TFTP_GLOBAL_RATE.get_ptr_mut(0) else {
        return Admission::Free;
    };
    // SAFETY: the array's only value, always present.
    if unsafe { (*global).admit(now, &config.tftp_global) } {
        Admission::Free
    } else {
        Admission::Refused(Counter::DROP_TFTP_OVER_RATE)
    }
}

/// Takes a packet from `key`'s bucket in a least-recently-used map,
/// starting a full one for a key not seen lately. True if admitted.
#[inline(always)]
fn within<K>(map: &LruHashMap<K, Gcra>, key: &K, now: u64, rate: &pxe_common::admit::Rate) -> bool {
    if rate.interval_ns == 0 {
        return true;
    }
    if let Some(state) = map.get_ptr_mut(key) {
        // SAFETY: a value pointer the lookup just returned.
        return unsafe { (*state).admit(now, rate) };
    }
    let mut fresh = Gcra::default();
    let admitted = fresh.admit(now, rate);
    // A full map evicts its least recently used entry; a failed insert
    // only means this key starts full again next time.
    let _ = map.insert(key, fresh, 0);
    admitted
}
