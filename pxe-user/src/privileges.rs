//! Whether this process may do what the daemon needs, checked up front so an
//! operator gets one clear sentence instead of an EPERM from deep inside a load.

use caps::{CapSet, Capability};

/// The capabilities the daemon needs that this process lacks, by name. Empty
/// when it may load and attach BPF programs and bind privileged ports.
pub fn missing_capabilities() -> Vec<&'static str> {
    let has = |cap: Capability| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN implies what CAP_BPF grants (kernels before 5.8 only know it).
    if !has(Capability::CAP_BPF) && !has(Capability::CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(Capability::CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(Capability::CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    missing
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns the limit now in force. Every TFTP transfer holds a socket, so a
/// row of machines booting at once needs thousands; the usual soft limit of
/// 1024 would refuse transfers long before memory or CPU run out.
pub fn raise_open_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_ends_at_the_hard_limit() {
        let raised = raise_open_file_limit();
        // SAFETY: getrlimit writes the struct we pass.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(raised, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
