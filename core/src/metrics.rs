//! Prometheus metrics without a metrics crate: lock-free counters, gauges and fixed-bucket
//! histograms, and a writer for the text exposition format (version 0.0.4).
//!
//! Updating is a few relaxed atomic operations and never allocates, so the step loop can
//! count every step. Reading (a scrape) takes a snapshot of each value in turn; a scrape
//! that races an update may see one family a step ahead of another, never a torn value.
//! Histograms keep per-bucket counts (not cumulative ones) and derive `_count` from them
//! when read, so `le="+Inf"` always equals `_count` within one scrape.
//!
//! The format, as Prometheus documents it: `# HELP name text` and `# TYPE name kind`
//! before a family's samples; samples `name{label="value",…} value`; label values escape
//! `\`, `"` and newlines, help text escapes `\` and newlines; floats are written as Go's
//! `strconv.ParseFloat` reads them, with `+Inf`, `-Inf` and `NaN` spelled out.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `Content-Type` of [`Exposition`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (an f64 stored as its bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// A gauge at zero (`0.0` has all bits clear).
    pub const fn new() -> Self {
        Gauge(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Upper bounds (seconds) for durations from a fraction of a millisecond (a small MLP's
/// step on one core) to tens of seconds (a large model's all-reduce over a slow link).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Observations counted into fixed buckets, with their sum.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, strictly increasing; `+Inf` is implicit.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is the `+Inf` overflow.
    counts: Box<[AtomicU64]>,
    /// Sum of observations, as f64 bits.
    sum: AtomicU64,
}

/// A histogram read at one moment: cumulative bucket counts, sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations <= bound)`, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations (equal to the `+Inf` bucket).
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (strictly increasing, finite; callers pass a
    /// constant such as [`SECONDS_BUCKETS`]).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, v: f64) {
        // Bounds are few (under 20): a linear scan beats a binary search's branches.
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // A compare-and-swap loop: lock-free, and uncontended in practice (one step
        // thread observes).
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self
                .sum
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The cumulative view a scrape exports.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, total));
        }
        HistogramSnapshot {
            buckets,
            sum: f64::from_bits(self.sum.load(Ordering::Relaxed)),
            count: total,
        }
    }
}

/// The kind of a metric family (its `# TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Bucketed observations with `_bucket`, `_sum` and `_count` samples.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Writes metric families in the text exposition format. Call [`Exposition::family`]
/// once per family, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty page.
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            escape_help(help),
            kind.as_str()
        );
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
        self
    }

    /// The samples of one histogram (`name` without suffix) with `labels`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
    ) -> &mut Self {
        for &(bound, count) in &h.buckets {
            self.out.push_str(name);
            self.out.push_str("_bucket");
            write_labels(&mut self.out, labels, Some(bound));
            let _ = writeln!(self.out, " {count}");
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count as f64)
    }

    /// The page.
    pub fn finish(self) -> String {
        self.out
    }
}

/// `{a="x",le="0.5"}`, or nothing when there are no labels.
fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<f64>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label(v));
    }
    if let Some(b) = le {
        if !first {
            out.push(',');
        }
        let _ = write!(out, "le=\"{}\"", format_value(b));
    }
    out.push('}');
}

/// A label value with `\`, `"` and newlines escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Help text with `\` and newlines escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus parses it (`+Inf`, `-Inf`, `NaN`; integers without a
/// fraction; otherwise Rust's shortest round-trip form).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_hold_what_was_added_and_set() {
        let c = Counter::new();
        c.add(3);
        c.add(4);
        assert_eq!(c.get(), 7);
        let g = Gauge::new();
        assert_eq!(g.get(), 0.0);
        g.set(-2.5);
        assert_eq!(g.get(), -2.5);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        static B: &[f64] = &[0.1, 1.0];
        let h = Histogram::new(B);
        for v in [0.05, 0.1, 0.5, 2.0, 7.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        // 0.1 falls into le="0.1" (upper bounds are inclusive, as in Prometheus).
        assert_eq!(s.buckets, vec![(0.1, 2), (1.0, 3), (f64::INFINITY, 5)]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 9.65).abs() < 1e-12, "{}", s.sum);
    }

    #[test]
    fn a_page_has_help_type_escaped_labels_and_histogram_suffixes() {
        static B: &[f64] = &[0.5];
        let h = Histogram::new(B);
        h.observe(0.25);
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "a \\ help\nline")
            .sample("x_total", &[], 3.0);
        e.family("g", Kind::Gauge, "gauge")
            .sample("g", &[("job", "a\"b\\c\nd"), ("s", "ok")], 0.5);
        e.family("h_seconds", Kind::Histogram, "hist").histogram(
            "h_seconds",
            &[("k", "v")],
            &h.snapshot(),
        );
        assert_eq!(
            e.finish(),
            "# HELP x_total a \\\\ help\\nline\n# TYPE x_total counter\nx_total 3\n\
             # HELP g gauge\n# TYPE g gauge\ng{job=\"a\\\"b\\\\c\\nd\",s=\"ok\"} 0.5\n\
             # HELP h_seconds hist\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{k=\"v\",le=\"0.5\"} 1\nh_seconds_bucket{k=\"v\",le=\"+Inf\"} 1\n\
             h_seconds_sum{k=\"v\"} 0.25\nh_seconds_count{k=\"v\"} 1\n"
        );
    }

    #[test]
    fn special_floats_use_prometheus_spellings() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(1e-7), "0.0000001");
        assert_eq!(format_value(12.0), "12");
    }

    #[test]
    fn the_default_seconds_buckets_increase() {
        assert!(SECONDS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
