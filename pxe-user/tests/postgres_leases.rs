//! Leases and the inventory on a real PostgreSQL the test starts itself
//! (`initdb` in a temporary directory, a Unix socket only): they survive
//! reopening, the
//! database refuses a second holder of an address, a schema newer than the
//! binary is refused, an unreachable database is a clear error with the
//! password hidden, and a database stopped and started again is written to
//! again without a restart. Needs root (the server runs as `postgres`).

use std::net::Ipv4Addr;

use pxe_lab::peers::Postgres;
use pxe_user::{
    inventory::{InventoryStore, MachineRecord, PostgresInventoryStore, ProfileRecord},
    lease::{Lease, LeaseState, LeaseStore, PostgresLeaseStore},
    policy::Mac,
};

fn lease(last: u8, client: u8, expires: u64) -> Lease {
    Lease {
        ip: Ipv4Addr::new(198, 18, 0, last),
        client: vec![0, 2, 0, 0, 0, 0, client],
        mac: [2, 0, 0, 0, 0, client],
        expires,
        state: LeaseState::Active,
        hostname: Some(format!("n{client}")),
    }
}

fn far_future() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn server() -> Option<(tempfile::TempDir, Postgres)> {
    if !pxe_lab::privileged("postgres_leases") || !pxe_lab::have_file("/usr/bin/psql", "postgresql")
    {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).unwrap();
    Some((dir, pg))
}

#[test]
fn leases_survive_reopening_and_the_database_refuses_a_second_holder() {
    let Some((_dir, pg)) = server() else { return };
    let url = pg.url("postgres");
    let until = far_future();
    {
        let mut store = PostgresLeaseStore::open(&url, "test").unwrap();
        for i in 1..=20 {
            store.put(&lease(i, i, until)).unwrap();
        }
        store.commit().unwrap();
        store.remove(Ipv4Addr::new(198, 18, 0, 7)).unwrap();
        store.commit().unwrap();
        store.put(&lease(99, 99, until)).unwrap(); // never committed
    }
    let mut first = PostgresLeaseStore::open(&url, "test").unwrap();
    let all = first.load_all().unwrap();
    assert_eq!(all.len(), 19, "{all:?}");
    assert!(all.contains(&lease(20, 20, until)));

    // A second server, whose memory does not know of .5's lease, writes it
    // for another client: refused, and nothing of its batch counts.
    let mut second = PostgresLeaseStore::open(&url, "test").unwrap();
    second.put(&lease(30, 30, until)).unwrap();
    second.put(&lease(5, 77, until)).unwrap();
    let err = second.commit().unwrap_err().to_string();
    assert!(
        err.contains("198.18.0.5 is held by another client"),
        "{err}"
    );
    let holders = pg
        .psql(
            "postgres",
            "SELECT host(ip), mac FROM pxed_leases WHERE ip IN ('198.18.0.5', '198.18.0.30') ORDER BY ip",
        )
        .unwrap();
    assert_eq!(holders.trim(), "198.18.0.5|02:00:00:00:00:05");
    // The holder renews; a lease that expired is anyone's.
    first.put(&lease(5, 5, until + 60)).unwrap();
    first.commit().unwrap();
    first.put(&lease(6, 6, 1)).unwrap();
    first.commit().unwrap();
    second.put(&lease(6, 66, until)).unwrap();
    second.commit().unwrap();
    let twice = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM (SELECT ip FROM pxed_leases GROUP BY ip HAVING count(DISTINCT mac) > 1) t",
        )
        .unwrap();
    assert_eq!(twice.trim(), "0");
}

#[test]
fn the_inventory_beside_the_leases_is_one_transaction_a_write_and_survives_reopening() {
    let Some((_dir, pg)) = server() else { return };
    let url = pg.url("postgres");
    let leases = PostgresLeaseStore::open(&url, "test").unwrap();
    let mut store = PostgresInventoryStore::open(&url, Default::default()).unwrap();
    let (a, b) = (Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 2]));
    let mut machine = MachineRecord::new(a);
    machine.profile = Some("installer".into());
    store
        .write(
            &[machine.clone(), MachineRecord::new(b)],
            &[],
            &[ProfileRecord::named("installer")],
        )
        .unwrap();
    store.write(&[], &[b], &[]).unwrap();
    drop(store);
    let (machines, profiles) = PostgresInventoryStore::open(&url, Default::default())
        .unwrap()
        .load_all()
        .unwrap();
    assert_eq!(machines, vec![machine]);
    assert_eq!(profiles, vec![ProfileRecord::named("installer")]);
    assert!(
        leases.load_all().unwrap().is_empty(),
        "the two schemas live side by side"
    );
    let versions = pg
        .psql(
            "postgres",
            "SELECT component, version FROM pxed_schema ORDER BY component",
        )
        .unwrap();
    assert_eq!(versions.trim(), "inventory|1\nleases|1");
}

#[test]
fn a_newer_schema_and_an_unreachable_database_are_clear_errors() {
    let Some((_dir, pg)) = server() else { return };
    let url = pg.url("postgres");
    drop(PostgresLeaseStore::open(&url, "test").unwrap());
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT version FROM pxed_schema WHERE component = 'leases'"
        )
        .unwrap()
        .trim(),
        "1"
    );
    pg.psql("postgres", "UPDATE pxed_schema SET version = 99")
        .unwrap();
    let err = PostgresLeaseStore::open(&url, "test")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("version 99, newer than this pxed's 1"),
        "{err}"
    );

    let err = PostgresLeaseStore::open(
        "postgres://pxed:s3cret@%2Fnonexistent%2Fdir:5432/pxed",
        "test",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("postgres://pxed:***@"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_database_stopped_and_started_again_is_written_to_again_without_a_restart() {
    let Some((_dir, pg)) = server() else { return };
    let mut store = PostgresLeaseStore::open(&pg.url("postgres"), "test").unwrap();
    let until = far_future();
    store.put(&lease(1, 1, until)).unwrap();
    store.commit().unwrap();
    pg.stop().unwrap();
    store.put(&lease(2, 2, until)).unwrap();
    assert!(
        store.commit().is_err(),
        "no commit while the database is down"
    );
    store.put(&lease(3, 3, until)).unwrap();
    assert!(store.commit().is_err());
    pg.start_again().unwrap();
    store.put(&lease(4, 4, until)).unwrap();
    store.commit().expect("connected again by itself");
    let ips: Vec<Ipv4Addr> = store.load_all().unwrap().iter().map(|l| l.ip).collect();
    assert_eq!(
        ips.len(),
        2,
        "the lease before and the one after, none of those refused: {ips:?}"
    );
}

mod common;

use std::time::Duration;

use common::{have_tool, serve_tftp, start_udhcpc, udhcpc_lease};

const TOKEN: &str = "postgres-test-token-0123456789";

/// `GET http://198.18.0.1:8067{path}` with the token, from `ns`: status and
/// body. From the server's namespace: udhcpc reconfigures the client's.
fn api_get(ns: &pxe_lab::Netns, path: &str) -> (u16, String) {
    let out = ns
        .output(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
                "-w",
                "\n%{http_code}",
                &format!("http://198.18.0.1:8067{path}"),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// pxed in full mode on PostgreSQL: udhcpc's lease is in the database; with
/// the database stopped a renewal is not answered (it could not be stored)
/// and the log, the metrics and the API's health say why; started again,
/// the next renewal is ACKed, with no restart of pxed.
#[test]
fn pxed_leases_into_postgres_and_rides_out_the_database_stopping() {
    let Some((dir, pg)) = server() else { return };
    if !have_tool("busybox", "busybox") || !have_tool("curl", "curl") {
        return;
    }
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let inventory = dir.path().join("inventory.redb");
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ipxe.efi"), b"ipxe").unwrap();
    let url = pg.url("postgres");
    let served = serve_tftp(
        root.path(),
        &[
            "--xdp-mode",
            "off",
            "--no-tc",
            "--dhcp",
            "full",
            "--range",
            "198.18.0.100-198.18.0.199",
            "--lease-store",
            &url,
            "--lease-time",
            "120",
            "--api",
            "198.18.0.1:8067",
            "--api-token-file",
            token.to_str().unwrap(),
            "--inventory-file",
            inventory.to_str().unwrap(),
        ],
    );
    assert!(
        served
            .server
            .wait_for_tcp_port(8067, Duration::from_secs(20)),
        "{}",
        served.log()
    );
    let work = tempfile::tempdir().unwrap();
    let (pid, out) = start_udhcpc(&served, work.path());
    let ip = udhcpc_lease(&out);
    let rows = pg
        .psql("postgres", "SELECT host(ip), state FROM pxed_leases")
        .unwrap();
    assert_eq!(rows.trim(), format!("{ip}|active"), "{}", served.log());
    // The API's machines live beside the leases.
    let put = served
        .server
        .output(
            "curl",
            &[
                "-sS",
                "--fail-with-body",
                "-X",
                "PUT",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                r#"{"netboot": false}"#,
                "http://198.18.0.1:8067/api/v1/machines/52:54:00:12:34:56",
            ],
        )
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stdout)
    );
    let record = pg
        .psql(
            "postgres",
            "SELECT mac, record->>'netboot' FROM pxed_machines",
        )
        .unwrap();
    assert_eq!(record.trim(), "52:54:00:12:34:56|false");

    // The database goes away: a renewal cannot be stored, so it is not ACKed.
    pg.stop().unwrap();
    let renew = || {
        // SAFETY: signals the udhcpc this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    };
    renew();
    served.wait_for_log(
        "lease store failing, requests that need a write go unanswered",
        Duration::from_secs(15),
    );
    let (status, health) = api_get(&served.server, "/api/v1/health");
    assert_eq!(status, 503, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["checks"]["lease_store"]["ok"], false, "{health}");
    let why = health["checks"]["lease_store"]["why"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("postgres://postgres@"),
        "names the database: {health}"
    );
    let (_, metrics) = api_get(&served.server, "/metrics");
    assert!(metrics.contains("pxed_lease_store_healthy 0"), "{metrics}");
    let acked_before = served.log().matches("→ ACK").count();

    // Back: the client's next request (a renewal, or after so many
    // unanswered ones a new DISCOVER) is stored and ACKed; pxed was never
    // restarted.
    pg.start_again().unwrap();
    renew();
    served.wait_for_log("database reachable again", Duration::from_secs(15));
    served.wait_for_log_count("→ ACK", acked_before + 1, Duration::from_secs(30));
    let (status, health) = api_get(&served.server, "/api/v1/health");
    assert_eq!(status, 200, "{health}");
    let rows = pg
        .psql("postgres", "SELECT count(*) FROM pxed_leases")
        .unwrap();
    assert_eq!(rows.trim(), "1", "one lease, renewed in place");
}
