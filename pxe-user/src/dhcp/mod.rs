//! DHCP and proxyDHCP for PXE.
//!
//! - `classify`: untrusted bytes → a [`classify::Request`] (dhcproto does the
//!   option parsing; option overload, firmware and architecture detection are
//!   done here, once).
//! - `pool`: subnets, ranges and exclusions as the config gives them.
//! - `engine`: the server's decisions, sans-IO: a request and the time in,
//!   a reply (and its destination) out; leases written through a
//!   [`crate::lease::LeaseStore`] before any ACK leaves.
//! - `driver`: the sockets (67, 4011) and the tokio loop.

pub mod classify;
pub mod driver;
pub mod engine;
pub mod pool;
