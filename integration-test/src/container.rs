//! Runs a command as a process of a lab container: in its pod's network
//! namespace and in the container's cgroup, where the observer's policy
//! hooks see it.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

/// A container of the lab: its cgroup, and its pod's network namespace.
pub fn container(lab: &lab::Lab, namespace: &str, pod: &str, name: &str) -> (PathBuf, PathBuf) {
    let pod = lab.pod(namespace, pod).expect("pod");
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == name)
        .expect("container");
    (container.cgroup.clone(), pod.netns.clone().expect("netns"))
}

/// How a TCP connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// Refused by a policy hook (EPERM), at once.
    NotPermitted,
    Other(String),
}

/// Connects to `host:port` from the container with this cgroup, in the pod
/// namespace at `netns`, with a 5 s timeout.
pub fn connect_from(cgroup: &Path, netns: &Path, host: &str, port: u16) -> Connect {
    let script = format!(
        "import socket, errno\n\
         try:\n    socket.create_connection(('{host}', {port}), timeout=5).close(); print('connected')\n\
         except PermissionError:\n    print('eperm')\n\
         except OSError as e:\n    print('error', e)\n"
    );
    let output = in_container(cgroup, netns, Command::new("python3").args(["-c", &script]))
        .output()
        .expect("python3");
    let out = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match out.as_str() {
        "connected" => Connect::Connected,
        "eperm" => Connect::NotPermitted,
        _ => Connect::Other(format!("{out} {}", String::from_utf8_lossy(&output.stderr))),
    }
}

/// Makes `command` start in the container's cgroup and pod namespace.
pub fn in_container<'a>(cgroup: &Path, netns: &Path, command: &'a mut Command) -> &'a mut Command {
    // Opened before the fork: between fork and exec only raw syscalls run
    // (the test harness has other threads; no allocation is safe there).
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("the container's cgroup");
    let netns = File::open(netns).expect("the pod's namespace");
    // SAFETY: write and setns on fds this closure owns; "0" moves the
    // writing process, the child, into the cgroup.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A TCP connection held open by a process of a container, to show that a
/// policy change leaves it alone.
pub struct HeldConnection {
    child: std::process::Child,
}

impl HeldConnection {
    /// Connects now (panics if that fails).
    pub fn open(cgroup: &Path, netns: &Path, host: &str, port: u16) -> Self {
        use std::io::{BufRead, BufReader};
        let script = format!(
            "import socket, sys\n\
             s = socket.create_connection(('{host}', {port}), timeout=5)\n\
             print('open', flush=True)\n\
             sys.stdin.readline()\n\
             s.sendall(b'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n\
             print(s.recv(64).split(b'\\r\\n')[0].decode(), flush=True)\n"
        );
        let mut child = in_container(cgroup, netns, Command::new("python3").args(["-c", &script]))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "open", "the connection did not open");
        Self { child }
    }

    /// Sends an HTTP request over it; returns the status line.
    pub fn request(mut self) -> String {
        use std::io::Write;
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let output = self.child.wait_with_output().expect("python3");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// A TCP server in a container: accepts on `port` and closes each
/// connection, for `seconds` at most.
pub fn tcp_listener(cgroup: &Path, netns: &Path, port: u16, seconds: u32) -> std::process::Child {
    let script = format!(
        "import socket, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.listen(128)\n\
         s.settimeout(0.5)\n\
         print('listening', flush=True)\n\
         end = time.time() + {seconds}\n\
         while time.time() < end:\n\
         \x20   try:\n\
         \x20       s.accept()[0].close()\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n"
    );
    let (child, said) = python_until_ready(cgroup, netns, &script);
    assert_eq!(said, "listening");
    child
}

/// How the connection attempts to one target went, from [`Prober`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attempts {
    pub connected: u64,
    /// Refused by a policy hook (EPERM).
    pub not_permitted: u64,
    /// No answer within the prober's timeout (dropped).
    pub timed_out: u64,
    pub other: u64,
    /// When the first (up to 20) timed-out attempts began, in ms from the
    /// start.
    pub timed_out_at_ms: Vec<u64>,
}

impl Attempts {
    pub fn total(&self) -> u64 {
        self.connected + self.not_permitted + self.timed_out + self.other
    }
}

/// Connection attempts from a container, one target per thread, each a new
/// connection every `every_ms`, for `seconds`: what a client sees while
/// something changes underneath (an observer restarts).
pub struct Prober {
    child: std::process::Child,
    targets: usize,
}

impl Prober {
    /// Starts probing `targets`: (host, port, timeout of an attempt in ms).
    /// A timeout shorter than TCP's first SYN retransmission (1 s) tells a
    /// dropped SYN; one long enough for a loaded machine's scheduler
    /// (hundreds of ms) tells nothing else.
    pub fn start(
        cgroup: &Path,
        netns: &Path,
        targets: &[(&str, u16, u32)],
        every_ms: u32,
        seconds: u32,
    ) -> Self {
        let list: Vec<String> = targets
            .iter()
            .map(|(h, p, t)| format!("('{h}', {p}, {t})"))
            .collect();
        let script = format!(
            "import socket, threading, time, errno\n\
             targets = [{list}]\n\
             counts = [[0, 0, 0, 0] for _ in targets]\n\
             timed_out_at = [[] for _ in targets]\n\
             start = time.time()\n\
             end = start + {seconds}\n\
             def probe(i, target):\n\
             \x20   while time.time() < end:\n\
             \x20       s = socket.socket()\n\
             \x20       s.settimeout(target[2] / 1000)\n\
             \x20       began = time.time()\n\
             \x20       try:\n\
             \x20           s.connect(target[:2]); counts[i][0] += 1\n\
             \x20       except PermissionError:\n\
             \x20           counts[i][1] += 1\n\
             \x20       except socket.timeout:\n\
             \x20           counts[i][2] += 1\n\
             \x20           timed_out_at[i].append(int((began - start) * 1000))\n\
             \x20       except OSError:\n\
             \x20           counts[i][3] += 1\n\
             \x20       s.close()\n\
             \x20       time.sleep({every_ms} / 1000)\n\
             threads = [threading.Thread(target=probe, args=(i, t)) for i, t in enumerate(targets)]\n\
             [t.start() for t in threads]\n\
             print('probing', flush=True)\n\
             [t.join() for t in threads]\n\
             for c, at in zip(counts, timed_out_at):\n\
             \x20   print(*c, *at[:20], flush=True)\n",
            list = list.join(", ")
        );
        let (child, said) = python_until_ready(cgroup, netns, &script);
        assert_eq!(said, "probing");
        Self {
            child,
            targets: targets.len(),
        }
    }

    /// Waits for the end; the attempts per target, in order.
    pub fn finish(self) -> Vec<Attempts> {
        let output = self.child.wait_with_output().expect("python3");
        let out = String::from_utf8_lossy(&output.stdout);
        let attempts: Vec<Attempts> = out
            .lines()
            .map(|line| {
                let n: Vec<u64> = line
                    .split_whitespace()
                    .map(|n| n.parse().unwrap())
                    .collect();
                Attempts {
                    connected: n[0],
                    not_permitted: n[1],
                    timed_out: n[2],
                    other: n[3],
                    timed_out_at_ms: n[4..].to_vec(),
                }
            })
            .collect();
        assert_eq!(attempts.len(), self.targets, "the prober's output: {out}");
        attempts
    }
}

/// A UDP echo server in a container: answers `count` datagrams on `port`
/// (or gives up after 10 s).
pub fn udp_echo(cgroup: &Path, netns: &Path, port: u16, count: u32) -> std::process::Child {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.settimeout(10)\n\
         print('bound', flush=True)\n\
         for _ in range({count}):\n    data, peer = s.recvfrom(64)\n    s.sendto(data, peer)\n"
    );
    let (child, said) = python_until_ready(cgroup, netns, &script);
    assert_eq!(said, "bound");
    child
}

/// How many connections the listeners of network namespace `netns` could
/// not take, their accept queue full (`ListenOverflows`: the kernel drops
/// the SYN, or the handshake's last ACK). A slow server's own loss, which
/// a client sees as a SYN retransmitted a second later.
pub fn listen_overflows(netns: &Path) -> u64 {
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["cat", "/proc/net/netstat"])
        .output()
        .expect("nsenter");
    let text = String::from_utf8_lossy(&output.stdout);
    // Pairs of lines: "TcpExt: <names>", then "TcpExt: <values>".
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt in /proc/net/netstat of {}", netns.display());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .expect("ListenOverflows")
}

/// A Python script run as a process of a container, held until dropped
/// (or until it has read a line): for sockets a test needs to exist while
/// it looks at them. Killed and reaped on drop.
pub struct Held {
    child: std::process::Child,
    /// What the script printed first (its readiness, or what it made).
    pub said: String,
}

impl Held {
    /// Runs `script` and waits for its first line of output.
    pub fn start(cgroup: &Path, netns: &Path, script: &str) -> Self {
        let (child, said) = python_until_ready(cgroup, netns, script);
        Self { child, said }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python script as a process of a container (its stdin a pipe
/// the script may wait on) and waits for its first line of output.
fn python_until_ready(cgroup: &Path, netns: &Path, script: &str) -> (std::process::Child, String) {
    let mut child = in_container(cgroup, netns, Command::new("python3").args(["-c", script]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut said,
    )
    .expect("the script's first line");
    (child, said.trim().to_owned())
}
