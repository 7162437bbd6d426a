//! Golden /metrics output from the fixture roots (node_exporter's e2e test, made deterministic):
//! every collector samples `tests/fixtures/roots/t0`, then the files of `t1` are laid over it and
//! they sample again one (simulated) second later. Sample durations and timestamps are fixed by
//! the test; the build labels are masked.
//!
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p aistack-exporter --test golden`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aistack_exporter::collectors::cpu::CpuCollector;
use aistack_exporter::collectors::gpu::attribution::Attribution;
use aistack_exporter::collectors::gpu::{GpuCollector, GpuError, GpuReading, GpuSource};
use aistack_exporter::collectors::hwmon::HwmonCollector;
use aistack_exporter::collectors::power::{PowerCollector, PowerEstimationConfig};
use aistack_exporter::collectors::rapl::RaplCollector;
use aistack_exporter::collectors::{
    Collector, CollectorKind, EncodeSample, Snapshot, Status, channel,
};
use aistack_exporter::config::Config;
use aistack_exporter::metrics::{ExporterMetrics, view};
use aistack_tests::{copy_tree, fixtures, parse_openmetrics};
use tokio::sync::watch;

fn publish<S: EncodeSample>(tx: &watch::Sender<Snapshot<S>>, sample: S) {
    tx.send_replace(Snapshot {
        sample: Some(Arc::new(sample)),
        status: Some(Status {
            success: true,
            duration: Duration::from_micros(250),
            last_success: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_383_742)),
        }),
    });
}

/// NVML as recorded on an RTX 4080 SUPER under load (tests/fixtures/gpu).
struct Recorded(GpuReading);

impl GpuSource for Recorded {
    fn read(&mut self) -> Result<GpuReading, GpuError> {
        Ok(self.0.clone())
    }

    fn reset(&mut self) {}
}

async fn render() -> String {
    let root = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("roots/t0"), root.path());
    let (procfs, sysfs) = (root.path().join("proc"), root.path().join("sys"));

    let mut cpu = CpuCollector::new(&procfs);
    let mut rapl = RaplCollector::new(&sysfs);
    let mut hwmon = HwmonCollector::new(&sysfs);
    let t0 = Instant::now();
    cpu.sample(t0).await.unwrap();
    rapl.sample(t0).await.unwrap();

    copy_tree(&fixtures().join("roots/t1"), root.path());
    let t1 = t0 + Duration::from_secs(1);
    let (cpu_tx, cpu_rx) = channel();
    let (rapl_tx, rapl_rx) = channel();
    let (hwmon_tx, hwmon_rx) = channel();
    let (gpu_tx, gpu_rx) = channel();
    let (power_tx, power_rx) = channel();
    publish(&cpu_tx, cpu.sample(t1).await.unwrap());
    publish(&rapl_tx, rapl.sample(t1).await.unwrap());
    publish(&hwmon_tx, hwmon.sample(t1).await.unwrap());
    let reading = std::fs::read_to_string(fixtures().join("gpu/rtx-4080-super.json")).unwrap();
    let config: Config = aistack_common::config::parse(
        "services: [{name: ollama, kind: ollama, url: 'http://127.0.0.1:11434'}]",
    )
    .unwrap();
    let mut gpu = GpuCollector::new(
        Box::new(Recorded(serde_json::from_str(&reading).unwrap())),
        procfs.clone(),
        Attribution::new(&config.services, &config.host_workload).unwrap(),
    );
    publish(&gpu_tx, gpu.sample(t1).await.unwrap());

    let mut power = PowerCollector::new(
        PowerEstimationConfig::default(),
        cpu_rx.clone(),
        rapl_rx.clone(),
        gpu_rx.clone(),
    );
    power.sample(t1).await.unwrap();
    publish(
        &power_tx,
        power.sample(t1 + Duration::from_secs(1)).await.unwrap(),
    );

    let registry = ExporterMetrics::new(vec![
        view(CollectorKind::Cpu, cpu_rx),
        view(CollectorKind::Rapl, rapl_rx),
        view(CollectorKind::Hwmon, hwmon_rx),
        view(CollectorKind::Gpu, gpu_rx),
        view(CollectorKind::Power, power_rx),
    ])
    .into_registry();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.replace(
        &format!(
            "version=\"{}\",revision=\"{}\"",
            aistack_common::VERSION,
            aistack_common::REVISION
        ),
        "version=\"VERSION\",revision=\"REVISION\"",
    )
}

#[tokio::test]
async fn metrics_from_fixture_roots_match_the_golden_file() {
    let got = render().await;
    let golden = fixtures().join("golden/metrics.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .expect("golden file missing: run with UPDATE_GOLDEN=1 and review it");
    if got != want {
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            if g != w {
                panic!(
                    "line {}: got\n  {g}\nwant\n  {w}\n(full output:\n{got})",
                    i + 1
                );
            }
        }
        panic!("outputs differ in length; got:\n{got}");
    }
}

#[tokio::test]
async fn fixture_output_is_strict_openmetrics() {
    let families = parse_openmetrics(&render().await).unwrap_or_else(|e| panic!("{e}"));
    for family in [
        "aistack_exporter_build_info",
        "aistack_collector_success",
        "aistack_cpu_utilization_ratio",
        "aistack_cpu_package_energy_joules",
        "aistack_cpu_power_watts",
        "aistack_hwmon_temperature_celsius",
        "aistack_nvml_up",
        "aistack_gpu_info",
        "aistack_gpu_utilization_ratio",
        "aistack_gpu_memory_used_bytes",
        "aistack_gpu_memory_total_bytes",
        "aistack_gpu_temperature_celsius",
        "aistack_gpu_power_watts",
        "aistack_gpu_power_limit_watts",
        "aistack_gpu_energy_joules",
        "aistack_gpu_clock_hertz",
        "aistack_gpu_fan_speed_ratio",
        "aistack_gpu_throttle_active",
        "aistack_gpu_process_memory_bytes",
        "aistack_gpu_host_workload_active",
        "aistack_host_power_estimated_watts",
        "aistack_host_energy_estimated_joules",
    ] {
        assert!(
            families.iter().any(|f| f == family),
            "{family} missing from {families:?}"
        );
    }
}

#[tokio::test]
async fn every_family_is_documented() {
    let docs = std::fs::read_to_string(fixtures().join("../../docs/metrics.md")).unwrap();
    let families = parse_openmetrics(&render().await).unwrap_or_else(|e| panic!("{e}"));
    for family in families {
        // The parser names counters without `_total`; the docs name the series.
        let counter = format!("`{family}_total`");
        assert!(
            docs.contains(&format!("`{family}`")) || docs.contains(&counter),
            "{family} is not in docs/metrics.md"
        );
    }
}
