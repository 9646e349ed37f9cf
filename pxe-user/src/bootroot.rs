//! The boot root: the one directory TFTP and HTTP serve from, read-only.
//!
//! Confinement is enforced by the kernel, not by string checks alone: every
//! file is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`
//! relative to a descriptor of the root, so no path spelling, symlink or race
//! can reach a file outside it. The lexical checks before that exist to give
//! a clear reason in the log.
//!
//! Files are read into memory once and shared by every transfer of the same
//! file version. A file replaced on disk (new inode, or new size/mtime) is
//! read afresh for new transfers, while running ones keep the version they
//! started with, whether the file was renamed over or rewritten in place.
//! The first read of a version is single-flight: a rack asking for a new
//! initrd at once makes one copy, read once, while the others wait for it.
//! From async code, [`BootRoot::open_file`] reads on a blocking thread, so a large
//! file never stalls the runtime.
//!
//! Why not `mmap`: a mapped file truncated in place (`cp new old` does that)
//! pulls its pages out from under the mapping, and the next read of them is
//! SIGBUS, which kills the whole daemon. The bench harness test found exactly
//! that. A private copy per version costs the same memory as the page cache
//! would and cannot be taken away.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::SystemTime,
};

/// Why a requested path is not served.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such file in the boot root")]
    NotFound,
    #[error("refused: {0}")]
    Denied(&'static str),
    #[error("reading the file failed: {0}")]
    Io(#[source] io::Error),
}

/// One version of a served file, shared by every transfer of it.
pub struct BootFile {
    /// Path relative to the boot root, normalised (`/` separators, no `.`).
    pub path: String,
    data: Vec<u8>,
    identity: Identity,
}

impl BootFile {
    /// The file's bytes as they were when this version was read.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn len(&self) -> u64 {
        self.identity.size
    }

    pub fn is_empty(&self) -> bool {
        self.identity.size == 0
    }

    pub fn modified(&self) -> SystemTime {
        self.identity.modified
    }

    /// A validator that changes whenever the file is replaced (for HTTP ETags).
    pub fn etag(&self) -> String {
        let since = self
            .identity
            .modified
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "\"{:x}-{:x}-{:x}\"",
            self.identity.inode,
            self.identity.size,
            since.as_nanos()
        )
    }
}

/// What tells two versions of a file apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    device: u64,
    inode: u64,
    size: u64,
    modified: SystemTime,
}

/// The served directory and the file versions read from it.
pub struct BootRoot {
    path: PathBuf,
    dir: OwnedFd,
    cache: Mutex<HashMap<String, Arc<Version>>>,
}

/// One version of a path, read at most once.
struct Version {
    identity: Identity,
    file: OnceLock<Arc<BootFile>>,
    /// Held by the one reader of this version; the others wait on it.
    reading: Mutex<()>,
}

/// A file found in the root: its bytes in memory already, or still to read.
pub enum Lookup {
    Cached(Arc<BootFile>),
    Unread(Unread),
}

/// A file version opened but not yet in memory; [`Unread::read`] blocks.
pub struct Unread {
    relative: String,
    file: File,
    version: Arc<Version>,
}

impl Unread {
    /// Reads the version into memory, unless another reader of the same
    /// version did it first: then that copy is shared.
    pub fn read(self) -> Result<Arc<BootFile>, OpenError> {
        let _reading = self
            .version
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(file) = self.version.file.get() {
            return Ok(Arc::clone(file));
        }
        let identity = self.version.identity;
        let mut data = Vec::with_capacity(identity.size as usize);
        std::io::Read::read_to_end(&mut &self.file, &mut data).map_err(OpenError::Io)?;
        // What was read is the version: a file that changed while being read
        // gets a fresh identity on the next request.
        let boot_file = Arc::new(BootFile {
            path: self.relative,
            identity: Identity {
                size: data.len() as u64,
                ..identity
            },
            data,
        });
        Ok(Arc::clone(self.version.file.get_or_init(|| boot_file)))
    }
}

impl BootRoot {
    /// Opens `path` as the boot root. It must be an existing directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        let dir = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening boot root {}: {e}", path.display()),
            )
        })?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("boot root {} is not a directory", path.display()),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            dir: dir.into(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a file by the path a client asked for, reading it on a
    /// blocking thread if this version is not in memory yet.
    pub async fn open_file(&self, requested: &str) -> Result<Arc<BootFile>, OpenError> {
        match self.lookup(requested)? {
            Lookup::Cached(file) => Ok(file),
            Lookup::Unread(unread) => tokio::task::spawn_blocking(move || unread.read())
                .await
                .unwrap_or_else(|e| Err(OpenError::Io(io::Error::other(e)))),
        }
    }

    /// [`Self::open_file`] for blocking callers.
    pub fn open_file_blocking(&self, requested: &str) -> Result<Arc<BootFile>, OpenError> {
        match self.lookup(requested)? {
            Lookup::Cached(file) => Ok(file),
            Lookup::Unread(unread) => unread.read(),
        }
    }

    /// Finds a file by the path a client asked for: two system calls
    /// (`openat2`, `fstat`), no read. Backslashes count as separators
    /// (Windows-built loaders send them) and a leading `/` means the root
    /// itself, as tftpd-hpa's `--secure` does, so configs written for other
    /// servers keep working.
    pub fn lookup(&self, requested: &str) -> Result<Lookup, OpenError> {
        let relative = normalise(requested)?;
        let file = self.open_beneath(&relative)?;
        let meta = file.metadata().map_err(OpenError::Io)?;
        if !meta.is_file() {
            return Err(OpenError::Denied("not a regular file"));
        }
        let identity = Identity {
            device: std::os::linux::fs::MetadataExt::st_dev(&meta),
            inode: std::os::linux::fs::MetadataExt::st_ino(&meta),
            size: meta.len(),
            modified: meta.modified().map_err(OpenError::Io)?,
        };
        let version = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let current = cache.get(&relative).filter(|v| v.identity == identity);
            match current {
                Some(version) => Arc::clone(version),
                None => {
                    let version = Arc::new(Version {
                        identity,
                        file: OnceLock::new(),
                        reading: Mutex::new(()),
                    });
                    cache.insert(relative.clone(), Arc::clone(&version));
                    version
                }
            }
        };
        if let Some(read) = version.file.get() {
            return Ok(Lookup::Cached(Arc::clone(read)));
        }
        Ok(Lookup::Unread(Unread {
            relative,
            file,
            version,
        }))
    }

    fn open_beneath(&self, relative: &str) -> Result<File, OpenError> {
        use nix::{
            errno::Errno,
            fcntl::{openat2, OFlag, OpenHow, ResolveFlag},
        };
        if relative.contains('\0') {
            return Err(OpenError::Denied("NUL byte in path"));
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(self.dir.as_raw_fd(), relative, how).map_err(|errno| match errno {
            // A name longer than the filesystem allows is not in the root
            // either (the http_request fuzz target found it answered 500).
            Errno::ENOENT | Errno::ENOTDIR | Errno::ENAMETOOLONG => OpenError::NotFound,
            Errno::EXDEV => OpenError::Denied("path leaves the boot root"),
            Errno::ELOOP => OpenError::Denied("too many or forbidden symlinks"),
            Errno::EACCES | Errno::EPERM => OpenError::Denied("permission denied"),
            other => OpenError::Io(other.into()),
        })?;
        // SAFETY: openat2 returned a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Turns a client's path into a root-relative one, or says why not.
fn normalise(requested: &str) -> Result<String, OpenError> {
    if requested.contains('\0') {
        return Err(OpenError::Denied("NUL byte in path"));
    }
    let mut parts = Vec::new();
    for part in requested.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(OpenError::Denied("parent directory (..) in path")),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(OpenError::Denied("not a regular file"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn root_with_files() -> (tempfile::TempDir, BootRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("efi")).unwrap();
        std::fs::write(dir.path().join("efi/boot.efi"), b"EFI!").unwrap();
        std::fs::write(dir.path().join("pxelinux.0"), b"PXE").unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let root = BootRoot::open(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn every_spelling_of_a_file_inside_the_root_is_served() {
        let (_dir, root) = root_with_files();
        for path in [
            "efi/boot.efi",
            "/efi/boot.efi",
            "efi\\boot.efi",
            "\\efi\\boot.efi",
            "./efi//boot.efi",
        ] {
            assert_eq!(
                root.open_file_blocking(path).unwrap().bytes(),
                b"EFI!",
                "{path}"
            );
        }
        assert!(root.open_file_blocking("empty").unwrap().bytes().is_empty());
    }

    #[test]
    fn traversal_in_every_spelling_is_refused() {
        let (_dir, root) = root_with_files();
        for path in [
            "../etc/passwd",
            "efi/../../etc/passwd",
            "..\\..\\etc\\passwd",
            "/..",
            "efi/..",
            "a\0b",
        ] {
            assert!(
                matches!(root.open_file_blocking(path), Err(OpenError::Denied(_))),
                "{path:?}"
            );
        }
        // An absolute path is root-relative: /etc/passwd is looked for inside the root.
        assert!(matches!(
            root.open_file_blocking("/etc/passwd"),
            Err(OpenError::NotFound)
        ));
    }

    #[test]
    fn a_name_too_long_for_the_filesystem_is_not_found() {
        let (_dir, root) = root_with_files();
        let long_component = "a".repeat(300);
        let long_path = "d/".repeat(2100);
        for path in [long_component.as_str(), long_path.as_str()] {
            assert!(
                matches!(root.open_file_blocking(path), Err(OpenError::NotFound)),
                "{} bytes",
                path.len()
            );
        }
    }

    #[test]
    fn symlinks_may_not_leave_the_root() {
        let (dir, root) = root_with_files();
        symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
        symlink("../../..", dir.path().join("efi/up")).unwrap();
        symlink("efi/boot.efi", dir.path().join("inside")).unwrap();
        assert!(matches!(
            root.open_file_blocking("passwd"),
            Err(OpenError::Denied(_))
        ));
        assert!(matches!(
            root.open_file_blocking("efi/up/etc/passwd"),
            Err(OpenError::Denied(_))
        ));
        assert_eq!(
            root.open_file_blocking("inside").unwrap().bytes(),
            b"EFI!",
            "a symlink inside the root is fine"
        );
    }

    #[test]
    fn directories_and_missing_files_are_not_served() {
        let (_dir, root) = root_with_files();
        assert!(matches!(
            root.open_file_blocking("efi"),
            Err(OpenError::Denied(_))
        ));
        assert!(matches!(
            root.open_file_blocking(""),
            Err(OpenError::Denied(_))
        ));
        assert!(matches!(
            root.open_file_blocking("nope"),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            root.open_file_blocking("pxelinux.0/x"),
            Err(OpenError::NotFound)
        ));
    }

    #[test]
    fn readers_of_a_new_version_share_one_copy_read_once() {
        let (_dir, root) = root_with_files();
        let root = Arc::new(root);
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let root = Arc::clone(&root);
                std::thread::spawn(move || root.open_file_blocking("pxelinux.0").unwrap())
            })
            .collect();
        let files: Vec<Arc<BootFile>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        assert!(
            files.iter().all(|f| Arc::ptr_eq(f, &files[0])),
            "one copy in memory for every reader"
        );
        assert!(matches!(root.lookup("pxelinux.0"), Ok(Lookup::Cached(_))));
    }

    #[tokio::test]
    async fn async_opens_read_off_the_runtime_and_find_the_same_copy() {
        let (_dir, root) = root_with_files();
        let first = root.open_file("pxelinux.0").await.unwrap();
        let again = root.open_file("/pxelinux.0").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(matches!(
            root.open_file("nope").await,
            Err(OpenError::NotFound)
        ));
    }

    #[test]
    fn a_file_truncated_and_rewritten_in_place_cannot_hurt_running_readers() {
        let (dir, root) = root_with_files();
        let old = root.open_file_blocking("pxelinux.0").unwrap();
        // `cp` over an existing file: same inode, truncated, then written.
        std::fs::write(dir.path().join("pxelinux.0"), b"").unwrap();
        assert_eq!(
            old.bytes(),
            b"PXE",
            "a truncated file must not pull bytes from a running transfer"
        );
        std::fs::write(dir.path().join("pxelinux.0"), b"REWRITTEN").unwrap();
        assert_eq!(old.bytes(), b"PXE");
        assert_eq!(
            root.open_file_blocking("pxelinux.0").unwrap().bytes(),
            b"REWRITTEN"
        );
    }

    #[test]
    fn a_replaced_file_is_picked_up_while_old_readers_keep_their_version() {
        let (dir, root) = root_with_files();
        let old = root.open_file_blocking("pxelinux.0").unwrap();
        assert!(
            Arc::ptr_eq(&old, &root.open_file_blocking("pxelinux.0").unwrap()),
            "same version is shared"
        );
        let tmp = dir.path().join(".pxelinux.0.new");
        std::fs::write(&tmp, b"NEW VERSION").unwrap();
        std::fs::rename(&tmp, dir.path().join("pxelinux.0")).unwrap();
        let new = root.open_file_blocking("pxelinux.0").unwrap();
        assert_eq!(new.bytes(), b"NEW VERSION");
        assert_eq!(
            old.bytes(),
            b"PXE",
            "a running transfer finishes on its version"
        );
    }
}
