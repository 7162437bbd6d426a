//! check-config's answers: every problem, with its YAML path.

use aistack_common::config::parse;

use super::*;
use crate::actions::suspend::SuspendMode;

/// Every problem check-config reports for `text`, as printed.
fn problems_in(text: &str) -> Vec<String> {
    parse::<Config>(text)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect()
}

const CONTRACT_EXAMPLE: &str =
    include_str!("../../../tests/fixtures/config/actioner-contract.yaml");

#[test]
fn the_contract_example_is_valid() {
    let config: Config = parse(CONTRACT_EXAMPLE).unwrap_or_else(|p| panic!("{p:#?}"));
    assert_eq!(config.host.as_deref(), Some("gpu-box"));
    assert_eq!(config.rules.len(), 5);
    assert_eq!(config.rules[1].action, ActionKind::Failover);
    assert_eq!(config.rules[2].on, Trigger::Resolved);
    assert_eq!(config.actions.wake.targets["gpu-box"].port, 9);
    assert_eq!(config.actions.suspend.mode, SuspendMode::Suspend);
}

#[test]
fn defaults_are_valid() {
    let config: Config = parse("").unwrap();
    assert_eq!(config.limits.max_body_bytes, 1_048_576);
    assert!(config.rules.is_empty());
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let text = r#"
host: gpu-box
state_dir: relative/dir
exporter_url: "ftp://x"
rules:
  - {name: a, match: {alertname: X}, action: wake, target: other-box}
  - {name: a, action: repair, target: vllm, target_label: container}
  - {name: b, match_re: {severity: "(crit"}, action: notify}
  - {name: c, match: {alertname: Y}, action: failover, target: vllm}
actions:
  wake:
    targets:
      gpu-host: {mac: "aa:bb:cc:dd:ee:ff", port: 0}
  repair:
    docker: {containers: [open-webui]}
    kubernetes: {deployments: ["ml/ollama"]}
    max_attempts: 0
"#;
    assert_eq!(
        problems_in(text),
        [
            r#"state_dir: must be an absolute path, got "relative/dir""#,
            r#"exporter_url: invalid URL "ftp://x": expected http://host[:port][/path] or https://..."#,
            r#"rules[0].target: "other-box" is not in the wake allowlist (gpu-host)"#,
            r#"rules[1].name: duplicate rule name "a""#,
            r#"rules[1].match: a rule needs `match` or `match_re`; write match_re: {alertname: ".+"} to match every alert"#,
            "rules[1].target: set `target` or `target_label`, not both",
            r#"rules[1].target: "vllm" is not in the repair allowlist (ml/ollama, open-webui)"#,
            r#"rules[2].match_re.severity: invalid regex "(crit": unclosed group"#,
            "rules[2].action: notify needs actions.notify.ntfy",
            "rules[3].target: the failover action takes no target",
            "rules[3].action: failover needs actions.failover.docker",
            "actions.wake.targets.gpu-host.port: must be 1..65535",
            "actions.repair.max_attempts: must be at least 1",
        ]
    );
}

#[test]
fn values_that_parse_themselves_name_their_path() {
    for (text, want) in [
        (
            r#"actions: {wake: {targets: {gpu-host: {mac: "zz:bb:cc:dd:ee:ff"}}}}"#,
            r#"actions.wake.targets.gpu-host.mac: invalid MAC "zz:bb:cc:dd:ee:ff""#,
        ),
        (
            r#"actions: {wake: {targets: {gpu-host: {mac: "aa:bb:cc:dd:ee:ff", broadcast: "192.168.0.300"}}}}"#,
            "actions.wake.targets.gpu-host.broadcast: invalid IP address syntax",
        ),
        (
            r#"actions: {wake: {targets: {gpu-host: {mac: "aa:bb:cc:dd:ee:ff", secureon: "pw"}}}}"#,
            "actions.wake.targets.gpu-host.secureon: invalid SecureOn password: six bytes written like a MAC (aa:bb:cc:dd:ee:ff)",
        ),
        (
            r#"actions: {wake: {relay: {networks: ["10.0.0.0"]}}}"#,
            r#"actions.wake.relay.networks[0]: invalid network "10.0.0.0": write an IPv4 network like 192.168.1.0/24"#,
        ),
        (
            r#"actions: {repair: {kubernetes: {deployments: ["ollama"]}}}"#,
            r#"actions.repair.kubernetes.deployments[0]: expected namespace/name, got "ollama""#,
        ),
        (
            "actions: {failover: {platform: swarm}}",
            "actions.failover.platform: unknown variant `swarm`, expected `docker` or `kubernetes`",
        ),
    ] {
        let problems = problems_in(text);
        assert_eq!(problems.len(), 1, "{text}: {problems:?}");
        // serde_yaml adds where in the file it was: " at line 1 column 38".
        assert!(problems[0].starts_with(want), "{text}: {problems:?}");
    }
}

#[test]
fn the_failover_platform_carries_its_settings() {
    use crate::actions::failover::Platform;
    let config: Config = parse(
        "actions: {failover: {platform: kubernetes, kubernetes: {namespace: ml, primary: vllm, fallback: ollama, service: inference}, docker: {primary: a, fallback: b}}}",
    )
    .unwrap();
    assert!(
        matches!(&config.actions.failover.pair.platform, Platform::Kubernetes(k) if k.service == "inference")
    );
    let unconfigured: Config = parse("actions: {failover: {platform: kubernetes}}").unwrap();
    assert_eq!(
        unconfigured.actions.failover.missing_section(),
        Some("kubernetes")
    );
    let defaults: Config = parse("").unwrap();
    assert_eq!(defaults.actions.failover.missing_section(), Some("docker"));
}

#[test]
fn button_problems_are_reported_with_their_paths() {
    let text = r#"
host: gpu-box
actions:
  wake:
    targets:
      nas: {mac: "aa:bb:cc:dd:ee:ff"}
  notify:
    buttons:
      url: "gpu-box:9471"
      key_file: /etc/aistack/buttons.key
      ttl: 10s
      offer:
        - {label: Wake, action: wake}
        - {match: {alertname: A}, label: "", action: notify}
        - {match: {alertname: A}, label: Wake the printer, action: wake, target: printer}
        - {match_re: {alertname: "(A"}, label: Repair, action: repair}
        - {match: {alertname: A}, label: Fail back, action: failback}
        - {match: {alertname: A}, label: "Wake {target}", action: wake}
"#;
    assert_eq!(
        problems_in(text),
        [
            "actions.notify.buttons: buttons go on notifications: they need actions.notify.ntfy",
            r#"actions.notify.buttons.url: invalid URL "gpu-box:9471": expected http://host[:port][/path] or https://..."#,
            "actions.notify.buttons.ttl: must be 1m to 30d",
            "actions.notify.buttons.offer[0].match: an offer needs `match` or `match_re`",
            "actions.notify.buttons.offer[1].label: must be 1 to 40 characters",
            "actions.notify.buttons.offer[1].action: a button cannot run notify",
            "actions.notify.buttons.offer[1].action: notify needs actions.notify.ntfy",
            r#"actions.notify.buttons.offer[2].target: "printer" is not in the wake allowlist (nas)"#,
            r#"actions.notify.buttons.offer[3].match_re.alertname: invalid regex "(A": unclosed group"#,
            "actions.notify.buttons.offer[3].target: a repair button needs `target` or `target_label`",
            "actions.notify.buttons.offer[4].action: failback needs actions.failover.docker",
        ]
    );
}

#[test]
fn a_button_key_must_be_long_enough_to_sign_with() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("buttons.key");
    let text = format!(
        "actions:\n  notify:\n    ntfy: {{topic: t}}\n    buttons: {{url: \"http://gpu-box:9471\", key_file: {}}}\n",
        key.display()
    );
    let config: Config = parse(&text).unwrap_or_else(|p| panic!("{p:#?}"));
    let problems = |config: &Config| {
        let mut problems = Problems::default();
        config.check_files(&mut problems);
        problems
            .into_vec()
            .into_iter()
            .map(|p| p.to_string())
            .filter(|p| p.starts_with("actions.notify.buttons"))
            .collect::<Vec<_>>()
    };
    assert!(
        problems(&config)[0].contains("cannot read"),
        "{:?}",
        problems(&config)
    );
    write_secret(&key, "short\n");
    assert_eq!(
        problems(&config),
        [format!(
            "actions.notify.buttons.key_file: {} holds 5 characters; a signing key needs at least 32 (openssl rand -hex 32)",
            key.display()
        )]
    );
    write_secret(&key, &format!("{}\n", "ab".repeat(32)));
    assert!(problems(&config).is_empty());
    assert_eq!(
        config.actions.notify.buttons.unwrap().ttl,
        HumanDuration::from_secs(12 * 3600)
    );
}

#[test]
fn secret_files_must_exist_and_hold_something() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let mut config = Config::default();
    config.auth.bearer_token_file = token.clone();
    let problems = |config: &Config| {
        let mut problems = Problems::default();
        config.check_files(&mut problems);
        problems
            .into_vec()
            .into_iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    let missing = problems(&config);
    assert_eq!(missing.len(), 1);
    assert!(
        missing[0].starts_with("auth.bearer_token_file: cannot read "),
        "{missing:?}"
    );
    write_secret(&token, "\n");
    assert_eq!(
        problems(&config),
        [format!(
            "auth.bearer_token_file: {} is empty",
            token.display()
        )]
    );
    write_secret(&token, "s3cret\n");
    assert!(problems(&config).is_empty());
    // Group-readable is fine (Alertmanager may share it); readable by everyone is not.
    set_mode(&token, 0o640);
    assert!(problems(&config).is_empty());
    set_mode(&token, 0o644);
    assert_eq!(
        problems(&config),
        [format!(
            "auth.bearer_token_file: {0} is readable by everyone (mode 0644); run chmod o-rwx {0} (mode 0600, or 0640 to share it with a group)",
            token.display()
        )]
    );
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write_secret(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    set_mode(path, 0o600);
}

#[test]
fn per_node_re_checks_are_checked() {
    let config: Config =
        parse("exporter_url: 'http://{node}:9470'\ngpu_nodes: [gpu-a, 10.0.0.2, 'fd00::7']\n")
            .unwrap_or_else(|p| panic!("{p:#?}"));
    assert_eq!(config.gpu_nodes.len(), 3);
    let problems = problems_in("gpu_nodes: [gpu-a]\n");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("gpu_nodes:") && p.contains("{node}")),
        "{problems:?}"
    );
    let problems = problems_in(
        "exporter_url: 'http://{node}:9470'\nhost: 'gpu box'\ngpu_nodes: ['a/b', gpu-b]\n",
    );
    assert!(
        problems.iter().any(|p| p.starts_with("gpu_nodes[0]")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("host")),
        "{problems:?}"
    );
    assert!(
        !problems.iter().any(|p| p.starts_with("gpu_nodes[1]")),
        "{problems:?}"
    );
    let problems = problems_in("exporter_url: 'http://{node}:9470/x y'\n");
    assert!(
        problems.iter().any(|p| p.starts_with("exporter_url")),
        "{problems:?}"
    );
}

#[test]
fn ha_is_checked() {
    let config: Config =
        parse("ha: {lease: aistack/aistack-actioner}\n").unwrap_or_else(|p| panic!("{p:#?}"));
    let ha = config.ha.unwrap();
    assert_eq!(ha.lease(), Some(("aistack", "aistack-actioner")));
    assert_eq!(
        ha.timing().lease_duration,
        std::time::Duration::from_secs(8)
    );
    let problems = problems_in("ha: {lease: aistack, lease_duration: 1s}\n");
    assert!(
        problems.iter().any(|p| p.starts_with("ha.lease:")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("ha.lease_duration")),
        "{problems:?}"
    );
    assert!(
        parse::<Config>("ha: {leese: a/b}\n").is_err(),
        "unknown keys are refused"
    );
}

const PAIRS: &str = r#"
exporter_url: 'http://{node}:9470'
rules:
  - {name: failover-when-gaming, match: {alertname: AistackGpuHostWorkload}, on: firing, action: failover}
  - {name: failback, match: {alertname: AistackGpuHostWorkload}, on: resolved, action: failback}
actions:
  failover:
    platform: kubernetes
    fallback_health_url: "http://ollama-a.ml.svc:11434/api/tags"
    nodes:
      gpu-a:
        kubernetes: {namespace: ml, primary: vllm-a, fallback: ollama-a, service: inference-a}
        primary_health_url: "http://vllm-a.ml.svc:8000/health"
      gpu-b:
        kubernetes: {namespace: ml, primary: vllm-b, fallback: ollama-b, service: inference-b}
        primary_health_url: "http://vllm-b.ml.svc:8000/health"
        fallback_health_url: "http://ollama-b.ml.svc:11434/api/tags"
"#;

#[test]
fn a_pair_per_gpu_node_is_checked() {
    let config: Config = parse(PAIRS).unwrap_or_else(|p| panic!("{p:#?}"));
    let nodes = &config.actions.failover.nodes;
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        nodes["gpu-b"].primary_health_url,
        "http://vllm-b.ml.svc:8000/health"
    );
    assert_eq!(
        nodes["gpu-a"].fallback_health_url, "http://ollama-a.ml.svc:11434/api/tags",
        "inherited from actions.failover"
    );
    let allowlists = config.allowlists();
    assert!(allowlists.takes_target(ActionKind::Failback));
    assert!(allowlists.allows(ActionKind::Failover, "gpu-a"));
    assert!(!allowlists.allows(ActionKind::Failover, "gpu-c"));
    assert!(
        !Config::default()
            .allowlists()
            .takes_target(ActionKind::Failover)
    );
    assert!(config.actions.failover.missing_section().is_none());

    // Without {node} every pair's failback would ask one exporter; gpu_nodes is for one pair.
    let problems = problems_in(
        &PAIRS
            .replace("'http://{node}:9470'", "'http://127.0.0.1:9470'")
            .replace("rules:", "gpu_nodes: [gpu-a]\nrules:"),
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("actions.failover.nodes:") && p.contains("{node}")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("gpu_nodes:")),
        "{problems:?}"
    );
    // A pair without its platform's section, a bad URL, a node name no alert can carry, and
    // the cluster's pair beside the nodes'.
    let problems = problems_in(
        &PAIRS
            .replace(
                "        kubernetes: {namespace: ml, primary: vllm-b, fallback: ollama-b, service: inference-b}\n",
                "        docker: {primary: vllm, fallback: ollama}\n",
            )
            .replace("http://vllm-a.ml.svc:8000/health", "vllm-a:8000")
            .replace("      gpu-a:", "      'gpu a':")
            .replace(
                "    platform: kubernetes\n",
                "    platform: kubernetes\n    kubernetes: {namespace: ml, primary: vllm, fallback: ollama, service: inference}\n",
            ),
    );
    for want in [
        "actions.failover.nodes.gpu-b: needs its kubernetes section",
        "actions.failover.nodes.gpu a.primary_health_url",
        "actions.failover.nodes.gpu a: \"gpu a\" is not a node name",
        "actions.failover: set one pair",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "{want}: {problems:?}"
        );
    }
    // Two nodes sharing a Deployment, or the health URLs they inherit, or a Docker pair (one
    // engine: the actioner's own host's).
    let problems = problems_in(
        &PAIRS
            .replace("primary: vllm-b,", "primary: vllm-a,")
            .replace(
                "        primary_health_url: \"http://vllm-b.ml.svc:8000/health\"\n",
                "",
            )
            .replace(
                "        primary_health_url: \"http://vllm-a.ml.svc:8000/health\"\n",
                "",
            )
            .replace(
                "        fallback_health_url: \"http://ollama-b.ml.svc:11434/api/tags\"\n",
                "",
            ),
    );
    for want in [
        "actions.failover.nodes.gpu-b.kubernetes.primary: Deployment ml/vllm-a is also nodes.gpu-a's",
        "actions.failover.nodes.gpu-b.fallback_health_url: http://ollama-a.ml.svc:11434/api/tags is also nodes.gpu-a's",
        "actions.failover.nodes.gpu-b.primary_health_url: http://127.0.0.1:8000/health is also nodes.gpu-a's",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(want)),
            "{want}: {problems:?}"
        );
    }
    let problems = problems_in(&PAIRS.replace("platform: kubernetes", "platform: docker").replace(
        "        kubernetes: {namespace: ml, primary: vllm-a, fallback: ollama-a, service: inference-a}\n",
        "        docker: {primary: vllm-a, fallback: ollama-a}\n",
    ));
    assert!(
        problems.iter().any(|p| p.starts_with(
            "actions.failover.nodes.gpu-a: a pair per node needs platform: kubernetes"
        )),
        "{problems:?}"
    );
    // A rule may pin a pair; only a configured node.
    let problems = problems_in(&PAIRS.replace(
        "on: resolved, action: failback}",
        "on: resolved, action: failback, target: gpu-c}",
    ));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("rules[1].target") && p.contains("gpu-a, gpu-b")),
        "{problems:?}"
    );
}
