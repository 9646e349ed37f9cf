//! The command line of `pxed`: every flag, its default and its help text.
//! Parsed here, merged with the config file in [`crate::settings`].

use std::{net::Ipv4Addr, path::PathBuf};

use clap::Parser;

use crate::{config::DhcpMode, ctl::CtlArgs, fastpath::XdpModeChoice};

/// What `pxed` does other than serve.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Read and change a running pxed through its operator API (machines,
    /// profiles, leases, reimaging, health).
    Ctl(CtlArgs),
}

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
///
/// `pxed ctl ...` talks to a running pxed's operator API instead (see
/// `pxed ctl --help`).
#[derive(Debug, Parser)]
#[command(
    name = "pxed",
    version,
    about,
    long_about,
    verbatim_doc_comment,
    // `pxed -i eth1 ...` runs the daemon as it always has; a subcommand
    // stands alone, so a daemon flag before `ctl` is an error, not ignored.
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Without one, pxed runs the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file (TOML): DHCP subnets, profiles, machines, service settings.
    /// See docs/pxed.example.toml. Flags override what it says.
    #[arg(short, long, value_name = "FILE", env = "PXED_CONFIG")]
    pub config: Option<PathBuf>,

    /// Check the config file and exit: prints what it defines, or the file,
    /// line and key of the first error.
    #[arg(long, requires = "config")]
    pub check_config: bool,

    /// With --check-config: say which class, profile, boot file and DHCP
    /// options a request like this one would get (repeatable), e.g.
    /// `--explain 52:54:00:12:34:56,uefi-x64,vendor_class=PXEClient:Arch:00007`.
    /// A sample is MAC[,ARCH][,KEY=VALUE]... with KEY one of arch (a name or
    /// option 93's number), vendor_class (60), user_class (77), relay
    /// (giaddr), circuit_id and remote_id (82: text, or hex as 00:1a:2b)
    /// and client (pxe, ipxe, http; else read from 60 and 77 as pxed does).
    #[arg(long, requires = "check_config", value_name = "SAMPLE")]
    pub explain: Vec<crate::explain::Sample>,

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
    pub interface: Vec<String>,

    /// DHCP role: `proxy` answers PXE clients with boot information only and
    /// leaves addresses to the network's DHCP server; `full` hands out
    /// addresses too (needs --range or [[dhcp.subnet]]); `off` serves files
    /// only [default: the config's, else proxy].
    #[arg(long, value_enum, value_name = "MODE")]
    pub dhcp: Option<DhcpMode>,

    /// Address pool for `--dhcp full` on the network of one of the
    /// interfaces, e.g. 10.9.0.100-10.9.0.199 (repeatable).
    #[arg(long, value_name = "FIRST-LAST")]
    pub range: Vec<String>,

    /// Router (option 3) for the --range subnets.
    #[arg(long, value_name = "IP")]
    pub router: Option<Ipv4Addr>,

    /// Lease time in seconds for the --range subnets.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub lease_time: u32,

    /// Lease database (full mode). Every ACKed lease is on disk before the
    /// ACK leaves [default: /var/lib/pxed/leases.redb].
    #[arg(long, value_name = "FILE")]
    pub lease_file: Option<PathBuf>,

    /// Keep leases, and the API's machines and profiles, in PostgreSQL
    /// instead of --lease-file and --inventory-file, e.g.
    /// `postgres://pxed:PASSWORD@db.example/pxed` (or
    /// `postgres://pxed@%2Frun%2Fpostgresql/pxed` for a Unix socket). pxed
    /// creates and migrates its tables; every lease is committed there
    /// before its ACK leaves. Several pxed on one database share its pools
    /// and inventory (docs/CLUSTER.md). Config: `[dhcp] store = "URL"`.
    #[arg(long, value_name = "URL", env = "PXED_LEASE_STORE", value_parser = postgres_url, conflicts_with = "lease_file")]
    pub lease_store: Option<String>,

    /// NAK requests for addresses pxed has no record of (RFC 2131 §4.3.2).
    /// Only for the one DHCP server of a network.
    #[arg(long)]
    pub authoritative: bool,

    /// How to attach the XDP program: `auto` tries native (driver) mode, then
    /// generic, and logs which it got; `off` leaves XDP out entirely.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto, env = "PXED_XDP_MODE")]
    pub xdp_mode: XdpModeChoice,

    /// Do not attach the TC ingress program (the fallback tier for drivers
    /// whose XDP frames have no room to grow).
    #[arg(long, env = "PXED_NO_TC")]
    pub no_tc: bool,

    /// Answer every DHCP request in userspace. By default, once pxed has
    /// answered a client, the XDP/TC programs answer its next request of
    /// the same kind themselves (same reply, byte for byte); leases are
    /// then stored for twice the lease time so that every renewal the
    /// kernel ACKs is already on disk.
    #[arg(long, env = "PXED_NO_KERNEL_DHCP")]
    pub no_kernel_dhcp: bool,

    /// Turn off admission control: every DHCP request and TFTP read request
    /// the kernel does not answer reaches userspace, however many. By
    /// default the XDP (or TC) program drops what exceeds the `--admit-*`
    /// budgets and counts it (docs/ADMISSION.md); machines pxed knows are
    /// always admitted. Also `[admission] enabled = false`.
    #[arg(long)]
    pub no_admission: bool,

    /// DHCP requests a second admitted from machines pxed does not know (no
    /// reservation, inventory entry, lease or held offer), per interface
    /// and per relay; 0: unlimited [default: 2000].
    #[arg(long, value_name = "PER_SECOND", value_parser = rate)]
    pub admit_dhcp_unknown: Option<f64>,

    /// How many of those are admitted at once from a full budget: a rack
    /// powering on together [default: 20000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub admit_dhcp_unknown_burst: Option<u32>,

    /// DISCOVERs a second admitted from any one MAC, known or not; 0:
    /// unlimited [default: 10].
    #[arg(long, value_name = "PER_SECOND", value_parser = rate)]
    pub admit_discover_per_mac: Option<f64>,

    /// New TFTP transfers (read requests to port 69) a second admitted in
    /// all; 0: unlimited. Transfers already running are never limited
    /// [default: 2000].
    #[arg(long, value_name = "PER_SECOND", value_parser = rate)]
    pub admit_tftp: Option<f64>,

    /// How many new TFTP transfers are admitted at once [default: 20000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub admit_tftp_burst: Option<u32>,

    /// New TFTP transfers a second admitted from one client address; 0:
    /// unlimited [default: 20].
    #[arg(long, value_name = "PER_SECOND", value_parser = rate)]
    pub admit_tftp_per_source: Option<f64>,

    /// How many at once from one client address [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub admit_tftp_per_source_burst: Option<u32>,

    /// Kernel memory for boot images the XDP/TC tiers serve from, in MiB.
    /// Files are loaded on first request while it lasts; others are served
    /// from userspace. With `--xdp-mode off --no-tc` none is used.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub fastpath_memory: u32,

    /// Directory served over TFTP (and HTTP): boot loaders, kernels, initrds.
    /// Nothing outside it is ever served. Without it, file serving is off.
    #[arg(long, value_name = "DIR", env = "PXED_BOOT_ROOT")]
    pub boot_root: Option<PathBuf>,

    /// Largest TFTP block size granted. Default: the interface MTU minus the
    /// IPv4, UDP and TFTP headers (1468 at MTU 1500), so no DATA fragments;
    /// with the kernel tiers on, at most 1468, the largest block they build
    /// (a larger one is served from userspace).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(8..=65464))]
    pub tftp_max_blksize: Option<u16>,

    /// UDP port for TFTP requests. Firmware always asks on 69; change it only
    /// to test.
    #[arg(long, default_value_t = 69, value_name = "PORT")]
    pub tftp_port: u16,

    /// Largest TFTP window (RFC 7440 windowsize) granted [default: 64].
    #[arg(long, value_name = "BLOCKS", value_parser = clap::value_parser!(u16).range(1..))]
    pub tftp_max_windowsize: Option<u16>,

    /// TFTP transfers one client address may run at once. A machine needs
    /// one; raise it for load generators that share an address.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub tftp_max_per_client: usize,

    /// Answer every TFTP transfer from port 69 (the request port) instead of
    /// a fresh port per transfer, told apart by the client's address and
    /// port: for firewalls and NAT that pass only port 69 (a BMC across
    /// subnets). The kernel tiers serve these transfers too. Also
    /// `[tftp] single_port = true`.
    #[arg(long)]
    pub tftp_single_port: bool,

    /// Send TFTP windows one packet per system call instead of one UDP GSO
    /// send per window (for measurement, or a path where GSO misbehaves).
    #[arg(long)]
    pub tftp_no_gso: bool,

    /// TCP port of HTTP boot (boot root files and iPXE scripts); 0 turns it
    /// off [default: 80].
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,

    /// Serve the operator API (JSON over HTTP, docs/API.md) on this
    /// management address, e.g. 127.0.0.1:8067. Off unless given; keep it
    /// off the boot networks. Needs --api-token-file.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        requires = "api_token_file",
        env = "PXED_API"
    )]
    pub api: Option<std::net::SocketAddr>,

    /// File holding the API's bearer token (one line; e.g. `openssl rand
    /// -hex 32 > /etc/pxed/api-token`). Every API request must send
    /// `Authorization: Bearer TOKEN`; machines' {{provision_token}}s are
    /// derived from it.
    #[arg(long, value_name = "FILE", env = "PXED_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,

    /// Where the machines and profiles the API writes are kept (durable
    /// across restarts) [default: /var/lib/pxed/inventory.redb].
    #[arg(long, value_name = "FILE")]
    pub inventory_file: Option<PathBuf>,

    /// A decision webhook, pixiecore's API: for machines neither the config
    /// nor the API names (see --decision-for), pxed asks `GET
    /// URL/v1/boot/MAC?arch=NAME` and boots what it answers (`kernel`,
    /// `initrd`, `cmdline`, or pxed's `profile`); non-200 means do not boot.
    /// DHCP never waits on it: an unanswered machine is answered on its
    /// retransmission, from the cache.
    #[arg(long, value_name = "URL")]
    pub decision_url: Option<String>,

    /// Which machines the webhook decides for.
    #[arg(long, value_enum, default_value_t = crate::policy::webhook::Ask::Unknown, requires = "decision_url")]
    pub decision_for: crate::policy::webhook::Ask,

    /// How long a webhook call may take before the configured policy decides.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        requires = "decision_url"
    )]
    pub decision_timeout_ms: u64,

    /// How long a webhook answer is reused.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 60,
        requires = "decision_url"
    )]
    pub decision_cache_secs: u64,

    /// Let `GET /metrics` on the API listener answer without the bearer
    /// token (for a Prometheus that cannot send one). The rest of the API
    /// still needs it.
    #[arg(long, requires = "api")]
    pub metrics_public: bool,

    /// How many machines' boot timelines are kept (each its last 4 boots);
    /// past it, the longest-known machine is forgotten first. A machine
    /// costs about 1 KiB (docs/OBSERVABILITY.md).
    #[arg(long, value_name = "N", default_value_t = crate::observe::DEFAULT_TIMELINE_MACHINES)]
    pub timeline_machines: usize,

    /// Most memory the boot timelines may take, in MiB; past it, too, the
    /// longest-known machine is forgotten first.
    #[arg(long, value_name = "MIB", default_value_t = crate::observe::DEFAULT_TIMELINE_MIB)]
    pub timeline_memory: usize,

    /// Keep no metrics and no boot timelines (for measuring what they cost);
    /// `/metrics` and the boots endpoints then answer 404.
    #[arg(long)]
    pub no_observe: bool,

    /// Once its programs are attached and its ports bound, run as this user
    /// (`pxed`, which the Debian package creates), keeping only CAP_BPF (to
    /// update its maps) and CAP_NET_ADMIN (to detach its programs at exit),
    /// in every thread. Its lease and inventory files become the user's;
    /// the config file and the boot root must be readable by it (SIGHUP
    /// reads them again).
    #[arg(long, value_name = "USER", env = "PXED_USER")]
    pub user: Option<String>,

    /// Seconds between counter lines in the log (only when something changed);
    /// 0 logs them only at exit. SIGUSR1 logs them at any time.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub stats_interval: u64,
}

pub(crate) fn postgres_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{:?} is not a PostgreSQL URL (postgres://USER:PASSWORD@HOST/DATABASE)",
            crate::lease::postgres_store::without_password(s)
        ))
    }
}

/// A rate per second: a number, 0 or more (0: unlimited).
fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate per second (a number, 0 or more; 0: unlimited)"
        )),
    }
}
