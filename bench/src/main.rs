//! `bench`: load generator for PXE boot infrastructure.
//!
//! - `bench pxe`: N simulated machines boot like firmware: DHCP with PXE
//!   options, the boot program over TFTP, optionally iPXE's second stage
//!   (DHCP, script, kernel and initrd over HTTP); per-stage latencies,
//!   failures with reasons, every byte verified.
//! - `bench dhcp`: N machines lease an address, then lease it again and
//!   again; server latency percentiles, first exchanges apart from repeats.
//! - `bench tftp`: N concurrent TFTP downloads of one file.
//! - `bench flood`: DISCOVERs from random MACs and TFTP read requests from
//!   random ports at a set rate, for admission control's benchmark.
//!
//! Point it only at servers in your own test network: it sends as fast as the
//! server answers, bounded by `--clients` and `--time-limit`.

mod dhcp;
mod dhcp_load;
mod flood;
mod plot;
mod progress;
mod pxe;
mod report;
mod tftp;
mod tftp_packet;
mod xdp_cost;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Load-test PXE boot servers with simulated clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulated machines booting: DHCP, NBP over TFTP, then optionally iPXE over HTTP.
    Pxe(pxe::Args),
    /// DHCP alone: every machine leases, then leases again --repeats times.
    Dhcp(dhcp_load::Args),
    /// Concurrent TFTP downloads of one file.
    Tftp(tftp::Args),
    /// DISCOVERs from random MACs and TFTP read requests at a set rate, for a set time.
    Flood(flood::Args),
    /// Per-packet cost of the XDP program, by BPF_PROG_TEST_RUN (as root).
    XdpCost(xdp_cost::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One socket per simulated transfer: thousands of machines need thousands.
    pxe_user::privileges::raise_open_file_limit();
    let result = match cli.command {
        Command::Pxe(args) => pxe::run(args),
        Command::Dhcp(args) => dhcp_load::run(args),
        Command::Tftp(args) => tftp::run(args),
        Command::Flood(args) => flood::run(args),
        Command::XdpCost(args) => xdp_cost::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
