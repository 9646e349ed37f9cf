//! Helpers shared by the integration tests.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses its own subset of the helpers"
)]

pub mod dhcp_client;
pub mod frames;
pub mod tftp_client;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use pxe_lab::{Lab, Netns};

pub const PXED: &str = env!("CARGO_BIN_EXE_pxed");
pub const SERVER_IP: &str = "198.18.0.1";
pub const CLIENT_IP: &str = "198.18.0.2";

/// A server namespace running `pxed` on eth0 and a client namespace on the
/// other end of the veth, removed (and pxed killed) on drop.
pub struct Served {
    pub lab: Lab,
    pub server: Netns,
    pub client: Netns,
    pub pid: u32,
    /// pxed's stdout and stderr.
    pub log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Served {
    /// pxed's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until pxed's log contains `needle`; panics with the log if not.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_for_file_text(&self.log, needle, timeout);
    }

    /// Waits until `needle` is on at least `count` lines of pxed's log;
    /// panics with the log if not.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log();
            if text.lines().filter(|l| l.contains(needle)).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {count} lines with {needle:?} in pxed's log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until the file contains `needle`; panics with its contents if not.
pub fn wait_for_file_text(path: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {needle:?} in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `pxed --interface eth0 <args>` in a fresh lab and waits for TFTP.
pub fn serve_tftp(boot_root: &Path, extra: &[&str]) -> Served {
    let lab = Lab::new().expect("creating the lab");
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .client_addr(pxe_lab::CLIENT_CIDR)
        .build()
        .unwrap();
    let root = boot_root.to_str().unwrap();
    let mut args = vec!["--interface", "eth0", "--boot-root", root];
    args.extend_from_slice(extra);
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("pxed.log");
    let pid = lab
        .spawn_logged(&server, PXED, &args, &log)
        .expect("starting pxed");
    let up = server.wait_for_udp_port(69, Duration::from_secs(20));
    assert!(
        up,
        "pxed did not start serving TFTP:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Served {
        lab,
        server,
        client,
        pid,
        log,
        _log_dir: log_dir,
    }
}

/// Stops the daemon whose PID file is `pid_file` (dhclient -1 stays in the
/// background once bound), by its PID; nothing if it wrote none.
pub fn stop_by_pid_file(pid_file: &Path) {
    if let Ok(pid) = std::fs::read_to_string(pid_file)
        .unwrap_or_default()
        .trim()
        .parse::<i32>()
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Writes an executable shell script `name` into `dir` (for a DHCP client's
/// `-s`/`-sf` hook) and returns its path.
pub fn write_script(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Deterministic file contents that make misplaced blocks visible.
pub fn patterned(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// True if `program` is installed. When it is not, the test is skipped with a
/// message, or fails if privileged tests are required (CI installs every peer).
pub fn have_tool(program: &str, package: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os(pxe_lab::REQUIRE_PRIVILEGED_TESTS).is_some() {
            panic!("{program} is not installed (Debian package {package}); `cargo xtask setup` installs it");
        }
        eprintln!("skipping: {program} is not installed (Debian package {package})");
    }
    found
}

/// Runs a client command in `ns` and panics with its output if it fails.
pub fn run_ok(ns: &Netns, program: &str, args: &[&str]) {
    let out = ns
        .output(program, args)
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// busybox udhcpc in `served`'s client namespace, in the foreground, its
/// script configuring eth0 with what it leases; its PID and log. The IPv4
/// address of its first lease is [`udhcpc_lease`] of that log.
pub fn start_udhcpc(served: &Served, work: &Path) -> (u32, PathBuf) {
    let script = write_script(
        work,
        "udhcpc.sh",
        r#"
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
"#,
    );
    let out = work.join("udhcpc.log");
    let pid = served
        .lab
        .spawn_logged(
            &served.client,
            "busybox",
            &[
                "udhcpc", "-i", "eth0", "-f", "-t", "5", "-T", "1", "-s", &script,
            ],
            &out,
        )
        .unwrap();
    (pid, out)
}

/// The address of udhcpc's first lease, once its log says it got one.
pub fn udhcpc_lease(log: &Path) -> std::net::Ipv4Addr {
    wait_for_file_text(log, "obtained from 198.18.0.1", Duration::from_secs(20));
    std::fs::read_to_string(log)
        .unwrap()
        .split("lease of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ip| ip.parse().ok())
        .expect("udhcpc logs `lease of IP obtained from SERVER`")
}
