//! `observer flows`: the live traffic of the node (or of one pod) as a
//! table that refreshes, read from a running observer's `/flows` as the
//! typed rows the observer serves ([`FlowRow`]). The columns come from the
//! flow schema.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use super::FlowsArgs;
use crate::flows::schema::{self, FlowRow};

/// How long a reading may take (the observer collects before it answers).
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("no observer answers on {addr} (is `observer run` running there?): {source}")]
    Connect {
        addr: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
    #[error("{addr}/flows: {problem}")]
    Response { addr: SocketAddr, problem: String },
    #[error("--pod must be NAMESPACE/NAME, not `{0}`")]
    PodFormat(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn run(args: &FlowsArgs) -> Result<(), FlowsError> {
    let pod = args
        .pod
        .as_deref()
        .map(|p| {
            p.split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .ok_or_else(|| FlowsError::PodFormat(p.into()))
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(FlowsError::Runtime)?;
    runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let clear = !args.once && std::io::stdout().is_terminal();
        if args.once {
            // Two readings: the first starts the window the rates are taken over.
            fetch(&client, args.addr).await?;
            tokio::time::sleep(args.interval).await;
        }
        loop {
            let rows = fetch(&client, args.addr).await?;
            let table = render(&rows, pod);
            let mut out = std::io::stdout().lock();
            if clear {
                let _ = write!(out, "\x1b[2J\x1b[H");
            }
            let _ = write!(out, "{table}");
            let _ = out.flush();
            if args.once {
                return Ok(());
            }
            tokio::time::sleep(args.interval).await;
        }
    })
}

async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
) -> Result<Vec<FlowRow>, FlowsError> {
    let bad = |problem: String| FlowsError::Response { addr, problem };
    let uri = format!("http://{addr}/flows")
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    let response = tokio::time::timeout(TIMEOUT, client.get(uri))
        .await
        .map_err(|_| bad(format!("no answer within {TIMEOUT:?}")))?
        .map_err(|source| FlowsError::Connect { addr, source })?;
    if !response.status().is_success() {
        return Err(bad(response.status().to_string()));
    }
    let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| bad(format!("no answer within {TIMEOUT:?}")))?
        .map_err(|e| bad(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
}

/// The table, busiest first: the schema's columns, then the rates.
pub fn render(rows: &[FlowRow], pod: Option<(&str, &str)>) -> String {
    let columns = schema::columns();
    let mut lines: Vec<(f64, Vec<String>)> = rows
        .iter()
        .filter(|row| {
            pod.is_none_or(|(ns, name)| row.labels.namespace == ns && row.labels.pod == name)
        })
        .map(|row| {
            let values: Vec<&str> = row.labels.values().collect();
            let seconds = row.seconds.max(0.001);
            let bytes_rate = row.bytes as f64 / seconds;
            let mut cells: Vec<String> = columns
                .iter()
                .map(|(column, labels)| {
                    let parts: Vec<&str> = labels.iter().map(|&i| values[i]).collect();
                    column.cell(&parts)
                })
                .collect();
            cells.push(format!("{:.1}", row.packets as f64 / seconds));
            cells.push(human_bytes(bytes_rate));
            (bytes_rate, cells)
        })
        .collect();
    lines.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let header: Vec<String> = columns
        .iter()
        .map(|(c, _)| c.header.to_owned())
        .chain(["PKT/S".to_owned(), "BYTES/S".to_owned()])
        .collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for (_, cells) in &lines {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(lines.iter().map(|(_, c)| c)) {
        let row: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(row.join("  ").trim_end());
        out.push('\n');
    }
    if lines.is_empty() {
        out.push_str("(no traffic since the last reading)\n");
    }
    out
}

fn human_bytes(rate: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = rate;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::schema::FlowLabels;

    fn row(labels: FlowLabels, bytes: u64) -> FlowRow {
        FlowRow {
            labels,
            packets: 10,
            bytes,
            seconds: 2.0,
        }
    }

    #[test]
    fn renders_the_busiest_first_and_filters_by_pod() {
        let rows = [
            row(
                FlowLabels {
                    namespace: "shop".into(),
                    pod: "shop".into(),
                    class: "localhost".into(),
                    direction: "request".into(),
                    protocol: "tcp".into(),
                    port: "8080".into(),
                    client_container: "sidecar".into(),
                    server_container: "app".into(),
                    ..FlowLabels::default()
                },
                2048,
            ),
            row(
                FlowLabels {
                    namespace: "default".into(),
                    pod: "client".into(),
                    class: "service".into(),
                    direction: "egress".into(),
                    protocol: "tcp".into(),
                    port: "80".into(),
                    peer_namespace: "default".into(),
                    peer: "web".into(),
                    ..FlowLabels::default()
                },
                4096,
            ),
        ];
        let table = render(&rows, None);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("POD"));
        assert!(
            lines[1].contains("default/client") && lines[1].contains("default/web"),
            "{table}"
        );
        assert!(
            lines[2].contains("sidecar -> app") && lines[2].contains("1.0 KiB"),
            "{table}"
        );
        let only = render(&rows, Some(("shop", "shop")));
        assert_eq!(only.lines().count(), 2, "{only}");
        // One end in the pod: its place says which.
        let answer = row(
            FlowLabels {
                namespace: "default".into(),
                pod: "web".into(),
                class: "pod".into(),
                server_container: "web".into(),
                ..FlowLabels::default()
            },
            1,
        );
        assert!(render(&[answer], None).contains("- -> web"));
    }

    #[test]
    fn rows_read_back_what_the_observer_serves() {
        let served = row(
            FlowLabels {
                pod: "p".into(),
                ..FlowLabels::default()
            },
            1,
        );
        let json = serde_json::to_string(&[served]).unwrap();
        let read: Vec<FlowRow> = serde_json::from_str(&json).unwrap();
        assert_eq!(read[0].labels.pod, "p");
    }
}
