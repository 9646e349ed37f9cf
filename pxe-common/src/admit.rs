//! Admission control in the programs: which DHCP requests and TFTP read
//! requests reach userspace during a storm or a flood.
//!
//! Every limit is a GCRA (the generic cell rate algorithm, a token bucket
//! kept as one timestamp): a [`Rate`] written by the daemon, a [`Gcra`]
//! state written by the programs. No division and no second field to keep
//! consistent with the first, which suits a program that may run on every
//! CPU at once: two CPUs racing on one state can both admit a packet the
//! bucket had room for once, never more than one per CPU.
//!
//! What is limited, and what never is:
//! - DHCP from MACs in [`DHCP_KNOWN`] (reservations, inventory machines,
//!   live leases, held offers) is always admitted.
//! - DHCP from other MACs is admitted at [`AdmitConfig::dhcp_unknown`] per
//!   interface (requests with no relay) and per relay, each with its own
//!   bucket in [`DHCP_BUCKETS`].
//! - DISCOVERs from one MAC, known or not, at [`AdmitConfig::dhcp_mac_discover`]
//!   ([`DHCP_MAC_RATE`]): a machine stuck in a loop does not eat its
//!   interface's budget.
//! - TFTP read requests (port 69) at [`AdmitConfig::tftp_source`] per
//!   client address ([`TFTP_SOURCE_RATE`]) and [`AdmitConfig::tftp_global`]
//!   in all ([`TFTP_GLOBAL_RATE`]). Transfers already running are never
//!   limited: their packets go to other ports, or are ACKs.
//!
//! A refused request is dropped and counted: silence makes firmware send it
//! again (an ERROR would make some abort the boot).

use bytemuck::{Pod, Zeroable};

/// One entry, [`AdmitConfig`]; written by the daemon, read by both programs.
/// All zero (the object's initial value) admits everything.
pub const ADMIT_CONFIG: &str = "ADMIT_CONFIG";
/// [`MacKey`] → [`KnownMac`]: the machines always admitted; written by the
/// daemon only.
pub const DHCP_KNOWN: &str = "DHCP_KNOWN";
/// [`BucketKey`] → [`Gcra`]: the budget of unknown machines per interface
/// and relay. The daemon creates each entry (zeroed: a full bucket) for the
/// interfaces it serves and the relays it has answered; only the programs
/// write it after that.
pub const DHCP_BUCKETS: &str = "DHCP_BUCKETS";
/// [`MacKey`] → [`Gcra`], least recently used out first: DISCOVERs per MAC;
/// written by the programs only.
pub const DHCP_MAC_RATE: &str = "DHCP_MAC_RATE";
/// [`SourceKey`] → [`Gcra`], least recently used out first: RRQs per client
/// address; written by the programs only.
pub const TFTP_SOURCE_RATE: &str = "TFTP_SOURCE_RATE";
/// One entry, [`Gcra`]: all RRQs; written by the programs only.
pub const TFTP_GLOBAL_RATE: &str = "TFTP_GLOBAL_RATE";

/// Machines [`DHCP_KNOWN`] holds at most; past it, a machine is admitted as
/// unknown ones are (the daemon says so once).
pub const DHCP_KNOWN_CAPACITY: u32 = 1 << 20;
/// Interfaces and relays with a bucket of their own; relays past it share
/// their interface's bucket for relays not yet answered.
pub const DHCP_BUCKETS_CAPACITY: u32 = 4096;
/// MACs and client addresses whose rate is followed at once.
pub const RATE_LRU_CAPACITY: u32 = 65_536;

/// The bucket key of requests through relays the daemon has not answered
/// yet (their giaddr has no bucket): one per interface, so a flood with
/// made-up relay addresses shares one budget.
pub const NEW_RELAYS: [u8; 4] = [255; 4];

/// How fast a limit refills and how much it holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Rate {
    /// Nanoseconds per admitted packet (1e9 / rate); 0: unlimited.
    pub interval_ns: u64,
    /// How far ahead of now the state may run: (burst - 1) intervals.
    pub tolerance_ns: u64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        interval_ns: 0,
        tolerance_ns: 0,
    };

    /// `per_second` packets a second on average, `burst` at once from a
    /// full bucket. A rate of 0 or less is unlimited; `burst` is at least 1.
    pub fn new(per_second: f64, burst: u32) -> Rate {
        if per_second.is_nan() || per_second <= 0.0 {
            return Self::UNLIMITED;
        }
        let interval_ns = (1e9 / per_second).clamp(1.0, u64::MAX as f64 / 2.0) as u64;
        let extra = u64::from(burst.max(1) - 1);
        Rate {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(extra),
        }
    }
}

/// The state of one limit: the theoretical arrival time, when the bucket
/// is full again (0: full now).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Gcra {
    pub tat_ns: u64,
}

impl Gcra {
    /// Admits a packet arriving at `now_ns` (CLOCK_MONOTONIC) if the bucket
    /// has room, and takes it from the bucket; a refusal takes nothing.
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, rate: &Rate) -> bool {
        if rate.interval_ns == 0 {
            return true;
        }
        let tat = if self.tat_ns > now_ns {
            self.tat_ns
        } else {
            now_ns
        };
        if tat - now_ns > rate.tolerance_ns {
            return false;
        }
        self.tat_ns = tat + rate.interval_ns;
        true
    }
}

/// Value of [`ADMIT_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AdmitConfig {
    /// Requests from MACs not in [`DHCP_KNOWN`], per interface and per relay.
    pub dhcp_unknown: Rate,
    /// DISCOVERs from any one MAC.
    pub dhcp_mac_discover: Rate,
    /// New TFTP transfers (RRQs to port 69) from any one client address.
    pub tftp_source: Rate,
    /// New TFTP transfers in all.
    pub tftp_global: Rate,
    /// Which program enforces the limits ([`TIER_XDP`], [`TIER_TC`]; 0:
    /// none). Exactly one may: a packet XDP passes reaches TC too, and must
    /// not be taken from its buckets twice.
    pub tier: u32,
    pub _pad: u32,
}

/// [`AdmitConfig::tier`]: the XDP program enforces the limits.
pub const TIER_XDP: u32 = 1;
/// [`AdmitConfig::tier`]: the TC program does (XDP is off).
pub const TIER_TC: u32 = 2;

/// Key of [`DHCP_KNOWN`] and [`DHCP_MAC_RATE`]: chaddr's first six bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct MacKey {
    pub mac: [u8; 6],
    /// Explicit: the kernel hashes all eight bytes.
    pub _pad: [u8; 2],
}

impl MacKey {
    pub const fn new(mac: [u8; 6]) -> Self {
        Self { mac, _pad: [0; 2] }
    }
}

/// Value of [`DHCP_KNOWN`]: presence is what counts; `flags` is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KnownMac {
    pub flags: u32,
}

/// Key of [`DHCP_BUCKETS`]: the interface a request came in on and its
/// giaddr (0.0.0.0: no relay; [`NEW_RELAYS`]: relays without a bucket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BucketKey {
    pub ifindex: u32,
    pub giaddr: [u8; 4],
}

/// Key of [`TFTP_SOURCE_RATE`]: the client's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceKey {
    pub ip: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Rate>() == 16);
const _: () = assert!(core::mem::size_of::<AdmitConfig>() == 72);
const _: () = assert!(core::mem::size_of::<MacKey>() == 8);
const _: () = assert!(core::mem::size_of::<BucketKey>() == 8);

crate::impl_aya_pod!(
    Rate,
    Gcra,
    AdmitConfig,
    MacKey,
    KnownMac,
    BucketKey,
    SourceKey
);

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_full_bucket_admits_its_burst_then_refuses() {
        let rate = Rate::new(10.0, 5);
        let mut g = Gcra::default();
        let now = 100 * SECOND;
        let admitted = (0..20).filter(|_| g.admit(now, &rate)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn it_refills_at_its_rate() {
        let rate = Rate::new(10.0, 1);
        let mut g = Gcra::default();
        let t0 = 100 * SECOND;
        assert!(g.admit(t0, &rate));
        assert!(!g.admit(t0 + SECOND / 20, &rate), "half an interval later");
        assert!(g.admit(t0 + SECOND / 10, &rate), "one interval later");
        // Over ten seconds at ten a second, a hundred, give or take one.
        let mut admitted = 0;
        for ms in 0..10_000u64 {
            if g.admit(t0 + SECOND + ms * 1_000_000, &rate) {
                admitted += 1;
            }
        }
        assert!((99..=101).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_refusal_takes_nothing_from_the_bucket() {
        let rate = Rate::new(1.0, 2);
        let mut g = Gcra::default();
        let t0 = 10 * SECOND;
        assert!(g.admit(t0, &rate) && g.admit(t0, &rate));
        for _ in 0..1000 {
            assert!(!g.admit(t0, &rate));
        }
        assert!(g.admit(t0 + SECOND, &rate), "a second refills one");
    }

    #[test]
    fn zero_or_negative_rates_are_unlimited() {
        for rate in [
            Rate::new(0.0, 10),
            Rate::new(-1.0, 10),
            Rate::new(f64::NAN, 1),
        ] {
            let mut g = Gcra::default();
            assert!((0..1000).all(|_| g.admit(SECOND, &rate)));
        }
        let mut g = Gcra::default();
        assert!(g.admit(0, &AdmitConfig::zeroed().dhcp_unknown));
    }
}
