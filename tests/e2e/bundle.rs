//! What ships beside the binaries: the Alertmanager config routes and inhibits as its comments
//! say (run by a real Alertmanager in front of the real actioner), the Kubernetes
//! PrometheusRule carries exactly the rules in alerts/, every alert has its runbook, and every
//! metric name used anywhere is documented.

use std::collections::BTreeSet;
use std::process::Command;

use serde::Deserialize;
use std::time::Duration;

use aistack_tests::ntfy::FakeNtfy;
use aistack_tests::{
    Alertmanager, Daemon, binary, free_port, get, get_with_token, wait_for, workspace_root,
};

const TOKEN: &str = "0123456789abcdef";

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn alert(name: &str, severity: &str, instance: &str) -> serde_json::Value {
    serde_json::json!({
        "labels": {"alertname": name, "severity": severity, "instance": instance, "gpu": "0"},
        "annotations": {
            "summary": format!("{name} on {instance}"),
            "description": "test",
            "runbook_url": format!("https://github.com/aistack/aistack/blob/main/docs/runbooks/{name}.md")
        },
        "generatorURL": "http://prometheus:9090/graph?g0.expr=x"
    })
}

#[test]
fn the_shipped_alertmanager_config_routes_to_the_actioner_and_inhibits() {
    let dir = tempfile::tempdir().unwrap();
    let ntfy = FakeNtfy::start();
    let token_file = dir.path().join("token");
    aistack_tests::write_secret(&token_file, format!("{TOKEN}\n"));
    let config = dir.path().join("actioner.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
host: gpu-box
state_dir: {state}
auth: {{bearer_token_file: {token}}}
rules:
  - {{name: phone, match_re: {{severity: "critical|warning"}}, on: both, action: notify}}
actions:
  notify:
    ntfy: {{url: "{ntfy}", topic: aistack}}
"#,
            state = dir.path().join("state").display(),
            token = token_file.display(),
            ntfy = ntfy.url,
        ),
    )
    .unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let actioner = Daemon::start_on(
        Command::new(binary("aistack-actioner")),
        &["--config.file", config.to_str().unwrap()],
        &address,
    );
    let am = Alertmanager::start(&aistack_tests::shipped_alertmanager_config(
        &address,
        token_file.to_str().unwrap(),
    ));

    am.push(&serde_json::json!([
        alert("AistackGpuNodeDown", "critical", "gpu-box:9470"),
        alert("AistackGpuHot", "warning", "gpu-box:9470"),
        alert("AistackGpuHot", "warning", "other:9470"),
        alert("AistackModelCacheLarge", "info", "gpu-box:9470"),
    ]));

    let titles = || -> BTreeSet<String> {
        ntfy.published()
            .iter()
            .map(|m| m["title"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    wait_for(Duration::from_secs(20), "two notifications", || {
        (titles().len() >= 2).then_some(())
    });
    // Another two group intervals: the inhibited alert still has not come through.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        titles(),
        BTreeSet::from([
            "[FIRING] AistackGpuHot: AistackGpuHot on other:9470".to_owned(),
            "[FIRING] AistackGpuNodeDown: AistackGpuNodeDown on gpu-box:9470".to_owned(),
        ])
    );

    // Alertmanager says why: inhibited by the node being down.
    let alerts: Vec<serde_json::Value> =
        serde_json::from_str(&get(&format!("{}/api/v2/alerts", am.url)).body).unwrap();
    let hot_on_down_node = alerts
        .iter()
        .find(|a| {
            a["labels"]["alertname"] == "AistackGpuHot" && a["labels"]["instance"] == "gpu-box:9470"
        })
        .expect("the alert is in Alertmanager");
    assert_eq!(hot_on_down_node["status"]["state"], "suppressed");
    assert_eq!(
        hot_on_down_node["status"]["inhibitedBy"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The P3 without an action went to the quiet receiver, never to the actioner.
    let journal: Vec<serde_json::Value> = serde_json::from_str(
        &get_with_token(
            &format!("http://{address}/api/v1/actions?limit=1000"),
            TOKEN,
        )
        .body,
    )
    .unwrap();
    assert!(!journal.is_empty());
    assert!(
        !journal
            .iter()
            .any(|e| e.to_string().contains("AistackModelCacheLarge")),
        "{journal:#?}"
    );
    drop(actioner);
}

#[test]
fn the_kubernetes_prometheus_rule_carries_exactly_the_rules_in_alerts() {
    let rules = yaml("alerts/aistack.rules.yml");
    let resource = yaml("k8s/base/prometheusrule.yaml");
    assert_eq!(resource["kind"], "PrometheusRule");
    assert_eq!(resource["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        resource["spec"]["groups"], rules["groups"],
        "k8s/base/prometheusrule.yaml is stale: run ./k8s/generate-prometheusrule"
    );
}

fn alert_names() -> Vec<String> {
    let rules = yaml("alerts/aistack.rules.yml");
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            if let Some(name) = rule["alert"].as_str() {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn every_alert_has_its_runbook_and_the_contracts_labels() {
    let rules = yaml("alerts/aistack.rules.yml");
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                // A recording rule.
                assert!(rule["record"].as_str().is_some(), "{rule:?}");
                continue;
            };
            assert!(name.starts_with("Aistack"), "{name}");
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|v| !v.is_empty()),
                    "{name}: no {key}"
                );
            }
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let path = format!("docs/runbooks/{name}.md");
            assert!(url.ends_with(&path), "{name}: {url}");
            let runbook = read(&path);
            assert!(runbook.contains(name), "{path} does not name its alert");
        }
    }
    let runbooks: BTreeSet<String> = std::fs::read_dir(workspace_root().join("docs/runbooks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("Aistack"))
        .collect();
    let expected: BTreeSet<String> = alert_names().iter().map(|n| format!("{n}.md")).collect();
    assert_eq!(
        runbooks, expected,
        "a runbook without its alert, or the reverse"
    );
}

/// `aistack_*` names in a text, as written (a name ending in `_` is a prefix in prose).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("aistack_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let name = &text[start..end];
        // Followed by `-`: a compose volume (`aistack_actioner-state`), not a metric.
        let volume = bytes.get(end) == Some(&b'-');
        if !preceded && !volume && !name.ends_with('_') {
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_name_used_anywhere_is_documented() {
    let documented = metric_names(&read("docs/metrics.md"));
    let family = |name: &str| -> String {
        ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| documented.contains(*base))
            .unwrap_or(name)
            .to_owned()
    };
    let mut sources = vec![
        "alerts/aistack.rules.yml".to_owned(),
        "alerts/alertmanager.yml".to_owned(),
        "README.md".to_owned(),
    ];
    for dir in ["dashboards", "docs", "docs/runbooks"] {
        for entry in std::fs::read_dir(workspace_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json" || e == "md") {
                sources.push(
                    path.strip_prefix(workspace_root())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut missing = BTreeSet::new();
    for source in &sources {
        for name in metric_names(&read(source)) {
            // Config keys and crate names share the prefix; metric families have a unit or kind.
            if name.starts_with("aistack_tests") {
                continue;
            }
            if !documented.contains(&family(&name)) {
                missing.insert(format!("{name} (in {source})"));
            }
        }
    }
    assert!(missing.is_empty(), "not in docs/metrics.md: {missing:#?}");
}

/// Runs `program` with `args` in the workspace root: (exit code, stdout, stderr).
fn run_in_root(program: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("{program} (./tests/run installs it): {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_configs_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    aistack_tests::write_secret(dir.path().join("actioner.token"), format!("{TOKEN}\n"));
    for (binary_name, path) in [
        ("aistack-exporter", "compose/config/exporter.yaml"),
        ("aistack-exporter", "k8s/base/config/exporter.yaml"),
        ("aistack-actioner", "compose/config/actioner.yaml"),
        ("aistack-actioner", "k8s/base/config/actioner.yaml"),
    ] {
        // The secrets are the user's: point at a stand-in token.
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            read(path).replace(
                "/etc/aistack/secrets/",
                &format!("{}/", dir.path().display()),
            ),
        )
        .unwrap();
        let (code, stdout, stderr) = run_in_root(
            binary(binary_name).to_str().unwrap(),
            &["check-config", "--config.file", config.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{path}: {stdout}{stderr}");
    }
}

/// A compose service's volumes as (source, target, read-only), from the short syntax
/// (`docker-compose` 1) or the long one (`docker compose` 2).
fn volumes(service: &serde_yaml::Value) -> Vec<(String, String, bool)> {
    let text = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
    service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|v| match v.as_str() {
            Some(short) => {
                let parts: Vec<&str> = short.split(':').collect();
                (
                    parts[0].to_owned(),
                    parts.get(1).copied().unwrap_or_default().to_owned(),
                    parts
                        .get(2)
                        .is_some_and(|m| m.split(',').any(|o| o == "ro")),
                )
            }
            None => (
                text(&v["source"]),
                text(&v["target"]),
                v["read_only"] == true,
            ),
        })
        .collect()
}

#[test]
fn the_compose_bundle_validates_with_pinned_images_and_files_that_exist() {
    let compose = || -> serde_yaml::Value {
        let args = [
            "--project-directory",
            "compose",
            "--env-file",
            "compose/.env.example",
            "-f",
            "compose/docker-compose.yml",
            "config",
        ];
        let (code, stdout, stderr) = run_in_root("docker-compose", &args);
        assert_eq!(code, 0, "docker-compose config: {stderr}");
        serde_yaml::from_str(&stdout).unwrap()
    };
    let services = |config: &serde_yaml::Value| -> BTreeSet<String> {
        config["services"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    let config = compose();
    assert_eq!(
        services(&config),
        BTreeSet::from(
            [
                "exporter",
                "actioner",
                "prometheus",
                "alertmanager",
                "grafana",
                "ntfy",
            ]
            .map(String::from)
        )
    );
    // ntfy only on request (`--profile ntfy`); everything else always.
    for (name, service) in config["services"].as_mapping().unwrap() {
        let expected = if name == "ntfy" {
            serde_yaml::from_str("[ntfy]").unwrap()
        } else {
            serde_yaml::Value::Null
        };
        assert_eq!(service["profiles"], expected, "{name:?}");
    }

    for (name, service) in config["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let image = service["image"].as_str().unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "{name}: image {image} is not pinned"
        );
        assert_eq!(service["network_mode"], "host", "{name}");
        assert_eq!(service["read_only"], true, "{name}");
        // Every file or directory it mounts from the repository exists.
        let repository = workspace_root().canonicalize().unwrap();
        for (source, _, _) in volumes(service) {
            if source.starts_with(repository.to_str().unwrap()) && !source.contains("/secrets") {
                assert!(
                    std::path::Path::new(&source).exists(),
                    "{name}: {source} does not exist"
                );
            }
        }
    }
    let exporter = &config["services"]["exporter"];
    assert_eq!(exporter["runtime"], "nvidia");
    assert_eq!(exporter["pid"], "host");
    let read_only_host = |target: &str| {
        volumes(exporter)
            .iter()
            .any(|(_, t, read_only)| t == target && *read_only)
    };
    assert!(read_only_host("/host/proc") && read_only_host("/host/sys"));

    // Its Prometheus configuration scrapes the jobs the rules expect.
    let (code, stdout, stderr) = run_in_root(
        "promtool",
        &[
            "check",
            "config",
            "--syntax-only",
            "compose/prometheus/prometheus.yml",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let prometheus = yaml("compose/prometheus/prometheus.yml");
    let jobs: BTreeSet<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    assert!(jobs.contains("aistack-exporter") && jobs.contains("aistack-actioner"));
}

#[test]
fn the_kubernetes_base_builds_and_holds_together() {
    let kustomization = yaml("k8s/base/kustomization.yaml");
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_sequence().unwrap() {
        let text = read(&format!("k8s/base/{}", resource.as_str().unwrap()));
        for document in serde_yaml::Deserializer::from_str(&text) {
            objects.push(serde_yaml::Value::deserialize(document).unwrap());
        }
    }
    let find = |kind: &str, name: &str| -> &serde_yaml::Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let daemonset = find("DaemonSet", "aistack-exporter");
    let deployment = find("Deployment", "aistack-actioner");
    for (workload, service) in [
        (daemonset, find("Service", "aistack-exporter")),
        (deployment, find("Service", "aistack-actioner")),
    ] {
        // The Service selects the pods, and its port names one of theirs.
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert_eq!(workload["spec"]["selector"]["matchLabels"], *labels);
        for (key, value) in service["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(labels[key.as_str().unwrap()], *value);
        }
        let ports: Vec<&serde_yaml::Value> = workload["spec"]["template"]["spec"]["containers"][0]
            ["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| &p["name"])
            .collect();
        assert!(ports.contains(&&service["spec"]["ports"][0]["targetPort"]));
    }
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["runtimeClassName"],
        "nvidia"
    );
    for volume in daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
    {
        assert_eq!(volume["readOnly"], true, "{volume:?}");
    }
    // Least privilege: a namespaced Role on named objects, no wildcard, nothing cluster-wide.
    assert!(!objects.iter().any(|o| o["kind"] == "ClusterRole"));
    let role = find("Role", "aistack-actioner");
    for rule in role["rules"].as_sequence().unwrap() {
        assert!(
            rule["resourceNames"]
                .as_sequence()
                .is_some_and(|n| !n.is_empty())
        );
        let verbs: Vec<&str> = rule["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "watch", "patch", "update"].contains(v)),
            "{verbs:?}"
        );
    }
    let binding = find("RoleBinding", "aistack-actioner");
    assert_eq!(
        binding["metadata"]["namespace"],
        role["metadata"]["namespace"]
    );
    assert_eq!(
        binding["subjects"][0]["name"],
        deployment["spec"]["template"]["spec"]["serviceAccountName"]
    );
    // The ServiceMonitors name the Services' ports.
    for name in ["aistack-exporter", "aistack-actioner"] {
        let monitor = find("ServiceMonitor", name);
        let service = find("Service", name);
        assert_eq!(
            monitor["spec"]["endpoints"][0]["port"],
            service["spec"]["ports"][0]["name"]
        );
    }

    // And kustomize itself builds it, where kubectl is installed (Debian has no package for
    // it; tests/run says when this part was left out).
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
    {
        let (code, stdout, stderr) = run_in_root("kubectl", &["kustomize", "k8s/base"]);
        assert_eq!(code, 0, "{stderr}");
        let kinds: BTreeSet<String> = serde_yaml::Deserializer::from_str(&stdout)
            .map(|d| {
                serde_yaml::Value::deserialize(d).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        for kind in [
            "Namespace",
            "DaemonSet",
            "Deployment",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Service",
            "ConfigMap",
            "ServiceMonitor",
            "PrometheusRule",
        ] {
            assert!(kinds.contains(kind), "kustomize output lacks a {kind}");
        }
    }
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for name in ["aistack-exporter.service", "aistack-actioner.service"] {
        // systemd-analyze checks that the binaries exist: use the ones just built.
        let text = read(&format!("systemd/{name}"))
            .replace(
                "/usr/local/bin/aistack-exporter",
                binary("aistack-exporter").to_str().unwrap(),
            )
            .replace(
                "/usr/local/bin/aistack-actioner",
                binary("aistack-actioner").to_str().unwrap(),
            );
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path.to_string_lossy().into_owned());
    }
    let mut args = vec!["verify"];
    args.extend(units.iter().map(String::as_str));
    let (code, stdout, stderr) = run_in_root("systemd-analyze", &args);
    // It warns about unknown keys and bad values on stderr but exits 0: both must be clean.
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
}
