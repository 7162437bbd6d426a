//! `gpu`: NVIDIA GPUs through NVML — utilization, memory, temperature, power, energy, clocks,
//! fans, clock-event (throttle) reasons, and per-process memory with the process's name,
//! container and inference service, from which `gpu_host_workload_active` is derived; and
//! health: whether each GPU seen still answers (`gpu_up`), XID errors from NVML's event thread,
//! ECC counters, retired pages, remapped rows, the PCIe link and its replays, memory
//! temperature, encoder and decoder load ([`health`]).
//!
//! The collector talks to a [`GpuSource`]; [`nvml::NvmlSource`] is the real one, loading
//! `libnvidia-ml.so.1` at run time. Without the library or a GPU the exporter runs on:
//! `aistack_nvml_up` is 0 and the collector reports no data. When NVML goes away at run time
//! (driver reload, eGPU unplugged) the collector drops its handle and re-initialises with
//! exponential backoff (1 s, 2 s, ... 60 s). A field a GPU does not support is left out; one
//! failing field never drops the others.

pub mod attribution;
pub mod health;
pub mod nvml;
pub mod pods;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aistack_common::api::{GpuReport, GpuState};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use serde::Deserialize;

use self::attribution::{Attribution, ContainerRef, IdentityCache};
use self::health::{GpuHealth, HealthSnapshot, XidLog, encode_health};
use super::docker::DockerSample;
use super::services::known_image;
use super::{Collector, CollectorError, EncodeSample, Latest, Snapshot, blocking};
use crate::metrics::{counter_family, gauge, gauge_family};

/// One read of every GPU, in NVML's units. Fields are `None` where the GPU does not support
/// them or the call failed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GpuReading {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: Option<String>,
    /// `nvmlSystemGetCudaDriverVersion_v2`: 1000 * major + 10 * minor.
    pub cuda_driver_version: Option<i32>,
    /// Every device that answered.
    pub devices: Vec<DeviceReading>,
}

/// One device, in NVML's units.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DeviceReading {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// `GPU-...` UUID.
    pub uuid: String,
    /// PCI bus id, `00000000:01:00.0`.
    pub pci_bus_id: Option<String>,
    /// Share of the last sample period a kernel ran, percent.
    pub utilization_gpu_percent: Option<u32>,
    /// Used framebuffer memory.
    pub memory_used_bytes: Option<u64>,
    /// Total framebuffer memory.
    pub memory_total_bytes: Option<u64>,
    /// Free framebuffer memory: total less used and less what the driver reserves.
    #[serde(default)]
    pub memory_free_bytes: Option<u64>,
    /// Core temperature.
    pub temperature_gpu_celsius: Option<u32>,
    /// Power draw.
    pub power_usage_milliwatts: Option<u32>,
    /// Enforced power limit.
    pub enforced_power_limit_milliwatts: Option<u32>,
    /// Energy since the driver loaded (Volta and newer).
    pub total_energy_millijoules: Option<u64>,
    /// Current clocks.
    #[serde(default)]
    pub clocks_mhz: ClockReadings,
    /// Speed of each fan, percent of its maximum; empty for fanless parts.
    #[serde(default)]
    pub fan_speeds_percent: Vec<u32>,
    /// Active clock-event reasons, NVML's bitmask.
    pub clocks_event_reasons: Option<u64>,
    /// Compute and graphics processes.
    #[serde(default)]
    pub processes: Vec<ProcessReading>,
    /// Share of the last sample period in which memory was read or written, percent.
    pub utilization_memory_percent: Option<u32>,
    /// Video encoder load, percent.
    pub encoder_utilization_percent: Option<u32>,
    /// Video decoder load, percent.
    pub decoder_utilization_percent: Option<u32>,
    /// HBM temperature (data-center parts; `NVML_FI_DEV_MEMORY_TEMP`).
    pub memory_temperature_celsius: Option<u32>,
    /// The PCIe link.
    #[serde(default, deserialize_with = "null_as_default")]
    pub pcie: PcieReading,
    /// ECC error counters (ECC-capable parts with ECC on).
    #[serde(default, deserialize_with = "null_as_default")]
    pub ecc: EccReading,
    /// Dynamic page retirement (Kepler to Volta data-center parts).
    #[serde(default, deserialize_with = "null_as_default")]
    pub retired_pages: RetiredPagesReading,
    /// Row remapping (Ampere and newer data-center parts).
    #[serde(default, deserialize_with = "null_as_default")]
    pub remapped_rows: RemappedRowsReading,
}

/// `null` in a recorded fixture is "the whole section is not supported".
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The PCIe link: generation and lanes now and at most (what the GPU and its slot allow
/// together), and the link-level replays since the driver loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct PcieReading {
    /// Generation now (idle GPUs drop to a lower one to save power).
    pub link_gen_current: Option<u32>,
    /// Highest generation the GPU and the system support together.
    pub link_gen_max: Option<u32>,
    /// Lanes now.
    pub link_width_current: Option<u32>,
    /// Most lanes the GPU and the system support together.
    pub link_width_max: Option<u32>,
    /// Replays (retransmissions) since the driver loaded.
    pub replay_counter: Option<u64>,
}

/// ECC errors, corrected (single-bit) and uncorrected (double-bit), since the driver loaded
/// (volatile) and over the GPU's life (aggregate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct EccReading {
    /// Corrected since the driver loaded.
    pub corrected_volatile: Option<u64>,
    /// Uncorrected since the driver loaded.
    pub uncorrected_volatile: Option<u64>,
    /// Corrected, lifetime.
    pub corrected_aggregate: Option<u64>,
    /// Uncorrected, lifetime.
    pub uncorrected_aggregate: Option<u64>,
}

/// Pages retired for memory errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RetiredPagesReading {
    /// Retired for repeated single-bit errors.
    pub single_bit: Option<u64>,
    /// Retired for a double-bit error.
    pub double_bit: Option<u64>,
    /// Pages waiting for a reboot to be retired.
    pub pending: Option<bool>,
}

/// Rows remapped to spares for memory errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RemappedRowsReading {
    /// Remapped for correctable errors.
    pub correctable: Option<u64>,
    /// Remapped for uncorrectable errors.
    pub uncorrectable: Option<u64>,
    /// A remap waits for the next GPU reset.
    pub pending: Option<bool>,
    /// A remap failed: the GPU has no spare row left (replace it).
    pub failure: Option<bool>,
}

/// Current clocks in MHz.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct ClockReadings {
    /// Graphics clock.
    pub graphics: Option<u32>,
    /// Streaming multiprocessor clock.
    pub sm: Option<u32>,
    /// Memory clock.
    pub memory: Option<u32>,
}

/// A process on a GPU as NVML lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProcessReading {
    /// Host pid.
    pub pid: u32,
    /// Compute (CUDA) or graphics (OpenGL/Vulkan).
    pub kind: ProcessKind,
    /// Memory it holds on this GPU; `None` where NVML cannot tell.
    pub used_memory_bytes: Option<u64>,
}

/// `kind` label of `gpu_process_memory_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    /// CUDA and other compute contexts.
    Compute,
    /// OpenGL, Vulkan, display contexts (games, compositors).
    Graphics,
}

impl ProcessKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Compute => "compute",
            Self::Graphics => "graphics",
        }
    }
}

/// Why a read failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// The library, the driver or every GPU is not there (now): re-initialise later.
    #[error("NVML unavailable: {0}")]
    Unavailable(String),
}

/// Where GPU readings come from: NVML, or a fake in tests.
pub trait GpuSource: Send + 'static {
    /// Reads every device. A device that fails as a whole (lost) is left out; per-field
    /// failures are `None` fields.
    fn read(&mut self) -> Result<GpuReading, GpuError>;

    /// Drops any library handle; the next read initialises again.
    fn reset(&mut self);

    /// Where to count XID errors, for a source that can watch for them (NVML's event sets).
    fn watch_xids(&mut self, _log: Arc<XidLog>) {}

    /// GPUs seen before this start (from the roster file): one of them missing is looked for
    /// as one seen in this run would be.
    fn remember(&mut self, _uuids: &[String]) {}
}

/// NVML clock-event reason bits and their `reason` label.
pub const CLOCK_EVENT_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// `12040` -> `12.4`.
pub fn cuda_version_string(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// A process on a GPU, attributed.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuProcess {
    /// Host pid.
    pub pid: u32,
    /// Compute or graphics.
    pub kind: ProcessKind,
    /// Memory held on this GPU.
    pub memory_bytes: Option<u64>,
    /// Process name (`comm`), or `unknown` when the pid is not visible (another pid namespace).
    pub process: String,
    /// Container name (or short id), empty outside containers.
    pub container: String,
    /// The configured inference service it belongs to, empty if none.
    pub service: String,
    /// Whether it counts as host workload (a game, not an inference service).
    pub host_workload: bool,
    /// In a Kubernetes pod: its namespace and name; empty otherwise.
    pub namespace: String,
    /// See `namespace`.
    pub pod: String,
}

/// One GPU, attributed.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuDevice {
    /// What NVML said.
    pub reading: DeviceReading,
    /// Its processes with name, container and service.
    pub processes: Vec<GpuProcess>,
}

impl GpuDevice {
    /// Whether any host-workload process holds memory on it.
    pub fn host_workload_active(&self) -> bool {
        self.processes.iter().any(|p| p.host_workload)
    }

    /// Utilization 0..1.
    pub fn utilization(&self) -> Option<f64> {
        self.reading
            .utilization_gpu_percent
            .map(|p| (f64::from(p) / 100.0).clamp(0.0, 1.0))
    }

    /// Power draw in watts.
    pub fn power_watts(&self) -> Option<f64> {
        self.reading
            .power_usage_milliwatts
            .map(|mw| f64::from(mw) / 1000.0)
    }
}

/// One `gpu` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuSample {
    /// Driver version.
    pub driver_version: String,
    /// CUDA version the driver supports, `12.4`.
    pub cuda_version: String,
    /// Every GPU that answered.
    pub devices: Vec<GpuDevice>,
    /// Every GPU seen since start (those that no longer answer too), and their XIDs.
    pub health: HealthSnapshot,
    /// Where the node's pods are listed (Kubernetes): whether the last list succeeded.
    pub pods_listed: Option<bool>,
}

impl GpuSample {
    /// Sum of the GPUs' power draw (for the host estimate); GPUs without a reading add 0.
    pub fn power_watts(&self) -> f64 {
        self.devices.iter().filter_map(GpuDevice::power_watts).sum()
    }

    /// Every GPU's host-workload state, as `GET /api/v1/gpu` lists it: the processes' names
    /// each once, in NVML's order; then the GPUs seen before that no longer answer.
    pub fn states(&self) -> Vec<GpuState> {
        let lost = self.health.lost().map(|g| GpuState {
            gpu: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            host_workload_active: false,
            host_workload_processes: Vec::new(),
            up: false,
        });
        self.devices
            .iter()
            .map(|d| {
                let mut names: Vec<String> = Vec::new();
                for p in d.processes.iter().filter(|p| p.host_workload) {
                    if !names.contains(&p.process) {
                        names.push(p.process.clone());
                    }
                }
                GpuState {
                    gpu: d.reading.index,
                    uuid: d.reading.uuid.clone(),
                    name: d.reading.name.clone(),
                    host_workload_active: d.host_workload_active(),
                    host_workload_processes: names,
                    up: true,
                }
            })
            .chain(lost)
            .collect()
    }
}

/// `GET /api/v1/gpu` from the collector's latest snapshot, at wall-clock time `now`.
///
/// `nvml_up` is exactly what `aistack_nvml_up` says: true only when the last sample succeeded
/// (NVML loaded and answered); the GPUs are that sample's, none otherwise. The age counts from
/// the last successful sample, wall-clock so that time spent suspended counts too.
pub fn report(snapshot: &Snapshot<GpuSample>, now: SystemTime, interval: Duration) -> GpuReport {
    let sample_age_s = snapshot
        .status
        .and_then(|s| s.last_success)
        .map(|at| now.duration_since(at).unwrap_or_default().as_secs_f64());
    GpuReport {
        nvml_up: snapshot.sample.is_some(),
        sample_age_s,
        interval_s: Some(interval.as_secs_f64()),
        gpus: snapshot
            .sample
            .as_deref()
            .map(GpuSample::states)
            .unwrap_or_default(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    uuid: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InfoLabels {
    driver_version: String,
    cuda_version: String,
    pci_bus_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClockLabel {
    clock: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LinkLabel {
    link: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EccLabels {
    r#type: &'static str,
    scope: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ProcessLabels {
    pid: String,
    process: String,
    kind: &'static str,
    container: String,
    service: String,
    /// `namespace` and `pod` labels only for a process in a pod.
    namespace: String,
    pod: String,
}

impl EncodeLabelSet for ProcessLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> fmt::Result {
        use prometheus_client::encoding::EncodeLabel as _;
        ("pid", self.pid.as_str()).encode(encoder.encode_label())?;
        ("process", self.process.as_str()).encode(encoder.encode_label())?;
        ("kind", self.kind).encode(encoder.encode_label())?;
        ("container", self.container.as_str()).encode(encoder.encode_label())?;
        ("service", self.service.as_str()).encode(encoder.encode_label())?;
        if !self.pod.is_empty() {
            ("namespace", self.namespace.as_str()).encode(encoder.encode_label())?;
            ("pod", self.pod.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// How many processes of a GPU that belong to no inference service get a series of their own
/// (the largest by memory); the rest are summed per kind into one `pid=""`,
/// `process="other"` series, so pid churn (a game restarting, transcodes coming and going)
/// cannot grow the series without bound. Processes of services always get their own.
pub const OTHER_PROCESS_SERIES: usize = 8;

/// The `gpu_process_memory_bytes` series of one GPU: one per pid and kind (NVML can list a
/// process twice, once per context or MIG instance: summed), bounded as
/// [`OTHER_PROCESS_SERIES`] says.
fn process_series(processes: &[GpuProcess]) -> Vec<(ProcessLabels, f64)> {
    let mut merged: BTreeMap<ProcessLabels, u64> = BTreeMap::new();
    for p in processes {
        let Some(bytes) = p.memory_bytes else {
            continue;
        };
        let labels = ProcessLabels {
            pid: p.pid.to_string(),
            process: p.process.clone(),
            kind: p.kind.as_str(),
            container: p.container.clone(),
            service: p.service.clone(),
            namespace: p.namespace.clone(),
            pod: p.pod.clone(),
        };
        *merged.entry(labels).or_default() += bytes;
    }
    let (mut series, mut others): (Vec<_>, Vec<_>) =
        merged.into_iter().partition(|(l, _)| !l.service.is_empty());
    // Largest first; equal sizes by labels, so the choice is stable between scrapes.
    others.sort_by(|(a, x), (b, y)| y.cmp(x).then_with(|| a.cmp(b)));
    let rest = others.split_off(others.len().min(OTHER_PROCESS_SERIES));
    series.extend(others);
    let mut summed: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (labels, bytes) in rest {
        *summed.entry(labels.kind).or_default() += bytes;
    }
    series.extend(summed.into_iter().map(|(kind, bytes)| {
        let labels = ProcessLabels {
            pid: String::new(),
            process: "other".into(),
            kind,
            container: String::new(),
            service: String::new(),
            namespace: String::new(),
            pod: String::new(),
        };
        (labels, bytes)
    }));
    series
        .into_iter()
        .map(|(labels, bytes)| (labels, bytes as f64))
        .collect()
}

impl GpuDevice {
    fn labels(&self) -> GpuLabels {
        GpuLabels {
            gpu: self.reading.index.to_string(),
            uuid: self.reading.uuid.clone(),
            name: self.reading.name.clone(),
        }
    }
}

impl EncodeSample for GpuSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "nvml_up", NVML_UP_HELP, None, 1.0)?;
        let devices = &self.devices;
        let per_gpu = |f: &dyn Fn(&GpuDevice) -> Option<f64>| {
            devices
                .iter()
                .filter_map(move |d| f(d).map(|v| (d.labels(), v)))
                .collect::<Vec<_>>()
        };
        gauge_family(
            encoder,
            "gpu_info",
            "GPU identity, driver and CUDA version; always 1.",
            None,
            devices.iter().map(|d| {
                let info = InfoLabels {
                    driver_version: self.driver_version.clone(),
                    cuda_version: self.cuda_version.clone(),
                    pci_bus_id: d.reading.pci_bus_id.clone().unwrap_or_default(),
                };
                ((d.labels(), info), 1.0)
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_utilization",
            "Share of the last sample period in which a kernel ran on the GPU, 0..1.",
            Some("ratio"),
            per_gpu(&GpuDevice::utilization),
        )?;
        gauge_family(
            encoder,
            "gpu_memory_used",
            "GPU memory in use.",
            Some("bytes"),
            per_gpu(&|d| d.reading.memory_used_bytes.map(|b| b as f64)),
        )?;
        gauge_family(
            encoder,
            "gpu_memory_free",
            "GPU memory free for allocations: installed less used and less what the driver reserves.",
            Some("bytes"),
            per_gpu(&|d| d.reading.memory_free_bytes.map(|b| b as f64)),
        )?;
        gauge_family(
            encoder,
            "gpu_memory_total",
            "GPU memory installed.",
            Some("bytes"),
            per_gpu(&|d| d.reading.memory_total_bytes.map(|b| b as f64)),
        )?;
        gauge_family(
            encoder,
            "gpu_temperature",
            "GPU core temperature.",
            Some("celsius"),
            per_gpu(&|d| d.reading.temperature_gpu_celsius.map(f64::from)),
        )?;
        gauge_family(
            encoder,
            "gpu_power",
            "GPU power draw.",
            Some("watts"),
            per_gpu(&GpuDevice::power_watts),
        )?;
        gauge_family(
            encoder,
            "gpu_power_limit",
            "GPU power limit the driver enforces.",
            Some("watts"),
            per_gpu(&|d| {
                d.reading
                    .enforced_power_limit_milliwatts
                    .map(|mw| f64::from(mw) / 1000.0)
            }),
        )?;
        counter_family(
            encoder,
            "gpu_energy",
            "Energy the GPU used since the driver loaded (Volta and newer).",
            Some("joules"),
            per_gpu(&|d| {
                d.reading
                    .total_energy_millijoules
                    .map(|mj| mj as f64 / 1000.0)
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_clock",
            "Current GPU clock.",
            Some("hertz"),
            devices.iter().flat_map(|d| {
                let c = d.reading.clocks_mhz;
                [("graphics", c.graphics), ("sm", c.sm), ("memory", c.memory)]
                    .into_iter()
                    .filter_map(move |(clock, mhz)| {
                        Some(((d.labels(), ClockLabel { clock }), f64::from(mhz?) * 1e6))
                    })
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_fan_speed",
            "Fan speed as a share of its maximum, averaged over the GPU's fans; absent without a fan.",
            Some("ratio"),
            per_gpu(&|d| {
                let fans = &d.reading.fan_speeds_percent;
                (!fans.is_empty()).then(|| {
                    let mean = fans.iter().map(|&f| f64::from(f)).sum::<f64>() / fans.len() as f64;
                    (mean / 100.0).clamp(0.0, 1.0)
                })
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_throttle_active",
            "1 for each clock-event (throttle) reason active now, 0 for the others.",
            None,
            devices.iter().flat_map(|d| {
                d.reading
                    .clocks_event_reasons
                    .into_iter()
                    .flat_map(move |bits| {
                        CLOCK_EVENT_REASONS.iter().map(move |(bit, reason)| {
                            let active = if bits & bit != 0 { 1.0 } else { 0.0 };
                            ((d.labels(), ReasonLabel { reason }), active)
                        })
                    })
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_process_memory",
            "GPU memory held by a process, with its name, container and inference service.",
            Some("bytes"),
            devices.iter().flat_map(|d| {
                process_series(&d.processes)
                    .into_iter()
                    .map(move |(labels, bytes)| ((d.labels(), labels), bytes))
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_host_workload_active",
            "1 when a GPU process that is no configured inference service (a game, say) holds memory.",
            None,
            per_gpu(&|d| Some(if d.host_workload_active() { 1.0 } else { 0.0 })),
        )?;
        if let Some(listed) = self.pods_listed {
            gauge(
                encoder,
                "gpu_pods_listed",
                "1 when the last list of the node's pods succeeded (Kubernetes: GPU processes in pods are named); 0 when it failed or none has yet.",
                None,
                if listed { 1.0 } else { 0.0 },
            )?;
        }
        self.encode_health_fields(encoder)?;
        encode_health(encoder, &self.health)
    }

    fn encode_missing(encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "nvml_up", NVML_UP_HELP, None, 0.0)
    }
}

/// A value and the label that tells it from its sibling (`current`/`max`, a cause).
type LabelledValue = (&'static str, Option<f64>);

/// Percent to a 0..1 ratio.
fn ratio(percent: Option<u32>) -> Option<f64> {
    percent.map(|p| (f64::from(p) / 100.0).clamp(0.0, 1.0))
}

fn flag(value: Option<bool>) -> Option<f64> {
    value.map(|v| if v { 1.0 } else { 0.0 })
}

impl GpuSample {
    /// The per-sample health fields: memory and video engines' load, memory temperature,
    /// the PCIe link, ECC, retired pages and remapped rows. Absent where unsupported.
    fn encode_health_fields(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let devices = &self.devices;
        let per_gpu = |f: &dyn Fn(&DeviceReading) -> Option<f64>| {
            devices
                .iter()
                .filter_map(move |d| f(&d.reading).map(|v| (d.labels(), v)))
                .collect::<Vec<_>>()
        };
        let labelled = |f: &dyn Fn(&DeviceReading) -> [LabelledValue; 2]| {
            devices
                .iter()
                .flat_map(|d| {
                    f(&d.reading)
                        .into_iter()
                        .filter_map(move |(label, v)| Some((d.labels(), label, v?)))
                })
                .collect::<Vec<_>>()
        };
        let u64f = |v: Option<u64>| v.map(|v| v as f64);
        let u32f = |v: Option<u32>| v.map(f64::from);
        gauge_family(
            encoder,
            "gpu_memory_utilization",
            "Share of the last sample period in which GPU memory was read or written, 0..1.",
            Some("ratio"),
            per_gpu(&|r| ratio(r.utilization_memory_percent)),
        )?;
        gauge_family(
            encoder,
            "gpu_encoder_utilization",
            "Video encoder (NVENC) load, 0..1.",
            Some("ratio"),
            per_gpu(&|r| ratio(r.encoder_utilization_percent)),
        )?;
        gauge_family(
            encoder,
            "gpu_decoder_utilization",
            "Video decoder (NVDEC) load, 0..1.",
            Some("ratio"),
            per_gpu(&|r| ratio(r.decoder_utilization_percent)),
        )?;
        gauge_family(
            encoder,
            "gpu_memory_temperature",
            "GPU memory (HBM) temperature; data-center parts only.",
            Some("celsius"),
            per_gpu(&|r| u32f(r.memory_temperature_celsius)),
        )?;
        gauge_family(
            encoder,
            "gpu_pcie_link_generation",
            "PCIe generation of the GPU's link: now (idle GPUs drop to a lower one) and the most the GPU and its slot support together.",
            None,
            labelled(&|r| {
                [
                    ("current", u32f(r.pcie.link_gen_current)),
                    ("max", u32f(r.pcie.link_gen_max)),
                ]
            })
            .into_iter()
            .map(|(gpu, link, v)| ((gpu, LinkLabel { link }), v)),
        )?;
        gauge_family(
            encoder,
            "gpu_pcie_link_width",
            "PCIe lanes of the GPU's link: now and the most the GPU and its slot support together.",
            None,
            labelled(&|r| {
                [
                    ("current", u32f(r.pcie.link_width_current)),
                    ("max", u32f(r.pcie.link_width_max)),
                ]
            })
            .into_iter()
            .map(|(gpu, link, v)| ((gpu, LinkLabel { link }), v)),
        )?;
        counter_family(
            encoder,
            "gpu_pcie_replays",
            "PCIe replays (link-level retransmissions) since the driver loaded.",
            None,
            per_gpu(&|r| u64f(r.pcie.replay_counter)),
        )?;
        counter_family(
            encoder,
            "gpu_ecc_errors",
            "ECC memory errors: corrected (single-bit) or uncorrected (double-bit), since the driver loaded (volatile) or over the GPU's life (aggregate). ECC-capable parts with ECC on only.",
            None,
            devices.iter().flat_map(|d| {
                let e = d.reading.ecc;
                [
                    ("corrected", "volatile", e.corrected_volatile),
                    ("uncorrected", "volatile", e.uncorrected_volatile),
                    ("corrected", "aggregate", e.corrected_aggregate),
                    ("uncorrected", "aggregate", e.uncorrected_aggregate),
                ]
                .into_iter()
                .filter_map(move |(r#type, scope, n)| {
                    Some(((d.labels(), EccLabels { r#type, scope }), n? as f64))
                })
            }),
        )?;
        gauge_family(
            encoder,
            "gpu_retired_pages",
            "Memory pages retired for repeated single-bit or for double-bit ECC errors (Kepler to Volta data-center parts).",
            None,
            labelled(&|r| {
                [
                    ("single_bit_ecc", u64f(r.retired_pages.single_bit)),
                    ("double_bit_ecc", u64f(r.retired_pages.double_bit)),
                ]
            })
            .into_iter()
            .map(|(gpu, cause, v)| ((gpu, CauseLabel { cause }), v)),
        )?;
        gauge_family(
            encoder,
            "gpu_retired_pages_pending",
            "1 when retired pages wait for a reboot to take effect.",
            None,
            per_gpu(&|r| flag(r.retired_pages.pending)),
        )?;
        gauge_family(
            encoder,
            "gpu_remapped_rows",
            "Memory rows remapped to spares for correctable or uncorrectable errors (Ampere and newer data-center parts).",
            None,
            labelled(&|r| {
                [
                    ("correctable", u64f(r.remapped_rows.correctable)),
                    ("uncorrectable", u64f(r.remapped_rows.uncorrectable)),
                ]
            })
            .into_iter()
            .map(|(gpu, cause, v)| ((gpu, CauseLabel { cause }), v)),
        )?;
        gauge_family(
            encoder,
            "gpu_remapped_rows_pending",
            "1 when a row remap waits for the next GPU reset.",
            None,
            per_gpu(&|r| flag(r.remapped_rows.pending)),
        )?;
        gauge_family(
            encoder,
            "gpu_remapped_rows_failure",
            "1 when a row remap failed: no spare rows left; the GPU needs replacing.",
            None,
            per_gpu(&|r| flag(r.remapped_rows.failure)),
        )
    }
}

const NVML_UP_HELP: &str = "1 when the NVML library is loaded and answers, 0 otherwise.";

/// Exponential backoff for re-initialising NVML.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    const MAX: Duration = Duration::from_secs(60);

    fn ready(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    fn failed(&mut self, now: Instant) -> Duration {
        let delay = Duration::from_secs(1u64 << self.failures.min(6)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

struct Inner {
    source: Box<dyn GpuSource>,
    identities: IdentityCache,
}

impl GpuCollector {
    /// The GPUs seen and their XIDs, for what /metrics shows while NVML is down.
    pub fn health(&self) -> Arc<GpuHealth> {
        self.health.clone()
    }
}

/// Samples the GPUs through a [`GpuSource`] and attributes their processes.
pub struct GpuCollector {
    inner: Arc<Mutex<Inner>>,
    attribution: Arc<Attribution>,
    procfs: PathBuf,
    backoff: Backoff,
    /// Whether the last attempt reached NVML (`None` before the first), for logging changes.
    up: Option<bool>,
    /// The docker collector's containers, to name the containers GPU processes run in.
    containers: Option<Latest<DockerSample>>,
    /// Whether `discovery.docker` is on.
    discovery: bool,
    /// The pods on this node (Kubernetes), to name the pods GPU processes run in, and whether
    /// `discovery.kubernetes` is on.
    pods: Option<(pods::Pods, bool)>,
    /// The GPUs seen since start, and their XID errors.
    health: Arc<GpuHealth>,
}

impl fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuCollector")
            .field("procfs", &self.procfs)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl GpuCollector {
    /// Reads GPUs from `source`; process names and containers from `procfs`.
    pub fn new(mut source: Box<dyn GpuSource>, procfs: PathBuf, attribution: Attribution) -> Self {
        let health = Arc::new(GpuHealth::default());
        source.watch_xids(health.xid_log());
        Self {
            health,
            inner: Arc::new(Mutex::new(Inner {
                source,
                identities: IdentityCache::default(),
            })),
            attribution: Arc::new(attribution),
            procfs,
            backoff: Backoff::default(),
            up: None,
            containers: None,
            discovery: false,
            pods: None,
        }
    }

    /// Remembers the GPUs seen in `file`, so one lost stays `gpu_up 0` across restarts (and
    /// is looked for until it answers); `forget` are UUIDs to drop from it.
    pub fn with_roster_file(mut self, file: PathBuf, forget: &[String]) -> Self {
        self.health = Arc::new(GpuHealth::new(Some(file), forget));
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.source.watch_xids(self.health.xid_log());
        inner.source.remember(&self.health.remembered());
        drop(inner);
        self
    }

    /// Names the pods GPU processes run in from the node's pods; with `discovery`, processes in
    /// pods of known inference images belong to the service named after their container.
    pub fn with_pods(mut self, pods: pods::Pods, discovery: bool) -> Self {
        self.pods = Some((pods, discovery));
        self
    }

    /// Names containers from the docker collector's latest sample (else they are short ids);
    /// with `discovery`, processes in containers of known inference images belong to the
    /// service named after their container, as the services collector discovers it.
    pub fn with_containers(mut self, containers: Latest<DockerSample>, discovery: bool) -> Self {
        self.containers = Some(containers);
        self.discovery = discovery;
        self
    }

    fn note_up(&mut self, up: bool, reason: &str) {
        match (self.up, up) {
            (None, false) => {
                tracing::info!(collector = "gpu", %reason, "no GPU metrics until NVML answers; retrying with backoff")
            }
            (Some(true), false) => {
                tracing::warn!(collector = "gpu", %reason, "NVML went away; retrying with backoff")
            }
            (Some(false), true) => tracing::info!(collector = "gpu", "NVML is back"),
            _ => {}
        }
        self.up = Some(up);
    }
}

fn read_and_attribute(
    inner: &Mutex<Inner>,
    attribution: &Attribution,
    procfs: &std::path::Path,
    containers: Option<&DockerSample>,
    pods: Option<(&pods::PodIndex, bool)>,
    discovery: bool,
) -> Result<GpuSample, GpuError> {
    let mut inner = inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let reading = inner.source.read()?;
    let mut sample = attribute_reading(
        reading,
        attribution,
        &mut inner.identities,
        procfs,
        // The pod first: under dockershim or cri-dockerd the engine knows a pod's container
        // too, but only the pod says its namespace and labels.
        &|id| {
            pods.and_then(|(pods, discovery)| pod_ref(pods, id, discovery))
                .or_else(|| container_ref(containers, id, discovery))
        },
    );
    sample.pods_listed = pods.map(|(index, _)| index.up());
    Ok(sample)
}

/// What the docker collector's sample says about the container with full id `id`: its name,
/// and (with `discovery`) whether it runs a known inference image.
fn container_ref(
    containers: Option<&DockerSample>,
    id: &str,
    discovery: bool,
) -> Option<ContainerRef> {
    let container = containers?.containers.iter().find(|c| c.id == id)?;
    Some(ContainerRef {
        name: container.name.clone(),
        inference: discovery && known_image(&container.image).is_some(),
        ..ContainerRef::default()
    })
}

/// What the node's pods say about the container with full id `id`: its name in the pod, the
/// pod, and (with `discovery`) whether it runs a known inference image.
fn pod_ref(pods: &pods::PodIndex, id: &str, discovery: bool) -> Option<ContainerRef> {
    let container = pods.container(id)?;
    Some(ContainerRef {
        name: container.container.clone(),
        inference: discovery && known_image(&container.image).is_some(),
        namespace: container.namespace.clone(),
        pod: container.pod.clone(),
        labels: container.labels.clone(),
    })
}

/// Turns a reading into a sample: names, containers and services of its processes (pids read
/// from `procfs`, once per pid while it stays on a GPU).
pub fn attribute_reading(
    reading: GpuReading,
    attribution: &Attribution,
    identities: &mut IdentityCache,
    procfs: &std::path::Path,
    containers: &dyn Fn(&str) -> Option<ContainerRef>,
) -> GpuSample {
    let pids = reading
        .devices
        .iter()
        .flat_map(|d| d.processes.iter().map(|p| p.pid));
    identities.refresh(procfs, pids);
    let devices = reading
        .devices
        .into_iter()
        .map(|device| {
            let processes = device
                .processes
                .iter()
                .map(|p| attribution.attribute(p, identities.get(p.pid), containers))
                .collect();
            GpuDevice {
                reading: device,
                processes,
            }
        })
        .collect();
    GpuSample {
        driver_version: reading.driver_version.unwrap_or_default(),
        cuda_version: reading
            .cuda_driver_version
            .map(cuda_version_string)
            .unwrap_or_default(),
        devices,
        health: HealthSnapshot::default(),
        pods_listed: None,
    }
}

impl Collector for GpuCollector {
    type Sample = GpuSample;

    async fn sample(&mut self, now: Instant) -> Result<GpuSample, CollectorError> {
        if !self.backoff.ready(now) {
            return Err(CollectorError::NoData(
                "NVML unavailable; waiting to retry".into(),
            ));
        }
        let containers = self
            .containers
            .as_ref()
            .and_then(|c| c.borrow().sample.clone());
        let (inner, attribution, procfs, discovery) = (
            self.inner.clone(),
            self.attribution.clone(),
            self.procfs.clone(),
            self.discovery,
        );
        let pods = self
            .pods
            .as_ref()
            .map(|(pods, discovery)| (pods.borrow().clone(), *discovery));
        let result = blocking(move || {
            Ok(read_and_attribute(
                &inner,
                &attribution,
                &procfs,
                containers.as_deref(),
                pods.as_ref()
                    .map(|(index, discovery)| (&**index, *discovery)),
                discovery,
            ))
        })
        .await?;
        match result {
            Ok(mut sample) => {
                self.backoff.succeeded();
                self.note_up(true, "");
                let gained = self.health.observe(sample.devices.iter().map(|d| {
                    let r = &d.reading;
                    (r.index, r.uuid.as_str(), r.name.as_str())
                }));
                if gained {
                    // Off the sample: a sync behind a large write-back can take seconds.
                    let health = self.health.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(err) = health.save() {
                            tracing::warn!(collector = "gpu", error = %err, "cannot write the GPU roster (retrying later); a restart would forget a GPU lost meanwhile");
                        }
                    });
                }
                sample.health = self.health.snapshot();
                Ok(sample)
            }
            Err(GpuError::Unavailable(reason)) => {
                let inner = self.inner.clone();
                // Drop the handle (nvmlShutdown) off the runtime: it is an FFI call too.
                blocking(move || {
                    inner
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .source
                        .reset();
                    Ok(())
                })
                .await?;
                self.health.all_down();
                let delay = self.backoff.failed(now);
                self.note_up(false, &reason);
                Err(CollectorError::NoData(format!(
                    "{reason}; retrying in {delay:?}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests;
