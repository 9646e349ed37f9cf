//! A scripted TFTP client for cases real clients cannot express: hostile
//! requests, duplicate ACKs, exact packet counts. Runs on blocking sockets
//! inside a namespace thread.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use pxe_user::wire::tftp::{ErrorCode, Repr, TftpOption};

/// Sends `packet` to `server` from a fresh socket and returns the first reply.
pub fn first_reply(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket.send_to(packet, server).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (len, _) = socket.recv_from(&mut buf).ok()?;
    Some(buf[..len].to_vec())
}

/// The error code of a reply, if it is an ERROR.
pub fn error_code(reply: &[u8]) -> Option<ErrorCode> {
    match Repr::parse(reply).ok()? {
        Repr::Error { code, .. } => Some(code),
        _ => None,
    }
}

/// A read request for `file` with `options`.
pub fn rrq(file: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let options = options
        .iter()
        .map(|(name, value)| TftpOption { name, value })
        .collect();
    Repr::ReadRequest {
        filename: file,
        mode: pxe_user::wire::tftp::Mode::Octet,
        options,
    }
    .to_vec()
}

/// What a scripted download saw.
#[derive(Debug, Default)]
pub struct Fetched {
    pub data: Vec<u8>,
    pub oack: Vec<(String, String)>,
    /// DATA packets received, duplicates included.
    pub data_packets: u64,
    pub duplicate_data: u64,
}

/// Downloads `file` in lockstep, acknowledging every block `acks_per_block`
/// times (2 simulates a client whose ACKs are duplicated on the way).
pub fn fetch(
    server: SocketAddr,
    file: &str,
    options: &[(&str, &str)],
    acks_per_block: usize,
) -> Result<Fetched, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.send_to(&rrq(file, options), server).unwrap();
    let mut got = Fetched::default();
    let mut buf = vec![0u8; 70_000];
    let mut expected: u16 = 1;
    let mut blksize = 512usize;
    let mut transfer_port = None;
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("waiting for block {expected}: {e}"))?;
        let peer = *transfer_port.get_or_insert(from);
        if from != peer {
            return Err(format!("packet from {from}, transfer runs on {peer}"));
        }
        match Repr::parse(&buf[..len]).map_err(|e| e.to_string())? {
            Repr::OptionAck { options } => {
                for o in &options {
                    if o.name == "blksize" {
                        blksize = o.value.parse().unwrap();
                    }
                }
                got.oack = options
                    .iter()
                    .map(|o| (o.name.to_owned(), o.value.to_owned()))
                    .collect();
                socket
                    .send_to(&Repr::Ack { block: 0 }.to_vec(), peer)
                    .unwrap();
            }
            Repr::Data { block, payload } => {
                got.data_packets += 1;
                if block != expected {
                    got.duplicate_data += 1;
                    continue;
                }
                got.data.extend_from_slice(payload);
                for _ in 0..acks_per_block {
                    socket.send_to(&Repr::Ack { block }.to_vec(), peer).unwrap();
                }
                if payload.len() < blksize {
                    // Linger briefly: a server that resends on duplicate ACKs shows it now.
                    socket
                        .set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    while let Ok((len, _)) = socket.recv_from(&mut buf) {
                        if matches!(Repr::parse(&buf[..len]), Ok(Repr::Data { .. })) {
                            got.data_packets += 1;
                            got.duplicate_data += 1;
                        }
                    }
                    return Ok(got);
                }
                expected = expected.wrapping_add(1);
            }
            Repr::Error { code, message } => return Err(format!("ERROR {code:?}: {message}")),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
}

/// Downloads `file` with a window of `window` blocks through a simulated bad
/// wire: about `reorder_percent` of DATA packets swap places with the next
/// one, `loss_percent` vanish, and some ACKs are repeated late (so the server
/// sees stale ACKs out of order). The client behaves as RFC 7440 says: it
/// acknowledges every full window, and the last good block on a gap.
pub fn fetch_disordered(
    server: SocketAddr,
    file: &str,
    blksize: u16,
    window: u16,
    reorder_percent: u64,
    loss_percent: u64,
    seed: u64,
) -> Result<Vec<u8>, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (b, w) = (blksize.to_string(), window.to_string());
    socket
        .send_to(&rrq(file, &[("blksize", &b), ("windowsize", &w)]), server)
        .unwrap();
    let mut rng = seed | 1;
    let mut roll = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % 100
    };
    let mut data = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let mut peer = None;
    let mut held: Option<Vec<u8>> = None;
    let mut last_ack: Vec<u8> = Vec::new();
    let mut stale_ack: Option<Vec<u8>> = None;
    let (mut expected, mut in_window, mut idle) = (1u16, 0u16, 0);
    let block_len = usize::from(blksize);
    loop {
        let packet = match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                idle = 0;
                peer.get_or_insert(from);
                buf[..len].to_vec()
            }
            Err(_) => {
                idle += 1;
                if idle > 50 {
                    return Err(format!("stalled at block {expected}"));
                }
                if let Some(p) = held.take() {
                    p // the held packet finally arrives
                } else {
                    if let Some(peer) = peer {
                        socket.send_to(&last_ack, peer).unwrap();
                    }
                    continue;
                }
            }
        };
        let peer = peer.unwrap();
        // The wire: lose some, hold some back behind the next packet.
        if roll() < loss_percent {
            continue;
        }
        let mut deliver = vec![packet];
        if roll() < reorder_percent && held.is_none() {
            held = deliver.pop();
        } else if let Some(p) = held.take() {
            deliver.push(p); // arrives after the packet that overtook it
        }
        for packet in deliver {
            match Repr::parse(&packet).map_err(|e| e.to_string())? {
                Repr::OptionAck { .. } => {
                    last_ack = Repr::Ack { block: 0 }.to_vec();
                    socket.send_to(&last_ack, peer).unwrap();
                }
                Repr::Data { block, payload } if block == expected => {
                    data.extend_from_slice(payload);
                    in_window += 1;
                    let last = payload.len() < block_len;
                    if last || in_window == window {
                        if let Some(stale) = stale_ack.take() {
                            socket.send_to(&stale, peer).unwrap(); // an old ACK, late
                        }
                        if roll() < 10 {
                            stale_ack = Some(last_ack.clone());
                        }
                        last_ack = Repr::Ack { block }.to_vec();
                        socket.send_to(&last_ack, peer).unwrap();
                        in_window = 0;
                    }
                    if last {
                        return Ok(data);
                    }
                    expected = expected.wrapping_add(1);
                }
                Repr::Data { .. } => {
                    // A gap or a resend: acknowledge the last block received in order.
                    last_ack = Repr::Ack {
                        block: expected.wrapping_sub(1),
                    }
                    .to_vec();
                    socket.send_to(&last_ack, peer).unwrap();
                    in_window = 0;
                }
                Repr::Error { code, message } => return Err(format!("ERROR {code:?}: {message}")),
                other => return Err(format!("unexpected {other:?}")),
            }
        }
    }
}
