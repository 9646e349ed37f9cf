//! The client side of DHCP as PXE firmware runs it, sans-IO: replies and
//! timeouts in, datagrams to broadcast out. bench drives it for thousands of
//! machines on one tokio socket; the tests drive it on a blocking socket.
//!
//! DISCOVER/OFFER/REQUEST/ACK: offers are collected for the schedule's
//! `offer_wait` once an address offer is in, an address offer and a
//! proxyDHCP offer (no address, a boot file) are combined, and each step is
//! resent on the schedule's retries. A NAK starts over with a DISCOVER (RFC
//! 2131 §4.4.1) after a pause of its own.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use dhcproto::{
    v4::{self, DhcpOption, Message, MessageType, OptionCode},
    Decodable, Decoder, Encodable, Encoder,
};

/// How a machine presents itself in DHCP: the options its requests carry
/// besides the message type. `None` or empty: the option is not sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub mac: [u8; 6],
    /// Option 60.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 93.
    pub arch: Option<u16>,
    /// Option 94: type, major and minor (UNDI 2.1 is 1, 2, 1).
    pub network_interface: Option<(u8, u8, u8)>,
    /// Option 97, sent as type 0 and the GUID.
    pub uuid: Option<[u8; 16]>,
    /// Option 77 (iPXE sends it in RFC 3004 form).
    pub user_class: Option<Vec<u8>>,
    /// Option 55.
    pub parameter_request_list: Vec<OptionCode>,
}

impl Identity {
    /// A plain DHCP client: no PXE option at all.
    pub fn plain(mac: [u8; 6]) -> Self {
        Self {
            mac,
            vendor_class: None,
            arch: None,
            network_interface: None,
            uuid: None,
            user_class: None,
            parameter_request_list: Vec::new(),
        }
    }

    /// The same machine once iPXE runs on it: it says so in option 77.
    pub fn as_ipxe(&self) -> Self {
        Self {
            user_class: Some(IPXE_USER_CLASS.to_vec()),
            ..self.clone()
        }
    }
}

/// Option 77 as iPXE sends it: one RFC 3004 class, "iPXE".
pub const IPXE_USER_CLASS: &[u8] = b"\x04iPXE";

/// The options PXE firmware asks for (option 55): what PXE needs and the
/// network basics.
pub fn pxe_parameter_request_list() -> Vec<OptionCode> {
    vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::VendorExtensions,
        OptionCode::ClassIdentifier,
        OptionCode::ClientMachineIdentifier,
        OptionCode::TFTPServerName,
        OptionCode::BootfileName,
    ]
}

/// A request of `kind` from `identity`, broadcast flag set, with `extra`
/// options (a server identifier, a requested address).
pub fn request(
    identity: &Identity,
    kind: MessageType,
    xid: u32,
    extra: Vec<DhcpOption>,
) -> Message {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new(
        unspecified,
        unspecified,
        unspecified,
        unspecified,
        &identity.mac,
    );
    m.set_xid(xid);
    m.set_flags(v4::Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    if let Some(class) = &identity.vendor_class {
        opts.insert(DhcpOption::ClassIdentifier(class.clone()));
    }
    if let Some(arch) = identity.arch {
        opts.insert(DhcpOption::ClientSystemArchitecture(
            v4::Architecture::from(arch),
        ));
    }
    if let Some(uuid) = identity.uuid {
        let mut id = vec![0u8];
        id.extend_from_slice(&uuid);
        opts.insert(DhcpOption::ClientMachineIdentifier(id));
    }
    if let Some((kind, major, minor)) = identity.network_interface {
        opts.insert(DhcpOption::ClientNetworkInterface(kind, major, minor));
    }
    if !identity.parameter_request_list.is_empty() {
        opts.insert(DhcpOption::ParameterRequestList(
            identity.parameter_request_list.clone(),
        ));
    }
    if let Some(class) = &identity.user_class {
        opts.insert(DhcpOption::UserClass(class.clone()));
    }
    for o in extra {
        opts.insert(o);
    }
    m
}

/// The wire form of `message`.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(548);
    message
        .encode(&mut Encoder::new(&mut bytes))
        .expect("a message built from valid options encodes");
    bytes
}

/// The xid of a BOOTP reply (op 2, a whole fixed header), read from the raw
/// bytes without decoding them; `None` for anything else.
pub fn reply_xid(datagram: &[u8]) -> Option<u32> {
    const BOOTP_FIXED_LEN: usize = 236;
    if datagram.len() < BOOTP_FIXED_LEN || datagram[0] != 2 {
        return None;
    }
    Some(u32::from_be_bytes(datagram[4..8].try_into().ok()?))
}

/// `datagram` decoded, if it is a BOOTP reply with transaction `xid`.
pub fn decode_reply(datagram: &[u8], xid: u32) -> Option<Message> {
    if reply_xid(datagram) != Some(xid) {
        return None;
    }
    Message::decode(&mut Decoder::new(datagram)).ok()
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

/// The `file` field without its NUL padding (`Some("")` when the field is
/// there but empty).
pub fn file_field(m: &Message) -> Option<String> {
    m.fname_str()
        .and_then(Result::ok)
        .map(|f| f.trim_end_matches('\0').to_owned())
}

/// The boot file as firmware reads it: option 67 when present (EDK2 prefers
/// it), else the `file` field; `None` when both are empty.
pub fn boot_file(m: &Message) -> Option<String> {
    if let Some(DhcpOption::BootfileName(name)) = m.opts().get(OptionCode::BootfileName) {
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_owned();
        if !name.is_empty() {
            return Some(name);
        }
    }
    file_field(m).filter(|f| !f.is_empty())
}

/// A UDP socket on port 68 bound to `iface`, able to broadcast without an
/// address (several may share the port: SO_REUSEADDR). Blocking; the caller
/// makes it non-blocking for an async runtime.
pub fn client_socket(iface: &str) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding to interface {iface}: {e}")))?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding UDP port 68: {e}")))?;
    Ok(s)
}

/// When a client resends and how long it waits.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// How long each DISCOVER and each REQUEST waits for its answer; one
    /// entry per send, the first included.
    pub retries: Vec<Duration>,
    /// Once an address offer is in, how long to wait for a proxyDHCP offer.
    pub offer_wait: Duration,
    /// NAKs in a row after which the client gives up. A NAK is a server's
    /// answer, not silence, so it does not use up the retries; but a server
    /// that NAKs every REQUEST must still end in a failure.
    pub max_naks: u32,
}

/// What a completed exchange gave the machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub address: Ipv4Addr,
    /// The server that ACKed.
    pub server: Ipv4Addr,
    /// Where the boot file is: `siaddr` of the message that named it, else the server.
    pub next_server: Ipv4Addr,
    pub boot_file: Option<String>,
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

/// What the I/O side must do after an event.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Broadcast these bytes to port 67, then wait.
    Broadcast(Vec<u8>),
    /// Nothing to send: wait for a reply or the deadline.
    Wait,
    Done(Lease),
    Failed(String),
}

/// One machine's way to a lease.
pub struct Dora {
    identity: Identity,
    xid: u32,
    schedule: Schedule,
    tally: Tally,
    state: State,
}

enum State {
    Discovering(Discovering),
    Requesting(Requesting),
    /// After a NAK: replies to the abandoned round are ignored until then.
    Paused {
        until: Instant,
    },
    Finished,
}

struct Discovering {
    attempt: usize,
    sent: Instant,
    collect_until: Instant,
    address: Option<Message>,
    proxy: Option<Message>,
}

struct Requesting {
    attempt: usize,
    sent: Instant,
    deadline: Instant,
    bytes: Vec<u8>,
    server: Ipv4Addr,
    offer: Message,
    proxy: Option<Message>,
}

impl Dora {
    /// An exchange that has not sent anything yet; [`Dora::start`] begins it.
    pub fn new(identity: Identity, xid: u32, schedule: Schedule) -> Self {
        assert!(
            !schedule.retries.is_empty(),
            "a schedule sends at least once"
        );
        Self {
            identity,
            xid,
            schedule,
            tally: Tally::default(),
            state: State::Finished,
        }
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// What the exchange has cost so far (all of it once it ended).
    pub fn tally(&self) -> Tally {
        self.tally
    }

    /// The first DISCOVER.
    pub fn start(&mut self, now: Instant) -> Step {
        self.discover(now, 0)
    }

    /// When [`Dora::on_timeout`] is due if no reply comes first.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Discovering(d) => Some(d.collect_until),
            State::Requesting(r) => Some(r.deadline),
            State::Paused { until } => Some(*until),
            State::Finished => None,
        }
    }

    /// A datagram that arrived on port 68.
    pub fn on_reply(&mut self, now: Instant, datagram: &[u8]) -> Step {
        let Some(m) = decode_reply(datagram, self.xid) else {
            return Step::Wait;
        };
        match &self.state {
            State::Discovering(_) => self.on_offer(now, m),
            State::Requesting(_) => self.on_answer(now, m),
            State::Paused { .. } | State::Finished => Step::Wait,
        }
    }

    /// The deadline passed without the reply that would have moved on.
    pub fn on_timeout(&mut self, now: Instant) -> Step {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Discovering(d) => match d.address {
                Some(address) => self.request(now, address, d.proxy),
                None => self.discover(now, d.attempt + 1),
            },
            State::Requesting(r) => self.resend_request(now, r),
            State::Paused { .. } => self.discover(now, 0),
            State::Finished => Step::Wait,
        }
    }

    /// DISCOVER number `attempt` (0: the first of a round), or the end.
    fn discover(&mut self, now: Instant, attempt: usize) -> Step {
        let Some(timeout) = self.schedule.retries.get(attempt) else {
            // No address in the text: failures are grouped by their reason.
            return self.fail(format!("no OFFER after {attempt} DISCOVERs"));
        };
        if attempt > 0 {
            self.tally.retransmits += 1;
        }
        self.state = State::Discovering(Discovering {
            attempt,
            sent: now,
            collect_until: now + *timeout,
            address: None,
            proxy: None,
        });
        Step::Broadcast(encode(&request(
            &self.identity,
            MessageType::Discover,
            self.xid,
            vec![],
        )))
    }

    fn on_offer(&mut self, now: Instant, m: Message) -> Step {
        let State::Discovering(d) = &mut self.state else {
            return Step::Wait;
        };
        if kind(&m) != Some(MessageType::Offer) {
            return Step::Wait;
        }
        if m.yiaddr().is_unspecified() {
            d.proxy.get_or_insert(m);
        } else if d.address.is_none() {
            self.tally.offer_delay = now - d.sent;
            d.address = Some(m);
        }
        let Some(address) = &d.address else {
            return Step::Wait;
        };
        // Firmware waits a little for a proxy offer once it has an address,
        // unless it has everything already.
        d.collect_until = d.collect_until.min(now + self.schedule.offer_wait);
        if d.proxy.is_some() || boot_file(address).is_some() {
            return self.stop_collecting(now);
        }
        Step::Wait
    }

    /// Ends the DISCOVER round early: the offers in hand are all it needs.
    fn stop_collecting(&mut self, now: Instant) -> Step {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Discovering(Discovering {
                address: Some(address),
                proxy,
                ..
            }) => self.request(now, address, proxy),
            other => {
                self.state = other;
                Step::Wait
            }
        }
    }

    /// The first REQUEST for the offered address.
    fn request(&mut self, now: Instant, offer: Message, proxy: Option<Message>) -> Step {
        let Some(server) = server_id(&offer) else {
            return self.fail("OFFER without a server identifier".into());
        };
        let bytes = encode(&request(
            &self.identity,
            MessageType::Request,
            self.xid,
            vec![
                DhcpOption::ServerIdentifier(server),
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
            ],
        ));
        self.state = State::Requesting(Requesting {
            attempt: 0,
            sent: now,
            deadline: now + self.schedule.retries[0],
            bytes: bytes.clone(),
            server,
            offer,
            proxy,
        });
        Step::Broadcast(bytes)
    }

    fn resend_request(&mut self, now: Instant, mut r: Requesting) -> Step {
        r.attempt += 1;
        let Some(timeout) = self.schedule.retries.get(r.attempt) else {
            return self.fail(format!(
                "no ACK for the offered address after {} REQUESTs",
                r.attempt
            ));
        };
        self.tally.retransmits += 1;
        r.sent = now;
        r.deadline = now + *timeout;
        let bytes = r.bytes.clone();
        self.state = State::Requesting(r);
        Step::Broadcast(bytes)
    }

    /// An answer to the REQUEST: only the offering server's counts.
    fn on_answer(&mut self, now: Instant, m: Message) -> Step {
        let State::Requesting(r) = &self.state else {
            return Step::Wait;
        };
        if server_id(&m) != Some(r.server) {
            return Step::Wait;
        }
        match kind(&m) {
            Some(MessageType::Ack) => {
                self.tally.ack_delay = now - r.sent;
                let lease = lease(&m, r);
                self.state = State::Finished;
                Step::Done(lease)
            }
            Some(MessageType::Nak) => {
                self.tally.naks += 1;
                if self.tally.naks >= self.schedule.max_naks {
                    let max = self.schedule.max_naks;
                    return self.fail(format!("NAKed {max} times in a row"));
                }
                self.state = State::Paused {
                    until: now + restart_pause(self.xid, self.tally.naks),
                };
                Step::Wait
            }
            _ => Step::Wait,
        }
    }

    fn fail(&mut self, why: String) -> Step {
        self.state = State::Finished;
        Step::Failed(why)
    }
}

/// The lease an ACK gives: the boot file from the ACK, the address offer or
/// the proxy offer, whichever names one first.
fn lease(ack: &Message, r: &Requesting) -> Lease {
    let source = [Some(ack), Some(&r.offer), r.proxy.as_ref()]
        .into_iter()
        .flatten()
        .find(|m| boot_file(m).is_some());
    Lease {
        address: r.offer.yiaddr(),
        server: r.server,
        next_server: source
            .map(|m| m.siaddr())
            .filter(|a| !a.is_unspecified())
            .unwrap_or(r.server),
        boot_file: source.and_then(boot_file),
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
mod tests;
