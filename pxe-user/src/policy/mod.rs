//! Who boots what: the narrow seam between the protocol servers and the
//! operator's intent. DHCP (67 and 4011) and HTTP ask a [`BootPolicy`]
//! through one [`SharedPolicy`]; they never read the config themselves. The
//! TOML file is one implementation ([`r#static::StaticPolicy`]); a machine
//! inventory changed at run time is another. A reload swaps the whole
//! policy at once: every request sees the old one or the new one, never a mix.

pub mod class;
pub mod options;
pub mod provision;
pub mod render;
pub mod r#static;
pub mod webhook;

use std::{fmt, net::Ipv4Addr, sync::Arc};

use arc_swap::ArcSwap;

use options::OptionSet;

pub use self::r#static::ServerUrls;

/// A MAC address as it appears in chaddr.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Accepts `aa:bb:cc:dd:ee:ff`, with `-` or no separators, any case.
    fn from_str(s: &str) -> Result<Self, String> {
        let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
        if hex.len() != 12 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
            ));
        }
        let mut mac = [0u8; 6];
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Mac(mac))
    }
}

/// Client system architecture (DHCP option 93, RFC 4578 §2.1 and the IANA
/// registry), reduced to what selects a boot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// 0: x86 BIOS (legacy PXE ROMs, PXELINUX).
    Bios,
    /// 6: x86 UEFI, 32-bit.
    UefiIa32,
    /// 7 and 9: x64 UEFI (EDK2 sends 7; some firmware sends 9, EFI BC).
    UefiX64,
    /// 11: ARM64 UEFI.
    UefiArm64,
    /// 16: x64 UEFI HTTP Boot.
    UefiX64Http,
    /// 19: ARM64 UEFI HTTP Boot.
    UefiArm64Http,
    /// 41: Raspberry Pi (ARM64 boot ROM's own code).
    RaspberryPi,
    /// Anything else, with its code.
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Bios,
            6 => Self::UefiIa32,
            7 | 9 => Self::UefiX64,
            11 => Self::UefiArm64,
            16 => Self::UefiX64Http,
            19 => Self::UefiArm64Http,
            41 => Self::RaspberryPi,
            other => Self::Other(other),
        }
    }

    /// The name used in config, logs and iPXE script URLs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::UefiIa32 => "uefi-ia32",
            Self::UefiX64 => "uefi-x64",
            Self::UefiArm64 => "uefi-arm64",
            Self::UefiX64Http => "uefi-x64-http",
            Self::UefiArm64Http => "uefi-arm64-http",
            Self::RaspberryPi => "rpi",
            Self::Other(_) => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Bios,
            Self::UefiIa32,
            Self::UefiX64,
            Self::UefiArm64,
            Self::UefiX64Http,
            Self::UefiArm64Http,
            Self::RaspberryPi,
        ]
        .into_iter()
        .find(|a| a.name() == name)
    }

    /// True for the UEFI HTTP Boot architectures, which get a URL as boot file.
    pub fn is_http_boot(self) -> bool {
        matches!(self, Self::UefiX64Http | Self::UefiArm64Http)
    }
}

/// How a machine is answered regardless of how its boot client identifies
/// itself: for boot chains that would otherwise be misread (an iPXE build
/// that must be given a PXE NBP such as pxelinux.0, firmware with a bogus
/// vendor class).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// Firmware PXE: a boot file over TFTP.
    Pxe,
    /// iPXE: the script URL.
    Ipxe,
    /// UEFI HTTP Boot: a URL.
    HttpBoot,
}

impl ClientKind {
    /// The name used in config, the API and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pxe => "pxe",
            Self::Ipxe => "ipxe",
            Self::HttpBoot => "http",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "pxe" => Some(Self::Pxe),
            "ipxe" => Some(Self::Ipxe),
            "http" => Some(Self::HttpBoot),
            _ => None,
        }
    }
}

/// What the servers know about a machine when they ask the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub mac: Mac,
    /// As the machine claims it (option 93, or the script URL's `arch=`).
    pub arch: Arch,
    /// Client machine identifier (option 97), as text, when sent.
    pub uuid: Option<String>,
    /// The boot client, as detected from the request.
    pub client: ClientKind,
    /// The relay the request came through (giaddr), if any.
    pub relay: Option<Ipv4Addr>,
    /// Option 60 as sent (none over HTTP).
    pub vendor_class: Option<Vec<u8>>,
    /// Option 77 as sent (none over HTTP).
    pub user_class: Option<Vec<u8>>,
    /// Option 82's circuit id and remote id, as the relay put them.
    pub circuit_id: Option<Vec<u8>>,
    pub remote_id: Option<Vec<u8>>,
    /// The class the DHCP answer chose, as iPXE's script URL names it.
    pub class: Option<String>,
}

impl Machine {
    /// A machine known only by MAC, architecture and boot client (what an
    /// HTTP script request says); the rest is filled in by those who know it.
    pub fn new(mac: Mac, arch: Arch, client: ClientKind) -> Self {
        Self {
            mac,
            arch,
            uuid: None,
            client,
            relay: None,
            vendor_class: None,
            user_class: None,
            circuit_id: None,
            remote_id: None,
            class: None,
        }
    }
}

/// The operator's intent, asked by every server the same way.
pub trait BootPolicy: Send + Sync {
    /// What `machine` boots now; its script's URLs point at `urls`.
    fn decide(&self, machine: &Machine, urls: &ServerUrls) -> Verdict;
    /// The host name a lease for `mac` carries, whoever asks (cheap: asked
    /// for every lease, PXE or not).
    fn hostname(&self, mac: Mac) -> Option<String>;
    /// The DHCP options a lease for `machine` carries from its entry, its
    /// class and its profile (in that precedence); the subnet's go under.
    fn options(&self, _machine: &Machine) -> OptionSet {
        OptionSet::default()
    }
    /// Whether `mac` has an entry (the config's or the inventory's): such a
    /// machine is never treated as a stranger.
    fn knows(&self, _mac: Mac) -> bool {
        false
    }
    /// Every MAC [`Self::knows`]: admitted by the kernel whatever its
    /// interface's budget for unknown machines.
    fn known_macs(&self) -> Vec<Mac> {
        Vec::new()
    }
    /// The `[[class]]` `machine` falls in, for the log.
    fn class_name(&self, _machine: &Machine) -> Option<String> {
        None
    }
    /// False for a machine marked not to netboot (provisioned): TFTP and
    /// HTTP refuse it boot files. Cheap: asked per file request.
    fn may_netboot(&self, mac: Mac) -> bool;
}

/// Whether a client address may fetch boot files: in full DHCP mode pxed
/// knows which machine holds an address, and a machine marked not to
/// netboot gets no boot file over TFTP or HTTP, whatever it asks for.
pub trait FileGate: Send + Sync {
    /// The machine at `client`, if it is one marked not to netboot.
    fn refuses(&self, client: Ipv4Addr) -> Option<Mac>;
}

/// The policy's answer for one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// How the machine's boot client is answered: as detected, unless the
    /// policy overrides it for firmware that misreports itself.
    pub client: ClientKind,
    pub decision: Decision,
    /// The answer stands until the policy changes, so the kernel may repeat
    /// it; false for one that may change on its own (a webhook's, cached
    /// for a while).
    pub repeatable: bool,
}

/// Whether and what a machine boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Boot(BootSpec),
    /// A provisioned machine: answer, but send it to its local disk.
    LocalBoot,
    /// Not ours to boot: stay silent.
    Ignore,
}

/// What a DHCP reply tells a machine to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootAnswer {
    /// A path in the boot root (TFTP) or a URL (iPXE, HTTP Boot).
    pub file: String,
    /// Option 60 of the reply: `PXEClient`, or `HTTPClient` for UEFI HTTP Boot.
    pub vendor_class: &'static [u8],
    /// The file is fetched over TFTP (next-server, 66, 67): from this
    /// server, or from `tftp_server` when set.
    pub tftp: bool,
    pub tftp_server: Option<Ipv4Addr>,
    /// The kernel may repeat the reply that carries it (see [`Verdict::repeatable`]).
    pub repeatable: bool,
}

impl Verdict {
    /// The boot file or URL a DHCP reply carries for `machine`, if any.
    /// iPXE always gets its script URL (a provisioned machine's script boots
    /// the disk), so the chainload never loops back to firmware PXE.
    pub fn boot_answer(&self, machine: &Machine, urls: &ServerUrls) -> Option<BootAnswer> {
        match (self.client, &self.decision) {
            (_, Decision::Ignore) => None,
            (ClientKind::Ipxe, Decision::Boot(_) | Decision::LocalBoot) => {
                let mut url = format!(
                    "{}/boot.ipxe?mac={}&arch={}",
                    urls.http,
                    machine.mac,
                    machine.arch.name()
                );
                if let Some(uuid) = &machine.uuid {
                    url.push_str(&format!("&uuid={uuid}"));
                }
                if let Decision::Boot(BootSpec {
                    class: Some(class), ..
                }) = &self.decision
                {
                    url.push_str(&format!("&class={class}"));
                }
                Some(BootAnswer {
                    file: url,
                    vendor_class: b"PXEClient",
                    tftp: false,
                    tftp_server: None,
                    repeatable: self.repeatable,
                })
            }
            (ClientKind::HttpBoot, Decision::Boot(spec)) => Some(BootAnswer {
                file: format!("{}/{}", urls.http, spec.boot_file.as_ref()?),
                vendor_class: b"HTTPClient",
                tftp: false,
                tftp_server: None,
                repeatable: self.repeatable,
            }),
            (ClientKind::Pxe, Decision::Boot(spec)) => Some(BootAnswer {
                file: spec.boot_file.clone()?,
                vendor_class: b"PXEClient",
                tftp: true,
                tftp_server: spec.tftp_server,
                repeatable: self.repeatable,
            }),
            (ClientKind::Pxe | ClientKind::HttpBoot, Decision::LocalBoot) => None,
        }
    }
}

/// The policy in force, shared by every server and swapped whole on reload.
#[derive(Clone)]
pub struct SharedPolicy(Arc<ArcSwap<Box<dyn BootPolicy>>>);

impl SharedPolicy {
    pub fn new(policy: impl BootPolicy + 'static) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(Box::new(policy))))
    }

    /// The policy now: one snapshot, to ask as often as a request needs.
    pub fn current(&self) -> Arc<Box<dyn BootPolicy>> {
        self.0.load_full()
    }

    /// Puts `policy` in force for every request that starts after this.
    pub fn replace(&self, policy: impl BootPolicy + 'static) {
        self.0.store(Arc::new(Box::new(policy)));
    }
}

impl fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedPolicy")
    }
}

/// The policy's answer for one machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSpec {
    /// Profile the machine boots with.
    pub profile: String,
    /// Network boot program for firmware PXE (a path in the boot root), by
    /// the machine's architecture; `None` for an architecture the profile
    /// has no file for.
    pub boot_file: Option<String>,
    /// The iPXE script this machine gets (already rendered).
    pub ipxe_script: String,
    /// Host name to hand out, if configured.
    pub hostname: Option<String>,
    /// Where firmware fetches `boot_file` over TFTP when it is not this
    /// pxed (the profile's `tftp_server`).
    pub tftp_server: Option<Ipv4Addr>,
    /// The class that chose the profile, for iPXE's script URL.
    pub class: Option<String>,
}

/// The iPXE script for a machine that must not netboot: boot from disk.
pub const LOCAL_BOOT_SCRIPT: &str =
    "#!ipxe\necho pxed: this machine boots from its local disk\nexit\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_in_common_spellings_and_prints_canonically() {
        for s in ["52:54:00:AB:cd:01", "52-54-00-ab-cd-01", "525400abcd01"] {
            assert_eq!(
                s.parse::<Mac>().unwrap().to_string(),
                "52:54:00:ab:cd:01",
                "{s}"
            );
        }
        for bad in [
            "52:54:00:ab:cd",
            "zz:54:00:ab:cd:01",
            "",
            "52:54:00:ab:cd:01:02",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    fn verdict(client: ClientKind, decision: Decision) -> Verdict {
        Verdict {
            client,
            decision,
            repeatable: true,
        }
    }

    fn spec(boot_file: Option<&str>) -> Decision {
        Decision::Boot(BootSpec {
            profile: "default".into(),
            boot_file: boot_file.map(str::to_owned),
            ipxe_script: String::new(),
            hostname: None,
            tftp_server: None,
            class: None,
        })
    }

    #[test]
    fn each_boot_client_is_answered_in_its_own_terms() {
        let urls = ServerUrls::new(Ipv4Addr::new(198, 18, 0, 1), 8080);
        let machine = Machine {
            uuid: Some("u-1".into()),
            ..Machine::new(Mac([2, 0, 0, 0, 0, 1]), Arch::UefiX64, ClientKind::Pxe)
        };
        let answer = |client, decision| verdict(client, decision).boot_answer(&machine, &urls);
        let pxe = answer(ClientKind::Pxe, spec(Some("ipxe.efi"))).unwrap();
        assert_eq!(
            (pxe.file.as_str(), pxe.vendor_class, pxe.tftp),
            ("ipxe.efi", &b"PXEClient"[..], true)
        );
        let http = answer(ClientKind::HttpBoot, spec(Some("ipxe.efi"))).unwrap();
        assert_eq!(
            (http.file.as_str(), http.vendor_class, http.tftp),
            ("http://198.18.0.1:8080/ipxe.efi", &b"HTTPClient"[..], false)
        );
        let ipxe = answer(ClientKind::Ipxe, Decision::LocalBoot).unwrap();
        assert_eq!(
            ipxe.file,
            "http://198.18.0.1:8080/boot.ipxe?mac=02:00:00:00:00:01&arch=uefi-x64&uuid=u-1"
        );
        assert_eq!(
            answer(ClientKind::Pxe, Decision::LocalBoot),
            None,
            "firmware boots its disk"
        );
        assert_eq!(
            answer(ClientKind::Pxe, spec(None)),
            None,
            "no file for the architecture"
        );
        assert_eq!(answer(ClientKind::Ipxe, Decision::Ignore), None);
    }

    #[test]
    fn a_replaced_policy_answers_every_later_question_and_an_old_snapshot_stays_whole() {
        struct Named(&'static str);
        impl BootPolicy for Named {
            fn decide(&self, _: &Machine, _: &ServerUrls) -> Verdict {
                verdict(ClientKind::Pxe, Decision::Ignore)
            }
            fn hostname(&self, _: Mac) -> Option<String> {
                Some(self.0.to_owned())
            }
            fn may_netboot(&self, _: Mac) -> bool {
                true
            }
        }
        let shared = SharedPolicy::new(Named("old"));
        let before = shared.current();
        shared.replace(Named("new"));
        assert_eq!(before.hostname(Mac([0; 6])).as_deref(), Some("old"));
        assert_eq!(
            shared.clone().current().hostname(Mac([0; 6])).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn option_93_codes_map_to_architectures() {
        assert_eq!(Arch::from_code(0), Arch::Bios);
        assert_eq!(Arch::from_code(7), Arch::UefiX64);
        assert_eq!(Arch::from_code(9), Arch::UefiX64);
        assert_eq!(Arch::from_code(11), Arch::UefiArm64);
        assert_eq!(Arch::from_code(16), Arch::UefiX64Http);
        assert_eq!(Arch::from_code(41), Arch::RaspberryPi);
        assert_eq!(Arch::from_code(1234), Arch::Other(1234));
        for a in [
            Arch::Bios,
            Arch::UefiX64,
            Arch::UefiArm64,
            Arch::UefiX64Http,
        ] {
            assert_eq!(Arch::from_name(a.name()), Some(a));
        }
    }
}
