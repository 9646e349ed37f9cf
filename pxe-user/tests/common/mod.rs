//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses its own subset of the helpers")]

pub mod frames;
pub mod tftp_client;

use std::{path::Path, time::Duration};

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
}

/// Starts `pxed --interface eth0 <args>` in a fresh lab and waits for TFTP.
pub fn serve_tftp(boot_root: &Path, extra: &[&str]) -> Served {
    let lab = Lab::new().expect("creating the lab");
    let server = lab.add_netns("srv").unwrap();
    let client = lab.add_netns("cli").unwrap();
    lab.veth((&server, "eth0", Some("198.18.0.1/24")), (&client, "eth0", Some("198.18.0.2/24"))).unwrap();
    let root = boot_root.to_str().unwrap();
    let mut args = vec!["--interface", "eth0", "--boot-root", root];
    args.extend_from_slice(extra);
    let pid = lab.spawn(&server, PXED, &args).expect("starting pxed");
    assert!(server.wait_for_udp_port(69, Duration::from_secs(20)), "pxed did not start serving TFTP");
    Served { lab, server, client, pid }
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
    let out = ns.output(program, args).unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
