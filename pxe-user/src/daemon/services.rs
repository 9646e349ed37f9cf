//! Starting each service from the settings: the programs attached, DHCP,
//! TFTP and HTTP bound on the served interfaces.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use pxe_common::maps::MAX_FAST_BLKSIZE;
use tracing::info;

use super::Services;
use crate::{
    api,
    bootroot::BootRoot,
    cluster::Cluster,
    config::DhcpMode,
    control::{Control, Paths},
    dhcp::{
        self,
        driver::Listener,
        engine::{Engine, EngineConfig},
        templates,
    },
    fastpath::{AttachedXdp, FastPath, FastPathHooks, KernelAdmission, KernelAnswers},
    http,
    inventory::{
        Inventory, InventoryStore, MemInventoryStore, PostgresInventoryStore, RedbInventoryStore,
    },
    lease::{postgres_store, LeaseStore, MemLeaseStore, PostgresLeaseStore, RedbLeaseStore},
    netif,
    observe::Observer,
    policy::{provision::ProvisionKey, webhook::Webhook, FileGate},
    policy::{ServerUrls, SharedPolicy},
    settings::Settings,
    tftp::{
        negotiate::Limits,
        server::{TftpConfig, TftpServer},
    },
};

/// How XDP ended up attached on each interface (`None`: not at all).
pub type XdpModes = HashMap<String, Option<AttachedXdp>>;

/// Loads the programs and attaches them to every interface served.
pub fn attach_programs(settings: &Settings) -> anyhow::Result<(FastPath, XdpModes)> {
    // Without a kernel tier no image is ever loaded: one chunk is the least
    // the map can have.
    let chunks = if settings.kernel_tiers() {
        settings.fastpath_memory
    } else {
        1
    };
    let mut fastpath =
        FastPath::load_with_image_chunks(chunks).context("loading the BPF programs")?;
    let mut xdp_modes = XdpModes::new();
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
    Ok((fastpath, xdp_modes))
}

/// TFTP and, unless `--http-port 0`, HTTP on every served address, from one
/// boot root. One set of kernel hooks serves every interface: kernel image
/// ids are global.
pub async fn start_file_services(
    settings: &Settings,
    served: &[(String, Ipv4Addr)],
    root_dir: &Path,
    fastpath: &Arc<Mutex<FastPath>>,
    policy: &SharedPolicy,
    control: &Arc<Control>,
    services: &mut Services,
) -> anyhow::Result<()> {
    let observer = control.observer();
    let root = Arc::new(
        BootRoot::open(root_dir)
            .context("the boot root (--boot-root) must be a readable directory")?,
    );
    let hooks = Arc::new(FastPathHooks::new(
        Arc::clone(fastpath),
        settings.kernel_tiers(),
    ));
    let gate = file_gate(settings, control);
    for (interface, address) in served {
        let mut server = start_tftp(
            settings,
            interface,
            *address,
            Arc::clone(&root),
            Arc::clone(&hooks),
        )
        .await?;
        if let Some(gate) = &gate {
            server = server.with_gate(Arc::clone(gate));
        }
        server = server.with_observer(Arc::clone(observer));
        services.spawn(format!("TFTP ({interface})"), server.run());
        if settings.http_port != 0 {
            let (listener, router) = start_http(
                settings,
                *address,
                Arc::clone(&root),
                policy.clone(),
                gate.clone(),
            )
            .await?;
            // The installer's `provisioned` call comes over the boot network.
            let router = router.merge(api::boot_network_router(Arc::clone(control)));
            let router = http::observed(router, Arc::clone(observer));
            let service = router.into_make_service_with_connect_info::<SocketAddr>();
            services.spawn(format!("HTTP ({interface})"), async move {
                axum::serve(listener, service).await
            });
        }
    }
    Ok(())
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
    let config = TftpConfig {
        limits: Limits {
            max_blksize: settings
                .tftp_max_blksize
                .unwrap_or(default_max_blksize(mtu, hooks.kernel_tiers())),
            max_windowsize: settings.tftp_max_windowsize,
        },
        max_transfers_per_client: settings.tftp_max_per_client,
        gso: settings.tftp_gso,
        single_port: settings.tftp_single_port,
        ..TftpConfig::default()
    };
    let max_blksize = config.limits.max_blksize;
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

/// The largest block that does not fragment at `mtu` (IPv4, UDP and TFTP
/// headers take 32 bytes), and that the kernel tiers build, when on.
pub fn default_max_blksize(mtu: u32, kernel_tiers: bool) -> u16 {
    let fits_mtu = mtu.saturating_sub(32).clamp(512, 65464);
    let fits = if kernel_tiers {
        fits_mtu.min(MAX_FAST_BLKSIZE)
    } else {
        fits_mtu
    };
    fits as u16
}

/// Binds HTTP boot on the interface's address.
async fn start_http(
    settings: &Settings,
    address: Ipv4Addr,
    root: Arc<BootRoot>,
    policy: SharedPolicy,
    gate: Option<Arc<dyn FileGate>>,
) -> anyhow::Result<(tokio::net::TcpListener, axum::Router)> {
    let bind = SocketAddr::from((address, settings.http_port));
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding HTTP to {bind}"))?;
    let config = &settings.config;
    let urls = Arc::new(ServerUrls::new(address, settings.http_port));
    info!(url = %urls.http, profiles = config.profiles.len(), machines = config.machines.len(), "HTTP boot serving");
    Ok((
        listener,
        http::router(http::HttpState {
            root,
            policy,
            urls,
            gate,
        }),
    ))
}

/// In full mode pxed knows which machine holds which address: TFTP and HTTP
/// then refuse boot files to a machine marked not to netboot.
fn file_gate(settings: &Settings, control: &Arc<Control>) -> Option<Arc<dyn FileGate>> {
    (settings.dhcp == DhcpMode::Full).then(|| Arc::clone(control) as Arc<dyn FileGate>)
}

/// The inventory (durable when the API may change it, or when an earlier
/// run left one), laid over the file's policy and published.
pub fn control(
    settings: &Settings,
    policy: &SharedPolicy,
    engine: Option<Arc<Mutex<Engine>>>,
    answers: Option<Arc<KernelAnswers>>,
    observer: &Arc<Observer>,
    cluster: Option<&Arc<Cluster>>,
) -> anyhow::Result<Control> {
    let path = &settings.inventory_file;
    let store: Box<dyn InventoryStore> = if let (Some(url), Some(cluster)) =
        (&settings.lease_store, cluster)
    {
        // Beside the leases: every server on the database sees one inventory.
        Box::new(
            tokio::task::block_in_place(|| PostgresInventoryStore::open(url, Arc::clone(cluster)))
                .context("opening the inventory in the lease database (--lease-store)")?,
        )
    } else if settings.api.is_some() || path.exists() {
        Box::new(
            RedbInventoryStore::open(path)
                .context("opening the inventory database (--inventory-file)")?,
        )
    } else {
        Box::new(MemInventoryStore::default())
    };
    let inventory = tokio::task::block_in_place(|| Inventory::load(store))
        .context("reading the inventory database")?;
    if !inventory.machines().is_empty() || !inventory.profiles().is_empty() {
        info!(
            machines = inventory.machines().len(),
            profiles = inventory.profiles().len(),
            inventory = %path.display(),
            "inventory laid over the config file"
        );
    }
    let engine_config = match &engine {
        Some(_) => Some(settings.engine_config(&settings.config)?),
        None => None,
    };
    let provision = settings
        .api
        .as_ref()
        .map(|(_, token)| ProvisionKey::from_secret(token.as_bytes()));
    let webhook = settings.decision.as_ref().map(|d| {
        info!(url = %d.url, ask = ?d.ask, timeout_ms = d.timeout.as_millis() as u64, "decision webhook: asked for the machines it decides for");
        Arc::new(Webhook::new(
            &d.url,
            d.ask,
            d.timeout,
            d.cache,
            tokio::runtime::Handle::current(),
        ))
    });
    Ok(Control::new(
        Settings::policy(&settings.config),
        engine_config,
        inventory,
        Paths {
            policy: policy.clone(),
            engine,
            answers,
            provision,
            webhook,
            observer: Arc::clone(observer),
            cluster: cluster.cloned(),
        },
    ))
}

/// How the operator API is served.
pub struct Api<'a> {
    pub address: SocketAddr,
    pub token: &'a str,
    /// `GET /metrics` needs no token.
    pub metrics_public: bool,
    pub observer: &'a Arc<Observer>,
}

/// The operator API on its management address.
pub async fn start_api(
    api: &Api<'_>,
    control: &Arc<Control>,
    xdp_modes: &XdpModes,
    services: &mut Services,
) -> anyhow::Result<()> {
    let address = api.address;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the API to {address} (--api)"))?;
    let attached: Vec<(String, String)> = xdp_modes
        .iter()
        .map(|(i, m)| {
            let how = m.map_or_else(|| "tc only".to_owned(), |m| format!("xdp {m}"));
            (i.clone(), how)
        })
        .collect();
    let router = api::router(api::ApiState {
        control: Arc::clone(control),
        token: api.token.into(),
        attached: attached.into(),
        observer: Arc::clone(api.observer),
        metrics_public: api.metrics_public,
    });
    info!(%address, "API serving (docs/API.md)");
    services.spawn("API".to_owned(), async move {
        axum::serve(listener, router).await
    });
    Ok(())
}

/// How long a burst that writes waits for more requests (see
/// `Listener::with_commit_linger`): one commit then carries more leases.
/// On redb a commit is an fsync: 2 ms took pxed's CPU for new machines at
/// 4,000/s from 2.9 s to 2.2 s (1 ms: 2.4 s; docs/BENCHMARKS.md, DHCP for
/// new machines). On PostgreSQL it is a round trip, and 1 ms was measured
/// there (docs/benchmarks/cluster.md).
const REDB_COMMIT_LINGER: std::time::Duration = std::time::Duration::from_millis(2);
const POSTGRES_COMMIT_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// What the DHCP service shares with the rest of the daemon.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    /// The kernel's DHCP templates, when the kernel answers.
    pub answers: Option<&'a Arc<KernelAnswers>>,
    /// The kernel's admission limits, when they are on.
    pub admission: Option<&'a Arc<KernelAdmission>>,
    pub policy: &'a SharedPolicy,
    pub observer: &'a Arc<Observer>,
    /// This server among others on a shared lease database.
    pub cluster: Option<&'a Arc<Cluster>>,
}

/// Opens the lease store, builds the engine, opens 67 and 4011 on every
/// interface and starts one task per interface.
pub fn start_dhcp(
    settings: &Settings,
    served: &[(String, Ipv4Addr)],
    xdp_modes: &XdpModes,
    shared: &Shared<'_>,
    services: &mut Services,
) -> anyhow::Result<Arc<Mutex<Engine>>> {
    let Shared {
        answers,
        admission,
        policy,
        observer,
        cluster,
    } = *shared;
    let mode = settings.dhcp;
    let engine_config = settings.engine_config(&settings.config)?;
    let subnets = subnet_names(&engine_config);
    let store: Box<dyn LeaseStore> = match (mode, &settings.lease_store) {
        (DhcpMode::Full, Some(url)) => {
            let server = cluster.map_or("", |c| c.id());
            let store = tokio::task::block_in_place(|| PostgresLeaseStore::open(url, server))
                .context("opening the lease database (--lease-store)")?;
            info!(database = %postgres_store::without_password(url), "leases in PostgreSQL");
            Box::new(store)
        }
        (DhcpMode::Full, None) => Box::new(open_leases(&settings.lease_file)?),
        // Proxy mode hands out no addresses: nothing to remember.
        (_, _) => Box::new(MemLeaseStore::default()),
    };
    let mut engine =
        tokio::task::block_in_place(|| Engine::new(engine_config, policy.clone(), store))
            .context("reading the lease database")?;
    if let Some(cluster) = cluster {
        engine.share_pools(cluster.pool_share());
    }
    let engine = Arc::new(Mutex::new(engine));
    observer.watch_engine(&engine);
    let mut listeners = Vec::new();
    for (interface, address) in served {
        let mut listener = Listener::open(interface, *address, mode == DhcpMode::Proxy)?;
        if mode == DhcpMode::Full {
            listener = listener.with_commit_linger(if settings.lease_store.is_some() {
                POSTGRES_COMMIT_LINGER
            } else {
                REDB_COMMIT_LINGER
            });
        }
        if let Some(admission) = admission {
            listener = listener.with_admission(Arc::clone(admission), netif::index(interface)?);
        }
        if let Some(answers) = answers {
            let xdp_tx =
                netif::xdp_can_transmit(interface, xdp_modes.get(interface).copied().flatten());
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
        leases = %match (mode, &settings.lease_store) {
            (DhcpMode::Full, Some(url)) => postgres_store::without_password(url),
            (DhcpMode::Full, None) => settings.lease_file.display().to_string(),
            _ => "-".into(),
        },
        "DHCP serving on ports 67 and 4011"
    );
    for listener in listeners {
        info!(interface = %listener.interface, server = %listener.address, "DHCP listening");
        let name = format!("DHCP ({})", listener.interface);
        services.spawn(
            name,
            dhcp::driver::run(Arc::clone(&engine), listener, Arc::clone(observer)),
        );
    }
    Ok(engine)
}

fn subnet_names(config: &EngineConfig) -> Vec<String> {
    config
        .subnets
        .iter()
        .map(|s| s.network.to_string())
        .collect()
}

fn open_leases(path: &Path) -> anyhow::Result<RedbLeaseStore> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the lease directory {}", dir.display()))?;
    }
    RedbLeaseStore::open(path).context("opening the lease database (--lease-file)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_block_fits_the_mtu_and_the_kernel_tiers() {
        assert_eq!(default_max_blksize(1500, false), 1468);
        assert_eq!(default_max_blksize(9000, false), 8968);
        assert_eq!(default_max_blksize(9000, true), MAX_FAST_BLKSIZE as u16);
        assert_eq!(
            default_max_blksize(100, false),
            512,
            "never below RFC 1350's block"
        );
        assert_eq!(
            default_max_blksize(70_000, false),
            65464,
            "never above RFC 2348's largest"
        );
    }
}
