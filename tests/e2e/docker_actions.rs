//! The failover, failback and repair actions against the real Docker engine of this machine,
//! with busybox stand-ins for vLLM and Ollama (httpd serving their health endpoints) and a
//! stand-in exporter for the host-workload re-check.

use std::process::Command;
use std::time::{Duration, Instant};

use aistack_tests::stub::{StubServer, gpu_report};
use aistack_tests::{
    Container, Daemon, Image, binary, docker, free_port, get_with_token, post_json, wait_for,
};

const TOKEN: &str = "0123456789abcdef";

fn running(name: &str) -> bool {
    docker(&["inspect", "--format", "{{.State.Running}}", name]) == "true"
}

fn actioner(dir: &std::path::Path, exporter: &str, actions: &str, rules: &str) -> Daemon {
    aistack_tests::write_secret(dir.join("token"), TOKEN);
    let config = dir.join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            "host: gpu-box\nstate_dir: {}\nexporter_url: {exporter}\nauth: {{bearer_token_file: {}}}\nrules:\n{rules}\nactions:\n{actions}",
            dir.join("state").display(),
            dir.join("token").display(),
        ),
    )
    .unwrap();
    Daemon::start_with(
        Command::new(binary("aistack-actioner")),
        &["--config.file", config.to_str().unwrap()],
    )
}

fn trigger(actioner: &Daemon, action: &str, body: &str) -> serde_json::Value {
    let reply = post_json(
        &actioner.url(&format!("/api/v1/actions/{action}")),
        Some(TOKEN),
        body,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

/// Rules that fail over while a game holds the GPU, and back when it ends.
const GAME_RULES: &str = "  - {name: game-on, match: {alertname: AistackGpuHostWorkload}, on: firing, action: failover}\n  - {name: game-off, match: {alertname: AistackGpuHostWorkload}, on: resolved, action: failback}\n";

/// The host-workload alert for GPU 0, as Alertmanager sends it, `firing` or `resolved`.
fn game(fingerprint: &str, status: &str) -> String {
    format!(
        r#"{{"version":"4","status":"{status}","alerts":[{{"status":"{status}","labels":{{"alertname":"AistackGpuHostWorkload","gpu":"0"}},"startsAt":"2026-11-22T21:00:00Z","fingerprint":"{fingerprint}"}}]}}"#
    )
}

/// Containers for vLLM and Ollama, and an actioner failing over between them that re-checks
/// the GPU with a stand-in exporter.
struct Backends {
    actioner: Daemon,
    exporter: StubServer,
    vllm: Container,
    ollama: Container,
    _dir: tempfile::TempDir,
}

impl Backends {
    /// Containers named `names` from `images` (vLLM's, then Ollama's): vLLM running when
    /// `on_primary`, else Ollama; the exporter says a game holds the GPU when `gaming`.
    fn start(
        names: [&str; 2],
        images: [&Image; 2],
        on_primary: bool,
        gaming: bool,
        primary_timeout: &str,
        rules: &str,
    ) -> Self {
        let (vllm_port, ollama_port) = (free_port(), free_port());
        let container = |running: bool, name, image: &Image, ports: String| {
            let args = ["--init", "-p", &ports];
            if running {
                Container::run_image(name, &image.tag, &args)
            } else {
                Container::create_image(name, &image.tag, &args)
            }
        };
        let vllm = container(
            on_primary,
            names[0],
            images[0],
            format!("127.0.0.1:{vllm_port}:8000"),
        );
        let ollama = container(
            !on_primary,
            names[1],
            images[1],
            format!("127.0.0.1:{ollama_port}:11434"),
        );
        let exporter = StubServer::start();
        exporter.set("/api/v1/gpu", 200, &gpu_report(gaming));
        let dir = tempfile::tempdir().unwrap();
        let actions = format!(
            "  failover:\n    docker: {{primary: {}, fallback: {}}}\n    primary_health_url: http://127.0.0.1:{vllm_port}/health\n    fallback_health_url: http://127.0.0.1:{ollama_port}/api/tags\n    primary_timeout: {primary_timeout}\n",
            vllm.name, ollama.name
        );
        let actioner = actioner(dir.path(), &exporter.url, &actions, rules);
        Self {
            actioner,
            exporter,
            vllm,
            ollama,
            _dir: dir,
        }
    }

    /// Sends `webhook` to the actioner, which must take it.
    fn alert(&self, webhook: &str) {
        let reply = post_json(&self.actioner.url("/api/v1/alerts"), Some(TOKEN), webhook);
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

#[test]
fn failover_frees_the_gpu_and_failback_restores_vllm_only_when_it_is_healthy() {
    let vllm_image = Image::build(
        "aistack-test/vllm:1",
        &[
            ("/www/health", ""),
            ("/www/v1/models", r#"{"object":"list","data":[]}"#),
        ],
        &["/bin/busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
    );
    let ollama_image = Image::build(
        "aistack-test/ollama:1",
        &[("/www/api/tags", r#"{"models":[]}"#)],
        &["/bin/busybox", "httpd", "-f", "-p", "11434", "-h", "/www"],
    );
    let backends = Backends::start(
        ["vllm", "ollama"],
        [&vllm_image, &ollama_image],
        true,
        true,
        "20s",
        GAME_RULES,
    );
    let Backends {
        actioner,
        exporter,
        vllm,
        ollama,
        ..
    } = &backends;

    // Someone starts a game: the alert fires.
    let started = Instant::now();
    backends.alert(&game("g1", "firing"));
    wait_for(Duration::from_secs(30), "the fallback to serve", || {
        let reply = get_with_token(&actioner.url("/api/v1/state"), TOKEN);
        reply
            .body
            .contains(r#""inference_backend":"fallback""#)
            .then_some(())
    });
    let gaming_mode = started.elapsed();
    assert!(!running(&vllm.name), "vLLM stopped: its VRAM is free");
    assert!(running(&ollama.name));
    eprintln!(
        "gaming mode (alert to fallback serving): {:.1}s",
        gaming_mode.as_secs_f64()
    );

    // Failing over again changes nothing.
    let again = trigger(actioner, "failover", "{}");
    assert_eq!(again["status"], "succeeded");
    assert!(
        again["detail"]
            .as_str()
            .unwrap()
            .starts_with("already on the fallback"),
        "{again}"
    );

    // The alert resolves while the game still holds the GPU (a flap): no failback.
    backends.alert(&game("g1", "resolved"));
    let skipped = wait_for(
        Duration::from_secs(15),
        "the failback to be skipped",
        || {
            let tail: Vec<serde_json::Value> = serde_json::from_str(
                &get_with_token(&actioner.url("/api/v1/actions?limit=20"), TOKEN).body,
            )
            .unwrap();
            tail.into_iter()
                .find(|e| e["action"] == "failback" && e["event"] == "skipped")
        },
    );
    assert!(
        skipped["detail"]
            .as_str()
            .unwrap()
            .contains("host workload still holds GPU 0 (steam)"),
        "{skipped}"
    );
    assert!(!running(&vllm.name));

    // The game ends: failback brings vLLM back once it answers.
    exporter.set("/api/v1/gpu", 200, &gpu_report(false));
    let started = Instant::now();
    let back = trigger(actioner, "failback", "{}");
    assert_eq!(back["status"], "succeeded", "{back}");
    eprintln!(
        "ML mode (failback to vLLM healthy): {:.1}s; {}",
        started.elapsed().as_secs_f64(),
        back["detail"]
    );
    assert!(running(&vllm.name));
    let state = get_with_token(&actioner.url("/api/v1/state"), TOKEN).body;
    assert!(
        state.contains(r#""inference_backend":"primary""#),
        "{state}"
    );
    let metrics = aistack_tests::get(&actioner.url("/metrics")).body;
    assert!(
        metrics.contains(r#"aistack_actioner_inference_backend{backend="primary"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_primary_that_never_answers_leaves_the_fallback_serving() {
    // A "vLLM" whose /health never answers 2xx (the model does not load).
    let broken_image = Image::build(
        "aistack-test/vllm-broken:1",
        &[("/www/ready", "")],
        &["/bin/busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
    );
    let ollama_image = Image::build(
        "aistack-test/ollama-b:1",
        &[("/www/api/tags", r#"{"models":[]}"#)],
        &["/bin/busybox", "httpd", "-f", "-p", "11434", "-h", "/www"],
    );
    let Backends {
        actioner,
        vllm,
        ollama,
        ..
    } = &Backends::start(
        ["vllm-broken", "ollama-b"],
        [&broken_image, &ollama_image],
        false,
        false,
        "3s",
        "  []",
    );
    let back = trigger(actioner, "failback", "{}");
    assert_eq!(back["status"], "failed", "{back}");
    assert!(
        back["detail"]
            .as_str()
            .unwrap()
            .starts_with("staying on the fallback"),
        "{back}"
    );
    assert!(
        !running(&vllm.name),
        "the half-started primary is stopped again"
    );
    assert!(running(&ollama.name));
}

#[test]
fn repair_restarts_then_recreates_and_leaves_stopped_containers_alone() {
    let volume = format!("aistack-test-{}-data", std::process::id());
    // Removed after the containers (declared first, dropped last): a named volume outlives them.
    struct RemoveVolume(String);
    impl Drop for RemoveVolume {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker")
                .args(["volume", "rm", "-f", &self.0])
                .output();
        }
    }
    let _remove_volume = RemoveVolume(volume.clone());
    let healthy_after_restart = Container::run(
        "flaky",
        &[
            "-v",
            &format!("{volume}:/data"),
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
            "if [ -f /data/once ]; then /bin/busybox touch /ok; fi; /bin/busybox touch /data/once; exec /bin/busybox sleep 3600",
        ],
    );
    let never_healthy = Container::run(
        "broken",
        &[
            "-v",
            "/scratch",
            "--health-cmd",
            "/bin/busybox false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--label",
            "keep=me",
        ],
        &[
            "sh",
            "-c",
            "/bin/busybox touch /scratch/marker; exec /bin/busybox sleep 3600",
        ],
    );
    let stopped = Container::run(
        "stopped",
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
    let unlisted = Container::run("unlisted", &[], &["sleep", "3600"]);
    wait_for(Duration::from_secs(20), "both to be unhealthy", || {
        let unhealthy = |c: &Container| {
            docker(&["inspect", "--format", "{{.State.Health.Status}}", &c.name]) == "unhealthy"
        };
        (unhealthy(&healthy_after_restart) && unhealthy(&never_healthy)).then_some(())
    });
    docker(&["stop", "-t", "1", &stopped.name]);
    let anonymous_before = docker(&[
        "inspect",
        "--format",
        "{{range .Mounts}}{{if eq .Destination \"/scratch\"}}{{.Name}}{{end}}{{end}}",
        &never_healthy.name,
    ]);

    let dir = tempfile::tempdir().unwrap();
    let actions = format!(
        "  repair:\n    docker: {{containers: [{}, {}, {}]}}\n    max_attempts: 1\n    window: 1h\n    healthy_timeout: 6s\n",
        healthy_after_restart.name, never_healthy.name, stopped.name
    );
    let rules = "  - {name: heal, match: {alertname: AistackContainerUnhealthy}, action: repair, target_label: container}\n";
    let exporter = StubServer::start();
    let actioner = actioner(dir.path(), &exporter.url, &actions, rules);

    let fixed = trigger(
        &actioner,
        "repair",
        &format!(r#"{{"target":"{}"}}"#, healthy_after_restart.name),
    );
    assert_eq!(fixed["status"], "succeeded", "{fixed}");
    assert!(
        fixed["detail"].as_str().unwrap().starts_with("restarted"),
        "{fixed}"
    );

    let gave_up = trigger(
        &actioner,
        "repair",
        &format!(r#"{{"target":"{}"}}"#, never_healthy.name),
    );
    assert_eq!(gave_up["status"], "failed", "{gave_up}");
    assert!(
        gave_up["detail"]
            .as_str()
            .unwrap()
            .contains("after a restart and a recreate"),
        "{gave_up}"
    );
    // Recreated from its own config: same labels, and the anonymous volume with its data.
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{index .Config.Labels \"keep\"}}",
            &never_healthy.name
        ]),
        "me"
    );
    let anonymous_after = docker(&[
        "inspect",
        "--format",
        "{{range .Mounts}}{{if eq .Destination \"/scratch\"}}{{.Name}}{{end}}{{end}}",
        &never_healthy.name,
    ]);
    assert_eq!(
        anonymous_after, anonymous_before,
        "the same volume is mounted"
    );

    let left = trigger(
        &actioner,
        "repair",
        &format!(r#"{{"target":"{}"}}"#, stopped.name),
    );
    assert_eq!(left["status"], "skipped", "{left}");
    assert!(
        left["detail"]
            .as_str()
            .unwrap()
            .contains("stopped on purpose"),
        "{left}"
    );
    assert!(
        !running(&stopped.name),
        "a container stopped by hand stays stopped"
    );

    let reply = post_json(
        &actioner.url("/api/v1/actions/repair"),
        Some(TOKEN),
        &format!(r#"{{"target":"{}"}}"#, unlisted.name),
    );
    assert_eq!(reply.status, 400, "{}", reply.body);

    // Alerts: the broken one fires again and again; max_attempts 1 per hour, then a person.
    for (n, starts) in ["2026-11-22T21:00:00Z", "2026-11-22T21:10:00Z"]
        .iter()
        .enumerate()
    {
        let body = format!(
            r#"{{"version":"4","status":"firing","alerts":[{{"status":"firing","labels":{{"alertname":"AistackContainerUnhealthy","container":"{}"}},"startsAt":"{starts}","fingerprint":"r{n}"}}]}}"#,
            never_healthy.name
        );
        assert_eq!(
            post_json(&actioner.url("/api/v1/alerts"), Some(TOKEN), &body).status,
            200
        );
    }
    let exhausted = wait_for(Duration::from_secs(60), "the exhaustion", || {
        let tail: Vec<serde_json::Value> = serde_json::from_str(
            &get_with_token(&actioner.url("/api/v1/actions?limit=50"), TOKEN).body,
        )
        .unwrap();
        tail.into_iter().find(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("repairs exhausted"))
        })
    });
    assert_eq!(
        exhausted["target"].as_str(),
        Some(never_healthy.name.as_str())
    );
    let metrics = aistack_tests::get(&actioner.url("/metrics")).body;
    assert!(
        metrics.contains(&format!(
            r#"aistack_actioner_repair_exhausted{{target="{}"}} 1"#,
            never_healthy.name
        )),
        "{metrics}"
    );
    // A restart keeps it: the journal says the target was left to a person within the window.
    assert!(actioner.terminate().success());
    let actioner = self::actioner(dir.path(), &exporter.url, &actions, rules);
    let metrics = aistack_tests::get(&actioner.url("/metrics")).body;
    assert!(
        metrics.contains(&format!(
            r#"aistack_actioner_repair_exhausted{{target="{}"}} 1"#,
            never_healthy.name
        )),
        "{metrics}"
    );
    drop(actioner);
    let _ = Command::new("docker")
        .args(["volume", "rm", "-f", &volume, &anonymous_before])
        .output();
}

#[test]
fn a_name_the_engine_would_read_as_an_id_prefix_hits_no_other_container() {
    // An unhealthy container, and an allowlisted name that is the start of its id: the engine
    // answers an inspect of that name with this container. Repairing "that name" must not
    // restart it.
    let victim = Container::run(
        "victim",
        &[
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        &["sleep", "3600"],
    );
    wait_for(
        Duration::from_secs(30),
        "the victim to turn unhealthy",
        || {
            (docker(&[
                "inspect",
                "--format",
                "{{.State.Health.Status}}",
                &victim.name,
            ]) == "unhealthy")
                .then_some(())
        },
    );
    let id = docker(&["inspect", "--format", "{{.Id}}", &victim.name]);
    let prefix = &id[..12];
    let started_before = docker(&["inspect", "--format", "{{.State.StartedAt}}", &victim.name]);
    assert_eq!(
        docker(&["inspect", "--format", "{{.Name}}", prefix]),
        format!("/{}", victim.name),
        "the engine resolves the prefix to the victim"
    );

    let dir = tempfile::tempdir().unwrap();
    let exporter = StubServer::start();
    let actions = format!("  repair:\n    docker: {{containers: [\"{prefix}\"]}}\n");
    let actioner = actioner(dir.path(), &exporter.url, &actions, "  []\n");
    let outcome = trigger(&actioner, "repair", &format!(r#"{{"target":"{prefix}"}}"#));
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert_eq!(
        outcome["detail"].as_str(),
        Some(format!("no container named {prefix}").as_str())
    );
    assert_eq!(
        docker(&["inspect", "--format", "{{.State.StartedAt}}", &victim.name]),
        started_before,
        "the victim was not restarted"
    );
}

#[test]
fn a_game_of_one_second_fails_back_after_the_failover_ends_not_during_it() {
    let vllm_image = Image::build(
        "aistack-test/vllm-1s:1",
        &[("/www/health", "")],
        &["/bin/busybox", "httpd", "-f", "-p", "8000", "-h", "/www"],
    );
    // An Ollama that takes three seconds to answer, as one loading its model cache does.
    let ollama_image = Image::build(
        "aistack-test/ollama-slow:1",
        &[("/www/api/tags", r#"{"models":[]}"#)],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "sleep 3; exec /bin/busybox httpd -f -p 11434 -h /www",
        ],
    );
    let backends = Backends::start(
        ["vllm-1s", "ollama-slow"],
        [&vllm_image, &ollama_image],
        true,
        true,
        "20s",
        GAME_RULES,
    );
    let Backends {
        actioner,
        exporter,
        vllm,
        ..
    } = &backends;
    backends.alert(&game("s1", "firing"));
    // The game ends a second later, while Ollama is still coming up.
    std::thread::sleep(Duration::from_secs(1));
    exporter.set("/api/v1/gpu", 200, &gpu_report(false));
    backends.alert(&game("s1", "resolved"));
    let journal = wait_for(Duration::from_secs(60), "the failback to end", || {
        let tail: Vec<serde_json::Value> = serde_json::from_str(
            &get_with_token(&actioner.url("/api/v1/actions?limit=100"), TOKEN).body,
        )
        .unwrap();
        tail.iter()
            .any(|e| e["action"] == "failback" && e["event"] == "succeeded")
            .then_some(tail)
    });
    let seq = |action: &str, event: &str| {
        journal
            .iter()
            .find(|e| e["action"] == action && e["event"] == event)
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or_else(|| panic!("no {action} {event}: {journal:#?}"))
    };
    assert!(
        seq("failover", "succeeded") < seq("failback", "started"),
        "the failback began only after the failover ended: {journal:#?}"
    );
    let state = get_with_token(&actioner.url("/api/v1/state"), TOKEN).body;
    assert!(
        state.contains(r#""inference_backend":"primary""#),
        "{state}"
    );
    assert!(running(&vllm.name), "vLLM serves again");
}
