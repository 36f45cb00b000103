//! Command-line interface.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use observer_common::DEFAULT_FLOW_CAPACITY;

#[derive(Parser)]
#[command(
    version,
    about = "Observe the traffic inside Kubernetes pods with eBPF"
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, env = "OBSERVER_LOG", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Attach to pod network namespaces and serve Prometheus metrics.
    Run(RunArgs),
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// A pod network namespace: a bind mount such as /var/run/netns/NAME, or
    /// /proc/PID/ns/net. Repeat for several. Without any, every namespace in
    /// --netns-dir.
    #[arg(
        long = "netns",
        value_name = "PATH",
        env = "OBSERVER_NETNS",
        value_delimiter = ','
    )]
    pub netns: Vec<PathBuf>,
    /// Where named network namespaces live (used when no --netns is given).
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_NETNS_DIR",
        default_value = "/var/run/netns"
    )]
    pub netns_dir: PathBuf,
    /// Address of the metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "OBSERVER_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    pub metrics_addr: SocketAddr,
    /// Flows the kernel flow map holds; the least recently used are evicted
    /// beyond it. Each flow costs about 200 bytes of kernel memory.
    #[arg(long, env = "OBSERVER_FLOW_CAPACITY", default_value_t = DEFAULT_FLOW_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_capacity: u32,
    /// Where the observer keeps its runtime state (a private bpffs for its
    /// maps, removed at exit).
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_RUNTIME_DIR",
        default_value = "/run/observer"
    )]
    pub runtime_dir: PathBuf,
    /// How often the flow map is read into the metrics (besides every scrape).
    #[arg(long, env = "OBSERVER_COLLECT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub collect_interval: Duration,
}

/// Parses `500ms`, `10s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit: use ms, s or m"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return Err(format!("`{text}`: unknown unit `{unit}`, use ms, s or m")),
    };
    if duration.is_zero() {
        return Err("the interval must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
