//! Real machines for the lab: QEMU guests booting over the lab's network,
//! with a Linux kernel and a tiny initramfs built from Debian packages.
//!
//! The kernel comes from `linux-image-*-amd64` and busybox from
//! `busybox-static`, both fetched with `apt-get download` and unpacked with
//! `dpkg-deb` into a cache directory (nothing is installed, nothing large is
//! committed). The initramfs's `/init` prints [`MARKER`] and the kernel
//! command line on the serial console, then powers the guest off: a boot
//! test passes when the marker shows up in the serial log.
//!
//! An installer's last step, when the command line carries
//! `pxed.done=URL pxed.token=TOKEN`: before powering off, `/init` loads the
//! virtio-net driver (modules from the same kernel package), takes an address
//! with busybox udhcpc, POSTs to URL with `Authorization: Bearer TOKEN`
//! (busybox wget) and prints [`PROVISIONED_MARKER`] if pxed said yes, or
//! [`PROVISION_FAILED_MARKER`] with what failed.
//!
//! QEMU runs under TCG (`/dev/kvm` here lacks vmx/svm): a boot to the marker
//! takes 20–60 s.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Lab, Netns};

/// Printed by the guest's `/init` once Linux reaches userspace.
pub const MARKER: &str = "PXED-LAB-BOOTED";

/// Printed after [`MARKER`] once `pxed.done=URL` answered the POST with 2xx.
pub const PROVISIONED_MARKER: &str = "PXED-LAB-PROVISIONED";

/// Printed instead of [`PROVISIONED_MARKER`], with the step that failed.
pub const PROVISION_FAILED_MARKER: &str = "PXED-LAB-PROVISION-FAILED";

/// What the initramfs holds and does; a cache whose `initrd.version` says
/// otherwise was built by an older lab and its initramfs is built again.
const INITRAMFS_VERSION: &str = "2: pxed.done provisioning with virtio-net modules\n";

/// The kernel modules the provisioning step loads, in dependency order (a
/// Debian kernel builds virtio and virtio-net as modules, and the initramfs
/// has no modprobe database).
const NET_MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The kernel and initramfs a lab machine boots.
pub struct BootImages {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Serialises building into the cache: tests that boot machines run in
/// parallel threads, and one must not run busybox while another copies it.
static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the boot images into `cache` once and reuses them afterwards (the
/// initramfs again when an older lab built it: see `INITRAMFS_VERSION`).
pub fn boot_images(cache: &Path) -> io::Result<BootImages> {
    let _building = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = cache.join("vmlinuz");
    let initrd = cache.join("initrd.img");
    let stamp = cache.join("initrd.version");
    let current = std::fs::read_to_string(&stamp).is_ok_and(|v| v == INITRAMFS_VERSION);
    if kernel.exists() && initrd.exists() && current {
        return Ok(BootImages { kernel, initrd });
    }
    std::fs::create_dir_all(cache)?;
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let kernel_tree = match cached_kernel_tree(&kernel, &debs) {
        Some(tree) => tree,
        None => fetch_kernel(cache, &debs, &kernel)?,
    };

    let busybox_tree = unpack("busybox-static", &debs)?;
    let initrd_tmp = cache.join("initrd.img.tmp");
    build_initramfs(
        &busybox_tree.join("bin/busybox"),
        &kernel_tree,
        &initrd_tmp,
        cache,
    )?;
    std::fs::rename(&initrd_tmp, &initrd)?;
    std::fs::write(&stamp, INITRAMFS_VERSION)?;
    Ok(BootImages { kernel, initrd })
}

/// The unpacked kernel package whose `/boot/vmlinuz-*` is the cached kernel,
/// so a cache from before the initramfs held modules gets the matching ones.
fn cached_kernel_tree(kernel: &Path, debs: &Path) -> Option<PathBuf> {
    let cached = std::fs::read(kernel).ok()?;
    std::fs::read_dir(debs).ok()?.flatten().find_map(|entry| {
        let tree = entry.path();
        let is_kernel = tree.is_dir()
            && entry
                .file_name()
                .to_string_lossy()
                .starts_with("linux-image-");
        if !is_kernel {
            return None;
        }
        let vmlinuz = std::fs::read_dir(tree.join("boot"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })?;
        (std::fs::read(vmlinuz).ok()? == cached).then_some(tree)
    })
}

/// Downloads and unpacks the current Debian kernel, copies its vmlinuz to
/// `kernel`, and returns the unpacked tree (for its modules).
fn fetch_kernel(cache: &Path, debs: &Path, kernel: &Path) -> io::Result<PathBuf> {
    // linux-image-amd64 is a metapackage; its dependency is the real kernel.
    let mut depends =
        run_text("apt-cache", &["depends", "linux-image-amd64"], cache).unwrap_or_default();
    if !depends.contains("Depends: linux-image-") {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        depends = run_text("apt-cache", &["depends", "linux-image-amd64"], cache)?;
    }
    let kernel_package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_owned))
        .filter(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            io::Error::other(
                "apt-cache depends linux-image-amd64 names no kernel package (apt-get update?)",
            )
        })?;
    let kernel_tree = unpack(&kernel_package, debs)?;
    let vmlinuz = std::fs::read_dir(kernel_tree.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| io::Error::other(format!("{kernel_package} has no /boot/vmlinuz-*")))?;
    // Written aside and renamed in, so another process never sees half a file.
    let kernel_tmp = cache.join("vmlinuz.tmp");
    std::fs::copy(vmlinuz, &kernel_tmp)?;
    std::fs::rename(&kernel_tmp, kernel)?;
    Ok(kernel_tree)
}

/// A unified kernel image: systemd's EFI stub (`systemd-boot-efi`, unpacked)
/// with the lab kernel, initramfs and `cmdline` as sections, built once with
/// objcopy. UEFI HTTP Boot can fetch and start it as a single file.
pub fn unified_kernel_image(
    cache: &Path,
    images: &BootImages,
    cmdline: &str,
) -> io::Result<PathBuf> {
    let _building = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let uki = cache.join("uki.efi");
    if uki.exists() {
        return Ok(uki);
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let stub =
        unpack("systemd-boot-efi", &debs)?.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub");
    let uki_tmp = cache.join("uki.efi.tmp");
    let cmdline_file = cache.join("uki-cmdline");
    std::fs::write(&cmdline_file, cmdline)?;
    let osrel = cache.join("uki-os-release");
    std::fs::write(&osrel, "NAME=pxed-lab\n")?;
    // Section addresses past the stub's own (it ends below 0x20000).
    run(Command::new("objcopy")
        .arg("--add-section")
        .arg(format!(".osrel={}", osrel.display()))
        .args(["--change-section-vma", ".osrel=0x20000"])
        .arg("--add-section")
        .arg(format!(".cmdline={}", cmdline_file.display()))
        .args(["--change-section-vma", ".cmdline=0x30000"])
        .arg("--add-section")
        .arg(format!(".linux={}", images.kernel.display()))
        .args(["--change-section-vma", ".linux=0x2000000"])
        .arg("--add-section")
        .arg(format!(".initrd={}", images.initrd.display()))
        .args(["--change-section-vma", ".initrd=0x3000000"])
        .arg(&stub)
        .arg(&uki_tmp))?;
    std::fs::rename(&uki_tmp, &uki)?;
    Ok(uki)
}

/// `apt-get download` + `dpkg-deb -x` into `debs/<package>`.
fn unpack(package: &str, debs: &Path) -> io::Result<PathBuf> {
    let tree = debs.join(package);
    if tree.exists() {
        return Ok(tree);
    }
    if run(Command::new("apt-get")
        .args(["download", package])
        .current_dir(debs))
    .is_err()
    {
        // A machine whose package lists were never fetched knows no packages.
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["download", package])
            .current_dir(debs))?;
    }
    let deb = std::fs::read_dir(debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .ok_or_else(|| io::Error::other(format!("apt-get download {package} left no .deb")))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    Ok(tree)
}

/// `/init` without `pxed.done` on the command line: the marker, the command
/// line, power off (as every boot test expects).
fn init_script() -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t devtmpfs dev /dev 2>/dev/null\n\
         echo \"{MARKER} cmdline: $(/bin/busybox cat /proc/cmdline)\" > /dev/ttyS0\n\
         echo \"{MARKER}\" > /dev/console\n\
         done_url=\n\
         token=\n\
         for word in $(/bin/busybox cat /proc/cmdline); do\n\
         \x20 case \"$word\" in\n\
         \x20   pxed.done=*) done_url=\"${{word#pxed.done=}}\" ;;\n\
         \x20   pxed.token=*) token=\"${{word#pxed.token=}}\" ;;\n\
         \x20 esac\n\
         done\n\
         if [ -n \"$done_url\" ]; then\n\
         \x20 /bin/provision \"$done_url\" \"$token\" > /dev/ttyS0 2>&1\n\
         fi\n\
         /bin/busybox poweroff -f\n"
    )
}

/// `/bin/provision URL TOKEN`: the network up, then the installer's last call.
fn provision_script() -> String {
    let modules = NET_MODULES.join(" ");
    format!(
        "#!/bin/busybox sh\n\
         bb=/bin/busybox\n\
         fail() {{ echo \"{PROVISION_FAILED_MARKER}: $*\"; exit 1; }}\n\
         for m in {modules}; do\n\
         \x20 $bb insmod /lib/modules/$m.ko || fail \"insmod $m\"\n\
         done\n\
         n=0\n\
         until $bb ip link set eth0 up 2>/dev/null; do\n\
         \x20 n=$((n + 1)); [ $n -lt 100 ] || fail \"no eth0\"; $bb usleep 100000\n\
         done\n\
         $bb udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /bin/udhcpc-script || fail \"udhcpc: no address\"\n\
         echo \"provision: POST $1\"\n\
         $bb wget -q -O - --post-data= --header \"Authorization: Bearer $2\" \"$1\" || fail \"wget $1\"\n\
         echo\n\
         echo \"{PROVISIONED_MARKER}\"\n"
    )
}

/// udhcpc's hook: puts the leased address on the interface.
const UDHCPC_SCRIPT: &str = "#!/bin/busybox sh\n\
case \"$1\" in\n\
  bound|renew) /bin/busybox ifconfig \"$interface\" \"$ip\" netmask \"${subnet:-255.255.255.0}\" up\n\
    echo \"udhcpc: $interface $ip/$subnet from $serverid\" ;;\n\
esac\n";

/// `name.ko` under the kernel package's `lib/modules`.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let wanted = format!("{name}.ko");
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if entry.file_name().to_string_lossy() == wanted {
            return Some(path);
        }
    }
    None
}

fn build_initramfs(busybox: &Path, kernel_tree: &Path, out: &Path, cache: &Path) -> io::Result<()> {
    let staging = cache.join("initramfs");
    let _ = std::fs::remove_dir_all(&staging);
    for dir in ["bin", "dev", "proc", "sys", "lib/modules"] {
        std::fs::create_dir_all(staging.join(dir))?;
    }
    std::fs::copy(busybox, staging.join("bin/busybox"))?;
    for module in NET_MODULES {
        let found = find_module(&kernel_tree.join("lib/modules"), module).ok_or_else(|| {
            io::Error::other(format!(
                "{}: no {module}.ko under lib/modules",
                kernel_tree.display()
            ))
        })?;
        std::fs::copy(found, staging.join(format!("lib/modules/{module}.ko")))?;
    }
    for (path, text) in [
        ("init", init_script()),
        ("bin/provision", provision_script()),
        ("bin/udhcpc-script", UDHCPC_SCRIPT.to_owned()),
    ] {
        let file = staging.join(path);
        std::fs::write(&file, text)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
    }
    // The console node must exist before devtmpfs is mounted, or /init has no stdout.
    run(Command::new("mknod")
        .arg(staging.join("dev/console"))
        .args(["c", "5", "1"]))?;
    let list = run_text("sh", &["-c", "find . | LC_ALL=C sort"], &staging)?;
    let cpio = Command::new(busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&staging)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut cpio = cpio;
    std::io::Write::write_all(cpio.stdin.as_mut().unwrap(), list.as_bytes())?;
    drop(cpio.stdin.take());
    let output = cpio.wait_with_output()?;
    if !output.status.success() {
        return Err(io::Error::other("busybox cpio failed"));
    }
    std::fs::write(out, output.stdout)
}

/// Firmware a lab machine boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS running iPXE (Debian `ipxe`'s `ipxe.lkrn`, loaded as the
    /// guest kernel): an iPXE client from the first DHCP on. The NIC option
    /// ROM would be the usual way, but bookworm-backports' SeaBIOS does not
    /// run the virtio-net ROM here (its boot menu never lists the network).
    BiosIpxe,
    /// OVMF (UEFI) with its own PXE stack (no iPXE ROM): option 93 = 7.
    UefiPxe,
    /// OVMF's UEFI HTTP Boot: option 60 `HTTPClient`, option 93 = 16.
    UefiHttp,
    /// AAVMF (EDK2 for ARM64, Debian `qemu-efi-aarch64`) on QEMU's `virt`
    /// board with its own PXE stack: option 93 = 11.
    UefiArm64Pxe,
}

const IPXE_LKRN: &str = "/usr/lib/ipxe/ipxe.lkrn";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";
pub const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// Starts a QEMU guest in `ns` on tap device `tap`, serial console to
/// `serial_log`. The lab stops it (by PID) when dropped.
pub fn start_machine(
    lab: &Lab,
    ns: &Netns,
    tap: &str,
    mac: &str,
    firmware: Firmware,
    work: &Path,
    serial_log: &Path,
) -> io::Result<u32> {
    start_machine_with(lab, ns, tap, mac, firmware, work, serial_log, &[])
}

/// Firmware settings that leave OVMF no IPv6 PXE boot option: the lab has
/// no DHCPv6 server, and that option alone spends about 90 s under TCG
/// waiting for one before OVMF goes on to the next.
pub const OVMF_NO_IPV6_PXE: [&str; 2] =
    ["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"];

/// [`start_machine`] with `extra` QEMU arguments after the lab's own.
#[expect(
    clippy::too_many_arguments,
    reason = "start_machine's arguments and the extra ones; a builder for one caller would be more code than this"
)]
pub fn start_machine_with(
    lab: &Lab,
    ns: &Netns,
    tap: &str,
    mac: &str,
    firmware: Firmware,
    work: &Path,
    serial_log: &Path,
    extra: &[&str],
) -> io::Result<u32> {
    let netdev = format!("tap,id=n0,ifname={tap},script=no,downscript=no");
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        // The ARM64 machine boots Debian's installer, whose initrd is 40 MB.
        if firmware == Firmware::UefiArm64Pxe {
            "1024"
        } else {
            "512"
        }
        .into(),
        "-smp".into(),
        "1".into(),
        "-display".into(),
        "none".into(),
        "-vga".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        // Debian's bookworm-backports QEMU looks for SeaBIOS and iPXE ROMs where
        // trixie puts them; point it at bookworm's places.
        "-L".into(),
        "/usr/share/seabios".into(),
        "-L".into(),
        "/usr/share/qemu".into(),
        "-serial".into(),
        format!("file:{}", serial_log.display()),
        "-netdev".into(),
        netdev,
    ];
    match firmware {
        Firmware::BiosIpxe => {
            args.extend([
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
                "-kernel".into(),
                IPXE_LKRN.into(),
            ]);
        }
        Firmware::UefiPxe | Firmware::UefiHttp => {
            let vars = work.join(format!("OVMF_VARS-{}.fd", mac.replace(':', "")));
            std::fs::copy(OVMF_VARS, &vars)?;
            args.extend([
                "-machine".into(),
                "q35".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                // romfile= leaves OVMF's own virtio-net driver and PXE/HTTP stack in charge.
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
            ]);
            if firmware == Firmware::UefiHttp {
                // OVMF tries PXE before HTTP; switching PXE off leaves HTTP Boot.
                args.extend([
                    "-fw_cfg".into(),
                    "name=opt/org.tianocore/IPv4PXESupport,string=n".into(),
                    "-fw_cfg".into(),
                    "name=opt/org.tianocore/IPv6PXESupport,string=n".into(),
                ]);
            }
        }
        Firmware::UefiArm64Pxe => {
            let vars = work.join(format!("AAVMF_VARS-{}.fd", mac.replace(':', "")));
            std::fs::copy(AAVMF_VARS, &vars)?;
            args.extend([
                "-machine".into(),
                "virt".into(),
                // Not `max`: its pointer authentication is slow to emulate.
                "-cpu".into(),
                "cortex-a72".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
            ]);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu = match firmware {
        Firmware::UefiArm64Pxe => "qemu-system-aarch64",
        _ => "qemu-system-x86_64",
    };
    lab.spawn_logged(
        ns,
        qemu,
        &args,
        &work.join(format!("qemu-{}.log", mac.replace(':', ""))),
    )
}

/// Waits until `MARKER` appears in a serial log; returns the log either way.
pub fn wait_for_marker(serial_log: &Path, timeout: Duration) -> (bool, String) {
    let (seen, text) = wait_for_any(serial_log, &[MARKER], timeout);
    (seen.is_some(), text)
}

/// Waits until one of `needles` appears in a serial log; returns the first
/// found (in `needles`' order) and the log, or `None` and the log at timeout.
pub fn wait_for_any<'a>(
    serial_log: &Path,
    needles: &[&'a str],
    timeout: Duration,
) -> (Option<&'a str>, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(serial_log).unwrap_or_default()).into_owned();
        if let Some(found) = needles.iter().find(|n| text.contains(*n)) {
            return (Some(found), text);
        }
        if Instant::now() > deadline {
            return (None, text);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn run_text(program: &str, args: &[&str], dir: &Path) -> io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
