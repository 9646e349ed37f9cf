//! The config file and the flags, merged into what the daemon runs with.
//! Flags win over the file; the file wins over the embedded defaults. Pure
//! apart from [`Settings::engine_config`], which asks the interfaces for
//! their networks.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::bail;
use ipnet::Ipv4Net;

use crate::{
    cli::Cli,
    config::{AdmissionKeys, Config, DhcpMode},
    dhcp::{
        engine::{EngineConfig, Mode},
        pool::{parse_range, Subnet},
    },
    fastpath::{AdmissionLimits, XdpModeChoice},
    netif,
    policy::r#static::StaticPolicy,
};

/// Where leases live when neither the flags nor the file say.
pub const DEFAULT_LEASE_FILE: &str = "/var/lib/pxed/leases.redb";
/// Where the API's inventory lives when neither the flags nor the file say.
pub const DEFAULT_INVENTORY_FILE: &str = "/var/lib/pxed/inventory.redb";
/// Largest TFTP window granted when neither the flags nor the file say.
pub const DEFAULT_MAX_WINDOWSIZE: u16 = 64;
/// HTTP boot's port when neither the flags nor the file say.
pub const DEFAULT_HTTP_PORT: u16 = 80;
/// The shortest lease a `--range` subnet hands out, whatever `--lease-time` says.
const MIN_LEASE_TIME: u32 = 60;

/// `--decision-url` and its knobs.
#[derive(Debug, Clone)]
pub struct Decision {
    pub url: String,
    pub ask: crate::policy::webhook::Ask,
    pub timeout: std::time::Duration,
    pub cache: std::time::Duration,
}

#[derive(Debug)]
pub struct Settings {
    pub config_path: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub dhcp: DhcpMode,
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
    pub router: Option<Ipv4Addr>,
    pub lease_time: u32,
    pub lease_file: PathBuf,
    /// PostgreSQL instead of `lease_file`, when given.
    pub lease_store: Option<String>,
    pub authoritative: bool,
    pub xdp_mode: XdpModeChoice,
    pub no_tc: bool,
    pub no_kernel_dhcp: bool,
    /// The kernel's admission limits; `None`: admission off.
    pub admission: Option<AdmissionLimits>,
    pub fastpath_memory: u32,
    pub boot_root: Option<PathBuf>,
    pub tftp_port: u16,
    pub tftp_max_blksize: Option<u16>,
    pub tftp_max_windowsize: u16,
    pub tftp_max_per_client: usize,
    pub tftp_single_port: bool,
    pub tftp_gso: bool,
    pub http_port: u16,
    pub stats_interval: u64,
    /// The operator API's address and its bearer token (read from the file).
    pub api: Option<(std::net::SocketAddr, String)>,
    pub inventory_file: PathBuf,
    /// `GET /metrics` needs no token.
    pub metrics_public: bool,
    /// Machines whose timelines are kept, and the memory they may take.
    pub timeline_machines: usize,
    pub timeline_bytes: usize,
    pub observe: bool,
    /// The user to run as once started (`--user`).
    pub user: Option<String>,
    /// The decision webhook, if one is configured.
    pub decision: Option<Decision>,
    /// The file as loaded (defaults when there is none).
    pub config: Config,
}

impl Settings {
    /// Flags over file; refuses combinations that cannot serve.
    pub fn merge(cli: Cli, config: Config) -> anyhow::Result<Self> {
        let admission = admission_limits(&cli, &config.admission);
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
        let api = match (cli.api, &cli.api_token_file) {
            (Some(addr), Some(file)) => Some((addr, read_token(file)?)),
            _ => None,
        };
        let decision = match &cli.decision_url {
            Some(url) if !url.starts_with("http://") => {
                bail!("--decision-url {url}: want an http:// URL (its /v1/boot/MAC is asked; put a local TLS proxy in front of an https one)")
            }
            Some(url) => Some(Decision {
                url: url.clone(),
                ask: cli.decision_for,
                timeout: std::time::Duration::from_millis(cli.decision_timeout_ms.max(1)),
                cache: std::time::Duration::from_secs(cli.decision_cache_secs),
            }),
            None => None,
        };
        Ok(Self {
            decision,
            api,
            inventory_file: cli
                .inventory_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_INVENTORY_FILE)),
            config_path: cli.config,
            interfaces,
            dhcp,
            ranges,
            router: cli.router,
            lease_time: cli.lease_time,
            // The command line's choice of store wins over the file's.
            lease_store: match (&cli.lease_store, &cli.lease_file) {
                (Some(url), _) => Some(url.clone()),
                (None, Some(_)) => None,
                (None, None) => config.lease_store.clone(),
            },
            lease_file: cli
                .lease_file
                .or_else(|| config.lease_file.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_LEASE_FILE)),
            authoritative: cli.authoritative || config.authoritative,
            xdp_mode: cli.xdp_mode,
            no_tc: cli.no_tc,
            no_kernel_dhcp: cli.no_kernel_dhcp || !config.kernel_answers,
            admission,
            fastpath_memory: cli.fastpath_memory,
            boot_root: cli.boot_root.or_else(|| config.boot_root.clone()),
            tftp_port: cli.tftp_port,
            tftp_max_blksize: cli.tftp_max_blksize.or(config.tftp_max_blksize),
            tftp_max_windowsize: cli
                .tftp_max_windowsize
                .or(config.tftp_max_windowsize)
                .unwrap_or(DEFAULT_MAX_WINDOWSIZE),
            tftp_max_per_client: cli.tftp_max_per_client,
            tftp_single_port: cli.tftp_single_port || config.tftp_single_port,
            tftp_gso: !cli.tftp_no_gso,
            http_port: cli
                .http_port
                .or(config.http_port)
                .unwrap_or(DEFAULT_HTTP_PORT),
            stats_interval: cli.stats_interval,
            metrics_public: cli.metrics_public,
            timeline_machines: cli.timeline_machines,
            timeline_bytes: cli.timeline_memory.saturating_mul(1 << 20),
            observe: !cli.no_observe,
            user: cli.user.clone(),
            config,
        })
    }

    /// The boot policy a config file defines.
    pub fn policy(config: &Config) -> StaticPolicy {
        StaticPolicy {
            profiles: config.profiles.clone(),
            machines: config.machines.clone(),
            default_profile: config.default_profile.clone(),
            provision: None,
            classes: config.classes.clone(),
        }
    }

    /// XDP or TC is attached, so TFTP sessions and DHCP answers can be
    /// served in the kernel.
    pub fn kernel_tiers(&self) -> bool {
        self.xdp_mode != XdpModeChoice::Off || !self.no_tc
    }

    /// The programs answer repeat DHCP requests: a program is attached and
    /// the operator did not say no.
    pub fn kernel_answers(&self) -> bool {
        !self.no_kernel_dhcp && self.kernel_tiers()
    }

    /// The DHCP engine's configuration for `config` (the loaded one, or a
    /// reloaded one on SIGHUP), with the `--range` subnets built on the
    /// networks of the interfaces served.
    pub fn engine_config(&self, config: &Config) -> anyhow::Result<EngineConfig> {
        let networks = if self.ranges.is_empty() {
            Vec::new()
        } else {
            self.interfaces
                .iter()
                .map(|i| Ok((i.clone(), netif::ipv4_network(i)?)))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        Ok(EngineConfig {
            mode: if self.dhcp == DhcpMode::Full {
                Mode::Full
            } else {
                Mode::Proxy
            },
            subnets: self.subnets(config, &networks)?,
            reservations: config.reservations.clone(),
            authoritative: self.authoritative,
            http_port: self.http_port,
            kernel_answers: self.kernel_answers(),
            shared_pools: self.lease_store.is_some(),
        })
    }

    /// The config's subnets, and one per interface network that `--range`
    /// pools fall in (replacing a config subnet of the same network).
    /// `networks`: each interface served, with its network.
    pub fn subnets(
        &self,
        config: &Config,
        networks: &[(String, Ipv4Net)],
    ) -> anyhow::Result<Vec<Subnet>> {
        let mut subnets = config.subnets.clone();
        if self.ranges.is_empty() {
            return Ok(subnets);
        }
        let inside = |n: &Ipv4Net, (first, last): &(Ipv4Addr, Ipv4Addr)| {
            n.contains(first) && n.contains(last)
        };
        if let Some((first, last)) = self
            .ranges
            .iter()
            .find(|r| !networks.iter().any(|(_, n)| inside(n, r)))
        {
            let on: Vec<String> = networks.iter().map(|(i, n)| format!("{i} {n}")).collect();
            bail!(
                "--range {first}-{last} is not inside the network of any interface served ({})",
                on.join(", ")
            );
        }
        if let Some(router) = self
            .router
            .filter(|r| !networks.iter().any(|(_, n)| n.contains(r)))
        {
            bail!("--router {router} is not on the network of any interface served");
        }
        for (_, network) in networks {
            let ranges: Vec<_> = self
                .ranges
                .iter()
                .copied()
                .filter(|r| inside(network, r))
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
                lease_time: self.lease_time.max(MIN_LEASE_TIME),
                options: Default::default(),
            });
        }
        Ok(subnets)
    }
}

/// The API token: the file's first line, which must not be empty.
fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("--api-token-file {}: {e}", file.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.len() < 16 {
        bail!(
            "--api-token-file {}: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            file.display()
        );
    }
    Ok(token)
}

/// The admission limits: each flag over its `[admission]` key over the default.
fn admission_limits(cli: &Cli, keys: &AdmissionKeys) -> Option<AdmissionLimits> {
    if cli.no_admission || keys.enabled == Some(false) {
        return None;
    }
    let d = AdmissionLimits::default();
    Some(AdmissionLimits {
        dhcp_unknown_rate: cli
            .admit_dhcp_unknown
            .or(keys.dhcp_unknown_rate)
            .unwrap_or(d.dhcp_unknown_rate),
        dhcp_unknown_burst: cli
            .admit_dhcp_unknown_burst
            .or(keys.dhcp_unknown_burst)
            .unwrap_or(d.dhcp_unknown_burst),
        dhcp_discover_per_mac: cli
            .admit_discover_per_mac
            .or(keys.dhcp_discover_per_mac)
            .unwrap_or(d.dhcp_discover_per_mac),
        tftp_rate: cli.admit_tftp.or(keys.tftp_rate).unwrap_or(d.tftp_rate),
        tftp_burst: cli
            .admit_tftp_burst
            .or(keys.tftp_burst)
            .unwrap_or(d.tftp_burst),
        tftp_per_source: cli
            .admit_tftp_per_source
            .or(keys.tftp_per_source)
            .unwrap_or(d.tftp_per_source),
        tftp_per_source_burst: cli
            .admit_tftp_per_source_burst
            .or(keys.tftp_per_source_burst)
            .unwrap_or(d.tftp_per_source_burst),
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("pxed").chain(args.iter().copied())).unwrap()
    }

    fn config(toml: &str) -> Config {
        Config::parse(std::path::Path::new("test.toml"), toml).unwrap()
    }

    fn net(interface: &str, cidr: &str) -> (String, Ipv4Net) {
        (interface.to_owned(), cidr.parse().unwrap())
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let file = config(
            "interface = \"eth9\"\nboot_root = \"/srv/file\"\n[http]\nport = 8080\n\
             [tftp]\nmax_windowsize = 8\nsingle_port = true\n[dhcp]\nmode = \"off\"\nlease_file = \"/var/file.redb\"\n",
        );
        let s = Settings::merge(cli(&["-i", "eth1", "--http-port", "81"]), file.clone()).unwrap();
        assert!(s.tftp_single_port, "[tftp] single_port");
        assert_eq!(s.interfaces, ["eth1"]);
        assert_eq!(s.http_port, 81);
        assert_eq!(s.boot_root, Some(PathBuf::from("/srv/file")));
        assert_eq!(s.tftp_max_windowsize, 8);
        assert_eq!(s.dhcp, DhcpMode::Off);
        assert_eq!(s.lease_file, PathBuf::from("/var/file.redb"));
        let s = Settings::merge(cli(&["--dhcp", "proxy"]), file).unwrap();
        assert_eq!(s.interfaces, ["eth9"], "the file's interface without -i");
        assert_eq!(s.dhcp, DhcpMode::Proxy);
        let s = Settings::merge(cli(&["-i", "eth1"]), Config::default()).unwrap();
        assert!(!s.tftp_single_port, "a fresh port per transfer unless told");
        assert!(
            Settings::merge(
                cli(&["-i", "eth1", "--tftp-single-port"]),
                Config::default()
            )
            .unwrap()
            .tftp_single_port
        );
        assert_eq!(s.http_port, DEFAULT_HTTP_PORT);
        assert_eq!(s.tftp_max_windowsize, DEFAULT_MAX_WINDOWSIZE);
        assert_eq!(s.lease_file, PathBuf::from(DEFAULT_LEASE_FILE));
        assert_eq!(s.dhcp, DhcpMode::Proxy, "proxy unless told");
    }

    #[test]
    fn admission_limits_come_from_flags_over_the_file_over_the_defaults() {
        let s = Settings::merge(cli(&["-i", "eth1"]), Config::default()).unwrap();
        assert_eq!(
            s.admission,
            Some(AdmissionLimits::default()),
            "on by default"
        );
        let file =
            config("[admission]\ndhcp_unknown_rate = 500\ntftp_per_source = 0\ntftp_burst = 7\n");
        let s = Settings::merge(
            cli(&[
                "-i",
                "eth1",
                "--admit-dhcp-unknown",
                "900",
                "--admit-tftp-burst",
                "9",
            ]),
            file.clone(),
        )
        .unwrap();
        let limits = s.admission.unwrap();
        assert_eq!(limits.dhcp_unknown_rate, 900.0, "the flag wins");
        assert_eq!(limits.tftp_burst, 9);
        assert_eq!(limits.tftp_per_source, 0.0, "the file's key: unlimited");
        assert_eq!(
            limits.dhcp_unknown_burst,
            AdmissionLimits::default().dhcp_unknown_burst
        );
        let s = Settings::merge(cli(&["-i", "eth1"]), file).unwrap();
        assert_eq!(s.admission.unwrap().dhcp_unknown_rate, 500.0);
        let off = Settings::merge(cli(&["-i", "eth1", "--no-admission"]), Config::default());
        assert_eq!(off.unwrap().admission, None);
        let off = Settings::merge(
            cli(&["-i", "eth1"]),
            config("[admission]\nenabled = false\n"),
        );
        assert_eq!(off.unwrap().admission, None);
    }

    #[test]
    fn bad_admission_limits_are_refused_with_the_key_named() {
        for bad in [
            "--admit-dhcp-unknown=-1",
            "--admit-dhcp-unknown=fast",
            "--admit-dhcp-unknown=inf",
        ] {
            let e = Cli::try_parse_from(["pxed", "-i", "e", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a rate per second"), "{bad}: {e}");
        }
        assert!(Cli::try_parse_from(["pxed", "-i", "e", "--admit-tftp-burst", "0"]).is_err());
        for (toml, key) in [
            ("[admission]\ntftp_rate = -3\n", "admission.tftp_rate"),
            (
                "[admission]\ndhcp_unknown_burst = 0\n",
                "admission.dhcp_unknown_burst",
            ),
            ("[admission]\nrate = 3\n", "rate"),
        ] {
            let e = Config::parse(std::path::Path::new("t.toml"), toml)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn the_files_lease_store_holds_unless_the_command_line_names_one() {
        let file = config("[dhcp]\nstore = \"postgres://pxed@db/pxed\"\n");
        let s = Settings::merge(cli(&["-i", "eth1"]), file.clone()).unwrap();
        assert_eq!(s.lease_store.as_deref(), Some("postgres://pxed@db/pxed"));
        let s = Settings::merge(
            cli(&["-i", "eth1", "--lease-file", "/tmp/l.redb"]),
            file.clone(),
        )
        .unwrap();
        assert_eq!(
            s.lease_store, None,
            "--lease-file wins over the file's store"
        );
        let s = Settings::merge(
            cli(&["-i", "eth1", "--lease-store", "postgres://other@db/pxed"]),
            file,
        )
        .unwrap();
        assert_eq!(s.lease_store.as_deref(), Some("postgres://other@db/pxed"));
    }

    #[test]
    fn a_range_means_full_dhcp_and_full_dhcp_needs_addresses() {
        let s = Settings::merge(
            cli(&["-i", "eth1", "--range", "10.9.0.100-10.9.0.199"]),
            Config::default(),
        )
        .unwrap();
        assert_eq!(s.dhcp, DhcpMode::Full);
        let e =
            Settings::merge(cli(&["-i", "eth1", "--dhcp", "full"]), Config::default()).unwrap_err();
        assert!(e.to_string().contains("--dhcp full needs addresses"), "{e}");
        let e = Settings::merge(
            cli(&["-i", "eth1", "--range", "10.9.0.9-x"]),
            Config::default(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("--range 10.9.0.9-x: "), "{e}");
    }

    #[test]
    fn the_api_needs_a_token_file_with_a_real_token() {
        let e = Cli::try_parse_from(["pxed", "-i", "eth1", "--api", "127.0.0.1:8067"]).unwrap_err();
        assert!(e.to_string().contains("--api-token-file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "short\n").unwrap();
        let args = |f: &std::path::Path| {
            cli(&[
                "-i",
                "eth1",
                "--api",
                "127.0.0.1:8067",
                "--api-token-file",
                f.to_str().unwrap(),
            ])
        };
        let e = Settings::merge(args(&file), Config::default()).unwrap_err();
        assert!(e.to_string().contains("at least 16 characters"), "{e}");
        std::fs::write(&file, "0123456789abcdef0123\nignored\n").unwrap();
        let s = Settings::merge(args(&file), Config::default()).unwrap();
        assert_eq!(s.api.unwrap().1, "0123456789abcdef0123");
        let e = Settings::merge(args(&dir.path().join("missing")), Config::default()).unwrap_err();
        assert!(e.to_string().starts_with("--api-token-file "), "{e}");
    }

    #[test]
    fn interfaces_must_be_named_once() {
        let e = Settings::merge(cli(&[]), Config::default()).unwrap_err();
        assert!(e.to_string().contains("no interface to serve on"), "{e}");
        let e = Settings::merge(cli(&["-i", "eth1,eth2", "-i", "eth1"]), Config::default())
            .unwrap_err();
        assert_eq!(e.to_string(), "--interface eth1 is given twice");
    }

    #[test]
    fn kernel_answers_need_a_program_and_nobody_saying_no() {
        let with = |args: &[&str], file: &str| {
            let mut all = vec!["-i", "eth1"];
            all.extend_from_slice(args);
            Settings::merge(cli(&all), config(file))
                .unwrap()
                .kernel_answers()
        };
        assert!(with(&[], ""));
        assert!(with(&["--xdp-mode", "off"], ""), "TC alone answers");
        assert!(!with(&["--xdp-mode", "off", "--no-tc"], ""));
        assert!(!with(&["--no-kernel-dhcp"], ""));
        assert!(!with(&[], "[dhcp]\nkernel_answers = false\n"));
    }

    #[test]
    fn ranges_become_subnets_on_the_networks_of_their_interfaces() {
        let file = config(
            "[[dhcp.subnet]]\nnetwork = \"10.9.0.0/24\"\npools = [\"10.9.0.10-10.9.0.20\"]\n\
             [[dhcp.subnet]]\nnetwork = \"10.7.0.0/24\"\npools = [\"10.7.0.10-10.7.0.20\"]\n",
        );
        let s = Settings::merge(
            cli(&[
                "-i",
                "eth1,eth2",
                "--range",
                "10.9.0.100-10.9.0.199",
                "--router",
                "10.9.0.1",
                "--lease-time",
                "5",
            ]),
            file.clone(),
        )
        .unwrap();
        let networks = [net("eth1", "10.9.0.0/24"), net("eth2", "10.10.0.0/24")];
        let subnets = s.subnets(&file, &networks).unwrap();
        assert_eq!(
            subnets.len(),
            2,
            "the --range replaces the file's 10.9.0.0/24"
        );
        let ranged = subnets
            .iter()
            .find(|s| s.network.to_string() == "10.9.0.0/24")
            .unwrap();
        assert_eq!(
            ranged.ranges,
            [parse_range("10.9.0.100-10.9.0.199").unwrap()]
        );
        assert_eq!(ranged.router, Some(Ipv4Addr::new(10, 9, 0, 1)));
        assert_eq!(
            ranged.lease_time, MIN_LEASE_TIME,
            "5 s is raised to the floor"
        );
        assert!(subnets
            .iter()
            .any(|s| s.network.to_string() == "10.7.0.0/24"));
    }

    #[test]
    fn a_range_or_router_off_every_network_served_is_refused_by_name() {
        let networks = [net("eth1", "10.9.0.0/24")];
        let s = Settings::merge(
            cli(&["-i", "eth1", "--range", "10.8.0.1-10.8.0.9"]),
            Config::default(),
        )
        .unwrap();
        let e = s.subnets(&Config::default(), &networks).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--range 10.8.0.1-10.8.0.9 is not inside the network of any interface served (eth1 10.9.0.0/24)"
        );
        let s = Settings::merge(
            cli(&[
                "-i",
                "eth1",
                "--range",
                "10.9.0.1-10.9.0.9",
                "--router",
                "10.8.0.1",
            ]),
            Config::default(),
        )
        .unwrap();
        let e = s.subnets(&Config::default(), &networks).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--router 10.8.0.1 is not on the network of any interface served"
        );
    }
}
