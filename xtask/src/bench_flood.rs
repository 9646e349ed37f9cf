//! `cargo xtask bench-flood`: admission control under a flood. pxed serves
//! 200 machines it knows (`[[machine]]` entries for `bench pxe`'s MACs)
//! while `bench flood` sends DISCOVERs from random MACs and TFTP read
//! requests from random ports of another address of the client namespace.
//! Each setting is measured unloaded and flooded, three runs each, in fresh
//! namespaces: the machines' boot p99 (median of the runs), pxed's own CPU
//! while they boot, what the flood achieved and what the kernel counted.
//! Writes docs/benchmarks/flood.md (generated).

use std::{fmt::Write as _, path::Path, time::Duration};

use crate::{
    bench_pxe::{self, Server, NBP, SERVER},
    workspace_root,
};
use anyhow::{bail, Context as _};

/// Machines that boot, each known to pxed.
const MACHINES: usize = 200;
/// Runs per setting; the table shows their median.
const RUNS: usize = 3;
/// The flood's own address in the client namespace.
const FLOOD_SOURCE: &str = "198.18.255.253";
const DHCP_FLOOD_PER_S: u64 = 100_000;
const TFTP_FLOOD_PER_S: u64 = 10_000;
/// The flood runs this long; the machines power on 2 s into it (pxed's
/// CPU for the flood alone is measured in the 1.5 s before).
const FLOOD_SECONDS: u64 = 20;

struct Setting {
    name: &'static str,
    flags: &'static [&'static str],
    /// The flood is sent but dropped at the egress of the client's end of
    /// the veth (nftables, netdev family): what generating it costs the
    /// machine, with nothing crossing to pxed.
    control: bool,
}

const SETTINGS: &[Setting] = &[
    Setting {
        name: "control: flood sent, dropped on the client's device",
        flags: &[],
        control: true,
    },
    Setting {
        name: "admission on (XDP + TC)",
        flags: &[],
        control: false,
    },
    Setting {
        name: "admission off (XDP + TC)",
        flags: &["--no-admission"],
        control: false,
    },
    Setting {
        name: "admission on, generic XDP (`--xdp-mode generic`) + TC",
        flags: &["--xdp-mode", "generic"],
        control: false,
    },
    Setting {
        name: "admission on, TC only (`--xdp-mode off`)",
        flags: &["--xdp-mode", "off"],
        control: false,
    },
];

/// One boot run: the machines' p99 (ms), pxed's CPU while they booted (share
/// of a core), failures, the flood's achieved rates and the kernel's counts.
#[derive(Default)]
struct Run {
    booted: u64,
    failed: u64,
    p99_ms: f64,
    /// The machines' own resends: a request of theirs lost or refused.
    dhcp_retransmits: u64,
    tftp_retransmits: u64,
    /// pxed's CPU while the machines boot, and before, with the flood alone.
    pxed_cpu: f64,
    pxed_cpu_flood_only: f64,
    flood_dhcp_per_s: f64,
    flood_tftp_per_s: f64,
    dropped_dhcp: u64,
    admitted_unknown: u64,
    dropped_tftp: u64,
}

pub fn run() -> anyhow::Result<()> {
    let workspace = workspace_root();
    let (pxed, bench) = crate::build_release_binaries()?;
    let work = std::env::temp_dir().join(format!("pxe-bench-flood-{}", std::process::id()));
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::copy(Path::new("/usr/lib/ipxe").join(NBP), root.join(NBP))
        .context("copying Debian's ipxe.efi (package ipxe)")?;
    let config = work.join("pxed.toml");
    std::fs::write(&config, known_machines_config())?;

    let mut rows = Vec::new();
    for setting in SETTINGS {
        let server = pxed_server(&pxed, &root, &config, &work, setting.flags);
        let mut unloaded = Vec::new();
        let mut flooded = Vec::new();
        for run in 0..RUNS {
            unloaded.push(measure(&server, &bench, &root, &work, Flood::None)?);
            let flood = if setting.control {
                Flood::DroppedAtTheClient
            } else {
                Flood::Sent
            };
            flooded.push(measure(&server, &bench, &root, &work, flood)?);
            eprintln!(
                "{}, run {}: unloaded p99 {:.0} ms; flooded p99 {:.0} ms, {} failed, pxed {:.0}% of a core (flood alone {:.0}%), flood {:.0} DISCOVERs/s",
                setting.name,
                run + 1,
                unloaded[run].p99_ms,
                flooded[run].p99_ms,
                flooded[run].failed,
                flooded[run].pxed_cpu * 100.0,
                flooded[run].pxed_cpu_flood_only * 100.0,
                flooded[run].flood_dhcp_per_s,
            );
        }
        rows.push((setting.name, unloaded, flooded));
    }
    let doc = workspace.join("docs/benchmarks/flood.md");
    write_doc(&doc, &rows)?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Full DHCP on a /16 and a `[[machine]]` entry for each of `bench pxe`'s
/// first MACHINES MACs (prefix 0x10).
fn known_machines_config() -> String {
    let mut config = String::from(
        "[dhcp]\nmode = \"full\"\n[[dhcp.subnet]]\nnetwork = \"198.18.0.0/16\"\n\
         pools = [\"198.18.1.0-198.18.254.254\"]\n[[profile]]\nname = \"default\"\n",
    );
    for n in 0..MACHINES {
        let _ = writeln!(
            config,
            "[[machine]]\nmac = \"52:54:00:10:{:02x}:{:02x}\"",
            n >> 8,
            n & 0xff
        );
    }
    config
}

fn pxed_server(pxed: &Path, root: &Path, config: &Path, work: &Path, flags: &[&str]) -> Server {
    let mut argv: Vec<String> = [
        pxed.to_str().unwrap(),
        "--interface",
        "eth0",
        "--config",
        config.to_str().unwrap(),
        "--boot-root",
        root.to_str().unwrap(),
        "--lease-file",
        work.join("pxed-leases.redb").to_str().unwrap(),
        "--http-port",
        "0",
        "--tftp-max-per-client",
        "100000",
        // Every simulated machine shares the client namespace's address: its
        // budget holds them all at once. The flood's address gets the
        // default rate.
        "--admit-tftp-per-source-burst",
        "1000",
        "--stats-interval",
        "1",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    argv.extend(flags.iter().map(|f| (*f).to_owned()));
    Server {
        name: "pxed",
        programs: vec![(argv, 67)],
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Flood {
    None,
    Sent,
    DroppedAtTheClient,
}

/// nftables at the client's eth0 egress (after the socket sent it, so each
/// send succeeds as in the real flood) dropping the flood: its DISCOVERs
/// (from ports other than 68) and everything from its address.
const DROP_THE_FLOOD: &str = "table netdev flood {\n  chain egress {\n    \
     type filter hook egress device \"eth0\" priority 0;\n    \
     udp dport 67 udp sport != 68 drop\n    ip saddr 198.18.255.253 drop\n  }\n}\n";

fn measure(
    server: &Server,
    bench: &Path,
    root: &Path,
    work: &Path,
    flood: Flood,
) -> anyhow::Result<Run> {
    let (lab, srv, cli, pids) = bench_pxe::start_with_pids(server, work)?;
    let pxed = pids[0];
    let flood_json = work.join("flood.json");
    let _ = std::fs::remove_file(&flood_json);
    if flood == Flood::DroppedAtTheClient {
        let rules = work.join("flood.nft");
        std::fs::write(&rules, DROP_THE_FLOOD)?;
        let out = cli.output("nft", &["-f", rules.to_str().unwrap()])?;
        if !out.status.success() {
            bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let flood_pid = if flood != Flood::None {
        cli.ip(["addr", "add", &format!("{FLOOD_SOURCE}/16"), "dev", "eth0"])?;
        let args = flood_args(&flood_json);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = lab.spawn_logged(&cli, bench, &args, &work.join("flood.log"))?;
        std::thread::sleep(Duration::from_millis(500));
        Some(pid)
    } else {
        None
    };
    // The flood alone: what deciding it costs pxed, with no machine to serve.
    let flood_only = Duration::from_millis(1500);
    let cpu_flood_start = process_cpu_seconds(pxed)?;
    if flood != Flood::None {
        std::thread::sleep(flood_only);
    }
    let pxed_cpu_flood_only =
        (process_cpu_seconds(pxed)? - cpu_flood_start) / flood_only.as_secs_f64();
    let cpu_before = process_cpu_seconds(pxed)?;
    let started = std::time::Instant::now();
    let report = bench_pxe::run_bench(&cli, bench, root, MACHINES, work)?;
    let pxed_cpu = (process_cpu_seconds(pxed)? - cpu_before) / started.elapsed().as_secs_f64();
    let mut run = Run {
        booted: report["booted"].as_u64().unwrap_or(0),
        failed: report["failed"].as_u64().unwrap_or(0),
        p99_ms: boot_p99(&report),
        dhcp_retransmits: report["dhcp_retransmits"].as_u64().unwrap_or(0),
        tftp_retransmits: report["tftp_retransmits"].as_u64().unwrap_or(0),
        pxed_cpu,
        pxed_cpu_flood_only,
        ..Run::default()
    };
    if let Some(pid) = flood_pid {
        let status = lab
            .take_child(pid)
            .context("the flood process")?
            .wait()
            .context("waiting for the flood")?;
        if !status.success() {
            bail!(
                "bench flood failed: {}",
                std::fs::read_to_string(work.join("flood.log")).unwrap_or_default()
            );
        }
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&flood_json)?)?;
        run.flood_dhcp_per_s = report["dhcp"]["achieved_per_s"].as_f64().unwrap_or(0.0);
        run.flood_tftp_per_s = report["tftp"]["achieved_per_s"].as_f64().unwrap_or(0.0);
        // The counters line pxed logs every second.
        std::thread::sleep(Duration::from_millis(1500));
        let log = std::fs::read_to_string(work.join("pxed-0.log")).unwrap_or_default();
        let counter = |name: &str| last_counter(&log, name);
        run.dropped_dhcp = counter("DROP_DHCP_UNKNOWN_OVER_RATE");
        run.admitted_unknown = counter("SEEN_DHCP_UNKNOWN_ADMITTED");
        run.dropped_tftp = counter("DROP_TFTP_SOURCE_OVER_RATE") + counter("DROP_TFTP_OVER_RATE");
    }
    drop((srv, cli));
    drop(lab);
    let _ = std::fs::remove_file(work.join("pxed-0.log"));
    let _ = std::fs::remove_file(work.join("flood.log"));
    Ok(run)
}

fn flood_args(json: &Path) -> Vec<String> {
    [
        "flood",
        "--interface",
        "eth0",
        "--dhcp-rate",
        &DHCP_FLOOD_PER_S.to_string(),
        "--tftp-server",
        SERVER,
        "--tftp-source",
        FLOOD_SOURCE,
        "--tftp-rate",
        &TFTP_FLOOD_PER_S.to_string(),
        "--file",
        NBP,
        "--seconds",
        &FLOOD_SECONDS.to_string(),
        "--json",
        json.to_str().unwrap(),
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect()
}

/// p99 of power-on to the boot program's last byte, ms.
fn boot_p99(report: &serde_json::Value) -> f64 {
    report["stage_ms"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s[0] == "nbp"))
        .and_then(|s| s[1][1].as_f64())
        .unwrap_or(f64::NAN)
}

/// User and system CPU seconds of process `pid` so far (/proc/PID/stat).
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Ok((ticks(11) + ticks(12)) / hz)
}

/// The highest value of `name` in the XDP and TC parts of pxed's last
/// counters line, summed.
fn last_counter(log: &str, name: &str) -> u64 {
    // The programs' line ("counters xdp=packets=… tc=packets=…"), not the
    // DHCP counters logged after it.
    let Some(line) = log.lines().rev().find(|l| l.contains("xdp=packets=")) else {
        return 0;
    };
    let key = format!(" {name}=");
    line.match_indices(&key)
        .filter_map(|(at, _)| {
            line[at + key.len()..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn write_doc(path: &Path, rows: &[(&str, Vec<Run>, Vec<Run>)]) -> anyhow::Result<()> {
    let mut doc = String::from(
        "# Admission control under a flood (generated by `cargo xtask bench-flood`; do not edit)\n\n",
    );
    let _ = writeln!(
        doc,
        "`cargo xtask bench-flood` (pxed at {}; kernel {}; {} CPUs).\n",
        crate::git_revision(),
        crate::kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        doc,
        "{MACHINES} machines pxed knows (`[[machine]]` entries) power on at once with `bench pxe --firmware uefi`\n\
         (DHCP, then {NBP} over TFTP, every byte verified), unloaded and while `bench flood` sends\n\
         {DHCP_FLOOD_PER_S} DISCOVERs/s from random MACs and {TFTP_FLOOD_PER_S} TFTP read requests/s from 256 ports of\n\
         another address, both asked for; what it achieved is in the table. Fresh namespaces and leases per\n\
         run; {RUNS} runs per setting, medians shown. `pxed CPU` is pxed's own user and system time as a share\n\
         of one core: with the flood alone (the 1.5 s before the machines power on), and while the machines boot\n\
         (serving them included: unloaded, that alone is about a third of a core for the half second they take).\n\
         The counters are the programs' (XDP and TC summed) at the end of the run. The machines' retransmissions\n\
         are their resent DHCP requests and TFTP ACKs, summed over the flooded runs (a request refused or lost\n\
         costs its machine a resend: 4 s for UEFI's DHCP and TFTP).\n"
    );
    let _ = writeln!(
        doc,
        "| setting | booted (of {MACHINES}, worst run) | unloaded p99 ms | flooded p99 ms | ratio | machines' retransmissions, DHCP / TFTP | pxed CPU, flood alone / booting | flood DISCOVERs/s | flood RRQs/s | DHCP dropped | unknown admitted | RRQs dropped |"
    );
    let _ = writeln!(
        doc,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (name, unloaded, flooded) in rows {
        let base = median(unloaded.iter().map(|r| r.p99_ms));
        let loaded = median(flooded.iter().map(|r| r.p99_ms));
        let m = |f: fn(&Run) -> f64| median(flooded.iter().map(f));
        let _ = writeln!(
            doc,
            "| {name} | {} | {base:.0} | {loaded:.0} | {:.2}× | {} / {} | {:.0}% / {:.0}% | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            flooded.iter().map(|r| r.booted).min().unwrap_or(0),
            loaded / base,
            flooded.iter().map(|r| r.dhcp_retransmits).sum::<u64>(),
            flooded.iter().map(|r| r.tftp_retransmits).sum::<u64>(),
            m(|r| r.pxed_cpu_flood_only) * 100.0,
            m(|r| r.pxed_cpu) * 100.0,
            m(|r| r.flood_dhcp_per_s),
            m(|r| r.flood_tftp_per_s),
            m(|r| r.dropped_dhcp as f64),
            m(|r| r.admitted_unknown as f64),
            m(|r| r.dropped_tftp as f64),
        );
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, doc)?;
    Ok(())
}
