//! The harness against real servers in namespaces: pxed (200 machines, iPXE
//! second stage) and dnsmasq (200 machines, TFTP) must boot everyone
//! byte-exact (dnsmasq NAKs machines it offered a taken address; they start
//! over); and against a server made to misbehave (files that differ, files
//! missing, 10% loss, a NAK for every REQUEST) its failure accounting must say
//! so. `bench dhcp` must lease 50 machines four times each from pxed, whose
//! programs answer every repeat. `bench tftp --io packet` (one packet socket
//! for every transfer) must download byte-exact from pxed's kernel tiers,
//! lockstep and windowed, and count a file that differs as failed. `bench pxe
//! --reimage` must carry 1,000 machines through pxed's reimaging workflow:
//! one bulk API call, all boot, all mark themselves provisioned, and none is
//! given a boot file when it powers on again. Two pxed on one PostgreSQL
//! must share an API change before the call returns and boot 1,000
//! machines while one of them is SIGKILLed; a PostgreSQL stopped under
//! `bench dhcp` load must cost retransmissions, not leases, and so must a
//! lease file's filesystem filling up and being freed again. Needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use pxe_lab::{
    peers::{promtool_check_metrics, Dnsmasq, Postgres, Prometheus},
    Lab, Netns,
};

const BENCH: &str = env!("CARGO_BIN_EXE_bench");

/// pxed, built beside this test by `cargo test --workspace` (or built now).
fn pxed() -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let pxed = dir.join("pxed");
    if !pxed.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "pxe-user", "--bin", "pxed"])
            .status()
            .unwrap();
        assert!(status.success(), "building pxed");
    }
    pxed
}

fn boot_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("ipxe.efi", 300_000usize),
        ("undionly.kpxe", 70_000),
        ("vmlinuz", 1_500_000),
        ("initrd.img", 3_000_000),
    ] {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(7919) >> 5) as u8 ^ name.len() as u8)
            .collect();
        std::fs::write(root.path().join(name), bytes).unwrap();
    }
    root
}

fn lab() -> (Lab, Netns, Netns) {
    let lab = Lab::new().unwrap();
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .server_addr("198.18.0.1/22")
        .client_addr("198.18.3.254/22")
        .build()
        .unwrap();
    (lab, server, client)
}

fn start_pxed(lab: &Lab, server: &Netns, root: &Path, work: &Path) {
    start_pxed_with(lab, server, root, work, &["--xdp-mode", "off", "--no-tc"]);
}

/// The line pxed logs on SIGUSR1 with its userspace DHCP counters.
fn pxed_dhcp_counters(pid: u32, log: &Path) -> String {
    // SAFETY: signals a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().rev().find(|l| l.contains("DHCP counters")) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < until,
            "no DHCP counters in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts pxed (full DHCP) in `server`; returns its PID.
fn start_pxed_with(lab: &Lab, server: &Netns, root: &Path, work: &Path, extra: &[&str]) -> u32 {
    let leases = work.join("leases.redb");
    let log = work.join("pxed.log");
    let args = [
        "--interface",
        "eth0",
        "--boot-root",
        root.to_str().unwrap(),
        "--dhcp",
        "full",
        "--tftp-max-per-client",
        "100000",
        // One address for every simulated machine: no per-source budget.
        "--admit-tftp-per-source",
        "0",
    ];
    let mut args: Vec<&str> = args.iter().chain(extra).copied().collect();
    if !extra.contains(&"--range") {
        // 1,009 addresses: room for the 1,000 machines of the largest run.
        args.extend(["--range", "198.18.0.10-198.18.3.250"]);
    }
    // Leases in a file of the run's unless the caller names a database.
    if !extra.contains(&"--lease-store") && !extra.contains(&"--lease-file") {
        args.extend(["--lease-file", leases.to_str().unwrap()]);
    }
    let pid = lab.spawn_logged(server, pxed(), &args, &log).unwrap();
    assert!(
        server.wait_for_tcp_port(80, Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    pid
}

/// Runs `bench pxe` in the client namespace and returns its JSON report.
fn bench_pxe(client: &Netns, extra: &[&str], work: &Path) -> serde_json::Value {
    run_bench(client, &["pxe"], extra, work)
}

/// Runs `bench tftp` against pxed in the client namespace and returns its JSON report.
fn bench_tftp(client: &Netns, extra: &[&str], work: &Path) -> serde_json::Value {
    run_bench(client, &["tftp", "--server", "198.18.0.1:69"], extra, work)
}

/// Runs `bench <command> --time-limit 120 --json FILE <extra>` in the client
/// namespace and returns the report.
fn run_bench(client: &Netns, command: &[&str], extra: &[&str], work: &Path) -> serde_json::Value {
    let json = work.join("report.json");
    let _ = std::fs::remove_file(&json);
    let mut args = command.to_vec();
    args.extend_from_slice(&["--time-limit", "120", "--json", json.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let out = client.output(BENCH, &args).unwrap();
    let report = std::fs::read(&json).unwrap_or_else(|_| {
        panic!(
            "no report; bench said:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_slice(&report).unwrap()
}

fn count(report: &serde_json::Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {report}"))
}

/// The operator API on the lab's server address, so the client namespace
/// (the harness, Prometheus) reaches it: a lab network is no boot network.
const API: &str = "198.18.0.1:8067";
const API_TOKEN: &str = "bench-api-token-0123456789";

/// `GET http://API{path}` with the token, from `client`; the body.
fn api_get(client: &Netns, path: &str) -> String {
    let out = client
        .output(
            "curl",
            &[
                "-sS",
                "--fail-with-body",
                "--max-time",
                "10",
                "-H",
                &format!("Authorization: Bearer {API_TOKEN}"),
                &format!("http://{API}{path}"),
            ],
        )
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "GET {path}: {body}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    body
}

/// A real Prometheus scrapes pxed (1 s) through a 200-machine boot with iPXE's
/// second stage: it must count every machine's completed second stage in
/// `pxed_boot_stage_seconds_count{stage="os"}`, the exposition must pass
/// `promtool check metrics`, and the rack view must agree.
#[test]
fn two_hundred_machines_boot_from_pxed_through_ipxe_byte_exact() {
    if !pxe_lab::privileged("two_hundred_machines_boot_from_pxed_through_ipxe_byte_exact") {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("token");
    std::fs::write(&token, format!("{API_TOKEN}\n")).unwrap();
    let inventory = work.path().join("inventory.redb");
    start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &[
            "--xdp-mode",
            "off",
            "--no-tc",
            "--api",
            API,
            "--api-token-file",
            token.to_str().unwrap(),
            "--inventory-file",
            inventory.to_str().unwrap(),
        ],
    );
    assert!(server.wait_for_tcp_port(8067, Duration::from_secs(20)));
    let scraper = tempfile::tempdir().unwrap();
    let prometheus = Prometheus::start(
        &lab,
        &client,
        scraper.path(),
        API.parse().unwrap(),
        "/metrics",
        Some(API_TOKEN),
    )
    .unwrap();
    let svg = work.path().join("run.svg");
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "200",
            "--second-stage",
            "--verify-root",
            root.path().to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        work.path(),
    );
    assert_eq!(count(&report, "failed"), 0, "{}", report["failures"]);
    assert_eq!(count(&report, "booted"), 200);
    let svg = std::fs::read_to_string(&svg).expect("an SVG plot");
    assert!(svg.starts_with("<svg"), "{svg}");
    // Curves are 2 wide; plotters draws axes and ticks as 1-wide polylines.
    let curves: Vec<&str> = svg
        .lines()
        .filter(|l| l.starts_with("<polyline") && l.contains(r#"stroke-width="2""#))
        .collect();
    assert_eq!(
        curves.len(),
        6,
        "five stage curves and one goodput curve:\n{}",
        curves
            .iter()
            .map(|c| &c[..c.len().min(120)])
            .collect::<Vec<_>>()
            .join("\n")
    );
    let stages: Vec<&str> = report["stage_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["dhcp", "nbp", "ipxe_dhcp", "script", "os"]);

    // What pxed saw, as Prometheus scraped it and as the rack view says.
    let completed = prometheus
        .wait_for(
            r#"sum(pxed_boot_stage_seconds_count{stage="os"})"#,
            |v| v >= 200.0,
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(completed, 200.0, "every second stage, counted once");
    let tftp = prometheus
        .query("sum(pxed_tftp_transfers_completed_total)")
        .unwrap();
    assert!(tftp[0].1 >= 200.0, "{tftp:?}");
    let exposition = api_get(&client, "/metrics");
    promtool_check_metrics(&exposition).unwrap();
    // Every query of the Grafana dashboard we ship runs against these metrics.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/grafana/pxed.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        // Each evaluates; the first of each panel has data (the others may
        // count what this run has none of: kernel answers, failures).
        // A rate needs two scrapes of a series: those of the last stages may
        // be a second younger than the rest.
        for (n, target) in panel["targets"].as_array().unwrap().iter().enumerate() {
            let expr = target["expr"].as_str().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let samples = loop {
                let samples = prometheus
                    .query(expr)
                    .unwrap_or_else(|e| panic!("{}: {expr}: {e}", panel["title"]));
                if n > 0 || !samples.is_empty() || std::time::Instant::now() > deadline {
                    break samples;
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            assert!(
                n > 0 || !samples.is_empty(),
                "{}: {expr} has no data",
                panel["title"]
            );
        }
    }
    let rack: serde_json::Value =
        serde_json::from_str(&api_get(&client, "/api/v1/boots?since=10m")).unwrap();
    assert_eq!(rack["machines"], 200, "{rack}");
    assert_eq!(rack["stages"]["os"], 200, "{rack}");
    assert_eq!(rack["failed"], 0, "{rack}");
    // And as an operator watches it.
    let watch = client
        .output(
            pxed(),
            &[
                "ctl",
                "--url",
                &format!("http://{API}"),
                "--token-file",
                token.to_str().unwrap(),
                "watch",
                "--once",
                "--since",
                "10m",
            ],
        )
        .unwrap();
    let shown = String::from_utf8_lossy(&watch.stdout);
    assert!(
        watch.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    assert!(
        shown.starts_with("200 machine(s) booting since "),
        "{shown}"
    );
    assert!(shown.contains(", 0 failed"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().eq(["os", "200"])),
        "{shown}"
    );
}

/// `bench flood` sends what it is asked for and says what it achieved;
/// pxed's admission control drops what is past its budgets, in the kernel.
#[test]
fn bench_flood_reports_its_rates_and_pxed_drops_what_is_past_its_budgets() {
    if !pxe_lab::privileged("bench_flood_reports_its_rates_and_pxed_drops_what_is_past_its_budgets")
    {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let pid = start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &[
            "--admit-dhcp-unknown",
            "100",
            "--admit-dhcp-unknown-burst",
            "100",
            // The harness's pxed has no per-source budget: the server's own.
            "--admit-tftp",
            "100",
            "--admit-tftp-burst",
            "100",
            "--stats-interval",
            "1",
        ],
    );
    client
        .ip(["addr", "add", "198.18.3.253/22", "dev", "eth0"])
        .unwrap();
    let json = work.path().join("flood.json");
    let out = client
        .output(
            BENCH,
            &[
                "flood",
                "--dhcp-rate",
                "20000",
                "--tftp-server",
                "198.18.0.1",
                "--tftp-source",
                "198.18.3.253",
                "--tftp-rate",
                "2000",
                "--seconds",
                "2",
                "--json",
                json.to_str().unwrap(),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let sent = |proto: &str| report[proto]["sent"].as_u64().unwrap();
    let (discovers, rrqs) = (sent("dhcp"), sent("tftp"));
    assert!(discovers >= 30_000, "{report}");
    assert!(rrqs >= 3_000, "{report}");
    let achieved = report["dhcp"]["achieved_per_s"].as_f64().unwrap();
    assert!((15_000.0..=21_000.0).contains(&achieved), "{report}");
    // SAFETY: signals a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    let log = work.path().join("pxed.log");
    let counter = |name: &str| -> u64 {
        let key = format!("{name}=");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| l.contains(&key))
            .and_then(|l| {
                l[l.find(&key)? + key.len()..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(1500));
    let dropped = counter("DROP_DHCP_UNKNOWN_OVER_RATE");
    assert!(
        dropped as f64 > discovers as f64 * 0.9,
        "{dropped} of {discovers} DISCOVERs dropped in the kernel"
    );
    let refused = counter("DROP_TFTP_OVER_RATE");
    assert!(
        refused as f64 > rrqs as f64 * 0.9,
        "{refused} of {rrqs} read requests refused"
    );
}

#[test]
fn bench_dhcp_leases_again_and_pxeds_kernel_answers_every_repeat() {
    if !pxe_lab::privileged("bench_dhcp_leases_again_and_pxeds_kernel_answers_every_repeat") {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let pid = start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &["--fastpath-memory", "16"],
    );
    let report = run_bench(
        &client,
        &["dhcp"],
        &["--clients", "50", "--repeats", "3"],
        work.path(),
    );
    assert_eq!(count(&report, "failed"), 0, "{}", report["failures"]);
    assert_eq!(count(&report, "leased"), 50);
    assert_eq!(report["first"]["exchanges"], 50);
    assert_eq!(report["repeat"]["exchanges"], 150);
    for kind in ["first", "repeat"] {
        for what in ["offer_ms", "ack_ms", "dora_ms"] {
            let p = &report[kind][what];
            let at = |q: &str| p[q].as_f64().unwrap();
            assert!(
                0.0 < at("p50")
                    && at("p50") <= at("p90")
                    && at("p90") <= at("p99")
                    && at("p99") <= at("max"),
                "{kind} {what}: {p}"
            );
        }
    }
    // pxed's userspace decided the first exchanges; its programs answered every repeat.
    let counters = pxed_dhcp_counters(pid, &work.path().join("pxed.log"));
    assert!(counters.contains("offers=50 acks=50 "), "{counters}");
}

#[test]
fn two_hundred_machines_boot_from_dnsmasq_byte_exact() {
    if !pxe_lab::privileged("two_hundred_machines_boot_from_dnsmasq_byte_exact") {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let leases = work.path().join("dnsmasq.leases");
    Dnsmasq::new()
        .interface("eth0")
        .dhcp_range("198.18.0.10,198.18.3.200,1h")
        .no_ping()
        .log_to_stderr()
        .arg("--dhcp-boot=ipxe.efi")
        .arg("--enable-tftp")
        .arg(format!("--tftp-root={}", root.path().display()))
        .arg("--tftp-max=1000")
        .lease_file(&leases)
        .spawn(&lab, &server, &work.path().join("dnsmasq.log"))
        .unwrap();
    assert!(server.wait_for_udp_port(69, Duration::from_secs(20)));
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "200",
            "--verify-root",
            root.path().to_str().unwrap(),
        ],
        work.path(),
    );
    // dnsmasq does not hold an address it offered: machines DISCOVERing
    // together are offered the same one, and all but the first to REQUEST it
    // are NAKed (its log says "address in use"). The harness starts those over.
    let log = std::fs::read_to_string(work.path().join("dnsmasq.log")).unwrap_or_default();
    let naks: Vec<&str> = log.lines().filter(|l| l.contains("DHCPNAK")).collect();
    assert_eq!(
        count(&report, "failed"),
        0,
        "{}\ndnsmasq's NAKs:\n{}",
        report["failures"],
        naks.join("\n")
    );
    assert_eq!(count(&report, "booted"), 200);
    assert_eq!(count(&report, "dhcp_naks"), naks.len() as u64);
}

/// A DHCP server that offers every machine an address and NAKs every REQUEST,
/// on port 67 of `server`'s eth0, until the returned flag is set.
fn start_naking_server(server: &Netns) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use dhcproto::{v4, Decodable, Decoder, Encodable, Encoder};
    use std::sync::{atomic::AtomicBool, atomic::Ordering, Arc};
    let socket = server
        .run(|| {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            s.set_broadcast(true)?;
            s.bind_device(Some(b"eth0"))?;
            s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 67)).into())?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            std::io::Result::Ok(std::net::UdpSocket::from(s))
        })
        .unwrap()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stopped.load(Ordering::Relaxed) {
            let Ok(len) = socket.recv(&mut buf) else {
                continue;
            };
            let Ok(request) = v4::Message::decode(&mut Decoder::new(&buf[..len])) else {
                continue;
            };
            let kind = match request.opts().msg_type() {
                Some(v4::MessageType::Discover) => v4::MessageType::Offer,
                Some(v4::MessageType::Request) => v4::MessageType::Nak,
                _ => continue,
            };
            let mut reply = v4::Message::new(
                std::net::Ipv4Addr::UNSPECIFIED,
                if kind == v4::MessageType::Offer {
                    [198, 18, 1, request.chaddr()[5]].into()
                } else {
                    std::net::Ipv4Addr::UNSPECIFIED
                },
                std::net::Ipv4Addr::UNSPECIFIED,
                std::net::Ipv4Addr::UNSPECIFIED,
                request.chaddr(),
            );
            reply.set_opcode(v4::Opcode::BootReply);
            reply.set_xid(request.xid());
            reply.opts_mut().insert(v4::DhcpOption::MessageType(kind));
            reply
                .opts_mut()
                .insert(v4::DhcpOption::ServerIdentifier([198, 18, 0, 1].into()));
            let mut bytes = Vec::new();
            reply.encode(&mut Encoder::new(&mut bytes)).unwrap();
            let _ = socket.send_to(&bytes, ("255.255.255.255", 68));
        }
    });
    stop
}

#[test]
fn a_server_that_naks_every_request_fails_each_machine_after_eight_naks() {
    if !pxe_lab::privileged("a_server_that_naks_every_request_fails_each_machine_after_eight_naks")
    {
        return;
    }
    let (_lab, server, client) = lab();
    let work = tempfile::tempdir().unwrap();
    let stop = start_naking_server(&server);
    let report = bench_pxe(&client, &["--clients", "5"], work.path());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&report, "failed"), 5, "{report}");
    let failures = report["failures"].as_object().unwrap();
    assert_eq!(
        failures.keys().collect::<Vec<_>>(),
        ["dhcp: NAKed 8 times in a row"],
        "{failures:?}"
    );
    assert_eq!(count(&report, "dhcp_naks"), 5 * 8);
    for machine in report["machines"].as_array().unwrap() {
        assert_eq!(machine["dhcp_naks"], 8, "{machine}");
        assert_eq!(
            machine["dhcp_retransmits"], 0,
            "a NAK is an answer: {machine}"
        );
    }
}

#[test]
fn failures_are_counted_with_their_reason_when_the_server_misbehaves() {
    if !pxe_lab::privileged("failures_are_counted_with_their_reason_when_the_server_misbehaves") {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    // What the machines expect differs from what the server serves: the NBP
    // is corrupted, then the initrd is gone.
    let expected = boot_root();
    std::fs::write(root.path().join("ipxe.efi"), b"corrupted boot program").unwrap();
    start_pxed(&lab, &server, root.path(), work.path());
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "20",
            "--second-stage",
            "--verify-root",
            expected.path().to_str().unwrap(),
        ],
        work.path(),
    );
    assert_eq!(count(&report, "booted"), 0);
    assert_eq!(count(&report, "failed"), 20);
    let failures = report["failures"].as_object().unwrap();
    assert!(
        failures
            .keys()
            .any(|k| k.starts_with("nbp: ") && k.contains("differ")),
        "{failures:?}"
    );

    std::fs::copy(
        expected.path().join("ipxe.efi"),
        root.path().join("ipxe.efi"),
    )
    .unwrap();
    std::fs::remove_file(root.path().join("initrd.img")).unwrap();
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "20",
            "--second-stage",
            "--mac-prefix",
            "32",
            "--verify-root",
            expected.path().to_str().unwrap(),
        ],
        work.path(),
    );
    let log = std::fs::read_to_string(work.path().join("pxed.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().collect();
    assert_eq!(
        count(&report, "failed"),
        20,
        "{}",
        tail[tail.len().saturating_sub(25)..].join("\n")
    );
    let failures = report["failures"].as_object().unwrap();
    assert!(
        failures
            .keys()
            .any(|k| k.starts_with("os: ") && k.contains("404")),
        "{failures:?}\n{}",
        tail[tail.len().saturating_sub(40)..].join("\n")
    );

    // 10% of UDP dropped on arrival in the client namespace: the machines
    // still boot. pxed repairs those losses itself, long before a client's
    // 4 s timeout, so the first three RRQs are dropped as they leave too
    // (at the interface's egress, as a network loses them: an output-hook
    // drop would fail the send): only the client can repair those, and the
    // harness counts it.
    std::fs::copy(
        expected.path().join("initrd.img"),
        root.path().join("initrd.img"),
    )
    .unwrap();
    let rules = work.path().join("loss.nft");
    std::fs::write(&rules, "table inet loss {\n chain input {\n type filter hook input priority 0;\n meta l4proto udp numgen random mod 100 < 10 drop;\n }\n}\ntable netdev rrqloss {\n chain leaving {\n type filter hook egress device \"eth0\" priority 0;\n udp dport 69 limit rate 1/hour burst 3 packets drop;\n }\n}\n").unwrap();
    let nft = client
        .output("nft", &["-f", rules.to_str().unwrap()])
        .unwrap();
    assert!(nft.status.success());
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "20",
            "--firmware",
            "bios",
            "--mac-prefix",
            "48",
            "--verify-root",
            expected.path().to_str().unwrap(),
        ],
        work.path(),
    );
    let log = std::fs::read_to_string(work.path().join("pxed.log")).unwrap_or_default();
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DHCP") || l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert_eq!(
        count(&report, "failed"),
        0,
        "{}\n{}",
        report["failures"],
        tail[tail.len().saturating_sub(60)..].join("\n")
    );
    assert!(
        count(&report, "tftp_retransmits") >= 3,
        "three lost RRQs must show as client retransmissions: {report}"
    );

    // UEFI's windowed transfers under the same loss: every lost block leaves
    // a gap that the client must report (RFC 7440 §4) for the server to
    // resume after it; all must still complete byte-exact.
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "20",
            "--firmware",
            "uefi",
            "--mac-prefix",
            "64",
            "--verify-root",
            expected.path().to_str().unwrap(),
        ],
        work.path(),
    );
    assert_eq!(count(&report, "failed"), 0, "{}", report["failures"]);
}

#[test]
fn packet_io_downloads_byte_exact_from_the_kernel_tiers_and_counts_a_wrong_file() {
    if !pxe_lab::privileged(
        "packet_io_downloads_byte_exact_from_the_kernel_tiers_and_counts_a_wrong_file",
    ) {
        return;
    }
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &["--fastpath-memory", "16"],
    );
    let vmlinuz = root.path().join("vmlinuz");
    let expect = vmlinuz.to_str().unwrap();
    for (window, clients, rounds) in [("4", "100", "2"), ("1", "20", "2")] {
        let report = bench_tftp(
            &client,
            &[
                "--io",
                "packet",
                "--interface",
                "eth0",
                "--file",
                "vmlinuz",
                "--expect",
                expect,
                "--windowsize",
                window,
                "--clients",
                clients,
                "--rounds",
                rounds,
            ],
            work.path(),
        );
        let want: u64 = clients.parse::<u64>().unwrap() * rounds.parse::<u64>().unwrap();
        assert_eq!(
            count(&report, "transfers_failed"),
            0,
            "windowsize {window}: {report}"
        );
        assert_eq!(
            count(&report, "transfers_ok"),
            want,
            "windowsize {window}: {report}"
        );
        assert_eq!(count(&report, "bytes"), want * 1_500_000);
    }
    // Expecting another file: every download fails, each with its reason.
    let wrong = root.path().join("initrd.img");
    let report = bench_tftp(
        &client,
        &[
            "--io",
            "packet",
            "--interface",
            "eth0",
            "--file",
            "vmlinuz",
            "--expect",
            wrong.to_str().unwrap(),
            "--clients",
            "10",
        ],
        work.path(),
    );
    assert_eq!(count(&report, "transfers_ok"), 0, "{report}");
    assert_eq!(count(&report, "transfers_failed"), 10, "{report}");
    let failures = report["failures"].as_array().unwrap();
    assert!(
        failures.iter().all(|f| f
            .as_str()
            .unwrap()
            .contains("differ from the expected file")),
        "{report}"
    );
}

#[test]
fn a_thousand_machines_are_reimaged_then_mark_themselves_done_and_boot_no_file_again() {
    if !pxe_lab::privileged(
        "a_thousand_machines_are_reimaged_then_mark_themselves_done_and_boot_no_file_again",
    ) {
        return;
    }
    let (lab, server, client) = lab();
    // Small files: this is about the workflow, not the bytes.
    let root = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("ipxe.efi", 20_000usize),
        ("vmlinuz", 40_000),
        ("initrd.img", 60_000),
    ] {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ name.len() as u8)
            .collect();
        std::fs::write(root.path().join(name), bytes).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let path = |name: &str| work.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("token"), format!("{API_TOKEN}\n")).unwrap();
    std::fs::write(
        path("pxed.toml"),
        "default_profile = \"default\"\n\
         [[profile]]\nname = \"default\"\n\
         [[profile]]\nname = \"installer\"\n\
         cmdline = \"console=ttyS0 pxed.done={{provision_url}} pxed.token={{provision_token}}\"\n",
    )
    .unwrap();
    let pid = start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &[
            "--config",
            &path("pxed.toml"),
            "--inventory-file",
            &path("inventory.redb"),
            "--api",
            API,
            "--api-token-file",
            &path("token"),
        ],
    );
    assert!(
        server.wait_for_tcp_port(8067, Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(path("pxed.log")).unwrap_or_default()
    );
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "1000",
            "--mac-prefix",
            "80",
            "--reimage",
            "installer",
            "--api",
            "http://198.18.0.1:8067",
            "--api-token-file",
            &path("token"),
            "--verify-root",
            root.path().to_str().unwrap(),
        ],
        work.path(),
    );
    let log = std::fs::read_to_string(path("pxed.log")).unwrap_or_default();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert_eq!(
        count(&report, "failed"),
        0,
        "{}\n{}",
        report["failures"],
        warnings[warnings.len().saturating_sub(40)..].join("\n")
    );
    assert_eq!(count(&report, "booted"), 1000);
    let reimage = &report["reimage"];
    assert_eq!(count(reimage, "bulk_changed"), 1000, "{reimage}");
    assert_eq!(count(reimage, "provisioned"), 1000, "{reimage}");
    assert_eq!(count(reimage, "second_boot_answered"), 1000, "{reimage}");
    assert_eq!(count(reimage, "second_boot_boot_files"), 0, "{reimage}");
    let stages: Vec<&str> = report["stage_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "dhcp",
            "nbp",
            "ipxe_dhcp",
            "script",
            "os",
            "provisioned",
            "second_dhcp"
        ]
    );
    // pxed's side: each machine marked itself, through the boot network's listener.
    assert_eq!(
        log.matches("provisioned: the machine boots from its disk from now on")
            .count(),
        1000
    );
    // And the second power-ons were decided as local boots, not boot files.
    let counters = pxed_dhcp_counters(pid, &work.path().join("pxed.log"));
    assert!(counters.contains("naks=0"), "{counters}");
    // pxed's timeline of the first machine: the reimaging boot through
    // `provisioned`, then the power-on that got an address and no file.
    let boots: serde_json::Value = serde_json::from_str(&api_get(
        &client,
        "/api/v1/machines/52:54:00:50:00:00/boots",
    ))
    .unwrap();
    let boots = boots["boots"].as_array().unwrap();
    assert_eq!(boots.len(), 2, "{boots:?}");
    assert_eq!(boots[0]["stage"], "provisioned", "{}", boots[0]);
    let stages = boots[0]["stages"].as_object().unwrap();
    let order: Vec<&str> = stages.keys().map(String::as_str).collect();
    // No `nbp`: the harness's machines share one address for TFTP, so pxed
    // cannot tell whose NBP it served (the firmware test's machines can be told).
    for stage in [
        "power_on",
        "dhcp",
        "ipxe_dhcp",
        "script",
        "os",
        "provisioned",
    ] {
        assert!(order.contains(&stage), "{stage} missing from {}", boots[0]);
    }
    assert_eq!(boots[1]["stage"], "dhcp", "{}", boots[1]);
    assert!(boots[1]["failure"].is_null(), "{}", boots[1]);
}

/// `curl` against an API at `address` from `ns` with the token: status and body.
fn api_call(
    ns: &Netns,
    address: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let url = format!("http://{address}{path}");
    let auth = format!("Authorization: Bearer {API_TOKEN}");
    let mut args = vec!["-sS", "--max-time", "10", "-X", method, "-H", &auth];
    args.extend(["-w", "\n%{http_code}"]);
    if let Some(body) = body {
        args.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    args.push(&url);
    let out = ns.output("curl", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// Two pxed in full mode on one bridge share one PostgreSQL (the test's
/// own, on a Unix socket). An API change made through one is in force on
/// the other when the call returns: machines booted from both are then
/// refused a boot file by both, kernel templates included. Then 1,000
/// machines power on and one server is SIGKILLed while it serves them:
/// every machine boots (those the dead server was serving power on again,
/// as firmware does), the survivor serves new and known machines, and
/// no address is given to two machines, on the wire or in the database.
#[test]
fn two_servers_on_one_database_share_the_api_and_survive_one_being_killed() {
    if !pxe_lab::privileged(
        "two_servers_on_one_database_share_the_api_and_survive_one_being_killed",
    ) || !pxe_lab::have_file("/usr/bin/psql", "postgresql")
    {
        return;
    }
    let lab = Lab::new().unwrap();
    let [a, b, client]: [Netns; 3] = lab
        .segment(&[
            ("srv-a", Some("198.18.0.1/21")),
            ("srv-b", Some("198.18.0.2/21")),
            ("cli", Some("198.18.7.254/21")),
        ])
        .unwrap()
        .try_into()
        .unwrap();
    let db_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(db_dir.path()).unwrap();
    let url = pg.url("postgres");
    let root = tempfile::tempdir().unwrap();
    let nbp: Vec<u8> = (0..200_000usize).map(|i| (i % 253) as u8).collect();
    std::fs::write(root.path().join("ipxe.efi"), nbp).unwrap();
    let (work_a, work_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut pids = Vec::new();
    for (ns, work, api) in [
        (&a, &work_a, "198.18.0.1:8067"),
        (&b, &work_b, "198.18.0.2:8067"),
    ] {
        let token = work.path().join("token");
        std::fs::write(&token, format!("{API_TOKEN}\n")).unwrap();
        let inventory = work.path().join("inventory.redb");
        pids.push(start_pxed_with(
            &lab,
            ns,
            root.path(),
            work.path(),
            &[
                // 2,025 addresses: the 1,000 machines, and the 20 before them.
                "--range",
                "198.18.0.10-198.18.7.250",
                "--lease-store",
                &url,
                "--api",
                api,
                "--api-token-file",
                token.to_str().unwrap(),
                "--inventory-file",
                inventory.to_str().unwrap(),
            ],
        ));
    }
    let log = |work: &tempfile::TempDir| {
        std::fs::read_to_string(work.path().join("pxed.log")).unwrap_or_default()
    };
    // Each must know the other is there before changes are waited for.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !(log(&work_a).contains("live servers on this database changed")
        && log(&work_b).contains("live servers on this database changed"))
    {
        assert!(
            std::time::Instant::now() < until,
            "A:\n{}\nB:\n{}",
            log(&work_a),
            log(&work_b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // 20 machines boot from whichever server answers first; both offer, so
    // both hold templates for some of them.
    let first = bench_pxe(
        &client,
        &["--clients", "20", "--mac-prefix", "32"],
        work_a.path(),
    );
    assert_eq!(count(&first, "booted"), 20, "{first}");
    // Each server knows the other's leases within a second (the feed's bound).
    let leased_here = |ns: &Netns, api: &str| {
        let (_, body) = api_call(ns, api, "GET", "/api/v1/leases", None);
        body.matches("52:54:00:20:").count()
    };
    let until = std::time::Instant::now() + Duration::from_secs(1);
    while leased_here(&a, "198.18.0.1:8067") < 20 || leased_here(&b, "198.18.0.2:8067") < 20 {
        assert!(
            std::time::Instant::now() < until,
            "A knows {} of the 20 leases, B {}",
            leased_here(&a, "198.18.0.1:8067"),
            leased_here(&b, "198.18.0.2:8067")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Through A's API: none of them may netboot any more.
    let macs: Vec<String> = first["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("\"{}\"", m["mac"].as_str().unwrap()))
        .collect();
    let bulk = format!(
        r#"{{"macs": [{}], "set": {{"netboot": false}}}}"#,
        macs.join(",")
    );
    let (status, body) = api_call(
        &a,
        "198.18.0.1:8067",
        "POST",
        "/api/v1/machines:bulk",
        Some(&bulk),
    );
    assert_eq!(status, 200, "{body}");
    // B has it the moment A's call returned.
    let probe = macs[7].trim_matches('"');
    let (status, body) = api_call(
        &b,
        "198.18.0.2:8067",
        "GET",
        &format!("/api/v1/machines/{probe}"),
        None,
    );
    assert_eq!(status, 200, "{body}\nB:\n{}", log(&work_b));
    assert!(body.contains(r#""netboot":false"#), "{body}");
    let again = bench_pxe(
        &client,
        &["--clients", "20", "--mac-prefix", "32"],
        work_a.path(),
    );
    let refused = again["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["failure"].as_str() == Some("dhcp: no boot file offered"))
        .count();
    assert_eq!(
        refused, 20,
        "no server, kernel or userspace, still offers them a boot file: {again}"
    );

    // 1,000 machines power on; A dies while it serves them.
    let a_pid = pids[0];
    let a_log = work_a.path().join("pxed.log");
    let acks = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .matches("→ ACK")
            .count()
    };
    let acked_before = acks(&a_log);
    let killer = std::thread::spawn(move || {
        // Once A has ACKed a few of them: transfers and offers of its are
        // in flight. Not more: which server a machine takes is a race, and
        // A has won as few as 4 of the 1,000 (B answered first for the rest).
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while acks(&a_log) < acked_before + A_ACKS_BEFORE_KILL && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let took_part = acks(&a_log) >= acked_before + A_ACKS_BEFORE_KILL;
        // SAFETY: kills the pxed this test started.
        assert_eq!(unsafe { libc::kill(a_pid as i32, libc::SIGKILL) }, 0);
        took_part
    });
    let work = tempfile::tempdir().unwrap();
    let report = bench_pxe(
        &client,
        &[
            "--clients",
            "1000",
            "--mac-prefix",
            "48",
            "--boot-attempts",
            "4",
            "--verify-root",
            root.path().to_str().unwrap(),
        ],
        work.path(),
    );
    let a_took_part = killer.join().unwrap();
    let survivor = log(&work_b);
    let trouble: Vec<&str> = survivor
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(40)
        .collect();
    assert_eq!(
        count(&report, "booted"),
        1000,
        "{}\nB's warnings:\n{}",
        report["failures"],
        trouble.join("\n")
    );
    let machines = report["machines"].as_array().unwrap();
    let served_by = |server: &str| machines.iter().filter(|m| m["server"] == server).count();
    eprintln!(
        "two servers, A killed: {} booted, {} after a retry; A served {}, B {}; {:.1} s",
        report["booted"],
        report["retried"],
        served_by("198.18.0.1"),
        served_by("198.18.0.2"),
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    // A machine A was serving when it died ends its boot on B, so A may
    // have finished none: that A served is read from its log.
    assert!(
        a_took_part && served_by("198.18.0.2") > 0,
        "both served: A ACKed {A_ACKS_BEFORE_KILL} of the 1,000 before it was killed: {a_took_part}"
    );
    assert!(
        count(&report, "retried") > 0,
        "the kill interrupted boots: {} retried; A served {}, B {}",
        report["retried"],
        served_by("198.18.0.1"),
        served_by("198.18.0.2")
    );
    // On the wire: no address went to two machines.
    let mut addresses: Vec<&str> = machines
        .iter()
        .map(|m| m["address"].as_str().unwrap())
        .collect();
    addresses.sort_unstable();
    let before = addresses.len();
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        before,
        "an address was given to two machines"
    );
    // In the database: each machine holds the address it booted with, and
    // no address or active machine is there twice.
    let rows = pg
        .psql(
            "postgres",
            "SELECT mac, host(ip) FROM pxed_leases WHERE state = 'active' AND mac LIKE '52:54:00:30:%'",
        )
        .unwrap();
    let held: std::collections::HashMap<&str, &str> =
        rows.lines().filter_map(|l| l.split_once('|')).collect();
    for m in machines {
        let (mac, address) = (m["mac"].as_str().unwrap(), m["address"].as_str().unwrap());
        assert_eq!(held.get(mac), Some(&address), "{mac} in the database");
    }
    let twice = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM (SELECT mac FROM pxed_leases WHERE state = 'active' \
             GROUP BY mac HAVING count(*) > 1) AS held_twice",
        )
        .unwrap();
    assert_eq!(twice.trim(), "0", "a machine holds two active leases");
    assert!(
        survivor.contains("live servers on this database changed"),
        "{survivor}"
    );
}

/// pxed on PostgreSQL under `bench dhcp` load, every exchange decided in
/// userspace (each ACK a write). PostgreSQL is stopped mid-run and started
/// again 2 s later: the machines retransmit through the outage and every
/// one ends with its lease, pxed reconnects with no restart and says so,
/// and every lease the machines were ACKed is in the database.
#[test]
fn a_database_stopped_under_load_costs_retransmissions_not_leases() {
    if !pxe_lab::privileged("a_database_stopped_under_load_costs_retransmissions_not_leases")
        || !pxe_lab::have_file("/usr/bin/psql", "postgresql")
    {
        return;
    }
    let (lab, server, client) = lab();
    let db_dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(db_dir.path()).unwrap();
    let url = pg.url("postgres");
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let inventory = work.path().join("inventory.redb");
    start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &[
            "--xdp-mode",
            "off",
            "--no-tc",
            "--lease-store",
            &url,
            "--inventory-file",
            inventory.to_str().unwrap(),
        ],
    );
    let log_path = work.path().join("pxed.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let bench = BenchDhcp::start(&client, &["--repeats", "250"], work.path());
    wait_for_log(&log_path, "→ ACK", 300);
    pg.stop().unwrap();
    wait_for_log(&log_path, STORE_FAILING, 1);
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again().unwrap();
    let report = bench.finish();
    assert_eq!(count(&report, "leased"), 100, "{}", report["failures"]);
    assert!(count(&report, "retransmits") > 0, "the outage was felt");
    let text = log();
    assert!(text.contains("database reachable again"), "{text}");
    assert_eq!(text.matches(STORE_FAILING).count(), 1, "said once: {text}");
    assert!(text.contains("lease store writable again"), "{text}");
    let held = pg
        .psql(
            "postgres",
            "SELECT count(DISTINCT mac) FROM pxed_leases WHERE state = 'active' AND mac LIKE '52:54:00:10:%'",
        )
        .unwrap();
    assert_eq!(
        held.trim(),
        "100",
        "every machine's lease is in the database"
    );
}

/// How many ACKs server A has sent the 1,000 machines when the
/// two-server test kills it.
const A_ACKS_BEFORE_KILL: usize = 4;

/// What pxed logs, once, when its lease store starts failing.
const STORE_FAILING: &str = "lease store failing, requests that need a write go unanswered";

/// Waits (up to 60 s) until `log` holds `what` at least `n` times.
fn wait_for_log(log: &Path, what: &str, n: usize) {
    if let Err(text) = log_holds_within(log, what, n) {
        panic!("no {n} × {what:?} in:\n{text}");
    }
}

/// [`wait_for_log`] for pxed `pid`: if the log falls silent, the failure
/// says where each of its threads waits (a store stuck in the kernel
/// shows in its wchan and stack).
fn wait_for_log_of(pid: u32, log: &Path, what: &str, n: usize) {
    if let Err(text) = log_holds_within(log, what, n) {
        panic!(
            "no {n} × {what:?}; pxed's threads:\n{}\nits log:\n{text}",
            threads_of(pid)
        );
    }
}

/// `Err(the log's text)` if `log` does not hold `what` `n` times within 60 s.
fn log_holds_within(log: &Path, what: &str, n: usize) -> Result<(), String> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= n {
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each thread of `pid`: name, state, wchan and kernel stack.
fn threads_of(pid: u32) -> String {
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task: pxed is gone)");
    };
    tasks
        .filter_map(Result::ok)
        .map(|task| {
            let dir = task.path();
            let state = read(dir.join("stat"))
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("?").to_owned())
                .unwrap_or_default();
            format!(
                "{} [{}] wchan={}\n{}",
                read(dir.join("comm")).trim(),
                state,
                read(dir.join("wchan")).trim(),
                read(dir.join("stack"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `bench dhcp` (100 machines) running in the background in a client namespace.
struct BenchDhcp {
    child: std::process::Child,
    json: PathBuf,
}

impl BenchDhcp {
    fn start(client: &Netns, extra: &[&str], work: &Path) -> Self {
        let json = work.join("dhcp.json");
        let mut args = vec!["dhcp", "--clients", "100", "--time-limit", "120", "--json"];
        args.push(json.to_str().unwrap());
        args.extend_from_slice(extra);
        let child = client
            .command(BENCH, &args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Self { child, json }
    }

    /// Waits for it to end; its report (it must have succeeded).
    fn finish(mut self) -> serde_json::Value {
        let status = self.child.wait().unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.json).unwrap()).unwrap();
        assert!(status.success(), "{}", report["failures"]);
        report
    }
}

/// A small tmpfs of the test's own, unmounted when dropped (also on failure).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The experiment of issue 18: pxed's lease file on a 3 MiB filesystem; 30
/// machines lease; the filesystem fills up; 100 new machines ask (every
/// exchange in userspace). pxed says once that its store is failing and
/// answers nothing that needs a write; the space is freed 2 s later and
/// pxed carries on by itself, says so, and every machine ends with its
/// lease. Stopped, its lease file holds every one of them.
#[test]
fn a_full_disk_freed_again_costs_retransmissions_not_leases() {
    if !pxe_lab::privileged("a_full_disk_freed_again_costs_retransmissions_not_leases") {
        return;
    }
    let small = tempfile::tempdir().unwrap();
    let _mount = Tmpfs::mount(small.path(), "3m");
    let filler = small.path().join("filler");
    store_outage_costs_retransmissions_not_leases(
        &small.path().join("leases.redb"),
        || {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0x55u8; 64 * 1024];
            while file.write_all(&chunk).is_ok() {}
        },
        || std::fs::remove_file(&filler).unwrap(),
    );
}

/// The same with an I/O error: the lease file on a FUSE filesystem that
/// answers every write and fsync with EIO for 2 s under load, as a failing
/// disk does.
#[test]
fn an_io_error_under_load_costs_retransmissions_not_leases() {
    if !pxe_lab::privileged("an_io_error_under_load_costs_retransmissions_not_leases") {
        return;
    }
    let backing = tempfile::tempdir().unwrap();
    let at = tempfile::tempdir().unwrap();
    let fs = pxe_lab::faulty_fs::FaultyFs::mount(backing.path(), at.path())
        .expect("mounting the test's FUSE filesystem (needs /dev/fuse and fusermount3)");
    let log = store_outage_costs_retransmissions_not_leases(
        &at.path().join("leases.redb"),
        || fs.fail_changes(true),
        || fs.fail_changes(false),
    );
    assert!(fs.refused() > 0, "the filesystem failed the store's writes");
    // Every write failed until the recovery, so no commit could succeed
    // before it: an ACK to one of the 100 before then was never on disk
    // (a write that fails drops its batch, and its commit must fail too).
    let recovered = log
        .find("lease store writable again")
        .expect("pxed said it recovered");
    let early = log[..recovered]
        .lines()
        .filter(|l| l.contains("→ ACK") && l.contains("from 52:54:00:10:"))
        .count();
    assert_eq!(early, 0, "ACKs while every write failed: {log}");
}

/// pxed (full mode, every exchange in userspace) with its lease file at
/// `leases`: 30 machines lease, `fail` breaks the storage, 100 new machines
/// ask, and 2 s after pxed said its store fails, `recover` mends it. Every
/// machine must end with its lease, pxed must say so once each way, and the
/// file, read after pxed stopped, must hold every lease it handed out.
/// Returns pxed's log.
fn store_outage_costs_retransmissions_not_leases(
    leases: &Path,
    fail: impl FnOnce(),
    recover: impl FnOnce(),
) -> String {
    let (lab, server, client) = lab();
    let root = boot_root();
    let work = tempfile::tempdir().unwrap();
    let pid = start_pxed_with(
        &lab,
        &server,
        root.path(),
        work.path(),
        &[
            "--xdp-mode",
            "off",
            "--no-tc",
            "--lease-file",
            leases.to_str().unwrap(),
        ],
    );
    let log_path = work.path().join("pxed.log");
    let first = run_bench(
        &client,
        &["dhcp"],
        &["--clients", "30", "--mac-prefix", "32"],
        work.path(),
    );
    assert_eq!(count(&first, "leased"), 30, "{first}");

    fail();
    let bench = BenchDhcp::start(&client, &["--repeats", "2"], work.path());
    wait_for_log_of(pid, &log_path, STORE_FAILING, 1);
    std::thread::sleep(Duration::from_secs(2));
    recover();
    let report = bench.finish();
    assert_eq!(count(&report, "leased"), 100, "{}", report["failures"]);
    assert!(count(&report, "retransmits") > 0, "the outage was felt");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(text.matches(STORE_FAILING).count(), 1, "said once: {text}");
    assert!(text.contains("lease store writable again"), "{text}");

    // What the file holds is what the machines were told.
    // SAFETY: stops the pxed this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    if let Some(mut child) = lab.take_child(pid) {
        child.wait().unwrap();
    }
    use pxe_user::lease::LeaseStore as _;
    let store = pxe_user::lease::RedbLeaseStore::open(leases).unwrap();
    let held: std::collections::HashSet<[u8; 6]> = store
        .load_all()
        .unwrap()
        .into_iter()
        .filter(|l| l.state == pxe_user::lease::LeaseState::Active)
        .map(|l| l.mac)
        .collect();
    let of_prefix = |p: u8| held.iter().filter(|m| m[..4] == [0x52, 0x54, 0, p]).count();
    assert_eq!(
        of_prefix(0x10),
        100,
        "the 100 that asked while the store failed"
    );
    assert_eq!(of_prefix(0x20), 30, "the 30 before");
    text
}
