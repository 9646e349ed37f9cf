//! What pxed's programs cost over a measurement, as the kernel counts it
//! (`BPF_ENABLE_STATS`: run time and run count per program). On a veth lab
//! the programs run in whichever thread delivers the packet, often the load
//! generator's, so "machine busy minus load generator" cannot say how much
//! of the work is theirs; these figures can.

use std::{collections::BTreeMap, os::fd::OwnedFd, time::Duration};

use serde::Serialize;

/// pxed's programs, as the kernel names them (15 characters at most).
const PROGRAM_PREFIX: &str = "pxe_";

/// One program's share of a measurement.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramRun {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgramRun {
    /// Mean time per run, ns.
    pub fn ns_per_run(&self) -> f64 {
        self.run_time_ns as f64 / self.runs.max(1) as f64
    }
}

/// Counts from [`BpfMeter::start`] to [`BpfMeter::stop`].
pub struct BpfMeter {
    /// Statistics stay on while this is open.
    enabled: Option<OwnedFd>,
    at_start: BTreeMap<u32, ProgramRun>,
}

impl BpfMeter {
    /// Turns the kernel's statistics on (needs CAP_SYS_ADMIN; without it the
    /// meter reports nothing and says why once) and notes where each of
    /// pxed's programs stands.
    pub fn start() -> Self {
        let enabled = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("BPF run-time statistics unavailable ({e}); the report has none");
                None
            }
        };
        let at_start = if enabled.is_some() {
            programs()
        } else {
            BTreeMap::new()
        };
        Self { enabled, at_start }
    }

    /// What each of pxed's programs ran since [`Self::start`], by name (a
    /// program loaded meanwhile counts from zero).
    pub fn stop(self) -> Vec<ProgramRun> {
        if self.enabled.is_none() {
            return Vec::new();
        }
        let mut by_name: BTreeMap<String, ProgramRun> = BTreeMap::new();
        for (id, now) in programs() {
            let before = self.at_start.get(&id).cloned().unwrap_or_default();
            let total = by_name.entry(now.name.clone()).or_insert(ProgramRun {
                name: now.name.clone(),
                ..ProgramRun::default()
            });
            total.runs += now.runs.saturating_sub(before.runs);
            total.run_time_ns += now.run_time_ns.saturating_sub(before.run_time_ns);
        }
        by_name.into_values().filter(|p| p.runs > 0).collect()
    }
}

/// pxed's programs loaded now, by id.
fn programs() -> BTreeMap<u32, ProgramRun> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|info| {
            let name = info.name_as_str()?.to_owned();
            name.starts_with(PROGRAM_PREFIX).then(|| {
                let run_time: Duration = info.run_time();
                (
                    info.id(),
                    ProgramRun {
                        name,
                        runs: info.run_count(),
                        run_time_ns: run_time.as_nanos() as u64,
                    },
                )
            })
        })
        .collect()
}
