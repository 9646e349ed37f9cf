//! DHCP and proxyDHCP for PXE.
//!
//! - `classify`: untrusted bytes → a [`classify::Request`] (dhcproto does the
//!   option parsing; option overload, firmware and architecture detection are
//!   done here, once).
//! - `pool`: subnets, ranges and exclusions as the config gives them.
//! - `engine`: the server's decisions, sans-IO: a request and the time in,
//!   a reply (and its destination) out; leases written through a
//!   [`crate::lease::LeaseStore`] before any ACK leaves.
//! - `socket`: ports 67 and 4011 of one interface (a raw socket beside a
//!   server that holds 67).
//! - `templates`: the engine's replies as templates for the kernel, which
//!   answers the next request of the same shape itself.
//! - `driver`: the tokio loop of one interface.

pub mod classify;
pub mod driver;
pub mod engine;
mod offers;
pub mod pool;
pub mod socket;
pub mod templates;
