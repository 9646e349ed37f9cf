//! Other servers to measure against, installed so that none of them can ever
//! run as a system service: dnsmasq from `dnsmasq-base` (no service), and
//! tftpd-hpa's binary unpacked from its .deb into target/peers (the package
//! itself would start a TFTP service in the root namespace).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// Path of `in.tftpd`, unpacked from the tftpd-hpa package on first use.
pub fn tftpd_hpa(workspace: &Path) -> anyhow::Result<PathBuf> {
    let dir = workspace.join("target/peers/tftpd-hpa");
    let binary = dir.join("usr/sbin/in.tftpd");
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)?;
    let download = Command::new("apt-get")
        .args(["download", "tftpd-hpa"])
        .current_dir(&dir)
        .status();
    if !download.is_ok_and(|s| s.success()) {
        Command::new("apt-get").args(["update", "-qq"]).status()?;
        let again = Command::new("apt-get")
            .args(["download", "tftpd-hpa"])
            .current_dir(&dir)
            .status()?;
        if !again.success() {
            bail!("apt-get download tftpd-hpa failed");
        }
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("no tftpd-hpa .deb after apt-get download")?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&dir)
        .status()?;
    if !status.success() || !binary.exists() {
        bail!(
            "unpacking {} did not produce {}",
            deb.display(),
            binary.display()
        );
    }
    Ok(binary)
}

/// Version string of a Debian package, for the benchmark record.
pub fn package_version(package: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Version of a .deb unpacked under target/peers.
pub fn deb_version(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.ends_with(".deb"))
        })
        .and_then(|n| n.split('_').nth(1).map(|v| v.replace("%3a", ":")))
        .unwrap_or_else(|| "unknown".into())
}
