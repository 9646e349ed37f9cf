//! The daemon's side of DHCP answered in the kernel: which templates the
//! kernel holds for which client, so a client's can be taken back together
//! when what it would be told changes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use pxe_common::dhcp::{AnswerEntry, AnswerKey, PORT_KIND_DHCP};
use tracing::{debug, warn};

use super::FastPath;

/// Templates in `DHCP_ANSWERS`, by client MAC.
pub struct KernelAnswers {
    fastpath: Arc<Mutex<FastPath>>,
    held: Mutex<HashMap<[u8; 6], Vec<Held>>>,
}

#[derive(Clone, Copy)]
struct Held {
    key: AnswerKey,
    yiaddr: [u8; 4],
}

impl KernelAnswers {
    pub fn new(fastpath: Arc<Mutex<FastPath>>) -> Self {
        Self {
            fastpath,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Lets the kernel answer with `entry`. A lease for a new address takes
    /// back the client's templates that name another one.
    pub fn install(&self, key: AnswerKey, entry: AnswerEntry) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut fastpath = self.fastpath.lock().unwrap_or_else(|e| e.into_inner());
        let client = held.entry(key.mac).or_default();
        if key.port_kind == PORT_KIND_DHCP && entry.yiaddr != [0; 4] {
            client.retain(|h| {
                let stale =
                    h.key.port_kind == PORT_KIND_DHCP && h.yiaddr != entry.yiaddr && h.key != key;
                if stale {
                    if let Err(e) = fastpath.remove_answer(&h.key) {
                        warn!("DHCP: taking back a kernel answer: {e}");
                    }
                }
                !stale
            });
        }
        match fastpath.insert_answer(key, entry) {
            Ok(()) => {
                client.retain(|h| h.key != key);
                client.push(Held {
                    key,
                    yiaddr: entry.yiaddr,
                });
            }
            // A full map (65,536 templates) only means userspace answers more.
            Err(e) => debug!("DHCP: no kernel answer for this client: {e}"),
        }
    }

    /// Takes back every template of the client with this MAC.
    pub fn forget(&self, mac: [u8; 6]) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(keys) = held.remove(&mac) else {
            return;
        };
        let mut fastpath = self.fastpath.lock().unwrap_or_else(|e| e.into_inner());
        for h in keys {
            if let Err(e) = fastpath.remove_answer(&h.key) {
                warn!("DHCP: taking back a kernel answer: {e}");
            }
        }
    }

    /// Takes back every template (the config changed: any answer may).
    pub fn clear(&self) {
        let macs: Vec<[u8; 6]> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for mac in macs {
            self.forget(mac);
        }
    }

    /// Templates the kernel holds.
    pub fn len(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
