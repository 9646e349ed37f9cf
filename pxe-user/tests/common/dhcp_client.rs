//! A scripted DHCP client for what packaged clients cannot show: every offer
//! on the wire (proxyDHCP beside a DHCP server), PXE options, boot server
//! discovery on 4011, and thousands of MACs. Blocking sockets, run inside a
//! namespace thread.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use dhcproto::{
    v4::{self, DhcpOption, Message, MessageType, OptionCode},
    Decodable, Decoder, Encodable, Encoder,
};

pub const UEFI_VENDOR_CLASS: &[u8] = b"PXEClient:Arch:00007:UNDI:003016";

/// A socket on port 68 bound to `iface`, able to broadcast without an address.
pub fn client_socket(iface: &str) -> UdpSocket {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(iface.as_bytes())).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())
        .unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// A request from `mac`, as a UEFI PXE client sends it when `pxe` is set.
pub fn message(
    kind: MessageType,
    mac: [u8; 6],
    xid: u32,
    pxe: bool,
    extra: Vec<DhcpOption>,
) -> Vec<u8> {
    let mut m = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_xid(xid);
    m.set_flags(v4::Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if pxe {
        m.opts_mut()
            .insert(DhcpOption::ClassIdentifier(UEFI_VENDOR_CLASS.to_vec()));
        m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(
            v4::Architecture::from(7),
        ));
        let mut uuid = vec![0u8];
        uuid.extend_from_slice(&[0x11; 16]);
        m.opts_mut()
            .insert(DhcpOption::ClientMachineIdentifier(uuid));
    }
    for o in extra {
        m.opts_mut().insert(o);
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
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
        let Ok(m) = Message::decode(&mut Decoder::new(&buf[..len])) else {
            continue;
        };
        if m.xid() == xid && m.opcode() == v4::Opcode::BootReply {
            got.push((m, from));
            if stop_at_first {
                break;
            }
        }
    }
    got
}

pub fn kind(m: &Message) -> Option<MessageType> {
    m.opts().msg_type()
}

pub fn server_id(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// The `file` field, without its NUL padding.
pub fn boot_file(m: &Message) -> Option<String> {
    m.fname_str()
        .and_then(Result::ok)
        .map(|f| f.trim_end_matches('\0').to_owned())
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

/// DISCOVER → OFFER → REQUEST → ACK with one server; returns the address, or
/// what went wrong. Retries a lost exchange a few times, as clients do.
pub fn dora(socket: &UdpSocket, mac: [u8; 6], xid: u32) -> Result<Ipv4Addr, String> {
    for _ in 0..4 {
        let Some(offer) = ask(
            socket,
            &message(MessageType::Discover, mac, xid, false, vec![]),
            xid,
            Duration::from_millis(800),
        ) else {
            continue;
        };
        if kind(&offer) != Some(MessageType::Offer) {
            continue;
        }
        let ip = offer.yiaddr();
        let server = server_id(&offer).ok_or("OFFER without server identifier")?;
        let request = message(
            MessageType::Request,
            mac,
            xid,
            false,
            vec![
                DhcpOption::ServerIdentifier(server),
                DhcpOption::RequestedIpAddress(ip),
            ],
        );
        match ask(socket, &request, xid, Duration::from_millis(800)).and_then(|m| kind(&m)) {
            Some(MessageType::Ack) => return Ok(ip),
            Some(MessageType::Nak) => return Err(format!("NAK for {ip}")),
            _ => continue,
        }
    }
    Err(format!("no lease for {mac:02x?} after 4 tries"))
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
