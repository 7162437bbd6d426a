//! The docker collector against the real Docker engine of this machine, with containers of a
//! locally built busybox image: healthy, unhealthy, starting, without health check, never
//! started, and restarted by its restart policy. Also: the socket missing then appearing,
//! DOCKER_HOST, and GPU processes named after the container they run in.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aistack_tests::{
    Container, Daemon, assert_documented, binary, copy_tree, fake_nvml_library, fixtures, wait_for,
};

const EXPORTER: &str = "aistack-exporter";

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn config(dir: &Path, extra: &str) -> String {
    let path = dir.join("exporter.yaml");
    std::fs::write(
        &path,
        format!("collectors:\n  docker: {{interval: 1s}}\n  hwmon: {{enabled: false}}\n{extra}"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn health(body: &str, container: &str) -> Option<&'static str> {
    ["healthy", "unhealthy", "starting", "none"]
        .into_iter()
        .find(|status| {
            value(
                body,
                &format!(
                    r#"aistack_container_health{{container="{container}",status="{status}"}}"#
                ),
            ) == Some(1.0)
        })
}

#[test]
fn containers_running_health_and_restarts_from_the_real_engine() {
    let healthy = Container::run(
        "healthy",
        &[
            "--health-cmd",
            "/bin/busybox test -f /ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        &[
            "sh",
            "-c",
            "/bin/busybox touch /ok; exec /bin/busybox sleep 3600",
        ],
    );
    let unhealthy = Container::run(
        "unhealthy",
        &[
            "--health-cmd",
            "/bin/busybox false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        &["sleep", "3600"],
    );
    let starting = Container::run(
        "starting",
        &[
            "--health-cmd",
            "/bin/busybox true",
            "--health-interval",
            "1h",
            "--health-start-period",
            "1h",
        ],
        &["sleep", "3600"],
    );
    let plain = Container::run("plain", &[], &["sleep", "3600"]);
    let never_started = Container::create("created", &[], &["sleep", "3600"]);
    let crashing = Container::run(
        "crashing",
        &["--restart", "on-failure:20"],
        &["sh", "-c", "/bin/busybox sleep 1; exit 3"],
    );

    let dir = tempfile::tempdir().unwrap();
    let exporter = Daemon::start(EXPORTER, &["--config.file", &config(dir.path(), "")]);
    let body = wait_for(
        Duration::from_secs(30),
        "health verdicts and a restart",
        || {
            let body = exporter.scrape().body;
            let settled = health(&body, &healthy.name) == Some("healthy")
                && health(&body, &unhealthy.name) == Some("unhealthy")
                && value(
                    &body,
                    &format!(
                        r#"aistack_container_restarts_total{{container="{}"}}"#,
                        crashing.name
                    ),
                )
                .is_some_and(|n| n >= 2.0);
            settled.then_some(body)
        },
    );
    assert_eq!(value(&body, "aistack_docker_up"), Some(1.0));
    assert_eq!(
        value(&body, "aistack_docker_nvidia_runtime"),
        Some(0.0),
        "no NVIDIA toolkit here"
    );
    assert_eq!(health(&body, &starting.name), Some("starting"));
    assert_eq!(health(&body, &plain.name), Some("none"));
    let image = aistack_tests::busybox_image();
    for (c, running) in [(&healthy, 1.0), (&plain, 1.0), (&never_started, 0.0)] {
        let series = format!(
            r#"aistack_container_running{{container="{}",image="{image}"}}"#,
            c.name
        );
        assert_eq!(value(&body, &series), Some(running), "{series}\n{body}");
    }
    assert_eq!(
        value(
            &body,
            &format!(
                r#"aistack_container_restarts_total{{container="{}"}}"#,
                plain.name
            )
        ),
        Some(0.0)
    );
    assert_documented(&body);

    // A removed container disappears from the next sample; the others stay.
    let removed = format!(r#"container="{}""#, plain.name);
    drop(plain);
    let body = wait_for(
        Duration::from_secs(10),
        "the removed container to go",
        || {
            let body = exporter.scrape().body;
            (!body.contains(&removed)).then_some(body)
        },
    );
    assert!(
        body.contains(&format!(r#"container="{}""#, healthy.name)),
        "{body}"
    );
}

#[test]
fn a_missing_socket_is_docker_up_0_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--config.file",
            &config(
                dir.path(),
                &format!("docker: {{socket: 'unix://{}'}}\n", socket.display()),
            ),
        ],
    );
    let body = wait_for(Duration::from_secs(10), "docker_up 0", || {
        let body = exporter.scrape().body;
        (value(&body, "aistack_docker_up") == Some(0.0)).then_some(body)
    });
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="docker"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="cpu"}"#),
        Some(1.0),
        "nothing else breaks"
    );

    // The engine "comes back": the socket appears where the config says.
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    wait_for(Duration::from_secs(10), "docker_up 1", || {
        (value(&exporter.scrape().body, "aistack_docker_up") == Some(1.0)).then_some(())
    });
    let log = exporter.log();
    assert!(
        log.iter()
            .any(|l| l.contains("Docker engine not reachable")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("Docker engine is back")),
        "{log:#?}"
    );
}

#[test]
fn docker_host_wins_over_the_configured_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary(EXPORTER));
    command.env("DOCKER_HOST", "unix:///var/run/docker.sock");
    let exporter = Daemon::start_with(
        command,
        &[
            "--config.file",
            &config(
                dir.path(),
                "docker: {socket: 'unix:///nonexistent/docker.sock'}\n",
            ),
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "docker_up 1 through DOCKER_HOST",
        || (value(&exporter.scrape().body, "aistack_docker_up") == Some(1.0)).then_some(()),
    );
}

#[test]
fn gpu_processes_are_named_after_their_container() {
    let vllm = Container::run("vllm", &[], &["sleep", "3600"]);
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    // A CUDA process in that container, as /proc and NVML would show it.
    let pid_dir = dir.path().join("proc/31337");
    std::fs::create_dir_all(&pid_dir).unwrap();
    std::fs::write(pid_dir.join("comm"), "python3\n").unwrap();
    std::fs::write(pid_dir.join("cmdline"), "python3\0-m\0server\0").unwrap();
    std::fs::write(
        pid_dir.join("cgroup"),
        format!("0::/system.slice/docker-{}.scope\n", vllm.id),
    )
    .unwrap();
    let mut scenario: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gpu/l40s.json")).unwrap())
            .unwrap();
    scenario["devices"][0]["processes"] =
        serde_json::json!([{"pid": 31337, "kind": "compute", "used_memory_bytes": 21474836480u64}]);
    let scenario_path = dir.path().join("scenario.json");
    std::fs::write(&scenario_path, scenario.to_string()).unwrap();

    let config = config(
        dir.path(),
        &format!(
            "gpu: {{nvml_library: {}}}\nservices: [{{name: vllm, kind: vllm, url: 'http://127.0.0.1:8000', container: {}}}]\n",
            fake_nvml_library().display(),
            vllm.name
        ),
    );
    let mut command = Command::new(binary(EXPORTER));
    command.env("FAKE_NVML_SCENARIO", &scenario_path);
    let exporter = Daemon::start_with(
        command,
        &[
            "--config.file",
            &config,
            "--path.procfs",
            dir.path().join("proc").to_str().unwrap(),
        ],
    );
    let want = format!(
        r#"pid="31337",process="python3",kind="compute",container="{}",service="vllm""#,
        vllm.name
    );
    let body = wait_for(
        Duration::from_secs(15),
        "the process named after its container",
        || {
            let body = exporter.scrape().body;
            body.contains(&want).then_some(body)
        },
    );
    assert!(
        body.contains(r#"aistack_gpu_host_workload_active{gpu="0""#),
        "{body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("aistack_gpu_host_workload_active{") && l.ends_with(" 0.0")),
        "an inference service is no host workload:\n{body}"
    );
}

#[test]
fn gpu_processes_in_discovered_inference_containers_are_no_host_workload() {
    // Nothing configured under services: a "vLLM" under vLLM's image name (no port published)
    // and a container of another image, each with a CUDA process holding memory.
    let image = aistack_tests::Image::build(
        "vllm/vllm-openai:aistack-test",
        &[],
        &["/bin/busybox", "sleep", "3600"],
    );
    let vllm = Container::run_image("vllm-discovered", &image.tag, &[]);
    let other = Container::run("transcoder", &[], &["sleep", "3600"]);
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    for (pid, container) in [(31337, &vllm.id), (31338, &other.id)] {
        let pid_dir = dir.path().join(format!("proc/{pid}"));
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::fs::write(pid_dir.join("comm"), "python3\n").unwrap();
        std::fs::write(pid_dir.join("cmdline"), "python3\0-m\0server\0").unwrap();
        std::fs::write(
            pid_dir.join("cgroup"),
            format!("0::/system.slice/docker-{container}.scope\n"),
        )
        .unwrap();
    }
    let scenario: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gpu/l40s.json")).unwrap())
            .unwrap();
    let process = |pid: u32| serde_json::json!({"pid": pid, "kind": "compute", "used_memory_bytes": 21474836480u64});
    let scenario_path = dir.path().join("scenario.json");
    let write_scenario = |processes: serde_json::Value| {
        let mut scenario = scenario.clone();
        scenario["devices"][0]["processes"] = processes;
        std::fs::write(&scenario_path, scenario.to_string()).unwrap();
    };
    write_scenario(serde_json::json!([process(31337)]));

    let config = config(
        dir.path(),
        &format!(
            "  gpu: {{interval: 1s}}\ngpu: {{nvml_library: {}}}\n",
            fake_nvml_library().display()
        ),
    );
    let mut command = Command::new(binary(EXPORTER));
    command.env("FAKE_NVML_SCENARIO", &scenario_path);
    let exporter = Daemon::start_with(
        command,
        &[
            "--config.file",
            &config,
            "--path.procfs",
            dir.path().join("proc").to_str().unwrap(),
        ],
    );
    let workload = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("aistack_gpu_host_workload_active{"))
            .map(|l| l.ends_with(" 1.0"))
    };
    let want = format!(
        r#"pid="31337",process="python3",kind="compute",container="{0}",service="{0}""#,
        vllm.name
    );
    let body = wait_for(
        Duration::from_secs(15),
        "the process attributed to the discovered service",
        || {
            let body = exporter.scrape().body;
            body.contains(&want).then_some(body)
        },
    );
    assert_eq!(
        workload(&body),
        Some(false),
        "vLLM is no host workload:\n{body}"
    );

    // The other container's process is someone else's work on the GPU.
    write_scenario(serde_json::json!([process(31337), process(31338)]));
    let want = format!(
        r#"pid="31338",process="python3",kind="compute",container="{}",service="""#,
        other.name
    );
    let body = wait_for(Duration::from_secs(15), "the second process", || {
        let body = exporter.scrape().body;
        body.contains(&want).then_some(body)
    });
    assert_eq!(workload(&body), Some(true), "{body}");
}

#[test]
fn containers_of_known_inference_images_are_discovered_and_probed() {
    // An "Ollama" that is busybox httpd serving Ollama's real payloads, under Ollama's image name.
    let fixture =
        |name: &str| std::fs::read_to_string(fixtures().join("services").join(name)).unwrap();
    let (version, tags, ps) = (
        fixture("ollama-version.json"),
        fixture("ollama-tags.json"),
        fixture("ollama-ps.json"),
    );
    let image = aistack_tests::Image::build(
        "ollama/ollama:aistack-test",
        &[
            ("/www/api/version", &version),
            ("/www/api/tags", &tags),
            ("/www/api/ps", &ps),
        ],
        &["/bin/busybox", "httpd", "-f", "-p", "11434", "-h", "/www"],
    );
    let ollama = Container::run_image("ollama", &image.tag, &["-p", "127.0.0.1::11434"]);

    let dir = tempfile::tempdir().unwrap();
    let exporter = Daemon::start(
        EXPORTER,
        &[
            "--config.file",
            &config(dir.path(), "  services: {interval: 1s}\n"),
        ],
    );
    let up = format!(
        r#"aistack_service_up{{service="{}",kind="ollama"}}"#,
        ollama.name
    );
    let body = wait_for(
        Duration::from_secs(20),
        "the discovered Ollama to be up",
        || {
            let body = exporter.scrape().body;
            (value(&body, &up) == Some(1.0)).then_some(body)
        },
    );
    let tags: serde_json::Value = serde_json::from_str(&tags).unwrap();
    let first = &tags["models"][0];
    let size = format!(
        r#"aistack_ollama_model_size_bytes{{service="{}",model="{}"}}"#,
        ollama.name,
        first["name"].as_str().unwrap()
    );
    assert_eq!(value(&body, &size), first["size"].as_f64(), "{body}");
    assert!(
        body.contains("aistack_ollama_model_loaded_vram_bytes{"),
        "{body}"
    );
    assert_documented(&body);
}
