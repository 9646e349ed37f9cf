//! Whether this process may do what the daemon needs, checked up front so an
//! operator gets one clear sentence instead of an EPERM from deep inside a load.

use std::fs;

/// Linux capability numbers (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The capabilities the daemon needs that this process lacks, by name. Empty
/// when it may load and attach BPF programs and bind privileged ports.
pub fn missing_capabilities() -> Vec<&'static str> {
    let effective = effective_capabilities().unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN implies what CAP_BPF grants (kernels before 5.8 only know it).
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    missing
}

/// The effective capability set from `/proc/self/status` (`CapEff`, hex).
fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}
