//! The gpu collector end to end: the real exporter binary loading NVML through nvml-wrapper —
//! the missing library of this machine, and the stand-in libnvidia-ml (tests/fake-nvml)
//! answering from recorded GPUs — including a driver that goes away and comes back, and
//! `GET /api/v1/gpu`, what the actioner's failback re-check reads.

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
            let body = exporter.scrape().body;
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

/// Adds a process to the procfs under `dir` (before [`start`] copies the fixture tree over
/// it): its `comm`, its command line and a cgroup outside any container.
fn add_process(dir: &Path, pid: u32, comm: &str, argv: &[&str]) {
    let proc = dir.join("proc").join(pid.to_string());
    std::fs::create_dir_all(&proc).unwrap();
    std::fs::write(proc.join("comm"), format!("{comm}\n")).unwrap();
    let cmdline: String = argv.iter().map(|a| format!("{a}\0")).collect();
    std::fs::write(proc.join("cmdline"), cmdline).unwrap();
    std::fs::write(
        proc.join("cgroup"),
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam.scope\n",
    )
    .unwrap();
}

/// `GET /api/v1/gpu` as JSON.
fn gpu_api(exporter: &Daemon) -> serde_json::Value {
    let reply = exporter.get("/api/v1/gpu");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.content_type.starts_with("application/json"),
        "{}",
        reply.content_type
    );
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body))
}

fn wait_for_api(
    exporter: &Daemon,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(Duration::from_secs(20), what, || {
        let json = gpu_api(exporter);
        check(&json).then_some(json)
    })
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
    // The API says what aistack_nvml_up says: no NVML, no GPU, and never a sample.
    let reply = exporter.get("/api/v1/gpu");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        r#"{"nvml_up":false,"sample_age_s":null,"interval_s":1.0,"gpus":[]}"#
    );
}

#[test]
fn the_gpu_api_sees_a_game_start_and_quit_next_to_an_inference_service() {
    let dir = tempfile::tempdir().unwrap();
    // Ollama serving on the GPU, and a Windows game through Proton (comm is cut at 15 bytes;
    // the command line ends in .exe).
    add_process(
        dir.path(),
        7001,
        "ollama",
        &["/usr/local/bin/ollama", "serve"],
    );
    add_process(
        dir.path(),
        7002,
        "Cyberpunk2077.e",
        &[r"Z:\home\gamer\Games\Cyberpunk 2077\bin\x64\Cyberpunk2077.exe"],
    );
    let mut scenario = recorded("rtx-4080-super.json");
    let ollama =
        serde_json::json!({"pid": 7001, "kind": "compute", "used_memory_bytes": 9_663_676_416u64});
    let game =
        serde_json::json!({"pid": 7002, "kind": "graphics", "used_memory_bytes": 4_294_967_296u64});
    scenario["devices"][0]["processes"] = serde_json::json!([ollama, game]);
    let exporter = start(dir.path(), &scenario);

    let json = wait_for_api(&exporter, "NVML up", |j| j["nvml_up"] == true);
    let gpus = json["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 1, "{json}");
    assert_eq!(
        gpus[0],
        serde_json::json!({
            "gpu": 0,
            "uuid": "GPU-00000000-0000-0000-0000-000000000000",
            "name": "NVIDIA GeForce RTX 4080 SUPER",
            "host_workload_active": true,
            "host_workload_processes": ["Cyberpunk2077.e"],
        })
    );
    let age = json["sample_age_s"].as_f64().unwrap();
    assert!((0.0..5.0).contains(&age), "{json}");
    // The same as the metrics the alert rules read.
    let body = exporter.scrape().body;
    let gpu = r#"{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER"}"#;
    assert_eq!(value(&body, "aistack_nvml_up"), Some(1.0));
    assert_eq!(
        value(&body, &format!("aistack_gpu_host_workload_active{gpu}")),
        Some(1.0)
    );

    // The game quits; Ollama stays: the GPU is free of host workload.
    scenario["devices"][0]["processes"] = serde_json::json!([ollama]);
    write_scenario(&dir.path().join("scenario.json"), &scenario);
    let json = wait_for_api(&exporter, "the game to go", |j| {
        j["gpus"][0]["host_workload_active"] == false
    });
    assert_eq!(json["nvml_up"], true);
    assert_eq!(
        json["gpus"][0]["host_workload_processes"],
        serde_json::json!([])
    );
    assert_eq!(
        value(
            &exporter.scrape().body,
            &format!("aistack_gpu_host_workload_active{gpu}")
        ),
        Some(0.0)
    );

    // The driver goes away: no evidence either way, and the age of the last good sample.
    write_scenario(
        &dir.path().join("scenario.json"),
        &serde_json::json!({"gone": true}),
    );
    let json = wait_for_api(&exporter, "NVML down", |j| j["nvml_up"] == false);
    assert_eq!(json["gpus"], serde_json::json!([]));
    assert!(json["sample_age_s"].as_f64().is_some(), "{json}");
    assert_eq!(value(&exporter.scrape().body, "aistack_nvml_up"), Some(0.0));
}

#[test]
fn the_gpu_api_says_when_the_collector_is_off() {
    let exporter = Daemon::start(EXPORTER, &["--no-collector.gpu"]);
    let reply = exporter.get("/api/v1/gpu");
    assert_eq!(reply.status, 404);
    assert!(
        reply.content_type.starts_with("application/json"),
        "{}",
        reply.content_type
    );
    assert_eq!(reply.body, r#"{"error":"the gpu collector is disabled"}"#);
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
            &exporter.scrape().body,
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

/// Transcodes churning on the GPU, and a pid NVML lists twice (two contexts): through the C
/// API, one series per pid, the service's always, the 8 largest others, the rest summed.
#[test]
fn process_series_stay_unique_and_bounded_through_the_nvml_c_api() {
    let dir = tempfile::tempdir().unwrap();
    add_process(
        dir.path(),
        7001,
        "ollama",
        &["/usr/local/bin/ollama", "serve"],
    );
    let mut processes = vec![
        serde_json::json!({"pid": 7001, "kind": "compute", "used_memory_bytes": 1u64 << 20}),
        serde_json::json!({"pid": 7002, "kind": "compute", "used_memory_bytes": 300u64 << 20}),
        serde_json::json!({"pid": 7002, "kind": "compute", "used_memory_bytes": 100u64 << 20}),
    ];
    for i in 0..30_u64 {
        add_process(
            dir.path(),
            8000 + i as u32,
            "ffmpeg",
            &["ffmpeg", "-hwaccel", "cuda"],
        );
        processes.push(serde_json::json!({
            "pid": 8000 + i, "kind": "compute", "used_memory_bytes": (10 + i) << 20
        }));
    }
    add_process(dir.path(), 7002, "python3", &["python3", "train.py"]);
    let mut scenario = recorded("rtx-4080-super.json");
    scenario["devices"][0]["processes"] = serde_json::Value::Array(processes);
    let exporter = start(dir.path(), &scenario);
    let body = wait_for(Duration::from_secs(20), "the processes", || {
        let body = exporter.scrape().body;
        body.contains(r#"service="ollama""#).then_some(body)
    });
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("aistack_gpu_process_memory_bytes{"))
        .collect();
    let keys: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().0)
        .collect();
    assert_eq!(keys.len(), lines.len(), "duplicate series:\n{body}");
    // ollama + python3 + 7 ffmpeg of their own + one "other" sum.
    assert_eq!(lines.len(), 1 + 8 + 1, "{body}");
    let mib = |needle: &str| {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap() / f64::from(1 << 20))
    };
    assert_eq!(
        mib(r#"pid="7002""#),
        Some(400.0),
        "two contexts, one series"
    );
    assert_eq!(
        mib(r#"pid="7001""#),
        Some(1.0),
        "a service keeps its series"
    );
    assert_eq!(mib(r#"pid="8029""#), Some(39.0));
    assert_eq!(mib(r#"pid="8023""#), Some(33.0));
    assert_eq!(mib(r#"pid="8022""#), None);
    assert_eq!(
        mib(r#"pid="",process="other""#),
        Some((10..=32).sum::<u32>().into())
    );
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
}
