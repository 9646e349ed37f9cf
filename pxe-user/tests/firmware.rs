//! Real firmware boots Linux from pxed: QEMU machines (TCG) in a client
//! namespace, bridged to pxed's namespace, must reach Linux userspace from a
//! kernel and initramfs pxed served, and print the lab marker on their serial
//! console. Needs root, qemu-system-x86, ovmf and ipxe-qemu (and for ARM64
//! qemu-system-arm, qemu-efi-aarch64 and Debian's arm64 netboot installer);
//! each boot takes 20–60 s under TCG. The reimaging workflow too: a machine's installer marks
//! it provisioned through the API, and powered on again the machine gets no
//! boot file and its firmware falls through to its next boot option.

mod common;

use std::{path::Path, time::Duration};

use pxe_lab::{
    firmware::{self, Firmware},
    peers::Dnsmasq,
    Lab, Netns,
};

use common::{have_tool, PXED};

/// Boot images are cached across runs in the target directory.
fn images() -> firmware::BootImages {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("firmware-lab");
    firmware::boot_images(&cache)
        .expect("building the lab kernel and initramfs from Debian packages")
}

struct FirmwareLab {
    lab: Lab,
    server: Netns,
    client: Netns,
    work: tempfile::TempDir,
}

/// Server namespace with pxed; client namespace with a bridge joining the
/// veth to the server and a tap per machine; with `site_dhcp`, a third
/// namespace on the bridge runs dnsmasq as the site's plain DHCP server
/// (addresses only, no boot options).
fn firmware_lab(taps: usize, site_dhcp: bool, pxed_args: &[&str]) -> FirmwareLab {
    firmware_lab_with(taps, site_dhcp, pxed_args, "")
}

fn firmware_lab_with(
    taps: usize,
    site_dhcp: bool,
    pxed_args: &[&str],
    extra_config: &str,
) -> FirmwareLab {
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab.pair().client_ifname("uplink").build().unwrap();
    lab.bridge(&client, "br0", None).unwrap();
    lab.attach_to_bridge(&client, "uplink", "br0").unwrap();
    for n in 0..taps {
        lab.tap(&client, &format!("tap{n}"), Some("br0")).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    if site_dhcp {
        let site = lab.add_netns("site").unwrap();
        lab.veth(
            (&site, "eth0", Some("198.18.0.2/24")),
            (&client, "site", None),
        )
        .unwrap();
        lab.attach_to_bridge(&client, "site", "br0").unwrap();
        Dnsmasq::new()
            .interface("eth0")
            .dhcp_range("198.18.0.150,198.18.0.199,1h")
            .no_ping()
            .lease_file(&work.path().join("dnsmasq.leases"))
            .spawn(&lab, &site, &work.path().join("dnsmasq.log"))
            .unwrap();
        assert!(site.wait_for_udp_port(67, Duration::from_secs(20)));
    }
    let images = images();
    let root = work.path().join("boot");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&images.kernel, root.join("vmlinuz")).unwrap();
    std::fs::copy(&images.initrd, root.join("initrd.img")).unwrap();
    for name in ["ipxe.efi", "undionly.kpxe"] {
        std::fs::copy(Path::new("/usr/lib/ipxe").join(name), root.join(name)).unwrap();
    }
    let config = work.path().join("pxed.toml");
    std::fs::write(
        &config,
        format!(
            "[[profile]]\nname = \"default\"\ncmdline = \"console=ttyS0 panic=-1\"\n{extra_config}"
        ),
    )
    .unwrap();
    let mut args = vec![
        "--interface",
        "eth0",
        "--boot-root",
        root.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let leases = work.path().join("leases.redb");
    args.extend(["--lease-file", leases.to_str().unwrap()]);
    args.extend_from_slice(pxed_args);
    let log = work.path().join("pxed.log");
    lab.spawn_logged(&server, PXED, &args, &log).unwrap();
    assert!(
        server.wait_for_tcp_port(80, Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    FirmwareLab {
        lab,
        server,
        client,
        work,
    }
}

impl FirmwareLab {
    fn boot(&self, tap: usize, mac: &str, firmware: Firmware) -> (std::path::PathBuf, u32) {
        self.boot_with(tap, mac, firmware, &format!("serial-{tap}.log"), &[])
    }

    /// Starts a machine with its serial console in `serial` of the work
    /// directory and `extra` QEMU arguments.
    fn boot_with(
        &self,
        tap: usize,
        mac: &str,
        firmware: Firmware,
        serial: &str,
        extra: &[&str],
    ) -> (std::path::PathBuf, u32) {
        let serial = self.work.path().join(serial);
        let pid = firmware::start_machine_with(
            &self.lab,
            &self.client,
            &format!("tap{tap}"),
            mac,
            firmware,
            self.work.path(),
            &serial,
            extra,
        )
        .unwrap();
        (serial, pid)
    }

    fn assert_booted(&self, serial: &Path, what: &str) {
        let (booted, text) = firmware::wait_for_marker(serial, Duration::from_secs(240));
        let log = std::fs::read_to_string(self.work.path().join("pxed.log")).unwrap_or_default();
        assert!(
            booted,
            "{what} did not reach Linux userspace.\nserial:\n{text}\npxed:\n{log}"
        );
    }
}

fn have_qemu() -> bool {
    have_tool("qemu-system-x86_64", "qemu-system-x86 (bookworm-backports)")
        && have_tool("busybox", "busybox")
        && pxe_lab::have_file("/usr/lib/ipxe/ipxe.lkrn", "ipxe")
        && pxe_lab::have_file("/usr/share/OVMF/OVMF_CODE.fd", "ovmf")
}

#[test]
fn bios_ipxe_boots_linux_over_http_in_full_dhcp_mode() {
    if !pxe_lab::privileged("bios_ipxe_boots_linux_over_http_in_full_dhcp_mode") || !have_qemu() {
        return;
    }
    let lab = firmware_lab(
        1,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
    );
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:01", Firmware::BiosIpxe);
    lab.assert_booted(&serial, "BIOS + iPXE");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("52:54:00:fa:00:01 (iPXE, bios) → OFFER"),
        "iPXE was recognised:\n{log}"
    );
    assert!(
        log.contains("HTTP: iPXE script served mac=52:54:00:fa:00:01"),
        "{log}"
    );
}

#[test]
fn uefi_pxe_chains_ipxe_efi_over_tftp_then_boots_linux_over_http() {
    if !pxe_lab::privileged("uefi_pxe_chains_ipxe_efi_over_tftp_then_boots_linux_over_http")
        || !have_qemu()
    {
        return;
    }
    let lab = firmware_lab(
        1,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
    );
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:02", Firmware::UefiPxe);
    lab.assert_booted(&serial, "OVMF PXE → ipxe.efi");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("(PXE, uefi-x64) → OFFER"),
        "firmware PXE with option 93 = 7:\n{log}"
    );
    assert!(
        log.contains("file=ipxe.efi") && log.contains("TFTP transfer completed"),
        "ipxe.efi went over TFTP:\n{log}"
    );
    assert!(
        log.contains("(iPXE, uefi-x64)"),
        "then iPXE asked for its script:\n{log}"
    );
}

#[test]
fn uefi_pxe_boots_with_pxed_in_proxy_mode_beside_the_sites_dhcp_server() {
    if !pxe_lab::privileged("uefi_pxe_boots_with_pxed_in_proxy_mode_beside_the_sites_dhcp_server")
        || !have_qemu()
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let lab = firmware_lab(1, true, &["--dhcp", "proxy"]);
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:03", Firmware::UefiPxe);
    lab.assert_booted(&serial, "OVMF PXE with proxyDHCP");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("proxy OFFER, boot ipxe.efi"),
        "pxed gave the boot file, not an address:\n{log}"
    );
    let leases =
        std::fs::read_to_string(lab.work.path().join("dnsmasq.leases")).unwrap_or_default();
    assert!(
        leases.contains("52:54:00:fa:00:03"),
        "dnsmasq gave the address: {leases:?}"
    );
}

#[test]
fn four_machines_boot_at_once_from_one_server() {
    if !pxe_lab::privileged("four_machines_boot_at_once_from_one_server") || !have_qemu() {
        return;
    }
    let lab = firmware_lab(
        4,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
    );
    let machines: Vec<_> = [
        Firmware::BiosIpxe,
        Firmware::UefiPxe,
        Firmware::BiosIpxe,
        Firmware::UefiPxe,
    ]
    .into_iter()
    .enumerate()
    .map(|(n, firmware)| {
        (
            lab.boot(n, &format!("52:54:00:fa:01:{n:02x}"), firmware).0,
            firmware,
        )
    })
    .collect();
    for (serial, firmware) in &machines {
        lab.assert_booted(serial, &format!("{firmware:?} machine of four"));
    }
}

#[test]
fn uefi_pxe_boots_the_same_with_the_kernel_fast_paths_off() {
    if !pxe_lab::privileged("uefi_pxe_boots_the_same_with_the_kernel_fast_paths_off")
        || !have_qemu()
    {
        return;
    }
    let lab = firmware_lab(
        1,
        false,
        &[
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--xdp-mode",
            "off",
            "--no-tc",
        ],
    );
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:04", Firmware::UefiPxe);
    lab.assert_booted(&serial, "OVMF PXE with XDP and TC off");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("XDP off") && log.contains("TC program not attached"),
        "{log}"
    );
}

#[test]
fn uefi_http_boot_gets_a_url_and_boots_linux_over_http() {
    if !pxe_lab::privileged("uefi_http_boot_gets_a_url_and_boots_linux_over_http") || !have_qemu() {
        return;
    }
    let lab = firmware_lab(
        1,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
    );
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:05", Firmware::UefiHttp);
    lab.assert_booted(&serial, "OVMF HTTP Boot");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("(HTTP Boot, uefi-x64-http) → OFFER")
            && log.contains("boot http://198.18.0.1/ipxe.efi"),
        "option 60 HTTPClient, 93 = 16, a URL as boot file:\n{log}"
    );
    assert!(
        !log.contains("file=ipxe.efi"),
        "nothing went over TFTP:\n{log}"
    );
}

/// Debian's arm64 netboot installer (`debian-installer-12-netboot-arm64`):
/// its GRUB, kernel and initrd, as the package lays them out.
const DEBIAN_INSTALLER_ARM64: &str = "/usr/lib/debian-installer/images/12/arm64/text";

/// What the ARM64 machine prints once the installer's kernel runs its
/// initrd's init: Linux userspace reached.
const ARM64_USERSPACE: &str = "Run /init as init process";

fn have_arm64_lab() -> bool {
    have_tool(
        "qemu-system-aarch64",
        "qemu-system-arm (bookworm-backports)",
    ) && pxe_lab::have_file(firmware::AAVMF_CODE, "qemu-efi-aarch64")
        && pxe_lab::have_file(
            format!("{DEBIAN_INSTALLER_ARM64}/debian-installer/arm64/grubaa64.efi"),
            "debian-installer-12-netboot-arm64",
        )
}

/// ARM64 UEFI for real: AAVMF's PXE asks with option 93 = 11, gets the
/// profile's arm64 boot file (Debian's signed netboot GRUB), which fetches
/// its config, the kernel and the initrd over TFTP and starts Linux.
#[test]
fn uefi_arm64_pxe_boots_debian_installers_grub_and_linux() {
    if !pxe_lab::privileged("uefi_arm64_pxe_boots_debian_installers_grub_and_linux")
        || !have_arm64_lab()
    {
        return;
    }
    let lab = firmware_lab_with(
        1,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
        "[profile.boot_files]\nuefi_arm64 = \"debian-installer/arm64/grubaa64.efi\"\n",
    );
    let boot = lab.work.path().join("boot");
    let installer = Path::new(DEBIAN_INSTALLER_ARM64).join("debian-installer/arm64");
    let into = boot.join("debian-installer/arm64");
    std::fs::create_dir_all(into.join("grub")).unwrap();
    for file in ["grubaa64.efi", "linux", "initrd.gz"] {
        std::fs::copy(installer.join(file), into.join(file)).unwrap();
    }
    // The installer's own menu waits for a key; this one boots at once.
    std::fs::write(
        into.join("grub/grub.cfg"),
        "set timeout=0\nmenuentry 'pxed arm64' {\n  linux /debian-installer/arm64/linux console=ttyAMA0 panic=-1 ---\n  initrd /debian-installer/arm64/initrd.gz\n}\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:0b", Firmware::UefiArm64Pxe);
    let (seen, text) =
        firmware::wait_for_any(&serial, &[ARM64_USERSPACE], Duration::from_secs(420));
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap_or_default();
    assert!(
        seen.is_some(),
        "AAVMF → GRUB → Linux did not reach userspace.\nserial:\n{text}\npxed:\n{log}"
    );
    eprintln!("arm64: userspace {:?} after power-on", started.elapsed());
    assert!(
        log.contains("(PXE, uefi-arm64) → OFFER"),
        "firmware PXE with option 93 = 11:\n{log}"
    );
    assert!(
        log.contains("file=debian-installer/arm64/grubaa64.efi"),
        "the profile's arm64 boot file went over TFTP:\n{log}"
    );
}

#[test]
fn bios_pxelinux_boots_linux_all_over_tftp_with_the_kernel_serving_the_blocks() {
    if !pxe_lab::privileged(
        "bios_pxelinux_boots_linux_all_over_tftp_with_the_kernel_serving_the_blocks",
    ) || !have_qemu()
        || !have_pxelinux()
    {
        return;
    }
    // iPXE stands in for a legacy PXE ROM (QEMU ships no other BIOS ROM); the
    // machine entry makes pxed answer it as firmware PXE: pxelinux.0 over TFTP.
    let extra = &legacy_pxe_machine("52:54:00:fa:00:06");
    let lab = firmware_lab_with(
        1,
        false,
        &[
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--fastpath-memory",
            "64",
        ],
        extra,
    );
    let boot = lab.work.path().join("boot");
    add_pxelinux(&boot);
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:06", Firmware::BiosIpxe);
    lab.assert_booted(&serial, "PXELINUX over TFTP");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    for file in [
        "pxelinux.0",
        "ldlinux.c32",
        "pxelinux.cfg/default",
        "vmlinuz",
        "initrd.img",
    ] {
        assert!(
            log.contains(&format!("file={file} bytes=")),
            "{file} went over TFTP:\n{log}"
        );
    }
    assert!(
        log.contains("TFTP: file not found"),
        "PXELINUX's config probes were answered 'not found':\n{log}"
    );
    let kernel_blocks: u64 = log
        .lines()
        .filter(|l| {
            l.contains("TFTP transfer completed")
                && (l.contains("file=vmlinuz") || l.contains("file=initrd.img"))
        })
        .filter_map(|l| {
            l.split("kernel_tc=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        kernel_blocks > 1000,
        "the kernel tiers served the kernel and initrd ({kernel_blocks} blocks):\n{log}"
    );
}

/// A TFTP read request refused by admission control is dropped, and real
/// firmware sends it again: with a budget of one new transfer per client
/// address every 2 s, OVMF (EDK2's PXE: a size probe, then the download)
/// and PXELINUX (loaded by iPXE's PXE stack; a dozen requests, config
/// probes included) both boot, with requests of each refused on the way.
#[test]
fn firmware_resends_tftp_requests_that_admission_control_drops() {
    if !pxe_lab::privileged("firmware_resends_tftp_requests_that_admission_control_drops")
        || !have_qemu()
        || !have_pxelinux()
    {
        return;
    }
    let extra = &legacy_pxe_machine("52:54:00:fa:02:01");
    let lab = firmware_lab_with(
        2,
        false,
        &[
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--fastpath-memory",
            "64",
            "--admit-tftp-per-source",
            "0.5",
            "--admit-tftp-per-source-burst",
            "1",
            "--stats-interval",
            "1",
        ],
        extra,
    );
    add_pxelinux(&lab.work.path().join("boot"));
    let (uefi, _) = lab.boot(0, "52:54:00:fa:02:00", Firmware::UefiPxe);
    let (pxelinux, _) = lab.boot(1, "52:54:00:fa:02:01", Firmware::BiosIpxe);
    lab.assert_booted(&uefi, "OVMF PXE with its requests refused at first");
    lab.assert_booted(&pxelinux, "PXELINUX with its requests refused at first");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    let refused: u64 = log
        .lines()
        .filter(|l| l.contains("counters"))
        .filter_map(|l| {
            l.split("DROP_TFTP_SOURCE_OVER_RATE=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    eprintln!("read requests refused on the way: {refused}");
    assert!(
        refused >= 2,
        "read requests were refused on the way ({refused}):\n{log}"
    );
    for file in ["ipxe.efi", "pxelinux.0", "ldlinux.c32", "vmlinuz"] {
        assert!(
            log.contains(&format!("file={file} bytes=")),
            "{file} went over TFTP:\n{log}"
        );
    }
}

#[test]
fn uefi_http_boot_works_with_pxed_in_proxy_mode_where_dnsmasq_alone_cannot() {
    if !pxe_lab::privileged(
        "uefi_http_boot_works_with_pxed_in_proxy_mode_where_dnsmasq_alone_cannot",
    ) || !have_qemu()
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let lab = firmware_lab(1, true, &["--dhcp", "proxy"]);
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:07", Firmware::UefiHttp);
    lab.assert_booted(&serial, "OVMF HTTP Boot with proxyDHCP");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("(HTTP Boot, uefi-x64-http) → proxy OFFER, boot http://198.18.0.1/ipxe.efi"),
        "{log}"
    );
}

#[test]
fn bios_ipxe_boots_with_pxed_in_proxy_mode_and_the_fast_paths_off() {
    if !pxe_lab::privileged("bios_ipxe_boots_with_pxed_in_proxy_mode_and_the_fast_paths_off")
        || !have_qemu()
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let lab = firmware_lab(
        1,
        true,
        &["--dhcp", "proxy", "--xdp-mode", "off", "--no-tc"],
    );
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:08", Firmware::BiosIpxe);
    lab.assert_booted(&serial, "BIOS iPXE with proxyDHCP, XDP and TC off");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(log.contains("(iPXE, bios) → proxy OFFER"), "{log}");
}

#[test]
fn uefi_http_boot_starts_a_unified_kernel_image_with_no_ipxe_at_all() {
    if !pxe_lab::privileged("uefi_http_boot_starts_a_unified_kernel_image_with_no_ipxe_at_all")
        || !have_qemu()
    {
        return;
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("firmware-lab");
    let uki = firmware::unified_kernel_image(&cache, &images(), "console=ttyS0 panic=-1")
        .expect("building a UKI (systemd-boot-efi, objcopy)");
    let extra = "[[profile]]\nname = \"uki\"\n[profile.boot_files]\nuefi_x64 = \"uki.efi\"\n\
                 [[machine]]\nmac = \"52:54:00:fa:00:09\"\nprofile = \"uki\"\n";
    let lab = firmware_lab_with(
        1,
        false,
        &["--dhcp", "full", "--range", "198.18.0.100-198.18.0.199"],
        extra,
    );
    std::fs::copy(&uki, lab.work.path().join("boot/uki.efi")).unwrap();
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:09", Firmware::UefiHttp);
    lab.assert_booted(&serial, "OVMF HTTP Boot of a unified kernel image");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(log.contains("boot http://198.18.0.1/uki.efi"), "{log}");
    assert!(
        !log.contains("(iPXE"),
        "no iPXE anywhere in this boot:\n{log}"
    );
}

#[test]
fn pxelinux_boots_all_over_tftp_with_pxed_in_proxy_mode() {
    if !pxe_lab::privileged("pxelinux_boots_all_over_tftp_with_pxed_in_proxy_mode")
        || !have_qemu()
        || !have_tool("dnsmasq", "dnsmasq-base")
        || !have_pxelinux()
    {
        return;
    }
    let extra = &legacy_pxe_machine("52:54:00:fa:00:0a");
    let lab = firmware_lab_with(1, true, &["--dhcp", "proxy"], extra);
    let boot = lab.work.path().join("boot");
    add_pxelinux(&boot);
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:0a", Firmware::BiosIpxe);
    lab.assert_booted(&serial, "PXELINUX with proxyDHCP");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(log.contains("proxy OFFER, boot pxelinux.0"), "{log}");
    assert!(
        log.contains("file=vmlinuz bytes="),
        "the kernel went over TFTP:\n{log}"
    );
}

#[test]
fn a_unified_kernel_image_boots_over_http_with_pxed_in_proxy_mode() {
    if !pxe_lab::privileged("a_unified_kernel_image_boots_over_http_with_pxed_in_proxy_mode")
        || !have_qemu()
        || !have_tool("dnsmasq", "dnsmasq-base")
    {
        return;
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("firmware-lab");
    let uki = firmware::unified_kernel_image(&cache, &images(), "console=ttyS0 panic=-1")
        .expect("building a UKI");
    let extra = "[[profile]]\nname = \"uki\"\n[profile.boot_files]\nuefi_x64 = \"uki.efi\"\n\
                 [[machine]]\nmac = \"52:54:00:fa:00:0b\"\nprofile = \"uki\"\n";
    let lab = firmware_lab_with(
        1,
        true,
        &["--dhcp", "proxy", "--xdp-mode", "off", "--no-tc"],
        extra,
    );
    std::fs::copy(&uki, lab.work.path().join("boot/uki.efi")).unwrap();
    let (serial, _) = lab.boot(0, "52:54:00:fa:00:0b", Firmware::UefiHttp);
    lab.assert_booted(&serial, "UKI over HTTP Boot with proxyDHCP, fast paths off");
    let log = std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap();
    assert!(
        log.contains("proxy OFFER, boot http://198.18.0.1/uki.efi"),
        "{log}"
    );
}

/// Whether PXELINUX and the ldlinux.c32 it loads are installed (see [`have_file`](pxe_lab::have_file)).
/// A `legacy` profile booting pxelinux.0, and the machine `mac` in it
/// answered as firmware PXE. iPXE stands in for a legacy PXE ROM (QEMU
/// ships no other BIOS ROM): the entry makes pxed answer it with
/// pxelinux.0 over TFTP.
fn legacy_pxe_machine(mac: &str) -> String {
    format!(
        "[[profile]]\nname = \"legacy\"\n[profile.boot_files]\nbios = \"pxelinux.0\"\n\
         [[machine]]\nmac = \"{mac}\"\nprofile = \"legacy\"\nclient = \"pxe\"\n"
    )
}

fn have_pxelinux() -> bool {
    pxe_lab::have_file("/usr/lib/PXELINUX/pxelinux.0", "pxelinux")
        && pxe_lab::have_file(
            "/usr/lib/syslinux/modules/bios/ldlinux.c32",
            "syslinux-common",
        )
}

/// PXELINUX, its ldlinux.c32 and a config that boots the lab kernel.
fn add_pxelinux(boot: &Path) {
    std::fs::copy("/usr/lib/PXELINUX/pxelinux.0", boot.join("pxelinux.0")).unwrap();
    std::fs::copy(
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
        boot.join("ldlinux.c32"),
    )
    .unwrap();
    std::fs::create_dir_all(boot.join("pxelinux.cfg")).unwrap();
    std::fs::write(
        boot.join("pxelinux.cfg/default"),
        "DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img console=ttyS0 panic=-1\n",
    )
    .unwrap();
}

const API_TOKEN: &str = "firmware-test-token-0123456789";

/// curl in `ns` against pxed's API on 127.0.0.1:8067; (status, JSON body).
fn api(ns: &Netns, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {API_TOKEN}");
    let url = format!("http://127.0.0.1:8067/api/v1{path}");
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-H",
        &auth,
        "-w",
        "\n%{http_code}",
    ];
    if let Some(b) = body {
        args.extend_from_slice(&["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    args.push(&url);
    let out = ns.output("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

/// One machine's lab, full DHCP, with the API on 127.0.0.1:8067 (token
/// [`API_TOKEN`]) and `extra_config`; the directory holding the token file
/// (`token`) and the inventory.
fn firmware_lab_with_api(extra_config: &str) -> (FirmwareLab, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, format!("{API_TOKEN}\n")).unwrap();
    let inventory = secrets.path().join("inventory.redb");
    let lab = firmware_lab_with(
        1,
        false,
        &[
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--api",
            "127.0.0.1:8067",
            "--api-token-file",
            token.to_str().unwrap(),
            "--inventory-file",
            inventory.to_str().unwrap(),
        ],
        extra_config,
    );
    (lab, secrets)
}

/// Waits for the QEMU process `pid` (started by the lab) to end by itself.
fn wait_for_exit(lab: &Lab, pid: u32, timeout: Duration) -> bool {
    let Some(mut child) = lab.take_child(pid) else {
        return true;
    };
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

#[test]
fn uefi_machine_installs_marks_itself_provisioned_and_then_boots_no_nbp() {
    if !pxe_lab::privileged("uefi_machine_installs_marks_itself_provisioned_and_then_boots_no_nbp")
        || !have_qemu()
        || !have_tool("curl", "curl")
    {
        return;
    }
    const MAC: &str = "52:54:00:fa:00:0c";
    let extra = "[[profile]]\nname = \"installer\"\n\
                 cmdline = \"console=ttyS0 panic=-1 pxed.done={{provision_url}} pxed.token={{provision_token}}\"\n";
    let (lab, secrets) = firmware_lab_with_api(extra);
    let token = secrets.path().join("token");
    let pxed_log = || std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap_or_default();
    assert!(
        lab.server.wait_for_tcp_port(8067, Duration::from_secs(20)),
        "{}",
        pxed_log()
    );
    let (status, record) = api(
        &lab.server,
        "PUT",
        &format!("/machines/{MAC}"),
        Some(r#"{"profile": "installer"}"#),
    );
    assert_eq!(status, 200, "{record}");

    // First power-on: OVMF PXE → ipxe.efi → the installer profile's kernel,
    // whose initramfs calls `provisioned` and powers off.
    let (serial, pid) = lab.boot_with(0, MAC, Firmware::UefiPxe, "serial-install.log", &[]);
    let (said, text) = firmware::wait_for_any(
        &serial,
        &[
            firmware::PROVISIONED_MARKER,
            firmware::PROVISION_FAILED_MARKER,
        ],
        Duration::from_secs(300),
    );
    assert_eq!(
        said,
        Some(firmware::PROVISIONED_MARKER),
        "the installer did not mark its machine provisioned.\nserial:\n{text}\npxed:\n{}",
        pxed_log()
    );
    assert!(text.contains(firmware::MARKER), "{text}");
    assert!(
        wait_for_exit(&lab.lab, pid, Duration::from_secs(60)),
        "the machine did not power off:\n{text}"
    );
    let log = pxed_log();
    assert!(
        log.contains("provisioned: the machine boots from its disk from now on"),
        "{log}"
    );
    let (_, record) = api(&lab.server, "GET", &format!("/machines/{MAC}"), None);
    assert_eq!(record["netboot"], false, "{record}");
    assert_first_boot_timeline(&lab.server, MAC, &log);
    // And as an operator reads it (docs/OBSERVABILITY.md shows this output).
    let ctl = lab
        .server
        .output(
            PXED,
            &[
                "ctl",
                "--url",
                "http://127.0.0.1:8067",
                "--token-file",
                token.to_str().unwrap(),
                "boots",
                MAC,
            ],
        )
        .unwrap();
    let shown = String::from_utf8_lossy(&ctl.stdout);
    eprintln!("pxed ctl boots {MAC}:\n{shown}");
    assert!(
        ctl.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    assert!(
        shown.starts_with("boot 1 of 1: began ") && shown.contains(", reached provisioned\n"),
        "{shown}"
    );
    for line in ["TFTP ipxe.efi", "HTTP /vmlinuz", "provisioned"] {
        assert!(shown.contains(line), "{line} missing:\n{shown}");
    }

    // Second power-on, same MAC: an address and no boot file; OVMF's PXE
    // says so (PXE-E16) and BdsDxe goes on to the next boot option, HTTP
    // Boot, whose DHCP pxed answers with no URL either. Linux never starts.
    let first_boot = log.len();
    let (serial, _) = lab.boot_with(
        0,
        MAC,
        Firmware::UefiPxe,
        "serial-after.log",
        &firmware::OVMF_NO_IPV6_PXE,
    );
    let http_boot_answered = |log: &str| {
        log[first_boot..].lines().any(|l| {
            l.contains(&format!(
                "DISCOVER from {MAC} (HTTP Boot, uefi-x64-http) → OFFER"
            ))
        })
    };
    // About 60 s under TCG (PXE's four DISCOVERs, then HTTP Boot's first);
    // the bound leaves room for a CI machine booting other guests beside it.
    let started = std::time::Instant::now();
    let text = loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if http_boot_answered(&pxed_log())
            || text.contains(firmware::MARKER)
            || started.elapsed() > Duration::from_secs(180)
        {
            // A moment for whatever the firmware would do with the answer.
            std::thread::sleep(Duration::from_secs(5));
            break String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default())
                .into_owned();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = pxed_log();
    let after = &log[first_boot..];
    let context = format!("serial:\n{text}\npxed since the first boot:\n{after}");
    assert!(
        !text.contains(firmware::MARKER),
        "Linux started on the second power-on:\n{context}"
    );
    assert!(
        text.contains(">>Start PXE over IPv4.")
            && text.contains("PXE-E16: No valid offer received.")
            && text.lines().any(|l| l.contains("BdsDxe: failed to load")
                && l.contains("\"UEFI PXEv4 (MAC:525400FA000C)")),
        "OVMF's PXE found no boot file and fell through:\n{context}"
    );
    assert!(
        text.contains(">>Start HTTP Boot over IPv4") && http_boot_answered(&log),
        "to the next boot option, HTTP Boot, which pxed answered:\n{context}"
    );
    let answers: Vec<&str> = after
        .lines()
        .filter(|l| l.contains(&format!("from {MAC} ")) && l.contains("→ "))
        .collect();
    assert!(
        answers
            .iter()
            .any(|l| l.contains("(PXE, uefi-x64) → OFFER"))
            && answers
                .iter()
                .any(|l| l.contains("(HTTP Boot, uefi-x64-http) → OFFER")),
        "PXE and HTTP Boot asked again and were answered:\n{context}"
    );
    assert!(
        answers.iter().all(|l| !l.contains(", boot ")),
        "no boot file offered:\n{}",
        answers.join("\n")
    );
    let file_requests: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("TFTP:") || l.contains("TFTP transfer") || l.contains("HTTP:"))
        .collect();
    assert!(
        file_requests.is_empty(),
        "no TFTP or HTTP request the second time:\n{}",
        file_requests.join("\n")
    );
    let (_, record) = api(&lab.server, "GET", &format!("/machines/{MAC}"), None);
    assert_eq!(record["netboot"], false, "{record}");
    // The timeline: a second boot, begun by the firmware's DISCOVER, offered
    // an address and no boot file, so the firmware went on: no failure, and
    // no file.
    let (status, answer) = api(&lab.server, "GET", &format!("/machines/{MAC}/boots"), None);
    assert_eq!(status, 200, "{answer}");
    let boots = answer["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 2, "{answer:#}");
    let second = &boots[1];
    assert_eq!(second["stage"], "power_on", "{second:#}");
    assert!(second["failure"].is_null(), "{second:#}");
    let events = second["events"].as_array().unwrap();
    assert!(
        !events.is_empty()
            && events
                .iter()
                .all(|e| e["kind"] == "dhcp" && e["boot_file"] == false),
        "{second:#}"
    );
}

/// pxed's timeline of the installing boot: every stage once, in boot order,
/// at times a TCG machine takes, and the files with their details.
fn assert_first_boot_timeline(server: &Netns, mac: &str, log: &str) {
    let (status, answer) = api(server, "GET", &format!("/machines/{mac}/boots"), None);
    assert_eq!(status, 200, "{answer}");
    let boot = &answer["boots"][0];
    let context = format!("{boot:#}\npxed:\n{log}");
    assert_eq!(boot["stage"], "provisioned", "{context}");
    assert!(boot["failure"].is_null(), "{context}");
    let order = [
        "power_on",
        "dhcp",
        "nbp",
        "ipxe_dhcp",
        "script",
        "os",
        "provisioned",
    ];
    let seconds: Vec<f64> = order
        .iter()
        .map(|s| {
            boot["stages"][*s]
                .as_f64()
                .unwrap_or_else(|| panic!("no {s} stage: {context}"))
        })
        .collect();
    assert!(
        seconds.windows(2).all(|w| w[0] <= w[1]) && seconds[6] > 1.0 && seconds[6] < 300.0,
        "stages out of order or implausible: {seconds:?}\n{context}"
    );
    let events = boot["events"].as_array().unwrap();
    let kind = |e: &serde_json::Value, k: &str| e["kind"] == k;
    let nbp = events
        .iter()
        .find(|e| kind(e, "tftp") && e["path"] == "ipxe.efi" && e["end"]["how"] == "completed")
        .unwrap_or_else(|| panic!("no completed ipxe.efi transfer: {context}"));
    assert!(
        nbp["size"].as_u64() > Some(100_000) && nbp["blksize"].as_u64() > Some(512),
        "{nbp}"
    );
    for file in ["/vmlinuz", "/initrd.img"] {
        assert!(
            events.iter().any(|e| kind(e, "http")
                && e["path"] == file
                && e["status"] == 200
                && e["complete"] == true),
            "{file} not downloaded whole: {context}"
        );
    }
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events.iter().position(pred).unwrap_or(usize::MAX)
    };
    let ipxe_ack = at(&|e| kind(e, "dhcp") && e["client"] == "ipxe" && e["answered"] == "ACK");
    let script = at(&|e| kind(e, "http") && e["route"] == "script");
    let provisioned = at(&|e| kind(e, "provisioned"));
    assert!(
        at(&|e| kind(e, "dhcp") && e["asked"] == "DISCOVER") == 0
            && ipxe_ack < script
            && script < provisioned
            && provisioned < usize::MAX,
        "events out of order: {context}"
    );
}

/// A machine whose boot file is missing: its timeline says so, as the
/// failure of the boot, and the rack view counts it failed.
#[test]
fn a_machine_whose_nbp_is_missing_shows_the_error_as_its_failure() {
    if !pxe_lab::privileged("a_machine_whose_nbp_is_missing_shows_the_error_as_its_failure")
        || !have_qemu()
        || !have_tool("curl", "curl")
    {
        return;
    }
    const MAC: &str = "52:54:00:fa:00:0d";
    let extra =
        "[[profile]]\nname = \"broken\"\n[profile.boot_files]\nuefi_x64 = \"missing.efi\"\n\
                 [[machine]]\nmac = \"52:54:00:fa:00:0d\"\nprofile = \"broken\"\n";
    let (lab, _secrets) = firmware_lab_with_api(extra);
    let pxed_log = || std::fs::read_to_string(lab.work.path().join("pxed.log")).unwrap_or_default();
    assert!(lab.server.wait_for_tcp_port(8067, Duration::from_secs(20)));
    let (serial, pid) = lab.boot_with(0, MAC, Firmware::UefiPxe, "serial-missing.log", &[]);
    let started = std::time::Instant::now();
    while !pxed_log().contains("TFTP: file not found")
        && started.elapsed() < Duration::from_secs(180)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    // A moment for the firmware to give up on the file.
    std::thread::sleep(Duration::from_secs(2));
    let (_, answer) = api(&lab.server, "GET", &format!("/machines/{MAC}/boots"), None);
    let (_, rack) = api(&lab.server, "GET", "/boots?since=10m", None);
    if let Some(child) = lab.lab.take_child(pid) {
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
    let serial = std::fs::read_to_string(&serial).unwrap_or_default();
    let context = format!("{answer:#}\nserial:\n{serial}\npxed:\n{}", pxed_log());
    let boot = &answer["boots"][0];
    let failure = boot["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("missing.efi")
            && (failure.contains("not found") || failure.contains("404")),
        "the boot's failure names the missing file: {context}"
    );
    assert_eq!(boot["stage"], "dhcp", "{context}");
    assert!(
        boot["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "tftp" && e["end"]["how"] == "refused"),
        "{context}"
    );
    assert_eq!(rack["failed"], 1, "{rack:#}");
    assert_eq!(rack["failed_machines"][0]["mac"], MAC, "{rack:#}");
}
