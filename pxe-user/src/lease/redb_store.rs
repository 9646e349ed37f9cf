//! Leases in an embedded redb database.
//!
//! Why redb: a pure-Rust, single-file, crash-safe B-tree store with ACID
//! transactions whose default commit is durable when it returns (fsync, with
//! a copy-on-write design that never leaves a torn page), maintained and
//! widely used; no server to run, nothing to tune. One table maps the IPv4
//! address (as u32) to the lease as JSON, which keeps records readable and
//! lets fields be added without a migration.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{Lease, LeaseError, LeaseStore};

const LEASES: TableDefinition<u32, &[u8]> = TableDefinition::new("leases");

pub struct RedbLeaseStore {
    /// `None` between a failure and the reopening that recovers from it.
    db: Option<Database>,
    file: PathBuf,
    path: String,
    /// Writes since the last commit; dropped (aborted) if never committed.
    batch: Option<WriteTransaction>,
    /// When a write last failed (a full or failing disk), and why: redb
    /// refuses every later one until the database is opened again, which
    /// the next write tries, at most once per [`REOPEN_EVERY`].
    failed: Option<(Instant, String)>,
    /// Why a write since the last commit failed: the batch it belonged to
    /// was dropped with it, and that batch's commit must fail too, or the
    /// writes before the failure would be acknowledged but never stored.
    lost: Option<String>,
}

/// How often a failed database is opened again while it keeps failing.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

impl RedbLeaseStore {
    /// Opens the database at `path`, creating it (and nothing else) if absent.
    pub fn open(path: &Path) -> Result<Self, LeaseError> {
        let shown = path.display().to_string();
        let db = open_database(path).map_err(|message| LeaseError::Database {
            path: shown.clone(),
            message,
        })?;
        Ok(Self {
            db: Some(db),
            file: path.to_owned(),
            path: shown,
            batch: None,
            failed: None,
            lost: None,
        })
    }

    /// The database, opened again first if a write failed since.
    fn db(&mut self) -> Result<&Database, LeaseError> {
        if self.db.is_none() {
            if let Some((at, why)) = &self.failed {
                if at.elapsed() < REOPEN_EVERY {
                    return Err(self.error(format!("{why} (opened again at most once a second)")));
                }
            }
            match open_database(&self.file) {
                Ok(db) => {
                    self.db = Some(db);
                    self.failed = None;
                }
                Err(e) => {
                    self.failed = Some((Instant::now(), e.clone()));
                    return Err(self.error(e));
                }
            }
        }
        self.db.as_ref().ok_or_else(|| self.error("not open"))
    }

    /// After a failed write redb refuses every later one: the database is
    /// closed, to be opened again by the next write.
    fn failing<T>(&mut self, result: Result<T, LeaseError>) -> Result<T, LeaseError> {
        if let Err(e) = &result {
            self.batch = None;
            self.db = None;
            self.failed = Some((Instant::now(), message_of(e)));
        }
        result
    }

    fn error(&self, e: impl std::fmt::Display) -> LeaseError {
        LeaseError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// [`LeaseStore::put`] into the open batch.
    fn put_in_batch(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        let bytes = serde_json::to_vec(lease).map_err(|e| self.error(e))?;
        let written = self.batch()?.open_table(LEASES).and_then(|mut table| {
            table
                .insert(u32::from(lease.ip), bytes.as_slice())
                .map(drop)
                .map_err(Into::into)
        });
        let written = written.map_err(|e| self.error(e));
        self.failing(written)
    }

    /// [`LeaseStore::remove`] from the open batch.
    fn remove_in_batch(&mut self, ip: Ipv4Addr) -> Result<(), LeaseError> {
        let removed = self
            .batch()?
            .open_table(LEASES)
            .and_then(|mut table| table.remove(u32::from(ip)).map(drop).map_err(Into::into));
        let removed = removed.map_err(|e| self.error(e));
        self.failing(removed)
    }

    /// A write that failed lost its whole batch: remembered for the commit.
    fn lose_batch_on<T>(&mut self, result: Result<T, LeaseError>) -> Result<T, LeaseError> {
        if let Err(e) = &result {
            self.lost.get_or_insert_with(|| message_of(e));
        }
        result
    }

    /// The open write transaction, begun on first use.
    fn batch(&mut self) -> Result<&WriteTransaction, LeaseError> {
        if self.batch.is_none() {
            let begun = self.db()?.begin_write().map_err(|e| self.error(e));
            self.batch = Some(self.failing(begun)?);
        }
        Ok(self.batch.as_ref().expect("just begun"))
    }
}

/// What went wrong, without the path [`RedbLeaseStore::error`] adds again.
fn message_of(e: &LeaseError) -> String {
    match e {
        LeaseError::Database { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Opens (or creates) the database and its table.
fn open_database(path: &Path) -> Result<Database, String> {
    let db = Database::create(path).map_err(|e| e.to_string())?;
    // Create the table so that reads of a fresh database find it.
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.open_table(LEASES).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())?;
    Ok(db)
}

impl LeaseStore for RedbLeaseStore {
    fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| self.error("closed after a failed write"))?;
        let txn = db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(LEASES).map_err(|e| self.error(e))?;
        let mut leases = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (ip, value) = entry.map_err(|e| self.error(e))?;
            let ip = Ipv4Addr::from(ip.value());
            let lease: Lease =
                serde_json::from_slice(value.value()).map_err(|e| LeaseError::Corrupt {
                    ip,
                    message: e.to_string(),
                })?;
            leases.push(lease);
        }
        Ok(leases)
    }

    fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        let written = self.put_in_batch(lease);
        self.lose_batch_on(written)
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), LeaseError> {
        let removed = self.remove_in_batch(ip);
        self.lose_batch_on(removed)
    }

    fn commit(&mut self) -> Result<(), LeaseError> {
        if let Some(lost) = self.lost.take() {
            self.batch = None;
            return Err(self.error(format!("{lost} (the batch was dropped with it)")));
        }
        let committed = match self.batch.take() {
            // redb's default durability: on disk (fsync) when commit returns.
            Some(txn) => txn.commit().map_err(|e| self.error(e)),
            None => Ok(()),
        };
        self.failing(committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseState;

    fn lease(last: u8) -> Lease {
        Lease {
            ip: Ipv4Addr::new(198, 18, 0, last),
            client: vec![0, 2, 0, 0, 0, 0, last],
            mac: [2, 0, 0, 0, 0, last],
            expires: 1_000 + u64::from(last),
            state: LeaseState::Active,
            hostname: Some(format!("n{last}")),
        }
    }

    #[test]
    fn leases_survive_reopening_and_removal_is_durable_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.redb");
        {
            let mut store = RedbLeaseStore::open(&path).unwrap();
            for i in 1..=50 {
                store.put(&lease(i)).unwrap();
                if i % 10 == 0 {
                    store.commit().unwrap();
                }
            }
            store.remove(Ipv4Addr::new(198, 18, 0, 7)).unwrap();
            store.commit().unwrap();
            store.put(&lease(99)).unwrap(); // never committed: does not count
        }
        let store = RedbLeaseStore::open(&path).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 49, "the uncommitted 99 is not there");
        assert!(all.contains(&lease(50)));
        assert!(!all.iter().any(|l| l.ip == Ipv4Addr::new(198, 18, 0, 7)));
    }

    /// On a disk that fails every change, a commit fails, and so does the
    /// commit of every later batch whose writes failed: a write's failure
    /// drops its batch, and an empty commit must not pass for a durable one
    /// (the engine would ACK the batch's earlier leases). Once the disk
    /// works again the store opens itself again and holds what it committed.
    #[test]
    fn no_batch_with_a_failed_write_commits() {
        if !pxe_lab::privileged("no_batch_with_a_failed_write_commits") {
            return;
        }
        let backing = tempfile::tempdir().unwrap();
        let at = tempfile::tempdir().unwrap();
        let fs = pxe_lab::faulty_fs::FaultyFs::mount(backing.path(), at.path())
            .expect("mounting the test's FUSE filesystem (needs /dev/fuse and fusermount3)");
        let mut store = RedbLeaseStore::open(&at.path().join("leases.redb")).unwrap();
        for i in 1..=30 {
            store.put(&lease(i)).unwrap();
        }
        store.commit().unwrap();

        fs.fail_changes(true);
        store.put(&lease(31)).unwrap();
        assert!(store.commit().is_err(), "the disk refused it");
        for round in 0..3 {
            let written = store.put(&lease(40 + round));
            let committed = store.commit();
            assert!(
                written.is_err() && committed.is_err(),
                "round {round}: {written:?}, then {committed:?}"
            );
        }

        fs.fail_changes(false);
        std::thread::sleep(REOPEN_EVERY);
        store.put(&lease(50)).unwrap();
        store.commit().unwrap();
        let mut held: Vec<u8> = store
            .load_all()
            .unwrap()
            .iter()
            .map(|l| l.ip.octets()[3])
            .collect();
        held.sort_unstable();
        let expected: Vec<u8> = (1..=30).chain([50]).collect();
        assert_eq!(held, expected);
    }

    #[test]
    fn a_path_that_cannot_hold_a_database_is_a_clear_error() {
        let err = RedbLeaseStore::open(Path::new("/proc/version"))
            .err()
            .expect("not a database");
        assert!(err.to_string().contains("/proc/version"), "{err}");
    }
}
