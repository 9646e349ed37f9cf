//! A scripted TFTP client for cases real clients cannot express: hostile
//! requests, duplicate ACKs, exact packet counts, a bad wire. Downloads run
//! `pxe_lab::client::tftp::Download`, the bench's client, on blocking sockets
//! inside a namespace thread; hostile requests are crafted with pxed's own
//! codec.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use pxe_lab::client::{
    tftp::{Download, Step},
    TftpProfile,
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

/// What to ask for: `options` may name blksize and windowsize (no tsize).
fn ask(options: &[(&str, &str)]) -> TftpProfile {
    let value = |name: &str, default: u16| {
        options
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(default, |(_, v)| v.parse().unwrap())
    };
    TftpProfile {
        blksize: value("blksize", 0),
        windowsize: value("windowsize", 1),
        tsize: false,
        timeout: Duration::from_secs(5),
        retries: pxe_lab::client::tftp::MAX_RETRANSMITS,
    }
}

/// Downloads `file` in lockstep, sending every ACK `acks_per_block` times
/// (2 simulates a client whose ACKs are duplicated on the way). On this
/// lossless link a timeout is a failure, not a reason to retransmit.
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
    let (download, request) = Download::start(file, &ask(options), None);
    let mut download = download.keeping_data();
    socket.send_to(&request, server).unwrap();
    let mut buf = vec![0u8; 70_000];
    let mut transfer_port = None;
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("waiting for DATA: {e}"))?;
        let peer = *transfer_port.get_or_insert(from);
        if from != peer {
            return Err(format!("packet from {from}, transfer runs on {peer}"));
        }
        let (ack, done) = match download.on_datagram(&buf[..len]) {
            Step::Wait => continue,
            Step::Send(ack) => (ack, false),
            Step::Done { .. } => (download.final_ack().to_vec(), true),
            Step::Fail { why, .. } => return Err(why),
        };
        for _ in 0..acks_per_block {
            socket.send_to(&ack, peer).unwrap();
        }
        if done {
            let late = late_data_packets(&socket, &mut buf);
            let seen = download.seen().clone();
            return Ok(Fetched {
                data: download.into_data(),
                oack: seen.oack,
                data_packets: seen.data_packets + late,
                duplicate_data: seen.out_of_order + late,
            });
        }
    }
}

/// DATA packets that still arrive in a short while after the last block:
/// a server that resends on duplicate ACKs shows it now.
fn late_data_packets(socket: &UdpSocket, buf: &mut [u8]) -> u64 {
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut late = 0;
    while let Ok((len, _)) = socket.recv_from(buf) {
        if matches!(Repr::parse(&buf[..len]), Ok(Repr::Data { .. })) {
            late += 1;
        }
    }
    late
}

/// A wire that loses about `loss_percent` of the packets it carries, holds
/// about `reorder_percent` back behind the next one, and repeats some ACKs
/// late (so the server sees stale ACKs out of order). Seeded: a failure
/// replays.
struct BadWire {
    rng: u64,
    loss_percent: u64,
    reorder_percent: u64,
    held: Option<Vec<u8>>,
    stale_ack: Option<Vec<u8>>,
}

impl BadWire {
    fn roll(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % 100
    }

    /// The packets the client gets, in order, when `packet` arrives.
    fn deliver(&mut self, packet: Vec<u8>) -> Vec<Vec<u8>> {
        if self.roll() < self.loss_percent {
            return vec![];
        }
        if self.held.is_none() && self.roll() < self.reorder_percent {
            self.held = Some(packet);
            return vec![];
        }
        // A held packet arrives after the one that overtook it.
        std::iter::once(packet).chain(self.held.take()).collect()
    }

    /// The ACKs that reach the server when the client sends `ack`: now and
    /// then an older one first, late.
    fn send(&mut self, ack: Vec<u8>) -> Vec<Vec<u8>> {
        let late = self.stale_ack.take();
        if self.roll() < 10 {
            self.stale_ack = Some(ack.clone());
        }
        late.into_iter().chain([ack]).collect()
    }
}

/// Downloads `file` with a window of `window` blocks through a [`BadWire`].
/// The client is the bench's: it acknowledges every full window, and the
/// last good block on a gap or a timeout (RFC 7440).
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
    let profile = TftpProfile {
        blksize,
        windowsize: window,
        tsize: false,
        timeout: Duration::from_millis(200),
        // This caller tells a stall itself (below).
        retries: u64::MAX,
    };
    let (download, request) = Download::start(file, &profile, None);
    // Losses make timeouts by the dozen; a stall is 50 in a row (below).
    let mut download = download.keeping_data().giving_up_after(u64::MAX);
    socket.send_to(&request, server).unwrap();
    let mut wire = BadWire {
        rng: seed | 1,
        loss_percent,
        reorder_percent,
        held: None,
        stale_ack: None,
    };
    let mut buf = vec![0u8; 70_000];
    let (mut peer, mut silences) = (None, 0);
    loop {
        let arrived = match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                peer.get_or_insert(from);
                wire.deliver(buf[..len].to_vec())
            }
            // Silence: the held packet finally arrives, or the client times out.
            Err(_) => wire.held.take().into_iter().collect(),
        };
        silences = if arrived.is_empty() { silences + 1 } else { 0 };
        if silences > 50 {
            return Err("stalled: 50 timeouts in a row".into());
        }
        let steps: Vec<Step> = if !arrived.is_empty() {
            arrived.iter().map(|p| download.on_datagram(p)).collect()
        } else if download.seen().oack.is_empty() {
            // The OACK was lost: the server sends it again itself. The
            // client's timeout would resend the request, to the transfer port.
            vec![]
        } else {
            vec![download.on_timeout()]
        };
        let Some(peer) = peer else { continue };
        for step in steps {
            match step {
                Step::Wait => {}
                Step::Send(ack) => {
                    for ack in wire.send(ack) {
                        socket.send_to(&ack, peer).unwrap();
                    }
                }
                Step::Done { .. } => {
                    socket.send_to(download.final_ack(), peer).unwrap();
                    return Ok(download.into_data());
                }
                Step::Fail { why, .. } => return Err(why),
            }
        }
    }
}
