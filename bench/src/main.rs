//! The load-testing harness (simulated PXE clients by the thousand) is not
//! built yet; it arrives with the DHCP and TFTP servers it measures. Until
//! then this binary says so instead of pretending to measure anything.
use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("bench: the load-testing harness is not implemented yet (it needs the DHCP and TFTP servers first)");
    ExitCode::from(2)
}
