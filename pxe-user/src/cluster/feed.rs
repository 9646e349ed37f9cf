//! The change feed: a connection of its own that LISTENs on the shared
//! database, re-reads what other servers wrote and hands it to [`Control`],
//! confirms API changes, and keeps this server's heartbeat (the
//! `pxed_servers` table) so the others know whom to wait for.
//!
//! After every (re)connection everything is read again, since changes made
//! while nobody listened were announced to nobody.

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use postgres::{Client, Notification};
use tracing::{debug, info, warn};

use super::{Applied, Change, Cluster, Peer, APPLIED, CHANGES, LIVE_WITHIN_SECS};
use crate::{
    control::Control,
    dhcp::engine::FeedRecord,
    inventory::store as inventory_store,
    lease::Lease,
    lease::{db, postgres_store},
    policy::Mac,
};

/// Every step of the cluster's schema, in order (see `lease::db`).
const MIGRATIONS: [&str; 1] = ["CREATE TABLE pxed_servers (
        id text PRIMARY KEY,
        name text NOT NULL,
        seen timestamptz NOT NULL
    )"];

const HEARTBEAT: Duration = Duration::from_secs(1);
/// Notifications applied together, at most.
const BATCH: usize = 512;

/// Connects (so a bad URL or schema fails the start, not later), then
/// runs the feed on a thread of its own for the life of the process.
pub fn start(url: &str, cluster: Arc<Cluster>, control: Arc<Control>) -> Result<(), String> {
    let shown = db::without_password(url);
    let mut client = connect(url).map_err(|e| format!("{shown}: {e}"))?;
    db::migrate(&mut client, "cluster", &MIGRATIONS).map_err(|e| format!("{shown}: {e}"))?;
    info!(server = %cluster.id(), name = %cluster.name(), database = %shown, "cluster: sharing leases and the inventory with the other servers on this database");
    let url = url.to_owned();
    std::thread::Builder::new()
        .name("pxed-feed".into())
        .spawn(move || run(&url, &shown, client, &cluster, &control))
        .map_err(|e| format!("starting the change feed: {e}"))?;
    Ok(())
}

fn run(url: &str, shown: &str, first: Client, cluster: &Cluster, control: &Control) {
    let mut client = Some(first);
    let mut lost_since: Option<Instant> = None;
    loop {
        let c = match client.take() {
            Some(c) => c,
            None => match connect(url) {
                Ok(c) => c,
                Err(e) => {
                    if lost_since.is_none() {
                        warn!(database = %shown, "cluster: change feed cannot connect ({e}); retrying every second");
                        lost_since = Some(Instant::now());
                    }
                    std::thread::sleep(HEARTBEAT);
                    continue;
                }
            },
        };
        if let Some(since) = lost_since.take() {
            info!(database = %shown, after_s = since.elapsed().as_secs(), "cluster: change feed connected again; everything read afresh");
        }
        let e = session(c, cluster, control);
        warn!(database = %shown, "cluster: change feed lost ({e}); other servers' changes reach memory again once it reconnects");
        lost_since = Some(Instant::now());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One connection's life: listen, read everything, then follow the feed.
fn session(mut client: Client, cluster: &Cluster, control: &Control) -> postgres::Error {
    let result = (|| -> Result<(), postgres::Error> {
        client.batch_execute(&format!("LISTEN {CHANGES}; LISTEN {APPLIED}"))?;
        heartbeat(&mut client, cluster)?;
        resync(&mut client, control);
        let mut last_beat = Instant::now();
        loop {
            let notes = drain(&mut client)?;
            apply(&mut client, cluster, control, &notes)?;
            if last_beat.elapsed() >= HEARTBEAT {
                heartbeat(&mut client, cluster)?;
                last_beat = Instant::now();
            }
        }
    })();
    result.expect_err("the feed loops until its connection fails")
}

/// The feed's connection. A read that takes longer than this is given up:
/// a resync reads with the DHCP engine held.
fn connect(url: &str) -> Result<Client, String> {
    let mut client = db::connect(url)?;
    client
        .batch_execute("SET statement_timeout = '5s'")
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// The notifications that arrived, waiting up to a heartbeat for the first.
fn drain(client: &mut Client) -> Result<Vec<Notification>, postgres::Error> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut notes = Vec::new();
    let mut notifications = client.notifications();
    if let Some(first) = notifications.timeout_iter(HEARTBEAT).next()? {
        notes.push(first);
    }
    // Whatever else is queued already, without waiting.
    let mut queued = notifications.iter();
    while notes.len() < BATCH {
        match queued.next()? {
            Some(n) => notes.push(n),
            None => break,
        }
    }
    Ok(notes)
}

fn apply(
    client: &mut Client,
    cluster: &Cluster,
    control: &Control,
    notes: &[Notification],
) -> Result<(), postgres::Error> {
    let mut leases: Vec<FeedRecord> = Vec::new();
    // Records too large for a notification, sent by address: read here.
    let mut unsent: Vec<Ipv4Addr> = Vec::new();
    let mut machines: Vec<String> = Vec::new();
    let mut profiles: Vec<String> = Vec::new();
    let mut to_confirm: Vec<(String, u64)> = Vec::new();
    for note in notes {
        match note.channel() {
            CHANGES => match serde_json::from_str::<Change>(note.payload()) {
                Ok(c) if c.server == cluster.id() => {
                    leases.extend(c.leases.into_iter().map(|w| FeedRecord::Own(w.ip)));
                }
                Ok(c) => {
                    for w in c.leases {
                        if w.unsent {
                            unsent.push(w.ip);
                        }
                        leases.push(FeedRecord::Peer(w.ip, w.lease));
                    }
                    machines.extend(c.machines);
                    profiles.extend(c.profiles);
                    if c.change != 0 {
                        to_confirm.push((c.server, c.change));
                    }
                }
                Err(e) => warn!(
                    "cluster: an unreadable change notification ({e}): {}",
                    note.payload()
                ),
            },
            APPLIED => match serde_json::from_str::<Applied>(note.payload()) {
                Ok(a) if a.origin == cluster.id() => cluster.confirm(a.change, &a.server),
                Ok(_) => {}
                Err(e) => warn!(
                    "cluster: an unreadable confirmation ({e}): {}",
                    note.payload()
                ),
            },
            _ => {}
        }
    }
    if !unsent.is_empty() {
        let rows = read_leases(client, &unsent)?;
        for record in &mut leases {
            if let FeedRecord::Peer(ip, lease) = record {
                if let Some(row) = rows.get(ip) {
                    lease.clone_from(row);
                }
            }
        }
    }
    if !leases.is_empty() {
        debug!(
            records = leases.len(),
            "cluster: lease records from the feed"
        );
        control.follow_lease_feed(leases);
    }
    if !machines.is_empty() || !profiles.is_empty() {
        machines.sort();
        machines.dedup();
        profiles.sort();
        profiles.dedup();
        let mut read_failed = None;
        control.absorb_peer_inventory(|| match read_inventory(client, &machines, &profiles) {
            Ok(records) => Some(records),
            Err(e) => {
                read_failed = Some(e);
                None
            }
        });
        if let Some(e) = read_failed {
            return Err(e);
        }
        info!(
            machines = machines.len(),
            profiles = profiles.len(),
            "cluster: inventory changed through another server's API; applied"
        );
    }
    to_confirm.sort();
    to_confirm.dedup();
    for (origin, change) in to_confirm {
        let applied = serde_json::to_string(&Applied {
            server: cluster.id().to_owned(),
            origin,
            change,
        })
        .expect("a confirmation serialises");
        client.execute("SELECT pg_notify($1, $2)", &[&APPLIED, &applied])?;
    }
    Ok(())
}

/// The rows of these addresses now (absent: removed).
fn read_leases(
    client: &mut Client,
    ips: &[Ipv4Addr],
) -> Result<std::collections::HashMap<Ipv4Addr, Option<Lease>>, postgres::Error> {
    let wanted: Vec<std::net::IpAddr> = ips.iter().map(|ip| std::net::IpAddr::V4(*ip)).collect();
    let rows = client.query(
        &format!(
            "SELECT {} FROM pxed_leases WHERE ip = ANY($1)",
            postgres_store::COLUMNS
        ),
        &[&wanted],
    )?;
    let mut found: std::collections::HashMap<Ipv4Addr, Option<Lease>> =
        ips.iter().map(|ip| (*ip, None)).collect();
    for row in &rows {
        match postgres_store::lease_of(row) {
            Ok(lease) => drop(found.insert(lease.ip, Some(lease))),
            Err(e) => warn!("cluster: {e}"),
        }
    }
    Ok(found)
}

type MachineRows = Vec<(Mac, Option<crate::inventory::MachineRecord>)>;
type ProfileRows = Vec<(String, Option<crate::inventory::ProfileRecord>)>;

fn read_inventory(
    client: &mut Client,
    machines: &[String],
    profiles: &[String],
) -> Result<(MachineRows, ProfileRows), postgres::Error> {
    let m = inventory_store::read_machines(client, machines)?;
    let p = inventory_store::read_profiles(client, profiles)?;
    Ok((m, p))
}

/// Everything from the database, replacing memory's.
fn resync(client: &mut Client, control: &Control) {
    control.resync_leases(|| {
        postgres_store::load(client)
            .map_err(|e| warn!("cluster: reading the leases again: {e}"))
            .ok()
    });
    control.resync_inventory(|| {
        inventory_store::load_pg(client)
            .map_err(|e| warn!("cluster: reading the inventory again: {e}"))
            .ok()
    });
}

/// Says this server is alive, forgets servers gone for an hour, and
/// learns which others are live.
fn heartbeat(client: &mut Client, cluster: &Cluster) -> Result<(), postgres::Error> {
    client.execute(
        "INSERT INTO pxed_servers (id, name, seen) VALUES ($1, $2, now())
         ON CONFLICT (id) DO UPDATE SET seen = now()",
        &[&cluster.id(), &cluster.name()],
    )?;
    client.execute(
        "DELETE FROM pxed_servers WHERE seen < now() - interval '1 hour'",
        &[],
    )?;
    let live = client.query(
        &format!(
            "SELECT id, name FROM pxed_servers
             WHERE id <> $1 AND seen > now() - interval '{LIVE_WITHIN_SECS} seconds'"
        ),
        &[&cluster.id()],
    )?;
    let peers: Vec<Peer> = live
        .iter()
        .map(|r| Peer {
            id: r.get(0),
            name: r.get(1),
        })
        .collect();
    if peers != cluster.peers() {
        info!(peers = ?peers.iter().map(|p| &p.name).collect::<Vec<_>>(), "cluster: the live servers on this database changed");
    }
    cluster.set_peers(peers);
    Ok(())
}
