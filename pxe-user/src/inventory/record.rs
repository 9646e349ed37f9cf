//! Inventory records as the API speaks them (JSON) and the store keeps them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::{Arch, ClientKind, Mac};

/// A machine the API knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    #[serde(with = "mac_text")]
    pub mac: Mac,
    /// `None`: the default profile.
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// A fixed address (DHCP reservation), full mode.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// False once provisioned: the machine boots from its disk.
    #[serde(default = "yes")]
    pub netboot: bool,
    #[serde(default, with = "arch_name")]
    pub arch: Option<Arch>,
    #[serde(default, with = "client_name")]
    pub client: Option<ClientKind>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form values for iPXE scripts: `{{var.NAME}}`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Counts the record's writes; the API's ETag.
    #[serde(default)]
    pub revision: u64,
}

fn yes() -> bool {
    true
}

impl MachineRecord {
    /// A machine known by MAC alone: default profile, netbooting.
    pub fn new(mac: Mac) -> Self {
        Self {
            mac,
            profile: None,
            hostname: None,
            address: None,
            netboot: true,
            arch: None,
            client: None,
            labels: BTreeMap::new(),
            vars: BTreeMap::new(),
            revision: 0,
        }
    }

    /// Whether every label of `selector` is on this machine.
    pub fn matches(&self, selector: &Selector) -> bool {
        selector
            .0
            .iter()
            .all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Labels that select machines: `rack=r12,role=db` (all must match).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(pub BTreeMap<String, String>);

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut labels = BTreeMap::new();
        for pair in s.split(',').filter(|p| !p.trim().is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(format!("label selector {pair:?} is not KEY=VALUE"));
            };
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        if labels.is_empty() {
            return Err("an empty label selector would select every machine".to_owned());
        }
        Ok(Self(labels))
    }
}

/// A profile the API defines: unset fields take [`crate::policy::r#static::Profile::named`]'s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileRecord {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub boot_files: BootFilesRecord,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub ipxe_script: Option<String>,
    #[serde(default)]
    pub revision: u64,
}

impl ProfileRecord {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            boot_files: BootFilesRecord::default(),
            kernel: None,
            initrd: None,
            cmdline: None,
            ipxe_script: None,
            revision: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFilesRecord {
    pub bios: Option<String>,
    pub uefi_x64: Option<String>,
    pub uefi_arm64: Option<String>,
    pub uefi_ia32: Option<String>,
    pub rpi: Option<String>,
}

pub mod mac_text {
    use super::*;

    pub fn serialize<S: Serializer>(mac: &Mac, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(mac)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

mod arch_name {
    use super::*;

    pub fn serialize<S: Serializer>(arch: &Option<Arch>, s: S) -> Result<S::Ok, S::Error> {
        match arch {
            Some(a) => s.serialize_some(a.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arch>, D::Error> {
        let Some(name) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        Arch::from_name(&name).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "arch {name:?} is unknown (bios, uefi-ia32, uefi-x64, uefi-arm64, uefi-x64-http, uefi-arm64-http, rpi)"
            ))
        })
    }
}

mod client_name {
    use super::*;

    pub fn serialize<S: Serializer>(client: &Option<ClientKind>, s: S) -> Result<S::Ok, S::Error> {
        match client {
            Some(c) => s.serialize_some(c.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ClientKind>, D::Error> {
        let Some(name) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        ClientKind::from_name(&name).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("client {name:?} is unknown (pxe, ipxe, http)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_from_the_apis_json_and_says_which_field_is_wrong() {
        let r: MachineRecord = serde_json::from_str(
            r#"{"mac":"52:54:00:00:00:01","profile":"installer","arch":"uefi-arm64","client":"ipxe","labels":{"rack":"r12"}}"#,
        )
        .unwrap();
        assert_eq!(r.mac, Mac([0x52, 0x54, 0, 0, 0, 1]));
        assert!(r.netboot, "netboot unless told");
        assert_eq!(r.arch, Some(Arch::UefiArm64));
        assert_eq!(r.client, Some(ClientKind::Ipxe));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["mac"], "52:54:00:00:00:01");
        assert_eq!(json["arch"], "uefi-arm64");
        for (bad, says) in [
            (
                r#"{"mac":"52:54:00:00:00:01","netbot":false}"#,
                "unknown field `netbot`",
            ),
            (r#"{"mac":"nope"}"#, "not a MAC address"),
            (
                r#"{"mac":"52:54:00:00:00:01","arch":"vax"}"#,
                "arch \"vax\" is unknown",
            ),
            (
                r#"{"mac":"52:54:00:00:00:01","address":"10.0.0"}"#,
                "invalid IPv4 address",
            ),
        ] {
            let e = serde_json::from_str::<MachineRecord>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn selectors_need_every_label() {
        let s: Selector = "rack=r12, role=db".parse().unwrap();
        let mut m = MachineRecord::new(Mac([0; 6]));
        m.labels.insert("rack".into(), "r12".into());
        assert!(!m.matches(&s));
        m.labels.insert("role".into(), "db".into());
        assert!(m.matches(&s));
        assert!("".parse::<Selector>().is_err());
        assert!("rack".parse::<Selector>().is_err());
    }
}
