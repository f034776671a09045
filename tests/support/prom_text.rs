//! A strict reader of the Prometheus text exposition format (0.0.4) for tests: every line
//! must be a `# HELP`/`# TYPE` line, another comment, or a sample `name{labels} value`
//! with a valid float, and every sample must belong to a family whose TYPE came first.
//! Histograms are checked for what a scraper relies on: cumulative buckets that end in
//! `le="+Inf"` equal to `_count`, and a `_sum`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

/// A sample's labels, sorted by name.
pub type Labels = Vec<(String, String)>;

/// A sample's identity: metric name and its labels.
pub type Key = (String, Labels);

/// A page read strictly.
#[derive(Debug, Default)]
pub struct Page {
    /// Family name -> its TYPE.
    pub types: HashMap<String, String>,
    /// Every sample's value.
    pub samples: BTreeMap<Key, f64>,
}

impl Page {
    /// The value of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        self.samples.get(&(name.to_string(), l)).copied()
    }

    /// The value of `name` with exactly `labels`; panics naming what is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:?}", self.samples.keys()))
    }

    /// Every sample of metric `name`, with its labels.
    pub fn all(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value as Go's ParseFloat reads it in this format.
pub fn parse_float(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) && !s.is_empty() => s
            .parse::<f64>()
            .map_err(|e| format!("bad float {s:?}: {e}")),
        _ => Err(format!("bad float {s:?}")),
    }
}

/// `a="x",b="y\"z"` (without braces) -> pairs, unescaping `\\`, `\"`, `\n`.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without '=' in {s:?}"))?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let after = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value is not quoted in {s:?}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                '\n' => return Err("raw newline in a label value".into()),
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated label value in {s:?}"))?;
        if out.iter().any(|(n, _): &(String, String)| n == name) {
            return Err(format!("label {name} repeated in {s:?}"));
        }
        out.push((name.to_string(), value));
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.is_empty() {
            return Err(format!("expected ',' after label {name} in {s:?}"));
        }
    }
    Ok(out)
}

/// The family a sample belongs to, given the families declared so far.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return Some(base);
            }
        }
    }
    None
}

/// Reads `text` strictly; the error names the line.
pub fn parse(text: &str) -> Result<Page, String> {
    let mut page = Page::default();
    let mut helped: HashMap<String, ()> = HashMap::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    if !text.ends_with('\n') {
        return Err("the page does not end with a newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words.first().copied() {
                Some("HELP") => {
                    let name = words.get(1).copied().unwrap_or_default();
                    if !valid_name(name) || helped.insert(name.to_string(), ()).is_some() {
                        return Err(at("bad or repeated HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let name = words.get(1).copied().unwrap_or_default();
                    let kind = words.get(2).copied().unwrap_or_default();
                    if !valid_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(at("bad TYPE".into()));
                    }
                    if page.types.insert(name.to_string(), kind.into()).is_some() {
                        return Err(at("TYPE repeated".into()));
                    }
                    if let Some(prev) = current.replace(name.to_string()) {
                        finished.push(prev);
                    }
                }
                _ => {} // any other comment
            }
            continue;
        }
        // `series value [timestamp]`; the series ends at the last '}' when it has labels
        // (a label value may hold spaces, but the value and timestamp hold no '}').
        let (series, tail) = match (line.find('{'), line.rfind('}')) {
            (Some(_), Some(close)) => (
                &line[..=close],
                line[close + 1..]
                    .strip_prefix(' ')
                    .ok_or_else(|| at("no space before the value".into()))?,
            ),
            _ => line.split_once(' ').ok_or_else(|| at("no value".into()))?,
        };
        let mut parts = tail.split(' ');
        let value = parts.next().unwrap_or_default();
        if let Some(ts) = parts.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("bad timestamp {ts:?}")))?;
        }
        if parts.next().is_some() {
            return Err(at("trailing text after the timestamp".into()));
        }
        let value = parse_float(value).map_err(at)?;
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("labels not closed".into()))?;
                (n, parse_labels(inner).map_err(at)?)
            }
            None => (series, Vec::new()),
        };
        if !valid_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let family = family_of(name, &page.types)
            .ok_or_else(|| at(format!("sample {name} has no TYPE before it")))?;
        if current.as_deref() != Some(family) {
            return Err(at(format!(
                "sample of {family} outside its family's block (finished: {})",
                finished.contains(&family.to_string())
            )));
        }
        let mut sorted = labels;
        sorted.sort();
        if page
            .samples
            .insert((name.to_string(), sorted), value)
            .is_some()
        {
            return Err(at("duplicate sample".into()));
        }
    }
    check_histograms(&page)?;
    Ok(page)
}

/// Buckets cumulative, `+Inf` present and equal to `_count`, `_sum` present.
fn check_histograms(page: &Page) -> Result<(), String> {
    for (family, kind) in &page.types {
        if kind != "histogram" {
            continue;
        }
        // Series of the histogram: labels without `le` -> [(le, count)].
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), v) in &page.samples {
            if *name != format!("{family}_bucket") {
                continue;
            }
            let le = labels
                .iter()
                .find(|(k, _)| k == "le")
                .ok_or_else(|| format!("{family}: a bucket without le"))?;
            let le = parse_float(&le.1)?;
            let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            series.entry(rest).or_default().push((le, *v));
        }
        if series.is_empty() {
            return Err(format!("histogram {family} has no buckets"));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!(
                    "{family}{labels:?}: buckets not cumulative: {buckets:?}"
                ));
            }
            let Some(&(last_le, inf)) = buckets.last() else {
                continue;
            };
            if last_le != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no le=\"+Inf\" bucket"));
            }
            let count = page
                .samples
                .get(&(format!("{family}_count"), labels.clone()))
                .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
            if *count != inf {
                return Err(format!(
                    "{family}{labels:?}: _count {count} != +Inf bucket {inf}"
                ));
            }
            if !page
                .samples
                .contains_key(&(format!("{family}_sum"), labels.clone()))
            {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
    }
    Ok(())
}

#[test]
fn the_reader_refuses_what_prometheus_would() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    let page = parse(ok).unwrap();
    assert_eq!(page.value("a_total", &[("k", "v\"")]), 1.0);
    for bad in [
        "a 1\n",                                                             // no TYPE
        "# TYPE a gauge\na one\n",                                           // not a float
        "# TYPE a gauge\na{k=v} 1\n",                                        // unquoted label
        "# TYPE a gauge\na{k=\"v} 1\n",                                      // unterminated
        "# TYPE a gauge\na 1",                                               // no final newline
        "# TYPE a gauge\n\na 1\n",                                           // empty line
        "# TYPE a gauge\n# TYPE b gauge\na 1\n",                             // outside its block
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // count mismatch
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1\nh_count 2\n",    // no +Inf
        "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
