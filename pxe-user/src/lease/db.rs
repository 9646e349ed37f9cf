//! One PostgreSQL connection shared by the stores on it (leases, the
//! inventory), on a thread of its own: the `postgres` crate drives its
//! connection on a runtime of its own, which must not nest in the daemon's,
//! so every call is handed to that thread and waited for. A lost connection
//! is made again on the next call, and said so in the log.
//!
//! Each store's schema is versioned in `pxed_schema` (one row per
//! component) and migrated at open, one server at a time.

use std::sync::mpsc;

use postgres::{Client, NoTls};
use tracing::{info, warn};

use super::Lease;

/// Why a call failed.
pub enum Failed {
    /// Other clients hold these addresses: the batch was rolled back.
    Taken(Vec<Lease>),
    Error(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Taken(leases) => write!(f, "{} addresses held by other clients", leases.len()),
            Self::Error(e) => f.write_str(e),
        }
    }
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

/// A call, run on the connection's thread with the connection (or why
/// there is none).
type Job = Box<dyn FnOnce(Result<&mut Client, String>) + Send>;

#[derive(Clone)]
pub struct Db {
    /// The URL as logs and errors show it: no password.
    shown: String,
    jobs: mpsc::Sender<Job>,
}

impl Db {
    /// Connects, creates or migrates `component`'s schema (`migrations`, in
    /// order: its version is how many have run), and starts the
    /// connection's thread. Errors are (the URL shown, why).
    pub fn open(url: &str, component: &str, migrations: &[&str]) -> Result<Self, (String, String)> {
        let shown = without_password(url);
        let mut client = connect(url).map_err(|e| (shown.clone(), e))?;
        migrate(&mut client, component, migrations).map_err(|e| (shown.clone(), e))?;
        let (jobs, inbox) = mpsc::channel();
        let (url, thread_shown) = (url.to_owned(), shown.clone());
        std::thread::Builder::new()
            .name("pxed-postgres".into())
            .spawn(move || serve(&url, &thread_shown, client, &inbox))
            .map_err(|e| (shown.clone(), format!("starting the database thread: {e}")))?;
        Ok(Self { shown, jobs })
    }

    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Runs `job` on the connection and waits for its answer.
    pub fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Client) -> Result<T, Failed> + Send + 'static,
    ) -> Result<T, Failed> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let result = match client {
                Ok(client) => job(client),
                Err(e) => Err(Failed::Error(format!("cannot reach the database: {e}"))),
            };
            let _ = reply.send(result);
        });
        let gone = || Failed::Error("the database thread is gone".to_owned());
        self.jobs.send(job).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// The connection's thread: one call at a time, connecting again after a loss.
fn serve(url: &str, shown: &str, client: Client, inbox: &mpsc::Receiver<Job>) {
    let mut client = Some(client);
    let mut lost = false;
    for job in inbox {
        if client.as_ref().is_none_or(Client::is_closed) {
            match connect(url) {
                Ok(c) => {
                    if lost {
                        info!(database = %shown, "database reachable again");
                        lost = false;
                    }
                    client = Some(c);
                }
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        job(Ok(c));
        if c.is_closed() {
            warn!(database = %shown, "database connection lost; connecting again on the next call");
            lost = true;
            client = None;
        }
    }
}

pub(crate) fn connect(url: &str) -> Result<Client, String> {
    let mut client = Client::connect(url, NoTls).map_err(|e| e.to_string())?;
    // Durable on the server when COMMIT returns, whatever the server's default.
    client
        .batch_execute("SET synchronous_commit = on")
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// Creates or migrates `component`'s schema, one server at a time.
pub(crate) fn migrate(
    client: &mut Client,
    component: &str,
    migrations: &[&str],
) -> Result<(), String> {
    let latest = migrations.len() as i32;
    let mut tx = client.transaction().map_err(|e| e.to_string())?;
    // Two servers starting together: the second waits for the first's schema.
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(8067);
         CREATE TABLE IF NOT EXISTS pxed_schema (component text PRIMARY KEY, version integer NOT NULL)",
    )
    .map_err(|e| e.to_string())?;
    let row = tx
        .query_opt(
            "SELECT version FROM pxed_schema WHERE component = $1",
            &[&component],
        )
        .map_err(|e| e.to_string())?;
    let have: i32 = row.map_or(0, |r| r.get(0));
    if have > latest {
        return Err(format!(
            "the {component} schema is version {have}, newer than this pxed's {latest}: \
             a newer pxed migrated it; run that one (or newer) here too"
        ));
    }
    for (step, sql) in migrations.iter().enumerate().skip(have as usize) {
        tx.batch_execute(sql).map_err(|e| {
            format!(
                "migrating the {component} schema to version {}: {e}",
                step + 1
            )
        })?;
    }
    tx.execute(
        "INSERT INTO pxed_schema (component, version) VALUES ($1, $2)
         ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
        &[&component, &latest],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())
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
