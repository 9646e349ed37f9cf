//! The programs' per-CPU verdict counters, read and summed.

use std::fmt;

use aya::{maps::PerCpuArray, Ebpf};
use pxe_common::counter::Counter;

use super::FastPathError;

/// One program's counters, summed over CPUs, indexed by [`Counter`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot(pub Vec<u64>);

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(counter.0 as usize).copied().unwrap_or(0)
    }

    /// Packets seen: the sum of the verdicts (observations are extra).
    pub fn packets(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|(c, _)| c.is_verdict())
            .map(|(c, _)| self.get(*c))
            .sum()
    }

    /// What changed since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            Counter::ALL
                .iter()
                .map(|(c, _)| self.get(*c).saturating_sub(earlier.get(*c)))
                .collect(),
        )
    }
}

impl fmt::Display for CounterSnapshot {
    /// `packets=N NAME=n …`, listing only non-zero counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "packets={}", self.packets())?;
        for (counter, name) in Counter::ALL {
            let n = self.get(*counter);
            if n != 0 {
                write!(f, " {name}={n}")?;
            }
        }
        Ok(())
    }
}

/// Both programs' counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub xdp: CounterSnapshot,
    pub tc: CounterSnapshot,
}

pub(super) fn read(ebpf: &Ebpf, name: &'static str) -> Result<CounterSnapshot, FastPathError> {
    let map_error = |source| FastPathError::Map { name, source };
    let map = ebpf
        .map(name)
        .unwrap_or_else(|| panic!("pxe-ebpf defines no map {name}"));
    let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_error)?;
    let mut sums = Vec::with_capacity(Counter::COUNT as usize);
    for index in 0..Counter::COUNT {
        let per_cpu = array.get(&index, 0).map_err(map_error)?;
        sums.push(per_cpu.iter().sum());
    }
    Ok(CounterSnapshot(sums))
}
