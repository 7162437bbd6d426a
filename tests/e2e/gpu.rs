//! The gpu collector end to end: the real exporter binary loading NVML through nvml-wrapper —
//! the missing library of this machine, and the stand-in libnvidia-ml (tests/fake-nvml)
//! answering from recorded GPUs — including a driver that goes away and comes back.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aistack_tests::{
    Daemon, binary, copy_tree, fake_nvml_library, fixtures, parse_openmetrics, wait_for,
};

const EXPORTER: &str = "aistack-exporter";

fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn wait_for_value(exporter: &Daemon, series: &str, want: f64) -> String {
    wait_for(
        Duration::from_secs(20),
        &format!("{series} = {want}"),
        || {
            let body = exporter.get("/metrics").body;
            (value(&body, series) == Some(want)).then_some(body)
        },
    )
}

/// Writes a scenario atomically (the fake re-reads it on init and on every device count).
fn write_scenario(path: &Path, json: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(json).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn recorded(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("gpu").join(name)).unwrap())
        .unwrap()
}

/// An exporter whose NVML is the fake, answering from `scenario`; procfs is the t0 fixture
/// tree (it holds the recorded RTX 4080's processes).
fn start(dir: &Path, scenario: &serde_json::Value) -> Daemon {
    copy_tree(&fixtures().join("roots/t0"), dir);
    let path = dir.join("scenario.json");
    write_scenario(&path, scenario);
    let config = dir.join("exporter.yaml");
    std::fs::write(
        &config,
        format!(
            "gpu: {{nvml_library: {}}}\nservices: [{{name: ollama, kind: ollama, url: 'http://127.0.0.1:11434'}}]\n",
            fake_nvml_library().display()
        ),
    )
    .unwrap();
    let mut command = Command::new(binary(EXPORTER));
    command
        .env("FAKE_NVML_SCENARIO", &path)
        .env("FAKE_NVML_CALLS", dir.join("calls.log"));
    Daemon::start_with(
        command,
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--path.procfs",
            dir.join("proc").to_str().unwrap(),
            "--path.sysfs",
            dir.join("sys").to_str().unwrap(),
        ],
    )
}

#[test]
fn without_nvml_the_exporter_says_so_once_and_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("exporter.yaml");
    std::fs::write(
        &config,
        "gpu: {nvml_library: /nonexistent/libnvidia-ml.so.1}\n",
    )
    .unwrap();
    let exporter = Daemon::start(EXPORTER, &["--config.file", config.to_str().unwrap()]);
    let body = wait_for_value(&exporter, "aistack_nvml_up", 0.0);
    assert_eq!(
        value(&body, r#"aistack_collector_success{collector="gpu"}"#),
        Some(0.0)
    );
    assert!(!body.contains("aistack_gpu_"), "{body}");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    std::thread::sleep(Duration::from_secs(4));
    let log = exporter.log();
    let said: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("no GPU metrics until NVML answers"))
        .collect();
    assert_eq!(said.len(), 1, "{log:#?}");
    assert!(said[0].contains(r#""level":"INFO""#), "{said:?}");
    assert!(
        !log.iter().any(|l| l.contains(r#""level":"WARN""#)),
        "{log:#?}"
    );
    assert_eq!(exporter.get("/healthz").status, 200);
}

#[test]
fn a_recorded_rtx_4080_through_the_nvml_c_api() {
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(dir.path(), &recorded("rtx-4080-super.json"));
    let body = wait_for_value(&exporter, "aistack_nvml_up", 1.0);
    let families = parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    for family in [
        "aistack_gpu_info",
        "aistack_gpu_clock_hertz",
        "aistack_gpu_fan_speed_ratio",
        "aistack_gpu_process_memory_bytes",
    ] {
        assert!(families.iter().any(|f| f == family), "{family}:\n{body}");
    }
    let gpu = r#"{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER"}"#;
    assert_eq!(
        value(&body, &format!("aistack_gpu_power_watts{gpu}")),
        Some(84.03)
    );
    assert_eq!(
        value(&body, &format!("aistack_gpu_memory_total_bytes{gpu}")),
        Some(17_171_480_576.0)
    );
    assert_eq!(
        value(&body, &format!("aistack_gpu_utilization_ratio{gpu}")),
        Some(0.07)
    );
    assert!(
        body.contains(
            r#"driver_version="595.71.05",cuda_version="13.2",pci_bus_id="00000000:01:00.0""#
        ),
        "{body}"
    );
    // Graphics and compute processes, named from procfs; ffmpeg runs in a container.
    assert!(
        body.contains(
            r#"pid="2954",process="plasmashell",kind="graphics",container="",service="""#
        ),
        "{body}"
    );
    assert!(
        body.contains(
            r#"pid="5021",process="ffmpeg",kind="compute",container="9c1e5f7a3b2d",service="""#
        ),
        "{body}"
    );
    assert_eq!(
        value(&body, &format!("aistack_gpu_host_workload_active{gpu}")),
        Some(1.0)
    );
    // The GPU's watts are in the host estimate.
    let host = wait_for(Duration::from_secs(10), "a host estimate", || {
        value(
            &exporter.get("/metrics").body,
            "aistack_host_power_estimated_watts",
        )
    });
    assert!(host >= 30.0 + 84.03, "{host}");
}

#[test]
fn fanless_parts_and_unsupported_fields_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut h100 = recorded("h100-80gb-hbm3.json");
    h100["devices"][0]["total_energy_millijoules"] = serde_json::Value::Null;
    h100["devices"][0]["clocks_event_reasons"] = serde_json::json!(0x44);
    let exporter = start(dir.path(), &h100);
    let body = wait_for_value(&exporter, "aistack_nvml_up", 1.0);
    assert!(!body.contains("aistack_gpu_fan_speed_ratio{"), "{body}");
    assert!(!body.contains("aistack_gpu_energy_joules_total{"), "{body}");
    assert!(body.contains("aistack_gpu_temperature_celsius{"), "{body}");
    let throttled: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("aistack_gpu_throttle_active{") && l.ends_with(" 1.0"))
        .collect();
    assert_eq!(throttled.len(), 2, "{body}");
    assert!(
        throttled[0].contains(r#"reason="sw_power_cap""#)
            && throttled[1].contains(r#"reason="hw_thermal_slowdown""#)
    );
    // Processes whose pids /proc does not show are "unknown", not dropped.
    assert!(
        body.contains(r#"pid="11345",process="unknown",kind="compute""#),
        "{body}"
    );
}

#[test]
fn a_lost_gpu_is_left_out_and_the_others_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut two = recorded("l40s.json");
    let mut second = two["devices"][0].clone();
    second["index"] = serde_json::json!(1);
    second["uuid"] = serde_json::json!("GPU-11111111-1111-1111-1111-111111111111");
    second["lost"] = serde_json::json!(true);
    two["devices"].as_array_mut().unwrap().push(second);
    let exporter = start(dir.path(), &two);
    let body = wait_for_value(&exporter, "aistack_nvml_up", 1.0);
    assert!(body.contains(r#"aistack_gpu_info{gpu="0""#), "{body}");
    assert!(!body.contains(r#"gpu="1""#), "{body}");
}

#[test]
fn a_driver_that_goes_away_and_comes_back_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let l40s = recorded("l40s.json");
    let exporter = start(dir.path(), &l40s);
    wait_for_value(&exporter, "aistack_nvml_up", 1.0);

    let scenario = dir.path().join("scenario.json");
    write_scenario(&scenario, &serde_json::json!({"gone": true}));
    let body = wait_for_value(&exporter, "aistack_nvml_up", 0.0);
    assert!(!body.contains("aistack_gpu_info"), "{body}");
    std::thread::sleep(Duration::from_secs(3));

    write_scenario(&scenario, &l40s);
    let body = wait_for_value(&exporter, "aistack_nvml_up", 1.0);
    assert!(body.contains("aistack_gpu_info{"), "{body}");

    let log = exporter.log();
    assert!(
        log.iter()
            .any(|l| l.contains("NVML went away") && l.contains(r#""level":"WARN""#)),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("NVML is back")), "{log:#?}");
    let calls = std::fs::read_to_string(dir.path().join("calls.log")).unwrap();
    let inits = calls.lines().filter(|l| *l == "nvmlInit_v2").count();
    assert!(
        calls.lines().any(|l| l == "nvmlShutdown"),
        "the old handle is shut down"
    );
    // One init at start, failed retries with backoff while gone (1 s, 2 s, ...), one that works.
    assert!((3..=6).contains(&inits), "{inits} inits:\n{calls}");
}
