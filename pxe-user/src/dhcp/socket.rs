//! The DHCP sockets of one interface.
//!
//! Sockets are bound to the serving interface (SO_BINDTODEVICE), so pxed
//! never answers on another interface of the machine, and broadcast replies
//! leave through it. SO_REUSEADDR lets pxed share port 67 with a DHCP server
//! on the same host that also sets it (dnsmasq): broadcasts reach both.
//!
//! A server that holds port 67 without SO_REUSEADDR (Kea, for one) leaves
//! proxy mode a raw IP socket instead: it sees a copy of every UDP datagram
//! for port 67 that reaches the interface (a socket filter drops the rest in
//! the kernel, TFTP ACKs included), and it sends replies as whole IPv4
//! packets from our address and port 67. The other server is untouched.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    time::Duration,
};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, SockFilter, Socket, Type};

use crate::wire::udp::{self, Datagram};

/// Receive buffer for a boot storm: thousands of DISCOVERs arrive within
/// milliseconds of power-on, each costing ~2 KiB of buffer (skb truesize).
/// The kernel default (~208 KiB) drops most of a rack's first round, and a
/// dropped DISCOVER costs UEFI firmware 4 seconds.
const STORM_BUFFER: usize = 16 << 20;

pub const DHCP_SERVER_PORT: u16 = 67;

/// Port 67 on one interface. Non-blocking: the DHCP loop waits for it with
/// the other sockets it serves.
pub enum Port67 {
    /// Bound as a normal UDP socket.
    Bound(UdpSocket),
    /// Beside a server that holds the port: raw IP, sending from `address`.
    Beside { socket: Socket, address: Ipv4Addr },
}

impl Port67 {
    /// Binds port 67 on `iface`; with `share` (proxy mode), falls back to a
    /// raw socket when another server holds the port exclusively.
    pub fn open(iface: &str, address: Ipv4Addr, share: bool) -> io::Result<Self> {
        match bind(iface, DHCP_SERVER_PORT) {
            Ok(socket) => Ok(Self::Bound(socket)),
            Err(e) if share && e.kind() == io::ErrorKind::AddrInUse => {
                let socket = raw_port_67(iface).map_err(|raw| {
                    io::Error::new(
                        raw.kind(),
                        format!("{e}; listening beside it through a raw socket failed too: {raw}"),
                    )
                })?;
                Ok(Self::Beside { socket, address })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether another server holds the port and we listen beside it.
    pub fn is_beside(&self) -> bool {
        matches!(self, Self::Beside { .. })
    }

    /// A request already waiting, or `WouldBlock`.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Bound(s) => s.recv_from(buf),
            Self::Beside { socket, .. } => recv_raw(socket, buf),
        }
    }

    /// Sends a reply from port 67 to `to`.
    pub fn send_to(&self, payload: &[u8], to: SocketAddrV4) -> io::Result<()> {
        let (socket, address) = match self {
            Self::Bound(s) => return send_waiting(s.as_fd(), || s.send_to(payload, to)),
            Self::Beside { socket, address } => (socket, *address),
        };
        let datagram = Datagram {
            src: address,
            dst: *to.ip(),
            src_port: DHCP_SERVER_PORT,
            dst_port: to.port(),
            payload,
        };
        let packet = udp::build(&datagram)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "reply too long"))?;
        let dest = socket2::SockAddr::from(SocketAddrV4::new(*to.ip(), 0));
        send_waiting(socket.as_fd(), || socket.send_to(&packet, &dest))
    }
}

impl AsFd for Port67 {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Bound(s) => s.as_fd(),
            Self::Beside { socket, .. } => socket.as_fd(),
        }
    }
}

/// How long a reply waits for room in a full send buffer before it is
/// given up (the client retransmits).
const SEND_WAIT: Duration = Duration::from_millis(100);

/// Sends with `send`; a full send buffer waits up to [`SEND_WAIT`] for room.
pub fn send_waiting(
    fd: BorrowedFd<'_>,
    mut send: impl FnMut() -> io::Result<usize>,
) -> io::Result<()> {
    match send() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
            let wait = PollTimeout::try_from(SEND_WAIT).unwrap_or(PollTimeout::MAX);
            // Interrupted or timed out: the second try says which.
            let _ = nix::poll::poll(&mut fds, wait);
            send().map(drop)
        }
        sent => sent.map(drop),
    }
}

/// Receives from the raw socket until a UDP datagram for port 67 comes
/// (the socket filter passed only those; parsing checks the rest) and copies
/// its payload into `buf`. `WouldBlock` when nothing is waiting.
fn recv_raw(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    // Room for the largest IPv4 and UDP headers in front of the payload.
    let mut packet = vec![0u8; buf.len() + 68];
    loop {
        // SAFETY: `packet` is a valid, writable buffer of its length.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                packet.as_mut_ptr().cast(),
                packet.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let Some(d) = udp::parse(&packet[..n as usize]).filter(|d| d.dst_port == DHCP_SERVER_PORT)
        else {
            continue;
        };
        let len = d.payload.len().min(buf.len());
        buf[..len].copy_from_slice(&d.payload[..len]);
        return Ok((len, SocketAddr::V4(SocketAddrV4::new(d.src, d.src_port))));
    }
}

/// Binds UDP `port` on every address of `iface` only.
pub fn bind(iface: &str, port: u16) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(iface.as_bytes()))?;
    crate::netif::grow_receive_buffer(&socket, STORM_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AddrInUse {
            "; another DHCP server holds it without SO_REUSEADDR (proxy mode can listen beside it; full mode cannot share a network with another server)"
        } else {
            ""
        };
        io::Error::new(e.kind(), format!("binding UDP port {port} on {iface}: {e}{hint}"))
    })?;
    Ok(socket.into())
}

/// A raw IPv4/UDP socket on `iface` that receives only unfragmented UDP for
/// port 67 and sends packets whose IPv4 header we write.
fn raw_port_67(iface: &str) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
    socket.attach_filter(&port_67_filter())?;
    socket.set_header_included_v4(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(iface.as_bytes()))?;
    crate::netif::grow_receive_buffer(&socket, STORM_BUFFER);
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Classic BPF over the IPv4 packet: accept UDP (the socket's protocol)
/// that is not a fragment and whose destination port is 67.
fn port_67_filter() -> [SockFilter; 7] {
    const LDH_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LDH_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
    const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // Jump offsets count instructions skipped after the jump.
    [
        SockFilter::new(LDH_ABS, 0, 0, 6),   // 0: flags, fragment offset
        SockFilter::new(JSET, 4, 0, 0x3fff), // 1: a fragment → 6
        SockFilter::new(LDX_MSH, 0, 0, 0),   // 2: X = IPv4 header length
        SockFilter::new(LDH_IND, 0, 0, 2),   // 3: UDP destination port
        SockFilter::new(JEQ, 0, 1, u32::from(DHCP_SERVER_PORT)), // 4: 67 → 5, else → 6
        SockFilter::new(RET, 0, 0, u32::MAX), // 5: accept
        SockFilter::new(RET, 0, 0, 0),       // 6: drop
    ]
}
