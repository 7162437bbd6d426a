//! Every panel query of every dashboard in dashboards/, against a real Prometheus that scraped
//! the real binaries: the exporter (fixture procfs/sysfs, the stand-in NVML answering as a
//! recorded RTX 4080 SUPER, stand-in vLLM and Ollama, the real Docker engine) and the actioner
//! (after a webhook and a notification). Each query must parse and, where Prometheus holds the
//! series it reads, return data.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use aistack_tests::ntfy::FakeNtfy;
use aistack_tests::stub::StubServer;
use aistack_tests::{
    Daemon, Prometheus, binary, copy_tree, fake_nvml_library, fixtures, free_port, post_json,
    wait_for, workspace_root,
};

const TOKEN: &str = "0123456789abcdef";

/// Filters that may rightly select nothing: no throttle reason active, no idle gate blocking.
/// For these only the query without the filter must return data.
const MAY_SELECT_NOTHING: &[&str] = &[
    "aistack_gpu_throttle_active{instance=~\"$instance\"} == 1",
    "aistack_idle_gate_blocking{instance=~\"$instance\"} == 1",
];

fn service_fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures().join("services").join(name)).unwrap()
}

/// Grafana's variables, as Grafana would expand them for "All" over the last hour.
fn expand(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$actioner", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// The metric names a query reads (`aistack_*`, histogram buckets as their family).
fn metrics_read(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("aistack_"))
        .map(str::to_owned)
        .collect()
}

struct Panel {
    dashboard: String,
    title: String,
    expr: String,
}

fn panels() -> Vec<Panel> {
    let mut panels = Vec::new();
    for entry in std::fs::read_dir(workspace_root().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            // Text and alert-list panels run no query of their own.
            if panel["type"] == "text" || panel["type"] == "alertlist" {
                continue;
            }
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            assert!(!targets.is_empty(), "{name}: panel {title:?} has no query");
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default().to_owned();
                assert!(
                    !expr.is_empty(),
                    "{name}: panel {title:?} has an empty query"
                );
                panels.push(Panel {
                    dashboard: name.clone(),
                    title: title.clone(),
                    expr,
                });
            }
        }
        // The variables' queries too: `label_values(metric, label)` needs the metric.
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if variable["type"] != "query" {
                continue;
            }
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_default();
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split(',').next())
                .unwrap_or_else(|| panic!("{name}: variable query {query:?}"));
            panels.push(Panel {
                dashboard: name.clone(),
                title: format!("variable {}", variable["name"]),
                expr: metric.trim().to_owned(),
            });
        }
    }
    assert!(panels.len() > 20, "dashboards/ has too few queries");
    panels
}

#[test]
fn every_dashboard_query_runs_and_returns_data_where_the_data_exists() {
    let dir = tempfile::tempdir().unwrap();

    // The exporter, with a GPU and two inference services.
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    std::fs::copy(
        fixtures().join("gpu/rtx-4080-super.json"),
        dir.path().join("scenario.json"),
    )
    .unwrap();
    let vllm = StubServer::start();
    vllm.set("/health", 200, &service_fixture("vllm-health.txt"));
    vllm.set("/v1/models", 200, &service_fixture("vllm-models.json"));
    let ollama = StubServer::start();
    // Local and cloud models (the cloud-models table).
    ollama.set("/api/tags", 200, &service_fixture("ollama-tags-cloud.json"));
    ollama.set("/api/ps", 200, &service_fixture("ollama-ps.json"));
    ollama.set("/api/version", 200, &service_fixture("ollama-version.json"));
    // Up, with a models endpoint that answers 404 (the probe-errors panel).
    let localai = StubServer::start();
    localai.set("/readyz", 200, "");
    let exporter_config = dir.path().join("exporter.yaml");
    std::fs::write(
        &exporter_config,
        format!(
            "gpu: {{nvml_library: {}}}\nservices:\n  - {{name: vllm, kind: vllm, url: '{}'}}\n  - {{name: ollama, kind: ollama, url: '{}'}}\n  - {{name: localai, kind: localai, url: '{}'}}\n",
            fake_nvml_library().display(),
            vllm.url,
            ollama.url,
            localai.url,
        ),
    )
    .unwrap();
    let mut command = Command::new(binary("aistack-exporter"));
    command.env("FAKE_NVML_SCENARIO", dir.path().join("scenario.json"));
    let exporter_address = format!("127.0.0.1:{}", free_port());
    let _exporter = Daemon::start_on(
        command,
        &[
            "--config.file",
            exporter_config.to_str().unwrap(),
            "--path.procfs",
            dir.path().join("proc").to_str().unwrap(),
            "--path.sysfs",
            dir.path().join("sys").to_str().unwrap(),
        ],
        &exporter_address,
    );

    // The actioner, which notifies once.
    let ntfy = FakeNtfy::start();
    aistack_tests::write_secret(dir.path().join("token"), TOKEN);
    let actioner_config = dir.path().join("actioner.yaml");
    std::fs::write(
        &actioner_config,
        format!(
            "host: gpu-box\nstate_dir: {}\nauth: {{bearer_token_file: {}}}\nrules:\n  - {{name: phone, match_re: {{severity: critical|warning}}, on: both, action: notify}}\nactions:\n  notify:\n    ntfy: {{url: '{}', topic: aistack}}\n",
            dir.path().join("state").display(),
            dir.path().join("token").display(),
            ntfy.url,
        ),
    )
    .unwrap();
    let actioner_address = format!("127.0.0.1:{}", free_port());
    let _actioner = Daemon::start_on(
        Command::new(binary("aistack-actioner")),
        &["--config.file", actioner_config.to_str().unwrap()],
        &actioner_address,
    );
    let webhook =
        std::fs::read_to_string(fixtures().join("alertmanager/single-firing.json")).unwrap();
    let reply = post_json(
        &format!("http://{actioner_address}/api/v1/alerts"),
        Some(TOKEN),
        &webhook,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    let prometheus = Prometheus::start(&[
        ("aistack-exporter", &exporter_address),
        ("aistack-actioner", &actioner_address),
    ]);
    // Enough scrapes for rate() and increase() over a minute.
    wait_for(Duration::from_secs(60), "ten scrapes of each", || {
        let scrapes = prometheus.query("min(count_over_time(up[1m]))");
        scrapes
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|n| *n >= 10.0)
    });
    wait_for(Duration::from_secs(20), "the notification", || {
        (!ntfy.published().is_empty()).then_some(())
    });
    // One more scrape after it, so the counters moved within Prometheus' window.
    std::thread::sleep(Duration::from_secs(3));

    let mut empty = Vec::new();
    let mut checked = 0;
    for panel in panels() {
        let expr = expand(&panel.expr);
        // Parses and runs (Prometheus::query asserts status success).
        let result = prometheus.query(&expr);
        let present: Vec<String> = metrics_read(&panel.expr)
            .into_iter()
            .filter(|m| !prometheus.query(&format!("count({m})")).is_empty())
            .collect();
        if present.len() < metrics_read(&panel.expr).len() {
            // Not every series it reads exists here (no container health checks on this
            // machine, say): parsing is all there is to check.
            continue;
        }
        checked += 1;
        let data = if MAY_SELECT_NOTHING.contains(&panel.expr.as_str()) {
            let unfiltered = expand(panel.expr.trim_end_matches(" == 1"));
            !prometheus.query(&unfiltered).is_empty()
        } else {
            !result.is_empty()
        };
        if !data {
            empty.push(format!("{} / {}: {}", panel.dashboard, panel.title, expr));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data although their series exist: {empty:#?}"
    );
    // The stand-ins cover the GPU, services, idle, power and the actioner: most queries have
    // their data here. Fewer means the set-up above broke, not the dashboards.
    assert!(checked >= 35, "only {checked} queries had their series");
}
