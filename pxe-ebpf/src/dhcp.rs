//! DHCP answered from templates: a DISCOVER or REQUEST whose answer the
//! daemon already decided (same client, interface, port and request shape)
//! is answered with the daemon's own reply, patched with the request's xid,
//! flags, ciaddr and message type. See `pxe_common::dhcp`.
//!
//! [`plan`] reads the request and decides; the tiers in `main.rs` write the
//! reply with their own helpers. Anything this module does not fully
//! understand passes to userspace untouched: the kernel never answers what
//! the daemon might answer differently.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    maps::{HashMap, PerCpuArray},
};
use pxe_common::{
    consts::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT, PXE_PROXY_PORT},
    counter::Counter,
    dhcp::{
        AnswerEntry, AnswerKey, OptionWalk, RequestBytes, BOOTP_CHADDR, BOOTP_CIADDR, BOOTP_FLAGS,
        BOOTP_GIADDR, BOOTP_HEAD_LEN, BOOTP_MAGIC, BOOTP_OP, BOOTP_OPTIONS, BOOTP_XID, DHCPACK,
        DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, FLAG_BROADCAST, MAGIC_COOKIE, MAX_REPLY_LEN,
        PORT_KIND_DHCP, PORT_KIND_PROXY,
    },
    hdr::{EthHdr, Ipv4Hdr, UdpHdr},
};

use crate::{
    admit::{self, Admission},
    csum::{fold, ip_header_sum, ne},
    parse::{byte_at, opaque, ptr_at, Frame, UdpOffsets},
};

/// Largest request the kernel reads: a BOOTP message in one 1500-byte frame.
const MAX_REQUEST_LEN: usize = 1472;

/// The reply's IPv4 and UDP headers and the BOOTP fixed part up to chaddr,
/// built in a per-CPU scratch value; the template's rest is copied from
/// its map value after it.
#[repr(C)]
pub struct Prefix {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub head: [u8; BOOTP_HEAD_LEN],
}

pub const PREFIX_LEN: usize = core::mem::size_of::<Prefix>();

/// A decided reply, ready for a tier to write.
pub struct Reply {
    pub entry: *mut AnswerEntry,
    /// Destination and source MAC.
    pub macs: [u8; 12],
    /// The built headers, in the per-CPU scratch value.
    pub prefix: *mut Prefix,
    /// OFFER or ACK, and where its byte goes in the BOOTP message.
    pub msg_type: u8,
    pub msg_type_at: u32,
    /// BOOTP bytes of the template (> BOOTP_HEAD_LEN, ≤ MAX_REPLY_LEN).
    pub len: u32,
    /// Offset of the IPv4 header (after Ethernet and any VLAN tag, kept as they are).
    pub l3: usize,
    pub frame_len: usize,
    /// The interface lets XDP transmit (see `AnswerEntry::xdp_tx`).
    pub xdp_tx: bool,
}

pub enum Plan {
    Pass(Counter),
    /// Passed, from a machine pxed does not know, within its budget.
    Admitted(Counter),
    /// Refused by admission control: drop it, count this.
    Drop(Counter),
    Reply(Reply),
}

/// This CPU's working memory for one request.
#[repr(C)]
pub struct Scratch {
    pub prefix: Prefix,
    pub options: OptionWalk,
}

/// Decides on a DHCP request (UDP to 67 or 4011) at `off`, arrived on
/// `ifindex`. `unanswered` is the port's verdict when no template applies;
/// such a request is then put to admission control if `tier` enforces it.
#[inline(always)]
pub fn plan(
    frame: &Frame,
    off: UdpOffsets,
    ifindex: u32,
    tier: u32,
    answers: &HashMap<AnswerKey, AnswerEntry>,
    scratch: &PerCpuArray<Scratch>,
    unanswered: Counter,
) -> Plan {
    if off.l4 != off.l3 + Ipv4Hdr::LEN {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    }
    let (Some(eth), Some(ip), Some(udp)) = (
        ptr_at::<EthHdr>(frame, 0),
        ptr_at::<Ipv4Hdr>(frame, off.l3),
        ptr_at::<UdpHdr>(frame, off.l4),
    ) else {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    };
    // SAFETY: ptr_at checked each header lies inside the frame.
    let (eth, ip, udp) = unsafe { (*eth, *ip, *udp) };
    let udp_len = u16::from_be_bytes(udp.len) as usize;
    let bootp = off.l4 + UdpHdr::LEN;
    #[expect(
        clippy::manual_range_contains,
        reason = "two plain comparisons, which the verifier reads as bounds on udp_len"
    )]
    let outside =
        udp_len < UdpHdr::LEN + BOOTP_OPTIONS + 1 || udp_len > UdpHdr::LEN + MAX_REQUEST_LEN;
    if outside || ip.total_len() as usize != Ipv4Hdr::LEN + udp_len {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    }
    let end = bootp + udp_len - UdpHdr::LEN;
    let Some(fixed) = read_fixed(frame, bootp) else {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    };
    let Some(work) = scratch.get_ptr_mut(0) else {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    };
    // SAFETY: this CPU's scratch value; nothing else runs on it meanwhile.
    let (prefix, opts) = unsafe { (&mut (*work).prefix as *mut Prefix, &mut (*work).options) };
    let admitted = |discover: bool, verdict: Counter| match admit::dhcp(
        tier,
        ifindex,
        fixed.mac,
        fixed.giaddr,
        discover,
    ) {
        Admission::Free => Plan::Pass(verdict),
        Admission::Unknown => Plan::Admitted(verdict),
        Admission::Refused(refused) => Plan::Drop(refused),
    };
    if !opts.walk(frame, bootp + BOOTP_OPTIONS, end) {
        return admitted(false, Counter::PASS_DHCP_UNPARSED);
    }
    if opts.msg_type != DHCPDISCOVER && opts.msg_type != DHCPREQUEST {
        return admitted(false, unanswered);
    }
    let proxy = udp.dst_port() == PXE_PROXY_PORT;
    let key = AnswerKey {
        signature: opts.signature,
        ifindex,
        mac: fixed.mac,
        port_kind: if proxy {
            PORT_KIND_PROXY
        } else {
            PORT_KIND_DHCP
        },
        _pad: [0; 5],
    };
    let Some(entry) = answers.get_ptr_mut(key) else {
        return admitted(opts.msg_type == DHCPDISCOVER, unanswered);
    };
    // SAFETY: a map value pointer the lookup just returned.
    let e = unsafe { &*entry };
    let (ciaddr, giaddr) = (fixed.ciaddr, fixed.giaddr);
    if !decided(e, opts, ciaddr, giaddr) {
        return Plan::Pass(Counter::PASS_DHCP_NOT_DECIDED);
    }
    let len = e.len as usize;
    let msg_type_at = e.msg_type_at as usize;
    if len <= BOOTP_HEAD_LEN
        || len > MAX_REPLY_LEN
        || msg_type_at <= BOOTP_OPTIONS
        || msg_type_at >= len
    {
        return Plan::Pass(Counter::PASS_DHCP_NOT_DECIDED);
    }
    let flags = fixed.flags;
    let broadcast = u16::from_be_bytes(flags) & FLAG_BROADCAST != 0;
    let is_discover = opts.msg_type == DHCPDISCOVER;

    // Where the reply goes (RFC 2131 §4.1), as the daemon sends it.
    let (dst_mac, dst_ip, dst_port, src_port) = if proxy {
        (eth.src, ip.src, udp.src, PXE_PROXY_PORT)
    } else if giaddr != [0; 4] {
        (
            eth.src,
            giaddr,
            DHCP_SERVER_PORT.to_be_bytes(),
            DHCP_SERVER_PORT,
        )
    } else if ciaddr != [0; 4] && !broadcast {
        (
            eth.src,
            ciaddr,
            DHCP_CLIENT_PORT.to_be_bytes(),
            DHCP_SERVER_PORT,
        )
    } else {
        (
            [0xff; 6],
            [0xff; 4],
            DHCP_CLIENT_PORT.to_be_bytes(),
            DHCP_SERVER_PORT,
        )
    };

    // SAFETY: the scratch value's prefix, borrowed once here.
    let p = unsafe { &mut *prefix };
    // The template's fixed part with the request's xid, flags and (ACK) ciaddr.
    p.head.copy_from_slice(&e.reply[..BOOTP_HEAD_LEN]);
    p.head[BOOTP_XID..BOOTP_XID + 4].copy_from_slice(&fixed.xid);
    p.head[BOOTP_FLAGS..BOOTP_FLAGS + 2].copy_from_slice(&flags);
    let reply_ciaddr = if is_discover { [0; 4] } else { ciaddr };
    p.head[BOOTP_CIADDR..BOOTP_CIADDR + 4].copy_from_slice(&reply_ciaddr);
    let msg_type = if is_discover { DHCPOFFER } else { DHCPACK };

    let udp_len = (UdpHdr::LEN + len) as u16;
    p.ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (Ipv4Hdr::LEN as u16 + udp_len).to_be_bytes(),
        id: [0, 0],
        frag_off: [0x40, 0],
        ttl: 64,
        proto: ip.proto,
        check: [0, 0],
        src: e.server_ip,
        dst: dst_ip,
    };
    p.ip.check = fold(ip_header_sum(&p.ip)).to_ne_bytes();
    p.udp = UdpHdr {
        src: src_port.to_be_bytes(),
        dst: dst_port,
        len: udp_len.to_be_bytes(),
        check: [0, 0],
    };
    p.udp.check = udp_checksum(p, e.sum, msg_type, msg_type_at).to_ne_bytes();

    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst_mac);
    macs[6..].copy_from_slice(&e.server_mac);
    Plan::Reply(Reply {
        entry,
        macs,
        prefix,
        msg_type,
        msg_type_at: msg_type_at as u32,
        len: len as u32,
        l3: off.l3,
        frame_len: off.l3 + PREFIX_LEN + (len - BOOTP_HEAD_LEN),
        xdp_tx: e.xdp_tx != 0,
    })
}

/// Is this the request the template answers, now?
#[inline(always)]
fn decided(e: &AnswerEntry, opts: &OptionWalk, ciaddr: [u8; 4], giaddr: [u8; 4]) -> bool {
    if giaddr != e.giaddr {
        return false;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if opts.msg_type == DHCPDISCOVER {
        return now <= e.offer_until_ns;
    }
    if now > e.ack_until_ns {
        return false;
    }
    if e.yiaddr == [0; 4] {
        // Boot information only: no address to agree on.
        return true;
    }
    // SELECTING and INIT-REBOOT name the address in option 50, RENEWING and
    // REBINDING in ciaddr; SELECTING names the server it chose.
    let wanted = if opts.has_requested_ip != 0 {
        opts.requested_ip
    } else {
        ciaddr
    };
    wanted == e.yiaddr && (opts.has_server_id == 0 || opts.server_id == e.server_ip)
}

/// The frame as the shared option walk reads it. Offsets are hidden from
/// LLVM and bounded again before each read: LLVM would otherwise fold a
/// bounds check into an earlier one the verifier cannot relate it to.
impl RequestBytes for Frame {
    const MAX_OFFSET: usize = MAX_REQUEST_LEN + 64;

    #[inline(always)]
    fn byte(&self, at: usize) -> Option<u8> {
        byte_at(self, at)
    }

    #[inline(always)]
    fn four(&self, at: usize) -> Option<[u8; 4]> {
        // SAFETY: ptr_at checked the four bytes lie inside the frame.
        ptr_at::<[u8; 4]>(self, at).map(|p| unsafe { *p })
    }

    #[inline(always)]
    fn word(&self, at: usize) -> Option<u64> {
        let at = opaque(at as u64) as usize;
        if at > Self::MAX_OFFSET {
            return None;
        }
        // SAFETY: ptr_at checks the eight bytes lie inside the frame.
        Some(u64::from_le_bytes(unsafe { *ptr_at::<[u8; 8]>(self, at)? }))
    }
}

/// What a reply takes from the request's fixed part.
struct Fixed {
    xid: [u8; 4],
    flags: [u8; 2],
    ciaddr: [u8; 4],
    giaddr: [u8; 4],
    mac: [u8; 6],
}

/// Reads the BOOTP fixed part at `bootp`: an Ethernet BOOTREQUEST with the
/// DHCP magic cookie, or `None`. One bounds check covers all of it (the
/// verifier does not follow LLVM in merging several).
#[inline(always)]
fn read_fixed(frame: &Frame, bootp: usize) -> Option<Fixed> {
    let base = ptr_at::<[u8; BOOTP_OPTIONS]>(frame, bootp)? as *const u8;
    // SAFETY: every read below lies inside the BOOTP_OPTIONS bytes checked above.
    unsafe {
        let at = |offset: usize| base.add(offset);
        let kind = *(at(BOOTP_OP) as *const [u8; 3]);
        let magic = *(at(BOOTP_MAGIC) as *const [u8; 4]);
        if kind != [1, 1, 6] || magic != MAGIC_COOKIE {
            return None;
        }
        Some(Fixed {
            xid: *(at(BOOTP_XID) as *const [u8; 4]),
            flags: *(at(BOOTP_FLAGS) as *const [u8; 2]),
            ciaddr: *(at(BOOTP_CIADDR) as *const [u8; 4]),
            giaddr: *(at(BOOTP_GIADDR) as *const [u8; 4]),
            mac: *(at(BOOTP_CHADDR) as *const [u8; 6]),
        })
    }
}

/// The UDP checksum of the reply: the template's sum (patched fields
/// zeroed), the patched fields, the UDP header and the pseudo-header.
#[inline(always)]
fn udp_checksum(p: &Prefix, template_sum: u32, msg_type: u8, msg_type_at: usize) -> u16 {
    let h = &p.head;
    let mut sum = template_sum as u64;
    sum += ne(h[BOOTP_XID], h[BOOTP_XID + 1]) + ne(h[BOOTP_XID + 2], h[BOOTP_XID + 3]);
    sum += ne(h[BOOTP_FLAGS], h[BOOTP_FLAGS + 1]);
    sum += ne(h[BOOTP_CIADDR], h[BOOTP_CIADDR + 1]) + ne(h[BOOTP_CIADDR + 2], h[BOOTP_CIADDR + 3]);
    sum += if msg_type_at.is_multiple_of(2) {
        ne(msg_type, 0)
    } else {
        ne(0, msg_type)
    };
    sum += ne(p.ip.src[0], p.ip.src[1]) + ne(p.ip.src[2], p.ip.src[3]);
    sum += ne(p.ip.dst[0], p.ip.dst[1]) + ne(p.ip.dst[2], p.ip.dst[3]);
    sum += ne(0, p.ip.proto) + ne(p.udp.len[0], p.udp.len[1]);
    sum += ne(p.udp.src[0], p.udp.src[1])
        + ne(p.udp.dst[0], p.udp.dst[1])
        + ne(p.udp.len[0], p.udp.len[1]);
    let check = fold(sum);
    // RFC 768: a computed zero goes on the wire as all ones.
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// Counts a reply the kernel sent from `reply`'s entry.
#[inline(always)]
pub fn answered(reply: &Reply) {
    // SAFETY: the entry pointer came from the map lookup in `plan`.
    unsafe { (*reply.entry).answered += 1 };
}
