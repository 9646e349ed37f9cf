//! Where the inventory is kept: an embedded redb database by default (one
//! server), PostgreSQL beside the leases (`--lease-store`), in memory for
//! tests. A write is durable when it returns.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use std::sync::Arc;

use super::{MachineRecord, ProfileRecord};
use crate::{
    cluster::{Change, Cluster, CHANGES},
    lease::db::{Db, Failed},
    policy::Mac,
};

/// MAC (6 bytes) → the machine's record as JSON.
const MACHINES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("machines");
/// Profile name → the profile's record as JSON.
const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory database {path}: {message}")]
    Database { path: String, message: String },
    #[error("inventory record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
}

pub trait InventoryStore: Send {
    fn load_all(&self) -> Result<(Vec<MachineRecord>, Vec<ProfileRecord>), InventoryError>;
    /// Puts `machines` and `profiles` and deletes `forget`, in one durable
    /// transaction: all of it or none.
    fn write(
        &mut self,
        machines: &[MachineRecord],
        forget: &[Mac],
        profiles: &[ProfileRecord],
    ) -> Result<(), InventoryError>;
    /// The number the last successful write was announced to other servers
    /// under, for a store shared with them (`crate::cluster`).
    fn last_change(&self) -> Option<u64> {
        None
    }
}

pub struct RedbInventoryStore {
    db: Database,
    path: String,
}

impl RedbInventoryStore {
    /// Opens the database at `path`, creating it (and its directory) if absent.
    pub fn open(path: &Path) -> Result<Self, InventoryError> {
        let shown = path.display().to_string();
        let error = |message: String| InventoryError::Database {
            path: shown.clone(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| error(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| error(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| error(e.to_string()))?;
        txn.open_table(MACHINES).map_err(|e| error(e.to_string()))?;
        txn.open_table(PROFILES).map_err(|e| error(e.to_string()))?;
        txn.commit().map_err(|e| error(e.to_string()))?;
        Ok(Self { db, path: shown })
    }

    fn error(&self, e: impl std::fmt::Display) -> InventoryError {
        InventoryError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

fn corrupt(key: impl std::fmt::Display, e: serde_json::Error) -> InventoryError {
    InventoryError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    }
}

impl InventoryStore for RedbInventoryStore {
    fn load_all(&self) -> Result<(Vec<MachineRecord>, Vec<ProfileRecord>), InventoryError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let machines_table = txn.open_table(MACHINES).map_err(|e| self.error(e))?;
        let mut machines = Vec::new();
        for entry in machines_table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            let record: MachineRecord = serde_json::from_slice(value.value())
                .map_err(|e| corrupt(format!("{:02x?}", key.value()), e))?;
            machines.push(record);
        }
        let profiles_table = txn.open_table(PROFILES).map_err(|e| self.error(e))?;
        let mut profiles = Vec::new();
        for entry in profiles_table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            let record: ProfileRecord =
                serde_json::from_slice(value.value()).map_err(|e| corrupt(key.value(), e))?;
            profiles.push(record);
        }
        Ok((machines, profiles))
    }

    fn write(
        &mut self,
        machines: &[MachineRecord],
        forget: &[Mac],
        profiles: &[ProfileRecord],
    ) -> Result<(), InventoryError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(MACHINES).map_err(|e| self.error(e))?;
            for m in machines {
                let json = serde_json::to_vec(m).map_err(|e| self.error(e))?;
                table
                    .insert(&m.mac.0[..], json.as_slice())
                    .map_err(|e| self.error(e))?;
            }
            for mac in forget {
                table.remove(&mac.0[..]).map_err(|e| self.error(e))?;
            }
            let mut table = txn.open_table(PROFILES).map_err(|e| self.error(e))?;
            for p in profiles {
                let json = serde_json::to_vec(p).map_err(|e| self.error(e))?;
                table
                    .insert(p.name.as_str(), json.as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))
    }
}

/// Every step of the inventory's schema in PostgreSQL, in order.
const PG_MIGRATIONS: [&str; 1] = [
    "CREATE TABLE pxed_machines (mac text PRIMARY KEY, record jsonb NOT NULL);
     CREATE TABLE pxed_profiles (name text PRIMARY KEY, record jsonb NOT NULL)",
];

/// The inventory in PostgreSQL, beside the leases: machines by MAC and
/// profiles by name, each record as JSON, every write one transaction,
/// announced to the other servers in it (`crate::cluster`).
pub struct PostgresInventoryStore {
    db: Db,
    cluster: Arc<Cluster>,
    last_change: Option<u64>,
}

impl PostgresInventoryStore {
    /// Connects and creates or migrates the inventory's schema; writes are
    /// announced as `cluster`'s.
    pub fn open(url: &str, cluster: Arc<Cluster>) -> Result<Self, InventoryError> {
        let db = Db::open(url, "inventory", &PG_MIGRATIONS)
            .map_err(|(path, message)| InventoryError::Database { path, message })?;
        Ok(Self {
            db,
            cluster,
            last_change: None,
        })
    }

    fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut postgres::Client) -> Result<T, Failed> + Send + 'static,
    ) -> Result<T, InventoryError> {
        self.db.call(job).map_err(|e| InventoryError::Database {
            path: self.db.shown().to_owned(),
            message: e.to_string(),
        })
    }
}

impl InventoryStore for PostgresInventoryStore {
    fn load_all(&self) -> Result<(Vec<MachineRecord>, Vec<ProfileRecord>), InventoryError> {
        self.call(|client| load_pg(client).map_err(Failed::Error))
    }

    fn write(
        &mut self,
        machines: &[MachineRecord],
        forget: &[Mac],
        profiles: &[ProfileRecord],
    ) -> Result<(), InventoryError> {
        let machines: Vec<(String, String)> = machines
            .iter()
            .map(|m| (m.mac.to_string(), to_json(m)))
            .collect();
        let forget: Vec<String> = forget.iter().map(Mac::to_string).collect();
        let profiles: Vec<(String, String)> = profiles
            .iter()
            .map(|p| (p.name.clone(), to_json(p)))
            .collect();
        let change = self.cluster.begin_change();
        let named: Vec<String> = machines
            .iter()
            .map(|(mac, _)| mac.clone())
            .chain(forget.iter().cloned())
            .collect();
        let names: Vec<String> = profiles.iter().map(|(name, _)| name.clone()).collect();
        let payloads = Change::inventory_payloads(self.cluster.id(), change, &named, &names);
        self.last_change = None;
        let written = self.call(move |client| {
            let mut tx = client.transaction()?;
            for (mac, record) in &machines {
                tx.execute(
                    "INSERT INTO pxed_machines (mac, record) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (mac) DO UPDATE SET record = EXCLUDED.record",
                    &[mac, record],
                )?;
            }
            for mac in &forget {
                tx.execute("DELETE FROM pxed_machines WHERE mac = $1", &[mac])?;
            }
            for (name, record) in &profiles {
                tx.execute(
                    "INSERT INTO pxed_profiles (name, record) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
                    &[name, record],
                )?;
            }
            for payload in &payloads {
                tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, payload])?;
            }
            Ok(tx.commit()?)
        });
        if written.is_err() {
            self.cluster.abandon_change(change);
        }
        written?;
        self.last_change = Some(change);
        Ok(())
    }

    fn last_change(&self) -> Option<u64> {
        self.last_change
    }
}

/// Every machine and profile in the database.
pub(crate) fn load_pg(
    client: &mut postgres::Client,
) -> Result<(Vec<MachineRecord>, Vec<ProfileRecord>), String> {
    let text =
        |sql: &str, client: &mut postgres::Client| -> Result<Vec<(String, String)>, String> {
            Ok(client
                .query(sql, &[])
                .map_err(|e| e.to_string())?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect())
        };
    let machines = text("SELECT mac, record::text FROM pxed_machines", client)?;
    let profiles = text("SELECT name, record::text FROM pxed_profiles", client)?;
    let machines = machines
        .iter()
        .map(|(key, json)| serde_json::from_str(json).map_err(|e| corrupt(key, e).to_string()))
        .collect::<Result<_, _>>()?;
    let profiles = profiles
        .iter()
        .map(|(key, json)| serde_json::from_str(json).map_err(|e| corrupt(key, e).to_string()))
        .collect::<Result<_, _>>()?;
    Ok((machines, profiles))
}

/// The records of these MACs now (`None`: deleted; an unreadable one is
/// left out, so memory keeps its own).
pub(crate) fn read_machines(
    client: &mut postgres::Client,
    macs: &[String],
) -> Result<Vec<(Mac, Option<MachineRecord>)>, postgres::Error> {
    let mut found = read_records(
        client,
        "SELECT mac, record::text FROM pxed_machines WHERE mac = ANY($1)",
        macs,
    )?;
    Ok(macs
        .iter()
        .filter_map(|text| {
            let mac = text.parse::<Mac>().ok()?;
            match found.remove(text) {
                None => Some((mac, None)),
                Some(record) => record.map(|r| (mac, Some(r))),
            }
        })
        .collect())
}

/// The records of these profiles now (as [`read_machines`]).
pub(crate) fn read_profiles(
    client: &mut postgres::Client,
    names: &[String],
) -> Result<Vec<(String, Option<ProfileRecord>)>, postgres::Error> {
    let mut found = read_records(
        client,
        "SELECT name, record::text FROM pxed_profiles WHERE name = ANY($1)",
        names,
    )?;
    Ok(names
        .iter()
        .filter_map(|name| match found.remove(name) {
            None => Some((name.clone(), None)),
            Some(record) => record.map(|r| (name.clone(), Some(r))),
        })
        .collect())
}

/// Key → record for the rows `sql` (key and JSON, for keys = `$1`) returns;
/// `None` for a row that does not parse (absent keys have no row).
fn read_records<T: serde::de::DeserializeOwned>(
    client: &mut postgres::Client,
    sql: &str,
    keys: &[String],
) -> Result<std::collections::HashMap<String, Option<T>>, postgres::Error> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let mut found = std::collections::HashMap::new();
    for row in client.query(sql, &[&keys])? {
        let (key, json): (String, String) = (row.get(0), row.get(1));
        match serde_json::from_str(&json) {
            Ok(record) => drop(found.insert(key, Some(record))),
            // A newer pxed's record, say: keep what memory has, and say so.
            Err(e) => {
                tracing::warn!(%key, "cluster: a record another server wrote is unreadable here ({e}); this server keeps its own");
                found.insert(key, None);
            }
        }
    }
    Ok(found)
}

/// A record as JSON text (records are plain data: this cannot fail).
fn to_json<T: serde::Serialize>(record: &T) -> String {
    serde_json::to_string(record).expect("a record serialises")
}

/// For tests and simulations: nothing survives the process.
#[derive(Debug, Default)]
pub struct MemInventoryStore {
    machines: std::collections::BTreeMap<Mac, MachineRecord>,
    profiles: std::collections::BTreeMap<String, ProfileRecord>,
}

impl InventoryStore for MemInventoryStore {
    fn load_all(&self) -> Result<(Vec<MachineRecord>, Vec<ProfileRecord>), InventoryError> {
        Ok((
            self.machines.values().cloned().collect(),
            self.profiles.values().cloned().collect(),
        ))
    }

    fn write(
        &mut self,
        machines: &[MachineRecord],
        forget: &[Mac],
        profiles: &[ProfileRecord],
    ) -> Result<(), InventoryError> {
        for m in machines {
            self.machines.insert(m.mac, m.clone());
        }
        for mac in forget {
            self.machines.remove(mac);
        }
        for p in profiles {
            self.profiles.insert(p.name.clone(), p.clone());
        }
        Ok(())
    }
}
