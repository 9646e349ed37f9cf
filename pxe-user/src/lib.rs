//! pxed, the PXE boot daemon, as a library: the binary in `main.rs` wires these
//! modules together, and the integration tests drive them directly.
//!
//! Layers, top down: wire formats (pure bytes) → protocol machines (pure, time
//! passed in) → policy and storage → I/O drivers (tokio sockets, the BPF
//! programs in `fastpath`) → `main.rs`.

pub mod bootroot;
pub mod config;
pub mod dhcp;
pub mod fastpath;
pub mod http;
pub mod lease;
pub mod netif;
pub mod policy;
pub mod privileges;
pub mod tftp;
pub mod wire;
