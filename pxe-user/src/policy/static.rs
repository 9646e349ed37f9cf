//! The policy written in the config file: profiles, and machines by MAC.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use super::{
    class::{class_of, Class, Labels},
    options::OptionSet,
    provision::{ProvisionKey, PROVISIONED_PATH},
    render, Arch, BootPolicy, BootSpec, ClientKind, Decision, Mac, Machine, Verdict,
};

/// Boot files by architecture, paths in the boot root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    pub bios: String,
    pub uefi_x64: String,
    pub uefi_arm64: String,
    pub uefi_ia32: String,
    pub rpi: String,
}

impl Default for BootFiles {
    /// File names as Debian's `ipxe` package ships them.
    fn default() -> Self {
        Self {
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
            uefi_ia32: "ipxe-ia32.efi".into(),
            rpi: "bootcode.bin".into(),
        }
    }
}

/// The script every profile gets unless it says otherwise: the kernel and
/// initrd of the profile, over HTTP. Their URLs name the machine
/// (`?mac=`), so its boot timeline gets them wherever its requests come
/// from; iPXE names each image by its path alone.
pub const DEFAULT_IPXE_SCRIPT: &str = "#!ipxe\n\
echo pxed: {{mac}} ({{arch}}) boots profile {{profile}}\n\
kernel {{http}}/{{kernel}}?mac={{mac}} initrd={{initrd}} {{cmdline}}\n\
initrd {{http}}/{{initrd}}?mac={{mac}}\n\
boot\n";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub boot_files: BootFiles,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    /// Checked with [`render::check`].
    pub ipxe_script: String,
    /// DHCP options its machines' leases carry (over the subnet's).
    pub options: OptionSet,
    /// The host firmware fetches the boot files from over TFTP, when it is
    /// not this pxed (next-server and option 66 name it).
    pub tftp_server: Option<Ipv4Addr>,
}

impl Profile {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            boot_files: BootFiles::default(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            // Data-centre machines are watched over serial; the last console
            // named becomes /dev/console.
            cmdline: "console=tty0 console=ttyS0,115200".into(),
            ipxe_script: DEFAULT_IPXE_SCRIPT.to_owned(),
            options: OptionSet::default(),
            tftp_server: None,
        }
    }

    fn boot_file(&self, arch: Arch) -> Option<&str> {
        let files = &self.boot_files;
        Some(match arch {
            Arch::Bios => &files.bios,
            Arch::UefiX64 | Arch::UefiX64Http => &files.uefi_x64,
            Arch::UefiArm64 | Arch::UefiArm64Http => &files.uefi_arm64,
            Arch::UefiIa32 => &files.uefi_ia32,
            Arch::RaspberryPi => &files.rpi,
            Arch::Other(_) => return None,
        })
    }
}

/// A machine the config names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineEntry {
    /// `None`: the default profile.
    pub profile: Option<String>,
    /// False once provisioned: the machine boots from disk.
    pub netboot: bool,
    pub hostname: Option<String>,
    /// Overrides the architecture the machine claims (option 93), for
    /// firmware that reports it wrong (e.g. ARM boards sending 0).
    pub arch: Option<Arch>,
    /// Overrides how the machine's boot client is answered.
    pub client: Option<ClientKind>,
    /// Free-form values its scripts use as `{{var.NAME}}`.
    pub vars: BTreeMap<String, String>,
    /// DHCP options its leases carry (over its profile's and the subnet's).
    pub options: OptionSet,
    /// What classes may match it on besides its requests (`rack = "r12"`).
    pub labels: Labels,
}

impl Default for MachineEntry {
    /// A machine known by MAC alone: the default profile, netbooting.
    fn default() -> Self {
        Self {
            profile: None,
            netboot: true,
            hostname: None,
            arch: None,
            client: None,
            vars: BTreeMap::new(),
            options: OptionSet::default(),
            labels: Labels::new(),
        }
    }
}

/// Where the services can be reached, for templates: the address of the
/// interface the machine asked on, so a server on several networks hands
/// each machine URLs it can reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrls {
    /// The server's address as clients reach it.
    pub server: String,
    /// Base URL of the HTTP service, without a trailing slash.
    pub http: String,
}

impl ServerUrls {
    /// The URLs of a server at `address` with HTTP boot on `http_port`.
    pub fn new(address: Ipv4Addr, http_port: u16) -> Self {
        let http = match http_port {
            80 => format!("http://{address}"),
            port => format!("http://{address}:{port}"),
        };
        Self {
            server: address.to_string(),
            http,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StaticPolicy {
    pub profiles: HashMap<String, Profile>,
    pub machines: HashMap<Mac, MachineEntry>,
    /// Profile for machines the config does not name; `None` ignores them.
    pub default_profile: Option<String>,
    /// Signs each machine's `{{provision_token}}`; without it (no API) the
    /// token renders empty.
    pub provision: Option<ProvisionKey>,
    /// `[[class]]`, in the order written: the first that matches counts.
    pub classes: Vec<Class>,
}

impl BootPolicy for StaticPolicy {
    fn decide(&self, machine: &Machine, urls: &ServerUrls) -> Verdict {
        let entry = self.machines.get(&machine.mac);
        Verdict {
            client: entry.and_then(|e| e.client).unwrap_or(machine.client),
            decision: self.decision(entry, machine, urls),
            repeatable: true,
        }
    }

    fn hostname(&self, mac: Mac) -> Option<String> {
        self.machines.get(&mac).and_then(|m| m.hostname.clone())
    }

    fn options(&self, machine: &Machine) -> OptionSet {
        let entry = self.machines.get(&machine.mac);
        let class = self.class_of(machine);
        let profile = entry
            .and_then(|e| e.profile.as_ref())
            .or(class.and_then(|c| c.profile.as_ref()))
            .or(self.default_profile.as_ref())
            .and_then(|name| self.profiles.get(name));
        let mut options = profile.map(|p| p.options.clone()).unwrap_or_default();
        if let Some(class) = class.filter(|c| !c.options.is_empty()) {
            options = class.options.over(&options);
        }
        match entry {
            Some(e) if !e.options.is_empty() => e.options.over(&options),
            _ => options,
        }
    }

    fn knows(&self, mac: Mac) -> bool {
        self.machines.contains_key(&mac)
    }

    fn known_macs(&self) -> Vec<Mac> {
        self.machines.keys().copied().collect()
    }

    fn class_name(&self, machine: &Machine) -> Option<String> {
        self.class_of(machine).map(|c| c.name.clone())
    }

    fn may_netboot(&self, mac: Mac) -> bool {
        self.machines.get(&mac).is_none_or(|m| m.netboot)
    }
}

impl StaticPolicy {
    /// The class `machine` falls in: its request, and its entry's labels.
    pub fn class_of(&self, machine: &Machine) -> Option<&Class> {
        let labels = self.machines.get(&machine.mac).map(|e| &e.labels);
        class_of(&self.classes, machine, labels)
    }

    /// What `machine` boots with `profile`, whatever its entry names (the
    /// decision webhook's choice); `netboot = false` still wins.
    pub fn decide_with_profile(
        &self,
        machine: &Machine,
        urls: &ServerUrls,
        profile: &str,
    ) -> Verdict {
        let entry = self.machines.get(&machine.mac);
        Verdict {
            client: entry.and_then(|e| e.client).unwrap_or(machine.client),
            decision: self.decision_with(entry, machine, urls, Some(profile)),
            repeatable: true,
        }
    }

    fn decision(
        &self,
        entry: Option<&MachineEntry>,
        machine: &Machine,
        urls: &ServerUrls,
    ) -> Decision {
        self.decision_with(entry, machine, urls, None)
    }

    fn decision_with(
        &self,
        entry: Option<&MachineEntry>,
        machine: &Machine,
        urls: &ServerUrls,
        forced_profile: Option<&str>,
    ) -> Decision {
        if entry.is_some_and(|e| !e.netboot) {
            return Decision::LocalBoot;
        }
        let class = self.class_of(machine);
        let profile_name = forced_profile
            .or(entry.and_then(|e| e.profile.as_deref()))
            .or(class.and_then(|c| c.profile.as_deref()))
            .or(self.default_profile.as_deref());
        let Some(profile) = profile_name.and_then(|name| self.profiles.get(name)) else {
            return Decision::Ignore;
        };
        let hostname = entry.and_then(|e| e.hostname.clone());
        let arch = entry.and_then(|e| e.arch).unwrap_or(machine.arch);
        let vars = entry.map(|e| &e.vars);
        let token = self.provision.as_ref().map(|k| k.token(machine.mac));
        let value = |name: &str| -> Option<String> {
            if let Some(var) = name.strip_prefix("var.") {
                return vars?.get(var).cloned();
            }
            Some(match name {
                "mac" => machine.mac.to_string(),
                "arch" => arch.name().to_owned(),
                "uuid" => machine.uuid.clone()?,
                "profile" => profile.name.clone(),
                "hostname" => hostname.clone()?,
                "server" => urls.server.clone(),
                "http" => urls.http.clone(),
                "kernel" => profile.kernel.clone(),
                "initrd" => profile.initrd.clone(),
                "provision_token" => token.clone()?,
                "provision_url" => format!(
                    "{}{}",
                    urls.http,
                    PROVISIONED_PATH.replace("{mac}", &machine.mac.to_string())
                ),
                _ => return None,
            })
        };
        // The command line may use the placeholders too (a token for the
        // installer, say); it is rendered first, then the script around it.
        let cmdline = render::render(&profile.cmdline, value);
        let ipxe_script = render::render(&profile.ipxe_script, |name| match name {
            "cmdline" => Some(cmdline.clone()),
            other => value(other),
        });
        Decision::Boot(BootSpec {
            profile: profile.name.clone(),
            boot_file: profile.boot_file(arch).map(str::to_owned),
            ipxe_script,
            hostname,
            tftp_server: profile.tftp_server,
            class: class.map(|c| c.name.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> StaticPolicy {
        let mut rescue = Profile::named("rescue");
        rescue.kernel = "rescue/vmlinuz".into();
        rescue.boot_files.uefi_x64 = "rescue/ipxe.efi".into();
        let mut machines = HashMap::new();
        machines.insert(
            Mac([2, 0, 0, 0, 0, 1]),
            MachineEntry {
                profile: Some("rescue".into()),
                netboot: true,
                hostname: Some("node1".into()),
                arch: None,
                client: None,
                ..MachineEntry::default()
            },
        );
        machines.insert(
            Mac([2, 0, 0, 0, 0, 2]),
            MachineEntry {
                profile: None,
                netboot: false,
                hostname: None,
                arch: None,
                client: None,
                ..MachineEntry::default()
            },
        );
        StaticPolicy {
            profiles: [
                ("default".to_owned(), Profile::named("default")),
                ("rescue".to_owned(), rescue),
            ]
            .into(),
            machines,
            default_profile: Some("default".into()),
            provision: None,
            classes: Vec::new(),
        }
    }

    fn urls() -> ServerUrls {
        ServerUrls::new(Ipv4Addr::new(198, 18, 0, 1), 80)
    }

    fn machine(last: u8, code: u16) -> Machine {
        Machine::new(
            Mac([2, 0, 0, 0, 0, last]),
            Arch::from_code(code),
            ClientKind::Pxe,
        )
    }

    #[test]
    fn boot_file_follows_the_architecture() {
        let p = policy();
        for (code, want) in [
            (0, "undionly.kpxe"),
            (7, "ipxe.efi"),
            (9, "ipxe.efi"),
            (11, "ipxe-arm64.efi"),
            (6, "ipxe-ia32.efi"),
            (16, "ipxe.efi"),
            (41, "bootcode.bin"),
        ] {
            let Decision::Boot(spec) = p.decide(&machine(9, code), &urls()).decision else {
                panic!("arch {code} boots")
            };
            assert_eq!(spec.boot_file.as_deref(), Some(want), "arch {code}");
        }
        let Decision::Boot(spec) = p.decide(&machine(9, 1234), &urls()).decision else {
            panic!()
        };
        assert_eq!(
            spec.boot_file, None,
            "unknown architectures are not guessed"
        );
    }

    #[test]
    fn a_named_machine_gets_its_profile_and_its_script_is_rendered() {
        let Decision::Boot(spec) = policy().decide(&machine(1, 7), &urls()).decision else {
            panic!()
        };
        assert_eq!(spec.profile, "rescue");
        assert_eq!(spec.boot_file.as_deref(), Some("rescue/ipxe.efi"));
        assert_eq!(spec.hostname.as_deref(), Some("node1"));
        assert!(
            spec.ipxe_script.contains(
                "kernel http://198.18.0.1/rescue/vmlinuz?mac=02:00:00:00:00:01 initrd=initrd.img"
            ),
            "{}",
            spec.ipxe_script
        );
        assert!(
            spec.ipxe_script
                .contains("02:00:00:00:00:01 (uefi-x64) boots profile rescue"),
            "{}",
            spec.ipxe_script
        );
    }

    #[test]
    fn a_per_machine_arch_override_beats_what_the_firmware_claims() {
        let mut p = policy();
        p.machines.insert(
            Mac([2, 0, 0, 0, 0, 4]),
            MachineEntry {
                profile: None,
                netboot: true,
                hostname: None,
                arch: Some(Arch::UefiArm64),
                client: None,
                ..MachineEntry::default()
            },
        );
        let Decision::Boot(spec) = p.decide(&machine(4, 0), &urls()).decision else {
            panic!()
        };
        assert_eq!(
            spec.boot_file.as_deref(),
            Some("ipxe-arm64.efi"),
            "the board sends 93 = 0 but is ARM64"
        );
    }

    #[test]
    fn a_per_machine_client_override_beats_what_the_request_says() {
        let mut p = policy();
        p.machines.get_mut(&Mac([2, 0, 0, 0, 0, 1])).unwrap().client = Some(ClientKind::Pxe);
        let mut ipxe = machine(1, 7);
        ipxe.client = ClientKind::Ipxe;
        assert_eq!(
            p.decide(&ipxe, &urls()).client,
            ClientKind::Pxe,
            "overridden"
        );
        ipxe.mac = Mac([2, 0, 0, 0, 0, 9]);
        assert_eq!(
            p.decide(&ipxe, &urls()).client,
            ClientKind::Ipxe,
            "as detected"
        );
        assert_eq!(
            p.hostname(Mac([2, 0, 0, 0, 0, 1])).as_deref(),
            Some("node1")
        );
        assert_eq!(p.hostname(Mac([2, 0, 0, 0, 0, 9])), None);
    }

    #[test]
    fn a_provisioned_machine_boots_locally_and_strangers_follow_the_default() {
        let mut p = policy();
        assert_eq!(
            p.decide(&machine(2, 7), &urls()).decision,
            Decision::LocalBoot
        );
        assert!(
            matches!(p.decide(&machine(3, 7), &urls()).decision, Decision::Boot(s) if s.profile == "default")
        );
        p.default_profile = None;
        assert_eq!(
            p.decide(&machine(3, 7), &urls()).decision,
            Decision::Ignore,
            "no default: strangers are ignored"
        );
    }
}
