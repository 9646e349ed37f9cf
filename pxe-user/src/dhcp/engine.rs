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
//! Both answer boot server discovery on port 4011. This file is the
//! dispatcher: one match on port, mode and message type, each arm a small
//! function of a per-request [`Ctx`]. Addresses are [`Addresses`]'s, reply
//! bytes [`reply`]'s, boot answers the [`BootPolicy`]'s.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use dhcproto::v4::{Message, MessageType};

pub use super::outcome::{
    Destination, EngineStats, KernelAnswer, Outcome, Problem, Reply, PROXY_PORT,
};
use super::{
    addresses::{Addresses, Claim, DECLINE_QUARANTINE_SECS},
    classify::{Firmware, Request},
    outcome::{describe, name},
    pool::Subnet,
    reply,
};
use crate::{
    lease::{client_key, Lease, LeaseError, LeaseState, LeaseStore},
    policy::{
        options::{self, OptionSet},
        BootAnswer, BootPolicy, Mac, Machine, ServerUrls, SharedPolicy,
    },
};

/// How long an offered address is held for the client that was offered it.
const OFFER_HOLD_SECS: u64 = 60;
/// The share of a pool that offers to strangers (machines with no
/// reservation, no inventory entry and no lease) may hold: past it, a
/// stranger is still offered an address, but it stays free for whoever
/// requests it first. A flood of DISCOVERs from made-up MACs then cannot
/// leave an honest machine without an address.
const STRANGER_HOLD_SHARE: (u64, u64) = (1, 2);

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
    /// Other servers lease from the same pools (a shared PostgreSQL store):
    /// each subnet's search for a free address starts at a point of the
    /// pool this server's own address picks, so two servers seldom choose
    /// the same one (the database arbitrates when they do).
    pub shared_pools: bool,
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

pub struct Engine {
    config: EngineConfig,
    policy: SharedPolicy,
    addresses: Addresses,
    stats: EngineStats,
    /// Why the last commit failed, until one succeeds again.
    store_failing: Option<String>,
    /// A change of the store's state not yet taken ([`Engine::take_store_news`]).
    store_news: Option<StoreNews>,
    last_commit: Option<CommitTiming>,
}

/// One subnet's pool, counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub subnet: String,
    pub in_use: u64,
    pub free: u64,
}

/// The lease store changed state: said once, by whoever takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreNews {
    /// A commit failed after the last one succeeded: why.
    Failing(String),
    /// A commit succeeded after failures; memory was read again from the
    /// store (`Err`: it could not be, and memory stays as it was).
    Recovered(Result<usize, String>),
}

/// One commit of a burst's leases.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommitTiming {
    pub seconds: f64,
    pub leases: usize,
    pub ok: bool,
}

/// One request being decided, and what it is decided with.
struct Ctx<'a> {
    req: &'a Request,
    /// Our address on the interface it arrived on.
    here: Ipv4Addr,
    now: u64,
    /// The policy snapshot of the whole burst.
    policy: &'a dyn BootPolicy,
}

impl Ctx<'_> {
    /// The lease identity of the asking client.
    fn client(&self) -> Vec<u8> {
        client_key(self.req.client_id.as_deref(), self.req.mac.0)
    }

    fn claim<'c>(&self, client: &'c [u8], subnet: usize) -> Claim<'c> {
        Claim {
            client,
            mac: self.req.mac,
            subnet,
            server: self.here,
            now: self.now,
        }
    }

    fn reply(&self, kind: MessageType, yiaddr: Ipv4Addr) -> Message {
        reply::reply_to(self.req, kind, yiaddr, self.here)
    }

    fn nak(&self, why: &str) -> Outcome {
        let (message, to) = reply::nak(self.req, why, self.here);
        Outcome::answered(
            format!("REQUEST from {} → NAK: {why}", self.req.mac),
            message,
            to,
        )
        .forgetting()
    }

    fn silent(&self, what: impl std::fmt::Display) -> Outcome {
        Outcome::silent(format!(
            "{} from {}{what}",
            name(self.req.msg_type),
            self.req.mac
        ))
    }
}

/// One lease record the change feed delivered (see
/// [`Engine::follow_lease_feed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedRecord {
    /// Another server committed this record of the address (`None`: removed).
    Peer(Ipv4Addr, Option<Lease>),
    /// This server's own commit of the address.
    Own(Ipv4Addr),
}

/// How often a burst is decided when the shared database keeps refusing
/// its addresses (each refusal teaches memory one more holder).
const MAX_DECISIONS: usize = 4;

impl Engine {
    /// Builds the engine and its index from every lease the store holds.
    pub fn new(
        config: EngineConfig,
        policy: SharedPolicy,
        store: Box<dyn LeaseStore>,
    ) -> Result<Self, LeaseError> {
        let mut addresses =
            Addresses::load(store, config.subnets.len(), config.reservations.clone())?;
        addresses.spread(config.shared_pools);
        Ok(Self {
            config,
            policy,
            addresses,
            stats: EngineStats::default(),
            store_failing: None,
            store_news: None,
            last_commit: None,
        })
    }

    /// Replaces the configuration (SIGHUP); leases stay. The policy is
    /// swapped in the [`SharedPolicy`] by whoever reloads it.
    pub fn reconfigure(&mut self, config: EngineConfig) {
        self.addresses
            .reconfigure(config.subnets.len(), config.reservations.clone());
        self.config = config;
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The lease currently recorded for `ip`, if any.
    pub fn lease(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.addresses.lease(ip)
    }

    /// Every lease recorded (current or not), in no particular order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.addresses.leases()
    }

    /// The machines pxed knows at `now`, which the kernel always admits:
    /// reservations, the policy's machines (config and inventory), live
    /// leases and held offers.
    pub fn known_macs(&self, now: u64) -> std::collections::HashSet<[u8; 6]> {
        let policy = self.policy.current();
        let mut known: std::collections::HashSet<[u8; 6]> =
            policy.known_macs().into_iter().map(|mac| mac.0).collect();
        known.extend(self.addresses.reserved_macs());
        known.extend(self.addresses.offered_macs(now));
        known.extend(
            self.addresses
                .leases()
                .filter(|lease| lease.is_current(now) && lease.state == LeaseState::Active)
                .map(|lease| lease.mac),
        );
        known
    }

    /// Other servers lease from these pools: this server prefers `share`
    /// of them (kept current by `crate::cluster`).
    pub fn share_pools(&mut self, share: std::sync::Arc<super::PoolShare>) {
        self.addresses.share(share);
    }

    /// The lease records the change feed delivered, in commit order: other
    /// servers' (memory follows unless this server committed the address
    /// since) and this server's own (from then on, another server's record
    /// of that address is newer). Returns the machines whose answers may
    /// differ now.
    pub fn follow_lease_feed(&mut self, records: impl IntoIterator<Item = FeedRecord>) -> Vec<Mac> {
        let mut touched = Vec::new();
        for record in records {
            match record {
                FeedRecord::Peer(ip, lease) => touched.extend(self.addresses.absorb(ip, lease)),
                FeedRecord::Own(ip) => self.addresses.own_writes_seen([ip]),
            }
        }
        touched.sort();
        touched.dedup();
        touched
    }

    /// Every lease from the shared database, replacing memory's (after
    /// changes may have been missed). Returns how many records differed.
    pub fn resync_leases(&mut self, leases: Vec<Lease>) -> usize {
        self.addresses.resync(leases)
    }

    /// The machine that holds `ip` at `now`, if one does.
    pub fn holder(&self, ip: Ipv4Addr, now: u64) -> Option<Mac> {
        self.lease(ip)
            .filter(|l| l.state == LeaseState::Active && l.is_current(now))
            .map(|l| Mac(l.mac))
    }

    /// Each subnet's pool: addresses in use (a current lease or an open
    /// offer) and free, for the metrics.
    pub fn pool_usage(&self, now: u64) -> Vec<PoolUsage> {
        let mut in_use = vec![0u64; self.config.subnets.len()];
        for lease in self.addresses.leases().filter(|l| l.is_current(now)) {
            if let Some(i) = self.config.subnets.iter().position(|s| s.in_pool(lease.ip)) {
                in_use[i] += 1;
            }
        }
        self.config
            .subnets
            .iter()
            .zip(in_use)
            .map(|(subnet, used)| PoolUsage {
                subnet: subnet.network.to_string(),
                in_use: used,
                free: subnet
                    .pool_len()
                    .saturating_sub(subnet.exclude.len() as u64)
                    .saturating_sub(used),
            })
            .collect()
    }

    /// How long the last burst's lease commit took and how many leases it
    /// wrote, once per commit.
    pub fn take_commit(&mut self) -> Option<CommitTiming> {
        self.last_commit.take()
    }

    /// Why the lease store's last commit failed, if it did and none has
    /// succeeded since.
    pub fn store_failing(&self) -> Option<&str> {
        self.store_failing.as_deref()
    }

    /// The store's change of state since the last call, if any: for a
    /// log line per change, not per request.
    pub fn take_store_news(&mut self) -> Option<StoreNews> {
        self.store_news.take()
    }

    /// Decides on one request, at `now` (seconds since the Unix epoch), and
    /// commits the lease it wrote, if any.
    pub fn handle(&mut self, req: &Request, arrival: Arrival, now: u64) -> Outcome {
        self.handle_batch([(req, arrival)], now)
            .pop()
            .expect("one outcome per request")
    }

    /// Decides on a burst of requests in arrival order, then commits every
    /// lease they wrote at once (one disk flush for the burst). When the
    /// commit fails, the replies that depend on a write are withdrawn and
    /// the addresses are as before the burst.
    ///
    /// When the shared database refuses the batch because another server
    /// holds one of its addresses, memory has learnt the holder and the
    /// burst is decided again (a few times at most): one conflict costs a
    /// second decision, not every reply of the burst.
    pub fn handle_batch<'a>(
        &mut self,
        requests: impl IntoIterator<Item = (&'a Request, Arrival)>,
        now: u64,
    ) -> Vec<Outcome> {
        let requests: Vec<(&Request, Arrival)> = requests.into_iter().collect();
        let mut outcomes = self.decide_and_commit(&requests, now);
        for _ in 1..MAX_DECISIONS {
            let taken = outcomes
                .iter()
                .any(|o| matches!(o.problem, Some(Problem::Taken(_))));
            if !taken {
                break;
            }
            outcomes = self.decide_and_commit(&requests, now);
        }
        let full = self.config.mode == Mode::Full;
        for (o, (_, arrival)) in outcomes.iter().zip(&requests) {
            self.stats.count(o, full && arrival.port != PROXY_PORT);
        }
        outcomes
    }

    /// One decision of the burst and its commit.
    fn decide_and_commit(&mut self, requests: &[(&Request, Arrival)], now: u64) -> Vec<Outcome> {
        let policy = self.policy.current();
        let mut outcomes = Vec::with_capacity(requests.len());
        for (req, arrival) in requests {
            let ctx = Ctx {
                req,
                here: arrival.server_ip,
                now,
                policy: policy.as_ref().as_ref(),
            };
            let writes = self.addresses.writes();
            let mut outcome = self.decide(&ctx, *arrival);
            outcome.wrote = self.addresses.writes() != writes;
            outcomes.push(outcome);
        }
        let leases = outcomes.iter().filter(|o| o.wrote).count();
        if leases > 0 {
            let started = std::time::Instant::now();
            let committed = self.addresses.commit();
            self.last_commit = Some(CommitTiming {
                seconds: started.elapsed().as_secs_f64(),
                leases,
                ok: committed.is_ok(),
            });
            match committed {
                Ok(()) => {
                    if self.store_failing.take().is_some() {
                        // The store is the truth again: memory follows it.
                        let reread = self.addresses.reread().map_err(|e| e.to_string());
                        self.store_news = Some(StoreNews::Recovered(reread));
                    }
                }
                Err(e) => {
                    // Another server's lease is no failing store.
                    if !matches!(e, LeaseError::Taken { .. }) {
                        if self.store_failing.is_none() {
                            self.store_news = Some(StoreNews::Failing(e.to_string()));
                        }
                        self.store_failing = Some(e.to_string());
                    }
                    for o in outcomes.iter_mut().filter(|o| o.wrote) {
                        o.withdraw(&e);
                    }
                }
            }
        }
        outcomes
    }

    /// The dispatcher: who answers what, by port, mode and message type.
    fn decide(&mut self, ctx: &Ctx<'_>, arrival: Arrival) -> Outcome {
        use MessageType::*;
        match (arrival.port, self.config.mode, ctx.req.msg_type) {
            (PROXY_PORT, _, Request | Inform) => self.boot_server_discovery(ctx, arrival.source),
            (PROXY_PORT, _, _) => ctx.silent(" on 4011: ignored"),
            (_, Mode::Proxy, Discover) => self.proxy_offer(ctx),
            (_, Mode::Proxy, _) => ctx.silent(": not ours in proxy mode"),
            (_, Mode::Full, kind) => {
                self.addresses.sweep_offers(ctx.now);
                match kind {
                    Discover => self.discover(ctx),
                    Request => self.request(ctx),
                    Release => self.release(ctx),
                    Decline => self.decline(ctx),
                    Inform => self.inform(ctx),
                    _ => ctx.silent(": not a client message"),
                }
            }
        }
    }

    // ---- proxyDHCP ------------------------------------------------------

    /// Port 67 in proxy mode: a boot-only OFFER to PXE DISCOVERs.
    fn proxy_offer(&self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let machine = machine_of(req);
        let (Some(boot), repeatable) = self.boot_answer(ctx, &machine) else {
            return ctx.silent(format_args!(" ({}): no boot answer", describe(req)));
        };
        let mut message = ctx.reply(MessageType::Offer, Ipv4Addr::UNSPECIFIED);
        reply::add_boot(&mut message, req, &boot, ctx.here);
        let note = self.add_boot_server_options(ctx, &machine, &mut message);
        let summary = format!(
            "DISCOVER from {} ({}) → proxy OFFER, boot {}{note}",
            req.mac,
            describe(req),
            boot.file
        );
        let outcome = Outcome::answered(summary, message, reply::destination(req));
        self.kernel_may_repeat(outcome, KernelAnswer::Boot, repeatable)
    }

    /// Port 4011: the client has an address and asks for its boot file.
    fn boot_server_discovery(&self, ctx: &Ctx<'_>, source: SocketAddrV4) -> Outcome {
        let req = ctx.req;
        let machine = machine_of(req);
        let (Some(boot), repeatable) = self.boot_answer(ctx, &machine) else {
            return ctx.silent(format_args!(" on 4011 ({}): no boot answer", describe(req)));
        };
        let mut message = ctx.reply(MessageType::Ack, Ipv4Addr::UNSPECIFIED);
        message.set_ciaddr(req.message.ciaddr());
        reply::add_boot(&mut message, req, &boot, ctx.here);
        let note = self.add_boot_server_options(ctx, &machine, &mut message);
        let summary = format!(
            "{} from {} on 4011 ({}) → ACK, boot {}{note}",
            name(req.msg_type),
            req.mac,
            describe(req),
            boot.file
        );
        let outcome = Outcome::answered(summary, message, Destination::Unicast(source));
        if req.msg_type == MessageType::Request {
            return self.kernel_may_repeat(outcome, KernelAnswer::Boot, repeatable);
        }
        outcome
    }

    // ---- full DHCP ------------------------------------------------------

    fn discover(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let client = ctx.client();
        let Some(subnet) = self.subnet_for(ctx) else {
            return ctx.silent(format_args!(
                ": no subnet for giaddr {}",
                req.message.giaddr()
            ));
        };
        let pool = &self.config.subnets[subnet];
        let Some(ip) = self
            .addresses
            .choose(pool, req.requested_ip, ctx.claim(&client, subnet))
        else {
            let network = pool.network.to_string();
            return Outcome::problem(
                format!("DISCOVER from {}: no free address in {network}", req.mac),
                Problem::PoolExhausted { subnet: network },
            );
        };
        let stranger = self.addresses.reservation(req.mac).is_none()
            && self.addresses.of_client(&client).is_none()
            && !ctx.policy.knows(req.mac);
        let bound = stranger_hold_bound(pool.pool_len());
        let held = !stranger || self.addresses.offers_held_for_strangers(subnet) < bound;
        if held {
            self.addresses.hold_offer(
                ip,
                client,
                req.mac,
                ctx.now + OFFER_HOLD_SECS,
                stranger.then_some(subnet),
            );
        }
        let mut message = ctx.reply(MessageType::Offer, ip);
        // Only an ACK becomes a kernel template (which then OFFERs too):
        // whether this OFFER could be repeated is not asked.
        let (boot, _) = self.add_lease_and_boot(ctx, &mut message, subnet);
        let unheld = if held {
            String::new()
        } else {
            format!(
                "; not held: offers to unknown machines hold {bound} addresses, the most they may"
            )
        };
        let summary = format!(
            "DISCOVER from {} ({}) → OFFER {ip}{boot}{unheld}",
            req.mac,
            describe(req)
        );
        Outcome {
            unheld_offer: !held,
            ..Outcome::answered(summary, message, reply::destination(req))
        }
    }

    fn request(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let ciaddr = req.message.ciaddr();
        if let Some(server_id) = req.server_id {
            return self.selecting(ctx, server_id);
        }
        if let Some(ip) = req.requested_ip {
            return self.init_reboot(ctx, ip);
        }
        if !ciaddr.is_unspecified() {
            return self.renewing(ctx, ciaddr);
        }
        ctx.silent(": names no address")
    }

    /// SELECTING: the client answers an OFFER (ours or another server's).
    fn selecting(&mut self, ctx: &Ctx<'_>, server_id: Ipv4Addr) -> Outcome {
        let req = ctx.req;
        let client = ctx.client();
        if server_id != ctx.here {
            self.addresses.release_offer_of(&client);
            return ctx.silent(format_args!(": chose server {server_id}"));
        }
        let ciaddr = req.message.ciaddr();
        let Some(ip) = req
            .requested_ip
            .or((!ciaddr.is_unspecified()).then_some(ciaddr))
        else {
            return ctx.nak("REQUEST names no address");
        };
        let offered = self.addresses.is_offered_to(ip, &client);
        let held = self.addresses.of_client(&client) == Some(ip);
        let Some(subnet) = self.subnet_for(ctx) else {
            return ctx.nak("no subnet for this request");
        };
        let pool = &self.config.subnets[subnet];
        // Past the bound on strangers' offers, an offer is not held: the
        // address goes to the first stranger that requests it while free.
        let offered_unheld = self.addresses.offers_held_for_strangers(subnet)
            >= stranger_hold_bound(pool.pool_len());
        if !(offered || held || offered_unheld)
            || !self
                .addresses
                .assignable(ip, pool, ctx.claim(&client, subnet))
        {
            return ctx.nak(&format!("{ip} was not offered to this client"));
        }
        self.commit_and_ack(ctx, client, ip, subnet, "SELECTING")
    }

    /// INIT-REBOOT: the client wants its old address back.
    fn init_reboot(&mut self, ctx: &Ctx<'_>, ip: Ipv4Addr) -> Outcome {
        let req = ctx.req;
        let client = ctx.client();
        let Some(subnet) = self.subnet_for(ctx) else {
            return ctx.silent(": no subnet");
        };
        let pool = &self.config.subnets[subnet];
        if !pool.contains(ip) {
            return ctx.nak(&format!("{ip} is not on this network"));
        }
        let reservation = self.addresses.reservation(req.mac);
        let ours = self.addresses.of_client(&client) == Some(ip) || reservation == Some(ip);
        if ours
            && self
                .addresses
                .assignable(ip, pool, ctx.claim(&client, subnet))
        {
            return self.commit_and_ack(ctx, client, ip, subnet, "INIT-REBOOT");
        }
        if self.addresses.held_by_other(ip, &client, ctx.now)
            || reservation.is_some_and(|r| r != ip)
        {
            return ctx.nak(&format!("{ip} belongs to another client"));
        }
        if self.config.authoritative {
            return ctx.nak(&format!("no record of {ip} for this client"));
        }
        Outcome::silent(format!(
            "REQUEST (INIT-REBOOT) from {} for {ip}: no record, not authoritative",
            req.mac
        ))
    }

    /// RENEWING (unicast) or REBINDING (broadcast).
    fn renewing(&mut self, ctx: &Ctx<'_>, ciaddr: Ipv4Addr) -> Outcome {
        let client = ctx.client();
        let Some(subnet) = self.subnet_for(ctx) else {
            return ctx.silent(": no subnet");
        };
        let pool = &self.config.subnets[subnet];
        if self.addresses.of_client(&client) == Some(ciaddr)
            && self
                .addresses
                .assignable(ciaddr, pool, ctx.claim(&client, subnet))
        {
            return self.commit_and_ack(ctx, client, ciaddr, subnet, "RENEWING");
        }
        if self.addresses.held_by_other(ciaddr, &client, ctx.now) {
            return ctx.nak(&format!("{ciaddr} belongs to another client"));
        }
        Outcome::silent(format!(
            "REQUEST (renew) from {} for {ciaddr}: no record",
            ctx.req.mac
        ))
    }

    fn commit_and_ack(
        &mut self,
        ctx: &Ctx<'_>,
        client: Vec<u8>,
        ip: Ipv4Addr,
        subnet: usize,
        state: &str,
    ) -> Outcome {
        let req = ctx.req;
        let lease_time = self.config.subnets[subnet].lease_time;
        // With kernel answers, the disk holds the lease a lease time longer
        // than the client is told: the kernel may ACK renewals until then.
        let stored_for = u64::from(lease_time) * if self.config.kernel_answers { 2 } else { 1 };
        let lease = Lease {
            ip,
            client,
            mac: req.mac.0,
            expires: ctx.now + stored_for,
            state: LeaseState::Active,
            hostname: ctx
                .policy
                .hostname(req.mac)
                .or_else(|| req.hostname.clone()),
        };
        if let Err(e) = self.addresses.grant(lease, ctx.now) {
            return Outcome::store_failed(req, &e);
        }
        let mut message = ctx.reply(MessageType::Ack, ip);
        message.set_ciaddr(req.message.ciaddr());
        let (boot, repeatable) = self.add_lease_and_boot(ctx, &mut message, subnet);
        let summary = format!(
            "REQUEST ({state}) from {} ({}) → ACK {ip}{boot}",
            req.mac,
            describe(req)
        );
        let outcome = Outcome::answered(summary, message, reply::destination(req));
        self.kernel_may_repeat(
            outcome,
            KernelAnswer::Lease {
                ip,
                stored_until: ctx.now + stored_for,
                lease_time,
            },
            repeatable,
        )
    }

    /// Marks an answer the kernel may give again on its own, if it may:
    /// kernel answers are on and the policy's answer stands until it changes.
    fn kernel_may_repeat(
        &self,
        mut outcome: Outcome,
        answer: KernelAnswer,
        repeatable: bool,
    ) -> Outcome {
        if self.config.kernel_answers && repeatable {
            outcome.kernel = Some(answer);
        }
        outcome
    }

    fn release(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let ip = req.message.ciaddr();
        if req.server_id.is_some_and(|s| s != ctx.here)
            || self.addresses.of_client(&ctx.client()) != Some(ip)
        {
            return ctx.silent(format_args!(" for {ip}: not our lease"));
        }
        match self.addresses.release(ip, ctx.now) {
            Err(e) => Outcome::store_failed(req, &e),
            Ok(false) => Outcome::silent("RELEASE: no record".into()),
            Ok(true) => Outcome::changed(format!(
                "RELEASE from {}: {ip} is free again (kept for this client)",
                req.mac
            ))
            .forgetting(),
        }
    }

    fn decline(&mut self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let client = ctx.client();
        let Some(ip) = req.requested_ip else {
            return ctx.silent(": names no address");
        };
        if self.addresses.of_client(&client) != Some(ip)
            && !self.addresses.is_offered_to(ip, &client)
        {
            return ctx.silent(format_args!(" for {ip}: not this client's"));
        }
        if let Err(e) = self.addresses.decline(ip, &client, req.mac, ctx.now) {
            return Outcome::store_failed(req, &e);
        }
        Outcome::changed(format!(
            "DECLINE from {}: {ip} is in use on the wire; quarantined for {DECLINE_QUARANTINE_SECS} s",
            req.mac
        ))
        .forgetting()
    }

    fn inform(&self, ctx: &Ctx<'_>) -> Outcome {
        let req = ctx.req;
        let ciaddr = req.message.ciaddr();
        let Some(subnet) = self.subnet_for(ctx) else {
            return ctx.silent(": no subnet");
        };
        let mut message = ctx.reply(MessageType::Ack, Ipv4Addr::UNSPECIFIED);
        message.set_ciaddr(ciaddr);
        let (boot, _) = self.add_lease_and_boot(ctx, &mut message, subnet);
        reply::remove_lease_times(&mut message);
        let to = if ciaddr.is_unspecified() {
            reply::destination(req)
        } else {
            Destination::Unicast(SocketAddrV4::new(ciaddr, 68))
        };
        Outcome::answered(format!("INFORM from {} → ACK{boot}", req.mac), message, to)
    }

    /// The subnet a request belongs to: the relay's (giaddr), else ours.
    fn subnet_for(&self, ctx: &Ctx<'_>) -> Option<usize> {
        let giaddr = ctx.req.message.giaddr();
        let anchor = if giaddr.is_unspecified() {
            ctx.here
        } else {
            giaddr
        };
        self.config.subnets.iter().position(|s| s.contains(anchor))
    }

    // ---- boot answers -----------------------------------------------------

    /// What to boot, if `machine` (the one that sent the request) boots
    /// from us, and whether the answer stands until the policy changes (the
    /// kernel may repeat it).
    fn boot_answer(&self, ctx: &Ctx<'_>, machine: &Machine) -> (Option<BootAnswer>, bool) {
        if ctx.req.firmware == Firmware::NotPxe {
            return (None, true);
        }
        let urls = ServerUrls::new(ctx.here, self.config.http_port);
        let verdict = ctx.policy.decide(machine, &urls);
        (verdict.boot_answer(machine, &urls), verdict.repeatable)
    }

    /// The lease options of `subnet`, and the client's boot information if
    /// it boots from us; returns a note for the log (", boot FILE" or
    /// nothing) and whether the kernel may repeat the reply.
    fn add_lease_and_boot(
        &self,
        ctx: &Ctx<'_>,
        message: &mut Message,
        subnet: usize,
    ) -> (String, bool) {
        let hostname = ctx.policy.hostname(ctx.req.mac);
        let subnet = &self.config.subnets[subnet];
        reply::add_lease_options(message, subnet, hostname);
        let machine = machine_of(ctx.req);
        let note = match self.boot_answer(ctx, &machine) {
            (Some(boot), repeatable) => {
                reply::add_boot(message, ctx.req, &boot, ctx.here);
                (format!(", boot {}", boot.file), repeatable)
            }
            (None, repeatable) => (String::new(), repeatable),
        };
        // Last: what the operator set replaces what pxed chose.
        let configured = ctx.policy.options(&machine).over(&subnet.options);
        let mut text = note.0;
        if let Some(class) = ctx.policy.class_name(&machine) {
            text.push_str(&format!(", class {class}"));
        }
        text.push_str(&add_configured(ctx.req, message, &configured));
        (text, note.1)
    }

    /// A proxyDHCP answer's boot options from the config (crate::policy::
    /// options::is_boot_server_option): the lease's are the site server's.
    fn add_boot_server_options(
        &self,
        ctx: &Ctx<'_>,
        machine: &Machine,
        message: &mut Message,
    ) -> String {
        let configured = ctx
            .policy
            .options(machine)
            .only(options::is_boot_server_option);
        add_configured(ctx.req, message, &configured)
    }
}

/// Adds the `configured` options `req` gets and fits the reply to the
/// datagram its client accepts. Returns what the log should add. What
/// decided both (options 55 and 57) is in the kernel's request signature,
/// so the reply stays one the kernel may repeat.
fn add_configured(req: &Request, message: &mut Message, configured: &OptionSet) -> String {
    reply::add_configured_options(message, req, configured);
    let (moved, left_out) = reply::fit_configured(message, req, configured);
    let mut note = String::new();
    if !moved.is_empty() {
        note.push_str(&format!(
            "; options {moved:?} carried in the file/sname fields (overload), the options field was full"
        ));
    }
    if !left_out.is_empty() {
        note.push_str(&format!(
            "; options {left_out:?} left out, the reply would exceed the datagram the client accepts"
        ));
    }
    note
}

/// How many of a pool of `len` addresses offers to strangers may hold.
fn stranger_hold_bound(len: u64) -> usize {
    let (num, den) = STRANGER_HOLD_SHARE;
    usize::try_from((len * num / den).max(1)).unwrap_or(usize::MAX)
}

/// The policy's view of the machine that sent `req`.
fn machine_of(req: &Request) -> Machine {
    let client = req.firmware.client();
    let giaddr = req.message.giaddr();
    Machine {
        mac: req.mac,
        arch: req.arch,
        uuid: req.uuid.clone(),
        client,
        relay: (!giaddr.is_unspecified()).then_some(giaddr),
        vendor_class: req.vendor_class.clone(),
        user_class: req.user_class.clone(),
        circuit_id: req.circuit_id.clone(),
        remote_id: req.remote_id.clone(),
        class: None,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use dhcproto::v4::{self, relay, DhcpOption, OptionCode};

    use super::*;
    use crate::{
        dhcp::{classify::classify, classify::tests::request, pool::parse_range, PoolShare},
        lease::MemLeaseStore,
        policy::r#static::{MachineEntry, Profile, StaticPolicy},
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
            options: Default::default(),
        }
    }

    fn policy(machines: HashMap<Mac, MachineEntry>) -> SharedPolicy {
        SharedPolicy::new(StaticPolicy {
            profiles: [("default".to_owned(), Profile::named("default"))].into(),
            machines,
            default_profile: Some("default".into()),
            provision: None,
            classes: Vec::new(),
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
            shared_pools: false,
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

    /// Option 55 is in the kernel's signature: an ACK whose options the
    /// client's list chose is the kernel's to repeat, to requests with the
    /// same list, like one whose options are all always sent.
    #[test]
    fn the_kernel_may_repeat_answers_that_option_55_shaped() {
        use crate::policy::options::Configured;
        let kernel_of = |always_send: bool| {
            let mut config = config(Mode::Full);
            config.kernel_answers = true;
            config.subnets[0].options.insert(
                42,
                Configured {
                    value: vec![198, 18, 0, 5],
                    always_send,
                },
            );
            let mut engine = Engine::new(
                config,
                policy(HashMap::new()),
                Box::new(MemLeaseStore::default()),
            )
            .unwrap();
            let discover = uefi(MessageType::Discover, 1, vec![]);
            let offer = engine.handle(&discover, at(67, src()), T0);
            let offered = offer.reply.expect("an offer").message.yiaddr();
            let request = uefi(
                MessageType::Request,
                1,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(offered),
                ],
            );
            let ack = engine.handle(&request, at(67, src()), T0);
            assert_eq!(msg_type(&ack), Some(MessageType::Ack));
            ack.kernel.is_some()
        };
        assert!(kernel_of(true), "all always sent: the kernel may repeat it");
        assert!(
            kernel_of(false),
            "shaped by option 55, which is in the kernel's signature"
        );
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
                ..MachineEntry::default()
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
                client: Some(crate::policy::ClientKind::Pxe),
                ..MachineEntry::default()
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
        let leases = e.addresses.stored().unwrap();
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

    /// A proxy OFFER and a 4011 ACK carry the profile's boot-server options
    /// (here PXELINUX's config file, 209) but not its lease options (42),
    /// which are the site DHCP server's to give.
    #[test]
    fn proxy_answers_carry_the_configured_boot_options_only() {
        use crate::policy::options::Configured;
        let mut profile = Profile::named("default");
        for code in [42, 209] {
            profile.options.insert(
                code,
                Configured {
                    value: b"x".to_vec(),
                    always_send: true,
                },
            );
        }
        let policy = SharedPolicy::new(StaticPolicy {
            profiles: [("default".to_owned(), profile)].into(),
            machines: HashMap::new(),
            default_profile: Some("default".into()),
            provision: None,
            classes: Vec::new(),
        });
        let mut e = Engine::new(
            config(Mode::Proxy),
            policy,
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let offer = e
            .handle(&uefi(MessageType::Discover, 23, vec![]), at(67, src()), T0)
            .reply
            .expect("a proxy offer")
            .message;
        let on_4011 = e
            .handle(
                &uefi(MessageType::Request, 23, vec![]),
                at(
                    4011,
                    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 150), 4011),
                ),
                T0,
            )
            .reply
            .expect("a 4011 ack")
            .message;
        for reply in [offer, on_4011] {
            assert!(reply.opts().get(OptionCode::from(209)).is_some());
            assert!(reply.opts().get(OptionCode::from(42)).is_none());
        }
    }

    /// A flood of DISCOVERs from made-up MACs holds at most half the pool
    /// (10 addresses here); the rest are offered unheld. A new honest
    /// machine then still gets an address, and a reserved one its own.
    #[test]
    fn a_flood_of_strangers_cannot_hold_the_whole_pool() {
        let mut config = config(Mode::Full);
        let reserved_at = Ipv4Addr::new(198, 18, 0, 109);
        config.reservations.insert(Mac(mac(200)), reserved_at);
        let mut e = Engine::new(
            config,
            policy(HashMap::new()),
            Box::new(MemLeaseStore::default()),
        )
        .unwrap();
        let mut unheld = 0;
        for n in 0..40 {
            let offer = e.handle(&plain(MessageType::Discover, n, vec![]), at(67, src()), T0);
            assert_eq!(
                msg_type(&offer),
                Some(MessageType::Offer),
                "{}",
                offer.summary
            );
            assert_eq!(offer.unheld_offer, offer.summary.contains("not held"));
            if offer.unheld_offer {
                unheld += 1;
            }
        }
        assert_eq!(e.addresses.offers_held_for_strangers(0), 5, "half of 10");
        assert_eq!(unheld, 35);
        let honest = dora(&mut e, |k, o| plain(k, 100, o), T0);
        assert!(
            honest.octets()[2] == 0,
            "an address for a new machine: {honest}"
        );
        let reserved = dora(&mut e, |k, o| plain(k, 200, o), T0);
        assert_eq!(reserved, reserved_at);
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

    /// A shared database where another server already leased `theirs`: a
    /// batch writing that address for another client is refused with its
    /// holder, as the PostgreSQL store does.
    struct SharedWithAnotherServer {
        theirs: Lease,
        pending: Vec<Lease>,
    }
    impl LeaseStore for SharedWithAnotherServer {
        fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
            Ok(Vec::new()) // this server started before the other leased it
        }
        fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
            self.pending.push(lease.clone());
            Ok(())
        }
        fn remove(&mut self, _: Ipv4Addr) -> Result<(), LeaseError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), LeaseError> {
            let batch = std::mem::take(&mut self.pending);
            if batch
                .iter()
                .any(|l| l.ip == self.theirs.ip && l.client != self.theirs.client)
            {
                return Err(LeaseError::Taken {
                    leases: vec![self.theirs.clone()],
                });
            }
            Ok(())
        }
    }

    #[test]
    fn servers_sharing_pools_start_their_searches_apart() {
        let first_offer = |server: Ipv4Addr, shared: bool| {
            let mut config = config(Mode::Full);
            config.shared_pools = shared;
            let mut e = Engine::new(
                config,
                policy(HashMap::new()),
                Box::new(MemLeaseStore::default()),
            )
            .unwrap();
            let arrival = Arrival {
                server_ip: server,
                ..at(67, src())
            };
            let offer = e.handle(&plain(MessageType::Discover, 60, vec![]), arrival, T0);
            offer.reply.unwrap().message.yiaddr()
        };
        let (a, b) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(first_offer(a, false), Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(
            first_offer(b, false),
            Ipv4Addr::new(198, 18, 0, 100),
            "one server: from the start"
        );
        assert_ne!(
            first_offer(a, true),
            first_offer(b, true),
            "two servers: apart"
        );
        assert_eq!(
            first_offer(a, true),
            first_offer(a, true),
            "the same server, the same start"
        );
    }

    #[test]
    fn servers_sharing_pools_take_their_own_share_first_then_the_rest() {
        let offers = |slot: u32| {
            let mut e = engine(Mode::Full);
            let share = std::sync::Arc::new(PoolShare::default());
            share.set(slot, 2);
            e.share_pools(share);
            (1..=6)
                .map(|n| {
                    let offer =
                        e.handle(&plain(MessageType::Discover, n, vec![]), at(67, src()), T0);
                    u32::from(offer.reply.unwrap().message.yiaddr())
                        - u32::from(Ipv4Addr::new(198, 18, 0, 100))
                })
                .collect::<Vec<u32>>()
        };
        // The pool has ten addresses: five in each share.
        for (slot, theirs) in [(0, 1), (1, 0)] {
            let got = offers(slot);
            assert!(
                got[..5].iter().all(|i| i % 2 == slot),
                "slot {slot}: its own five first: {got:?}"
            );
            assert_eq!(got[5] % 2, theirs, "then the other's: {got:?}");
        }
    }

    #[test]
    fn an_address_another_server_holds_is_learnt_the_request_naked_and_the_retry_gets_another() {
        let first = Ipv4Addr::new(198, 18, 0, 100);
        let theirs = Lease {
            ip: first,
            client: client_key(None, mac(90)),
            mac: mac(90),
            expires: T0 + 3600,
            state: LeaseState::Active,
            hostname: None,
        };
        let store = SharedWithAnotherServer {
            theirs: theirs.clone(),
            pending: Vec::new(),
        };
        let mut e =
            Engine::new(config(Mode::Full), policy(HashMap::new()), Box::new(store)).unwrap();
        let request = |ip: Ipv4Addr| {
            plain(
                MessageType::Request,
                50,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            )
        };
        let offer = e.handle(&plain(MessageType::Discover, 50, vec![]), at(67, src()), T0);
        assert_eq!(
            offer.reply.unwrap().message.yiaddr(),
            first,
            "memory did not know"
        );
        // The database refuses it; decided again with the holder known, the
        // client is told at once to start over.
        let out = e.handle(&request(first), at(67, src()), T0);
        assert_eq!(msg_type(&out), Some(MessageType::Nak), "{}", out.summary);
        assert!(out.problem.is_none(), "{:?}", out.problem);
        assert_eq!(
            e.store_failing(),
            None,
            "another server's lease is no failing store"
        );
        assert_eq!(e.lease(first), Some(&theirs), "learnt from the database");
        let again = e.handle(
            &plain(MessageType::Discover, 50, vec![]),
            at(67, src()),
            T0 + 4,
        );
        let next = again.reply.unwrap().message.yiaddr();
        assert_ne!(next, first);
        let ack = e.handle(&request(next), at(67, src()), T0 + 4);
        assert_eq!(msg_type(&ack), Some(MessageType::Ack), "{}", ack.summary);
    }

    #[test]
    fn one_conflict_in_a_burst_costs_only_its_own_reply() {
        let first = Ipv4Addr::new(198, 18, 0, 100);
        let store = SharedWithAnotherServer {
            theirs: Lease {
                ip: first,
                client: client_key(None, mac(90)),
                mac: mac(90),
                expires: T0 + 3600,
                state: LeaseState::Active,
                hostname: None,
            },
            pending: Vec::new(),
        };
        let mut e =
            Engine::new(config(Mode::Full), policy(HashMap::new()), Box::new(store)).unwrap();
        let mut offered = Vec::new();
        for n in [50, 51] {
            let offer = e.handle(&plain(MessageType::Discover, n, vec![]), at(67, src()), T0);
            offered.push(offer.reply.unwrap().message.yiaddr());
        }
        assert_eq!(offered[0], first, "memory did not know");
        let requests: Vec<Request> = [50, 51]
            .into_iter()
            .zip(&offered)
            .map(|(n, ip)| {
                plain(
                    MessageType::Request,
                    n,
                    vec![
                        DhcpOption::ServerIdentifier(SERVER),
                        DhcpOption::RequestedIpAddress(*ip),
                    ],
                )
            })
            .collect();
        let out = e.handle_batch(requests.iter().map(|r| (r, at(67, src()))), T0);
        assert_eq!(
            msg_type(&out[0]),
            Some(MessageType::Nak),
            "{}",
            out[0].summary
        );
        assert_eq!(
            msg_type(&out[1]),
            Some(MessageType::Ack),
            "{}",
            out[1].summary
        );
        assert_eq!(e.lease(offered[1]).map(|l| l.mac), Some(mac(51)));
    }

    #[test]
    fn a_peers_record_older_than_this_servers_commit_is_not_applied_over_it() {
        let mut e = engine(Mode::Full);
        e.share_pools(std::sync::Arc::new(PoolShare::default()));
        let ip = dora(&mut e, |k, x| plain(k, 1, x), T0);
        // The other server's record of the address, committed before ours
        // (it released it to machine 9): the feed delivers it first.
        let older = Lease {
            ip,
            client: client_key(None, mac(9)),
            mac: mac(9),
            expires: T0,
            state: LeaseState::Released,
            hostname: None,
        };
        let touched = e.follow_lease_feed([FeedRecord::Peer(ip, Some(older.clone()))]);
        assert!(touched.is_empty());
        assert_eq!(e.lease(ip).map(|l| l.mac), Some(mac(1)), "ours is newer");
        // Our own commit comes next in the feed; a later record of theirs counts.
        e.follow_lease_feed([FeedRecord::Own(ip)]);
        e.follow_lease_feed([FeedRecord::Peer(ip, Some(older.clone()))]);
        assert_eq!(e.lease(ip), Some(&older));
    }

    #[test]
    fn leases_another_server_wrote_are_absorbed_and_a_resync_follows_the_database() {
        let mut e = engine(Mode::Full);
        let mine = dora(&mut e, |k, x| plain(k, 1, x), T0);
        // Another server leased the next free address to machine 2, then
        // moved machine 1 (it rebooted there) to another.
        let theirs = |ip: [u8; 4], n: u8| Lease {
            ip: Ipv4Addr::from(ip),
            client: client_key(None, mac(n)),
            mac: mac(n),
            expires: T0 + 3600,
            state: LeaseState::Active,
            hostname: None,
        };
        let two = theirs([198, 18, 0, 101], 2);
        let one_moved = theirs([198, 18, 0, 107], 1);
        let touched = e.follow_lease_feed([
            FeedRecord::Peer(two.ip, Some(two.clone())),
            FeedRecord::Peer(one_moved.ip, Some(one_moved.clone())),
        ]);
        assert_eq!(touched, vec![Mac(mac(1)), Mac(mac(2))]);
        let offer = e.handle(
            &plain(MessageType::Discover, 2, vec![]),
            at(67, src()),
            T0 + 1,
        );
        assert_eq!(
            offer.reply.unwrap().message.yiaddr(),
            two.ip,
            "machine 2 keeps its address here too"
        );
        let offer = e.handle(
            &plain(MessageType::Discover, 1, vec![]),
            at(67, src()),
            T0 + 1,
        );
        assert_eq!(
            offer.reply.unwrap().message.yiaddr(),
            one_moved.ip,
            "machine 1 where it is now"
        );
        let offer = e.handle(
            &plain(MessageType::Discover, 3, vec![]),
            at(67, src()),
            T0 + 1,
        );
        let three = offer.reply.unwrap().message.yiaddr();
        assert!(
            three != two.ip && three != one_moved.ip,
            "a new machine gets neither: {three}"
        );
        // Deleted in the database: gone from memory.
        assert_eq!(
            e.follow_lease_feed([FeedRecord::Peer(two.ip, None)]),
            vec![Mac(mac(2))]
        );
        assert_eq!(e.lease(two.ip), None);
        // A resync replaces memory with the database's records.
        assert_eq!(
            e.resync_leases(vec![one_moved.clone()]),
            1,
            "the first lease of machine 1 was not there"
        );
        assert_eq!(e.lease(mine), None);
        assert_eq!(e.leases().count(), 1);
    }

    /// A store that keeps the contract (a batch counts only once committed)
    /// and whose commits fail while `failing` is set.
    #[derive(Default)]
    struct DiskThatFills {
        committed: HashMap<Ipv4Addr, Lease>,
        pending: Vec<Lease>,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }
    impl LeaseStore for DiskThatFills {
        fn load_all(&self) -> Result<Vec<Lease>, LeaseError> {
            Ok(self.committed.values().cloned().collect())
        }
        fn put(&mut self, lease: &Lease) -> Result<(), LeaseError> {
            self.pending.push(lease.clone());
            Ok(())
        }
        fn remove(&mut self, _: Ipv4Addr) -> Result<(), LeaseError> {
            Ok(())
        }
        fn commit(&mut self) -> Result<(), LeaseError> {
            let batch = std::mem::take(&mut self.pending);
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(disk_full());
            }
            self.committed.extend(batch.into_iter().map(|l| (l.ip, l)));
            Ok(())
        }
    }

    #[test]
    fn a_failed_commit_leaves_memory_as_the_disk_has_it() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = DiskThatFills {
            failing: Arc::clone(&failing),
            ..DiskThatFills::default()
        };
        let mut e =
            Engine::new(config(Mode::Full), policy(HashMap::new()), Box::new(store)).unwrap();
        let selecting = |n: u8, ip: Ipv4Addr| {
            plain(
                MessageType::Request,
                n,
                vec![
                    DhcpOption::ServerIdentifier(SERVER),
                    DhcpOption::RequestedIpAddress(ip),
                ],
            )
        };
        // A new machine's REQUEST fails to commit: no lease in memory, and
        // its offer still stands, so its retry is ACKed once the disk recovers.
        let offer = e.handle(&plain(MessageType::Discover, 40, vec![]), at(67, src()), T0);
        let ip = offer.reply.unwrap().message.yiaddr();
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let out = e.handle(&selecting(40, ip), at(67, src()), T0);
        assert!(
            out.reply.is_none() && out.problem.is_some(),
            "{}",
            out.summary
        );
        assert_eq!(
            e.lease(ip),
            None,
            "memory must not hold a lease the disk lacks"
        );
        let other = e.handle(&plain(MessageType::Discover, 41, vec![]), at(67, src()), T0);
        assert_ne!(
            other.reply.unwrap().message.yiaddr(),
            ip,
            "the offer is still held"
        );
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        let retry = e.handle(&selecting(40, ip), at(67, src()), T0 + 1);
        assert_eq!(
            msg_type(&retry),
            Some(MessageType::Ack),
            "{}",
            retry.summary
        );
        let granted = e.lease(ip).cloned().unwrap();

        // A renewal that fails to commit leaves the lease as it was on disk.
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut renew = plain(MessageType::Request, 40, vec![]);
        renew.message.set_ciaddr(ip);
        let out = e.handle(&renew, at(67, SocketAddrV4::new(ip, 68)), T0 + 600);
        assert!(out.reply.is_none(), "{}", out.summary);
        assert_eq!(
            e.lease(ip),
            Some(&granted),
            "the expiry on disk is the old one"
        );

        // A machine moving to its reservation keeps its old address when the
        // move fails to commit.
        let moved = Ipv4Addr::new(198, 18, 0, 105);
        let mut moving = config(Mode::Full);
        moving.reservations.insert(Mac(mac(40)), moved);
        e.reconfigure(moving);
        let offer = e.handle(
            &plain(MessageType::Discover, 40, vec![]),
            at(67, src()),
            T0 + 700,
        );
        assert_eq!(offer.reply.unwrap().message.yiaddr(), moved);
        let out = e.handle(&selecting(40, moved), at(67, src()), T0 + 700);
        assert!(out.reply.is_none(), "{}", out.summary);
        assert_eq!(e.lease(ip), Some(&granted), "the old lease is not released");
        assert_eq!(e.lease(moved), None);
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        let out = e.handle(&selecting(40, moved), at(67, src()), T0 + 701);
        assert_eq!(msg_type(&out), Some(MessageType::Ack), "{}", out.summary);
        assert_eq!(e.lease(ip).map(|l| l.state), Some(LeaseState::Released));
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
