//! `cargo xtask demo`: the main job, end to end, on pxed's embedded defaults.
//!
//! Builds pxed and bench, lays out a boot root (Debian's iPXE binaries as the
//! network boot programs, and a kernel and initrd of realistic size), starts
//! pxed in a throwaway server namespace with nothing but an interface, a
//! boot root and an address range, then powers on a rack of simulated
//! machines in a client namespace: DHCP, iPXE over TFTP, iPXE's own DHCP,
//! its script, kernel and initrd over HTTP. Prints what happened and removes
//! everything. Nothing touches the machine's real network.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _};
use pxe_lab::Lab;

use crate::workspace_root;

pub fn run(machines: usize, firmware: &str) -> anyhow::Result<()> {
    let workspace = workspace_root();
    eprintln!("demo: building pxed and bench (release)");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "pxe-user", "-p", "bench"])
        .current_dir(&workspace)
        .status()?;
    if !status.success() {
        bail!("building pxed and bench failed");
    }
    let pxed = workspace.join("target/release/pxed");
    let bench = workspace.join("target/release/bench");

    let work = std::env::temp_dir().join(format!("pxe-demo-{}", std::process::id()));
    let root = work.join("boot");
    lay_out_boot_root(&root)?;
    let result = run_lab(&pxed, &bench, &root, &work, machines, firmware);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The boot root the embedded default profile expects: `ipxe.efi` and
/// `undionly.kpxe` (from Debian's ipxe package), `vmlinuz` and `initrd.img`.
fn lay_out_boot_root(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root)?;
    for (name, from) in [("ipxe.efi", "/usr/lib/ipxe/ipxe.efi"), ("undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe")] {
        std::fs::copy(from, root.join(name)).with_context(|| format!("copying {from} (package ipxe)"))?;
    }
    // Stand-ins with the size of a distribution kernel and initrd; the
    // firmware lab (real QEMU machines) boots a real one.
    for (name, len) in [("vmlinuz", 8 << 20), ("initrd.img", 24 << 20)] {
        let bytes: Vec<u8> = (0..len).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(root.join(name), bytes)?;
    }
    Ok(())
}

fn run_lab(pxed: &Path, bench: &Path, root: &Path, work: &Path, machines: usize, firmware: &str) -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let server = lab.add_netns("srv")?;
    let client = lab.add_netns("cli")?;
    lab.veth((&server, "eth0", Some("198.18.0.1/20")), (&client, "eth0", Some("198.18.15.254/20")))?;
    let log = work.join("pxed.log");
    let leases = work.join("leases.redb");
    let root_s = root.to_str().context("boot root path is not UTF-8")?;
    let args = [
        "--interface", "eth0", "--boot-root", root_s, "--dhcp", "full", "--range", "198.18.1.0-198.18.14.255",
        "--lease-file", leases.to_str().unwrap(), "--tftp-max-per-client", "100000",
    ];
    eprintln!("demo: pxed {}", args.join(" "));
    let pid = lab.spawn_logged(&server, pxed, &args, &log)?;
    if !server.wait_for_udp_port(67, Duration::from_secs(30)) || !server.wait_for_tcp_port(80, Duration::from_secs(10)) {
        bail!("pxed did not come up:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    let n = machines.to_string();
    eprintln!("demo: powering on {machines} {firmware} machines at once");
    let out = client.output(
        bench,
        &["pxe", "--clients", &n, "--firmware", firmware, "--second-stage", "--verify-root", root_s, "--timeline", "5", "--time-limit", "240"],
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    // Ask pxed for its counters, then stop it and show what it logged.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    if let Some(mut child) = lab.take_child(pid) {
        let _ = child.wait();
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    summarise_server_log(&log_text);
    eprintln!("demo: removed the lab namespaces; full server log was {} lines", log_text.lines().count());
    if !out.status.success() {
        bail!("some machines did not boot (see above)");
    }
    Ok(())
}

/// The server's side of the story: one machine's log lines and the counters.
fn summarise_server_log(log: &str) {
    println!("\npxed's log for the first machine (52:54:00:10:00:00):");
    for line in log.lines().filter(|l| l.contains("52:54:00:10:00:00")).take(8) {
        println!("  {}", line.split_once(' ').map_or(line, |(_, rest)| rest.trim_start()));
    }
    if let Some(line) = log.lines().find(|l| l.contains("final counters")) {
        println!("  {}", line.split_once(' ').map_or(line, |(_, rest)| rest.trim_start()));
    }
}
