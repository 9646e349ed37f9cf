//! `bench flood`: the traffic of a storm gone wrong or of a hostile host,
//! at a set rate for a set time: DHCP DISCOVERs from random MACs broadcast
//! on an interface, and TFTP read requests from random ports of one
//! address. Nothing is read back. Reports the rates it achieved, so a run
//! that could not send what it was asked says so.
//!
//! Bounded in rate and time (at most 600 s); point it only at a server in
//! your own test network.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use dhcproto::v4::MessageType;
use pxe_lab::client::dhcp::{encode, request, Identity};
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface the DISCOVERs are broadcast on (a namespace's).
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// DISCOVERs a second, each from a MAC of its own; 0 sends none.
    #[arg(long, default_value_t = 100_000)]
    dhcp_rate: u64,
    /// TFTP server the read requests go to; none without it.
    #[arg(long)]
    tftp_server: Option<Ipv4Addr>,
    /// Address the read requests come from (one of this namespace's).
    #[arg(long, default_value = "0.0.0.0")]
    tftp_source: Ipv4Addr,
    /// Read requests a second, from 256 ports in turn.
    #[arg(long, default_value_t = 10_000)]
    tftp_rate: u64,
    /// File the read requests ask for.
    #[arg(long, default_value = "ipxe.efi")]
    file: String,
    /// How long to flood.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct Sent {
    pub asked_per_s: u64,
    pub sent: u64,
    pub achieved_per_s: f64,
    /// Sends the kernel refused (a full socket buffer, mostly).
    pub errors: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub dhcp: Sent,
    pub tftp: Sent,
}

/// Datagrams handed to the kernel per `sendmmsg`.
const BATCH: usize = 64;
/// Ports the read requests come from, in turn.
const TFTP_PORTS: usize = 256;

pub fn run(args: Args) -> anyhow::Result<bool> {
    let duration = Duration::from_secs(args.seconds);
    let dhcp = (args.dhcp_rate > 0)
        .then(|| dhcp_sender(&args.interface))
        .transpose()?;
    let tftp = args
        .tftp_server
        .map(|server| tftp_senders(args.tftp_source, server))
        .transpose()?;
    let started = Instant::now();
    let (dhcp_sent, tftp_sent) = std::thread::scope(|scope| {
        let dhcp = dhcp.map(|socket| {
            let rate = args.dhcp_rate;
            scope.spawn(move || flood_dhcp(&socket, rate, duration))
        });
        let file = args.file.clone();
        let tftp = tftp.map(|(sockets, server)| {
            let rate = args.tftp_rate;
            scope.spawn(move || flood_tftp(&sockets, server, &file, rate, duration))
        });
        (
            dhcp.map(|t| t.join().expect("the DHCP sender")),
            tftp.map(|t| t.join().expect("the TFTP sender")),
        )
    });
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        seconds,
        dhcp: dhcp_sent.unwrap_or_default(),
        tftp: tftp_sent.unwrap_or_default(),
    };
    println!(
        "flood: {:.1} s; DISCOVERs {} ({:.0}/s of {}/s asked, {} send errors); RRQs {} ({:.0}/s of {}/s asked, {} send errors)",
        report.seconds,
        report.dhcp.sent,
        report.dhcp.achieved_per_s,
        report.dhcp.asked_per_s,
        report.dhcp.errors,
        report.tftp.sent,
        report.tftp.achieved_per_s,
        report.tftp.asked_per_s,
        report.tftp.errors,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(true)
}

fn dhcp_sender(interface: &str) -> anyhow::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_broadcast(true)?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .with_context(|| format!("binding to {interface}"))?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))?;
    socket.set_send_buffer_size(4 << 20)?;
    Ok(socket)
}

fn tftp_senders(source: Ipv4Addr, server: Ipv4Addr) -> anyhow::Result<(Vec<Socket>, SocketAddrV4)> {
    let sockets = (0..TFTP_PORTS)
        .map(|_| {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
            Ok(socket)
        })
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("binding {TFTP_PORTS} ports on {source}"))?;
    Ok((sockets, SocketAddrV4::new(server, 69)))
}

/// Sends `rate` a second for `duration`, `send(n, count)` sending `count`
/// datagrams numbered from `n`; returns what was sent.
fn paced(rate: u64, duration: Duration, mut send: impl FnMut(u64, usize) -> (u64, u64)) -> Sent {
    let started = Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut attempted = 0u64;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
        if attempted >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let count = ((due - attempted) as usize).min(BATCH);
        let (ok, failed) = send(attempted, count);
        attempted += count as u64;
        sent += ok;
        errors += failed;
    }
    Sent {
        asked_per_s: rate,
        sent,
        achieved_per_s: sent as f64 / started.elapsed().as_secs_f64(),
        errors,
    }
}

fn flood_dhcp(socket: &Socket, rate: u64, duration: Duration) -> Sent {
    let template = encode(&request(
        &Identity::plain([0x02, 0xf1, 0, 0, 0, 0]),
        MessageType::Discover,
        0,
        vec![],
    ));
    let mut batch: Vec<Vec<u8>> = vec![template; BATCH];
    let to = SockAddr::from(SocketAddrV4::new(Ipv4Addr::BROADCAST, 67));
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    paced(rate, duration, |n, count| {
        for (i, datagram) in batch.iter_mut().take(count).enumerate() {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let r = random.to_be_bytes();
            // A locally administered unicast MAC, and an xid, of its own.
            datagram[28..34].copy_from_slice(&[0x02, r[1], r[2], r[3], r[4], r[5]]);
            datagram[4..8].copy_from_slice(&((n as u32).wrapping_add(i as u32)).to_be_bytes());
        }
        send_batch(socket, &batch[..count], &to)
    })
}

fn flood_tftp(
    sockets: &[Socket],
    server: SocketAddrV4,
    file: &str,
    rate: u64,
    duration: Duration,
) -> Sent {
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(file.as_bytes());
    rrq.push(0);
    rrq.extend_from_slice(b"octet\0blksize\x001468\0tsize\x000\0");
    let to = SockAddr::from(server);
    paced(rate, duration, |n, count| {
        let (mut ok, mut failed) = (0, 0);
        for i in 0..count as u64 {
            let socket = &sockets[((n + i) % sockets.len() as u64) as usize];
            match socket.send_to(&rrq, &to) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    })
}

/// One `sendmmsg` of `datagrams` to `to`: (sent, failed).
fn send_batch(socket: &Socket, datagrams: &[Vec<u8>], to: &SockAddr) -> (u64, u64) {
    let mut iovecs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero msghdr is valid; the fields set below
            // point at memory that outlives the call.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            header.msg_hdr.msg_namelen = to.len();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    // SAFETY: `headers` holds `headers.len()` initialised messages whose
    // buffers (`datagrams`, `iovecs`, `to`) live until the call returns.
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            0,
        )
    };
    let sent = n.max(0) as u64;
    (sent, datagrams.len() as u64 - sent)
}
