//! What every `bench` report computes the same way: percentiles and failures
//! grouped by reason.

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;

/// Durations of one kind (a stage, an exchange, a transfer), kept as an HDR
/// histogram: quantiles to three significant digits in constant memory, not
/// every sample. The largest is kept exact beside it.
pub struct Latencies {
    /// Nanoseconds, 1 ns to a day (longer counts as a day: no run lasts that long).
    ns: Histogram<u64>,
    max: Duration,
}

const DAY_NS: u64 = 86_400 * 1_000_000_000;

impl Default for Latencies {
    fn default() -> Self {
        Self {
            ns: Histogram::new_with_max(DAY_NS, 3).expect("a valid range and precision"),
            max: Duration::ZERO,
        }
    }
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.ns.saturating_record(ns);
        self.max = self.max.max(d);
    }

    /// Records a duration given in milliseconds (negative counts as zero).
    pub fn record_ms(&mut self, ms: f64) {
        self.record(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }

    pub fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }

    /// The duration at quantile `p` (0.0-1.0); zero when empty. Quantile 1
    /// is the exact largest.
    pub fn quantile(&self, p: f64) -> Duration {
        if self.is_empty() {
            return Duration::ZERO;
        }
        if p >= 1.0 {
            return self.max;
        }
        // The lowest value of the bucket holding the quantile: the sample
        // itself, to the histogram's precision (never more than the largest).
        let at = self
            .ns
            .lowest_equivalent(self.ns.value_at_quantile(p.max(0.0)));
        Duration::from_nanos(at).min(self.max)
    }

    /// [`Latencies::quantile`] in milliseconds.
    pub fn quantile_ms(&self, p: f64) -> f64 {
        self.quantile(p).as_secs_f64() * 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.max.as_secs_f64() * 1000.0
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(durations: I) -> Self {
        let mut latencies = Self::default();
        durations.into_iter().for_each(|d| latencies.record(d));
        latencies
    }
}

/// Failures counted by reason: the stage (before the first ':') and what went
/// wrong, so machines that failed alike are one line of a report.
pub fn by_reason<'a>(failures: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for f in failures {
        let reason = f.split(':').next().unwrap_or(f).to_owned()
            + ": "
            + f.split_once(": ").map_or("", |(_, rest)| rest);
        *counts
            .entry(reason.chars().take(240).collect())
            .or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_hold_to_three_significant_digits_and_the_maximum_is_exact() {
        let ms: Latencies = (1..=100).map(Duration::from_millis).collect();
        let near = |got: f64, want: f64| (got - want).abs() <= want * 1e-3;
        assert!(near(ms.quantile_ms(0.5), 50.0), "{}", ms.quantile_ms(0.5));
        assert!(near(ms.quantile_ms(0.99), 99.0), "{}", ms.quantile_ms(0.99));
        assert_eq!(ms.quantile_ms(1.0), 100.0);
        assert_eq!(Latencies::default().quantile_ms(0.5), 0.0);
        let mut one = Latencies::default();
        one.record_ms(0.123_456);
        assert!(
            near(one.quantile_ms(0.5), 0.123_456),
            "sub-millisecond figures keep their digits"
        );
        assert!(near(one.max_ms(), 0.123_456));
    }

    #[test]
    fn failures_alike_are_counted_together() {
        let f = [
            "dhcp: NAKed 8 times in a row",
            "dhcp: NAKed 8 times in a row",
            "nbp: timeout",
        ];
        let counts = by_reason(f.into_iter());
        assert_eq!(counts["dhcp: NAKed 8 times in a row"], 2);
        assert_eq!(counts["nbp: timeout"], 1);
    }
}
