//! `pxed`: the PXE boot daemon.
use std::{io::IsTerminal as _, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _};
use clap::Parser;
use pxe_user::{
    fastpath::{CounterSnapshot, Counters, FastPath, XdpModeChoice},
    privileges::missing_capabilities,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

/// PXE boot server: DHCP/proxyDHCP, TFTP and HTTP boot, with the hot paths in
/// XDP/TC programs attached to the serving interface.
///
/// Runs in the foreground until SIGINT or SIGTERM. Programs are attached
/// through BPF links owned by this process: when it exits, however it exits,
/// the kernel detaches them.
#[derive(Debug, Parser)]
#[command(name = "pxed", version, about, long_about)]
struct Cli {
    /// Interface to serve on, e.g. `eth1`. Its XDP and TC ingress hooks are used.
    #[arg(short, long, env = "PXED_INTERFACE")]
    interface: String,

    /// How to attach the XDP program: `auto` tries native (driver) mode, then
    /// generic, and logs which it got; `off` leaves XDP out entirely.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto, env = "PXED_XDP_MODE")]
    xdp_mode: XdpModeChoice,

    /// Do not attach the TC ingress program (the fallback tier for drivers
    /// whose XDP frames have no room to grow).
    #[arg(long, env = "PXED_NO_TC")]
    no_tc: bool,

    /// Seconds between counter lines in the log (only when something changed);
    /// 0 logs them only at exit. SIGUSR1 logs them at any time.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    stats_interval: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PXED_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pxed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        bail!(
            "pxed needs root, or at least {}, to load BPF programs and bind ports 67 and 69; run it as root",
            missing.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(cli))
}

/// Attaches, then serves until a stop signal, logging counters on the way.
async fn serve(cli: Cli) -> anyhow::Result<()> {
    // Handlers first: a stop signal that arrives while the programs load must
    // still end in a clean detach, not in the default action.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;

    let mut fastpath = FastPath::load().context("loading the BPF programs")?;
    match fastpath.attach_xdp(&cli.interface, cli.xdp_mode)? {
        Some(mode) => info!(interface = %cli.interface, %mode, "XDP program attached"),
        None => info!(interface = %cli.interface, "XDP off (--xdp-mode off)"),
    }
    if cli.no_tc {
        info!(interface = %cli.interface, "TC program not attached (--no-tc)");
    } else {
        fastpath.attach_tc(&cli.interface)?;
        info!(interface = %cli.interface, "TC ingress program attached");
    }

    let period = Duration::from_secs(if cli.stats_interval == 0 { u64::MAX / 4 } else { cli.stats_interval });
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await; // the first tick is immediate
    let mut last = fastpath.counters()?;
    info!("serving; SIGUSR1 logs counters, SIGINT/SIGTERM stops");
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigusr1.recv() => log_counters("counters", &fastpath.counters()?),
            _ = ticker.tick() => {
                match fastpath.counters() {
                    Ok(now) if now != last => {
                        log_counters("counters", &now);
                        last = now;
                    }
                    Ok(_) => {}
                    Err(e) => warn!("reading counters: {e}"),
                }
            }
        }
    }
    log_counters("final counters", &fastpath.counters()?);
    drop(fastpath);
    info!("programs detached; bye");
    Ok(())
}

fn log_counters(what: &str, counters: &Counters) {
    let line = |s: &CounterSnapshot| s.to_string();
    info!(xdp = %line(&counters.xdp), tc = %line(&counters.tc), "{what}");
}
