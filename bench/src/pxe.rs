//! Simulated machines booting the way firmware does: DHCP with PXE options,
//! the network boot program over TFTP, then (with `--second-stage`) iPXE:
//! DHCP again with user class `iPXE`, its script over HTTP, and the kernel and
//! initrd the script names. Every byte is checked against `--verify-root`.
//!
//! With `--reimage PROFILE`, the reimaging workflow of an operator API
//! (pxed's): one bulk call puts every machine on PROFILE before they power
//! on; each boots it through iPXE, then does what its installer would when
//! done: POSTs to the `pxed.done=URL` its kernel command line names, with
//! its `pxed.token=TOKEN` as bearer token. Then it powers on again, as
//! firmware, and must be given an address but no boot file.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use pxe_lab::client as lab;

use crate::{
    dhcp::{self, DhcpWire, Identity},
    progress::Progress,
    report, tftp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// UEFI (EDK2): arch 7, blksize 1468, windowsize 4, 4 s timeouts.
    Uefi,
    /// Legacy BIOS PXE ROM: arch 0, blksize 1432, lockstep.
    Bios,
}

impl Firmware {
    /// The client behaviour this firmware stands for.
    pub fn profile(self) -> lab::Firmware {
        match self {
            Self::Uefi => lab::Firmware::Edk2,
            Self::Bios => lab::Firmware::LegacyRom,
        }
    }

    /// Simulated machine number `n` with this firmware: its DHCP identity and
    /// the xid of its first exchange (low byte 0, free for later exchanges).
    /// The MAC's last three bytes are `mac_prefix` plus `n`, so runs with
    /// different prefixes stay apart up to 65,536 machines.
    pub fn machine(self, mac_prefix: u8, n: usize) -> (Identity, u32) {
        let id = (usize::from(mac_prefix) << 16).wrapping_add(n);
        let mac = [
            0x52,
            0x54,
            0x00,
            (id >> 16) as u8,
            (id >> 8) as u8,
            id as u8,
        ];
        let uuid = [
            mac[3], mac[4], mac[5], 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
            0xbb, 0xcc, 0xdd,
        ];
        let identity = self.profile().identity(mac, uuid);
        (identity, u32::from_be_bytes([mac[3], mac[4], mac[5], 0]))
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface of the client network the machines boot on (a namespace's).
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// Number of machines (all powered on at once unless --ramp-ms or
    /// --power-on says otherwise).
    #[arg(long, default_value_t = 100, conflicts_with = "power_on")]
    clients: usize,
    /// Firmware the machines behave like.
    #[arg(long, value_enum, default_value_t = Firmware::Uefi)]
    firmware: Firmware,
    /// After the NBP, boot on as iPXE: DHCP again, script, kernel and initrd over HTTP.
    #[arg(long)]
    second_stage: bool,
    /// Reimage every machine with this profile: one bulk API call first; each
    /// machine then boots (as with --second-stage), marks itself provisioned
    /// with the URL and token of its kernel command line (`pxed.done=`,
    /// `pxed.token=`), and on its next power-on must get no boot file.
    #[arg(long, value_name = "PROFILE", requires = "api")]
    reimage: Option<String>,
    /// Base URL of the operator API for --reimage, e.g. http://127.0.0.1:8067.
    #[arg(long, value_name = "URL", requires = "api_token_file")]
    api: Option<String>,
    /// File holding the operator API's bearer token.
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// Local copy of the server's boot root: every file received is compared with it.
    #[arg(long, value_name = "DIR")]
    verify_root: Option<PathBuf>,
    /// Start one machine every this many milliseconds (0: all at once, a
    /// power-on storm); within each --power-on wave when both are given.
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// Power-on schedule as waves COUNT@SECONDS, comma-separated: e.g.
    /// `400@0,400@20,1200@45` is two racks of 400 twenty seconds apart, then
    /// a row of 1200 at 45 s (as a PDU sequencer or a data hall coming back
    /// does). Replaces --clients.
    #[arg(long, value_name = "WAVES", value_parser = parse_power_on)]
    power_on: Option<PowerOn>,
    /// First byte of the simulated MACs' last three (to keep runs apart).
    #[arg(long, default_value_t = 0x10)]
    mac_prefix: u8,
    /// Boot attempts per machine: after a failed one the machine powers
    /// on again and starts over from DHCP, as firmware's boot manager
    /// retries a network boot (1: a failure is final). A server killed
    /// mid-run fails the boots it was serving; retries show whether the
    /// others take them over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    boot_attempts: u32,
    /// Give up on the run after this many seconds.
    #[arg(long, default_value_t = 300)]
    time_limit: u64,
    /// Print each stage's time for the first N machines.
    #[arg(long, default_value_t = 0)]
    timeline: usize,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw completions and goodput over time as an SVG to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Waves of machines: (count, seconds after the start).
#[derive(Clone, Debug, PartialEq)]
pub struct PowerOn(Vec<(usize, f64)>);

fn parse_power_on(spec: &str) -> Result<PowerOn, String> {
    let mut waves = Vec::new();
    for wave in spec.split(',').map(str::trim) {
        let (count, at) = wave
            .split_once('@')
            .ok_or_else(|| format!("{wave:?}: a wave is COUNT@SECONDS, e.g. 400@20"))?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| format!("{wave:?}: {count:?} is not a machine count"))?;
        let at: f64 = at
            .trim()
            .parse()
            .map_err(|_| format!("{wave:?}: {at:?} is not a number of seconds"))?;
        if count == 0 || !at.is_finite() || at < 0.0 {
            return Err(format!(
                "{wave:?}: a wave needs at least one machine and a time of 0 s or later"
            ));
        }
        waves.push((count, at));
    }
    Ok(PowerOn(waves))
}

/// When each machine powers on, from the start of the run, in machine order.
fn power_on_times(args: &Args) -> Vec<Duration> {
    let ramp = Duration::from_millis(args.ramp_ms);
    let waves = match &args.power_on {
        Some(PowerOn(waves)) => waves.clone(),
        None => vec![(args.clients, 0.0)],
    };
    let mut times: Vec<Duration> = waves
        .iter()
        .flat_map(|&(count, at)| {
            (0..count).map(move |i| Duration::from_secs_f64(at) + ramp * i as u32)
        })
        .collect();
    times.sort();
    times
}

/// What happened to one machine.
#[derive(Debug, Default, Serialize)]
pub struct MachineResult {
    pub mac: String,
    /// When the machine powered on, in ms since the run started.
    pub powered_on_ms: f64,
    pub address: Option<Ipv4Addr>,
    /// The DHCP server (server identifier) of the boot that counted.
    pub server: Option<Ipv4Addr>,
    /// Boot attempts made (more than 1 only with --boot-attempts).
    pub attempts: u32,
    /// Why each earlier attempt failed.
    pub retried_after: Vec<String>,
    /// Stages in boot order, each with the milliseconds from power-on to its end.
    pub stages: Vec<(&'static str, f64)>,
    pub bytes: u64,
    pub dhcp_retransmits: u32,
    /// NAKs that sent this machine back to DISCOVER.
    pub dhcp_naks: u32,
    pub tftp_retransmits: u64,
    /// With --reimage: the server accepted this machine's `provisioned` call.
    pub provisioned: bool,
    /// With --reimage: the boot file its next power-on was offered (none is right).
    pub second_boot_file: Option<String>,
    pub failure: Option<String>,
}

impl MachineResult {
    fn add_dhcp(&mut self, tally: dhcp::Tally) {
        self.dhcp_retransmits += tally.retransmits;
        self.dhcp_naks += tally.naks;
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub firmware: Firmware,
    pub second_stage: bool,
    pub booted: usize,
    pub failed: usize,
    /// Machines that needed more than one boot attempt (--boot-attempts).
    pub retried: usize,
    pub seconds: f64,
    pub goodput_mb_per_s: f64,
    /// Stages in boot order with (p50, p99, max) of the time from power-on to
    /// the stage's end, ms.
    pub stage_ms: Vec<(&'static str, (f64, f64, f64))>,
    pub dhcp_retransmits: u64,
    pub dhcp_naks: u64,
    pub tftp_retransmits: u64,
    pub failures: BTreeMap<String, usize>,
    pub cpu: pxe_lab::cpu::CpuUsage,
    pub machines: Vec<MachineResult>,
}

/// What the reimaging workflow (--reimage) did, next to the [`Report`].
#[derive(Debug, Serialize)]
pub struct Reimage {
    pub profile: String,
    /// Machines the bulk call said it changed.
    pub bulk_changed: u64,
    /// How long the bulk call took to return, ms.
    pub bulk_ms: f64,
    /// Machines whose `provisioned` call the server accepted.
    pub provisioned: usize,
    /// Machines whose next power-on got an address.
    pub second_boot_answered: usize,
    /// Machines whose next power-on was still offered a boot file (want 0).
    pub second_boot_boot_files: usize,
}

/// The JSON report: the run's, and the workflow's when there was one.
#[derive(Serialize)]
struct Written<'a> {
    #[serde(flatten)]
    report: &'a Report,
    reimage: Option<&'a Reimage>,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (report, reimage) = runtime.block_on(run_machines(&args))?;
    print_report(&report, args.timeline);
    if let Some(r) = &reimage {
        println!(
            "  reimage {:?}: bulk call changed {} machines in {:.1} ms; provisioned {}; \
             second power-on: {} answered, {} given a boot file",
            r.profile,
            r.bulk_changed,
            r.bulk_ms,
            r.provisioned,
            r.second_boot_answered,
            r.second_boot_boot_files
        );
    }
    if let Some(path) = &args.json {
        let written = Written {
            report: &report,
            reimage: reimage.as_ref(),
        };
        std::fs::write(path, serde_json::to_vec_pretty(&written)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, crate::plot::svg(&report)?)?;
    }
    Ok(report.failed == 0)
}

/// The operator API's base URL and bearer token.
struct Api {
    base: String,
    token: String,
}

impl Api {
    fn from_args(args: &Args) -> anyhow::Result<Option<Self>> {
        let (Some(base), Some(file)) = (&args.api, &args.api_token_file) else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--api-token-file {}: {e}", file.display()))?;
        Ok(Some(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
        }))
    }

    /// `POST /api/v1/machines:bulk`: every MAC onto `profile`, netbooting.
    /// Returns how many machines the server changed.
    async fn bulk_profile(
        &self,
        http: &reqwest::Client,
        macs: &[String],
        profile: &str,
    ) -> anyhow::Result<u64> {
        let body = serde_json::json!({"macs": macs, "set": {"profile": profile, "netboot": true}});
        let url = format!("{}/api/v1/machines:bulk", self.base);
        let answer = http
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&body)?)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("{url}: {status}: {text}");
        }
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{url}: the answer is not JSON ({e}): {text}"))?;
        value["changed"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("{url}: no \"changed\" count in {text}"))
    }
}

/// A failed request and what lay under it: reqwest's own message repeats
/// the URL and says only that sending failed, not why.
fn with_causes(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn run_machines(args: &Args) -> anyhow::Result<(Report, Option<Reimage>)> {
    let wire = DhcpWire::bind(&args.interface)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let schedule = power_on_times(args);
    let total = schedule.len();
    if total > 0xff_ffff {
        anyhow::bail!("{total} machines: the simulated MACs have room for 16,777,215");
    }
    // The operator's one call before the machines power on.
    let bulk = match (&args.reimage, Api::from_args(args)?) {
        (Some(profile), Some(api)) => {
            let macs: Vec<String> = (0..total)
                .map(|n| mac_text(args.firmware.machine(args.mac_prefix, n).0.mac))
                .collect();
            let called = Instant::now();
            let changed = api.bulk_profile(&http, &macs, profile).await?;
            Some((
                profile.clone(),
                changed,
                called.elapsed().as_secs_f64() * 1000.0,
            ))
        }
        _ => None,
    };
    let meter = pxe_lab::cpu::CpuMeter::start(pxe_lab::cpu::LoadGenerator::ThisProcess);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.time_limit);
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let progress = {
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        Progress::start(total as u64, move || {
            let (d, f) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
            let text = format!(
                "{d}/{total} booted, {f} failed, {:.0} s",
                started.elapsed().as_secs_f64()
            );
            ((d + f) as u64, text)
        })
    };
    let mut tasks = Vec::with_capacity(total);
    for (n, at) in schedule.into_iter().enumerate() {
        tokio::time::sleep_until((started + at).into()).await;
        let (identity, xid) = args.firmware.machine(args.mac_prefix, n);
        let machine = Machine {
            identity,
            xid,
            firmware: args.firmware,
            attempts: args.boot_attempts,
            second_stage: args.second_stage || args.reimage.is_some(),
            reimage: args.reimage.is_some(),
            verify_root: args.verify_root.clone(),
            deadline,
        };
        let (wire, http, done, failed) = (
            Arc::clone(&wire),
            http.clone(),
            Arc::clone(&done),
            Arc::clone(&failed),
        );
        let powered_on_ms = started.elapsed().as_secs_f64() * 1000.0;
        tasks.push(tokio::spawn(async move {
            let mut result = machine.boot(&wire, &http).await;
            result.powered_on_ms = powered_on_ms;
            if result.failure.is_some() {
                &failed
            } else {
                &done
            }
            .fetch_add(1, Ordering::Relaxed);
            result
        }));
    }
    let mut machines = Vec::with_capacity(tasks.len());
    for task in tasks {
        machines.push(task.await?);
    }
    progress.finish();
    let reimage = bulk.map(|(profile, bulk_changed, bulk_ms)| Reimage {
        profile,
        bulk_changed,
        bulk_ms,
        provisioned: machines.iter().filter(|m| m.provisioned).count(),
        second_boot_answered: machines
            .iter()
            .filter(|m| m.stages.iter().any(|(s, _)| *s == "second_dhcp"))
            .count(),
        second_boot_boot_files: machines
            .iter()
            .filter(|m| m.second_boot_file.is_some())
            .count(),
    });
    let report = summarise(
        args,
        machines,
        started.elapsed().as_secs_f64(),
        meter.stop(),
    );
    Ok((report, reimage))
}

struct Machine {
    identity: Identity,
    xid: u32,
    /// Boot attempts allowed (see --boot-attempts).
    attempts: u32,
    firmware: Firmware,
    second_stage: bool,
    /// Mark itself provisioned once booted, then power on again.
    reimage: bool,
    verify_root: Option<PathBuf>,
    deadline: Instant,
}

impl Machine {
    async fn boot(self, wire: &DhcpWire, http: &reqwest::Client) -> MachineResult {
        let t0 = Instant::now();
        let mut result = MachineResult {
            mac: mac_text(self.identity.mac),
            ..MachineResult::default()
        };
        for attempt in 1..=self.attempts {
            result.attempts = attempt;
            // Each power-on is a new exchange: a new xid, as firmware picks.
            let xid = self.xid.wrapping_add((attempt - 1) << 2);
            let mut this = MachineResult {
                mac: result.mac.clone(),
                ..MachineResult::default()
            };
            match self.stages(wire, http, t0, xid, &mut this).await {
                Ok(()) => {
                    this.attempts = attempt;
                    this.retried_after = std::mem::take(&mut result.retried_after);
                    return this;
                }
                Err(e) if attempt < self.attempts && Instant::now() < self.deadline => {
                    result.retried_after.push(e);
                }
                Err(e) => {
                    this.attempts = attempt;
                    this.retried_after = std::mem::take(&mut result.retried_after);
                    this.failure = Some(e);
                    return this;
                }
            }
        }
        result
    }

    async fn stages(
        &self,
        wire: &DhcpWire,
        http: &reqwest::Client,
        t0: Instant,
        xid: u32,
        r: &mut MachineResult,
    ) -> Result<(), String> {
        let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1000.0;
        let firmware = self.firmware.profile();
        let (lease, tally) = dhcp::dora(wire, &self.identity, xid, firmware.dhcp_schedule()).await;
        r.add_dhcp(tally);
        let lease = lease.map_err(|e| format!("dhcp: {e}"))?;
        r.address = Some(lease.address);
        r.server = Some(lease.server);
        r.stages.push(("dhcp", ms(t0)));
        let nbp = lease
            .boot_file
            .clone()
            .ok_or("dhcp: no boot file offered")?;

        let expected = self.expected_opt(&nbp)?;
        let server = SocketAddr::from((lease.next_server, 69));
        let tftp = firmware.tftp();
        let (retrans, bytes) =
            tftp::download(server, &nbp, &tftp, self.deadline, expected.as_deref())
                .await
                .map_err(|e| format!("nbp: {e}"))?;
        r.tftp_retransmits += retrans;
        r.bytes += bytes;
        r.stages.push(("nbp", ms(t0)));
        if !self.second_stage {
            return Ok(());
        }

        // iPXE: DHCP again, now saying who it is; it retries fast.
        let ipxe = self.identity.as_ipxe();
        let schedule = lab::Firmware::Ipxe.dhcp_schedule();
        let (lease, tally) = dhcp::dora(wire, &ipxe, xid | 1, schedule).await;
        r.add_dhcp(tally);
        let lease = lease.map_err(|e| format!("ipxe dhcp: {e}"))?;
        r.stages.push(("ipxe_dhcp", ms(t0)));
        let script_url = lease.boot_file.ok_or("ipxe dhcp: no script URL offered")?;
        let script = http
            .get(&script_url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("script: {e}"))?;
        let script = script.text().await.map_err(|e| format!("script: {e}"))?;
        if !script.starts_with("#!ipxe") {
            return Err(format!(
                "script: not an iPXE script: {:?}",
                script.lines().next()
            ));
        }
        r.stages.push(("script", ms(t0)));
        for url in script_urls(&script) {
            let body = http
                .get(&url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("os: {url}: {}", with_causes(e)))?;
            let body = body
                .bytes()
                .await
                .map_err(|e| format!("os: {url}: {}", with_causes(e)))?;
            let path = url.splitn(4, '/').nth(3).unwrap_or_default();
            let path = path.split('?').next().unwrap_or_default();
            if let Some(want) = self.expected_opt(path)? {
                if body.as_ref() != want.as_slice() {
                    return Err(format!(
                        "os: {url}: {} bytes differ from the expected file",
                        body.len()
                    ));
                }
            }
            r.bytes += body.len() as u64;
        }
        r.stages.push(("os", ms(t0)));
        if !self.reimage {
            return Ok(());
        }

        // The installer is done: it marks its machine with the URL and token
        // its command line carries, and the machine powers off.
        let (done_url, token) = provision_args(&script).ok_or(
            "provision: the script's kernel line has no pxed.done=URL and pxed.token=TOKEN",
        )?;
        let answer = http
            .post(&done_url)
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("provision: {done_url}: {}", with_causes(e)))?;
        let status = answer.status();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            return Err(format!("provision: {done_url}: {status}: {}", text.trim()));
        }
        r.provisioned = true;
        r.stages.push(("provisioned", ms(t0)));

        // Powered on again: the firmware's DHCP, answered with an address
        // and, for a provisioned machine, no boot file.
        let (lease, tally) =
            dhcp::dora(wire, &self.identity, xid | 2, firmware.dhcp_schedule()).await;
        r.add_dhcp(tally);
        let lease = lease.map_err(|e| format!("second boot dhcp: {e}"))?;
        r.stages.push(("second_dhcp", ms(t0)));
        if let Some(file) = lease.boot_file {
            let failure = format!("second boot: still offered a boot file ({file})");
            r.second_boot_file = Some(file);
            return Err(failure);
        }
        Ok(())
    }

    /// The expected contents of `path` in the boot root (`None`: not verified).
    fn expected_opt(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        let Some(root) = &self.verify_root else {
            return Ok(None);
        };
        let local = root.join(path.trim_start_matches('/'));
        std::fs::read(&local)
            .map(Some)
            .map_err(|e| format!("verify: {}: {e}", local.display()))
    }
}

/// URLs of `kernel` and `initrd` lines in an iPXE script.
fn script_urls(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match words.next()? {
                "kernel" | "initrd" | "chain" | "imgfetch" => {
                    words.find(|w| w.starts_with("http://")).map(str::to_owned)
                }
                _ => None,
            }
        })
        .collect()
}

/// The installer's `pxed.done=URL` and `pxed.token=TOKEN` from the script's
/// kernel line (the convention the lab's initramfs follows too).
fn provision_args(script: &str) -> Option<(String, String)> {
    let kernel = script
        .lines()
        .find(|l| l.split_whitespace().next() == Some("kernel"))?;
    let word = |prefix: &str| {
        kernel
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Some((word("pxed.done=")?, word("pxed.token=")?))
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn summarise(
    args: &Args,
    machines: Vec<MachineResult>,
    seconds: f64,
    cpu: pxe_lab::cpu::CpuUsage,
) -> Report {
    let mut stage_ms = Vec::new();
    for stage in [
        "dhcp",
        "nbp",
        "ipxe_dhcp",
        "script",
        "os",
        "provisioned",
        "second_dhcp",
    ] {
        let mut times = report::Latencies::default();
        machines
            .iter()
            .filter_map(|m| m.stages.iter().find(|(s, _)| *s == stage).map(|(_, t)| *t))
            .for_each(|ms| times.record_ms(ms));
        if times.is_empty() {
            continue;
        }
        let at = |p: f64| times.quantile_ms(p);
        stage_ms.push((stage, (at(0.5), at(0.99), at(1.0))));
    }
    let failures = report::by_reason(machines.iter().filter_map(|m| m.failure.as_deref()));
    let bytes: u64 = machines.iter().map(|m| m.bytes).sum();
    Report {
        clients: machines.len(),
        firmware: args.firmware,
        second_stage: args.second_stage,
        booted: machines.iter().filter(|m| m.failure.is_none()).count(),
        failed: machines.iter().filter(|m| m.failure.is_some()).count(),
        retried: machines.iter().filter(|m| m.attempts > 1).count(),
        seconds,
        goodput_mb_per_s: bytes as f64 / seconds.max(1e-9) / 1e6,
        stage_ms,
        dhcp_retransmits: machines.iter().map(|m| u64::from(m.dhcp_retransmits)).sum(),
        dhcp_naks: machines.iter().map(|m| u64::from(m.dhcp_naks)).sum(),
        tftp_retransmits: machines.iter().map(|m| m.tftp_retransmits).sum(),
        failures,
        cpu,
        machines,
    }
}

fn print_report(r: &Report, timeline: usize) {
    println!(
        "pxe: {} {:?} machines{}: {} booted, {} failed in {:.2} s; {:.1} MB/s; {} DHCP and {} TFTP client retransmissions; {} DHCP NAKs",
        r.clients,
        r.firmware,
        if r.second_stage { " with iPXE second stage" } else { "" },
        r.booted,
        r.failed,
        r.seconds,
        r.goodput_mb_per_s,
        r.dhcp_retransmits,
        r.tftp_retransmits,
        r.dhcp_naks
    );
    println!(
        "  {:<10} {:>10} {:>10} {:>10}   (ms from power-on to the end of the stage)",
        "stage", "p50", "p99", "max"
    );
    for (stage, (p50, p99, max)) in &r.stage_ms {
        println!("  {stage:<10} {p50:>10.1} {p99:>10.1} {max:>10.1}");
    }
    let bytes: u64 = r.machines.iter().map(|m| m.bytes).sum();
    println!("  {}", r.cpu.describe(bytes));
    for (reason, n) in &r.failures {
        println!("  failed ×{n}: {reason}");
    }
    if r.retried > 0 {
        let retries = report::by_reason(
            r.machines
                .iter()
                .flat_map(|m| m.retried_after.iter().map(String::as_str)),
        );
        println!(
            "  {} machines booted again after a failed attempt:",
            r.retried
        );
        for (reason, n) in &retries {
            println!("    ×{n}: {reason}");
        }
    }
    for m in r.machines.iter().take(timeline) {
        let stages: Vec<String> = m
            .stages
            .iter()
            .map(|(s, t)| format!("{s} {t:.0} ms"))
            .collect();
        println!(
            "  {} {}: {}{}",
            m.mac,
            m.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            stages.join(" → "),
            m.failure
                .as_ref()
                .map(|f| format!(" ✗ {f}"))
                .unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_on_waves_parse_and_unfold_into_times() {
        assert_eq!(
            parse_power_on("2@0, 1@1.5").unwrap(),
            PowerOn(vec![(2, 0.0), (1, 1.5)])
        );
        for bad in ["", "5", "x@1", "5@soon", "0@1", "5@-1"] {
            assert!(parse_power_on(bad).is_err(), "{bad:?}");
        }
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let args = |power_on: Option<PowerOn>, ramp_ms: u64| {
            let mut cli = <Cli as clap::Parser>::parse_from([
                "pxe",
                "--clients",
                "3",
                "--ramp-ms",
                &ramp_ms.to_string(),
            ]);
            cli.args.power_on = power_on;
            cli.args
        };
        let ms = |v: Vec<Duration>| v.into_iter().map(|d| d.as_millis()).collect::<Vec<_>>();
        assert_eq!(ms(power_on_times(&args(None, 0))), [0, 0, 0], "a storm");
        assert_eq!(ms(power_on_times(&args(None, 10))), [0, 10, 20], "a ramp");
        assert_eq!(
            ms(power_on_times(&args(
                Some(PowerOn(vec![(2, 1.0), (2, 0.0)])),
                5
            ))),
            [0, 5, 1000, 1005],
            "waves, ramped within"
        );
    }

    #[test]
    fn the_installers_url_and_token_come_from_the_kernel_line() {
        let script = "#!ipxe\nkernel http://198.18.0.1/vmlinuz initrd=initrd.img pxed.done=http://198.18.0.1/api/v1/machines/52:54:00:10:00:01/provisioned pxed.token=abc\ninitrd http://198.18.0.1/initrd.img\nboot\n";
        assert_eq!(
            provision_args(script),
            Some((
                "http://198.18.0.1/api/v1/machines/52:54:00:10:00:01/provisioned".into(),
                "abc".into()
            ))
        );
        // An empty token (pxed without its API renders none) is no token.
        let tokenless = "#!ipxe\nkernel http://s/vmlinuz pxed.done=http://s/x pxed.token=\nboot\n";
        assert_eq!(provision_args(tokenless), None);
        assert_eq!(provision_args("#!ipxe\nkernel http://s/vmlinuz\n"), None);
    }

    #[test]
    fn script_urls_are_the_kernel_and_initrd_lines() {
        let script = "#!ipxe\necho hi\nkernel http://198.18.0.1/vmlinuz initrd=initrd.img quiet\ninitrd http://198.18.0.1/initrd.img\nboot\n";
        assert_eq!(
            script_urls(script),
            vec!["http://198.18.0.1/vmlinuz", "http://198.18.0.1/initrd.img"]
        );
    }
}
