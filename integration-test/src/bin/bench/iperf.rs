//! iperf3 servers and runs in namespaces.

use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use lab::Netns;

pub struct Case {
    pub name: &'static str,
    pub server: &'static str,
    pub port: u16,
    pub udp: bool,
}

/// The traffic mix: TCP and 64-byte UDP, on `lo` and over a veth pair.
pub const CASES: [Case; 4] = [
    Case {
        name: "lo, TCP",
        server: "127.0.0.1",
        port: 5201,
        udp: false,
    },
    Case {
        name: "lo, UDP 64 B",
        server: "127.0.0.1",
        port: 5201,
        udp: true,
    },
    Case {
        name: "veth, TCP",
        server: "10.77.0.2",
        port: 5202,
        udp: false,
    },
    Case {
        name: "veth, UDP 64 B",
        server: "10.77.0.2",
        port: 5202,
        udp: true,
    },
];

/// An iperf3 server in a namespace, killed on drop.
pub struct Server(Child);

impl Server {
    pub fn start(netns: &Netns, address: &str, port: u16) -> Self {
        let mut command = Command::new("ip");
        // The server on the last CPU, the client (`run`) on the first: each
        // round the same placement.
        command
            .args([
                "netns",
                "exec",
                netns.name(),
                "taskset",
                "-c",
                &last_cpu().to_string(),
            ])
            .args(["iperf3", "-s", "-B", address])
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the server dies with the bench.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let server = Self(
            command
                .spawn()
                .expect("iperf3 (cargo xtask bench installs it)"),
        );
        thread::sleep(Duration::from_millis(300));
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run of `seconds` from `client`: Gbit/s received (TCP), or
/// thousands of datagrams received per second (UDP, 64-byte payloads,
/// unthrottled).
pub fn run(client: &Netns, case: &Case, seconds: u32) -> f64 {
    let mut args = vec![
        "netns",
        "exec",
        client.name(),
        "taskset",
        "-c",
        "0",
        "iperf3",
        "-J",
        "-c",
        case.server,
    ];
    let port = case.port.to_string();
    let seconds = seconds.to_string();
    args.extend(["-p", &port, "-t", &seconds]);
    if case.udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = Command::new("ip").args(&args).output().expect("iperf3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 {}: {e}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let end = &json["end"];
    if case.udp {
        let sum = &end["sum"];
        let received =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        received / sum["seconds"].as_f64().unwrap_or(1.0) / 1e3
    } else {
        end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    }
}

/// The highest-numbered CPU this process may run on.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}
