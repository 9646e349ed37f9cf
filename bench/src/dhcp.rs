//! The client side of DHCP for many simulated machines at once: one socket on
//! port 68 bound to the client interface, replies routed to each machine by
//! transaction ID, and firmware-like retransmission.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use dhcproto::{
    v4::{self, DhcpOption, Message, MessageType, OptionCode},
    Decodable, Decoder, Encodable, Encoder,
};
use tokio::{net::UdpSocket, sync::mpsc};

/// Replies for one transaction.
type Inbox = mpsc::UnboundedSender<Message>;

/// The shared DHCP socket of all simulated machines.
pub struct DhcpWire {
    socket: UdpSocket,
    inboxes: Mutex<HashMap<u32, Inbox>>,
}

impl DhcpWire {
    /// Binds port 68 on `iface` (able to broadcast without an address) and
    /// starts routing replies.
    pub fn bind(iface: &str) -> anyhow::Result<Arc<Self>> {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(iface.as_bytes()))
            .with_context(|| format!("binding to interface {iface}"))?;
        pxe_user::netif::grow_receive_buffer(&s, 32 << 20);
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())
            .context("binding UDP port 68")?;
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
            let Ok(m) = Message::decode(&mut Decoder::new(&buf[..len])) else {
                continue;
            };
            if m.opcode() != v4::Opcode::BootReply {
                continue;
            }
            if let Some(inbox) = self.inboxes.lock().unwrap().get(&m.xid()) {
                let _ = inbox.send(m);
            }
        }
    }

    /// Opens a transaction: replies with `xid` arrive on the returned receiver.
    pub fn open(&self, xid: u32) -> mpsc::UnboundedReceiver<Message> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inboxes.lock().unwrap().insert(xid, tx);
        rx
    }

    pub fn close(&self, xid: u32) {
        self.inboxes.lock().unwrap().remove(&xid);
    }

    pub async fn broadcast(&self, message: &Message) -> anyhow::Result<()> {
        let mut bytes = Vec::with_capacity(548);
        message.encode(&mut Encoder::new(&mut bytes))?;
        self.socket
            .send_to(&bytes, (Ipv4Addr::BROADCAST, 67))
            .await?;
        Ok(())
    }
}

/// How a simulated machine presents itself in DHCP.
#[derive(Clone, Debug)]
pub struct Identity {
    pub mac: [u8; 6],
    /// Option 93.
    pub arch: u16,
    /// Option 60.
    pub vendor_class: Vec<u8>,
    /// Option 77 (iPXE sends it in RFC 3004 form).
    pub user_class: Option<Vec<u8>>,
    pub uuid: [u8; 16],
}

/// What a completed exchange gave the machine.
#[derive(Clone, Debug)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub next_server: Ipv4Addr,
    pub boot_file: Option<String>,
}

fn request(identity: &Identity, kind: MessageType, xid: u32, extra: Vec<DhcpOption>) -> Message {
    let mut m = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &identity.mac,
    );
    m.set_xid(xid);
    m.set_flags(v4::Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(identity.vendor_class.clone()));
    opts.insert(DhcpOption::ClientSystemArchitecture(
        v4::Architecture::from(identity.arch),
    ));
    let mut uuid = vec![0u8];
    uuid.extend_from_slice(&identity.uuid);
    opts.insert(DhcpOption::ClientMachineIdentifier(uuid));
    opts.insert(DhcpOption::ClientNetworkInterface(1, 2, 1));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::VendorExtensions,
        OptionCode::ClassIdentifier,
        OptionCode::ClientMachineIdentifier,
        OptionCode::TFTPServerName,
        OptionCode::BootfileName,
    ]));
    if let Some(user_class) = &identity.user_class {
        opts.insert(DhcpOption::UserClass(user_class.clone()));
    }
    for o in extra {
        opts.insert(o);
    }
    m
}

/// The boot file: option 67 when present (EDK2 prefers it), else the `file`
/// field without its NUL padding.
fn boot_file(m: &Message) -> Option<String> {
    if let Some(DhcpOption::BootfileName(name)) = m.opts().get(OptionCode::BootfileName) {
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_owned();
        if !name.is_empty() {
            return Some(name);
        }
    }
    let file = m.fname_str()?.ok()?.trim_end_matches('\0').to_owned();
    (!file.is_empty()).then_some(file)
}

fn server_id(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// DISCOVER/OFFER/REQUEST/ACK as PXE firmware does it: offers are collected
/// for `offer_wait`, an address offer and a proxyDHCP offer (no address, boot
/// file) are combined, and each step is resent on the `retries` schedule.
/// Returns the lease and how many retransmissions it took.
pub async fn dora(
    wire: &DhcpWire,
    identity: &Identity,
    xid: u32,
    retries: &[Duration],
    offer_wait: Duration,
) -> Result<(Lease, u32), String> {
    let mut inbox = wire.open(xid);
    let result = exchange(wire, &mut inbox, identity, xid, retries, offer_wait).await;
    wire.close(xid);
    result
}

async fn exchange(
    wire: &DhcpWire,
    inbox: &mut mpsc::UnboundedReceiver<Message>,
    identity: &Identity,
    xid: u32,
    retries: &[Duration],
    offer_wait: Duration,
) -> Result<(Lease, u32), String> {
    let mut retransmits = 0;
    for (attempt, timeout) in retries.iter().enumerate() {
        if attempt > 0 {
            retransmits += 1;
        }
        wire.broadcast(&request(identity, MessageType::Discover, xid, vec![]))
            .await
            .map_err(|e| e.to_string())?;
        let mut address_offer: Option<Message> = None;
        let mut proxy_offer: Option<Message> = None;
        let deadline = tokio::time::Instant::now() + *timeout;
        let mut collect_until = deadline;
        while let Ok(Some(m)) = tokio::time::timeout_at(collect_until, inbox.recv()).await {
            if m.opts().msg_type() != Some(MessageType::Offer) {
                continue;
            }
            if m.yiaddr().is_unspecified() {
                proxy_offer.get_or_insert(m);
            } else {
                address_offer.get_or_insert(m);
            }
            if address_offer.is_some() {
                // Firmware waits a little for a proxy offer once it has an address.
                collect_until = collect_until.min(tokio::time::Instant::now() + offer_wait);
                if proxy_offer.is_some() || address_offer.as_ref().and_then(boot_file).is_some() {
                    break;
                }
            }
        }
        let Some(offer) = address_offer else { continue };
        let server = server_id(&offer).ok_or("OFFER without a server identifier")?;
        let address = offer.yiaddr();
        let req = request(
            identity,
            MessageType::Request,
            xid,
            vec![
                DhcpOption::ServerIdentifier(server),
                DhcpOption::RequestedIpAddress(address),
            ],
        );
        let mut nak = None;
        for (request_attempt, timeout) in retries.iter().enumerate() {
            if nak.is_some() {
                break;
            }
            if request_attempt > 0 {
                retransmits += 1;
            }
            wire.broadcast(&req).await.map_err(|e| e.to_string())?;
            let deadline = tokio::time::Instant::now() + *timeout;
            while let Ok(Some(m)) = tokio::time::timeout_at(deadline, inbox.recv()).await {
                match m.opts().msg_type() {
                    Some(MessageType::Ack) if server_id(&m) == Some(server) => {
                        // The boot file comes from the ACK, the address offer or the proxy offer.
                        let source = [Some(&m), Some(&offer), proxy_offer.as_ref()]
                            .into_iter()
                            .flatten()
                            .find(|m| boot_file(m).is_some());
                        let lease = Lease {
                            address,
                            next_server: source
                                .map(|m| m.siaddr())
                                .filter(|a| !a.is_unspecified())
                                .unwrap_or(server),
                            boot_file: source.and_then(boot_file),
                        };
                        return Ok((lease, retransmits));
                    }
                    // RFC 2131 §4.4.1: on a NAK the client starts over with a DISCOVER.
                    Some(MessageType::Nak) => {
                        nak = Some(address);
                        break;
                    }
                    _ => {}
                }
            }
        }
        if nak.is_some() {
            continue;
        }
        // No address in the text: failures are grouped by their reason.
        return Err(format!(
            "no ACK for the offered address after {} tries",
            retries.len()
        ));
    }
    Err(format!(
        "no lease after {} tries (no OFFER, or NAK after NAK)",
        retries.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_options_pxe_firmware_sends() {
        let identity = Identity {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            arch: 7,
            vendor_class: b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
            user_class: Some(b"\x04iPXE".to_vec()),
            uuid: [9; 16],
        };
        let m = request(&identity, MessageType::Discover, 42, vec![]);
        let mut bytes = Vec::new();
        m.encode(&mut Encoder::new(&mut bytes)).unwrap();
        let back = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        let opts = back.opts();
        assert_eq!(back.xid(), 42);
        assert!(back.flags().broadcast());
        assert_eq!(opts.msg_type(), Some(MessageType::Discover));
        assert_eq!(
            opts.get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(identity.vendor_class.clone()))
        );
        assert_eq!(
            opts.get(OptionCode::ClientSystemArchitecture),
            Some(&DhcpOption::ClientSystemArchitecture(
                v4::Architecture::from(7)
            ))
        );
        assert_eq!(
            opts.get(OptionCode::UserClass),
            Some(&DhcpOption::UserClass(b"\x04iPXE".to_vec()))
        );
        let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
            opts.get(OptionCode::ClientMachineIdentifier)
        else {
            panic!("option 97")
        };
        assert_eq!(uuid.len(), 17, "type 0 and a 16-byte GUID");
        assert!(opts.get(OptionCode::ParameterRequestList).is_some());
    }

    #[test]
    fn the_boot_file_field_loses_its_nul_padding() {
        let mut m = Message::default();
        m.set_fname(b"ipxe.efi\0\0\0");
        assert_eq!(boot_file(&m).as_deref(), Some("ipxe.efi"));
        m.set_fname(b"");
        assert_eq!(boot_file(&m), None);
    }
}
