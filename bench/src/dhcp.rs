//! The client side of DHCP for many simulated machines at once: one socket on
//! port 68 bound to the client interface, replies routed to each machine by
//! transaction ID (read from the raw bytes: each machine decodes its own, so
//! the one receiving task is not the harness's limit). The protocol, with
//! its firmware-like retransmission, is `pxe_lab::client::dhcp::Dora`.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Instant,
};

use pxe_lab::client::dhcp::{self, Dora, Step};
use tokio::{net::UdpSocket, sync::mpsc};

pub use pxe_lab::client::dhcp::{Identity, Lease, Schedule, Tally};

/// Replies for one transaction, undecoded.
type Inbox = mpsc::UnboundedSender<Vec<u8>>;

/// The shared DHCP socket of all simulated machines.
pub struct DhcpWire {
    socket: UdpSocket,
    inboxes: Mutex<HashMap<u32, Inbox>>,
}

impl DhcpWire {
    /// Binds port 68 on `iface` (able to broadcast without an address) and
    /// starts routing replies.
    pub fn bind(iface: &str) -> anyhow::Result<Arc<Self>> {
        let s = dhcp::client_socket(iface)?;
        pxe_user::netif::grow_receive_buffer(&s, 32 << 20);
        s.set_nonblocking(true)?;
        let wire = Arc::new(Self {
            socket: UdpSocket::from_std(s.into())?,
            inboxes: Mutex::new(HashMap::new()),
        });
        let router = Arc::clone(&wire);
        tokio::spawn(async move { router.route().await });
        Ok(wire)
    }

    async fn route(&self) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, _)) = self.socket.recv_from(&mut buf).await else {
                continue;
            };
            let Some(xid) = dhcp::reply_xid(&buf[..len]) else {
                continue;
            };
            if let Some(inbox) = self.inboxes.lock().unwrap().get(&xid) {
                let _ = inbox.send(buf[..len].to_vec());
            }
        }
    }

    /// Opens a transaction: replies with `xid` arrive on the returned receiver.
    pub fn open(&self, xid: u32) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inboxes.lock().unwrap().insert(xid, tx);
        rx
    }

    pub fn close(&self, xid: u32) {
        self.inboxes.lock().unwrap().remove(&xid);
    }

    /// Sends an encoded request to every server on the link.
    pub async fn broadcast(&self, bytes: &[u8]) -> Result<(), String> {
        self.socket
            .send_to(bytes, (Ipv4Addr::BROADCAST, 67))
            .await
            .map(|_| ())
            .map_err(|e| format!("sending: {e}"))
    }
}

/// One machine's DISCOVER/OFFER/REQUEST/ACK on `schedule`. What it cost is
/// returned whether it succeeded or not.
pub async fn dora(
    wire: &DhcpWire,
    identity: &Identity,
    xid: u32,
    schedule: Schedule,
) -> (Result<Lease, String>, Tally) {
    let mut inbox = wire.open(xid);
    let mut exchange = Dora::new(identity.clone(), xid, schedule);
    let mut step = exchange.start(Instant::now());
    let result = loop {
        match step {
            Step::Broadcast(bytes) => {
                if let Err(e) = wire.broadcast(&bytes).await {
                    break Err(e);
                }
            }
            Step::Wait => {}
            Step::Done(lease) => break Ok(lease),
            Step::Failed(why) => break Err(why),
        }
        let deadline = exchange
            .deadline()
            .expect("a running exchange has a deadline");
        step = match tokio::time::timeout_at(deadline.into(), inbox.recv()).await {
            Ok(Some(reply)) => exchange.on_reply(Instant::now(), &reply),
            Ok(None) => break Err("the reply router stopped".into()),
            Err(_) => exchange.on_timeout(Instant::now()),
        };
    };
    wire.close(xid);
    (result, exchange.tally())
}
