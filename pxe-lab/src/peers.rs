//! Other servers the tests and benchmarks run beside or instead of pxed,
//! started the one way that keeps them inside a lab: dnsmasq.

use std::{io, path::Path};

use crate::{Lab, Netns};

/// A dnsmasq command line. [`Dnsmasq::new`] is what every run needs: in the
/// foreground (the lab stops it), no DNS, no system config or PID file, as
/// root (namespaces and raw sockets). The rest says what it serves.
#[derive(Clone, Debug)]
pub struct Dnsmasq {
    args: Vec<String>,
}

impl Default for Dnsmasq {
    fn default() -> Self {
        Self::new()
    }
}

impl Dnsmasq {
    pub fn new() -> Self {
        let base = [
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
        ];
        Self {
            args: base.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Serves only `ifname`, bound to it: another server may hold port 67
    /// on the namespace's other interfaces, or share this one.
    pub fn interface(self, ifname: &str) -> Self {
        self.arg(format!("--interface={ifname}"))
            .arg("--bind-interfaces")
    }

    /// Hands out addresses from `range` (dnsmasq's `--dhcp-range` syntax).
    pub fn dhcp_range(self, range: &str) -> Self {
        self.arg(format!("--dhcp-range={range}"))
    }

    /// Offers without pinging the address first: quicker under load, and a
    /// lab link has nobody else on it to answer.
    pub fn no_ping(self) -> Self {
        self.arg("--no-ping")
    }

    /// Keeps its leases in `path` (a test's own directory), not the system's.
    pub fn lease_file(self, path: &Path) -> Self {
        self.arg(format!("--dhcp-leasefile={}", path.display()))
    }

    /// Logs to stderr, the lab's log file, rather than syslog.
    pub fn log_to_stderr(self) -> Self {
        self.arg("--log-facility=-")
    }

    /// Any other option.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The options, without the program.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Starts it in `ns`, its output appended to `log`; returns its PID.
    pub fn spawn(&self, lab: &Lab, ns: &Netns, log: &Path) -> io::Result<u32> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        lab.spawn_logged(ns, "dnsmasq", &args, log)
    }
}
