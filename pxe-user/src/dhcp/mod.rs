//! DHCP and proxyDHCP for PXE.
//!
//! - `classify`: untrusted bytes → a [`classify::Request`] (dhcproto does the
//!   option parsing; option overload, firmware and architecture detection are
//!   done here, once).
//! - `pool`: subnets, ranges and exclusions as the config gives them.
//! - `engine`: the server's decisions, sans-IO: a request and the time in,
//!   a reply (and its destination) out; one match on port, mode and message
//!   type. Beside it: `addresses` (who holds what, over a
//!   [`crate::lease::LeaseStore`]: leases written before any ACK leaves,
//!   memory rolled back when a commit fails), `reply` (pure reply builders),
//!   `outcome` (what was done, for the log, the kernel and the counters).
//! - `socket`: ports 67 and 4011 of one interface (a raw socket beside a
//!   server that holds 67).
//! - `templates`: the engine's replies as templates for the kernel, which
//!   answers the next request of the same shape itself.
//! - `driver`: the tokio loop of one interface.

mod addresses;
pub use addresses::PoolShare;
pub mod classify;
pub mod driver;
pub mod engine;
mod offers;
mod outcome;
pub mod pool;
mod reply;
pub mod socket;
pub mod templates;
