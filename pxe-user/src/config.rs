//! The config file (TOML): its shape as written (`File`, serde) and the checked
//! values the daemon runs on (`Config`). Every error names the file, the line
//! and the key, so a typo is found in one look.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

use serde::Deserialize;
use toml::Spanned;

use crate::dhcp::pool::{parse_range, Subnet};
use crate::policy::{
    class::{Class, Labels, Match},
    options::{self, OptionSet},
    r#static::{BootFiles, MachineEntry, Profile},
    render, Arch, ClientKind, Mac,
};

/// The file as written. Unknown keys are errors: a misspelt key silently
/// ignored is a machine that boots the wrong thing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    interface: Option<Spanned<String>>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    boot_root: Option<PathBuf>,
    default_profile: Option<Spanned<String>>,
    #[serde(default)]
    tftp: TftpSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    dhcp: DhcpSection,
    #[serde(default)]
    admission: AdmissionKeys,
    #[serde(default, rename = "profile")]
    profiles: Vec<Spanned<ProfileSection>>,
    #[serde(default, rename = "machine")]
    machines: Vec<Spanned<MachineSection>>,
    #[serde(default, rename = "class")]
    classes: Vec<Spanned<ClassSection>>,
}

/// `[[class]]`: machines matched by their requests (crate::policy::class).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassSection {
    name: Spanned<String>,
    /// Option 60 starts with it.
    vendor_class: Option<String>,
    /// Option 60 is exactly it.
    vendor_class_exact: Option<String>,
    user_class: Option<String>,
    arch: Option<Spanned<String>>,
    mac_prefix: Option<Spanned<String>>,
    relay: Option<Spanned<String>>,
    /// Option 82 sub-options 1 and 2: text, or hex bytes as "00:1a:2b".
    circuit_id: Option<String>,
    remote_id: Option<String>,
    #[serde(default)]
    labels: Labels,
    profile: Option<Spanned<String>>,
    #[serde(default)]
    options: OptionsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TftpSection {
    max_blksize: Option<u16>,
    max_windowsize: Option<u16>,
    #[serde(default)]
    single_port: bool,
}

/// `[admission]`: the kernel's limits on what of a storm or a flood
/// reaches userspace (each key as its `--admit-*` flag; the flag wins).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionKeys {
    /// false turns admission control off (as `--no-admission`).
    pub enabled: Option<bool>,
    pub dhcp_unknown_rate: Option<f64>,
    pub dhcp_unknown_burst: Option<u32>,
    pub dhcp_discover_per_mac: Option<f64>,
    pub tftp_rate: Option<f64>,
    pub tftp_burst: Option<u32>,
    pub tftp_per_source: Option<f64>,
    pub tftp_per_source_burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DhcpSection {
    mode: Option<DhcpMode>,
    lease_file: Option<PathBuf>,
    store: Option<Spanned<String>>,
    authoritative: Option<bool>,
    kernel_answers: Option<bool>,
    #[serde(default, rename = "subnet")]
    subnets: Vec<Spanned<SubnetSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubnetSection {
    network: Spanned<String>,
    pools: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    router: Option<Spanned<String>>,
    #[serde(default)]
    dns: Vec<Spanned<String>>,
    domain: Option<String>,
    lease_time: Option<u32>,
    #[serde(default)]
    options: OptionsSection,
}

/// `options`: by name (`ntp-servers = ["10.0.0.5"]`) or by code with a
/// type (`"224" = { type = "hex", value = "01:02" }`); see
/// [`crate::policy::options`].
type OptionsSection = BTreeMap<Spanned<String>, toml::Value>;

/// How pxed takes part in DHCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DhcpMode {
    /// Hand out addresses from the configured pools, with boot information.
    Full,
    /// proxyDHCP: boot information only, beside the network's DHCP server.
    Proxy,
    /// No DHCP at all (TFTP and HTTP only).
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileSection {
    name: String,
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    ipxe_script: Option<Spanned<String>>,
    /// Another host serving the boot files over TFTP (next-server, 66).
    tftp_server: Option<Spanned<String>>,
    #[serde(default)]
    boot_files: BootFilesSection,
    #[serde(default)]
    options: OptionsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootFilesSection {
    bios: Option<String>,
    uefi_x64: Option<String>,
    uefi_arm64: Option<String>,
    uefi_ia32: Option<String>,
    rpi: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineSection {
    mac: Spanned<String>,
    profile: Option<Spanned<String>>,
    #[serde(default = "yes")]
    netboot: bool,
    hostname: Option<String>,
    /// Fixed address (a DHCP reservation).
    address: Option<Spanned<String>>,
    /// Architecture override, e.g. "uefi-arm64".
    arch: Option<Spanned<String>>,
    /// Answer as to this kind of boot client: "pxe", "ipxe" or "http".
    client: Option<Spanned<String>>,
    /// What classes may match it on (`labels = { rack = "r12" }`).
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    options: OptionsSection,
}

fn yes() -> bool {
    true
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Interfaces to serve on (`interface = "eth1"` or `interfaces = [...]`).
    pub interfaces: Vec<String>,
    pub boot_root: Option<PathBuf>,
    pub tftp_max_blksize: Option<u16>,
    pub tftp_max_windowsize: Option<u16>,
    /// `[tftp] single_port`: every transfer answered from the request port.
    pub tftp_single_port: bool,
    pub http_port: Option<u16>,
    pub profiles: HashMap<String, Profile>,
    pub machines: HashMap<Mac, MachineEntry>,
    pub default_profile: Option<String>,
    pub dhcp_mode: Option<DhcpMode>,
    pub lease_file: Option<PathBuf>,
    /// `[dhcp] store = "postgres://..."`: leases and the inventory in
    /// PostgreSQL (as `--lease-store`).
    pub lease_store: Option<String>,
    pub authoritative: bool,
    /// The XDP/TC programs answer repeat requests (`[dhcp] kernel_answers`,
    /// default true; `--no-kernel-dhcp` turns it off too).
    pub kernel_answers: bool,
    pub subnets: Vec<Subnet>,
    pub reservations: HashMap<Mac, Ipv4Addr>,
    /// `[[class]]`, in the order written.
    pub classes: Vec<Class>,
    pub admission: AdmissionKeys,
}

impl Default for Config {
    /// The embedded defaults: one profile, `default`, for every machine.
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            boot_root: None,
            tftp_max_blksize: None,
            tftp_max_windowsize: None,
            tftp_single_port: false,
            http_port: None,
            profiles: [("default".to_owned(), Profile::named("default"))].into(),
            machines: HashMap::new(),
            default_profile: Some("default".to_owned()),
            dhcp_mode: None,
            lease_file: None,
            lease_store: None,
            authoritative: false,
            kernel_answers: true,
            admission: AdmissionKeys::default(),
            subnets: Vec::new(),
            reservations: HashMap::new(),
            classes: Vec::new(),
        }
    }
}

/// A config error with where it is.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// What toml says is wrong, or, where it says nothing (a stray control
/// character, even in a comment), the character it stopped at.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    if !e.message().trim().is_empty() {
        return e.message().to_owned();
    }
    match e.span().and_then(|s| text.get(s.start..)?.chars().next()) {
        Some(c) => format!(
            "{c:?} (U+{:04X}) is not allowed here; TOML refuses control characters, also in comments",
            c as u32
        ),
        None => "this is not valid TOML".to_owned(),
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Checks config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let error_at = |span: Option<Range<usize>>, message: String| {
            let (line, column) = span.map(|s| line_column(text, s.start)).unwrap_or((0, 0));
            ConfigError {
                file: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: File =
            toml::from_str(text).map_err(|e| error_at(e.span(), toml_message(text, &e)))?;

        let mut profiles = HashMap::new();
        for section in &file.profiles {
            let span = section.span();
            let section = section.get_ref();
            let mut profile = Profile::named(&section.name);
            let defaults = BootFiles::default();
            let files = &section.boot_files;
            profile.boot_files = BootFiles {
                bios: files.bios.clone().unwrap_or(defaults.bios),
                uefi_x64: files.uefi_x64.clone().unwrap_or(defaults.uefi_x64),
                uefi_arm64: files.uefi_arm64.clone().unwrap_or(defaults.uefi_arm64),
                uefi_ia32: files.uefi_ia32.clone().unwrap_or(defaults.uefi_ia32),
                rpi: files.rpi.clone().unwrap_or(defaults.rpi),
            };
            if let Some(kernel) = &section.kernel {
                profile.kernel = kernel.clone();
            }
            if let Some(initrd) = &section.initrd {
                profile.initrd = initrd.clone();
            }
            if let Some(cmdline) = &section.cmdline {
                profile.cmdline = cmdline.clone();
            }
            if let Some(script) = &section.ipxe_script {
                render::check(script.get_ref()).map_err(|e| {
                    error_at(
                        Some(script.span()),
                        format!("profile {:?}, ipxe_script: {e}", section.name),
                    )
                })?;
                profile.ipxe_script = script.get_ref().clone();
            }
            profile.tftp_server = section
                .tftp_server
                .as_ref()
                .map(|host| {
                    ipv4(
                        host,
                        &format!("profile {:?}, tftp_server", section.name),
                        &error_at,
                    )
                })
                .transpose()?;
            profile.options = option_set(
                &section.options,
                &format!("profile {:?}", section.name),
                &error_at,
            )?;
            if profiles.insert(section.name.clone(), profile).is_some() {
                return Err(error_at(
                    Some(span),
                    format!("profile {:?} is defined twice", section.name),
                ));
            }
        }
        if profiles.is_empty() {
            profiles = Config::default().profiles;
        }

        let default_profile = match &file.default_profile {
            Some(name) => Some(known_profile(
                &profiles,
                name,
                "default_profile",
                &error_at,
            )?),
            None if profiles.contains_key("default") => Some("default".to_owned()),
            None => None,
        };

        let mut machines = HashMap::new();
        let mut reservations: HashMap<Mac, Ipv4Addr> = HashMap::new();
        for section in &file.machines {
            let machine = section.get_ref();
            let mac: Mac = machine
                .mac
                .get_ref()
                .parse()
                .map_err(|e| error_at(Some(machine.mac.span()), format!("machine mac: {e}")))?;
            let profile = match &machine.profile {
                Some(name) => Some(known_profile(
                    &profiles,
                    name,
                    "machine profile",
                    &error_at,
                )?),
                None => None,
            };
            if let Some(address) = &machine.address {
                let ip = ipv4(address, "machine address", &error_at)?;
                if let Some((other, _)) = reservations.iter().find(|(_, r)| **r == ip) {
                    return Err(error_at(
                        Some(address.span()),
                        format!("address {ip} is already reserved for {other}"),
                    ));
                }
                reservations.insert(mac, ip);
            }
            let arch = machine
                .arch
                .as_ref()
                .map(|name| arch(name, "machine arch", &error_at))
                .transpose()?;
            let client = match &machine.client {
                Some(name) => Some(ClientKind::from_name(name.get_ref()).ok_or_else(|| {
                    error_at(
                        Some(name.span()),
                        format!(
                            "machine client {:?}: not one of pxe, ipxe, http",
                            name.get_ref()
                        ),
                    )
                })?),
                None => None,
            };
            let entry = MachineEntry {
                profile,
                netboot: machine.netboot,
                hostname: machine.hostname.clone(),
                arch,
                client,
                vars: Default::default(),
                options: option_set(&machine.options, &format!("machine {mac}"), &error_at)?,
                labels: machine.labels.clone(),
            };
            if machines.insert(mac, entry).is_some() {
                return Err(error_at(
                    Some(machine.mac.span()),
                    format!("machine {mac} is listed twice"),
                ));
            }
        }

        let classes = classes(&file.classes, &profiles, &error_at)?;

        if let Some(b) = file.tftp.max_blksize {
            if !(8..=65464).contains(&b) {
                return Err(error_at(
                    None,
                    format!("tftp.max_blksize {b} is outside 8..65464"),
                ));
            }
        }
        check_admission(&file.admission).map_err(|e| error_at(None, e))?;
        if file.tftp.max_windowsize == Some(0) {
            return Err(error_at(
                None,
                "tftp.max_windowsize must be at least 1".to_owned(),
            ));
        }
        let mut subnets = Vec::new();
        for section in &file.dhcp.subnets {
            let subnet = section.get_ref();
            let network: Ipv4Net = subnet.network.get_ref().parse().map_err(|_| {
                error_at(
                    Some(subnet.network.span()),
                    format!(
                        "dhcp.subnet network {:?} is not a.b.c.d/len",
                        subnet.network.get_ref()
                    ),
                )
            })?;
            let network = network.trunc();
            let mut ranges = Vec::new();
            for pool in &subnet.pools {
                let range = parse_range(pool.get_ref())
                    .map_err(|e| error_at(Some(pool.span()), format!("dhcp.subnet pools: {e}")))?;
                if !network.contains(&range.0) || !network.contains(&range.1) {
                    return Err(error_at(
                        Some(pool.span()),
                        format!("pool {:?} is not inside {network}", pool.get_ref()),
                    ));
                }
                ranges.push(range);
            }
            if ranges.is_empty() {
                return Err(error_at(
                    Some(section.span()),
                    format!("dhcp.subnet {network} has no pools"),
                ));
            }
            let exclude = subnet
                .exclude
                .iter()
                .map(|e| ipv4(e, "dhcp.subnet exclude", &error_at))
                .collect::<Result<_, _>>()?;
            let dns = subnet
                .dns
                .iter()
                .map(|e| ipv4(e, "dhcp.subnet dns", &error_at))
                .collect::<Result<_, _>>()?;
            let router = subnet
                .router
                .as_ref()
                .map(|r| ipv4(r, "dhcp.subnet router", &error_at))
                .transpose()?;
            subnets.push(Subnet {
                network,
                ranges,
                exclude,
                router,
                dns,
                domain: subnet.domain.clone(),
                lease_time: subnet.lease_time.unwrap_or(3600).max(60),
                options: option_set(
                    &subnet.options,
                    &format!("dhcp.subnet {network}"),
                    &error_at,
                )?,
            });
        }
        if file.dhcp.mode == Some(DhcpMode::Full) && subnets.is_empty() {
            return Err(error_at(None, "dhcp.mode = \"full\" needs at least one [[dhcp.subnet]] (or --range on the command line)".into()));
        }
        let interfaces = match (&file.interface, file.interfaces.as_slice()) {
            (Some(one), []) => vec![one.get_ref().clone()],
            (Some(one), [..]) => {
                return Err(error_at(
                    Some(one.span()),
                    "set `interface` or `interfaces`, not both".into(),
                ));
            }
            (None, many) => {
                let mut names: Vec<String> = Vec::new();
                for name in many {
                    if names.contains(name.get_ref()) {
                        return Err(error_at(
                            Some(name.span()),
                            format!("interface {:?} is listed twice", name.get_ref()),
                        ));
                    }
                    names.push(name.get_ref().clone());
                }
                names
            }
        };
        let lease_store = match file.dhcp.store {
            Some(url) => {
                let span = url.span();
                let url = crate::cli::postgres_url(url.get_ref())
                    .map_err(|e| error_at(Some(span.clone()), format!("dhcp.store: {e}")))?;
                if file.dhcp.lease_file.is_some() {
                    return Err(error_at(
                        Some(span),
                        "dhcp.store and dhcp.lease_file: leases are kept in one place; remove one"
                            .to_owned(),
                    ));
                }
                Some(url)
            }
            None => None,
        };
        Ok(Self {
            dhcp_mode: file.dhcp.mode,
            lease_file: file.dhcp.lease_file,
            lease_store,
            authoritative: file.dhcp.authoritative.unwrap_or(false),
            kernel_answers: file.dhcp.kernel_answers.unwrap_or(true),
            subnets,
            reservations,
            interfaces,
            boot_root: file.boot_root,
            tftp_max_blksize: file.tftp.max_blksize,
            tftp_max_windowsize: file.tftp.max_windowsize,
            tftp_single_port: file.tftp.single_port,
            admission: file.admission,
            http_port: file.http.port,
            profiles,
            machines,
            default_profile,
            classes,
        })
    }
}

/// Rates are per second, at least 0 (0: unlimited); bursts at least 1.
fn check_admission(keys: &AdmissionKeys) -> Result<(), String> {
    let rates = [
        ("dhcp_unknown_rate", keys.dhcp_unknown_rate),
        ("dhcp_discover_per_mac", keys.dhcp_discover_per_mac),
        ("tftp_rate", keys.tftp_rate),
        ("tftp_per_source", keys.tftp_per_source),
    ];
    for (key, rate) in rates {
        if let Some(r) = rate.filter(|r| !r.is_finite() || *r < 0.0) {
            return Err(format!(
                "admission.{key} {r} must be a rate per second, 0 or more (0: unlimited)"
            ));
        }
    }
    let bursts = [
        ("dhcp_unknown_burst", keys.dhcp_unknown_burst),
        ("tftp_burst", keys.tftp_burst),
        ("tftp_per_source_burst", keys.tftp_per_source_burst),
    ];
    if let Some((key, _)) = bursts.iter().find(|(_, b)| *b == Some(0)) {
        return Err(format!("admission.{key} must be at least 1"));
    }
    Ok(())
}

fn known_profile(
    profiles: &HashMap<String, Profile>,
    name: &Spanned<String>,
    key: &str,
    error_at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<String, ConfigError> {
    if profiles.contains_key(name.get_ref()) {
        return Ok(name.get_ref().clone());
    }
    let mut known: Vec<&str> = profiles.keys().map(String::as_str).collect();
    known.sort_unstable();
    Err(error_at(
        Some(name.span()),
        format!(
            "{key} {:?} names no profile (defined: {})",
            name.get_ref(),
            known.join(", ")
        ),
    ))
}

fn ipv4(
    text: &Spanned<String>,
    key: &str,
    error_at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Ipv4Addr, ConfigError> {
    text.get_ref().parse().map_err(|_| {
        error_at(
            Some(text.span()),
            format!("{key} {:?} is not an IPv4 address", text.get_ref()),
        )
    })
}

/// `[[class]]`, checked: names unique and fit for a URL, profiles known,
/// and none that an earlier class would always win over.
fn classes(
    sections: &[Spanned<ClassSection>],
    profiles: &HashMap<String, Profile>,
    error_at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Vec<Class>, ConfigError> {
    let mut classes: Vec<Class> = Vec::new();
    for section in sections {
        let c = section.get_ref();
        let name = c.name.get_ref();
        let at_name = |message: String| error_at(Some(c.name.span()), message);
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return Err(at_name(format!(
                "class name {name:?}: letters, digits, '-', '_' and '.' only (it goes into iPXE's script URL)"
            )));
        }
        if classes.iter().any(|earlier| &earlier.name == name) {
            return Err(at_name(format!("class {name:?} is defined twice")));
        }
        let arch = c
            .arch
            .as_ref()
            .map(|a| arch(a, &format!("class {name:?}, arch"), error_at))
            .transpose()?;
        let mac_prefix = match &c.mac_prefix {
            Some(p) => Some(mac_prefix(p.get_ref()).ok_or_else(|| {
                error_at(
                    Some(p.span()),
                    format!(
                        "class {name:?}, mac_prefix {:?}: one to six hex bytes, like \"b8:27:eb\"",
                        p.get_ref()
                    ),
                )
            })?),
            None => None,
        };
        let relay = c
            .relay
            .as_ref()
            .map(|r| ipv4(r, &format!("class {name:?}, relay"), error_at))
            .transpose()?;
        let profile = c
            .profile
            .as_ref()
            .map(|p| known_profile(profiles, p, &format!("class {name:?}, profile"), error_at))
            .transpose()?;
        let class = Class {
            name: name.clone(),
            matches: Match {
                vendor_class: c.vendor_class.clone().map(String::into_bytes),
                vendor_class_exact: c.vendor_class_exact.clone().map(String::into_bytes),
                user_class: c.user_class.clone().map(String::into_bytes),
                arch,
                mac_prefix,
                relay,
                circuit_id: c.circuit_id.as_deref().map(relay_agent_id),
                remote_id: c.remote_id.as_deref().map(relay_agent_id),
                labels: c.labels.clone(),
            },
            profile,
            options: option_set(&c.options, &format!("class {name:?}"), error_at)?,
        };
        if let Some(earlier) = classes.iter().find(|e| e.matches.covers(&class.matches)) {
            return Err(at_name(format!(
                "class {name:?} can never be chosen: class {:?}, written before it, matches every machine it does",
                earlier.name
            )));
        }
        classes.push(class);
    }
    Ok(classes)
}

/// An architecture by the name pxed gives it.
fn arch(
    name: &Spanned<String>,
    key: &str,
    error_at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<Arch, ConfigError> {
    Arch::from_name(name.get_ref()).ok_or_else(|| {
        error_at(
            Some(name.span()),
            format!(
                "{key} {:?}: not one of bios, uefi-ia32, uefi-x64, uefi-arm64, uefi-x64-http, uefi-arm64-http, rpi",
                name.get_ref()
            ),
        )
    })
}

/// `"b8:27:eb"` (or `-`, or no separators): one to six bytes.
/// An option 82 id as written: colon-separated hex bytes ("00:1a:2b", as
/// switches print a remote id) when it reads as that, else the text itself
/// (a circuit id like "Gi1/0/7"), as dnsmasq reads them.
pub fn relay_agent_id(text: &str) -> Vec<u8> {
    let hex_bytes = || {
        text.split(':')
            .map(|pair| {
                (pair.len() == 2)
                    .then(|| u8::from_str_radix(pair, 16).ok())
                    .flatten()
            })
            .collect::<Option<Vec<u8>>>()
    };
    match text.contains(':').then(hex_bytes).flatten() {
        Some(bytes) => bytes,
        None => text.as_bytes().to_vec(),
    }
}

fn mac_prefix(text: &str) -> Option<Vec<u8>> {
    let hex: String = text.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.is_empty() || hex.len() > 12 || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// The `options` of `owner` (for errors: `profile "x"`), checked and encoded.
fn option_set(
    section: &OptionsSection,
    owner: &str,
    error_at: &impl Fn(Option<Range<usize>>, String) -> ConfigError,
) -> Result<OptionSet, ConfigError> {
    let mut set = OptionSet::default();
    for (key, value) in section {
        let (code, option) = options::parse(key.get_ref(), value).map_err(|e| {
            error_at(
                Some(key.span()),
                format!("{owner}, options.{}: {e}", key.get_ref()),
            )
        })?;
        if !set.insert(code, option) {
            return Err(error_at(
                Some(key.span()),
                format!(
                    "{owner}, options.{}: option {code} is set twice (by name and by code)",
                    key.get_ref()
                ),
            ));
        }
    }
    Ok(set)
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    /// Found by the config_parse fuzz target: toml says nothing about a
    /// control character in a comment, so the error would be blank.
    #[test]
    fn a_control_character_is_named_even_in_a_comment() {
        let e = Config::parse(Path::new("c.toml"), "# a\u{7f} comment\nx = 1\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 4));
        assert!(e.message.contains("U+007F"), "{e}");
    }
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("pxed.toml"), text)
    }

    #[test]
    fn kernel_answers_are_on_unless_the_file_says_false() {
        assert!(
            !parse("[dhcp]\nkernel_answers = false\n")
                .unwrap()
                .kernel_answers
        );
        assert!(parse("").unwrap().kernel_answers);
        assert!(Config::default().kernel_answers);
    }

    #[test]
    fn options_are_read_at_every_level() {
        let config = parse(
            r#"
[[dhcp.subnet]]
network = "198.18.0.0/24"
pools = ["198.18.0.100-198.18.0.199"]
options = { ntp-servers = ["198.18.0.5"] }

[[profile]]
name = "default"
[profile.options]
"224" = { type = "u16", value = 515 }

[[machine]]
mac = "52:54:00:00:00:01"
options = { domain-name = "rack7.example.net" }
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let codes = |set: &OptionSet| {
            set.iter()
                .map(|(c, o)| (c, o.value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            codes(&config.subnets[0].options),
            vec![(42, vec![198, 18, 0, 5])]
        );
        assert_eq!(
            codes(&config.profiles["default"].options),
            vec![(224, vec![2, 3])]
        );
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            codes(&config.machines[&mac].options),
            vec![(15, b"rack7.example.net".to_vec())]
        );
    }

    #[test]
    fn a_bad_option_names_its_line_owner_and_key() {
        let e = parse("[[profile]]\nname = \"rescue\"\n[profile.options]\n\"300\" = { type = \"u8\", value = 1 }\n")
            .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(
            e.message
                .starts_with("profile \"rescue\", options.300: option code 300"),
            "{e}"
        );
        let twice = parse(
            "[[machine]]\nmac = \"52:54:00:00:00:01\"\noptions = { ntp-servers = \"10.0.0.1\", \"42\" = { type = \"ip\", value = \"10.0.0.2\" } }\n",
        )
        .unwrap_err();
        assert!(twice.message.contains("option 42 is set twice"), "{twice}");
    }

    #[test]
    fn classes_are_read_in_order_and_checked() {
        let config = parse(
            r#"
[[profile]]
name = "default"
[[profile]]
name = "rescue"

[[class]]
name = "pis"
mac_prefix = "b8:27:eb"
options = { ntp-servers = ["198.18.0.5"] }

[[class]]
name = "rack-b"
vendor_class = "PXEClient:Arch:00007"
relay = "198.18.5.1"
profile = "rescue"

[[class]]
name = "one-rom"
vendor_class_exact = "PXEClient:Arch:00000:UNDI:002001"

[[class]]
name = "port-7"
circuit_id = "Gi1/0/7"
remote_id = "00:1a:2b:3c:4d:5e"
labels = { rack = "r12" }

[[machine]]
mac = "52:54:00:00:00:07"
labels = { rack = "r12", role = "db" }
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = config.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["pis", "rack-b", "one-rom", "port-7"]);
        assert_eq!(
            config.classes[2].matches.vendor_class_exact.as_deref(),
            Some(&b"PXEClient:Arch:00000:UNDI:002001"[..])
        );
        let port = &config.classes[3].matches;
        assert_eq!(port.circuit_id.as_deref(), Some(&b"Gi1/0/7"[..]));
        assert_eq!(
            port.remote_id.as_deref(),
            Some(&[0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e][..]),
            "hex bytes, as switches print a remote id"
        );
        assert_eq!(port.labels.get("rack").map(String::as_str), Some("r12"));
        let machine = &config.machines[&"52:54:00:00:00:07".parse().unwrap()];
        assert_eq!(machine.labels.len(), 2);
        assert_eq!(
            config.classes[0].matches.mac_prefix,
            Some(vec![0xb8, 0x27, 0xeb])
        );
        assert_eq!(config.classes[1].profile.as_deref(), Some("rescue"));

        let error = |text: &str| parse(text).unwrap_err().to_string();
        assert!(
            error("[[class]]\nname = \"a\"\nprofile = \"nope\"\n").contains("names no profile"),
        );
        let shadowed = error(
            "[[class]]\nname = \"uefi\"\nvendor_class = \"PXEClient:Arch:00007\"\n\
             [[class]]\nname = \"rack\"\nvendor_class = \"PXEClient:Arch:00007:UNDI\"\nmac_prefix = \"52:54:00\"\n",
        );
        assert!(shadowed.contains("pxed.toml:5:"), "{shadowed}");
        assert!(
            shadowed.contains("class \"rack\" can never be chosen: class \"uefi\""),
            "{shadowed}"
        );
        assert!(error("[[class]]\nname = \"a b\"\n").contains("letters, digits"));
        assert!(error("[[class]]\nname = \"a\"\nmac_prefix = \"b8:27:e\"\n").contains("hex bytes"));
        assert!(error("[[class]]\nname = \"a\"\narch = \"sparc\"\n").contains("not one of"));
        assert!(
            error("[[class]]\nname = \"a\"\n[[class]]\nname = \"a\"\n").contains("defined twice")
        );
    }

    #[test]
    fn the_readme_example_parses() {
        let example = include_str!("../../docs/pxed.example.toml");
        let config = parse(example).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.profiles.contains_key("rescue"));
        assert_eq!(config.machines.len(), 3);
        assert_eq!(config.subnets.len(), 1);
        assert_eq!(config.reservations.len(), 1);
        assert_eq!(config.dhcp_mode, Some(DhcpMode::Full));
        assert!(config.kernel_answers);
    }

    #[test]
    fn the_readme_shows_the_example_config_verbatim() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("<!-- config-example -->\n```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README has the config example block");
        assert_eq!(
            block,
            include_str!("../../docs/pxed.example.toml"),
            "README and docs/pxed.example.toml differ"
        );
    }

    #[test]
    fn an_empty_file_gives_the_embedded_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.default_profile.as_deref(), Some("default"));
        assert_eq!(config.profiles["default"], Profile::named("default"));
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let cases = [
            ("boot_root = \"/srv\"\nbot_root = \"/x\"\n", 2, "unknown field `bot_root`"),
            ("[[machine]]\nmac = \"52:54:00:00:00\"\n", 2, "machine mac"),
            ("[[profile]]\nname = \"a\"\n[[machine]]\nmac = \"52:54:00:00:00:01\"\nprofile = \"b\"\n", 5, "names no profile (defined: a)"),
            ("[[profile]]\nname = \"a\"\nipxe_script = \"{{kernal}}\"\n", 3, "unknown placeholder {{kernal}}"),
            ("[tftp]\nmax_blksize = \"big\"\n", 2, "invalid type"),
            ("default_profile = \"nope\"\n", 1, "default_profile \"nope\""),
            ("[dhcp]\nmode = \"fulll\"\n", 2, "unknown variant `fulll`"),
            ("[dhcp]\nstore = \"mysql://db/pxed\"\n", 2, "dhcp.store: \"mysql://db/pxed\" is not a PostgreSQL URL"),
            ("[dhcp]\nlease_file = \"/l.redb\"\nstore = \"postgres://db/pxed\"\n", 3, "leases are kept in one place"),
            ("[[machine]]\nmac = \"52:54:00:00:00:01\"\narch = \"arm\"\n", 3, "machine arch \"arm\""),
            ("[[dhcp.subnet]]\nnetwork = \"198.18.0.0/24\"\npools = [\"198.18.1.1-198.18.1.9\"]\n", 3, "is not inside 198.18.0.0/24"),
            ("[[dhcp.subnet]]\nnetwork = \"198.18.0.0/24\"\npools = [\"198.18.0.1-198.18.0.9\"]\nrouter = \"gw\"\n", 4, "router \"gw\" is not an IPv4 address"),
            ("[[machine]]\nmac = \"52:54:00:00:00:01\"\naddress = \"1.2.3.4\"\n[[machine]]\nmac = \"52:54:00:00:00:02\"\naddress = \"1.2.3.4\"\n", 6, "already reserved"),
            ("interface = \"eth1\"\ninterfaces = [\"eth2\"]\n", 1, "not both"),
            ("interfaces = [\"eth1\",\n  \"eth1\"]\n", 2, "listed twice"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{err}");
            assert!(
                err.to_string().starts_with(&format!("pxed.toml:{line}:")),
                "{err}"
            );
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn one_interface_or_several() {
        assert_eq!(
            parse("interface = \"eth1\"\n").unwrap().interfaces,
            ["eth1"]
        );
        assert_eq!(
            parse("interfaces = [\"eth1\", \"eth2\"]\n")
                .unwrap()
                .interfaces,
            ["eth1", "eth2"]
        );
        assert!(parse("").unwrap().interfaces.is_empty());
    }

    #[test]
    fn a_machine_listed_twice_is_an_error() {
        let text =
            "[[machine]]\nmac = \"52:54:00:00:00:01\"\n[[machine]]\nmac = \"52-54-00-00-00-01\"\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.message.contains("listed twice"));
    }
}
