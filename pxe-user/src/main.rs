//! `pxed`: the PXE boot daemon.
use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use pxe_user::{
    bootroot::BootRoot,
    config::Config,
    http,
    policy::r#static::{ServerUrls, StaticPolicy},
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
    /// Config file (TOML): profiles, machines, service settings. See
    /// docs/pxed.example.toml. Flags override what it says.
    #[arg(short, long, value_name = "FILE", env = "PXED_CONFIG")]
    config: Option<PathBuf>,

    /// Check the config file and exit: prints what it defines, or the file,
    /// line and key of the first error.
    #[arg(long, requires = "config")]
    check_config: bool,

    /// Interface to serve on, e.g. `eth1`. Its XDP and TC ingress hooks are
    /// used, and the services answer from its IPv4 address.
    #[arg(short, long, env = "PXED_INTERFACE")]
    interface: Option<String>,

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

    /// Largest TFTP window (RFC 7440 windowsize) granted [default: 64].
    #[arg(long, value_name = "BLOCKS", value_parser = clap::value_parser!(u16).range(1..))]
    tftp_max_windowsize: Option<u16>,

    /// TFTP transfers one client address may run at once. A machine needs
    /// one; raise it for load generators that share an address.
    #[arg(long, value_name = "N", default_value_t = 128)]
    tftp_max_per_client: usize,

    /// Send TFTP windows one packet per system call instead of one UDP GSO
    /// send per window (for measurement, or a path where GSO misbehaves).
    #[arg(long)]
    tftp_no_gso: bool,

    /// TCP port of HTTP boot (boot root files and iPXE scripts); 0 turns it
    /// off [default: 80].
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,

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
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if cli.check_config {
        println!(
            "{}: ok ({} profiles, {} machines, default profile {})",
            cli.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            config.profiles.len(),
            config.machines.len(),
            config.default_profile.as_deref().unwrap_or("none: unknown machines are ignored"),
        );
        return Ok(());
    }
    let settings = Settings::merge(cli, config)?;
    let missing = missing_capabilities();
    if !missing.is_empty() {
        bail!(
            "pxed needs root, or at least {}, to load BPF programs and bind ports 67 and 69; run it as root",
            missing.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(settings))
}

/// The config file and the flags, merged: flags win.
struct Settings {
    interface: String,
    xdp_mode: XdpModeChoice,
    no_tc: bool,
    boot_root: Option<PathBuf>,
    tftp_port: u16,
    tftp_max_blksize: Option<u16>,
    tftp_max_windowsize: u16,
    tftp_max_per_client: usize,
    tftp_gso: bool,
    http_port: u16,
    stats_interval: u64,
    config: Config,
}

impl Settings {
    fn merge(cli: Cli, config: Config) -> anyhow::Result<Self> {
        let Some(interface) = cli.interface.or_else(|| config.interface.clone()) else {
            bail!("no interface to serve on: pass --interface IF (or set `interface` in the config)");
        };
        Ok(Self {
            interface,
            xdp_mode: cli.xdp_mode,
            no_tc: cli.no_tc,
            boot_root: cli.boot_root.or_else(|| config.boot_root.clone()),
            tftp_port: cli.tftp_port,
            tftp_max_blksize: cli.tftp_max_blksize.or(config.tftp_max_blksize),
            tftp_max_windowsize: cli.tftp_max_windowsize.or(config.tftp_max_windowsize).unwrap_or(64),
            tftp_max_per_client: cli.tftp_max_per_client,
            tftp_gso: !cli.tftp_no_gso,
            http_port: cli.http_port.or(config.http_port).unwrap_or(80),
            stats_interval: cli.stats_interval,
            config,
        })
    }
}

/// Attaches, then serves until a stop signal, logging counters on the way.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Handlers first: a stop signal that arrives while the programs load must
    // still end in a clean detach, not in the default action.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;

    let mut fastpath = FastPath::load().context("loading the BPF programs")?;
    match fastpath.attach_xdp(&settings.interface, settings.xdp_mode)? {
        Some(mode) => info!(interface = %settings.interface, %mode, "XDP program attached"),
        None => info!(interface = %settings.interface, "XDP off (--xdp-mode off)"),
    }
    if settings.no_tc {
        info!(interface = %settings.interface, "TC program not attached (--no-tc)");
    } else {
        fastpath.attach_tc(&settings.interface)?;
        info!(interface = %settings.interface, "TC ingress program attached");
    }

    let fastpath = Arc::new(Mutex::new(fastpath));
    let mut tftp = None;
    let mut http = None;
    match &settings.boot_root {
        Some(dir) => {
            let root = Arc::new(
                BootRoot::open(dir).context("the boot root (--boot-root) must be a readable directory")?,
            );
            let address = netif::ipv4_address(&settings.interface)?;
            let server = start_tftp(&settings, address, Arc::clone(&root), Arc::clone(&fastpath)).await?;
            tftp = Some(tokio::spawn(server.run()));
            if settings.http_port != 0 {
                http = Some(start_http(&settings, address, root).await?);
            }
        }
        None => warn!("no --boot-root: TFTP and HTTP file serving are off"),
    }

    let period = Duration::from_secs(if settings.stats_interval == 0 { u64::MAX / 4 } else { settings.stats_interval });
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
            Some(ended) = async { http.as_mut()?.await.ok() }, if http.is_some() => {
                ended.context("the HTTP server stopped")?;
                bail!("the HTTP server stopped");
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
    for task in [tftp, http].into_iter().flatten() {
        task.abort();
    }
    drop(fastpath);
    info!("programs detached; bye");
    Ok(())
}

/// Binds TFTP on the interface's address, serving the boot root.
async fn start_tftp(
    settings: &Settings,
    address: Ipv4Addr,
    root: Arc<BootRoot>,
    fastpath: Arc<Mutex<FastPath>>,
) -> anyhow::Result<TftpServer> {
    let mtu = netif::mtu(&settings.interface).unwrap_or(1500);
    let max_blksize = settings.tftp_max_blksize.unwrap_or_else(|| mtu.saturating_sub(32).clamp(512, 65464) as u16);
    let config = TftpConfig {
        limits: Limits { max_blksize, max_windowsize: settings.tftp_max_windowsize },
        max_transfers_per_client: settings.tftp_max_per_client,
        gso: settings.tftp_gso,
        ..TftpConfig::default()
    };
    let hooks = Arc::new(FastPathPorts(fastpath));
    let server = TftpServer::bind(SocketAddr::from((address, settings.tftp_port)), Arc::clone(&root), config, hooks).await?;
    info!(
        address = %server.local_addr()?, boot_root = %root.path().display(), max_blksize,
        max_windowsize = settings.tftp_max_windowsize, "TFTP serving"
    );
    Ok(server)
}

/// Binds HTTP boot on the interface's address and serves it on a task.
async fn start_http(
    settings: &Settings,
    address: Ipv4Addr,
    root: Arc<BootRoot>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let bind = SocketAddr::from((address, settings.http_port));
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("binding HTTP to {bind}"))?;
    let base = match settings.http_port {
        80 => format!("http://{address}"),
        port => format!("http://{address}:{port}"),
    };
    let config = &settings.config;
    let policy = StaticPolicy {
        profiles: config.profiles.clone(),
        machines: config.machines.clone(),
        default_profile: config.default_profile.clone(),
        urls: ServerUrls { server: address.to_string(), http: base.clone() },
    };
    info!(url = %base, profiles = config.profiles.len(), machines = config.machines.len(), "HTTP boot serving");
    let router = http::router(http::HttpState { root, policy: Arc::new(policy) });
    Ok(tokio::spawn(async move { axum::serve(listener, router).await }))
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
