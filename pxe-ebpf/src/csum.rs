//! Internet checksums (RFC 1071) as the programs compute them: 16-bit words
//! summed in memory order, folded with a constant loop bound.

use pxe_common::hdr::Ipv4Hdr;

/// A 16-bit word as it sits in memory, for native-order ones' complement sums.
#[inline(always)]
pub fn ne(a: u8, b: u8) -> u64 {
    u16::from_ne_bytes([a, b]) as u64
}

#[inline(always)]
pub fn ip_header_sum(ip: &Ipv4Hdr) -> u64 {
    ne(ip.version_ihl, ip.tos)
        + ne(ip.tot_len[0], ip.tot_len[1])
        + ne(ip.id[0], ip.id[1])
        + ne(ip.frag_off[0], ip.frag_off[1])
        + ne(ip.ttl, ip.proto)
        + ne(ip.src[0], ip.src[1])
        + ne(ip.src[2], ip.src[3])
        + ne(ip.dst[0], ip.dst[1])
        + ne(ip.dst[2], ip.dst[3])
}

/// The fold is the daemon's too: one definition in pxe-common.
pub use pxe_common::csum::{difference, fold};
