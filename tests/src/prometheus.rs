//! Reading the proxy's Prometheus endpoint in tests and the benchmark: a strict parser of the
//! text format (0.0.4): every sample belongs to a family declared by `# TYPE`, names and label
//! names are valid, values are escaped correctly, each series appears once. A malformed
//! exposition fails whoever reads it; `sum` adds up a metric's samples on top of it.
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(fail("bad TYPE"));
                    }
                    if families.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(fail("family declared twice"));
                    }
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                _ => return Err(fail("bad comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| fail("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| fail("bad value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| fail("unclosed labels"))?;
                (name, parse_labels(body).map_err(|why| fail(&why))?)
            }
        };
        if !valid_name(name) {
            return Err(fail("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| families.get(*base).is_some_and(|kind| kind == "histogram"))
            .unwrap_or(name);
        if !families.contains_key(family) {
            return Err(fail("sample without a TYPE line"));
        }
        if !seen.insert(series.to_owned()) {
            return Err(fail("series repeated"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn parse_labels(mut body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    while !body.is_empty() {
        let (name, rest) = body.split_once("=\"").ok_or("label without =\"")?;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    other => return Err(format!("bad escape \\{other}")),
                },
                (at, '"') => break at,
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        body = &rest[end + 1..];
        body = body.strip_prefix(',').unwrap_or(body);
    }
    Ok(labels)
}

/// Sum of the samples of `name` whose labels include every `(label, value)` of `labels`, in an
/// exposition that must parse. A metric the exposition does not have at all is an error, not a
/// 0: a misspelt or renamed name must fail the test that reads it. So is a metric with no
/// series for those labels: a check that expects 0 there says so with
/// [`sum_or_zero_if_family_present`].
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
    let found = matching(text, name, labels)?;
    if found.is_empty() {
        return Err(format!(
            "metric {name} has no series with {labels:?}; its series: {:?}",
            series_of(text, name)?
        ));
    }
    Ok(found.iter().map(|sample| sample.value).sum())
}

/// As [`sum`], but 0 when the metric is there with no series for those labels (yet): for the
/// series a proxy creates on first use. The metric itself must be in the exposition.
pub fn sum_or_zero_if_family_present(
    text: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<f64, String> {
    Ok(matching(text, name, labels)?
        .iter()
        .map(|sample| sample.value)
        .sum())
}

/// As [`sum`], but None while no series of `name` has those labels, the metric itself included:
/// for a series the proxy exports only once it has something to say, waited for.
pub fn sum_if_exported(
    text: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<Option<f64>, String> {
    let samples = parse(text)?;
    let found: Vec<f64> = samples
        .iter()
        .filter(|sample| {
            sample.name == name
                && labels.iter().all(|(label, value)| {
                    sample.labels.get(*label).map(String::as_str) == Some(*value)
                })
        })
        .map(|sample| sample.value)
        .collect();
    Ok((!found.is_empty()).then(|| found.iter().sum()))
}

/// The samples of `name` whose labels include every `(label, value)` of `labels`, each with all
/// its labels, in an exposition that must parse; possibly none, but a metric the exposition
/// does not have at all is an error naming the metrics it has.
pub fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Result<Vec<Sample>, String> {
    let samples = parse(text)?;
    if !samples.iter().any(|sample| sample.name == name) {
        let present: BTreeSet<&str> = samples.iter().map(|sample| sample.name.as_str()).collect();
        return Err(format!(
            "no metric {name} in the exposition; it has {present:?}"
        ));
    }
    Ok(samples
        .into_iter()
        .filter(|sample| {
            sample.name == name
                && labels.iter().all(|(label, value)| {
                    sample.labels.get(*label).map(String::as_str) == Some(*value)
                })
        })
        .collect())
}

/// The label sets of `name`'s series, for error messages.
fn series_of(text: &str, name: &str) -> Result<Vec<BTreeMap<String, String>>, String> {
    Ok(matching(text, name, &[])?
        .into_iter()
        .map(|sample| sample.labels)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP c_total Connections.\n# TYPE c_total counter\nc_total{a=\"x\"} 2\nc_total{a=\"y\\\"q\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";

    #[test]
    fn parses_and_sums_a_valid_exposition() {
        let samples = parse(GOOD).unwrap();
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[1].labels["a"], "y\"q");
        assert_eq!(sum(GOOD, "c_total", &[]).unwrap(), 5.0);
        assert_eq!(sum(GOOD, "c_total", &[("a", "x")]).unwrap(), 2.0);
        let missing = sum(GOOD, "c_totl", &[]).unwrap_err();
        assert!(missing.contains("no metric c_totl"), "{missing}");
        assert!(
            missing.contains("\"c_total\""),
            "names what is there: {missing}"
        );
        let no_series = sum(GOOD, "c_total", &[("a", "z")]).unwrap_err();
        assert!(no_series.contains("no series"), "{no_series}");
        assert!(no_series.contains("\"x\""), "lists the series: {no_series}");
        assert_eq!(
            sum_or_zero_if_family_present(GOOD, "c_total", &[("a", "z")]).unwrap(),
            0.0
        );
        assert_eq!(
            sum_or_zero_if_family_present(GOOD, "c_total", &[("a", "x")]).unwrap(),
            2.0
        );
        assert!(sum_or_zero_if_family_present(GOOD, "c_totl", &[]).is_err());
        assert_eq!(
            sum_if_exported(GOOD, "c_total", &[("a", "x")]),
            Ok(Some(2.0))
        );
        assert_eq!(sum_if_exported(GOOD, "c_total", &[("a", "z")]), Ok(None));
        assert_eq!(sum_if_exported(GOOD, "c_totl", &[]), Ok(None));
        assert!(sum_if_exported("c 1\n", "c", &[]).is_err());
        let found = matching(GOOD, "c_total", &[("a", "x")]).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].labels["a"], "x");
        assert!(matching(GOOD, "c_totl", &[]).is_err());
    }

    #[test]
    fn rejects_what_prometheus_would() {
        for (bad, why) in [
            ("c_total 1\n", "without a TYPE line"),
            ("# TYPE c counter\nc{a=\"1\"} 1\nc{a=\"1\"} 2\n", "repeated"),
            ("# TYPE c counter\nc{a=\"1} 1\n", "unterminated"),
            ("# TYPE c counter\nc one\n", "bad value"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }
}
