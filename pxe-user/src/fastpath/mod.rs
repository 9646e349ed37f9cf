//! The kernel side as the control plane sees it: the BPF object built from
//! `pxe-ebpf`, its programs attached to one interface, and its maps.
//!
//! Attachments are BPF links (XDP and TCX) owned by file descriptors of this
//! process, so the kernel detaches them when the process exits for any
//! reason, SIGKILL and crashes included: a dead daemon never leaves a program
//! on an operator's interface.

mod admission;
mod answers;
mod counters;
pub mod tftp_sessions;

use std::fmt;

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError},
    programs::{tc, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader,
};
use bytemuck::Zeroable as _;
use pxe_common::dhcp::{AnswerEntry, AnswerKey, DHCP_ANSWERS};
use pxe_common::maps::{
    self, next_handover, ChunkSums, ImageEntry, SessionConfig, SessionKey, SessionProgress,
    TftpPortEntry, TftpPortKey, CHUNK_SIZE, CHUNK_STRIDE, FIRST_HANDOVER, IMAGES_CAPACITY,
    SUMS_PER_CHUNK, SUM_GRAIN,
};

pub use self::{
    admission::{enforcing_tier, AdmissionLimits, KernelAdmission},
    answers::KernelAnswers,
    counters::{CounterSnapshot, Counters},
    tftp_sessions::FastPathHooks,
};

/// The BPF object compiled from `pxe-ebpf` by build.rs.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pxe-xdp"));

/// Name of the XDP entry point in the object.
pub const XDP_PROGRAM: &str = "pxe_ingress";
/// Name of the TC ingress entry point in the object.
pub const TC_PROGRAM: &str = "pxe_tc_ingress";

/// How to attach the XDP program, as the operator asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode if the driver supports it, otherwise generic.
    Auto,
    /// Native mode only: the driver runs the program before any skb exists.
    Native,
    /// Generic mode: the stack runs the program on an skb; works on any interface.
    Generic,
    /// No XDP program; the TC program and userspace serve everything.
    Off,
}

/// The XDP mode actually in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedXdp {
    Native,
    Generic,
}

impl fmt::Display for AttachedXdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("the embedded BPF object could not be parsed or its maps created: {0}")]
    Object(#[source] EbpfError),
    #[error(
        "the kernel refused the {program} program. Last lines of the verifier log:\n{log_tail}"
    )]
    Verifier {
        program: &'static str,
        log_tail: String,
    },
    #[error("loading the {program} program failed: {source}")]
    Load {
        program: &'static str,
        source: ProgramError,
    },
    #[error("no interface named {iface:?} in this network namespace (`ip link` lists them)")]
    UnknownInterface { iface: String },
    #[error("attaching XDP to {iface} in {mode} mode failed: {source}")]
    AttachXdp {
        iface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error(
        "attaching XDP to {iface} failed in native mode ({native}) and in generic mode ({generic})"
    )]
    AttachXdpAuto {
        iface: String,
        // Boxed: two of them would make every FastPathError this large.
        native: Box<ProgramError>,
        generic: Box<ProgramError>,
    },
    #[error("attaching the TC ingress program to {iface} failed: {source}")]
    AttachTc { iface: String, source: ProgramError },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("the kernel image memory is full: {needed} more chunks of 1 MiB needed, {free} free (raise --fastpath-memory)")]
    ImageMemoryFull { needed: u32, free: u32 },
    #[error("image id {id} is beyond the {IMAGES_CAPACITY} the kernel map holds")]
    ImageId { id: u32 },
    #[error("mapping the image chunks: {0}")]
    Mmap(#[source] std::io::Error),
}

/// The loaded object: programs verified and loaded, maps created. Dropping it
/// detaches whatever it attached.
pub struct FastPath {
    ebpf: Ebpf,
    /// Chunks in `IMAGE_CHUNKS` and the next free one (images are placed one
    /// after another; a replaced image takes new chunks).
    chunks_total: u32,
    next_chunk: u32,
}

/// Chunks an image of `len` bytes needs: chunk i holds bytes
/// [i·STRIDE, i·STRIDE + CHUNK_SIZE).
pub fn chunks_for(len: u64) -> u32 {
    if len <= u64::from(CHUNK_SIZE) {
        1
    } else {
        1 + (len - u64::from(CHUNK_SIZE)).div_ceil(u64::from(CHUNK_STRIDE)) as u32
    }
}

impl FastPath {
    /// Loads the embedded object and both programs into the kernel (this is
    /// when the verifier runs), with the object's default image memory.
    /// Nothing is attached yet.
    pub fn load() -> Result<Self, FastPathError> {
        Self::load_with_image_chunks(maps::IMAGE_CHUNKS_DEFAULT)
    }

    /// Like [`FastPath::load`], with `chunks` MiB of kernel memory for images
    /// (an array map is allocated whole when it is created).
    pub fn load_with_image_chunks(chunks: u32) -> Result<Self, FastPathError> {
        let chunks = chunks.max(1);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::IMAGE_CHUNKS, chunks)
            .map_max_entries(maps::CHUNK_SUMS, chunks)
            .load(BPF_OBJECT)
            .map_err(FastPathError::Object)?;
        load_program::<Xdp>(&mut ebpf, XDP_PROGRAM, |p| p.load())?;
        load_program::<SchedClassifier>(&mut ebpf, TC_PROGRAM, |p| p.load())?;
        Ok(Self {
            ebpf,
            chunks_total: chunks,
            next_chunk: 0,
        })
    }

    /// Copies `bytes` into the kernel's image memory as image `id` and marks
    /// it ready. A session of the image's previous version keeps its entry
    /// values only until the daemon re-registers it; new sessions serve this.
    pub fn load_image(&mut self, id: u32, bytes: &[u8]) -> Result<ImageEntry, FastPathError> {
        if id >= IMAGES_CAPACITY {
            return Err(FastPathError::ImageId { id });
        }
        let needed = chunks_for(bytes.len() as u64);
        let free = self.chunks_total - self.next_chunk;
        if needed > free {
            return Err(FastPathError::ImageMemoryFull { needed, free });
        }
        let first = self.next_chunk;
        let Some(Map::Array(data)) = self.ebpf.map(maps::IMAGE_CHUNKS) else {
            panic!("pxe-ebpf defines IMAGE_CHUNKS as an array");
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
        let len = self.chunks_total as usize * CHUNK_SIZE as usize;
        // SAFETY: the map was created with BPF_F_MMAPABLE and holds
        // chunks_total values of CHUNK_SIZE bytes (a multiple of 8, so no
        // stride padding); MAP_SHARED is required for a BPF map.
        let mut memory = unsafe { memmap2::MmapOptions::new().len(len).map_mut(fd) }
            .map_err(FastPathError::Mmap)?;
        for i in 0..needed {
            let from = (i as usize) * CHUNK_STRIDE as usize;
            let to = (from + CHUNK_SIZE as usize).min(bytes.len());
            let chunk = (first + i) as usize * CHUNK_SIZE as usize;
            let piece = bytes.get(from..to).unwrap_or(&[]);
            memory[chunk..chunk + piece.len()].copy_from_slice(piece);
        }
        // No msync: BPF map memory is not file-backed (msync is EINVAL there).
        drop(memory);
        self.store_chunk_sums(first, needed, bytes)?;
        self.next_chunk += needed;
        let entry = ImageEntry {
            first_chunk: first,
            chunks: needed,
            len: bytes.len() as u32,
            ready: 1,
        };
        let map = self
            .ebpf
            .map_mut(maps::IMAGES)
            .expect("pxe-ebpf defines IMAGES");
        let mut images: Array<&mut MapData, ImageEntry> =
            Array::try_from(map).map_err(|source| FastPathError::Map {
                name: maps::IMAGES,
                source,
            })?;
        images
            .set(id, entry, 0)
            .map_err(|source| FastPathError::Map {
                name: maps::IMAGES,
                source,
            })?;
        Ok(entry)
    }

    /// Writes the running checksums of the `needed` chunks from `first` that
    /// hold `bytes`, before the image is marked ready: the programs sum a
    /// block from them (see `maps::ChunkSums`).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the sums are 64 KiB: lent to the map update, not copied onto the stack"
    )]
    fn store_chunk_sums(
        &mut self,
        first: u32,
        needed: u32,
        bytes: &[u8],
    ) -> Result<(), FastPathError> {
        let map = self
            .ebpf
            .map_mut(maps::CHUNK_SUMS)
            .expect("pxe-ebpf defines CHUNK_SUMS");
        let mut sums_map: Array<&mut MapData, ChunkSums> =
            Array::try_from(map).map_err(|source| FastPathError::Map {
                name: maps::CHUNK_SUMS,
                source,
            })?;
        let mut sums: Box<ChunkSums> = vec![0; SUMS_PER_CHUNK]
            .into_boxed_slice()
            .try_into()
            .expect("SUMS_PER_CHUNK values");
        for i in 0..needed {
            let from = (i as usize) * CHUNK_STRIDE as usize;
            let to = (from + CHUNK_SIZE as usize).min(bytes.len());
            let piece = bytes.get(from..to).unwrap_or(&[]);
            pxe_common::csum::running_sums(piece, SUM_GRAIN as usize, &mut sums[..]);
            sums_map
                .set(first + i, &*sums, 0)
                .map_err(|source| FastPathError::Map {
                    name: maps::CHUNK_SUMS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Starts (or restarts) a kernel session at `config`'s hand-over point,
    /// whose `handover` number is set here. Any earlier session under the
    /// key is taken back first, so the zeroed progress entry is written
    /// while no config names it: from then on only the programs write it.
    pub fn insert_session(
        &mut self,
        key: SessionKey,
        mut config: SessionConfig,
    ) -> Result<(), FastPathError> {
        self.remove_session(&key)?;
        let progress: HashMap<_, SessionKey, SessionProgress> =
            self.hash_map(maps::TFTP_PROGRESS)?;
        insert_entry(
            progress,
            maps::TFTP_PROGRESS,
            key,
            SessionProgress::zeroed(),
        )?;
        config.handover = FIRST_HANDOVER;
        let configs = self.hash_map(maps::TFTP_SESSIONS)?;
        insert_entry(configs, maps::TFTP_SESSIONS, key, config)
    }

    /// Hands a transfer to the kernel tiers at `config`'s point: a session
    /// the kernel serves already gets a new hand-over, which the programs
    /// merge into their progress at the next ACK; otherwise one is started.
    pub fn hand_over(
        &mut self,
        key: SessionKey,
        mut config: SessionConfig,
    ) -> Result<(), FastPathError> {
        let Some(current) = self.session_config(&key)? else {
            return self.insert_session(key, config);
        };
        config.handover = next_handover(current.handover);
        let configs = self.hash_map(maps::TFTP_SESSIONS)?;
        insert_entry(configs, maps::TFTP_SESSIONS, key, config)
    }

    /// A kernel session's progress as the programs will act on it: what
    /// they wrote, with a hand-over they have not adopted yet merged in.
    pub fn session(&mut self, key: &SessionKey) -> Result<Option<SessionProgress>, FastPathError> {
        let Some(config) = self.session_config(key)? else {
            return Ok(None);
        };
        let progress = self.hash_map(maps::TFTP_PROGRESS)?;
        let mut progress: Option<SessionProgress> = get_entry(&progress, maps::TFTP_PROGRESS, key)?;
        if let Some(p) = &mut progress {
            p.adopt(&config);
        }
        Ok(progress)
    }

    /// A kernel session's config as userspace last handed it over.
    pub fn session_config(
        &mut self,
        key: &SessionKey,
    ) -> Result<Option<SessionConfig>, FastPathError> {
        let configs = self.hash_map(maps::TFTP_SESSIONS)?;
        get_entry(&configs, maps::TFTP_SESSIONS, key)
    }

    /// Takes a transfer back from the kernel tiers: the config goes first,
    /// so no program starts writing the progress entry as it goes.
    pub fn remove_session(&mut self, key: &SessionKey) -> Result<(), FastPathError> {
        let mut configs: HashMap<_, SessionKey, SessionConfig> =
            self.hash_map(maps::TFTP_SESSIONS)?;
        remove_entry(&mut configs, maps::TFTP_SESSIONS, key)?;
        let mut progress: HashMap<_, SessionKey, SessionProgress> =
            self.hash_map(maps::TFTP_PROGRESS)?;
        remove_entry(&mut progress, maps::TFTP_PROGRESS, key)
    }

    /// Gives the kernel a DHCP reply template (replacing any under the key).
    pub fn insert_answer(
        &mut self,
        key: AnswerKey,
        entry: AnswerEntry,
    ) -> Result<(), FastPathError> {
        self.answers()?
            .insert(key, entry, 0)
            .map_err(|source| FastPathError::Map {
                name: DHCP_ANSWERS,
                source,
            })
    }

    /// A DHCP reply template as the kernel holds it (with its answer count).
    pub fn answer(&mut self, key: &AnswerKey) -> Result<Option<AnswerEntry>, FastPathError> {
        match self.answers()?.get(key, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(None)
            }
            Err(source) => Err(FastPathError::Map {
                name: DHCP_ANSWERS,
                source,
            }),
        }
    }

    /// Takes a DHCP reply template back: the kernel stops answering with it.
    pub fn remove_answer(&mut self, key: &AnswerKey) -> Result<(), FastPathError> {
        match self.answers()?.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(FastPathError::Map {
                name: DHCP_ANSWERS,
                source,
            }),
        }
    }

    fn answers(&mut self) -> Result<HashMap<&mut MapData, AnswerKey, AnswerEntry>, FastPathError> {
        let map = self
            .ebpf
            .map_mut(DHCP_ANSWERS)
            .expect("DHCP_ANSWERS is defined by pxe-ebpf");
        HashMap::try_from(map).map_err(|source| FastPathError::Map {
            name: DHCP_ANSWERS,
            source,
        })
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, FastPathError> {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("{name} is defined by pxe-ebpf"));
        HashMap::try_from(map).map_err(|source| FastPathError::Map { name, source })
    }

    /// The loaded object, for tests that run the programs with BPF_PROG_TEST_RUN.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches the XDP program to `iface` as `choice` asks and returns the
    /// mode in effect (`None` for [`XdpModeChoice::Off`]).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<Option<AttachedXdp>, FastPathError> {
        let if_index = interface_index(iface)?;
        let program: &mut Xdp = program_mut(&mut self.ebpf, XDP_PROGRAM);
        let attach = |program: &mut Xdp, mode: XdpMode, name: &'static str| {
            program
                .attach_to_if_index(if_index, mode)
                .map(|_| ())
                .map_err(|source| FastPathError::AttachXdp {
                    iface: iface.to_owned(),
                    mode: name,
                    source,
                })
        };
        match choice {
            XdpModeChoice::Off => Ok(None),
            XdpModeChoice::Native => {
                attach(program, XdpMode::Driver, "native").map(|()| Some(AttachedXdp::Native))
            }
            XdpModeChoice::Generic => {
                attach(program, XdpMode::Skb, "generic").map(|()| Some(AttachedXdp::Generic))
            }
            XdpModeChoice::Auto => match program.attach_to_if_index(if_index, XdpMode::Driver) {
                Ok(_) => Ok(Some(AttachedXdp::Native)),
                Err(native) => match program.attach_to_if_index(if_index, XdpMode::Skb) {
                    Ok(_) => Ok(Some(AttachedXdp::Generic)),
                    Err(generic) => Err(FastPathError::AttachXdpAuto {
                        iface: iface.to_owned(),
                        native: Box::new(native),
                        generic: Box::new(generic),
                    }),
                },
            },
        }
    }

    /// Attaches the TC program to `iface`'s ingress (TCX link on kernels ≥ 6.6,
    /// a clsact filter before that).
    pub fn attach_tc(&mut self, iface: &str) -> Result<(), FastPathError> {
        interface_index(iface)?;
        let tc_error = |source: ProgramError| FastPathError::AttachTc {
            iface: iface.to_owned(),
            source,
        };
        let has_tcx = aya::util::KernelVersion::current()
            .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            .unwrap_or(false);
        if !has_tcx {
            // Legacy attach needs the clsact qdisc; it may exist already.
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                {
                    return Err(tc_error(ProgramError::from(e)));
                }
            }
        }
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, TC_PROGRAM);
        program
            .attach(iface, TcAttachType::Ingress)
            .map(|_| ())
            .map_err(tc_error)
    }

    /// Kernel image memory used and reserved, in bytes.
    pub fn image_memory(&self) -> (u64, u64) {
        let chunk = u64::from(CHUNK_SIZE);
        (
            u64::from(self.next_chunk) * chunk,
            u64::from(self.chunks_total) * chunk,
        )
    }

    /// Reads both programs' counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, FastPathError> {
        Ok(Counters {
            xdp: counters::read(&self.ebpf, maps::XDP_COUNTERS)?,
            tc: counters::read(&self.ebpf, maps::TC_COUNTERS)?,
        })
    }

    /// Marks `port` as the server side of a running TFTP transfer, so the
    /// programs recognise its packets.
    pub fn register_transfer_port(&mut self, port: u16) -> Result<(), FastPathError> {
        self.tftp_ports()?
            .insert(TftpPortKey::new(port), TftpPortEntry { flags: 0 }, 0)
            .map_err(|source| FastPathError::Map {
                name: maps::TFTP_PORTS,
                source,
            })
    }

    /// Forgets a transfer port registered with [`Self::register_transfer_port`].
    pub fn unregister_transfer_port(&mut self, port: u16) -> Result<(), FastPathError> {
        match self.tftp_ports()?.remove(&TftpPortKey::new(port)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(FastPathError::Map {
                name: maps::TFTP_PORTS,
                source,
            }),
        }
    }

    fn tftp_ports(
        &mut self,
    ) -> Result<HashMap<&mut MapData, TftpPortKey, TftpPortEntry>, FastPathError> {
        let map = self
            .ebpf
            .map_mut(maps::TFTP_PORTS)
            .expect("TFTP_PORTS is defined by pxe-ebpf");
        HashMap::try_from(map).map_err(|source| FastPathError::Map {
            name: maps::TFTP_PORTS,
            source,
        })
    }
}

fn insert_entry<K: aya::Pod, V: aya::Pod>(
    mut map: HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: K,
    value: V,
) -> Result<(), FastPathError> {
    map.insert(key, value, 0)
        .map_err(|source| FastPathError::Map { name, source })
}

/// The value under `key`, or `None` where there is none.
fn get_entry<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<Option<V>, FastPathError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(source) => Err(FastPathError::Map { name, source }),
    }
}

/// Removes `key`; a key already gone is no error.
fn remove_entry<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    key: &K,
) -> Result<(), FastPathError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(FastPathError::Map { name, source }),
    }
}

/// aya reports a missing key as `KeyNotFound` or as the syscall's ENOENT.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Loads one program, turning a verifier rejection into its log's last lines.
fn load_program<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
) -> Result<(), FastPathError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    match load(program_mut(ebpf, name)) {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            Err(FastPathError::Verifier {
                program: name,
                log_tail: format!("{tail}\n({io_error})"),
            })
        }
        Err(source) => Err(FastPathError::Load {
            program: name,
            source,
        }),
    }
}

/// A program the object is built to contain; its absence is a build defect.
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut P
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("pxe-ebpf defines no program {name}"));
    program
        .try_into()
        .unwrap_or_else(|e| panic!("program {name} has an unexpected type: {e}"))
}

fn interface_index(iface: &str) -> Result<u32, FastPathError> {
    let unknown = || FastPathError::UnknownInterface {
        iface: iface.to_owned(),
    };
    crate::netif::index(iface).map_err(|_| unknown())
}
