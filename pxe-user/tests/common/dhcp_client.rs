//! A scripted DHCP client for what packaged clients cannot show: every offer
//! on the wire (proxyDHCP beside a DHCP server), PXE options, boot server
//! discovery on 4011, and thousands of MACs. Messages and the DORA exchange
//! are `pxe_lab::client::dhcp`'s, the bench's too; here they run on blocking
//! sockets, inside a namespace thread.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use dhcproto::v4::{DhcpOption, Message, MessageType};
use pxe_lab::client::dhcp::{self as client, Dora, Identity, Schedule, Step};

pub use pxe_lab::client::dhcp::{file_field as boot_file, kind, server_id};

pub const UEFI_VENDOR_CLASS: &[u8] = b"PXEClient:Arch:00007:UNDI:003016";

/// A socket on port 68 bound to `iface`, able to broadcast without an address.
pub fn client_socket(iface: &str) -> UdpSocket {
    let s: UdpSocket = client::client_socket(iface).unwrap().into();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// `mac` as a plain client, or as a UEFI PXE client when `pxe` is set (the
/// options pxed decides on: 60, 93 and 97).
fn identity(mac: [u8; 6], pxe: bool) -> Identity {
    if !pxe {
        return Identity::plain(mac);
    }
    Identity {
        vendor_class: Some(UEFI_VENDOR_CLASS.to_vec()),
        arch: Some(7),
        uuid: Some([0x11; 16]),
        ..Identity::plain(mac)
    }
}

/// A request from `mac`, as a UEFI PXE client sends it when `pxe` is set.
pub fn message(
    kind: MessageType,
    mac: [u8; 6],
    xid: u32,
    pxe: bool,
    extra: Vec<DhcpOption>,
) -> Vec<u8> {
    client::encode(&client::request(&identity(mac, pxe), kind, xid, extra))
}

/// Every reply with transaction `xid` that arrives within `wait`, with its sender.
pub fn collect(socket: &UdpSocket, xid: u32, wait: Duration) -> Vec<(Message, SocketAddr)> {
    collect_until(socket, xid, wait, false)
}

/// The first reply with transaction `xid` within `wait`, if any.
pub fn first(socket: &UdpSocket, xid: u32, wait: Duration) -> Option<(Message, SocketAddr)> {
    collect_until(socket, xid, wait, true).pop()
}

fn collect_until(
    socket: &UdpSocket,
    xid: u32,
    wait: Duration,
    stop_at_first: bool,
) -> Vec<(Message, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(m) = client::decode_reply(&buf[..len], xid) {
            got.push((m, from));
            if stop_at_first {
                break;
            }
        }
    }
    got
}

/// Broadcasts `packet` and collects the replies for `xid`.
pub fn exchange(
    socket: &UdpSocket,
    packet: &[u8],
    xid: u32,
    wait: Duration,
) -> Vec<(Message, SocketAddr)> {
    socket.send_to(packet, (Ipv4Addr::BROADCAST, 67)).unwrap();
    collect(socket, xid, wait)
}

/// Broadcasts `packet` and returns the first reply for `xid`.
pub fn ask(socket: &UdpSocket, packet: &[u8], xid: u32, wait: Duration) -> Option<Message> {
    socket.send_to(packet, (Ipv4Addr::BROADCAST, 67)).unwrap();
    first(socket, xid, wait).map(|(m, _)| m)
}

/// How the tests' plain client resends: each DISCOVER and REQUEST up to four
/// times, 800 ms apart; the first address offer is taken; a NAK is an error.
fn test_schedule() -> Schedule {
    Schedule {
        retries: vec![Duration::from_millis(800); 4],
        offer_wait: Duration::ZERO,
        max_naks: 1,
    }
}

/// DISCOVER → OFFER → REQUEST → ACK with one server as a plain client;
/// returns the address, or what went wrong.
pub fn dora(socket: &UdpSocket, mac: [u8; 6], xid: u32) -> Result<Ipv4Addr, String> {
    let mut exchange = Dora::new(Identity::plain(mac), xid, test_schedule());
    let step = exchange.start(Instant::now());
    let caller_timeout = socket.read_timeout().unwrap();
    let result = drive(socket, &mut exchange, step);
    socket.set_read_timeout(caller_timeout).unwrap();
    result.map_err(|why| format!("no lease for {mac:02x?}: {why}"))
}

/// Runs `exchange` on `socket` from `step` to its end: each wait for a reply
/// lasts until the exchange's deadline.
fn drive(socket: &UdpSocket, exchange: &mut Dora, mut step: Step) -> Result<Ipv4Addr, String> {
    let mut buf = [0u8; 2048];
    loop {
        match step {
            Step::Broadcast(bytes) => {
                socket
                    .send_to(&bytes, (Ipv4Addr::BROADCAST, 67))
                    .map_err(|e| format!("sending: {e}"))?;
            }
            Step::Wait => {}
            Step::Done(lease) => return Ok(lease.address),
            Step::Failed(why) => return Err(why),
        }
        let now = Instant::now();
        let deadline = exchange
            .deadline()
            .expect("a running exchange has a deadline");
        if now >= deadline {
            step = exchange.on_timeout(now);
            continue;
        }
        // A zero read timeout would mean "block forever".
        let wait = (deadline - now).max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).unwrap();
        step = match socket.recv_from(&mut buf) {
            Ok((len, _)) => exchange.on_reply(Instant::now(), &buf[..len]),
            Err(_) => Step::Wait,
        };
    }
}

/// INIT-REBOOT: asks for `ip` back without a server identifier.
pub fn reboot_request(
    socket: &UdpSocket,
    mac: [u8; 6],
    xid: u32,
    ip: Ipv4Addr,
) -> Option<MessageType> {
    for _ in 0..4 {
        let request = message(
            MessageType::Request,
            mac,
            xid,
            false,
            vec![DhcpOption::RequestedIpAddress(ip)],
        );
        if let Some(k) =
            ask(socket, &request, xid, Duration::from_millis(800)).and_then(|m| kind(&m))
        {
            return Some(k);
        }
    }
    None
}
