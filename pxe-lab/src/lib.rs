//! Throwaway test networks for tests, the bench and the demo.
//!
//! A [`Lab`] creates network namespaces, veth pairs, bridges and tap devices,
//! runs code and processes inside them, and removes all of it when dropped,
//! also while a test unwinds from a panic. Nothing is created in, or attached
//! to, the namespace the caller runs in: a DHCP or TFTP server started through
//! a lab can only ever see the lab's own hosts.
//!
//! Addresses are the caller's choice; the project uses 198.18.0.0/15 (RFC 2544,
//! set aside for benchmarking networks) so lab traffic can never be mistaken
//! for, or routed to, a real network.
//!
//! Beside the networks: the usual server/client pair ([`Lab::pair`]), peer
//! servers ([`peers`]), and the clients that run on them ([`client`]).
//!
//! Namespace names carry the creating process's PID (`pxl-<pid>-<n>-<role>`).
//! If a process dies without unwinding (SIGKILL), its namespaces are swept by
//! the next [`Lab::new`] on the machine, which deletes those whose PID is gone.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
};

use nix::sched::{setns, CloneFlags};

pub mod bpf_stats;
pub mod client;
pub mod cpu;
pub mod faulty_fs;
pub mod firmware;
pub mod peers;
pub mod topology;

pub use topology::{Pair, CLIENT_CIDR, SERVER_CIDR};

const PREFIX: &str = "pxl";
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces and the processes started in them, removed on drop.
pub struct Lab {
    tag: String,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
}

/// One network namespace of a [`Lab`]: a host of the test network.
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Lab {
    /// Starts an empty lab. Sweeps namespaces left behind by dead processes first.
    pub fn new() -> io::Result<Self> {
        sweep_stale_namespaces()?;
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            tag: format!("{PREFIX}-{}-{n}", std::process::id()),
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        })
    }

    /// Creates a namespace named after `role` with its loopback up.
    pub fn add_netns(&self, role: &str) -> io::Result<Netns> {
        let name = format!("{}-{role}", self.tag);
        ip(["netns", "add", &name])?;
        self.namespaces.lock().unwrap().push(name.clone());
        let ns = Netns { name };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Connects two namespaces with a veth pair, names each end, gives each
    /// the address (CIDR form, `None` for none) and brings both up.
    pub fn veth(
        &self,
        a: (&Netns, &str, Option<&str>),
        b: (&Netns, &str, Option<&str>),
    ) -> io::Result<()> {
        let (a_ns, a_if, a_addr) = a;
        let (b_ns, b_if, b_addr) = b;
        // Created directly inside the namespaces: the names never exist in the caller's.
        a_ns.ip([
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b_ns.name,
        ])?;
        for (ns, ifname, addr) in [(a_ns, a_if, a_addr), (b_ns, b_if, b_addr)] {
            if let Some(addr) = addr {
                ns.ip(["addr", "add", addr, "dev", ifname])?;
            }
            ns.ip(["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// Creates a bridge in `ns`, up, with an optional address.
    pub fn bridge(&self, ns: &Netns, name: &str, addr: Option<&str>) -> io::Result<()> {
        ns.ip(["link", "add", name, "type", "bridge"])?;
        if let Some(addr) = addr {
            ns.ip(["addr", "add", addr, "dev", name])?;
        }
        ns.ip(["link", "set", name, "up"])
    }

    /// Enslaves interface `ifname` of `ns` to bridge `bridge` in the same namespace.
    pub fn attach_to_bridge(&self, ns: &Netns, ifname: &str, bridge: &str) -> io::Result<()> {
        ns.ip(["link", "set", ifname, "master", bridge])
    }

    /// Creates a tap device in `ns` (for QEMU guests), up, optionally on a bridge.
    pub fn tap(&self, ns: &Netns, name: &str, bridge: Option<&str>) -> io::Result<()> {
        ns.ip(["tuntap", "add", "dev", name, "mode", "tap"])?;
        if let Some(bridge) = bridge {
            self.attach_to_bridge(ns, name, bridge)?;
        }
        ns.ip(["link", "set", name, "up"])
    }

    /// Starts a process inside `ns`. The lab kills it (by its PID) when dropped,
    /// if it is still running then.
    pub fn spawn(&self, ns: &Netns, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<u32> {
        let child = ns
            .command(program, args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting a process in {}: {e}", ns.name))
            })?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Like [`Lab::spawn`], with the process's stdout and stderr appended to `log`.
    pub fn spawn_logged(
        &self,
        ns: &Netns,
        program: impl AsRef<OsStr>,
        args: &[&str],
        log: &Path,
    ) -> io::Result<u32> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = ns
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting a process in {}: {e}", ns.name))
            })?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Takes back a process started with [`Lab::spawn`], so the caller can wait
    /// for it or signal it; the lab no longer kills it.
    pub fn take_child(&self, pid: u32) -> Option<Child> {
        let mut children = self.children.lock().unwrap();
        let at = children.iter().position(|c| c.id() == pid)?;
        Some(children.swap_remove(at))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        // Only our own children, by PID. SIGTERM first, so servers end as an
        // operator would end them (pxed detaches and removes its temporary
        // files); whatever is still running a moment later is killed.
        for child in &children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline
            && children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let namespaces =
            std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        for name in namespaces.iter().rev() {
            // Deleting the namespace destroys its veth ends, bridges and taps.
            if let Err(e) = ip(["netns", "del", name]) {
                eprintln!("pxe-lab: could not remove namespace {name}: {e}");
            }
        }
    }
}

impl Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip <args>` inside this namespace.
    pub fn ip<I, S>(&self, args: I) -> io::Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        ip(full)
    }

    /// A command that will run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs a command inside this namespace to completion and returns its output.
    pub fn output(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<Output> {
        self.command(program, args).stdin(Stdio::null()).output()
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it opens
    /// and interfaces it names belong to the namespace; the caller's thread is
    /// untouched.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = File::open(&path)?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                        io::Error::other(format!("entering {}: {e}", path.display()))
                    })?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Netns {
    /// Waits until something in this namespace listens on UDP `port` (IPv4),
    /// e.g. a server started with [`Lab::spawn`]. False on timeout.
    pub fn wait_for_udp_port(&self, port: u16, timeout: std::time::Duration) -> bool {
        self.wait_for_socket("udp", port, None, timeout)
    }

    /// Waits until something in this namespace listens on TCP `port` (IPv4).
    pub fn wait_for_tcp_port(&self, port: u16, timeout: std::time::Duration) -> bool {
        // State 0A is TCP_LISTEN in /proc/net/tcp.
        self.wait_for_socket("tcp", port, Some("0A"), timeout)
    }

    fn wait_for_socket(
        &self,
        table: &str,
        port: u16,
        state: Option<&str>,
        timeout: std::time::Duration,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let path = format!("/proc/thread-self/net/{table}");
        let wanted_port = format!("{port:04X}");
        loop {
            // /proc/thread-self/net shows the namespace of the reading thread.
            let text = self
                .run(|| std::fs::read_to_string(&path))
                .ok()
                .and_then(Result::ok);
            let found = text.is_some_and(|t| {
                t.lines().skip(1).any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
                    local_port == Some(wanted_port.as_str())
                        && state.is_none_or(|s| fields.get(3) == Some(&s))
                })
            });
            if found {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
}

fn ip<I, S>(args: I) -> io::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip` (package iproute2): {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "`ip {}` failed: {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Deletes `pxl-<pid>-…` namespaces whose creating process no longer exists.
fn sweep_stale_namespaces() -> io::Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(()); // no namespace was ever created on this machine
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_owner(&name) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = ip(["netns", "del", &name]);
        }
    }
    Ok(())
}

/// The PID encoded in a lab namespace name, if `name` is one.
fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

/// Environment variable that turns "skip: not root" into a test failure; the
/// project's test command sets it, so CI can never pass by skipping.
pub const REQUIRE_PRIVILEGED_TESTS: &str = "PXE_REQUIRE_PRIVILEGED_TESTS";

/// The sum of `field=N` over the lines of a pxed log that say `event`:
/// e.g. the blocks resent (`retransmits`) over every "TFTP transfer completed".
pub fn sum_logged(log: &str, event: &str, field: &str) -> u64 {
    let key = format!(" {field}=");
    log.lines()
        .filter(|line| line.contains(event))
        .filter_map(|line| {
            line.split(key.as_str())
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// For tests that need root (namespaces, BPF): true when they can run. When
/// they cannot, prints why and returns false, or panics if
/// [`REQUIRE_PRIVILEGED_TESTS`] is set.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os(REQUIRE_PRIVILEGED_TESTS).is_some() {
        panic!("{test} needs root, and {REQUIRE_PRIVILEGED_TESTS} says it must not be skipped");
    }
    eprintln!("skipping {test}: needs root (network namespaces, BPF)");
    false
}

/// For tests that need a file a package installs (firmware, boot programs):
/// true when `path` exists. When it does not, prints why and returns false,
/// or panics if [`REQUIRE_PRIVILEGED_TESTS`] is set: the project's test
/// command installs every such package, so a missing file there is a broken
/// setup, not a reason to pass.
pub fn have_file(path: impl AsRef<Path>, package: &str) -> bool {
    let path = path.as_ref();
    if path.exists() {
        return true;
    }
    if std::env::var_os(REQUIRE_PRIVILEGED_TESTS).is_some() {
        panic!(
            "{} is missing (Debian package {package}), and {REQUIRE_PRIVILEGED_TESTS} says the test must not be skipped",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} is missing (Debian package {package})",
        path.display()
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_namespace_names_encode_their_owner() {
        assert_eq!(stale_owner("pxl-1234-0-srv"), Some(1234));
        assert_eq!(stale_owner("pxl-x-0-srv"), None);
        assert_eq!(stale_owner("other-1234"), None);
    }
}
