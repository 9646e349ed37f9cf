//! Map names, keys, values and capacities, shared by the programs and the loader.
//!
//! aya's `#[map(name = "...")]` takes a literal, so the BPF statics carry these
//! names as identifiers; a userspace test loads the object and checks every
//! name in [`ALL`] exists there.

use bytemuck::{Pod, Zeroable};

/// `Counter` index → per-CPU `u64`; written by the XDP program, read by the daemon.
pub const XDP_COUNTERS: &str = "XDP_COUNTERS";
/// `Counter` index → per-CPU `u64`; written by the TC program, read by the daemon.
pub const TC_COUNTERS: &str = "TC_COUNTERS";
/// [`TftpPortKey`] → [`TftpPortEntry`]; written by the daemon when a transfer
/// opens its server port, read by both programs to recognise transfer traffic.
pub const TFTP_PORTS: &str = "TFTP_PORTS";

/// Every map the object must define.
pub const ALL: &[&str] = &[XDP_COUNTERS, TC_COUNTERS, TFTP_PORTS];

/// How many transfer ports can be registered at once: one per running transfer.
pub const TFTP_PORTS_CAPACITY: u32 = 65_536;

/// Key of `TFTP_PORTS`: a server-side UDP port in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct TftpPortKey {
    pub port: [u8; 2],
    /// Explicit: Pod forbids implicit padding, and the kernel hashes all four bytes.
    pub _pad: [u8; 2],
}

impl TftpPortKey {
    pub const fn new(port: u16) -> Self {
        Self { port: port.to_be_bytes(), _pad: [0; 2] }
    }
}

/// Value of `TFTP_PORTS`: presence is what matters today; `flags` is reserved
/// for the fast-path tiers and must be zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TftpPortEntry {
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<TftpPortKey>() == 4);
const _: () = assert!(core::mem::size_of::<TftpPortEntry>() == 4);

crate::impl_aya_pod!(TftpPortKey, TftpPortEntry);
