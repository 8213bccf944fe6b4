//! Summary statistics and how the Markdown tables show them.

/// Median, 90th and 99th percentile of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The median (mean of the two middle samples for an even count).
    pub median: f64,
    /// The 90th percentile, nearest-rank method (the largest sample for fewer than 10 samples).
    pub p90: f64,
    /// The 99th percentile, nearest-rank method.
    pub p99: f64,
}

impl Summary {
    /// Summarises `samples`; `None` if there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        // Nearest rank: the smallest value with at least p% of the samples at or below it.
        let rank = |percent: usize| (n * percent).div_ceil(100).max(1);
        Some(Summary {
            n,
            median,
            p90: sorted[rank(90) - 1],
            p99: sorted[rank(99) - 1],
        })
    }

    /// As JSON: `{"n":..,"median":..,"p90":..,"p99":..}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "n": self.n, "median": self.median, "p90": self.p90, "p99": self.p99 })
    }
}

/// `a / b`, or `None` when either is missing or `b` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// Formats an optional number for a Markdown table (`-` when missing).
pub fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_and_even_counts() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&[3.0]).unwrap();
        assert_eq!((s.n, s.median, s.p90), (1, 3.0, 3.0));
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.p90), (3.0, 5.0));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.p90), (2.5, 4.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Summary::of(&ten).unwrap().p90, 9.0);
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(Summary::of(&twenty).unwrap().p90, 18.0);
        let thousand: Vec<f64> = (1..=1000).map(f64::from).collect();
        let s = Summary::of(&thousand).unwrap();
        assert_eq!((s.p90, s.p99), (900.0, 990.0));
    }

    #[test]
    fn ratio_and_cells() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(cell(Some(1.2345), 1), "1.2");
        assert_eq!(cell(None, 1), "-");
    }
}
