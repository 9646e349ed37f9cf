//! `cargo xtask`: everything around the build that cargo alone cannot do.
//!
//! - `setup`: installs what a fresh Debian machine lacks (apt packages,
//!   nightly rust-src, bpf-linker) and checks the kernel. Idempotent.
//! - `test`: setup, then formatting and lints, the whole test suite (with
//!   privileged tests required to run rather than allowed to skip), and each
//!   fuzz target for a bounded time.
//! - `demo`: the main job on its embedded defaults, with a machine booting.
//! - `bench`, `bench-dhcp`, `bench-tftp`, `bench-webhook`, `bench-observe`,
//!   `bench-flood`:
//!   measurements, beside peers where there are any, written to docs/benchmarks.
//! - `fuzz`: the long fuzzing runs, corpora minimised; docs/benchmarks/fuzz.md.
//! - `soak`: a long run under waves, reloads and kills; docs/benchmarks/soak.md.
//! - `package`: the Debian package, built and checked.

mod bench;
mod bench_cluster;
mod bench_dhcp;
mod bench_flood;
mod bench_observe;
mod bench_pxe;
mod bench_webhook;
mod demo;
mod fuzz_long;
mod package;
mod peers;
mod setup;
mod soak;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks: setup and the test suite"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// The main job: pxed on its embedded defaults in a throwaway lab, and a
    /// rack of simulated machines booting from it (as root; about a minute).
    Demo {
        /// Machines to power on at once.
        #[arg(long, default_value_t = 300)]
        machines: usize,
        /// Firmware they behave like: uefi or bios.
        #[arg(long, default_value = "uefi")]
        firmware: String,
    },
    /// Install missing prerequisites and check the kernel (idempotent).
    Setup {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Boot N simulated UEFI machines (DHCP + boot program) against pxed in
    /// its modes, dnsmasq, and Kea + tftpd-hpa, in throwaway namespaces; write
    /// docs/benchmarks/pxe.md (as root; a few minutes).
    Bench {
        /// Machines powered on at once, per measurement.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        clients: Vec<usize>,
        /// Measure only the servers whose name contains this, e.g. `pxed` or
        /// `Kea` (the doc is then written with those rows only).
        #[arg(long)]
        only: Option<String>,
    },
    /// DHCP from pxed, Kea and dnsmasq in throwaway namespaces: sustained
    /// perfdhcp loads of new machines and of repeats (ACKs per server
    /// CPU-second, server and perfdhcp on a core each), a storm of N new
    /// clients (perfdhcp's avalanche) and the project's harness; write
    /// docs/benchmarks/dhcp.md (as root; about ten minutes).
    BenchDhcp {
        /// New clients per avalanche and harness measurement.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        clients: Vec<usize>,
        /// Only the sustained loads, printed; the doc is left as it is.
        #[arg(long)]
        sustained_only: bool,
    },
    /// Admission control under a flood: 200 machines pxed knows boot while
    /// `bench flood` sends 100,000 DISCOVERs/s and 10,000 TFTP read
    /// requests/s, with admission on, off, and on in TC only; writes
    /// docs/benchmarks/flood.md (as root; about ten minutes).
    BenchFlood,
    /// DHCP with the leases on PostgreSQL: perfdhcp (new clients, repeats)
    /// against pxed on redb, one and two pxed on one PostgreSQL, and Kea
    /// 2.2 on PostgreSQL; writes docs/benchmarks/cluster.md (as root; a
    /// few minutes).
    BenchCluster {
        /// Measure one setup only, to look into it (no doc is written):
        /// `redb`, `postgres`, `two-postgres` or `kea`.
        #[arg(long)]
        only: Option<String>,
    },
    /// Measure TFTP goodput of pxed, tftpd-hpa and dnsmasq in throwaway
    /// namespaces and write docs/benchmarks/tftp-userspace.md, or with
    /// `--loss` tftp-loss.md (as root; about a minute without loss, 25 with
    /// the peers at 1% and 5%).
    BenchTftp {
        /// Concurrent clients per measurement.
        #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
        clients: Vec<usize>,
        /// blksize the clients ask for.
        #[arg(long, default_value_t = 1468)]
        blksize: u16,
        /// windowsize the clients ask for (1: lockstep). Above 1, pxed is also
        /// measured without UDP GSO.
        #[arg(long, default_value_t = 1)]
        windowsize: u16,
        /// How the harness receives: `socket` (a socket per transfer) or
        /// `packet` (one packet socket per core, batched).
        #[arg(long, default_value = "socket", value_parser = ["socket", "packet"])]
        harness_io: String,
        /// Percent of UDP datagrams dropped on arrival in each namespace (so
        /// each way), one measurement per value: `--loss 1,5`. With loss the
        /// table goes to docs/benchmarks/tftp-loss*.md.
        #[arg(long, value_delimiter = ',', default_value = "0")]
        loss: Vec<u32>,
        /// Servers to measure, by the start of their name: `pxed`, `tftpd`,
        /// `dnsmasq` (default: all).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<String>,
        /// Downloads per client, one after the other (more transfers behind
        /// each percentile).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Does a slow decision webhook hold up the machines pxed knows? DHCP
    /// latency of N known machines without a webhook, then with one taking
    /// 5 s while N strangers ask it; writes docs/benchmarks/webhook.md (as
    /// root; about a minute).
    BenchWebhook {
        /// Known machines (and as many strangers).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// What metrics and boot timelines cost: `bench`'s storm against pxed
    /// with them on and with --no-observe, alternating, pxed's own CPU
    /// compared by median; writes docs/benchmarks/observe.md (as root;
    /// about a minute per run).
    BenchObserve {
        /// Machines powered on at once.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Runs each way.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Build the Debian package (target/debian/pxed_VERSION_ARCH.deb: the
    /// binary, a hardened systemd unit, the example config, the pxed user)
    /// and check it without installing it on this machine (as root; the
    /// check serves one machine from the packaged binary in a throwaway
    /// namespace, and installs and purges it in a throwaway overlay).
    Package,
    /// Each fuzz target for 10 million executions or 20 minutes, whichever
    /// comes first, from and into its corpus in fuzz/corpus/, minimised
    /// afterwards (cargo fuzz cmin); writes docs/benchmarks/fuzz.md.
    Fuzz {
        /// Executions per target.
        #[arg(long, default_value_t = 10_000_000)]
        runs: u64,
        /// Seconds per target at most.
        #[arg(long, default_value_t = 1200)]
        seconds: u64,
        /// Only the targets whose name contains this (no doc is written).
        #[arg(long)]
        only: Option<String>,
        /// Targets fuzzed at once (each one process on one core).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Power-on waves against one pxed for a long time, with a SIGHUP every
    /// few seconds and a SIGKILL and restart every few minutes: boots fail
    /// only in flight at a kill, memory and descriptors do not grow; writes
    /// docs/benchmarks/soak.md (as root; as long as --minutes says).
    Soak {
        /// How long.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Seconds between SIGHUPs.
        #[arg(long, default_value_t = 10)]
        hup_secs: u64,
        /// Seconds between SIGKILLs (each followed by a restart).
        #[arg(long, default_value_t = 120)]
        kill_secs: u64,
        /// Each run's `bench pxe --power-on` waves, run back to back.
        #[arg(long, default_value = "100@0,100@5")]
        waves: String,
    },
    /// Run setup, then every test in the workspace (as root: namespaces, BPF).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { check } => setup::run(if check {
            setup::Mode::Check
        } else {
            setup::Mode::Install
        }),
        Task::Demo { machines, firmware } => {
            setup::run(setup::Mode::Install).and_then(|()| demo::run(machines, &firmware))
        }
        Task::Bench { clients, only } => setup::run(setup::Mode::Install)
            .and_then(|()| bench_pxe::run(&clients, only.as_deref())),
        Task::Package => setup::run(setup::Mode::Install)
            .and_then(|()| package::build())
            .and_then(|deb| package::check(&deb)),
        Task::BenchFlood => setup::run(setup::Mode::Install).and_then(|()| bench_flood::run()),
        Task::BenchCluster { only } => {
            setup::run(setup::Mode::Install).and_then(|()| bench_cluster::run(only.as_deref()))
        }
        Task::BenchDhcp {
            clients,
            sustained_only,
        } => setup::run(setup::Mode::Install)
            .and_then(|()| bench_dhcp::run(&clients, sustained_only)),
        Task::BenchTftp {
            clients,
            blksize,
            windowsize,
            harness_io,
            loss,
            servers,
            rounds,
        } => setup::run(setup::Mode::Install).and_then(|()| {
            bench::run(&bench::Options {
                clients: &clients,
                blksize,
                windowsize,
                harness_io: &harness_io,
                loss: &loss,
                servers: &servers,
                rounds,
            })
        }),
        Task::BenchWebhook { clients } => {
            setup::run(setup::Mode::Install).and_then(|()| bench_webhook::run(clients))
        }
        Task::Fuzz {
            runs,
            seconds,
            only,
            jobs,
        } => setup::run(setup::Mode::Install).and_then(|()| {
            fuzz_long::run(
                &fuzz_long::Options {
                    runs,
                    seconds,
                    only,
                    jobs,
                },
                FUZZ_TARGETS,
            )
        }),
        Task::Soak {
            minutes,
            hup_secs,
            kill_secs,
            waves,
        } => setup::run(setup::Mode::Install).and_then(|()| {
            soak::run(&soak::Options {
                minutes,
                hup_every: std::time::Duration::from_secs(hup_secs),
                kill_every: std::time::Duration::from_secs(kill_secs),
                waves,
            })
        }),
        Task::BenchObserve { clients, rounds } => {
            setup::run(setup::Mode::Install).and_then(|()| bench_observe::run(clients, rounds))
        }
        Task::Test { cargo_args } => {
            setup::run(setup::Mode::Install).and_then(|()| test(&cargo_args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository's root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The commit the benchmark docs were produced at (short hash).
pub fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The running kernel's release, for the benchmark docs.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Builds pxed and bench in release mode; returns their paths.
pub fn build_release_binaries() -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let workspace = workspace_root();
    eprintln!("xtask: building pxed and bench (release)");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "pxe-user", "-p", "bench"])
        .current_dir(&workspace)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building pxed and bench failed");
    }
    Ok((
        workspace.join("target/release/pxed"),
        workspace.join("target/release/bench"),
    ))
}

/// Seconds each fuzz target runs in the test suite: starting from its
/// corpus in the repository (fuzz/corpus/TARGET, the minimised result of
/// the long runs in fuzz/README.md), enough to catch a regression in the
/// parsers' edges, bounded so CI stays well inside its time.
const FUZZ_SECONDS: u32 = 20;

/// The fuzz targets of fuzz/Cargo.toml, run by the test suite and by
/// `cargo xtask fuzz`; slowest first (http_request and dhcp_decision run
/// out their 20 minutes), so the latter's lanes finish together.
const FUZZ_TARGETS: &[&str] = &[
    "http_request",
    "dhcp_decision",
    "tftp_parse",
    "tftp_session",
    "config_parse",
    "script_template",
];

/// The whole suite: formatting and lints, every test, then each fuzz target
/// for a bounded time. With arguments (a test filter), only `cargo test`.
fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    let whole = cargo_args.is_empty();
    if whole {
        lint()?;
    }
    let status = Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args)
        // Tests that need root panic instead of skipping: a green run must mean they ran.
        .env("PXE_REQUIRE_PRIVILEGED_TESTS", "1")
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    if whole {
        // The package CI ships, checked as an operator would meet it.
        package::check(&package::build()?)?;
        fuzz()?;
    }
    Ok(())
}

/// `cargo fmt --check`, clippy with warnings as errors on the host crates
/// (the default members: `--workspace` would build pxe-ebpf for the host)
/// and on pxe-ebpf for its own target, and the fuzz targets compile.
fn lint() -> anyhow::Result<()> {
    run_step(
        "cargo fmt --check",
        Command::new(env!("CARGO")).args(["fmt", "--all", "--check"]),
    )?;
    run_step(
        "cargo clippy (host crates)",
        Command::new(env!("CARGO")).args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    run_step(
        "cargo clippy (pxe-ebpf for bpfel-unknown-none)",
        Command::new("cargo")
            .args([
                "+nightly",
                "clippy",
                "-p",
                "pxe-ebpf",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--target-dir"])
            .arg(workspace_root().join("target/bpf-clippy"))
            .args(["--", "-D", "warnings"]),
    )?;
    // The fuzz crate is outside the workspace: checked here, so a target a
    // change broke fails in a minute rather than after the whole suite.
    run_step(
        "cargo check (fuzz targets)",
        Command::new("cargo")
            .args(["+nightly", "check", "--bins", "--manifest-path"])
            .arg(workspace_root().join("fuzz/Cargo.toml")),
    )
}

/// Builds the fuzz targets and runs each for [`FUZZ_SECONDS`], from the
/// corpus kept in the repository; what it finds new goes to a scratch
/// directory, so the run leaves the tree as it was.
fn fuzz() -> anyhow::Result<()> {
    let dir = workspace_root().join("fuzz");
    for target in FUZZ_TARGETS {
        let scratch =
            std::env::temp_dir().join(format!("pxe-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let ran = run_step(
            &format!("fuzzing {target} for {FUZZ_SECONDS} s"),
            Command::new("cargo")
                .args(["+nightly", "fuzz", "run", target])
                .arg(&scratch)
                .arg(dir.join("corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={FUZZ_SECONDS}"))
                .current_dir(&dir),
        );
        let _ = std::fs::remove_dir_all(&scratch);
        ran?;
    }
    Ok(())
}

fn run_step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace_root());
    }
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
