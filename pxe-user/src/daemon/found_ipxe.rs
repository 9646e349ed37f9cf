//! With no boot root, pxed serves the iPXE binaries the system has (Debian's
//! `ipxe` package), so `pxed --interface IF` alone chainloads iPXE. They are
//! copied into a private directory: Debian links some of them to /boot,
//! which confinement (rightly) refuses to follow.

use std::path::{Path, PathBuf};

use tracing::info;

/// Where Debian's `ipxe` package puts ipxe.efi and undionly.kpxe.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

/// The files copied, when present.
const IPXE_FILES: [&str; 4] = ["ipxe.efi", "undionly.kpxe", "snponly.efi", "ipxe.pxe"];

/// Name prefix of the private copies, followed by the owner's PID.
const PREFIX: &str = "pxed-ipxe-";

/// A private copy of the system's iPXE binaries, removed when dropped.
#[derive(Debug)]
pub struct FoundIpxe {
    dir: PathBuf,
}

impl FoundIpxe {
    /// Copies the iPXE binaries found in `source` into a fresh directory
    /// under `parent`, or `None` if there are none. Copies left by a pxed
    /// that was killed (their PID is gone) are removed first.
    pub fn copy(source: &Path, parent: &Path) -> Option<Self> {
        remove_stale_copies(parent);
        let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let found = Self { dir };
        let copied: Vec<&str> = IPXE_FILES
            .into_iter()
            .filter(|name| std::fs::copy(source.join(name), found.dir.join(name)).is_ok())
            .collect();
        if copied.is_empty() {
            return None;
        }
        info!(files = ?copied, "no --boot-root: serving the iPXE binaries found in {}", source.display());
        Some(found)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for FoundIpxe {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn remove_stale_copies(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_what_exists_removes_dead_owners_copies_and_cleans_up() {
        let source = tempfile::tempdir().unwrap();
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(source.path().join("ipxe.efi"), b"efi").unwrap();
        // No process has PID u32::MAX - 1 (pid_max is at most 2^22).
        let stale = parent.path().join(format!("{PREFIX}{}", u32::MAX - 1));
        std::fs::create_dir(&stale).unwrap();
        let found = FoundIpxe::copy(source.path(), parent.path()).expect("ipxe.efi is there");
        assert!(!stale.exists(), "a dead pxed's copy is swept");
        assert_eq!(
            std::fs::read(found.path().join("ipxe.efi")).unwrap(),
            b"efi"
        );
        assert!(!found.path().join("undionly.kpxe").exists());
        let dir = found.path().to_owned();
        drop(found);
        assert!(!dir.exists(), "the copy goes with its owner");
    }

    #[test]
    fn nothing_found_leaves_nothing_behind() {
        let source = tempfile::tempdir().unwrap();
        let parent = tempfile::tempdir().unwrap();
        assert!(FoundIpxe::copy(source.path(), parent.path()).is_none());
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}
