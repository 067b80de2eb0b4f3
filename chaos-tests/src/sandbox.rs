//! [`ClusterSandbox`]: the node processes of one test, their files, and the faults a test
//! injects into them (SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restart).
//!
//! Every process is a child of the test process and is reaped through its
//! [`std::process::Child`], so a pid the harness signals is always one of its own children
//! (a child that has exited but is not yet reaped keeps its pid, which therefore cannot be
//! reused by another process).

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ports::free_loopback_ports;
use crate::spec::{write_cookie, NodeSpec};
use crate::SandboxError;

/// How long an HTTP request made through the sandbox may take unless told otherwise.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// How many log lines [`ClusterSandbox::dump_logs`] and [`SandboxError::Exited`] show.
const TAIL_LINES: usize = 40;

/// The start of the harness's marker lines in a node's log.
pub(crate) const MARKER: &str = "----- cohort-chaos ";

/// A temporary directory with `n` Cohort nodes in it, each a real process of the `cohort`
/// binary; see the [crate docs](crate) for an example.
///
/// Node `i` (0-based) is named `n{i+1}`. Methods that take a node index panic when it is out
/// of range, as slice indexing does. Process control takes `&self`, so a sandbox can be
/// shared (`Arc`) between a workload task and a fault-injecting one.
///
/// Dropping the sandbox kills (SIGKILL) and reaps every process it started. When it is
/// dropped because the test is panicking, it first prints the end of every node's log to
/// stderr and keeps the temporary directory (its path is printed) for a post-mortem.
#[derive(Debug)]
pub struct ClusterSandbox {
    binary: PathBuf,
    /// `None` only after `Drop` decided to keep the directory.
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    cookie_file: PathBuf,
    specs: Vec<NodeSpec>,
    procs: Mutex<Vec<NodeProcess>>,
    pub(crate) http: reqwest::Client,
    created: Instant,
}

/// The process side of one node.
#[derive(Debug, Default)]
struct NodeProcess {
    /// `Some` from spawn until reaped.
    child: Option<Child>,
    /// Held with SIGSTOP and not yet continued.
    stopped: bool,
    /// How the last process ended.
    last_exit: Option<ExitStatus>,
    /// The arguments of the last start, reused by `restart`.
    last_args: Option<Vec<OsString>>,
    /// How many times it has been started.
    starts: u32,
}

impl NodeProcess {
    /// Reaps the child if it has exited.
    fn refresh(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.stopped = false;
                self.last_exit = Some(status);
            }
        }
    }

    /// The running (or stopped) child's pid.
    fn pid(&mut self) -> Option<u32> {
        self.refresh();
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap; does nothing when no process runs.
    fn kill_and_reap(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            self.stopped = false;
            // SIGKILL also ends a stopped process.
            child.kill()?;
            self.last_exit = Some(child.wait()?);
        }
        Ok(())
    }
}

impl ClusterSandbox {
    /// Makes a sandbox for `n` nodes of `binary`: a temporary root, and for each node a name,
    /// a data dir, a log file path, and free loopback ports for cluster and HTTP traffic
    /// (see [`free_loopback_ports`] for the small race this leaves); plus one cookie file
    /// shared by all nodes. Starts nothing.
    ///
    /// Fails with [`SandboxError::BinaryNotFound`], whose message says how to build the
    /// binary, when `binary` is not a file. The binary is not rebuilt by
    /// `cargo test -p cohort-chaos`: build it before running the tests.
    pub fn new(binary: PathBuf, n: usize) -> Result<ClusterSandbox, SandboxError> {
        let binary = match std::fs::canonicalize(&binary) {
            Ok(path) if path.is_file() => path,
            _ => return Err(SandboxError::BinaryNotFound { path: binary }),
        };
        let root = tempfile::Builder::new()
            .prefix("cohort-chaos-")
            .tempdir()
            .map_err(SandboxError::io("cannot create the sandbox directory"))?;
        let root_path = root.path().to_path_buf();
        let cookie_file = root_path.join("cookie");
        write_cookie(&cookie_file).map_err(SandboxError::io(format!(
            "cannot write the cookie file {}",
            cookie_file.display()
        )))?;
        let ports = free_loopback_ports(2 * n)
            .map_err(SandboxError::io("cannot find free loopback ports"))?;
        let loopback = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut specs = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let data_dir = root_path.join(&name);
            std::fs::create_dir(&data_dir).map_err(SandboxError::io(format!(
                "cannot create {}",
                data_dir.display()
            )))?;
            specs.push(NodeSpec {
                cluster_addr: loopback(ports[2 * i]),
                http_addr: loopback(ports[2 * i + 1]),
                log_path: root_path.join(format!("{name}.log")),
                data_dir,
                name,
                extra_args: Vec::new(),
            });
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(DEFAULT_HTTP_TIMEOUT)
            .build()
            .map_err(SandboxError::Client)?;
        Ok(ClusterSandbox {
            binary,
            root: Some(root),
            root_path,
            cookie_file,
            procs: Mutex::new((0..n).map(|_| NodeProcess::default()).collect()),
            specs,
            http,
            created: Instant::now(),
        })
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// True for a sandbox of zero nodes.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The sandbox's temporary directory (data dirs, logs, cookie).
    pub fn root(&self) -> &Path {
        &self.root_path
    }

    /// The `cohort` binary the nodes run.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The cookie file every node is given.
    pub fn cookie_file(&self) -> &Path {
        &self.cookie_file
    }

    /// Node `i`'s spec.
    pub fn spec(&self, i: usize) -> &NodeSpec {
        &self.specs[i]
    }

    /// Node `i`'s spec, to change before it starts (e.g. its `extra_args`).
    pub fn spec_mut(&mut self, i: usize) -> &mut NodeSpec {
        &mut self.specs[i]
    }

    /// Node `i`'s name (`n{i+1}`).
    pub fn name(&self, i: usize) -> &str {
        &self.specs[i].name
    }

    /// Node `i`'s HTTP base URL, `http://127.0.0.1:PORT`.
    pub fn http_url(&self, i: usize) -> String {
        self.specs[i].http_url()
    }

    /// The `cohort node` arguments [`ClusterSandbox::start`] uses: node 0 bootstraps the
    /// cluster, every other node joins node 0's cluster address.
    pub fn node_args(&self, i: usize) -> Vec<OsString> {
        let join = (i > 0).then(|| self.specs[0].cluster_addr);
        self.specs[i].node_args(join, &self.cookie_file)
    }

    /// Writes another random cookie file (mode 0600) named `file_name` in the sandbox root and
    /// returns its path: for a node that must be refused, started with
    /// [`ClusterSandbox::start_with`].
    pub fn write_cookie_file(&self, file_name: &str) -> Result<PathBuf, SandboxError> {
        let path = self.root_path.join(file_name);
        write_cookie(&path).map_err(SandboxError::io(format!(
            "cannot write the cookie file {}",
            path.display()
        )))?;
        Ok(path)
    }

    /// Starts node `i` as a cluster member (`cohort node`, arguments from
    /// [`ClusterSandbox::node_args`]).
    pub fn start(&self, i: usize) -> Result<(), SandboxError> {
        self.start_with(i, self.node_args(i))
    }

    /// Starts every node, node 0 first. It does not wait for anything: the joiners are
    /// expected to retry their join until node 0 listens. Wait with
    /// [`ClusterSandbox::wait_http_ready`] or [`ClusterSandbox::wait_leader`].
    pub fn start_all(&self) -> Result<(), SandboxError> {
        (0..self.len()).try_for_each(|i| self.start(i))
    }

    /// Starts node `i` with `args` as the whole argument list (no subcommand is added): a
    /// wrong cookie file, `up` instead of `node`, a bad flag. Its stdout and stderr are
    /// appended to its log, after a marker line with the arguments.
    pub fn start_with<I, S>(&self, i: usize, args: I) -> Result<(), SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let mut procs = self.lock();
        self.spawn(i, &mut procs[i], args)
    }

    /// Starts node `i` again with the arguments of its last start, so with the same data
    /// dir, ports and cookie. A node still running is first killed with SIGKILL (a crash
    /// restart); call [`ClusterSandbox::terminate`] first for a graceful one.
    pub fn restart(&self, i: usize) -> Result<(), SandboxError> {
        let mut procs = self.lock();
        let proc = &mut procs[i];
        let args = proc
            .last_args
            .clone()
            .ok_or_else(|| SandboxError::NeverStarted {
                node: self.specs[i].name.clone(),
            })?;
        proc.refresh();
        if proc.child.is_some() {
            self.mark(i, "restart: SIGKILL first")?;
            proc.kill_and_reap().map_err(SandboxError::io(format!(
                "cannot kill {}",
                self.specs[i].name
            )))?;
        }
        self.spawn(i, proc, args)
    }

    /// SIGKILL to node `i`, and reap it: when this returns the process is gone.
    pub fn kill(&self, i: usize) -> Result<(), SandboxError> {
        let mut procs = self.lock();
        let proc = &mut procs[i];
        self.running_pid(i, proc)?;
        self.mark(i, "SIGKILL")?;
        proc.kill_and_reap().map_err(SandboxError::io(format!(
            "cannot kill {}",
            self.specs[i].name
        )))
    }

    /// SIGSTOP to node `i`: it stays alive, keeps its sockets, and answers nothing. Returns
    /// once the kernel reports the process stopped (up to one second).
    pub fn stop(&self, i: usize) -> Result<(), SandboxError> {
        let mut procs = self.lock();
        let proc = &mut procs[i];
        let pid = self.running_pid(i, proc)?;
        self.mark(i, "SIGSTOP")?;
        self.signal(i, pid, libc::SIGSTOP, "SIGSTOP")?;
        proc.stopped = true;
        wait_proc_state(pid, |state| state == 'T' || state == 't');
        Ok(())
    }

    /// SIGCONT to node `i`, after [`ClusterSandbox::stop`]. Returns once the kernel no longer
    /// reports the process stopped (up to one second).
    pub fn cont(&self, i: usize) -> Result<(), SandboxError> {
        let mut procs = self.lock();
        let proc = &mut procs[i];
        let pid = self.running_pid(i, proc)?;
        self.mark(i, "SIGCONT")?;
        self.signal(i, pid, libc::SIGCONT, "SIGCONT")?;
        proc.stopped = false;
        wait_proc_state(pid, |state| state != 'T' && state != 't');
        Ok(())
    }

    /// SIGTERM to node `i` (and SIGCONT if it is stopped, so that it can act on it), then
    /// waits up to `timeout` for it to exit and returns its exit status. On timeout the
    /// process is left running (the sandbox kills it when dropped) and
    /// [`SandboxError::Timeout`] is returned.
    pub async fn terminate(&self, i: usize, timeout: Duration) -> Result<ExitStatus, SandboxError> {
        {
            let mut procs = self.lock();
            let proc = &mut procs[i];
            let pid = self.running_pid(i, proc)?;
            self.mark(i, "SIGTERM")?;
            self.signal(i, pid, libc::SIGTERM, "SIGTERM")?;
            if proc.stopped {
                self.signal(i, pid, libc::SIGCONT, "SIGCONT")?;
                proc.stopped = false;
            }
        }
        let mut pacer = crate::wait::Pacer::new(timeout);
        loop {
            {
                let mut procs = self.lock();
                let proc = &mut procs[i];
                proc.refresh();
                if proc.child.is_none() {
                    if let Some(status) = proc.last_exit {
                        return Ok(status);
                    }
                }
            }
            if !pacer.pause().await {
                return Err(SandboxError::Timeout {
                    what: format!("{} to exit after SIGTERM", self.specs[i].name),
                    after: timeout,
                    last: "still running".into(),
                });
            }
        }
    }

    /// True while node `i`'s process exists (a stopped process counts).
    pub fn is_running(&self, i: usize) -> bool {
        self.lock()[i].pid().is_some()
    }

    /// True while node `i` is held with SIGSTOP.
    pub fn is_stopped(&self, i: usize) -> bool {
        let mut procs = self.lock();
        procs[i].refresh();
        procs[i].stopped
    }

    /// True while node `i` runs and is not stopped: the nodes that should answer.
    pub fn is_live(&self, i: usize) -> bool {
        let mut procs = self.lock();
        procs[i].pid().is_some() && !procs[i].stopped
    }

    /// Node `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.lock()[i].pid()
    }

    /// How node `i`'s last process ended; `None` while it runs or before its first start.
    pub fn exit_status(&self, i: usize) -> Option<ExitStatus> {
        let mut procs = self.lock();
        let proc = &mut procs[i];
        proc.refresh();
        proc.child.is_none().then_some(proc.last_exit).flatten()
    }

    /// Everything node `i` has written (stdout and stderr of every run, with the harness's
    /// marker lines between them). Empty before the first start.
    pub fn logs(&self, i: usize) -> String {
        let path = &self.specs[i].log_path;
        match std::fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => format!("<cohort-chaos: cannot read {}: {e}>", path.display()),
        }
    }

    /// True when a line the node wrote (not one of the harness's marker lines, which repeat
    /// the arguments) contains `needle`.
    pub fn log_contains(&self, i: usize, needle: &str) -> bool {
        self.logs(i)
            .lines()
            .any(|line| !line.starts_with(MARKER) && line.contains(needle))
    }

    /// The last `lines` lines of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let logs = self.logs(i);
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints the end of every node's log to stderr, with each node's state: what a failed
    /// test should show. [`Drop`] calls it when the test is panicking.
    pub fn dump_logs(&self) {
        for i in 0..self.len() {
            let state = match (self.pid(i), self.exit_status(i)) {
                (Some(pid), _) if self.is_stopped(i) => format!("stopped, pid {pid}"),
                (Some(pid), _) => format!("running, pid {pid}"),
                (None, Some(status)) => format!("exited: {status}"),
                (None, None) => "never started".into(),
            };
            let spec = &self.specs[i];
            eprintln!(
                "===== {} ({state}), last {TAIL_LINES} lines of {} =====\n{}",
                spec.name,
                spec.log_path.display(),
                self.log_tail(i, TAIL_LINES)
            );
        }
    }

    /// Kills (SIGKILL) and reaps every process; what `Drop` does, for a test that wants it
    /// earlier. Returns the first error, after trying every node.
    pub fn kill_all(&self) -> Result<(), SandboxError> {
        let mut first_error = Ok(());
        let mut procs = self.lock();
        for (i, proc) in procs.iter_mut().enumerate() {
            if let Err(e) = proc.kill_and_reap() {
                if first_error.is_ok() {
                    first_error = Err(SandboxError::io(format!(
                        "cannot kill {}",
                        self.specs[i].name
                    ))(e));
                }
            }
        }
        first_error
    }

    /// The error for node `i` not running: [`SandboxError::Exited`] when it ran and ended
    /// (with its log tail), [`SandboxError::NotRunning`] when it never started. `None` while
    /// it runs.
    pub(crate) fn not_running_error(&self, i: usize, what: &str) -> Option<SandboxError> {
        let status = {
            let mut procs = self.lock();
            let proc = &mut procs[i];
            proc.refresh();
            if proc.child.is_some() {
                return None;
            }
            proc.last_exit
        };
        let node = self.specs[i].name.clone();
        Some(match status {
            Some(status) => SandboxError::Exited {
                node,
                what: what.to_string(),
                status,
                log_tail: self.log_tail(i, TAIL_LINES),
            },
            None => SandboxError::NotRunning { node },
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<NodeProcess>> {
        // The lock is never held across a panic of ours; a poisoned one is still consistent.
        self.procs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn running_pid(&self, i: usize, proc: &mut NodeProcess) -> Result<u32, SandboxError> {
        proc.pid().ok_or_else(|| SandboxError::NotRunning {
            node: self.specs[i].name.clone(),
        })
    }

    fn spawn(
        &self,
        i: usize,
        proc: &mut NodeProcess,
        args: Vec<OsString>,
    ) -> Result<(), SandboxError> {
        let spec = &self.specs[i];
        if let Some(pid) = proc.pid() {
            return Err(SandboxError::AlreadyRunning {
                node: spec.name.clone(),
                pid,
            });
        }
        proc.starts += 1;
        let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        self.mark(
            i,
            &format!(
                "start #{}: {} {}",
                proc.starts,
                self.binary.display(),
                shown.join(" ")
            ),
        )?;
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&spec.log_path)
                .map_err(SandboxError::io(format!(
                    "cannot open {}",
                    spec.log_path.display()
                )))
        };
        let child = Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .env("RUST_BACKTRACE", "1")
            .spawn()
            .map_err(SandboxError::io(format!(
                "cannot start {} ({})",
                spec.name,
                self.binary.display()
            )))?;
        tracing::debug!(node = %spec.name, pid = child.id(), "started");
        proc.child = Some(child);
        proc.stopped = false;
        proc.last_args = Some(args);
        Ok(())
    }

    /// Appends a marker line to node `i`'s log, so the log reads as a timeline of what the
    /// test did to the node and how it reacted.
    fn mark(&self, i: usize, what: &str) -> Result<(), SandboxError> {
        let spec = &self.specs[i];
        let line = format!(
            "{MARKER}+{:.3}s {}: {what} -----\n",
            self.created.elapsed().as_secs_f64(),
            spec.name
        );
        tracing::debug!(node = %spec.name, "{what}");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .and_then(|mut log| log.write_all(line.as_bytes()))
            .map_err(SandboxError::io(format!(
                "cannot write to {}",
                spec.log_path.display()
            )))
    }

    fn signal(
        &self,
        i: usize,
        pid: u32,
        signal: libc::c_int,
        name: &str,
    ) -> Result<(), SandboxError> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| SandboxError::NotRunning {
            node: self.specs[i].name.clone(),
        })?;
        // SAFETY: kill(2) has no memory-safety preconditions. `pid` is an unreaped child of
        // this process (the caller holds its `Child` under the lock), so it cannot have been
        // reused by another process.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(SandboxError::io(format!(
                "cannot send {name} to {}",
                self.specs[i].name
            ))(std::io::Error::last_os_error()))
        }
    }
}

impl Drop for ClusterSandbox {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if let Err(e) = self.kill_all() {
            eprintln!("cohort-chaos: {e}");
        }
        if failing {
            self.dump_logs();
            if let Some(root) = self.root.take() {
                eprintln!(
                    "cohort-chaos: the test failed; kept the sandbox at {}",
                    root.keep().display()
                );
            }
        }
    }
}

/// Waits (up to one second, polling /proc) until the process's state letter satisfies
/// `done`. Where /proc cannot be read it returns at once.
fn wait_proc_state(pid: u32, done: impl Fn(char) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some(state) = proc_state(pid) {
        if done(state) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The state letter of `/proc/PID/stat` (R, S, D, T, t, Z, …).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces and parentheses: the state is the
    // first field after the last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}
