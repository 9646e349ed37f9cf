//! `pxed --check-config --explain SAMPLE`: what a config does with a request
//! before any machine sends it. A sample is written as the request would
//! show it (MAC, architecture, options 60, 77, 82, the relay), classified by
//! the code that classifies real requests, and answered by the same policy.

use std::{fmt::Write as _, net::Ipv4Addr, str::FromStr};

use crate::{
    config::Config,
    dhcp::{
        classify::{arch_of, firmware_of},
        pool::Subnet,
    },
    policy::{
        options::{self, OptionSet},
        Arch, BootPolicy as _, ClientKind, Decision, Mac, Machine, ServerUrls,
    },
    settings::Settings,
};

/// One request to explain: `MAC[,ARCH][,KEY=VALUE]...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample(Machine);

const SAMPLE_HELP: &str = "MAC[,ARCH][,KEY=VALUE]... with KEY one of arch (a name like \
uefi-x64, or option 93's number), vendor_class (option 60), user_class (option 77), relay \
(giaddr), circuit_id and remote_id (option 82: text, or hex bytes as 00:1a:2b), client \
(pxe, ipxe or http: else read from vendor_class and user_class as pxed reads requests)";

impl FromStr for Sample {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let mac: Mac = parts.next().unwrap_or_default().trim().parse()?;
        let mut arch_code = None;
        let mut machine = Machine::new(mac, Arch::Bios, ClientKind::Pxe);
        let mut client = None;
        for part in parts.map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or(("arch", part));
            match key {
                "arch" => arch_code = Some(arch_number(value)?),
                "vendor_class" => machine.vendor_class = Some(value.as_bytes().to_vec()),
                "user_class" => machine.user_class = Some(value.as_bytes().to_vec()),
                "relay" => {
                    machine.relay = Some(
                        value
                            .parse::<Ipv4Addr>()
                            .map_err(|_| format!("relay {value:?} is not an IPv4 address"))?,
                    )
                }
                "circuit_id" => machine.circuit_id = Some(crate::config::relay_agent_id(value)),
                "remote_id" => machine.remote_id = Some(crate::config::relay_agent_id(value)),
                "client" => {
                    client = Some(
                        ClientKind::from_name(value)
                            .ok_or_else(|| format!("client {value:?}: want pxe, ipxe or http"))?,
                    )
                }
                other => return Err(format!("{other:?} is not a sample's key; {SAMPLE_HELP}")),
            }
        }
        machine.arch = arch_of(arch_code, machine.vendor_class.as_deref(), mac);
        machine.client = client.unwrap_or_else(|| {
            firmware_of(
                machine.vendor_class.as_deref(),
                machine.user_class.as_deref(),
            )
            .client()
        });
        Ok(Self(machine))
    }
}

/// Option 93's code for `value`: a number, or the name pxed gives it.
fn arch_number(value: &str) -> Result<u16, String> {
    if let Ok(code) = value.parse() {
        return Ok(code);
    }
    let arch = Arch::from_name(value)
        .ok_or_else(|| format!("arch {value:?}: want a name like uefi-x64, or a number"))?;
    Ok((0..=u16::MAX)
        .find(|code| Arch::from_code(*code) == arch)
        .unwrap_or(0))
}

/// What the config does with `sample`, in one paragraph.
pub fn explain(config: &Config, sample: &Sample) -> String {
    let machine = &sample.0;
    let policy = Settings::policy(config);
    let mut out = format!(
        "{} ({}, {}):",
        machine.mac,
        machine.arch.name(),
        machine.client.name()
    );
    match policy.class_of(machine) {
        Some(class) => write!(out, " class {:?};", class.name),
        None => write!(out, " no class;"),
    }
    .expect("writing to a String");
    // No address is known here: URLs show where this pxed would be.
    let port = config
        .http_port
        .unwrap_or(crate::settings::DEFAULT_HTTP_PORT);
    let urls = ServerUrls {
        server: "<pxed>".to_owned(),
        http: match port {
            80 => "http://<pxed>".to_owned(),
            port => format!("http://<pxed>:{port}"),
        },
    };
    let verdict = policy.decide(machine, &urls);
    let spec = match &verdict.decision {
        Decision::Ignore => {
            out.push_str(" no profile (no machine entry, class or default_profile names one): pxed stays silent");
            return out;
        }
        Decision::LocalBoot => {
            out.push_str(" netboot = false: told to boot from its disk");
            return out;
        }
        Decision::Boot(spec) => spec,
    };
    write!(out, " profile {:?};", spec.profile).expect("writing to a String");
    match verdict.boot_answer(machine, &urls) {
        Some(answer) if answer.tftp => {
            let from = answer
                .tftp_server
                .map_or("this pxed".to_owned(), |ip| ip.to_string());
            write!(out, " boot file {:?} over TFTP from {from};", answer.file)
        }
        Some(answer) => write!(out, " boot URL {:?};", answer.file),
        None => write!(
            out,
            " no boot file (the profile has none for {})",
            machine.arch.name()
        ),
    }
    .expect("writing to a String");
    let (subnet, where_from) = subnet_of(config, machine);
    let mut options = policy.options(machine);
    if let Some(subnet) = subnet {
        options = options.over(&subnet.options);
    }
    write!(
        out,
        " configured options{where_from}: {}",
        describe(&options)
    )
    .expect("writing to a String");
    out
}

/// The subnet whose options a reply to `machine` carries, when the sample
/// says enough to know it.
fn subnet_of<'a>(config: &'a Config, machine: &Machine) -> (Option<&'a Subnet>, String) {
    let subnets = &config.subnets;
    if let Some(relay) = machine.relay {
        return match subnets.iter().find(|s| s.contains(relay)) {
            Some(s) => (Some(s), format!(" (with subnet {}'s)", s.network)),
            None => (None, format!(" (no subnet holds relay {relay})")),
        };
    }
    match subnets.as_slice() {
        [only] => (Some(only), format!(" (with subnet {}'s)", only.network)),
        [] => (None, String::new()),
        _ => (
            None,
            " (without a subnet's: give relay= to pick one)".to_owned(),
        ),
    }
}

fn describe(options: &OptionSet) -> String {
    if options.is_empty() {
        return "none configured".to_owned();
    }
    let each = options.iter().map(|(code, o)| {
        let name = options::name_of(code).map_or(String::new(), |n| format!(" {n}"));
        let when = if o.always_send { "always" } else { "if asked" };
        format!("{code}{name} = {} ({when})", options::show(code, &o.value))
    });
    each.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_as_requests_are() {
        let Sample(m) = "b8:27:eb:01:02:03,vendor_class=PXEClient:Arch:00000:UNDI:002001"
            .parse()
            .unwrap();
        assert_eq!(m.arch, Arch::RaspberryPi, "a Pi boot ROM sends arch 0");
        assert_eq!(m.client, ClientKind::Pxe);
        let Sample(m) = "52:54:00:00:00:01,uefi-x64,user_class=iPXE,relay=198.18.5.1,remote_id=00:1a:2b,circuit_id=Gi1/0/7"
            .parse()
            .unwrap();
        assert_eq!(m.arch, Arch::UefiX64);
        assert_eq!(m.client, ClientKind::Ipxe);
        assert_eq!(m.relay, Some(Ipv4Addr::new(198, 18, 5, 1)));
        assert_eq!(m.remote_id.as_deref(), Some(&[0x00, 0x1a, 0x2b][..]));
        assert_eq!(m.circuit_id.as_deref(), Some(&b"Gi1/0/7"[..]));
        let Sample(m) = "52:54:00:00:00:01,arch=11".parse().unwrap();
        assert_eq!(m.arch, Arch::UefiArm64);
        for (bad, says) in [
            ("52:54:00:00:00", "not a MAC"),
            ("52:54:00:00:00:01,sparc", "arch \"sparc\""),
            ("52:54:00:00:00:01,relay=10.0.0", "not an IPv4"),
            ("52:54:00:00:00:01,colour=blue", "not a sample's key"),
        ] {
            let e = bad.parse::<Sample>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
