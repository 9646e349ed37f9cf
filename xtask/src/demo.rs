//! `cargo xtask demo`: the main job, end to end, on pxed's embedded defaults.
//!
//! Builds pxed and bench, lays out a boot root (Debian's iPXE binaries as the
//! network boot programs, a Debian kernel and a tiny busybox initramfs),
//! starts pxed in a throwaway server namespace with nothing but an interface,
//! a boot root and an address range, then powers on one real UEFI machine
//! (QEMU, OVMF) and a rack of simulated ones in a client namespace: DHCP,
//! iPXE over TFTP, iPXE's own DHCP, its script, kernel and initrd over HTTP.
//! Prints what happened and removes everything. Nothing touches the machine's
//! real network.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use pxe_lab::{firmware, Lab};

use crate::workspace_root;

pub fn run(machines: usize, firmware: &str) -> anyhow::Result<()> {
    let workspace = workspace_root();
    let (pxed, bench) = crate::build_release_binaries()?;

    let work = std::env::temp_dir().join(format!("pxe-demo-{}", std::process::id()));
    let root = work.join("boot");
    eprintln!("demo: preparing a kernel and initramfs from Debian packages (cached in target/firmware-lab)");
    let images = firmware::boot_images(&workspace.join("target/firmware-lab"))
        .context("building the lab kernel and initramfs")?;
    lay_out_boot_root(&root, &images)?;
    let result = run_lab(&pxed, &bench, &root, &work, machines, firmware);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The boot root the embedded default profile expects: `ipxe.efi` and
/// `undionly.kpxe` (from Debian's ipxe package), `vmlinuz` and `initrd.img`.
fn lay_out_boot_root(root: &Path, images: &firmware::BootImages) -> anyhow::Result<()> {
    std::fs::create_dir_all(root)?;
    for (name, from) in [
        ("ipxe.efi", Path::new("/usr/lib/ipxe/ipxe.efi")),
        ("undionly.kpxe", Path::new("/usr/lib/ipxe/undionly.kpxe")),
        ("vmlinuz", images.kernel.as_path()),
        ("initrd.img", images.initrd.as_path()),
    ] {
        std::fs::copy(from, root.join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

fn run_lab(
    pxed: &Path,
    bench: &Path,
    root: &Path,
    work: &Path,
    machines: usize,
    firmware: &str,
) -> anyhow::Result<()> {
    let lab = Lab::new()?;
    // The client network: a bridge with the uplink to pxed, the real
    // machine's tap, and an address for the simulated machines.
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .server_addr("198.18.0.1/20")
        .client_ifname("uplink")
        .build()?;
    lab.bridge(&client, "br0", Some("198.18.15.254/20"))?;
    lab.attach_to_bridge(&client, "uplink", "br0")?;
    lab.tap(&client, "tap0", Some("br0"))?;
    let log = work.join("pxed.log");
    let leases = work.join("leases.redb");
    let root_s = root.to_str().context("boot root path is not UTF-8")?;
    let args = [
        "--interface",
        "eth0",
        "--boot-root",
        root_s,
        "--dhcp",
        "full",
        "--range",
        "198.18.1.0-198.18.14.255",
        "--lease-file",
        leases.to_str().unwrap(),
        "--tftp-max-per-client",
        "100000",
        // One address for every simulated machine: no per-source budget.
        "--admit-tftp-per-source",
        "0",
    ];
    eprintln!("demo: pxed {}", args.join(" "));
    let pid = lab.spawn_logged(&server, pxed, &args, &log)?;
    if !server.wait_for_udp_port(67, Duration::from_secs(30))
        || !server.wait_for_tcp_port(80, Duration::from_secs(10))
    {
        bail!(
            "pxed did not come up:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    const REAL_MAC: &str = "52:54:00:de:00:01";
    let serial = work.join("serial.log");
    let powered_on = Instant::now();
    eprintln!("demo: powering on one real UEFI machine (QEMU, OVMF; TCG: about a minute to Linux)");
    firmware::start_machine(
        &lab,
        &client,
        "tap0",
        REAL_MAC,
        firmware::Firmware::UefiPxe,
        work,
        &serial,
    )?;
    let n = machines.to_string();
    eprintln!("demo: powering on {machines} simulated {firmware} machines at once beside it");
    let out = client.output(
        bench,
        &[
            "pxe",
            "--interface",
            "br0",
            "--clients",
            &n,
            "--firmware",
            firmware,
            "--second-stage",
            "--verify-root",
            root_s,
            "--timeline",
            "5",
            "--time-limit",
            "240",
        ],
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let (booted, serial_text) = firmware::wait_for_marker(&serial, Duration::from_secs(240));
    let real_time = powered_on.elapsed();
    // Ask pxed for its counters, then stop it and show what it logged.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if let Some(mut child) = lab.take_child(pid) {
        let _ = child.wait();
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    real_machine_timeline(&log_text, REAL_MAC, booted, real_time, &serial_text);
    summarise_server_log(&log_text);
    eprintln!(
        "demo: removed the lab namespaces; full server log was {} lines",
        log_text.lines().count()
    );
    if !booted {
        bail!("the real machine did not reach Linux (serial console above)");
    }
    if !out.status.success() {
        bail!("some simulated machines did not boot (see above)");
    }
    Ok(())
}

/// The real machine's boot as pxed saw it, and the Linux prompt it reached.
fn real_machine_timeline(log: &str, mac: &str, booted: bool, elapsed: Duration, serial: &str) {
    println!("\nThe real UEFI machine ({mac}), as pxed served it:");
    let address = log
        .lines()
        .filter(|l| l.contains(mac) && l.contains("→ ACK "))
        .find_map(|l| {
            l.split("→ ACK ")
                .nth(1)?
                .split([',', ' '])
                .next()
                .map(str::to_owned)
        });
    for line in log.lines() {
        let about_it = line.contains(mac)
            || address
                .as_ref()
                .is_some_and(|a| line.contains(&format!("client={a}:")));
        if about_it {
            let (time, rest) = line.split_once(' ').unwrap_or(("", line));
            let message = rest.trim_start().splitn(3, ' ').nth(2).unwrap_or(rest);
            println!("  {} {}", time.get(11..23).unwrap_or(time), message);
        }
    }
    match (
        booted,
        serial.lines().find(|l| l.contains(firmware::MARKER)),
    ) {
        (true, Some(marker)) => println!(
            "  Linux userspace reached {:.1} s after power-on: {marker}",
            elapsed.as_secs_f64()
        ),
        _ => println!("  did not reach Linux; serial console:\n{serial}"),
    }
}

/// The server's side of the story: one machine's log lines and the counters.
fn summarise_server_log(log: &str) {
    println!("\npxed's log for the first machine (52:54:00:10:00:00):");
    for line in log
        .lines()
        .filter(|l| l.contains("52:54:00:10:00:00"))
        .take(8)
    {
        println!(
            "  {}",
            line.split_once(' ')
                .map_or(line, |(_, rest)| rest.trim_start())
        );
    }
    if let Some(line) = log.lines().find(|l| l.contains("final counters")) {
        println!(
            "  {}",
            line.split_once(' ')
                .map_or(line, |(_, rest)| rest.trim_start())
        );
    }
}
