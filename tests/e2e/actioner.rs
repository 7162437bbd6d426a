//! aistack-actioner end to end, as far as it goes today: config checks, refusing to start
//! without auth, /healthz and /metrics, clean shutdown.

use std::path::Path;

use aistack_tests::{Daemon, check_text_format, fixtures, parse_openmetrics, run};

const ACTIONER: &str = "aistack-actioner";

/// A valid config whose secret files live in `dir`.
fn write_config(dir: &Path) -> String {
    aistack_tests::write_secret(dir.join("token"), "0123456789abcdef\n");
    aistack_tests::write_secret(dir.join("wake.key"), "relay-key\n");
    let config = format!(
        r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: wake-on-demand, match: {{alertname: AistackWakeRequested}}, action: wake, target: gpu-box}}
  - {{name: repair, match: {{alertname: AistackContainerUnhealthy}}, action: repair, target_label: container}}
actions:
  wake:
    key_file: {key}
    targets:
      gpu-box: {{mac: "AA-BB-CC-DD-EE-FF", broadcast: 127.255.255.255}}
  repair:
    docker: {{containers: [ollama]}}
"#,
        state = dir.join("state").display(),
        token = dir.join("token").display(),
        key = dir.join("wake.key").display(),
    );
    let path = dir.join("actioner.yaml");
    std::fs::write(&path, config).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn serves_healthz_and_metrics_with_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let actioner = Daemon::start(ACTIONER, &["--config.file", &config]);
    let health = actioner.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    let metrics = actioner.scrape();
    assert_eq!(metrics.status, 200);
    let families =
        parse_openmetrics(&metrics.body).unwrap_or_else(|e| panic!("{e}\n{}", metrics.body));
    let text = actioner.get("/metrics");
    assert_eq!(
        text.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    check_text_format(&text.body).unwrap_or_else(|e| panic!("{e}\n{}", text.body));
    for family in [
        "aistack_actioner_build_info",
        "aistack_actioner_paused",
        "aistack_actioner_inference_backend",
    ] {
        assert!(
            families.iter().any(|f| f == family),
            "{family} missing: {families:?}"
        );
    }
    assert!(
        actioner
            .log()
            .iter()
            .any(|l| l.contains(r#""host":"gpu-box""#)),
        "{:#?}",
        actioner.log()
    );
    // The container health check: 0 while it answers, 1 with one line once it is gone.
    let address = actioner.address.clone();
    let (code, _, stderr) = run(ACTIONER, &["healthcheck", "--web.listen-address", &address]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert!(actioner.terminate().success());
    let (code, _, stderr) = run(ACTIONER, &["healthcheck", "--web.listen-address", &address]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("aistack-actioner healthcheck: http://") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn refuses_to_start_without_a_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let (code, _, err) = run(
        ACTIONER,
        &[
            "--config.file",
            &config,
            "--web.listen-address",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("auth.bearer_token_file: cannot read"), "{err}");

    aistack_tests::write_secret(dir.path().join("token"), "  \n");
    let (code, _, err) = run(
        ACTIONER,
        &[
            "--config.file",
            &config,
            "--web.listen-address",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("token is empty"), "{err}");
}

#[test]
fn check_config_lists_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let (code, out, err) = run(ACTIONER, &["check-config", "--config.file", &config]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");

    // The contract's example is valid YAML and valid rules, but its secret files do not exist here.
    let example = fixtures().join("config/actioner-contract.yaml");
    let (code, _, err) = run(
        ACTIONER,
        &["check-config", "--config.file", example.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    let paths: Vec<&str> = err.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "auth.bearer_token_file",
            "actions.wake.key_file",
            "actions.notify.ntfy.token_file"
        ],
        "{err}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "rules:\n  - {name: x, match: {alertname: A}, action: wake, target: nas}\n\
         actions:\n  wake:\n    targets:\n      gpu-host: {mac: \"zz:bb:cc:dd:ee:ff\"}\n",
    )
    .unwrap();
    let (code, _, err) = run(
        ACTIONER,
        &["check-config", "--config.file", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    // A value that does not parse stops the reading (and says where in the file it is) ...
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(
            r#"actions.wake.targets.gpu-host.mac: invalid MAC "zz:bb:cc:dd:ee:ff" at line 6"#
        ),
        "{err}"
    );
    // ... and once it parses, every other problem is listed at once.
    std::fs::write(
        &bad,
        "rules:\n  - {name: x, match: {alertname: A}, action: wake, target: nas}\n\
         \x20 - {name: x, match: {alertname: B}, action: repair}\n\
         actions:\n  wake:\n    targets:\n      gpu-host: {mac: \"aa:bb:cc:dd:ee:ff\", port: 0}\n",
    )
    .unwrap();
    let (code, _, err) = run(
        ACTIONER,
        &["check-config", "--config.file", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert_eq!(
        err.lines().collect::<Vec<_>>(),
        [
            r#"rules[0].target: "nas" is not in the wake allowlist (gpu-host)"#,
            r#"rules[1].name: duplicate rule name "x""#,
            "actions.wake.targets.gpu-host.port: must be 1..65535",
        ]
    );

    std::fs::write(&bad, "rules:\n  - {name: x, action: reboot}\n").unwrap();
    let (code, _, err) = run(
        ACTIONER,
        &["check-config", "--config.file", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("rules[0].action: unknown variant `reboot`"),
        "{err}"
    );
}

/// A tmpfs of `size` mounted on `path`, unmounted on drop; `None` where mounting is not allowed.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(path.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_journal_that_cannot_be_written_answers_500_and_nothing_acts() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let state = dir.path().join("state");
    let Some(_disk) = SmallDisk::mount(&state, "16k") else {
        eprintln!("skipped: mounting a tmpfs needs root (./tests/run runs as root)");
        return;
    };
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "broadcast: 127.255.255.255",
            &format!("broadcast: 127.0.0.1, port: {port}"),
        ),
    )
    .unwrap();
    let actioner = Daemon::start(ACTIONER, &["--config.file", &config]);
    // The disk fills up.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let webhook = r#"{"version":"4","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"AistackWakeRequested","instance":"gpu-box:9470"},"startsAt":"2026-11-22T21:00:00Z","fingerprint":"f1"}]}"#;
    let url = actioner.url("/api/v1/alerts");
    let reply = aistack_tests::post_json(&url, Some("0123456789abcdef"), webhook);
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert!(reply.body.contains("journal unavailable"), "{}", reply.body);
    udp.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    assert!(udp.recv_from(&mut [0u8; 256]).is_err(), "nothing acted");

    // Space again: Alertmanager's retry acts, once.
    std::fs::remove_file(&filler).unwrap();
    let reply = aistack_tests::post_json(&url, Some("0123456789abcdef"), webhook);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains(r#""planned":1"#), "{}", reply.body);
    udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert!(udp.recv_from(&mut [0u8; 256]).is_ok(), "the retry acted");
    drop(actioner);
}

/// No system bus, no Docker socket, no kubeconfig: the actioner starts, says once at start which
/// actions fail until each piece appears, and serves (the compose bundle runs it so too).
#[test]
fn missing_pieces_are_announced_at_start_and_the_rest_runs() {
    let dir = tempfile::tempdir().unwrap();
    aistack_tests::write_secret(dir.path().join("token"), "0123456789abcdef\n");
    let config = dir.path().join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: sleep, match: {{alertname: AistackHostIdle}}, action: suspend}}
  - {{name: over, match: {{alertname: AistackVllmDown}}, action: failover}}
  - {{name: back, match: {{alertname: AistackVllmDown}}, on: resolved, action: failback}}
  - {{name: fix, match: {{alertname: AistackContainerUnhealthy}}, action: repair, target_label: container}}
actions:
  failover: {{platform: docker, docker: {{primary: vllm, fallback: ollama}}}}
  repair: {{kubernetes: {{deployments: [ml/ollama]}}}}
"#,
            state = dir.path().join("state").display(),
            token = dir.path().join("token").display(),
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(aistack_tests::binary(ACTIONER));
    command
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/system_bus_socket",
        )
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir.path());
    let actioner = Daemon::start_with(command, &["--config.file", config.to_str().unwrap()]);
    assert_eq!(actioner.get("/healthz").status, 200);
    let log = actioner.log();
    let said = |missing: &str, actions: &str| {
        log.iter()
            .filter(|l| l.contains(missing) && l.contains(&format!(r#""actions":"{actions}""#)))
            .count()
    };
    assert_eq!(
        said("no socket at /nonexistent/system_bus_socket", "suspend"),
        1,
        "{log:#?}"
    );
    assert_eq!(
        said(
            "no socket at /nonexistent/docker.sock",
            "failover, failback"
        ),
        1,
        "{log:#?}"
    );
    assert_eq!(said("a Kubernetes API", "repair"), 1, "{log:#?}");
    assert!(actioner.terminate().success());
}
