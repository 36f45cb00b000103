//! A real Prometheus server (Debian's package) on loopback, scraping the
//! observer, queried through its HTTP API.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::observer::http_get;

pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    pub fn scraping(target: SocketAddr) -> Self {
        Self::scraping_with(target, "")
    }

    /// Starts Prometheus scraping an observer with `--secure-serving`
    /// every second: HTTPS (its certificate is self-signed, as a kubelet's
    /// is), with a service account's bearer token.
    pub fn scraping_securely(target: SocketAddr, token: &str) -> Self {
        Self::scraping_with(
            target,
            &format!(
                "    scheme: https\n    tls_config: {{insecure_skip_verify: true}}\n    \
                 authorization: {{credentials: '{token}'}}\n"
            ),
        )
    }

    /// `job`: more lines of the scrape job (indented 4).
    fn scraping_with(target: SocketAddr, job: &str) -> Self {
        let addr = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("addr")
        };
        let dir = std::env::temp_dir().join(format!("observer-prometheus-{}", addr.port()));
        fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        fs::File::create(&config)
            .and_then(|mut f| {
                write!(
                    f,
                    "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                     scrape_configs:\n  - job_name: observer\n    \
                     static_configs: [{{targets: ['{target}']}}]\n{job}"
                )
            })
            .expect("prometheus.yml");
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("log")).expect("log"));
        // SAFETY: prctl is async-signal-safe; Prometheus dies with the test.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("prometheus (cargo xtask test installs Debian's package)");
        let prometheus = Self { child, addr, dir };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.addr, "/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the samples' values.
    pub fn query(&self, promql: &str) -> Vec<f64> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (code, body) = http_get(self.addr, &path).expect("Prometheus answers");
        assert_eq!(code, 200, "{promql}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        json["data"]["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|sample| {
                sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("a number")
            })
            .collect()
    }

    /// Waits (at most `timeout`) until `promql` has a sample above zero.
    pub fn wait_positive(&self, promql: &str, timeout: Duration) {
        self.wait_positive_or(promql, timeout, "");
    }

    /// [`Prometheus::wait_positive`], saying `what` is awaited if it fails,
    /// with the series of the same family that do exist.
    pub fn wait_positive_or(&self, promql: &str, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let values = self.query(promql);
            if values.iter().any(|v| *v > 0.0) {
                return;
            }
            if Instant::now() >= deadline {
                let family = promql.split('{').next().unwrap_or(promql);
                panic!(
                    "{what}: no sample above 0 for {promql} within {timeout:?} (got {values:?}); the series there are:\n{}",
                    self.series(family)
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// The label sets of a family's series, one per line.
    pub fn series(&self, family: &str) -> String {
        let path = format!("/api/v1/series?match[]={}", percent_encode(family));
        http_get(self.addr, &path).map_or_else(String::new, |(_, body)| {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            json["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
