//! The TFTP server's seam to the kernel programs: which transfers the
//! XDP/TC tiers may serve, the boot images loaded into kernel memory for
//! them, and the session entries that hand a transfer over.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use pxe_common::maps::{SessionEntry, SessionKey, MAX_FAST_BLKSIZE, MAX_KERNEL_WINDOW};
use tracing::{info, warn};

use super::FastPath;
use crate::tftp::server::{KernelProgress, Offload, TransferHooks};

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
struct Images {
    loaded: std::collections::HashMap<String, (String, u32)>,
    next_id: u32,
    /// Set once the memory is full: later files are served from userspace.
    full: bool,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, FastPath> {
        self.fastpath.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image id of this file version, loading it if there is room.
    fn image_for(&self, file: &crate::bootroot::BootFile) -> Option<u32> {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let etag = file.etag();
        if let Some((loaded, id)) = images.loaded.get(&file.path) {
            if *loaded == etag {
                return Some(*id);
            }
        }
        if images.full {
            return None;
        }
        let id = images.next_id;
        match self.lock().load_image(id, file.bytes()) {
            Ok(entry) => {
                info!(file = %file.path, bytes = file.len(), chunks = entry.chunks, image = id, "TFTP: image loaded into kernel memory");
                images.next_id += 1;
                images.loaded.insert(file.path.clone(), (etag, id));
                Some(id)
            }
            Err(e) => {
                warn!(file = %file.path, "TFTP: served from userspace: {e}");
                images.full = true;
                None
            }
        }
    }
}

fn session_key(t: &Offload<'_>) -> Option<SessionKey> {
    let SocketAddr::V4(client) = t.client else {
        return None;
    };
    Some(SessionKey {
        client_ip: client.ip().octets(),
        client_port: client.port().to_be_bytes(),
        server_port: t.server_port.to_be_bytes(),
    })
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
        let blksize = u32::from(t.blksize);
        let window = u32::from(t.windowsize);
        if !self.kernel_tiers
            || blksize > MAX_FAST_BLKSIZE
            || blksize % 4 != 0
            || window > MAX_KERNEL_WINDOW
            || t.blocks > u64::from(u32::MAX)
        {
            return false;
        }
        let (Some(key), Some(image)) = (session_key(t), self.image_for(t.file)) else {
            return false;
        };
        let mut fastpath = self.lock();
        // An update keeps the kernel's own counters.
        let mut entry: SessionEntry = fastpath
            .session(&key)
            .ok()
            .flatten()
            .unwrap_or_else(bytemuck::Zeroable::zeroed);
        entry.image = image;
        entry.blksize = blksize;
        entry.blocks = t.blocks as u32;
        entry.last_acked = t.acked as u32;
        entry.last_sent = t.last_sent as u32;
        entry.window = window;
        match fastpath.insert_session(key, entry) {
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
