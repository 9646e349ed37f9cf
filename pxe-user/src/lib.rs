//! pxed, the PXE boot daemon, as a library: `main.rs` parses the flags
//! ([`cli`]), merges the config file ([`settings`]) and runs the [`daemon`],
//! or runs `pxed ctl` ([`ctl`]), a client of the operator API;
//! the integration tests drive the modules directly.
//!
//! Layers, top down: wire formats (pure bytes) → protocol machines (pure, time
//! passed in) → policy and storage → I/O drivers (tokio sockets, the BPF
//! programs in `fastpath`) → `main.rs`.

pub mod api;
pub mod bootroot;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod dhcp;
pub mod explain;
pub mod fastpath;
pub mod http;
pub mod inventory;
pub mod lease;
pub mod netif;
pub mod observe;
pub mod policy;
pub mod privileges;
pub mod settings;
pub mod tftp;
pub mod wire;
