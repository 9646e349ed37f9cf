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

/// The interface's MTU, from sysfs.
pub fn mtu(iface: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu")).ok()?.trim().parse().ok()
}

/// The IPv4 network `iface`'s first address is on, e.g. 198.18.0.0/24.
pub fn ipv4_network(iface: &str) -> anyhow::Result<ipnet::Ipv4Net> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for ifaddr in addrs {
        if ifaddr.interface_name != iface {
            continue;
        }
        let (Some(addr), Some(mask)) = (
            ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip()),
            ifaddr.netmask.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip()),
        ) else {
            continue;
        };
        let prefix = u32::from(mask).count_ones() as u8;
        return Ok(ipnet::Ipv4Net::new(addr, prefix)?.trunc());
    }
    bail!("interface {iface} has no IPv4 address")
}
