//! Reading Prometheus text exposition (format 0.0.4) as the tests scrape it: a check of the
//! format and the conventions meshd follows, and the value of one sample.
//!
//! `promtool check metrics` is the reference check (`scripts/install-deps.sh` installs it);
//! this one runs too, so the tests check the format also on a machine without promtool.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// One sample line: name, label pairs, value.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let (series, value) = line.rsplit_once(' ').context("no value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').context("unclosed label set")?;
            let mut labels = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"").context("label without =\"")?;
                ensure!(is_name(key) && !key.contains(':'), "label name {key:?}");
                // Values escape only \\, \" and \n.
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            other => bail!("bad escape {other:?} in {line:?}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value in {line:?}"),
                    }
                };
                labels.push((key.to_owned(), value));
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
            (name, labels)
        }
    };
    ensure!(is_name(name), "metric name {name:?}");
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Checks `text` line by line: HELP and TYPE before a family's samples, each family once,
/// valid names, labels and values, every name with `prefix`, counters ending in `_total`,
/// histograms with `_bucket` (with `le`), `_sum` and `_count`, and no sample twice.
pub fn check(text: &str, prefix: &str) -> anyhow::Result<()> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            ensure!(is_name(name), "{}", at());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').with_context(at)?;
            ensure!(is_name(name) && name.starts_with(prefix), "{}", at());
            ensure!(
                matches!(
                    kind,
                    "counter" | "gauge" | "histogram" | "summary" | "untyped"
                ),
                "{}",
                at()
            );
            ensure!(
                kind != "counter" || name.ends_with("_total"),
                "counter without _total: {}",
                at()
            );
            ensure!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family declared twice: {}",
                at()
            );
            continue;
        }
        ensure!(!line.starts_with('#'), "unknown comment: {}", at());
        let Sample { name, labels, .. } = parse_sample(line).with_context(at)?;
        let family = types
            .iter()
            .find(|(f, kind)| {
                name == **f
                    || (kind.as_str() == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name == format!("{f}{s}")))
            })
            .with_context(|| format!("sample of no declared family: {}", at()))?;
        if family.1 == "histogram" && name.ends_with("_bucket") {
            ensure!(
                labels.iter().any(|(k, _)| k == "le"),
                "bucket without le: {}",
                at()
            );
        }
        let mut sorted = labels.clone();
        sorted.sort();
        ensure!(seen.insert((name, sorted)), "sample twice: {}", at());
    }
    ensure!(!types.is_empty(), "no metric families in {text:?}");
    Ok(())
}

/// The value of the sample `name` whose labels include every pair of `labels`.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| parse_sample(l).ok())
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
}

pub use meshd_testing::promtool_check;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP m_up Up.\n# TYPE m_up gauge\nm_up{cluster=\"c\\\"2\"} 1\n\
        # HELP m_x_total X.\n# TYPE m_x_total counter\nm_x_total 3\n\
        # HELP m_d_seconds D.\n# TYPE m_d_seconds histogram\n\
        m_d_seconds_sum 0.5\nm_d_seconds_count 1\nm_d_seconds_bucket{le=\"+Inf\"} 1\n";

    #[test]
    fn good_text_passes_and_values_are_found() {
        check(GOOD, "m_").unwrap();
        assert_eq!(value(GOOD, "m_up", &[("cluster", "c\"2")]), Some(1.0));
        assert_eq!(value(GOOD, "m_x_total", &[]), Some(3.0));
        assert_eq!(value(GOOD, "m_up", &[("cluster", "c3")]), None);
    }

    #[test]
    fn broken_text_fails() {
        for bad in [
            "# TYPE m_x counter\nm_x 1\n",            // counter without _total
            "m_up 1\n",                               // no TYPE
            "# TYPE m_up gauge\nm_up{a=\"1} 1\n",     // unterminated value
            "# TYPE m_up gauge\nm_up one\n",          // not a number
            "# TYPE m_up gauge\nm_up 1\nm_up 2\n",    // twice
            "# TYPE other gauge\nother 1\n",          // no prefix
            "# TYPE m_up gauge\n# TYPE m_up gauge\n", // declared twice
        ] {
            assert!(check(bad, "m_").is_err(), "{bad:?} passed");
        }
    }
}
