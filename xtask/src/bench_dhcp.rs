//! `cargo xtask bench-dhcp`: how fast and at what CPU cost each server leases
//! addresses, measured by ISC's own load tool (perfdhcp, Debian's kea-admin)
//! as a relay in the client namespace. pxed (repeat requests answered by its
//! TC program on this veth, or everything in userspace; leases in redb), Kea
//! (memfile, persisted) and dnsmasq each run fresh in the same lab as `cargo
//! xtask bench`:
//!
//! - sustained loads of new machines and of repeats, the server pinned to one
//!   core and perfdhcp to the other: ACKs per server CPU-second;
//! - `--scenario avalanche`: a DISCOVER for every client at once,
//!   retransmitted with back-off until every client has its ACK;
//! - the project's harness, `bench dhcp`: machines with EDK2's options on
//!   the link lease and lease again, latency percentiles for first
//!   exchanges and repeats.
//!
//! Writes docs/benchmarks/dhcp.md (generated).

use std::{fmt::Write as _, path::Path};

use anyhow::{bail, Context as _};
use pxe_lab::cpu::{CpuMeter, LoadGenerator};

use crate::{bench_pxe, peers, workspace_root};

/// The servers of `cargo xtask bench` whose DHCP is measured, with the name
/// each gets here.
const MEASURED: &[(&str, &str)] = &[
    (
        "pxed full, kernel tiers",
        "pxed, kernel answers repeats (TC)",
    ),
    (
        "pxed full, userspace",
        "pxed, userspace only (redb, group commit)",
    ),
    ("Kea + tftpd-hpa", "Kea (memfile, persisted)"),
    ("dnsmasq (DHCP + TFTP)", "dnsmasq (lease file)"),
];

/// How long one avalanche may take before it is reported as unfinished.
const AVALANCHE_LIMIT_S: u32 = 90;
/// `bench dhcp`: exchanges each machine runs after its first, and how long a
/// run may take.
const HARNESS_REPEATS: u8 = 4;
const HARNESS_LIMIT_S: u64 = 120;
/// The sustained loads: (what, DORA exchanges offered per second, distinct
/// clients, seconds). New machines: 60,000 MACs, so nearly every exchange
/// at 4,000/s is a machine the server has not seen (about two visits per
/// MAC at 20,000/s). Repeats: 10,000 MACs, each back about twenty times.
/// The pool holds more addresses than any load's clients, so a full pool
/// never passes for a slow server.
const LOADS: [(&str, u32, u32, u32); 3] = [
    ("new machines", 4_000, 60_000, 6),
    ("new machines", 20_000, 60_000, 6),
    ("repeats", 20_000, 10_000, 10),
];
/// The server runs on this core, perfdhcp on the other: the server's CPU is
/// the machine's busy time less perfdhcp's, whichever of the two the
/// kernel's packet work lands on.
const SERVER_CORE: &str = "0";
const PERFDHCP_CORE: &str = "1";

struct Row {
    server: &'static str,
    clients: usize,
    /// `None`: perfdhcp did not finish within the limit.
    seconds: Option<f64>,
    resent: u64,
}

/// `bench dhcp`'s report for one server.
struct Harnessed {
    server: &'static str,
    report: serde_json::Value,
}

/// One sustained load's result for one server.
struct Sustained {
    server: &'static str,
    load: (&'static str, u32, u32, u32),
    /// DORA exchanges per second perfdhcp achieved.
    rate: f64,
    acks: u64,
    server_cpu_s: f64,
    /// User and system time of the server's own processes: no softirq work.
    process_cpu_s: f64,
    /// Every core's busy time, perfdhcp's included: the same load generator
    /// for every server, so comparable across them (issue 17's honest
    /// accounting, beside the flattering "server CPU").
    machine_cpu_s: f64,
    /// The run time the kernel counted for pxed's programs (none for peers).
    programs: Vec<pxe_lab::bpf_stats::ProgramRun>,
    /// perfdhcp's average and largest REQUEST→ACK delay, milliseconds.
    ack_delay_ms: (f64, f64),
}

pub fn run(clients: &[usize], sustained_only: bool) -> anyhow::Result<()> {
    let workspace = workspace_root();
    let (pxed, bench) = crate::build_release_binaries()?;
    let tftpd = peers::tftpd_hpa(&workspace)?;
    let work = std::env::temp_dir().join(format!("pxe-bench-dhcp-{}", std::process::id()));
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    let servers = without_dhcp_admission(bench_pxe::servers(&pxed, &tftpd, &root, &work)?, &pxed);
    let server_named = |name: &str| {
        servers
            .iter()
            .find(|s| s.name == name)
            .context("a server of cargo xtask bench")
    };
    let mut sustained = Vec::new();
    for load in LOADS {
        for (name, label) in MEASURED {
            let result = sustain(server_named(name)?, label, load, &work)?;
            eprintln!(
                "{label}, {} at {}/s: {:.0} DORA/s, {} ACKs; server CPU {:.2} s (its processes {:.2} s); machine {:.2} s; programs {}",
                load.0,
                load.1,
                result.rate,
                result.acks,
                result.server_cpu_s,
                result.process_cpu_s,
                result.machine_cpu_s,
                programs_summary(&result.programs),
            );
            sustained.push(result);
        }
    }
    if sustained_only {
        eprintln!("--sustained-only: docs/benchmarks/dhcp.md left as it is");
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }
    let mut rows = Vec::new();
    for &n in clients {
        for (name, label) in MEASURED {
            let server = server_named(name)?;
            let (_lab, _srv, cli) = bench_pxe::start(server, &work)?;
            let meter = CpuMeter::start(LoadGenerator::WaitedChildren);
            let out = cli.output(
                "timeout",
                // One thread: in its default multi-thread mode perfdhcp busy-polls
                // every core, and the server's CPU could not be told from its own.
                &[
                    &AVALANCHE_LIMIT_S.to_string(),
                    "perfdhcp",
                    "-4",
                    "-g",
                    "single",
                    "-l",
                    bench_pxe::CLIENT,
                    "--scenario",
                    "avalanche",
                    "-R",
                    &n.to_string(),
                    bench_pxe::SERVER,
                ],
            )?;
            let cpu = meter.stop();
            let text = String::from_utf8_lossy(&out.stdout);
            let seconds = provisioning_seconds(&text);
            let resent = text
                .lines()
                .find_map(|l| l.strip_prefix("Requests resent: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            match seconds {
                Some(s) => eprintln!(
                    "{label}, {n} clients: {s:.2} s, {:.0} leases/s; CPU: machine {:.2} s, perfdhcp {:.2} s, server {:.2} s",
                    n as f64 / s,
                    cpu.machine_busy_s,
                    cpu.harness_s,
                    cpu.server_s
                ),
                None if out.status.code() == Some(124) => eprintln!("{label}, {n} clients: not done in {AVALANCHE_LIMIT_S} s"),
                None => bail!("perfdhcp against {label} failed ({}):\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
            }
            rows.push(Row {
                server: label,
                clients: n,
                seconds,
                resent,
            });
        }
    }
    let mut harnessed = Vec::new();
    for &n in clients {
        for (name, label) in MEASURED {
            let (_lab, _srv, cli) = bench_pxe::start(server_named(name)?, &work)?;
            let report = bench_dhcp(&cli, &bench, n, &work)?;
            harnessed.push(Harnessed {
                server: label,
                report,
            });
        }
    }
    let doc = workspace.join("docs/benchmarks/dhcp.md");
    write_doc(&doc, &sustained, &rows, &harnessed, clients)?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The servers with pxed's kernel admission of unknown machines unlimited.
/// These loads offer new machines past its default budget on purpose (at
/// 20,000/s for 6 s, 120,000 DISCOVERs against a burst of 20,000 and
/// 2,000/s), to measure the CPU per lease; Kea and dnsmasq have no such
/// limit, so with it pxed would be measured answering a sixth of them.
/// (docs/benchmarks/flood.md measures the limit itself.)
fn without_dhcp_admission(
    mut servers: Vec<bench_pxe::Server>,
    pxed: &Path,
) -> Vec<bench_pxe::Server> {
    let pxed = pxed.display().to_string();
    for server in &mut servers {
        for (argv, _) in &mut server.programs {
            if argv.first() == Some(&pxed) {
                argv.extend(["--admit-dhcp-unknown".to_owned(), "0".to_owned()]);
            }
        }
    }
    servers
}

/// One sustained perfdhcp load against a fresh `server`, the server pinned
/// to one core and perfdhcp to the other.
fn sustain(
    server: &bench_pxe::Server,
    label: &'static str,
    load: (&'static str, u32, u32, u32),
    work: &Path,
) -> anyhow::Result<Sustained> {
    let (_, rate, clients, seconds) = load;
    let (_lab, _srv, cli, pids) = bench_pxe::start_with_pids(server, work)?;
    for pid in &pids {
        let pinned = std::process::Command::new("taskset")
            .args([
                "--all-tasks",
                "--cpu-list",
                "--pid",
                SERVER_CORE,
                &pid.to_string(),
            ])
            .output()?;
        if !pinned.status.success() {
            bail!("taskset {pid}: {}", String::from_utf8_lossy(&pinned.stderr));
        }
    }
    let own_cpu = || -> f64 {
        pids.iter()
            .filter_map(|pid| pxe_lab::cpu::process_seconds(*pid).ok())
            .sum()
    };
    let own_before = own_cpu();
    let programs = pxe_lab::bpf_stats::BpfMeter::start();
    let meter = CpuMeter::start(LoadGenerator::WaitedChildren);
    let out = cli.output(
        "taskset",
        &[
            "--cpu-list",
            PERFDHCP_CORE,
            "perfdhcp",
            "-4",
            "-g",
            "single",
            "-l",
            bench_pxe::CLIENT,
            "-r",
            &rate.to_string(),
            "-p",
            &seconds.to_string(),
            "-R",
            &clients.to_string(),
            bench_pxe::SERVER,
        ],
    )?;
    let cpu = meter.stop();
    let programs = programs.stop();
    let process_cpu_s = own_cpu() - own_before;
    let text = String::from_utf8_lossy(&out.stdout);
    let achieved = text
        .lines()
        .find_map(|l| l.strip_prefix("Rate: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| {
            format!(
                "perfdhcp against {label} reported no rate ({}):\n{text}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    // The last "received packets" is the REQUEST-ACK exchange's.
    let acks = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("received packets: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Sustained {
        server: label,
        load,
        rate: achieved,
        acks,
        server_cpu_s: cpu.server_s,
        process_cpu_s,
        machine_cpu_s: cpu.machine_busy_s,
        programs,
        ack_delay_ms: (
            last_value(&text, "avg delay: "),
            last_value(&text, "max delay: "),
        ),
    })
}

/// The whole machine's busy seconds per 1,000 ACKs, perfdhcp included.
fn machine_per_thousand(r: &Sustained) -> String {
    if r.acks == 0 {
        return "-".into();
    }
    format!("{:.3}", r.machine_cpu_s * 1000.0 / r.acks as f64)
}

/// The programs' total run time and each one's mean per run, or "-" for a
/// server without them.
fn programs_summary(programs: &[pxe_lab::bpf_stats::ProgramRun]) -> String {
    if programs.is_empty() {
        return "-".into();
    }
    let total_s: f64 = programs.iter().map(|p| p.run_time_ns as f64 / 1e9).sum();
    let each = programs
        .iter()
        .map(|p| format!("{} {:.0}", p.name, p.ns_per_run()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{total_s:.3} ({each})")
}

/// `bench dhcp` in the client namespace: `clients` machines on the link, each
/// leasing once and `HARNESS_REPEATS` times again. Returns its JSON report.
fn bench_dhcp(
    client: &pxe_lab::Netns,
    bench: &Path,
    clients: usize,
    work: &Path,
) -> anyhow::Result<serde_json::Value> {
    let json = work.join("dhcp-report.json");
    let _ = std::fs::remove_file(&json);
    let out = client.output(
        bench,
        &[
            "dhcp",
            "--clients",
            &clients.to_string(),
            "--repeats",
            &HARNESS_REPEATS.to_string(),
            "--time-limit",
            &HARNESS_LIMIT_S.to_string(),
            "--json",
            json.to_str().unwrap(),
        ],
    )?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let report = std::fs::read(&json).with_context(|| {
        format!(
            "bench dhcp wrote no report:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(serde_json::from_slice(&report)?)
}

/// The number after the last `label` in perfdhcp's report (its second
/// exchange, REQUEST→ACK, is reported last).
fn last_value(report: &str, label: &str) -> f64 {
    report
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// perfdhcp's "It took HH:MM:SS.ffffff to provision N clients", in seconds.
fn provisioning_seconds(report: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.starts_with("It took "))?;
    let clock = line.strip_prefix("It took ")?.split_whitespace().next()?;
    let mut parts = clock.split(':');
    let (h, m, s) = (
        parts.next()?.parse::<f64>().ok()?,
        parts.next()?.parse::<f64>().ok()?,
        parts.next()?.parse::<f64>().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

fn write_doc(
    path: &Path,
    sustained: &[Sustained],
    rows: &[Row],
    harnessed: &[Harnessed],
    clients: &[usize],
) -> anyhow::Result<()> {
    let mut doc = String::from("# DHCP: leasing a storm of new clients (generated by `cargo xtask bench-dhcp`; do not edit)\n\nEvery number here was produced by the command below on the machine described with it.\nRe-run it to check.\n\n");
    let kernel = crate::kernel_release();
    let rev = crate::git_revision();
    let list = clients
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let _ = writeln!(
        doc,
        "`cargo xtask bench-dhcp --clients {list}` (pxed at {rev}; kea-dhcp4 {}; dnsmasq {}; perfdhcp from kea-admin {}; kernel {}; {} CPUs).\n",
        peers::package_version("kea-dhcp4-server"),
        peers::package_version("dnsmasq-base"),
        peers::package_version("kea-admin"),
        kernel,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    let _ = writeln!(
        doc,
        "perfdhcp runs single-threaded (in its default mode it busy-polls every core) as a relay in the client namespace;\nthe server starts fresh with an empty, durable lease database (pxed's redb fsyncs each commit before its ACKs;\nKea's memfile appends without an fsync).\n\n## Sustained load: new machines and repeats\n\n`taskset -c {PERFDHCP_CORE} perfdhcp -4 -g single -r RATE -p SECONDS -R CLIENTS`, the server pinned to core {SERVER_CORE} (`taskset -a -p`):\nDORA exchanges offered at RATE per second among CLIENTS distinct MACs, each ACK a lease. New machines: 60,000 MACs,\nso at 4,000/s nearly every exchange is a machine the server has never seen (about two visits per MAC at 20,000/s).\nRepeats: each of 10,000 MACs comes back about twenty times; after its first DORA, pxed's programs answer its\nDISCOVERs and REQUESTs from templates (on this veth, the TC program; XDP leaves them to TC), unless\n`--no-kernel-dhcp` (the userspace row). Server CPU is the machine's busy time less perfdhcp's own, so the\nkernel's packet work for the server is counted wherever it ran; its processes' own user + system time beside it\n(no softirq work in that). Machine CPU per 1,000 ACKs is every core's busy time, perfdhcp's included: the same load\ngenerator for every server, so nothing is subtracted that the server caused. The programs' CPU is the run time the\nkernel counted for pxed's XDP and TC programs (`BPF_ENABLE_STATS`), whichever thread ran them. perfdhcp reports\ndelays as average and maximum, not percentiles. pxed runs with `--admit-dhcp-unknown 0`: these loads bring new\nmachines faster than its default admission allows, on purpose.\n"
    );
    let _ = writeln!(
        doc,
        "| load | offered DORA/s | server | DORA/s achieved | ACKs | server CPU s | its processes CPU s | ACKs per server CPU-s | machine CPU s per 1,000 ACKs | programs: CPU s, ns per run | REQUEST→ACK avg / max ms |"
    );
    let _ = writeln!(
        doc,
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in sustained {
        let per_cpu = if r.server_cpu_s > 0.05 {
            format!("{:.0}", r.acks as f64 / r.server_cpu_s)
        } else {
            "n/a".into()
        };
        let _ = writeln!(
            doc,
            "| {} ({} MACs) | {} | {} | {:.0} | {} | {:.2} | {:.2} | {per_cpu} | {} | {} | {:.3} / {:.1} |",
            r.load.0,
            r.load.2,
            r.load.1,
            r.server,
            r.rate,
            r.acks,
            r.server_cpu_s,
            r.process_cpu_s,
            machine_per_thousand(r),
            programs_summary(&r.programs),
            r.ack_delay_ms.0,
            r.ack_delay_ms.1
        );
    }
    let _ = writeln!(
        doc,
        "\n## Avalanche\n\n`perfdhcp -4 -g single --scenario avalanche -R N` runs as a relay in the client namespace: a DISCOVER for each of N new\nclients at once, then REQUEST on each OFFER, retransmitting with back-off until every client has its ACK. A burst\nthat large overflows the veth's receive backlog (net.core.netdev_max_backlog, 1000 here) whatever the server, so\nthe time depends on perfdhcp's back-off as much as on the server: compare within a run. No CPU column: these runs\nare too short for /proc/stat's clock ticks.\n"
    );
    let _ = writeln!(
        doc,
        "| server | clients | all leased s | leases/s | requests resent |"
    );
    let _ = writeln!(doc, "| --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        let (secs, rate) = match r.seconds {
            Some(s) => (format!("{s:.2}"), format!("{:.0}", r.clients as f64 / s)),
            None => (format!("not done in {AVALANCHE_LIMIT_S}"), "-".into()),
        };
        // perfdhcp stopped by the limit prints no summary: nothing to say of its resends.
        let resent = if r.seconds.is_some() {
            r.resent.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {secs} | {rate} | {resent} |",
            r.server, r.clients
        );
    }
    write_harnessed(&mut doc, harnessed);
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, doc)?;
    Ok(())
}

fn write_harnessed(doc: &mut String, harnessed: &[Harnessed]) {
    let _ = writeln!(
        doc,
        "\n## Leasing again: the project's harness\n\n`bench dhcp --clients N --repeats {HARNESS_REPEATS}` in the client namespace: N machines power on at once on the link (no relay),\neach with the options EDK2 sends (60, 93, 94, 97, 55; retransmitting at 4, 8, 16, 32 s), leases an address, then\nleases it {HARNESS_REPEATS} times more with new xids, each exchange as soon as the last one's ACK arrived. A first exchange\nmakes the server decide and store a lease; a repeat finds it decided (pxed's TC program answers it from the\ntemplate, except in the userspace row). OFFER and ACK latencies run from the machine's last send to the server's\nanswer (DISCOVER→OFFER, REQUEST→ACK); whole is the exchange from its first DISCOVER, retransmissions and NAKs\nincluded; percentiles over every completed exchange of the kind (a failed machine's exchange is not one). Server CPU is machine-wide busy time\nminus the harness's; ACKs per server CPU-s counts first exchanges and repeats.\n"
    );
    let _ = writeln!(
        doc,
        "| server | machines | failed | exchanges/s | first: OFFER p50 / p99 ms | first: ACK p50 / p99 ms | first: whole p50 / p99 ms | repeats: OFFER p50 / p99 ms | repeats: ACK p50 / p99 ms | repeats: whole p50 / p99 ms | retransmits / NAKs | server CPU s | ACKs per server CPU-s |"
    );
    let _ = writeln!(
        doc,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for h in harnessed {
        let r = &h.report;
        let ms = |kind: &str, what: &str| {
            let p = &r[kind][what];
            format!(
                "{:.2} / {:.2}",
                p["p50"].as_f64().unwrap_or(f64::NAN),
                p["p99"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let acks = r["first"]["exchanges"].as_u64().unwrap_or(0)
            + r["repeat"]["exchanges"].as_u64().unwrap_or(0);
        let server_s = r["cpu"]["server_s"].as_f64().unwrap_or(0.0);
        let per_cpu = if server_s > 0.05 {
            format!("{:.0}", acks as f64 / server_s)
        } else {
            "-".into()
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} / {} | {server_s:.2} | {per_cpu} |",
            h.server,
            r["clients"],
            r["failed"],
            r["exchanges_per_s"].as_f64().unwrap_or(0.0),
            ms("first", "offer_ms"),
            ms("first", "ack_ms"),
            ms("first", "dora_ms"),
            ms("repeat", "offer_ms"),
            ms("repeat", "ack_ms"),
            ms("repeat", "dora_ms"),
            r["retransmits"],
            r["naks"],
        );
        if let Some(failures) = r["failures"].as_object().filter(|f| !f.is_empty()) {
            for (reason, n) in failures {
                let _ = writeln!(doc, "|  ↳ {n} failed: {reason} | | | | | | | | | | | | |");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn perfdhcp_provisioning_time_is_read_in_seconds() {
        let report = "Requests sent + resent: 4365\nIt took 00:01:02.045188 to provision 2000 clients. \nRequests resent: 365\n";
        assert_eq!(super::provisioning_seconds(report), Some(62.045188));
        assert_eq!(super::provisioning_seconds("no such line"), None);
    }
}
