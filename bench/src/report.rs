//! What every `bench` report computes the same way: percentiles and failures
//! grouped by reason.

use std::collections::BTreeMap;

/// The value at quantile `p` (0.0-1.0) of `sorted`, nearest rank; 0 when empty.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
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
            .entry(reason.chars().take(120).collect())
            .or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 51.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
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
