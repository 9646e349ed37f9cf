//! `cargo xtask bench-tftp`: pxed (userspace path), tftpd-hpa and dnsmasq, each
//! in its own throwaway namespace pair with the same boot root, measured by
//! the same `bench tftp` run in the client namespace; the table goes to
//! docs/benchmarks/tftp-userspace.md (generated; docs/BENCHMARKS.md interprets it).
//! With `--loss`, nftables drops that share of UDP each way on the client's
//! link (this kernel has no netem), and the table goes to
//! docs/benchmarks/tftp-loss.md.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use pxe_lab::{Lab, Netns};

use crate::{peers, workspace_root};

const SERVER: &str = "198.18.0.1";
const FILE_LEN: usize = 4 * 1024 * 1024;

pub struct Options<'a> {
    pub clients: &'a [usize],
    pub blksize: u16,
    pub windowsize: u16,
    pub harness_io: &'a str,
    /// Percent of arriving UDP dropped in each namespace, per measurement.
    pub loss: &'a [u32],
    /// Servers whose name starts with one of these (empty: all).
    pub servers: &'a [String],
    /// Downloads per client, one after the other.
    pub rounds: usize,
}

struct Row {
    server: &'static str,
    clients: usize,
    loss: u32,
    report: serde_json::Value,
    server_cpu_s: f64,
    /// Blocks the server sent again, from its log (pxed only).
    server_retransmits: Option<u64>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let &Options {
        clients,
        blksize,
        windowsize,
        harness_io,
        loss,
        servers: chosen,
        rounds,
    } = options;
    if let Some(bad) = loss.iter().find(|&&l| l >= 100) {
        bail!("--loss {bad}: a percentage below 100");
    }
    let workspace = workspace_root();
    let (pxed, bench) = crate::build_release_binaries()?;
    let tftpd = peers::tftpd_hpa(&workspace)?;

    // Everything of the run (boot root, logs, reports) lives here and goes with it.
    let work = tempdir("bench-tftp")?;
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    let file: Vec<u8> = (0..FILE_LEN).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(root.join("kernel"), &file)?;

    let root_s = root.to_str().unwrap().to_owned();
    let pxed_args: Vec<String> = vec![
        pxed.display().to_string(),
        "--interface".into(),
        "eth0".into(),
        "--boot-root".into(),
        root_s.clone(),
        "--xdp-mode".into(),
        "off".into(),
        "--no-tc".into(),
        "--http-port".into(),
        "0".into(),
        "--tftp-max-per-client".into(),
        "100000".into(),
        // One address for every load client: no per-source budget.
        "--admit-tftp-per-source".into(),
        "0".into(),
    ];
    // The same pxed with its kernel tiers: XDP attached (native on veth,
    // which has no tailroom, so TC builds the blocks) and TC.
    let kernel_args: Vec<String> = pxed_args
        .iter()
        .filter(|a| !matches!(a.as_str(), "--no-tc"))
        .map(|a| {
            if a == "off" {
                "auto".to_owned()
            } else {
                a.clone()
            }
        })
        .chain([
            "--fastpath-memory".to_owned(),
            "32".to_owned(),
            "--dhcp".to_owned(),
            "off".to_owned(),
        ])
        .collect();
    let mut servers: Vec<(&'static str, Vec<String>)> = vec![
        ("pxed (kernel tiers)", kernel_args),
        ("pxed (userspace)", pxed_args.clone()),
        (
            "tftpd-hpa",
            vec![
                tftpd.display().to_string(),
                "--foreground".into(),
                "--listen".into(),
                "--user".into(),
                "root".into(),
                "--address".into(),
                format!("{SERVER}:69"),
                "--secure".into(),
                root_s.clone(),
            ],
        ),
        (
            "dnsmasq",
            vec![
                "dnsmasq".into(),
                "--no-daemon".into(),
                "--port=0".into(),
                "--enable-tftp".into(),
                format!("--tftp-root={root_s}"),
                "--tftp-max=4096".into(),
                format!("--listen-address={SERVER}"),
                "--bind-interfaces".into(),
                "--user=root".into(),
                "--pid-file=".into(),
                "--conf-file=/dev/null".into(),
            ],
        ),
    ];

    if windowsize > 1 {
        // What batching a window into one UDP GSO send buys.
        let mut no_gso = pxed_args.clone();
        no_gso.push("--tftp-no-gso".into());
        servers.insert(1, ("pxed (userspace, no GSO)", no_gso));
    }
    servers.retain(|(name, _)| {
        chosen.is_empty() || chosen.iter().any(|c| name.starts_with(c.as_str()))
    });
    if servers.is_empty() {
        bail!(
            "--servers {}: none of pxed, tftpd, dnsmasq",
            chosen.join(",")
        );
    }
    let mut rows = Vec::new();
    for (name, argv) in &servers {
        let lab = Lab::new()?;
        let pxe_lab::Pair { server, client } =
            lab.pair().client_addr(pxe_lab::CLIENT_CIDR).build()?;
        if loss.iter().any(|&l| l > 0) {
            // A UDP GSO send would cross the veth as one packet and be lost
            // whole; on a wire each frame is lost alone. One segment per
            // packet makes the kernel cut it before the client's hooks.
            server.ip(["link", "set", "dev", "eth0", "gso_max_segs", "1"])?;
        }
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let log = work.join(format!(
            "{}.log",
            name.split(' ').next().unwrap_or("server")
        ));
        let pid = lab.spawn_logged(&server, &argv[0], &args, &log)?;
        if !server.wait_for_udp_port(69, Duration::from_secs(20)) {
            bail!("{name} did not start listening on port 69");
        }
        let _ = pid; // stopped with the lab
        for &percent in loss {
            drop_udp_on_the_client_link(&client, percent, &work)?;
            for &n in clients {
                let log_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
                // Server CPU = machine-wide busy time minus the load generator's own
                // CPU, measured by the bench itself: kernel work in softirq is charged
                // to no process, and forking servers (tftpd-hpa) spread theirs over children.
                let report = run_bench(
                    &client,
                    &bench,
                    &work.join("report.json"),
                    &root.join("kernel"),
                    n,
                    &Load {
                        blksize,
                        windowsize,
                        harness_io,
                        rounds,
                    },
                )?;
                let server_cpu_s = report["cpu"]["server_s"].as_f64().unwrap_or(0.0);
                eprintln!(
                    "{name}, {n} clients, {percent}% loss: {} MB/s, p50 {} ms",
                    report["goodput_mb_per_s"], report["transfer_ms_p50"]
                );
                rows.push(Row {
                    server: name,
                    clients: n,
                    loss: percent,
                    report,
                    server_cpu_s,
                    server_retransmits: name
                        .starts_with("pxed")
                        .then(|| pxed_retransmits(&log, log_before)),
                });
            }
        }
    }
    let io_suffix = if harness_io == "socket" {
        String::new()
    } else {
        format!("-harness-{harness_io}")
    };
    let kind = if loss.iter().any(|&l| l > 0) {
        "loss"
    } else {
        "userspace"
    };
    let doc = match windowsize {
        1 => workspace.join(format!("docs/benchmarks/tftp-{kind}{io_suffix}.md")),
        w => workspace.join(format!(
            "docs/benchmarks/tftp-{kind}-window{w}{io_suffix}.md"
        )),
    };
    write_doc(&doc, &rows, options)?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Drops `percent`% of UDP each way on the client's link, replacing what
/// an earlier call set (0: none). Both directions are dropped in the
/// client's namespace, at its interface's ingress and egress hooks: the
/// server's XDP and TC programs run before its own netfilter, so a drop
/// there would never reach the ACKs the kernel tiers answer. An egress drop
/// is not reported to a UDP sender (no IP_RECVERR), as on a real network.
fn drop_udp_on_the_client_link(client: &Netns, percent: u32, work: &Path) -> anyhow::Result<()> {
    let rules = work.join("loss.nft");
    let drop = if percent > 0 {
        format!("meta l4proto udp numgen random mod 100 < {percent} drop;")
    } else {
        String::new()
    };
    let hook = |name: &str, hook: &str| {
        format!(" chain {name} {{ type filter hook {hook} device \"eth0\" priority 0; {drop} }}\n")
    };
    std::fs::write(
        &rules,
        format!(
            "table netdev loss\ndelete table netdev loss\ntable netdev loss {{\n{}{}}}\n",
            hook("arriving", "ingress"),
            hook("leaving", "egress")
        ),
    )?;
    let out = client.output("nft", &["-f", rules.to_str().unwrap()])?;
    if !out.status.success() {
        bail!(
            "nft in {}: {}",
            client.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Blocks pxed sent again over the transfers it logged after byte `from`.
fn pxed_retransmits(log: &Path, from: u64) -> u64 {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    pxe_lab::sum_logged(&text, "TFTP transfer completed", "retransmits")
}

/// How each client of a `bench tftp` run downloads.
struct Load<'a> {
    blksize: u16,
    windowsize: u16,
    harness_io: &'a str,
    rounds: usize,
}

fn run_bench(
    client: &Netns,
    bench: &Path,
    json: &Path,
    expect: &Path,
    clients: usize,
    load: &Load,
) -> anyhow::Result<serde_json::Value> {
    let n = clients.to_string();
    let b = load.blksize.to_string();
    let w = load.windowsize.to_string();
    let rounds = load.rounds.to_string();
    let out = client.output(
        bench,
        &[
            "tftp",
            "--server",
            &format!("{SERVER}:69"),
            "--file",
            "kernel",
            "--expect",
            expect.to_str().unwrap(),
            "--clients",
            &n,
            "--blksize",
            &b,
            "--windowsize",
            &w,
            "--rounds",
            &rounds,
            "--time-limit",
            "240",
            "--json",
            json.to_str().unwrap(),
            "--io",
            load.harness_io,
            "--interface",
            "eth0",
        ],
    )?;
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json).context("bench wrote no report")?)?;
    Ok(report)
}

fn write_doc(path: &Path, rows: &[Row], options: &Options) -> anyhow::Result<()> {
    let (clients, blksize, windowsize) = (options.clients, options.blksize, options.windowsize);
    let (harness_io, loss, servers, rounds) = (
        options.harness_io,
        options.loss,
        options.servers,
        options.rounds,
    );
    let mut doc = String::from("# TFTP benchmark (generated by `cargo xtask bench-tftp`; do not edit)\n\nEvery number here was produced by a command in this repository, on the machine\ndescribed with it. Re-run the command to check it.\n\n");
    let mut command =
        format!("cargo xtask bench-tftp --windowsize {windowsize} --harness-io {harness_io}");
    let list = |v: &[String]| v.join(",");
    let _ = write!(
        command,
        " --clients {}",
        list(&clients.iter().map(|c| c.to_string()).collect::<Vec<_>>())
    );
    if loss.iter().any(|&l| l > 0) {
        let _ = write!(
            command,
            " --loss {}",
            list(&loss.iter().map(|l| l.to_string()).collect::<Vec<_>>())
        );
    }
    if !servers.is_empty() {
        let _ = write!(command, " --servers {}", list(servers));
    }
    if rounds > 1 {
        let _ = write!(command, " --rounds {rounds}");
    }
    let kernel = crate::kernel_release();
    let rev = crate::git_revision();
    let _ = writeln!(doc, "## TFTP: aggregate goodput\n");
    let _ = writeln!(
        doc,
        "`{command}` (pxed at {rev}; tftpd-hpa {}; dnsmasq {}; kernel {}; {} CPUs).\n",
        peers::deb_version(&workspace_root().join("target/peers/tftpd-hpa")),
        peers::package_version("dnsmasq-base"),
        kernel,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
    );
    let _ = writeln!(
        doc,
        "Each server runs alone in a server namespace, a veth away from the client namespace where\n`bench tftp` runs {} concurrent downloads ({rounds} after another per client) of one 4 MiB file with blksize {blksize} and windowsize\n{windowsize} (1 is lockstep, as iPXE and legacy ROMs do; 4 is what UEFI asks for), verifying every byte.\nServers without RFC 7440 ignore the option and run lockstep. Server CPU is machine-wide busy time during the\nrun minus the load generator's own CPU time (kernel softirq work is charged to no process, and\ntftpd-hpa forks a child per transfer). Load generator and server share the machine's cores; dnsmasq runs\nwith `--tftp-max=4096` so its default limit of 50 transfers does not decide the result.\n",
        clients.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        doc,
        "The harness's CPU is given in two parts: its own code (user time) and kernel work done in its threads\n(system time: its system calls and, on a veth lab, packet delivery for both ends, which runs in the sender's\ncontext). `--harness-io {harness_io}`: {}.\n",
        if harness_io == "packet" { "one packet socket per core in a fanout group, batched receives (`recvmmsg`)" } else { "a UDP socket and a task per transfer, as real machines" }
    );
    let _ = writeln!(
        doc,
        "Loss: nftables drops the given share of UDP datagrams each way at the client's interface (netdev ingress and\negress hooks), so DATA and ACKs are both lost before any server program sees them. The server's interface has\n`gso_max_segs 1` in these runs, so a UDP GSO send is cut into its datagrams before the client's hooks and each\nis lost alone, as frames on a wire are. The clients retransmit their ACK after 1 s without DATA. Server retransmits are pxed's own, summed\nfrom its log over completed transfers; on a clean link every one is spurious.\n"
    );
    let _ = writeln!(
        doc,
        "Honest accounting: on a veth the receiver's softirq work (the TC program included) often runs in the\n\
         sender's context, so the server CPU above flatters the kernel tiers. Beside it: the whole machine's busy\n\
         CPU per GB delivered (the same load generator for every server, so the servers compare), and the run\n\
         time the kernel counted for pxed's programs (`BPF_ENABLE_STATS`), per GB and per run (XDP / TC).\n"
    );
    let _ = writeln!(doc, "| server | clients | loss % | goodput MB/s | transfer p50 ms | p99 ms | failed | client retransmits | server retransmits | server CPU s | MB per server CPU-s | machine CPU s per GB | programs' CPU s per GB | ns per run, XDP / TC | harness own / kernel CPU s |");
    let _ = writeln!(
        doc,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let r = &row.report;
        let mb = r["bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let per_cpu = if row.server_cpu_s > 0.0 {
            format!("{:.0}", mb / row.server_cpu_s)
        } else {
            "-".into()
        };
        let gb = mb / 1e3;
        let per_gb = |seconds: f64| {
            if gb > 0.0 {
                format!("{:.2}", seconds / gb)
            } else {
                "-".into()
            }
        };
        let machine_per_gb = per_gb(r["cpu"]["machine_busy_s"].as_f64().unwrap_or(0.0));
        let programs = ProgramCost::of(&r["bpf"]);
        let (programs_per_gb, ns_per_run) = if programs.is_empty() {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                per_gb(programs.iter().map(|p| p.seconds).sum()),
                format!(
                    "{} / {}",
                    ProgramCost::ns_of(&programs, "pxe_ingress"),
                    ProgramCost::ns_of(&programs, "pxe_tc_ingress")
                ),
            )
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {} | {} | {} | {:.2} | {} | {machine_per_gb} | {programs_per_gb} | {ns_per_run} | {:.2} / {:.2} |",
            row.server,
            row.clients,
            row.loss,
            r["goodput_mb_per_s"].as_f64().unwrap_or(0.0),
            r["transfer_ms_p50"].as_f64().unwrap_or(0.0),
            r["transfer_ms_p99"].as_f64().unwrap_or(0.0),
            r["transfers_failed"],
            r["client_retransmits"],
            row.server_retransmits
                .map_or("-".to_owned(), |n| n.to_string()),
            row.server_cpu_s,
            per_cpu,
            r["cpu"]["harness_user_s"].as_f64().unwrap_or(0.0),
            r["cpu"]["harness_s"].as_f64().unwrap_or(0.0)
                - r["cpu"]["harness_user_s"].as_f64().unwrap_or(0.0),
        );
    }
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, doc)?;
    Ok(())
}

/// One of pxed's programs over a run, from the report's `bpf` list.
struct ProgramCost {
    name: String,
    seconds: f64,
    ns_per_run: f64,
}

impl ProgramCost {
    fn of(bpf: &serde_json::Value) -> Vec<Self> {
        bpf.as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let ns = p["run_time_ns"].as_f64().unwrap_or(0.0);
                let runs = p["runs"].as_f64().unwrap_or(0.0).max(1.0);
                Self {
                    name: p["name"].as_str().unwrap_or("").to_owned(),
                    seconds: ns / 1e9,
                    ns_per_run: ns / runs,
                }
            })
            .collect()
    }

    /// `name`'s ns per run, or "-" when it did not run.
    fn ns_of(programs: &[Self], name: &str) -> String {
        programs
            .iter()
            .find(|p| p.name == name)
            .map_or("-".to_owned(), |p| format!("{:.0}", p.ns_per_run))
    }
}

fn tempdir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pxe-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
