//! TFTP, read-only: option negotiation (`negotiate`), the per-transfer state
//! machine (`transfer`, sans-IO: time is passed in, packets are returned), and
//! the tokio driver that owns the sockets (`server`).

pub mod negotiate;
pub mod server;
pub mod transfer;
