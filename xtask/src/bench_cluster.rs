//! `cargo xtask bench-cluster`: DHCP with the leases on PostgreSQL.
//! perfdhcp, as a relay in a client namespace, against one pxed on its
//! embedded redb, one pxed on PostgreSQL, two pxed on one PostgreSQL (a
//! perfdhcp each, half the load each, distinct MACs: a relay's two helper
//! addresses split by client), and Kea 2.2 with its PostgreSQL lease
//! backend. Every PostgreSQL is the run's own (`initdb` in a temporary
//! directory, a Unix socket, `fsync` and `synchronous_commit` on), fresh
//! for each measurement. Two workloads: new clients (most exchanges a MAC
//! the server has not seen) and repeats (each MAC returns about 20 times).
//! Server CPU is the user + system time of the servers' processes and of
//! PostgreSQL's, beside the machine's busy time less perfdhcp's as a
//! cross-check. Writes docs/benchmarks/cluster.md (generated).

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _};
use pxe_lab::{
    cpu::{CpuMeter, CpuUsage, LoadGenerator},
    peers::Postgres,
    Lab, Netns,
};

use crate::{peers, workspace_root};

const SERVERS: [&str; 2] = ["198.18.0.1", "198.18.0.2"];
/// About 65,000 addresses: more than any workload's distinct clients.
const POOL_FIRST: &str = "198.18.1.0";
const POOL_LAST: &str = "198.18.254.254";

/// perfdhcp's offered load: (name, DORA/s, distinct clients, seconds).
const WORKLOADS: [(&str, u32, u32, u32); 2] = [
    ("new clients", 4_000, 60_000, 6),
    ("repeats", 20_000, 10_000, 10),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    PxedRedb,
    PxedPostgres,
    TwoPxedPostgres,
    KeaPostgres,
}

impl Setup {
    const ALL: [Setup; 4] = [
        Setup::PxedRedb,
        Setup::PxedPostgres,
        Setup::TwoPxedPostgres,
        Setup::KeaPostgres,
    ];

    fn label(self) -> &'static str {
        match self {
            Setup::PxedRedb => "pxed, redb (one server)",
            Setup::PxedPostgres => "pxed, PostgreSQL (one server)",
            Setup::TwoPxedPostgres => "2 × pxed, one PostgreSQL",
            Setup::KeaPostgres => "Kea 2.2, PostgreSQL (one server)",
        }
    }

    /// Its name for `--only`.
    fn key(self) -> &'static str {
        match self {
            Setup::PxedRedb => "redb",
            Setup::PxedPostgres => "postgres",
            Setup::TwoPxedPostgres => "two-postgres",
            Setup::KeaPostgres => "kea",
        }
    }

    fn servers(self) -> usize {
        if self == Setup::TwoPxedPostgres {
            2
        } else {
            1
        }
    }
}

struct Row {
    setup: Setup,
    workload: &'static str,
    /// DORA/s perfdhcp reached, summed over its instances.
    rate: f64,
    acks: u64,
    cpu: CpuUsage,
    /// CPU seconds of the DHCP servers' own processes, and of PostgreSQL's.
    daemons_s: f64,
    postgres_s: f64,
}

/// `only`: measure one setup (its rows only; no doc is written).
pub fn run(only: Option<&str>) -> anyhow::Result<()> {
    let only = match only {
        None => None,
        Some(name) => Some(
            Setup::ALL
                .into_iter()
                .find(|s| s.key() == name)
                .with_context(|| {
                    format!("--only {name}: one of redb, postgres, two-postgres, kea")
                })?,
        ),
    };
    let workspace = workspace_root();
    let (pxed, _bench) = crate::build_release_binaries()?;
    let work = std::env::temp_dir().join(format!("pxe-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut rows = Vec::new();
    for &(workload, rate, clients, seconds) in &WORKLOADS {
        for setup in Setup::ALL
            .into_iter()
            .filter(|s| only.is_none_or(|o| *s == o))
        {
            let row = measure(setup, &pxed, &work, (workload, rate, clients, seconds))
                .with_context(|| format!("{}, {workload}", setup.label()))?;
            eprintln!(
                "{}, {workload}: {:.0} DORA/s, {} ACKs; CPU: servers {:.2} s + PostgreSQL {:.2} s ({:.0} ACKs per CPU-s); machine less perfdhcp {:.2} s",
                setup.label(),
                row.rate,
                row.acks,
                row.daemons_s,
                row.postgres_s,
                per_cpu(&row),
                row.cpu.server_s
            );
            rows.push(row);
        }
    }
    if only.is_none() {
        let doc = workspace.join("docs/benchmarks/cluster.md");
        write_doc(&doc, &rows)?;
        eprintln!("wrote {}", doc.display());
    }
    if std::env::var_os("PXE_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// One setup, fresh (its own PostgreSQL, empty), under one workload.
fn measure(
    setup: Setup,
    pxed: &Path,
    work: &Path,
    (workload, rate, clients, seconds): (&'static str, u32, u32, u32),
) -> anyhow::Result<Row> {
    let run_dir = work.join(format!("{}-{}", workload.replace(' ', "-"), setup as u8));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let lab = Lab::new()?;
    let [srv_a, srv_b, cli_a, cli_b]: [Netns; 4] = lab
        .segment(&[
            ("srv-a", Some("198.18.0.1/16")),
            ("srv-b", Some("198.18.0.2/16")),
            ("cli-a", Some("198.18.255.254/16")),
            ("cli-b", Some("198.18.255.253/16")),
        ])?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the lab has four hosts"))?;
    let pg = match setup {
        Setup::PxedRedb => None,
        _ => Some(Postgres::start(run_dir.as_path()).context("starting PostgreSQL")?),
    };
    let range = format!("{POOL_FIRST}-{POOL_LAST}");
    let leases = run_dir.as_path().join("leases.redb");
    let mut pids = Vec::new();
    for (n, ns) in [&srv_a, &srv_b]
        .into_iter()
        .enumerate()
        .take(setup.servers())
    {
        let log = run_dir.as_path().join(format!("server-{n}.log"));
        let argv: Vec<String> = match setup {
            Setup::KeaPostgres => {
                let pg = pg.as_ref().expect("Kea's database");
                let config = kea_on_postgres(pg, run_dir.as_path())?;
                let dir = run_dir.as_path().display().to_string();
                vec![
                    "env".into(),
                    format!("KEA_PIDFILE_DIR={dir}"),
                    format!("KEA_LOCKFILE_DIR={dir}"),
                    "kea-dhcp4".into(),
                    "-c".into(),
                    config.display().to_string(),
                ]
            }
            _ => {
                let mut argv = vec![
                    pxed.display().to_string(),
                    "--interface".into(),
                    "eth0".into(),
                    "--dhcp".into(),
                    "full".into(),
                    "--range".into(),
                    range.clone(),
                    "--http-port".into(),
                    "0".into(),
                    "--inventory-file".into(),
                    run_dir
                        .as_path()
                        .join(format!("inventory-{n}.redb"))
                        .display()
                        .to_string(),
                ];
                match &pg {
                    Some(pg) => argv.extend(["--lease-store".into(), pg.url("postgres")]),
                    None => argv.extend(["--lease-file".into(), leases.display().to_string()]),
                }
                argv
            }
        };
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        pids.push(lab.spawn_logged(ns, &argv[0], &args, &log)?);
        if !ns.wait_for_udp_port(67, Duration::from_secs(30)) {
            bail!(
                "{} did not start listening on UDP 67:\n{}",
                argv[0],
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    // Peers must know each other before the load (their feeds, heartbeats).
    std::thread::sleep(Duration::from_secs(if setup.servers() > 1 { 3 } else { 1 }));

    let instances = setup.servers() as u32;
    let own_cpu = || -> f64 {
        pids.iter()
            .filter_map(|pid| pxe_lab::cpu::process_seconds(*pid).ok())
            .sum()
    };
    let (daemons_before, postgres_before) =
        (own_cpu(), pxe_lab::cpu::processes_named_seconds("postgres"));
    let meter = CpuMeter::start(LoadGenerator::WaitedChildren);
    let mut children = Vec::new();
    for (i, cli) in [&cli_a, &cli_b]
        .into_iter()
        .enumerate()
        .take(setup.servers())
    {
        // Distinct MACs per instance: perfdhcp varies the base's last bytes.
        let base = format!("mac=00:0c:{:02x}:00:00:00", 0x10 + i);
        let mut command: Command = cli.command(
            "perfdhcp",
            &[
                "-4",
                "-g",
                "single",
                "-l",
                "eth0",
                "-b",
                &base,
                "-r",
                &(rate / instances).to_string(),
                "-R",
                &(clients / instances).to_string(),
                "-p",
                &seconds.to_string(),
                SERVERS[i],
            ],
        );
        children.push(command.output_async()?);
    }
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(child.wait_with_output()?);
    }
    let cpu = meter.stop();
    let daemons_s = own_cpu() - daemons_before;
    // A PostgreSQL of an earlier row ending meanwhile must not count negative.
    let postgres_s = (pxe_lab::cpu::processes_named_seconds("postgres") - postgres_before).max(0.0);
    let (mut total_rate, mut acks) = (0.0, 0);
    for (i, out) in outputs.iter().enumerate() {
        let text = String::from_utf8_lossy(&out.stdout);
        let rate: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Rate: "))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| {
                format!(
                    "perfdhcp {i} reported no rate ({}):\n{text}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        total_rate += rate;
        // The last "received packets" is the REQUEST→ACK exchange's.
        acks += text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("received packets: "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    drop(lab);
    drop(pg);
    report_warnings(&run_dir, setup.servers());
    if std::env::var_os("PXE_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(Row {
        setup,
        workload,
        rate: total_rate,
        acks,
        cpu,
        daemons_s,
        postgres_s,
    })
}

/// What the servers warned about during the run, counted by message.
fn report_warnings(run_dir: &Path, servers: usize) {
    for n in 0..servers {
        let log =
            std::fs::read_to_string(run_dir.join(format!("server-{n}.log"))).unwrap_or_default();
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for line in log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        {
            // Drop the timestamp; keep what was said, its numbers as #.
            let said = line.split_once(' ').map_or(line, |(_, rest)| rest.trim());
            let said: String = said
                .chars()
                .take(160)
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect();
            *counts.entry(said).or_default() += 1;
        }
        for (said, count) in counts {
            eprintln!("  server {n} warned {count}×: {said}");
        }
    }
}

/// A child started with its output captured.
trait OutputAsync {
    fn output_async(&mut self) -> std::io::Result<std::process::Child>;
}

impl OutputAsync for Command {
    fn output_async(&mut self) -> std::io::Result<std::process::Child> {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    }
}

/// Kea's database (its own schema script) and a config pointing at it;
/// multi-threaded, as Kea advises for a database backend.
fn kea_on_postgres(pg: &Postgres, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    pg.psql("postgres", "CREATE DATABASE kea")?;
    pg.psql_file(
        "kea",
        Path::new("/usr/share/kea/scripts/pgsql/dhcpdb_create.pgsql"),
    )
    .context("Kea's PostgreSQL schema (package kea-admin)")?;
    let (socket, port) = pg.socket();
    let config = dir.join("kea-dhcp4.json");
    let dir = dir.display();
    let socket = socket.display();
    std::fs::write(
        &config,
        format!(
            r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["eth0"]}},
  "lease-database": {{"type": "postgresql", "name": "kea", "user": "postgres", "host": "{socket}", "port": {port}}},
  "multi-threading": {{"enable-multi-threading": true, "thread-pool-size": 4, "packet-queue-size": 64}},
  "valid-lifetime": 3600,
  "subnet4": [{{"subnet": "198.18.0.0/16", "pools": [{{"pool": "{POOL_FIRST} - {POOL_LAST}"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "{dir}/kea.log"}}], "severity": "WARN"}}]
}}}}"#
        ),
    )?;
    Ok(config)
}

/// The servers' own CPU and PostgreSQL's, the measure the table compares.
fn server_cpu(row: &Row) -> f64 {
    row.daemons_s + row.postgres_s
}

/// ACKs per CPU-second of the servers and PostgreSQL (n/a under a
/// measurable floor).
fn per_cpu(row: &Row) -> f64 {
    if server_cpu(row) < 0.05 {
        return f64::NAN;
    }
    row.acks as f64 / server_cpu(row)
}

fn write_doc(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut doc = String::new();
    writeln!(doc, "# DHCP with the leases on PostgreSQL\n")?;
    writeln!(
        doc,
        "Generated by `cargo xtask bench-cluster` (pxed at {}; kea-dhcp4 {}; postgresql {}; kernel {}; {} CPUs). \
         perfdhcp relays from client namespaces; every PostgreSQL is the run's own, fresh per row, \
         with `fsync` and `synchronous_commit` on. With two pxed, a perfdhcp per server offers half \
         the load with its own MACs; both share one pool.\n\n\
         **Server CPU** is the user + system time of the DHCP servers' processes and of every \
         PostgreSQL process during the load: what the ratio to Kea compares. Beside it, the \
         machine's busy time less perfdhcp's, which also holds softirq work (on a veth much of it \
         is charged to the sender, perfdhcp) and is the difference of two large, separately \
         sampled numbers: a cross-check, noisy when perfdhcp keeps a core busy.\n",
        crate::git_revision(),
        peers::package_version("kea-dhcp4-server"),
        peers::package_version("postgresql"),
        crate::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )?;
    for &(workload, rate, clients, seconds) in &WORKLOADS {
        writeln!(
            doc,
            "## {workload}: `perfdhcp -r {rate} -R {clients} -p {seconds}`\n"
        )?;
        writeln!(
            doc,
            "| setup | DORA/s | ACKs | server CPU s: servers + PostgreSQL | ACKs per server CPU-s | vs Kea | machine less perfdhcp, s |"
        )?;
        writeln!(doc, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        let kea = rows
            .iter()
            .find(|r| r.workload == workload && r.setup == Setup::KeaPostgres)
            .map(per_cpu);
        for row in rows.iter().filter(|r| r.workload == workload) {
            let ratio = match kea {
                Some(k) if k.is_finite() && k > 0.0 && per_cpu(row).is_finite() => {
                    format!("{:.1}×", per_cpu(row) / k)
                }
                _ => "n/a".into(),
            };
            let efficiency = if per_cpu(row).is_finite() {
                format!("{:.0}", per_cpu(row))
            } else {
                "n/a".into()
            };
            writeln!(
                doc,
                "| {} | {:.0} | {} | {:.2} + {:.2} | {efficiency} | {ratio} | {:.2} |",
                row.setup.label(),
                row.rate,
                row.acks,
                row.daemons_s,
                row.postgres_s,
                row.cpu.server_s,
            )?;
        }
        writeln!(doc)?;
    }
    std::fs::write(path, doc)?;
    Ok(())
}
