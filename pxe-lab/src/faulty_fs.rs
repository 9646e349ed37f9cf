//! A filesystem that fails on demand: a FUSE passthrough over one flat
//! directory whose changes (writes, fsyncs, truncations, creations, renames,
//! removals) can be made to fail with EIO while it is mounted.
//!
//! This kernel has no device-mapper (no `dm-flakey`), but `/dev/fuse` works:
//! the program under test meets real errors from the kernel's own system
//! calls, not a mock of its storage. Reads keep working while changes fail,
//! as on a disk whose writes fail first. Files are opened with direct I/O so
//! no page cache hides an error or serves a page the backing file never held.
//!
//! Mounting needs `fusermount3` (Debian's `fuse3`); the mount is removed when
//! the [`FaultyFs`] is dropped, also when a test panics.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// The mounted filesystem; dropping it unmounts it.
pub struct FaultyFs {
    switch: Arc<Switch>,
    // Dropped last: unmounts.
    _session: BackgroundSession,
}

/// Shared between the test and the filesystem's thread.
#[derive(Default)]
struct Switch {
    failing: AtomicBool,
    refused: AtomicU64,
}

impl FaultyFs {
    /// Mounts a passthrough of `backing` (a flat directory) on `at`.
    pub fn mount(backing: &Path, at: &Path) -> io::Result<Self> {
        let switch = Arc::new(Switch::default());
        let fs = Passthrough {
            backing: backing.to_owned(),
            switch: Arc::clone(&switch),
            state: Mutex::new(State {
                names: HashMap::new(),
                inodes: HashMap::new(),
                next_inode: 2,
                files: HashMap::new(),
                next_handle: 1,
            }),
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("pxe-faulty".into())];
        let session = fuser::spawn_mount(fs, at, &config)?;
        Ok(Self {
            switch,
            _session: session,
        })
    }

    /// From now on every change fails with EIO (`true`), or succeeds again.
    pub fn fail_changes(&self, failing: bool) {
        self.switch.failing.store(failing, Ordering::SeqCst);
    }

    /// How many operations were failed so far.
    pub fn refused(&self) -> u64 {
        self.switch.refused.load(Ordering::SeqCst)
    }
}

const ROOT: INodeNo = INodeNo(1);
/// Attributes are never cached: the backing file is the truth.
const TTL: Duration = Duration::ZERO;

struct Passthrough {
    backing: PathBuf,
    switch: Arc<Switch>,
    state: Mutex<State>,
}

struct State {
    /// Inode → name in the backing directory.
    names: HashMap<u64, OsString>,
    inodes: HashMap<OsString, u64>,
    next_inode: u64,
    files: HashMap<u64, Arc<File>>,
    next_handle: u64,
}

impl State {
    fn inode_of(&mut self, name: &OsStr) -> u64 {
        if let Some(&ino) = self.inodes.get(name) {
            return ino;
        }
        let ino = self.next_inode;
        self.next_inode += 1;
        self.names.insert(ino, name.to_owned());
        self.inodes.insert(name.to_owned(), ino);
        ino
    }

    fn forget_name(&mut self, name: &OsStr) {
        if let Some(ino) = self.inodes.remove(name) {
            self.names.remove(&ino);
        }
    }

    fn hold(&mut self, file: File) -> FileHandle {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.files.insert(fh, Arc::new(file));
        FileHandle(fh)
    }
}

impl Passthrough {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(EIO)` while changes fail, counted.
    fn change_allowed(&self) -> Result<(), Errno> {
        if self.switch.failing.load(Ordering::SeqCst) {
            self.switch.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino == ROOT {
            return Ok(self.backing.clone());
        }
        let state = self.state();
        let name = state.names.get(&ino.0).ok_or(Errno::ENOENT)?;
        Ok(self.backing.join(name))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.state().files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn attr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.path_of(ino)?)?;
        Ok(attr(ino, &meta))
    }

    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        if parent != ROOT {
            return Err(Errno::ENOENT);
        }
        let meta = std::fs::symlink_metadata(self.backing.join(name))?;
        let ino = INodeNo(self.state().inode_of(name));
        Ok(attr(ino, &meta))
    }
}

fn attr(ino: INodeNo, meta: &std::fs::Metadata) -> FileAttr {
    let time = |secs: i64, nanos: i64| {
        UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
    };
    FileAttr {
        ino,
        size: meta.len(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: SystemTime::UNIX_EPOCH,
        kind: if meta.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn open_options(flags: i32) -> OpenOptions {
    let mut options = OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_WRONLY => options.write(true),
        libc::O_RDWR => options.read(true).write(true),
        _ => options.read(true),
    };
    options
}

impl Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.entry(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = || -> Result<FileAttr, Errno> {
            self.change_allowed()?;
            let path = self.path_of(ino)?;
            if let Some(size) = size {
                match fh {
                    Some(fh) => self.file(fh)?.set_len(size)?,
                    None => OpenOptions::new().write(true).open(&path)?.set_len(size)?,
                }
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&path, uid, gid)?;
            }
            self.attr_of(ino)
        };
        match change() {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let change = || -> Result<(), Errno> {
            self.change_allowed()?;
            if parent != ROOT {
                return Err(Errno::ENOENT);
            }
            std::fs::remove_file(self.backing.join(name))?;
            self.state().forget_name(name);
            Ok(())
        };
        match change() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let change = || -> Result<(), Errno> {
            self.change_allowed()?;
            if parent != ROOT || newparent != ROOT {
                return Err(Errno::ENOENT);
            }
            std::fs::rename(self.backing.join(name), self.backing.join(newname))?;
            let mut state = self.state();
            state.forget_name(newname);
            if let Some(ino) = state.inodes.remove(name) {
                state.names.insert(ino, newname.to_owned());
                state.inodes.insert(newname.to_owned(), ino);
            }
            Ok(())
        };
        match change() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let open = || -> Result<FileHandle, Errno> {
            let flags = flags.0;
            if flags & libc::O_TRUNC != 0 {
                self.change_allowed()?;
            }
            let mut options = open_options(flags);
            options.truncate(flags & libc::O_TRUNC != 0);
            let file = options.open(self.path_of(ino)?)?;
            Ok(self.state().hold(file))
        };
        match open() {
            Ok(fh) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let create = || -> Result<(FileAttr, FileHandle), Errno> {
            self.change_allowed()?;
            if parent != ROOT {
                return Err(Errno::ENOENT);
            }
            let path = self.backing.join(name);
            let mut options = open_options(flags);
            options.create(true).truncate(flags & libc::O_TRUNC != 0);
            if flags & libc::O_EXCL != 0 {
                options.create_new(true);
            }
            let file = options.open(&path)?;
            file.set_permissions(std::fs::Permissions::from_mode(mode & !umask & 0o7777))?;
            let mut state = self.state();
            let ino = INodeNo(state.inode_of(name));
            let fh = state.hold(file);
            drop(state);
            Ok((self.attr_of(ino)?, fh))
        };
        match create() {
            Ok((attr, fh)) => {
                reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = || -> Result<Vec<u8>, Errno> {
            let file = self.file(fh)?;
            let mut buf = vec![0; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match file.read_at(&mut buf[filled..], offset + filled as u64)? {
                    0 => break,
                    n => filled += n,
                }
            }
            buf.truncate(filled);
            Ok(buf)
        };
        match read() {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let write = || -> Result<u32, Errno> {
            self.change_allowed()?;
            self.file(fh)?.write_all_at(data, offset)?;
            Ok(data.len() as u32)
        };
        match write() {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are not buffered here: nothing to flush.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let sync = || -> Result<(), Errno> {
            self.change_allowed()?;
            let file = self.file(fh)?;
            if datasync {
                file.sync_data()?;
            } else {
                file.sync_all()?;
            }
            Ok(())
        };
        match sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let names = match std::fs::read_dir(&self.backing) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<Vec<_>>(),
            Err(e) => {
                reply.error(e.into());
                return;
            }
        };
        let mut entries = vec![
            (ROOT, FileType::Directory, OsString::from(".")),
            (ROOT, FileType::Directory, OsString::from("..")),
        ];
        {
            let mut state = self.state();
            for name in names {
                let ino = INodeNo(state.inode_of(&name));
                entries.push((ino, FileType::RegularFile, name));
            }
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Needs root and /dev/fuse, as the tests that use it.
    #[test]
    fn changes_fail_with_eio_while_switched_and_succeed_after() {
        if !crate::privileged("changes_fail_with_eio_while_switched_and_succeed_after") {
            return;
        }
        let backing = tempfile::tempdir().unwrap();
        let at = tempfile::tempdir().unwrap();
        let fs = FaultyFs::mount(backing.path(), at.path()).unwrap();
        let path = at.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"before").unwrap();
        file.sync_all().unwrap();

        fs.fail_changes(true);
        let err = file.write_all(b" during").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
        let mut text = String::new();
        File::open(&path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(
            text, "before",
            "reads still work, and nothing failed was written"
        );
        assert!(fs.refused() >= 2);

        fs.fail_changes(false);
        file.write_all(b" after").unwrap();
        file.sync_all().unwrap();
        drop(file);
        assert_eq!(
            std::fs::read_to_string(backing.path().join("f")).unwrap(),
            "before after"
        );
    }
}
