//! The real [`GpuSource`]: NVML through nvml-wrapper, loaded at run time with `dlopen`, so the
//! exporter starts on hosts without the NVIDIA driver.
//!
//! Per-field calls that fail are `None` (NOT_SUPPORTED quietly; anything else logged at debug);
//! a device whose handle or identity cannot be read, or that reports GPU_IS_LOST, is left out
//! of the reading. Errors meaning the library itself is gone (uninitialised, driver not loaded,
//! library/driver version mismatch) fail the whole read, so the collector re-initialises.

use std::ffi::OsStr;

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use super::{
    ClockReadings, DeviceReading, GpuError, GpuReading, GpuSource, ProcessKind, ProcessReading,
};

/// NVML, initialised on first use.
pub struct NvmlSource {
    library: String,
    nvml: Option<Nvml>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("library", &self.library)
            .field("initialised", &self.nvml.is_some())
            .finish()
    }
}

impl NvmlSource {
    /// Loads `library` (a file name for the usual search, or a path) on the first read.
    pub fn new(library: impl Into<String>) -> Self {
        Self {
            library: library.into(),
            nvml: None,
        }
    }
}

/// Whether an error means NVML as a whole is gone, not just one call or one device.
fn is_fatal(err: &NvmlError) -> bool {
    matches!(
        err,
        NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::LibRmVersionMismatch
            | NvmlError::LibloadingError(_)
    )
}

fn unavailable(err: NvmlError) -> GpuError {
    GpuError::Unavailable(err.to_string())
}

/// `Some(value)`, or `None` with a debug line for anything but NOT_SUPPORTED. A fatal error is
/// kept so the read can fail as a whole.
struct Fields<'a> {
    index: u32,
    fatal: &'a mut Option<NvmlError>,
}

impl Fields<'_> {
    fn get<T>(&mut self, field: &str, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(NvmlError::NotSupported) => None,
            Err(err) if is_fatal(&err) => {
                self.fatal.get_or_insert(err);
                None
            }
            Err(err) => {
                tracing::debug!(collector = "gpu", gpu = self.index, field, error = %err, "field unavailable");
                None
            }
        }
    }
}

fn processes(kind: ProcessKind, list: Vec<ProcessInfo>) -> impl Iterator<Item = ProcessReading> {
    list.into_iter().map(move |p| ProcessReading {
        pid: p.pid,
        kind,
        used_memory_bytes: match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        },
    })
}

fn read_device(
    index: u32,
    device: &Device<'_>,
    fatal: &mut Option<NvmlError>,
) -> Option<DeviceReading> {
    // Without its identity a device cannot be labelled: leave it out.
    let name = device
        .name()
        .map_err(|e| fatal_or_skip(index, "name", e, fatal))
        .ok()?;
    let uuid = device
        .uuid()
        .map_err(|e| fatal_or_skip(index, "uuid", e, fatal))
        .ok()?;
    let mut f = Fields { index, fatal };
    let memory = f.get("memory_info", device.memory_info());
    let fans = f.get("num_fans", device.num_fans()).unwrap_or(0);
    let fan_speeds_percent = (0..fans)
        .filter_map(|fan| f.get("fan_speed", device.fan_speed(fan)))
        .collect();
    let mut process_list: Vec<ProcessReading> = Vec::new();
    if let Some(list) = f.get("compute_processes", device.running_compute_processes()) {
        process_list.extend(processes(ProcessKind::Compute, list));
    }
    if let Some(list) = f.get("graphics_processes", device.running_graphics_processes()) {
        process_list.extend(processes(ProcessKind::Graphics, list));
    }
    Some(DeviceReading {
        index,
        name,
        uuid,
        pci_bus_id: f.get("pci_info", device.pci_info()).map(|p| p.bus_id),
        utilization_gpu_percent: f
            .get("utilization", device.utilization_rates())
            .map(|u| u.gpu),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        temperature_gpu_celsius: f.get("temperature", device.temperature(TemperatureSensor::Gpu)),
        power_usage_milliwatts: f.get("power_usage", device.power_usage()),
        enforced_power_limit_milliwatts: f.get("power_limit", device.enforced_power_limit()),
        total_energy_millijoules: f.get("total_energy", device.total_energy_consumption()),
        clocks_mhz: ClockReadings {
            graphics: f.get("clock_graphics", device.clock_info(Clock::Graphics)),
            sm: f.get("clock_sm", device.clock_info(Clock::SM)),
            memory: f.get("clock_memory", device.clock_info(Clock::Memory)),
        },
        fan_speeds_percent,
        clocks_event_reasons: f
            .get("clocks_event_reasons", device.current_throttle_reasons())
            .map(|r| r.bits()),
        processes: process_list,
    })
}

fn fatal_or_skip(index: u32, field: &str, err: NvmlError, fatal: &mut Option<NvmlError>) {
    if is_fatal(&err) {
        fatal.get_or_insert(err);
    } else {
        tracing::debug!(collector = "gpu", gpu = index, field, error = %err, "device left out");
    }
}

impl GpuSource for NvmlSource {
    fn read(&mut self) -> Result<GpuReading, GpuError> {
        let nvml = match self.nvml.take() {
            Some(nvml) => nvml,
            None => Nvml::builder()
                .lib_path(OsStr::new(&self.library))
                .init()
                .map_err(unavailable)?,
        };
        let nvml = &*self.nvml.insert(nvml);
        let count = nvml.device_count().map_err(unavailable)?;
        let mut fatal = None;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            match nvml.device_by_index(index) {
                Ok(device) => devices.extend(read_device(index, &device, &mut fatal)),
                Err(err) => fatal_or_skip(index, "handle", err, &mut fatal),
            }
        }
        if let Some(err) = fatal {
            return Err(unavailable(err));
        }
        let mut f = Fields {
            index: u32::MAX,
            fatal: &mut fatal,
        };
        Ok(GpuReading {
            driver_version: f.get("driver_version", nvml.sys_driver_version()),
            cuda_driver_version: f.get("cuda_version", nvml.sys_cuda_driver_version()),
            devices,
        })
    }

    fn reset(&mut self) {
        if let Some(nvml) = self.nvml.take()
            && let Err(err) = nvml.shutdown()
        {
            tracing::debug!(collector = "gpu", error = %err, "nvmlShutdown failed");
        }
    }
}
