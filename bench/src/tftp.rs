//! Concurrent TFTP downloads: each simulated client runs the client side of a
//! lockstep or windowed transfer on its own socket, verifies every byte
//! against the expected file, and retransmits its ACK on a timeout, as
//! firmware does.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::net::UdpSocket;

use pxe_lab::client::{
    tftp::{Download, Step},
    TftpProfile,
};

use crate::tftp_packet;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address, e.g. 198.18.0.1:69.
    #[arg(long)]
    server: SocketAddr,
    /// File to request (path as the server knows it).
    #[arg(long)]
    file: String,
    /// Local copy of the file: every download is compared with it.
    #[arg(long)]
    expect: PathBuf,
    /// Simultaneous clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Downloads per client, one after the other.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// blksize option to ask for (0: ask for none).
    #[arg(long, default_value_t = 1468)]
    blksize: u16,
    /// windowsize option to ask for (1: none, lockstep).
    #[arg(long, default_value_t = 1)]
    windowsize: u16,
    /// Client retransmit timeout in milliseconds (EDK2 uses 4000).
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// How the clients receive: `socket` (a socket and a task per transfer,
    /// like real machines) or `packet` (every transfer's packets from one
    /// packet socket on --interface, in batches, on one thread: several
    /// times less harness CPU per byte, for measuring fast servers).
    #[arg(long, value_enum, default_value_t = Io::Socket)]
    io: Io,
    /// The client interface `--io packet` receives on.
    #[arg(long)]
    interface: Option<String>,
}

impl Args {
    /// What each download asks for: the size first, as firmware does.
    fn ask(&self) -> TftpProfile {
        TftpProfile {
            blksize: self.blksize,
            windowsize: self.windowsize,
            tsize: true,
            timeout: Duration::from_millis(self.timeout_ms),
            retries: pxe_lab::client::tftp::MAX_RETRANSMITS,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Io {
    Socket,
    Packet,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub transfers_ok: usize,
    pub transfers_failed: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub goodput_mb_per_s: f64,
    pub transfer_ms_p50: f64,
    pub transfer_ms_p99: f64,
    pub client_retransmits: u64,
    pub failures: Vec<String>,
    pub cpu: pxe_lab::cpu::CpuUsage,
    /// pxed's programs over the run (none for servers without them).
    pub bpf: Vec<pxe_lab::bpf_stats::ProgramRun>,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let expected = Arc::new(
        std::fs::read(&args.expect)
            .with_context(|| format!("reading {}", args.expect.display()))?,
    );
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let meter = pxe_lab::cpu::CpuMeter::start(pxe_lab::cpu::LoadGenerator::ThisProcess);
    let bpf = pxe_lab::bpf_stats::BpfMeter::start();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.time_limit);
    let results = match args.io {
        Io::Socket => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_clients(&args, Arc::clone(&expected), deadline))?
        }
        Io::Packet => {
            let Some(interface) = &args.interface else {
                bail!("--io packet needs --interface (the client side's)")
            };
            let SocketAddr::V4(server) = args.server else {
                bail!("--io packet serves IPv4 only")
            };
            let plan = tftp_packet::Plan {
                interface,
                server,
                file: &args.file,
                ask: args.ask(),
                deadline,
                expected: &expected,
                clients: args.clients,
                rounds: args.rounds,
            };
            tftp_packet::run(&plan)
                .with_context(|| format!("receiving through a packet socket on {interface}"))?
        }
    };
    let mut report = report(args.clients, expected.len() as u64, results, started, meter);
    report.bpf = bpf.stop();
    println!(
        "tftp: {} clients, {} ok, {} failed, {:.1} MB in {:.2} s = {:.1} MB/s; transfer p50 {:.0} ms, p99 {:.0} ms; {} client retransmits",
        report.clients,
        report.transfers_ok,
        report.transfers_failed,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.goodput_mb_per_s,
        report.transfer_ms_p50,
        report.transfer_ms_p99,
        report.client_retransmits
    );
    println!("  {}", report.cpu.describe(report.bytes));
    for program in &report.bpf {
        println!(
            "  program {}: {} runs, {:.0} ns each, {:.3} s in all",
            program.name,
            program.runs,
            program.ns_per_run(),
            program.run_time_ns as f64 / 1e9
        );
    }
    for failure in report.failures.iter().take(10) {
        println!("  failed: {failure}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report.transfers_failed == 0)
}

async fn run_clients(
    args: &Args,
    expected: Arc<Vec<u8>>,
    deadline: Instant,
) -> anyhow::Result<tftp_packet::Results> {
    let mut tasks = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let expected = Arc::clone(&expected);
        let (server, file, ask, rounds) = (args.server, args.file.clone(), args.ask(), args.rounds);
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let one = Instant::now();
                let outcome = download(server, &file, &ask, deadline, Some(&expected)).await;
                results.push((one.elapsed(), outcome));
            }
            results
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.extend(task.await?);
    }
    Ok(results)
}

/// Sums up every download's result.
fn report(
    clients: usize,
    file_len: u64,
    results: tftp_packet::Results,
    started: Instant,
    meter: pxe_lab::cpu::CpuMeter,
) -> Report {
    let mut durations = crate::report::Latencies::default();
    let mut transfers_ok = 0;
    let mut failures = Vec::new();
    let mut retransmits = 0;
    let mut bytes = 0u64;
    for (elapsed, outcome) in results {
        match outcome {
            Ok((r, _)) => {
                durations.record(elapsed);
                transfers_ok += 1;
                retransmits += r;
                bytes += file_len;
            }
            Err(e) => failures.push(e),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Report {
        clients,
        transfers_ok,
        transfers_failed: failures.len(),
        bytes,
        seconds,
        goodput_mb_per_s: bytes as f64 / seconds / 1e6,
        transfer_ms_p50: durations.quantile_ms(0.5),
        transfer_ms_p99: durations.quantile_ms(0.99),
        client_retransmits: retransmits,
        failures,
        cpu: meter.stop(),
        bpf: Vec::new(),
    }
}

/// One download on its own socket, checked against `expected` when given;
/// returns the ACK retransmissions it needed and the bytes received.
pub(crate) async fn download(
    server: SocketAddr,
    file: &str,
    ask: &TftpProfile,
    deadline: Instant,
    expected: Option<&[u8]>,
) -> Result<(u64, u64), String> {
    let socket = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let (mut transfer, request) = Download::start(file, ask, expected);
    let mut peer = server;
    socket
        .send_to(&request, server)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 65_536];
    let mut tid_known = false;
    loop {
        let step = if Instant::now() > deadline {
            transfer.abandon("run time limit reached")
        } else {
            // A window's later blocks are usually queued already: take them
            // without arming a timer (the harness's own cost per packet counts).
            let ready = match socket.try_recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                other => Some(other),
            };
            let received = match ready {
                Some(r) => Ok(r),
                None => tokio::time::timeout(ask.timeout, socket.recv_from(&mut buf))
                    .await
                    .map_err(drop),
            };
            match received {
                Err(()) => transfer.on_timeout(),
                Ok(r) => {
                    let (len, from) = r.map_err(|e| format!("recv: {e}"))?;
                    // The server's first reply names its transfer port (TID).
                    if !tid_known {
                        if !Download::is_first_reply(&buf[..len]) {
                            continue;
                        }
                        (peer, tid_known) = (from, true);
                    } else if from != peer {
                        continue;
                    }
                    transfer.on_datagram(&buf[..len])
                }
            }
        };
        match step {
            Step::Wait => {}
            Step::Send(bytes) => {
                socket
                    .send_to(&bytes, peer)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
            }
            Step::Done { retransmits, bytes } => {
                let _ = socket.send_to(transfer.final_ack(), peer).await;
                return Ok((retransmits, bytes));
            }
            Step::Fail { why, error } => {
                if let Some(error) = error {
                    let _ = socket.send_to(&error, peer).await;
                }
                return Err(why);
            }
        }
    }
}
