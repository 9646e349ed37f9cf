//! What the kernel programs count, defined once for both sides.
//!
//! Every packet a program sees ends in exactly one *verdict* counter, so the
//! verdicts add up to the packets seen. A verdict's prefix says what became
//! of the packet, its name why:
//!
//! - `PASS_*`: it went on untouched, to the stack (XDP to TC, TC to userspace);
//! - `TX_*`, `REDIRECT_*`: it was answered (`XDP_TX`; a TC redirect);
//! - `DROP_*`: it was dropped on purpose (`XDP_DROP`, `TC_ACT_SHOT`);
//! - `ABORTED_*`: `XDP_ABORTED`, a failure after the frame was already
//!   rewritten (also reported by the `xdp:xdp_exception` tracepoint).
//!
//! `SEEN_*` counters are observations counted in addition to the verdict.
//!
//! No Rust `enum` crosses the boundary (reading an invalid discriminant from a
//! map would be undefined behaviour): a counter is a transparent index.

use crate::consts::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT, PXE_PROXY_PORT, TFTP_PORT};

/// Index into a program's per-CPU counter array.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Counter(pub u32);

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $idx:literal,)+) => {
        impl Counter {
            $($(#[doc = $doc])* pub const $name: Counter = Counter($idx);)+

            /// Every counter with its name, in index order.
            pub const ALL: &'static [(Counter, &'static str)] = &[$((Counter::$name, stringify!($name)),)+];
        }
    };
}

counters! {
    /// Neither IPv4 nor one 802.1Q tag followed by IPv4 (ARP, IPv6, LLDP, ...).
    PASS_NOT_IPV4 = 0,
    /// Two or more VLAN tags (QinQ): not a network we serve on.
    PASS_STACKED_VLAN = 1,
    /// The frame ends inside the Ethernet, VLAN, IPv4 or UDP header.
    PASS_TRUNCATED = 2,
    /// IPv4 header that cannot be right: version not 4, IHL under 5 words, or
    /// a header longer than the total length or the frame.
    PASS_BAD_IPV4_HEADER = 3,
    /// A fragment: only whole datagrams carry a trustworthy UDP header.
    PASS_FRAGMENT = 4,
    /// IPv4 but not UDP.
    PASS_NOT_UDP = 5,
    /// UDP for a port that is none of ours.
    PASS_OTHER_UDP = 6,
    /// UDP to 67: a client's or a relay's DHCP request with no reply
    /// template in the kernel (a new client or shape, or kernel DHCP off).
    PASS_DHCP_TO_SERVER = 7,
    /// UDP to 68: a DHCP reply (ours seen on the wire, or another server's).
    PASS_DHCP_TO_CLIENT = 8,
    /// UDP to 4011: PXE boot server discovery (proxyDHCP) with no reply
    /// template in the kernel.
    PASS_PROXY_DHCP = 9,
    /// UDP to 69: a TFTP request (RRQ/WRQ) to start a transfer.
    PASS_TFTP_REQUEST = 10,
    /// UDP to a registered TFTP transfer port that the kernel tiers do not
    /// serve (not an ACK, no kernel session, IP options, an image not
    /// ready): for userspace.
    PASS_TFTP_TRANSFER = 11,
    /// ACK of a lockstep session answered with the next DATA built in place: `XDP_TX`.
    TX_TFTP_DATA = 12,
    /// ACK answered with the next DATA (the next window's, as clones and the
    /// redirected skb) by the TC tier.
    REDIRECT_TFTP_DATA = 13,
    /// Duplicate or stale ACK of a kernel session: dropped, never a resend
    /// (RFC 1123 §4.2.3.1, Sorcerer's Apprentice).
    DROP_TFTP_STALE_ACK = 14,
    /// ACK whose next window would reach the final block, or of the final
    /// one: the short last block and the end of the transfer are userspace's.
    PASS_TFTP_LAST_BLOCKS = 15,
    /// XDP could not grow the frame (no tailroom, e.g. veth): left to TC.
    PASS_TFTP_NO_TAILROOM = 16,
    /// ACK of a windowed session at XDP, which can send one frame per ACK:
    /// left to TC, which sends the whole window.
    PASS_TFTP_WINDOWED = 17,
    /// DISCOVER or REQUEST answered in place from its client's template: `XDP_TX`.
    TX_DHCP_REPLY = 18,
    /// DISCOVER or REQUEST answered from its client's template by the TC
    /// tier (skb resized, redirected out of the interface it came in on).
    REDIRECT_DHCP_REPLY = 19,
    /// A template exists, but not for this request: another message type,
    /// another address or server, a different relay, or the lease's
    /// durable horizon has passed. For userspace.
    PASS_DHCP_NOT_DECIDED = 20,
    /// A DHCP request the kernel does not read: IP options, malformed BOOTP,
    /// option overload, relay agent information, a long or repeated shape
    /// option, too many options, or bytes the program cannot see. For userspace.
    PASS_DHCP_UNPARSED = 21,
    /// XDP could not resize the frame, or may not transmit on this
    /// interface: left to TC.
    PASS_DHCP_TO_TC = 22,
    /// XDP had grown the ACK but could not write the DATA frame into it:
    /// aborted, so a half-built frame never goes on (userspace's timer
    /// resends the block).
    ABORTED_TFTP_HALF_BUILT = 23,
    /// TC had grown the skb but could not write or clone a block of the
    /// window: dropped, never sent half-built. The blocks already cloned
    /// out are recorded; userspace's timer sends the rest.
    DROP_TFTP_HALF_BUILT = 24,
    /// TC could not grow the skb into a DATA frame: left to userspace.
    PASS_TFTP_RESIZE_FAILED = 25,
    /// XDP had resized the request but could not write the reply into it:
    /// aborted, so a half-built frame never goes on (the client retries).
    ABORTED_DHCP_HALF_BUILT = 26,
    /// TC had resized the skb but could not write the reply into it:
    /// dropped, never sent half-built (the client retries).
    DROP_DHCP_HALF_BUILT = 27,
    /// TC could not resize the skb into the reply: left to userspace.
    PASS_DHCP_RESIZE_FAILED = 28,
    /// A DHCP request from a MAC pxed does not know, past its interface's
    /// or relay's budget for unknown machines: dropped (see `admit`).
    DROP_DHCP_UNKNOWN_OVER_RATE = 29,
    /// A DISCOVER from a MAC sending them faster than the per-MAC limit:
    /// dropped.
    DROP_DHCP_MAC_OVER_RATE = 30,
    /// A TFTP read request from a client address past its own budget of
    /// new transfers: dropped (the firmware sends it again).
    DROP_TFTP_SOURCE_OVER_RATE = 31,
    /// A TFTP read request past the server's budget of new transfers:
    /// dropped (the firmware sends it again).
    DROP_TFTP_OVER_RATE = 32,
    /// Observation: the frame carried one 802.1Q tag (counted besides its verdict).
    SEEN_VLAN_TAG = 33,
    /// Observation: a DHCP request from a MAC pxed does not know was
    /// admitted within its budget (counted besides its verdict).
    SEEN_DHCP_UNKNOWN_ADMITTED = 34,
}

impl Counter {
    /// Length of a counter array.
    pub const COUNT: u32 = 35;

    /// The counter's name, e.g. `PASS_TFTP_REQUEST`.
    pub fn name(self) -> &'static str {
        match Self::ALL.get(self.0 as usize) {
            Some((_, name)) => name,
            None => "UNKNOWN",
        }
    }

    /// True for verdicts (exactly one per packet), false for observations.
    pub fn is_verdict(self) -> bool {
        self.0 < Counter::SEEN_VLAN_TAG.0
    }
}

/// Verdict for a whole, well-formed UDP datagram by its destination port.
/// `transfer` says whether it belongs to a TFTP transfer: its port is one
/// userspace registered as a running transfer's server side (a map lookup
/// only the kernel side can make), or it is an ACK to port 69 (transfers
/// on one port).
pub const fn classify_udp(dst_port: u16, transfer: bool) -> Counter {
    match dst_port {
        DHCP_SERVER_PORT => Counter::PASS_DHCP_TO_SERVER,
        DHCP_CLIENT_PORT => Counter::PASS_DHCP_TO_CLIENT,
        PXE_PROXY_PORT => Counter::PASS_PROXY_DHCP,
        _ if transfer => Counter::PASS_TFTP_TRANSFER,
        TFTP_PORT => Counter::PASS_TFTP_REQUEST,
        _ => Counter::PASS_OTHER_UDP,
    }
}

/// True when `dst_port` is a well-known port, so no transfer-port lookup is needed.
pub const fn is_well_known(dst_port: u16) -> bool {
    matches!(
        dst_port,
        DHCP_SERVER_PORT | DHCP_CLIENT_PORT | PXE_PROXY_PORT | TFTP_PORT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_is_dense_and_complete() {
        assert_eq!(Counter::ALL.len() as u32, Counter::COUNT);
        for (i, (c, _)) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.0 as usize, i, "{} is out of place", c.name());
        }
    }

    #[test]
    fn every_verdict_is_named_for_what_became_of_the_packet() {
        const OUTCOMES: &[&str] = &["PASS_", "TX_", "REDIRECT_", "DROP_", "ABORTED_"];
        for (c, name) in Counter::ALL.iter().filter(|(c, _)| c.is_verdict()) {
            assert!(
                OUTCOMES.iter().any(|o| name.starts_with(o)),
                "{name} ({c:?}) says nothing of the packet's fate"
            );
        }
    }

    #[test]
    fn only_seen_counters_are_observations() {
        for (c, name) in Counter::ALL {
            assert_eq!(c.is_verdict(), !name.starts_with("SEEN_"), "{name}");
        }
    }

    #[test]
    fn udp_ports_classify_to_their_protocol() {
        let cases = [
            (67, false, Counter::PASS_DHCP_TO_SERVER),
            (68, false, Counter::PASS_DHCP_TO_CLIENT),
            (4011, false, Counter::PASS_PROXY_DHCP),
            (69, false, Counter::PASS_TFTP_REQUEST),
            (69, true, Counter::PASS_TFTP_TRANSFER),
            (50000, true, Counter::PASS_TFTP_TRANSFER),
            (50000, false, Counter::PASS_OTHER_UDP),
            (53, false, Counter::PASS_OTHER_UDP),
        ];
        for (port, transfer, want) in cases {
            assert_eq!(
                classify_udp(port, transfer),
                want,
                "port {port} transfer={transfer}"
            );
        }
    }
}
