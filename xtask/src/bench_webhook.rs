//! `cargo xtask bench-webhook`: does a slow decision webhook hold up the
//! machines pxed knows? pxed (full DHCP, kernel answers on) serves machines
//! its config names, measured with `bench dhcp` while as many strangers boot
//! at the same time, twice: without a webhook, and with `--decision-url`
//! pointing at a webhook that takes 5 s per answer (the strangers make pxed
//! ask it). Writes docs/benchmarks/webhook.md.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::Path,
    time::Duration,
};

use anyhow::Context as _;

use crate::{bench_pxe, workspace_root};

/// The webhook's delay for every machine: far past pxed's 500 ms timeout.
const WEBHOOK_DELAY: Duration = Duration::from_secs(5);
/// `bench dhcp`'s MAC prefixes: the known machines' and the strangers'.
const KNOWN_PREFIX: u8 = 0x10;
const STRANGER_PREFIX: u8 = 0x30;
const REPEATS: u8 = 4;

pub fn run(clients: usize) -> anyhow::Result<()> {
    let (pxed, bench) = crate::build_release_binaries()?;
    let work = std::env::temp_dir().join(format!("pxe-bench-webhook-{}", std::process::id()));
    let root = work.join("root");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("ipxe.efi"), b"ipxe")?;
    let config = work.join("pxed.toml");
    std::fs::write(&config, known_machines(clients))?;
    let mut rows = Vec::new();
    for with_webhook in [false, true] {
        let (report, strangers) =
            measure(&pxed, &bench, &root, &config, clients, with_webhook, &work)?;
        let p = |k: &str, q: &str| report["first"][k][q].as_f64().unwrap_or(f64::NAN);
        let r = |k: &str, q: &str| report["repeat"][k][q].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "webhook {with_webhook}: known first DORA p50/p99 {:.1}/{:.1} ms, repeat {:.1}/{:.1} ms, failed {}",
            p("dora_ms", "p50"),
            p("dora_ms", "p99"),
            r("dora_ms", "p50"),
            r("dora_ms", "p99"),
            report["failed"]
        );
        rows.push((with_webhook, report, strangers));
    }
    let doc = workspace_root().join("docs/benchmarks/webhook.md");
    std::fs::write(&doc, document(&rows, clients))?;
    eprintln!("wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A config naming the `bench dhcp` machines of KNOWN_PREFIX.
fn known_machines(clients: usize) -> String {
    let mut toml =
        String::from("default_profile = \"default\"\n\n[[profile]]\nname = \"default\"\n");
    for n in 0..clients {
        let id = (usize::from(KNOWN_PREFIX) << 16) + n;
        let _ = write!(
            toml,
            "\n[[machine]]\nmac = \"52:54:00:{:02x}:{:02x}:{:02x}\"\n",
            (id >> 16) as u8,
            (id >> 8) as u8,
            id as u8
        );
    }
    toml
}

/// One run: the known machines' `bench dhcp` report, and the strangers'.
fn measure(
    pxed: &Path,
    bench: &Path,
    root: &Path,
    config: &Path,
    clients: usize,
    with_webhook: bool,
    work: &Path,
) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let leases = work.join("pxed-leases.redb");
    let _ = std::fs::remove_file(&leases);
    let mut argv: Vec<String> = [
        pxed.to_str().unwrap(),
        "--interface",
        "eth0",
        "--boot-root",
        root.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--dhcp",
        "full",
        "--range",
        "198.18.1.0-198.18.63.254",
        "--lease-file",
        leases.to_str().unwrap(),
        "--http-port",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if with_webhook {
        argv.extend([
            "--decision-url".to_owned(),
            "http://127.0.0.1:9090".to_owned(),
        ]);
    }
    let server = bench_pxe::Server {
        name: "pxed full, kernel tiers",
        programs: vec![(argv, 67)],
    };
    let (_lab, srv, cli) = bench_pxe::start(&server, work)?;
    if with_webhook {
        let listener = srv.run(|| TcpListener::bind("127.0.0.1:9090"))??;
        std::thread::spawn(move || slow_webhook(listener));
    }
    let run = |prefix: u8, name: &str| {
        let json = work.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&json);
        let mut cmd = cli.command(bench, &[]);
        cmd.args([
            "dhcp",
            "--clients",
            &clients.to_string(),
            "--repeats",
            &REPEATS.to_string(),
        ])
        .args([
            "--mac-prefix",
            &prefix.to_string(),
            "--time-limit",
            "120",
            "--json",
        ])
        .arg(&json)
        .stdout(std::process::Stdio::null());
        (cmd.spawn(), json)
    };
    // The strangers power on with the known machines in both runs, so that
    // only the webhook differs: with it, they make pxed ask a slow webhook.
    let (strangers, strangers_json) = run(STRANGER_PREFIX, "strangers");
    let mut strangers = strangers.context("starting bench dhcp")?;
    let (known, known_json) = run(KNOWN_PREFIX, "known");
    let status = known.context("starting bench dhcp")?.wait()?;
    anyhow::ensure!(
        status.success(),
        "bench dhcp for the known machines failed ({status})"
    );
    strangers.wait()?;
    let strangers_report = serde_json::from_slice(&std::fs::read(&strangers_json)?)?;
    let known_report = serde_json::from_slice(&std::fs::read(&known_json)?)?;
    Ok((known_report, strangers_report))
}

/// Answers every `GET /v1/boot/MAC` after WEBHOOK_DELAY with a 404.
fn slow_webhook(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            std::thread::sleep(WEBHOOK_DELAY);
            let _ = (&stream).write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        });
    }
}

fn document(rows: &[(bool, serde_json::Value, serde_json::Value)], clients: usize) -> String {
    let mut doc = format!(
        "# A slow decision webhook and the machines pxed knows (generated by `cargo xtask bench-webhook`; do not edit)\n\n\
Every number here was produced by the command below on the machine described with it.\n\n\
`cargo xtask bench-webhook --clients {clients}` (pxed at {}; kernel {}; 2 CPUs).\n\n\
pxed runs full DHCP with kernel answers on; its config names {clients} machines, which `bench dhcp --repeats {REPEATS}`\n\
powers on at once (EDK2's options). In the second run pxed has `--decision-url` pointing at a webhook that answers\n\
each request after {} s. In both runs {clients} machines pxed does not know power on at the same moment (with the\n\
webhook they make pxed ask it; pxed gives up after 500 ms and lets the default profile decide, and they are\n\
answered on their retransmission), so only the webhook differs. Latencies are per exchange, DISCOVER to ACK,\n\
retransmissions included.\n\n\
| run | known machines leased | first DORA p50 / p99 ms | repeat DORA p50 / p99 ms | strangers leased |\n\
| --- | ---: | ---: | ---: | ---: |\n",
        crate::git_revision(),
        crate::kernel_release(),
        WEBHOOK_DELAY.as_secs()
    );
    for (with_webhook, known, strangers) in rows {
        let q = |r: &serde_json::Value, part: &str, p: &str| {
            r[part]["dora_ms"][p].as_f64().unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            doc,
            "| {} | {} / {clients} | {:.1} / {:.1} | {:.1} / {:.1} | {} |",
            if *with_webhook {
                "webhook taking 5 s"
            } else {
                "no webhook"
            },
            known["leased"],
            q(known, "first", "p50"),
            q(known, "first", "p99"),
            q(known, "repeat", "p50"),
            q(known, "repeat", "p99"),
            strangers["leased"],
        );
    }
    doc
}
