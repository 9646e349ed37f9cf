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
    socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
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
    let options = options.iter().map(|(name, value)| TftpOption { name, value }).collect();
    Repr::ReadRequest { filename: file, mode: pxe_user::wire::tftp::Mode::Octet, options }.to_vec()
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
pub fn fetch(server: SocketAddr, file: &str, options: &[(&str, &str)], acks_per_block: usize) -> Result<Fetched, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    socket.send_to(&rrq(file, options), server).unwrap();
    let mut got = Fetched::default();
    let mut buf = vec![0u8; 70_000];
    let mut expected: u16 = 1;
    let mut blksize = 512usize;
    let mut transfer_port = None;
    loop {
        let (len, from) = socket.recv_from(&mut buf).map_err(|e| format!("waiting for block {expected}: {e}"))?;
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
                got.oack = options.iter().map(|o| (o.name.to_owned(), o.value.to_owned())).collect();
                socket.send_to(&Repr::Ack { block: 0 }.to_vec(), peer).unwrap();
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
                    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
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
