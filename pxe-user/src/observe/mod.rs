//! What the operator sees: Prometheus metrics and each machine's boot
//! timeline, fed by the servers through one [`Observer`]. The servers say
//! what happened (a DHCP exchange, a file, a provisioning call); this module
//! counts it, joins it to a machine and a boot stage, and answers
//! `GET /metrics`, `/api/v1/machines/{mac}/boots` and `/api/v1/boots`.
//!
//! Joining needs a MAC: DHCP carries it, the script URL carries it, and TFTP
//! and HTTP files are joined through the address the machine's DHCP gave or
//! named (its ACK in full mode; in proxy mode its own REQUEST's option 50 or
//! a 4011 request's ciaddr).

pub mod metrics;
pub mod timeline;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use dhcproto::v4::MessageType;
use serde::Serialize;

pub use self::timeline::{DhcpClient, DhcpStep, HttpFile, Msg, Route, Stage, TftpEnd, TftpFile};
use self::{
    metrics::{DhcpLabels, Exposition, HttpLabels, PortLabel, ReasonLabel, StageLabel, TierLabel},
    timeline::{Boot, Reached, Timelines},
};
use crate::{
    dhcp::{
        classify::{Firmware, Request},
        engine::{CommitTiming, Engine, Outcome, Problem},
    },
    fastpath::FastPath,
    policy::Mac,
};

/// Machines whose timelines are kept unless `--timeline-machines` says
/// otherwise: a large site's worth, at a cost docs/OBSERVABILITY.md states.
pub const DEFAULT_TIMELINE_MACHINES: usize = 100_000;
/// Memory the timelines may take unless `--timeline-memory` says otherwise, MiB.
pub const DEFAULT_TIMELINE_MIB: usize = 256;

/// The one place events go. Off (`--no-observe`), every call returns at once.
pub struct Observer {
    on: bool,
    exposition: Exposition,
    timelines: Arc<Mutex<Timelines>>,
}

impl Observer {
    pub fn new(max_machines: usize, max_bytes: usize) -> Self {
        let exposition = Exposition::default();
        let timelines = Arc::new(Mutex::new(Timelines::new(max_machines, max_bytes)));
        let _ = exposition.live.timelines.set(Arc::clone(&timelines));
        Self {
            on: true,
            exposition,
            timelines,
        }
    }

    /// Counts and keeps nothing: for measuring what observing costs.
    pub fn off() -> Self {
        Self {
            on: false,
            ..Self::new(1, 0)
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Lets scrapes read the pools and the lease store's health.
    pub fn watch_engine(&self, engine: &Arc<Mutex<Engine>>) {
        let _ = self.exposition.live.engine.set(Arc::clone(engine));
    }

    /// Lets scrapes read the programs' counters and image memory.
    pub fn watch_fastpath(&self, fastpath: &Arc<Mutex<FastPath>>) {
        let _ = self.exposition.live.fastpath.set(Arc::clone(fastpath));
    }

    /// The Prometheus text exposition.
    pub fn exposition(&self) -> String {
        self.exposition.encode()
    }

    /// A burst of DHCP requests decided in `took`, with its lease commit.
    pub fn dhcp_burst(&self, requests: usize, took: Duration, commit: Option<CommitTiming>) {
        if !self.on {
            return;
        }
        let m = &self.exposition.metrics;
        for _ in 0..requests {
            m.dhcp_decision_seconds.observe(took.as_secs_f64());
        }
        if let Some(c) = commit {
            m.lease_commit_seconds.observe(c.seconds);
            m.lease_commit_burst.observe(c.leases as f64);
            if !c.ok {
                m.lease_commit_failures.inc();
            }
        }
    }

    /// One DHCP request and what the engine made of it.
    pub fn dhcp(&self, port: u16, request: &Request, outcome: &Outcome) {
        if !self.on {
            return;
        }
        let (step, link, leased) = dhcp_step(port, request, outcome);
        let problem = outcome.problem.as_ref().map(|p| match p {
            Problem::PoolExhausted { subnet } => format!("DHCP: the pool of {subnet} is exhausted"),
            Problem::LeaseStore(e) => format!("DHCP: the lease could not be stored: {e}"),
            Problem::Taken(e) => format!("DHCP: {e}"),
        });
        self.exposition
            .metrics
            .dhcp_requests
            .get_or_create(&DhcpLabels {
                port,
                message: message_label(request.msg_type),
                outcome: match outcome_label(&step, leased, problem.is_some()) {
                    "offered" if outcome.unheld_offer => "offered_unheld",
                    label => label,
                },
            })
            .inc();
        if problem.is_some() {
            self.failure("dhcp_not_answered");
        }
        let reached = self
            .timelines()
            .dhcp(request.mac, step, link, problem, now_ms());
        self.reached(reached);
    }

    /// Repeats the kernel answered for `mac` since it was last asked.
    pub fn kernel_answered(&self, mac: Mac, port: u16, count: u64) {
        if !self.on {
            return;
        }
        self.exposition
            .metrics
            .dhcp_kernel_answers
            .get_or_create(&PortLabel { port })
            .inc_by(count);
        self.timelines().kernel_answered(mac, port, count, now_ms());
    }

    /// A TFTP transfer began; it counts in flight until the guard is dropped
    /// (however the transfer ends, a panic included).
    pub fn tftp_started(&self) -> InFlight {
        let gauge = self.on.then(|| {
            let m = &self.exposition.metrics;
            m.tftp_started.inc();
            m.tftp_in_flight.inc();
            m.tftp_in_flight.clone()
        });
        InFlight(gauge)
    }

    /// A TFTP transfer ended or a request was refused.
    pub fn tftp(&self, client: Ipv4Addr, file: TftpFile) {
        if !self.on {
            return;
        }
        let m = &self.exposition.metrics;
        let block_bytes = u64::from(file.blksize);
        for (tier, blocks) in [
            ("userspace", file.user_blocks),
            ("xdp", file.xdp_blocks),
            ("tc", file.tc_blocks),
        ] {
            if blocks > 0 {
                let tier = TierLabel { tier };
                m.tftp_blocks.get_or_create(&tier).inc_by(blocks);
                // Userspace sends the short last block; the kernel tiers only full ones.
                let bytes = if tier.tier == "userspace" {
                    user_bytes(&file)
                } else {
                    blocks * block_bytes
                };
                m.tftp_bytes.get_or_create(&tier).inc_by(bytes);
            }
        }
        m.tftp_retransmits.inc_by(file.retransmits);
        match &file.end {
            TftpEnd::Completed => {
                m.tftp_completed.inc();
            }
            end => {
                let reason = match end {
                    TftpEnd::ClientError { .. } if file.is_size_probe() => {
                        "client_aborted_before_data"
                    }
                    TftpEnd::ClientError { .. } => "client_aborted",
                    TftpEnd::TimedOut { .. } => "timed_out",
                    TftpEnd::Refused { why } if why.contains("not found") => "not_found",
                    TftpEnd::Refused { .. } => "refused",
                    TftpEnd::Completed => unreachable!("matched above"),
                };
                m.tftp_failed.get_or_create(&ReasonLabel { reason }).inc();
            }
        }
        let mut timelines = self.timelines();
        let Some(mac) = timelines.machine_at(client) else {
            drop(timelines);
            self.unjoined("tftp");
            return;
        };
        let problem = !matches!(
            file.end,
            TftpEnd::Completed | TftpEnd::ClientError { code: 8, .. }
        );
        let reached = timelines.tftp(mac, file, now_ms());
        drop(timelines);
        if problem {
            self.failure("tftp");
        }
        self.reached(reached);
    }

    /// An HTTP request answered on the boot listener. `mac`: when the
    /// request names its machine (the script URL, `provisioned`);
    /// `script_files`: a script's files from this server.
    pub fn http(
        &self,
        client: Ipv4Addr,
        mac: Option<Mac>,
        file: HttpFile,
        script_files: Vec<String>,
    ) {
        if !self.on {
            return;
        }
        self.count_http(&file);
        let mut timelines = self.timelines();
        // A `?mac=` names a machine only if DHCP made it known: a client
        // cannot make up machines.
        let named = mac.filter(|m| timelines.knows(*m));
        let Some(mac) = named.or_else(|| timelines.machine_at(client)) else {
            drop(timelines);
            self.unjoined("http");
            return;
        };
        let problem = file.status >= 400 || !file.complete;
        let reached = timelines.http(mac, file, script_files, now_ms());
        drop(timelines);
        if problem {
            self.failure("http");
        }
        self.reached(reached);
    }

    /// An HTTP answer in the metrics only (a HEAD, which fetches nothing).
    pub fn count_http(&self, file: &HttpFile) {
        if !self.on {
            return;
        }
        let m = &self.exposition.metrics;
        let labels = HttpLabels {
            route: file.route.name(),
            status: file.status,
        };
        m.http_requests.get_or_create(&labels).inc();
        m.http_bytes.get_or_create(&labels).inc_by(file.bytes);
    }

    /// `mac` was marked provisioned.
    pub fn provisioned(&self, mac: Mac) {
        if self.on {
            let reached = self.timelines().provisioned(mac, now_ms());
            self.reached(reached);
        }
    }

    /// The boots kept for `mac`, oldest first.
    pub fn boots(&self, mac: Mac) -> Vec<BootView> {
        let now = now_ms();
        self.timelines()
            .boots(mac)
            .map(|boots| boots.iter().map(|b| BootView::of(b, now)).collect())
            .unwrap_or_default()
    }

    /// The rack view: every machine whose latest boot was active since
    /// `since_ms`, by stage, with the failures and the slowest.
    pub fn rack(&self, since_ms: u64, slowest: usize) -> RackView {
        let now = now_ms();
        // Under the lock only what the view needs; sorted after it.
        let rows: Vec<(Mac, Stage, u64, Option<String>)> = self
            .timelines()
            .latest_since(since_ms)
            .map(|(mac, boot)| (mac, boot.stage(), boot.busy_ms(), boot.failure(now)))
            .collect();
        let mut view = RackView {
            since_ms,
            now_ms: now,
            ..RackView::default()
        };
        for stage in Stage::ALL {
            view.stages.insert(stage.name(), 0);
        }
        let mut running = Vec::new();
        for (mac, stage, busy_ms, failure) in rows {
            view.machines += 1;
            *view.stages.entry(stage.name()).or_default() += 1;
            match failure {
                Some(why) => {
                    view.failed += 1;
                    *view.failures.entry(failure_kind(&why)).or_default() += 1;
                    if view.failed_machines.len() < slowest {
                        view.failed_machines.push(FailedMachine {
                            mac: mac.to_string(),
                            stage,
                            why,
                        });
                    }
                }
                None => running.push((mac, stage, busy_ms)),
            }
        }
        // The slowest: longest from power-on to their latest event.
        running.sort_by_key(|(_, _, busy)| std::cmp::Reverse(*busy));
        view.slowest = running
            .into_iter()
            .take(slowest)
            .map(|(mac, stage, busy)| SlowMachine {
                mac: mac.to_string(),
                stage,
                seconds: busy as f64 / 1000.0,
            })
            .collect();
        view
    }

    fn timelines(&self) -> std::sync::MutexGuard<'_, Timelines> {
        self.timelines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reached(&self, reached: Option<Reached>) {
        if let Some(r) = reached {
            self.exposition
                .metrics
                .boot_stage_seconds
                .get_or_create(&StageLabel {
                    stage: r.stage.name(),
                })
                .observe(r.seconds);
        }
    }

    fn failure(&self, reason: &'static str) {
        self.exposition
            .metrics
            .boot_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn unjoined(&self, reason: &'static str) {
        self.exposition
            .metrics
            .unjoined
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

/// A TFTP transfer counted in flight while this lives.
pub struct InFlight(Option<prometheus_client::metrics::gauge::Gauge>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

/// Payload bytes userspace sent: its blocks, the last one short.
fn user_bytes(file: &TftpFile) -> u64 {
    let blksize = u64::from(file.blksize);
    let full = file.user_blocks.saturating_sub(1) * blksize;
    let last = match file.end {
        TftpEnd::Completed => file.size % blksize,
        _ => blksize,
    };
    full + last.min(blksize) * u64::from(file.user_blocks > 0)
}

/// A DHCP request and its answer, as the timeline keeps it; the address it
/// ties to the machine; whether the reply leases an address.
fn dhcp_step(
    port: u16,
    request: &Request,
    outcome: &Outcome,
) -> (DhcpStep, Option<Ipv4Addr>, bool) {
    let reply = outcome.reply.as_ref().map(|r| &r.message);
    let answered = reply.and_then(|m| m.opts().msg_type()).map(msg);
    let yiaddr = reply.map(|m| m.yiaddr()).filter(|a| !a.is_unspecified());
    let ciaddr = Some(request.message.ciaddr()).filter(|a| !a.is_unspecified());
    // An ACK of an address ends DHCP; so does boot information with no
    // address (proxyDHCP), whatever it is called.
    let completes =
        answered == Some(Msg::Ack) || (answered == Some(Msg::Offer) && yiaddr.is_none());
    // Only what holds: an address pxed ACKed (or, on 4011, the one the
    // client has), or in proxy mode the one a REQUEST not ours asks the
    // site's server for. Never a NAKed or declined one.
    let link = match (answered, request.msg_type) {
        (Some(Msg::Ack), _) => yiaddr.or(ciaddr),
        (None, MessageType::Request) if outcome.problem.is_none() => request.requested_ip,
        _ => None,
    };
    let step = DhcpStep {
        port,
        asked: msg(request.msg_type),
        answered,
        client: match request.firmware {
            Firmware::Ipxe => DhcpClient::Ipxe,
            Firmware::Pxe | Firmware::HttpBoot => DhcpClient::Firmware,
            Firmware::NotPxe => DhcpClient::Os,
        },
        address: yiaddr.or(ciaddr).or(request.requested_ip),
        boot_file: reply.is_some_and(|m| m.fname().is_some_and(|f| !f.is_empty())),
        completes,
    };
    (step, link, yiaddr.is_some())
}

fn msg(t: MessageType) -> Msg {
    match t {
        MessageType::Discover => Msg::Discover,
        MessageType::Offer => Msg::Offer,
        MessageType::Request => Msg::Request,
        MessageType::Decline => Msg::Decline,
        MessageType::Ack => Msg::Ack,
        MessageType::Nak => Msg::Nak,
        MessageType::Release => Msg::Release,
        MessageType::Inform => Msg::Inform,
        _ => Msg::Other,
    }
}

fn message_label(t: MessageType) -> &'static str {
    match t {
        MessageType::Discover => "discover",
        MessageType::Request => "request",
        MessageType::Decline => "decline",
        MessageType::Release => "release",
        MessageType::Inform => "inform",
        _ => "other",
    }
}

fn outcome_label(step: &DhcpStep, leased: bool, problem: bool) -> &'static str {
    match step.answered {
        None if problem => "not_answered",
        None => "ignored",
        Some(Msg::Nak) => "naked",
        Some(Msg::Offer) if leased => "offered",
        Some(Msg::Ack) if leased => "acked",
        _ => "boot_info",
    }
}

/// A failure's kind, for counting alike failures together: the text up to
/// the first colon (`TFTP ipxe.efi: file not found` → `TFTP ipxe.efi`).
fn failure_kind(why: &str) -> String {
    why.split(':').next().unwrap_or(why).to_owned()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One boot as the API shows it.
#[derive(Debug, Serialize)]
pub struct BootView {
    pub started_ms: u64,
    pub stage: Stage,
    /// Seconds from power-on to each stage reached.
    pub stages: BTreeMap<&'static str, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub events: Vec<timeline::Event>,
    pub events_dropped: u64,
}

impl BootView {
    fn of(boot: &Boot, now: u64) -> Self {
        let stages = Stage::ALL
            .into_iter()
            .filter_map(|s| {
                let at = boot.reached(s)?;
                Some((s.name(), at.saturating_sub(boot.started_ms) as f64 / 1000.0))
            })
            .collect();
        Self {
            started_ms: boot.started_ms,
            stage: boot.stage(),
            stages,
            failure: boot.failure(now),
            events: boot.events.clone(),
            events_dropped: boot.events_dropped,
        }
    }
}

/// How a rack is doing.
#[derive(Debug, Default, Serialize)]
pub struct RackView {
    pub since_ms: u64,
    pub now_ms: u64,
    pub machines: u64,
    /// Machines by the furthest stage of their latest boot.
    pub stages: BTreeMap<&'static str, u64>,
    pub failed: u64,
    /// Failed machines by kind of failure.
    pub failures: BTreeMap<String, u64>,
    pub failed_machines: Vec<FailedMachine>,
    /// The machines taking longest, with the stage they are at.
    pub slowest: Vec<SlowMachine>,
}

#[derive(Debug, Serialize)]
pub struct FailedMachine {
    pub mac: String,
    pub stage: Stage,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct SlowMachine {
    pub mac: String,
    pub stage: Stage,
    pub seconds: f64,
}
