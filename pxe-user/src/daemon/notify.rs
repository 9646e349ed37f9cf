//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): a datagram
//! to the socket `$NOTIFY_SOCKET` names, when systemd started us. Nothing
//! happens without it.

use std::os::unix::{ffi::OsStringExt as _, net::UnixDatagram};

/// Tells systemd `state` (e.g. `READY=1`); a failure only costs the notice.
pub fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let path = path.as_encoded_bytes();
        match path.strip_prefix(b"@") {
            // An abstract socket (`@name`).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(
                state.as_bytes(),
                std::path::Path::new(&std::ffi::OsString::from_vec(path.to_vec())),
            ),
        }
    });
    if let Err(e) = sent {
        tracing::debug!("telling systemd {state}: {e}");
    }
}

/// `RELOADING=1` with the monotonic time systemd asks of a reload.
pub fn reloading() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}
