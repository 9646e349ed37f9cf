//! Each machine's recent boots as the server saw them: every DHCP exchange,
//! file and provisioning call in order, the stages reached and what went
//! wrong. Pure: events and clocks in, stage changes and views out.
//!
//! Memory is bounded three times: [`BOOTS_PER_MACHINE`] boots of at most
//! [`EVENTS_PER_BOOT`] events each (later events of a boot are counted, not
//! kept; client-given text is cut at [`MAX_TEXT`] bytes), at most
//! `max_machines` machines, and at most `max_bytes` in all, counted as
//! events are kept: past either, the longest-known machine is forgotten
//! first. Only DHCP from a machine's firmware or iPXE makes a machine
//! known; a file request or a `?mac=` names only a machine already known.

use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use serde::Serialize;

use crate::policy::Mac;

/// Boots kept per machine: the one running and the three before it.
pub const BOOTS_PER_MACHINE: usize = 4;
/// Events kept per boot: a whole boot takes about a dozen; a machine that
/// loops (a bad NBP, a DHCP storm) must not grow without end.
pub const EVENTS_PER_BOOT: usize = 48;
/// A boot that has not got its boot file this long after it began is over:
/// the next firmware DISCOVER begins a new one.
const BOOT_GIVES_UP_MS: u64 = 5 * 60 * 1000;
/// An OFFER not followed by a REQUEST this long is reported as a failure.
const OFFER_UNANSWERED_MS: u64 = 30 * 1000;
/// Longest text kept from a client (a path, an error message), in bytes.
pub const MAX_TEXT: usize = 256;

/// `text` cut to [`MAX_TEXT`] bytes at a character boundary, marked `…`.
pub fn capped(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Where a boot has got to, in boot order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The firmware's first DISCOVER.
    PowerOn,
    /// The firmware has its address (ACK) or, in proxy mode, its boot file name.
    Dhcp,
    /// The network boot program is downloaded (TFTP, or HTTP for HTTP Boot).
    Nbp,
    /// iPXE has its address and script URL.
    IpxeDhcp,
    /// iPXE has its script.
    Script,
    /// Every file the script names from this server (kernel, initrd) is downloaded.
    Os,
    /// The installer said it is done.
    Provisioned,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::PowerOn,
        Stage::Dhcp,
        Stage::Nbp,
        Stage::IpxeDhcp,
        Stage::Script,
        Stage::Os,
        Stage::Provisioned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::PowerOn => "power_on",
            Stage::Dhcp => "dhcp",
            Stage::Nbp => "nbp",
            Stage::IpxeDhcp => "ipxe_dhcp",
            Stage::Script => "script",
            Stage::Os => "os",
            Stage::Provisioned => "provisioned",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A DHCP message type, one byte in memory, its name in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Msg {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
    Other,
}

/// Which DHCP client of a machine asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DhcpClient {
    /// PXE or HTTP Boot firmware: its DISCOVER is a power-on.
    Firmware,
    /// iPXE (user class `iPXE`).
    Ipxe,
    /// No PXE options: the booted OS (an installer's DHCP client). Its
    /// exchanges are on the timeline but reach no stage.
    Os,
}

/// One DHCP request and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DhcpStep {
    pub port: u16,
    pub asked: Msg,
    /// None: not answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered: Option<Msg>,
    /// Who asked: the firmware, iPXE, or the booted OS's own DHCP client.
    pub client: DhcpClient,
    /// The address the reply gives (full mode) or the client says it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    /// The reply names a boot file or URL. Without one a PXE firmware goes
    /// on to its disk (a provisioned machine) and sends no REQUEST.
    pub boot_file: bool,
    /// The reply completes this client's DHCP: an ACK of an address, or in
    /// proxy mode the boot information.
    #[serde(skip)]
    pub completes: bool,
}

/// How a TFTP transfer ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "how")]
pub enum TftpEnd {
    Completed,
    /// The client sent an ERROR: EDK2 does after its size probe (code 8, no
    /// block acknowledged), which is no failure.
    ClientError {
        code: u16,
        message: String,
    },
    TimedOut {
        acked_blocks: u64,
    },
    /// Refused before a transfer began (not found, not allowed, ...).
    Refused {
        why: String,
    },
}

/// One TFTP file as it was served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TftpFile {
    pub path: Arc<str>,
    pub size: u64,
    pub blksize: u16,
    pub windowsize: u16,
    pub ms: u64,
    pub retransmits: u64,
    /// DATA blocks sent by userspace, XDP and TC.
    pub user_blocks: u64,
    pub xdp_blocks: u64,
    pub tc_blocks: u64,
    pub end: TftpEnd,
}

impl TftpFile {
    fn end_bytes(&self) -> usize {
        match &self.end {
            TftpEnd::ClientError { message, .. } => message.len(),
            TftpEnd::Refused { why } => why.len(),
            _ => 0,
        }
    }

    /// The client ended the transfer before any block: a size probe
    /// (EDK2 asks for tsize, then aborts, then asks again), no failure.
    pub fn is_size_probe(&self) -> bool {
        matches!(&self.end, TftpEnd::ClientError { .. })
            && self.user_blocks + self.xdp_blocks + self.tc_blocks == 0
    }

    /// What went wrong, if anything.
    pub fn problem(&self) -> Option<String> {
        match &self.end {
            TftpEnd::Completed => None,
            _ if self.is_size_probe() => None,
            TftpEnd::ClientError { code, message } => Some(format!(
                "TFTP {}: the client aborted the transfer (error {code}: {message})",
                self.path
            )),
            TftpEnd::TimedOut { acked_blocks } => Some(format!(
                "TFTP {}: the client went silent after {acked_blocks} blocks",
                self.path
            )),
            TftpEnd::Refused { why } => Some(format!("TFTP {}: {why}", self.path)),
        }
    }
}

/// What an HTTP request was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The iPXE script.
    Script,
    /// A boot file.
    File,
    /// The installer's `provisioned` call.
    Provisioned,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Script => "script",
            Route::File => "file",
            Route::Provisioned => "provisioned",
        }
    }
}

/// One HTTP request as it was answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpFile {
    pub route: Route,
    pub path: String,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// The whole body was sent (false: the client went away during it).
    pub complete: bool,
    pub ms: u64,
}

impl HttpFile {
    fn problem(&self) -> Option<String> {
        if self.status >= 400 {
            Some(format!("HTTP {} {}", self.status, self.path))
        } else if !self.complete {
            Some(format!(
                "HTTP {}: the client went away after {} bytes",
                self.path, self.bytes
            ))
        } else {
            None
        }
    }
}

/// Something that happened to a machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum What {
    Dhcp(DhcpStep),
    /// The kernel answered this many repeats from its template since the
    /// last such event.
    KernelAnswered {
        port: u16,
        count: u64,
    },
    Tftp(Box<TftpFile>),
    Http(Box<HttpFile>),
    Provisioned,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    #[serde(flatten)]
    pub what: What,
}

/// One boot of one machine. The latest keeps its events; once a newer
/// boot begins, an older one keeps only its stage times and failure.
#[derive(Clone, Debug, Serialize)]
pub struct Boot {
    pub started_ms: u64,
    /// When each stage was first reached, in milliseconds after
    /// `started_ms`, by [`Stage`] order ([`UNREACHED`]: not yet).
    #[serde(skip)]
    reached: [u32; 7],
    pub events: Vec<Event>,
    /// Events not kept: past [`EVENTS_PER_BOOT`], or all of an older boot's.
    pub events_dropped: u64,
    /// The last thing that went wrong, until the boot moves on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Box<str>>,
    /// Files the script names from this server that are not downloaded yet.
    #[serde(skip)]
    outstanding: Vec<Box<str>>,
    #[serde(skip)]
    last_ms: u64,
    /// What this boot takes in memory, roughly, kept up to date.
    #[serde(skip)]
    bytes: usize,
}

const UNREACHED: u32 = u32::MAX;

/// What one kept event takes, roughly: itself and what it owns.
fn event_bytes(event: &Event) -> usize {
    size_of::<Event>()
        + match &event.what {
            What::Tftp(t) => size_of::<TftpFile>() + t.path.len() + t.end_bytes(),
            What::Http(h) => size_of::<HttpFile>() + h.path.len(),
            _ => 0,
        }
}

impl Boot {
    fn new(now_ms: u64) -> Self {
        let mut reached = [UNREACHED; 7];
        reached[Stage::PowerOn.index()] = 0;
        Self {
            started_ms: now_ms,
            reached,
            events: Vec::new(),
            events_dropped: 0,
            problem: None,
            outstanding: Vec::new(),
            last_ms: now_ms,
            bytes: size_of::<Boot>(),
        }
    }

    /// The furthest stage reached.
    pub fn stage(&self) -> Stage {
        Stage::ALL
            .into_iter()
            .rev()
            .find(|s| self.reached[s.index()] != UNREACHED)
            .unwrap_or(Stage::PowerOn)
    }

    /// A newer boot began: keep what it reached, forget its events.
    fn compact(&mut self) {
        self.events_dropped += self.events.len() as u64;
        self.events = Vec::new();
        self.set_outstanding(Vec::new());
        self.bytes = size_of::<Boot>() + self.problem.as_ref().map_or(0, |p| p.len());
    }

    fn set_problem(&mut self, problem: Option<String>) {
        let old = self.problem.as_ref().map_or(0, |p| p.len());
        self.problem = problem.map(|p| capped(&p).into());
        self.bytes = self.bytes - old + self.problem.as_ref().map_or(0, |p| p.len());
    }

    fn set_outstanding(&mut self, files: Vec<Box<str>>) {
        let size = |files: &[Box<str>]| files.iter().map(|f| f.len() + 16).sum::<usize>();
        self.bytes = self.bytes - size(&self.outstanding) + size(&files);
        self.outstanding = files;
    }

    /// From power-on to the latest event, in milliseconds.
    pub fn busy_ms(&self) -> u64 {
        self.last_ms.saturating_sub(self.started_ms)
    }

    /// When `stage` was reached (Unix milliseconds), if it was.
    pub fn reached(&self, stage: Stage) -> Option<u64> {
        let offset = self.reached[stage.index()];
        (offset != UNREACHED).then(|| self.started_ms + u64::from(offset))
    }

    fn push(&mut self, at_ms: u64, what: What) {
        self.last_ms = self.last_ms.max(at_ms);
        if self.events.len() < EVENTS_PER_BOOT {
            let event = Event { at_ms, what };
            self.bytes += event_bytes(&event);
            self.events.push(event);
        } else {
            self.events_dropped += 1;
        }
    }

    /// Marks `stage` reached at `now_ms`; the seconds since power-on the
    /// first time it is, for the stage histograms.
    fn reach(&mut self, stage: Stage, now_ms: u64) -> Option<f64> {
        let slot = &mut self.reached[stage.index()];
        if *slot != UNREACHED {
            return None;
        }
        let offset = now_ms.saturating_sub(self.started_ms);
        *slot = u32::try_from(offset).unwrap_or(UNREACHED - 1);
        // Moving on means whatever went wrong before was recovered from
        // (EDK2 retries a transfer, iPXE retries DHCP).
        self.set_problem(None);
        Some(now_ms.saturating_sub(self.started_ms) as f64 / 1000.0)
    }

    /// Why this boot failed, if it did: its last problem, or an OFFER left
    /// without a REQUEST.
    pub fn failure(&self, now_ms: u64) -> Option<String> {
        if let Some(p) = &self.problem {
            return Some(p.to_string());
        }
        let offered_last = matches!(
            self.events.last(),
            Some(Event {
                what: What::Dhcp(DhcpStep {
                    answered: Some(Msg::Offer),
                    completes: false,
                    boot_file: true,
                    ..
                }),
                ..
            })
        );
        let waiting = now_ms.saturating_sub(self.last_ms) >= OFFER_UNANSWERED_MS;
        (offered_last && waiting && self.events_dropped == 0)
            .then(|| "offered an address, no REQUEST followed".to_owned())
    }
}

#[derive(Default)]
struct MachineBoots {
    boots: VecDeque<Boot>,
    /// The address the machine was last seen with, to unlink it when forgotten.
    address: Option<Ipv4Addr>,
}

/// A stage a boot reached, for the histograms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reached {
    pub stage: Stage,
    /// Since power-on.
    pub seconds: f64,
}

/// Every machine's recent boots.
pub struct Timelines {
    machines: HashMap<Mac, MachineBoots>,
    /// Oldest-known first: who is forgotten when a bound is reached.
    order: VecDeque<Mac>,
    /// The address↔MAC link the leases (or the client's own REQUEST) give:
    /// TFTP and HTTP know only the client's address. One address per MAC.
    by_address: HashMap<Ipv4Addr, Mac>,
    max_machines: usize,
    max_bytes: usize,
    /// What every kept boot takes, plus the indexes, roughly.
    bytes: usize,
}

/// What a machine costs besides its boots: its entries in the three indexes.
const MACHINE_BYTES: usize = size_of::<Mac>() * 2
    + size_of::<MachineBoots>()
    + size_of::<Ipv4Addr>()
    + size_of::<Mac>()
    + 32;

/// Counts over every machine's latest boot, for a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub by_stage: [u64; 7],
    pub failed: u64,
    pub machines: usize,
    pub bytes: usize,
}

impl Timelines {
    pub fn new(max_machines: usize, max_bytes: usize) -> Self {
        Self {
            machines: HashMap::new(),
            order: VecDeque::new(),
            by_address: HashMap::new(),
            max_machines: max_machines.max(1),
            max_bytes,
            bytes: 0,
        }
    }

    /// The machine at `address`, as far as DHCP told us.
    pub fn machine_at(&self, address: Ipv4Addr) -> Option<Mac> {
        self.by_address.get(&address).copied()
    }

    /// Whether `mac` is a machine DHCP made known.
    pub fn knows(&self, mac: Mac) -> bool {
        self.machines.contains_key(&mac)
    }

    pub fn machines(&self) -> usize {
        self.machines.len()
    }

    /// A DHCP request and its answer; `link`: the address it ties to the
    /// machine (an ACK's, or the one it asks the site's server for in proxy
    /// mode); `problem`: why it was not answered, when an operator must
    /// know (a full pool, a failing lease disk). Only the firmware and
    /// iPXE make a machine known.
    pub fn dhcp(
        &mut self,
        mac: Mac,
        step: DhcpStep,
        link: Option<Ipv4Addr>,
        problem: Option<String>,
        now_ms: u64,
    ) -> Option<Reached> {
        let begins = step.asked == Msg::Discover && step.client == DhcpClient::Firmware;
        let creates = step.client != DhcpClient::Os;
        let stage = match step.client {
            DhcpClient::Firmware => Some(Stage::Dhcp),
            DhcpClient::Ipxe => Some(Stage::IpxeDhcp),
            DhcpClient::Os => None,
        };
        let completes = step.completes;
        let nak = (step.answered == Some(Msg::Nak))
            .then(|| format!("DHCP: {:?} answered with NAK", step.asked));
        let reached = self.change(mac, now_ms, begins, creates, |boot| {
            if let Some(p) = problem.or(nak) {
                boot.set_problem(Some(p));
            }
            boot.push(now_ms, What::Dhcp(step));
            let stage = stage.filter(|_| completes)?;
            // iPXE's DHCP after a boot file we never saw (served elsewhere,
            // or before a restart) still counts as iPXE's.
            boot.reach(stage, now_ms)
                .map(|seconds| Reached { stage, seconds })
        })?;
        if let Some(address) = link {
            self.link(mac, address);
        }
        reached
    }

    /// Replies the kernel sent for `mac` from its templates.
    pub fn kernel_answered(&mut self, mac: Mac, port: u16, count: u64, now_ms: u64) {
        self.change(mac, now_ms, false, false, |boot| {
            boot.push(now_ms, What::KernelAnswered { port, count });
        });
    }

    /// A TFTP file served (or refused) to `mac`, a machine already known.
    pub fn tftp(&mut self, mac: Mac, mut file: TftpFile, now_ms: u64) -> Option<Reached> {
        if file.path.len() > MAX_TEXT {
            file.path = capped(&file.path).into();
        }
        file.end = match file.end {
            TftpEnd::ClientError { code, message } => TftpEnd::ClientError {
                code,
                message: capped(&message),
            },
            TftpEnd::Refused { why } => TftpEnd::Refused { why: capped(&why) },
            end => end,
        };
        self.change(mac, now_ms, false, false, |boot| {
            let completed = file.end == TftpEnd::Completed;
            let path = file.path.to_string();
            if let Some(p) = file.problem() {
                boot.set_problem(Some(p));
            }
            boot.push(now_ms, What::Tftp(Box::new(file)));
            if !completed {
                return None;
            }
            Self::file_done(boot, &path, now_ms)
        })
        .flatten()
    }

    /// An HTTP request answered for `mac`, a machine already known;
    /// `script_files`: for a script, the files it names from this server.
    pub fn http(
        &mut self,
        mac: Mac,
        mut file: HttpFile,
        script_files: Vec<String>,
        now_ms: u64,
    ) -> Option<Reached> {
        file.path = capped(&file.path);
        self.change(mac, now_ms, false, false, |boot| {
            if let Some(p) = file.problem() {
                boot.set_problem(Some(p));
            }
            let done = file.status == 200 && file.complete;
            let (route, path) = (file.route, file.path.clone());
            boot.push(now_ms, What::Http(Box::new(file)));
            match route {
                Route::Script if done => {
                    let files = script_files
                        .iter()
                        .take(EVENTS_PER_BOOT)
                        .map(|f| capped(f).into())
                        .collect();
                    boot.set_outstanding(files);
                    boot.reach(Stage::Script, now_ms).map(|seconds| Reached {
                        stage: Stage::Script,
                        seconds,
                    })
                }
                Route::File if done => Self::file_done(boot, &path, now_ms),
                _ => None,
            }
        })
        .flatten()
    }

    /// The installer said `mac`, a machine already known, is done.
    pub fn provisioned(&mut self, mac: Mac, now_ms: u64) -> Option<Reached> {
        self.change(mac, now_ms, false, false, |boot| {
            boot.push(now_ms, What::Provisioned);
            boot.reach(Stage::Provisioned, now_ms)
                .map(|seconds| Reached {
                    stage: Stage::Provisioned,
                    seconds,
                })
        })
        .flatten()
    }

    /// A file fully downloaded: the NBP before the script, one of the
    /// script's files after it.
    fn file_done(boot: &mut Boot, path: &str, now_ms: u64) -> Option<Reached> {
        let stage = if boot.reached(Stage::Script).is_none() {
            Stage::Nbp
        } else {
            let path = path.trim_start_matches('/');
            let left: Vec<Box<str>> = boot
                .outstanding
                .iter()
                .filter(|o| o.trim_start_matches('/') != path)
                .cloned()
                .collect();
            if boot.outstanding.is_empty() || left.len() == boot.outstanding.len() {
                return None;
            }
            let last = left.is_empty();
            boot.set_outstanding(left);
            if !last {
                return None;
            }
            Stage::Os
        };
        if stage == Stage::Nbp && boot.reached(Stage::IpxeDhcp).is_some() {
            return None; // iPXE fetching something before its script
        }
        boot.reach(stage, now_ms)
            .map(|seconds| Reached { stage, seconds })
    }

    /// The boots of `mac`, oldest first.
    pub fn boots(&self, mac: Mac) -> Option<&VecDeque<Boot>> {
        self.machines.get(&mac).map(|m| &m.boots)
    }

    /// Every machine's latest boot that was active at or after `since_ms`.
    pub fn latest_since(&self, since_ms: u64) -> impl Iterator<Item = (Mac, &Boot)> {
        self.machines.iter().filter_map(move |(mac, m)| {
            let boot = m.boots.back()?;
            (boot.last_ms >= since_ms).then_some((*mac, boot))
        })
    }

    /// Machines per stage and failed, in one pass.
    pub fn summary(&self, now_ms: u64) -> Summary {
        let mut summary = Summary {
            machines: self.machines.len(),
            bytes: self.bytes,
            ..Summary::default()
        };
        for (_, boot) in self.latest_since(0) {
            summary.by_stage[boot.stage().index()] += 1;
            summary.failed += u64::from(boot.failure(now_ms).is_some());
        }
        summary
    }

    /// What the kept timelines take in memory, roughly: the structures,
    /// not the allocator's slack.
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    fn current(&mut self, mac: Mac) -> Option<&mut Boot> {
        self.machines.get_mut(&mac)?.boots.back_mut()
    }

    /// Applies `change` to the boot an event of `mac` belongs to, keeping
    /// the byte count and the bounds; `None` if `mac` is not known and the
    /// event may not make it known. A new boot begins when `begins` (a
    /// firmware DISCOVER) and the current one is past its boot file or has
    /// given up, or when the machine has none.
    fn change<T>(
        &mut self,
        mac: Mac,
        now_ms: u64,
        begins: bool,
        creates: bool,
        change: impl FnOnce(&mut Boot) -> T,
    ) -> Option<T> {
        if !self.machines.contains_key(&mac) {
            if !creates {
                return None;
            }
            self.make_room(MACHINE_BYTES);
            self.order.push_back(mac);
            self.machines.insert(mac, MachineBoots::default());
            self.bytes += MACHINE_BYTES;
        }
        let machine = self.machines.get_mut(&mac).expect("ensured above");
        let before: usize = machine.boots.iter().map(|b| b.bytes).sum();
        let new = match machine.boots.back() {
            None => true,
            // Past the boot file (whether or not its download was seen: a
            // later stage says it was done), or given up.
            Some(b) => {
                begins
                    && (b.stage() >= Stage::Nbp
                        || now_ms.saturating_sub(b.started_ms) > BOOT_GIVES_UP_MS)
            }
        };
        if new {
            if machine.boots.len() == BOOTS_PER_MACHINE {
                machine.boots.pop_front();
            }
            if let Some(previous) = machine.boots.back_mut() {
                previous.compact();
            }
            machine.boots.push_back(Boot::new(now_ms));
        }
        let boot = machine.boots.back_mut().expect("a boot was just ensured");
        let result = change(boot);
        let after: usize = machine.boots.iter().map(|b| b.bytes).sum();
        self.bytes = self.bytes + after - before;
        if self.bytes > self.max_bytes {
            self.make_room(0);
        }
        Some(result)
    }

    /// Ties `address` to `mac` alone: the machine's earlier address, and
    /// another machine's claim to this one, are let go.
    fn link(&mut self, mac: Mac, address: Ipv4Addr) {
        if address.is_unspecified() || !self.machines.contains_key(&mac) {
            return;
        }
        if let Some(previous) = self.by_address.insert(address, mac) {
            if previous != mac {
                if let Some(m) = self.machines.get_mut(&previous) {
                    m.address = None;
                }
            }
        }
        let machine = self.machines.get_mut(&mac).expect("checked above");
        if let Some(old) = machine.address.replace(address) {
            if old != address && self.by_address.get(&old) == Some(&mac) {
                self.by_address.remove(&old);
            }
        }
    }

    /// Forgets the longest-known machines until one more of `more` bytes
    /// fits both bounds (the machine being changed may go too, if it is
    /// the only one left).
    fn make_room(&mut self, more: usize) {
        while self.machines.len() >= self.max_machines
            || (self.bytes + more > self.max_bytes && !self.machines.is_empty())
        {
            let Some(oldest) = self.order.pop_front() else {
                return;
            };
            let Some(gone) = self.machines.remove(&oldest) else {
                continue;
            };
            self.bytes -= MACHINE_BYTES + gone.boots.iter().map(|b| b.bytes).sum::<usize>();
            if let Some(address) = gone.address {
                if self.by_address.get(&address) == Some(&oldest) {
                    self.by_address.remove(&address);
                }
            }
            if more == 0 && self.bytes <= self.max_bytes {
                return;
            }
        }
    }
}

/// The files an iPXE script fetches from `base` (this server's HTTP URL):
/// the paths of its `kernel`, `initrd`, `imgfetch`, `module` and `chain`
/// lines' URLs, without query strings.
pub fn script_files(script: &str, base: &str) -> Vec<String> {
    let prefix = format!("{}/", base.trim_end_matches('/'));
    script
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let command = words.next()?;
            if !matches!(
                command,
                "kernel" | "initrd" | "imgfetch" | "module" | "chain" | "imgexec" | "boot"
            ) {
                return None;
            }
            let url = words.find(|w| w.starts_with(&prefix))?;
            let path = url[prefix.len()..].split(['?', '#']).next()?;
            (!path.is_empty() && path != "boot.ipxe").then(|| path.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    fn step(asked: Msg, answered: Option<Msg>, ipxe: bool) -> DhcpStep {
        DhcpStep {
            port: 67,
            asked,
            answered,
            client: if ipxe {
                DhcpClient::Ipxe
            } else {
                DhcpClient::Firmware
            },
            address: (answered == Some(Msg::Ack)).then_some(IP),
            boot_file: answered.is_some(),
            completes: answered == Some(Msg::Ack),
        }
    }

    fn tftp(path: &str, end: TftpEnd, blocks: u64) -> TftpFile {
        TftpFile {
            path: path.into(),
            size: blocks * 1468,
            blksize: 1468,
            windowsize: 4,
            ms: 40,
            retransmits: 0,
            user_blocks: blocks,
            xdp_blocks: 0,
            tc_blocks: 0,
            end,
        }
    }

    fn http(route: Route, path: &str, status: u16) -> HttpFile {
        HttpFile {
            route,
            path: path.into(),
            status,
            bytes: 100,
            complete: true,
            ms: 3,
        }
    }

    /// A whole second-stage boot, one event per 100 ms.
    fn boot(t: &mut Timelines, start: u64) -> Vec<Reached> {
        let mut at = start;
        let mut next = || {
            at += 100;
            at
        };
        let mut reached = Vec::new();
        let dora = |t: &mut Timelines, ipxe: bool, at: u64| {
            let offer = t.dhcp(
                MAC,
                step(Msg::Discover, Some(Msg::Offer), ipxe),
                Some(IP),
                None,
                at,
            );
            let ack = t.dhcp(
                MAC,
                step(Msg::Request, Some(Msg::Ack), ipxe),
                Some(IP),
                None,
                at + 50,
            );
            offer.into_iter().chain(ack).collect::<Vec<_>>()
        };
        reached.extend(dora(t, false, next()));
        let probe = TftpEnd::ClientError {
            code: 8,
            message: "tsize".into(),
        };
        reached.extend(t.tftp(MAC, tftp("ipxe.efi", probe, 0), next()));
        assert_eq!(
            t.current(MAC).unwrap().failure(next()),
            None,
            "a size probe is no failure"
        );
        reached.extend(t.tftp(MAC, tftp("ipxe.efi", TftpEnd::Completed, 700), next()));
        reached.extend(dora(t, true, next()));
        let files = vec!["vmlinuz".to_owned(), "initrd.img".to_owned()];
        reached.extend(t.http(MAC, http(Route::Script, "/boot.ipxe", 200), files, next()));
        reached.extend(t.http(MAC, http(Route::File, "/vmlinuz", 200), vec![], next()));
        reached.extend(t.http(MAC, http(Route::File, "/initrd.img", 200), vec![], next()));
        reached.extend(t.provisioned(MAC, next()));
        reached
    }

    #[test]
    fn a_whole_boot_reaches_every_stage_in_order() {
        let mut t = Timelines::new(10, usize::MAX);
        let reached = boot(&mut t, 1_000_000);
        let stages: Vec<Stage> = reached.iter().map(|r| r.stage).collect();
        assert_eq!(stages, Stage::ALL[1..].to_vec());
        assert_eq!(reached[0].seconds, 0.05, "ACK 50 ms after power-on");
        assert_eq!(reached.last().unwrap().seconds, 0.8);
        let boots = t.boots(MAC).unwrap();
        assert_eq!(boots.len(), 1);
        assert_eq!(boots[0].stage(), Stage::Provisioned);
        assert_eq!(boots[0].events.len(), 10);
        assert_eq!(boots[0].failure(u64::MAX), None);
        assert_eq!(t.machine_at(IP), Some(MAC));
    }

    #[test]
    fn a_firmware_discover_after_the_boot_file_begins_a_new_boot_and_only_four_are_kept() {
        let mut t = Timelines::new(10, usize::MAX);
        for n in 0..6 {
            boot(&mut t, 10_000_000 * (n + 1));
        }
        let boots = t.boots(MAC).unwrap();
        assert_eq!(boots.len(), BOOTS_PER_MACHINE);
        assert_eq!(boots[0].started_ms, 30_000_000 + 100);
        // Retransmitted DISCOVERs before the boot file stay in one boot.
        let mut t = Timelines::new(10, usize::MAX);
        t.dhcp(
            MAC,
            step(Msg::Discover, Some(Msg::Offer), false),
            Some(IP),
            None,
            1000,
        );
        t.dhcp(
            MAC,
            step(Msg::Discover, Some(Msg::Offer), false),
            Some(IP),
            None,
            5000,
        );
        assert_eq!(t.boots(MAC).unwrap().len(), 1);
    }

    #[test]
    fn the_booted_os_asking_for_an_address_is_no_new_boot() {
        let mut t = Timelines::new(10, usize::MAX);
        boot(&mut t, 1_000_000);
        let mut os = step(Msg::Discover, Some(Msg::Offer), false);
        os.client = DhcpClient::Os;
        assert_eq!(t.dhcp(MAC, os, Some(IP), None, 2_000_000), None);
        let boots = t.boots(MAC).unwrap();
        assert_eq!(boots.len(), 1);
        assert_eq!(boots[0].events.len(), 11);
    }

    #[test]
    fn what_went_wrong_is_the_failure_until_the_boot_moves_on() {
        let mut t = Timelines::new(10, usize::MAX);
        t.dhcp(
            MAC,
            step(Msg::Discover, Some(Msg::Offer), false),
            Some(IP),
            None,
            1000,
        );
        assert_eq!(t.current(MAC).unwrap().failure(2000), None);
        assert_eq!(
            t.current(MAC)
                .unwrap()
                .failure(1000 + OFFER_UNANSWERED_MS)
                .as_deref(),
            Some("offered an address, no REQUEST followed")
        );
        let mut t2 = Timelines::new(10, usize::MAX);
        let mut local = step(Msg::Discover, Some(Msg::Offer), false);
        local.boot_file = false;
        t2.dhcp(MAC, local, Some(IP), None, 1000);
        assert_eq!(
            t2.current(MAC).unwrap().failure(1000 + OFFER_UNANSWERED_MS),
            None,
            "no boot file: the firmware went on to its disk, as told"
        );
        t.dhcp(
            MAC,
            step(Msg::Request, Some(Msg::Ack), false),
            Some(IP),
            None,
            2000,
        );
        let refused = TftpEnd::Refused {
            why: "file not found".into(),
        };
        t.tftp(MAC, tftp("missing.efi", refused, 0), 3000);
        assert_eq!(
            t.current(MAC).unwrap().failure(3000).as_deref(),
            Some("TFTP missing.efi: file not found")
        );
        t.tftp(MAC, tftp("ipxe.efi", TftpEnd::Completed, 10), 4000);
        assert_eq!(t.current(MAC).unwrap().failure(4000), None);
        t.http(MAC, http(Route::File, "/nope", 404), vec![], 5000);
        assert_eq!(
            t.current(MAC).unwrap().failure(5000).as_deref(),
            Some("HTTP 404 /nope")
        );
    }

    #[test]
    fn events_and_machines_are_bounded() {
        let mut t = Timelines::new(3, usize::MAX);
        for n in 0..(EVENTS_PER_BOOT as u64 + 10) {
            t.dhcp(
                MAC,
                step(Msg::Discover, Some(Msg::Offer), false),
                Some(IP),
                None,
                1000 + n,
            );
        }
        let boot = &t.boots(MAC).unwrap()[0];
        assert_eq!(boot.events.len(), EVENTS_PER_BOOT);
        assert_eq!(boot.events_dropped, 10);
        for n in 2..=5u8 {
            let mac = Mac([2, 0, 0, 0, 0, n]);
            t.dhcp(
                mac,
                step(Msg::Request, Some(Msg::Ack), false),
                Some(IP),
                None,
                1000,
            );
        }
        assert_eq!(t.machines(), 3);
        assert!(
            t.boots(MAC).is_none(),
            "the longest-known machine is forgotten first"
        );
        assert_eq!(
            t.by_address.len(),
            1,
            "only live machines keep an address link"
        );
    }

    #[test]
    fn a_hundred_thousand_machines_with_four_boots_each_fit_the_stated_budget() {
        let mut t = Timelines::new(100_000, usize::MAX);
        for n in 0..100_000u32 {
            let [_, a, b, c] = n.to_be_bytes();
            let mac = Mac([2, 0, 0, a, b, c]);
            let ip = Ipv4Addr::new(10, a, b, c);
            for k in 0..BOOTS_PER_MACHINE as u64 {
                let at = 1_000_000 * (k + 1);
                t.dhcp(
                    mac,
                    step(Msg::Discover, Some(Msg::Offer), false),
                    Some(ip),
                    None,
                    at,
                );
                t.dhcp(
                    mac,
                    step(Msg::Request, Some(Msg::Ack), false),
                    Some(ip),
                    None,
                    at + 1,
                );
                t.tftp(mac, tftp("ipxe.efi", TftpEnd::Completed, 700), at + 2);
                t.dhcp(
                    mac,
                    step(Msg::Discover, Some(Msg::Offer), true),
                    Some(ip),
                    None,
                    at + 3,
                );
                t.dhcp(
                    mac,
                    step(Msg::Request, Some(Msg::Ack), true),
                    Some(ip),
                    None,
                    at + 4,
                );
                let files = vec!["vmlinuz".to_owned(), "initrd.img".to_owned()];
                t.http(mac, http(Route::Script, "/boot.ipxe", 200), files, at + 5);
                t.http(mac, http(Route::File, "/vmlinuz", 200), vec![], at + 6);
                t.http(mac, http(Route::File, "/initrd.img", 200), vec![], at + 7);
            }
        }
        let mib = t.approx_bytes() as f64 / (1 << 20) as f64;
        // docs/OBSERVABILITY.md states this figure.
        eprintln!("100,000 machines × {BOOTS_PER_MACHINE} boots: {mib:.0} MiB");
        assert!(
            mib < 128.0,
            "{mib:.0} MiB, over the 128 MiB docs/OBSERVABILITY.md states"
        );
    }

    #[test]
    fn the_byte_budget_forgets_the_longest_known_machines_and_text_is_capped() {
        let mut t = Timelines::new(1000, 64 * 1024);
        for n in 0..200u8 {
            let mac = Mac([2, 0, 0, 0, 1, n]);
            t.dhcp(
                mac,
                step(Msg::Request, Some(Msg::Ack), false),
                None,
                None,
                1000,
            );
            let long = format!("/{}", "x".repeat(10_000));
            t.http(mac, http(Route::File, &long, 404), vec![], 1001);
        }
        assert!(t.approx_bytes() <= 64 * 1024, "{}", t.approx_bytes());
        assert!(t.machines() < 200 && t.machines() > 10, "{}", t.machines());
        assert!(t.knows(Mac([2, 0, 0, 0, 1, 199])), "the newest stay");
        let boot = t.boots(Mac([2, 0, 0, 0, 1, 199])).unwrap().back().unwrap();
        let failure = boot.failure(1001).unwrap();
        assert!(failure.len() < MAX_TEXT + 16, "{}", failure.len());
        // Forgetting every machine leaves exactly nothing counted.
        let mut t = Timelines::new(1, usize::MAX);
        t.dhcp(
            MAC,
            step(Msg::Request, Some(Msg::Ack), false),
            Some(IP),
            None,
            1,
        );
        let other = Mac([2, 0, 0, 0, 0, 9]);
        t.dhcp(
            other,
            step(Msg::Request, Some(Msg::Ack), false),
            None,
            None,
            2,
        );
        assert_eq!(t.machines(), 1);
        let one = t.approx_bytes();
        t.dhcp(
            MAC,
            step(Msg::Request, Some(Msg::Ack), false),
            None,
            None,
            3,
        );
        assert_eq!(t.approx_bytes(), one, "one machine for another");
        assert_eq!(
            t.machine_at(IP),
            None,
            "the forgotten machine's address goes with it"
        );
    }

    #[test]
    fn only_dhcp_makes_a_machine_known_and_an_address_belongs_to_one() {
        let mut t = Timelines::new(10, usize::MAX);
        let stranger = Mac([2, 0, 0, 0, 0, 7]);
        assert_eq!(
            t.http(stranger, http(Route::Script, "/boot.ipxe", 200), vec![], 1),
            None
        );
        assert_eq!(t.provisioned(stranger, 1), None);
        let mut os = step(Msg::Discover, Some(Msg::Offer), false);
        os.client = DhcpClient::Os;
        t.dhcp(stranger, os, None, None, 1);
        assert!(!t.knows(stranger), "neither a file nor the OS's DHCP");
        let other = Mac([2, 0, 0, 0, 0, 8]);
        t.dhcp(
            MAC,
            step(Msg::Request, Some(Msg::Ack), false),
            Some(IP),
            None,
            1,
        );
        t.dhcp(
            other,
            step(Msg::Request, Some(Msg::Ack), false),
            Some(IP),
            None,
            2,
        );
        assert_eq!(t.machine_at(IP), Some(other), "the address moved");
        let next = Ipv4Addr::new(10, 0, 0, 51);
        t.dhcp(
            other,
            step(Msg::Request, Some(Msg::Ack), false),
            Some(next),
            None,
            3,
        );
        assert_eq!(t.machine_at(IP), None, "its earlier address is let go");
        assert_eq!(t.by_address.len(), 1);
    }

    #[test]
    fn the_script_files_are_the_urls_on_this_server() {
        let script = "#!ipxe\nkernel http://10.0.0.1:8080/linux/vmlinuz console=ttyS0 \
                      pxed.done=http://10.0.0.1:8080/api/v1/machines/x/provisioned\n\
                      initrd http://10.0.0.1:8080/linux/initrd.img?v=2\n\
                      initrd http://mirror.example/other.img\nboot\n";
        assert_eq!(
            script_files(script, "http://10.0.0.1:8080"),
            vec!["linux/vmlinuz".to_owned(), "linux/initrd.img".to_owned()]
        );
    }
}
