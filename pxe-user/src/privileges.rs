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

/// What the daemon keeps once it runs as its own user (`--user`): CAP_BPF
/// to update its maps (templates, TFTP sessions, images) and CAP_NET_ADMIN
/// to detach its programs at exit. Binding, loading and attaching are done
/// by then, and nothing else it does needs privilege.
pub const KEPT: [Capability; 2] = [Capability::CAP_BPF, Capability::CAP_NET_ADMIN];

/// `SECBIT_NO_SETUID_FIXUP` (linux/securebits.h): a change of uid leaves
/// the capability sets alone.
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// Called first thing, before any thread exists, when the daemon will run
/// as a user: capabilities are per thread, and every thread made from here
/// on inherits this bit, so the change of uid later takes no thread's
/// capabilities away before [`become_user`] has left each exactly [`KEPT`].
pub fn prepare_to_become_user() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0) } != 0 {
        anyhow::bail!(
            "prctl(PR_SET_SECUREBITS) before --user: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Becomes `user` (its uid, its primary group and no other) in every thread
/// (glibc changes ids process-wide), then leaves every thread only
/// [`KEPT`], in its effective, permitted and bounding sets. `owned`, the
/// daemon's own state files, are given to the user first, so it can still
/// write them, and open them again after a failure.
pub fn become_user(user: &str, owned: &[&std::path::Path]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nix::unistd::{setgroups, setresgid, setresuid, User};
    let account = User::from_name(user)
        .with_context(|| format!("looking up user {user:?} (--user)"))?
        .with_context(|| {
            format!(
                "--user {user}: no such user (the Debian package creates `pxed`; \
                 or: useradd --system --no-create-home {user})"
            )
        })?;
    for path in owned.iter().filter(|p| p.exists()) {
        nix::unistd::chown(*path, Some(account.uid), Some(account.gid))
            .with_context(|| format!("giving {} to {user}", path.display()))?;
    }
    setgroups(&[account.gid]).context("setgroups")?;
    setresgid(account.gid, account.gid, account.gid).context("setresgid")?;
    setresuid(account.uid, account.uid, account.uid).context("setresuid")?;
    let mask = KEPT.iter().fold(0u64, |m, cap| m | cap.bitmask());
    every_thread::restrict(mask).context("leaving every thread only CAP_BPF and CAP_NET_ADMIN")
}

/// Capabilities are a thread's, not the process's: [`restrict`] runs the
/// restriction in the calling thread, then in each other thread through a
/// signal handler (what libcap's psx does), until no thread is left out.
mod every_thread {
    use std::{
        collections::HashSet,
        sync::atomic::{AtomicI32, AtomicU64, Ordering},
        time::{Duration, Instant},
    };

    static MASK: AtomicU64 = AtomicU64::new(0);
    /// The last handler's result: 0 until it ran, 1 done, -errno failed.
    static RESULT: AtomicI32 = AtomicI32::new(0);

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const LAST_CAP: u64 = 63;

    /// Leaves this thread `mask` only; async-signal-safe (raw syscalls).
    fn restrict_this_thread(mask: u64) -> i32 {
        for cap in 0..=LAST_CAP {
            if mask & (1 << cap) == 0 {
                // EINVAL past the kernel's last capability: nothing to drop.
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |shift: u32| CapData {
            effective: (mask >> shift) as u32,
            permitted: (mask >> shift) as u32,
            inheritable: 0,
        };
        let data = [half(0), half(32)];
        // SAFETY: capset reads the header and two data structs we pass.
        let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
        if r == 0 {
            1
        } else {
            // SAFETY: reads this thread's errno.
            -unsafe { *libc::__errno_location() }
        }
    }

    extern "C" fn handler(_: libc::c_int) {
        let result = restrict_this_thread(MASK.load(Ordering::SeqCst));
        RESULT.store(result, Ordering::SeqCst);
    }

    fn signal() -> libc::c_int {
        libc::SIGRTMIN() + 5
    }

    fn threads() -> std::io::Result<Vec<libc::pid_t>> {
        std::fs::read_dir("/proc/self/task")?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok().map(Ok))
            .collect()
    }

    pub fn restrict(mask: u64) -> anyhow::Result<()> {
        MASK.store(mask, Ordering::SeqCst);
        let me = unsafe { libc::gettid() };
        let result = restrict_this_thread(mask);
        if result != 1 {
            anyhow::bail!("capset: {}", std::io::Error::from_raw_os_error(-result));
        }
        // SAFETY: installs a handler that only makes raw syscalls and
        // stores to atomics.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal(), &action, std::ptr::null_mut()) != 0 {
                anyhow::bail!("sigaction: {}", std::io::Error::last_os_error());
            }
        }
        let pid = std::process::id() as libc::pid_t;
        let mut done: HashSet<libc::pid_t> = [me].into();
        loop {
            let left: Vec<libc::pid_t> = threads()?
                .into_iter()
                .filter(|t| !done.contains(t))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            for tid in left {
                RESULT.store(0, Ordering::SeqCst);
                // SAFETY: signals a thread of this process.
                let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) };
                done.insert(tid);
                if sent != 0 {
                    continue; // it ended meanwhile
                }
                let until = Instant::now() + Duration::from_secs(2);
                let result = loop {
                    match RESULT.load(Ordering::SeqCst) {
                        0 if Instant::now() < until => {
                            std::thread::sleep(Duration::from_micros(200))
                        }
                        r => break r,
                    }
                };
                match result {
                    1 => {}
                    0 => anyhow::bail!("thread {tid} did not run the restriction within 2 s"),
                    e => anyhow::bail!(
                        "capset in thread {tid}: {}",
                        std::io::Error::from_raw_os_error(-e)
                    ),
                }
            }
        }
    }
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
