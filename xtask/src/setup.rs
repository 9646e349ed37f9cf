//! Prerequisites of building and testing, each checked and, when missing,
//! installed or explained in one line.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Check,
    Install,
}

/// Components of the nightly toolchain the BPF crate needs, and why.
const NIGHTLY_COMPONENTS: &[(&str, &str)] = &[
    ("rust-src", "needed to build core for bpfel-unknown-none"),
    (
        "clippy",
        "the test suite lints the BPF crate for its own target",
    ),
];

/// Debian packages: the LLVM that bpf-linker links against, the network tools
/// the lab uses, and the real protocol peers the tests run.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    ("libpolly-22-dev", "bpf-linker's LLVM 22 build"),
    ("zlib1g-dev", "bpf-linker's LLVM 22 build"),
    ("libzstd-dev", "bpf-linker's LLVM 22 build"),
    ("iproute2", "test namespaces, veth pairs, bridges (ip)"),
    (
        "util-linux",
        "setpriv, to test running without privileges; unshare, to check the packaged unit in a mount namespace",
    ),
    (
        "fuse3",
        "fusermount3, which mounts the tests' filesystem that fails writes on demand",
    ),
    (
        "nftables",
        "packet loss injected in test namespaces (this kernel has no netem)",
    ),
    ("curl", "TFTP and HTTP client in the interop tests"),
    ("tftp-hpa", "TFTP client in the interop tests"),
    ("atftp", "TFTP client with windowsize in the interop tests"),
    (
        "libwrap0",
        "tftpd-hpa's one library (its binary is unpacked, not installed, by bench-tftp)",
    ),
    (
        "ovmf",
        "UEFI firmware for the QEMU machines of the firmware lab",
    ),
    (
        "qemu-efi-aarch64",
        "AAVMF, the ARM64 UEFI firmware of the firmware lab's arm64 machine",
    ),
    (
        "debian-installer-12-netboot-arm64",
        "the arm64 netboot GRUB, kernel and initrd the firmware lab's arm64 machine boots",
    ),
    (
        "pxelinux",
        "PXELINUX for the firmware lab's all-TFTP BIOS boot",
    ),
    ("syslinux-common", "ldlinux.c32, which PXELINUX loads"),
    (
        "binutils",
        "objcopy, to build the firmware lab's unified kernel image",
    ),
    (
        "ipxe",
        "iPXE boot programs (ipxe.efi, undionly.kpxe) for the demo and the firmware lab",
    ),
    ("busybox", "udhcpc, a DHCP client in the interop tests"),
    (
        "isc-dhcp-client",
        "dhclient, a DHCP client in the interop tests",
    ),
    (
        "isc-dhcp-relay",
        "dhcrelay, a relay agent that adds option 82 and forwards only replies that echo it (its service is never run)",
    ),
    (
        "dnsmasq-base",
        "a peer DHCP/TFTP server for interop tests and benchmarks (no service)",
    ),
    (
        "kea-dhcp4-server",
        "a peer DHCP server that holds port 67 exclusively (its service is never started)",
    ),
    (
        "kea-admin",
        "perfdhcp, ISC's DHCP load tool, for cargo xtask bench-dhcp",
    ),
    (
        "prometheus",
        "prometheus and promtool, a real scraper for the metrics tests (its service is never run)",
    ),
    (
        "postgresql",
        "PostgreSQL for --lease-store; the tests run their own server in a temporary directory (the system's service is never run)",
    ),
    (
        "systemd",
        "systemd-analyze, which verifies the packaged unit (cargo xtask package)",
    ),
];

/// Services that packages above enable on install, with the package that
/// brings each. The tests start their own instance inside a lab; one running
/// as a system service would sit in the root namespace, on the machine's
/// real network, and start again on every boot.
const SERVICES_NEVER_RUN: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("postgresql", "postgresql"),
    ("isc-dhcp-relay", "isc-dhcp-relay"),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";
/// The toolchain aya-build compiles the BPF crate with (`-Z build-std` needs nightly).
const BPF_TOOLCHAIN: &str = "nightly";

pub fn run(mode: Mode) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let can_install = mode == Mode::Install && is_root();

    let missing = missing_apt_packages();
    if !missing.is_empty() {
        if can_install {
            apt_install(&missing)?;
            keep_services_off(&missing)?;
        } else {
            let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
            for (name, why) in &missing {
                problems.push(format!("apt package {name} is missing ({why})"));
            }
            problems.push(format!("  fix: apt-get install -y {}", names.join(" ")));
        }
    }

    let qemu_missing: Vec<&str> = BACKPORTS_QEMU
        .iter()
        .copied()
        .filter(|name| !dpkg_installed(name))
        .collect();
    if !qemu_missing.is_empty() {
        if can_install {
            install_backports_qemu(&qemu_missing)?;
        } else {
            problems.push(format!(
                "{} missing (the firmware lab's x86 and ARM64 machines); fix: add bookworm-backports and apt-get install -t bookworm-backports {}",
                qemu_missing.join(", "),
                qemu_missing.join(" ")
            ));
        }
    }

    if !has_toolchain(BPF_TOOLCHAIN) {
        if mode == Mode::Install {
            step(&format!(
                "installing the {BPF_TOOLCHAIN} toolchain with rust-src"
            ));
            run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                BPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
        } else {
            problems.push(format!(
                "the {BPF_TOOLCHAIN} toolchain is missing (the BPF crate builds with -Z build-std); fix: rustup toolchain install {BPF_TOOLCHAIN} --profile minimal --component rust-src"
            ));
        }
    } else {
        for (component, why) in NIGHTLY_COMPONENTS {
            if has_component(BPF_TOOLCHAIN, component) {
                continue;
            }
            if mode == Mode::Install {
                step(&format!("adding {component} to {BPF_TOOLCHAIN}"));
                run_cmd(Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    BPF_TOOLCHAIN,
                ]))?;
            } else {
                problems.push(format!(
                    "{component} is missing from {BPF_TOOLCHAIN} ({why}); fix: rustup component add {component} --toolchain {BPF_TOOLCHAIN}"
                ));
            }
        }
    }

    if !has_cargo_fuzz() {
        if mode == Mode::Install {
            step("installing cargo-fuzz (the fuzz targets run in the test suite; about a minute)");
            run_cmd(Command::new(env!("CARGO")).args(["install", "cargo-fuzz", "--locked"]))?;
        } else {
            problems.push(
                "cargo-fuzz is missing (the test suite runs each fuzz target for a bounded time); fix: cargo install cargo-fuzz --locked".to_owned(),
            );
        }
    }

    if !has_bpf_linker() {
        let fix = format!(
            "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version ^{BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        );
        if mode == Mode::Install && Path::new(LLVM_PREFIX).exists() {
            step("installing bpf-linker (builds against llvm-22; 1-2 minutes)");
            run_cmd(
                Command::new(env!("CARGO"))
                    .args([
                        "install",
                        "bpf-linker",
                        "--version",
                        &format!("^{BPF_LINKER_VERSION}"),
                    ])
                    .args(["--no-default-features", "--features", "llvm-22"])
                    .env("LLVM_PREFIX", LLVM_PREFIX),
            )?;
        } else {
            problems.push(format!(
                "bpf-linker {BPF_LINKER_VERSION} is missing (links the BPF object); fix: {fix}"
            ));
        }
    }

    problems.extend(kernel_problems());

    if problems.is_empty() {
        step("setup: everything is in place");
        return Ok(());
    }
    for p in &problems {
        eprintln!("setup: {p}");
    }
    if mode == Mode::Install && !is_root() {
        eprintln!("setup: run as root (or with sudo) to install the missing pieces");
    }
    bail!("{} prerequisite problem(s), listed above", problems.len())
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn missing_apt_packages() -> Vec<(&'static str, &'static str)> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|(name, _)| !dpkg_installed(name))
        .collect()
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        // Not `ends_with("installed")`: a package dpkg knows of but does not
        // have reads "unknown ok not-installed".
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout) == "install ok installed")
        .unwrap_or(false)
}

fn apt_install(missing: &[(&str, &str)]) -> anyhow::Result<()> {
    let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    step(&format!("installing {}", names.join(" ")));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    // Server packages (Kea, Prometheus) start their service on install: in the root
    // namespace, on the machine's real network. Deny every service start for
    // the install (policy-rc.d, exit 101), unless the machine already has a
    // policy of its own.
    let _no_services = DenyServiceStarts::install()?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&names)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `/usr/sbin/policy-rc.d` denying service starts while it lives.
struct DenyServiceStarts(Option<&'static Path>);

impl DenyServiceStarts {
    fn install() -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = Path::new("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self(None));
        }
        std::fs::write(
            path,
            "#!/bin/sh\n# written by cargo xtask setup for one apt-get install\nexit 101\n",
        )
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)))
        .context("writing /usr/sbin/policy-rc.d to keep installed servers from starting")?;
        Ok(Self(Some(path)))
    }
}

impl Drop for DenyServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Stops and disables the services of [`SERVICES_NEVER_RUN`] whose package
/// was just installed. policy-rc.d kept them from starting, but their
/// postinst still enabled them for the next boot, and a machine's own
/// policy-rc.d may allow starts. Packages installed before are the
/// machine's business, not setup's.
fn keep_services_off(installed: &[(&str, &str)]) -> anyhow::Result<()> {
    for (service, package) in SERVICES_NEVER_RUN {
        if installed.iter().any(|(name, _)| name == package) {
            step(&format!(
                "keeping the {service} service stopped and disabled"
            ));
            stop_and_disable(service)?;
        }
    }
    Ok(())
}

fn stop_and_disable(service: &str) -> anyhow::Result<()> {
    // The check sd_booted() makes: systemd is the running init.
    if Path::new("/run/systemd/system").is_dir() {
        return run_cmd(Command::new("systemctl").args(["disable", "--now", service]));
    }
    // No systemd running (a container): enabling is links on disk, which
    // `systemctl disable` removes offline, sysvinit's rc links included.
    if has_program("systemctl") {
        run_cmd(Command::new("systemctl").args(["disable", "--quiet", service]))?;
    } else if has_program("update-rc.d") {
        run_cmd(Command::new("update-rc.d").args([service, "disable"]))?;
    }
    // Only an init script can have started it then; usually nothing runs.
    let script = Path::new("/etc/init.d").join(service);
    let running = script.exists()
        && Command::new(&script)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if running {
        run_cmd(Command::new(&script).arg("stop"))?;
    }
    Ok(())
}

fn has_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// The QEMU system emulators the firmware lab runs: x86 (SeaBIOS, OVMF) and
/// ARM64 (AAVMF). Both share qemu-system-common, so both come from the same place.
const BACKPORTS_QEMU: [&str; 2] = ["qemu-system-x86", "qemu-system-arm"];

/// QEMU must come from bookworm-backports: the image's qemu-utils 10 (from
/// backports) conflicts with bookworm's QEMU 7.2. Only QEMU is taken from there.
fn install_backports_qemu(packages: &[&str]) -> anyhow::Result<()> {
    let bookworm =
        std::fs::read_to_string("/etc/debian_version").is_ok_and(|v| v.starts_with("12"));
    let list = Path::new("/etc/apt/sources.list.d/pxe-bookworm-backports.sources");
    if bookworm && !list.exists() {
        step("adding bookworm-backports (for QEMU only)");
        std::fs::write(
            list,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .context("writing the bookworm-backports source")?;
    }
    step(&format!("installing {}", packages.join(" ")));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if bookworm {
        install.args(["-t", "bookworm-backports"]);
    }
    run_cmd(install.args(packages))
}

fn has_toolchain(toolchain: &str) -> bool {
    Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn has_component(toolchain: &str, component: &str) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(component))
        })
        .unwrap_or(false)
}

fn has_cargo_fuzz() -> bool {
    Command::new(env!("CARGO"))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .contains(&format!("bpf-linker {BPF_LINKER_VERSION}."))
        })
        .unwrap_or(false)
}

/// What the kernel must offer, each as one line if absent.
fn kernel_problems() -> Vec<String> {
    let mut problems = Vec::new();
    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        problems.push(
            "the kernel has no bpf() syscall (CONFIG_BPF_SYSCALL); pxed cannot run here".to_owned(),
        );
    }
    match std::fs::read("/sys/kernel/btf/vmlinux") {
        Err(_) => problems.push(
            "the kernel exposes no BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)".to_owned(),
        ),
        // The XDP context type is in the kernel's BTF exactly when XDP is built in.
        Ok(btf) if !btf.windows(7).any(|w| w == b"xdp_md\0") => problems.push(
            "the kernel has no XDP (no xdp_md in its BTF); pxed's fast path cannot attach"
                .to_owned(),
        ),
        Ok(_) => {}
    }
    if !Path::new("/proc/self/ns/net").exists() {
        problems.push(
            "the kernel has no network namespaces (CONFIG_NET_NS); the tests need them".to_owned(),
        );
    }
    problems
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
