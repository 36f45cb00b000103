//! A parser for the Prometheus text format, enough to read our own /metrics.

use std::collections::BTreeMap;

/// One scrape: `(metric name, sorted labels) -> value`.
#[derive(Debug, Default)]
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| parse_line(line).unwrap_or_else(|| panic!("bad sample line: {line}")))
            .collect();
        Self { samples }
    }

    /// The sum of the samples of `name` whose labels include all of `labels`
    /// (0 when there is none: a counter that never moved is not exported).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// The samples of `name` whose labels include all of `labels`, one per
    /// line (labels, value): for a failure's message.
    pub fn samples(&self, name: &str, labels: &[(&str, &str)]) -> String {
        self.matching(name, labels)
            .map(|(l, v)| format!("{l:?} {v}\n"))
            .collect()
    }

    /// The labels and values of the samples of `name` whose labels include
    /// all of `labels`.
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    /// Whether any sample of `name` carries label `key` with `value`.
    pub fn has(&self, name: &str, key: &str, value: &str) -> bool {
        self.samples
            .iter()
            .any(|(n, l, _)| n == name && l.get(key).is_some_and(|x| x == value))
    }
}

fn parse_line(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series.to_owned(), BTreeMap::new(), value));
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(match chars.next()?.1 {
                    'n' => '\n',
                    c => c,
                }),
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name.to_owned(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_and_without_labels() {
        let scrape = Scrape::parse(
            "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"w\\\"x\"} 3\na_total{k=\"u\"} 4\nb 1.5\n",
        );
        assert_eq!(scrape.sum("a_total", &[]), 7.0);
        assert_eq!(scrape.sum("a_total", &[("k", "v")]), 3.0);
        assert_eq!(scrape.sum("a_total", &[("q", "w\"x")]), 3.0);
        assert_eq!(scrape.sum("b", &[]), 1.5);
        assert_eq!(scrape.sum("c", &[]), 0.0);
        assert!(scrape.has("a_total", "k", "u"));
    }
}
