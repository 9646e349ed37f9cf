//! The TFTP server's seam to the kernel programs ([`TransferHooks`]): which
//! transfers the kernel tiers may serve, which file versions are in kernel
//! memory, and how a transfer maps to its kernel session.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytemuck::Zeroable as _;
use pxe_common::maps::{SessionConfig, SessionKey, MAX_FAST_BLKSIZE, MAX_KERNEL_WINDOW};
use tracing::{info, warn};

use super::FastPath;
use crate::{
    bootroot::BootFile,
    tftp::{
        server::{Offload, TransferHooks},
        transfer::KernelProgress,
    },
};

/// The TFTP server's seam to the kernel programs: transfer ports, images
/// loaded into kernel memory on first use, and sessions.
pub struct FastPathHooks {
    fastpath: Arc<Mutex<FastPath>>,
    /// XDP or TC is attached, so sessions can be served in the kernel.
    kernel_tiers: bool,
    images: Mutex<Images>,
}

/// Which file versions are in kernel memory, by path.
#[derive(Default)]
pub struct Images {
    /// Path → (etag of the loaded version, image id).
    loaded: HashMap<String, (String, u32)>,
    next_id: u32,
    /// Set once the memory is full: later files are served from userspace.
    full: bool,
}

impl Images {
    /// The image id of the version `etag` of `path`. A version not loaded yet
    /// gets the next id and is loaded with `load`; once a load fails the
    /// memory counts as full and no more loads are tried.
    pub fn id_for<E: std::fmt::Display>(
        &mut self,
        path: &str,
        etag: String,
        load: impl FnOnce(u32) -> Result<(), E>,
    ) -> Option<u32> {
        if let Some((loaded, id)) = self.loaded.get(path) {
            if *loaded == etag {
                return Some(*id);
            }
        }
        if self.full {
            return None;
        }
        let id = self.next_id;
        match load(id) {
            Ok(()) => {
                self.next_id += 1;
                self.loaded.insert(path.to_owned(), (etag, id));
                Some(id)
            }
            Err(e) => {
                warn!(file = %path, "TFTP: served from userspace: {e}");
                self.full = true;
                None
            }
        }
    }
}

/// True when the kernel tiers can build every block the transfer needs
/// between its first window and its last: blocks that fit one frame and
/// are a multiple of 4 long (the checksum and copy helpers work in words),
/// a window the TC tier unrolls, and block indexes that fit the session's
/// 32-bit fields.
pub fn kernel_can_serve(blksize: u16, windowsize: u16, blocks: u64) -> bool {
    let blksize = u32::from(blksize);
    blksize <= MAX_FAST_BLKSIZE
        && blksize % 4 == 0
        && u32::from(windowsize) <= MAX_KERNEL_WINDOW
        && blocks <= u64::from(u32::MAX)
}

/// The kernel session key of a transfer: the fields of the client's ACK the
/// programs look it up by. IPv4 only, as the programs are.
pub fn session_key(t: &Offload<'_>) -> Option<SessionKey> {
    let SocketAddr::V4(client) = t.client else {
        return None;
    };
    Some(SessionKey {
        client_ip: client.ip().octets(),
        client_port: client.port().to_be_bytes(),
        server_port: t.server_port.to_be_bytes(),
    })
}

/// The `Instant` of a `bpf_ktime_get_ns` reading (CLOCK_MONOTONIC, the
/// clock `Instant` uses on Linux); None for 0 (never) or a clock error.
fn kernel_instant(ktime_ns: u64) -> Option<Instant> {
    if ktime_ns == 0 {
        return None;
    }
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_ns =
        u64::try_from(now.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(now.tv_nsec()).ok()?;
    let at = Instant::now();
    at.checked_sub(Duration::from_nanos(now_ns.saturating_sub(ktime_ns)))
}

impl FastPathHooks {
    /// Hooks over `fastpath`; with `kernel_tiers` off no transfer is handed
    /// to the kernel. One set serves every interface: image ids are global.
    pub fn new(fastpath: Arc<Mutex<FastPath>>, kernel_tiers: bool) -> Self {
        Self {
            fastpath,
            kernel_tiers,
            images: Mutex::new(Images::default()),
        }
    }

    /// XDP or TC is attached: transfers may be served in the kernel.
    pub fn kernel_tiers(&self) -> bool {
        self.kernel_tiers
    }

    fn lock(&self) -> MutexGuard<'_, FastPath> {
        self.fastpath.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image id of this file version, loading it if there is room.
    fn image_for(&self, file: &BootFile) -> Option<u32> {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        images.id_for(&file.path, file.etag(), |id| {
            let entry = self.lock().load_image(id, file.bytes())?;
            info!(file = %file.path, bytes = file.len(), chunks = entry.chunks, image = id, "TFTP: image loaded into kernel memory");
            Ok::<(), super::FastPathError>(())
        })
    }
}

impl TransferHooks for FastPathHooks {
    fn opened(&self, port: u16) {
        if let Err(e) = self.lock().register_transfer_port(port) {
            warn!(
                port,
                "registering a TFTP transfer port with the kernel: {e}"
            );
        }
    }

    fn closed(&self, port: u16) {
        if let Err(e) = self.lock().unregister_transfer_port(port) {
            warn!(port, "unregistering a TFTP transfer port: {e}");
        }
    }

    fn offload(&self, t: &Offload<'_>) -> bool {
        if !self.kernel_tiers || !kernel_can_serve(t.blksize, t.windowsize, t.blocks) {
            return false;
        }
        let (Some(key), Some(image)) = (session_key(t), self.image_for(t.file)) else {
            return false;
        };
        // Only what userspace owns: the kernel merges the hand-over point
        // into its own progress, keeping its counters.
        let config = SessionConfig {
            image,
            blksize: u32::from(t.blksize),
            blocks: t.blocks as u32,
            window: u32::from(t.windowsize),
            handover_acked: t.acked as u32,
            handover_sent: t.last_sent as u32,
            ..SessionConfig::zeroed()
        };
        match self.lock().hand_over(key, config) {
            Ok(()) => true,
            Err(e) => {
                warn!(client = %t.client, "TFTP: kernel session refused, serving from userspace: {e}");
                false
            }
        }
    }

    fn kernel_progress(&self, t: &Offload<'_>) -> Option<KernelProgress> {
        let key = session_key(t)?;
        let s = self.lock().session(&key).ok()??;
        Some(KernelProgress {
            last_acked: u64::from(s.last_acked),
            last_sent: u64::from(s.last_sent),
            sent_at: kernel_instant(s.sent_ns),
            rtt: (s.srtt_ns != 0).then(|| {
                (
                    Duration::from_nanos(s.srtt_ns),
                    Duration::from_nanos(s.rttvar_ns),
                )
            }),
            dup_acks: u64::from(s.dup_acks),
            xdp_sent: u64::from(s.xdp_sent),
            tc_sent: u64::from(s.tc_sent),
        })
    }

    fn end_offload(&self, t: &Offload<'_>) {
        if let Some(key) = session_key(t) {
            if let Err(e) = self.lock().remove_session(&key) {
                warn!(client = %t.client, "TFTP: removing a kernel session: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn the_kernel_serves_blocks_that_fit_a_frame_and_are_whole_words() {
        assert!(kernel_can_serve(1468, 1, 100));
        assert!(kernel_can_serve(512, 1, 100));
        assert!(kernel_can_serve(8, 1, 100));
        assert!(
            !kernel_can_serve(1472, 1, 100),
            "blksize over MAX_FAST_BLKSIZE"
        );
        assert!(!kernel_can_serve(1466, 1, 100), "not a multiple of 4");
        assert!(!kernel_can_serve(513, 1, 100), "not a multiple of 4");
    }

    #[test]
    fn the_kernel_serves_windows_up_to_what_tc_unrolls() {
        assert!(kernel_can_serve(1468, 4, 100));
        assert!(kernel_can_serve(1468, MAX_KERNEL_WINDOW as u16, 100));
        assert!(!kernel_can_serve(1468, MAX_KERNEL_WINDOW as u16 + 1, 100));
    }

    #[test]
    fn the_kernel_serves_transfers_whose_block_indexes_fit_32_bits() {
        assert!(kernel_can_serve(8, 1, u64::from(u32::MAX)));
        assert!(!kernel_can_serve(8, 1, u64::from(u32::MAX) + 1));
    }

    #[test]
    fn a_session_key_is_the_acks_addresses_in_network_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = test_file(dir.path());
        let offer = offer(&file, "192.0.2.7:2070".parse().unwrap());
        let key = session_key(&offer).unwrap();
        assert_eq!(key.client_ip, [192, 0, 2, 7]);
        assert_eq!(key.client_port, 2070u16.to_be_bytes());
        assert_eq!(key.server_port, 40_001u16.to_be_bytes());
        let v6 = offer_v6(&file);
        assert!(session_key(&v6).is_none(), "the programs serve IPv4 only");
    }

    #[test]
    fn a_loaded_version_keeps_its_id_and_a_new_version_gets_a_new_one() {
        let mut images = Images::default();
        let loads = Cell::new(0);
        let load = |_id| {
            loads.set(loads.get() + 1);
            Ok::<(), &str>(())
        };
        assert_eq!(images.id_for("a.efi", "v1".into(), load), Some(0));
        assert_eq!(images.id_for("a.efi", "v1".into(), load), Some(0));
        assert_eq!(images.id_for("b.efi", "v1".into(), load), Some(1));
        assert_eq!(images.id_for("a.efi", "v2".into(), load), Some(2));
        assert_eq!(loads.get(), 3, "each version is loaded once");
    }

    #[test]
    fn once_kernel_memory_is_full_no_more_loads_are_tried() {
        let mut images = Images::default();
        let ok = |_id| Ok::<(), &str>(());
        assert_eq!(images.id_for("a.efi", "v1".into(), ok), Some(0));
        assert_eq!(images.id_for("b.efi", "v1".into(), |_| Err("full")), None);
        let tried = Cell::new(false);
        let load = |_id| {
            tried.set(true);
            Ok::<(), &str>(())
        };
        assert_eq!(images.id_for("c.efi", "v1".into(), load), None);
        assert!(!tried.get(), "no load after the memory filled");
        assert_eq!(
            images.id_for("a.efi", "v1".into(), load),
            Some(0),
            "what is loaded keeps serving"
        );
    }

    fn test_file(dir: &std::path::Path) -> Arc<BootFile> {
        std::fs::write(dir.join("pxelinux.0"), [0u8; 4096]).unwrap();
        let root = crate::bootroot::BootRoot::open(dir).unwrap();
        root.open_file_blocking("pxelinux.0").unwrap()
    }

    fn offer(file: &Arc<BootFile>, client: SocketAddr) -> Offload<'_> {
        Offload {
            client,
            server_port: 40_001,
            file,
            blksize: 1468,
            windowsize: 1,
            blocks: 3,
            acked: 0,
            last_sent: 1,
        }
    }

    fn offer_v6(file: &Arc<BootFile>) -> Offload<'_> {
        offer(file, "[2001:db8::7]:2070".parse().unwrap())
    }
}
