//! The Prometheus text exposition format, version 0.0.4 (what `GET /metrics` answers), and the
//! histogram type the agent's metrics keep.
//!
//! Written by hand rather than with a metrics framework: the agent exports a few dozen series whose
//! values it mostly reads at scrape time, and the format is a handful of lines per family.

use std::fmt::Write as _;

/// The `Content-Type` of this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a metric family, as in its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process it counts restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample value: integers are written exactly (a u64 counter past 2^53 would lose digits as a
/// float).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An integer.
    Int(u64),
    /// A float; NaN and the infinities are written as the format spells them.
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // Rust's shortest round-trip form ("0.005", "1", "1234.5"), which Prometheus parses.
        let _ = write!(out, "{v}");
    }
}

/// Label values may hold anything; the format escapes backslash, double quote and line feed.
fn write_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Help texts escape backslash and line feed (quotes stay as they are).
fn write_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Builds one exposition: families in order, each a `# HELP` and `# TYPE` line and its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Starts the family `name` (for a counter, with its `_total` suffix; for a histogram,
    /// without `_bucket`/`_sum`/`_count`).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(is_metric_name(name), "bad metric name {name}");
        let _ = write!(self.out, "# HELP {name} ");
        write_help(&mut self.out, help);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.name());
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        self.write_labels(labels, None);
        self.out.push(' ');
        match value.into() {
            Value::Int(v) => {
                let _ = write!(self.out, "{v}");
            }
            Value::Float(v) => write_float(&mut self.out, v),
        }
        self.out.push('\n');
    }

    /// The samples of one histogram of the current family `name`: a cumulative `_bucket` per
    /// bound and `+Inf`, then `_sum` and `_count`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            cumulative += count;
            let mut le = String::new();
            write_float(&mut le, *bound);
            self.labelled_int(&bucket, labels, Some(&le), cumulative);
        }
        self.labelled_int(&bucket, labels, Some("+Inf"), h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count);
    }

    fn labelled_int(&mut self, name: &str, labels: &[(&str, &str)], le: Option<&str>, value: u64) {
        self.out.push_str(name);
        self.write_labels(labels, le);
        let _ = writeln!(self.out, " {value}");
    }

    fn write_labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let extra = le.map(|v| ("le", v));
        for (i, (name, value)) in labels.iter().copied().chain(extra).enumerate() {
            debug_assert!(is_label_name(name), "bad label name {name}");
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(name);
            self.out.push_str("=\"");
            write_label_value(&mut self.out, value);
            self.out.push('"');
        }
        self.out.push('}');
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Observations counted into fixed buckets (upper bounds, inclusive, ascending).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative: observations above the previous bound and at most this one.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds (ascending; `+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// How many observations were made.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "counts \"things\" \\ and\nmore");
        e.sample("x_total", &[("a", "q\"b\\s\nn"), ("b", "plain")], 3u64);
        assert_eq!(
            e.finish(),
            "# HELP x_total counts \"things\" \\\\ and\\nmore\n\
             # TYPE x_total counter\n\
             x_total{a=\"q\\\"b\\\\s\\nn\",b=\"plain\"} 3\n"
        );
    }

    #[test]
    fn values_are_written_as_prometheus_reads_them() {
        let mut e = Exposition::new();
        e.family("g", Kind::Gauge, "a gauge");
        e.sample("g", &[], u64::MAX);
        e.sample("g", &[], 0.25);
        e.sample("g", &[], 2.0);
        e.sample("g", &[], f64::INFINITY);
        e.sample("g", &[], f64::NEG_INFINITY);
        e.sample("g", &[], f64::NAN);
        let text = e.finish();
        let values: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(
            values,
            ["18446744073709551615", "0.25", "2", "+Inf", "-Inf", "NaN"]
        );
    }

    #[test]
    fn histograms_have_cumulative_buckets_inf_sum_and_count() {
        static BOUNDS: [f64; 3] = [0.1, 1.0, 10.0];
        let mut h = Histogram::new(&BOUNDS);
        for v in [0.05, 0.1, 0.5, 5.0, 50.0] {
            h.observe(v);
        }
        assert_eq!(h.count(), 5);
        let mut e = Exposition::new();
        e.family("lat_seconds", Kind::Histogram, "latency");
        e.histogram("lat_seconds", &[("method", "/a.B/C")], &h);
        assert_eq!(
            e.finish(),
            "# HELP lat_seconds latency\n\
             # TYPE lat_seconds histogram\n\
             lat_seconds_bucket{method=\"/a.B/C\",le=\"0.1\"} 2\n\
             lat_seconds_bucket{method=\"/a.B/C\",le=\"1\"} 3\n\
             lat_seconds_bucket{method=\"/a.B/C\",le=\"10\"} 4\n\
             lat_seconds_bucket{method=\"/a.B/C\",le=\"+Inf\"} 5\n\
             lat_seconds_sum{method=\"/a.B/C\"} 55.65\n\
             lat_seconds_count{method=\"/a.B/C\"} 5\n"
        );
    }

    #[test]
    fn an_empty_histogram_still_has_every_bucket() {
        static BOUNDS: [f64; 2] = [1.0, 2.0];
        let mut e = Exposition::new();
        e.histogram("h", &[], &Histogram::new(&BOUNDS));
        assert_eq!(
            e.finish(),
            "h_bucket{le=\"1\"} 0\nh_bucket{le=\"2\"} 0\nh_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(is_metric_name("vmmagent_rpc_requests_total"));
        assert!(!is_metric_name("1x"));
        assert!(!is_metric_name("a-b"));
        assert!(is_label_name("vm_id"));
        assert!(!is_label_name("a:b"));
    }
}
