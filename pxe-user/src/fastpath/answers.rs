//! The daemon's side of DHCP answered in the kernel: which templates the
//! kernel holds for which client, so a client's can be taken back together
//! when what it would be told changes, and how often the kernel answered from
//! each, so the log still says what happened to every machine.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use pxe_common::dhcp::{AnswerEntry, AnswerKey, PORT_KIND_DHCP};
use tracing::{debug, info, warn};

use super::FastPath;
use crate::{netif, observe::Observer, policy::Mac};

/// Machines whose last change [`KernelAnswers`] remembers, at most.
const MAX_CHANGED_MACS: usize = 100_000;

/// Templates in `DHCP_ANSWERS`, by client MAC.
pub struct KernelAnswers {
    fastpath: Arc<Mutex<FastPath>>,
    held: Mutex<HashMap<[u8; 6], Vec<Held>>>,
    /// Counts changes of what machines are told (changed only with `held`
    /// locked). A template decided before a change that concerns its
    /// machine is refused: the answer it repeats may be the old one.
    epoch: AtomicU64,
    /// The epoch of the last change that concerned every machine, and of
    /// the last that concerned each of a few (both read with `held` locked).
    all_changed: AtomicU64,
    changed: Mutex<HashMap<[u8; 6], u64>>,
    /// Told how often the kernel answered each client.
    observer: Arc<Observer>,
}

#[derive(Clone, Copy)]
struct Held {
    key: AnswerKey,
    yiaddr: [u8; 4],
    /// The template's answer count when it was last logged.
    logged: u64,
}

impl Held {
    /// Logs the replies sent from this template since it was last logged,
    /// and tells the observer.
    fn log_new_answers(&mut self, fastpath: &mut FastPath, observer: &Observer) {
        let answered = match fastpath.answer(&self.key) {
            Ok(Some(entry)) => entry.answered,
            Ok(None) => return,
            Err(e) => {
                warn!("DHCP: reading a kernel answer's count: {e}");
                return;
            }
        };
        let new = answered.saturating_sub(self.logged);
        self.logged = answered;
        if new == 0 {
            return;
        }
        let interface = netif::name_of(self.key.ifindex);
        let mac = Mac(self.key.mac);
        if self.key.port_kind == PORT_KIND_DHCP {
            info!(%mac, %interface, address = %std::net::Ipv4Addr::from(self.yiaddr), "DHCP: the kernel answered {new} more request(s) from the template");
            observer.kernel_answered(mac, 67, new);
        } else {
            info!(%mac, %interface, "proxyDHCP 4011: the kernel answered {new} more request(s) from the template");
            observer.kernel_answered(mac, 4011, new);
        }
    }
}

impl KernelAnswers {
    pub fn new(fastpath: Arc<Mutex<FastPath>>, observer: Arc<Observer>) -> Self {
        Self {
            fastpath,
            observer,
            held: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            all_changed: AtomicU64::new(0),
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// The epoch now: read it before deciding, pass it to [`Self::install`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Lets the kernel answer with `entry`, decided in epoch `decided_in`;
    /// refused if what its machine is told changed since. A lease for a new
    /// address takes back the client's templates that name another one.
    pub fn install(&self, key: AnswerKey, entry: AnswerEntry, decided_in: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let changed_since = self.all_changed.load(Ordering::SeqCst) > decided_in
            || self
                .changed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key.mac)
                .is_some_and(|at| *at > decided_in);
        if changed_since {
            debug!(mac = %Mac(key.mac), "DHCP: what this machine is told changed while its answer was decided; the kernel does not learn it");
            return;
        }
        let mut fastpath = self.fastpath.lock().unwrap_or_else(|e| e.into_inner());
        let client = held.entry(key.mac).or_default();
        if key.port_kind == PORT_KIND_DHCP && entry.yiaddr != [0; 4] {
            client.retain_mut(|h| {
                let stale =
                    h.key.port_kind == PORT_KIND_DHCP && h.yiaddr != entry.yiaddr && h.key != key;
                if stale {
                    h.log_new_answers(&mut fastpath, &self.observer);
                    if let Err(e) = fastpath.remove_answer(&h.key) {
                        warn!("DHCP: taking back a kernel answer: {e}");
                    }
                }
                !stale
            });
        }
        // A template replaced loses its count: log what it answered first.
        if let Some(old) = client.iter_mut().find(|h| h.key == key) {
            old.log_new_answers(&mut fastpath, &self.observer);
        }
        match fastpath.insert_answer(key, entry) {
            Ok(()) => {
                client.retain(|h| h.key != key);
                client.push(Held {
                    key,
                    yiaddr: entry.yiaddr,
                    logged: entry.answered,
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
        for mut h in keys {
            h.log_new_answers(&mut fastpath, &self.observer);
            if let Err(e) = fastpath.remove_answer(&h.key) {
                warn!("DHCP: taking back a kernel answer: {e}");
            }
        }
    }

    /// The policy changed for these machines: their templates are taken
    /// back, and answers decided before now are not learnt. When this
    /// returns, the kernel answers none of them the old way.
    pub fn invalidate(&self, macs: &[[u8; 6]]) {
        {
            let _held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            let mut changed = self.changed.lock().unwrap_or_else(|e| e.into_inner());
            if changed.len() + macs.len() > MAX_CHANGED_MACS {
                // Remembering each costs more than refusing every answer
                // decided until now, once.
                changed.clear();
                self.all_changed.store(now, Ordering::SeqCst);
            } else {
                changed.extend(macs.iter().map(|mac| (*mac, now)));
            }
        }
        for mac in macs {
            self.forget(*mac);
        }
    }

    /// The policy changed for any machine (SIGHUP, a profile): every
    /// template is taken back, as in [`Self::invalidate`].
    pub fn invalidate_all(&self) {
        {
            let _held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let now = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            self.all_changed.store(now, Ordering::SeqCst);
            self.changed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        for mac in self.clients() {
            self.forget(mac);
        }
    }

    /// The MACs of the clients with templates, at this moment.
    fn clients(&self) -> Vec<[u8; 6]> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Logs, for every client, the replies the kernel sent from its
    /// templates since the last call: one line per template that answered.
    /// Called periodically; the locks are taken one client at a time, so the
    /// DHCP path waits for one client's reads at most.
    pub fn log_new_answers(&self) {
        for mac in self.clients() {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let Some(client) = held.get_mut(&mac) else {
                continue;
            };
            let mut fastpath = self.fastpath.lock().unwrap_or_else(|e| e.into_inner());
            for h in client.iter_mut() {
                h.log_new_answers(&mut fastpath, &self.observer);
            }
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
