//! The kernel programs on their own: loaded with their maps as the daemon
//! loads them, run on synthetic packets (`BPF_PROG_TEST_RUN`) and reached
//! through real socket calls from test cgroups, in pod namespaces without
//! routes. Used by `tests/kernel.rs`.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
};

use aya::programs::{TestRun, TestRunOptions};
use lab::{Cgroup, Netns, cgroup_id};
use observer::{
    kernel::{
        class_maps::ClassMapsWriter,
        datapath::{Datapath, DatapathConfig, Maps, Opened},
        netns,
        policy_maps::{KernelPolicyMaps, PolicyEntries},
    },
    names::{CgroupIds, ObjectRef},
    policy::{compile::RuleName, explain::World, table::Table},
};
use observer_common::{FlowKey, NodeInfo, VerdictKey, family, ipv4_mapped, protocol};

use crate::{TempDir, container::in_container};

pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;

/// The programs loaded with their maps, as the daemon loads them.
pub struct Kernel {
    pub datapath: Datapath,
    pub maps: Maps,
    pub class_maps: ClassMapsWriter,
    pub policy_maps: KernelPolicyMaps,
    /// Last: the private bpffs inside it is unmounted first.
    _runtime: TempDir,
}

impl Kernel {
    pub fn load() -> Self {
        let runtime = TempDir::new("kernel");
        let Opened {
            datapath,
            maps,
            class_maps,
            policy_maps,
            ..
        } = Datapath::open(&DatapathConfig {
            flow_capacity: 4096,
            runtime_dir: runtime.path().to_path_buf(),
            pin_dir: None,
            log_level: None,
            unix_sockets: true,
            named_pipes: false,
        })
        .expect("loading the programs (as root, with BTF)");
        Self {
            datapath,
            maps,
            class_maps: ClassMapsWriter::new(class_maps, false),
            policy_maps,
            _runtime: runtime,
        }
    }

    pub fn verdicts(&self) -> HashMap<VerdictKey, u64> {
        self.maps
            .verdicts
            .iter()
            .map(|entry| entry.expect("reading VERDICTS"))
            .collect()
    }

    /// The rule (by names) and verdict counted for `cookie` since `before`.
    pub fn counted_since(
        &self,
        before: &HashMap<VerdictKey, u64>,
        cookie: u64,
        names: &HashMap<u32, RuleName>,
    ) -> Vec<(String, String, u8)> {
        self.verdicts()
            .into_iter()
            .filter(|(key, count)| {
                key.netns_cookie == cookie && before.get(key).copied().unwrap_or(0) < *count
            })
            .map(|(key, _)| {
                let name = &names[&key.rule];
                (name.policy.clone(), name.rule.clone(), key.verdict)
            })
            .collect()
    }
}

/// A pod of the table: a namespace with `lo` and an `eth0` (down, with no
/// address and no route: nothing leaves it), its cgroups, its cookie.
pub struct Pod {
    pub netns: Netns,
    pub cookie: u64,
    pub eth0: u32,
    /// Its cgroup, and that of a process that is no container of the pod.
    pub cgroup: PathBuf,
    pub stranger: PathBuf,
}

pub fn make_pod(name: &str, cgroup: PathBuf, stranger: PathBuf) -> Pod {
    let netns = Netns::create(name).expect("namespace");
    netns
        .ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ])
        .expect("an eth0 (a veth pair, both ends in the namespace)");
    let (cookie, eth0) = netns
        .run(|| {
            let cookie = netns::cookie_of_current().expect("cookie");
            let name = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: a NUL-terminated name.
            (cookie, unsafe { libc::if_nametoindex(name.as_ptr()) })
        })
        .expect("enter namespace");
    Pod {
        netns,
        cookie,
        eth0,
        cgroup,
        stranger,
    }
}

/// A frame as tc sees it: Ethernet, IPv4, then TCP (SYN if `syn`, else
/// ACK) or UDP, without payload.
pub fn frame(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, syn: bool) -> Vec<u8> {
    let l4 = if proto == protocol::TCP { 20 } else { 8 };
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    if proto == protocol::TCP {
        let flags = if syn { 0x02 } else { 0x10 };
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&(8u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f
}

/// The flow map's key of the packets from `src` to `dst` (protocol `proto`)
/// at `pod`'s hook on `interface` in `direction`, as the programs make it.
pub fn flow_key(
    pod: &Pod,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    direction: u8,
    interface: u8,
) -> FlowKey {
    FlowKey {
        netns_cookie: pod.cookie,
        src_addr: ipv4_mapped(src.ip().octets()),
        dst_addr: ipv4_mapped(dst.ip().octets()),
        src_port: src.port(),
        dst_port: dst.port(),
        protocol: proto,
        direction,
        family: family::IPV4,
        interface,
    }
}

/// `struct __sk_buff` up to `ifindex` (offset 40): the device the packet
/// is on. The rest is zero, as the kernel requires.
pub fn skb_on(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Runs program `name` of the instance for `pod` on a frame on `ifindex`,
/// from inside the pod's namespace (where its socket lookups look).
pub fn run(kernel: &Kernel, pod: &Pod, name: &'static str, ifindex: u32, frame: &[u8]) -> u32 {
    let mut programs = kernel
        .datapath
        .instance(pod.cookie, false)
        .expect("an instance of the programs");
    let program = programs.get(name).expect("the program");
    let ctx = skb_on(ifindex);
    pod.netns
        .run(|| {
            program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN")
                .return_value
        })
        .expect("enter namespace")
}

/// What `connect()` (TCP) or `sendto()` (UDP) from a process in `cgroup`,
/// in `pod`'s namespace, answered: `eperm`, `ok`, or `errno N`.
pub fn probe(pod: &Pod, cgroup: &Path, proto: u8, to: SocketAddrV4) -> String {
    let script = "import socket, sys\n\
        kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])\n\
        try:\n\
        \x20   if kind == 'tcp':\n\
        \x20       s = socket.socket(); s.settimeout(2); s.connect((host, port))\n\
        \x20   else:\n\
        \x20       s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', (host, port))\n\
        \x20   print('ok')\n\
        except PermissionError:\n\
        \x20   print('eperm')\n\
        except OSError as e:\n\
        \x20   print('errno', e.errno)\n";
    let kind = if proto == protocol::UDP { "udp" } else { "tcp" };
    let out = in_container(
        cgroup,
        &pod.netns.path(),
        Command::new("python3").args([
            "-c",
            script,
            kind,
            &to.ip().to_string(),
            &to.port().to_string(),
        ]),
    )
    .output()
    .expect("python3");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !answer.is_empty(),
        "the probe said nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer
}

/// The table's world on this machine: a namespace and cgroups for each pod
/// of node-1, the maps written from the table's policies.
pub struct TableWorld {
    pub kernel: Kernel,
    pub pods: HashMap<String, Pod>,
    pub world: World,
    pub names: HashMap<u32, RuleName>,
    _hooks: Vec<(&'static str, observer::kernel::datapath::BpfLink)>,
    _cgroups: Cgroup,
}

impl TableWorld {
    /// The cgroup of container `name` of pod `pod` (`namespace/name`).
    pub fn container_cgroup(&self, pod: &str, name: &str) -> PathBuf {
        let (namespace, pod_name) = pod.split_once('/').expect("namespace/name");
        self.world
            .pod(namespace, pod_name)
            .and_then(|p| p.containers.iter().find(|c| c.name == name))
            .map(|c| c.cgroup.clone())
            .unwrap_or_else(|| panic!("no container {name} in {pod}"))
    }
}

pub fn table_world(table: &Table) -> TableWorld {
    let mut kernel = Kernel::load();
    let cgroups = Cgroup::create("kernel-table").expect("a cgroup of the test's own");
    let mut inventory = table.inventory.clone();
    let mut ids = CgroupIds::new();
    let mut pods = HashMap::new();
    let mut attached = HashMap::new();
    for pod in inventory.pods.iter_mut().filter(|p| p.node == "node-1") {
        for container in &mut pod.containers {
            let path = cgroups.child(&container.cgroup).expect("container cgroup");
            ids.insert(path.clone(), cgroup_id(&path).expect("cgroup id"));
            container.cgroup = path;
        }
        let cgroup = cgroups.child(Path::new(&pod.name)).expect("pod cgroup");
        let stranger = cgroups
            .child(&Path::new(&pod.name).join("stranger"))
            .expect("a cgroup that is no container's");
        let made = make_pod(&pod.name, cgroup, stranger);
        attached.insert(ObjectRef::new(&pod.namespace, &pod.name), made.cookie);
        pods.insert(format!("{}/{}", pod.namespace, pod.name), made);
    }
    let world = World::with_cgroups(inventory, ids);
    kernel
        .class_maps
        .sync(world.class_entries().clone())
        .expect("writing the classification maps");
    let compiled = world.compile(&table.policies, &attached);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    kernel
        .policy_maps
        .sync(&PolicyEntries::default(), &compiled.entries)
        .expect("writing the policy maps");
    let hooks = pods
        .values()
        .flat_map(|pod| {
            kernel
                .datapath
                .attach_socket_hooks(&pod.cgroup, &[])
                .expect("the policy hooks")
        })
        .collect();
    TableWorld {
        kernel,
        pods,
        world,
        names: compiled.names,
        _hooks: hooks,
        _cgroups: cgroups,
    }
}

/// The cgroup this test process runs in (the sender of its test packets).
/// The node map that makes a synthetic packet's socket (BPF_PROG_TEST_RUN
/// gives it one, in the test's own cgroup) read as a process of the node
/// itself (`true`) or as a pod's: the test's cgroup is made the pods'
/// cgroup, or another is.
pub fn test_socket_as_node(node: bool) -> NodeInfo {
    let own = own_cgroup();
    let root = observer::pods::discovery::cgroup2_root().expect("cgroup v2");
    let level = own
        .strip_prefix(root)
        .expect("under the root")
        .iter()
        .count();
    NodeInfo {
        pods_cgroup: if node {
            u64::MAX
        } else {
            cgroup_id(&own).expect("own cgroup")
        },
        pods_level: u32::try_from(level).expect("a level"),
        _pad: 0,
    }
}

pub fn own_cgroup() -> PathBuf {
    let line = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let path = line
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let root = observer::pods::discovery::cgroup2_root().expect("cgroup v2");
    root.join(path.trim_start_matches('/'))
}
