//! `cargo xtask bench`: whole boots (DHCP, then the boot program over TFTP)
//! of N simulated UEFI machines against pxed in its modes and against the
//! peers an operator would otherwise run: dnsmasq (DHCP and TFTP in one), and
//! Kea with tftpd-hpa. Each server runs alone in a fresh namespace pair with
//! the same boot root (Debian's ipxe.efi); the same `bench pxe` runs in the
//! client namespace. Writes docs/benchmarks/pxe.md (generated).

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{bail, Context as _};
use pxe_lab::{peers::Dnsmasq, Lab, Netns};

use crate::{peers, workspace_root};

pub const SERVER: &str = "198.18.0.1";
/// A /16, so 10,000 machines have addresses to spare.
const SERVER_CIDR: &str = "198.18.0.1/16";
const CLIENT_CIDR: &str = "198.18.255.254/16";
/// The client namespace's address (a relay's, for perfdhcp).
pub const CLIENT: &str = "198.18.255.254";
/// About 65,000 addresses: more than any benchmark's distinct machines
/// (`bench-dhcp`'s new-machine loads draw from 60,000 MACs).
const POOL_FIRST: &str = "198.18.1.0";
const POOL_LAST: &str = "198.18.254.254";
/// The boot program every machine downloads: what a real UEFI rack fetches.
pub const NBP: &str = "ipxe.efi";

pub struct Server {
    pub name: &'static str,
    /// Programs to start in the server namespace, in order, each waited for
    /// on the UDP port given.
    pub programs: Vec<(Vec<String>, u16)>,
}

struct Row {
    server: &'static str,
    report: serde_json::Value,
}

pub fn run(clients: &[usize], only: Option<&str>) -> anyhow::Result<()> {
    let workspace = workspace_root();
    let (pxed, bench) = crate::build_release_binaries()?;
    let tftpd = peers::tftpd_hpa(&workspace)?;
    let work = std::env::temp_dir().join(format!("pxe-bench-pxe-{}", std::process::id()));
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::copy(Path::new("/usr/lib/ipxe").join(NBP), root.join(NBP))
        .context("copying Debian's ipxe.efi (package ipxe)")?;
    let mut servers = servers(&pxed, &tftpd, &root, &work)?;
    if let Some(only) = only {
        servers.retain(|s| s.name.to_lowercase().contains(&only.to_lowercase()));
        if servers.is_empty() {
            bail!("--only {only}: no server by that name");
        }
    }

    let mut rows = Vec::new();
    for &n in clients {
        for server in &servers {
            let report = measure(server, &bench, &root, n, &work)?;
            eprintln!(
                "{}, {n} machines: {} booted, {} failed, {:.1} s",
                server.name,
                report["booted"],
                report["failed"],
                report["seconds"].as_f64().unwrap_or(0.0)
            );
            rows.push(Row {
                server: server.name,
                report,
            });
        }
    }
    let doc = workspace.join("docs/benchmarks/pxe.md");
    write_doc(&doc, &rows, clients, only)?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

pub fn servers(pxed: &Path, tftpd: &Path, root: &Path, work: &Path) -> anyhow::Result<Vec<Server>> {
    let root_s = root.display().to_string();
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<String>>();
    let pxed_full = |extra: &[&str]| {
        let leases = work.join("pxed-leases.redb").display().to_string();
        let range = format!("{POOL_FIRST}-{POOL_LAST}");
        let mut argv = s(&[
            &pxed.display().to_string(),
            "--interface",
            "eth0",
            "--boot-root",
            &root_s,
            "--dhcp",
            "full",
            "--range",
            &range,
            "--lease-file",
            &leases,
            "--tftp-max-per-client",
            "100000",
            // One address for every simulated machine: no per-source budget.
            "--admit-tftp-per-source",
            "0",
            "--http-port",
            "0",
        ]);
        argv.extend(s(extra));
        argv
    };
    let dnsmasq_dhcp = |extra: &[&str]| {
        let leases = work.join("dnsmasq.leases");
        let dnsmasq = Dnsmasq::new()
            .interface("eth0")
            .no_ping()
            .dhcp_range(&format!("{POOL_FIRST},{POOL_LAST},255.255.0.0,1h"))
            .lease_file(&leases)
            .arg("--dhcp-lease-max=100000");
        let mut argv = s(&["dnsmasq"]);
        argv.extend(dnsmasq.args().iter().cloned());
        argv.extend(s(extra));
        argv
    };
    let kea_config = work.join("kea-dhcp4.json");
    std::fs::write(&kea_config, kea_config_json(work)).context("writing Kea's config")?;
    let work_s = work.display().to_string();
    Ok(vec![
        Server {
            name: "pxed full, kernel tiers",
            programs: vec![(pxed_full(&["--fastpath-memory", "16"]), 67)],
        },
        Server {
            name: "pxed full, userspace",
            programs: vec![(pxed_full(&["--xdp-mode", "off", "--no-tc"]), 67)],
        },
        Server {
            name: "pxed proxy + dnsmasq DHCP",
            programs: vec![
                (dnsmasq_dhcp(&[]), 67),
                (
                    s(&[
                        &pxed.display().to_string(),
                        "--interface",
                        "eth0",
                        "--boot-root",
                        &root_s,
                        "--dhcp",
                        "proxy",
                        "--tftp-max-per-client",
                        "100000",
                        // One address for every simulated machine: no per-source budget.
                        "--admit-tftp-per-source",
                        "0",
                        "--http-port",
                        "0",
                        "--fastpath-memory",
                        "16",
                    ]),
                    4011,
                ),
            ],
        },
        Server {
            name: "dnsmasq (DHCP + TFTP)",
            programs: vec![(
                dnsmasq_dhcp(&[
                    &format!("--dhcp-boot={NBP}"),
                    "--enable-tftp",
                    &format!("--tftp-root={root_s}"),
                    "--tftp-max=20000",
                ]),
                69,
            )],
        },
        Server {
            name: "Kea + tftpd-hpa",
            programs: vec![
                (
                    s(&[
                        "env",
                        &format!("KEA_PIDFILE_DIR={work_s}"),
                        &format!("KEA_LOCKFILE_DIR={work_s}"),
                        "kea-dhcp4",
                        "-c",
                        &kea_config.display().to_string(),
                    ]),
                    67,
                ),
                (
                    s(&[
                        &tftpd.display().to_string(),
                        "--foreground",
                        "--listen",
                        "--user",
                        "root",
                        "--address",
                        &format!("{SERVER}:69"),
                        "--secure",
                        &root_s,
                    ]),
                    69,
                ),
            ],
        },
    ])
}

/// Kea with memfile leases persisted to disk (its durable default), handing
/// out the NBP with next-server set, as a site running Kea for PXE would.
fn kea_config_json(work: &Path) -> String {
    let work = work.display();
    format!(
        r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["eth0"]}},
  "lease-database": {{"type": "memfile", "persist": true, "lfc-interval": 0, "name": "{work}/kea-leases.csv"}},
  "valid-lifetime": 3600,
  "next-server": "{SERVER}",
  "boot-file-name": "{NBP}",
  "subnet4": [{{"subnet": "198.18.0.0/16", "pools": [{{"pool": "{POOL_FIRST} - {POOL_LAST}"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "stdout"}}], "severity": "WARN"}}]
}}}}"#
    )
}

/// One server, freshly started (empty lease databases), against `clients` machines.
fn measure(
    server: &Server,
    bench: &Path,
    root: &Path,
    clients: usize,
    work: &Path,
) -> anyhow::Result<serde_json::Value> {
    let (_lab, _srv, cli) = start(server, work)?;
    run_bench(&cli, bench, root, clients, work)
}

/// A fresh lab (server and client namespaces, `SERVER_CIDR` and `CLIENT_CIDR`)
/// with `server` started in it on empty lease databases in `work`.
pub fn start(server: &Server, work: &Path) -> anyhow::Result<(Lab, Netns, Netns)> {
    let (lab, srv, cli, _) = start_with_pids(server, work)?;
    Ok((lab, srv, cli))
}

/// [`start`], with the PID of each program started (in `server.programs` order).
pub fn start_with_pids(
    server: &Server,
    work: &Path,
) -> anyhow::Result<(Lab, Netns, Netns, Vec<u32>)> {
    for stale in [
        "pxed-leases.redb",
        "dnsmasq.leases",
        "kea-leases.csv",
        "kea-leases.csv.2",
    ] {
        let _ = std::fs::remove_file(work.join(stale));
    }
    let lab = Lab::new()?;
    let pxe_lab::Pair {
        server: srv,
        client: cli,
    } = lab
        .pair()
        .server_addr(SERVER_CIDR)
        .client_addr(CLIENT_CIDR)
        .build()?;
    let mut pids = Vec::new();
    for (i, (argv, port)) in server.programs.iter().enumerate() {
        let log = work.join(format!(
            "{}-{i}.log",
            server.name.split(' ').next().unwrap_or("server")
        ));
        // Every server gets the same open-file limit, the most this machine
        // allows: one socket per transfer.
        let nofile = hard_open_file_limit();
        let mut wrapped = vec![format!("--nofile={nofile}:{nofile}"), "--".to_owned()];
        wrapped.extend(argv.iter().cloned());
        let args: Vec<&str> = wrapped.iter().map(String::as_str).collect();
        // `ip netns exec` and prlimit exec the program: the PID is its own.
        pids.push(lab.spawn_logged(&srv, "prlimit", &args, &log)?);
        if !srv.wait_for_udp_port(*port, Duration::from_secs(30)) {
            bail!(
                "{}: {} did not start listening on UDP {port}:\n{}",
                server.name,
                argv[0],
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
    Ok((lab, srv, cli, pids))
}

fn hard_open_file_limit() -> u64 {
    // SAFETY: getrlimit writes the struct we pass.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_max
}

pub fn run_bench(
    client: &Netns,
    bench: &Path,
    root: &Path,
    clients: usize,
    work: &Path,
) -> anyhow::Result<serde_json::Value> {
    let json = work.join("report.json");
    let _ = std::fs::remove_file(&json);
    let n = clients.to_string();
    let out = client.output(
        bench,
        &[
            "pxe",
            "--clients",
            &n,
            "--firmware",
            "uefi",
            "--verify-root",
            root.to_str().unwrap(),
            "--time-limit",
            "600",
            "--json",
            json.to_str().unwrap(),
        ],
    )?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let mut report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).context("bench wrote no report")?)?;
    // Per-machine detail is for a person debugging a run, not for the table.
    report.as_object_mut().map(|o| o.remove("machines"));
    Ok(report)
}

fn write_doc(
    path: &Path,
    rows: &[Row],
    clients: &[usize],
    only: Option<&str>,
) -> anyhow::Result<()> {
    let mut doc = String::from("# Whole boots: DHCP + boot program (generated by `cargo xtask bench`; do not edit)\n\nEvery number here was produced by the command below on the machine described with it.\nRe-run it to check.\n\n");
    let kernel = crate::kernel_release();
    let rev = crate::git_revision();
    let list = clients
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let only = only.map(|o| format!(" --only {o}")).unwrap_or_default();
    let _ = writeln!(
        doc,
        "`cargo xtask bench --clients {list}{only}` (pxed at {rev}; dnsmasq {}; kea-dhcp4 {}; tftpd-hpa {}; kernel {}; {} CPUs).\n",
        peers::package_version("dnsmasq-base"),
        peers::package_version("kea-dhcp4-server"),
        peers::deb_version(&workspace_root().join("target/peers/tftpd-hpa")),
        kernel,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    let _ = writeln!(
        doc,
        "Each server starts fresh (empty lease database) alone in a server namespace, a veth away from the client\nnamespace where `bench pxe --firmware uefi` powers on every machine at once: DHCP DISCOVER/REQUEST with the\nPXE options EDK2 sends (retransmitting at 4, 8, 16, 32 s), then the boot program ({NBP} from Debian's ipxe\npackage, {} bytes) over TFTP with blksize 1468 and windowsize 4 (servers without RFC 7440 run lockstep), every\nbyte verified. `all booted s` is power-on to the last machine's last byte. Server CPU is machine-wide busy\ntime minus the harness's own; `harness` is the share of the machine the harness itself used.\n",
        std::fs::metadata(Path::new("/usr/lib/ipxe").join(NBP)).map(|m| m.len()).unwrap_or(0),
    );
    let _ = writeln!(doc, "| server | machines | booted | failed | all booted s | DHCP p50 / p99 ms | boot program p50 / p99 ms | goodput MB/s | DHCP / TFTP retransmits | server CPU s | harness |");
    let _ = writeln!(
        doc,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let r = &row.report;
        let stage = |name: &str, i: usize| {
            r["stage_ms"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s[0] == name))
                .and_then(|s| s[1][i].as_f64())
                .unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {} / {} | {:.1} | {:.0}% |",
            row.server, r["clients"], r["booted"], r["failed"], r["seconds"].as_f64().unwrap_or(0.0),
            stage("dhcp", 0), stage("dhcp", 1), stage("nbp", 0), stage("nbp", 1),
            r["goodput_mb_per_s"].as_f64().unwrap_or(0.0), r["dhcp_retransmits"], r["tftp_retransmits"],
            r["cpu"]["server_s"].as_f64().unwrap_or(0.0), r["cpu"]["harness_s"].as_f64().unwrap_or(0.0)
                / (r["cpu"]["seconds"].as_f64().unwrap_or(1.0) * r["cpu"]["cores"].as_f64().unwrap_or(1.0)) * 100.0,
        );
        if let Some(failures) = r["failures"].as_object().filter(|f| !f.is_empty()) {
            let mut failures: Vec<(&String, &serde_json::Value)> = failures.iter().collect();
            failures.sort_by_key(|(_, n)| std::cmp::Reverse(n.as_u64().unwrap_or(0)));
            for (reason, n) in failures.into_iter().take(3) {
                let _ = writeln!(
                    doc,
                    "|  ↳ {n} failed: {} | | | | | | | | | | |",
                    reason.replace('|', "/")
                );
            }
        }
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, doc)?;
    Ok(())
}
