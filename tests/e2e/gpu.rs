//! The gpu collector end to end: the real exporter binary loading NVML through nvml-wrapper —
//! the missing library of this machine, and the stand-in libnvidia-ml (tests/fake-nvml)
//! answering from recorded GPUs — including a driver that goes away and comes back, and
//! `GET /api/v1/gpu`, what the actioner's failback re-check reads.

use std::path::Path;
use std::time::Duration;

use aistack_tests::{Daemon, copy_tree, fake_gpu_exporter, fixtures, parse_openmetrics, wait_for};

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
    add_process_in(
        dir,
        pid,
        comm,
        argv,
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam.scope\n",
    );
}

/// [`add_process`] in the cgroup `cgroup` (a pod's, say): its `/proc/<pid>/cgroup`.
fn add_process_in(dir: &Path, pid: u32, comm: &str, argv: &[&str], cgroup: &str) {
    let proc = dir.join("proc").join(pid.to_string());
    std::fs::create_dir_all(&proc).unwrap();
    std::fs::write(proc.join("comm"), format!("{comm}\n")).unwrap();
    let cmdline: String = argv.iter().map(|a| format!("{a}\0")).collect();
    std::fs::write(proc.join("cmdline"), cmdline).unwrap();
    std::fs::write(proc.join("cgroup"), cgroup).unwrap();
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
    start_with(dir, scenario, "")
}

/// [`start`] with `gpu_config` added to the `gpu:` section (`, key: value` flow style).
fn start_with(dir: &Path, scenario: &serde_json::Value, gpu_config: &str) -> Daemon {
    copy_tree(&fixtures().join("roots/t0"), dir);
    write_scenario(&dir.join("scenario.json"), scenario);
    fake_gpu_exporter(
        dir,
        gpu_config,
        "services: [{name: ollama, kind: ollama, url: 'http://127.0.0.1:11434'}]\n",
        "127.0.0.1:0",
        &[],
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
            "up": true,
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

const RTX: &str = r#"gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER""#;

/// The home lab's eGPU over Thunderbolt: unplugged mid-run (XID 79, then the device answers
/// GPU_IS_LOST, then it leaves the device list), and plugged in again. Its series read
/// `gpu_up 0` instead of vanishing, the GPU API says the GPU is lost (so failback refuses),
/// and it comes back through a re-initialisation of NVML.
#[test]
fn an_egpu_unplugged_mid_run_reads_down_and_comes_back_when_plugged_in() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.json");
    let egpu = recorded("rtx-4080-super.json");
    let exporter = start(dir.path(), &egpu);
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    // XID counters of the alerted XIDs start at 0 (once the event thread registered the GPU,
    // a moment after the first sample), so the first one is an increase.
    let body = wait_for_value(
        &exporter,
        &format!(r#"aistack_gpu_xid_errors_total{{{RTX},xid="79"}}"#),
        0.0,
    );
    assert_eq!(
        value(&body, &format!("aistack_gpu_last_xid{{{RTX}}}")),
        Some(0.0)
    );

    // Fallen off the bus: XID 79 arrives, the device answers GPU_IS_LOST.
    let mut unplugged = egpu.clone();
    unplugged["devices"][0]["lost"] = serde_json::json!(true);
    unplugged["devices"][0]["xids"] = serde_json::json!([79]);
    write_scenario(&scenario, &unplugged);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 0.0);
    let body = if value(&body, &format!("aistack_gpu_last_xid{{{RTX}}}")) == Some(79.0) {
        body
    } else {
        wait_for_value(&exporter, &format!("aistack_gpu_last_xid{{{RTX}}}"), 79.0)
    };
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_xid_errors_total{{{RTX},xid="79"}}"#)
        ),
        Some(1.0),
        "{body}"
    );
    assert!(!body.contains("aistack_gpu_info{"), "{body}");
    assert_eq!(value(&body, "aistack_nvml_up"), Some(1.0));
    let api = gpu_api(&exporter);
    assert_eq!(api["gpus"][0]["up"], false, "{api}");

    // Gone from the device list; still down, not vanished.
    let mut removed = egpu.clone();
    removed["devices"] = serde_json::json!([]);
    write_scenario(&scenario, &removed);
    std::thread::sleep(Duration::from_secs(3));
    let body = exporter.scrape().body;
    assert_eq!(
        value(&body, &format!("aistack_gpu_up{{{RTX}}}")),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_xid_errors_total{{{RTX},xid="79"}}"#)
        ),
        Some(1.0),
        "counts outlive the device: {body}"
    );

    // Plugged in again: found at the next re-initialisation (5 s after it went missing).
    let mut replugged = egpu.clone();
    replugged["devices"][0]["xids"] = serde_json::json!([79]);
    write_scenario(&scenario, &replugged);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    assert!(body.contains("aistack_gpu_info{"), "{body}");
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_xid_errors_total{{{RTX},xid="79"}}"#)
        ),
        Some(1.0),
        "an XID is delivered once: {body}"
    );
    assert_eq!(gpu_api(&exporter)["gpus"][0]["up"], true);
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let calls = std::fs::read_to_string(dir.path().join("calls.log")).unwrap();
    let inits = calls.lines().filter(|l| *l == "nvmlInit_v2").count();
    assert!(inits >= 2, "re-initialised to find the GPU again:\n{inits}");
}

/// The desktop GPU beside the eGPU: the recorded RTX 4080.
const DESKTOP: &str = RTX;
const EGPU: &str =
    r#"gpu="1",uuid="GPU-e9e9e9e9-0000-0000-0000-000000000001",name="NVIDIA GeForce RTX 3090""#;

/// A desktop GPU and an eGPU: the recorded RTX 4080 twice, the second renamed.
fn desktop_and_egpu() -> serde_json::Value {
    let mut scenario = recorded("rtx-4080-super.json");
    let mut egpu = scenario["devices"][0].clone();
    egpu["uuid"] = serde_json::json!("GPU-e9e9e9e9-0000-0000-0000-000000000001");
    egpu["name"] = serde_json::json!("NVIDIA GeForce RTX 3090");
    egpu["pci_bus_id"] = serde_json::json!("00000000:0A:00.0");
    egpu["processes"] = serde_json::json!([]);
    scenario["devices"].as_array_mut().unwrap().push(egpu);
    scenario
}

/// Next to a healthy desktop GPU, the eGPU falls off the bus: its XID 79 — from a device that
/// can no longer tell its UUID — counts on the eGPU alone, never on the healthy GPU (which
/// would mark it lost too). The exporter restarts while the eGPU is gone: from the roster file
/// the eGPU still reads `gpu_up 0`, so the restart does not resolve AistackGpuLost.
#[test]
fn an_unplugged_egpus_xid_stays_on_the_egpu_and_a_restart_remembers_it() {
    let dir = tempfile::tempdir().unwrap();
    let roster = dir.path().join("state").join("gpus.json");
    std::fs::create_dir_all(roster.parent().unwrap()).unwrap();
    let gpu_config = format!(", state_file: {}", roster.display());
    let scenario = dir.path().join("scenario.json");
    let both = desktop_and_egpu();
    let exporter = start_with(dir.path(), &both, &gpu_config);
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 1.0);
    let xid79 = |gpu: &str| format!(r#"aistack_gpu_xid_errors_total{{{gpu},xid="79"}}"#);

    let mut unplugged = both.clone();
    unplugged["devices"][1]["lost"] = serde_json::json!(true);
    unplugged["devices"][1]["xids"] = serde_json::json!([79]);
    write_scenario(&scenario, &unplugged);
    wait_for_value(&exporter, &format!("aistack_gpu_last_xid{{{EGPU}}}"), 79.0);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 0.0);
    assert_eq!(value(&body, &xid79(EGPU)), Some(1.0), "{body}");
    assert_eq!(value(&body, &xid79(DESKTOP)), Some(0.0), "{body}");
    assert_eq!(
        value(&body, &format!("aistack_gpu_up{{{DESKTOP}}}")),
        Some(1.0),
        "{body}"
    );
    let text = std::fs::read_to_string(&roster).unwrap();
    assert!(
        text.contains("GPU-e9e9e9e9-0000-0000-0000-000000000001"),
        "{text}"
    );

    // Restarted with the eGPU gone from the device list.
    drop(exporter);
    let mut gone = both.clone();
    gone["devices"].as_array_mut().unwrap().pop();
    let exporter = start_with(dir.path(), &gone, &gpu_config);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{DESKTOP}}}"), 1.0);
    assert_eq!(
        value(&body, &format!("aistack_gpu_up{{{EGPU}}}")),
        Some(0.0),
        "{body}"
    );
    let api = gpu_api(&exporter);
    let lost: Vec<_> = api["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["up"] == false)
        .map(|g| g["uuid"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lost, ["GPU-e9e9e9e9-0000-0000-0000-000000000001"], "{api}");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));

    // Plugged in again: the remembered GPU is looked for (NVML re-initialised) and found.
    write_scenario(&scenario, &both);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 1.0);
    assert!(
        body.contains(&format!("aistack_gpu_info{{{EGPU}")),
        "{body}"
    );
}

/// GPU_IS_LOST from a call after the GPU's name and UUID answered (the reference allows it from
/// any device call) marks the GPU lost all the same.
#[test]
fn gpu_is_lost_from_any_call_reads_down() {
    let dir = tempfile::tempdir().unwrap();
    let both = desktop_and_egpu();
    let exporter = start(dir.path(), &both);
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 1.0);
    let mut failing = both.clone();
    failing["devices"][1]["lost_calls"] = serde_json::json!(["nvmlDeviceGetMemoryInfo_v2"]);
    write_scenario(&dir.path().join("scenario.json"), &failing);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 0.0);
    assert_eq!(
        value(&body, &format!("aistack_gpu_up{{{DESKTOP}}}")),
        Some(1.0),
        "{body}"
    );
    assert!(
        !body.contains(&format!("aistack_gpu_info{{{EGPU}")),
        "{body}"
    );
    write_scenario(&dir.path().join("scenario.json"), &both);
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{EGPU}}}"), 1.0);
}

/// A GDDR card without a memory sensor may answer the memory temperature field with 0 rather
/// than NOT_SUPPORTED: no memory at 0 °C on a running GPU, so the series is left out.
#[test]
fn a_memory_temperature_of_zero_is_no_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut scenario = recorded("rtx-4080-super.json");
    scenario["devices"][0]["memory_temperature_celsius"] = serde_json::json!(0);
    let exporter = start(dir.path(), &scenario);
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    assert!(body.contains("aistack_gpu_temperature_celsius{"), "{body}");
    assert!(
        !body.contains("aistack_gpu_memory_temperature_celsius{"),
        "{body}"
    );
}

/// GPU processes in Kubernetes pods: their cgroups name pod and container, the exporter lists
/// its node's pods from the (stand-in) API server with `spec.nodeName`, and labels the process
/// series with namespace, pod and container. A pod of a known inference image is a service;
/// another pod holding GPU memory is host workload, as a Docker container would be.
#[test]
fn processes_in_pods_are_named_and_inference_pods_are_services() {
    const VLLM_ID: &str = "aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b";
    const COMFY_ID: &str = "bb2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b";
    let api = aistack_tests::kubernetes::FakeKubernetes::start();
    api.add_pod(
        "ml",
        "vllm-7d9f8c6b5-x2x9q",
        "gpu-b",
        "vllm",
        "vllm/vllm-openai:v0.6.4",
        VLLM_ID,
    );
    api.add_pod(
        "art",
        "comfyui-0",
        "gpu-b",
        "comfyui",
        "ghcr.io/ai-dock/comfyui:latest",
        COMFY_ID,
    );
    // Another node's pod is not listed for this one.
    api.add_pod(
        "ml",
        "ollama-0",
        "gpu-a",
        "ollama",
        "ollama/ollama:0.5.4",
        &"c".repeat(64),
    );

    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    for (pid, comm, cgroup) in [
        // cgroup v2, systemd driver, containerd: the common K3s and kubeadm layout.
        (
            6001,
            "python3",
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5b1c0f7e_3333_4000_8000_000000000001.slice/cri-containerd-{VLLM_ID}.scope\n"
            ),
        ),
        // cgroupfs driver (K3s without systemd).
        (
            6002,
            "comfy",
            format!("0::/kubepods/besteffort/pod5b1c0f7e-3333-4000-8000-000000000002/{COMFY_ID}\n"),
        ),
    ] {
        add_process_in(dir.path(), pid, comm, &[comm, "/app/server.py"], &cgroup);
    }
    let mut scenario = recorded("rtx-4080-super.json");
    scenario["devices"][0]["processes"] = serde_json::json!([
        {"pid": 6001, "kind": "compute", "used_memory_bytes": 12_884_901_888_u64},
        {"pid": 6002, "kind": "compute", "used_memory_bytes": 4_294_967_296_u64}
    ]);
    write_scenario(&dir.path().join("scenario.json"), &scenario);
    let exporter = fake_gpu_exporter(
        dir.path(),
        "",
        "",
        "127.0.0.1:0",
        &[
            ("KUBECONFIG", api.kubeconfig.as_os_str()),
            ("NODE_NAME", "gpu-b".as_ref()),
        ],
    );
    let vllm = r#"aistack_gpu_process_memory_bytes{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER",pid="6001",process="python3",kind="compute",container="vllm",service="vllm",namespace="ml",pod="vllm-7d9f8c6b5-x2x9q"}"#;
    let comfy = r#"aistack_gpu_process_memory_bytes{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER",pid="6002",process="comfy",kind="compute",container="comfyui",service="",namespace="art",pod="comfyui-0"}"#;
    let body = wait_for_value(&exporter, vllm, 12_884_901_888.0);
    assert_eq!(value(&body, comfy), Some(4_294_967_296.0), "{body}");
    assert_eq!(value(&body, "aistack_gpu_pods_listed"), Some(1.0), "{body}");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    // The inference pod is no host workload; the other pod is.
    let api_view = gpu_api(&exporter);
    assert_eq!(
        api_view["gpus"][0]["host_workload_active"], true,
        "{api_view}"
    );
    assert_eq!(
        api_view["gpus"][0]["host_workload_processes"],
        serde_json::json!(["comfy"]),
        "{api_view}"
    );
    // It asked for its own node's pods only (the field selector), and nothing else.
    let requests = api.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.method, "GET");
        assert!(
            request.path.starts_with("/api/v1/pods?")
                && request.path.contains("fieldSelector=spec.nodeName%3Dgpu-b")
                && request.path.contains("resourceVersion=0"),
            "{}",
            request.path
        );
    }
}

/// A configured service names its pods by namespace and label selector: a home-built
/// inference image discovery cannot know, discovery off. Its pod is the service; a pod with
/// the same labels in another namespace holds the GPU as host workload.
#[test]
fn a_service_names_its_pods_by_namespace_and_label_selector() {
    const LLM_ID: &str = "dd2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b";
    const DEV_ID: &str = "ee2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b";
    let api = aistack_tests::kubernetes::FakeKubernetes::start();
    // Labels app=<container>, as the stand-in makes pods.
    api.add_pod(
        "ml",
        "llm-5c8d7-qk2vz",
        "gpu-b",
        "llm-server",
        "registry.home.lan/llm-server:3",
        LLM_ID,
    );
    api.add_pod(
        "dev",
        "llm-server-0",
        "gpu-b",
        "llm-server",
        "registry.home.lan/llm-server:3",
        DEV_ID,
    );
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    for (pid, id, pod) in [(6101, LLM_ID, 1), (6102, DEV_ID, 2)] {
        let cgroup =
            format!("0::/kubepods/burstable/pod5b1c0f7e-3333-4000-8000-00000000000{pod}/{id}\n");
        add_process_in(
            dir.path(),
            pid,
            "python3",
            &["python3", "/app/serve.py"],
            &cgroup,
        );
    }
    let mut scenario = recorded("rtx-4080-super.json");
    scenario["devices"][0]["processes"] = serde_json::json!([
        {"pid": 6101, "kind": "compute", "used_memory_bytes": 8_589_934_592_u64},
        {"pid": 6102, "kind": "compute", "used_memory_bytes": 2_147_483_648_u64}
    ]);
    write_scenario(&dir.path().join("scenario.json"), &scenario);
    let exporter = fake_gpu_exporter(
        dir.path(),
        "",
        "discovery: {kubernetes: false, docker: false}\n\
         services:\n  - {name: llm, kind: vllm, url: 'http://127.0.0.1:9', pods: {namespace: ml, selector: {app: llm-server}}}\n",
        "127.0.0.1:0",
        &[
            ("KUBECONFIG", api.kubeconfig.as_os_str()),
            ("NODE_NAME", "gpu-b".as_ref()),
        ],
    );
    let llm = r#"aistack_gpu_process_memory_bytes{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER",pid="6101",process="python3",kind="compute",container="llm-server",service="llm",namespace="ml",pod="llm-5c8d7-qk2vz"}"#;
    let dev = r#"aistack_gpu_process_memory_bytes{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA GeForce RTX 4080 SUPER",pid="6102",process="python3",kind="compute",container="llm-server",service="",namespace="dev",pod="llm-server-0"}"#;
    let body = wait_for_value(&exporter, llm, 8_589_934_592.0);
    assert_eq!(value(&body, dev), Some(2_147_483_648.0), "{body}");
    let api_view = gpu_api(&exporter);
    assert_eq!(
        api_view["gpus"][0]["host_workload_processes"],
        serde_json::json!(["python3"]),
        "only the dev pod: {api_view}"
    );
}

/// The node's pods cannot be listed (the API server down, or the list refused):
/// `aistack_gpu_pods_listed` says 0, and a GPU process in a pod the exporter cannot name is no
/// host workload (it is a Kubernetes workload, vLLM's own maybe), while one on the host is.
#[test]
fn pods_that_cannot_be_listed_say_so_and_count_as_no_host_workload() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), dir.path());
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n  - name: down\n    cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n  - name: exporter\n    user: {{token: t}}\ncontexts:\n  - name: down\n    context: {{cluster: down, user: exporter}}\ncurrent-context: down\n"
        ),
    )
    .unwrap();
    for (pid, comm, cgroup) in [
        (
            6201,
            "server",
            "0::/kubepods/burstable/pod5b1c0f7e-3333-4000-8000-000000000009/ab2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n",
        ),
        (
            6202,
            "blender",
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-blender.scope\n",
        ),
    ] {
        add_process_in(dir.path(), pid, comm, &[comm], cgroup);
    }
    let mut scenario = recorded("rtx-4080-super.json");
    scenario["devices"][0]["processes"] = serde_json::json!([
        {"pid": 6201, "kind": "compute", "used_memory_bytes": 8_589_934_592_u64},
        {"pid": 6202, "kind": "graphics", "used_memory_bytes": 1_073_741_824_u64}
    ]);
    write_scenario(&dir.path().join("scenario.json"), &scenario);
    let exporter = fake_gpu_exporter(
        dir.path(),
        "",
        "host_workload: {count_unattributed: true}\n",
        "127.0.0.1:0",
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("NODE_NAME", "gpu-b".as_ref()),
        ],
    );
    let body = wait_for_value(&exporter, "aistack_gpu_pods_listed", 0.0);
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let api_view = gpu_api(&exporter);
    assert_eq!(
        api_view["gpus"][0]["host_workload_processes"],
        serde_json::json!(["blender"]),
        "{api_view}"
    );
}

/// With NVML gone as a whole, the GPUs seen before read down (an eGPU that was the only
/// GPU), and XID counters stay.
#[test]
fn gpus_seen_before_read_down_while_nvml_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(dir.path(), &recorded("rtx-4080-super.json"));
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    write_scenario(
        &dir.path().join("scenario.json"),
        &serde_json::json!({"gone": true}),
    );
    let body = wait_for_value(&exporter, "aistack_nvml_up", 0.0);
    assert_eq!(
        value(&body, &format!("aistack_gpu_up{{{RTX}}}")),
        Some(0.0),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            r#"aistack_gpu_xid_errors_total{{{RTX},xid="79"}}"#
        )),
        "{body}"
    );
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
}

const H100: &str =
    r#"gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA H100 80GB HBM3""#;

/// The health fields of a recorded H100 (ECC on, row remapping, HBM temperature) and a
/// recorded consumer card (none of those: absent, not errors), then a row remap pending
/// after an uncorrectable error.
#[test]
fn health_fields_of_recorded_gpus_and_a_row_remap_pending() {
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(dir.path(), &recorded("h100-80gb-hbm3.json"));
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{H100}}}"), 1.0);
    let expect = [
        (
            format!("aistack_gpu_memory_temperature_celsius{{{H100}}}"),
            55.0,
        ),
        (
            format!("aistack_gpu_memory_utilization_ratio{{{H100}}}"),
            0.11,
        ),
        (
            format!("aistack_gpu_encoder_utilization_ratio{{{H100}}}"),
            0.0,
        ),
        (
            format!(r#"aistack_gpu_pcie_link_generation{{{H100},link="current"}}"#),
            5.0,
        ),
        (
            format!(r#"aistack_gpu_pcie_link_generation{{{H100},link="max"}}"#),
            5.0,
        ),
        (
            format!(r#"aistack_gpu_pcie_link_width{{{H100},link="current"}}"#),
            16.0,
        ),
        (
            format!(r#"aistack_gpu_pcie_link_width{{{H100},link="max"}}"#),
            16.0,
        ),
        (format!("aistack_gpu_pcie_replays_total{{{H100}}}"), 9.0),
        (
            format!(
                r#"aistack_gpu_ecc_errors_total{{{H100},type="uncorrected",scope="volatile"}}"#
            ),
            0.0,
        ),
        (
            format!(r#"aistack_gpu_ecc_errors_total{{{H100},type="corrected",scope="aggregate"}}"#),
            0.0,
        ),
        (
            format!(r#"aistack_gpu_remapped_rows{{{H100},cause="uncorrectable"}}"#),
            0.0,
        ),
        (format!("aistack_gpu_remapped_rows_pending{{{H100}}}"), 0.0),
        (format!("aistack_gpu_remapped_rows_failure{{{H100}}}"), 0.0),
    ];
    for (series, want) in &expect {
        assert_eq!(value(&body, series), Some(*want), "{series}\n{body}");
    }
    // Hopper retires no pages (it remaps rows): the family is absent.
    assert!(!body.contains("aistack_gpu_retired_pages{"), "{body}");
    parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));

    write_scenario(
        &dir.path().join("scenario.json"),
        &recorded("h100-row-remap-pending.json"),
    );
    let body = wait_for_value(
        &exporter,
        &format!("aistack_gpu_remapped_rows_pending{{{H100}}}"),
        1.0,
    );
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_remapped_rows{{{H100},cause="uncorrectable"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &body,
            &format!(
                r#"aistack_gpu_ecc_errors_total{{{H100},type="uncorrected",scope="volatile"}}"#
            )
        ),
        Some(1.0)
    );

    let dir = tempfile::tempdir().unwrap();
    let exporter = start(dir.path(), &recorded("rtx-4080-super.json"));
    let body = wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    for absent in [
        "aistack_gpu_memory_temperature_celsius{",
        "aistack_gpu_ecc_errors_total{",
        "aistack_gpu_remapped_rows{",
        "aistack_gpu_retired_pages{",
    ] {
        assert!(!body.contains(absent), "{absent}\n{body}");
    }
    assert_eq!(
        value(
            &body,
            &format!("aistack_gpu_encoder_utilization_ratio{{{RTX}}}")
        ),
        Some(0.72)
    );
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_pcie_link_generation{{{RTX},link="max"}}"#)
        ),
        Some(4.0)
    );
}

/// An XID storm: thousands of application faults and a run of values no driver sends. Every
/// one is counted, distinct XIDs stay bounded, and the sampler and scrapes go on.
#[test]
fn an_xid_storm_is_counted_bounded_and_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("scenario.json");
    let mut gpu = recorded("rtx-4080-super.json");
    let exporter = start(dir.path(), &gpu);
    wait_for_value(&exporter, &format!("aistack_gpu_up{{{RTX}}}"), 1.0);
    let storm: Vec<u64> = (0..3000u64)
        .map(|i| [13, 31, 43][(i % 3) as usize])
        .chain(1000..1200)
        .collect();
    gpu["devices"][0]["xids"] = serde_json::json!(storm);
    write_scenario(&scenario, &gpu);
    let mut slowest = Duration::ZERO;
    let body = wait_for(Duration::from_secs(60), "every XID counted", || {
        let started = std::time::Instant::now();
        let body = exporter.scrape().body;
        slowest = slowest.max(started.elapsed());
        let total: f64 = body
            .lines()
            .filter(|l| l.starts_with("aistack_gpu_xid_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (total == storm.len() as f64).then_some(body)
    });
    assert!(
        slowest < Duration::from_secs(1),
        "a scrape took {slowest:?}"
    );
    let series = body
        .lines()
        .filter(|l| l.starts_with("aistack_gpu_xid_errors_total{"))
        .count();
    assert!(series <= 65, "{series} XID series");
    assert!(body.contains(r#"xid="other""#), "{body}");
    assert_eq!(
        value(
            &body,
            &format!(r#"aistack_gpu_xid_errors_total{{{RTX},xid="13"}}"#)
        ),
        Some(1000.0)
    );
    assert_eq!(
        value(&body, &format!("aistack_gpu_last_xid{{{RTX}}}")),
        Some(1199.0)
    );
    assert_eq!(value(&body, "aistack_nvml_up"), Some(1.0));
}
