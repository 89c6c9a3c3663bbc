//! The Prometheus text exposition format (version 0.0.4): a writer that cannot produce an
//! invalid page, and a strict checker used by the tests (`promtool check metrics` is not
//! available everywhere the tests run).
//!
//! Owns: [`Exposition`] (HELP and TYPE once per family, before its samples; label values
//! escaped; histograms as `_bucket{le}`/`_sum`/`_count`) and [`parse`] (names, HELP/TYPE
//! lines, label syntax and escapes, values, families contiguous, counters named `_total`,
//! histograms whole: cumulative buckets ending at `+Inf` equal to `_count`, a `_sum`).
//! Must never: emit a sample of a family it has not declared.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets at restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in cumulative buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// Builds an exposition page.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    current: Option<String>,
}

/// Whether `name` is a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
#[must_use]
pub fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed.
#[must_use]
pub fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A count as a sample value (exact below 2^53, which a counter of events never reaches).
#[allow(clippy::cast_precision_loss)]
fn as_f64(n: u64) -> f64 {
    n as f64
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

impl Exposition {
    /// An empty page.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its HELP and TYPE lines.
    ///
    /// # Panics
    /// `name` is not a valid metric name, or a counter's name does not end in `_total`
    /// (both are programming errors caught by the tests).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        assert!(valid_metric_name(name), "invalid metric name {name:?}");
        assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self.current = Some(name.to_owned());
    }

    /// Adds a sample to the current family.
    ///
    /// # Panics
    /// `name` is not the current family, or a label name is invalid (programming errors).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        assert_eq!(
            self.current.as_deref(),
            Some(name),
            "sample of an undeclared family"
        );
        self.write_sample(name, labels, value);
    }

    /// Adds one histogram series to the current (histogram) family: `counts[i]`
    /// observations in bucket `i` (at most `bounds[i]`; the last count is past every
    /// bound), written cumulative with `+Inf`, then `_sum` and `_count`.
    ///
    /// # Panics
    /// `name` is not the current family, `counts` is not one longer than `bounds`, or a
    /// label is `le` or invalid (programming errors).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        assert_eq!(
            self.current.as_deref(),
            Some(name),
            "sample of an undeclared family"
        );
        assert_eq!(
            counts.len(),
            bounds.len() + 1,
            "one count per bucket and +Inf"
        );
        assert!(
            labels.iter().all(|(k, _)| *k != "le"),
            "le is the bucket's label"
        );
        let bucket = format!("{name}_bucket");
        let mut total = 0u64;
        for (i, c) in counts.iter().enumerate() {
            total = total.saturating_add(*c);
            let le = bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| format_value(*b));
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.write_sample(&bucket, &with_le, as_f64(total));
        }
        self.write_sample(&format!("{name}_sum"), labels, sum);
        self.write_sample(&format!("{name}_count"), labels, as_f64(total));
    }

    fn write_sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                assert!(valid_label_name(k), "invalid label name {k:?}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// The page.
    #[must_use]
    pub fn finish(self) -> String {
        self.out
    }
}

/// One sample read back by [`parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSample {
    /// Metric name.
    pub name: String,
    /// Labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Checks a page strictly and returns its samples: every line is a HELP, TYPE or other
/// comment, a sample or empty; names and label names are valid; label values are quoted
/// with valid escapes; values parse; each family has at most one HELP and one TYPE, both
/// before its first sample; a family's samples are contiguous; counters end in `_total`;
/// no sample repeats a series.
///
/// # Errors
/// The first problem, with its line number.
pub fn parse(page: &str) -> Result<Vec<ParsedSample>, String> {
    let mut samples = Vec::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    if !page.is_empty() && !page.ends_with('\n') {
        return Err("the page does not end with a newline".to_owned());
    }
    for (i, line) in page.lines().enumerate() {
        let at = |msg: String| format!("line {}: {msg}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_metric_name(name) {
                return Err(at(format!("invalid metric name {name:?}")));
            }
            if samples
                .iter()
                .any(|s: &ParsedSample| family_of(&s.name, &typed) == name)
            {
                return Err(at(format!("{keyword} for {name} after its samples")));
            }
            if keyword == "TYPE" {
                if !matches!(
                    arg,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ) {
                    return Err(at(format!("unknown type {arg:?}")));
                }
                if arg == "counter" && !name.ends_with("_total") {
                    return Err(at(format!("counter {name} does not end in _total")));
                }
                if typed.insert(name.to_owned(), arg.to_owned()).is_some() {
                    return Err(at(format!("second TYPE line for {name}")));
                }
            } else {
                check_help_escapes(arg).map_err(&at)?;
                if !helped.insert(name.to_owned()) {
                    return Err(at(format!("second HELP line for {name}")));
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(&at)?;
        let family = family_of(&sample.name, &typed).to_owned();
        if current.as_deref() != Some(&family) {
            if finished.contains(&family) {
                return Err(at(format!("samples of {family} are not contiguous")));
            }
            if let Some(prev) = current.take() {
                finished.insert(prev);
            }
            current = Some(family);
        }
        let key = format!("{}{:?}", sample.name, sample.labels);
        if !series.insert(key) {
            return Err(at("the same series appears twice".to_owned()));
        }
        samples.push(sample);
    }
    check_histograms(&samples, &typed)?;
    Ok(samples)
}

/// Each histogram series (its labels less `le`) is whole: buckets with valid `le`
/// bounds in increasing order, cumulative counts, a `+Inf` bucket equal to `_count`, and
/// a `_sum`.
fn check_histograms(
    samples: &[ParsedSample],
    typed: &BTreeMap<String, String>,
) -> Result<(), String> {
    #[derive(Default)]
    struct Series {
        buckets: Vec<(f64, f64)>,
        sum: Option<f64>,
        count: Option<f64>,
    }
    let mut all: BTreeMap<(String, String), Series> = BTreeMap::new();
    for s in samples {
        let family = family_of(&s.name, typed);
        if typed.get(family).map(String::as_str) != Some("histogram") {
            continue;
        }
        let mut labels = s.labels.clone();
        let le = labels.remove("le");
        let key = (family.to_owned(), format!("{labels:?}"));
        let series = all.entry(key).or_default();
        let part = &s.name[family.len()..];
        let what = || format!("histogram {family}{labels:?}");
        match (part, le) {
            ("_bucket", Some(le)) => {
                let bound = match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v
                        .parse::<f64>()
                        .map_err(|_| format!("{}: invalid le {v:?}", what()))?,
                };
                series.buckets.push((bound, s.value));
            }
            ("_bucket", None) => return Err(format!("{}: a bucket without le", what())),
            ("_sum", None) => series.sum = Some(s.value),
            ("_count", None) => series.count = Some(s.value),
            _ => return Err(format!("{}: unexpected sample {}", what(), s.name)),
        }
    }
    for ((family, labels), s) in &all {
        let what = format!("histogram {family}{labels}");
        for w in s.buckets.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(format!("{what}: le bounds not increasing"));
            }
            if w[1].1 < w[0].1 {
                return Err(format!("{what}: bucket counts not cumulative"));
            }
        }
        let Some(&(last_le, last)) = s.buckets.last() else {
            return Err(format!("{what}: no buckets"));
        };
        if last_le != f64::INFINITY {
            return Err(format!("{what}: no +Inf bucket"));
        }
        match s.count {
            Some(c) if c == last => {}
            Some(c) => {
                return Err(format!(
                    "{what}: _count {c} differs from the +Inf bucket {last}"
                ))
            }
            None => return Err(format!("{what}: no _count")),
        }
        if s.sum.is_none() {
            return Err(format!("{what}: no _sum"));
        }
    }
    Ok(())
}

/// The family a sample belongs to: itself, or for histogram/summary parts the declared
/// base name.
fn family_of<'a>(name: &'a str, typed: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if typed
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
            {
                return base;
            }
        }
    }
    name
}

fn check_help_escapes(text: &str) -> Result<(), String> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return Err("invalid escape in HELP text".to_owned());
        }
    }
    Ok(())
}

fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            // Label name, or the closing brace.
            let start = match chars.peek() {
                Some((j, '}')) => break *j + 1,
                Some((j, _)) => *j,
                None => return Err("unterminated label set".to_owned()),
            };
            let mut eq = None;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(j);
                    break;
                }
            }
            let eq = eq.ok_or("a label without '='")?;
            let key = &after[start..eq];
            if !valid_label_name(key) {
                return Err(format!("invalid label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("the value of label {key} is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        _ => return Err(format!("invalid escape in the value of label {key}")),
                    },
                    Some((_, '\n')) | None => {
                        return Err(format!("unterminated value of label {key}"))
                    }
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} appears twice"));
            }
            match chars.next() {
                Some((j, '}')) => break j + 1,
                Some((_, ',')) => {}
                _ => return Err("expected ',' or '}' after a label".to_owned()),
            }
        };
        rest = &after[end..];
    }
    let mut fields = rest.split_ascii_whitespace();
    if !rest.starts_with(' ') {
        return Err("expected a space before the value".to_owned());
    }
    let value_text = fields.next().ok_or("a sample needs a value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("invalid value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("invalid timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields after the value".to_owned());
    }
    Ok(ParsedSample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_valid_pages_and_rejects_broken_ones() {
        let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\na_total 4 1700000000\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 2\nh_count 1\n";
        let s = parse(good).expect("valid");
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].labels["y"], "q\"\\\n");
        for (bad, why) in [
            ("a 1", "newline"),
            ("9a 1\n", "invalid metric name"),
            ("a{b=1} 1\n", "not quoted"),
            ("a{b=\"1\" 1\n", "expected ','"),
            ("a{__b=\"1\"} 1\n", "invalid label name"),
            ("a{b=\"\\x\"} 1\n", "invalid escape"),
            ("a one\n", "invalid value"),
            ("# TYPE a counter\n", "_total"),
            ("# TYPE a gauge\n# TYPE a gauge\n", "second TYPE"),
            ("a 1\n# TYPE a gauge\n", "after its samples"),
            ("a 1\nb 1\na{x=\"2\"} 1\n", "not contiguous"),
            ("a 1\na 2\n", "twice"),
            ("a{b=\"1\",b=\"2\"} 1\n", "appears twice"),
            ("a 1 2 3\n", "trailing"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 2\nh_count 1\n",
                "not cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 2\nh_count 1\n",
                "no +Inf",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 2\nh_count 3\n",
                "differs",
            ),
            ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", "no _sum"),
            ("# TYPE h histogram\nh_bucket 1\nh_sum 1\nh_count 1\n", "without le"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_writer_escapes_what_it_must() {
        let mut e = Exposition::new();
        e.family("x_total", Kind::Counter, "back\\slash\nnewline");
        e.sample("x_total", &[("p", "a\"b\\c\nd")], 1.0);
        e.family("g", Kind::Gauge, "g");
        e.sample("g", &[], f64::INFINITY);
        let page = e.finish();
        let s = parse(&page).expect("valid");
        assert_eq!(s[0].labels["p"], "a\"b\\c\nd");
        assert!(s[1].value.is_infinite());
    }

    #[test]
    fn histograms_are_written_cumulative_and_whole() {
        let mut e = Exposition::new();
        e.family("lat_seconds", Kind::Histogram, "Latency.");
        e.histogram(
            "lat_seconds",
            &[("pool", "a")],
            &[0.001, 0.01],
            &[2, 0, 3],
            0.5,
        );
        e.histogram(
            "lat_seconds",
            &[("pool", "b")],
            &[0.001, 0.01],
            &[0, 0, 0],
            0.0,
        );
        let page = e.finish();
        let s = parse(&page).expect("valid");
        let got: Vec<(String, Option<&str>, f64)> = s
            .iter()
            .filter(|s| s.labels.get("pool").map(String::as_str) == Some("a"))
            .map(|s| {
                (
                    s.name.clone(),
                    s.labels.get("le").map(String::as_str),
                    s.value,
                )
            })
            .collect();
        let want = [
            ("lat_seconds_bucket", Some("0.001"), 2.0),
            ("lat_seconds_bucket", Some("0.01"), 2.0),
            ("lat_seconds_bucket", Some("+Inf"), 5.0),
            ("lat_seconds_sum", None, 0.5),
            ("lat_seconds_count", None, 5.0),
        ];
        assert_eq!(got.len(), want.len(), "{page}");
        for ((n, le, v), (wn, wle, wv)) in got.iter().zip(want) {
            assert_eq!((n.as_str(), *le), (wn, wle), "{page}");
            assert!((v - wv).abs() < f64::EPSILON, "{page}");
        }
    }
}
