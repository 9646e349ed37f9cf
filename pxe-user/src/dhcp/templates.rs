//! Reply templates for the kernel: after the daemon answered a client, its
//! own reply becomes the answer the kernel gives to the next request of the
//! same shape (see `pxe_common::dhcp`). Pure functions: bytes and times in,
//! a map key and value out.
//!
//! The request's shape signature is computed here over the raw options by
//! the programs' own walk (`pxe_common::dhcp::OptionWalk`), and refused
//! (`None`) wherever they would refuse to read the request: then no
//! template is made and every request of that shape stays with userspace.

use std::net::Ipv4Addr;

use pxe_common::dhcp::{
    AnswerEntry, AnswerKey, OptionWalk, BOOTP_CHADDR, BOOTP_CIADDR, BOOTP_FLAGS, BOOTP_GIADDR,
    BOOTP_MAGIC, BOOTP_OPTIONS, BOOTP_XID, MAGIC_COOKIE, MAX_REPLY_LEN, OPT_END, OPT_MESSAGE_TYPE,
    OPT_PAD, PORT_KIND_DHCP, PORT_KIND_PROXY,
};

use super::engine::{KernelAnswer, PROXY_PORT};

/// The interface a template answers on, as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    /// XDP may transmit there itself (see `AnswerEntry::xdp_tx`).
    pub xdp_tx: bool,
}

/// The two clocks a template's deadlines join: the lease store's (Unix
/// seconds) and the kernel's (`CLOCK_MONOTONIC` nanoseconds).
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    pub unix_secs: u64,
    pub monotonic_ns: u64,
}

impl Clocks {
    pub fn now() -> Self {
        let unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Self {
            unix_secs,
            monotonic_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
        }
    }

    /// The kernel's time at Unix second `deadline` (0 if already past).
    /// Rounded down: the kernel stops answering no later than the disk allows.
    pub fn kernel_time(&self, deadline: u64) -> u64 {
        match deadline.checked_sub(self.unix_secs) {
            Some(ahead) => self
                .monotonic_ns
                .saturating_add(ahead.saturating_mul(1_000_000_000)),
            None => 0,
        }
    }
}

/// The shape signature of a request's options, or `None` where the kernel
/// would not read the request (it then never finds a template for it).
/// The walk is the programs' own ([`OptionWalk`]).
pub fn signature(datagram: &[u8]) -> Option<u64> {
    if datagram.len() <= BOOTP_OPTIONS || datagram[BOOTP_MAGIC..BOOTP_OPTIONS] != MAGIC_COOKIE {
        return None;
    }
    let mut walk = OptionWalk::default();
    walk.walk(datagram, BOOTP_OPTIONS, datagram.len())
        .then_some(walk.signature)
}

/// The template of `reply` (an encoded BOOTP message) answering `request`
/// (the datagram as received on `port`), or `None` if the kernel cannot
/// send it (too long, no message type, no shape signature).
pub fn template(
    request: &[u8],
    reply: &[u8],
    answer: &KernelAnswer,
    port: u16,
    interface: &Interface,
    clocks: Clocks,
) -> Option<(AnswerKey, AnswerEntry)> {
    if reply.len() > MAX_REPLY_LEN || reply.len() <= BOOTP_OPTIONS || request.len() < BOOTP_OPTIONS
    {
        return None;
    }
    let signature = signature(request)?;
    let msg_type_at = message_type_offset(reply)?;
    let mut key = AnswerKey {
        signature,
        ifindex: interface.ifindex,
        port_kind: PORT_KIND_DHCP,
        ..bytemuck::Zeroable::zeroed()
    };
    key.mac
        .copy_from_slice(&request[BOOTP_CHADDR..BOOTP_CHADDR + 6]);
    let mut entry: AnswerEntry = bytemuck::Zeroable::zeroed();
    match *answer {
        KernelAnswer::Boot if port == PROXY_PORT => {
            key.port_kind = PORT_KIND_PROXY;
            entry.ack_until_ns = u64::MAX;
        }
        // proxyDHCP on 67: DISCOVERs only; its REQUESTs belong to the network's server.
        KernelAnswer::Boot => entry.offer_until_ns = u64::MAX,
        KernelAnswer::Lease {
            ip,
            stored_until,
            lease_time,
        } => {
            entry.offer_until_ns = clocks.kernel_time(stored_until);
            entry.ack_until_ns =
                clocks.kernel_time(stored_until.saturating_sub(u64::from(lease_time)));
            entry.yiaddr = ip.octets();
        }
    }
    entry.server_mac = interface.mac;
    entry.server_ip = interface.address.octets();
    entry
        .giaddr
        .copy_from_slice(&request[BOOTP_GIADDR..BOOTP_GIADDR + 4]);
    entry.msg_type_at = msg_type_at as u16;
    entry.len = reply.len() as u32;
    entry.xdp_tx = u32::from(interface.xdp_tx);
    entry.reply[..reply.len()].copy_from_slice(reply);
    entry.sum = patched_out_sum(reply, msg_type_at);
    Some((key, entry))
}

/// Offset of option 53's value in an encoded message.
fn message_type_offset(message: &[u8]) -> Option<usize> {
    let mut at = BOOTP_OPTIONS;
    while let Some(&code) = message.get(at) {
        match code {
            OPT_END => return None,
            OPT_PAD => at += 1,
            OPT_MESSAGE_TYPE => {
                return (message.get(at + 1) == Some(&1) && at + 2 < message.len())
                    .then_some(at + 2)
            }
            _ => at += 2 + usize::from(*message.get(at + 1)?),
        }
    }
    None
}

/// Sum of the message's 16-bit words in memory order, with the fields the
/// kernel patches zeroed (see `AnswerEntry::sum`).
fn patched_out_sum(reply: &[u8], msg_type_at: usize) -> u32 {
    let mut bytes = reply.to_vec();
    for range in [
        BOOTP_XID..BOOTP_XID + 4,
        BOOTP_FLAGS..BOOTP_FLAGS + 2,
        BOOTP_CIADDR..BOOTP_CIADDR + 4,
    ] {
        bytes[range].fill(0);
    }
    bytes[msg_type_at] = 0;
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_ne_bytes([w[0], w[1]])))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(options: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; BOOTP_OPTIONS];
        d[0] = 1;
        d[1] = 1;
        d[2] = 6;
        d[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        d[236..240].copy_from_slice(&MAGIC_COOKIE);
        d.extend_from_slice(options);
        d
    }

    const PXE_CLASS: &[u8] = b"PXEClient:Arch:00007:UNDI:003016";

    fn discover(class: &[u8]) -> Vec<u8> {
        let mut o = vec![53, 1, 1, 60, class.len() as u8];
        o.extend_from_slice(class);
        o.extend_from_slice(&[93, 2, 0, 7, 255]);
        request(&o)
    }

    #[test]
    fn discover_and_request_of_one_firmware_share_a_signature() {
        let d = discover(PXE_CLASS);
        let mut r = vec![
            53,
            1,
            3,
            50,
            4,
            198,
            18,
            0,
            10,
            54,
            4,
            198,
            18,
            0,
            1,
            60,
            PXE_CLASS.len() as u8,
        ];
        r.extend_from_slice(PXE_CLASS);
        r.extend_from_slice(&[93, 2, 0, 7, 255, 0, 0, 0]);
        assert_eq!(signature(&d), signature(&request(&r)));
        assert!(signature(&d).is_some());
    }

    #[test]
    fn any_change_to_a_shape_option_changes_the_signature() {
        let base = signature(&discover(PXE_CLASS)).unwrap();
        assert_ne!(
            base,
            signature(&discover(b"PXEClient:Arch:00000:UNDI:002001")).unwrap()
        );
        assert_ne!(
            base,
            signature(&discover(b"PXEClient:Arch:00007:UNDI:00301")).unwrap(),
            "a shorter class"
        );
        let mut ipxe = vec![53, 1, 1, 77, 4];
        ipxe.extend_from_slice(b"iPXE");
        ipxe.push(255);
        assert_ne!(
            signature(&request(&[53, 1, 1, 255])),
            signature(&request(&ipxe))
        );
    }

    #[test]
    fn requests_the_kernel_would_not_read_have_no_signature() {
        let long = [vec![53, 1, 1, 61, 65], vec![1; 65], vec![255]].concat();
        let repeated = [53, 1, 1, 93, 2, 0, 7, 93, 2, 0, 7, 255];
        let cases: [(&str, Vec<u8>); 6] = [
            ("option overload", request(&[53, 1, 1, 52, 1, 3, 255])),
            ("a shape option over 64 bytes", request(&long)),
            ("a repeated shape option", request(&repeated)),
            (
                "an option running past the end",
                request(&[53, 1, 1, 60, 40, 1, 2]),
            ),
            ("a message type of two bytes", request(&[53, 2, 1, 1, 255])),
            (
                "more options than the kernel walks",
                request(&[[12u8, 0]; 41].concat()),
            ),
        ];
        for (what, datagram) in cases {
            assert_eq!(signature(&datagram), None, "{what}");
        }
        let mut bad_cookie = discover(PXE_CLASS);
        bad_cookie[236] = 0;
        assert_eq!(signature(&bad_cookie), None, "no magic cookie");
    }

    #[test]
    fn options_ending_without_an_end_option_still_have_a_signature() {
        assert!(signature(&request(&[53, 1, 1])).is_some());
        assert_eq!(
            signature(&request(&[53, 1, 1])),
            signature(&request(&[53, 1, 1, 255, 9, 9]))
        );
    }

    #[test]
    fn lease_deadlines_become_kernel_times_that_stop_before_the_disk_does() {
        let clocks = Clocks {
            unix_secs: 1_000,
            monotonic_ns: 5_000_000_000,
        };
        let interface = Interface {
            ifindex: 3,
            mac: [2; 6],
            address: Ipv4Addr::new(198, 18, 0, 1),
            xdp_tx: false,
        };
        let mut reply = vec![0u8; 300];
        reply[BOOTP_OPTIONS..BOOTP_OPTIONS + 4].copy_from_slice(&[53, 1, 5, 255]);
        let answer = KernelAnswer::Lease {
            ip: Ipv4Addr::new(198, 18, 0, 10),
            stored_until: 1_000 + 7_200,
            lease_time: 3_600,
        };
        let (key, entry) = template(
            &discover(PXE_CLASS),
            &reply,
            &answer,
            67,
            &interface,
            clocks,
        )
        .unwrap();
        assert_eq!(
            (key.ifindex, key.port_kind, key.mac),
            (3, PORT_KIND_DHCP, [2, 0, 0, 0, 0, 1])
        );
        assert_eq!(entry.offer_until_ns, 5_000_000_000 + 7_200 * 1_000_000_000);
        assert_eq!(entry.ack_until_ns, 5_000_000_000 + 3_600 * 1_000_000_000);
        assert_eq!(
            (entry.msg_type_at, entry.len),
            (BOOTP_OPTIONS as u16 + 2, 300)
        );
        assert_eq!(clocks.kernel_time(999), 0, "a deadline already past");
    }

    #[test]
    fn a_reply_longer_than_the_kernel_sends_gets_no_template() {
        let interface = Interface {
            ifindex: 3,
            mac: [2; 6],
            address: Ipv4Addr::new(198, 18, 0, 1),
            xdp_tx: false,
        };
        let mut reply = vec![0u8; MAX_REPLY_LEN + 1];
        reply[BOOTP_OPTIONS..BOOTP_OPTIONS + 4].copy_from_slice(&[53, 1, 5, 255]);
        let clocks = Clocks {
            unix_secs: 0,
            monotonic_ns: 0,
        };
        assert!(template(
            &discover(PXE_CLASS),
            &reply,
            &KernelAnswer::Boot,
            PROXY_PORT,
            &interface,
            clocks
        )
        .is_none());
    }
}
