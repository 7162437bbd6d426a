//! Every panel query of every dashboard in dashboards/, against a real Prometheus that scraped
//! the real binaries: the exporter (fixture procfs/sysfs, the stand-in NVML answering as a
//! recorded RTX 4080 SUPER, stand-in vLLM and Ollama, the real Docker engine) and the actioner
//! (after a webhook and a notification). Each query must parse and, where Prometheus holds the
//! series it reads, return data.

use std::collections::BTreeSet;
use std::path::Path;
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

/// The exporter on the fixture tree copied to `dir`, its NVML the stand-in answering from
/// `dir/scenario.json`; and its address.
fn start_exporter(dir: &Path, config: &Path) -> (Daemon, String) {
    let mut command = Command::new(binary("aistack-exporter"));
    command.env("FAKE_NVML_SCENARIO", dir.join("scenario.json"));
    let address = format!("127.0.0.1:{}", free_port());
    let exporter = Daemon::start_on(
        command,
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--path.procfs",
            dir.join("proc").to_str().unwrap(),
            "--path.sysfs",
            dir.join("sys").to_str().unwrap(),
        ],
        &address,
    );
    (exporter, address)
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
    let (_exporter, exporter_address) = start_exporter(dir.path(), &exporter_config);

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

/// Every `expr` in a dashboard JSON, with its panel's title, rows included.
fn exprs(value: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            let title = map.get("title").and_then(|t| t.as_str()).unwrap_or(title);
            if let Some(expr) = map.get("expr").and_then(|e| e.as_str()) {
                out.push((title.to_owned(), expr.to_owned()));
            }
            for v in map.values() {
                exprs(v, title, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, title, out)),
        _ => {}
    }
}

/// NVIDIA's own dashboard for dcgm-exporter (Grafana 12239, kept in
/// tests/fixtures/upstream/dcgm-exporter) against a real Prometheus running
/// alerts/dcgm-compat.rules.yml over the exporter with two recorded GPUs: every panel NVML can
/// feed answers, its variables list the instance and the GPUs, and the values are the
/// recorded ones in DCGM's units. The one profiling panel (DCGM_FI_PROF_*) is the documented
/// exception.
#[test]
fn nvidias_dcgm_dashboard_answers_from_aistack_data_through_the_compat_rules() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gpu").join(name)).unwrap())
            .unwrap()
    };
    let mut scenario = read("h100-80gb-hbm3.json");
    let mut rtx = read("rtx-4080-super.json")["devices"][0].clone();
    rtx["index"] = serde_json::json!(1);
    rtx["uuid"] = serde_json::json!("GPU-44444444-0000-0000-0000-000000000000");
    rtx["pci_bus_id"] = serde_json::json!("00000000:41:00.0");
    scenario["devices"].as_array_mut().unwrap().push(rtx);
    std::fs::write(
        dir.path().join("scenario.json"),
        serde_json::to_vec(&scenario).unwrap(),
    )
    .unwrap();
    let config = dir.path().join("exporter.yaml");
    std::fs::write(
        &config,
        format!("gpu: {{nvml_library: {}}}\n", fake_nvml_library().display()),
    )
    .unwrap();
    let (_exporter, address) = start_exporter(dir.path(), &config);
    let rules = workspace_root().join("alerts/dcgm-compat.rules.yml");
    let prometheus = Prometheus::start_with(&[("aistack-exporter", &address)], Some(&rules), None);
    let value = |promql: &str| -> Option<f64> {
        prometheus.query(promql).first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    wait_for(Duration::from_secs(30), "DCGM_FI_DEV_* recorded", || {
        (prometheus.query("DCGM_FI_DEV_GPU_TEMP").len() == 2).then_some(())
    });

    // The dashboard's variables: label_values(DCGM_FI_DEV_GPU_TEMP, instance|gpu).
    let label_values = |label: &str| -> BTreeSet<String> {
        prometheus
            .query(&format!("count by ({label}) (DCGM_FI_DEV_GPU_TEMP)"))
            .iter()
            .filter_map(|s| s["metric"][label].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(label_values("instance"), BTreeSet::from([address.clone()]));
    assert_eq!(
        label_values("gpu"),
        BTreeSet::from(["0".to_owned(), "1".to_owned()])
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures().join("upstream/dcgm-exporter/dcgm-exporter-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut panels = Vec::new();
    exprs(&dashboard["panels"], "", &mut panels);
    assert_eq!(panels.len(), 8, "{panels:#?}");
    let mut profiling = Vec::new();
    for (title, expr) in &panels {
        let expr = expr.replace("$instance", ".*").replace("$gpu", ".*");
        let result = prometheus.query(&expr);
        if expr.contains("DCGM_FI_PROF_") {
            // Profiling counters need DCGM itself (docs/gpu.md#dcgm-names).
            assert!(result.is_empty(), "{title}: {result:?}");
            profiling.push(title.clone());
            continue;
        }
        assert!(!result.is_empty(), "{title}: {expr} answers nothing");
        // Grafana's single-GPU choice too.
        let one = expr.replace("gpu=~\".*\"", "gpu=~\"1\"");
        assert!(!prometheus.query(&one).is_empty(), "{title}: {one}");
    }
    assert_eq!(profiling, ["Tensor Core Utilization"]);

    // DCGM's units, from the recorded H100 (GPU 0): °C, W, MHz, %, MiB, mJ.
    let h100 = |name: &str| value(&format!("{name}{{gpu=\"0\"}}"));
    assert_eq!(h100("DCGM_FI_DEV_GPU_TEMP"), Some(59.0));
    assert_eq!(h100("DCGM_FI_DEV_MEMORY_TEMP"), Some(55.0));
    assert_eq!(h100("DCGM_FI_DEV_POWER_USAGE"), Some(629.45));
    assert_eq!(h100("DCGM_FI_DEV_SM_CLOCK"), Some(1980.0));
    assert_eq!(h100("DCGM_FI_DEV_MEM_CLOCK"), Some(2619.0));
    assert_eq!(h100("DCGM_FI_DEV_GPU_UTIL"), Some(100.0));
    assert_eq!(h100("DCGM_FI_DEV_MEM_COPY_UTIL"), Some(11.0));
    assert_eq!(
        h100("DCGM_FI_DEV_FB_USED"),
        Some(20_780_679_168.0 / 1_048_576.0)
    );
    assert_eq!(
        h100("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"),
        Some(1_843_276_512.0)
    );
    assert_eq!(h100("DCGM_FI_DEV_PCIE_REPLAY_COUNTER"), Some(9.0));
    assert_eq!(h100("DCGM_FI_DEV_PCIE_LINK_GEN"), Some(5.0));
    assert_eq!(h100("DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH"), Some(16.0));
    assert_eq!(h100("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"), Some(0.0));
    assert_eq!(h100("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"), Some(0.0));
    assert_eq!(h100("DCGM_FI_DEV_ROW_REMAP_FAILURE"), Some(0.0));
    assert_eq!(h100("DCGM_FI_DEV_XID_ERRORS"), Some(0.0));
    // A GeForce card has no ECC and no HBM: no series, as with dcgm-exporter.
    for absent in ["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_MEMORY_TEMP"] {
        assert!(
            prometheus
                .query(&format!("{absent}{{gpu=\"1\"}}"))
                .is_empty(),
            "{absent}"
        );
    }
    assert_eq!(value("DCGM_FI_DEV_ENC_UTIL{gpu=\"1\"}"), Some(72.0));

    // dcgm-exporter's labels on every recorded series.
    let series = prometheus.query(r#"{__name__=~"DCGM_FI_DEV_.+", gpu="1"}"#);
    assert!(series.len() >= 15, "{series:#?}");
    for s in &series {
        let m = &s["metric"];
        assert_eq!(m["UUID"], "GPU-44444444-0000-0000-0000-000000000000", "{m}");
        assert_eq!(m["modelName"], "NVIDIA GeForce RTX 4080 SUPER", "{m}");
        assert_eq!(m["device"], "nvidia1", "{m}");
        assert_eq!(m["Hostname"], "127.0.0.1", "{m}");
        assert_eq!(m["pci_bus_id"], "00000000:41:00.0", "{m}");
        assert_eq!(m["DCGM_FI_DRIVER_VERSION"], "590.48.01", "{m}");
        assert_eq!(m["instance"], address.as_str(), "{m}");
        assert!(m.get("uuid").is_none() && m.get("name").is_none(), "{m}");
    }
}
