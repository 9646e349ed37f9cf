//! Ports and protocol numbers the kernel programs decide on.

/// DHCP server port (RFC 2131 §4.1): client requests and relayed requests arrive here.
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCP client port: replies to clients, and broadcast replies of other servers.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// PXE boot server discovery / proxyDHCP port (PXE 2.1 §2.2).
pub const PXE_PROXY_PORT: u16 = 4011;
/// TFTP well-known port (RFC 1350): read requests arrive here; each transfer then
/// moves to a fresh server port (the transfer ID), which userspace registers,
/// or with `--tftp-single-port` stays here, told apart by the client's port.
pub const TFTP_PORT: u16 = 69;
/// TFTP's ACK opcode (RFC 1350 §5): what makes a packet to port 69 a
/// transfer's rather than a request.
pub const TFTP_OP_ACK: u16 = 4;

/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an IEEE 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
