//! The kernel programs. Each entry point is one line into a body; the bodies
//! parse with `parse.rs`, look up the maps below, count a verdict and act.
//!
//! Both programs classify every packet and pass what is not theirs. An ACK
//! of a kernel TFTP session is answered with the next block (lockstep) by XDP
//! in place (`XDP_TX`) when the frame has tailroom, otherwise by TC (grown
//! skb, redirected out of the same interface); the next window (RFC 7440) by
//! TC, one frame per block. See `tftp.rs`.
//!
//! A DHCP request whose answer userspace already decided (a template for
//! its client and shape) is answered by XDP in place where the frame can be
//! resized and the interface transmits, otherwise by TC. See `dhcp.rs`.
#![no_std]
#![no_main]

mod admit;
mod csum;
mod dhcp;
mod parse;
mod tftp;

use aya_ebpf::{
    bindings::{
        xdp_action, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_clone_redirect, bpf_redirect, bpf_skb_change_tail, bpf_skb_store_bytes,
        bpf_xdp_adjust_tail, bpf_xdp_store_bytes,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use pxe_common::{
    admit::{TIER_TC, TIER_XDP},
    counter::Counter,
    dhcp::{AnswerEntry, AnswerKey, BOOTP_HEAD_LEN, DHCP_ANSWERS_CAPACITY, MAX_REPLY_LEN},
    maps::{
        ChunkSums, ImageEntry, SessionConfig, SessionKey, SessionProgress, TftpPortEntry,
        TftpPortKey, CHUNK_SIZE, CHUNK_STRIDE, IMAGES_CAPACITY, IMAGE_CHUNKS_DEFAULT,
        MAX_FAST_BLKSIZE, MAX_KERNEL_WINDOW, TFTP_PORTS_CAPACITY, TFTP_SESSIONS_CAPACITY,
    },
};

use crate::{
    dhcp::{Reply, Scratch, PREFIX_LEN},
    parse::{classify, opaque, Frame, UdpOffsets},
    tftp::{plan, sent, Block, Plan, HEADERS_LEN},
};

/// `Counter` index → packets; written per CPU by `pxe_ingress`, read by the daemon.
#[map]
static XDP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// `Counter` index → packets; written per CPU by `pxe_tc_ingress`, read by the daemon.
#[map]
static TC_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Server-side TFTP transfer port → entry; written by the daemon when a
/// transfer opens its port, read by both programs.
#[map]
static TFTP_PORTS: HashMap<TftpPortKey, TftpPortEntry> =
    HashMap::with_max_entries(TFTP_PORTS_CAPACITY, 0);

/// Chunk index → boot file bytes; filled by the daemon through mmap, read by
/// both programs. Its size is set when the daemon loads the object.
#[map]
static IMAGE_CHUNKS: Array<[u8; CHUNK_SIZE as usize]> =
    Array::with_max_entries(IMAGE_CHUNKS_DEFAULT, BPF_F_MMAPABLE);

/// Chunk index → running checksums of that chunk; written by the daemon
/// with the chunk, read by both programs. Sized with `IMAGE_CHUNKS`.
#[map]
static CHUNK_SUMS: Array<ChunkSums> = Array::with_max_entries(IMAGE_CHUNKS_DEFAULT, 0);

/// Image id → where its chunks are; written by the daemon, read by both programs.
#[map]
static IMAGES: Array<ImageEntry> = Array::with_max_entries(IMAGES_CAPACITY, 0);

/// Transfer → how the kernel serves it and from which point; written only
/// by the daemon, read by both programs. Not preallocated (as both session
/// maps): an element the daemon replaces or removes is freed only after
/// every program reading or writing it has finished.
#[map]
static TFTP_SESSIONS: HashMap<SessionKey, SessionConfig> =
    HashMap::with_max_entries(TFTP_SESSIONS_CAPACITY, BPF_F_NO_PREALLOC);

/// Transfer → how far the kernel got; written only by both programs, in
/// place (the daemon creates it zeroed and removes it while no config
/// names it).
#[map]
static TFTP_PROGRESS: HashMap<SessionKey, SessionProgress> =
    HashMap::with_max_entries(TFTP_SESSIONS_CAPACITY, BPF_F_NO_PREALLOC);

/// Client, interface, port and request shape → the reply userspace decided;
/// written by the daemon after it answered, read by both programs. Not
/// preallocated: an element replaced by the daemon is freed only after every
/// program reading it has finished.
#[map]
static DHCP_ANSWERS: HashMap<AnswerKey, AnswerEntry> =
    HashMap::with_max_entries(DHCP_ANSWERS_CAPACITY, BPF_F_NO_PREALLOC);

/// Per CPU, the request's options and the reply headers being built: kept
/// off the 512-byte stack and out of the verifier's exact tracking.
#[map]
static DHCP_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of a frame TC pulls into the skb's linear area: a whole DHCP
/// request (headers for everything else).
const MAX_PULL_LEN: usize = 1522;

#[xdp]
pub fn pxe_ingress(ctx: XdpContext) -> u32 {
    handle_xdp(&ctx)
}

#[classifier]
pub fn pxe_tc_ingress(ctx: TcContext) -> i32 {
    handle_tc(&ctx)
}

#[inline(always)]
fn handle_xdp(ctx: &XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let classified = classify(&frame, is_transfer_port);
    let (verdict, action) = match (classified.verdict, classified.udp) {
        (Counter::PASS_TFTP_TRANSFER, Some(off)) => xdp_tftp(ctx, &frame, off),
        (verdict @ (Counter::PASS_DHCP_TO_SERVER | Counter::PASS_PROXY_DHCP), Some(off)) => {
            xdp_dhcp(ctx, &frame, off, verdict)
        }
        (Counter::PASS_TFTP_REQUEST, Some(off)) => match tftp_request(&frame, off, TIER_XDP) {
            Some(refused) => (refused, xdp_action::XDP_DROP),
            None => (Counter::PASS_TFTP_REQUEST, xdp_action::XDP_PASS),
        },
        (verdict, _) => (verdict, xdp_action::XDP_PASS),
    };
    count(&XDP_COUNTERS, verdict, classified.vlan_tagged);
    action
}

/// The XDP tier: grow the ACK into the DATA frame in place and send it back.
#[inline(always)]
fn xdp_tftp(ctx: &XdpContext, frame: &Frame, off: UdpOffsets) -> (Counter, u32) {
    let build = match plan(frame, off, &TFTP_SESSIONS, &TFTP_PROGRESS, &IMAGES, 1) {
        Plan::Pass(counter) => return (counter, xdp_action::XDP_PASS),
        Plan::Drop => return (Counter::DROP_TFTP_STALE_ACK, xdp_action::XDP_DROP),
        Plan::Build(build) => build,
    };
    let Some(block) = build.block(&IMAGE_CHUNKS, &CHUNK_SUMS, 0) else {
        return (Counter::PASS_TFTP_TRANSFER, xdp_action::XDP_PASS);
    };
    let grow = build.frame_len as i32 - (frame.end - frame.start) as i32;
    // SAFETY: the context is the program's own; the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, grow) } != 0 {
        // No tailroom (veth, some drivers): the TC tier builds it from the skb.
        return (Counter::PASS_TFTP_NO_TAILROOM, xdp_action::XDP_PASS);
    }
    if !store_reply(&block, |offset, from, len| {
        // SAFETY: `from` points at `len` readable bytes (the stack headers or
        // a bounded slice of a map value); the helper bounds-checks the frame.
        unsafe { bpf_xdp_store_bytes(ctx.ctx, offset, from, len) }
    }) {
        // The frame has already grown: never let a half-built frame go on.
        return (Counter::ABORTED_TFTP_HALF_BUILT, xdp_action::XDP_ABORTED);
    }
    sent(&build, 1, 0);
    (Counter::TX_TFTP_DATA, xdp_action::XDP_TX)
}

/// The XDP tier of DHCP: resize the request into its reply and send it back.
#[inline(always)]
fn xdp_dhcp(
    ctx: &XdpContext,
    frame: &Frame,
    off: UdpOffsets,
    unanswered: Counter,
) -> (Counter, u32) {
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let reply = match dhcp::plan(
        frame,
        off,
        ifindex,
        TIER_XDP,
        &DHCP_ANSWERS,
        &DHCP_SCRATCH,
        unanswered,
    ) {
        dhcp::Plan::Pass(counter) => return (counter, xdp_action::XDP_PASS),
        dhcp::Plan::Admitted(counter) => {
            bump(&XDP_COUNTERS, Counter::SEEN_DHCP_UNKNOWN_ADMITTED);
            return (counter, xdp_action::XDP_PASS);
        }
        dhcp::Plan::Drop(counter) => return (counter, xdp_action::XDP_DROP),
        dhcp::Plan::Reply(reply) => reply,
    };
    if !reply.xdp_tx {
        return (Counter::PASS_DHCP_TO_TC, xdp_action::XDP_PASS);
    }
    let delta = reply.frame_len as i32 - (frame.end - frame.start) as i32;
    // SAFETY: the context is the program's own; the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return (Counter::PASS_DHCP_TO_TC, xdp_action::XDP_PASS);
    }
    let written = store_dhcp(&reply, |offset, from, len| {
        // SAFETY: `from` points at `len` readable bytes (the stack or a
        // bounded slice of the map value); the helper bounds-checks the frame.
        unsafe { bpf_xdp_store_bytes(ctx.ctx, offset, from, len) }
    });
    if !written {
        // The frame is already resized: never let a half-built frame go on.
        return (Counter::ABORTED_DHCP_HALF_BUILT, xdp_action::XDP_ABORTED);
    }
    dhcp::answered(&reply);
    (Counter::TX_DHCP_REPLY, xdp_action::XDP_TX)
}

/// Writes a DHCP reply over a frame already sized for it: MACs, IPv4, UDP
/// and the BOOTP head from the stack, the rest of the template from its map
/// value, then the message type.
#[inline(always)]
fn store_dhcp(reply: &Reply, store: impl Fn(u32, *mut core::ffi::c_void, u32) -> i64) -> bool {
    let l3 = reply.l3 as u32;
    let macs = &reply.macs as *const _ as *mut core::ffi::c_void;
    let prefix = reply.prefix as *mut core::ffi::c_void;
    if store(0, macs, 12) != 0 || store(l3, prefix, PREFIX_LEN as u32) != 0 {
        return false;
    }
    // Re-establish the bounds for the verifier: the copy stays inside the
    // value's reply array.
    let len = opaque(reply.len as u64);
    if len <= BOOTP_HEAD_LEN as u64 || len > MAX_REPLY_LEN as u64 {
        return false;
    }
    // SAFETY: the entry pointer came from the map lookup in `plan`; the
    // range [BOOTP_HEAD_LEN, len) lies inside its reply array (checked above).
    let rest =
        unsafe { (*reply.entry).reply.as_ptr().add(BOOTP_HEAD_LEN) } as *mut core::ffi::c_void;
    if store(
        l3 + PREFIX_LEN as u32,
        rest,
        (len - BOOTP_HEAD_LEN as u64) as u32,
    ) != 0
    {
        return false;
    }
    let msg_type = &reply.msg_type as *const u8 as *mut core::ffi::c_void;
    let at = l3 + (PREFIX_LEN - BOOTP_HEAD_LEN) as u32 + reply.msg_type_at;
    store(at, msg_type, 1) == 0
}

/// Writes the reply headers, then the block from its chunk. `store` is the
/// tier's helper (offset, source, length) returning 0 on success.
#[inline(always)]
fn store_reply(build: &Block, store: impl Fn(u32, *mut core::ffi::c_void, u32) -> i64) -> bool {
    let headers = &build.headers as *const _ as *mut core::ffi::c_void;
    if store(0, headers, HEADERS_LEN as u32) != 0 {
        return false;
    }
    // Re-establish the bounds the verifier needs at the call: the block
    // starts before CHUNK_STRIDE and is at most MAX_FAST_BLKSIZE long, so it
    // ends inside the chunk (CHUNK_STRIDE + MAX_FAST_BLKSIZE = CHUNK_SIZE).
    let at = opaque(build.at as u64);
    let len = opaque(build.blksize as u64);
    if at >= CHUNK_STRIDE as u64 || len == 0 || len > MAX_FAST_BLKSIZE as u64 {
        return false;
    }
    // SAFETY: [at, at + len) lies inside the chunk, checked just above.
    let from = unsafe { (build.chunk as *const u8).add(at as usize) } as *mut core::ffi::c_void;
    store(HEADERS_LEN as u32, from, len as u32) == 0
}

#[inline(always)]
fn handle_tc(ctx: &TcContext) -> i32 {
    // An skb may hold only part of its headers in the linear area that direct
    // packet access sees; pull them in first (this invalidates earlier packet
    // pointers, so the frame is read afterwards).
    let linear = ctx.data_end() - ctx.data();
    let total = ctx.len() as usize;
    if total > linear && linear < MAX_PULL_LEN {
        let want = if total < MAX_PULL_LEN {
            total
        } else {
            MAX_PULL_LEN
        };
        let _ = ctx.pull_data(want as u32);
    }
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let classified = classify(&frame, is_transfer_port);
    // TC_ACT_UNSPEC is TCX_NEXT: not ours to decide, let the next program or
    // the stack have it.
    let (verdict, action) = match (classified.verdict, classified.udp) {
        (Counter::PASS_TFTP_TRANSFER, Some(off)) => tc_tftp(ctx, &frame, off),
        (verdict @ (Counter::PASS_DHCP_TO_SERVER | Counter::PASS_PROXY_DHCP), Some(off)) => {
            tc_dhcp(ctx, &frame, off, verdict)
        }
        (Counter::PASS_TFTP_REQUEST, Some(off)) => match tftp_request(&frame, off, TIER_TC) {
            Some(refused) => (refused, TC_ACT_SHOT),
            None => (Counter::PASS_TFTP_REQUEST, TC_ACT_UNSPEC),
        },
        (verdict, _) => (verdict, TC_ACT_UNSPEC),
    };
    count(&TC_COUNTERS, verdict, classified.vlan_tagged);
    action
}

/// The TC tier: grow the skb into a DATA frame; send each block of the
/// window but the last as a clone out of the interface the ACK came in on,
/// then rewrite the skb into the last block and redirect it.
#[inline(always)]
fn tc_tftp(ctx: &TcContext, frame: &Frame, off: UdpOffsets) -> (Counter, i32) {
    let build = match plan(
        frame,
        off,
        &TFTP_SESSIONS,
        &TFTP_PROGRESS,
        &IMAGES,
        MAX_KERNEL_WINDOW,
    ) {
        Plan::Pass(counter) => return (counter, TC_ACT_UNSPEC),
        Plan::Drop => return (Counter::DROP_TFTP_STALE_ACK, TC_ACT_SHOT),
        Plan::Build(build) => build,
    };
    let skb = ctx.skb.skb;
    // SAFETY: the skb is the program's own; the helper validates the length.
    if unsafe { bpf_skb_change_tail(skb, build.frame_len as u32, 0) } != 0 {
        return (Counter::PASS_TFTP_RESIZE_FAILED, TC_ACT_UNSPEC);
    }
    // SAFETY: reading the ingress interface index of our own skb.
    let ifindex = unsafe { (*skb).ifindex };
    let mut cloned = 0;
    for i in 0..MAX_KERNEL_WINDOW {
        if i >= build.count {
            break;
        }
        let written = build
            .block(&IMAGE_CHUNKS, &CHUNK_SUMS, i)
            .is_some_and(|block| {
                store_reply(&block, |offset, from, len| {
                    // SAFETY: as in the XDP tier; RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum right.
                    unsafe {
                        bpf_skb_store_bytes(skb, offset, from, len, BPF_F_RECOMPUTE_CSUM as u64)
                    }
                })
            });
        if !written {
            break;
        }
        if i + 1 == build.count {
            sent(&build, build.count, 1);
            // SAFETY: redirecting our own skb to the egress of its interface.
            let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
            return (Counter::REDIRECT_TFTP_DATA, action);
        }
        // SAFETY: a copy of our own skb goes out of its interface; the skb stays ours.
        if unsafe { bpf_clone_redirect(skb, ifindex, 0) } != 0 {
            break;
        }
        cloned += 1;
    }
    // Something failed part-way: what went out is recorded (userspace's timer
    // sends the rest); the half-built frame never goes on.
    if cloned > 0 {
        sent(&build, cloned, 1);
    }
    (Counter::DROP_TFTP_HALF_BUILT, TC_ACT_SHOT)
}

/// The TC tier of DHCP: resize the skb into the reply and redirect it out
/// of the interface the request came in on.
#[inline(always)]
fn tc_dhcp(ctx: &TcContext, frame: &Frame, off: UdpOffsets, unanswered: Counter) -> (Counter, i32) {
    let skb = ctx.skb.skb;
    // SAFETY: reading the ingress interface index of our own skb.
    let ifindex = unsafe { (*skb).ifindex };
    let reply = match dhcp::plan(
        frame,
        off,
        ifindex,
        TIER_TC,
        &DHCP_ANSWERS,
        &DHCP_SCRATCH,
        unanswered,
    ) {
        dhcp::Plan::Pass(counter) => return (counter, TC_ACT_UNSPEC),
        dhcp::Plan::Admitted(counter) => {
            bump(&TC_COUNTERS, Counter::SEEN_DHCP_UNKNOWN_ADMITTED);
            return (counter, TC_ACT_UNSPEC);
        }
        dhcp::Plan::Drop(counter) => return (counter, TC_ACT_SHOT),
        dhcp::Plan::Reply(reply) => reply,
    };
    // SAFETY: the skb is the program's own; the helper validates the length.
    if unsafe { bpf_skb_change_tail(skb, reply.frame_len as u32, 0) } != 0 {
        return (Counter::PASS_DHCP_RESIZE_FAILED, TC_ACT_UNSPEC);
    }
    let written = store_dhcp(&reply, |offset, from, len| {
        // SAFETY: as in the XDP tier; RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum right.
        unsafe { bpf_skb_store_bytes(skb, offset, from, len, BPF_F_RECOMPUTE_CSUM as u64) }
    });
    if !written {
        // The skb is already resized: never let a half-built frame go on.
        return (Counter::DROP_DHCP_HALF_BUILT, TC_ACT_SHOT);
    }
    dhcp::answered(&reply);
    // SAFETY: redirecting our own skb to the egress of its interface.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    (Counter::REDIRECT_DHCP_REPLY, action)
}

/// Admission of a packet to port 69 by `tier`: the verdict of a refusal.
#[inline(always)]
fn tftp_request(frame: &Frame, off: UdpOffsets, tier: u32) -> Option<Counter> {
    let ip = parse::ptr_at::<pxe_common::hdr::Ipv4Hdr>(frame, off.l3)?;
    // SAFETY: ptr_at checked the header lies inside the frame.
    let source = unsafe { (*ip).src };
    match admit::tftp_request(tier, source) {
        admit::Admission::Refused(refused) => Some(refused),
        admit::Admission::Free | admit::Admission::Unknown => None,
    }
}

#[inline(always)]
fn is_transfer_port(port: u16) -> bool {
    // SAFETY: the value is only tested for presence, never read.
    unsafe { TFTP_PORTS.get(TftpPortKey::new(port)).is_some() }
}

#[inline(always)]
fn count(counters: &PerCpuArray<u64>, verdict: Counter, vlan_tagged: bool) {
    bump(counters, verdict);
    if vlan_tagged {
        bump(counters, Counter::SEEN_VLAN_TAG);
    }
}

#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, counter: Counter) {
    if let Some(slot) = counters.get_ptr_mut(counter.0) {
        // SAFETY: the slot belongs to this CPU and the program is not re-entered
        // on it while running, so the increment cannot race.
        unsafe { *slot += 1 };
    }
}

/// The kernel refuses GPL-only helpers to programs without a GPL-compatible licence.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path to it.
    loop {}
}
