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
//! The client runs on a thread of its own (the `postgres` crate drives its
//! connection on a runtime of its own, which must not nest in the daemon's);
//! the store's calls wait for it. A lost connection is made again on the
//! next call, and said so in the log.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::mpsc,
    time::SystemTime,
};

use postgres::{Client, NoTls};
use tracing::{info, warn};

use super::{Lease, LeaseError, LeaseState, LeaseStore};

/// The schema this build writes and reads. A database at a newer version
/// was migrated by a newer pxed, and is refused.
pub const SCHEMA_VERSION: i32 = 1;

/// Every step from an empty database to [`SCHEMA_VERSION`], in order.
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

enum Request {
    Load(mpsc::SyncSender<Result<Vec<Lease>, Failed>>),
    Commit(Vec<Op>, mpsc::SyncSender<Result<(), Failed>>),
}

/// Why a request failed.
enum Failed {
    /// Another client holds this lease's address: the batch was rolled back.
    Taken(Lease),
    Error(String),
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Self::Error(e)
    }
}

impl From<postgres::Error> for Failed {
    fn from(e: postgres::Error) -> Self {
        Self::Error(e.to_string())
    }
}

pub struct PostgresLeaseStore {
    /// The URL as logs and errors show it: no password.
    shown: String,
    requests: mpsc::Sender<Request>,
    batch: Vec<Op>,
}

impl PostgresLeaseStore {
    /// Connects, creates or migrates the schema, and starts the client's
    /// thread. A database that cannot be reached, or whose schema is newer
    /// than this build's, is an error naming the URL (password hidden).
    pub fn open(url: &str) -> Result<Self, LeaseError> {
        let shown = without_password(url);
        let error = |message: String| LeaseError::Database {
            path: shown.clone(),
            message,
        };
        let mut client = connect(url).map_err(error)?;
        migrate(&mut client).map_err(error)?;
        let (requests, inbox) = mpsc::channel();
        let (url, thread_shown) = (url.to_owned(), shown.clone());
        std::thread::Builder::new()
            .name("pxed-postgres".into())
            .spawn(move || serve(url, thread_shown, Some(client), inbox))
            .map_err(|e| error(format!("starting the database thread: {e}")))?;
        Ok(Self {
            shown,
            requests,
            batch: Vec::new(),
        })
    }

    fn error(&self, message: impl Into<String>) -> LeaseError {
        LeaseError::Database {
            path: self.shown.clone(),
            message: message.into(),
        }
    }

    fn ask<T>(
        &self,
        request: impl FnOnce(mpsc::SyncSender<Result<T, Failed>>) -> Request,
    ) -> Result<T, LeaseError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(request(reply))
            .map_err(|_| self.error("the database thread is gone"))?;
        answer
            .recv()
            .map_err(|_| self.error("the database thread is gone"))?
            .map_err(|e| match e {
                Failed::Taken(lease) => LeaseError::Taken {
                    lease: Box::new(lease),
                },
                Failed::Error(e) => self.error(e),
            })
    }
}

impl LeaseStore for PostgresLeaseStore {
    fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
        self.ask(Request::Load)
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
        self.ask(|reply| Request::Commit(batch, reply))
    }
}

/// The client's thread: one request at a time, connecting again after a loss.
fn serve(url: String, shown: String, mut client: Option<Client>, inbox: mpsc::Receiver<Request>) {
    let mut lost = false;
    for request in inbox {
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match connect(&url) {
                Ok(c) => {
                    if lost {
                        info!(database = %shown, "lease database reachable again");
                        lost = false;
                    }
                    Some(c)
                }
                Err(e) => {
                    fail(request, &e);
                    continue;
                }
            };
        }
        let c = client.as_mut().expect("connected above");
        let ok = match request {
            Request::Load(reply) => {
                let result = load(c);
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            }
            Request::Commit(ops, reply) => {
                let result = commit(c, &ops);
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            }
        };
        if !ok && c.is_closed() {
            warn!(database = %shown, "lease database connection lost; connecting again on the next write");
            lost = true;
            client = None;
        }
    }
}

fn fail(request: Request, e: &str) {
    let message = format!("cannot reach the database: {e}");
    match request {
        Request::Load(reply) => drop(reply.send(Err(Failed::Error(message)))),
        Request::Commit(_, reply) => drop(reply.send(Err(Failed::Error(message)))),
    }
}

fn connect(url: &str) -> Result<Client, String> {
    let mut client = Client::connect(url, NoTls).map_err(|e| e.to_string())?;
    // Durable on the server when COMMIT returns, whatever the server's default.
    client
        .batch_execute("SET synchronous_commit = on")
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// Creates or migrates the schema, one server at a time.
fn migrate(client: &mut Client) -> Result<(), String> {
    let mut tx = client.transaction().map_err(|e| e.to_string())?;
    // Two servers starting together: the second waits for the first's schema.
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(8067);
         CREATE TABLE IF NOT EXISTS pxed_schema (component text PRIMARY KEY, version integer NOT NULL)",
    )
    .map_err(|e| e.to_string())?;
    let row = tx
        .query_opt(
            "SELECT version FROM pxed_schema WHERE component = 'leases'",
            &[],
        )
        .map_err(|e| e.to_string())?;
    let have: i32 = row.map_or(0, |r| r.get(0));
    if have > SCHEMA_VERSION {
        return Err(format!(
            "the lease schema is version {have}, newer than this pxed's {SCHEMA_VERSION}: \
             a newer pxed migrated it; run that one (or newer) here too"
        ));
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        tx.batch_execute(sql)
            .map_err(|e| format!("migrating the lease schema to version {}: {e}", step + 1))?;
    }
    tx.execute(
        "INSERT INTO pxed_schema (component, version) VALUES ('leases', $1)
         ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
        &[&SCHEMA_VERSION],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
}

const COLUMNS: &str = "ip, client, mac, expires, state, hostname";

fn load(client: &mut Client) -> Result<Vec<Lease>, Failed> {
    let rows = client.query(&format!("SELECT {COLUMNS} FROM pxed_leases"), &[])?;
    rows.iter()
        .map(lease_of)
        .collect::<Result<_, _>>()
        .map_err(Failed::Error)
}

/// A row of `COLUMNS` as a lease.
fn lease_of(row: &postgres::Row) -> Result<Lease, String> {
    {
        {
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
    }
}

fn commit(client: &mut Client, ops: &[Op]) -> Result<(), Failed> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut tx = client.transaction()?;
    let upsert = tx.prepare(UPSERT)?;
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
                    // Its holder, for the engine to learn; dropping the
                    // transaction rolls the whole batch back.
                    let row = tx.query_one(
                        &format!("SELECT {COLUMNS} FROM pxed_leases WHERE ip = $1"),
                        &[&ip],
                    )?;
                    return Err(Failed::Taken(lease_of(&row)?));
                }
            }
            Op::Remove(ip) => {
                tx.execute("DELETE FROM pxed_leases WHERE ip = $1", &[&IpAddr::V4(*ip)])?;
            }
        }
    }
    Ok(tx.commit()?)
}

/// `url` with its password, if any, replaced by `***`.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
