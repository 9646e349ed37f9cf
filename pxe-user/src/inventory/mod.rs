//! The machine inventory the operator API changes at run time: machines
//! (profile, host name, reservation, `netboot`, overrides, labels,
//! variables) and profiles, kept durably beside the config file's.
//!
//! How the two combine: the config file is the base, the inventory is laid
//! over it. A machine or profile the API has written wins over the file's
//! of the same MAC or name; a SIGHUP re-reads the file and keeps every API
//! record; deleting an API record lets the file's entry (if any) show
//! again. So an operator can keep racks in the file and let a provisioning
//! system flip them at run time without the two overwriting each other.

mod record;
pub(crate) mod store;

use std::collections::BTreeMap;

pub use self::{
    record::{MachineRecord, ProfileRecord, Selector},
    store::{
        InventoryError, InventoryStore, MemInventoryStore, PostgresInventoryStore,
        RedbInventoryStore,
    },
};
use crate::policy::{
    r#static::{MachineEntry, Profile, StaticPolicy},
    Mac,
};

/// What the API has written, in memory, over its durable store.
pub struct Inventory {
    store: Box<dyn InventoryStore>,
    machines: BTreeMap<Mac, MachineRecord>,
    profiles: BTreeMap<String, ProfileRecord>,
}

impl Inventory {
    /// Everything the store holds.
    pub fn load(store: Box<dyn InventoryStore>) -> Result<Self, InventoryError> {
        let (machines, profiles) = store.load_all()?;
        Ok(Self {
            store,
            machines: machines.into_iter().map(|m| (m.mac, m)).collect(),
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
        })
    }

    pub fn machines(&self) -> &BTreeMap<Mac, MachineRecord> {
        &self.machines
    }

    pub fn machine(&self, mac: Mac) -> Option<&MachineRecord> {
        self.machines.get(&mac)
    }

    pub fn profiles(&self) -> &BTreeMap<String, ProfileRecord> {
        &self.profiles
    }

    /// Writes `records` durably, all or none, then in memory. Each record's
    /// revision is one more than the one it replaces.
    pub fn put_machines(
        &mut self,
        records: Vec<MachineRecord>,
    ) -> Result<Vec<MachineRecord>, InventoryError> {
        let records: Vec<MachineRecord> = records
            .into_iter()
            .map(|mut r| {
                r.revision = self.machines.get(&r.mac).map_or(1, |old| old.revision + 1);
                r
            })
            .collect();
        self.store.write(&records, &[], &[])?;
        for r in &records {
            self.machines.insert(r.mac, r.clone());
        }
        Ok(records)
    }

    /// Forgets a machine's record durably; true if there was one.
    pub fn delete_machine(&mut self, mac: Mac) -> Result<bool, InventoryError> {
        if !self.machines.contains_key(&mac) {
            return Ok(false);
        }
        self.store.write(&[], &[mac], &[])?;
        self.machines.remove(&mac);
        Ok(true)
    }

    pub fn put_profile(
        &mut self,
        mut profile: ProfileRecord,
    ) -> Result<ProfileRecord, InventoryError> {
        profile.revision = self
            .profiles
            .get(&profile.name)
            .map_or(1, |p| p.revision + 1);
        self.store.write(&[], &[], std::slice::from_ref(&profile))?;
        self.profiles.insert(profile.name.clone(), profile.clone());
        Ok(profile)
    }

    /// The number the last write was announced to other servers under,
    /// with a shared store.
    pub fn last_change(&self) -> Option<u64> {
        self.store.last_change()
    }

    /// Records another server wrote (`None`: deleted), as the shared
    /// database has them now: memory follows, nothing is written.
    pub fn absorb(
        &mut self,
        machines: Vec<(Mac, Option<MachineRecord>)>,
        profiles: Vec<(String, Option<ProfileRecord>)>,
    ) {
        for (mac, record) in machines {
            match record {
                Some(r) => drop(self.machines.insert(mac, r)),
                None => drop(self.machines.remove(&mac)),
            }
        }
        for (name, record) in profiles {
            match record {
                Some(p) => drop(self.profiles.insert(name, p)),
                None => drop(self.profiles.remove(&name)),
            }
        }
    }

    /// Everything the shared database holds, replacing memory (after
    /// changes may have been missed). Returns the MACs whose records differed.
    pub fn replace_all(
        &mut self,
        machines: Vec<MachineRecord>,
        profiles: Vec<ProfileRecord>,
    ) -> (Vec<Mac>, bool) {
        let machines: BTreeMap<Mac, MachineRecord> =
            machines.into_iter().map(|m| (m.mac, m)).collect();
        let profiles: BTreeMap<String, ProfileRecord> =
            profiles.into_iter().map(|p| (p.name.clone(), p)).collect();
        let mut changed: Vec<Mac> = machines
            .iter()
            .filter(|(mac, r)| self.machines.get(mac) != Some(r))
            .map(|(mac, _)| *mac)
            .collect();
        changed.extend(self.machines.keys().filter(|m| !machines.contains_key(m)));
        let profiles_changed = profiles != self.profiles;
        self.machines = machines;
        self.profiles = profiles;
        (changed, profiles_changed)
    }

    /// The policy in force: the file's, with the inventory laid over it.
    /// DHCP options and a profile's TFTP server are the file's alone: a
    /// record that replaces the file's entry or profile of the same name
    /// keeps them.
    pub fn over(&self, file: &StaticPolicy) -> StaticPolicy {
        let mut policy = file.clone();
        for (name, p) in &self.profiles {
            let mut profile = p.to_profile();
            if let Some(filed) = file.profiles.get(name) {
                profile.options.clone_from(&filed.options);
                profile.tftp_server = filed.tftp_server;
            }
            policy.profiles.insert(name.clone(), profile);
        }
        for (mac, m) in &self.machines {
            let mut entry = m.to_entry();
            if let Some(filed) = file.machines.get(mac) {
                entry.options.clone_from(&filed.options);
            }
            policy.machines.insert(*mac, entry);
        }
        policy
    }
}

impl MachineRecord {
    /// The policy's view of this machine.
    pub fn to_entry(&self) -> MachineEntry {
        MachineEntry {
            profile: self.profile.clone(),
            netboot: self.netboot,
            hostname: self.hostname.clone(),
            arch: self.arch,
            client: self.client,
            vars: self.vars.clone(),
            options: Default::default(),
            labels: self.labels.clone(),
        }
    }
}

impl ProfileRecord {
    pub fn to_profile(&self) -> Profile {
        let mut p = Profile::named(&self.name);
        let files = &self.boot_files;
        for (slot, value) in [
            (&mut p.boot_files.bios, &files.bios),
            (&mut p.boot_files.uefi_x64, &files.uefi_x64),
            (&mut p.boot_files.uefi_arm64, &files.uefi_arm64),
            (&mut p.boot_files.uefi_ia32, &files.uefi_ia32),
            (&mut p.boot_files.rpi, &files.rpi),
        ] {
            if let Some(v) = value {
                slot.clone_from(v);
            }
        }
        for (slot, value) in [
            (&mut p.kernel, &self.kernel),
            (&mut p.initrd, &self.initrd),
            (&mut p.cmdline, &self.cmdline),
            (&mut p.ipxe_script, &self.ipxe_script),
        ] {
            if let Some(v) = value {
                slot.clone_from(v);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    fn file_policy() -> StaticPolicy {
        let mut machines = std::collections::HashMap::new();
        machines.insert(
            mac(1),
            MachineEntry {
                hostname: Some("from-file".into()),
                ..MachineEntry::default()
            },
        );
        StaticPolicy {
            profiles: [("default".to_owned(), Profile::named("default"))].into(),
            machines,
            default_profile: Some("default".into()),
            provision: None,
            classes: Vec::new(),
        }
    }

    #[test]
    fn api_records_lie_over_the_file_and_a_delete_shows_the_file_again() {
        let mut inv = Inventory::load(Box::new(MemInventoryStore::default())).unwrap();
        let mut record = MachineRecord::new(mac(1));
        record.netboot = false;
        let written = inv.put_machines(vec![record]).unwrap();
        assert_eq!(written[0].revision, 1);
        let policy = inv.over(&file_policy());
        assert!(!policy.machines[&mac(1)].netboot, "the API's record wins");
        assert_eq!(
            policy.machines[&mac(1)].hostname,
            None,
            "whole, not merged with the file's"
        );
        assert!(inv.delete_machine(mac(1)).unwrap());
        let policy = inv.over(&file_policy());
        assert_eq!(
            policy.machines[&mac(1)].hostname.as_deref(),
            Some("from-file")
        );
        assert!(
            !inv.delete_machine(mac(1)).unwrap(),
            "nothing left to delete"
        );
    }

    #[test]
    fn revisions_count_up_per_record_and_survive_a_reload_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory.redb");
        let mut inv = Inventory::load(Box::new(RedbInventoryStore::open(&path).unwrap())).unwrap();
        inv.put_machines(vec![MachineRecord::new(mac(2))]).unwrap();
        let again = inv.put_machines(vec![MachineRecord::new(mac(2))]).unwrap();
        assert_eq!(again[0].revision, 2);
        let mut profile = ProfileRecord::named("installer");
        profile.kernel = Some("installer/vmlinuz".into());
        inv.put_profile(profile).unwrap();
        drop(inv);
        let inv = Inventory::load(Box::new(RedbInventoryStore::open(&path).unwrap())).unwrap();
        assert_eq!(inv.machine(mac(2)).unwrap().revision, 2);
        let policy = inv.over(&file_policy());
        assert_eq!(policy.profiles["installer"].kernel, "installer/vmlinuz");
        assert_eq!(
            policy.profiles["installer"].initrd, "initrd.img",
            "unset fields keep the defaults"
        );
    }
}
