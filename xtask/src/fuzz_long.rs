//! `cargo xtask fuzz`: each fuzz target for 10 million executions or 20
//! minutes, whichever comes first, from and into its corpus in the
//! repository (fuzz/corpus/TARGET), which is then minimised with
//! `cargo fuzz cmin`; the figures go to docs/benchmarks/fuzz.md.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::workspace_root;

pub struct Options {
    pub runs: u64,
    pub seconds: u64,
    pub only: Option<String>,
    /// Targets fuzzed at once, each a single process on its own core.
    pub jobs: usize,
}

struct Figures {
    target: String,
    executions: u64,
    per_second: u64,
    seconds: u64,
    coverage: String,
    corpus_before: usize,
    corpus_after: usize,
}

pub fn run(options: &Options, targets: &[&str]) -> anyhow::Result<()> {
    let dir = workspace_root().join("fuzz");
    // Built once before the lanes start, so they do not race to build.
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "build"])
        .current_dir(&dir)
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    let chosen: Vec<&str> = targets
        .iter()
        .copied()
        .filter(|t| options.only.as_deref().is_none_or(|o| t.contains(o)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..options.jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(target) = chosen.get(i) else { break };
                let result = fuzz_one(&dir, target, options);
                results.lock().unwrap().push((i, result));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut figures = Vec::new();
    let mut failures = Vec::new();
    for (_, result) in results {
        match result {
            Ok(f) => figures.push(f),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    println!("{}", table(options, &figures));
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    if options.only.is_none() {
        let doc = workspace_root().join("docs/benchmarks/fuzz.md");
        std::fs::write(&doc, table(options, &figures))?;
        eprintln!("xtask: wrote {}", doc.display());
    }
    Ok(())
}

fn fuzz_one(dir: &std::path::Path, target: &str, options: &Options) -> anyhow::Result<Figures> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    eprintln!(
        "xtask: fuzzing {target}: {} executions or {} s",
        options.runs, options.seconds
    );
    let started = std::time::Instant::now();
    let out = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-runs={}", options.runs))
        .arg(format!("-max_total_time={}", options.seconds))
        .arg("-print_final_stats=1")
        .current_dir(dir)
        .output()
        .context("running cargo fuzz")?;
    // libFuzzer's final stats have no elapsed time: the wall clock's.
    let seconds = started.elapsed().as_secs();
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        bail!(
            "fuzzing {target} failed (the input is in fuzz/artifacts/{target}):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let coverage = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(" cov: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    let corpus_before = count(&corpus)?;
    minimise(dir, target)?;
    eprintln!(
        "xtask: {target} done: {} executions, {}/s, {} s, coverage {coverage}, corpus {corpus_before} → {}",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        seconds,
        count(&corpus)?
    );
    Ok(Figures {
        target: target.to_owned(),
        executions: stat("number_of_executed_units"),
        per_second: stat("average_exec_per_sec"),
        seconds,
        coverage,
        corpus_before,
        corpus_after: count(&corpus)?,
    })
}

/// `cargo fuzz cmin`: the smallest subset of the corpus with its coverage.
fn minimise(dir: &std::path::Path, target: &str) -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "cmin", target])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running cargo fuzz cmin")?;
    if !status.success() {
        bail!("cargo fuzz cmin {target} failed");
    }
    Ok(())
}

fn count(dir: &std::path::Path) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(dir)?.count())
}

fn table(options: &Options, figures: &[Figures]) -> String {
    let mut text = format!(
        "# Fuzzing\n\n`cargo xtask fuzz` (this file is its output): each target for {} executions or {} s, whichever comes first, one process per target on its own core ({} at once), from its corpus in fuzz/corpus/, minimised afterwards with `cargo fuzz cmin`.\n\n| target | executions | per second | seconds | coverage (edges) | corpus | minimised |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        options.runs, options.seconds, options.jobs
    );
    for f in figures {
        text.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            f.target,
            f.executions,
            f.per_second,
            f.seconds,
            f.coverage,
            f.corpus_before,
            f.corpus_after
        ));
    }
    text
}
