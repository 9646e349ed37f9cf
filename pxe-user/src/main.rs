//! `pxed`: the PXE boot daemon.
use std::{
    io::IsTerminal as _,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use pxe_user::{
    bootroot::BootRoot,
    fastpath::{CounterSnapshot, Counters, FastPath, XdpModeChoice},
    netif,
    privileges::missing_capabilities,
    tftp::{
        negotiate::Limits,
        server::{TftpConfig, TftpServer, TransferHooks},
    },
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

    /// Directory served over TFTP (and HTTP): boot loaders, kernels, initrds.
    /// Nothing outside it is ever served. Without it, file serving is off.
    #[arg(long, value_name = "DIR", env = "PXED_BOOT_ROOT")]
    boot_root: Option<PathBuf>,

    /// Largest TFTP block size granted. Default: the interface MTU minus the
    /// IPv4, UDP and TFTP headers (1468 at MTU 1500), so no DATA fragments.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(8..=65464))]
    tftp_max_blksize: Option<u16>,

    /// UDP port for TFTP requests. Firmware always asks on 69; change it only
    /// to test.
    #[arg(long, default_value_t = 69, value_name = "PORT")]
    tftp_port: u16,

    /// Largest TFTP window (RFC 7440 windowsize) granted.
    #[arg(long, value_name = "BLOCKS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    tftp_max_windowsize: u16,

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

    let fastpath = Arc::new(Mutex::new(fastpath));
    let mut tftp = match &cli.boot_root {
        Some(dir) => Some(tokio::spawn(start_tftp(&cli, dir, Arc::clone(&fastpath)).await?.run())),
        None => {
            warn!("no --boot-root: TFTP and HTTP file serving are off");
            None
        }
    };

    let period = Duration::from_secs(if cli.stats_interval == 0 { u64::MAX / 4 } else { cli.stats_interval });
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await; // the first tick is immediate
    let counters = || fastpath.lock().unwrap_or_else(|e| e.into_inner()).counters();
    let mut last = counters()?;
    info!("serving; SIGUSR1 logs counters, SIGINT/SIGTERM stops");
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigusr1.recv() => log_counters("counters", &counters()?),
            Some(ended) = async { tftp.as_mut()?.await.ok() }, if tftp.is_some() => {
                ended.context("the TFTP server stopped")?;
                bail!("the TFTP server stopped");
            }
            _ = ticker.tick() => {
                match counters() {
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
    log_counters("final counters", &counters()?);
    if let Some(task) = tftp {
        task.abort();
    }
    drop(fastpath);
    info!("programs detached; bye");
    Ok(())
}

/// Binds TFTP on the interface's address, serving the boot root.
async fn start_tftp(cli: &Cli, dir: &std::path::Path, fastpath: Arc<Mutex<FastPath>>) -> anyhow::Result<TftpServer> {
    let root = BootRoot::open(dir).context("the boot root (--boot-root) must be a readable directory")?;
    let address = netif::ipv4_address(&cli.interface)?;
    let mtu = netif::mtu(&cli.interface).unwrap_or(1500);
    let max_blksize = cli.tftp_max_blksize.unwrap_or_else(|| mtu.saturating_sub(32).clamp(512, 65464) as u16);
    let config = TftpConfig {
        limits: Limits { max_blksize, max_windowsize: cli.tftp_max_windowsize },
        ..TftpConfig::default()
    };
    let hooks = Arc::new(FastPathPorts(fastpath));
    let server = TftpServer::bind(SocketAddr::from((address, cli.tftp_port)), Arc::new(root), config, hooks).await?;
    info!(
        address = %server.local_addr()?, boot_root = %dir.display(), max_blksize,
        max_windowsize = cli.tftp_max_windowsize, "TFTP serving"
    );
    Ok(server)
}

/// Registers each transfer's server port with the kernel programs.
struct FastPathPorts(Arc<Mutex<FastPath>>);

impl TransferHooks for FastPathPorts {
    fn opened(&self, port: u16) {
        if let Err(e) = self.0.lock().unwrap_or_else(|e| e.into_inner()).register_transfer_port(port) {
            warn!(port, "registering a TFTP transfer port with the kernel: {e}");
        }
    }

    fn closed(&self, port: u16) {
        if let Err(e) = self.0.lock().unwrap_or_else(|e| e.into_inner()).unregister_transfer_port(port) {
            warn!(port, "unregistering a TFTP transfer port: {e}");
        }
    }
}

fn log_counters(what: &str, counters: &Counters) {
    let line = |s: &CounterSnapshot| s.to_string();
    info!(xdp = %line(&counters.xdp), tc = %line(&counters.tc), "{what}");
}
