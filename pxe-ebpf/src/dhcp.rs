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
        keep_bytes, mix, option_word, shape_bit, AnswerEntry, AnswerKey, BOOTP_CHADDR,
        BOOTP_CIADDR, BOOTP_FLAGS, BOOTP_GIADDR, BOOTP_HEAD_LEN, BOOTP_MAGIC, BOOTP_OP,
        BOOTP_OPTIONS, BOOTP_XID, DHCPACK, DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, FLAG_BROADCAST,
        MAGIC_COOKIE, MAX_OPTION_ITEMS, MAX_REPLY_LEN, MAX_SHAPE_OPTION_LEN, OPT_END,
        OPT_MESSAGE_TYPE, OPT_OVERLOAD, OPT_PAD, OPT_RELAY_AGENT, OPT_REQUESTED_IP, OPT_SERVER_ID,
        PORT_KIND_DHCP, PORT_KIND_PROXY, SIGNATURE_SEED,
    },
    hdr::{EthHdr, Ipv4Hdr, UdpHdr},
};

use crate::{
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
    Reply(Reply),
}

/// What the reply needs from the request's options. Kept in the per-CPU
/// scratch value, not on the stack: the verifier tracks stack values
/// exactly, and every combination of options seen would be a state of the
/// option walk to explore again (past its million-instruction budget).
#[repr(C)]
pub struct Options {
    signature: u64,
    /// Offset of the next option in the frame.
    cursor: u64,
    /// Bits of the shape options seen (`shape_bit`).
    seen: u32,
    msg_type: u8,
    has_requested_ip: u8,
    has_server_id: u8,
    _pad: u8,
    requested_ip: [u8; 4],
    server_id: [u8; 4],
}

/// This CPU's working memory for one request.
#[repr(C)]
pub struct Scratch {
    pub prefix: Prefix,
    pub options: Options,
}

/// Decides on a DHCP request (UDP to 67 or 4011) at `off`, arrived on
/// `ifindex`. `unanswered` is the port's verdict when no template applies.
#[inline(always)]
pub fn plan(
    frame: &Frame,
    off: UdpOffsets,
    ifindex: u32,
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
    if udp_len < UdpHdr::LEN + BOOTP_OPTIONS + 1
        || udp_len > UdpHdr::LEN + MAX_REQUEST_LEN
        || ip.total_len() as usize != Ipv4Hdr::LEN + udp_len
    {
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
    if !read_options(frame, bootp + BOOTP_OPTIONS, end, opts) {
        return Plan::Pass(Counter::PASS_DHCP_UNPARSED);
    }
    if opts.msg_type != DHCPDISCOVER && opts.msg_type != DHCPREQUEST {
        return Plan::Pass(unanswered);
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
    let Some(entry) = answers.get_ptr_mut(&key) else {
        return Plan::Pass(unanswered);
    };
    // SAFETY: a map value pointer the lookup just returned.
    let e = unsafe { &*entry };
    let (ciaddr, giaddr) = (fixed.ciaddr, fixed.giaddr);
    if !decided(e, &opts, ciaddr, giaddr) {
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
fn decided(e: &AnswerEntry, opts: &Options, ciaddr: [u8; 4], giaddr: [u8; 4]) -> bool {
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

/// Walks the options in `[at, end)` into `opts`: message type, requested
/// address, server identifier and the shape signature. False for anything
/// the kernel does not answer (see `PASS_DHCP_UNPARSED`).
#[inline(always)]
fn read_options(frame: &Frame, start: usize, end: usize, opts: &mut Options) -> bool {
    set(&mut opts.cursor, start as u64);
    set(&mut opts.signature, SIGNATURE_SEED);
    set(&mut opts.seen, 0);
    set(&mut opts.msg_type, 0);
    set(&mut opts.has_requested_ip, 0);
    set(&mut opts.has_server_id, 0);
    for _ in 0..MAX_OPTION_ITEMS {
        // Read back from memory, the offset is the same unknown to the
        // verifier on every pass, so it checks the body once, not once per
        // combination of option lengths; the bound is what it needs.
        let at = get(&opts.cursor) as usize;
        if at >= end || at > MAX_REQUEST_LEN + 64 {
            return true;
        }
        let Some(code) = byte_at(frame, at) else {
            return false;
        };
        if code == OPT_END {
            return true;
        }
        if code == OPT_PAD {
            set(&mut opts.cursor, (at + 1) as u64);
            continue;
        }
        let Some(len) = byte_at(frame, at + 1) else {
            return false;
        };
        let len = len as usize;
        let data = at + 2;
        if data + len > end || !read_option(frame, code, len, data, opts) {
            return false;
        }
        set(&mut opts.cursor, (data + len) as u64);
    }
    // More items than the kernel walks: userspace reads them.
    false
}

/// Takes in one option; false if the kernel must not answer its request.
#[inline(always)]
fn read_option(frame: &Frame, code: u8, len: usize, data: usize, opts: &mut Options) -> bool {
    match code {
        OPT_OVERLOAD | OPT_RELAY_AGENT => false,
        OPT_MESSAGE_TYPE if len == 1 => byte_at(frame, data)
            .map(|t| set(&mut opts.msg_type, t))
            .is_some(),
        OPT_REQUESTED_IP if len == 4 => match ptr_at::<[u8; 4]>(frame, data) {
            Some(ip) => {
                // SAFETY: ptr_at checked the four bytes lie inside the frame.
                set(&mut opts.requested_ip, unsafe { *ip });
                set(&mut opts.has_requested_ip, 1);
                true
            }
            None => false,
        },
        OPT_SERVER_ID if len == 4 => match ptr_at::<[u8; 4]>(frame, data) {
            Some(ip) => {
                // SAFETY: as above.
                set(&mut opts.server_id, unsafe { *ip });
                set(&mut opts.has_server_id, 1);
                true
            }
            None => false,
        },
        OPT_MESSAGE_TYPE | OPT_REQUESTED_IP | OPT_SERVER_ID => false,
        _ => {
            let bit = shape_bit(code);
            if bit == 0 {
                return true;
            }
            let seen = get(&opts.seen);
            if seen & bit != 0 || len > MAX_SHAPE_OPTION_LEN {
                return false;
            }
            set(&mut opts.seen, seen | bit);
            match mix_option(frame, get(&opts.signature), code, len, data) {
                Some(h) => {
                    set(&mut opts.signature, h);
                    true
                }
                None => false,
            }
        }
    }
}

/// Stores into scratch memory for real (LLVM would otherwise keep the value
/// in a register, where the verifier tracks it again).
#[inline(always)]
fn set<T>(field: &mut T, value: T) {
    // SAFETY: a valid, aligned field of the scratch value.
    unsafe { core::ptr::write_volatile(field, value) }
}

#[inline(always)]
fn get<T: Copy>(field: &T) -> T {
    // SAFETY: as in `set`.
    unsafe { core::ptr::read_volatile(field) }
}

/// Mixes one shape option (≤ 32 bytes at `data`) into the signature. Every
/// read ends inside the option: a datagram may end right after it (with
/// its END), so bytes past it may not exist. A last word shorter than
/// eight bytes is read as the eight bytes ending with the option, shifted
/// down: the same value as its bytes followed by zeros.
#[inline(always)]
fn mix_option(frame: &Frame, mut h: u64, code: u8, len: usize, data: usize) -> Option<u64> {
    h = mix(h, option_word(code, len as u8));
    for i in 0..(MAX_SHAPE_OPTION_LEN / 8) {
        let from = i * 8;
        if from >= len {
            break;
        }
        let left = len - from;
        let word = if left >= 8 {
            let at = opaque((data + from) as u64) as usize;
            if at > MAX_REQUEST_LEN + 64 {
                return None;
            }
            // SAFETY: ptr_at checks the eight bytes lie inside the frame.
            u64::from_le_bytes(unsafe { *ptr_at::<[u8; 8]>(frame, at)? })
        } else {
            // The option starts at least 242 bytes into the frame, so the
            // eight bytes before its end exist. (The offset is hidden from
            // LLVM, which would otherwise fold this bounds check into an
            // earlier one the verifier cannot relate it to.)
            let at = opaque((data + len - 8) as u64) as usize;
            if at > MAX_REQUEST_LEN + 64 {
                return None;
            }
            // SAFETY: as above.
            let tail = u64::from_le_bytes(unsafe { *ptr_at::<[u8; 8]>(frame, at)? });
            tail >> ((8 - left) * 8)
        };
        h = mix(h, keep_bytes(word, left as u64));
    }
    Some(h)
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
    sum += if msg_type_at % 2 == 0 {
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
