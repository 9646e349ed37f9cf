//! Wire headers as byte-array structs (alignment 1, no padding), so the BPF
//! programs can overlay them on unaligned packet memory and both sides read the
//! same layout. Getters convert from network order.

use bytemuck::{Pod, Zeroable};

/// Ethernet II header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

impl EthHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();

    pub const fn ether_type(&self) -> u16 {
        u16::from_be_bytes(self.ether_type)
    }
}

/// The four bytes an 802.1Q tag adds after the source MAC: tag control, then
/// the EtherType of what follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

impl VlanHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();

    pub const fn vlan_id(&self) -> u16 {
        u16::from_be_bytes(self.tci) & 0x0fff
    }

    pub const fn ether_type(&self) -> u16 {
        u16::from_be_bytes(self.ether_type)
    }
}

/// IPv4 header without options (RFC 791 §3.1). Options, if any, follow it:
/// use [`Ipv4Hdr::header_len`], never [`Ipv4Hdr::LEN`], to find the payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Length of the fixed part; also the smallest valid header.
    pub const LEN: usize = core::mem::size_of::<Self>();
    /// Largest header: IHL is four bits of 32-bit words.
    pub const MAX_LEN: usize = 60;

    const MORE_FRAGMENTS: u16 = 0x2000;
    const OFFSET_MASK: u16 = 0x1fff;

    pub const fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// Header length in bytes as the IHL field claims it (0 to 60).
    pub const fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    pub const fn total_len(&self) -> u16 {
        u16::from_be_bytes(self.tot_len)
    }

    /// True for any piece of a fragmented datagram: the first one (more
    /// fragments set) as well as the rest (non-zero offset). Only a whole
    /// datagram carries a UDP header we can trust.
    pub const fn is_fragment(&self) -> bool {
        let f = u16::from_be_bytes(self.frag_off);
        f & (Self::MORE_FRAGMENTS | Self::OFFSET_MASK) != 0
    }
}

/// UDP header (RFC 768).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

impl UdpHdr {
    pub const LEN: usize = core::mem::size_of::<Self>();

    pub const fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.src)
    }

    pub const fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst)
    }
}

const _: () = assert!(EthHdr::LEN == 14);
const _: () = assert!(VlanHdr::LEN == 4);
const _: () = assert!(Ipv4Hdr::LEN == 20);
const _: () = assert!(UdpHdr::LEN == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_fields_read_in_network_order() {
        let mut h = Ipv4Hdr::zeroed();
        h.version_ihl = 0x46;
        h.tot_len = [0x01, 0x2c];
        assert_eq!(h.version(), 4);
        assert_eq!(h.header_len(), 24);
        assert_eq!(h.total_len(), 300);
    }

    #[test]
    fn fragments_are_recognised_by_flag_or_offset() {
        let mut h = Ipv4Hdr::zeroed();
        h.frag_off = [0x40, 0x00]; // don't fragment: a whole datagram
        assert!(!h.is_fragment());
        h.frag_off = [0x20, 0x00]; // first fragment
        assert!(h.is_fragment());
        h.frag_off = [0x00, 0x10]; // later fragment
        assert!(h.is_fragment());
    }
}
