//! `bench dhcp`: DHCP alone, the way a rack leases and leases again. Every
//! machine powers on at once and runs DISCOVER/OFFER/REQUEST/ACK with its
//! firmware's PXE options, then `--repeats` more exchanges with the same
//! identity and a fresh xid, as a machine does when it reboots or its boot
//! program asks again. The first exchanges (the server decides a lease) and
//! the repeats (the lease is already decided) are reported apart: how long
//! the server took to OFFER and to ACK, percentiles, exchanges per second, and
//! the server's CPU when it runs on this machine.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    dhcp::{self, DhcpWire, Identity, Schedule},
    progress::Progress,
    pxe::Firmware,
    report,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Interface of the client network (a namespace's).
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// Number of machines, all powered on at once.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Exchanges each machine runs after its first one.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(0..=250))]
    repeats: u8,
    /// Firmware whose DHCP options the machines send.
    #[arg(long, value_enum, default_value_t = Firmware::Uefi)]
    firmware: Firmware,
    /// First byte of the simulated MACs' last three (to keep runs apart).
    #[arg(long, default_value_t = 0x10)]
    mac_prefix: u8,
    /// Give up on the run after this many seconds.
    #[arg(long, default_value_t = 120)]
    time_limit: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// p50, p90, p99 and the largest, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(durations: impl Iterator<Item = Duration>) -> Self {
        let latencies: report::Latencies = durations.collect();
        Self {
            p50: latencies.quantile_ms(0.5),
            p90: latencies.quantile_ms(0.9),
            p99: latencies.quantile_ms(0.99),
            max: latencies.max_ms(),
        }
    }
}

/// Completed exchanges of one kind.
#[derive(Debug, Default, Serialize)]
pub struct Latencies {
    pub exchanges: usize,
    /// DISCOVER to OFFER (the last DISCOVER sent, when it was resent).
    pub offer_ms: Percentiles,
    /// REQUEST to ACK.
    pub ack_ms: Percentiles,
    /// The whole exchange, retransmissions and NAKs included.
    pub dora_ms: Percentiles,
}

impl Latencies {
    fn of(samples: &[&Sample]) -> Self {
        let of = |f: fn(&Sample) -> Duration| Percentiles::of(samples.iter().map(|s| f(s)));
        Self {
            exchanges: samples.len(),
            offer_ms: of(|s| s.tally.offer_delay),
            ack_ms: of(|s| s.tally.ack_delay),
            dora_ms: of(|s| s.dora),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub clients: usize,
    pub repeats: u8,
    pub firmware: Firmware,
    /// Machines whose every exchange completed.
    pub leased: usize,
    /// Machines with an exchange that failed (their later ones are not run).
    pub failed: usize,
    pub seconds: f64,
    /// Completed exchanges per second of the run.
    pub exchanges_per_s: f64,
    pub first: Latencies,
    pub repeat: Latencies,
    pub retransmits: u64,
    pub naks: u64,
    pub failures: BTreeMap<String, usize>,
    pub cpu: pxe_lab::cpu::CpuUsage,
}

/// One completed exchange.
#[derive(Debug)]
struct Sample {
    first: bool,
    dora: Duration,
    tally: dhcp::Tally,
}

/// What one machine did.
#[derive(Debug, Default)]
struct MachineRun {
    samples: Vec<Sample>,
    retransmits: u32,
    naks: u32,
    failure: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_machines(&args))?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report.failed == 0)
}

async fn run_machines(args: &Args) -> anyhow::Result<Report> {
    if args.clients > 0xff_ffff {
        anyhow::bail!(
            "{} machines: the simulated MACs have room for 16,777,215",
            args.clients
        );
    }
    let wire = DhcpWire::bind(&args.interface)?;
    let meter = pxe_lab::cpu::CpuMeter::start(pxe_lab::cpu::LoadGenerator::ThisProcess);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + Duration::from_secs(args.time_limit));
    let exchanges = Arc::new(AtomicUsize::new(0));
    let progress = {
        let exchanges = Arc::clone(&exchanges);
        let total = args.clients * (usize::from(args.repeats) + 1);
        Progress::start(total as u64, move || {
            let done = exchanges.load(Ordering::Relaxed);
            let text = format!(
                "{done}/{total} exchanges, {:.0} s",
                started.elapsed().as_secs_f64()
            );
            (done as u64, text)
        })
    };
    // No wait for proxy offers: the first address offer is taken.
    let schedule = Schedule {
        offer_wait: Duration::ZERO,
        ..args.firmware.profile().dhcp_schedule()
    };
    let tasks: Vec<_> = (0..args.clients)
        .map(|n| {
            let (identity, xid) = args.firmware.machine(args.mac_prefix, n);
            let (wire, exchanges) = (Arc::clone(&wire), Arc::clone(&exchanges));
            let (repeats, schedule) = (args.repeats, schedule.clone());
            tokio::spawn(async move {
                let machine = (&identity, xid, &schedule);
                lease_again_and_again(&wire, machine, repeats, deadline, &exchanges).await
            })
        })
        .collect();
    let mut machines = Vec::with_capacity(tasks.len());
    for task in tasks {
        machines.push(task.await?);
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    Ok(summarise(args, &machines, seconds, meter.stop()))
}

/// One machine: its first exchange, then `repeats` more, each with the next xid.
async fn lease_again_and_again(
    wire: &DhcpWire,
    (identity, first_xid, schedule): (&Identity, u32, &Schedule),
    repeats: u8,
    deadline: tokio::time::Instant,
    exchanges: &AtomicUsize,
) -> MachineRun {
    let mut run = MachineRun::default();
    for round in 0..=repeats {
        let t0 = Instant::now();
        let exchange = dhcp::dora(
            wire,
            identity,
            first_xid | u32::from(round),
            schedule.clone(),
        );
        let Ok((lease, tally)) = tokio::time::timeout_at(deadline, exchange).await else {
            run.failure = Some("time limit: the exchange was still running".into());
            break;
        };
        run.retransmits += tally.retransmits;
        run.naks += tally.naks;
        if let Err(e) = lease {
            run.failure = Some(format!("dhcp: {e}"));
            break;
        }
        run.samples.push(Sample {
            first: round == 0,
            dora: t0.elapsed(),
            tally,
        });
        exchanges.fetch_add(1, Ordering::Relaxed);
    }
    run
}

fn summarise(
    args: &Args,
    machines: &[MachineRun],
    seconds: f64,
    cpu: pxe_lab::cpu::CpuUsage,
) -> Report {
    let samples: Vec<&Sample> = machines.iter().flat_map(|m| &m.samples).collect();
    let (first, repeat): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.first);
    Report {
        clients: args.clients,
        repeats: args.repeats,
        firmware: args.firmware,
        leased: machines.iter().filter(|m| m.failure.is_none()).count(),
        failed: machines.iter().filter(|m| m.failure.is_some()).count(),
        seconds,
        exchanges_per_s: samples.len() as f64 / seconds.max(1e-9),
        first: Latencies::of(&first),
        repeat: Latencies::of(&repeat),
        retransmits: machines.iter().map(|m| u64::from(m.retransmits)).sum(),
        naks: machines.iter().map(|m| u64::from(m.naks)).sum(),
        failures: report::by_reason(machines.iter().filter_map(|m| m.failure.as_deref())),
        cpu,
    }
}

fn print_report(r: &Report) {
    println!(
        "dhcp: {} {:?} machines × {} exchanges: {} leased every time, {} failed in {:.2} s; {:.0} exchanges/s; {} retransmissions, {} NAKs",
        r.clients,
        r.firmware,
        u32::from(r.repeats) + 1,
        r.leased,
        r.failed,
        r.seconds,
        r.exchanges_per_s,
        r.retransmits,
        r.naks
    );
    println!(
        "  {:<8} {:>9}  {:>29}  {:>29}",
        "", "exchanges", "OFFER ms p50 / p90 / p99 / max", "ACK ms p50 / p90 / p99 / max"
    );
    for (kind, l) in [("first", &r.first), ("repeat", &r.repeat)] {
        let p =
            |p: &Percentiles| format!("{:.2} / {:.2} / {:.2} / {:.1}", p.p50, p.p90, p.p99, p.max);
        println!(
            "  {kind:<8} {:>9}  {:>29}  {:>29}",
            l.exchanges,
            p(&l.offer_ms),
            p(&l.ack_ms)
        );
    }
    let acks = r.first.exchanges + r.repeat.exchanges;
    println!(
        "  CPU over {:.1} s: server {:.2} s ({} ACKs per server CPU-s), harness {:.2} s",
        r.cpu.seconds,
        r.cpu.server_s,
        per_cpu_second(acks, r.cpu.server_s),
        r.cpu.harness_s
    );
    for (reason, n) in &r.failures {
        println!("  failed ×{n}: {reason}");
    }
}

/// `count` per CPU-second, or "n/a" when the CPU time is under what the
/// tick-based accounting can measure (a rate over ~0 s says nothing).
fn per_cpu_second(count: usize, cpu_s: f64) -> String {
    if cpu_s < 0.05 {
        "n/a".to_owned()
    } else {
        format!("{:.0}", count as f64 / cpu_s)
    }
}
