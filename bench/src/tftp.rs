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
use pxe_user::wire::tftp::{ErrorCode, Mode, Repr, TftpOption};
use serde::Serialize;
use tokio::net::UdpSocket;

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
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let expected = Arc::new(
        std::fs::read(&args.expect)
            .with_context(|| format!("reading {}", args.expect.display()))?,
    );
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_clients(&args, expected))?;
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
    for failure in report.failures.iter().take(10) {
        println!("  failed: {failure}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report.transfers_failed == 0)
}

async fn run_clients(args: &Args, expected: Arc<Vec<u8>>) -> anyhow::Result<Report> {
    let meter = pxe_lab::cpu::CpuMeter::start(pxe_lab::cpu::LoadGenerator::ThisProcess);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.time_limit);
    let mut tasks = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        let expected = Arc::clone(&expected);
        let (server, file, blksize, windowsize, rounds) = (
            args.server,
            args.file.clone(),
            args.blksize,
            args.windowsize,
            args.rounds,
        );
        let timeout = Duration::from_millis(args.timeout_ms);
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let one = Instant::now();
                let outcome = download(
                    server,
                    &file,
                    blksize,
                    windowsize,
                    timeout,
                    deadline,
                    Some(&expected),
                )
                .await
                .map(|(r, _)| r);
                results.push((one.elapsed(), outcome));
            }
            results
        }));
    }
    let mut durations = Vec::new();
    let mut failures = Vec::new();
    let mut retransmits = 0;
    let mut bytes = 0u64;
    for task in tasks {
        for (elapsed, outcome) in task.await? {
            match outcome {
                Ok(r) => {
                    durations.push(elapsed.as_secs_f64() * 1000.0);
                    retransmits += r;
                    bytes += expected.len() as u64;
                }
                Err(e) => failures.push(e),
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    durations.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        durations
            .get(((durations.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Report {
        clients: args.clients,
        transfers_ok: durations.len(),
        transfers_failed: failures.len(),
        bytes,
        seconds,
        goodput_mb_per_s: bytes as f64 / seconds / 1e6,
        transfer_ms_p50: percentile(0.5),
        transfer_ms_p99: percentile(0.99),
        client_retransmits: retransmits,
        failures,
        cpu: meter.stop(),
    })
}

/// One download, checked against `expected` when given; returns the ACK
/// retransmissions it needed and the bytes received.
pub(crate) async fn download(
    server: SocketAddr,
    file: &str,
    blksize: u16,
    windowsize: u16,
    timeout: Duration,
    deadline: Instant,
    expected: Option<&[u8]>,
) -> Result<(u64, u64), String> {
    let socket = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let blk = blksize.to_string();
    let win = windowsize.to_string();
    let mut options = vec![TftpOption {
        name: "tsize",
        value: "0",
    }];
    if blksize != 0 {
        options.push(TftpOption {
            name: "blksize",
            value: &blk,
        });
    }
    if windowsize > 1 {
        options.push(TftpOption {
            name: "windowsize",
            value: &win,
        });
    }
    let request = Repr::ReadRequest {
        filename: file,
        mode: Mode::Octet,
        options,
    }
    .to_vec();
    let mut last_sent = request.clone();
    let mut peer = server;
    socket
        .send_to(&request, server)
        .await
        .map_err(|e| format!("send: {e}"))?;

    let mut buf = vec![0u8; 65_536];
    let mut block_size = 512usize;
    let mut window = 1u16;
    let mut received = 0usize;
    let mut expected_block: u16 = 1;
    let mut in_window = 0u16;
    let mut retransmits = 0u64;
    let mut tid_known = false;
    // Whether a DATA block arrived in order yet (before that, resend the request or ACK 0).
    let mut received_any = false;
    loop {
        if Instant::now() > deadline {
            abort(&socket, peer, "run time limit reached").await;
            return Err(format!(
                "{file}: run time limit reached at {received} bytes"
            ));
        }
        // A window's later blocks are usually queued already: take them
        // without arming a timer (the harness's own cost per packet counts).
        let ready = match socket.try_recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            other => Some(other),
        };
        let received_now = match ready {
            Some(r) => Ok(r),
            None => tokio::time::timeout(timeout, socket.recv_from(&mut buf))
                .await
                .map_err(drop),
        };
        let (len, from) = match received_now {
            Ok(r) => r.map_err(|e| format!("recv: {e}"))?,
            Err(()) => {
                retransmits += 1;
                if retransmits > 50 {
                    abort(&socket, peer, "no answer").await;
                    return Err(format!(
                        "{file}: no answer after 50 retries at {received} bytes"
                    ));
                }
                // RFC 7440 §4: on a timeout, acknowledge the last block received in order.
                if received_any {
                    last_sent = Repr::Ack {
                        block: expected_block.wrapping_sub(1),
                    }
                    .to_vec();
                    in_window = 0;
                }
                socket
                    .send_to(&last_sent, peer)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
                continue;
            }
        };
        if !tid_known {
            peer = from;
            tid_known = true;
        } else if from != peer {
            continue;
        }
        match Repr::parse(&buf[..len]) {
            Ok(Repr::OptionAck { options }) => {
                for o in &options {
                    match o.name {
                        "blksize" => {
                            block_size = o
                                .value
                                .parse()
                                .map_err(|_| "bad blksize in OACK".to_owned())?
                        }
                        "windowsize" => {
                            window = o
                                .value
                                .parse()
                                .map_err(|_| "bad windowsize in OACK".to_owned())?
                        }
                        _ => {}
                    }
                }
                last_sent = Repr::Ack { block: 0 }.to_vec();
                socket
                    .send_to(&last_sent, peer)
                    .await
                    .map_err(|e| format!("send: {e}"))?;
            }
            Ok(Repr::Data { block, payload }) => {
                if block != expected_block {
                    // A gap, or a block again (our ACK was lost): acknowledge
                    // the last block received in order, so the server resumes
                    // right after it (RFC 7440 §4; RFC 1350 for lockstep).
                    if received_any {
                        last_sent = Repr::Ack {
                            block: expected_block.wrapping_sub(1),
                        }
                        .to_vec();
                    }
                    socket
                        .send_to(&last_sent, peer)
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    in_window = 0;
                    continue;
                }
                received_any = true;
                let end = received + payload.len();
                if let Some(expected) = expected {
                    if end > expected.len() || expected[received..end] != *payload {
                        // Tell the server, as firmware does when it gives up: a
                        // server left retransmitting to this port could reach a
                        // later transfer that reuses it.
                        abort(&socket, peer, "bytes differ from the expected file").await;
                        return Err(format!(
                            "{file}: bytes {received}..{end} differ from the expected file"
                        ));
                    }
                }
                received = end;
                expected_block = expected_block.wrapping_add(1);
                in_window += 1;
                let last = payload.len() < block_size;
                if last || in_window >= window {
                    last_sent = Repr::Ack { block }.to_vec();
                    socket
                        .send_to(&last_sent, peer)
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    in_window = 0;
                }
                if last {
                    if let Some(expected) = expected.filter(|e| e.len() != received) {
                        return Err(format!(
                            "{file}: ended at {received} of {} bytes",
                            expected.len()
                        ));
                    }
                    return Ok((retransmits, received as u64));
                }
            }
            Ok(Repr::Error { code, message }) => {
                return Err(format!("{file}: server error {}: {message}", code.code()))
            }
            Ok(_) | Err(_) => {}
        }
    }
}

/// Ends a transfer from the client side with an ERROR (RFC 1350), so the
/// server stops sending to this port.
async fn abort(socket: &UdpSocket, peer: SocketAddr, why: &str) {
    let error = Repr::Error {
        code: ErrorCode::NotDefined,
        message: why,
    }
    .to_vec();
    let _ = socket.send_to(&error, peer).await;
}
