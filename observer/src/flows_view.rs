//! `observer flows`: the live traffic of the node (or of one pod) as a
//! table that refreshes, read from a running observer's `/flows`.

use std::{
    collections::HashMap,
    io::{IsTerminal, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::collector::FlowRow;

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("no observer answers on {addr} (is `observer run` running there?): {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr}/flows: {problem}")]
    Response { addr: SocketAddr, problem: String },
    #[error("--pod must be NAMESPACE/NAME, not `{0}`")]
    PodFormat(String),
}

pub fn run(
    addr: SocketAddr,
    pod: Option<&str>,
    every: Duration,
    once: bool,
) -> Result<(), FlowsError> {
    let pod = pod
        .map(|p| {
            p.split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .ok_or_else(|| FlowsError::PodFormat(p.into()))
        })
        .transpose()?;
    let clear = !once && std::io::stdout().is_terminal();
    if once {
        // Two readings: the first starts the window the rates are taken over.
        fetch(addr)?;
        std::thread::sleep(every);
    }
    loop {
        let rows = fetch(addr)?;
        let table = render(&rows, pod);
        let mut out = std::io::stdout().lock();
        if clear {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = write!(out, "{table}");
        let _ = out.flush();
        if once {
            return Ok(());
        }
        std::thread::sleep(every);
    }
}

fn fetch(addr: SocketAddr) -> Result<Vec<FlowRow>, FlowsError> {
    let connect = |source| FlowsError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(connect)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(connect)?;
    write!(stream, "GET /flows HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(connect)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(connect)?;
    let bad = |problem: &str| FlowsError::Response {
        addr,
        problem: problem.into(),
    };
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("not HTTP"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("no status")));
    }
    serde_json::from_str(body).map_err(|e| bad(&e.to_string()))
}

/// The table, busiest first.
pub fn render(rows: &[FlowRow], pod: Option<(&str, &str)>) -> String {
    let mut lines: Vec<(f64, [String; 8])> = rows
        .iter()
        .filter_map(|row| {
            let l: HashMap<&str, &str> = row
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let get = |k: &str| l.get(k).copied().unwrap_or("");
            if pod.is_some_and(|(ns, name)| get("namespace") != ns || get("pod") != name) {
                return None;
            }
            let seconds = row.seconds.max(0.001);
            let peer = match get("class") {
                "localhost" => {
                    format!("{} -> {}", get("client_container"), get("server_container"))
                }
                _ if get("peer_namespace").is_empty() => get("peer").to_owned(),
                _ => format!("{}/{}", get("peer_namespace"), get("peer")),
            };
            let bytes_rate = row.bytes as f64 / seconds;
            Some((
                bytes_rate,
                [
                    format!("{}/{}", get("namespace"), get("pod")),
                    get("class").to_owned(),
                    get("direction").to_owned(),
                    get("protocol").to_owned(),
                    get("port").to_owned(),
                    peer,
                    format!("{:.1}", row.packets as f64 / seconds),
                    human_bytes(bytes_rate),
                ],
            ))
        })
        .collect();
    lines.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let header = [
        "POD",
        "CLASS",
        "DIRECTION",
        "PROTO",
        "PORT",
        "PEER (client -> server)",
        "PKT/S",
        "BYTES/S",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for (_, cells) in &lines {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(lines.iter().map(|(_, c)| c)) {
        let row: Vec<String> = cells
            .iter()
            .zip(widths)
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
    use crate::flow_metrics::FLOW_LABELS;

    fn row(values: [&str; 10], bytes: u64) -> FlowRow {
        FlowRow {
            labels: FLOW_LABELS
                .iter()
                .zip(values)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            packets: 10,
            bytes,
            seconds: 2.0,
        }
    }

    #[test]
    fn renders_the_busiest_first_and_filters_by_pod() {
        let rows = [
            row(
                [
                    "shop",
                    "shop",
                    "localhost",
                    "request",
                    "tcp",
                    "8080",
                    "",
                    "",
                    "sidecar",
                    "app",
                ],
                2048,
            ),
            row(
                [
                    "default", "client", "service", "egress", "tcp", "80", "default", "web", "", "",
                ],
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
    }
}
