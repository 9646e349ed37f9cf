//! Leases in PostgreSQL (`--lease-store postgres://...`), for sites that
//! outgrow one server's embedded database.
//!
//! The database, not memory, has the last word on who holds an address:
//! the address is the table's primary key, and a write for an address
//! another client holds (a current, unreleased lease) changes nothing and
//! fails the whole batch, so its replies are withdrawn like any failed
//! commit. A batch is one transaction, committed with `synchronous_commit
//! = on`: durable on the server before any ACK of it leaves.
//!
//! The connection is [`Db`]'s: on a thread of its own, made again after a
//! loss.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use postgres::Client;

use crate::cluster::{Change, LeaseWritten, CHANGES};

pub use super::db::without_password;
use super::{
    db::{Db, Failed},
    Lease, LeaseError, LeaseState, LeaseStore,
};

/// Every step of the leases' schema from an empty database, in order: the
/// schema's version is their number. A database at a newer version was
/// migrated by a newer pxed, and is refused.
const MIGRATIONS: [&str; 1] = ["CREATE TABLE pxed_leases (
        ip inet PRIMARY KEY,
        client bytea NOT NULL,
        mac text NOT NULL,
        expires bigint NOT NULL,
        state text NOT NULL CHECK (state IN ('active', 'released', 'declined')),
        hostname text
    )"];

/// A write is taken only if nobody else holds the address: the same
/// client, a released lease, or one expired by now.
const UPSERT: &str = "INSERT INTO pxed_leases (ip, client, mac, expires, state, hostname)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (ip) DO UPDATE SET client = EXCLUDED.client, mac = EXCLUDED.mac,
        expires = EXCLUDED.expires, state = EXCLUDED.state, hostname = EXCLUDED.hostname
    WHERE pxed_leases.client = EXCLUDED.client OR pxed_leases.state = 'released'
        OR pxed_leases.expires <= $7";

enum Op {
    Put(Lease),
    Remove(Ipv4Addr),
}

pub struct PostgresLeaseStore {
    db: Db,
    batch: Vec<Op>,
    /// Who this server is in the change notifications (`crate::cluster`).
    server: String,
}

impl PostgresLeaseStore {
    /// Connects, creates or migrates the schema, and starts the client's
    /// thread. A database that cannot be reached, or whose schema is newer
    /// than this build's, is an error naming the URL (password hidden).
    /// Every commit is announced to the other servers as `server`'s.
    pub fn open(url: &str, server: &str) -> Result<Self, LeaseError> {
        let db = Db::open(url, "leases", &MIGRATIONS)
            .map_err(|(path, message)| LeaseError::Database { path, message })?;
        Ok(Self {
            db,
            batch: Vec::new(),
            server: server.to_owned(),
        })
    }

    fn ask<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Client) -> Result<T, Failed> + Send + 'static,
    ) -> Result<T, LeaseError> {
        self.db.call(job).map_err(|e| match e {
            Failed::Taken(leases) => LeaseError::Taken { leases },
            Failed::Error(message) => LeaseError::Database {
                path: self.db.shown().to_owned(),
                message,
            },
        })
    }
}

impl LeaseStore for PostgresLeaseStore {
    fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
        self.ask(load)
    }

    fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        self.batch.push(Op::Put(lease.clone()));
        Ok(())
    }

    fn remove(&mut self, ip: Ipv4Addr) -> Result<(), LeaseError> {
        self.batch.push(Op::Remove(ip));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), LeaseError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // Taken whether it commits or not: a failed batch counts for nothing.
        let batch = std::mem::take(&mut self.batch);
        let server = self.server.clone();
        self.ask(move |client| commit(client, &batch, &server))
    }
}

pub(crate) const COLUMNS: &str = "ip, client, mac, expires, state, hostname";

pub(crate) fn load(client: &mut Client) -> Result<Vec<Lease>, Failed> {
    let rows = client.query(&format!("SELECT {COLUMNS} FROM pxed_leases"), &[])?;
    rows.iter()
        .map(lease_of)
        .collect::<Result<_, _>>()
        .map_err(Failed::Error)
}

/// A row of `COLUMNS` as a lease.
pub(crate) fn lease_of(row: &postgres::Row) -> Result<Lease, String> {
    let IpAddr::V4(ip) = row.get::<_, IpAddr>(0) else {
        return Err("an IPv6 address in pxed_leases".to_owned());
    };
    let mac: String = row.get(2);
    let state: String = row.get(4);
    Ok(Lease {
        ip,
        client: row.get(1),
        mac: mac
            .parse::<crate::policy::Mac>()
            .map_err(|e| format!("lease {ip}: {e}"))?
            .0,
        expires: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        state: match state.as_str() {
            "active" => LeaseState::Active,
            "released" => LeaseState::Released,
            _ => LeaseState::Declined,
        },
        hostname: row.get(5),
    })
}

/// Writes the batch in one transaction, announcing its addresses to the
/// other servers in the same transaction: they hear of it if and when it
/// is durable.
fn commit(client: &mut Client, ops: &[Op], server: &str) -> Result<(), Failed> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut tx = client.transaction()?;
    let upsert = tx.prepare(UPSERT)?;
    let mut taken = Vec::new();
    for op in ops {
        match op {
            Op::Put(lease) => {
                let ip = IpAddr::V4(lease.ip);
                let mac = crate::policy::Mac(lease.mac).to_string();
                let expires = i64::try_from(lease.expires).unwrap_or(i64::MAX);
                let state = match lease.state {
                    LeaseState::Active => "active",
                    LeaseState::Released => "released",
                    LeaseState::Declined => "declined",
                };
                let written = tx.execute(
                    &upsert,
                    &[
                        &ip,
                        &lease.client,
                        &mac,
                        &expires,
                        &state,
                        &lease.hostname,
                        &now,
                    ],
                )?;
                if written == 0 {
                    // Its holder, for the engine to learn. The rest of the
                    // batch is still tried, so every holder is learnt at
                    // once; the transaction is then rolled back.
                    let row = tx.query_one(
                        &format!("SELECT {COLUMNS} FROM pxed_leases WHERE ip = $1"),
                        &[&ip],
                    )?;
                    taken.push(lease_of(&row)?);
                }
            }
            Op::Remove(ip) => {
                tx.execute("DELETE FROM pxed_leases WHERE ip = $1", &[&IpAddr::V4(*ip)])?;
            }
        }
    }
    if !taken.is_empty() {
        // Dropping the transaction rolls the whole batch back.
        return Err(Failed::Taken(taken));
    }
    let written: Vec<LeaseWritten> = ops
        .iter()
        .map(|op| match op {
            Op::Put(lease) => LeaseWritten {
                ip: lease.ip,
                lease: Some(lease.clone()),
                unsent: false,
            },
            Op::Remove(ip) => LeaseWritten {
                ip: *ip,
                lease: None,
                unsent: false,
            },
        })
        .collect();
    for payload in Change::lease_payloads(server, &written) {
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &payload])?;
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::super::db::without_password;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(
            without_password("postgres://pxed:s3cret@db.example:5432/pxed"),
            "postgres://pxed:***@db.example:5432/pxed"
        );
        assert_eq!(
            without_password("postgres://pxed@db/pxed"),
            "postgres://pxed@db/pxed"
        );
        assert_eq!(without_password("postgres://db/pxed"), "postgres://db/pxed");
    }
}
