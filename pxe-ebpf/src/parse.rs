//! Header parsing over untrusted packet memory: Ethernet (with at most one
//! 802.1Q tag), IPv4 (any IHL, whole datagrams only) and UDP.
//!
//! Every read goes through [`ptr_at`], the one bounds check the verifier needs
//! to see. Nothing here decides what to do with a packet beyond naming it with
//! a [`Counter`]; the programs in `main.rs` act on that.

use core::mem::size_of;

use pxe_common::{
    consts::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, IPPROTO_UDP, TFTP_OP_ACK, TFTP_PORT},
    counter::{classify_udp, is_well_known, Counter},
    hdr::{EthHdr, Ipv4Hdr, UdpHdr, VlanHdr},
};

/// The packet bytes a program may read: `[start, end)` as the context gives them.
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

/// Returns a pointer to a `T` at `offset` if all of it lies inside the frame.
///
/// The comparison against `end` is what the verifier tracks to accept the
/// dereference, so it must stay in this form: packet pointer plus offset plus
/// size, compared with `data_end`.
#[inline(always)]
pub fn ptr_at<T>(frame: &Frame, offset: usize) -> Option<*const T> {
    if frame.start + offset + size_of::<T>() > frame.end {
        return None;
    }
    Some((frame.start + offset) as *const T)
}

/// The byte at a variable `offset` (at least 1). It is read together with
/// the byte before it: LLVM turns a one-byte bounds check into `ptr >=
/// end`, from which the verifier grants no readable byte.
#[inline(always)]
pub fn byte_at(frame: &Frame, offset: usize) -> Option<u8> {
    let pair = ptr_at::<[u8; 2]>(frame, offset - 1)?;
    // SAFETY: ptr_at checked both bytes lie inside the frame.
    Some(unsafe { (*pair)[1] })
}

/// Where the headers of a whole UDP datagram start.
#[derive(Clone, Copy)]
pub struct UdpOffsets {
    pub l3: usize,
    pub l4: usize,
}

/// What the parser made of a frame.
pub struct Classified {
    /// Exactly one per frame.
    pub verdict: Counter,
    /// The frame carried one 802.1Q/802.1ad tag.
    pub vlan_tagged: bool,
    /// Set for a whole, well-formed IPv4 UDP datagram.
    pub udp: Option<UdpOffsets>,
}

impl Classified {
    const fn pass(verdict: Counter, vlan_tagged: bool) -> Self {
        Self {
            verdict,
            vlan_tagged,
            udp: None,
        }
    }
}

/// Names the frame. `is_transfer_port` says whether a UDP destination port
/// belongs to a running TFTP transfer (a map lookup the caller owns); it is
/// only asked for ports that are not well known.
#[inline(always)]
pub fn classify(frame: &Frame, is_transfer_port: impl Fn(u16) -> bool) -> Classified {
    let Some(eth) = ptr_at::<EthHdr>(frame, 0) else {
        return Classified::pass(Counter::PASS_TRUNCATED, false);
    };
    // SAFETY: ptr_at checked that the Ethernet header lies inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type() };
    let mut l3_offset = EthHdr::LEN;
    let mut vlan_tagged = false;

    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let Some(tag) = ptr_at::<VlanHdr>(frame, l3_offset) else {
            return Classified::pass(Counter::PASS_TRUNCATED, true);
        };
        // SAFETY: ptr_at checked that the tag lies inside the frame.
        ether_type = unsafe { (*tag).ether_type() };
        l3_offset += VlanHdr::LEN;
        vlan_tagged = true;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            return Classified::pass(Counter::PASS_STACKED_VLAN, true);
        }
    }
    if ether_type != ETH_P_IPV4 {
        return Classified::pass(Counter::PASS_NOT_IPV4, vlan_tagged);
    }

    let Some(ip) = ptr_at::<Ipv4Hdr>(frame, l3_offset) else {
        return Classified::pass(Counter::PASS_TRUNCATED, vlan_tagged);
    };
    // SAFETY: ptr_at checked that the fixed IPv4 header lies inside the frame.
    let ip = unsafe { *ip };
    let header_len = ip.header_len();
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN || header_len > ip.total_len() as usize {
        return Classified::pass(Counter::PASS_BAD_IPV4_HEADER, vlan_tagged);
    }
    if ip.is_fragment() {
        return Classified::pass(Counter::PASS_FRAGMENT, vlan_tagged);
    }
    if ip.proto != IPPROTO_UDP {
        return Classified::pass(Counter::PASS_NOT_UDP, vlan_tagged);
    }

    // header_len is at most 60 (four bits of words), so the verifier sees a
    // bounded variable offset here.
    let l4_offset = l3_offset + header_len;
    let Some(udp) = ptr_at::<UdpHdr>(frame, l4_offset) else {
        return Classified::pass(Counter::PASS_TRUNCATED, vlan_tagged);
    };
    if (ip.total_len() as usize) < header_len + UdpHdr::LEN {
        // The datagram, as IPv4 describes it, ends inside the UDP header.
        return Classified::pass(Counter::PASS_TRUNCATED, vlan_tagged);
    }
    // SAFETY: ptr_at checked that the UDP header lies inside the frame.
    let dst_port = unsafe { (*udp).dst_port() };
    let transfer = if dst_port == TFTP_PORT {
        // A transfer on one port: its ACKs come to 69 too.
        ptr_at::<[u8; 2]>(frame, l4_offset + UdpHdr::LEN)
            // SAFETY: ptr_at checked the two bytes lie inside the frame.
            .is_some_and(|op| u16::from_be_bytes(unsafe { *op }) == TFTP_OP_ACK)
    } else {
        !is_well_known(dst_port) && is_transfer_port(dst_port)
    };
    Classified {
        verdict: classify_udp(dst_port, transfer),
        vlan_tagged,
        udp: Some(UdpOffsets {
            l3: l3_offset,
            l4: l4_offset,
        }),
    }
}

/// Hides a value from LLVM so the bounds checks that follow stay in the
/// program: LLVM can prove them redundant from earlier arithmetic and drop
/// them, but the verifier sees only the registers, not that proof.
#[inline(always)]
pub fn opaque(value: u64) -> u64 {
    // SAFETY: a read of a local through a valid pointer.
    unsafe { core::ptr::read_volatile(&value) }
}
