//! IPv4 + UDP datagrams as a raw IP socket sees them: for receiving DHCP on
//! port 67 when another server holds that port, and sending replies from it.

use std::net::Ipv4Addr;

use pxe_common::csum;

const IPV4_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;
const DEFAULT_TTL: u8 = 64;

/// One UDP datagram, borrowed from the packet it arrived in.
#[derive(Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: &'a [u8],
}

/// Splits an IPv4 packet into its UDP datagram. `None` for anything else:
/// not IPv4, not UDP, a fragment, or lengths that disagree with the bytes.
pub fn parse(packet: &[u8]) -> Option<Datagram<'_>> {
    let first = *packet.first()?;
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < IPV4_MIN_HEADER || packet.len() < header_len + UDP_HEADER {
        return None;
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff; // MF flag and offset
    if packet[9] != PROTO_UDP
        || fragment != 0
        || total_len < header_len + UDP_HEADER
        || total_len > packet.len()
    {
        return None;
    }
    let udp = &packet[header_len..total_len];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER || udp_len > udp.len() {
        return None;
    }
    Some(Datagram {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        payload: &udp[UDP_HEADER..udp_len],
    })
}

/// An IPv4 packet carrying `d` as UDP, both checksums filled in. `None` if
/// the payload does not fit one packet.
pub fn build(d: &Datagram<'_>) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(UDP_HEADER + d.payload.len()).ok()?;
    let total_len = udp_len.checked_add(IPV4_MIN_HEADER as u16)?;
    let mut packet = Vec::with_capacity(usize::from(total_len));
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, don't fragment
    packet.extend_from_slice(&[DEFAULT_TTL, PROTO_UDP, 0, 0]);
    packet.extend_from_slice(&d.src.octets());
    packet.extend_from_slice(&d.dst.octets());
    let ip_checksum = csum::checksum(&[&packet[..IPV4_MIN_HEADER]]);
    packet[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

    packet.extend_from_slice(&d.src_port.to_be_bytes());
    packet.extend_from_slice(&d.dst_port.to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(d.payload);
    let udp_checksum =
        csum::udp_checksum(d.src.octets(), d.dst.octets(), &packet[IPV4_MIN_HEADER..]);
    packet[IPV4_MIN_HEADER + 6..IPV4_MIN_HEADER + 8].copy_from_slice(&udp_checksum.to_be_bytes());
    Some(packet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxe_common::csum::{checksum, udp_pseudo_header};

    fn sample(payload: &[u8]) -> Datagram<'_> {
        Datagram {
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::BROADCAST,
            src_port: 67,
            dst_port: 68,
            payload,
        }
    }

    #[test]
    fn a_built_packet_parses_back_and_both_checksums_verify() {
        let payload = b"odd-length payload";
        let packet = build(&sample(payload)).unwrap();
        assert_eq!(parse(&packet), Some(sample(payload)));
        assert_eq!(
            checksum(&[&packet[..20]]),
            0,
            "the IPv4 header sums to zero"
        );
        let pseudo = udp_pseudo_header(
            packet[12..16].try_into().unwrap(),
            packet[16..20].try_into().unwrap(),
            u16::from_be_bytes([packet[24], packet[25]]),
        );
        assert_eq!(
            checksum(&[&pseudo, &packet[20..]]),
            0,
            "the UDP checksum verifies"
        );
    }

    #[test]
    fn ip_options_are_skipped_and_trailing_link_padding_ignored() {
        let mut packet = build(&sample(b"hi")).unwrap();
        packet.splice(20..20, [1, 1, 1, 1]); // four NOP options
        packet[0] = 0x46;
        let total = (packet.len() as u16).to_be_bytes();
        packet[2..4].copy_from_slice(&total);
        packet.extend_from_slice(&[0; 6]); // Ethernet minimum-frame padding
        assert_eq!(parse(&packet).unwrap().payload, b"hi");
    }

    #[test]
    fn fragments_other_protocols_and_inconsistent_lengths_are_refused() {
        let good = build(&sample(b"payload")).unwrap();
        let refused = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut p = good.clone();
            edit(&mut p);
            parse(&p).is_none()
        };
        assert!(refused(&|p| p[6] |= 0x20), "more fragments");
        assert!(refused(&|p| p[7] = 1), "a later fragment");
        assert!(refused(&|p| p[9] = 6), "TCP");
        assert!(refused(&|p| p[0] = 0x65), "IPv6 version nibble");
        assert!(refused(&|p| p[0] = 0x44), "header shorter than 20");
        assert!(refused(&|p| p[3] = 0xff), "total length beyond the bytes");
        assert!(refused(&|p| p[25] = 4), "UDP length below its header");
        assert!(refused(&|p| p[25] = 0xff), "UDP length beyond the packet");
        assert!(refused(&|p| p.truncate(27)), "truncated UDP header");
        for n in 0..good.len() {
            let _ = parse(&good[..n]); // never panics
        }
    }
}
