//! The Grafana dashboard (deploy/grafana) asks only for metrics and labels
//! the observer exports: every query's metric names and label names are
//! checked against a real scrape of the observer on the node lab (with a
//! policy, so that verdicts exist too).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, thread,
    time::{Duration, Instant},
};

use integration_test::{
    Observer, Scrape, TempDir,
    container::{Connect, connect_from, container},
    observer::http_get,
};
use lab::{Lab, Plan};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/observer-dashboard.json"
);

const POLICY: &str = "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {namespace: shop}\n  mode: enforce\n  rules:\n  - {name: no-8080, class: localhost, ports: [8080], clientContainers: [app], action: deny}\n";

#[test]
fn every_dashboard_query_names_exported_metrics_and_labels() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("dashboard");
    let (_, observer) = Observer::with_policy(&lab, &dir, POLICY);
    // A verdict, and the lab's own traffic of every class.
    let (app, netns) = container(&lab, "shop", "shop", "app");
    assert_eq!(
        connect_from(&app, &netns, "127.0.0.1", 8080),
        Connect::NotPermitted
    );
    let exported = wait_for_labels(&observer);

    let dashboard: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(DASHBOARD).unwrap()).expect("valid JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 15, "{queries:?}");
    let mut problems = Vec::new();
    for query in &queries {
        for metric in metric_names(query) {
            let Some(labels) = exported.get(&metric) else {
                problems.push(format!("{metric} is not exported (in {query})"));
                continue;
            };
            for label in label_names(query) {
                // `le` is a histogram bucket's label.
                let bucket = label == "le" && metric.ends_with("_bucket");
                if !labels.contains(&label) && !bucket {
                    problems.push(format!("{metric} has no label {label} (in {query})"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(observer.terminate().success());
}

/// Sample names and their label names, once the traffic families are there.
fn wait_for_labels(observer: &Observer) -> BTreeMap<String, BTreeSet<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, text) = http_get(observer.addr(), "/metrics").expect("/metrics");
        let scrape = Scrape::parse(&text);
        let ready = scrape.has("observer_flow_packets_total", "class", "service")
            && scrape.has("observer_policy_verdicts_total", "verdict", "deny");
        if ready {
            let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for line in text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
            {
                let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
                let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
                let entry = names.entry(name.to_owned()).or_default();
                for pair in labels.trim_end_matches('}').split("\",") {
                    if let Some((label, _)) = pair.split_once('=') {
                        entry.insert(label.trim_matches(',').to_owned());
                    }
                }
            }
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "no service traffic or verdict yet:\n{text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Every PromQL expression of the dashboard: panel targets and variables.
fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query", serde_json::Value::String(q)) if q.contains("observer_") => {
                        out.push(q.clone())
                    }
                    _ => collect_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("observer_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

/// Labels in `by (...)` groupings, `{...}` matchers and `label_values(m, l)`.
fn label_names(query: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("by (") {
        let end = rest[i..].find(')').map_or(rest.len(), |e| i + e);
        labels.extend(rest[i + 4..end].split(',').map(|l| l.trim().to_owned()));
        rest = &rest[end..];
    }
    let mut rest = query;
    while let Some(i) = rest.find('{') {
        let end = rest[i..].find('}').map_or(rest.len(), |e| i + e);
        for matcher in rest[i + 1..end].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                labels.push(name);
            }
        }
        rest = &rest[end..];
    }
    if let Some(args) = query.strip_prefix("label_values(")
        && let Some((_, label)) = args.trim_end_matches(')').rsplit_once(',')
    {
        labels.push(label.trim().to_owned());
    }
    labels.retain(|l| !l.is_empty());
    labels
}
