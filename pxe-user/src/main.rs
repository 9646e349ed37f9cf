//! `pxed`: the PXE boot daemon. This file only wires the pieces together:
//! flags and config in, services started, signals handled.
use std::{
    io::IsTerminal as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser;
use pxe_common::maps::MAX_FAST_BLKSIZE;
use pxe_user::{
    bootroot::BootRoot,
    config::{Config, DhcpMode},
    dhcp::{
        self,
        driver::Listener,
        engine::{Engine, EngineConfig, Mode},
        pool::{parse_range, Subnet},
        templates,
    },
    fastpath::{
        tftp_sessions::{FastPathHooks, Images},
        AttachedXdp, CounterSnapshot, Counters, FastPath, KernelAnswers, XdpModeChoice,
    },
    http::{self, SharedPolicy},
    lease::{LeaseStore, MemLeaseStore, RedbLeaseStore},
    netif,
    policy::r#static::{ServerUrls, StaticPolicy},
    privileges::{missing_capabilities, raise_open_file_limit},
    tftp::{
        negotiate::Limits,
        server::{TftpConfig, TftpServer},
    },
};
use tokio::{
    signal::unix::{signal, SignalKind},
    task::JoinHandle,
};
use tracing::{error, info, warn};

/// PXE boot server: DHCP/proxyDHCP, TFTP and HTTP boot, with the hot paths in
/// XDP/TC programs attached to the serving interfaces.
///
/// Quick start, proxy mode beside an existing DHCP server:
///   pxed --interface eth1 --boot-root /srv/pxe
/// Full DHCP on a lab network:
///   pxed --interface eth1 --boot-root /srv/pxe --dhcp full --range 10.9.0.100-10.9.0.199
/// Two networks at once (one lease database; each answered from its own address):
///   pxed -i eth1 -i eth2 --dhcp full --range 10.9.0.100-10.9.0.199 --range 10.10.0.100-10.10.0.199
///
/// Runs in the foreground until SIGINT or SIGTERM; SIGHUP reloads the config
/// file (a bad file is refused and the old one keeps serving); SIGUSR1 logs
/// counters. Programs are attached through BPF links owned by this process:
/// when it exits, however it exits, the kernel detaches them.
#[derive(Debug, Parser)]
#[command(name = "pxed", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Config file (TOML): DHCP subnets, profiles, machines, service settings.
    /// See docs/pxed.example.toml. Flags override what it says.
    #[arg(short, long, value_name = "FILE", env = "PXED_CONFIG")]
    config: Option<PathBuf>,

    /// Check the config file and exit: prints what it defines, or the file,
    /// line and key of the first error.
    #[arg(long, requires = "config")]
    check_config: bool,

    /// Interface to serve on, e.g. `eth1` (repeatable, or comma-separated).
    /// Its XDP and TC ingress hooks are used, and the services answer from
    /// its first IPv4 address. Nothing is served on other interfaces.
    #[arg(
        short,
        long,
        env = "PXED_INTERFACE",
        value_delimiter = ',',
        value_name = "IF"
    )]
    interface: Vec<String>,

    /// DHCP role: `proxy` answers PXE clients with boot information only and
    /// leaves addresses to the network's DHCP server; `full` hands out
    /// addresses too (needs --range or [[dhcp.subnet]]); `off` serves files
    /// only [default: the config's, else proxy].
    #[arg(long, value_enum, value_name = "MODE")]
    dhcp: Option<DhcpMode>,

    /// Address pool for `--dhcp full` on the network of one of the
    /// interfaces, e.g. 10.9.0.100-10.9.0.199 (repeatable).
    #[arg(long, value_name = "FIRST-LAST")]
    range: Vec<String>,

    /// Router (option 3) for the --range subnets.
    #[arg(long, value_name = "IP")]
    router: Option<Ipv4Addr>,

    /// Lease time in seconds for the --range subnets.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    lease_time: u32,

    /// Lease database (full mode). Every ACKed lease is on disk before the
    /// ACK leaves [default: /var/lib/pxed/leases.redb].
    #[arg(long, value_name = "FILE")]
    lease_file: Option<PathBuf>,

    /// NAK requests for addresses pxed has no record of (RFC 2131 §4.3.2).
    /// Only for the one DHCP server of a network.
    #[arg(long)]
    authoritative: bool,

    /// How to attach the XDP program: `auto` tries native (driver) mode, then
    /// generic, and logs which it got; `off` leaves XDP out entirely.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto, env = "PXED_XDP_MODE")]
    xdp_mode: XdpModeChoice,

    /// Do not attach the TC ingress program (the fallback tier for drivers
    /// whose XDP frames have no room to grow).
    #[arg(long, env = "PXED_NO_TC")]
    no_tc: bool,

    /// Answer every DHCP request in userspace. By default, once pxed has
    /// answered a client, the XDP/TC programs answer its next request of
    /// the same kind themselves (same reply, byte for byte); leases are
    /// then stored for twice the lease time so that every renewal the
    /// kernel ACKs is already on disk.
    #[arg(long, env = "PXED_NO_KERNEL_DHCP")]
    no_kernel_dhcp: bool,

    /// Kernel memory for boot images the XDP/TC tiers serve from, in MiB.
    /// Files are loaded on first request while it lasts; others are served
    /// from userspace. With `--xdp-mode off --no-tc` none is used.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    fastpath_memory: u32,

    /// Directory served over TFTP (and HTTP): boot loaders, kernels, initrds.
    /// Nothing outside it is ever served. Without it, file serving is off.
    #[arg(long, value_name = "DIR", env = "PXED_BOOT_ROOT")]
    boot_root: Option<PathBuf>,

    /// Largest TFTP block size granted. Default: the interface MTU minus the
    /// IPv4, UDP and TFTP headers (1468 at MTU 1500), so no DATA fragments;
    /// with the kernel tiers on, at most 1468, the largest block they build
    /// (a larger one is served from userspace).
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
            tracing_subscriber::EnvFilter::try_from_env("PXED_LOG")
                .unwrap_or_else(|_| "info".into()),
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
            "{}: ok ({} profiles, {} machines, {} reservations, {} DHCP subnets, default profile {})",
            cli.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            config.profiles.len(),
            config.machines.len(),
            config.reservations.len(),
            config.subnets.len(),
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
    let open_files = raise_open_file_limit();
    if open_files < 16_384 {
        warn!(open_files, "the open-file limit caps concurrent TFTP transfers (one socket each); raise it (ulimit -n) for large racks");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(settings))
}

/// The config file and the flags, merged: flags win.
struct Settings {
    config_path: Option<PathBuf>,
    interfaces: Vec<String>,
    dhcp: DhcpMode,
    ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    router: Option<Ipv4Addr>,
    lease_time: u32,
    lease_file: PathBuf,
    authoritative: bool,
    xdp_mode: XdpModeChoice,
    no_tc: bool,
    no_kernel_dhcp: bool,
    fastpath_memory: u32,
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
        let interfaces = if cli.interface.is_empty() {
            config.interfaces.clone()
        } else {
            cli.interface
        };
        if interfaces.is_empty() {
            bail!(
                "no interface to serve on: pass --interface IF (or set `interface` in the config)"
            );
        }
        if let Some(twice) = interfaces
            .iter()
            .enumerate()
            .find_map(|(i, a)| interfaces[..i].contains(a).then_some(a))
        {
            bail!("--interface {twice} is given twice");
        }
        let ranges = cli
            .range
            .iter()
            .map(|r| parse_range(r).map_err(|e| anyhow::anyhow!("--range {r}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let dhcp = cli
            .dhcp
            .or(config.dhcp_mode)
            .unwrap_or(if ranges.is_empty() {
                DhcpMode::Proxy
            } else {
                DhcpMode::Full
            });
        if dhcp == DhcpMode::Full && ranges.is_empty() && config.subnets.is_empty() {
            bail!("--dhcp full needs addresses to hand out: --range FIRST-LAST, or [[dhcp.subnet]] in the config");
        }
        Ok(Self {
            config_path: cli.config,
            interfaces,
            dhcp,
            ranges,
            router: cli.router,
            lease_time: cli.lease_time,
            lease_file: cli
                .lease_file
                .or_else(|| config.lease_file.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/pxed/leases.redb")),
            authoritative: cli.authoritative || config.authoritative,
            xdp_mode: cli.xdp_mode,
            no_tc: cli.no_tc,
            no_kernel_dhcp: cli.no_kernel_dhcp || !config.kernel_answers,
            fastpath_memory: cli.fastpath_memory,
            boot_root: cli.boot_root.or_else(|| config.boot_root.clone()),
            tftp_port: cli.tftp_port,
            tftp_max_blksize: cli.tftp_max_blksize.or(config.tftp_max_blksize),
            tftp_max_windowsize: cli
                .tftp_max_windowsize
                .or(config.tftp_max_windowsize)
                .unwrap_or(64),
            tftp_max_per_client: cli.tftp_max_per_client,
            tftp_gso: !cli.tftp_no_gso,
            http_port: cli.http_port.or(config.http_port).unwrap_or(80),
            stats_interval: cli.stats_interval,
            config,
        })
    }

    fn policy(&self, config: &Config) -> StaticPolicy {
        StaticPolicy {
            profiles: config.profiles.clone(),
            machines: config.machines.clone(),
            default_profile: config.default_profile.clone(),
        }
    }

    /// The config's subnets, and one per interface network that `--range`
    /// pools fall in (replacing a config subnet of the same network).
    /// The programs answer repeat DHCP requests: a program is attached and
    /// the operator did not say no.
    fn kernel_answers(&self) -> bool {
        !self.no_kernel_dhcp && (self.xdp_mode != XdpModeChoice::Off || !self.no_tc)
    }

    fn engine_config(&self, config: &Config) -> anyhow::Result<EngineConfig> {
        let mut subnets = config.subnets.clone();
        if !self.ranges.is_empty() {
            let networks = self
                .interfaces
                .iter()
                .map(|i| netif::ipv4_network(i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for network in &networks {
                let ranges: Vec<_> = self
                    .ranges
                    .iter()
                    .copied()
                    .filter(|(f, l)| network.contains(f) && network.contains(l))
                    .collect();
                if ranges.is_empty() {
                    continue;
                }
                subnets.retain(|s| s.network != *network);
                subnets.push(Subnet {
                    network: *network,
                    ranges,
                    exclude: vec![],
                    router: self.router.filter(|r| network.contains(r)),
                    dns: vec![],
                    domain: None,
                    lease_time: self.lease_time.max(60),
                });
            }
            if let Some((first, last)) = self
                .ranges
                .iter()
                .find(|(f, l)| !networks.iter().any(|n| n.contains(f) && n.contains(l)))
            {
                let on: Vec<String> = self
                    .interfaces
                    .iter()
                    .zip(&networks)
                    .map(|(i, n)| format!("{i} {n}"))
                    .collect();
                bail!(
                    "--range {first}-{last} is not inside the network of any interface served ({})",
                    on.join(", ")
                );
            }
            if let Some(router) = self
                .router
                .filter(|r| !networks.iter().any(|n| n.contains(r)))
            {
                bail!("--router {router} is not on the network of any interface served");
            }
        }
        Ok(EngineConfig {
            mode: if self.dhcp == DhcpMode::Full {
                Mode::Full
            } else {
                Mode::Proxy
            },
            subnets,
            reservations: config.reservations.clone(),
            authoritative: self.authoritative,
            http_port: self.http_port,
            kernel_answers: self.kernel_answers(),
        })
    }
}

/// Attaches, starts the services, then serves until a stop signal.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Handlers first: a stop signal that arrives while the programs load must
    // still end in a clean detach, not in the default action.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigusr1 =
        signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;

    let kernel_tiers = settings.xdp_mode != XdpModeChoice::Off || !settings.no_tc;
    let chunks = if kernel_tiers {
        settings.fastpath_memory
    } else {
        1
    };
    let mut fastpath =
        FastPath::load_with_image_chunks(chunks).context("loading the BPF programs")?;
    let mut xdp_modes = std::collections::HashMap::new();
    for interface in &settings.interfaces {
        let mode = fastpath.attach_xdp(interface, settings.xdp_mode)?;
        match mode {
            Some(mode) => info!(%interface, %mode, "XDP program attached"),
            None => info!(%interface, "XDP off (--xdp-mode off)"),
        }
        xdp_modes.insert(interface.clone(), mode);
        if settings.no_tc {
            info!(%interface, "TC program not attached (--no-tc)");
        } else {
            fastpath.attach_tc(interface)?;
            info!(%interface, "TC ingress program attached");
        }
    }
    let fastpath = Arc::new(Mutex::new(fastpath));

    let mut tasks: Vec<(String, JoinHandle<std::io::Result<()>>)> = Vec::new();
    let needs_address = settings.boot_root.is_some() || settings.dhcp != DhcpMode::Off;
    // Each interface's first address: what its services bind to and answer from.
    let served: Vec<(String, Ipv4Addr)> = if needs_address {
        settings
            .interfaces
            .iter()
            .map(|i| Ok((i.clone(), netif::ipv4_address(i)?)))
            .collect::<anyhow::Result<_>>()?
    } else {
        Vec::new()
    };
    let policy: SharedPolicy = Arc::new(RwLock::new(Arc::new(settings.policy(&settings.config))));

    // With no boot root, serve the iPXE binaries the system has (Debian's
    // `ipxe` package), so `pxed --interface IF` alone chainloads iPXE. They
    // are copied into a private directory: Debian links some of them to
    // /boot, which confinement (rightly) refuses to follow.
    let found_ipxe = if settings.boot_root.is_none() {
        copy_found_ipxe()
    } else {
        None
    };
    let boot_root = settings.boot_root.clone().or_else(|| found_ipxe.clone());
    match &boot_root {
        Some(dir) if !served.is_empty() => {
            let root = Arc::new(
                BootRoot::open(dir)
                    .context("the boot root (--boot-root) must be a readable directory")?,
            );
            // One set of hooks for every interface: kernel image ids are global.
            let hooks = Arc::new(FastPathHooks {
                fastpath: Arc::clone(&fastpath),
                kernel_tiers,
                images: Mutex::new(Images::default()),
            });
            for (interface, address) in &served {
                let server = start_tftp(
                    &settings,
                    interface,
                    *address,
                    Arc::clone(&root),
                    Arc::clone(&hooks),
                )
                .await?;
                tasks.push((format!("TFTP ({interface})"), tokio::spawn(server.run())));
                if settings.http_port != 0 {
                    let task =
                        start_http(&settings, *address, Arc::clone(&root), Arc::clone(&policy))
                            .await?;
                    tasks.push((format!("HTTP ({interface})"), task));
                }
            }
            if settings.http_port == 0 && settings.dhcp != DhcpMode::Off {
                warn!(
                    "HTTP is off (--http-port 0): iPXE clients are sent script URLs nobody answers"
                );
            }
        }
        _ => warn!(
            "no --boot-root and no iPXE binaries in {IPXE_DIR}: TFTP and HTTP file serving are off"
        ),
    }

    let answers = settings
        .kernel_answers()
        .then(|| Arc::new(KernelAnswers::new(Arc::clone(&fastpath))));
    let engine = match settings.dhcp {
        DhcpMode::Off => {
            info!("DHCP off");
            None
        }
        mode => {
            let engine = start_dhcp(
                &settings,
                mode,
                &served,
                &xdp_modes,
                answers.clone(),
                Arc::clone(&policy.read().unwrap()),
                &mut tasks,
            )?;
            Some(engine)
        }
    };

    let period = Duration::from_secs(if settings.stats_interval == 0 {
        u64::MAX / 4
    } else {
        settings.stats_interval
    });
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await; // the first tick is immediate
    let counters = || {
        fastpath
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()
    };
    let mut last = counters()?;
    if let Some(answers) = &answers {
        tokio::spawn(log_kernel_answers(Arc::clone(answers)));
    }
    info!("serving; SIGHUP reloads the config, SIGUSR1 logs counters, SIGINT/SIGTERM stops");
    let failed = loop {
        let any_ended = async {
            if tasks.is_empty() {
                return std::future::pending().await;
            }
            first_to_end(&mut tasks).await
        };
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break None; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break None; }
            _ = sighup.recv() => reload(&settings, &policy, engine.as_ref(), answers.as_deref()),
            _ = sigusr1.recv() => {
                log_counters("counters", &counters()?);
                log_dhcp_stats(engine.as_ref());
            }
            (index, result) = any_ended => {
                let name = &tasks[index].0;
                break Some(match result {
                    Ok(Ok(())) => anyhow::anyhow!("the {name} server stopped"),
                    Ok(Err(e)) => anyhow::anyhow!("the {name} server failed: {e}"),
                    Err(e) => anyhow::anyhow!("the {name} server crashed: {e}"),
                });
            }
            _ = ticker.tick() => {
                match counters() {
                    Ok(now) if now != last => {
                        log_counters("counters", &now);
                        log_dhcp_stats(engine.as_ref());
                        last = now;
                    }
                    Ok(_) => {}
                    Err(e) => warn!("reading counters: {e}"),
                }
            }
        }
    };
    if let Some(answers) = &answers {
        answers.log_new_answers();
    }
    log_counters("final counters", &counters()?);
    log_dhcp_stats(engine.as_ref());
    for (_, task) in &tasks {
        task.abort();
    }
    if let Some(dir) = found_ipxe {
        let _ = std::fs::remove_dir_all(dir);
    }
    drop(fastpath);
    info!("programs detached; bye");
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Where Debian's `ipxe` package puts ipxe.efi and undionly.kpxe.
const IPXE_DIR: &str = "/usr/lib/ipxe";

/// Copies the iPXE binaries found in [`IPXE_DIR`] into a fresh directory
/// and returns it, or `None` if there are none.
fn copy_found_ipxe() -> Option<PathBuf> {
    // Copies left by a pxed that was killed: their PID is gone.
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("pxed-ipxe-")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("pxed-ipxe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let copied: Vec<&str> = ["ipxe.efi", "undionly.kpxe", "snponly.efi", "ipxe.pxe"]
        .into_iter()
        .filter(|name| std::fs::copy(Path::new(IPXE_DIR).join(name), dir.join(name)).is_ok())
        .collect();
    if copied.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
        return None;
    }
    info!(files = ?copied, "no --boot-root: serving the iPXE binaries found in {IPXE_DIR}");
    Some(dir)
}

/// Waits for the first of the service tasks to end.
async fn first_to_end(
    tasks: &mut [(String, JoinHandle<std::io::Result<()>>)],
) -> (usize, Result<std::io::Result<()>, tokio::task::JoinError>) {
    use std::future::Future as _;
    std::future::poll_fn(|cx| {
        for (i, (_, task)) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(task).poll(cx) {
                return std::task::Poll::Ready((i, r));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// SIGHUP: re-read the config file; a bad one is refused and the old one
/// keeps serving. Leases are untouched.
fn reload(
    settings: &Settings,
    policy: &SharedPolicy,
    engine: Option<&Arc<Mutex<Engine>>>,
    answers: Option<&KernelAnswers>,
) {
    let Some(path) = &settings.config_path else {
        info!("SIGHUP: no --config file to reload");
        return;
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("SIGHUP: the new config is refused, the old one keeps serving: {e}");
            return;
        }
    };
    let new_policy = Arc::new(settings.policy(&config));
    if let Some(engine) = engine {
        match settings.engine_config(&config) {
            Ok(engine_config) => engine
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reconfigure(engine_config, Arc::clone(&new_policy)),
            Err(e) => {
                error!("SIGHUP: the new config is refused, the old one keeps serving: {e:#}");
                return;
            }
        }
    }
    *policy.write().unwrap_or_else(|e| e.into_inner()) = new_policy;
    if let Some(answers) = answers {
        // Any answer may change with the config: the kernel relearns them.
        answers.clear();
    }
    info!(
        profiles = config.profiles.len(),
        machines = config.machines.len(),
        subnets = config.subnets.len(),
        "SIGHUP: config reloaded from {}",
        path.display()
    );
}

/// Opens the lease store, builds the engine, opens 67 and 4011 on every
/// interface and starts one task per interface.
fn start_dhcp(
    settings: &Settings,
    mode: DhcpMode,
    served: &[(String, Ipv4Addr)],
    xdp_modes: &std::collections::HashMap<String, Option<AttachedXdp>>,
    answers: Option<Arc<KernelAnswers>>,
    policy: Arc<StaticPolicy>,
    tasks: &mut Vec<(String, JoinHandle<std::io::Result<()>>)>,
) -> anyhow::Result<Arc<Mutex<Engine>>> {
    let engine_config = settings.engine_config(&settings.config)?;
    let store: Box<dyn LeaseStore> = match mode {
        DhcpMode::Full => Box::new(open_leases(&settings.lease_file)?),
        // Proxy mode hands out no addresses: nothing to remember.
        _ => Box::new(MemLeaseStore::default()),
    };
    let subnets: Vec<String> = engine_config
        .subnets
        .iter()
        .map(|s| s.network.to_string())
        .collect();
    let engine = Engine::new(engine_config, policy, store).context("reading the lease database")?;
    let engine = Arc::new(Mutex::new(engine));
    let mut listeners = Vec::new();
    for (interface, address) in served {
        let mut listener = Listener::open(interface, *address, mode == DhcpMode::Proxy)?;
        if let Some(answers) = &answers {
            let xdp_tx = xdp_can_transmit(interface, xdp_modes.get(interface).copied().flatten());
            let facts = templates::Interface {
                ifindex: netif::index(interface)?,
                mac: netif::mac(interface)?,
                address: *address,
                xdp_tx,
            };
            info!(%interface, xdp_tx, "DHCP: the kernel answers repeat requests (--no-kernel-dhcp: userspace answers all)");
            listener = listener.with_kernel_answers(Arc::clone(answers), facts);
        }
        listeners.push(listener);
    }
    info!(
        mode = ?mode, subnets = ?subnets,
        lease_file = %if mode == DhcpMode::Full { settings.lease_file.display().to_string() } else { "-".into() },
        "DHCP serving on ports 67 and 4011"
    );
    for listener in listeners {
        info!(interface = %listener.interface, server = %listener.address, "DHCP listening");
        let name = format!("DHCP ({})", listener.interface);
        tasks.push((
            name,
            tokio::spawn(dhcp::driver::run(Arc::clone(&engine), listener)),
        ));
    }
    Ok(engine)
}

/// May XDP send a DHCP reply itself on this interface? In generic mode the
/// stack transmits it; in native mode only a real NIC's driver does: veth
/// and other virtual drivers drop XDP_TX frames unless their peer runs XDP
/// too, so their replies are left to TC.
fn xdp_can_transmit(interface: &str, mode: Option<AttachedXdp>) -> bool {
    match mode {
        Some(AttachedXdp::Generic) => true,
        Some(AttachedXdp::Native) => Path::new("/sys/class/net")
            .join(interface)
            .join("device")
            .exists(),
        None => false,
    }
}

fn open_leases(path: &Path) -> anyhow::Result<RedbLeaseStore> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the lease directory {}", dir.display()))?;
    }
    RedbLeaseStore::open(path).context("opening the lease database (--lease-file)")
}

/// Binds TFTP on an interface's address, serving the boot root.
async fn start_tftp(
    settings: &Settings,
    interface: &str,
    address: Ipv4Addr,
    root: Arc<BootRoot>,
    hooks: Arc<FastPathHooks>,
) -> anyhow::Result<TftpServer> {
    let mtu = netif::mtu(interface).unwrap_or(1500);
    let fits_mtu = mtu.saturating_sub(32).clamp(512, 65464);
    let fits_kernel = if hooks.kernel_tiers {
        fits_mtu.min(MAX_FAST_BLKSIZE)
    } else {
        fits_mtu
    };
    let max_blksize = settings.tftp_max_blksize.unwrap_or(fits_kernel as u16);
    let config = TftpConfig {
        limits: Limits {
            max_blksize,
            max_windowsize: settings.tftp_max_windowsize,
        },
        max_transfers_per_client: settings.tftp_max_per_client,
        gso: settings.tftp_gso,
        ..TftpConfig::default()
    };
    let server = TftpServer::bind(
        SocketAddr::from((address, settings.tftp_port)),
        Arc::clone(&root),
        config,
        hooks,
    )
    .await?;
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
    policy: SharedPolicy,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let bind = SocketAddr::from((address, settings.http_port));
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding HTTP to {bind}"))?;
    let config = &settings.config;
    let urls = Arc::new(ServerUrls::new(address, settings.http_port));
    info!(url = %urls.http, profiles = config.profiles.len(), machines = config.machines.len(), "HTTP boot serving");
    let router = http::router(http::HttpState { root, policy, urls });
    Ok(tokio::spawn(
        async move { axum::serve(listener, router).await },
    ))
}

fn log_dhcp_stats(engine: Option<&Arc<Mutex<Engine>>>) {
    if let Some(engine) = engine {
        let s = engine.lock().unwrap_or_else(|e| e.into_inner()).stats();
        info!(
            offers = s.offers,
            acks = s.acks,
            naks = s.naks,
            proxy_replies = s.proxy_replies,
            ignored = s.ignored,
            pool_exhausted = s.pool_exhausted,
            store_failures = s.store_failures,
            "DHCP counters"
        );
    }
}

/// How often the replies the kernel sent from DHCP templates are logged, per
/// client: often enough that a machine's log reads in order, seldom enough
/// that a rack's repeats cost a line per machine, not per packet.
const KERNEL_ANSWER_LOG_PERIOD: Duration = Duration::from_secs(5);

async fn log_kernel_answers(answers: Arc<KernelAnswers>) {
    let mut ticker = tokio::time::interval(KERNEL_ANSWER_LOG_PERIOD);
    loop {
        ticker.tick().await;
        let answers = Arc::clone(&answers);
        // Map reads are system calls: off the async threads.
        let _ = tokio::task::spawn_blocking(move || answers.log_new_answers()).await;
    }
}

fn log_counters(what: &str, counters: &Counters) {
    let line = |s: &CounterSnapshot| s.to_string();
    info!(xdp = %line(&counters.xdp), tc = %line(&counters.tc), "{what}");
}
