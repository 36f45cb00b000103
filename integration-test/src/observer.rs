//! The observer binary, run for real as a child process.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::Scrape;

/// A running `observer run`; killed on drop if the test did not stop it.
pub struct Observer {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    /// `--secure-serving`: HTTPS, /metrics with this bearer token.
    token: Option<String>,
}

/// The observer binary: `OBSERVER_BIN` (set by `cargo xtask test`), or the
/// debug build of this workspace.
pub fn binary() -> PathBuf {
    std::env::var_os("OBSERVER_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/observer"
            ))
        },
        PathBuf::from,
    )
}

/// `CAP_NET_ADMIN` (linux/capability.h; libc has no capability numbers).
pub const CAP_NET_ADMIN: u32 = 12;

impl Observer {
    /// Starts `observer run <args>` on a free loopback port and waits until it
    /// is ready. Panics with the observer's output if it does not get there.
    pub fn start(args: &[&str]) -> Self {
        Self::start_binary(&binary(), args)
    }

    /// [`Observer::start`] with another observer binary (the benchmark's
    /// comparisons).
    pub fn start_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        let mut observer = Self::spawn_binary(binary, args);
        observer.wait_ready(Duration::from_secs(30));
        observer
    }

    /// Starts the observer on `lab`'s inventory with `policy` as its policy
    /// file, written in `dir`; returns the file's path (tests rewrite it).
    pub fn with_policy(lab: &lab::Lab, dir: &crate::TempDir, policy: &str) -> (PathBuf, Self) {
        Self::with_policy_and(lab, dir, policy, &[])
    }

    /// [`Observer::with_policy`] with more arguments.
    pub fn with_policy_and(
        lab: &lab::Lab,
        dir: &crate::TempDir,
        policy: &str,
        more: &[&str],
    ) -> (PathBuf, Self) {
        let path = dir.write("policy.yaml", policy);
        let inventory = lab.inventory_path().display().to_string();
        let mut args = vec!["--inventory", &inventory, "--policy", &path];
        args.extend_from_slice(more);
        let observer = Self::start(&args);
        (path.into(), observer)
    }

    /// Starts `observer run <args>` without waiting for it to be ready.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_binary(&binary(), args)
    }

    fn spawn_binary(binary: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn_limited(binary, args, None, None)
    }

    /// [`Observer::start`] with at most `files` open files (soft and hard
    /// limit), as a container runtime may set it.
    pub fn start_with_file_limit(args: &[&str], files: u64) -> Self {
        let mut observer = Self::spawn_limited(&binary(), args, Some(files), None);
        observer.wait_ready(Duration::from_secs(30));
        observer
    }

    /// [`Observer::start`] without the capability `capability`
    /// ([`CAP_NET_ADMIN`], ...), as a pod's security context may leave it
    /// out.
    pub fn start_without_capability(args: &[&str], capability: u32) -> Self {
        let mut observer = Self::spawn_limited(&binary(), args, None, Some(capability));
        observer.wait_ready(Duration::from_secs(30));
        observer
    }

    fn spawn_limited(
        binary: &std::path::Path,
        args: &[&str],
        files: Option<u64>,
        without: Option<u32>,
    ) -> Self {
        let addr = free_port();
        let log = std::env::temp_dir().join(format!("observer-test-{}.log", addr.port()));
        let mut command = observer_command_with(
            binary,
            &["run", "--metrics-addr", &addr.to_string()],
            args,
            File::create(&log).expect("log file"),
        );
        if let Some(files) = files {
            let limit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            // SAFETY: setrlimit is async-signal-safe; the struct is copied in.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(capability) = without {
            // SAFETY: prctl is async-signal-safe. Out of the bounding set,
            // root's program gets no such capability at exec (the
            // inheritable and ambient sets of a root shell are empty).
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        Self {
            child: Some(child),
            addr,
            log,
            token: None,
        }
    }

    /// Starts `observer run --secure-serving <args>` (HTTPS) and waits
    /// until it is ready; its scrapes send `token`.
    pub fn start_secure(args: &[&str], token: &str) -> Self {
        let mut with = vec!["--secure-serving"];
        with.extend_from_slice(args);
        let mut observer = Self::spawn_binary(&binary(), &with);
        observer.token = Some(token.to_owned());
        observer.wait_ready(Duration::from_secs(30));
        observer
    }

    /// GET over the observer's scheme (HTTPS with `--secure-serving`, with
    /// the token it was given, or `token` instead).
    pub fn get(&self, path: &str, token: Option<&str>) -> Option<(u16, String)> {
        match &self.token {
            Some(own) => https_get(self.addr, path, token.or(Some(own))),
            None => http_get(self.addr, path),
        }
    }

    /// Waits until `/readyz` says ready; panics with the log if it does not.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait().expect("wait") {
                panic!(
                    "the observer exited before it was ready ({status}):\n{}",
                    self.log()
                );
            }
            if self
                .get("/readyz", None)
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the observer was not ready within {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Scrapes /metrics twice and returns the second answer: a scrape that
    /// arrives while a collection runs is answered by that collection, so
    /// only the second is sure to count everything done before this call.
    pub fn scrape_fresh(&self) -> Scrape {
        self.scrape();
        self.scrape()
    }

    /// Scrapes /metrics (which collects the kernel's counters first).
    pub fn scrape(&self) -> Scrape {
        let (code, body) = self
            .get("/metrics", None)
            .unwrap_or_else(|| panic!("/metrics did not answer:\n{}", self.log()));
        assert_eq!(code, 200, "/metrics: {body}");
        Scrape::parse(&body)
    }

    /// Scrapes until `condition` holds; panics with the log after 30 s. A
    /// scrape that gets no answer yet (the first moments) is tried again.
    pub fn eventually(&self, what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let scrape = self
                .get("/metrics", None)
                .map(|(_, text)| Scrape::parse(&text));
            if let Some(scrape) = scrape.filter(|s| condition(s)) {
                return scrape;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the observer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the observer with SIGKILL (no chance to clean up) and waits.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Resident memory of the observer process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit.
    pub fn terminate(self) -> ExitStatus {
        self.terminate_within(Duration::from_secs(10))
    }

    /// Sends SIGTERM, waits (at most 10 s) for the exit, and returns what
    /// the observer logged up to it.
    pub fn terminate_with_log(mut self) -> (ExitStatus, String) {
        let status = self.stop(Duration::from_secs(10));
        (status, self.log())
    }

    /// Sends SIGTERM and waits at most `limit` for the exit.
    pub fn terminate_within(mut self, limit: Duration) -> ExitStatus {
        self.stop(limit)
    }

    fn stop(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the observer ignored SIGTERM for {limit:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs the observer to completion (for commands that must fail): returns
/// its exit status and what it printed on stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    run_to_exit_as(args, None)
}

/// Like [`run_to_exit`], as user and group `uid` (without capabilities).
///
/// That user may not reach the workspace (a checkout under `/root`, or in a
/// `mktemp -d` directory, is private): it runs a copy of the binary in a
/// world-readable directory of its own.
pub fn run_to_exit_as(args: &[&str], uid: Option<u32>) -> (ExitStatus, String) {
    let copy = uid.map(|_| reachable_copy());
    let mut command = observer_command(args, &[], Stdio::piped());
    if let (Some(uid), Some((_, binary))) = (uid, &copy) {
        command = observer_command_with(binary, args, &[], Stdio::piped());
        command.uid(uid).gid(uid);
    }
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("cannot start {}: {err}", binary().display()));
    assert!(
        out.status.code().is_some(),
        "killed by signal {:?}",
        out.status.signal()
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the observer binary that any user can run: a directory of
/// mode 0755 under the system's temporary directory, removed on drop.
fn reachable_copy() -> (crate::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::TempDir::new("reachable");
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), open.clone()).expect("chmod the directory");
    let copy = dir.path().join("observer");
    std::fs::copy(binary(), &copy).expect("copying the observer binary");
    std::fs::set_permissions(&copy, open).expect("chmod the copy");
    (dir, copy)
}

fn observer_command(first: &[&str], rest: &[&str], stderr: impl Into<Stdio>) -> Command {
    observer_command_with(&binary(), first, rest, stderr)
}

fn observer_command_with(
    binary: &std::path::Path,
    first: &[&str],
    rest: &[&str],
    stderr: impl Into<Stdio>,
) -> Command {
    let mut command = Command::new(binary);
    command
        .args(first)
        .args(rest)
        .env("OBSERVER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: prctl is async-signal-safe. If the test process dies (even by
    // SIGKILL), the kernel sends the observer SIGTERM: nothing stays behind.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command
}

/// A free port on loopback (free when asked: bind it soon).
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// An HTTPS GET with curl (any certificate: the observer's is self-signed),
/// with a bearer token if given: (status code, body).
pub fn https_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut command = Command::new("curl");
    command.args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = command.arg(format!("https://{addr}{path}")).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    let code: u16 = code.trim().parse().ok()?;
    (code != 0).then(|| (code, body.to_owned()))
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}
