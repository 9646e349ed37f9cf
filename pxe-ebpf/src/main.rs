//! The kernel programs. Each entry point is one line into a body; the bodies
//! parse with `parse.rs`, look up the maps below, count a verdict and act.
//!
//! Today both programs classify and pass every packet; the fast-path tiers
//! (TFTP ACK→DATA, DHCP replies) grow from here.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_UNSPEC},
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use pxe_common::{
    counter::Counter,
    maps::{TftpPortEntry, TftpPortKey, TFTP_PORTS_CAPACITY},
};

use crate::parse::{classify, Classified, Frame, MAX_HEADERS_LEN};

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
    let frame = Frame { start: ctx.data(), end: ctx.data_end() };
    let classified = classify(&frame, is_transfer_port);
    count(&XDP_COUNTERS, &classified);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn handle_tc(ctx: &TcContext) -> i32 {
    // An skb may hold only part of its headers in the linear area that direct
    // packet access sees; pull them in first (this invalidates earlier packet
    // pointers, so the frame is read afterwards).
    let linear = ctx.data_end() - ctx.data();
    let total = ctx.len() as usize;
    if linear < MAX_HEADERS_LEN && total > linear {
        let want = if total < MAX_HEADERS_LEN { total } else { MAX_HEADERS_LEN };
        let _ = ctx.pull_data(want as u32);
    }
    let frame = Frame { start: ctx.data(), end: ctx.data_end() };
    let classified = classify(&frame, is_transfer_port);
    count(&TC_COUNTERS, &classified);
    // TC_ACT_UNSPEC is TCX_NEXT: not ours to decide, let the next program or
    // the stack have it.
    TC_ACT_UNSPEC
}

#[inline(always)]
fn is_transfer_port(port: u16) -> bool {
    // SAFETY: the value is only tested for presence, never read.
    unsafe { TFTP_PORTS.get(&TftpPortKey::new(port)).is_some() }
}

#[inline(always)]
fn count(counters: &PerCpuArray<u64>, classified: &Classified) {
    bump(counters, classified.verdict);
    if classified.vlan_tagged {
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
