//! Turning a datagram into a request the engine can decide on.
//!
//! Firmware detection follows what clients actually send:
//! - `PXEClient…` in option 60: a PXE ROM or UEFI PXE; `HTTPClient…`: UEFI
//!   HTTP Boot.
//! - iPXE is recognised by its user class (option 77) `iPXE`, in RFC 3004
//!   form or as the plain string older builds send; option 175 alone proves
//!   nothing (other stacks built from iPXE send it too).
//! - Option 93 picks the architecture; a PXE client without it is a legacy
//!   BIOS ROM. Raspberry Pi boot ROMs send 93 = 0 but are known by their
//!   vendor class `PXEClient:Arch:00000:UNDI:002001` and MAC prefix.

use std::net::Ipv4Addr;

use dhcproto::{
    v4::{
        relay::{RelayCode, RelayInfo},
        DhcpOption, DhcpOptions, Message, MessageType, OptionCode,
    },
    Decodable, Decoder,
};

use crate::policy::{Arch, ClientKind, Mac};

/// What kind of boot client sent the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Not a network boot client (an OS's DHCP client).
    NotPxe,
    /// Firmware PXE (BIOS ROM, UEFI PXE): wants a boot file over TFTP.
    Pxe,
    /// iPXE: wants its script, over HTTP.
    Ipxe,
    /// UEFI HTTP Boot: wants a URL.
    HttpBoot,
}

impl Firmware {
    /// How the policy answers it; a plain DHCP client gets only its options.
    pub fn client(self) -> ClientKind {
        match self {
            Self::NotPxe | Self::Pxe => ClientKind::Pxe,
            Self::Ipxe => ClientKind::Ipxe,
            Self::HttpBoot => ClientKind::HttpBoot,
        }
    }
}

/// A parsed, classified request.
#[derive(Clone, Debug)]
pub struct Request {
    pub message: Message,
    pub msg_type: MessageType,
    pub mac: Mac,
    pub client_id: Option<Vec<u8>>,
    pub firmware: Firmware,
    pub arch: Arch,
    /// Option 97 as text (UUID form when it is the usual type-0 GUID).
    pub uuid: Option<String>,
    /// Raw option 97, echoed to PXE clients.
    pub uuid_raw: Option<Vec<u8>>,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    /// Options 60 and 77 as sent, for the config's classes.
    pub vendor_class: Option<Vec<u8>>,
    pub user_class: Option<Vec<u8>>,
    /// Option 82's circuit id (sub-option 1) and remote id (2), for classes.
    pub circuit_id: Option<Vec<u8>>,
    pub remote_id: Option<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ignore {
    #[error("not a DHCP message: {0}")]
    Malformed(String),
    #[error("a BOOTREPLY, not a request")]
    NotARequest,
    #[error("not Ethernet (htype {0}, hlen {1})")]
    NotEthernet(u8, u8),
    #[error("no DHCP message type (plain BOOTP is not served)")]
    NoMessageType,
}

const RASPBERRY_PI_OUIS: [[u8; 3]; 5] = [
    [0xb8, 0x27, 0xeb],
    [0xdc, 0xa6, 0x32],
    [0xe4, 0x5f, 0x01],
    [0xd8, 0x3a, 0xdd],
    [0x2c, 0xcf, 0x67],
];

/// Parses and classifies one datagram received on port 67 or 4011.
pub fn classify(datagram: &[u8]) -> Result<Request, Ignore> {
    let mut message = decode(datagram)?;
    if message.opcode() != dhcproto::v4::Opcode::BootRequest {
        return Err(Ignore::NotARequest);
    }
    if message.htype() != dhcproto::v4::HType::Eth
        || message.hlen() != 6
        || message.chaddr().len() < 6
    {
        return Err(Ignore::NotEthernet(
            u8::from(message.htype()),
            message.hlen(),
        ));
    }
    merge_overloaded_options(datagram, &mut message);
    let opts = message.opts();
    let msg_type = opts.msg_type().ok_or(Ignore::NoMessageType)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&message.chaddr()[..6]);

    let vendor_class = bytes(opts, OptionCode::ClassIdentifier);
    let user_class = bytes(opts, OptionCode::UserClass);
    let arch_code = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    let firmware = firmware_of(vendor_class, user_class);
    let arch = arch_of(arch_code, vendor_class, Mac(mac));
    let uuid_raw = bytes(opts, OptionCode::ClientMachineIdentifier).map(<[u8]>::to_vec);
    let (circuit_id, remote_id) = relay_agent_ids(opts);
    let request = Request {
        circuit_id,
        remote_id,
        vendor_class: vendor_class.map(<[u8]>::to_vec),
        user_class: user_class.map(<[u8]>::to_vec),
        msg_type,
        mac: Mac(mac),
        client_id: bytes(opts, OptionCode::ClientIdentifier).map(<[u8]>::to_vec),
        firmware,
        arch,
        uuid: uuid_raw.as_deref().and_then(uuid_text),
        uuid_raw,
        requested_ip: match opts.get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        },
        server_id: match opts.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        },
        hostname: match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        },
        message,
    };
    Ok(request)
}

/// dhcproto 0.15 asserts on some option lengths (`debug_assert!(len == 0)`
/// for rapid commit, found by the noise test): a hostile option could panic
/// a debug build, and any future decoder bug could panic a release one. A
/// panic here would take the DHCP service down, so it is contained and the
/// datagram ignored like any other malformed one.
fn decode(datagram: &[u8]) -> Result<Message, Ignore> {
    match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(datagram))) {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(e)) => Err(Ignore::Malformed(e.to_string())),
        Err(_) => Err(Ignore::Malformed(
            "the DHCP decoder rejected it (panicked)".to_owned(),
        )),
    }
}

fn bytes(opts: &DhcpOptions, code: OptionCode) -> Option<&[u8]> {
    match opts.get(code)? {
        DhcpOption::ClassIdentifier(b)
        | DhcpOption::UserClass(b)
        | DhcpOption::ClientMachineIdentifier(b)
        | DhcpOption::ClientIdentifier(b) => Some(b),
        _ => None,
    }
}

/// The boot client, from options 60 and 77 as sent.
pub fn firmware_of(vendor_class: Option<&[u8]>, user_class: Option<&[u8]>) -> Firmware {
    if user_class.is_some_and(is_ipxe_user_class) {
        Firmware::Ipxe
    } else if vendor_class.is_some_and(|v| v.starts_with(b"HTTPClient")) {
        Firmware::HttpBoot
    } else if vendor_class.is_some_and(|v| v.starts_with(b"PXEClient")) {
        Firmware::Pxe
    } else {
        Firmware::NotPxe
    }
}

/// The architecture, from option 93 (none: a legacy BIOS ROM), or a
/// Raspberry Pi's boot ROM, which says 0 but is known by its vendor class
/// and MAC prefix.
pub fn arch_of(code: Option<u16>, vendor_class: Option<&[u8]>, mac: Mac) -> Arch {
    let arch = Arch::from_code(code.unwrap_or(0));
    let [a, b, c, ..] = mac.0;
    if arch == Arch::Bios
        && vendor_class.is_some_and(|v| v.starts_with(b"PXEClient:Arch:00000:UNDI:002001"))
        && RASPBERRY_PI_OUIS.contains(&[a, b, c])
    {
        return Arch::RaspberryPi;
    }
    arch
}

/// Option 82's circuit id and remote id (RFC 3046 §2.0), when a relay added them.
fn relay_agent_ids(opts: &DhcpOptions) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let Some(DhcpOption::RelayAgentInformation(info)) = opts.get(OptionCode::RelayAgentInformation)
    else {
        return (None, None);
    };
    let id = |code| match info.get(code) {
        Some(RelayInfo::AgentCircuitId(id) | RelayInfo::AgentRemoteId(id)) => Some(id.clone()),
        _ => None,
    };
    (id(RelayCode::AgentCircuitId), id(RelayCode::AgentRemoteId))
}

/// iPXE's user class: RFC 3004 instances (length-prefixed), or the bare
/// string some builds and chainloaded ROMs send.
fn is_ipxe_user_class(raw: &[u8]) -> bool {
    if raw == b"iPXE" {
        return true;
    }
    let mut rest = raw;
    while let [len, tail @ ..] = rest {
        let len = usize::from(*len);
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// Option 97 type 0 is a 16-byte GUID (RFC 4578 §2.2), shown in the SMBIOS
/// form firmware setup screens use.
fn uuid_text(raw: &[u8]) -> Option<String> {
    let [0, g @ ..] = raw else { return None };
    if g.len() != 16 {
        return None;
    }
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[3], g[2], g[1], g[0], g[5], g[4], g[7], g[6], g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    ))
}

/// RFC 2132 §9.3: with option 52, more options live in the `file` (1), `sname`
/// (2) or both (3) fields. dhcproto reads those fields as strings, so they are
/// parsed here from the datagram itself; options already seen win.
pub(crate) fn merge_overloaded_options(datagram: &[u8], message: &mut Message) {
    let Some(DhcpOption::OptionOverload(which)) =
        message.opts().get(OptionCode::OptionOverload).cloned()
    else {
        return;
    };
    const SNAME: std::ops::Range<usize> = 44..108;
    const FILE: std::ops::Range<usize> = 108..236;
    let mut fields = Vec::new();
    if which & 1 != 0 {
        fields.push(FILE);
    }
    if which & 2 != 0 {
        fields.push(SNAME);
    }
    for field in fields {
        let Some(raw) = datagram.get(field) else {
            continue;
        };
        let Ok(Ok(extra)) =
            std::panic::catch_unwind(|| DhcpOptions::decode(&mut Decoder::new(raw)))
        else {
            continue;
        };
        for (code, option) in extra.iter() {
            if message.opts().get(*code).is_none() {
                message.opts_mut().insert(option.clone());
            }
        }
    }
    message.clear_fname();
    message.clear_sname();
}

#[cfg(test)]
pub(crate) mod tests {
    use dhcproto::{v4, Encodable, Encoder};

    use super::*;

    /// A request as a client would send it, for engine and classify tests.
    pub fn request(msg_type: MessageType, mac: [u8; 6], options: Vec<DhcpOption>) -> Vec<u8> {
        let mut msg = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        msg.set_xid(0x1234_5678);
        msg.opts_mut().insert(DhcpOption::MessageType(msg_type));
        for o in options {
            msg.opts_mut().insert(o);
        }
        let mut buf = Vec::new();
        msg.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    #[test]
    fn a_relays_circuit_and_remote_ids_are_read_from_option_82() {
        let mut datagram = request(MessageType::Discover, MAC, vec![]);
        let end = datagram.len() - 1;
        assert_eq!(datagram[end], 255);
        let agent = [
            82, 14, 1, 7, b'G', b'i', b'1', b'/', b'0', b'/', b'7', 2, 3, 0x00, 0x1a, 0x2b,
        ];
        datagram.splice(end..end, agent);
        let r = classify(&datagram).unwrap();
        assert_eq!(r.circuit_id.as_deref(), Some(&b"Gi1/0/7"[..]));
        assert_eq!(r.remote_id.as_deref(), Some(&[0x00, 0x1a, 0x2b][..]));
        let plain = classify(&request(MessageType::Discover, MAC, vec![])).unwrap();
        assert_eq!((plain.circuit_id, plain.remote_id), (None, None));
    }

    #[test]
    fn uefi_pxe_ipxe_and_http_boot_are_told_apart() {
        let uefi = request(
            MessageType::Discover,
            MAC,
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(7)),
            ],
        );
        let r = classify(&uefi).unwrap();
        assert_eq!((r.firmware, r.arch), (Firmware::Pxe, Arch::UefiX64));

        let ipxe_rfc3004 = request(
            MessageType::Discover,
            MAC,
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
                DhcpOption::UserClass(b"\x04iPXE".to_vec()),
            ],
        );
        assert_eq!(classify(&ipxe_rfc3004).unwrap().firmware, Firmware::Ipxe);
        let ipxe_plain = request(
            MessageType::Discover,
            MAC,
            vec![DhcpOption::UserClass(b"iPXE".to_vec())],
        );
        assert_eq!(classify(&ipxe_plain).unwrap().firmware, Firmware::Ipxe);

        let http = request(
            MessageType::Discover,
            MAC,
            vec![
                DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(16)),
            ],
        );
        let r = classify(&http).unwrap();
        assert_eq!(
            (r.firmware, r.arch),
            (Firmware::HttpBoot, Arch::UefiX64Http)
        );

        let os = request(
            MessageType::Discover,
            MAC,
            vec![DhcpOption::ClassIdentifier(b"udhcp 1.35.0".to_vec())],
        );
        assert_eq!(classify(&os).unwrap().firmware, Firmware::NotPxe);
    }

    #[test]
    fn an_option_of_the_wrong_length_is_malformed_not_a_panic() {
        // Found by the dhcp_decision fuzzer: BLQ base time (152) must be 4
        // bytes, and dhcproto debug-asserts it; any length is sent here.
        let bytes = request(MessageType::Discover, MAC, vec![]);
        let end = bytes.len() - 1;
        assert_eq!(bytes[end], 255, "the options end here");
        for len in [0u8, 1, 3, 5] {
            let mut hostile = bytes.clone();
            hostile.truncate(end);
            hostile.extend_from_slice(&[152, len]);
            hostile.extend(std::iter::repeat_n(7, usize::from(len)));
            hostile.push(255);
            // In a release build dhcproto reads on and may decode something;
            // either way classify returns, it never panics.
            let _ = classify(&hostile);
        }
    }

    #[test]
    fn option_175_alone_does_not_make_ipxe() {
        let r = classify(&request(
            MessageType::Discover,
            MAC,
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient".to_vec()),
                DhcpOption::Unknown(v4::UnknownOption::new(
                    175.into(),
                    vec![0xb1, 0x05, 0x01, 0x01, 0x01, 0x08, 0x01, 0x01],
                )),
            ],
        ))
        .unwrap();
        assert_eq!(r.firmware, Firmware::Pxe);
    }

    #[test]
    fn a_pxe_client_without_option_93_is_bios_and_raspberry_pi_is_recognised() {
        let r = classify(&request(
            MessageType::Discover,
            MAC,
            vec![DhcpOption::ClassIdentifier(b"PXEClient".to_vec())],
        ))
        .unwrap();
        assert_eq!(r.arch, Arch::Bios);
        let pi = request(
            MessageType::Discover,
            [0xdc, 0xa6, 0x32, 1, 2, 3],
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(0)),
            ],
        );
        assert_eq!(classify(&pi).unwrap().arch, Arch::RaspberryPi);
    }

    #[test]
    fn uuid_is_read_in_smbios_form() {
        let mut raw = vec![0u8];
        raw.extend(1..=16u8);
        let r = classify(&request(
            MessageType::Discover,
            MAC,
            vec![DhcpOption::ClientMachineIdentifier(raw)],
        ))
        .unwrap();
        assert_eq!(
            r.uuid.as_deref(),
            Some("04030201-0605-0807-090a-0b0c0d0e0f10")
        );
    }

    #[test]
    fn options_in_an_overloaded_file_field_are_read() {
        let mut datagram = request(
            MessageType::Discover,
            MAC,
            vec![DhcpOption::OptionOverload(1)],
        );
        // Put option 60 "PXEClient" and END into the file field (bytes 108..236).
        let inner = [&[60u8, 9][..], b"PXEClient", &[255]].concat();
        datagram[108..108 + inner.len()].copy_from_slice(&inner);
        let r = classify(&datagram).unwrap();
        assert_eq!(r.firmware, Firmware::Pxe);
    }

    #[test]
    fn options_that_trip_the_decoder_are_contained() {
        // Rapid commit (80) must be empty; this one claims a byte.
        let good = request(MessageType::Discover, MAC, vec![]);
        let end = good.iter().rposition(|&b| b == 255).unwrap();
        let mut d = good[..end].to_vec();
        d.extend_from_slice(&[80, 1, 0, 255]);
        let result = std::panic::catch_unwind(|| classify(&d));
        assert!(
            result.is_ok(),
            "classify must never panic, whatever the decoder does"
        );
    }

    #[test]
    fn garbage_is_ignored_with_a_reason_never_a_panic() {
        assert!(matches!(classify(b""), Err(Ignore::Malformed(_))));
        assert!(classify(&[0u8; 300]).is_err());
        let mut x: u64 = 0x2545_f491;
        let valid = request(
            MessageType::Request,
            MAC,
            vec![DhcpOption::ClassIdentifier(b"PXEClient".to_vec())],
        );
        for i in 0..20_000 {
            let mut d = valid.clone();
            for _ in 0..(i % 7 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % d.len();
                d[at] = (x >> 24) as u8;
            }
            d.truncate(((x >> 40) as usize) % (d.len() + 1));
            let _ = classify(&d);
        }
    }
}
