//! Order statistics over one row's samples: min, p50, p99, max.

use serde::Serialize;

/// Summary of `n` samples, in the row's unit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    /// None for no samples; NaNs are ignored.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stats {
            n: v.len(),
            min: v[0],
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            max: v[v.len() - 1],
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty `sorted`: the smallest
/// sample such that at least `p` percent of the samples are ≤ it. With
/// fewer than 100 samples p99 is therefore the maximum, never an
/// interpolated value nobody measured.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        // Ten samples: p99 is the largest, p50 the fifth.
        let w: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&w, 99.0), 10.0);
        assert_eq!(percentile(&w, 50.0), 5.0);
    }

    #[test]
    fn stats_sort_and_skip_nan() {
        let s = Stats::of(&[3.0, f64::NAN, 1.0, 2.0]).expect("samples");
        assert_eq!(s.n, 3);
        assert_eq!((s.min, s.p50, s.p99, s.max), (1.0, 2.0, 3.0, 3.0));
        assert!(Stats::of(&[]).is_none());
        let one = Stats::of(&[7.5]).expect("one sample");
        assert_eq!((one.min, one.p50, one.p99, one.max), (7.5, 7.5, 7.5, 7.5));
    }
}
