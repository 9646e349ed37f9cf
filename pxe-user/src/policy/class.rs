//! Classes: machines matched by what their requests say (vendor class,
//! user class, architecture, MAC prefix, relay and its option 82 ids) and by
//! the labels the inventory gives them, like dnsmasq's tags and
//! Kea's client classes. The first class that matches, in the order the
//! config writes them, gives a machine its profile (unless its own entry
//! names one) and options (over the profile's, under the machine's).
//!
//! iPXE's script request (HTTP) carries only the MAC and architecture, so
//! the DHCP answer names the class in the script URL (`class=`) and the
//! script comes from the same profile as the boot file.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{options::OptionSet, Arch, Machine};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Class {
    pub name: String,
    pub matches: Match,
    /// The profile its machines boot, unless their entry names one.
    pub profile: Option<String>,
    pub options: OptionSet,
}

/// What a machine's request must show; every criterion set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// Option 60 starts with this.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 60 is exactly this.
    pub vendor_class_exact: Option<Vec<u8>>,
    /// Option 77 is this, or holds it as one of its RFC 3004 entries.
    pub user_class: Option<Vec<u8>>,
    pub arch: Option<Arch>,
    /// The MAC starts with these bytes (an OUI, or more).
    pub mac_prefix: Option<Vec<u8>>,
    /// The request came through this relay (giaddr).
    pub relay: Option<Ipv4Addr>,
    /// The relay's option 82 circuit id (sub-option 1) is exactly this.
    pub circuit_id: Option<Vec<u8>>,
    /// The relay's option 82 remote id (sub-option 2) is exactly this.
    pub remote_id: Option<Vec<u8>>,
    /// The machine's inventory entry carries every one of these labels.
    pub labels: BTreeMap<String, String>,
}

/// A machine's labels, as its inventory entry (or the config's) gives them.
pub type Labels = BTreeMap<String, String>;

impl Match {
    pub fn matches(&self, machine: &Machine, labels: Option<&Labels>) -> bool {
        let prefix = |want: &Option<Vec<u8>>, got: Option<&[u8]>| match want {
            None => true,
            Some(want) => got.is_some_and(|got| got.starts_with(want)),
        };
        prefix(&self.vendor_class, machine.vendor_class.as_deref())
            && exact(&self.vendor_class_exact, machine.vendor_class.as_deref())
            && prefix(&self.mac_prefix, Some(&machine.mac.0))
            && self.user_class.as_ref().is_none_or(|want| {
                machine
                    .user_class
                    .as_deref()
                    .is_some_and(|raw| user_classes(raw).any(|entry| entry == want.as_slice()))
            })
            && self.arch.is_none_or(|arch| arch == machine.arch)
            && self.relay.is_none_or(|relay| machine.relay == Some(relay))
            && exact(&self.circuit_id, machine.circuit_id.as_deref())
            && exact(&self.remote_id, machine.remote_id.as_deref())
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }

    /// Whether every machine `later` matches is matched by this one too: a
    /// class written after such a one could never be chosen.
    pub fn covers(&self, later: &Match) -> bool {
        let prefix = |mine: &Option<Vec<u8>>, theirs: &Option<Vec<u8>>| match (mine, theirs) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => theirs.starts_with(mine),
            (Some(_), None) => false,
        };
        // A later exact vendor class is a value every earlier criterion on
        // option 60 must admit; a later prefix admits more than one value,
        // which an earlier exact one cannot cover.
        let later_vendor = later
            .vendor_class_exact
            .as_ref()
            .or(later.vendor_class.as_ref());
        let vendor_prefix_covers = match (&self.vendor_class, later_vendor) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => theirs.starts_with(mine),
            (Some(_), None) => false,
        };
        let vendor_exact_covers = self.vendor_class_exact.is_none()
            || (later.vendor_class_exact.is_some()
                && self.vendor_class_exact == later.vendor_class_exact);
        vendor_prefix_covers
            && vendor_exact_covers
            && prefix(&self.mac_prefix, &later.mac_prefix)
            && (self.user_class.is_none() || self.user_class == later.user_class)
            && (self.arch.is_none() || self.arch == later.arch)
            && (self.relay.is_none() || self.relay == later.relay)
            && (self.circuit_id.is_none() || self.circuit_id == later.circuit_id)
            && (self.remote_id.is_none() || self.remote_id == later.remote_id)
            && self
                .labels
                .iter()
                .all(|(k, v)| later.labels.get(k) == Some(v))
    }
}

fn exact(want: &Option<Vec<u8>>, got: Option<&[u8]>) -> bool {
    want.as_deref().is_none_or(|want| got == Some(want))
}

/// Option 77's entries: RFC 3004's length-prefixed list when the bytes are
/// one, else the whole value (iPXE and others send a plain string).
fn user_classes(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut entries = Vec::new();
    let mut rest = raw;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || len > tail.len() {
            entries.clear();
            break;
        }
        entries.push(&tail[..len]);
        rest = &tail[len..];
    }
    if entries.is_empty() {
        entries.push(raw);
    }
    entries.into_iter()
}

/// The first of `classes` that `machine` (with its entry's `labels`)
/// matches: the one its script URL named, if it names one that exists, else
/// the first whose criteria hold.
pub fn class_of<'a>(
    classes: &'a [Class],
    machine: &Machine,
    labels: Option<&Labels>,
) -> Option<&'a Class> {
    if let Some(named) = &machine.class {
        if let Some(class) = classes.iter().find(|c| &c.name == named) {
            return Some(class);
        }
    }
    classes.iter().find(|c| c.matches.matches(machine, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ClientKind, Mac};

    fn machine() -> Machine {
        Machine {
            mac: Mac([0x52, 0x54, 0x00, 0x10, 0x00, 0x01]),
            arch: Arch::UefiX64,
            uuid: None,
            client: ClientKind::Pxe,
            relay: Some(Ipv4Addr::new(198, 18, 5, 1)),
            vendor_class: Some(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
            user_class: Some(b"\x04iPXE\x04rack".to_vec()),
            circuit_id: Some(b"Gi1/0/7".to_vec()),
            remote_id: Some(vec![0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]),
            class: None,
        }
    }

    fn labels() -> Labels {
        [("rack", "r12"), ("role", "db")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into()
    }

    #[test]
    fn every_criterion_set_must_hold() {
        let m = machine();
        let all = Match {
            vendor_class: Some(b"PXEClient:Arch:00007".to_vec()),
            vendor_class_exact: Some(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
            user_class: Some(b"rack".to_vec()),
            arch: Some(Arch::UefiX64),
            mac_prefix: Some(vec![0x52, 0x54, 0x00]),
            relay: Some(Ipv4Addr::new(198, 18, 5, 1)),
            circuit_id: Some(b"Gi1/0/7".to_vec()),
            remote_id: Some(vec![0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e]),
            labels: [("rack".to_owned(), "r12".to_owned())].into(),
        };
        let labels = labels();
        assert!(all.matches(&m, Some(&labels)));
        assert!(
            Match::default().matches(&m, None),
            "no criterion: every machine"
        );
        assert!(
            !all.matches(&m, None),
            "labels wanted, the machine has none"
        );
        for wrong in [
            Match {
                vendor_class: Some(b"HTTPClient".to_vec()),
                ..all.clone()
            },
            Match {
                vendor_class_exact: Some(b"PXEClient:Arch:00007".to_vec()),
                ..all.clone()
            },
            Match {
                user_class: Some(b"rac".to_vec()),
                ..all.clone()
            },
            Match {
                arch: Some(Arch::Bios),
                ..all.clone()
            },
            Match {
                mac_prefix: Some(vec![0xb8, 0x27, 0xeb]),
                ..all.clone()
            },
            Match {
                relay: Some(Ipv4Addr::new(198, 18, 6, 1)),
                ..all.clone()
            },
            Match {
                circuit_id: Some(b"Gi1/0/70".to_vec()),
                ..all.clone()
            },
            Match {
                circuit_id: Some(b"Gi1/0/".to_vec()),
                ..all.clone()
            },
            Match {
                remote_id: Some(vec![0x00, 0x1a]),
                ..all.clone()
            },
            Match {
                labels: [("rack".to_owned(), "r1".to_owned())].into(),
                ..all.clone()
            },
        ] {
            assert!(!wrong.matches(&m, Some(&labels)), "{wrong:?}");
        }
        let plain = Machine {
            user_class: Some(b"iPXE".to_vec()),
            ..m
        };
        assert!(Match {
            user_class: Some(b"iPXE".to_vec()),
            ..Match::default()
        }
        .matches(&plain, None));
    }

    #[test]
    fn a_class_covers_those_it_would_always_win_over() {
        let uefi = Match {
            vendor_class: Some(b"PXEClient:Arch:00007".to_vec()),
            ..Match::default()
        };
        let narrower = Match {
            vendor_class: Some(b"PXEClient:Arch:00007:UNDI".to_vec()),
            mac_prefix: Some(vec![0x52, 0x54, 0x00]),
            ..Match::default()
        };
        assert!(uefi.covers(&narrower));
        assert!(!narrower.covers(&uefi));
        assert!(Match::default().covers(&uefi));
        let other_arch = Match {
            arch: Some(Arch::Bios),
            ..Match::default()
        };
        assert!(!other_arch.covers(&uefi));
        let exact = |v: &[u8]| Match {
            vendor_class_exact: Some(v.to_vec()),
            ..Match::default()
        };
        assert!(uefi.covers(&exact(b"PXEClient:Arch:00007:UNDI:003016")));
        assert!(!uefi.covers(&exact(b"PXEClient:Arch:00000")));
        assert!(
            !exact(b"PXEClient:Arch:00007").covers(&uefi),
            "exact is narrower"
        );
        assert!(exact(b"PXEClient").covers(&exact(b"PXEClient")));
        let rack = |pairs: &[(&str, &str)]| Match {
            labels: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Match::default()
        };
        assert!(rack(&[("rack", "r1")]).covers(&rack(&[("rack", "r1"), ("role", "db")])));
        assert!(!rack(&[("rack", "r1"), ("role", "db")]).covers(&rack(&[("rack", "r1")])));
        let port = |id: &[u8]| Match {
            circuit_id: Some(id.to_vec()),
            ..Match::default()
        };
        assert!(port(b"Gi1/0/7").covers(&port(b"Gi1/0/7")));
        assert!(!port(b"Gi1/0/7").covers(&port(b"Gi1/0/8")));
    }

    #[test]
    fn the_class_a_script_url_names_wins() {
        let class = |name: &str, matches: Match| Class {
            name: name.into(),
            matches,
            profile: None,
            options: OptionSet::default(),
        };
        let classes = vec![
            class(
                "bios",
                Match {
                    arch: Some(Arch::Bios),
                    ..Match::default()
                },
            ),
            class("any", Match::default()),
        ];
        let m = machine();
        assert_eq!(
            class_of(&classes, &m, None).map(|c| c.name.as_str()),
            Some("any")
        );
        let named = Machine {
            class: Some("bios".into()),
            ..machine()
        };
        assert_eq!(
            class_of(&classes, &named, None).map(|c| c.name.as_str()),
            Some("bios")
        );
        let unknown = Machine {
            class: Some("gone".into()),
            ..machine()
        };
        assert_eq!(
            class_of(&classes, &unknown, None).map(|c| c.name.as_str()),
            Some("any")
        );
    }
}
