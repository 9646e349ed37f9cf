//! Wire formats: pure functions from bytes to values and back. No sockets, no
//! clocks, no policy. Parsers take untrusted input and never panic on it;
//! emitters write into a caller's buffer sized by `buffer_len`.

pub mod tftp;
pub mod udp;
