//! Sans-IO clients of the protocols pxed serves, shared by the bench, the
//! tests and the demo: each takes datagrams and timeouts in and says what to
//! send, so one protocol engine runs on tokio sockets, blocking sockets or
//! a packet socket alike.

pub mod dhcp;
pub mod firmware;
pub mod tftp;

pub use firmware::{Firmware, TftpProfile};
