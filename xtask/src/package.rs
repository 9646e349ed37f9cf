//! `cargo xtask package`: pxed as a Debian package, assembled and built
//! with dpkg-deb (no extra tool to install): the binary, the hardened
//! systemd unit and the maintainer scripts of `packaging/debian/`, and the
//! example config as a conffile. The postinst creates the `pxed` user and
//! /var/lib/pxed and starts nothing; the postrm removes both on purge.
//!
//! [`check`] is what CI runs on it, without installing anything on the
//! machine: unpack it into a temporary root, check the shipped config with
//! the shipped binary, verify the unit with systemd-analyze, and serve one
//! machine's DHCP and TFTP from the packaged binary in a throwaway lab;
//! then install, remove and purge it with dpkg in a copy-on-write overlay
//! of the machine's own root, so the maintainer scripts run for real and
//! every change they make is thrown away with the overlay.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::workspace_root;

/// Builds target/debian/pxed_VERSION_ARCH.deb from a release build; its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let workspace = workspace_root();
    let (pxed, _bench) = crate::build_release_binaries()?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = output("dpkg", &["--print-architecture"])?;
    let name = format!("pxed_{version}_{arch}");
    let out = workspace.join("target/debian");
    let stage = out.join(&name);
    let _ = std::fs::remove_dir_all(&stage);
    let packaging = workspace.join("packaging/debian");
    let place = |from: &Path, to: &str, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let to = stage.join(to);
        std::fs::create_dir_all(to.parent().expect("a file in a directory"))?;
        std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    place(&pxed, "usr/sbin/pxed", 0o755)?;
    place(
        &packaging.join("pxed.service"),
        "lib/systemd/system/pxed.service",
        0o644,
    )?;
    place(
        &workspace.join("docs/pxed.example.toml"),
        "etc/pxed/pxed.toml",
        0o644,
    )?;
    place(
        &workspace.join("README.md"),
        "usr/share/doc/pxed/README.md",
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        place(&packaging.join(script), &format!("DEBIAN/{script}"), 0o755)?;
    }
    std::fs::write(stage.join("DEBIAN/conffiles"), "/etc/pxed/pxed.toml\n")?;
    let size_kib = dir_size(&stage)? / 1024;
    std::fs::write(
        stage.join("DEBIAN/control"),
        format!(
            "Package: pxed\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: pxed developers <pxed@localhost>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6, passwd\n\
             Section: net\n\
             Priority: optional\n\
             Description: PXE boot server with its hot paths in the kernel\n \
             DHCP and proxyDHCP, TFTP and HTTP boot for racks of machines that power\n \
             on together; XDP and TC programs answer TFTP and repeat DHCP requests.\n"
        ),
    )?;
    let deb = out.join(format!("{name}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&stage)
        .arg(&deb)
        .status()
        .context("running dpkg-deb (package dpkg)")?;
    if !status.success() {
        bail!("dpkg-deb --build failed");
    }
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}

/// Checks the package without installing it (see the module's doc).
pub fn check(deb: &Path) -> anyhow::Result<()> {
    let root = tempfile_dir("pxe-package")?;
    let checked = check_in(deb, &root);
    let _ = std::fs::remove_dir_all(&root);
    checked?;
    eprintln!("xtask: package: unpacked, config checked, unit verified, one machine served, installed and purged in an overlay");
    Ok(())
}

fn check_in(deb: &Path, root: &Path) -> anyhow::Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(root)
        .status()?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    let control = output("dpkg-deb", &["--info", deb.to_str().unwrap_or_default()])?;
    for needed in ["postinst", "postrm", "conffiles", "Package: pxed"] {
        if !control.contains(needed) {
            bail!("the package lacks {needed}:\n{control}");
        }
    }
    let pxed = root.join("usr/sbin/pxed");
    let config = root.join("etc/pxed/pxed.toml");
    let checked = output(
        pxed.to_str().unwrap_or_default(),
        &[
            "--config",
            config.to_str().unwrap_or_default(),
            "--check-config",
        ],
    )
    .context("the packaged pxed --check-config on the shipped example")?;
    eprintln!("xtask: package: {checked}");
    // The unit names /usr/sbin/pxed, which this machine need not have: the
    // check runs in a mount namespace of its own where the package's
    // /usr/sbin is mounted over the machine's (nothing on the machine changes).
    let unit = root.join("lib/systemd/system/pxed.service");
    let script = format!(
        "mount --bind '{}' /usr/sbin && exec systemd-analyze verify '{}'",
        root.join("usr/sbin").display(),
        unit.display()
    );
    let verified = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .context("running systemd-analyze (package systemd) in a mount namespace")?;
    let said = String::from_utf8_lossy(&verified.stderr).into_owned();
    if !verified.status.success() || said.contains("pxed.service") {
        bail!("systemd-analyze verify pxed.service:\n{said}");
    }
    serve_one_machine(&pxed, root)?;
    install_and_purge(deb, root)
}

/// What runs in the overlay's root, as root: each step says what it proves.
const INSTALL_AND_PURGE: &str = r#"
set -e
fail() { echo "package: $*" >&2; exit 1; }
dpkg -i /tmp/pxed.deb >/dev/null || fail "dpkg -i failed"
getent passwd pxed | grep -q ':/usr/sbin/nologin$' || fail "postinst did not create the pxed system user"
getent group pxed >/dev/null || fail "postinst did not create the pxed group"
test -d /var/lib/pxed || fail "postinst did not create /var/lib/pxed"
/usr/sbin/pxed --config /etc/pxed/pxed.toml --check-config >/dev/null || fail "the installed pxed refuses the installed config"
test "$(dpkg-query -W -f='${Status}' pxed)" = "install ok installed" || fail "dpkg does not list pxed as installed"
dpkg --remove pxed >/dev/null || fail "dpkg --remove failed"
test ! -e /usr/sbin/pxed || fail "remove left /usr/sbin/pxed"
test -f /etc/pxed/pxed.toml || fail "remove took the operator's config (a conffile stays until purge)"
getent passwd pxed >/dev/null || fail "remove took the pxed user (only purge does)"
dpkg --purge pxed >/dev/null || fail "dpkg --purge failed"
test ! -e /etc/pxed/pxed.toml || fail "purge left /etc/pxed/pxed.toml"
test ! -e /var/lib/pxed || fail "purge left /var/lib/pxed"
if getent passwd pxed >/dev/null; then fail "purge left the pxed user"; fi
if dpkg-query -W pxed >/dev/null 2>&1; then fail "dpkg still knows pxed after purge"; fi
"#;

/// `dpkg -i`, `--remove` and `--purge` of the package in a mount namespace
/// of their own, chrooted into an overlay whose lower layer is the
/// machine's root and whose upper layer is a tmpfs: the maintainer scripts
/// really create and delete the user and the state directory, and the
/// machine keeps none of it (the namespace and its tmpfs vanish on exit).
fn install_and_purge(deb: &Path, scratch: &Path) -> anyhow::Result<()> {
    let layers = scratch.join("overlay");
    std::fs::create_dir_all(&layers)?;
    let l = layers.display();
    let setup = format!(
        "set -e; mount -t tmpfs tmpfs '{l}'; mkdir '{l}/upper' '{l}/work' '{l}/root'; \
         mount -t overlay overlay -o 'lowerdir=/,upperdir={l}/upper,workdir={l}/work' '{l}/root'; \
         mount -t proc proc '{l}/root/proc'; mount --rbind /dev '{l}/root/dev'; \
         mount -t tmpfs tmpfs '{l}/root/tmp'; mount -t tmpfs tmpfs '{l}/root/run'; \
         cp '{}' '{l}/root/tmp/pxed.deb'; exec chroot '{l}/root' sh -c \"$0\"",
        deb.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &setup])
        .arg(INSTALL_AND_PURGE)
        .output()
        .context("running unshare (package util-linux)")?;
    if !out.status.success() {
        bail!(
            "installing and purging the package in an overlay:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The packaged binary in a lab: one simulated UEFI machine gets an
/// address and its boot file, byte-exact.
fn serve_one_machine(pxed: &Path, root: &Path) -> anyhow::Result<()> {
    let lab = pxe_lab::Lab::new()?;
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .server_addr("198.18.0.1/24")
        .client_addr("198.18.0.254/24")
        .build()?;
    let boot = root.join("srv");
    std::fs::create_dir_all(&boot)?;
    let nbp: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(boot.join("ipxe.efi"), &nbp)?;
    let leases = root.join("leases.redb");
    let log = root.join("pxed.log");
    lab.spawn_logged(
        &server,
        pxed,
        &[
            "--interface",
            "eth0",
            "--boot-root",
            boot.to_str().unwrap_or_default(),
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--lease-file",
            leases.to_str().unwrap_or_default(),
            "--inventory-file",
            root.join("inventory.redb").to_str().unwrap_or_default(),
        ],
        &log,
    )?;
    if !server.wait_for_udp_port(69, Duration::from_secs(20)) {
        bail!(
            "the packaged pxed did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let bench = workspace_root().join("target/release/bench");
    let json = root.join("report.json");
    let out = client.output(
        &bench,
        &[
            "pxe",
            "--clients",
            "1",
            "--verify-root",
            boot.to_str().unwrap_or_default(),
            "--time-limit",
            "60",
            "--json",
            json.to_str().unwrap_or_default(),
        ],
    )?;
    if !out.status.success() {
        bail!(
            "one machine did not boot from the packaged pxed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
