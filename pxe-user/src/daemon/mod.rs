//! The daemon's life: programs attached, services started from the
//! [`Settings`], then signals until a stop: SIGHUP reloads the config file,
//! SIGUSR1 logs counters, SIGINT/SIGTERM stop. A service that ends on its
//! own ends the daemon with its name and error.

mod found_ipxe;
mod notify;
mod services;

use std::{
    collections::HashMap,
    future::Future,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    task::{Id, JoinSet},
};
use tracing::{error, info, warn};

pub use self::{
    found_ipxe::{FoundIpxe, IPXE_DIR},
    services::default_max_blksize,
};
use crate::{
    config::{Config, DhcpMode},
    control::Control,
    dhcp::engine::Engine,
    fastpath::{
        enforcing_tier, CounterSnapshot, Counters, FastPath, KernelAdmission, KernelAnswers,
        XdpModeChoice,
    },
    netif,
    observe::Observer,
    policy::SharedPolicy,
    settings::Settings,
};

/// The long-running service tasks, each with the name it is reported by.
#[derive(Default)]
pub struct Services {
    tasks: JoinSet<std::io::Result<()>>,
    names: HashMap<Id, String>,
}

impl Services {
    pub fn spawn(
        &mut self,
        name: String,
        service: impl Future<Output = std::io::Result<()>> + Send + 'static,
    ) {
        let id = self.tasks.spawn(service).id();
        self.names.insert(id, name);
    }

    /// Waits for the first service to end and says which and how; never
    /// returns while there are none.
    pub async fn first_to_end(&mut self) -> anyhow::Error {
        let Some(ended) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let id = match &ended {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.get(&id).map_or("unnamed", String::as_str);
        match ended {
            Ok((_, Ok(()))) => anyhow::anyhow!("the {name} server stopped"),
            Ok((_, Err(e))) => anyhow::anyhow!("the {name} server failed: {e}"),
            Err(e) => anyhow::anyhow!("the {name} server crashed: {e}"),
        }
    }
}

/// What the signal loop works with once everything is started.
struct Running {
    settings: Settings,
    fastpath: Arc<Mutex<FastPath>>,
    /// Where SIGHUP's reload goes, like every other change.
    control: Arc<Control>,
    engine: Option<Arc<Mutex<Engine>>>,
    answers: Option<Arc<KernelAnswers>>,
    services: Services,
    /// Kept for its lifetime: the iPXE copy is removed when the daemon ends.
    _found_ipxe: Option<FoundIpxe>,
}

/// The stop, reload and counters signals, installed before anything is
/// attached: a stop signal that arrives while the programs load must still
/// end in a clean detach, not in the default action.
struct Signals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            usr1: install(SignalKind::user_defined1(), "SIGUSR1")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// Attaches, starts the services, then serves until a stop signal.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let running = start(settings).await?;
    running.serve_until_stopped(signals).await
}

async fn start(settings: Settings) -> anyhow::Result<Running> {
    let (fastpath, xdp_modes) = services::attach_programs(&settings)?;
    let fastpath = Arc::new(Mutex::new(fastpath));
    let mut services = Services::default();
    let served = served_addresses(&settings)?;
    let policy = SharedPolicy::new(Settings::policy(&settings.config));
    let observer = Arc::new(if settings.observe {
        Observer::new(settings.timeline_machines, settings.timeline_bytes)
    } else {
        info!("metrics and boot timelines off (--no-observe)");
        Observer::off()
    });
    observer.watch_fastpath(&fastpath);

    let admission = start_admission(&settings, &fastpath)?;
    let answers = settings.kernel_answers().then(|| {
        Arc::new(KernelAnswers::new(
            Arc::clone(&fastpath),
            Arc::clone(&observer),
        ))
    });
    // Servers sharing a database: this one's identity among them.
    let cluster = settings
        .lease_store
        .as_ref()
        .map(|_| Arc::new(crate::cluster::Cluster::new()));
    let engine = if settings.dhcp == DhcpMode::Off {
        info!("DHCP off");
        None
    } else {
        let engine = services::start_dhcp(
            &settings,
            &served,
            &xdp_modes,
            &services::Shared {
                answers: answers.as_ref(),
                admission: admission.as_ref(),
                policy: &policy,
                observer: &observer,
                cluster: cluster.as_ref(),
            },
            &mut services,
        )?;
        if let Some(admission) = &admission {
            tokio::spawn(follow_known_machines(
                Arc::clone(admission),
                Arc::clone(&engine),
            ));
        }
        Some(engine)
    };
    // The inventory over the file: published before any file is served.
    let control = Arc::new(services::control(
        &settings,
        &policy,
        engine.clone(),
        answers.clone(),
        &observer,
        cluster.as_ref(),
    )?);
    if let (Some(url), Some(cluster)) = (&settings.lease_store, &cluster) {
        let (url, cluster, control) = (url.clone(), Arc::clone(cluster), Arc::clone(&control));
        tokio::task::block_in_place(|| crate::cluster::feed::start(&url, cluster, control))
            .map_err(|e| anyhow::anyhow!("starting the change feed (--lease-store): {e}"))?;
    }

    let found_ipxe = if settings.boot_root.is_none() {
        FoundIpxe::copy(std::path::Path::new(IPXE_DIR), &std::env::temp_dir())
    } else {
        None
    };
    let boot_root = settings
        .boot_root
        .clone()
        .or_else(|| found_ipxe.as_ref().map(|f| f.path().to_owned()));
    match &boot_root {
        Some(dir) if !served.is_empty() => {
            services::start_file_services(
                &settings,
                &served,
                dir,
                &fastpath,
                &policy,
                &control,
                &mut services,
            )
            .await?;
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
    if let Some((address, token)) = &settings.api {
        let api = services::Api {
            address: *address,
            token,
            metrics_public: settings.metrics_public,
            observer: &observer,
        };
        services::start_api(&api, &control, &xdp_modes, &mut services).await?;
    }
    if let Some(user) = &settings.user {
        let owned = [
            settings.lease_file.as_path(),
            settings.inventory_file.as_path(),
        ];
        tokio::task::block_in_place(|| crate::privileges::become_user(user, &owned))?;
        info!(%user, kept = "CAP_BPF, CAP_NET_ADMIN", "running as {user} from now on, in every thread");
    }
    Ok(Running {
        settings,
        fastpath,
        control,
        answers,
        engine,
        services,
        _found_ipxe: found_ipxe,
    })
}

/// Sets the programs' admission limits, unless the operator turned them
/// off or no program is attached to enforce them.
fn start_admission(
    settings: &Settings,
    fastpath: &Arc<Mutex<FastPath>>,
) -> anyhow::Result<Option<Arc<KernelAdmission>>> {
    let Some(limits) = &settings.admission else {
        info!("admission control off (--no-admission): every request reaches userspace");
        return Ok(None);
    };
    if !settings.kernel_tiers() {
        info!("admission control off: it runs in the XDP or TC program, and both are off");
        return Ok(None);
    }
    let xdp = settings.xdp_mode != XdpModeChoice::Off;
    let ifindexes = settings
        .interfaces
        .iter()
        .map(|i| netif::index(i))
        .collect::<Result<Vec<_>, _>>()?;
    let config = limits.kernel_config(enforcing_tier(xdp));
    let admission = KernelAdmission::start(Arc::clone(fastpath), config, &ifindexes)
        .context("setting the kernel's admission limits")?;
    info!(
        program = if xdp { "xdp" } else { "tc" },
        dhcp_unknown_per_s = limits.dhcp_unknown_rate,
        dhcp_unknown_burst = limits.dhcp_unknown_burst,
        discover_per_mac_per_s = limits.dhcp_discover_per_mac,
        tftp_per_s = limits.tftp_rate,
        tftp_burst = limits.tftp_burst,
        tftp_per_source_per_s = limits.tftp_per_source,
        tftp_per_source_burst = limits.tftp_per_source_burst,
        "admission control on (0: unlimited; --no-admission turns it off)"
    );
    Ok(Some(Arc::new(admission)))
}

/// How often the kernel's known machines are made the daemon's again: a
/// machine whose lease ended leaves it within this, one the API added joins.
const KNOWN_MACHINES_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the kernel's known machines those the engine knows.
async fn follow_known_machines(admission: Arc<KernelAdmission>, engine: Arc<Mutex<Engine>>) {
    let mut ticker = tokio::time::interval(KNOWN_MACHINES_PERIOD);
    loop {
        ticker.tick().await;
        let (admission, engine) = (Arc::clone(&admission), Arc::clone(&engine));
        let followed = tokio::task::spawn_blocking(move || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // The engine is locked inside the table's lock, never the other
            // way round: the DHCP threads tell the table after the engine.
            admission.reconcile(|| {
                engine
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .known_macs(now)
            });
        });
        if followed.await.is_err() {
            return;
        }
    }
}

/// Each interface's first address: what its services bind to and answer
/// from. None are needed when nothing is served but the programs.
fn served_addresses(settings: &Settings) -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
    if settings.boot_root.is_none() && settings.dhcp == DhcpMode::Off {
        return Ok(Vec::new());
    }
    settings
        .interfaces
        .iter()
        .map(|i| Ok((i.clone(), netif::ipv4_address(i)?)))
        .collect()
}

impl Running {
    async fn serve_until_stopped(mut self, mut signals: Signals) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(stats_period(self.settings.stats_interval));
        ticker.tick().await; // the first tick is immediate
        let mut last = self.counters()?;
        if let Some(answers) = &self.answers {
            tokio::spawn(log_kernel_answers(Arc::clone(answers)));
        }
        info!("serving; SIGHUP reloads the config, SIGUSR1 logs counters, SIGINT/SIGTERM stops");
        notify::send("READY=1");
        let failed = loop {
            tokio::select! {
                _ = signals.term.recv() => { info!("SIGTERM: stopping"); break None; }
                _ = signals.int.recv() => { info!("SIGINT: stopping"); break None; }
                _ = signals.hup.recv() => {
                    notify::send(&notify::reloading());
                    self.reload();
                    notify::send("READY=1");
                }
                _ = signals.usr1.recv() => {
                    log_counters("counters", &self.counters()?);
                    self.log_dhcp_stats();
                }
                e = self.services.first_to_end() => break Some(e),
                _ = ticker.tick() => match self.counters() {
                    Ok(now) if now != last => {
                        log_counters("counters", &now);
                        self.log_dhcp_stats();
                        last = now;
                    }
                    Ok(_) => {}
                    Err(e) => warn!("reading counters: {e}"),
                },
            }
        };
        if let Some(answers) = &self.answers {
            answers.log_new_answers();
        }
        log_counters("final counters", &self.counters()?);
        self.log_dhcp_stats();
        notify::send("STOPPING=1");
        // The services stop before the programs are detached.
        drop(self.services);
        drop(self.fastpath);
        info!("programs detached; bye");
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        self.fastpath
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()
            .context("reading the programs' counters")
    }

    /// SIGHUP: re-read the config file; a bad one is refused and the old one
    /// keeps serving. Leases and the API's inventory are untouched (the
    /// inventory stays laid over the new file).
    fn reload(&self) {
        let Some(path) = &self.settings.config_path else {
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
        let engine_config = match self
            .engine
            .as_ref()
            .map(|_| self.settings.engine_config(&config))
            .transpose()
        {
            Ok(c) => c,
            Err(e) => {
                error!("SIGHUP: the new config is refused, the old one keeps serving: {e:#}");
                return;
            }
        };
        // DHCP, HTTP, TFTP and the kernel's templates all switch here.
        self.control
            .reload_file(Settings::policy(&config), engine_config);
        info!(
            profiles = config.profiles.len(),
            machines = config.machines.len(),
            subnets = config.subnets.len(),
            "SIGHUP: config reloaded from {}",
            path.display()
        );
    }

    fn log_dhcp_stats(&self) {
        let Some(engine) = &self.engine else {
            return;
        };
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

/// `--stats-interval`: 0 means only at exit (a tick that never comes).
fn stats_period(seconds: u64) -> Duration {
    Duration::from_secs(if seconds == 0 { u64::MAX / 4 } else { seconds })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_service_to_end_is_named_with_how_it_ended() {
        let mut services = Services::default();
        services.spawn("slow".into(), std::future::pending());
        services.spawn("TFTP (eth1)".into(), async {
            Err(std::io::Error::other("port gone"))
        });
        let e = services.first_to_end().await;
        assert_eq!(e.to_string(), "the TFTP (eth1) server failed: port gone");
        services.spawn("HTTP (eth1)".into(), async { panic!("boom") });
        let e = services.first_to_end().await;
        assert!(
            e.to_string()
                .starts_with("the HTTP (eth1) server crashed: "),
            "{e}"
        );
    }

    #[test]
    fn a_zero_stats_interval_never_ticks_in_practice() {
        assert_eq!(stats_period(10), Duration::from_secs(10));
        assert!(stats_period(0) > Duration::from_secs(1 << 60));
    }
}
