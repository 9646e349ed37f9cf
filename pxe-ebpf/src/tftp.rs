//! The TFTP fast path: an ACK of a kernel session is answered with the next
//! window of DATA blocks (one block in lockstep), built from the image chunks
//! userspace mapped in.
//!
//! Both tiers share the decision ([`plan`]), the header values and the
//! checksums; they differ only in how they grow the frame and send it:
//! XDP grows in place and returns `XDP_TX` (one frame per ACK, so lockstep
//! only), TC grows the skb, sends all but the last block of a window as
//! clones and redirects the skb itself with the last.
//!
//! What stays with userspace: the request and option negotiation, the first
//! window, the window that reaches the final (short) block and the final
//! ACK, every retransmission (its timer counts from the `sent_ns` of the
//! kernel's last window and uses the round trip measured here), and
//! anything that is not a plain ACK of a known session.
//!
//! The programs read a session's `SessionConfig` and write only its
//! `SessionProgress` (one writer per field: see `pxe_common::maps`).

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_ktime_get_ns},
    maps::{Array, HashMap},
};
use pxe_common::{
    counter::Counter,
    hdr::{EthHdr, Ipv4Hdr, UdpHdr},
    maps::{
        ChunkSums, ImageEntry, SessionConfig, SessionKey, SessionProgress, CHUNK_SIZE,
        CHUNK_STRIDE, MAX_FAST_BLKSIZE, MAX_KERNEL_WINDOW, SUMS_PER_CHUNK, SUM_GRAIN,
    },
};

use crate::{
    csum::{difference, fold, ip_header_sum, ne},
    parse::{opaque, ptr_at, Frame, UdpOffsets},
};

/// TFTP opcodes (RFC 1350).
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
/// Length of an ACK's UDP payload: opcode and block.
const ACK_LEN: usize = 4;
/// TFTP header of a DATA packet.
const TFTP_HDR: usize = 4;

/// The blocks to build: `acked + 1 ..= acked + count`, all full-sized.
pub struct Build {
    /// The session's progress entry, which `sent` advances.
    pub progress: *mut SessionProgress,
    /// The block the ACK acknowledged (wide index).
    pub acked: u32,
    /// Blocks to send: the session's window.
    pub count: u32,
    /// Block length: ≤ MAX_FAST_BLKSIZE, a multiple of 4.
    pub blksize: u32,
    /// Length of each DATA frame.
    pub frame_len: usize,
    image: ImageEntry,
    /// The ACK's headers, which the replies' are derived from.
    eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
}

/// One DATA frame of a [`Build`].
pub struct Block {
    pub chunk: *const [u8; CHUNK_SIZE as usize],
    /// Offset of the block in its chunk (< CHUNK_STRIDE).
    pub at: u32,
    pub blksize: u32,
    /// Ethernet, IPv4, UDP and TFTP headers of the frame, already final.
    pub headers: Headers,
}

/// The reply's headers up to the TFTP block number, built on the stack from
/// the ACK's: addresses and ports swapped, lengths and checksums set.
#[repr(C)]
pub struct Headers {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub tftp: [u8; TFTP_HDR],
}

pub const HEADERS_LEN: usize = core::mem::size_of::<Headers>();

pub enum Plan {
    /// Not the fast path's: this counter says why, the packet goes on.
    Pass(Counter),
    /// A duplicate or stale ACK: dropped.
    Drop,
    Build(Build),
}

/// Decides what to do with a transfer packet whose UDP header is at `off`,
/// for a tier that can send up to `max_window` frames per ACK. Only untagged
/// frames whose IPv4 header has no options are rebuilt.
#[inline(always)]
pub fn plan(
    frame: &Frame,
    off: UdpOffsets,
    sessions: &HashMap<SessionKey, SessionConfig>,
    progress: &HashMap<SessionKey, SessionProgress>,
    images: &Array<ImageEntry>,
    max_window: u32,
) -> Plan {
    if off.l3 != EthHdr::LEN || off.l4 != EthHdr::LEN + Ipv4Hdr::LEN {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    }
    let (Some(eth), Some(ip), Some(udp), Some(ack)) = (
        ptr_at::<EthHdr>(frame, 0),
        ptr_at::<Ipv4Hdr>(frame, off.l3),
        ptr_at::<UdpHdr>(frame, off.l4),
        ptr_at::<[u8; ACK_LEN]>(frame, off.l4 + UdpHdr::LEN),
    ) else {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    };
    // SAFETY: ptr_at checked each header lies inside the frame.
    let (eth, ip, udp, ack) = unsafe { (*eth, *ip, *udp, *ack) };
    if u16::from_be_bytes([ack[0], ack[1]]) != OP_ACK
        || u16::from_be_bytes(udp.len) as usize != UdpHdr::LEN + ACK_LEN
    {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    }
    let block = u16::from_be_bytes([ack[2], ack[3]]);
    let key = SessionKey {
        client_ip: ip.src,
        client_port: udp.src,
        server_port: udp.dst,
    };
    // SAFETY: a copy of the value the lookup just found; the daemon
    // replaces configs whole, never in place.
    let Some(config) = (unsafe { sessions.get(key) }).copied() else {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    };
    let Some(progress_ptr) = progress.get_ptr_mut(key) else {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    };
    // SAFETY: a map value pointer the lookup just returned.
    let s = unsafe { &mut *progress_ptr };
    s.adopt(&config);
    let window = config.window;
    if window > max_window {
        // XDP sends one frame per ACK: a window is TC's to send.
        return Plan::Pass(Counter::PASS_TFTP_WINDOWED);
    }
    if window == 0 || window > MAX_KERNEL_WINDOW {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    }
    // Blocks in flight are last_sent - window + 1 ..= last_sent; an ACK of
    // one of them (16-bit numbers, rolled over) acknowledges everything up to
    // it, and the next window starts after it (RFC 7440 §4). Anything older
    // is a duplicate: dropped, never a resend.
    let behind = (s.last_sent as u16).wrapping_sub(block) as u32;
    if behind >= window || behind > s.last_sent {
        s.dup_acks += 1;
        return Plan::Drop;
    }
    let acked = s.last_sent - behind;
    if acked + window >= config.blocks {
        // The window would reach the final block (short or empty):
        // userspace's, with the end of the transfer.
        return Plan::Pass(Counter::PASS_TFTP_LAST_BLOCKS);
    }
    let blksize = config.blksize;
    if blksize == 0 || blksize > MAX_FAST_BLKSIZE || blksize % 4 != 0 {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    }
    let Some(image) = images.get(config.image) else {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    };
    if image.ready == 0 {
        return Plan::Pass(Counter::PASS_TFTP_TRANSFER);
    }
    Plan::Build(Build {
        progress: progress_ptr,
        acked,
        count: window,
        blksize,
        frame_len: HEADERS_LEN + blksize as usize,
        image: *image,
        eth,
        ip,
        udp,
    })
}

impl Build {
    /// The `i`-th frame of the window (block `acked + 1 + i`), or `None` if
    /// its bytes are not where the image says.
    #[inline(always)]
    pub fn block(
        &self,
        chunks: &Array<[u8; CHUNK_SIZE as usize]>,
        sums: &Array<ChunkSums>,
        i: u32,
    ) -> Option<Block> {
        let index = self.acked + 1 + i;
        let (chunk_index, at) = self.image.locate((index - 1) * self.blksize);
        if chunk_index >= self.image.first_chunk + self.image.chunks || at >= CHUNK_STRIDE {
            return None;
        }
        let chunk = chunks.get_ptr(chunk_index)?;
        let payload_sum = match sums.get_ptr(chunk_index) {
            Some(sums) => grained_checksum(chunk, sums, at, self.blksize)?,
            None => payload_checksum(chunk, at, self.blksize)? as u64,
        };
        let headers = reply_headers(
            &self.eth,
            &self.ip,
            &self.udp,
            index as u16,
            self.blksize,
            payload_sum,
        );
        Some(Block {
            chunk,
            at,
            blksize: self.blksize,
            headers,
        })
    }
}

/// Ones' complement sum of the block's bytes from the chunk's running sums:
/// the bytes between the first and the last grain boundary inside the block
/// are the difference of two sums, and only the ends (under a grain each)
/// are summed here. Summing all 1,468 bytes was most of the cost of a DATA
/// frame (docs/BENCHMARKS.md, the XDP program per packet).
#[inline(always)]
fn grained_checksum(
    chunk: *const [u8; CHUNK_SIZE as usize],
    sums: *const ChunkSums,
    at: u32,
    blksize: u32,
) -> Option<u64> {
    let end = at + blksize;
    let first = at.div_ceil(SUM_GRAIN);
    let last = end / SUM_GRAIN;
    if last <= first {
        // A block shorter than two grains: summed whole.
        return payload_checksum(chunk, at, blksize).map(u64::from);
    }
    // Bounds for the verifier, which cannot follow the arithmetic above:
    // each end starts inside the chunk and is shorter than a grain.
    let at = opaque(at as u64);
    let head = opaque((first * SUM_GRAIN - at as u32) as u64);
    let tail_at = opaque((last * SUM_GRAIN) as u64);
    let tail = opaque((end - last * SUM_GRAIN) as u64);
    let (first, last) = (opaque(first as u64), opaque(last as u64));
    if at >= CHUNK_STRIDE as u64
        || head >= SUM_GRAIN as u64
        || tail_at > (CHUNK_SIZE - SUM_GRAIN) as u64
        || tail >= SUM_GRAIN as u64
        || first >= SUMS_PER_CHUNK as u64
        || last >= SUMS_PER_CHUNK as u64
    {
        return None;
    }
    let base = chunk as *const u8;
    let ends = csum(base, at, head, 0)?;
    let ends = csum(base, tail_at, tail, ends)?;
    // SAFETY: a map value pointer from the lookup; both indices are bounded above.
    let (to_last, to_first) = unsafe { ((*sums)[last as usize], (*sums)[first as usize]) };
    Some(u64::from(ends) + u64::from(difference(to_last, to_first)))
}

/// Ones' complement sum of the block's bytes, in the kernel's native-order
/// representation. `bpf_csum_diff` takes at most 512 bytes a call, so the
/// block is summed in three pieces at constant offsets (1468 = 512 + 512 +
/// 444): with `at < CHUNK_STRIDE`, each piece provably ends inside the chunk,
/// which is what the verifier checks (it cannot relate two variables).
#[inline(always)]
fn payload_checksum(chunk: *const [u8; CHUNK_SIZE as usize], at: u32, blksize: u32) -> Option<u32> {
    let at = opaque(at as u64);
    if at >= CHUNK_STRIDE as u64 {
        return None;
    }
    let blksize = opaque(blksize as u64);
    if blksize > MAX_FAST_BLKSIZE as u64 {
        return None;
    }
    let base = chunk as *const u8;
    let first = if blksize > 512 { 512 } else { blksize };
    let mut sum = csum(base, at, first, 0)?;
    if blksize > 512 {
        let second = if blksize - 512 > 512 {
            512
        } else {
            blksize - 512
        };
        sum = csum(base, at + 512, second, sum)?;
    }
    if blksize > 1024 {
        let third = blksize - 1024;
        if third > (MAX_FAST_BLKSIZE - 1024) as u64 {
            return None;
        }
        sum = csum(base, at + 1024, third, sum)?;
    }
    Some(sum)
}

#[inline(always)]
fn csum(base: *const u8, offset: u64, len: u64, seed: u32) -> Option<u32> {
    // SAFETY: callers bound offset + len inside the chunk (see payload_checksum).
    let from = unsafe { base.add(offset as usize) } as *mut u32;
    // SAFETY: a read-only checksum over `len` bytes of map memory.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, from, len as u32, seed) };
    (r >= 0).then_some(r as u32)
}

/// The DATA reply's headers from the ACK's.
#[inline(always)]
fn reply_headers(
    eth: &EthHdr,
    ip: &Ipv4Hdr,
    udp: &UdpHdr,
    block: u16,
    blksize: u32,
    payload_sum: u64,
) -> Headers {
    let udp_len = (UdpHdr::LEN + TFTP_HDR) as u16 + blksize as u16;
    let mut out = Headers {
        eth: EthHdr {
            dst: eth.src,
            src: eth.dst,
            ether_type: eth.ether_type,
        },
        ip: Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0,
            tot_len: (Ipv4Hdr::LEN as u16 + udp_len).to_be_bytes(),
            id: [0, 0],
            frag_off: [0x40, 0], // don't fragment: a DATA frame fits the path
            ttl: 64,
            proto: ip.proto,
            check: [0, 0],
            src: ip.dst,
            dst: ip.src,
        },
        udp: UdpHdr {
            src: udp.dst,
            dst: udp.src,
            len: udp_len.to_be_bytes(),
            check: [0, 0],
        },
        tftp: [0, OP_DATA as u8, (block >> 8) as u8, block as u8],
    };
    out.ip.check = fold(ip_header_sum(&out.ip)).to_ne_bytes();
    // UDP checksum: pseudo-header, UDP header, TFTP header, payload.
    let mut sum = payload_sum;
    sum += ne(out.ip.src[0], out.ip.src[1]) + ne(out.ip.src[2], out.ip.src[3]);
    sum += ne(out.ip.dst[0], out.ip.dst[1]) + ne(out.ip.dst[2], out.ip.dst[3]);
    sum += ne(0, out.ip.proto) + ne(out.udp.len[0], out.udp.len[1]);
    sum += ne(out.udp.src[0], out.udp.src[1])
        + ne(out.udp.dst[0], out.udp.dst[1])
        + ne(out.udp.len[0], out.udp.len[1]);
    sum += ne(out.tftp[0], out.tftp[1]) + ne(out.tftp[2], out.tftp[3]);
    let check = fold(sum);
    // RFC 768: a computed zero goes on the wire as all ones.
    out.udp.check = if check == 0 {
        0xffff_u16.to_ne_bytes()
    } else {
        check.to_ne_bytes()
    };
    out
}

/// Records that `count` blocks after `build.acked` went out from `tier`
/// (0: XDP, 1: TC).
#[inline(always)]
pub fn sent(build: &Build, count: u32, tier: u8) {
    // SAFETY: the progress pointer came from the map lookup in `plan`.
    let s = unsafe { &mut *build.progress };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    s.sent_window(build.acked, count, now);
    if tier == 0 {
        s.xdp_sent += count;
    } else {
        s.tc_sent += count;
    }
}
