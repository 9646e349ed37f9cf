//! The one place run-time changes are applied: the operator API's writes,
//! an installer's `provisioned`, and SIGHUP's reload of the file.
//!
//! A change is checked, written durably, and published to every path before
//! the call returns: the policy that DHCP (67 and 4011, full and proxy),
//! HTTP and TFTP read is replaced whole, the DHCP engine's reservations are
//! updated, and the kernel's DHCP templates of the machines concerned are
//! taken back, with any answer decided under the old policy refused (the
//! epoch of [`KernelAnswers`]). Writers are serialised; readers never wait.
//! Replies already decided when the change lands may still leave; every
//! request that arrives after the call returns is answered the new way.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use tracing::{info, warn};

use crate::{
    cluster::{Cluster, PEER_BOUND},
    dhcp::engine::{Engine, EngineConfig, FeedRecord, Mode},
    fastpath::KernelAnswers,
    inventory::{Inventory, InventoryError, MachineRecord, ProfileRecord},
    lease::Lease,
    observe::Observer,
    policy::{
        provision::ProvisionKey,
        r#static::StaticPolicy,
        webhook::{Webhook, WebhookPolicy},
        FileGate, Mac, SharedPolicy,
    },
};

/// Why a change was refused; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The request names something wrong: the field and why.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("no machine {0} in the inventory")]
    NoMachine(Mac),
    #[error("{0}")]
    Conflict(String),
    /// If-Match named a revision that is no longer the record's.
    #[error("the record is at revision {current}, not {expected}: read it again and retry")]
    Stale { current: u64, expected: u64 },
    #[error("the provisioning token is not this machine's")]
    BadToken,
    #[error("storing the change failed, nothing changed: {0}")]
    Store(#[from] InventoryError),
}

fn invalid(field: &str, message: impl Into<String>) -> ChangeError {
    ChangeError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A machine as the API shows it: its record, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MachineView {
    #[serde(flatten)]
    pub record: MachineRecord,
    /// `api` (the inventory) or `file` (the config file only).
    pub source: &'static str,
}

pub struct Control {
    state: Mutex<State>,
    paths: Paths,
}

/// Where a change is published, and what every published policy carries.
pub struct Paths {
    /// What DHCP, HTTP and TFTP read.
    pub policy: SharedPolicy,
    /// The DHCP engine (its reservations), with DHCP on.
    pub engine: Option<Arc<Mutex<Engine>>>,
    /// The kernel's DHCP templates, when the kernel answers.
    pub answers: Option<Arc<KernelAnswers>>,
    /// Signs `{{provision_token}}`, with the API on.
    pub provision: Option<ProvisionKey>,
    /// Asked for the machines it decides for, if configured.
    pub webhook: Option<Arc<Webhook>>,
    /// Told when a machine is marked provisioned (its timeline's last stage).
    pub observer: Arc<Observer>,
    /// The other servers on a shared database, whose confirmation a change
    /// waits for before it returns.
    pub cluster: Option<Arc<Cluster>>,
}

/// What the published policy is made of.
struct State {
    file: StaticPolicy,
    /// The DHCP engine's configuration from the file (reservations of the
    /// file only), or `None` with DHCP off.
    engine_config: Option<EngineConfig>,
    file_reservations: HashMap<Mac, Ipv4Addr>,
    inventory: Inventory,
}

impl Control {
    /// Publishes the file's policy with the inventory laid over it.
    pub fn new(
        file: StaticPolicy,
        engine_config: Option<EngineConfig>,
        inventory: Inventory,
        paths: Paths,
    ) -> Self {
        let file_reservations = engine_config
            .as_ref()
            .map(|c| c.reservations.clone())
            .unwrap_or_default();
        let control = Self {
            state: Mutex::new(State {
                file,
                engine_config,
                file_reservations,
                inventory,
            }),
            paths,
        };
        control.publish(&control.lock(), None);
        control
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The provisioning key tokens are checked with (none without an API).
    pub fn provision_key(&self) -> Option<&ProvisionKey> {
        self.paths.provision.as_ref()
    }

    // ---- reading ------------------------------------------------------------

    /// Every machine: the inventory's, and the file's it does not override.
    pub fn machines(&self) -> Vec<MachineView> {
        let state = self.lock();
        let mut all: Vec<MachineView> = state
            .inventory
            .machines()
            .values()
            .map(|r| MachineView {
                record: r.clone(),
                source: "api",
            })
            .collect();
        for mac in state.file.machines.keys() {
            if state.inventory.machine(*mac).is_none() {
                all.push(file_view(&state, *mac).expect("listed in the file"));
            }
        }
        all.sort_by_key(|m| m.record.mac);
        all
    }

    pub fn machine(&self, mac: Mac) -> Option<MachineView> {
        let state = self.lock();
        match state.inventory.machine(mac) {
            Some(r) => Some(MachineView {
                record: r.clone(),
                source: "api",
            }),
            None => file_view(&state, mac),
        }
    }

    /// Profiles in force: the file's, with the API's over them.
    pub fn profiles(&self) -> Vec<ProfileRecord> {
        let state = self.lock();
        let mut names: Vec<&String> = state.file.profiles.keys().collect();
        names.extend(state.inventory.profiles().keys());
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| match state.inventory.profiles().get(name) {
                Some(p) => p.clone(),
                None => profile_view(&state.file.profiles[name]),
            })
            .collect()
    }

    /// Leases the engine holds (none with DHCP off).
    pub fn leases(&self) -> Vec<Lease> {
        let Some(engine) = &self.paths.engine else {
            return Vec::new();
        };
        let engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        let mut leases: Vec<Lease> = engine.leases().cloned().collect();
        leases.sort_by_key(|l| l.ip);
        leases
    }

    /// Why the lease store is failing, if it is.
    pub fn lease_store_failing(&self) -> Option<String> {
        let engine = self.paths.engine.as_ref()?;
        let engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        engine.store_failing().map(str::to_owned)
    }

    // ---- changing -------------------------------------------------------------

    /// Writes machine records (a PUT, PATCH or bulk change), all or none.
    /// `if_match`: the revision the caller read, for a single record.
    pub fn put_machines(
        &self,
        records: Vec<MachineRecord>,
        if_match: Option<u64>,
    ) -> Result<Vec<MachineRecord>, ChangeError> {
        let mut state = self.lock();
        if let (Some(expected), [record]) = (if_match, records.as_slice()) {
            let current = state
                .inventory
                .machine(record.mac)
                .map_or(0, |r| r.revision);
            if current != expected {
                return Err(ChangeError::Stale { current, expected });
            }
        }
        for record in &records {
            self.check(&state, record, &records)?;
        }
        let macs: Vec<Mac> = records.iter().map(|r| r.mac).collect();
        let written = state.inventory.put_machines(records)?;
        self.publish(&state, Some(&macs));
        info!(machines = written.len(), "API: machine records written");
        self.wait_for_peers(state);
        Ok(written)
    }

    /// Deletes a machine's record; the file's entry, if any, applies again.
    pub fn delete_machine(&self, mac: Mac, if_match: Option<u64>) -> Result<(), ChangeError> {
        let mut state = self.lock();
        let Some(current) = state.inventory.machine(mac).map(|r| r.revision) else {
            return Err(ChangeError::NoMachine(mac));
        };
        if let Some(expected) = if_match.filter(|e| *e != current) {
            return Err(ChangeError::Stale { current, expected });
        }
        state.inventory.delete_machine(mac)?;
        self.publish(&state, Some(&[mac]));
        info!(%mac, "API: machine record deleted");
        self.wait_for_peers(state);
        Ok(())
    }

    /// Where metrics and boot timelines are kept.
    pub fn observer(&self) -> &Arc<Observer> {
        &self.paths.observer
    }

    /// The installer's call: `mac` is done, it boots from its disk from now on.
    pub fn provisioned(&self, mac: Mac, token: &str) -> Result<MachineRecord, ChangeError> {
        let key = self.paths.provision.as_ref().ok_or(ChangeError::BadToken)?;
        if !key.verify(mac, token) {
            return Err(ChangeError::BadToken);
        }
        let mut record = self
            .machine(mac)
            .map_or_else(|| MachineRecord::new(mac), |m| m.record);
        record.netboot = false;
        let written = self.put_machines(vec![record], None)?;
        info!(%mac, "provisioned: the machine boots from its disk from now on");
        self.paths.observer.provisioned(mac);
        Ok(written.into_iter().next().expect("one record written"))
    }

    pub fn put_profile(
        &self,
        profile: ProfileRecord,
        if_match: Option<u64>,
    ) -> Result<ProfileRecord, ChangeError> {
        let mut state = self.lock();
        if let Some(expected) = if_match {
            let current = state
                .inventory
                .profiles()
                .get(&profile.name)
                .map_or(0, |p| p.revision);
            if current != expected {
                return Err(ChangeError::Stale { current, expected });
            }
        }
        if let Some(script) = &profile.ipxe_script {
            crate::policy::render::check(script).map_err(|e| invalid("ipxe_script", e))?;
        }
        if let Some(cmdline) = &profile.cmdline {
            crate::policy::render::check(cmdline).map_err(|e| invalid("cmdline", e))?;
        }
        let written = state.inventory.put_profile(profile)?;
        // Any machine may boot this profile: every answer may change.
        self.publish(&state, None);
        info!(profile = %written.name, "API: profile written");
        self.wait_for_peers(state);
        Ok(written)
    }

    // ---- other servers' changes (a shared database) --------------------------

    /// The lease records the change feed delivered, in commit order: the
    /// engine follows the database, and the kernel's templates of the
    /// machines concerned are taken back (this server decides their next
    /// answer itself).
    pub fn follow_lease_feed(&self, records: Vec<FeedRecord>) {
        let Some(engine) = &self.paths.engine else {
            return;
        };
        let touched = engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .follow_lease_feed(records);
        if let (Some(answers), false) = (&self.paths.answers, touched.is_empty()) {
            // Also refuses a template of theirs decided before now and
            // installed after: it may repeat what no longer holds.
            answers.invalidate(&touched.iter().map(|m| m.0).collect::<Vec<_>>());
        }
    }

    /// Another server's API changed these records: published here as if
    /// made here, without writing them again.
    /// `read` fetches the records with changes held off here, so a write
    /// through this server's API cannot land between the read and its
    /// publication and be undone by an older record.
    pub fn absorb_peer_inventory(
        &self,
        read: impl FnOnce() -> Option<(
            Vec<(Mac, Option<MachineRecord>)>,
            Vec<(String, Option<ProfileRecord>)>,
        )>,
    ) {
        let mut state = self.lock();
        let Some((machines, profiles)) = read() else {
            return;
        };
        let macs: Vec<Mac> = machines.iter().map(|(mac, _)| *mac).collect();
        let any_profile = !profiles.is_empty();
        state.inventory.absorb(machines, profiles);
        self.publish(&state, (!any_profile).then_some(macs.as_slice()));
    }

    /// Every lease from the shared database, replacing memory's (the change
    /// feed was interrupted, or has just started). `read` runs with the
    /// engine held, so no lease this server commits meanwhile is lost from
    /// memory; it returns `None` when the database could not be read.
    pub fn resync_leases(&self, read: impl FnOnce() -> Option<Vec<Lease>>) {
        let Some(engine) = &self.paths.engine else {
            return;
        };
        let mut engine = engine.lock().unwrap_or_else(|e| e.into_inner());
        let Some(leases) = read() else {
            return;
        };
        let differed = engine.resync_leases(leases);
        drop(engine);
        if differed > 0 {
            info!(
                leases = differed,
                "cluster: leases read again from the database differed from memory"
            );
            if let Some(answers) = &self.paths.answers {
                answers.invalidate_all();
            }
        }
    }

    /// Every machine and profile from the shared database, replacing
    /// memory's; `read` runs with changes held off, as in
    /// [`Self::resync_leases`].
    pub fn resync_inventory(
        &self,
        read: impl FnOnce() -> Option<(Vec<MachineRecord>, Vec<ProfileRecord>)>,
    ) {
        let mut state = self.lock();
        let Some((machines, profiles)) = read() else {
            return;
        };
        let (macs, profiles_changed) = state.inventory.replace_all(machines, profiles);
        if profiles_changed {
            self.publish(&state, None);
        } else if !macs.is_empty() {
            self.publish(&state, Some(&macs));
        }
    }

    /// Returns once every other live server confirmed the change just
    /// written (or after [`PEER_BOUND`], naming those that did not).
    fn wait_for_peers(&self, state: MutexGuard<'_, State>) {
        let change = state.inventory.last_change();
        drop(state);
        let (Some(cluster), Some(change)) = (&self.paths.cluster, change) else {
            return;
        };
        let wait = || cluster.wait_applied(change, PEER_BOUND);
        let waited = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        if let Err(e) = waited {
            warn!(
                lagging = ?e.lagging,
                "cluster: not confirmed by every live server within {} s; they apply it when their change feed catches up",
                PEER_BOUND.as_secs()
            );
        }
    }

    /// SIGHUP: a new file, the inventory kept over it.
    pub fn reload_file(&self, file: StaticPolicy, engine_config: Option<EngineConfig>) {
        let mut state = self.lock();
        state.file_reservations = engine_config
            .as_ref()
            .map(|c| c.reservations.clone())
            .unwrap_or_default();
        state.file = file;
        state.engine_config = engine_config;
        self.publish(&state, None);
    }

    /// Refuses a record that names what does not exist or is taken.
    fn check(
        &self,
        state: &State,
        record: &MachineRecord,
        batch: &[MachineRecord],
    ) -> Result<(), ChangeError> {
        if let Some(profile) = &record.profile {
            if !state.file.profiles.contains_key(profile)
                && !state.inventory.profiles().contains_key(profile)
            {
                return Err(invalid("profile", format!("no profile named {profile:?}")));
            }
        }
        if let Some(ip) = record.address {
            self.check_address(state, record.mac, ip, batch)?;
        }
        Ok(())
    }

    fn check_address(
        &self,
        state: &State,
        mac: Mac,
        ip: Ipv4Addr,
        batch: &[MachineRecord],
    ) -> Result<(), ChangeError> {
        let Some(config) = state
            .engine_config
            .as_ref()
            .filter(|c| c.mode == Mode::Full)
        else {
            return Err(invalid(
                "address",
                "reservations need full DHCP (--dhcp full)",
            ));
        };
        if !config.subnets.iter().any(|s| s.contains(ip)) {
            return Err(invalid(
                "address",
                format!("{ip} is in none of the DHCP subnets"),
            ));
        }
        let reserved_by = |other: &Mac| *other != mac;
        let taken_in_file = state
            .file_reservations
            .iter()
            .any(|(m, a)| *a == ip && reserved_by(m));
        let taken_in_inventory = state.inventory.machines().values().any(|r| {
            r.address == Some(ip) && reserved_by(&r.mac) && !batch.iter().any(|b| b.mac == r.mac)
        });
        let taken_in_batch = batch
            .iter()
            .any(|b| b.address == Some(ip) && reserved_by(&b.mac));
        if taken_in_file || taken_in_inventory || taken_in_batch {
            return Err(ChangeError::Conflict(format!(
                "{ip} is already reserved for another machine"
            )));
        }
        if let Some(engine) = &self.paths.engine {
            let holder = engine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .holder(ip, unix_now());
            if let Some(holder) = holder.filter(reserved_by) {
                return Err(ChangeError::Conflict(format!("{ip} is leased to {holder}")));
            }
        }
        Ok(())
    }

    /// Makes the state the one every path answers from; `changed`: the
    /// machines whose answers may differ (`None`: any machine's).
    fn publish(&self, state: &State, changed: Option<&[Mac]>) {
        let mut policy = state.inventory.over(&state.file);
        policy.provision = self.paths.provision.clone();
        if let (Some(engine), Some(config)) = (&self.paths.engine, &state.engine_config) {
            let mut config = config.clone();
            for r in state.inventory.machines().values() {
                match r.address {
                    Some(ip) => drop(config.reservations.insert(r.mac, ip)),
                    // The API's record is the whole machine: no address there
                    // means none, even if the file had one.
                    None => drop(config.reservations.remove(&r.mac)),
                }
            }
            engine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reconfigure(config);
        }
        match &self.paths.webhook {
            Some(hook) => self.paths.policy.replace(WebhookPolicy {
                base: policy,
                hook: Arc::clone(hook),
            }),
            None => self.paths.policy.replace(policy),
        }
        if let Some(answers) = &self.paths.answers {
            match changed {
                Some(macs) => answers.invalidate(&macs.iter().map(|m| m.0).collect::<Vec<_>>()),
                None => answers.invalidate_all(),
            }
        }
    }
}

impl FileGate for Control {
    fn refuses(&self, client: Ipv4Addr) -> Option<Mac> {
        let engine = self.paths.engine.as_ref()?;
        let mac = engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holder(client, unix_now())?;
        (!self.paths.policy.current().may_netboot(mac)).then_some(mac)
    }
}

/// A file-only machine as a record.
fn file_view(state: &State, mac: Mac) -> Option<MachineView> {
    let entry = state.file.machines.get(&mac)?;
    let mut record = MachineRecord::new(mac);
    record.profile.clone_from(&entry.profile);
    record.hostname.clone_from(&entry.hostname);
    record.netboot = entry.netboot;
    record.arch = entry.arch;
    record.client = entry.client;
    record.vars.clone_from(&entry.vars);
    record.address = state.file_reservations.get(&mac).copied();
    Some(MachineView {
        record,
        source: "file",
    })
}

fn profile_view(p: &crate::policy::r#static::Profile) -> ProfileRecord {
    let mut r = ProfileRecord::named(&p.name);
    r.boot_files.bios = Some(p.boot_files.bios.clone());
    r.boot_files.uefi_x64 = Some(p.boot_files.uefi_x64.clone());
    r.boot_files.uefi_arm64 = Some(p.boot_files.uefi_arm64.clone());
    r.boot_files.uefi_ia32 = Some(p.boot_files.uefi_ia32.clone());
    r.boot_files.rpi = Some(p.boot_files.rpi.clone());
    r.kernel = Some(p.kernel.clone());
    r.initrd = Some(p.initrd.clone());
    r.cmdline = Some(p.cmdline.clone());
    r.ipxe_script = Some(p.ipxe_script.clone());
    r
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
