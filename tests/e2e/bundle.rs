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
    let compat = yaml("alerts/dcgm-compat.rules.yml");
    let resource = yaml("k8s/base/prometheusrule-dcgm-compat.yaml");
    assert_eq!(resource["kind"], "PrometheusRule");
    assert_eq!(
        resource["spec"]["groups"], compat["groups"],
        "k8s/base/prometheusrule-dcgm-compat.yaml is stale: run ./k8s/generate-prometheusrule"
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
        ("aistack-actioner", "k8s/components/ha/config/actioner.yaml"),
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

/// The HA component's actioner config is the base's, plus `ha` and a per-node `exporter_url`:
/// the two cannot drift apart. Its Role reads and renews the one Lease it ships, nothing more.
#[test]
fn the_ha_component_keeps_the_base_config_and_least_privilege() {
    let base = yaml("k8s/base/config/actioner.yaml");
    let mut ha = yaml("k8s/components/ha/config/actioner.yaml");
    assert_eq!(ha["ha"]["lease"], "aistack/aistack-actioner");
    assert_eq!(ha["exporter_url"], "http://{node}:9470");
    let fields = ha.as_mapping_mut().unwrap();
    fields.remove("ha");
    fields.insert("exporter_url".into(), base["exporter_url"].clone());
    assert_eq!(
        ha, base,
        "k8s/components/ha/config/actioner.yaml drifted from the base's"
    );

    let lease = yaml("k8s/components/ha/lease.yaml");
    assert_eq!(lease["metadata"]["namespace"], "aistack");
    assert_eq!(lease["metadata"]["name"], "aistack-actioner");
    let rbac: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&read("k8s/components/ha/rbac.yaml"))
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
    let role = rbac.iter().find(|o| o["kind"] == "Role").unwrap();
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["resourceNames"][0], "aistack-actioner");
    let verbs: Vec<&str> = rules[0]["verbs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(verbs, ["get", "update"]);

    // Every component builds on its own, and the HA overlay mounts the HA config.
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        return;
    }
    for entry in std::fs::read_dir(workspace_root().join("k8s/components")).unwrap() {
        let dir = entry.unwrap().path();
        let relative = dir
            .strip_prefix(workspace_root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let (code, _, stderr) = run_in_root("kubectl", &["kustomize", &relative]);
        assert_eq!(code, 0, "kubectl kustomize {relative}: {stderr}");
    }
    let (code, stdout, stderr) = run_in_root("kubectl", &["kustomize", "k8s/overlays/ha"]);
    assert_eq!(code, 0, "{stderr}");
    let objects: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&stdout)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect();
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "aistack-actioner")
        .unwrap();
    let config = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap()["configMap"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == config.as_str())
        .unwrap_or_else(|| panic!("no ConfigMap {config}"));
    let mounted: serde_yaml::Value =
        serde_yaml::from_str(map["data"]["actioner.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        mounted["ha"]["lease"], "aistack/aistack-actioner",
        "{config}"
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
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
    // What README.md's "First run" writes into .env.
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join(".env");
    std::fs::write(
        &env,
        "COMPOSE_PROJECT_NAME=aistack\nAISTACK_UID=998\nAISTACK_GID=998\nDOCKER_GID=999\n",
    )
    .unwrap();
    let config_with = |env: &str| {
        let args = [
            "--project-directory",
            "compose",
            "--env-file",
            env,
            "-f",
            "compose/docker-compose.yml",
            "config",
        ];
        run_in_root("docker-compose", &args)
    };
    let compose = || -> serde_yaml::Value {
        let (code, stdout, stderr) = config_with(env.to_str().unwrap());
        assert_eq!(code, 0, "docker-compose config: {stderr}");
        serde_yaml::from_str(&stdout).unwrap()
    };
    // .env.example as it is validates (example ids); without ids, compose says what to set.
    let (code, _, stderr) = config_with("compose/.env.example");
    assert_eq!(code, 0, "docker-compose config with .env.example: {stderr}");
    let no_ids = dir.path().join("no-ids.env");
    std::fs::write(&no_ids, "COMPOSE_PROJECT_NAME=aistack\n").unwrap();
    let (code, _, stderr) = config_with(no_ids.to_str().unwrap());
    assert_ne!(code, 0);
    assert!(stderr.contains("set AISTACK_UID in .env"), "{stderr}");
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
    // Health checks by the binaries themselves (no shell in the images), and an actioner that
    // starts once the exporter answers.
    for (name, binary, port) in [
        ("exporter", "aistack-exporter", 9470),
        ("actioner", "aistack-actioner", 9471),
    ] {
        let test: Vec<&str> = config["services"][name]["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has no healthcheck"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            test,
            [
                "CMD",
                &format!("/usr/local/bin/{binary}"),
                "healthcheck",
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ]
        );
    }
    assert_eq!(
        config["services"]["actioner"]["depends_on"]["exporter"]["condition"],
        "service_healthy"
    );
    // The image's state directory belongs to the user the actioner runs as.
    assert_eq!(
        config["services"]["actioner"]["build"]["args"]["AISTACK_UID"],
        "998"
    );
    assert_eq!(config["services"]["actioner"]["user"], "998:998");

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
    // Everything read-only but the state directory, the node's own (the GPU roster).
    for volume in daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
    {
        if volume["name"] == "state" {
            assert_eq!(volume["mountPath"], "/var/lib/aistack/exporter");
            continue;
        }
        assert_eq!(volume["readOnly"], true, "{volume:?}");
    }
    let state = daemonset["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "state")
        .expect("a state volume");
    assert_eq!(
        state["hostPath"]["path"], "/var/lib/aistack/exporter",
        "{state:?}"
    );
    let env = &daemonset["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "STATE_DIRECTORY" && e["value"] == "/var/lib/aistack/exporter"),
        "{env:?}"
    );
    // Least privilege: a namespaced Role on named objects, no wildcard; cluster-wide only the
    // exporter's read-only list of pods (its node's, by field selector).
    let cluster_roles: Vec<&serde_yaml::Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole")
        .collect();
    assert_eq!(cluster_roles.len(), 1, "{cluster_roles:?}");
    let pods: serde_yaml::Value =
        serde_yaml::from_str(r#"[{apiGroups: [""], resources: [pods], verbs: [list]}]"#).unwrap();
    assert_eq!(cluster_roles[0]["rules"], pods);
    let exporter_spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(exporter_spec["serviceAccountName"], "aistack-exporter");
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

/// The two Dockerfiles build the same runtime image; only where the binaries come from differs.
#[test]
fn both_dockerfiles_share_one_runtime_layout() {
    let layout = |path: &str| -> String {
        let text = read(path);
        let begin = text
            .find("# --- runtime layout")
            .unwrap_or_else(|| panic!("{path}: no runtime layout"));
        let end = text[begin..]
            .find("# --- end of runtime layout ---")
            .unwrap()
            + begin;
        text[begin..end].to_owned()
    };
    let from_source = layout("compose/Dockerfile");
    assert_eq!(from_source, layout("compose/Dockerfile.prebuilt"));
    assert!(from_source.contains("/var/lib/aistack/actioner"));
    let tails = |path: &str| -> Vec<String> {
        read(path)
            .lines()
            .skip_while(|l| !l.starts_with("FROM runtime AS exporter"))
            .filter(|l| !l.starts_with("COPY"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        tails("compose/Dockerfile"),
        tails("compose/Dockerfile.prebuilt")
    );

    // A variable in FROM must be an ARG declared before the first FROM: one declared in a
    // stage expands to nothing there ("base name should not be blank"), as compose/Dockerfile
    // once did.
    for path in ["compose/Dockerfile", "compose/Dockerfile.prebuilt"] {
        let text = read(path);
        let mut global = BTreeSet::new();
        let mut seen_from = false;
        for line in text.lines() {
            let line = line.trim();
            if let Some(arg) = line.strip_prefix("ARG ") {
                if !seen_from {
                    global.insert(arg.split('=').next().unwrap().trim().to_owned());
                }
            } else if let Some(from) = line.strip_prefix("FROM ") {
                seen_from = true;
                if let Some(start) = from.find("${") {
                    let name = &from[start + 2..start + from[start..].find('}').unwrap()];
                    assert!(
                        global.contains(name),
                        "{path}: FROM uses {name}, no global ARG"
                    );
                }
            }
        }
    }
}

/// kube-prometheus-stack selects what it scrapes, evaluates and routes by labels: every
/// kustomization in k8s/ renders, the namespace admits the exporter, either GPU label places
/// the pods, and where the kube-prometheus-stack component is used, the ServiceMonitors, the
/// PrometheusRule and the AlertmanagerConfig carry `release` and the routes hold together.
#[test]
fn the_kubernetes_overlays_render_what_kube_prometheus_stack_selects() {
    // Without kubectl, tests/run says this part was left out (as for the base).
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        return;
    }
    let render = |dir: &str| -> Vec<serde_yaml::Value> {
        let (code, stdout, stderr) = run_in_root("kubectl", &["kustomize", dir]);
        assert_eq!(code, 0, "kubectl kustomize {dir}: {stderr}");
        serde_yaml::Deserializer::from_str(&stdout)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect()
    };
    let find = |objects: &[serde_yaml::Value], kind: &str, name: &str| -> serde_yaml::Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    // GPU Feature Discovery's label, or the one set by hand: ORed node selector terms.
    let gpu_terms: serde_yaml::Value = serde_yaml::from_str(
        r#"[{matchExpressions: [{key: nvidia.com/gpu.present, operator: In, values: ["true"]}]},
            {matchExpressions: [{key: aistack.io/gpu, operator: In, values: ["true"]}]}]"#,
    )
    .unwrap();

    let mut dirs = vec!["k8s/base".to_owned()];
    for entry in std::fs::read_dir(workspace_root().join("k8s/overlays")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("kustomization.yaml").exists() {
            let relative = path.strip_prefix(workspace_root()).unwrap();
            dirs.push(relative.to_string_lossy().into_owned());
        }
    }
    assert!(dirs.len() > 1, "no overlay in k8s/overlays");
    let mut with_component = 0;
    for dir in &dirs {
        let objects = render(dir);
        let namespace = find(&objects, "Namespace", "aistack");
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{dir}"
        );
        for (kind, name) in [
            ("DaemonSet", "aistack-exporter"),
            ("Deployment", "aistack-actioner"),
        ] {
            let workload = find(&objects, kind, name);
            let spec = &workload["spec"]["template"]["spec"];
            assert!(spec["nodeSelector"].is_null(), "{dir}: {kind} {name}");
            let terms =
                spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                    ["nodeSelectorTerms"]
                    .as_sequence()
                    .unwrap_or_else(|| panic!("{dir}: {kind} {name} has no node affinity"));
            // An overlay may add terms (a label of the user's own), never lose these two.
            assert_eq!(
                terms.get(..2),
                gpu_terms.as_sequence().map(|t| &t[..]),
                "{dir}: {kind} {name}"
            );
        }

        let monitoring: Vec<&serde_yaml::Value> = objects
            .iter()
            .filter(|o| {
                o["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
            })
            .collect();
        let kustomization = yaml(&format!("{dir}/kustomization.yaml"));
        let uses_component = kustomization["components"].as_sequence().is_some_and(|c| {
            c.iter().any(|p| {
                p.as_str()
                    .is_some_and(|p| p.ends_with("components/kube-prometheus-stack"))
            })
        });
        if !uses_component {
            assert!(
                monitoring.iter().all(|o| o["kind"] != "AlertmanagerConfig"
                    && o["metadata"]["labels"]["release"].is_null()),
                "{dir}"
            );
            continue;
        }
        with_component += 1;

        // What the chart's Prometheus and Alertmanager select by default.
        let mut kinds: Vec<&str> = monitoring
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            [
                "AlertmanagerConfig",
                "PrometheusRule",
                "PrometheusRule",
                "ServiceMonitor",
                "ServiceMonitor"
            ],
            "{dir}"
        );
        for object in &monitoring {
            assert_eq!(
                object["metadata"]["labels"]["release"], "kube-prometheus-stack",
                "{dir}: {:?}",
                object["metadata"]
            );
            assert_eq!(object["metadata"]["namespace"], "aistack", "{dir}");
        }

        // The AlertmanagerConfig: every route names one of its receivers; the actioner's
        // webhook is the actioner's Service, with the token the actioner reads.
        let config = find(&objects, "AlertmanagerConfig", "aistack");
        assert_eq!(config["apiVersion"], "monitoring.coreos.com/v1alpha1");
        let receivers = config["spec"]["receivers"].as_sequence().unwrap();
        let names: BTreeSet<&str> = receivers
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        fn route_receivers<'a>(route: &'a serde_yaml::Value, out: &mut Vec<&'a str>) {
            out.push(route["receiver"].as_str().unwrap());
            for child in route["routes"].as_sequence().into_iter().flatten() {
                route_receivers(child, out);
            }
        }
        let mut routed = Vec::new();
        route_receivers(&config["spec"]["route"], &mut routed);
        for receiver in &routed {
            assert!(names.contains(receiver), "{dir}: no receiver {receiver}");
        }
        assert!(routed.contains(&"actioner"), "{dir}: {routed:?}");
        // What cannot go through the actioner does not: its own "down", its failing
        // notify, and the dead man's switch.
        let mut around = BTreeSet::new();
        for child in config["spec"]["route"]["routes"].as_sequence().unwrap() {
            let matches = |name: &str| {
                child["matchers"].as_sequence().unwrap().iter().any(|m| {
                    m["name"] == "alertname"
                        && m["value"]
                            .as_str()
                            .is_some_and(|v| v.split('|').any(|a| a == name))
                })
            };
            for (name, receiver) in [
                ("AistackActionerDown", "ntfy-direct"),
                ("AistackActionerNoLeader", "ntfy-direct"),
                ("AistackActionFailed", "ntfy-direct"),
                ("AistackWatchdog", "heartbeat"),
                ("Watchdog", "heartbeat"),
            ] {
                if matches(name) {
                    assert_eq!(child["receiver"], receiver, "{dir}: {child:?}");
                    around.insert(name);
                }
            }
        }
        assert_eq!(around.len(), 5, "{dir}: routes only for {around:?}");
        let actioner = receivers
            .iter()
            .find(|r| r["name"] == "actioner")
            .unwrap_or_else(|| panic!("{dir}: no receiver actioner"));
        let webhook = &actioner["webhookConfigs"][0];
        let service = find(&objects, "Service", "aistack-actioner");
        assert_eq!(
            webhook["url"],
            format!(
                "http://aistack-actioner.aistack.svc:{}/api/v1/alerts",
                service["spec"]["ports"][0]["port"].as_u64().unwrap()
            ),
            "{dir}"
        );
        assert_eq!(webhook["sendResolved"], true, "{dir}");
        let authorization = &webhook["httpConfig"]["authorization"];
        assert_eq!(authorization["type"], "Bearer", "{dir}");
        let deployment = find(&objects, "Deployment", "aistack-actioner");
        let pod = &deployment["spec"]["template"]["spec"];
        let secret_volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == authorization["credentials"]["name"])
            .unwrap_or_else(|| panic!("{dir}: the actioner does not mount {authorization:?}"));
        let mount = pod["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == secret_volume["name"])
            .unwrap();
        let actioner_config = objects
            .iter()
            .find(|o| {
                o["kind"] == "ConfigMap"
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("aistack-actioner"))
            })
            .unwrap();
        let actioner_yaml: serde_yaml::Value =
            serde_yaml::from_str(actioner_config["data"]["actioner.yaml"].as_str().unwrap())
                .unwrap();
        assert_eq!(
            actioner_yaml["auth"]["bearer_token_file"],
            format!(
                "{}/{}",
                mount["mountPath"].as_str().unwrap(),
                authorization["credentials"]["key"].as_str().unwrap()
            ),
            "{dir}"
        );
    }
    assert!(
        with_component > 0,
        "no overlay uses components/kube-prometheus-stack"
    );
}

/// What cannot go through the actioner does not: its own "down", its failing notifications and
/// the dead man's switch; everything else that acts still reaches it.
#[test]
fn the_shipped_alertmanager_config_routes_around_the_actioner() {
    for (receiver, labels) in [
        (
            "ntfy-direct",
            "alertname=AistackActionerDown severity=warning instance=gpu-box:9471",
        ),
        (
            "ntfy-direct",
            "alertname=AistackActionerNoLeader severity=warning job=aistack-actioner namespace=aistack",
        ),
        (
            "ntfy-direct",
            "alertname=AistackActionFailed severity=warning instance=gpu-box:9471 action=notify result=failed",
        ),
        (
            "aistack-actioner",
            "alertname=AistackActionFailed severity=warning instance=gpu-box:9471 action=failback result=failed",
        ),
        ("heartbeat", "alertname=AistackWatchdog severity=info"),
        (
            "ntfy-direct,aistack-actioner",
            "alertname=AistackGpuNodeDown severity=critical instance=gpu-box:9470",
        ),
        (
            "aistack-actioner",
            "alertname=AistackVllmDown severity=critical instance=gpu-box:9470",
        ),
        (
            "aistack-actioner",
            "alertname=AistackGpuHostWorkload severity=info instance=gpu-box:9470",
        ),
        (
            "quiet",
            "alertname=AistackModelCacheLarge severity=info instance=gpu-box:9470",
        ),
    ] {
        let verify = format!("--verify.receivers={receiver}");
        let mut args = vec![
            "config",
            "routes",
            "test",
            "--config.file=alerts/alertmanager.yml",
            verify.as_str(),
        ];
        args.extend(labels.split(' '));
        let (code, stdout, stderr) = run_in_root("amtool", &args);
        assert_eq!((code, stdout.trim()), (0, receiver), "{labels}: {stderr}");
    }
}
