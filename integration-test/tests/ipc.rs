//! In-pod IPC without the network, on the node lab, scraped by a real
//! Prometheus: a unix stream socket between two containers (nginx and
//! php-fpm style, the client reaching the socket by another path than the
//! server bound), datagrams to an abstract unix name (a StatsD agent's,
//! the client connected as DogStatsD clients are, and a logger that sends
//! each datagram with the address), and a named pipe. Each
//! exchange is made a known number of times, after the observer is
//! attached, and counted exactly: messages, bytes, connections,
//! containers and path. And unix-socket rules: a client container a rule
//! does not let in gets EPERM from `connect()` and `sendto()` at once,
//! whatever path it takes to the socket, and every decision is counted.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_test::{
    Observer, Prometheus, TempDir,
    container::{container, in_container},
};
use lab::{Lab, Netns, Plan};
use observer_common::ipc::{Addressed, UNIX_ADDRESSED_MAP};

const WAIT: Duration = Duration::from_secs(40);

/// Requests over the stream socket, of `REQUEST` bytes, each answered with
/// `REPLY` bytes on a connection of its own.
const REQUESTS: u64 = 10;
const REQUEST: u64 = 100;
const REPLY: u64 = 50;
/// Datagrams to the agent, of `DATAGRAM` bytes each.
const DATAGRAMS: u64 = 7;
const DATAGRAM: u64 = 12;
/// Writes to the pipe, of `WRITE` bytes each.
const WRITES: u64 = 5;
const WRITE: u64 = 20;
/// Seqpacket messages each way, of `PACKET` bytes, on one connection.
const PACKETS: u64 = 3;
const PACKET: u64 = 30;

/// The pods of the counting lab (see [`lab_yaml`]).
const LAB: &str = r#"
  - name: fpm
    namespace: default
    node: node-1
    volumes: [run]
    containers:
      - name: php-fpm
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            print(run, flush=True)
            while not os.path.exists(run + "/go"):
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(run + "/php-fpm.sock")
            s.listen(16)
            open(run + "/listening", "w").close()
            for i in range(REQUESTS):
                c, _ = s.accept()
                got = b""
                while len(got) < REQUEST:
                    got += c.recv(4096)
                c.sendall(b"r" * REPLY)
                c.close()
            time.sleep(3600)
      - name: nginx
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not os.path.exists(run + "/listening"):
                time.sleep(0.05)
            # Another path to the same socket: the server's is the label.
            os.chdir(run)
            for i in range(REQUESTS):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect("./php-fpm.sock")
                c.sendall(b"q" * REQUEST)
                got = b""
                while len(got) < REPLY:
                    got += c.recv(4096)
                c.close()
            print("done", flush=True)
            time.sleep(3600)
      - name: agent
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind("\0statsd")
            open(run + "/agent", "w").close()
            for i in range(DATAGRAMS):
                s.recv(4096)
            time.sleep(3600)
      - name: app
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not (os.path.exists(run + "/go") and os.path.exists(run + "/agent")):
                time.sleep(0.05)
            # Connected, as DogStatsD clients are.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.connect("\0statsd")
            for i in range(DATAGRAMS):
                s.send(b"d" * DATAGRAM)
            time.sleep(3600)
      - name: sink
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind("\0sink")
            open(run + "/sink", "w").close()
            for i in range(DATAGRAMS):
                s.recv(4096)
            time.sleep(3600)
      - name: logger
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not (os.path.exists(run + "/go") and os.path.exists(run + "/sink")):
                time.sleep(0.05)
            # Not connected: each datagram names where it goes.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            for i in range(DATAGRAMS):
                s.sendto(b"l" * DATAGRAM, "\0sink")
            time.sleep(3600)
      - name: seq-server
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind("\0seq")
            s.listen(1)
            open(run + "/seq", "w").close()
            c, _ = s.accept()
            for i in range(SEQ_COUNT):
                c.recv(4096)
                c.send(b"s" * SEQ_SIZE)
            time.sleep(3600)
      - name: seq-client
        command:
          - python3
          - -c
          - |
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not (os.path.exists(run + "/go") and os.path.exists(run + "/seq")):
                time.sleep(0.05)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            c.connect("\0seq")
            for i in range(SEQ_COUNT):
                c.send(b"c" * SEQ_SIZE)
                c.recv(4096)
            time.sleep(3600)
      - name: solo
        command:
          - python3
          - -c
          - |
            # Two processes of one container: counted under it at both ends.
            import os, socket, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not os.path.exists(run + "/go"):
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("\0solo")
            s.listen(1)
            if os.fork() == 0:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect("\0solo")
                c.sendall(b"x" * REQUEST)
                c.recv(4096)
                os._exit(0)
            c, _ = s.accept()
            got = b""
            while len(got) < REQUEST:
                got += c.recv(4096)
            c.sendall(b"y" * REPLY)
            os.wait()
            time.sleep(3600)
      - name: writer
        command:
          - python3
          - -c
          - |
            import os, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not os.path.exists(run + "/go"):
                time.sleep(0.05)
            os.mkfifo(run + "/pipe")
            fd = os.open(run + "/pipe", os.O_WRONLY)
            for i in range(WRITES):
                os.write(fd, b"w" * WRITE)
            os.close(fd)
            time.sleep(3600)
      - name: reader
        command:
          - python3
          - -c
          - |
            import os, time
            run = os.environ["POD_VOLUMES"] + "/run"
            while not os.path.exists(run + "/pipe"):
                time.sleep(0.05)
            fd = os.open(run + "/pipe", os.O_RDONLY)
            while os.read(fd, 4096):
                pass
            time.sleep(3600)
"#;

fn plan() -> Plan {
    let text = lab_yaml("ipc", LAB)
        .replace("REQUESTS", &REQUESTS.to_string())
        .replace("REQUEST", &REQUEST.to_string())
        .replace("REPLY", &REPLY.to_string())
        .replace("DATAGRAMS", &DATAGRAMS.to_string())
        .replace("DATAGRAM", &DATAGRAM.to_string())
        .replace("WRITES", &WRITES.to_string())
        .replace("WRITE", &WRITE.to_string())
        .replace("SEQ_COUNT", &PACKETS.to_string())
        .replace("SEQ_SIZE", &PACKET.to_string());
    Plan::from_yaml(&text, "ipc").expect("a valid lab")
}

/// A lab of one node named `name`, with these pods (YAML list items).
fn lab_yaml(name: &str, pods: &str) -> String {
    format!(
        "apiVersion: observer-lab/v1
kind: Lab
name: {name}
network:
  serviceCIDR: 10.96.0.0/16
  nodeCIDR: 172.18.0.0/24
  externalCIDR: 192.168.200.0/24
  clusterDNS: 10.96.0.53
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
pods:{pods}"
    )
}

/// Waits until `promql` has exactly one sample, equal to `expected`.
fn wait_value(observer: &Observer, prometheus: &Prometheus, promql: &str, expected: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let values = prometheus.query(promql);
        if values == [expected as f64] {
            return;
        }
        if Instant::now() >= deadline {
            // What the observer lost or failed at, if anything.
            let troubles = ["observer_ipc_lost_total", "observer_errors_total"]
                .map(|name| format!("{name}: {:?}", prometheus.query(name)))
                .join("\n");
            // Attaches, detaches and warnings: a pod followed twice, or not
            // at all for a while, shows here.
            let log = observer.log();
            let events: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("attach") || l.contains("WARN") || l.contains("ERROR"))
                .collect();
            panic!(
                "{promql}: expected {expected}, got {values:?}; the series there are:\n{}\nlost and errors:\n{troubles}\nthe observer's attaches and warnings:\n{}",
                prometheus.series(promql.split('{').next().unwrap_or(promql)),
                events.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn unix_sockets_and_named_pipes_between_containers_are_counted_exactly() {
    let lab = Lab::up_for_test(&plan()).expect("lab up");
    let inventory = lab.inventory_path().display().to_string();
    let observer = Observer::start(&[
        "--inventory",
        &inventory,
        "--collect-interval",
        "1s",
        "--named-pipes",
    ]);
    observer.eventually("the pod attached and IPC followed", |m| {
        m.sum("observer_programs_attached", &[("pod", "fpm")]) > 0.0
            && m.sum("observer_ipc_hooks_attached", &[]) == 3.0
    });
    let deadline = Instant::now() + WAIT;
    let run = loop {
        let log = lab.log("default", "fpm", "php-fpm");
        if let Some(line) = log.lines().next() {
            break PathBuf::from(line.trim());
        }
        assert!(Instant::now() < deadline, "php-fpm never started");
        thread::sleep(Duration::from_millis(100));
    };
    fs::write(run.join("go"), "").expect("start the exchanges");
    let prometheus = Prometheus::scraping(observer.addr());

    // The exchanges themselves first: a count that falls short is then the
    // observer's.
    let deadline = Instant::now() + WAIT;
    while !lab.log("default", "fpm", "nginx").contains("done") {
        assert!(
            Instant::now() < deadline,
            "nginx did not finish its requests:\n{}\nphp-fpm:\n{}",
            lab.log("default", "fpm", "nginx"),
            lab.log("default", "fpm", "php-fpm")
        );
        thread::sleep(Duration::from_millis(100));
    }
    let socket = run.join("php-fpm.sock").display().to_string();
    let stream = |family: &str, direction: &str| {
        format!(
            r#"{family}{{namespace="default",pod="fpm",class="unix",protocol="stream",direction="{direction}",path="{socket}",client_container="nginx",server_container="php-fpm"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &stream("observer_connections_opened_total", "request"),
        REQUESTS,
    );
    wait_value(
        &observer,
        &prometheus,
        &stream("observer_flow_packets_total", "request"),
        REQUESTS,
    );
    wait_value(
        &observer,
        &prometheus,
        &stream("observer_flow_bytes_total", "request"),
        REQUESTS * REQUEST,
    );
    wait_value(
        &observer,
        &prometheus,
        &stream("observer_flow_packets_total", "response"),
        REQUESTS,
    );
    wait_value(
        &observer,
        &prometheus,
        &stream("observer_flow_bytes_total", "response"),
        REQUESTS * REPLY,
    );

    let dgram = |family: &str| {
        format!(
            r#"{family}{{pod="fpm",class="unix",protocol="dgram",direction="request",path="@statsd",client_container="app",server_container="agent"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &dgram("observer_flow_packets_total"),
        DATAGRAMS,
    );
    wait_value(
        &observer,
        &prometheus,
        &dgram("observer_flow_bytes_total"),
        DATAGRAMS * DATAGRAM,
    );
    let addressed = |family: &str| {
        format!(
            r#"{family}{{pod="fpm",class="unix",protocol="dgram",direction="request",path="@sink",client_container="logger",server_container="sink"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &addressed("observer_flow_packets_total"),
        DATAGRAMS,
    );
    wait_value(
        &observer,
        &prometheus,
        &addressed("observer_flow_bytes_total"),
        DATAGRAMS * DATAGRAM,
    );

    let fifo = |family: &str| {
        format!(
            r#"{family}{{pod="fpm",class="fifo",direction="request",path="pipe",client_container="writer",server_container="reader"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &fifo("observer_flow_packets_total"),
        WRITES,
    );
    wait_value(
        &observer,
        &prometheus,
        &fifo("observer_flow_bytes_total"),
        WRITES * WRITE,
    );

    let seqpacket = |family: &str, direction: &str| {
        format!(
            r#"{family}{{pod="fpm",class="unix",protocol="seqpacket",direction="{direction}",path="@seq",client_container="seq-client",server_container="seq-server"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &seqpacket("observer_connections_opened_total", "request"),
        1,
    );
    for direction in ["request", "response"] {
        wait_value(
            &observer,
            &prometheus,
            &seqpacket("observer_flow_packets_total", direction),
            PACKETS,
        );
        wait_value(
            &observer,
            &prometheus,
            &seqpacket("observer_flow_bytes_total", direction),
            PACKETS * PACKET,
        );
    }
    let solo = |family: &str, direction: &str| {
        format!(
            r#"{family}{{pod="fpm",class="unix",protocol="stream",direction="{direction}",path="@solo",client_container="solo",server_container="solo"}}"#
        )
    };
    wait_value(
        &observer,
        &prometheus,
        &solo("observer_flow_bytes_total", "request"),
        REQUEST,
    );
    wait_value(
        &observer,
        &prometheus,
        &solo("observer_flow_bytes_total", "response"),
        REPLY,
    );

    // Nothing else of the pod's IPC: no series with an unknown end, and
    // nothing lost.
    let others = prometheus
        .query(r#"count(observer_flow_packets_total{pod="fpm",class=~"unix|fifo"}) or vector(0)"#);
    assert_eq!(
        others,
        [9.0],
        "{}",
        prometheus.series("observer_flow_packets_total")
    );
    assert_eq!(observer.scrape().sum("observer_ipc_lost_total", &[]), 0.0);
}

/// The pods of the unix-socket policy lab (see [`lab_yaml`]).
const GUARDED: &str = r#"
  - name: guarded
    namespace: default
    node: node-1
    labels: {app: guarded}
    volumes: [run]
    containers:
      - name: fpm
        command:
          - python3
          - -c
          - |
            import os, socket
            run = os.environ["POD_VOLUMES"] + "/run"
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(run + "/php.sock")
            s.listen(16)
            print(run, flush=True)
            s.settimeout(600)
            for i in range(100):
                c, _ = s.accept()
                c.recv(4096)
                c.close()
      - name: agent
        command:
          - python3
          - -c
          - |
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.bind("\0metrics")
            s.settimeout(600)
            for i in range(100):
                s.recv(4096)
      - name: web
        command: [sleep, "600"]
      - name: intruder
        command: [sleep, "600"]
"#;

const UNIX_POLICY: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: sockets}
spec:
  podSelector: {matchLabels: {app: guarded}}
  mode: enforce
  rules:
    - {name: fpm, class: unix, clientContainers: [web], paths: [SOCKET], action: allow}
    - {name: metrics, class: unix, clientContainers: [web], paths: ['@metrics'], action: allow}
    - {name: rest, class: unix, action: deny}
";

/// Runs, in a container, each unix-socket attempt of `attempts` (python
/// expressions on a fresh socket `s`): "ok", or the error's name.
fn attempts(cgroup: &Path, netns: &Path, attempts: &[String]) -> Vec<String> {
    let mut script = String::from("import errno, os, socket\n");
    for attempt in attempts {
        script.push_str(&format!(
            "try:\n    {attempt}\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        ));
    }
    // Without `site` (-S): finding the user's site directory looks the user
    // up when HOME is unset, and glibc asks nscd (and systemd's userdb, where
    // it runs) over unix sockets first: connects a catch-all rule decides.
    let mut python = Command::new("python3");
    python.args(["-I", "-S", "-c", &script]);
    let output = in_container(cgroup, netns, &mut python)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The lab of [`GUARDED`], named `name`, once php-fpm listens; and the
/// directory of its socket.
fn guarded_lab(name: &str) -> (Lab, PathBuf) {
    let plan = Plan::from_yaml(&lab_yaml(name, GUARDED), name).expect("a valid lab");
    let lab = Lab::up_for_test(&plan).expect("lab up");
    let deadline = Instant::now() + WAIT;
    let run = loop {
        let log = lab.log("default", "guarded", "fpm");
        if let Some(line) = log.lines().next() {
            break PathBuf::from(line.trim());
        }
        assert!(Instant::now() < deadline, "fpm never listened");
        thread::sleep(Duration::from_millis(100));
    };
    (lab, run)
}

/// An attempt (see [`attempts`]): connect to the stream socket at `path`
/// and send on it.
fn stream(path: &str) -> String {
    format!(
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect({path:?}); s.send(b'q')"
    )
}

/// An attempt: a datagram sent with the address `name`.
fn datagram(name: &str) -> String {
    format!("s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'm', {name:?})")
}

#[test]
fn unix_socket_rules_deny_with_eperm_at_once_and_count_every_decision() {
    let (lab, run) = guarded_lab("ipc-policy");
    let socket = run.join("php.sock").display().to_string();
    let dir = TempDir::new("unix-policy");
    let (_policy, observer) =
        Observer::with_policy(&lab, &dir, &UNIX_POLICY.replace("SOCKET", &socket));
    let prometheus = Prometheus::scraping(observer.addr());
    let tries = [
        stream(&socket),
        stream(&socket),
        stream(&socket),
        datagram("\0metrics"),
    ];
    let verdicts = |rule: &str, verdict: &str| {
        format!(
            r#"observer_policy_verdicts_total{{namespace="default",pod="guarded",policy="sockets",rule="{rule}",class="unix",direction="egress",verdict="{verdict}"}}"#
        )
    };
    let rest_denied = || {
        let labels = [("pod", "guarded"), ("rule", "rest"), ("verdict", "deny")];
        observer
            .scrape_fresh()
            .sum("observer_policy_verdicts_total", &labels)
    };
    let (web, netns) = container(&lab, "default", "guarded", "web");
    assert_eq!(attempts(&web, &netns, &tries), ["ok", "ok", "ok", "ok"]);
    let (intruder, _) = container(&lab, "default", "guarded", "intruder");
    // What the interpreter connects to by itself, whatever this machine's
    // libc asks, is the same in every run: an empty run measures it, so
    // that the five attempts below are counted exactly.
    let before = rest_denied();
    assert!(attempts(&intruder, &netns, &[]).is_empty());
    let own = rest_denied() - before;
    // Another path to the same socket is a path no rule lets in either.
    let mut denied = tries.to_vec();
    denied.push(format!(
        "os.chdir({:?}); {}",
        run.display().to_string(),
        stream("./php.sock")
    ));
    assert_eq!(
        attempts(&intruder, &netns, &denied),
        ["EPERM", "EPERM", "EPERM", "EPERM", "EPERM"]
    );

    wait_value(&observer, &prometheus, &verdicts("fpm", "allow"), 3);
    wait_value(&observer, &prometheus, &verdicts("metrics", "allow"), 1);
    let denied = before + 2.0 * own + 5.0;
    wait_value(
        &observer,
        &prometheus,
        &verdicts("rest", "deny"),
        denied as u64,
    );
    // What got through is observed like any unix traffic.
    wait_value(
        &observer,
        &prometheus,
        &format!(
            r#"observer_connections_opened_total{{pod="guarded",class="unix",path="{socket}",client_container="web",server_container="fpm"}}"#
        ),
        3,
    );
    let m = observer.scrape();
    assert_eq!(
        m.sum("observer_policy_unenforced_pods", &[("pod", "guarded")]),
        0.0
    );
    let explained = observer_explain(&lab, &dir, &socket);
    assert!(
        explained.contains(&format!(
            "unix socket {socket} from intruder: denied by sockets/rest"
        )),
        "{explained}"
    );
}

/// Unix sockets not followed (`--unix-sockets false`, which leaves out
/// the tracepoints that run at every socket message of the node): the
/// unix-socket rules decide all the same (the cgroup hooks are loaded
/// apart from the tracepoints), no unix traffic is counted, and the
/// `sendto()` hook keeps no datagram's address for a count that nothing
/// would then make (it stayed in its map until evicted).
#[test]
fn unix_socket_rules_hold_with_unix_sockets_unfollowed() {
    let (lab, run) = guarded_lab("ipc-unfollowed");
    let socket = run.join("php.sock").display().to_string();
    let dir = TempDir::new("unix-unfollowed");
    let (_policy, observer) = Observer::with_policy_and(
        &lab,
        &dir,
        &UNIX_POLICY.replace("SOCKET", &socket),
        &["--unix-sockets", "false"],
    );
    let tries = [stream(&socket), datagram("\0metrics")];
    let (web, netns) = container(&lab, "default", "guarded", "web");
    assert_eq!(attempts(&web, &netns, &tries), ["ok", "ok"]);
    let (intruder, _) = container(&lab, "default", "guarded", "intruder");
    assert_eq!(attempts(&intruder, &netns, &tries), ["EPERM", "EPERM"]);

    let m = observer.scrape_fresh();
    let verdicts = |rule: &str, verdict: &str| {
        let labels = [("pod", "guarded"), ("rule", rule), ("verdict", verdict)];
        m.sum("observer_policy_verdicts_total", &labels)
    };
    assert_eq!(verdicts("fpm", "allow"), 1.0, "{}", observer.log());
    assert_eq!(verdicts("metrics", "allow"), 1.0);
    // The intruder's two, and whatever the interpreter connects to itself.
    assert!(verdicts("rest", "deny") >= 2.0);
    assert_eq!(m.sum("observer_ipc_hooks_attached", &[]), 0.0);
    assert_eq!(
        m.sum("observer_connections_opened_total", &[("class", "unix")]),
        0.0
    );
    assert_eq!(
        integration_test::map_entries::<u64, Addressed>(UNIX_ADDRESSED_MAP),
        Some(0),
        "a datagram's address kept for a count nobody makes"
    );
}

/// `observer policy explain --connect-unix` for the intruder.
fn observer_explain(lab: &Lab, dir: &TempDir, socket: &str) -> String {
    let policy = dir.path().join("policy.yaml").display().to_string();
    let inventory = lab.inventory_path().display().to_string();
    let output = Command::new(integration_test::observer::binary())
        .args([
            "policy",
            "explain",
            &policy,
            "--inventory",
            &inventory,
            "--pod",
            "default/guarded",
            "--connect-unix",
            socket,
            "--client",
            "intruder",
        ])
        .output()
        .expect("observer policy explain");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Two servers in two containers, and a client container that talks to
/// each in turn on short connections, all on one CPU: the kernel hands a
/// closed connection's socket memory to the next connection at once. (The
/// pods of the lab: see [`lab_yaml`].)
const REUSE: &str = r#"
  - name: reuse
    namespace: default
    node: node-1
    volumes: [run]
    containers:
      - name: server-a
        command: [python3, -c, "SERVER", "a"]
      - name: server-b
        command: [python3, -c, "SERVER", "b"]
      - name: client
        command:
          - python3
          - -c
          - |
            import os, socket, time
            os.sched_setaffinity(0, {0})
            run = os.environ["POD_VOLUMES"] + "/run"
            print(run, flush=True)
            while not (os.path.exists(run + "/go") and os.path.exists(run + "/a.ready") and os.path.exists(run + "/b.ready")):
                time.sleep(0.05)
            for i in range(ROUNDS):
                for name in "ab":
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.connect(run + "/" + name + ".sock")
                    c.sendall(b"q" * 10)
                    c.recv(4096)
                    c.close()
            print("done", flush=True)
            time.sleep(3600)
"#;

const SERVER: &str = r#"
import os, socket, sys, time
os.sched_setaffinity(0, {0})
name = sys.argv[1]
run = os.environ["POD_VOLUMES"] + "/run"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(run + "/" + name + ".sock")
s.listen(64)
open(run + "/" + name + ".ready", "w").close()
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"r" * 5)
    c.close()
"#;

const ROUNDS: u64 = 20;

#[test]
fn short_connections_on_reused_sockets_are_each_counted_under_their_own_path() {
    let server = yaml_quoted(SERVER);
    let text = lab_yaml("ipc", REUSE)
        .replace("\"SERVER\"", &server)
        .replace("ROUNDS", &ROUNDS.to_string());
    let lab =
        Lab::up_for_test(&Plan::from_yaml(&text, "ipc").expect("a valid lab")).expect("lab up");
    let inventory = lab.inventory_path().display().to_string();
    let observer = Observer::start(&["--inventory", &inventory, "--collect-interval", "1s"]);
    observer.eventually("the pod attached and IPC followed", |m| {
        m.sum("observer_programs_attached", &[("pod", "reuse")]) > 0.0
            && m.sum("observer_ipc_hooks_attached", &[]) >= 2.0
    });
    let deadline = Instant::now() + WAIT;
    let run = loop {
        if let Some(line) = lab.log("default", "reuse", "client").lines().next() {
            break PathBuf::from(line.trim());
        }
        assert!(Instant::now() < deadline, "the client never started");
        thread::sleep(Duration::from_millis(100));
    };
    fs::write(run.join("go"), "").expect("start");
    let prometheus = Prometheus::scraping(observer.addr());
    while !lab.log("default", "reuse", "client").contains("done") {
        assert!(Instant::now() < deadline, "the client did not finish");
        thread::sleep(Duration::from_millis(100));
    }
    for name in ["a", "b"] {
        let path = run.join(format!("{name}.sock")).display().to_string();
        let series = |family: &str, direction: &str| {
            format!(
                r#"{family}{{pod="reuse",class="unix",protocol="stream",direction="{direction}",path="{path}",client_container="client",server_container="server-{name}"}}"#
            )
        };
        for (family, direction, expected) in [
            ("observer_connections_opened_total", "request", ROUNDS),
            ("observer_flow_packets_total", "request", ROUNDS),
            ("observer_flow_bytes_total", "request", ROUNDS * 10),
            ("observer_flow_packets_total", "response", ROUNDS),
            ("observer_flow_bytes_total", "response", ROUNDS * 5),
        ] {
            wait_value(&observer, &prometheus, &series(family, direction), expected);
        }
    }
    // Nothing counted under another path or container.
    let all = prometheus
        .query(r#"sum(observer_flow_packets_total{pod="reuse",class="unix"}) or vector(0)"#);
    assert_eq!(all, [(ROUNDS * 4) as f64], "every message once");
}

/// `--unix-sockets false`: the programs that run at every socket message
/// of the node are neither loaded nor attached (a node that wants their
/// cost back), and the hooks' gauge lists none of theirs; by default both
/// are.
#[test]
fn unix_sockets_can_be_left_unfollowed() {
    let pod = Netns::create("unix-off").expect("namespace");
    let path = pod.path().display().to_string();
    for (follow, attached) in [("true", 2.0), ("false", 0.0)] {
        let observer = Observer::start(&["--netns", &path, "--unix-sockets", follow]);
        let m = observer.scrape();
        assert_eq!(
            m.sum("observer_ipc_hooks_attached", &[]),
            attached,
            "--unix-sockets {follow}:\n{}",
            observer.log()
        );
        // The kernel frees the programs of an observer that went a little
        // after its exit: waited for.
        for program in ["unix_sent", "unix_received"] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while integration_test::loaded_programs(program) != attached as usize / 2 {
                assert!(
                    Instant::now() < deadline,
                    "{program} with --unix-sockets {follow}: {} loaded",
                    integration_test::loaded_programs(program)
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        assert!(observer.terminate().success());
    }
}

/// A Python program as one double-quoted YAML scalar.
fn yaml_quoted(program: &str) -> String {
    format!(
        "\"{}\"",
        program
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}
