//! Facts about the serving interface that the services derive defaults from.

use std::net::Ipv4Addr;

use anyhow::{bail, Context as _};

/// The first IPv4 address of `iface`: the address the services bind to and
/// answer from.
pub fn ipv4_address(iface: &str) -> anyhow::Result<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for ifaddr in addrs {
        if ifaddr.interface_name != iface {
            continue;
        }
        if let Some(v4) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            return Ok(v4.ip());
        }
    }
    bail!("interface {iface} has no IPv4 address; give it one (ip addr add …) before serving on it")
}

/// The interface's index (what the kernel programs see a packet arrive on).
pub fn index(iface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(iface)
        .map_err(|_| anyhow::anyhow!("no interface named {iface} here"))
}

/// The name of the interface with this index, for logs ("ifindex N" when it
/// is gone).
pub fn name_of(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return format!("ifindex {index}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The interface's MAC address, from sysfs.
pub fn mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .with_context(|| format!("reading the MAC address of {iface}"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{iface} has no Ethernet MAC address ({})", text.trim()))
}

/// The interface's MTU, from sysfs.
pub fn mtu(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The IPv4 network `iface`'s first address is on, e.g. 198.18.0.0/24.
pub fn ipv4_network(iface: &str) -> anyhow::Result<ipnet::Ipv4Net> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for ifaddr in addrs {
        if ifaddr.interface_name != iface {
            continue;
        }
        let (Some(addr), Some(mask)) = (
            ifaddr
                .address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
            ifaddr
                .netmask
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
        ) else {
            continue;
        };
        let prefix = u32::from(mask).count_ones() as u8;
        return Ok(ipnet::Ipv4Net::new(addr, prefix)?.trunc());
    }
    bail!("interface {iface} has no IPv4 address")
}

/// Sets a socket's receive buffer to `bytes`, past `net.core.rmem_max` when
/// the process may (SO_RCVBUFFORCE needs CAP_NET_ADMIN), else as far as the
/// limit allows. Best effort: a smaller buffer still works, it only drops
/// more of a burst.
pub fn grow_receive_buffer(socket: &impl std::os::fd::AsRawFd, bytes: usize) {
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid descriptor and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// May XDP send a reply itself on this interface? In generic mode the
/// stack transmits it; in native mode only a real NIC's driver does: veth
/// and other virtual drivers drop XDP_TX frames unless their peer runs XDP
/// too, so their replies are left to TC.
pub fn xdp_can_transmit(iface: &str, mode: Option<crate::fastpath::AttachedXdp>) -> bool {
    use crate::fastpath::AttachedXdp;
    match mode {
        Some(AttachedXdp::Generic) => true,
        Some(AttachedXdp::Native) => is_physical(iface),
        None => false,
    }
}

/// A device with a driver behind it (a NIC), not a virtual one (veth, bridge).
fn is_physical(iface: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_named_by_index_and_a_missing_one_says_so() {
        // The loopback interface is the first of every network namespace.
        assert_eq!(name_of(1), "lo");
        assert_eq!(index("lo").unwrap(), 1);
        assert_eq!(name_of(u32::MAX), "ifindex 4294967295");
    }

    #[test]
    fn only_generic_xdp_or_a_real_nic_transmits() {
        use crate::fastpath::AttachedXdp;
        assert!(xdp_can_transmit("lo", Some(AttachedXdp::Generic)));
        assert!(
            !xdp_can_transmit("lo", Some(AttachedXdp::Native)),
            "lo has no device"
        );
        assert!(!xdp_can_transmit("lo", None));
    }
}
