//! Reply builders: pure functions from a request and what was decided to the
//! message that answers it (RFC 2131 §4.3, PXE 2.1, UEFI HTTP Boot).

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::{
    v4::{DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption},
    Encodable as _,
};

use super::{classify::Request, outcome::Destination, pool::Subnet};
use crate::policy::{options::OptionSet, Arch, BootAnswer};

/// The skeleton of every reply from `server`: the request's xid, flags,
/// relay and chaddr, the message type and our server identifier.
pub fn reply_to(req: &Request, kind: MessageType, yiaddr: Ipv4Addr, server: Ipv4Addr) -> Message {
    let m = &req.message;
    let mut reply = Message::new_with_id(
        m.xid(),
        Ipv4Addr::UNSPECIFIED,
        yiaddr,
        server,
        m.giaddr(),
        m.chaddr(),
    );
    reply.set_opcode(Opcode::BootReply);
    reply.set_flags(m.flags());
    reply.opts_mut().insert(DhcpOption::MessageType(kind));
    reply
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(server));
    // RFC 3046 §2.2: echo the relay agent information.
    if let Some(relay) = m.opts().get(OptionCode::RelayAgentInformation) {
        reply.opts_mut().insert(relay.clone());
    }
    reply
}

/// The lease's times and the subnet's options (mask, broadcast, router,
/// DNS, domain), and the machine's host name if it has one.
pub fn add_lease_options(reply: &mut Message, subnet: &Subnet, hostname: Option<String>) {
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::AddressLeaseTime(subnet.lease_time));
    opts.insert(DhcpOption::Renewal(subnet.lease_time / 2));
    opts.insert(DhcpOption::Rebinding(subnet.lease_time / 8 * 7));
    opts.insert(DhcpOption::SubnetMask(subnet.network.netmask()));
    opts.insert(DhcpOption::BroadcastAddr(subnet.network.broadcast()));
    if let Some(router) = subnet.router {
        opts.insert(DhcpOption::Router(vec![router]));
    }
    if !subnet.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(subnet.dns.clone()));
    }
    if let Some(domain) = &subnet.domain {
        opts.insert(DhcpOption::DomainName(domain.clone()));
    }
    if let Some(hostname) = hostname {
        opts.insert(DhcpOption::Hostname(hostname));
    }
}

/// The options the operator configured (crate::policy::options) that
/// `req` asked for or that are always sent, each replacing any pxed set
/// with the same code.
pub fn add_configured_options(reply: &mut Message, req: &Request, options: &OptionSet) {
    let requested: Option<Vec<u8>> = match req.message.opts().get(OptionCode::ParameterRequestList)
    {
        Some(DhcpOption::ParameterRequestList(codes)) => {
            Some(codes.iter().map(|c| u8::from(*c)).collect())
        }
        _ => None,
    };
    for (code, value) in options.for_request(requested.as_deref()) {
        reply
            .opts_mut()
            .insert(DhcpOption::Unknown(UnknownOption::new(
                code.into(),
                value.to_vec(),
            )));
    }
}

/// RFC 2131 §2: every client accepts a 576-byte datagram; option 57 may
/// say it takes more.
const SMALLEST_MAX_DATAGRAM: u16 = 576;
/// The IPv4 and UDP headers around a DHCP message.
const IP_UDP_HEADERS: usize = 28;

/// Makes the reply fit the datagram `req`'s client accepts (its option 57,
/// at least 576 bytes): configured options move into the `file` and `sname`
/// fields where the reply leaves them empty (overload, option 52), then
/// are left out, largest first. Returns the codes moved and those left out,
/// for the log.
pub fn fit_configured(
    reply: &mut Message,
    req: &Request,
    configured: &OptionSet,
) -> (Vec<u8>, Vec<u8>) {
    // Measuring encodes the reply: not for the replies of every lease when
    // nothing configured could be moved or left out.
    if configured.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let accepted = match req.message.opts().get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(n)) => (*n).max(SMALLEST_MAX_DATAGRAM),
        _ => SMALLEST_MAX_DATAGRAM,
    };
    let room = usize::from(accepted) - IP_UDP_HEADERS;
    let mut by_size: Vec<(usize, u8)> = configured
        .iter()
        .filter(|(code, _)| reply.opts().get(OptionCode::from(*code)).is_some())
        .map(|(code, o)| (o.value.len(), code))
        .collect();
    by_size.sort_unstable();
    if encoded_len(reply) <= room {
        return (Vec::new(), Vec::new());
    }
    let moved = overload(reply, configured, &mut by_size, room);
    let mut left_out = Vec::new();
    while encoded_len(reply) > room {
        let Some((_, code)) = by_size.pop() else {
            break;
        };
        if reply.opts_mut().remove(OptionCode::from(code)).is_some() {
            left_out.push(code);
        }
    }
    (moved, left_out)
}

fn encoded_len(m: &Message) -> usize {
    m.to_vec().map_or(usize::MAX, |bytes| bytes.len())
}

/// The header fields options may continue in (RFC 2131 §4.1), with the
/// value option 52 gives each (RFC 2132 §9.3) and its size.
const OVERLOAD_FIELDS: [(u8, usize); 2] = [(1, 128), (2, 64)];

/// Moves configured options, largest first, from the options field into
/// `file` and `sname` where the reply leaves them empty, until it fits in
/// `room`; each field's options end with option 255. Moved codes leave
/// `by_size`. Returns them.
fn overload(
    reply: &mut Message,
    configured: &OptionSet,
    by_size: &mut Vec<(usize, u8)>,
    room: usize,
) -> Vec<u8> {
    let empty = |field: Option<&[u8]>| field.is_none_or(|f| f.iter().all(|b| *b == 0));
    let mut fields: Vec<(u8, usize, Vec<u8>)> = OVERLOAD_FIELDS
        .iter()
        .filter(|(which, _)| match which {
            1 => empty(reply.fname()),
            _ => empty(reply.sname()),
        })
        .map(|&(which, size)| (which, size, Vec::new()))
        .collect();
    if fields.is_empty() {
        return Vec::new();
    }
    // Option 52 itself takes room in the options field: counted from the start.
    reply.opts_mut().insert(DhcpOption::OptionOverload(3));
    let mut moved = Vec::new();
    let mut i = by_size.len();
    while i > 0 && encoded_len(reply) > room {
        i -= 1;
        let code = by_size[i].1;
        let Some(option) = configured.get(code) else {
            continue;
        };
        let entry = 2 + option.value.len();
        // One byte stays for the field's end option.
        let Some(field) = fields
            .iter_mut()
            .find(|(_, size, bytes)| bytes.len() + entry < *size)
        else {
            continue;
        };
        field.2.extend_from_slice(&[code, option.value.len() as u8]);
        field.2.extend_from_slice(&option.value);
        reply.opts_mut().remove(OptionCode::from(code));
        moved.push(code);
        by_size.remove(i);
    }
    let mut used = 0;
    for (which, _, mut bytes) in fields.into_iter().filter(|(.., b)| !b.is_empty()) {
        bytes.push(255);
        used |= which;
        match which {
            1 => reply.set_fname(&bytes),
            _ => reply.set_sname(&bytes),
        };
    }
    if used == 0 {
        reply.opts_mut().remove(OptionCode::OptionOverload);
    } else {
        reply.opts_mut().insert(DhcpOption::OptionOverload(used));
    }
    moved
}

/// RFC 2131 §3.4: no lease time in an answer to INFORM.
pub fn remove_lease_times(reply: &mut Message) {
    for code in [
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ] {
        reply.opts_mut().remove(code);
    }
}

/// The boot file or URL, from `server` (or over TFTP from the profile's
/// `tftp_server`).
pub fn add_boot(reply: &mut Message, req: &Request, boot: &BootAnswer, server: Ipv4Addr) {
    let tftp_host = match (boot.tftp, boot.tftp_server) {
        (true, Some(elsewhere)) => elsewhere,
        _ => server,
    };
    reply.set_siaddr(tftp_host);
    reply.set_fname_str(&boot.file);
    let opts = reply.opts_mut();
    // PXE 2.1 §2.5: replies to PXE clients carry option 60; UEFI HTTP Boot
    // requires "HTTPClient" (UEFI 2.x §24.7).
    opts.insert(DhcpOption::ClassIdentifier(boot.vendor_class.to_vec()));
    if boot.tftp {
        opts.insert(DhcpOption::TFTPServerName(
            tftp_host.to_string().into_bytes(),
        ));
        opts.insert(DhcpOption::BootfileName(boot.file.clone().into_bytes()));
        let vendor = if req.arch == Arch::RaspberryPi {
            RASPBERRY_PI_BOOT_MENU.to_vec()
        } else {
            // PXE_DISCOVERY_CONTROL = 8: use the boot file given here, skip
            // boot server discovery (PXE 2.1 §2.4.2.1).
            vec![6, 1, 8, 255]
        };
        opts.insert(DhcpOption::VendorExtensions(vendor));
    }
    if let Some(uuid) = &req.uuid_raw {
        opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
    }
}

/// Option 43 for a Raspberry Pi's boot ROM, which boots from the network
/// only when it finds a boot menu item named "Raspberry Pi Boot". The bytes
/// dnsmasq sends for `pxe-service=0,"Raspberry Pi Boot"` (a test compares
/// them with dnsmasq's own): PXE sub-options (PXE 2.1 §2.4.2.1) 6,
/// discovery control = 3 (no broadcast or multicast discovery); 10, menu
/// prompt, timeout 0, "PXE"; 9, one menu item, type 0, "Raspberry Pi
/// Boot"; end.
const RASPBERRY_PI_BOOT_MENU: [u8; 32] =
    *b"\x06\x01\x03\x0a\x04\x00PXE\x09\x14\x00\x00\x11Raspberry Pi Boot\xff";

/// A NAK saying `why`, and where it goes: RFC 2131 §4.1, broadcast unless
/// it goes to a relay.
pub fn nak(req: &Request, why: &str, server: Ipv4Addr) -> (Message, Destination) {
    let mut reply = reply_to(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED, server);
    reply.set_siaddr(Ipv4Addr::UNSPECIFIED);
    reply.opts_mut().insert(DhcpOption::Message(why.to_owned()));
    let giaddr = req.message.giaddr();
    let to = if giaddr.is_unspecified() {
        Destination::Broadcast
    } else {
        Destination::Unicast(SocketAddrV4::new(giaddr, 67))
    };
    (reply, to)
}

/// RFC 2131 §4.1: relay → giaddr:67; a client with an address → ciaddr:68;
/// otherwise broadcast (we do not unicast to an address the client has not
/// yet configured, which would need an ARP entry injected).
pub fn destination(req: &Request) -> Destination {
    let m = &req.message;
    if !m.giaddr().is_unspecified() {
        return Destination::Unicast(SocketAddrV4::new(m.giaddr(), 67));
    }
    if !m.ciaddr().is_unspecified() && !m.flags().broadcast() {
        return Destination::Unicast(SocketAddrV4::new(m.ciaddr(), 68));
    }
    Destination::Broadcast
}

#[cfg(test)]
mod tests {
    use dhcproto::{
        v4::{DhcpOption, MessageType},
        Decodable as _,
    };

    use super::*;
    use crate::{
        dhcp::classify::{classify, merge_overloaded_options, tests::request},
        policy::options::Configured,
    };

    fn three_long_options() -> OptionSet {
        let mut set = OptionSet::default();
        for (code, len) in [(224, 200), (225, 150), (226, 100)] {
            set.insert(
                code,
                Configured {
                    value: vec![7; len],
                    always_send: true,
                },
            );
        }
        set
    }

    /// An OFFER to a DISCOVER with `options`, fitted; with the codes moved
    /// into file/sname and those left out.
    fn offer_to(
        options: Vec<DhcpOption>,
        configured: &OptionSet,
        boot_file: Option<&str>,
    ) -> (Message, Vec<u8>, Vec<u8>) {
        let req = classify(&request(MessageType::Discover, [2, 0, 0, 0, 0, 1], options)).unwrap();
        let mut reply = reply_to(
            &req,
            MessageType::Offer,
            Ipv4Addr::new(198, 18, 0, 10),
            Ipv4Addr::new(198, 18, 0, 1),
        );
        if let Some(file) = boot_file {
            reply.set_fname_str(file);
        }
        add_configured_options(&mut reply, &req, configured);
        let (moved, left_out) = fit_configured(&mut reply, &req, configured);
        (reply, moved, left_out)
    }

    /// What a client reads from `reply`'s bytes: the options field, then
    /// file and sname as option 52 says.
    fn as_received(reply: &Message) -> (usize, Message) {
        let bytes = reply.to_vec().unwrap();
        let mut received = Message::decode(&mut dhcproto::Decoder::new(&bytes)).unwrap();
        merge_overloaded_options(&bytes, &mut received);
        (bytes.len(), received)
    }

    fn same_options(n: u8, len: usize) -> OptionSet {
        let mut set = OptionSet::default();
        for code in 224..224 + n {
            set.insert(
                code,
                Configured {
                    value: vec![code; len],
                    always_send: true,
                },
            );
        }
        set
    }

    #[test]
    fn configured_options_are_left_out_largest_first_until_the_reply_fits() {
        let configured = three_long_options();
        let (reply, moved, left_out) = offer_to(vec![], &configured, None);
        assert_eq!(moved, vec![226], "100 bytes fit the file field, 150 do not");
        assert_eq!(left_out, vec![224], "200 bytes over 548 with the others");
        assert!(reply.to_vec().unwrap().len() <= 548);
        // A client that takes 1,500-byte datagrams (option 57) gets them all.
        let (reply, moved, left_out) =
            offer_to(vec![DhcpOption::MaxMessageSize(1500)], &configured, None);
        assert!(moved.is_empty() && left_out.is_empty());
        assert!(reply.to_vec().unwrap().len() > 548);
        assert!(reply.opts().get(OptionCode::OptionOverload).is_none());
        // One that says less than 576 still gets 576 (RFC 2131 §2).
        let (_, _, left_out) = offer_to(vec![DhcpOption::MaxMessageSize(300)], &configured, None);
        assert_eq!(left_out, vec![224]);
    }

    #[test]
    fn options_that_overflow_continue_in_the_file_and_sname_fields() {
        // Six of 60 bytes: 372 bytes, over the 548 a 576-byte datagram holds.
        let configured = same_options(6, 60);
        let (reply, moved, left_out) = offer_to(vec![], &configured, None);
        assert_eq!(moved, vec![229, 228], "the largest (then highest) first");
        assert!(left_out.is_empty());
        assert_eq!(
            reply.opts().get(OptionCode::OptionOverload),
            Some(&DhcpOption::OptionOverload(1)),
            "two of 62 bytes fit the 128-byte file field with its end option"
        );
        let (len, received) = as_received(&reply);
        assert!(len <= 548, "{len}");
        for code in 224..230 {
            let got = received.opts().get(OptionCode::from(code));
            assert_eq!(
                got,
                Some(&DhcpOption::Unknown(UnknownOption::new(
                    code.into(),
                    vec![code; 60]
                ))),
                "option {code}"
            );
        }

        // With the boot file in `file`, only sname is free: one more fits.
        let (reply, moved, left_out) = offer_to(vec![], &configured, Some("ipxe.efi"));
        assert_eq!(moved, vec![229]);
        assert_eq!(left_out, vec![228]);
        assert_eq!(
            reply.opts().get(OptionCode::OptionOverload),
            Some(&DhcpOption::OptionOverload(2))
        );
        let (len, received) = as_received(&reply);
        assert!(len <= 548, "{len}");
        assert!(received.opts().get(OptionCode::from(229)).is_some());
        assert_eq!(reply.fname(), Some(&b"ipxe.efi"[..]), "the boot file stays");
    }
}
