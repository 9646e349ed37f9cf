//! `bench`: load generator for PXE boot infrastructure.
//!
//! Today: `bench tftp`, N concurrent TFTP downloads of one file, verified
//! byte for byte, with aggregate goodput and per-transfer latency. Point it
//! only at servers in your own test network: it sends as fast as the server
//! answers, bounded by `--clients` and `--time-limit`.

mod tftp;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "Load-test PXE boot servers with simulated clients")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Concurrent TFTP downloads of one file.
    Tftp(tftp::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tftp(args) => tftp::run(args),
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
