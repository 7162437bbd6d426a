//! The gpu collector against recorded readings of real GPUs (tests/fixtures/gpu), through a
//! scripted [`GpuSource`]; the NVML path itself is tested end to end against a fake
//! libnvidia-ml (tests/fake-nvml).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::collectors::{CollectorKind, Snapshot, Status, channel};
use crate::config::{HostWorkloadConfig, ServiceConfig};
use crate::metrics::{ExporterMetrics, view};

fn fixture(name: &str) -> GpuReading {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gpu")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Answers with the scripted results in turn, then repeats the last.
struct Scripted {
    results: VecDeque<Result<GpuReading, GpuError>>,
    reads: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
}

impl GpuSource for Scripted {
    fn read(&mut self) -> Result<GpuReading, GpuError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.results.len() > 1 {
            self.results.pop_front().unwrap()
        } else {
            self.results.front().cloned().unwrap()
        }
    }

    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct Harness {
    collector: GpuCollector,
    reads: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    _procfs: tempfile::TempDir,
}

/// A collector over `results` with a procfs holding `processes` (pid, comm, cmdline).
fn harness(
    results: Vec<Result<GpuReading, GpuError>>,
    processes: &[(u32, &str, &str)],
    services: &str,
) -> Harness {
    let procfs = tempfile::tempdir().unwrap();
    for (pid, comm, cmdline) in processes {
        let dir = procfs.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(dir.join("cmdline"), cmdline.replace(' ', "\0")).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            "0::/user.slice/user-1000.slice/session-2.scope\n",
        )
        .unwrap();
    }
    let services: Vec<ServiceConfig> = serde_yaml::from_str(services).unwrap();
    let attribution = Attribution::new(&services, &HostWorkloadConfig::default()).unwrap();
    let (reads, resets) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let source = Scripted {
        results: results.into(),
        reads: reads.clone(),
        resets: resets.clone(),
    };
    Harness {
        collector: GpuCollector::new(Box::new(source), procfs.path().to_owned(), attribution),
        reads,
        resets,
        _procfs: procfs,
    }
}

fn encode(sample: Option<GpuSample>) -> String {
    let (tx, rx) = channel();
    tx.send_replace(Snapshot {
        sample: sample.map(Arc::new),
        status: Some(Status {
            success: true,
            duration: Duration::ZERO,
            last_success: None,
        }),
    });
    let registry = ExporterMetrics::new(vec![view(CollectorKind::Gpu, rx)]).into_registry();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

const H100: &str =
    r#"{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",name="NVIDIA H100 80GB HBM3"}"#;

#[tokio::test]
async fn an_h100_under_load() {
    let reading = fixture("h100-80gb-hbm3.json");
    let mut h = harness(
        vec![Ok(reading)],
        &[
            (11327, "memhog", "/root/tools/memhog 2560"),
            (11328, "memhog", "/root/tools/memhog 1536"),
            (11345, "gpu_burn", "./gpu_burn 60"),
        ],
        "[]",
    );
    let sample = h.collector.sample(Instant::now()).await.unwrap();
    assert_eq!(sample.cuda_version, "13.1");
    assert_eq!(sample.power_watts(), 629.45);
    let text = encode(Some(sample));
    assert!(text.contains("aistack_nvml_up 1"), "{text}");
    assert_eq!(
        line(&text, &format!("aistack_gpu_utilization_ratio{H100}")),
        Some(&*format!("aistack_gpu_utilization_ratio{H100} 1.0"))
    );
    assert_eq!(
        line(&text, &format!("aistack_gpu_power_watts{H100}")),
        Some(&*format!("aistack_gpu_power_watts{H100} 629.45"))
    );
    assert!(
        line(&text, "aistack_gpu_info{")
            .unwrap()
            .contains(r#"driver_version="590.48.01",cuda_version="13.1",pci_bus_id=""#)
    );
    assert!(
        !text.contains("aistack_gpu_fan_speed_ratio{"),
        "an H100 has no fan:\n{text}"
    );
    assert!(text.contains("aistack_gpu_energy_joules_total{"), "{text}");
    assert!(text.contains(r#"clock="sm"} "#), "{text}");
    // Three compute processes, none of them a configured service: the GPU is busy with
    // host workload (no services are configured on this host).
    let processes: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("aistack_gpu_process_memory_bytes{"))
        .collect();
    assert_eq!(processes.len(), 3, "{text}");
    assert!(processes.iter().any(|l| {
        l.contains(r#"pid="11345",process="gpu_burn",kind="compute",container="",service="""#)
    }));
    assert_eq!(
        line(&text, "aistack_gpu_host_workload_active{")
            .unwrap()
            .rsplit(' ')
            .next(),
        Some("1.0")
    );
}

#[tokio::test]
async fn a_desktop_card_with_fans_and_graphics_processes() {
    let reading = fixture("rtx-4080-super.json");
    let processes = [
        (2165, "kwin_wayland", "/usr/bin/kwin_wayland --wayland-fd 7"),
        (2496, "plasma-keyboard", "/usr/bin/plasma-keyboard"),
        (2620, "Xwayland", "/usr/bin/Xwayland :0"),
        (2954, "plasmashell", "/usr/bin/plasmashell --no-respawn"),
        (3527, "xwaylandvideobr", "/usr/bin/xwaylandvideobridge"),
        (5021, "ffmpeg", "ffmpeg -hwaccel cuda -i in.mkv out.mkv"),
        (5022, "ffmpeg", "ffmpeg -hwaccel cuda -i in2.mkv out2.mkv"),
    ];
    let mut h = harness(vec![Ok(reading.clone())], &processes, "[]");
    let sample = h.collector.sample(Instant::now()).await.unwrap();
    let device = &sample.devices[0];
    let workload: Vec<&str> = device
        .processes
        .iter()
        .filter(|p| p.host_workload)
        .map(|p| p.process.as_str())
        .collect();
    assert_eq!(
        workload,
        ["ffmpeg", "ffmpeg"],
        "the desktop's own processes do not count"
    );
    let text = encode(Some(sample));
    assert!(
        line(&text, "aistack_gpu_fan_speed_ratio{")
            .unwrap()
            .ends_with(" 0.0"),
        "{text}"
    );
    assert_eq!(text.matches(r#"kind="graphics""#).count(), 4, "{text}");

    // The same card with only the desktop on it is no host workload.
    let mut desktop_only = reading;
    desktop_only.devices[0].processes.retain(|p| p.pid < 5000);
    let mut h = harness(vec![Ok(desktop_only)], &processes, "[]");
    let sample = h.collector.sample(Instant::now()).await.unwrap();
    assert!(!sample.devices[0].host_workload_active());
}

#[tokio::test]
async fn inference_services_are_not_host_workload() {
    let mut reading = fixture("l40s.json");
    reading.devices[0].processes.push(ProcessReading {
        pid: 30001,
        kind: ProcessKind::Compute,
        used_memory_bytes: Some(40 << 30),
    });
    reading.devices[0].processes.retain(|p| p.pid == 30001);
    let mut h = harness(
        vec![Ok(reading)],
        &[(
            30001,
            "python3",
            "/usr/bin/python3 -m vllm.entrypoints.openai.api_server --model m",
        )],
        "- {name: vllm, kind: vllm, url: 'http://127.0.0.1:8000'}",
    );
    let sample = h.collector.sample(Instant::now()).await.unwrap();
    let p = &sample.devices[0].processes[0];
    assert_eq!((p.service.as_str(), p.host_workload), ("vllm", false));
    assert!(!sample.devices[0].host_workload_active());
    assert!(encode(Some(sample)).contains(
        r#"process="python3",kind="compute",container="",service="vllm"} 42949672960.0"#
    ));
}

#[tokio::test]
async fn unsupported_fields_are_left_out_and_the_rest_stays() {
    let mut reading = fixture("rtx-2080-super.json");
    let d = &mut reading.devices[0];
    d.total_energy_millijoules = None;
    d.power_usage_milliwatts = None;
    d.clocks_mhz.sm = None;
    d.clocks_event_reasons = Some(0x4 | 0x40);
    let mut h = harness(vec![Ok(reading)], &[], "[]");
    let text = encode(Some(h.collector.sample(Instant::now()).await.unwrap()));
    assert!(!text.contains("aistack_gpu_energy_joules"), "{text}");
    assert!(!text.contains("aistack_gpu_power_watts{"), "{text}");
    assert!(!text.contains(r#"clock="sm""#), "{text}");
    assert!(text.contains(r#"clock="graphics""#), "{text}");
    assert!(text.contains("aistack_gpu_temperature_celsius{"), "{text}");
    let active: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("aistack_gpu_throttle_active{") && l.ends_with(" 1.0"))
        .collect();
    assert_eq!(active.len(), 2, "{text}");
    assert!(
        active[0].contains(r#"reason="sw_power_cap""#)
            && active[1].contains(r#"reason="hw_thermal_slowdown""#)
    );
    assert_eq!(
        text.matches("aistack_gpu_throttle_active{").count(),
        CLOCK_EVENT_REASONS.len()
    );
    // Processes NVML lists but /proc does not show (another pid namespace) are "unknown".
    assert!(text.contains(r#"process="unknown""#), "{text}");
}

#[tokio::test]
async fn nvml_going_away_backs_off_reports_down_and_comes_back() {
    let h100 = fixture("h100-80gb-hbm3.json");
    let gone = || Err(GpuError::Unavailable("Driver Not Loaded".into()));
    let mut h = harness(vec![Ok(h100.clone()), gone(), gone(), Ok(h100)], &[], "[]");
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_millis(s);

    assert!(h.collector.sample(at(0)).await.is_ok());
    let err = h.collector.sample(at(1000)).await.unwrap_err();
    assert!(err.is_no_data(), "{err}");
    assert_eq!(h.resets.load(Ordering::SeqCst), 1, "the handle is dropped");
    assert!(encode(None).contains("aistack_nvml_up 0"));

    // Backoff: 1 s, then 2 s; no read in between.
    assert!(h.collector.sample(at(1500)).await.is_err());
    assert_eq!(h.reads.load(Ordering::SeqCst), 2);
    assert!(h.collector.sample(at(2000)).await.is_err());
    assert_eq!(h.reads.load(Ordering::SeqCst), 3);
    assert!(
        h.collector.sample(at(3000)).await.is_err(),
        "waiting for 4000"
    );
    assert_eq!(h.reads.load(Ordering::SeqCst), 3);
    let back = h.collector.sample(at(4000)).await.unwrap();
    assert_eq!(back.devices.len(), 1);
    assert_eq!(h.reads.load(Ordering::SeqCst), 4);
    // And the backoff is reset: the next failure waits 1 s again.
    assert!(h.collector.backoff.ready(at(4000)));
}

#[tokio::test]
async fn a_device_lost_mid_sample_leaves_the_others_and_reads_down() {
    let mut two = fixture("l40s.json");
    let mut second = two.devices[0].clone();
    second.index = 1;
    second.uuid = "GPU-11111111-1111-1111-1111-111111111111".into();
    two.devices.push(second);
    let mut one = two.clone();
    one.devices.remove(0);
    let mut h = harness(vec![Ok(two), Ok(one)], &[], "[]");
    assert_eq!(
        h.collector
            .sample(Instant::now())
            .await
            .unwrap()
            .devices
            .len(),
        2
    );
    let after = h.collector.sample(Instant::now()).await.unwrap();
    assert_eq!(after.devices.len(), 1);
    assert_eq!(after.health.lost().count(), 1);
    let text = encode(Some(after));
    // Of the lost GPU only `gpu_up 0` is left: no stale readings.
    let lost: Vec<&str> = text.lines().filter(|l| l.contains(r#"gpu="0""#)).collect();
    assert_eq!(lost.len(), 1, "{text}");
    assert!(
        lost[0].starts_with("aistack_gpu_up{") && lost[0].ends_with(" 0.0"),
        "{text}"
    );
    assert!(text.contains(r#"gpu="1""#), "{text}");
}

#[test]
fn cuda_versions() {
    assert_eq!(cuda_version_string(12040), "12.4");
    assert_eq!(cuda_version_string(13010), "13.1");
    assert_eq!(cuda_version_string(11080), "11.8");
}

#[test]
fn known_inference_images_are_services_only_with_discovery() {
    use crate::collectors::docker::{ContainerState, Health};
    let container = |id: &str, name: &str, image: &str| ContainerState {
        id: id.into(),
        name: name.into(),
        image: image.into(),
        running: true,
        health: Health::None,
        restarts: Some(0),
        published_ports: Vec::new(),
    };
    let docker = DockerSample {
        nvidia_runtime: true,
        containers: vec![
            container("a1", "llm", "vllm/vllm-openai:v0.6.3"),
            container("b2", "game", "steam-headless:latest"),
            // The tag moved on: the engine reports the image by id.
            container("c3", "old-ollama", "sha256:5f2b9c0d4e5f"),
        ],
    };
    let inference = |id: &str, discovery: bool| {
        container_ref(Some(&docker), id, discovery).map(|c| (c.name, c.inference))
    };
    assert_eq!(inference("a1", true), Some(("llm".into(), true)));
    assert_eq!(inference("a1", false), Some(("llm".into(), false)));
    assert_eq!(inference("b2", true), Some(("game".into(), false)));
    assert_eq!(inference("c3", true), Some(("old-ollama".into(), false)));
    assert_eq!(inference("zz", true), None);
    assert_eq!(container_ref(None, "a1", true), None);
}

fn proc(pid: u32, kind: ProcessKind, mib: u64, name: &str, service: &str) -> GpuProcess {
    GpuProcess {
        pid,
        kind,
        memory_bytes: Some(mib << 20),
        process: name.into(),
        container: String::new(),
        service: service.into(),
        host_workload: service.is_empty(),
        namespace: String::new(),
        pod: String::new(),
    }
}

/// 0.1.0 wrote one series per pid: transcodes and game restarts grew the family without
/// bound, and a pid NVML listed twice (two contexts) made duplicate series.
#[test]
fn process_series_are_unique_and_bounded() {
    use ProcessKind::{Compute, Graphics};
    let mut processes = vec![
        proc(900, Compute, 20_000, "vllm", "vllm"),
        proc(901, Compute, 1, "ollama", "ollama"),
        // Listed twice by NVML (two contexts): one series, the memory summed.
        proc(4242, Graphics, 3000, "game.exe", ""),
        proc(4242, Graphics, 1000, "game.exe", ""),
    ];
    // 40 short-lived transcodes, 10..49 MiB.
    processes.extend((0..40).map(|i| proc(5000 + i, Compute, 10 + u64::from(i), "ffmpeg", "")));
    processes.push(proc(7000, Graphics, 5, "kwin_wayland", ""));
    let series = process_series(&processes);

    let mut seen = std::collections::HashSet::new();
    assert!(
        series.iter().all(|(l, _)| seen.insert(l.clone())),
        "{series:#?}"
    );
    let mib = |pid: &str| {
        series
            .iter()
            .find(|(l, _)| l.pid == pid)
            .map(|(_, bytes)| *bytes / f64::from(1 << 20))
    };
    // Every service keeps its series, however small.
    assert_eq!(mib("900"), Some(20_000.0));
    assert_eq!(mib("901"), Some(1.0));
    assert_eq!(mib("4242"), Some(4000.0));
    let own: Vec<&ProcessLabels> = series
        .iter()
        .map(|(l, _)| l)
        .filter(|l| l.service.is_empty() && !l.pid.is_empty())
        .collect();
    assert_eq!(own.len(), OTHER_PROCESS_SERIES, "{series:#?}");
    // The largest others: the game, then ffmpeg 49..43 MiB.
    assert_eq!(mib("5039"), Some(49.0));
    assert_eq!(mib("5033"), Some(43.0));
    assert_eq!(mib("5032"), None);
    // The rest summed per kind: 33 ffmpeg of 10..42 MiB, and kwin's 5 MiB.
    let other = |kind: &str| {
        series
            .iter()
            .find(|(l, _)| l.pid.is_empty() && l.kind == kind)
            .map(|(l, bytes)| (l.process.as_str(), *bytes / f64::from(1 << 20)))
    };
    assert_eq!(
        other("compute"),
        Some(("other", (10..=42).sum::<u32>().into()))
    );
    assert_eq!(other("graphics"), Some(("other", 5.0)));
    assert_eq!(series.len(), 2 + 1 + 7 + 2);

    // Memory is conserved.
    let total: f64 = series.iter().map(|(_, b)| b).sum();
    let want: u64 = processes.iter().filter_map(|p| p.memory_bytes).sum();
    assert_eq!(total, want as f64);
}
