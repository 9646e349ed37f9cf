//! The network most tests, the bench and the demo start from: a server
//! namespace and a client namespace joined by one veth pair, `eth0` at both
//! ends unless the client's is named otherwise. Built by [`Lab::pair`];
//! several hosts on one broadcast domain by [`Lab::segment`].

use std::io;

use crate::{Lab, Netns};

/// The server's address on the pair unless told otherwise.
pub const SERVER_CIDR: &str = "198.18.0.1/24";
/// The client's address, for clients that do not ask DHCP for one.
pub const CLIENT_CIDR: &str = "198.18.0.2/24";

/// A server namespace ("srv") and a client namespace ("cli") on one link.
#[derive(Clone, Debug)]
pub struct Pair {
    pub server: Netns,
    pub client: Netns,
}

/// What [`Lab::pair`] will build; [`PairBuilder::build`] builds it.
#[must_use = "nothing is created until build()"]
pub struct PairBuilder<'l> {
    lab: &'l Lab,
    server_addr: String,
    client_addr: Option<String>,
    client_ifname: String,
    mtu: Option<u32>,
}

impl Lab {
    /// A server and a client namespace joined by a veth pair: the server at
    /// [`SERVER_CIDR`], the client without an address (as a DHCP client
    /// starts) unless [`PairBuilder::client_addr`] gives one.
    pub fn pair(&self) -> PairBuilder<'_> {
        PairBuilder {
            lab: self,
            server_addr: SERVER_CIDR.to_owned(),
            client_addr: None,
            client_ifname: "eth0".to_owned(),
            mtu: None,
        }
    }
}

impl PairBuilder<'_> {
    pub fn server_addr(mut self, cidr: &str) -> Self {
        self.server_addr = cidr.to_owned();
        self
    }

    pub fn client_addr(mut self, cidr: &str) -> Self {
        self.client_addr = Some(cidr.to_owned());
        self
    }

    /// Names the client's end `ifname` instead of `eth0`: an uplink to put
    /// on a bridge with machines' taps.
    pub fn client_ifname(mut self, ifname: &str) -> Self {
        self.client_ifname = ifname.to_owned();
        self
    }

    /// The MTU of both ends (a jumbo-frame network: 9000).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    pub fn build(self) -> io::Result<Pair> {
        let server = self.lab.add_netns("srv")?;
        let client = self.lab.add_netns("cli")?;
        self.lab.veth(
            (&server, "eth0", Some(&self.server_addr)),
            (&client, &self.client_ifname, self.client_addr.as_deref()),
        )?;
        if let Some(mtu) = self.mtu {
            let mtu = mtu.to_string();
            server.ip(["link", "set", "eth0", "mtu", &mtu])?;
            client.ip(["link", "set", &self.client_ifname, "mtu", &mtu])?;
        }
        Ok(Pair { server, client })
    }
}

impl Lab {
    /// One broadcast domain: a bridge in a "switch" namespace and one
    /// namespace per `(role, address)`, each joined to it by its `eth0`
    /// (address in CIDR form, or `None`). Returns the namespaces in order.
    pub fn segment(&self, hosts: &[(&str, Option<&str>)]) -> io::Result<Vec<Netns>> {
        let switch = self.add_netns("sw")?;
        self.bridge(&switch, "br0", None)?;
        let mut namespaces = Vec::with_capacity(hosts.len());
        for (n, (role, addr)) in hosts.iter().enumerate() {
            let ns = self.add_netns(role)?;
            let port = format!("p{}", n + 1);
            self.veth((&ns, "eth0", *addr), (&switch, &port, None))?;
            self.attach_to_bridge(&switch, &port, "br0")?;
            namespaces.push(ns);
        }
        // The switch namespace lives as long as the lab; nobody needs it.
        Ok(namespaces)
    }
}
