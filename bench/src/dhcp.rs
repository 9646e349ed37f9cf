//! The client side of DHCP for many simulated machines at once: one socket on
//! port 68 bound to the client interface, replies routed to each machine by
//! transaction ID (read from the raw bytes: each machine decodes its own, so
//! the one receiving task is not the harness's limit), and firmware-like
//! retransmission.

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
            let Some(xid) = reply_xid(&buf[..len]) else {
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

/// The xid of a BOOTP reply (op 2, a whole fixed header); `None` for anything else.
fn reply_xid(datagram: &[u8]) -> Option<u32> {
    const BOOTP_FIXED_LEN: usize = 236;
    if datagram.len() < BOOTP_FIXED_LEN || datagram[0] != 2 {
        return None;
    }
    Some(u32::from_be_bytes(datagram[4..8].try_into().ok()?))
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

fn request_message(
    identity: &Identity,
    kind: MessageType,
    xid: u32,
    extra: Vec<DhcpOption>,
) -> Message {
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

fn encode(message: &Message) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(548);
    message
        .encode(&mut Encoder::new(&mut bytes))
        .map_err(|e| format!("encoding a request: {e}"))?;
    Ok(bytes)
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

/// What an exchange cost besides its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tally {
    /// DISCOVERs and REQUESTs sent again because nothing answered in time.
    pub retransmits: u32,
    /// NAKs that sent the machine back to DISCOVER.
    pub naks: u32,
    /// From the last DISCOVER sent to the first address OFFER.
    pub offer_delay: Duration,
    /// From the last REQUEST sent to the ACK.
    pub ack_delay: Duration,
}

/// When UEFI (EDK2) and PXE ROMs resend a DISCOVER or REQUEST nobody
/// answered: after 4, 8, 16 and 32 s, then they give up.
pub const FIRMWARE_RETRIES: [Duration; 4] = [
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(32),
];

/// How many NAKs in a row a machine takes before it gives up. A NAK is a
/// server's answer, not silence, so it does not use up the retransmission
/// schedule; but a server that NAKs every REQUEST must still end in a failure.
pub const MAX_NAKS: u32 = 8;

/// DISCOVER/OFFER/REQUEST/ACK as PXE firmware does it: offers are collected
/// for `offer_wait`, an address offer and a proxyDHCP offer (no address, boot
/// file) are combined, and each step is resent on the `retries` schedule. A NAK
/// starts over with a DISCOVER (RFC 2131 §4.4.1) after a pause of its own.
/// What it cost is returned whether it succeeded or not.
pub async fn dora(
    wire: &DhcpWire,
    identity: &Identity,
    xid: u32,
    retries: &[Duration],
    offer_wait: Duration,
) -> (Result<Lease, String>, Tally) {
    let mut exchange = Exchange {
        wire,
        inbox: wire.open(xid),
        identity,
        xid,
        retries,
        offer_wait,
        tally: Tally::default(),
    };
    let result = exchange.run().await;
    wire.close(xid);
    (result, exchange.tally)
}

/// One machine's way to a lease.
struct Exchange<'a> {
    wire: &'a DhcpWire,
    inbox: mpsc::UnboundedReceiver<Vec<u8>>,
    identity: &'a Identity,
    xid: u32,
    retries: &'a [Duration],
    offer_wait: Duration,
    tally: Tally,
}

/// The offers one DISCOVER round collected.
struct Offers {
    address: Message,
    proxy: Option<Message>,
}

/// How a REQUEST ended.
enum Answer {
    Ack(Lease),
    Nak,
    Silence,
}

impl Exchange<'_> {
    async fn run(&mut self) -> Result<Lease, String> {
        loop {
            let Some(offers) = self.discover().await? else {
                // No address in the text: failures are grouped by their reason.
                return Err(format!("no OFFER after {} DISCOVERs", self.retries.len()));
            };
            match self.request(&offers).await? {
                Answer::Ack(lease) => return Ok(lease),
                Answer::Silence => {
                    return Err(format!(
                        "no ACK for the offered address after {} REQUESTs",
                        self.retries.len()
                    ))
                }
                Answer::Nak if self.tally.naks >= MAX_NAKS => {
                    return Err(format!("NAKed {MAX_NAKS} times in a row"))
                }
                Answer::Nak => {
                    tokio::time::sleep(restart_pause(self.xid, self.tally.naks)).await;
                    // Replies to the abandoned round must not answer the next one.
                    while self.inbox.try_recv().is_ok() {}
                }
            }
        }
    }

    /// The next reply to this exchange that decodes, or `None` at `until`.
    async fn next_reply(&mut self, until: tokio::time::Instant) -> Option<Message> {
        loop {
            let bytes = tokio::time::timeout_at(until, self.inbox.recv())
                .await
                .ok()??;
            if let Ok(m) = Message::decode(&mut Decoder::new(&bytes)) {
                return Some(m);
            }
        }
    }

    /// DISCOVER on the `retries` schedule until an address offer arrives.
    async fn discover(&mut self) -> Result<Option<Offers>, String> {
        let discover = encode(&request_message(
            self.identity,
            MessageType::Discover,
            self.xid,
            vec![],
        ))?;
        for (attempt, timeout) in self.retries.iter().enumerate() {
            if attempt > 0 {
                self.tally.retransmits += 1;
            }
            let sent = tokio::time::Instant::now();
            self.wire.broadcast(&discover).await?;
            let mut address_offer: Option<Message> = None;
            let mut proxy_offer: Option<Message> = None;
            let mut collect_until = tokio::time::Instant::now() + *timeout;
            while let Some(m) = self.next_reply(collect_until).await {
                if m.opts().msg_type() != Some(MessageType::Offer) {
                    continue;
                }
                if m.yiaddr().is_unspecified() {
                    proxy_offer.get_or_insert(m);
                } else if address_offer.is_none() {
                    self.tally.offer_delay = sent.elapsed();
                    address_offer = Some(m);
                }
                if address_offer.is_some() {
                    // Firmware waits a little for a proxy offer once it has an address.
                    collect_until =
                        collect_until.min(tokio::time::Instant::now() + self.offer_wait);
                    if proxy_offer.is_some() || address_offer.as_ref().and_then(boot_file).is_some()
                    {
                        break;
                    }
                }
            }
            if let Some(address) = address_offer {
                return Ok(Some(Offers {
                    address,
                    proxy: proxy_offer,
                }));
            }
        }
        Ok(None)
    }

    /// REQUEST the offered address on the `retries` schedule until an ACK or a
    /// NAK from the offering server.
    async fn request(&mut self, offers: &Offers) -> Result<Answer, String> {
        let offer = &offers.address;
        let server = server_id(offer).ok_or("OFFER without a server identifier")?;
        let address = offer.yiaddr();
        let req = encode(&request_message(
            self.identity,
            MessageType::Request,
            self.xid,
            vec![
                DhcpOption::ServerIdentifier(server),
                DhcpOption::RequestedIpAddress(address),
            ],
        ))?;
        for (attempt, timeout) in self.retries.iter().enumerate() {
            if attempt > 0 {
                self.tally.retransmits += 1;
            }
            let sent = tokio::time::Instant::now();
            self.wire.broadcast(&req).await?;
            let deadline = sent + *timeout;
            while let Some(m) = self.next_reply(deadline).await {
                if server_id(&m) != Some(server) {
                    continue;
                }
                match m.opts().msg_type() {
                    Some(MessageType::Ack) => {
                        self.tally.ack_delay = sent.elapsed();
                        // The boot file comes from the ACK, the address offer or the proxy offer.
                        let source = [Some(&m), Some(offer), offers.proxy.as_ref()]
                            .into_iter()
                            .flatten()
                            .find(|m| boot_file(m).is_some());
                        return Ok(Answer::Ack(Lease {
                            address,
                            next_server: source
                                .map(|m| m.siaddr())
                                .filter(|a| !a.is_unspecified())
                                .unwrap_or(server),
                            boot_file: source.and_then(boot_file),
                        }));
                    }
                    Some(MessageType::Nak) => {
                        self.tally.naks += 1;
                        return Ok(Answer::Nak);
                    }
                    _ => {}
                }
            }
        }
        Ok(Answer::Silence)
    }
}

/// The pause before DISCOVER after a NAK: 0-1 s, different for every machine
/// and every NAK. Machines NAKed together (a server that offered one address to
/// several of them) would otherwise DISCOVER together and collide again.
fn restart_pause(xid: u32, naks: u32) -> Duration {
    let mut x = (u64::from(xid) << 32 | u64::from(naks)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    Duration::from_millis(x % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_routed_by_the_xid_of_a_whole_bootp_reply() {
        let identity = Identity {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            arch: 7,
            vendor_class: b"PXEClient".to_vec(),
            user_class: None,
            uuid: [0; 16],
        };
        let mut m = request_message(&identity, MessageType::Offer, 0x1234_5678, vec![]);
        assert_eq!(
            reply_xid(&encode(&m).unwrap()),
            None,
            "a request is no reply"
        );
        m.set_opcode(v4::Opcode::BootReply);
        let reply = encode(&m).unwrap();
        assert_eq!(reply_xid(&reply), Some(0x1234_5678));
        assert_eq!(
            reply_xid(&reply[..235]),
            None,
            "cut inside the fixed header"
        );
    }

    #[test]
    fn machines_nakd_together_restart_apart() {
        // xids as `bench pxe` makes them: from the last three bytes of each MAC.
        let pauses: Vec<u64> = (0u32..200)
            .map(|i| restart_pause(0x1000_0000 | i << 8, 1).as_millis() as u64)
            .collect();
        assert!(pauses.iter().all(|&p| p < 1000));
        let mut tenths = [0; 10];
        for p in &pauses {
            tenths[*p as usize / 100] += 1;
        }
        assert!(
            tenths.iter().all(|&n| n >= 8),
            "spread over the second: {tenths:?}"
        );
        assert_ne!(restart_pause(0x1000_0100, 1), restart_pause(0x1000_0100, 2));
    }

    #[test]
    fn requests_carry_the_options_pxe_firmware_sends() {
        let identity = Identity {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            arch: 7,
            vendor_class: b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
            user_class: Some(b"\x04iPXE".to_vec()),
            uuid: [9; 16],
        };
        let m = request_message(&identity, MessageType::Discover, 42, vec![]);
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
