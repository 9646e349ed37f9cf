//! `cargo xtask soak`: pxed under power-on waves for a long time, with a
//! SIGHUP every few seconds and a SIGKILL and restart every few minutes, as
//! an operator's worst week looks compressed. What must hold:
//!
//! - a boot fails only if the machine was in flight when pxed was killed
//!   (powered on before the kill, within a firmware's give-up time of it);
//! - pxed's memory does not grow: its RSS at the same age of the process
//!   (just before each kill) is, at the end, within 10% of what it was
//!   five minutes in;
//! - its open file descriptors do not grow either: the fewest a process
//!   held in its life (between waves) is, at the end, what it was then.
//!
//! Writes docs/benchmarks/soak.md. Everything runs in a throwaway lab.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::workspace_root;

pub struct Options {
    pub minutes: u64,
    pub hup_every: Duration,
    pub kill_every: Duration,
    /// `bench pxe --power-on` of each run, back to back.
    pub waves: String,
}

/// A boot that failed without a kill within this long before its failure:
/// EDK2 gives up DHCP after 4+8+16+32 s and TFTP after 6 × 4 s.
const IN_FLIGHT: Duration = Duration::from_secs(90);
/// Samples of the running pxed, this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// One look at the running pxed.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Which pxed: 0 for the first, +1 at each restart.
    life: usize,
    at: Duration,
    /// Seconds since this pxed started.
    age: Duration,
    rss_kib: u64,
    fds: usize,
}

/// One `bench pxe` run.
struct Run {
    started: Duration,
    booted: usize,
    failed: usize,
    /// Failures with no kill in the window before them: must be none.
    unexplained: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let (pxed, bench) = crate::build_release_binaries()?;
    let lab = pxe_lab::Lab::new()?;
    let pxe_lab::Pair { server, client } = lab
        .pair()
        .server_addr("198.18.0.1/24")
        .client_addr("198.18.0.254/24")
        .build()?;
    let work = std::env::temp_dir().join(format!("pxe-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let boot = work.join("root");
    std::fs::create_dir_all(&boot)?;
    let nbp: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(boot.join("ipxe.efi"), &nbp)?;
    let log = work.join("pxed.log");
    // A config file, so each SIGHUP really reads, checks and publishes one.
    let config = work.join("pxed.toml");
    std::fs::write(
        &config,
        format!(
            "interface = \"eth0\"\n\
             boot_root = \"{}\"\n\
             default_profile = \"default\"\n\
             [dhcp]\n\
             mode = \"full\"\n\
             lease_file = \"{}\"\n\
             [[dhcp.subnet]]\n\
             network = \"198.18.0.0/24\"\n\
             pools = [\"198.18.0.10-198.18.0.250\"]\n\
             [[profile]]\n\
             name = \"default\"\n\
             [profile.boot_files]\n\
             uefi_x64 = \"ipxe.efi\"\n",
            boot.display(),
            work.join("leases.redb").display()
        ),
    )?;
    let args: Vec<String> = vec![
        "--config".into(),
        config.display().to_string(),
        "--inventory-file".into(),
        work.join("inventory.redb").display().to_string(),
    ];
    let start_pxed = || -> anyhow::Result<u32> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = lab.spawn_logged(&server, &pxed, &args, &log)?;
        if !server.wait_for_udp_port(69, Duration::from_secs(30)) {
            bail!("pxed did not start:\n{}", tail(&log));
        }
        Ok(pid)
    };

    let began = Instant::now();
    let deadline = Duration::from_secs(options.minutes * 60);
    let kills: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut pid = start_pxed()?;
    let mut born = Instant::now();
    let mut life = 0;
    let mut hups = 0u64;

    let runs = std::thread::scope(|scope| -> anyhow::Result<Vec<Run>> {
        let runner = scope.spawn(|| -> anyhow::Result<Vec<Run>> {
            let mut runs = Vec::new();
            let mut n = 0;
            while began.elapsed() < deadline {
                n += 1;
                let json = work.join(format!("run-{n}.json"));
                let started = began.elapsed();
                let out = client.output(
                    &bench,
                    &[
                        "pxe",
                        "--power-on",
                        &options.waves,
                        "--verify-root",
                        boot.to_str().unwrap_or_default(),
                        "--time-limit",
                        "240",
                        "--json",
                        json.to_str().unwrap_or_default(),
                    ],
                )?;
                let text = std::fs::read_to_string(&json).with_context(|| {
                    format!(
                        "bench pxe wrote no report:\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                })?;
                let report: serde_json::Value = serde_json::from_str(&text)?;
                runs.push(judge(started, &report, &kills.lock().unwrap()));
                let _ = std::fs::remove_file(&json);
            }
            done.store(true, Ordering::SeqCst);
            Ok(runs)
        });

        let mut next_hup = began + options.hup_every;
        let mut next_kill = began + options.kill_every;
        let mut next_sample = began + SAMPLE_EVERY;
        while !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let now = Instant::now();
            if now >= next_sample {
                next_sample += SAMPLE_EVERY;
                if let Some(s) = sample(pid, life, began.elapsed(), born.elapsed()) {
                    samples.lock().unwrap().push(s);
                }
            }
            if now >= next_kill && began.elapsed() < deadline {
                next_kill += options.kill_every;
                // The last look at this process, at the same age as every other.
                if let Some(s) = sample(pid, life, began.elapsed(), born.elapsed()) {
                    samples.lock().unwrap().push(s);
                }
                kills.lock().unwrap().push(began.elapsed());
                // SAFETY: kills the pxed this run started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                if let Some(mut child) = lab.take_child(pid) {
                    let _ = child.wait();
                }
                pid = start_pxed()?;
                born = Instant::now();
                life += 1;
                next_hup = Instant::now() + options.hup_every;
            } else if now >= next_hup {
                next_hup += options.hup_every;
                // SAFETY: signals the pxed this run started.
                unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                hups += 1;
            }
        }
        runner.join().expect("the bench runner panicked")
    })?;
    // SAFETY: stops the pxed this run started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if let Some(mut child) = lab.take_child(pid) {
        let _ = child.wait();
    }

    let kills = kills.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reloads = Reloads {
        done: text.matches("SIGHUP: config reloaded").count(),
        refused: text.matches("SIGHUP: the new config is refused").count(),
    };
    let summary = summarise(options, &runs, &kills, &samples, hups, &reloads);
    let doc = workspace_root().join("docs/benchmarks/soak.md");
    std::fs::write(&doc, &summary.text)?;
    println!("{}", summary.text);
    eprintln!("xtask: wrote {}", doc.display());
    let _ = std::fs::remove_dir_all(&work);
    if !summary.held {
        bail!("the soak found a problem (see above)");
    }
    Ok(())
}

/// A run's failures, each checked against the kills.
fn judge(started: Duration, report: &serde_json::Value, kills: &[Duration]) -> Run {
    let mut unexplained = Vec::new();
    for machine in report["machines"].as_array().into_iter().flatten() {
        let Some(failure) = machine["failure"].as_str() else {
            continue;
        };
        let on = started
            + Duration::from_secs_f64(machine["powered_on_ms"].as_f64().unwrap_or(0.0) / 1e3);
        let explained = kills
            .iter()
            .any(|&k| k + Duration::from_secs(5) >= on && k <= on + IN_FLIGHT);
        if !explained {
            unexplained.push(format!(
                "{} (powered on at {:.0} s): {failure}",
                machine["mac"].as_str().unwrap_or("?"),
                on.as_secs_f64()
            ));
        }
    }
    Run {
        started,
        booted: report["booted"].as_u64().unwrap_or(0) as usize,
        failed: report["failed"].as_u64().unwrap_or(0) as usize,
        unexplained,
    }
}

fn sample(pid: u32, life: usize, at: Duration, age: Duration) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        life,
        at,
        age,
        rss_kib,
        fds,
    })
}

/// What pxed's log says of the SIGHUPs.
struct Reloads {
    done: usize,
    refused: usize,
}

/// One pxed from its start to its kill.
struct Life {
    killed_at: Duration,
    age: Duration,
    rss_kib: u64,
    fewest_fds: usize,
    most_fds: usize,
}

struct Summary {
    text: String,
    held: bool,
}

fn summarise(
    options: &Options,
    runs: &[Run],
    kills: &[Duration],
    samples: &[Sample],
    hups: u64,
    reloads: &Reloads,
) -> Summary {
    let booted: usize = runs.iter().map(|r| r.booted).sum();
    let failed: usize = runs.iter().map(|r| r.failed).sum();
    let unexplained: Vec<&String> = runs.iter().flat_map(|r| &r.unexplained).collect();
    // Each killed process: its last sample (just before the kill, every
    // process at one age) and the fewest descriptors it held.
    let lives: Vec<Life> = (0..kills.len())
        .filter_map(|life| {
            let of_life: Vec<&Sample> = samples.iter().filter(|s| s.life == life).collect();
            let last = of_life.last()?;
            Some(Life {
                killed_at: last.at,
                age: last.age,
                rss_kib: last.rss_kib,
                fewest_fds: of_life.iter().map(|s| s.fds).min()?,
                most_fds: of_life.iter().map(|s| s.fds).max()?,
            })
        })
        .collect();
    let five_minutes = Duration::from_secs(300);
    let early = lives.iter().find(|l| l.killed_at >= five_minutes);
    let last = lives.last();
    let rss_ok = match (early, last) {
        (Some(e), Some(l)) => (l.rss_kib as f64) <= e.rss_kib as f64 * 1.10,
        _ => false,
    };
    let fds_ok = match (early, last) {
        (Some(e), Some(l)) => l.fewest_fds <= e.fewest_fds,
        _ => false,
    };
    let held = unexplained.is_empty() && rss_ok && fds_ok && reloads.refused == 0;

    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    line("# Soak: power-on waves, SIGHUP and SIGKILL".into());
    line(String::new());
    line(format!(
        "`sudo cargo xtask soak --minutes {}` (this file is its output). pxed in full mode from a config file, with its lease and inventory files; `bench pxe --power-on {}` runs back to back (UEFI machines, the same MACs every run, a 1 MB boot program checked byte by byte); a SIGHUP (the config file read, checked and published again) every {} s; a SIGKILL and a restart every {} s.",
        options.minutes,
        options.waves,
        options.hup_every.as_secs(),
        options.kill_every.as_secs()
    ));
    line(String::new());
    line("| | |".into());
    line("| --- | ---: |".into());
    line(format!("| bench runs | {} |", runs.len()));
    line(format!("| boots | {} |", booted + failed));
    line(format!("| booted | {booted} |"));
    line(format!("| failed | {failed} |"));
    line(format!(
        "| failed with no kill in flight (must be 0) | {} |",
        unexplained.len()
    ));
    line(format!("| SIGHUPs sent | {hups} |"));
    line(format!(
        "| reloads logged (a SIGHUP just before a kill may go unlogged) | {} |",
        reloads.done
    ));
    line(format!(
        "| reloads refused (must be 0) | {} |",
        reloads.refused
    ));
    line(format!("| SIGKILLs and restarts | {} |", kills.len()));
    line(String::new());
    line(
        "Each pxed, sampled every 2 s; RSS just before its kill (every process at the same age):"
            .into(),
    );
    line(String::new());
    line("| killed at | age | RSS | open fds (fewest–most) |".into());
    line("| ---: | ---: | ---: | ---: |".into());
    for l in &lives {
        line(format!(
            "| {:.0} s | {:.0} s | {:.1} MiB | {}–{} |",
            l.killed_at.as_secs_f64(),
            l.age.as_secs_f64(),
            l.rss_kib as f64 / 1024.0,
            l.fewest_fds,
            l.most_fds
        ));
    }
    line(String::new());
    match (early, last) {
        (Some(e), Some(l)) => line(format!(
            "RSS of the first pxed killed five minutes in or later {:.1} MiB, of the last {:.1} MiB ({:+.1}%, bound +10%: {}); fewest open fds {} then {} ({}).",
            e.rss_kib as f64 / 1024.0,
            l.rss_kib as f64 / 1024.0,
            (l.rss_kib as f64 / e.rss_kib as f64 - 1.0) * 100.0,
            if rss_ok { "held" } else { "NOT HELD" },
            e.fewest_fds,
            l.fewest_fds,
            if fds_ok { "no growth" } else { "GREW" }
        )),
        _ => line("Too short a run to compare memory five minutes in with the end.".into()),
    }
    for u in &unexplained {
        line(format!("- unexplained failure: {u}"));
    }
    let runs_by_minute: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{:.0}s:{}/{}",
                r.started.as_secs_f64(),
                r.booted,
                r.booted + r.failed
            )
        })
        .collect();
    line(String::new());
    line(format!(
        "Runs (start: booted/boots): {}",
        runs_by_minute.join(", ")
    ));
    Summary { text, held }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
