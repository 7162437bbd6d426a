//! The end-to-end harness: fixture trees, the real binaries on loopback ports, a real
//! Prometheus, and the strict OpenMetrics parser from Python's prometheus_client.
//!
//! Binaries are taken from `AISTACK_BIN_DIR`, else `target/debug` of this workspace (`./tests/run`
//! builds them first).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod kubernetes;
pub mod login1;
pub mod ntfy;
pub mod stub;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("AISTACK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (./tests/run does) or set AISTACK_BIN_DIR",
        path.display()
    );
    path
}

/// The stand-in `libnvidia-ml.so` (crate `tests/fake-nvml`), built next to the binaries.
pub fn fake_nvml_library() -> PathBuf {
    binary("libfake_nvml.so")
}

/// The fault-injecting library of `tests/faults/fsfaults.c`, built once per test process
/// with the system's C compiler (the one Rust links with).
pub fn fsfaults_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out =
                std::env::temp_dir().join(format!("aistack-fsfaults-{}.so", std::process::id()));
            let source = workspace_root().join("tests/faults/fsfaults.c");
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
                .arg(&out)
                .arg(&source)
                .arg("-ldl")
                .status()
                .expect("running cc (the C compiler Rust links with)");
            assert!(status.success(), "building {}", source.display());
            out
        })
        .clone()
}

/// Raises this process' soft open-files limit to its hard limit (a test that holds thousands
/// of sockets) and returns it.
pub fn raise_own_open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| h.parse().ok())
        .unwrap_or(1024);
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .expect("running prlimit (util-linux)");
    assert!(status.success());
    hard
}

/// A process' peak and current resident memory in KiB (`VmHWM`, `VmRSS`).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// How many descriptors a process has open.
pub fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Copies a directory tree, keeping symlinks as symlinks; files in `src` replace those in `dst`.
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            let _ = std::fs::remove_file(&to);
            std::os::unix::fs::symlink(std::fs::read_link(&from).unwrap(), &to).unwrap();
        } else if kind.is_dir() {
            copy_tree(&from, &to);
        } else {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// Writes a secret file as the actioner wants it: readable by its owner only.
pub fn write_secret(path: impl AsRef<Path>, text: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = path.as_ref();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Serves `app` on a loopback port from a thread of its own (the stand-ins: ntfy, the
/// Kubernetes API, the HTTP stubs), for the rest of the test process; returns its base URL.
pub fn serve(app: axum::Router) -> String {
    serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), app)
}

/// [`serve`] on a listener already bound (a given loopback address and port).
pub fn serve_on(listener: std::net::TcpListener, app: axum::Router) -> String {
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    url
}

/// A loopback port that was free a moment ago (for programs that cannot report the port they
/// bound, like Prometheus).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An HTTP response, whatever its status.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, or "".
    pub content_type: String,
    /// Body as text.
    pub body: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(90)))
        .build()
        .into()
}

/// GET `url`.
pub fn get(url: &str) -> Reply {
    get_with(url, &[])
}

/// What Prometheus 2.x sends as `Accept` when it scrapes (its default `scrape_protocols`).
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

/// GET `url` with extra request headers.
pub fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Reply {
        status: response.status().as_u16(),
        content_type: response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: response.body_mut().read_to_string().unwrap(),
    }
}

/// The status of a GET of `url` within 2 s; `None` when it does not answer.
pub fn get_status(url: &str) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    agent.get(url).call().ok().map(|r| r.status().as_u16())
}

/// Runs `command` with `text` on its stdin; `install` says where the program comes from.
fn pipe_through(mut command: Command, text: &str, install: &str) -> std::process::Output {
    use std::io::Write;
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e} ({install})"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Checks `text` with `promtool check metrics`, the classic text format's reference linter;
/// returns its complaint when it has one.
pub fn check_text_format(text: &str) -> Result<(), String> {
    let mut promtool = Command::new("promtool");
    promtool.args(["check", "metrics"]);
    let out = pipe_through(promtool, text, "./tests/run installs prometheus");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", out.status))
    }
}

/// Checks `text` with the strict OpenMetrics parser of Python's prometheus_client; returns the
/// family names it found, or the parser's complaint.
pub fn parse_openmetrics(text: &str) -> Result<Vec<String>, String> {
    let python = std::env::var("AISTACK_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut parser = Command::new(&python);
    parser.arg(workspace_root().join("tests/openmetrics_check.py"));
    let out = pipe_through(
        parser,
        text,
        "./tests/run installs python3-prometheus-client",
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The exporter on `address`, its NVML the stand-in answering from `dir/scenario.json`, its
/// procfs and sysfs `dir/proc` and `dir/sys`, its config `gpu: {nvml_library: <stand-in>` and
/// `gpu_keys` (`, key: value`) `}` then `config` (YAML lines), and `env` besides; every
/// stand-in call counted in `dir/calls.log`.
pub fn fake_gpu_exporter(
    dir: &Path,
    gpu_keys: &str,
    config: &str,
    address: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Daemon {
    let file = dir.join("exporter.yaml");
    std::fs::write(
        &file,
        format!(
            "gpu: {{nvml_library: {}{gpu_keys}}}\n{config}",
            fake_nvml_library().display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("aistack-exporter"));
    command
        .env("FAKE_NVML_SCENARIO", dir.join("scenario.json"))
        .env("FAKE_NVML_CALLS", dir.join("calls.log"))
        .envs(env.iter().copied());
    Daemon::start_on(
        command,
        &[
            "--config.file",
            file.to_str().unwrap(),
            "--path.procfs",
            dir.join("proc").to_str().unwrap(),
            "--path.sysfs",
            dir.join("sys").to_str().unwrap(),
        ],
        address,
    )
}

/// `docker run -v`'s argument: `from` on this machine at `to` (with `:ro`, say) in the
/// container.
pub fn bind(from: &Path, to: &str) -> String {
    format!("{}:{to}", from.display())
}

/// `uid:gid` of `path`'s owner, for `docker run --user`: a container writes what the test
/// can read and clean up.
pub fn owner_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).unwrap();
    format!("{}:{}", meta.uid(), meta.gid())
}

/// The exporter in a container of `network` — a GPU node of its own address — with the
/// stand-in NVML answering from `dir/scenario.json`, its procfs and sysfs `dir/proc` and
/// `dir/sys`, its state in `dir/state`, and `config` (YAML lines) after the `gpu:` line; on
/// port 9470 of the container's address, which it returns once the exporter answers.
pub fn fake_gpu_exporter_container(
    network: &Network,
    name: &str,
    dir: &Path,
    config: &str,
) -> (Container, String) {
    std::fs::write(
        dir.join("exporter.yaml"),
        format!("gpu: {{nvml_library: /opt/aistack/libfake_nvml.so}}\n{config}"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let user = owner_of(dir);
    let container = Container::run_image_with(
        name,
        glibc_image(),
        &[
            "--network",
            &network.name,
            "--user",
            &user,
            "-v",
            &bind(
                &binary("aistack-exporter"),
                "/usr/local/bin/aistack-exporter:ro",
            ),
            "-v",
            &bind(&fake_nvml_library(), "/opt/aistack/libfake_nvml.so:ro"),
            "-v",
            &bind(dir, "/node"),
            "-e",
            "FAKE_NVML_SCENARIO=/node/scenario.json",
            "-e",
            "FAKE_NVML_CALLS=/node/calls.log",
            "-e",
            "STATE_DIRECTORY=/node/state",
        ],
        &[
            "/usr/local/bin/aistack-exporter",
            "--config.file",
            "/node/exporter.yaml",
            "--path.procfs",
            "/node/proc",
            "--path.sysfs",
            "/node/sys",
            "--web.listen-address",
            "0.0.0.0:9470",
            "--log.format",
            "json",
        ],
    );
    let address = container.address_on(network);
    let url = format!("http://{address}:9470/healthz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_status(&url) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the exporter in {name} did not answer at {url}; its log:\n{}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (container, address)
}

/// A running aistack binary on a loopback port; killed on drop.
pub struct Daemon {
    child: Child,
    /// `127.0.0.1:PORT` it listens on.
    pub address: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `name` with `args` plus `--web.listen-address 127.0.0.1:0 --log.format json`, and
    /// waits until it logs the address it listens on.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with(Command::new(binary(name)), args)
    }

    /// Like [`Daemon::start`] with a prepared command (to run it as another user, say).
    pub fn start_with(command: Command, args: &[&str]) -> Self {
        Self::start_on(command, args, "127.0.0.1:0")
    }

    /// Like [`Daemon::start_with`] on a given address (to restart on the same port).
    pub fn start_on(mut command: Command, args: &[&str], address: &str) -> Self {
        let mut child = command
            .args(args)
            .args([
                "--web.listen-address",
                address,
                "--log.format",
                "json",
                "--log.level",
                "debug",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting daemon");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let listening = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .filter(|v| v["message"] == "listening")
                    .map(|v| v["address"].as_str().unwrap_or_default().to_owned());
                // Logged before it is announced: whoever waited for it finds the line.
                sink.lock().unwrap().push(line);
                if let Some(address) = listening {
                    let _ = tx.send(address);
                }
            }
        });
        let address = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "daemon did not start ({status:?}); log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            child,
            address,
            log,
        }
    }

    /// `http://ADDRESS{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// GET a path.
    pub fn get(&self, path: &str) -> Reply {
        get(&self.url(path))
    }

    /// GET `/metrics` as Prometheus does, asking for OpenMetrics.
    pub fn scrape(&self) -> Reply {
        get_with(&self.url("/metrics"), &[("accept", PROMETHEUS_ACCEPT)])
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status (at most 10 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion: (exit code, stdout, stderr).
pub fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary(name)).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Spawns `program` with `args`, output discarded, and waits until `{url}/-/ready` answers.
fn spawn_ready(program: &str, args: &[String], url: &str) -> Child {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program} (./tests/run installs it): {e}"));
    wait_for(
        Duration::from_secs(30),
        &format!("{program} to be ready"),
        || {
            agent()
                .get(&format!("{url}/-/ready"))
                .call()
                .is_ok_and(|r| r.status() == 200)
                .then_some(())
        },
    );
    child
}

/// A real Prometheus (the distribution's package) scraping the given targets every second.
pub struct Prometheus {
    child: Child,
    args: Vec<String>,
    /// Base URL of its API.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with one job per `(job, host:port)`.
    pub fn start(targets: &[(&str, &str)]) -> Self {
        Self::start_with(targets, None, None)
    }

    /// Like [`Prometheus::start`], evaluating the rule file `rules` every second and sending
    /// alerts to the Alertmanager at `alertmanager` (`host:port`).
    pub fn start_with(
        targets: &[(&str, &str)],
        rules: Option<&Path>,
        alertmanager: Option<&str>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jobs: String = targets
            .iter()
            .map(|(job, target)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n")
            })
            .collect();
        let rules = rules
            .map(|r| format!("rule_files: ['{}']\n", r.display()))
            .unwrap_or_default();
        let alerting = alertmanager
            .map(|a| {
                format!("alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{a}']\n")
            })
            .unwrap_or_default();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n{rules}{alerting}scrape_configs:\n{jobs}"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            // A firing alert goes again to an Alertmanager that was away within a second,
            // not a minute.
            "--rules.alert.resend-delay=1s".to_owned(),
        ];
        let child = spawn_ready("prometheus", &args, &url);
        Self {
            child,
            args,
            url,
            _dir: dir,
        }
    }

    /// Kills it (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_ready("prometheus", &self.args, &self.url);
    }

    /// `GET /api/v1/<path>` as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let reply = get(&format!("{}/api/v1/{path}", self.url));
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
    }

    /// An instant query's result vector.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let v = self.api(&format!("query?query={encoded}"));
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// alerts/alertmanager.yml with the actioner at `actioner` (`host:port`), its token in
/// `token_file`, and second-scale timings; routes, matchers and inhibitions untouched.
pub fn shipped_alertmanager_config(actioner: &str, token_file: &str) -> String {
    shipped_alertmanager_config_to(actioner, token_file, "http://127.0.0.1:9")
}

/// [`shipped_alertmanager_config`], with the dead man's switch and the `ntfy-direct` receiver
/// posting under `direct` (a stand-in ntfy's base URL) instead of loopback's discard port.
pub fn shipped_alertmanager_config_to(actioner: &str, token_file: &str, direct: &str) -> String {
    let mut config =
        std::fs::read_to_string(workspace_root().join("alerts/alertmanager.yml")).unwrap();
    for (from, to) in [
        (
            "http://127.0.0.1:9471/api/v1/alerts".to_owned(),
            format!("http://{actioner}/api/v1/alerts"),
        ),
        (
            "/etc/alertmanager/actioner.token".to_owned(),
            token_file.to_owned(),
        ),
        ("group_wait: 30s".to_owned(), "group_wait: 1s".to_owned()),
        ("group_wait: 5s".to_owned(), "group_wait: 1s".to_owned()),
        (
            "group_interval: 5m".to_owned(),
            "group_interval: 2s".to_owned(),
        ),
        (
            "group_interval: 1m".to_owned(),
            "group_interval: 2s".to_owned(),
        ),
        // Offline: the dead man's switch and the direct ntfy route post to loopback's discard
        // port, never to the internet.
        (
            "https://heartbeat.invalid/replace-with-your-ping-url".to_owned(),
            format!("{direct}/heartbeat"),
        ),
        (
            "https://ntfy.sh/aistack-change-me?".to_owned(),
            format!("{direct}/aistack-change-me?"),
        ),
    ] {
        assert!(
            config.contains(&from),
            "alertmanager.yml no longer has {from}"
        );
        config = config.replace(&from, &to);
    }
    config
}

/// alerts/aistack.rules.yml with every `for:` and `keep_firing_for:` shortened to one second,
/// written into `dir`: the shipped expressions, labels and annotations at test speed.
pub fn shipped_rules(dir: &Path) -> PathBuf {
    let rules = std::fs::read_to_string(workspace_root().join("alerts/aistack.rules.yml")).unwrap();
    let mut out = String::new();
    let mut shortened = 0;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed.starts_with("for: ") {
            out.push_str(indent);
            out.push_str("for: 1s\n");
            shortened += 1;
        } else if trimmed.starts_with("keep_firing_for: ") {
            out.push_str(indent);
            out.push_str("keep_firing_for: 1s\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(shortened > 10, "alerts/aistack.rules.yml: no `for:` found");
    let path = dir.join("aistack.rules.yml");
    std::fs::write(&path, out).unwrap();
    path
}

/// Checks that every family in an OpenMetrics body is listed in docs/metrics.md.
pub fn assert_documented(body: &str) {
    let docs = std::fs::read_to_string(workspace_root().join("docs/metrics.md")).unwrap();
    let families = parse_openmetrics(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for family in families {
        assert!(
            docs.contains(&format!("`{family}`")) || docs.contains(&format!("`{family}_total`")),
            "{family} is not in docs/metrics.md"
        );
    }
}

/// Runs the docker CLI; panics with its output on failure.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A tiny local image, `FROM scratch` with busybox-static as `/bin/busybox` and `/bin/sh`
/// (this machine has no registry to pull from). Built once per test binary.
pub fn busybox_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag = "aistack-test/busybox:1".to_owned();
        let dir = tempfile::tempdir().unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is not installed (./tests/run installs it)");
        std::fs::copy(busybox, dir.path().join("busybox")).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY busybox /bin/sh\nENTRYPOINT [\"/bin/busybox\"]\n",
        )
        .unwrap();
        docker(&["build", "-q", "-t", &tag, dir.path().to_str().unwrap()]);
        tag
    })
}

/// An image built from the busybox image plus `files` (path in the image, content), with
/// `entrypoint`, tagged `tag`; removed when dropped.
pub struct Image {
    /// Its tag.
    pub tag: String,
}

impl Image {
    /// Builds it.
    pub fn build(tag: &str, files: &[(&str, &str)], entrypoint: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let file = dir.path().join("root").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, content).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let entrypoint = serde_json::to_string(entrypoint).unwrap();
        std::fs::write(
            dir.path().join("Dockerfile"),
            format!(
                "FROM {}\nCOPY root/ /\nENTRYPOINT {entrypoint}\n",
                busybox_image()
            ),
        )
        .unwrap();
        docker(&["build", "-q", "-t", tag, dir.path().to_str().unwrap()]);
        Self {
            tag: tag.to_owned(),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.tag])
            .output();
    }
}

/// A base image with glibc and nothing else, like distroless/cc: the dynamic loader and the
/// libraries the binaries (and the stand-in NVML) link, the CA bundle, `/etc/passwd` with
/// nonroot (65532), `/tmp`, `/etc/os-release`.
pub fn glibc_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag = "aistack-test/glibc:1".to_owned();
        let root = tempfile::tempdir().unwrap();
        let binaries = [
            binary("aistack-exporter"),
            binary("aistack-actioner"),
            fake_nvml_library(),
            PathBuf::from("/usr/bin/prometheus"),
            PathBuf::from("/usr/bin/prometheus-alertmanager"),
        ];
        let mut libraries = std::collections::BTreeSet::new();
        for binary in &binaries {
            let out = Command::new("ldd").arg(binary).output().unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
                let path = line
                    .split_whitespace()
                    .find(|word| word.starts_with('/'))
                    .map(PathBuf::from);
                libraries.extend(path);
            }
        }
        assert!(libraries.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libraries:?}");
        for library in &libraries {
            let target = root.path().join(library.strip_prefix("/").unwrap());
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(std::fs::canonicalize(library).unwrap(), &target).unwrap();
        }
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n").unwrap();
        std::fs::copy("/etc/os-release", etc.join("os-release")).unwrap();
        // The CA bundle distroless/cc carries (rustls reads the system's roots).
        std::fs::create_dir_all(etc.join("ssl/certs")).unwrap();
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            etc.join("ssl/certs/ca-certificates.crt"),
        )
        .expect("the CA bundle (ca-certificates)");
        std::fs::create_dir_all(root.path().join("tmp")).unwrap();
        let tar = Command::new("tar")
            .args(["-C", root.path().to_str().unwrap(), "--owner=0", "--group=0", "-cf", "-", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        let mut import = Command::new("docker")
            .args(["import", "--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin", "-", &tag])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
        assert!(import.wait().unwrap().success(), "docker import");
        tag
    })
}

/// A container removed (with `docker rm -f`) when dropped.
pub struct Container {
    /// Its name.
    pub name: String,
    /// Its full id.
    pub id: String,
}

impl Container {
    /// `docker run -d --name <unique> <docker_args> <busybox image> <command>`.
    pub fn run(name: &str, docker_args: &[&str], command: &[&str]) -> Self {
        Self::start("run", name, docker_args, command)
    }

    /// `docker create`: a container that never ran.
    pub fn create(name: &str, docker_args: &[&str], command: &[&str]) -> Self {
        Self::start("create", name, docker_args, command)
    }

    /// `docker run -d` of another image.
    pub fn run_image(name: &str, image: &str, docker_args: &[&str]) -> Self {
        Self::start_image("run", name, docker_args, image, &[])
    }

    /// `docker run -d` of another image, with `command` (its arguments after the image).
    pub fn run_image_with(name: &str, image: &str, docker_args: &[&str], command: &[&str]) -> Self {
        Self::start_image("run", name, docker_args, image, command)
    }

    /// `docker create` of another image.
    pub fn create_image(name: &str, image: &str, docker_args: &[&str]) -> Self {
        Self::start_image("create", name, docker_args, image, &[])
    }

    fn start(verb: &str, name: &str, docker_args: &[&str], command: &[&str]) -> Self {
        Self::start_image(verb, name, docker_args, busybox_image(), command)
    }

    fn start_image(
        verb: &str,
        name: &str,
        docker_args: &[&str],
        image: &str,
        command: &[&str],
    ) -> Self {
        let name = format!("aistack-test-{}-{name}", std::process::id());
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        let mut args = vec![verb];
        if verb == "run" {
            args.push("-d");
        }
        args.extend(["--name", &name, "--label", "aistack-test=1"]);
        args.extend(docker_args);
        args.push(image);
        args.extend(command);
        let id = docker(&args);
        Self { name, id }
    }
}

impl Container {
    /// Its address on `network`.
    pub fn address_on(&self, network: &Network) -> String {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            network.name
        );
        docker(&["inspect", "-f", &format, &self.id])
    }

    /// What it wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.id])
            .output()
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// A Docker bridge network of the test's own (its containers get their own addresses, which
/// this machine reaches); removed when dropped.
pub struct Network {
    /// Its name.
    pub name: String,
}

impl Network {
    /// `docker network create`.
    pub fn create(name: &str) -> Self {
        let name = format!("aistack-test-{}-{name}", std::process::id());
        let _ = Command::new("docker")
            .args(["network", "rm", &name])
            .output();
        docker(&["network", "create", "--label", "aistack-test=1", &name]);
        Self { name }
    }

    /// One with a subnet of its own (`172.28.N.0/24`, the first N no other network has), so
    /// that containers can be given addresses before they start (`--ip`); returns it and the
    /// subnet's first three octets.
    pub fn with_subnet(name: &str) -> (Self, String) {
        let name = format!("aistack-test-{}-{name}", std::process::id());
        let _ = Command::new("docker")
            .args(["network", "rm", &name])
            .output();
        for n in 0..=255 {
            let prefix = format!("172.28.{}", (std::process::id() as usize + n) % 256);
            let created = Command::new("docker")
                .args([
                    "network",
                    "create",
                    "--label",
                    "aistack-test=1",
                    "--subnet",
                    &format!("{prefix}.0/24"),
                    "--gateway",
                    &format!("{prefix}.1"),
                    &name,
                ])
                .output()
                .expect("docker network create");
            if created.status.success() {
                return (Self { name }, prefix);
            }
        }
        panic!("no free subnet in 172.28.0.0/16");
    }

    /// Its gateway: this machine's address on it.
    pub fn gateway(&self) -> String {
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &self.name,
        ])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.name])
            .output();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// A real Alertmanager (the distribution's `prometheus-alertmanager`) on a loopback port,
/// without clustering; killed on drop.
pub struct Alertmanager {
    child: Child,
    args: Vec<String>,
    /// Base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts it with `config` (YAML).
    pub fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("alertmanager.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.path={}", dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_owned(),
        ];
        let child = spawn_ready("prometheus-alertmanager", &args, &url);
        Self {
            child,
            args,
            url,
            _dir: dir,
        }
    }

    /// Kills it (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_ready("prometheus-alertmanager", &self.args, &self.url);
    }

    /// Pushes alerts with its API (`POST /api/v2/alerts`), as Prometheus does.
    pub fn push(&self, alerts: &serde_json::Value) {
        let response = agent()
            .post(&format!("{}/api/v2/alerts", self.url))
            .header("content-type", "application/json")
            .send(alerts.to_string())
            .unwrap();
        assert_eq!(response.status(), 200, "pushing alerts");
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` with a bearer token.
pub fn get_with_token(url: &str, token: &str) -> Reply {
    let mut response = agent()
        .get(url)
        .header("authorization", &format!("Bearer {token}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    Reply {
        status: response.status().as_u16(),
        content_type: String::new(),
        body: response.body_mut().read_to_string().unwrap(),
    }
}

/// POST `body` as JSON to `url` with an optional bearer token.
pub fn post_json(url: &str, token: Option<&str>, body: &str) -> Reply {
    try_post_json(url, token, body).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`post_json`], with connection errors as `Err` (for a peer that may be down).
pub fn try_post_json(url: &str, token: Option<&str>, body: &str) -> Result<Reply, String> {
    let mut request = agent().post(url).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", &format!("Bearer {token}"));
    }
    let mut response = request.send(body).map_err(|e| format!("POST {url}: {e}"))?;
    Ok(Reply {
        status: response.status().as_u16(),
        content_type: response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("POST {url}: {e}"))?,
    })
}
