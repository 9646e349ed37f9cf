//! `cargo xtask bench-tftp`: pxed (userspace path), tftpd-hpa and dnsmasq, each
//! in its own throwaway namespace pair with the same boot root, measured by
//! the same `bench tftp` run in the client namespace; the table goes to
//! docs/benchmarks/tftp-userspace.md (generated; docs/BENCHMARKS.md interprets it).

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

struct Row {
    server: &'static str,
    clients: usize,
    report: serde_json::Value,
    server_cpu_s: f64,
}

pub fn run(
    clients: &[usize],
    blksize: u16,
    windowsize: u16,
    harness_io: &str,
) -> anyhow::Result<()> {
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
    let mut rows = Vec::new();
    for (name, argv) in &servers {
        let lab = Lab::new()?;
        let pxe_lab::Pair { server, client } =
            lab.pair().client_addr(pxe_lab::CLIENT_CIDR).build()?;
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
        for &n in clients {
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
                },
            )?;
            let server_cpu_s = report["cpu"]["server_s"].as_f64().unwrap_or(0.0);
            eprintln!("{name}, {n} clients: {} MB/s", report["goodput_mb_per_s"]);
            rows.push(Row {
                server: name,
                clients: n,
                report,
                server_cpu_s,
            });
        }
    }
    let io_suffix = if harness_io == "socket" {
        String::new()
    } else {
        format!("-harness-{harness_io}")
    };
    let doc = match windowsize {
        1 => workspace.join(format!("docs/benchmarks/tftp-userspace{io_suffix}.md")),
        w => workspace.join(format!(
            "docs/benchmarks/tftp-userspace-window{w}{io_suffix}.md"
        )),
    };
    write_doc(&doc, &rows, clients, blksize, windowsize, harness_io)?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// How each client of a `bench tftp` run downloads.
struct Load<'a> {
    blksize: u16,
    windowsize: u16,
    harness_io: &'a str,
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

fn write_doc(
    path: &Path,
    rows: &[Row],
    clients: &[usize],
    blksize: u16,
    windowsize: u16,
    harness_io: &str,
) -> anyhow::Result<()> {
    let mut doc = String::from("# TFTP userspace benchmark (generated by `cargo xtask bench-tftp`; do not edit)\n\nEvery number here was produced by a command in this repository, on the machine\ndescribed with it. Re-run the command to check it.\n\n");
    let kernel = crate::kernel_release();
    let rev = crate::git_revision();
    let _ = writeln!(doc, "## TFTP: aggregate goodput, userspace servers\n");
    let _ = writeln!(
        doc,
        "`cargo xtask bench-tftp --windowsize {windowsize} --harness-io {harness_io}` (pxed at {rev}; tftpd-hpa {}; dnsmasq {}; kernel {}; {} CPUs).\n",
        peers::deb_version(&workspace_root().join("target/peers/tftpd-hpa")),
        peers::package_version("dnsmasq-base"),
        kernel,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    let _ = writeln!(
        doc,
        "Each server runs alone in a server namespace, a veth away from the client namespace where\n`bench tftp` runs {} concurrent downloads of one 4 MiB file with blksize {blksize} and windowsize\n{windowsize} (1 is lockstep, as iPXE and legacy ROMs do; 4 is what UEFI asks for), verifying every byte.\nServers without RFC 7440 ignore the option and run lockstep. Server CPU is machine-wide busy time during the\nrun minus the load generator's own CPU time (kernel softirq work is charged to no process, and\ntftpd-hpa forks a child per transfer). Load generator and server share the machine's cores; dnsmasq runs\nwith `--tftp-max=4096` so its default limit of 50 transfers does not decide the result.\n",
        clients.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        doc,
        "The harness's CPU is given in two parts: its own code (user time) and kernel work done in its threads\n(system time: its system calls and, on a veth lab, packet delivery for both ends, which runs in the sender's\ncontext). `--harness-io {harness_io}`: {}.\n",
        if harness_io == "packet" { "one packet socket per core in a fanout group, batched receives (`recvmmsg`)" } else { "a UDP socket and a task per transfer, as real machines" }
    );
    let _ = writeln!(doc, "| server | clients | goodput MB/s | transfer p50 ms | p99 ms | failed | server CPU s | MB per server CPU-s | harness own / kernel CPU s |");
    let _ = writeln!(
        doc,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let r = &row.report;
        let mb = r["bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let per_cpu = if row.server_cpu_s > 0.0 {
            format!("{:.0}", mb / row.server_cpu_s)
        } else {
            "-".into()
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {:.1} | {:.0} | {:.0} | {} | {:.2} | {} | {:.2} / {:.2} |",
            row.server,
            row.clients,
            r["goodput_mb_per_s"].as_f64().unwrap_or(0.0),
            r["transfer_ms_p50"].as_f64().unwrap_or(0.0),
            r["transfer_ms_p99"].as_f64().unwrap_or(0.0),
            r["transfers_failed"],
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

fn tempdir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pxe-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
