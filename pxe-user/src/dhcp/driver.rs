//! The DHCP sockets and their loop: receive, classify, ask the engine, send.
//!
//! Sockets are bound to the serving interface (SO_BINDTODEVICE), so pxed never
//! answers on another interface of the machine, and broadcast replies leave
//! through it. SO_REUSEADDR lets pxed in proxy mode share port 67 with a DHCP
//! server on the same host that also sets it: broadcasts reach both.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use dhcproto::{Encodable, Encoder};
use tokio::net::UdpSocket;
use tracing::{debug, error, info, warn};

use super::{
    classify::classify,
    engine::{Destination, Engine, Problem, PROXY_PORT},
};

/// Receive buffer for a boot storm: thousands of DISCOVERs arrive within
/// milliseconds of power-on, each costing ~2 KiB of buffer (skb truesize).
/// The kernel default (~208 KiB) drops most of a rack's first round, and a
/// dropped DISCOVER costs UEFI firmware 4 seconds.
const STORM_BUFFER: usize = 16 << 20;

/// Binds UDP `port` on every address of `iface` only.
pub fn bind(iface: &str, port: u16) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(iface.as_bytes()))?;
    crate::netif::grow_receive_buffer(&socket, STORM_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AddrInUse {
            "; another DHCP server holds it without SO_REUSEADDR (stop it, or run pxed where it is not)"
        } else {
            ""
        };
        io::Error::new(e.kind(), format!("binding UDP port {port} on {iface}: {e}{hint}"))
    })?;
    UdpSocket::from_std(socket.into())
}

/// Serves DHCP (port 67, unless `dhcp` is `None`) and boot server discovery
/// (port 4011) until the future is dropped.
pub async fn run(engine: Arc<Mutex<Engine>>, dhcp: Option<UdpSocket>, discovery: UdpSocket) -> io::Result<()> {
    let mut warned = Warnings::default();
    let mut buf_67 = vec![0u8; 4096];
    let mut buf_4011 = vec![0u8; 4096];
    loop {
        let (port, received) = tokio::select! {
            r = recv(dhcp.as_ref(), &mut buf_67) => (67, r),
            r = discovery.recv_from(&mut buf_4011) => (PROXY_PORT, r),
        };
        let (len, from) = match received {
            Ok(r) => r,
            // An ICMP error for an earlier reply (a client whose port closed,
            // a relay that went away) surfaces on the next receive. It is
            // about that reply, not about this socket: never a reason to stop.
            Err(e) if is_transient(&e) => {
                debug!(port, "DHCP: receive reported an error for an earlier reply: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let SocketAddr::V4(from) = from else { continue };
        let datagram = if port == PROXY_PORT { &buf_4011[..len] } else { &buf_67[..len] };
        let request = match classify(datagram) {
            Ok(r) => r,
            Err(why) => {
                debug!(client = %from, port, "DHCP: ignored: {why}");
                continue;
            }
        };
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        // The engine may fsync a lease; keep that off the async workers' backs.
        let outcome = tokio::task::block_in_place(|| {
            engine.lock().unwrap_or_else(|e| e.into_inner()).handle(&request, port, from, now)
        });
        match &outcome.problem {
            Some(Problem::PoolExhausted { subnet }) => warned.pool_exhausted(subnet),
            Some(Problem::LeaseStore(e)) => error!(mac = %request.mac, "DHCP: lease store failing, request not answered: {e}"),
            None => {}
        }
        let Some(reply) = outcome.reply else {
            if outcome.changed_lease {
                info!(mac = %request.mac, "DHCP: {}", outcome.summary);
            } else {
                debug!(mac = %request.mac, "DHCP: {}", outcome.summary);
            }
            continue;
        };
        info!(mac = %request.mac, "DHCP: {}", outcome.summary);
        let mut bytes = Vec::with_capacity(576);
        if let Err(e) = reply.message.encode(&mut Encoder::new(&mut bytes)) {
            warn!(mac = %request.mac, "DHCP: could not encode the reply: {e}");
            continue;
        }
        let socket = if port == PROXY_PORT { &discovery } else { dhcp.as_ref().unwrap_or(&discovery) };
        let to = match reply.to {
            Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
            Destination::Unicast(addr) => addr,
        };
        if let Err(e) = socket.send_to(&bytes, to).await {
            warn!(mac = %request.mac, %to, "DHCP: sending the reply failed: {e}");
        }
    }
}

/// Errors a UDP socket reports on behalf of an earlier send.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN | libc::EINTR)
    )
}

async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// Says a pool is full once a minute, not once per DISCOVER.
#[derive(Default)]
struct Warnings {
    last: std::collections::HashMap<String, Instant>,
}

impl Warnings {
    fn pool_exhausted(&mut self, subnet: &str) {
        let now = Instant::now();
        let due = self.last.get(subnet).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
        if due {
            warn!(subnet, "DHCP: address pool exhausted; new clients get no offer (repeated at most once a minute)");
            self.last.insert(subnet.to_owned(), now);
        }
    }
}
