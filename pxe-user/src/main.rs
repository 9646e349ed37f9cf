//! `pxed`: the PXE boot daemon. This file only wires the pieces together:
//! flags parsed, the config file merged in, the daemon started on a runtime;
//! or `pxed ctl ...`, the operator API's command line, run without one.
use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::{bail, Context as _};
use clap::Parser;
use pxe_user::{
    cli::{Cli, Command},
    config::Config,
    ctl, daemon,
    privileges::{missing_capabilities, raise_open_file_limit},
    settings::Settings,
};
use tracing::warn;

/// Below this many open files, a rack's TFTP transfers (one socket each) hit the limit.
const OPEN_FILES_FOR_A_RACK: u64 = 16_384;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        return ctl::run(args);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PXED_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pxed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if cli.check_config {
        print_check(&cli, &config);
        for sample in &cli.explain {
            println!("{}", pxe_user::explain::explain(&config, sample));
        }
        return Ok(());
    }
    let settings = Settings::merge(cli, config)?;
    let missing = missing_capabilities();
    if !missing.is_empty() {
        bail!(
            "pxed needs root, or at least {}, to load BPF programs and bind ports 67 and 69; run it as root",
            missing.join(", ")
        );
    }
    if settings.user.is_some() {
        // Before the runtime starts its threads: they inherit it.
        pxe_user::privileges::prepare_to_become_user()?;
    }
    let open_files = raise_open_file_limit();
    if open_files < OPEN_FILES_FOR_A_RACK {
        warn!(open_files, "the open-file limit caps concurrent TFTP transfers (one socket each); raise it (ulimit -n) for large racks");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(daemon::serve(settings))
}

/// `--check-config`: what the file defines, in one line.
fn print_check(cli: &Cli, config: &Config) {
    println!(
        "{}: ok ({} profiles, {} machines, {} reservations, {} DHCP subnets, default profile {})",
        cli.config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        config.profiles.len(),
        config.machines.len(),
        config.reservations.len(),
        config.subnets.len(),
        config
            .default_profile
            .as_deref()
            .unwrap_or("none: unknown machines are ignored"),
    );
}
