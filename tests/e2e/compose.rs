//! The compose bundle as a user brings it up: images built offline from compose/Dockerfile.prebuilt
//! on a local glibc base (no registry here), Prometheus and Alertmanager on images made from the
//! distribution's binaries, `docker-compose up` with the shipped compose file, a fresh project
//! (so fresh named volumes), and the loop: the exporter scraped, an alert, the actioner's journal.
//!
//! The test override changes only what a CI machine must not or cannot have: the images (built
//! here), no NVIDIA runtime, the services bound to 127.0.0.1, and no system bus or Docker socket
//! for the actioner (so nothing here can suspend or touch this machine's containers; the actioner
//! must start without them). The alert is the shipped AistackVllmDown, fed a series that is
//! always there, so the loop does not wait minutes for a real outage.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aistack_tests::ntfy::FakeNtfy;
use aistack_tests::{binary, docker, get, get_with, glibc_image, wait_for, workspace_root};

/// `docker build` of `dockerfile` with `context`, quietly; panics with the output on failure.
fn build(
    tag: &str,
    dockerfile: &Path,
    context: &Path,
    args: &[(&str, &str)],
    target: Option<&str>,
) {
    let mut command = Command::new("docker");
    command.args(["build", "-q", "-t", tag, "-f", dockerfile.to_str().unwrap()]);
    for (key, value) in args {
        command.args(["--build-arg", &format!("{key}={value}")]);
    }
    if let Some(target) = target {
        command.args(["--target", target]);
    }
    let out = command.arg(context).output().unwrap();
    assert!(
        out.status.success(),
        "docker build {tag}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ids the actioner runs as (no such user on this machine: any uid must work).
const UID: &str = "4242";

/// Builds the four images the bundle runs.
fn images() {
    let base = glibc_image();
    // Dockerfile.prebuilt's context: a directory holding the two binaries (stripped copies of
    // the debug builds the other tests run, to keep the context small).
    let context = tempfile::tempdir().unwrap();
    for name in ["aistack-exporter", "aistack-actioner"] {
        let copy = context.path().join(name);
        std::fs::copy(binary(name), &copy).unwrap();
        let _ = Command::new("strip").arg(&copy).status();
    }
    let dockerfile = workspace_root().join("compose/Dockerfile.prebuilt");
    for target in ["exporter", "actioner"] {
        build(
            &format!("aistack-test/{target}:compose"),
            &dockerfile,
            context.path(),
            &[
                ("RUNTIME_IMAGE", base),
                ("AISTACK_UID", UID),
                ("AISTACK_GID", UID),
            ],
            Some(target),
        );
    }
    // Prometheus and Alertmanager from the distribution's packages, as the official images lay
    // them out (entrypoint /bin/<name>, the flags from the compose file).
    for (name, binary) in [
        ("prometheus", "/usr/bin/prometheus"),
        ("alertmanager", "/usr/bin/prometheus-alertmanager"),
    ] {
        let context = tempfile::tempdir().unwrap();
        std::fs::copy(binary, context.path().join(name)).unwrap();
        // Debian's Alertmanager reads its templates from files (upstream's embeds them).
        let templates = "/usr/share/prometheus/alertmanager";
        let extra = if name == "alertmanager" {
            for file in ["default.tmpl", "email.tmpl"] {
                std::fs::copy(format!("{templates}/{file}"), context.path().join(file)).unwrap();
            }
            format!("COPY default.tmpl email.tmpl {templates}/\n")
        } else {
            String::new()
        };
        std::fs::write(
            context.path().join("Dockerfile"),
            format!("FROM {base}\nCOPY {name} /bin/{name}\n{extra}ENTRYPOINT [\"/bin/{name}\"]\n"),
        )
        .unwrap();
        build(
            &format!("aistack-test/{name}:compose"),
            &context.path().join("Dockerfile"),
            context.path(),
            &[],
            None,
        );
    }
}

/// Copies what the compose file refers to (compose/, alerts/, dashboards/) into `dir`.
fn copy_bundle(dir: &Path) {
    for part in ["compose", "alerts", "dashboards"] {
        let status = Command::new("cp")
            .args([
                "-a",
                workspace_root().join(part).to_str().unwrap(),
                dir.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A compose project, taken down with its volumes when dropped.
struct Project {
    dir: PathBuf,
    name: String,
}

impl Project {
    fn compose(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("docker-compose")
            .current_dir(&self.dir)
            .args([
                "-p",
                &self.name,
                "-f",
                "docker-compose.yml",
                "-f",
                "docker-compose.test.yml",
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn health(&self, service: &str) -> String {
        let (_, id) = self.compose(&["ps", "-q", service]);
        let id = id.lines().last().unwrap_or_default().trim().to_owned();
        if id.is_empty() {
            return "absent".into();
        }
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                &id,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let (_, logs) = self.compose(&["logs", "--no-color", "--tail", "30"]);
        if std::thread::panicking() {
            eprintln!("compose logs:\n{logs}");
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans"]);
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_compose_bundle_comes_up_offline_and_closes_the_loop() {
    for port in [9090, 9093, 9470, 9471] {
        assert!(
            port_free(port),
            "port {port} is taken: the bundle uses the shipped ports"
        );
    }
    let started = std::time::Instant::now();
    images();
    // The phases' times go to docs/operations.md ("How long each install path takes").
    eprintln!("compose: images built after {:?}", started.elapsed());
    let ntfy = FakeNtfy::start();
    let root = tempfile::tempdir().unwrap();
    copy_bundle(root.path());
    let dir = root.path().join("compose");

    // README.md's "First run", for a host whose aistack user is 4242.
    let docker_gid = Command::new("getent")
        .args(["group", "docker"])
        .output()
        .unwrap();
    let docker_gid = String::from_utf8_lossy(&docker_gid.stdout)
        .split(':')
        .nth(2)
        .unwrap_or("0")
        .to_owned();
    let name = format!("aistack-test-{}", std::process::id());
    std::fs::write(
        dir.join(".env"),
        format!("COMPOSE_PROJECT_NAME={name}\nAISTACK_UID={UID}\nAISTACK_GID={UID}\nDOCKER_GID={docker_gid}\n"),
    )
    .unwrap();
    let token = "compose-test-token-0123456789abcdef";
    let token_file = dir.join("secrets/actioner.token");
    std::fs::write(&token_file, token).unwrap();
    let chown = Command::new("chown")
        .args([&format!("0:{UID}"), token_file.to_str().unwrap()])
        .status();
    assert!(
        chown.is_ok_and(|s| s.success()),
        "the tests run as root (chown)"
    );
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    // The shipped actioner config, with the stand-in ntfy instead of ntfy.sh.
    let actioner_config = dir.join("config/actioner.yaml");
    let config = std::fs::read_to_string(&actioner_config).unwrap();
    assert!(config.contains("url: \"https://ntfy.sh\""));
    std::fs::write(
        &actioner_config,
        config.replace("https://ntfy.sh", &ntfy.url),
    )
    .unwrap();
    // Offline: the dead man's switch and the direct ntfy route go to the stand-in ntfy (the
    // user puts their own URLs there).
    let alertmanager_config = root.path().join("alerts/alertmanager.yml");
    let text = std::fs::read_to_string(&alertmanager_config).unwrap();
    let text = text
        .replace(
            "https://heartbeat.invalid/replace-with-your-ping-url",
            &format!("{}/heartbeat", ntfy.url),
        )
        .replace(
            "https://ntfy.sh/aistack-change-me?",
            &format!("{}/aistack-change-me?", ntfy.url),
        );
    assert!(
        !text.lines().any(|l| l
            .trim_start()
            .trim_start_matches("- ")
            .starts_with("url: https://")),
        "an internet URL left in alertmanager.yml"
    );
    std::fs::write(&alertmanager_config, text).unwrap();
    // An always-present series under the shipped alert's name and labels: the loop in seconds.
    std::fs::create_dir_all(dir.join("test-rules")).unwrap();
    std::fs::write(
        dir.join("test-rules/loop.yml"),
        "groups:\n- name: compose-loop\n  rules:\n  - alert: AistackVllmDown\n    expr: aistack_exporter_build_info == 1\n    labels: {severity: critical, service: vllm}\n    annotations: {summary: vLLM is down (compose loop test), description: test, runbook_url: test}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("docker-compose.test.yml"),
        r#"services:
  exporter:
    image: aistack-test/exporter:compose
    runtime: runc
    command: [--config.file=/etc/aistack/exporter.yaml, --path.procfs=/host/proc, --path.sysfs=/host/sys, --web.listen-address=127.0.0.1:9470]
    volumes:
      - ./no-bus:/run/dbus/system_bus_socket:ro
  actioner:
    image: aistack-test/actioner:compose
    command: [--config.file=/etc/aistack/actioner.yaml, --web.listen-address=127.0.0.1:9471]
    volumes:
      - ./no-docker:/var/run/docker.sock
      - ./no-bus:/run/dbus/system_bus_socket
  prometheus:
    image: aistack-test/prometheus:compose
    volumes:
      - ./test-rules/loop.yml:/etc/prometheus/rules/loop.yml:ro
  alertmanager:
    image: aistack-test/alertmanager:compose
"#,
    )
    .unwrap();
    let project = Project {
        dir: dir.clone(),
        name,
    };

    let (ok, out) = project.compose(&["config", "-q"]);
    assert!(ok, "{out}");
    let (ok, out) = project.compose(&[
        "up",
        "-d",
        "--no-build",
        "exporter",
        "actioner",
        "prometheus",
        "alertmanager",
    ]);
    assert!(ok, "docker-compose up: {out}");
    eprintln!("compose: up returned after {:?}", started.elapsed());

    // Both binaries report healthy through their own healthcheck; the actioner started on its
    // first `up`, with a fresh named volume, as uid 4242.
    wait_for(
        Duration::from_secs(90),
        "exporter and actioner healthy",
        || {
            let (exporter, actioner) = (project.health("exporter"), project.health("actioner"));
            assert!(
                !actioner.starts_with("restarting") && !actioner.starts_with("exited"),
                "actioner: {actioner}"
            );
            (exporter == "running healthy" && actioner == "running healthy").then_some(())
        },
    );
    eprintln!("compose: both healthy after {:?}", started.elapsed());
    // It said at start what it cannot do without the bus and the Docker socket.
    let (_, logs) = project.compose(&["logs", "--no-color", "actioner"]);
    for missing in [
        "no socket at /run/dbus/system_bus_socket",
        "no socket at /var/run/docker.sock",
    ] {
        assert!(logs.contains(missing), "{missing}:\n{logs}");
    }

    // Prometheus scrapes both.
    let query = |promql: &str| -> serde_json::Value {
        let url = format!(
            "http://127.0.0.1:9090/api/v1/query?query={}",
            promql
                .replace(' ', "%20")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
        );
        serde_json::from_str(&get(&url).body).unwrap_or(serde_json::Value::Null)
    };
    wait_for(
        Duration::from_secs(60),
        "Prometheus scraping the exporter and the actioner",
        || {
            let result = query("up == 1");
            let jobs: Vec<&str> = result["data"]["result"]
                .as_array()?
                .iter()
                .filter_map(|r| r["metric"]["job"].as_str())
                .collect();
            (jobs.contains(&"aistack-exporter") && jobs.contains(&"aistack-actioner")).then_some(())
        },
    );

    // The alert goes through Alertmanager to the actioner, which journals it: failover has no
    // Docker socket (unavailable, the rest runs on), the phone gets its notification.
    let auth = format!("Bearer {token}");
    let journal = wait_for(Duration::from_secs(120), "the actioner's journal", || {
        let reply = get_with(
            "http://127.0.0.1:9471/api/v1/actions",
            &[("authorization", &auth)],
        );
        let json: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
        let text = json.to_string();
        (text.contains("failover-when-vllm-down") && !ntfy.published().is_empty()).then_some(text)
    });
    assert!(journal.contains("AistackVllmDown"), "{journal}");
    eprintln!(
        "compose: the alert in the journal after {:?}",
        started.elapsed()
    );
    let published = ntfy.published();
    assert!(
        published[0].to_string().contains("vLLM is down"),
        "{published:?}"
    );

    // The exporter keeps the GPUs it saw in its own volume (no GPU here: it says where).
    let (_, logs) = project.compose(&["logs", "--no-color", "exporter"]);
    assert!(
        logs.contains("GPUs seen are remembered across restarts")
            && logs.contains("/var/lib/aistack/exporter/gpus.json"),
        "{logs}"
    );

    // The state survived in the named volume, owned by the actioner's uid.
    let (_, volumes) = project.compose(&["config", "--volumes"]);
    assert!(volumes.contains("exporter-state"), "{volumes}");
    assert!(volumes.contains("actioner-state"), "{volumes}");
    let volume = format!("{}_actioner-state", project.name);
    let mountpoint = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume]);
    let owner = Command::new("stat")
        .args(["-c", "%u", &mountpoint])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), UID);
    let journal_files = std::fs::read_dir(&mountpoint).unwrap().count();
    assert!(journal_files >= 2, "the image's marker and the journal");
}
