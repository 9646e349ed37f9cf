//! The DHCP server's decisions (RFC 2131), sans-IO: a classified request, the
//! port and source it came from and the time go in; a reply and where to send
//! it come out, with a sentence for the machine's log.
//!
//! Modes:
//! - **full**: addresses from pools, reservations by MAC, leases written
//!   durably through the [`LeaseStore`] *before* any ACK is returned, plus boot
//!   information for PXE, iPXE and HTTP Boot clients;
//! - **proxy** (PXE 2.1 proxyDHCP): never an address; boot information only,
//!   to PXE clients only, beside a DHCP server we must not touch.
//!
//! Both answer boot server discovery on port 4011.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};

use super::{
    classify::{Firmware, Request},
    offers::Offers,
    pool::Subnet,
};
use crate::{
    lease::{client_key, Lease, LeaseError, LeaseState, LeaseStore},
    policy::{
        r#static::{Decision, ServerUrls, StaticPolicy},
        ClientKind, Mac, Machine,
    },
};

/// Port of boot server discovery (PXE 2.1).
pub const PROXY_PORT: u16 = 4011;
/// How long an offered address is held for the client that was offered it.
const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined address stays out of use.
const DECLINE_QUARANTINE_SECS: u64 = 600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    Proxy,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub mode: Mode,
    pub subnets: Vec<Subnet>,
    /// Fixed addresses by MAC.
    pub reservations: HashMap<Mac, Ipv4Addr>,
    /// NAK requests for addresses we know nothing of (RFC 2131 §4.3.2),
    /// instead of staying silent. Only for the one DHCP server of a network.
    pub authoritative: bool,
    /// TCP port of HTTP boot, for the URLs handed to iPXE and HTTP Boot.
    pub http_port: u16,
    /// The kernel answers repeat requests from templates of our replies
    /// (see [`KernelAnswer`]). Leases are then stored for twice their
    /// time, so that renewals the kernel ACKs are covered on disk.
    pub kernel_answers: bool,
}

/// What the kernel may answer again on its own after this reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelAnswer {
    /// Boot information without an address (proxyDHCP, port 4011): the
    /// same request shape gets the same answer while the config stands.
    Boot,
    /// A lease on disk until `stored_until` (Unix seconds): OFFER it until
    /// then, ACK it while a renewal of `lease_time` still ends before then.
    Lease {
        ip: Ipv4Addr,
        stored_until: u64,
        lease_time: u32,
    },
}

/// Where a request arrived: the port, the sender, and our address on the
/// interface it came in on (server identifier, next-server and URLs of the
/// reply; the subnet of a request that was not relayed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub port: u16,
    pub source: SocketAddrV4,
    pub server_ip: Ipv4Addr,
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 out of the serving interface.
    Broadcast,
    Unicast(SocketAddrV4),
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub message: Message,
    pub to: Destination,
}

/// What the engine did with one request.
#[derive(Debug)]
pub struct Outcome {
    pub reply: Option<Reply>,
    /// One line for the log: what was asked and what was answered.
    pub summary: String,
    /// Set when the request could not be served for a reason an operator
    /// must hear about (a full pool, a failing lease disk).
    pub problem: Option<Problem>,
    /// The request changed a lease without a reply (RELEASE, DECLINE): worth
    /// a line in the log like any answer.
    pub changed_lease: bool,
    /// The reply may be answered by the kernel the next time (set only
    /// when `EngineConfig::kernel_answers` is on).
    pub kernel: Option<KernelAnswer>,
    /// What the kernel answers this client must be forgotten (a NAK, a
    /// RELEASE or a DECLINE changed what it would be told).
    pub forget: bool,
    /// The request wrote to the lease store: its reply may leave only once
    /// the write is committed.
    wrote: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    PoolExhausted { subnet: String },
    LeaseStore(String),
}

/// Counters of what the engine answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub proxy_replies: u64,
    pub ignored: u64,
    pub pool_exhausted: u64,
    pub store_failures: u64,
}

pub struct Engine {
    config: EngineConfig,
    policy: Arc<StaticPolicy>,
    store: Box<dyn LeaseStore>,
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_client: HashMap<Vec<u8>, Ipv4Addr>,
    offers: Offers,
    /// Reserved address → the machine it is reserved for.
    reserved: HashMap<Ipv4Addr, Mac>,
    /// Where each subnet's free-address search resumes.
    cursors: Vec<u64>,
    stats: EngineStats,
    /// Our address on the interface of the request being handled.
    here: Ipv4Addr,
    /// The request being handled wrote to the lease store.
    wrote: bool,
}

/// Boot information for one reply.
struct BootAnswer {
    file: String,
    vendor_class: &'static [u8],
    tftp: bool,
}

impl Engine {
    /// Builds the engine and its index from every lease the store holds.
    pub fn new(
        config: EngineConfig,
        policy: Arc<StaticPolicy>,
        store: Box<dyn LeaseStore>,
    ) -> Result<Self, LeaseError> {
        let mut by_ip = HashMap::new();
        let mut by_client = HashMap::new();
        for lease in store.load_all()? {
            if lease.state != LeaseState::Declined {
                by_client.insert(lease.client.clone(), lease.ip);
            }
            by_ip.insert(lease.ip, lease);
        }
        let cursors = vec![0; config.subnets.len()];
        let reserved = reverse(&config.reservations);
        Ok(Self {
            config,
            policy,
            store,
            by_ip,
            by_client,
            offers: Offers::default(),
            reserved,
            cursors,
            stats: EngineStats::default(),
            here: Ipv4Addr::UNSPECIFIED,
            wrote: false,
        })
    }

    /// Replaces the configuration and policy (SIGHUP); leases stay.
    pub fn reconfigure(&mut self, config: EngineConfig, policy: Arc<StaticPolicy>) {
        self.cursors = vec![0; config.subnets.len()];
        self.reserved = reverse(&config.reservations);
        self.config = config;
        self.policy = policy;
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The lease currently recorded for `ip`, if any.
    pub fn lease(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// Decides on one request, at `now` (seconds since the Unix epoch), and
    /// commits the lease it wrote, if any.
    pub fn handle(&mut self, req: &Request, arrival: Arrival, now: u64) -> Outcome {
        self.handle_batch([(req, arrival)], now)
            .pop()
            .expect("one outcome per request")
    }

    /// Decides on a burst of requests in arrival order, then commits every
    /// lease they wrote at once (one disk flush for the burst). Replies that
    /// depend on a write are withdrawn if the commit fails.
    pub fn handle_batch<'a>(
        &mut self,
        requests: impl IntoIterator<Item = (&'a Request, Arrival)>,
        now: u64,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let mut ports = Vec::new();
        for (req, arrival) in requests {
            outcomes.push(self.decide(req, arrival, now));
            ports.push(arrival.port);
        }
        if outcomes.iter().any(|o| o.wrote) {
            if let Err(e) = self.store.commit() {
                for o in outcomes.iter_mut().filter(|o| o.wrote) {
                    o.reply = None;
                    o.kernel = None;
                    o.summary = format!(
                        "{}; not answered, the lease could not be stored: {e}",
                        o.summary
                    );
                    o.problem = Some(Problem::LeaseStore(e.to_string()));
                }
            }
        }
        for (o, port) in outcomes.iter().zip(ports) {
            self.count(o, port);
        }
        outcomes
    }

    fn decide(&mut self, req: &Request, arrival: Arrival, now: u64) -> Outcome {
        self.here = arrival.server_ip;
        self.wrote = false;
        let mut outcome = if arrival.port == PROXY_PORT {
            self.boot_server_discovery(req, arrival.source)
        } else {
            match self.config.mode {
                Mode::Proxy => self.proxy(req),
                Mode::Full => self.full(req, now),
            }
        };
        outcome.wrote = self.wrote;
        outcome
    }

    fn count(&mut self, outcome: &Outcome, port: u16) {
        match &outcome.reply {
            None => self.stats.ignored += 1,
            Some(r) => match r.message.opts().msg_type() {
                Some(MessageType::Offer)
                    if self.config.mode == Mode::Full && port != PROXY_PORT =>
                {
                    self.stats.offers += 1
                }
                Some(MessageType::Ack) if self.config.mode == Mode::Full && port != PROXY_PORT => {
                    self.stats.acks += 1
                }
                Some(MessageType::Nak) => self.stats.naks += 1,
                _ => self.stats.proxy_replies += 1,
            },
        }
        match &outcome.problem {
            Some(Problem::PoolExhausted { .. }) => self.stats.pool_exhausted += 1,
            Some(Problem::LeaseStore(_)) => self.stats.store_failures += 1,
            None => {}
        }
    }

    // ---- proxyDHCP ------------------------------------------------------

    /// Port 67 in proxy mode: a boot-only OFFER to PXE DISCOVERs; everything
    /// else belongs to the network's DHCP server.
    fn proxy(&mut self, req: &Request) -> Outcome {
        if req.msg_type != MessageType::Discover {
            return silent(format!(
                "{} from {}: not ours in proxy mode",
                name(req.msg_type),
                req.mac
            ));
        }
        let Some(boot) = self.boot_answer(req) else {
            return silent(format!(
                "DISCOVER from {} ({}): no boot answer",
                req.mac,
                describe(req)
            ));
        };
        let mut reply = self.reply_to(req, MessageType::Offer, Ipv4Addr::UNSPECIFIED);
        self.add_boot(&mut reply, req, &boot);
        let to = self.destination(req);
        let outcome = answered(
            format!(
                "DISCOVER from {} ({}) → proxy OFFER, boot {}",
                req.mac,
                describe(req),
                boot.file
            ),
            reply,
            to,
        );
        self.kernel_may_repeat(outcome, KernelAnswer::Boot)
    }

    /// Port 4011: the client has an address and asks for its boot file.
    fn boot_server_discovery(&mut self, req: &Request, source: SocketAddrV4) -> Outcome {
        if !matches!(req.msg_type, MessageType::Request | MessageType::Inform) {
            return silent(format!(
                "{} from {} on 4011: ignored",
                name(req.msg_type),
                req.mac
            ));
        }
        let Some(boot) = self.boot_answer(req) else {
            return silent(format!(
                "{} from {} on 4011 ({}): no boot answer",
                name(req.msg_type),
                req.mac,
                describe(req)
            ));
        };
        let mut reply = self.reply_to(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED);
        reply.set_ciaddr(req.message.ciaddr());
        self.add_boot(&mut reply, req, &boot);
        let outcome = answered(
            format!(
                "{} from {} on 4011 ({}) → ACK, boot {}",
                name(req.msg_type),
                req.mac,
                describe(req),
                boot.file
            ),
            reply,
            Destination::Unicast(source),
        );
        if req.msg_type == MessageType::Request {
            return self.kernel_may_repeat(outcome, KernelAnswer::Boot);
        }
        outcome
    }

    // ---- full DHCP ------------------------------------------------------

    fn full(&mut self, req: &Request, now: u64) -> Outcome {
        self.offers.sweep(now);
        match req.msg_type {
            MessageType::Discover => self.discover(req, now),
            MessageType::Request => self.request(req, now),
            MessageType::Release => self.release(req, now),
            MessageType::Decline => self.decline(req, now),
            MessageType::Inform => self.inform(req),
            other => silent(format!(
                "{} from {}: not a client message",
                name(other),
                req.mac
            )),
        }
    }

    fn discover(&mut self, req: &Request, now: u64) -> Outcome {
        let client = key(req);
        let Some(subnet) = self.subnet_for(req) else {
            return silent(format!(
                "DISCOVER from {}: no subnet for giaddr {}",
                req.mac,
                req.message.giaddr()
            ));
        };
        let Some(ip) = self.choose_address(req, &client, subnet, now) else {
            let network = self.config.subnets[subnet].network.to_string();
            return Outcome {
                problem: Some(Problem::PoolExhausted {
                    subnet: network.clone(),
                }),
                ..silent(format!(
                    "DISCOVER from {}: no free address in {network}",
                    req.mac
                ))
            };
        };
        self.offers.hold(ip, client, now + OFFER_HOLD_SECS);
        let mut reply = self.reply_to(req, MessageType::Offer, ip);
        self.add_lease_options(&mut reply, req, subnet);
        let boot = self.add_boot_if_any(&mut reply, req);
        let to = self.destination(req);
        answered(
            format!(
                "DISCOVER from {} ({}) → OFFER {ip}{}",
                req.mac,
                describe(req),
                boot
            ),
            reply,
            to,
        )
    }

    fn request(&mut self, req: &Request, now: u64) -> Outcome {
        let client = key(req);
        let ciaddr = req.message.ciaddr();
        if let Some(server_id) = req.server_id {
            // SELECTING: the client answers an OFFER.
            if server_id != self.here {
                self.offers.release_client(&client);
                return silent(format!(
                    "REQUEST from {}: chose server {server_id}",
                    req.mac
                ));
            }
            let Some(ip) = req
                .requested_ip
                .or((!ciaddr.is_unspecified()).then_some(ciaddr))
            else {
                return self.nak(req, "REQUEST names no address");
            };
            let offered = self.offers.is_held_for(ip, &client);
            let held = self.by_client.get(&client) == Some(&ip);
            let Some(subnet) = self.subnet_for(req) else {
                return self.nak(req, "no subnet for this request");
            };
            if !(offered || held) || !self.assignable(ip, &client, req.mac, subnet, now) {
                return self.nak(req, &format!("{ip} was not offered to this client"));
            }
            return self.commit_and_ack(req, client, ip, subnet, now, "SELECTING");
        }
        if let Some(ip) = req.requested_ip {
            // INIT-REBOOT: the client wants its old address back.
            let Some(subnet) = self.subnet_for(req) else {
                return silent(format!("REQUEST from {}: no subnet", req.mac));
            };
            if !self.config.subnets[subnet].contains(ip) {
                return self.nak(req, &format!("{ip} is not on this network"));
            }
            let ours = self.by_client.get(&client) == Some(&ip)
                || self.config.reservations.get(&req.mac) == Some(&ip);
            if ours && self.assignable(ip, &client, req.mac, subnet, now) {
                return self.commit_and_ack(req, client, ip, subnet, now, "INIT-REBOOT");
            }
            if self.held_by_other(ip, &client, now)
                || self
                    .config
                    .reservations
                    .get(&req.mac)
                    .is_some_and(|r| *r != ip)
            {
                return self.nak(req, &format!("{ip} belongs to another client"));
            }
            if self.config.authoritative {
                return self.nak(req, &format!("no record of {ip} for this client"));
            }
            return silent(format!(
                "REQUEST (INIT-REBOOT) from {} for {ip}: no record, not authoritative",
                req.mac
            ));
        }
        if !ciaddr.is_unspecified() {
            // RENEWING (unicast) or REBINDING (broadcast).
            let Some(subnet) = self.subnet_for(req) else {
                return silent(format!("REQUEST from {}: no subnet", req.mac));
            };
            if self.by_client.get(&client) == Some(&ciaddr)
                && self.assignable(ciaddr, &client, req.mac, subnet, now)
            {
                return self.commit_and_ack(req, client, ciaddr, subnet, now, "RENEWING");
            }
            if self.held_by_other(ciaddr, &client, now) {
                return self.nak(req, &format!("{ciaddr} belongs to another client"));
            }
            return silent(format!(
                "REQUEST (renew) from {} for {ciaddr}: no record",
                req.mac
            ));
        }
        silent(format!("REQUEST from {}: names no address", req.mac))
    }

    fn commit_and_ack(
        &mut self,
        req: &Request,
        client: Vec<u8>,
        ip: Ipv4Addr,
        subnet: usize,
        now: u64,
        state: &str,
    ) -> Outcome {
        let lease_time = self.config.subnets[subnet].lease_time;
        // With kernel answers, the disk holds the lease a lease time longer
        // than the client is told: the kernel may ACK renewals until then.
        let stored_for = u64::from(lease_time) * if self.config.kernel_answers { 2 } else { 1 };
        let lease = Lease {
            ip,
            client: client.clone(),
            mac: req.mac.0,
            expires: now + stored_for,
            state: LeaseState::Active,
            hostname: self
                .policy
                .machines
                .get(&req.mac)
                .and_then(|m| m.hostname.clone())
                .or_else(|| req.hostname.clone()),
        };
        // A client that moves to a new address gives up its old one.
        if let Some(old) = self
            .by_client
            .get(&client)
            .copied()
            .filter(|old| *old != ip)
        {
            if let Some(mut previous) = self.by_ip.get(&old).cloned() {
                previous.state = LeaseState::Released;
                previous.expires = now;
                if let Err(e) = self.write(&previous) {
                    return store_failed(req, e);
                }
                self.by_ip.insert(old, previous);
            }
        }
        if let Err(e) = self.write(&lease) {
            return store_failed(req, e);
        }
        self.offers.release_ip(ip);
        self.by_client.insert(client, ip);
        self.by_ip.insert(ip, lease);

        let mut reply = self.reply_to(req, MessageType::Ack, ip);
        reply.set_ciaddr(req.message.ciaddr());
        self.add_lease_options(&mut reply, req, subnet);
        let boot = self.add_boot_if_any(&mut reply, req);
        let to = self.destination(req);
        let outcome = answered(
            format!(
                "REQUEST ({state}) from {} ({}) → ACK {ip}{}",
                req.mac,
                describe(req),
                boot
            ),
            reply,
            to,
        );
        self.kernel_may_repeat(
            outcome,
            KernelAnswer::Lease {
                ip,
                stored_until: now + stored_for,
                lease_time,
            },
        )
    }

    /// Marks an answer the kernel may give again on its own, if it may.
    fn kernel_may_repeat(&self, mut outcome: Outcome, answer: KernelAnswer) -> Outcome {
        if self.config.kernel_answers {
            outcome.kernel = Some(answer);
        }
        outcome
    }

    fn release(&mut self, req: &Request, now: u64) -> Outcome {
        let client = key(req);
        let ip = req.message.ciaddr();
        if req.server_id.is_some_and(|s| s != self.here) || self.by_client.get(&client) != Some(&ip)
        {
            return silent(format!("RELEASE from {} for {ip}: not our lease", req.mac));
        }
        let Some(mut lease) = self.by_ip.get(&ip).cloned() else {
            return silent("RELEASE: no record".into());
        };
        lease.state = LeaseState::Released;
        lease.expires = now;
        if let Err(e) = self.write(&lease) {
            return store_failed(req, e);
        }
        self.by_ip.insert(ip, lease);
        forgotten(changed(format!(
            "RELEASE from {}: {ip} is free again (kept for this client)",
            req.mac
        )))
    }

    fn decline(&mut self, req: &Request, now: u64) -> Outcome {
        let client = key(req);
        let Some(ip) = req.requested_ip else {
            return silent(format!("DECLINE from {}: names no address", req.mac));
        };
        if self.by_client.get(&client) != Some(&ip) && !self.offers.is_held_for(ip, &client) {
            return silent(format!(
                "DECLINE from {} for {ip}: not this client's",
                req.mac
            ));
        }
        let quarantined = Lease {
            ip,
            client: Vec::new(),
            mac: req.mac.0,
            expires: now + DECLINE_QUARANTINE_SECS,
            state: LeaseState::Declined,
            hostname: None,
        };
        if let Err(e) = self.write(&quarantined) {
            return store_failed(req, e);
        }
        self.by_client.remove(&client);
        self.offers.release_ip(ip);
        self.by_ip.insert(ip, quarantined);
        forgotten(changed(format!("DECLINE from {}: {ip} is in use on the wire; quarantined for {DECLINE_QUARANTINE_SECS} s", req.mac)))
    }

    fn inform(&mut self, req: &Request) -> Outcome {
        let ciaddr = req.message.ciaddr();
        let Some(subnet) = self.subnet_for(req) else {
            return silent(format!("INFORM from {}: no subnet", req.mac));
        };
        let mut reply = self.reply_to(req, MessageType::Ack, Ipv4Addr::UNSPECIFIED);
        reply.set_ciaddr(ciaddr);
        self.add_lease_options(&mut reply, req, subnet);
        // RFC 2131 §3.4: no lease time in an answer to INFORM.
        reply.opts_mut().remove(OptionCode::AddressLeaseTime);
        reply.opts_mut().remove(OptionCode::Renewal);
        reply.opts_mut().remove(OptionCode::Rebinding);
        let boot = self.add_boot_if_any(&mut reply, req);
        let to = if ciaddr.is_unspecified() {
            self.destination(req)
        } else {
            Destination::Unicast(SocketAddrV4::new(ciaddr, 68))
        };
        answered(format!("INFORM from {} → ACK{}", req.mac, boot), reply, to)
    }

    fn nak(&mut self, req: &Request, why: &str) -> Outcome {
        let mut reply = self.reply_to(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED);
        reply.set_siaddr(Ipv4Addr::UNSPECIFIED);
        reply.opts_mut().insert(DhcpOption::Message(why.to_owned()));
        // RFC 2131 §4.1: a NAK is broadcast unless it goes to a relay.
        let to = if req.message.giaddr().is_unspecified() {
            Destination::Broadcast
        } else {
            Destination::Unicast(SocketAddrV4::new(req.message.giaddr(), 67))
        };
        forgotten(answered(
            format!("REQUEST from {} → NAK: {why}", req.mac),
            reply,
            to,
        ))
    }

    /// Writes a lease into the store's open batch, to be committed before
    /// this request's reply leaves.
    fn write(&mut self, lease: &Lease) -> Result<(), LeaseError> {
        self.wrote = true;
        self.store.put(lease)
    }

    // ---- addresses ------------------------------------------------------

    /// The subnet a request belongs to: the relay's (giaddr), else ours.
    fn subnet_for(&self, req: &Request) -> Option<usize> {
        let giaddr = req.message.giaddr();
        let anchor = if giaddr.is_unspecified() {
            self.here
        } else {
            giaddr
        };
        self.config.subnets.iter().position(|s| s.contains(anchor))
    }

    fn held_by_other(&self, ip: Ipv4Addr, client: &[u8], now: u64) -> bool {
        self.by_ip
            .get(&ip)
            .is_some_and(|l| l.is_current(now) && l.client != client)
    }

    /// May `ip` go to this client now?
    fn assignable(&self, ip: Ipv4Addr, client: &[u8], mac: Mac, subnet: usize, now: u64) -> bool {
        let s = &self.config.subnets[subnet];
        let reserved_for_this = self.config.reservations.get(&mac) == Some(&ip);
        let reserved_for_other = self.reserved.get(&ip).is_some_and(|m| *m != mac);
        (s.in_pool(ip) || (reserved_for_this && s.contains(ip)))
            && !reserved_for_other
            && ip != self.here
            && !self.held_by_other(ip, client, now)
            && !self.offers.is_held_for_another(ip, client, now)
    }

    fn choose_address(
        &mut self,
        req: &Request,
        client: &[u8],
        subnet: usize,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = self.config.reservations.get(&req.mac).copied() {
            return self
                .assignable(ip, client, req.mac, subnet, now)
                .then_some(ip);
        }
        let offered = self.offers.of_client(client);
        let previous = self.by_client.get(client).copied();
        for candidate in [offered, previous, req.requested_ip].into_iter().flatten() {
            if self.assignable(candidate, client, req.mac, subnet, now) {
                return Some(candidate);
            }
        }
        // A fresh address first (no record at all), then one whose lease ran out.
        let len = self.config.subnets[subnet].pool_len();
        for reclaim in [false, true] {
            let start = self.cursors[subnet];
            for step in 0..len {
                let n = (start + step) % len;
                let Some(ip) = self.config.subnets[subnet].nth(n) else {
                    continue;
                };
                if (reclaim || !self.by_ip.contains_key(&ip))
                    && self.assignable(ip, client, req.mac, subnet, now)
                {
                    self.cursors[subnet] = (n + 1) % len;
                    return Some(ip);
                }
            }
        }
        None
    }

    // ---- replies --------------------------------------------------------

    fn reply_to(&self, req: &Request, kind: MessageType, yiaddr: Ipv4Addr) -> Message {
        let m = &req.message;
        let mut reply = Message::new_with_id(
            m.xid(),
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            self.here,
            m.giaddr(),
            m.chaddr(),
        );
        reply.set_opcode(Opcode::BootReply);
        reply.set_flags(m.flags());
        reply.opts_mut().insert(DhcpOption::MessageType(kind));
        reply
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.here));
        // RFC 3046 §2.2: echo the relay agent information.
        if let Some(relay) = m.opts().get(OptionCode::RelayAgentInformation) {
            reply.opts_mut().insert(relay.clone());
        }
        reply
    }

    fn add_lease_options(&self, reply: &mut Message, req: &Request, subnet: usize) {
        let s = &self.config.subnets[subnet];
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(s.lease_time));
        opts.insert(DhcpOption::Renewal(s.lease_time / 2));
        opts.insert(DhcpOption::Rebinding(s.lease_time / 8 * 7));
        opts.insert(DhcpOption::SubnetMask(s.network.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(s.network.broadcast()));
        if let Some(router) = s.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if !s.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(s.dns.clone()));
        }
        if let Some(domain) = &s.domain {
            opts.insert(DhcpOption::DomainName(domain.clone()));
        }
        if let Some(hostname) = self
            .policy
            .machines
            .get(&req.mac)
            .and_then(|m| m.hostname.clone())
        {
            opts.insert(DhcpOption::Hostname(hostname));
        }
    }

    /// What to boot, if this client boots from us.
    fn boot_answer(&self, req: &Request) -> Option<BootAnswer> {
        if req.firmware == Firmware::NotPxe {
            return None;
        }
        let firmware = match self.policy.machines.get(&req.mac).and_then(|m| m.client) {
            Some(ClientKind::Pxe) => Firmware::Pxe,
            Some(ClientKind::Ipxe) => Firmware::Ipxe,
            Some(ClientKind::HttpBoot) => Firmware::HttpBoot,
            None => req.firmware,
        };
        let machine = Machine {
            mac: req.mac,
            arch: req.arch,
            uuid: req.uuid.clone(),
        };
        let urls = ServerUrls::new(self.here, self.config.http_port);
        let decision = self.policy.decide(&machine, &urls);
        match (firmware, decision) {
            (_, Decision::Ignore) => None,
            // iPXE asks for its script; a provisioned machine's script boots the disk.
            (Firmware::Ipxe, Decision::Boot(_) | Decision::LocalBoot) => {
                let mut url = format!(
                    "{}/boot.ipxe?mac={}&arch={}",
                    urls.http,
                    req.mac,
                    req.arch.name()
                );
                if let Some(uuid) = &req.uuid {
                    url.push_str(&format!("&uuid={uuid}"));
                }
                Some(BootAnswer {
                    file: url,
                    vendor_class: b"PXEClient",
                    tftp: false,
                })
            }
            (Firmware::HttpBoot, Decision::Boot(spec)) => Some(BootAnswer {
                file: format!("{}/{}", urls.http, spec.boot_file?),
                vendor_class: b"HTTPClient",
                tftp: false,
            }),
            (Firmware::Pxe, Decision::Boot(spec)) => Some(BootAnswer {
                file: spec.boot_file?,
                vendor_class: b"PXEClient",
                tftp: true,
            }),
            _ => None,
        }
    }

    /// Adds the client's boot information to `reply`, if it boots from us;
    /// returns a note for the log (", boot FILE" or nothing).
    fn add_boot_if_any(&self, reply: &mut Message, req: &Request) -> String {
        match self.boot_answer(req) {
            Some(boot) => {
                self.add_boot(reply, req, &boot);
                format!(", boot {}", boot.file)
            }
            None => String::new(),
        }
    }

    fn add_boot(&self, reply: &mut Message, req: &Request, boot: &BootAnswer) {
        reply.set_siaddr(self.here);
        reply.set_fname_str(&boot.file);
        let opts = reply.opts_mut();
        // PXE 2.1 §2.5: replies to PXE clients carry option 60; UEFI HTTP Boot
        // requires "HTTPClient" (UEFI 2.x §24.7).
        opts.insert(DhcpOption::ClassIdentifier(boot.vendor_class.to_vec()));
        if boot.tftp {
            opts.insert(DhcpOption::TFTPServerName(
                self.here.to_string().into_bytes(),
            ));
            opts.insert(DhcpOption::BootfileName(boot.file.clone().into_bytes()));
            // PXE_DISCOVERY_CONTROL = 8: use the boot file given here, skip
            // boot server discovery (PXE 2.1 §2.4.2.1).
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if let Some(uuid) = &req.uuid_raw {
            opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
        }
    }

    /// RFC 2131 §4.1: relay → giaddr:67; a client with an address → ciaddr:68;
    /// otherwise broadcast (we do not unicast to an address the client has not
    /// yet configured, which would need an ARP entry injected).
    fn destination(&self, req: &Request) -> Destination {
        let m = &req.message;
        if !m.giaddr().is_unspecified() {
            return Destination::Unicast(SocketAddrV4::new(m.giaddr(), 67));
        }
        if !m.ciaddr().is_unspecified() && !m.flags().broadcast() {
            return Destination::Unicast(SocketAddrV4::new(m.ciaddr(), 68));
        }
        Destination::Broadcast
    }
}

/// Reservations by address.
fn reverse(reservations: &HashMap<Mac, Ipv4Addr>) -> HashMap<Ipv4Addr, Mac> {
    reservations.iter().map(|(mac, ip)| (*ip, *mac)).collect()
}

fn key(req: &Request) -> Vec<u8> {
    client_key(req.client_id.as_deref(), req.mac.0)
}

fn silent(summary: String) -> Outcome {
    Outcome {
        reply: None,
        summary,
        problem: None,
        changed_lease: false,
        kernel: None,
        forget: false,
        wrote: false,
    }
}

fn changed(summary: String) -> Outcome {
    Outcome {
        changed_lease: true,
        ..silent(summary)
    }
}

fn answered(summary: String, message: Message, to: Destination) -> Outcome {
    Outcome {
        reply: Some(Reply { message, to }),
        ..silent(summary)
    }
}

fn forgotten(outcome: Outcome) -> Outcome {
    Outcome {
        forget: true,
        ..outcome
    }
}

fn store_failed(req: &Request, e: LeaseError) -> Outcome {
    Outcome {
        problem: Some(Problem::LeaseStore(e.to_string())),
        ..silent(format!(
            "{} from {}: not answered, the lease could not be stored: {e}",
            name(req.msg_type),
            req.mac
        ))
    }
}

fn describe(req: &Request) -> String {
    let firmware = match req.firmware {
        Firmware::NotPxe => return "no PXE".to_owned(),
        Firmware::Pxe => "PXE",
        Firmware::Ipxe => "iPXE",
        Firmware::HttpBoot => "HTTP Boot",
    };
    format!("{firmware}, {}", req.arch.name())
}

fn name(t: MessageType) -> String {
    format!("{t:?}").to_uppercase()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use dhcproto::v4::{self, relay};

    use super::*;
    use crate::{
        dhcp::{classify::classify, classify::tests::request, pool::parse_range},
        lease::MemLeaseStore,
        policy::r#static::{MachineEntry, Profile},
    };

    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const T0: u64 = 1_000_000;

    fn subnet(net: &str, range: &str) -> Subnet {
        Subnet {
            network: net.parse().unwrap(),
            ranges: vec![parse_range(range).unwrap()],
            exclude: vec![],
            router: Some(SERVER),
            dns: vec![SERVER],
            domain: Some("lab".into()),
            lease_time: 3600,
        }
    }

    fn policy(machines: HashMap<Mac, MachineEntry>) -> Arc<StaticPolicy> {
        Arc::new(StaticPolicy {
            profiles: [("default".to_owned(), Profile::named("default"))].into(),
            machines,
            default_profile: Some("default".into()),
        })
    }

    fn config(mode: Mode) -> EngineConfig {
        EngineConfig {
            mode,
            subnets: vec![
                subnet("198.18.0.0/24", "198.18.0.100-198.18.0.109"),
                subnet("198.18.5.0/24", "198.18.5.10-198.18.5.19"),
            ],
            reservations: HashMap::new(),
            authoritative: false,
            http_port: 80,
            kernel_answers: false,
        }
    }

    fn engine(mode: Mode) -> Engine {
        Engine::new(
            config(mode),
            policy(HashMap::new()),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap()
    }

    fn mac(n: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0, 0, n]
    }

    fn uefi(kind: MessageType, n: u8, mut extra: Vec<DhcpOption>) -> Request {
        extra.push(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
        ));
        extra.push(DhcpOption::ClientSystemArchitecture(
            v4::Architecture::from(7),
        ));
        classify(&request(kind, mac(n), extra)).unwrap()
    }

    fn plain(kind: MessageType, n: u8, extra: Vec<DhcpOption>) -> Request {
        classify(&request(kind, mac(n), extra)).unwrap()
    }

    fn src() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
    }

    /// A request that arrived on `port` of the interface that has SERVER.
    fn at(port: u16, source: SocketAddrV4) -> Arrival {
        Arrival {
            port,
            source,
            server_ip: SERVER,
        }
    }

    fn msg_type(o: &Outcome) -> Option<MessageType> {
        o.reply.as_ref()?.message.opts().msg_type()
    }

    /// DISCOVER then REQUEST; returns the ACKed address.
    fn dora(
        e: &mut Engine,
        req: impl Fn(MessageType, Vec<DhcpOption>) -> Request,
        now: u64,
    ) -> Ipv4Addr {
        let offer = e.handle(&req(MessageType::Discover, vec![]), at(67, src()), now);
        assert_eq!(
            msg_type(&offer),
            Some(MessageType::Offer),
            "{}",
            offer.summary
        );
        let ip = offer.reply.unwrap().message.yiaddr();
        let ack = e.handle(
            &req(
                MessageType::Request,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            ),
            at(67, src()),
            now,
        );
        assert_eq!(msg_type(&ack), Some(MessageType::Ack), "{}", ack.summary);
        assert_eq!(ack.reply.unwrap().message.yiaddr(), ip);
        ip
    }

    #[test]
    fn a_uefi_client_gets_an_address_and_its_boot_file() {
        let mut e = engine(Mode::Full);
        let offer = e.handle(&uefi(MessageType::Discover, 1, vec![]), at(67, src()), T0);
        let reply = offer.reply.expect("an OFFER");
        let m = &reply.message;
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        assert!(subnet("198.18.0.0/24", "198.18.0.100-198.18.0.109").in_pool(m.yiaddr()));
        assert_eq!(m.siaddr(), SERVER);
        assert_eq!(m.fname_str().unwrap().unwrap(), "ipxe.efi");
        assert_eq!(
            m.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            m.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert_eq!(
            m.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            m.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        assert_eq!(reply.to, Destination::Broadcast);
        let ip = dora(&mut e, |k, o| uefi(k, 1, o), T0);
        assert_eq!(ip, m.yiaddr());
        assert_eq!(e.lease(ip).unwrap().state, LeaseState::Active);
    }

    #[test]
    fn boot_answers_follow_the_firmware() {
        let mut e = engine(Mode::Full);
        let ipxe = plain(
            MessageType::Discover,
            2,
            vec![
                DhcpOption::UserClass(b"iPXE".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(7)),
            ],
        );
        let m = e.handle(&ipxe, at(67, src()), T0).reply.unwrap().message;
        assert_eq!(
            m.fname_str().unwrap().unwrap(),
            "http://198.18.0.1/boot.ipxe?mac=52:54:00:00:00:02&arch=uefi-x64"
        );

        let http = plain(
            MessageType::Discover,
            3,
            vec![
                DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(16)),
            ],
        );
        let m = e.handle(&http, at(67, src()), T0).reply.unwrap().message;
        assert_eq!(
            m.fname_str().unwrap().unwrap(),
            "http://198.18.0.1/ipxe.efi"
        );
        assert_eq!(
            m.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );

        let bios = plain(
            MessageType::Discover,
            4,
            vec![DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
            )],
        );
        assert_eq!(
            e.handle(&bios, at(67, src()), T0)
                .reply
                .unwrap()
                .message
                .fname_str()
                .unwrap()
                .unwrap(),
            "undionly.kpxe"
        );

        let os = plain(MessageType::Discover, 5, vec![]);
        let m = e.handle(&os, at(67, src()), T0).reply.unwrap().message;
        assert!(
            m.fname().is_none(),
            "an OS client gets an address, no boot file"
        );
    }

    #[test]
    fn a_machine_keeps_its_address_when_ipxe_takes_over_with_a_client_identifier() {
        let mut e = engine(Mode::Full);
        let firmware_ip = dora(&mut e, |k, o| uefi(k, 40, o), T0);
        let ipxe_ip = dora(
            &mut e,
            |k, mut o| {
                o.push(DhcpOption::UserClass(b"iPXE".to_vec()));
                o.push(DhcpOption::ClientIdentifier(
                    [&[1u8][..], &mac(40)].concat(),
                ));
                plain(k, 40, o)
            },
            T0 + 5,
        );
        assert_eq!(
            ipxe_ip, firmware_ip,
            "one machine, one address across the chainload"
        );
    }

    #[test]
    fn a_provisioned_machine_gets_an_address_but_no_boot_file_and_ipxe_gets_its_local_boot_script()
    {
        let machines = [(
            Mac(mac(6)),
            MachineEntry {
                profile: None,
                netboot: false,
                hostname: Some("n6".into()),
                arch: None,
                client: None,
            },
        )]
        .into();
        let mut e = Engine::new(
            config(Mode::Full),
            policy(machines),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let m = e
            .handle(&uefi(MessageType::Discover, 6, vec![]), at(67, src()), T0)
            .reply
            .unwrap()
            .message;
        assert!(m.fname().is_none());
        assert_eq!(
            m.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("n6".into()))
        );
        let ipxe = plain(
            MessageType::Discover,
            6,
            vec![DhcpOption::UserClass(b"iPXE".to_vec())],
        );
        let m = e.handle(&ipxe, at(67, src()), T0).reply.unwrap().message;
        assert!(
            m.fname_str()
                .unwrap()
                .unwrap()
                .contains("/boot.ipxe?mac=52:54:00:00:00:06"),
            "the script says: boot the disk"
        );
    }

    #[test]
    fn a_machine_can_be_answered_as_firmware_pxe_although_it_is_ipxe() {
        let machines = [(
            Mac(mac(41)),
            MachineEntry {
                profile: None,
                netboot: true,
                hostname: None,
                arch: None,
                client: Some(ClientKind::Pxe),
            },
        )]
        .into();
        let mut e = Engine::new(
            config(Mode::Full),
            policy(machines),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let ipxe = plain(
            MessageType::Discover,
            41,
            vec![
                DhcpOption::UserClass(b"iPXE".to_vec()),
                DhcpOption::ClassIdentifier(b"PXEClient".to_vec()),
            ],
        );
        let m = e.handle(&ipxe, at(67, src()), T0).reply.unwrap().message;
        assert_eq!(
            m.fname_str().unwrap().unwrap(),
            "undionly.kpxe",
            "a boot file over TFTP, not the script URL"
        );
    }

    #[test]
    fn reservations_win_and_are_never_given_to_others() {
        let mut c = config(Mode::Full);
        c.reservations
            .insert(Mac(mac(7)), Ipv4Addr::new(198, 18, 0, 100));
        let mut e = Engine::new(
            c,
            policy(HashMap::new()),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let other = dora(&mut e, |k, o| plain(k, 8, o), T0);
        assert_ne!(other, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(
            dora(&mut e, |k, o| plain(k, 7, o), T0),
            Ipv4Addr::new(198, 18, 0, 100)
        );
    }

    #[test]
    fn a_client_gets_its_previous_address_back_after_a_restart_and_after_expiry() {
        let mut e = engine(Mode::Full);
        let first = dora(&mut e, |k, o| plain(k, 9, o), T0);
        let leases = e.store.load_all().unwrap();
        let mut store = MemLeaseStore::default();
        for l in &leases {
            store.put(l).unwrap();
        }
        let mut restarted =
            Engine::new(config(Mode::Full), policy(HashMap::new()), Box::new(store)).unwrap();
        assert_eq!(dora(&mut restarted, |k, o| plain(k, 9, o), T0 + 10), first);
        assert_eq!(
            dora(&mut restarted, |k, o| plain(k, 9, o), T0 + 100_000),
            first,
            "expired, but still free"
        );
    }

    #[test]
    fn a_full_pool_is_reported_and_expired_leases_are_reclaimed() {
        let mut c = config(Mode::Full);
        c.subnets[0].ranges = vec![parse_range("198.18.0.100-198.18.0.101").unwrap()];
        let mut e = Engine::new(
            c,
            policy(HashMap::new()),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        dora(&mut e, |k, o| plain(k, 10, o), T0);
        dora(&mut e, |k, o| plain(k, 11, o), T0);
        let third = e.handle(&plain(MessageType::Discover, 12, vec![]), at(67, src()), T0);
        assert!(third.reply.is_none());
        assert!(
            matches!(third.problem, Some(Problem::PoolExhausted { .. })),
            "{}",
            third.summary
        );
        assert_eq!(e.stats().pool_exhausted, 1);
        // An hour later both leases have run out: the newcomer gets one.
        let later = T0 + 3601;
        dora(&mut e, |k, o| plain(k, 12, o), later);
    }

    #[test]
    fn requests_for_the_wrong_server_or_address_are_ignored_or_refused() {
        let mut e = engine(Mode::Full);
        let offer = e
            .handle(&plain(MessageType::Discover, 13, vec![]), at(67, src()), T0)
            .reply
            .unwrap()
            .message;
        let other_server = plain(
            MessageType::Request,
            13,
            vec![
                DhcpOption::ServerIdentifier(Ipv4Addr::new(198, 18, 0, 2)),
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
            ],
        );
        assert!(
            e.handle(&other_server, at(67, src()), T0).reply.is_none(),
            "the client chose another server"
        );
        let wrong = plain(
            MessageType::Request,
            13,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(198, 18, 0, 105)),
            ],
        );
        let nak = e.handle(&wrong, at(67, src()), T0);
        assert_eq!(msg_type(&nak), Some(MessageType::Nak), "{}", nak.summary);
        assert_eq!(nak.reply.unwrap().to, Destination::Broadcast);
    }

    #[test]
    fn init_reboot_is_acked_for_the_owner_refused_for_others_and_silent_when_unknown() {
        let mut e = engine(Mode::Full);
        let ip = dora(&mut e, |k, o| plain(k, 14, o), T0);
        let reboot = |n| {
            plain(
                MessageType::Request,
                n,
                vec![DhcpOption::RequestedIpAddress(ip)],
            )
        };
        assert_eq!(
            msg_type(&e.handle(&reboot(14), at(67, src()), T0 + 5)),
            Some(MessageType::Ack)
        );
        assert_eq!(
            msg_type(&e.handle(&reboot(15), at(67, src()), T0 + 5)),
            Some(MessageType::Nak),
            "held by 14"
        );
        let elsewhere = plain(
            MessageType::Request,
            16,
            vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 5))],
        );
        assert_eq!(
            msg_type(&e.handle(&elsewhere, at(67, src()), T0)),
            Some(MessageType::Nak),
            "wrong network"
        );
        let unknown = plain(
            MessageType::Request,
            16,
            vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                198, 18, 0, 108,
            ))],
        );
        assert!(
            e.handle(&unknown, at(67, src()), T0).reply.is_none(),
            "RFC 2131 4.3.2: silent when not authoritative"
        );
        e.config.authoritative = true;
        assert_eq!(
            msg_type(&e.handle(&unknown, at(67, src()), T0)),
            Some(MessageType::Nak)
        );
    }

    #[test]
    fn renewal_extends_the_lease_and_answers_by_unicast() {
        let mut e = engine(Mode::Full);
        let ip = dora(&mut e, |k, o| plain(k, 17, o), T0);
        let mut renew = plain(MessageType::Request, 17, vec![]);
        renew.message.set_ciaddr(ip);
        let out = e.handle(&renew, at(67, SocketAddrV4::new(ip, 68)), T0 + 1800);
        let reply = out.reply.expect("ACK");
        assert_eq!(reply.message.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(reply.to, Destination::Unicast(SocketAddrV4::new(ip, 68)));
        assert_eq!(e.lease(ip).unwrap().expires, T0 + 1800 + 3600);
    }

    #[test]
    fn release_frees_and_decline_quarantines() {
        let mut e = engine(Mode::Full);
        let ip = dora(&mut e, |k, o| plain(k, 18, o), T0);
        let mut release = plain(
            MessageType::Release,
            18,
            vec![DhcpOption::ServerIdentifier(SERVER)],
        );
        release.message.set_ciaddr(ip);
        assert!(e.handle(&release, at(67, src()), T0 + 1).reply.is_none());
        assert_eq!(e.lease(ip).unwrap().state, LeaseState::Released);

        let ip2 = dora(&mut e, |k, o| plain(k, 19, o), T0 + 2);
        let decline = plain(
            MessageType::Decline,
            19,
            vec![
                DhcpOption::RequestedIpAddress(ip2),
                DhcpOption::ServerIdentifier(SERVER),
            ],
        );
        e.handle(&decline, at(67, src()), T0 + 3);
        assert_eq!(e.lease(ip2).unwrap().state, LeaseState::Declined);
        let next = dora(&mut e, |k, o| plain(k, 19, o), T0 + 4);
        assert_ne!(
            next, ip2,
            "a declined address is not handed out again at once"
        );
    }

    #[test]
    fn relayed_requests_get_the_relays_subnet_a_reply_to_the_relay_and_option_82_back() {
        let mut e = engine(Mode::Full);
        let mut info = relay::RelayAgentInformation::default();
        info.insert(relay::RelayInfo::AgentCircuitId(b"port7".to_vec()));
        let mut discover = plain(
            MessageType::Discover,
            20,
            vec![DhcpOption::RelayAgentInformation(info.clone())],
        );
        discover.message.set_giaddr(Ipv4Addr::new(198, 18, 5, 1));
        let reply = e
            .handle(
                &discover,
                at(67, SocketAddrV4::new(Ipv4Addr::new(198, 18, 5, 1), 67)),
                T0,
            )
            .reply
            .unwrap();
        assert!(subnet("198.18.5.0/24", "198.18.5.10-198.18.5.19").in_pool(reply.message.yiaddr()));
        assert_eq!(
            reply.to,
            Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(198, 18, 5, 1), 67))
        );
        assert_eq!(reply.message.giaddr(), Ipv4Addr::new(198, 18, 5, 1));
        assert_eq!(
            reply.message.opts().get(OptionCode::RelayAgentInformation),
            Some(&DhcpOption::RelayAgentInformation(info))
        );
    }

    #[test]
    fn a_request_on_a_second_interface_gets_that_networks_address_and_our_address_there() {
        let mut e = engine(Mode::Full);
        let second = Ipv4Addr::new(198, 18, 5, 1);
        let on_second = Arrival {
            port: 67,
            source: src(),
            server_ip: second,
        };
        let ipxe = plain(
            MessageType::Discover,
            24,
            vec![DhcpOption::UserClass(b"iPXE".to_vec())],
        );
        let m = e.handle(&ipxe, on_second, T0).reply.unwrap().message;
        assert!(
            subnet("198.18.5.0/24", "198.18.5.10-198.18.5.19").in_pool(m.yiaddr()),
            "{}",
            m.yiaddr()
        );
        assert_eq!(
            m.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(second))
        );
        assert_eq!(m.siaddr(), second);
        assert!(
            m.fname_str()
                .unwrap()
                .unwrap()
                .starts_with("http://198.18.5.1/boot.ipxe?"),
            "{:?}",
            m.fname_str()
        );
        let request = plain(
            MessageType::Request,
            24,
            vec![
                DhcpOption::UserClass(b"iPXE".to_vec()),
                DhcpOption::ServerIdentifier(second),
                DhcpOption::RequestedIpAddress(m.yiaddr()),
            ],
        );
        assert_eq!(
            msg_type(&e.handle(&request, on_second, T0)),
            Some(MessageType::Ack)
        );
        let chose_first = plain(
            MessageType::Request,
            25,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(m.yiaddr()),
            ],
        );
        assert!(
            e.handle(&chose_first, on_second, T0).reply.is_none(),
            "on this network our identifier is {second}"
        );
    }

    #[test]
    fn proxy_mode_answers_pxe_clients_with_boot_information_only() {
        let mut e = engine(Mode::Proxy);
        let reply = e
            .handle(&uefi(MessageType::Discover, 21, vec![]), at(67, src()), T0)
            .reply
            .unwrap();
        assert_eq!(
            reply.message.yiaddr(),
            Ipv4Addr::UNSPECIFIED,
            "never an address"
        );
        assert_eq!(reply.message.fname_str().unwrap().unwrap(), "ipxe.efi");
        assert!(reply
            .message
            .opts()
            .get(OptionCode::AddressLeaseTime)
            .is_none());
        assert!(
            e.handle(&plain(MessageType::Discover, 22, vec![]), at(67, src()), T0)
                .reply
                .is_none(),
            "not a PXE client"
        );
        assert!(
            e.handle(&uefi(MessageType::Request, 21, vec![]), at(67, src()), T0)
                .reply
                .is_none(),
            "REQUESTs on 67 are the DHCP server's"
        );

        let mut on_4011 = uefi(MessageType::Request, 21, vec![]);
        on_4011.message.set_ciaddr(Ipv4Addr::new(198, 18, 0, 150));
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 150), 68);
        let reply = e.handle(&on_4011, at(PROXY_PORT, from), T0).reply.unwrap();
        assert_eq!(reply.message.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(reply.to, Destination::Unicast(from));
        assert_eq!(reply.message.fname_str().unwrap().unwrap(), "ipxe.efi");
    }

    /// A disk that is full: writes fail, or (`at_commit`) only the flush does.
    struct FailingStore {
        at_commit: bool,
    }
    impl LeaseStore for FailingStore {
        fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
            Ok(vec![])
        }
        fn put(&mut self, _: &Lease) -> Result<(), LeaseError> {
            if self.at_commit {
                Ok(())
            } else {
                Err(disk_full())
            }
        }
        fn remove(&mut self, _: Ipv4Addr) -> Result<(), LeaseError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), LeaseError> {
            Err(disk_full())
        }
    }

    fn disk_full() -> LeaseError {
        LeaseError::Database {
            path: "leases.redb".into(),
            message: "No space left on device".into(),
        }
    }

    #[test]
    fn a_failed_commit_withdraws_exactly_the_replies_that_wrote_a_lease() {
        let mut e = Engine::new(
            config(Mode::Full),
            policy(HashMap::new()),
            Box::new(FailingStore { at_commit: true }),
        )
        .unwrap();
        let offers = e.handle_batch(
            [
                (&plain(MessageType::Discover, 26, vec![]), at(67, src())),
                (&plain(MessageType::Discover, 27, vec![]), at(67, src())),
            ],
            T0,
        );
        let ips: Vec<Ipv4Addr> = offers
            .iter()
            .map(|o| {
                o.reply
                    .as_ref()
                    .expect("OFFERs write nothing")
                    .message
                    .yiaddr()
            })
            .collect();
        let request = |n: u8, ip: Ipv4Addr| {
            plain(
                MessageType::Request,
                n,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            )
        };
        let (r26, r27, d28) = (
            request(26, ips[0]),
            request(27, ips[1]),
            plain(MessageType::Discover, 28, vec![]),
        );
        let out = e.handle_batch(
            [
                (&r26, at(67, src())),
                (&d28, at(67, src())),
                (&r27, at(67, src())),
            ],
            T0,
        );
        assert!(
            out[0].reply.is_none() && out[2].reply.is_none(),
            "ACKs whose leases are not on disk could be lost"
        );
        assert!(
            matches!(out[0].problem, Some(Problem::LeaseStore(ref m)) if m.contains("No space left")),
            "{:?}",
            out[0].problem
        );
        assert_eq!(
            msg_type(&out[1]),
            Some(MessageType::Offer),
            "the OFFER in the same burst still leaves"
        );
        assert_eq!(e.stats().acks, 0);
        assert_eq!(e.stats().store_failures, 2);
    }

    #[test]
    fn no_ack_leaves_when_the_lease_cannot_be_stored() {
        let mut e = Engine::new(
            config(Mode::Full),
            policy(HashMap::new()),
            Box::new(FailingStore { at_commit: false }),
        )
        .unwrap();
        let offer = e
            .handle(&plain(MessageType::Discover, 23, vec![]), at(67, src()), T0)
            .reply
            .unwrap();
        let ip = offer.message.yiaddr();
        let out = e.handle(
            &plain(
                MessageType::Request,
                23,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            ),
            at(67, src()),
            T0,
        );
        assert!(
            out.reply.is_none(),
            "an ACK for a lease that is not on disk could be lost"
        );
        assert!(
            matches!(out.problem, Some(Problem::LeaseStore(ref m)) if m.contains("No space left")),
            "{:?}",
            out.problem
        );
    }

    #[test]
    fn mangled_requests_never_panic_and_every_reply_encodes_and_decodes() {
        use dhcproto::{Decodable, Decoder, Encodable, Encoder};
        let seeds = [
            request(
                MessageType::Discover,
                mac(30),
                vec![
                    DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007".to_vec()),
                    DhcpOption::UserClass(b"\x04iPXE".to_vec()),
                ],
            ),
            request(
                MessageType::Request,
                mac(31),
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(Ipv4Addr::new(198, 18, 0, 100)),
                ],
            ),
            request(
                MessageType::Inform,
                mac(32),
                vec![DhcpOption::ClassIdentifier(b"HTTPClient".to_vec())],
            ),
        ];
        let mut x: u64 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for mode in [Mode::Full, Mode::Proxy] {
            let mut e = engine(mode);
            for i in 0..6_000 {
                let mut d = seeds[i % seeds.len()].clone();
                for _ in 0..(next() % 6) {
                    let at = (next() as usize) % d.len();
                    d[at] = next() as u8;
                }
                let Ok(req) = classify(&d) else { continue };
                let port = if next() % 5 == 0 { PROXY_PORT } else { 67 };
                if let Some(reply) = e.handle(&req, at(port, src()), T0 + i as u64).reply {
                    let mut bytes = Vec::new();
                    reply.message.encode(&mut Encoder::new(&mut bytes)).unwrap();
                    Message::decode(&mut Decoder::new(&bytes)).expect("every reply decodes");
                }
            }
        }
    }

    #[test]
    fn thousands_of_clients_get_distinct_addresses() {
        let mut c = config(Mode::Full);
        c.subnets[0] = subnet("198.18.0.0/16", "198.18.1.0-198.18.40.255");
        let mut e = Engine::new(
            c,
            policy(HashMap::new()),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for n in 0..5000u32 {
            let m = [0x52, 0x54, 0, (n >> 16) as u8, (n >> 8) as u8, n as u8];
            let ip = dora(&mut e, |k, o| classify(&request(k, m, o)).unwrap(), T0);
            assert!(seen.insert(ip), "{ip} handed out twice");
        }
    }
}
